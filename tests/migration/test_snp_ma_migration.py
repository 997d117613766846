"""SNP migration through migration agents in process (sevcore.migration.ma): the guest's pages
sealed by its own worker at CPU speed, its secrets page and VMSAs through SNP_PAGE_SWAP_OUT/IN,
its context through MSG_EXPORT_REQ / MSG_IMPORT_REQ between agents that checked each other,
and the guest's own check on the target; then every refusal, each leaving the source guest
resumable or the target context unused."""
import errno
from pathlib import Path

import numpy as np
import pytest

import sevcore
from sevcore import uapi as U
from sevcore.hw.costmodel import CostModel
from sevcore.kvm import snp_ma as K
from sevcore.migration import ma
from sevcore.migration.helper import HelperPacketError
from sevcore.psp import snp_layout as SL
from sevcore.vmm import attest

from support import raises_errno
from support.migration import ma_over_channel

MEM = 48 << 12


@pytest.fixture
def hosts():
    """Two hosts, each with a migration agent, and a guest bound to the source's agent that
    has done some work."""
    src, dst = sevcore.Kvm(), sevcore.Kvm()
    a, b = ma.Agent(src), ma.Agent(dst)
    guest = ma.SnpMaGuest.launch(src, MEM, a, seed=3, batch_pages=8)
    guest.run_workload(rounds=3, seed=4)
    return src, dst, a, b, guest


def test_migrates_through_agents_and_the_guest_checks_itself(hosts):
    """On the target the guest finds its data as it left it, its report (VMPCK0 and message
    count moved) has its launch measurement and names the target's agent, and its VMRK key is
    the same; its pages are in guest_memfd, assigned to its ASID at their GPAs and validated."""
    src, dst, a, b, guest = hosts
    gctx = guest.vm.sev.snp_context
    measurement = src.host.psp.snp_guest(gctx).ld
    cost = CostModel()
    target, stats = ma.migrate(guest, a, dst, b, cost=cost)
    assert src.host.psp.snp_guest(gctx) is None and guest.vm.sev.snp_context is None
    out = target.check()
    assert out["data_ok"] and out["key_ok"]
    rep = attest.parse_report(out["report"])
    assert rep.measurement == measurement
    raw = SL.snp_attestation_report.unpack(out["report"])
    assert raw["report_id_ma"] == dst.host.psp.snp_guest(b.vm.sev.snp_context).report_id
    vm = target.vm
    slot = vm.gfn_to_memslot(ma.DATA_GFN)
    for gfn in (ma.SECRETS_GFN, ma.LEDGER_GFN, ma.DATA_GFN, target.layout.first_gfn - 1):
        pfn = slot.gmem_file.page_cache.lookup(slot.gmem_pgoff + gfn)
        e = dst.host.rmp.entry(int(pfn))
        assert (e.assigned, e.validated, e.asid, e.gpa) == (1, 1, vm.sev.asid, gfn << 12)
    assert stats.pages_sealed == len(guest.sealed_gfns()) and stats.pages_swapped == 3
    assert stats.agent_messages >= 4 and stats.bytes_sent > stats.pages_sealed * 4096
    sealing = 2 * stats.pages_sealed * 4096 * 1e9 / cost.helper_aead_bytes_per_s
    wire = stats.bytes_sent * 1e9 / cost.network_bytes_per_s
    assert stats.downtime_ns > sealing + wire + 6 * cost.psp_command_latency_ns


def test_launch_without_the_migrate_ma_policy_bit_is_refused():
    """KVM refuses an agent for a policy without MIGRATE_MA (EINVAL) and creates no context;
    the firmware refuses MA_EN without it (POLICY_FAILURE, tests/psp/test_snp_ma_messages.py)."""
    kvm = sevcore.Kvm()
    agent = ma.Agent(kvm)
    vm = kvm.create_vm(U.KVM_X86_SNP_VM)
    vm.memory_encrypt_op(U.KVM_SEV_INIT2)
    with raises_errno(errno.EINVAL):
        K.snp_launch_start_ma(vm, ma.POLICY, agent.vm)
    assert vm.sev.snp_context is None
    with raises_errno(errno.EINVAL):
        K.snp_launch_start_ma(vm, ma.GUEST_POLICY, vm)        # no agent there


