"""SEV-ES guests through the migration engine: the workload on the GHCB page protocol, the PSP
path with the VMSAs moved by the out-of-tree KVM_SEV_SEND/RECEIVE_UPDATE_VMSA, the refusals
when KVM lacks them, and the same migration over TCP into a target process."""

import pytest

import sevcore
from sevcore.cli import main
from sevcore.migration.engine import MigrationError, MigrationParams, migrate
from sevcore.migration.machine import Machine
from sevcore.migration.remote import send_to
from sevcore.migration.workload import GuestConfig, WorkloadError
from sevcore.uapi import (KVM_X86_SEV_ES_VM, KVM_X86_SEV_VM, SEV_GUEST_STATE_RUNNING,
                          SEV_POLICY_ES)

from support.migration import (SMALL, assert_runs_on, guest_state, memory_snapshot,
                               target_process)

ES = dict(SMALL, vm_type=KVM_X86_SEV_ES_VM, policy=SEV_POLICY_ES)


def es_kvm(out_of_tree=True):
    kvm = sevcore.Kvm()
    kvm.host.kvm_sev.out_of_tree_vmsa_migration = out_of_tree
    return kvm


def test_sev_es_guest_migrates_by_the_psp_with_its_vmsas():
    """An SEV-ES guest dirtying pages through its GHCB moves by the PSP path: every vCPU's VMSA
    by SEND/RECEIVE_UPDATE_VMSA, then its own check on the target finds every page intact and
    it keeps running there."""
    src = es_kvm()
    m = Machine.launch(src, GuestConfig(**ES, nr_vcpus=2, dirty_pages_per_s=20_000))
    assert m.vcpus[0].guest_state_protected and m.tracker.migration_ready
    r = migrate(m, es_kvm(), MigrationParams(max_iterations=4))
    st = r.stats
    assert st.status == "completed" and st.bad_pages == 0
    assert st.verified_pages == m.config.layout.end_gfn - m.config.layout.shared_gfn
    assert st.guest_pages_written > 0
    assert st.psp_commands["SEND_UPDATE_VMSA"] == st.psp_commands["RECEIVE_UPDATE_VMSA"] == 2
    assert all(v.guest_state_protected for v in r.target.vcpus)
    r.target.host.clock.advance(1e6, "test")
    r.target.tick()


def test_upstream_kvm_cannot_move_an_sev_es_guest():
    """Without KVM_SEV_SEND_UPDATE_VMSA (upstream KVM: EINVAL) the source refuses at setup,
    cancels, and its guest runs on with its memory unchanged."""
    m = Machine.launch(es_kvm(False), GuestConfig(**ES, workload="idle"))
    before = _without_ghcbs(m)
    with pytest.raises(MigrationError, match="KVM_SEV_SEND_UPDATE_VMSA") as e:
        migrate(m, es_kvm(False), MigrationParams(max_iterations=2))
    assert e.value.stats.status == "failed" and e.value.stats.send_cancel
    assert e.value.stats.source_resumed and e.value.stats.source_check["bad"] == 0
    assert _without_ghcbs(m) == before
    assert_runs_on(m)


def test_helper_path_refuses_sev_es_without_a_launched_helper():
    """An SEV-ES guest booted without a helper cannot go by the helper path (its mirror's VMSAs
    had to be launched with it): refused before anything, the guest running."""
    m = Machine.launch(es_kvm(), GuestConfig(**ES, workload="idle"))
    with pytest.raises(MigrationError, match="SEV-ES"):
        migrate(m, es_kvm(), MigrationParams(path="helper"))
    assert guest_state(m) == SEV_GUEST_STATE_RUNNING


@pytest.mark.parametrize("vm_type,policy", [(KVM_X86_SEV_ES_VM, 0),
                                            (KVM_X86_SEV_VM, SEV_POLICY_ES), (1, 0)])
