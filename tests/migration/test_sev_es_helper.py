"""SEV-ES guests by the helper path: the target launched by the guest owner (the source's image,
the guest's and the mirror's VMSAs in its measurement, the transport key by LAUNCH_SECRET), the
vCPUs' state saved by the guest into private pages the helper seals, restored on the target;
in process, over TCP and from the CLI; and the failures (a tampered, replayed or lost save area,
a target the owner will not trust) ending with the source guest running or the loss reported."""

import numpy as np
import pytest

import sevcore
from sevcore.cli import main
from sevcore.migration import stream as S
from sevcore.migration import helper as H
from sevcore.migration.engine import MigrationError, MigrationParams, TargetFailed, migrate
from sevcore.migration.machine import Machine
from sevcore.migration.remote import send_to
from sevcore.migration.workload import GuestConfig
from sevcore.uapi import KVM_X86_SEV_ES_VM, SEV_GUEST_STATE_RUNNING, SEV_POLICY_ES

from support.migration import (SMALL, Proxy, assert_runs_on, flip, guest_state, rewrite,
                               target_process)

ES_HELPER = dict(SMALL, vm_type=KVM_X86_SEV_ES_VM, policy=SEV_POLICY_ES, helper_vcpus=1)
HELPER = MigrationParams(path="helper", max_iterations=3)


def es_guest(**cfg):
    return Machine.launch(sevcore.Kvm(), GuestConfig(**{**ES_HELPER, **cfg}))


def test_sev_es_guest_moves_by_the_helper_into_a_launched_target():
    """An SEV-ES guest on two vCPUs dirtying pages moves by the helper path with no SEND_START
    and no VMSA ioctl: the target is launched (LAUNCH_* only), every vCPU restores its saved
    state, the guest's own check is clean and it runs on there, its helper kept."""
    m = es_guest(nr_vcpus=2, mem_size=4 << 20, dirty_pages_per_s=200_000)
    assert m.helper is not None and m.vcpus[0].guest_state_protected
    r = migrate(m, sevcore.Kvm(), HELPER)
    st = r.stats
    assert st.status == "completed" and st.bad_pages == 0 and st.guest_pages_written > 0
    assert st.verified_pages == m.config.layout.end_gfn - m.config.layout.shared_gfn
    assert st.psp_commands == {"LAUNCH_START": 1, "LAUNCH_UPDATE_DATA": 1,
                               "LAUNCH_UPDATE_VMSA": 2, "LAUNCH_MEASURE": 1,
                               "LAUNCH_SECRET": 2, "LAUNCH_FINISH": 1}
    t = r.target
    assert guest_state(t) == SEV_GUEST_STATE_RUNNING and t.helper is not None
    assert all(v.guest_state_protected for v in t.vcpus)
    t.tick()                            # the guest reads its TSC anew after the move
    t.host.clock.advance(1e8, "test")
    assert t.tick() > 0
    assert t.self_check()[1] == 0


def test_the_moved_guest_moves_again_by_its_kept_helper():
    """The target's helper, launched with it, stays: the guest moves on to a third Host, its
    state saved and restored again, its check clean."""
    m = es_guest(dirty_pages_per_s=5_000)
    t = migrate(m, sevcore.Kvm(), HELPER).target
    t.host.clock.advance(1e8, "test")
    t.tick()
    r = migrate(t, sevcore.Kvm(), HELPER)
    assert r.stats.status == "completed" and r.stats.bad_pages == 0
    assert r.stats.verified_pages > 0


def test_a_target_helper_seals_above_every_number_the_source_could_have_used():
    """The target's helper seals in its own generation, above every count of every lane the
    source's helper could claim in its generation, so it never reuses a source (gfn, seq)
    under the shared transport key, whichever packets the host delivered."""
    m = es_guest(workload="idle", helper_vcpus=2)
    seqs = []

    def transform(i, rec, w):
        if isinstance(rec, S.HelperPage):
            seqs.append(rec.seq)
        rewrite(w, rec)
    proxy = Proxy(transform)
    r = migrate(m, sevcore.Kvm(), HELPER, channel_pair=(proxy.source_end, proxy.target_end))
    assert r.stats.status == "completed" and seqs and r.target.generation == 1
    count = (1 << H.LANE_SHIFT) - 1
    assert all(q & count < 1 << H.GEN_SHIFT for q in seqs)
    new = r.target.helper.seal(np.arange(4, dtype=np.uint64)).seqs
    assert all(int(q) & count >= 1 << H.GEN_SHIFT for q in new)


