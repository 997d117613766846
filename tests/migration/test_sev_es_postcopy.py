"""Post-copy of SEV-ES guests: by the PSP path the VMSAs move (out-of-tree SEND/RECEIVE_UPDATE_VMSA)
in the switch before the target's guest runs; by the helper path the vCPUs' saved state is sealed
and opened in the switch, never owed. In process, cut and resumed, over TCP; a VMSA or saved
state refused at the switch gives the guest back to the source."""
import threading

import numpy as np
import pytest

import sevcore
from sevcore.hw.costmodel import CostModel
from sevcore.migration import stream as S
from sevcore.migration.engine import MigrationParams, TargetFailed, migrate, resume
from sevcore.migration.errors import PostcopyPaused
from sevcore.migration.machine import Machine
from sevcore.migration.remote import send_to, serve
from sevcore.migration.workload import GuestConfig
from sevcore.uapi import KVM_X86_SEV_ES_VM, SEV_POLICY_ES

from support.migration import Proxy, assert_runs_on, flip, rewrite

ES = dict(mem_size=4 << 20, shared_size=64 << 10, vm_type=KVM_X86_SEV_ES_VM,
          policy=SEV_POLICY_ES, workload="random")


def kvm():
    k = sevcore.Kvm()
    k.host.kvm_sev.out_of_tree_vmsa_migration = True
    return k


def guest(path, **cfg):
    return Machine.launch(kvm(), GuestConfig(**{**ES, "helper_vcpus": int(path == "helper"),
                                                "dirty_pages_per_s": 2_000, **cfg}))


def pc(path, after=0, **kw):
    return MigrationParams(path=path, postcopy=True, postcopy_after=after, batch_pages=64,
                           timeout_s=30, **kw)


@pytest.mark.parametrize("path", ["psp", "helper"])
@pytest.mark.parametrize("after", [0, 1])
def test_sev_es_postcopy_moves_the_guest_intact(path, after):
    """After 0 or 1 pre-copy passes an SEV-ES guest on two vCPUs runs on the target with its
    vCPU state in place (VMSAs, or its saved state) and faults only on memory, each owed page
    once; its check is clean and it runs on."""
    m = guest(path, nr_vcpus=2, dirty_pages_per_s=2_000 if after == 0 else 50_000)
    r = migrate(m, kvm(), pc(path, after, cost=CostModel(downtime_limit_ms=0.5)))
    st = r.stats
    assert st.status == "completed" and st.postcopy and st.bad_pages == 0
    assert st.verified_pages > 0 and st.pages_owed > 0
    assert st.pages_on_demand + st.pages_pushed == st.pages_owed
    assert st.postcopy_requests >= st.pages_on_demand > 0
    cmds = st.psp_commands
    if path == "psp":
        assert cmds["SEND_UPDATE_VMSA"] == cmds["RECEIVE_UPDATE_VMSA"] == 2
    else:
        assert "SEND_START" not in cmds and cmds["LAUNCH_SECRET"] == 2
    t = r.target
    assert all(v.guest_state_protected for v in t.vcpus)
    t.tick()
    t.host.clock.advance(1e8, "test")
    assert t.tick() > 0


@pytest.mark.parametrize("path", ["psp", "helper"])
def test_sev_es_postcopy_cut_and_resumed_finishes_clean(path):
    """A cut once the SEV-ES guest runs on the target pauses both sides; a new connection
    finishes the copy with the guest's check clean."""
    m = guest(path)
    steps = []

    def cut(i, rec, w):
        if isinstance(rec, S.Setup) and rec.params.get("kind") == "pc_step":
            steps.append(rec)
            if len(steps) == 4:
                raise ConnectionError("cable pulled")
        rewrite(w, rec)
    proxy = Proxy(cut)
    with pytest.raises(PostcopyPaused) as e:
        migrate(m, kvm(), pc(path), channel_pair=(proxy.source_end, proxy.target_end))
    r = resume(e.value)
    assert r.stats.status == "completed" and r.stats.postcopy_resumes == 1
    assert r.stats.bad_pages == 0 and r.stats.verified_pages > 0


