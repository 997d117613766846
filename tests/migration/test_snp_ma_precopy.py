"""Pre-copy of an SNP guest through migration agents (sevcore.migration.ma.precopy): the worker
seals while the guest works, later passes carry what the dirty log of its guest_memfd slot (out
of tree) reports, the guest stops only for the last pass; its own check passes on the target,
and a refusal leaves the source guest running."""
import errno

import numpy as np
import pytest

import sevcore
from sevcore import uapi as U
from sevcore.hw.costmodel import CostModel
from sevcore.migration import ma

from support import raises_errno
from support.migration import ma_over_channel

MEM = 16 << 20


def working_guest(mem=MEM, dirty_pages=8):
    """Two hosts with agents, and a guest bound to the source's that is working."""
    src, dst = sevcore.Kvm(), sevcore.Kvm()
    a, b = ma.Agent(src), ma.Agent(dst)
    guest = ma.SnpMaGuest.launch(src, mem, a, seed=3)
    guest.start_work(seed=4, dirty_pages=dirty_pages)
    guest.work(2)
    return src, dst, a, b, guest


def test_precopy_moves_a_working_guest_and_its_check_passes():
    """Pre-copy with the guest working between the worker's requests: several passes, the last
    one stopped; on the target the guest's data matches its ledger and its VMRK key is the
    same; the source's slot no longer logs."""
    src, dst, a, b, guest = working_guest()
    target, st = ma.migrate(guest, a, dst, b, cost=CostModel(), max_passes=30)
    out = target.check()
    assert out["data_ok"] and out["key_ok"]
    assert len(st.passes) >= 2 and st.converged
    assert [p["stop"] for p in st.passes] == [False] * (len(st.passes) - 1) + [True]
    assert st.passes[0]["pages"] == len(guest.sealed_gfns()) and st.passes[0]["guest-rounds"]
    assert st.pages_sealed == sum(p["pages"] for p in st.passes)
    assert not guest.vm.gfn_to_memslot(ma.DATA_GFN).flags & U.KVM_MEM_LOG_DIRTY_PAGES


def test_pages_dirtied_in_a_pass_are_sent_in_the_next():
    """The gfns of pass k+1 are exactly those the guest wrote during pass k (the last pass:
    also its ledger), and the target, opening every pass in order, gets the newest copy."""
    src, dst, a, b, guest = working_guest(dirty_pages=16)
    ma.pair(a, b)
    batches, passes, converged = ma.precopy(guest, max_passes=4, stop_pages=0)
    assert len(batches) == 4 and not converged
    done = 2                                      # rounds before the migration
    for k in range(3):
        rounds = passes[k]["guest-rounds"]
        wrote = set(np.concatenate(guest.written[done:done + rounds]).tolist())
        done += rounds
        if k == 2:
            wrote.add(ma.LEDGER_GFN)
        assert set(batches[k + 1].gfns.tolist()) == wrote
        assert passes[k]["dirty-after"] == len(wrote) - (k == 2)
    seqs = np.concatenate([bt.seqs for bt in batches])
    assert (np.diff(seqs.astype(np.int64)) > 0).all()
    image = ma.send(guest, a, batches)
    out = ma.receive(dst, MEM, b, image).check()
    assert out["data_ok"] and out["key_ok"]


def test_precopy_downtime_is_below_stop_and_copy():
    """The same guest doing the same work: pre-copy's modelled downtime (the stopped part)
    is below stop-and-copy's, its total time above its downtime; stop-and-copy has one
    stopped pass whose time is all downtime."""
    cost = CostModel()
    runs = {}
    for max_passes in (1, 30):
        src, dst, a, b, guest = working_guest()
        if max_passes == 1:
            guest.write_ledger()
        target, st = ma.migrate(guest, a, dst, b, cost=cost, max_passes=max_passes)
        assert target.check()["data_ok"]
        runs[max_passes] = st
    stop, pre = runs[1], runs[30]
    assert len(stop.passes) == 1 and stop.total_ns == stop.downtime_ns == stop.passes[0]["ns"]
    assert pre.downtime_ns < stop.downtime_ns and pre.total_ns > pre.downtime_ns
    assert pre.passes[-1]["pages"] < stop.passes[0]["pages"]


def test_without_the_opt_in_kvm_refuses_the_log():
    """The VMM's KVM_SET_USER_MEMORY_REGION2 with LOG_DIRTY_PAGES on the guest's slot is
    EINVAL until snp_enable_gmem_dirty_log, and the guest works on."""
    src, dst, a, b, guest = working_guest()
    with raises_errno(errno.EINVAL, "KVM_SET_USER_MEMORY_REGION2"):
        ma._log_dirty(guest.vm, True)
    guest.write_ledger()
    assert guest.check()["data_ok"]