def test_a_packet_of_an_earlier_migration_is_refused_by_a_later_target():
    """A helper packet recorded from the guest's first move, put into the stream of its second
    move, is refused as a replay by the second target, which opens only what the current
    source's generation sealed; that source runs on."""
    m = es_guest(dirty_pages_per_s=5_000)
    recorded = {}

    def record(i, rec, w):
        if isinstance(rec, S.HelperPage):
            recorded.setdefault(rec.gfn, rec)
        rewrite(w, rec)
    proxy = Proxy(record)
    t = migrate(m, sevcore.Kvm(), HELPER, channel_pair=(proxy.source_end,
                                                         proxy.target_end)).target
    t.host.clock.advance(1e8, "test")
    t.tick()

    def replay(i, rec, w):
        if isinstance(rec, S.HelperPage) and rec.gfn in recorded:
            rec = recorded.pop(rec.gfn)
        rewrite(w, rec)
    proxy = Proxy(replay)
    with pytest.raises(TargetFailed, match="replay"):
        migrate(t, sevcore.Kvm(), HELPER, channel_pair=(proxy.source_end, proxy.target_end))
    assert_runs_on(t)


def test_the_transport_key_reaches_the_target_only_inside_launch_secret():
    """The owner's transport key is in neither host's view of guest memory nor in any record
    on the wire; the target's helper opens the pages all the same."""
    m = es_guest(workload="idle")
    key = m.owner.key
    seen = []

    def transform(i, rec, w):
        seen.append(repr(rec.params) if isinstance(rec, S.Setup) else
                    bytes(getattr(rec, "packet", b"")) + bytes(getattr(rec, "data", b"")))
        rewrite(w, rec)
    proxy = Proxy(transform)
    r = migrate(m, sevcore.Kvm(), HELPER, channel_pair=(proxy.source_end, proxy.target_end))
    assert r.stats.bad_pages == 0
    for blob in seen:
        assert (key not in blob) if isinstance(blob, bytes) else (key.hex() not in blob)
    for mach in (m, r.target):
        assert key not in mach.kvm.read(mach.hva, mach.config.mem_size)


def _save_area_packet(change):
    """A proxy transform applying ``change(packet, earlier)`` to vCPU 0's save area packet in
    the stop-and-copy pass (``earlier``: the same page's packet from pass 0); None drops it."""
    state = {"stop": False, "first": None}

    def transform(i, rec, w):
        if isinstance(rec, S.Iteration):
            state["stop"] = rec.stop
        if isinstance(rec, S.HelperPage) and rec.gfn == save_gfn:
            if not state["stop"]:
                state["first"] = rec
            else:
                rec = change(rec, state["first"])
                if rec is None:
                    return
        rewrite(w, rec)
    save_gfn = GuestConfig(**ES_HELPER).layout.save_gfn
    return transform


def _tampered(rec, first):
    return S.HelperPage(rec.gfn, rec.seq, flip(rec.packet, 8 * 100))


def _replayed(rec, first):
    return first


@pytest.mark.parametrize("change,reason", [(_tampered, "auth"), (_replayed, "replay")])
def test_a_tampered_or_replayed_save_area_is_refused_and_the_source_runs_on(change, reason):
    """vCPU 0's saved state altered on the wire, or replaced by its pass-0 packet, is refused
    by the target's helper before the hand-over; the source, never sent, releases its vCPUs,
    passes its own check and runs on."""
    m = es_guest(dirty_pages_per_s=5_000)
    proxy = Proxy(_save_area_packet(change))
    with pytest.raises(TargetFailed, match=reason) as e:
        migrate(m, sevcore.Kvm(), HELPER, channel_pair=(proxy.source_end, proxy.target_end))
    st = e.value.stats
    assert st.status == "failed" and not st.send_cancel and "SEND_START" not in st.psp_commands
    assert st.source_resumed and st.source_check["bad"] == 0
    assert_runs_on(m)
    assert migrate(m, sevcore.Kvm(), HELPER).stats.bad_pages == 0


def test_a_lost_save_area_stops_the_target_guest_rather_than_run_it_wrong():
    """A save area dropped on the wire (neither helper notices a missing packet) leaves the
    target's vCPU 0 without the state its header says was saved: the guest aborts on its first
    run instead of running on, and the migration is reported failed, never completed."""
    m = es_guest(workload="idle")
    proxy = Proxy(_save_area_packet(lambda rec, first: None))
    dst = sevcore.Kvm()
    with pytest.raises(MigrationError, match="no state saved"):
        migrate(m, dst, HELPER, channel_pair=(proxy.source_end, proxy.target_end))
    assert dst.host.umc.keyed_asids() == []     # the target destroyed its guest and mirror