def test_another_agent_cannot_export_and_the_source_resumes(hosts):
    """An agent the guest is not bound to gets INVALID_GUEST from MSG_EXPORT_REQ; the source
    swaps its pages back in and the guest runs on and passes its own check."""
    src, dst, a, b, guest = hosts
    other = ma.Agent(src)
    ma.pair(other, b)
    with pytest.raises(ma.MaError, match="SEV_RET_INVALID_GUEST") as e:
        ma.send(guest, other)
    assert e.value.status == U.SEV_RET_INVALID_GUEST
    assert src.host.psp.snp_guest(guest.vm.sev.snp_context).state == U.SNP_GUEST_STATE_RUNNING
    guest.run_workload(rounds=1, seed=9)
    out = guest.check()
    assert out["data_ok"] and out["key_ok"]


def test_an_agent_that_is_not_the_same_image_is_not_trusted(hosts):
    """The source agent refuses a peer whose report has another measurement; nothing is
    exported and the guest keeps running."""
    src, dst, a, b, guest = hosts
    rogue = ma.Agent(dst, image=b"another agent")
    with pytest.raises(attest.AttestationError, match="measurement"):
        ma.pair(a, rogue)
    with pytest.raises(ma.MaError, match="no peer agent trusted"):
        ma.send(guest, a)
    out = guest.check()
    assert out["data_ok"]


@pytest.mark.parametrize("attack", ["replay", "tamper"])
def test_a_replayed_or_tampered_context_is_refused(hosts, attack):
    """The target agent opens the sealed context once: a second delivery is a replay and a
    changed byte does not authenticate; the refused target context stays INIT."""
    src, dst, a, b, guest = hosts
    ma.pair(a, b)
    image = ma.send(guest, a)
    if attack == "replay":
        ma.receive(dst, MEM, b, image, 8)
    else:
        image.context = image.context[:40] + bytes([image.context[40] ^ 1]) + image.context[41:]
    spare = ma.SnpMaGuest(dst, MEM, 8)
    gctx = K.snp_incoming_context(spare.vm)
    with pytest.raises(ma.MaError, match="replayed" if attack == "replay" else "authenticate"):
        b.import_(gctx, image.context)
    assert dst.host.psp.snp_guest(gctx).state == U.SNP_GUEST_STATE_INIT


def test_a_tampered_page_is_refused_by_the_target_worker(hosts):
    """A page packet changed on the way is refused by the target's worker (auth), naming it."""
    src, dst, a, b, guest = hosts
    ma.pair(a, b)
    image = ma.send(guest, a)
    image.packets[5, 100] ^= np.uint8(1)
    with pytest.raises(HelperPacketError) as e:
        ma.receive(dst, MEM, b, image, 8)
    assert e.value.reason == "auth" and e.value.index == 5


@pytest.mark.parametrize("iterations", ["1", "30"])
def test_the_command_migrates_an_snp_guest_through_agents(tmp_path, capsys, iterations):
    """``sevcore migrate --type snp --path ma`` succeeds when the guest's own check passes on
    the target, and writes its record: one stopped pass with ``--max-iterations 1``, pre-copy
    passes (every page once, then the dirtied ones) by default."""
    import json

    from sevcore.cli import main
    out = tmp_path / "ma.json"
    assert main(["migrate", "--type", "snp", "--path", "ma", "--mem", "1M", "--json",
                 str(out), "--max-iterations", iterations]) == 0
    rec = json.loads(out.read_text())["ma"]
    assert rec["status"] == "completed" and rec["guest-data-ok"] and rec["guest-vmrk-key-ok"]
    npages = ma.SnpMaGuest(sevcore.Kvm(), 1 << 20).sealed_gfns().size
    stops = [p["stop"] for p in rec["pass-stats"]]
    assert stops[-1] and not any(stops[:-1]) and rec["passes"] == len(stops)
    if iterations == "1":
        assert rec["pages-sealed"] == npages and rec["downtime-ms"] == rec["total-time-ms"]
    else:
        assert rec["passes"] >= 2 and rec["pass-stats"][0]["pages"] == npages
        assert rec["pages-sealed"] > npages and rec["downtime-ms"] < rec["total-time-ms"]


