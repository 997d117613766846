"""The engine's parts on their own: the guest configuration, vCPU state, the pipeline of
simulated time, and the cases of the page flow the end-to-end tests do not reach."""
import io

import pytest

import sevcore
from sevcore.vmm import owner
from sevcore.cli import Progress
from sevcore.hw.costmodel import CostModel, SimClock
from sevcore.migration import stream as S
from sevcore.migration.engine import MigrationParams, TargetFailed, Timeline, migrate
from sevcore.migration.machine import GuestError, LaunchError, Machine
from sevcore.migration.workload import GuestConfig, WorkloadError
from sevcore.uapi import KVM_MAP_GPA_RANGE_DECRYPTED, KVM_X86_SEV_ES_VM, KVM_X86_SW_PROTECTED_VM

from support.migration import SMALL, Proxy, launched, rewrite

FAST = MigrationParams(max_iterations=4, timeout_s=20)


@pytest.mark.parametrize("change, msg", [
    (dict(mem_size=4097), "multiple of 4096"),
    (dict(shared_size=100), "multiple of 4096"),
    (dict(workload="busy"), "workload must be one of"),
    (dict(dirty_pages_per_s=-1), "dirty_pages_per_s"),
    (dict(hot_fraction=0), "hot_fraction"),
    (dict(nr_vcpus=0), "nr_vcpus"),
    (dict(helper_vcpus=-1), "helper_vcpus"),
    (dict(vm_type=KVM_X86_SEV_ES_VM), "SEV_POLICY_ES"),
    (dict(vm_type=KVM_X86_SW_PROTECTED_VM), "SEV and SEV-ES"),
    (dict(mem_size=64 << 10), "no data pages"),
    (dict(mem_size=512 << 10, helper_vcpus=1), "no room for the helper"),
])
def test_guest_config_refuses_what_it_cannot_run(change, msg):
    """Each impossible guest configuration is a WorkloadError naming the field."""
    with pytest.raises(WorkloadError, match=msg):
        GuestConfig(**{**SMALL, **change}).layout


def test_guest_config_round_trips_and_refuses_unknown_keys():
    """to_dict/from_dict round-trip; an unknown key (another version's SETUP) is refused."""
    cfg = GuestConfig(**SMALL, helper_vcpus=2)
    assert GuestConfig.from_dict(cfg.to_dict()) == cfg
    assert cfg.reserved_pages == cfg.npages - cfg.helper_layout.first_gfn
    with pytest.raises(WorkloadError, match="unknown"):
        GuestConfig.from_dict({**cfg.to_dict(), "turbo": 1})


def test_migration_params_refuse_bad_values():
    """An unknown path or a count below 1 is a ValueError."""
    for bad in (dict(path="ssh"), dict(max_iterations=0), dict(batch_pages=0)):
        with pytest.raises(ValueError):
            MigrationParams(**bad)
    p = MigrationParams(path="helper", ring_buffer=True)
    assert MigrationParams.from_dict(p.to_dict()).to_dict() == p.to_dict()


def test_launch_refuses_a_measurement_the_owner_did_not_compute(monkeypatch):
    """If LAUNCH_MEASURE does not match the owner's digest, the launch is refused."""
    monkeypatch.setattr(owner, "launch_digest", lambda *chunks: bytes(32))
    with pytest.raises(LaunchError):
        Machine.launch(sevcore.Kvm(), GuestConfig(**SMALL))


def test_guest_abort_reaches_the_vmm():
    """A guest assertion (UCALL_ABORT) is a GuestError with its message."""
    m, _ = launched(workload="idle")

    def broken(g):
        assert False, "lost my pages"
        yield
    m.vcpus[0].set_guest_code(broken)
    with pytest.raises(GuestError, match="lost my pages"):
        m.tick()