def test_a_refused_export_after_precopy_leaves_the_source_running():
    """An agent the guest is not bound to is refused MSG_EXPORT_REQ after the passes: the
    source swaps its pages back in, its slot no longer logs, and the guest works on and passes
    its own check."""
    src, dst, a, b, guest = working_guest()
    other = ma.Agent(src)
    with pytest.raises(ma.MaError, match="SEV_RET_INVALID_GUEST"):
        ma.migrate(guest, other, dst, b, cost=CostModel(), max_passes=30)
    assert src.host.psp.snp_guest(guest.vm.sev.snp_context).state == U.SNP_GUEST_STATE_RUNNING
    assert not guest.vm.gfn_to_memslot(ma.DATA_GFN).flags & U.KVM_MEM_LOG_DIRTY_PAGES
    guest.run_workload(rounds=1, seed=9)
    out = guest.check()
    assert out["data_ok"] and out["key_ok"]


@pytest.mark.parametrize("channel", ["in-process", "tcp"])
def test_precopy_between_two_processes(channel):
    """Over a channel the source sends each pass as a PASS frame while the guest works, then
    the image with the last pass; the target opens them all in order and the guest's own
    check passes; the source reports the passes and a downtime below the total time."""
    from sevcore.migration.transport import TcpListener, inprocess_pair, tcp_connect
    src, dst, a, b, guest = working_guest()
    if channel == "tcp":
        with TcpListener() as lst:
            src_end = tcp_connect(*lst.address, timeout=60)
            dst_end = lst.accept(timeout=60, channel_timeout=60)
            result, (target, _) = ma_over_channel(src_end, dst_end, guest, a, dst, b,
                                                  max_passes=30, cost=CostModel())
            src_end.close()
            dst_end.close()
    else:
        src_end, dst_end = inprocess_pair(timeout=60)
        result, (target, _) = ma_over_channel(src_end, dst_end, guest, a, dst, b,
                                              max_passes=30, cost=CostModel())
    assert result["data_ok"] and result["key_ok"]
    assert len(result["passes"]) >= 2 and result["passes"][-1]["stop"]
    assert result["pages"] == sum(p["pages"] for p in result["passes"])
    assert result["downtime_ns"] < result["total_ns"]


def test_a_target_gone_during_precopy_leaves_the_source_running():
    """A target that closes after HELLO fails the source's first PASS frame, before anything
    is swapped or exported: the failure is not a loss, the slot no longer logs, and the
    source guest works on and checks itself clean."""
    import threading

    from sevcore.migration import ma_remote
    from sevcore.migration.errors import PeerClosed
    from sevcore.migration.transport import inprocess_pair
    src, dst, a, b, guest = working_guest()
    src_end, dst_end = inprocess_pair(capacity=1 << 16, timeout=30)

    def target():
        ma_remote.agree(dst_end, b)
        dst_end.close()
    t = threading.Thread(target=target)
    t.start()
    with pytest.raises(PeerClosed):
        ma_remote.send_guest(src_end, guest, a, max_passes=30)
    t.join(30)
    assert src.host.psp.snp_guest(guest.vm.sev.snp_context).state == U.SNP_GUEST_STATE_RUNNING
    assert not guest.vm.gfn_to_memslot(ma.DATA_GFN).flags & U.KVM_MEM_LOG_DIRTY_PAGES
    guest.work()
    guest.write_ledger()
    out = guest.check()
    assert out["data_ok"] and out["key_ok"]


def test_no_passes_is_refused_before_anything():
    """``max_passes`` 0 is a ValueError before the agents talk: no message sent, the slot
    not logging, and the guest works on."""
    src, dst, a, b, guest = working_guest()
    sent = a.messages + b.messages
    with pytest.raises(ValueError, match="max_passes"):
        ma.migrate(guest, a, dst, b, max_passes=0)
    assert a.messages + b.messages == sent
    assert not guest.vm.gfn_to_memslot(ma.DATA_GFN).flags & U.KVM_MEM_LOG_DIRTY_PAGES
    guest.write_ledger()
    assert guest.check()["data_ok"]


def ma_remote_parts(*parts):
    """A payload of ``parts`` as ma_remote frames them."""
    from sevcore.migration import ma_remote
    return ma_remote._parts(*parts)


def _target_gets(payload):
    """The target's receive_guest after HELLO both ways, when the source's next frame is a
    PASS of ``payload``: the exception it raises."""
    import threading

    from sevcore.migration import ma_remote
    from sevcore.migration.transport import inprocess_pair
    src, dst = sevcore.Kvm(), sevcore.Kvm()
    a, b = ma.Agent(src), ma.Agent(dst)
    src_end, dst_end = inprocess_pair(timeout=30)

    def source():
        ma_remote.agree(src_end, a)
        ma_remote.send_frame(src_end, ma_remote.PASS, payload)
    t = threading.Thread(target=source)
    t.start()
    with pytest.raises(Exception) as got:
        ma_remote.receive_guest(dst_end, dst, b)
    t.join(30)
    return got.value