@pytest.mark.parametrize("iterations, downtime_ms, passes", [("1", 571, 1), ("30", 162, 2)])
def test_the_readme_figures_of_a_64_mib_guest(tmp_path, iterations, downtime_ms, passes):
    """The README's modelled downtimes of a 64 MiB SNP guest through agents, stop-and-copy and
    pre-copy, are what the command reports."""
    import json

    from sevcore.cli import main
    out = tmp_path / "ma.json"
    assert main(["migrate", "--type", "snp", "--path", "ma", "--mem", "64M", "--quiet",
                 "--json", str(out), "--max-iterations", iterations]) == 0
    rec = json.loads(out.read_text())["ma"]
    assert (round(rec["downtime-ms"]), rec["passes"]) == (downtime_ms, passes)
    readme = (Path(__file__).parents[2] / "README.md").read_text()
    assert "162 ms\nof modelled downtime after 2 passes, against 571 ms" in readme


def _two_processes(src_end, dst_end, hosts):
    """The source and target halves on their own threads over a channel's two ends."""
    src, dst, a, b, guest = hosts
    return ma_over_channel(src_end, dst_end, guest, a, dst, b)


def test_over_an_in_process_channel(hosts):
    """The two halves over an in-process channel: the target's check passes and its result,
    with the guest's measurement, comes back to the source."""
    from sevcore.migration.transport import inprocess_pair
    src_end, dst_end = inprocess_pair(timeout=60)
    measurement = hosts[0].host.psp.snp_guest(hosts[4].vm.sev.snp_context).ld
    result, (target, _) = _two_processes(src_end, dst_end, hosts)
    assert result["data_ok"] and result["key_ok"]
    assert result["measurement"] == measurement.hex()


def test_over_tcp(hosts):
    """The same over TCP on the loopback."""
    from sevcore.migration.transport import TcpListener, tcp_connect
    with TcpListener() as lst:
        src_end = tcp_connect(*lst.address, timeout=60)
        dst_end = lst.accept(timeout=60, channel_timeout=60)
        result, _ = _two_processes(src_end, dst_end, hosts)
        src_end.close()
        dst_end.close()
    assert result["data_ok"] and result["key_ok"] and result["pages"] > 0


def test_the_command_over_tcp_between_two_processes(tmp_path):
    """``--listen`` in a target process and ``--to`` here: the guest leaves through its agent,
    the target's agent imports it and the guest's own check passes there."""
    import json

    from sevcore.cli import main
    from support.migration import target_process
    proc, port = target_process(tmp_path, "--type", "snp", "--path", "ma")
    out = tmp_path / "src.json"
    rc = main(["migrate", "--type", "snp", "--path", "ma", "--mem", "1M", "--to",
               f"127.0.0.1:{port}", "--json", str(out)])
    stdout, stderr = proc.communicate(timeout=60)
    assert rc == 0 and proc.returncode == 0, stderr
    assert "check passed" in stdout
    rec = json.loads(out.read_text())["ma"]
    assert rec["status"] == "completed" and rec["data_ok"] and rec["key_ok"]


def test_a_target_gone_after_the_export_is_reported_as_the_guest_lost(hosts):
    """A target that agrees, then closes before the image arrives: the source's export has
    decommissioned the guest, and the failure says the guest is lost, never success."""
    import threading

    from sevcore.migration import ma_remote
    from sevcore.migration.transport import inprocess_pair
    src, dst, a, b, guest = hosts
    src_end, dst_end = inprocess_pair(capacity=1 << 16, timeout=30)

    def target():
        ma_remote.agree(dst_end, b)
        dst_end.close()
    t = threading.Thread(target=target)
    t.start()
    with pytest.raises(ma.MaError, match="lost") as e:
        ma_remote.send_guest(src_end, guest, a)
    t.join(30)
    assert e.value.lost and guest.vm.sev.snp_context is None


def test_an_untrusted_target_leaves_the_source_guest_running(hosts):
    """A target agent of another image is refused at HELLO, before anything is swapped or
    exported: the failure is not a loss and the source guest checks itself clean."""
    import threading

    from sevcore.migration import ma_remote
    from sevcore.migration.transport import inprocess_pair
    src, dst, a, b, guest = hosts
    rogue = ma.Agent(dst, image=b"another agent")
    src_end, dst_end = inprocess_pair(timeout=30)
    t = threading.Thread(target=lambda: pytest.raises(Exception, ma_remote.receive_guest,
                                                      dst_end, dst, rogue))
    t.start()
    with pytest.raises(attest.AttestationError):
        ma_remote.send_guest(src_end, guest, a)
    src_end.close()
    t.join(30)
    out = guest.check()          # (its worker never started: no key page to compare yet)
    assert out["data_ok"] and len(out["report"]) == 1184