def test_vcpu_state_round_trip_and_refusals():
    """vCPU state (CPUID, MSRs, KVM_GET_REGS and KVM_GET_SREGS) loads into another VM's vCPU;
    a wrong id or unknown MSR is refused."""
    m, dst = launched(workload="idle")
    t = Machine.incoming(dst, m.config)
    src = m.vcpus[0]
    src.set_regs(rax=0x1234, rip=0x5000)
    sregs = src.get_sregs()
    sregs.gs.base, sregs.cr3 = 0x7000, 0x9000
    src.set_sregs(sregs)
    state = m.vcpu_state(src)
    t.load_vcpu_state(0, state)
    assert t.vcpus[0].get_cpuid2() == src.get_cpuid2()
    assert t.vcpus[0].get_regs() == src.get_regs()
    assert bytes(t.vcpus[0].get_sregs()) == bytes(src.get_sregs())
    assert t.tracker.migration_ready
    with pytest.raises(ValueError, match="sent as vCPU"):
        t.load_vcpu_state(1, state)
    with pytest.raises(ValueError, match="malformed"):
        t.load_vcpu_state(0, b"{}")
    bad = state.replace(b'"msrs": {', b'"msrs": {"305419896": 1, ', 1)
    with pytest.raises(ValueError, match="lacks"):
        t.load_vcpu_state(0, bad)


def test_pipeline_pace_is_the_slowest_stage():
    """Many batches through the pipeline take about n times the slowest stage's time."""
    cost = CostModel(link_bytes_per_s=1e9, max_bandwidth=1e9)
    for src_ns, dst_ns, net_bytes in ((1e6, 1e3, 1000), (1e3, 1e6, 1000), (1e3, 1e3, 10**6)):
        tl = Timeline(cost, SimClock())
        for _ in range(100):
            tl.batch(lambda c: c.advance(src_ns, "x"), net_bytes,
                     lambda c: c.advance(dst_ns, "x"))
        tl.drain()
        slowest = max(src_ns, dst_ns, net_bytes)         # 1 ns per byte at 1 GB/s
        assert 100 * slowest <= tl.src.now_ns <= 102 * slowest


def test_all_zero_shared_pages_travel_as_zero_pages():
    """A shared page of zeroes goes as ZERO_PAGES and arrives as zeroes; the guest, which had
    its pattern there, counts exactly that page as bad."""
    m, dst = launched(workload="idle")
    gfn = m.config.layout.shared_gfn + 3
    m.kvm.write(m.hva + gfn * 4096, bytes(4096))            # the VMM zeroes a shared page
    r = migrate(m, dst, FAST)
    st = r.stats
    assert st.zero_pages >= 1 and st.stream["duplicate"] >= 1
    assert r.target.kvm.read(r.target.hva + gfn * 4096, 4096) == bytes(4096)
    assert st.bad_pages == 1


def test_a_page_that_changes_to_shared_is_sent_again():
    """A page reported shared after it went as private is sent again, as shared."""
    m, dst = launched(workload="idle")
    gfn = m.config.layout.data_gfn + 5
    done = []

    def convert(ev):
        if ev["phase"] == "precopy" and ev["sent"] == ev["pages"] and not done:
            done.append(m.tracker.map_gpa_range(gfn << 12, 1, KVM_MAP_GPA_RANGE_DECRYPTED))
    r = migrate(m, dst, FAST, progress=convert)
    assert done == [0]
    assert r.stats.shared_pages == m.config.shared_pages + 1
    assert r.target.tracker.is_shared(gfn)


def test_target_refuses_a_page_outside_the_guest():
    """A record naming a gfn beyond the guest's memory is refused; the source cancels."""
    m, dst = launched(workload="idle")

    def far(i, rec, w):
        if isinstance(rec, S.EncryptedPage) and rec.gfn == 7:
            rec = S.EncryptedPage(m.npages + 7, rec.hdr, rec.trans)
        rewrite(w, rec)
    proxy = Proxy(far)
    with pytest.raises(TargetFailed, match="outside the guest"):
        migrate(m, dst, FAST, channel_pair=(proxy.source_end, proxy.target_end))


def test_progress_bar_draws_on_a_terminal_only():
    """The bar writes a line when enabled and nothing when not."""
    ev = {"phase": "precopy", "iteration": 2, "pages": 100, "sent": 100, "sim_ms": 1500.0}
    out = io.StringIO()
    Progress("psp", enabled=True, stream=out)(ev)
    assert "pass 2" in out.getvalue() and "100/100 pages" in out.getvalue()
    quiet = io.StringIO()
    Progress("psp", enabled=False, stream=quiet)(ev)
    assert quiet.getvalue() == ""