@pytest.mark.parametrize("hops", [1, 2])
def test_a_save_area_dropped_with_the_header_is_not_run_past(hops):
    """vCPU 0's save area and the guest's header page both dropped in the stop pass (the
    target keeps an older header, with no save request or one already restored) still stop the
    target's guest: a launched target requires the state saved for it, on a first or a later
    move."""
    m = es_guest(workload="idle")
    for _ in range(hops - 1):
        m = migrate(m, sevcore.Kvm(), HELPER).target
        m.host.clock.advance(1e8, "test")
    drop, state = {0, m.config.layout.save_gfn}, {"stop": False}

    def transform(i, rec, w):
        if isinstance(rec, S.Iteration):
            state["stop"] = rec.stop
        if not (isinstance(rec, S.HelperPage) and state["stop"] and rec.gfn in drop):
            rewrite(w, rec)
    proxy = Proxy(transform)
    with pytest.raises(MigrationError, match="no saved state came|restored before"):
        migrate(m, sevcore.Kvm(), HELPER, channel_pair=(proxy.source_end, proxy.target_end))


def test_a_target_failing_in_its_launch_destroys_its_guest_and_mirror(monkeypatch):
    """A target whose launch fails after its helper's mirror was made (here LAUNCH_MEASURE)
    closes the mirror with the guest: its Host keeps no keyed ASID, and the source runs on."""
    real = Machine.launch_measure
    calls = []

    def failing(self, *args):
        measure = real(self, *args)
        calls.append(self.helper)
        if len(calls) == 2:                     # the source's own launch is the first
            raise OSError(5, "LAUNCH_MEASURE: Input/output error (injected)")
        return measure
    monkeypatch.setattr(Machine, "launch_measure", failing)
    m = es_guest(workload="idle")
    dst = sevcore.Kvm()
    with pytest.raises(MigrationError, match="injected"):
        migrate(m, dst, HELPER)
    assert calls[1] is not None and calls[1]._mirror is None    # made, then closed
    assert dst.host.umc.keyed_asids() == []
    assert_runs_on(m)


def test_the_owner_refuses_a_target_launched_otherwise():
    """A target whose launch differs from the source's (here a boot image the host altered)
    gets no transport key: the owner refuses its LAUNCH_MEASURE, the source runs on."""
    m = es_guest(workload="idle")
    kvm = sevcore.Kvm()
    orig = Machine.launch_measure

    def altered(self, *a):
        self.kvm.write(self.hva, b"host was here")
        return orig(self, *a)
    Machine.launch_measure = altered
    try:
        with pytest.raises(MigrationError, match="LAUNCH_MEASURE") as e:
            migrate(m, kvm, HELPER)
    finally:
        Machine.launch_measure = orig
    assert e.value.stats.source_resumed and e.value.stats.source_check["bad"] == 0
    assert_runs_on(m)


def test_sev_es_helper_over_tcp_into_a_target_process(tmp_path):
    """A target process receives an SEV-ES guest by the helper over TCP (no out-of-tree ioctl
    needed); the guest's own check there is clean."""
    proc, port = target_process(tmp_path)
    m = es_guest(nr_vcpus=2, dirty_pages_per_s=2_000)
    src = send_to("127.0.0.1", port, m,
                  MigrationParams(path="helper", max_iterations=3, timeout_s=30))
    out, err = proc.communicate(timeout=30)
    assert proc.returncode == 0, err
    assert "0 bad" in out
    assert src.stats.status == "completed" and src.stats.bad_pages == 0
    assert src.stats.psp_commands["LAUNCH_SECRET"] == 2


def test_cli_type_sev_es_path_helper(capsys):
    """sevcore migrate --type sev-es --path helper completes with a clean guest check."""
    assert main(["migrate", "--type", "sev-es", "--path", "helper", "--mem", "4M", "--shared",
                 "64K", "--max-iterations", "2", "--quiet"]) == 0
    out = capsys.readouterr().out
    assert "completed" in out and ", 0 bad" in out


def test_save_areas_are_private_and_written_only_at_the_stop():
    """The save areas sit below the GHCBs, private (not in the shared ranges), one per vCPU;
    the guest writes them only when asked, so pre-copy passes do not see them dirty."""
    m = es_guest(nr_vcpus=2, workload="idle")
    lay = m.config.layout
    assert lay.save_pages == 2 and lay.save_gfn + 2 == lay.ghcb_gfn
    shared = m.tracker.shared.contains_array(np.arange(lay.save_gfn, lay.shared_gfn))
    assert not shared[:2].any() and shared[2:].all()
    before = m.kvm.read(m.hva + (lay.save_gfn << 12), 2 << 12)
    m.host.clock.advance(1e6, "test")
    m.tick()
    assert m.kvm.read(m.hva + (lay.save_gfn << 12), 2 << 12) == before
    m.save_vcpus()
    assert m.kvm.read(m.hva + (lay.save_gfn << 12), 2 << 12) != before
    m.release_vcpus()
    assert_runs_on(m)