def test_a_context_from_an_earlier_pairing_is_refused(hosts):
    """A sealed context delivered in one pairing of two agents, replayed after they pair again,
    is refused by the channel; the spare target context stays INIT."""
    src, dst, a, b, guest = hosts
    ma.pair(a, b)
    image = ma.send(guest, a)
    ma.receive(dst, MEM, b, image, 8)
    ma.pair(a, b)
    spare = ma.SnpMaGuest(dst, MEM, 8)
    gctx = K.snp_incoming_context(spare.vm)
    with pytest.raises(ma.MaError, match="channel refused"):
        b.import_(gctx, image.context)
    assert dst.host.psp.snp_guest(gctx).state == U.SNP_GUEST_STATE_INIT


def test_the_channel_refuses_its_own_messages_reflected():
    """What an agent sealed for its peer is refused when sent back to it, and the two
    directions never seal under the same nonce."""
    a, b = ma.Agent(sevcore.Kvm()), ma.Agent(sevcore.Kvm())
    ma.pair(a, b)
    to_b, to_a = a._seal(b"context"), b._seal(b"context")
    assert to_b[:12] != to_a[:12]
    with pytest.raises(ma.MaError, match="channel"):
        a._open(to_b)
    assert b._open(to_b) == a._open(to_a) == b"context"


def test_a_resumed_source_gives_back_the_vmsa_pages_it_swapped_out(hosts):
    """After a refused export the vCPUs run on VMSAs swapped into new pages; the pages they
    left are the hypervisor's again, not guest pages nothing frees."""
    src, dst, a, b, guest = hosts
    other = ma.Agent(src)
    ma.pair(other, b)
    old = [v.vmsa_spa >> 12 for v in guest.vcpus]
    assigned = src.host.rmp.assigned
    with pytest.raises(ma.MaError):
        ma.send(guest, other)
    new = [v.vmsa_spa >> 12 for v in guest.vcpus]
    assert new != old and src.host.rmp.assigned == assigned
    assert not any(src.host.rmp.entry(p).assigned for p in set(old) - set(new))


def test_a_refused_image_leaves_nothing_on_the_target(hosts):
    """A target that refuses an image (here a replayed context) frees the VM it made for it:
    no context, no assigned page and no ASID of it remain."""
    src, dst, a, b, guest = hosts
    ma.pair(a, b)
    image = ma.send(guest, a)
    ma.receive(dst, MEM, b, image, 8)
    asids = dst.host.kvm_sev.asids

    def held():
        return dst.host.rmp.assigned, len(dst.host.psp._snp_guests), asids.used - asids.reclaim
    before = held()
    with pytest.raises(ma.MaError, match="replayed"):
        ma.receive(dst, MEM, b, image, 8)
    assert held() == before


@pytest.mark.parametrize("meta", [b"not json", b"[1]", b'{"npages": 0}'])
def test_an_image_with_a_bad_header_is_a_stream_error(meta):
    """An IMAGE frame whose header is not JSON, not an object or lacks a field is refused as
    the stream's error (MaError), as every other malformed frame is."""
    from sevcore.migration import ma_remote
    data = ma_remote._parts(meta, b"", b"", b"", b"secrets", b"context")
    with pytest.raises(ma.MaError, match="stream"):
        ma_remote._image(data)


def test_a_refused_vmsa_swap_out_leaves_the_source_running(hosts, monkeypatch):
    """When SNP_PAGE_SWAP_OUT of the second vCPU's VMSA is refused, the pages already swapped
    out (the secrets page, the first VMSA) come back and the guest passes its own check."""
    src, dst, a, b, guest = hosts
    ma.pair(a, b)
    real = K.snp_page_swap_out

    def refuse_second(vm, gfn=None, vcpu=None, root=False):
        if vcpu is guest.vcpus[1]:
            raise sevcore.errors.KvmError(errno.EINVAL, "KVM_MEMORY_ENCRYPT_OP", "refused")
        return real(vm, gfn=gfn, vcpu=vcpu, root=root)
    monkeypatch.setattr(K, "snp_page_swap_out", refuse_second)
    with raises_errno(errno.EINVAL):
        ma.send(guest, a)
    monkeypatch.undo()
    assert src.host.psp.snp_guest(guest.vm.sev.snp_context).state == U.SNP_GUEST_STATE_RUNNING
    guest.run_workload(rounds=1, seed=9)
    out = guest.check()
    assert out["data_ok"] and out["key_ok"]