def test_guest_type_and_policy_must_agree(vm_type, policy):
    """The workload runs SEV (no ES bit) and SEV-ES (ES bit) guests, nothing else."""
    with pytest.raises(WorkloadError):
        GuestConfig(**dict(SMALL, vm_type=vm_type, policy=policy))


def test_sev_es_over_tcp_into_a_target_process(tmp_path):
    """A target process with --out-of-tree-vmsa receives an SEV-ES guest over TCP; its guest's
    own check is clean."""
    proc, port = target_process(tmp_path, "--out-of-tree-vmsa")
    m = Machine.launch(es_kvm(), GuestConfig(**ES, dirty_pages_per_s=300))
    src = send_to("127.0.0.1", port, m,
                  MigrationParams(max_iterations=4, timeout_s=30))
    out, err = proc.communicate(timeout=30)
    assert proc.returncode == 0, err
    assert "0 bad" in out
    assert src.stats.status == "completed" and src.stats.bad_pages == 0
    assert src.stats.psp_commands["SEND_UPDATE_VMSA"] == 1


def test_cli_type_sev_es(capsys):
    """sevcore migrate --type sev-es --path psp --out-of-tree-vmsa completes with a clean guest
    check; without --out-of-tree-vmsa it fails (exit 1) naming the missing ioctl."""
    args = ["migrate", "--type", "sev-es", "--path", "psp", "--mem", "4M", "--shared", "64K",
            "--max-iterations", "2", "--quiet"]
    assert main(args + ["--out-of-tree-vmsa"]) == 0
    out = capsys.readouterr().out
    assert "completed" in out and ", 0 bad" in out
    assert main(args) == 1
    assert "KVM_SEV_SEND_UPDATE_VMSA" in capsys.readouterr().err


def _vmsa_tamper(change):
    """A proxy transform applying ``change(params)`` to the first ``vmsa`` record (None: drop
    it) and passing everything else on."""
    from support.migration import rewrite
    from sevcore.migration import stream as S
    done = []

    def transform(i, rec, w):
        if isinstance(rec, S.Setup) and rec.params.get("kind") == "vmsa" and not done:
            done.append(i)
            params = change(dict(rec.params))
            if params is None:
                return
            rec = S.Setup(params)
        rewrite(w, rec)
    return transform


def _flip_trans(p):
    t = bytearray.fromhex(p["trans"])
    t[100] ^= 1
    return dict(p, trans=t.hex())


@pytest.mark.parametrize("change,why", [(lambda p: None, "no VMSA came"),
                                        (_flip_trans, "SEV_RET_")])
def test_a_lost_or_altered_vmsa_fails_the_migration_and_the_source_runs_on(change, why):
    """A VMSA record dropped on the wire, or its packet altered (RECEIVE_UPDATE_VMSA's MAC
    check), makes the target refuse before RECEIVE_FINISH; the source cancels and runs on."""
    from support.migration import Proxy
    from sevcore.migration.engine import TargetFailed
    m = Machine.launch(es_kvm(), GuestConfig(**ES, workload="idle"))
    before = _without_ghcbs(m)
    proxy = Proxy(_vmsa_tamper(change))
    with pytest.raises(TargetFailed, match=why) as e:
        migrate(m, es_kvm(), MigrationParams(max_iterations=2),
                channel_pair=(proxy.source_end, proxy.target_end))
    assert e.value.stats.status == "failed" and e.value.stats.send_cancel
    assert _without_ghcbs(m) == before
    assert_runs_on(m)


def _without_ghcbs(m):
    """The guest's memory as the host sees it, but for its GHCB pages (an idle SEV-ES guest
    still writes its GHCB at each TSC read and ucall)."""
    lay = m.config.layout
    snap = bytearray(memory_snapshot(m))
    snap[lay.ghcb_gfn << 12:lay.shared_gfn << 12] = bytes((lay.shared_gfn - lay.ghcb_gfn) << 12)
    return bytes(snap)