@pytest.mark.parametrize("payload", [
    b"\x01\x02", b"\x03" + bytes(8), ma_remote_parts(b"1234567", b"", b""),
    ma_remote_parts(bytes(8), bytes(12), bytes(4096 + 16))],
    ids=["short-length", "length-cut", "gfns-7-bytes", "seqs-12-bytes"])
def test_a_malformed_pass_frame_is_a_stream_error(payload):
    """A PASS frame whose parts are cut short (a part's length of fewer than 8 bytes) or
    whose gfns or seqs are not whole u64s is refused as the stream's error (MaError), not as
    whatever the parser tripped on."""
    e = _target_gets(payload)
    assert isinstance(e, ma.MaError) and "stream" in str(e), repr(e)


def test_passes_past_what_a_target_keeps_are_a_stream_error(monkeypatch):
    """A source that sends more PASS bytes than a target keeps before the image (it can open
    none of them yet) is refused as the stream's error before the target holds more."""
    from sevcore.migration import ma_remote
    payload = ma_remote_parts(bytes(8), bytes(8), bytes(ma_remote.PACKET_SIZE))
    monkeypatch.setattr(ma_remote, "MAX_PASSED", len(payload) - 1)
    e = _target_gets(payload)
    assert isinstance(e, ma.MaError) and "stream" in str(e) and "before the image" in str(e)


def test_nothing_dirty_stops_even_under_a_zero_downtime_limit():
    """A guest that no longer writes, under a downtime limit no send can meet: the first pass
    leaves nothing dirty, so pre-copy stops there (as the main engine does), with no empty
    pass and, the target's opens being past the limit, not converged; the guest's own check
    passes on the target."""
    src, dst, a, b, guest = working_guest()
    guest.write_ledger()
    target, st = ma.migrate(guest, a, dst, b, cost=CostModel(downtime_limit_ms=0.0),
                            max_passes=5)
    assert not st.converged
    assert [p["pages"] for p in st.passes] == [len(guest.sealed_gfns()), 0]
    out = target.check()
    assert out["data_ok"] and out["key_ok"]


def test_the_stop_is_judged_with_the_targets_opens_of_every_pass():
    """Pre-copy converges only if the stop's whole modelled downtime, the target's opens of
    every pass's pages included, fits the limit; once those opens alone are past it, more
    passes cannot help and it stops after the first, not converged, its downtime over."""
    src, dst, a, b, guest = working_guest()
    cost = CostModel(downtime_limit_ms=1.0)
    target, st = ma.migrate(guest, a, dst, b, cost=cost, max_passes=5)
    assert not st.converged and len(st.passes) == 2 and st.passes[0]["dirty-after"] > 0
    assert st.downtime_ns > cost.downtime_limit_ms * 1e6
    out = target.check()
    assert out["data_ok"] and out["key_ok"]
    src2, dst2, a2, b2, guest2 = working_guest()
    _, st2 = ma.migrate(guest2, a2, dst2, b2, cost=CostModel(), max_passes=5)
    assert st2.converged and st2.downtime_ns <= CostModel().downtime_limit_ms * 1e6


def test_the_stop_is_charged_its_last_dirty_log_read():
    """After passes while the guest worked, the modelled downtime holds the last
    KVM_GET_DIRTY_LOG (done with the guest stopped) on top of the stopped pass's own steps;
    stop-and-copy reads no log and is charged none."""
    cost = CostModel(dirty_sync_ns_per_gib=float(1 << 30))     # one ns per byte of guest
    passes = [{"pages": 10, "bytes": 10 * ma.WIRE_PAGE}, {"pages": 3, "bytes": 3 * ma.WIRE_PAGE}]
    src, dst, a, b, guest = working_guest()
    down, _ = ma.model_times(cost, passes, guest, 0, 3)
    stopped = ma.modelled_ns(cost, 3, 3 * ma.WIRE_PAGE, guest.layout.batch_pages, 3, 13)
    assert down == pytest.approx(stopped + MEM)
    alone, _ = ma.model_times(cost, passes[1:], guest, 0, 3)
    assert alone == pytest.approx(ma.modelled_ns(cost, 3, 3 * ma.WIRE_PAGE,
                                                 guest.layout.batch_pages, 3))


def test_a_worker_that_cannot_start_leaves_the_slot_not_logging(monkeypatch):
    """When the VMM's side of the worker cannot be set up once the slot logs, pre-copy fails
    with the slot's logging off again, and the guest works on."""
    src, dst, a, b, guest = working_guest()

    def refused(guest):
        raise ValueError("no worker")
    monkeypatch.setattr(ma, "Worker", refused)
    with pytest.raises(ValueError, match="no worker"):
        ma.precopy(guest, max_passes=3)
    assert not guest.vm.gfn_to_memslot(ma.DATA_GFN).flags & U.KVM_MEM_LOG_DIRTY_PAGES
    guest.write_ledger()
    assert guest.check()["data_ok"]