@pytest.mark.parametrize("path", ["psp", "helper"])
def test_sev_es_postcopy_over_tcp(path):
    """Pure post-copy of an SEV-ES guest between a TCP target and source (its VMSAs, or the
    target launched and the saved state, in the switch): requests on the same connection, the
    moved guest intact."""
    m = guest(path)
    box, ready = {}, threading.Event()

    def target():
        def listening(addr):
            box["port"] = addr[1]
            ready.set()
        box["t"] = serve(0, kvm(), timeout_s=30, on_listening=listening)
    th = threading.Thread(target=target, daemon=True)
    th.start()
    assert ready.wait(30)
    src = send_to("127.0.0.1", box["port"], m, pc(path))
    th.join(30)
    st = src.stats
    assert st.status == "completed" and st.postcopy_requests > 0 and st.bad_pages == 0
    assert box["t"].result["bad"] == 0


def _tamper_at_switch(path):
    """A proxy transform altering, in the switch, vCPU 0's VMSA packet (PSP path) or its saved
    state's helper packet (helper path)."""
    save_gfn = GuestConfig(**ES, helper_vcpus=1).layout.save_gfn

    def transform(i, rec, w):
        if isinstance(rec, S.Setup) and rec.params.get("kind") == "vmsa" and \
                rec.params["vcpu_id"] == 0:
            t = bytearray.fromhex(rec.params["trans"])
            t[100] ^= 1
            rec = S.Setup(dict(rec.params, trans=t.hex()))
        if isinstance(rec, S.HelperPage) and rec.gfn == save_gfn:
            rec = S.HelperPage(rec.gfn, rec.seq, flip(rec.packet, 800))
        rewrite(w, rec)
    return transform


@pytest.mark.parametrize("path,why", [("psp", "SEV_RET_"), ("helper", "auth")])
def test_vcpu_state_refused_at_the_switch_gives_the_guest_back(path, why):
    """A VMSA or saved state altered at the post-copy switch is refused before the target's
    guest ever runs; the target says so, and the source takes its guest back (SEND_CANCEL on
    the PSP path), checks it clean and runs on: not a lost guest."""
    m = guest(path, workload="idle")
    proxy = Proxy(_tamper_at_switch(path))
    with pytest.raises(TargetFailed, match=why) as e:
        migrate(m, kvm(), pc(path), channel_pair=(proxy.source_end, proxy.target_end))
    st = e.value.stats
    assert st.status == "failed" and not st.guest_lost
    assert st.send_cancel == (path == "psp")
    assert st.source_resumed and st.source_check["bad"] == 0
    assert_runs_on(m)


def test_saved_state_is_never_owed():
    """By the helper path the vCPUs' save areas go in the switch itself: the target would
    refuse a POSTCOPY that owes them (its vCPUs would resume without their state)."""
    from sevcore.migration.postcopy import pack_gfns
    m = guest("helper", workload="idle")
    lay = m.config.layout
    seen = []

    def transform(i, rec, w):
        if isinstance(rec, S.Setup) and rec.params.get("kind") == "postcopy":
            seen.append(rec.params["owed"])
            owed = np.flatnonzero(np.unpackbits(np.frombuffer(bytes.fromhex(
                rec.params["owed"]), np.uint8), bitorder="little"))
            rec = S.Setup(dict(rec.params, owed=pack_gfns(np.union1d(owed, [lay.save_gfn]),
                                                          m.npages)))
        rewrite(w, rec)
    proxy = Proxy(transform)
    with pytest.raises(TargetFailed, match="saved state is owed"):
        migrate(m, kvm(), pc("helper"), channel_pair=(proxy.source_end, proxy.target_end))
    assert seen
    bits = np.unpackbits(np.frombuffer(bytes.fromhex(seen[0]), np.uint8), bitorder="little")
    assert not bits[lay.save_gfn:lay.ghcb_gfn].any()
    assert_runs_on(m)
