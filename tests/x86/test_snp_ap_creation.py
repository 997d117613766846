"""SEV-SNP AP creation: the guest's SVM_VMGEXIT_AP_CREATION NAE event with a VMSA page it built
and marked with RMPADJUST's VMSA bit (wakeup_cpu_via_vmgexit, arch/x86/coco/sev/core.c), KVM's
sev_snp_ap_creation checks and the AP's switch to that VMSA at its next entry
(sev_snp_init_protected_guest_state, arch/x86/kvm/svm/sev.c)."""
from errno import EINTR

import pytest

import sevcore
from sevcore.kvm.ghcb import GhcbGuest, GhcbProtocolError
from sevcore.kvm.snp_guest import snp_ap_create, snp_ap_destroy
from sevcore.uapi import *
from sevcore.vmm.kvm_util import (handle_map_gpa_range, vm_mem_add, vm_sev_launch,
                                  vm_vcpu_add)

from support import raises_errno

POLICY = SNP_POLICY_MASK_RSVD_MBO | SNP_POLICY_MASK_SMT
GHCB_GFN = 15
VMSA_GPA = 10 << 12            # a launched (so validated) page, not 2 MiB aligned


@pytest.fixture
def kvm():
    return sevcore.Kvm()


def terminate(g):
    """GHCB MSR protocol termination request: KVM_EXIT_SYSTEM_EVENT."""
    yield g.wrmsr(MSR_AMD64_SEV_ES_GHCB, GHCB_MSR_TERM_REQ)
    yield g.vmgexit()


def bsp(g, out, create=None, destroy=False):
    """Share, negotiate and register a GHCB, start AP 1 (``create`` overrides
    snp_ap_create's arguments), optionally destroy it again; record the outcome."""
    yield g.page_state_change(GHCB_GFN << 12, 1, private=False)
    ghcb = GhcbGuest(GHCB_GFN << 12)
    yield from ghcb.negotiate(g)
    yield from ghcb.register(g)
    features = (yield g.rdmsr(MSR_AMD64_SEV)) >> 2
    kw = {"apic_id": 1, "vmsa_gpa": VMSA_GPA, "sev_features": features, **(create or {})}
    try:
        yield from snp_ap_create(g, ghcb, regs={"rip": 0x8000}, **kw)
        out.append("created")
        if destroy:
            out.append((yield from snp_ap_destroy(g, ghcb, 1, VMSA_GPA)))
    except GhcbProtocolError as e:
        out.append(str(e))
    yield from terminate(g)


def ap(g, out):
    """The AP's program: note each start and what SEV_STATUS says, then terminate."""
    out.append(("ap", (yield g.rdmsr(MSR_AMD64_SEV)) & MSR_AMD64_SEV_SNP_ENABLED))
    yield from terminate(g)


def two_vcpus(kvm, out, **kw):
    """An SNP VM of 16 launched guest_memfd pages, vCPU 0 running bsp, vCPU 1 running ap."""
    vm = kvm.create_vm(KVM_X86_SNP_VM)
    vm.memory_encrypt_op(KVM_SEV_INIT2)
    vm_mem_add(vm, 0, 0, 16, KVM_MEM_GUEST_MEMFD)
    vcpu0, vcpu1 = vm_vcpu_add(vm, 0), vm_vcpu_add(vm, 1)
    vcpu0.set_guest_code(bsp, out, *kw.values())
    vcpu1.set_guest_code(ap, out)
    vm_sev_launch(vm, POLICY)
    return vm, vcpu0, vcpu1


def run_bsp(vm, vcpu):
    """Run the BSP to its end, converting its GHCB page to shared when it asks."""
    run = vcpu.run()
    handle_map_gpa_range(vm, run)
    run = vcpu.run()
    assert run.exit_reason == KVM_EXIT_SYSTEM_EVENT, vcpu.guest_exception
    return run


def test_two_vcpu_snp_guest_starts_its_ap(kvm):
    """The BSP's AP_CREATE installs the guest's VMSA page for vCPU 1 at its next KVM_RUN: the
    AP's program starts over (once from its launch VMSA, once from the new one) with the SNP
    features of the new VMSA, whose RMP entry RMPADJUST marked VMSA."""
    out = []
    vm, vcpu0, vcpu1 = two_vcpus(kvm, out)
    assert vcpu1.run().exit_reason == KVM_EXIT_SYSTEM_EVENT       # from its launch VMSA
    run_bsp(vm, vcpu0)
    assert out == [("ap", MSR_AMD64_SEV_SNP_ENABLED), "created"]
    assert vcpu1.snp_update_requested and vcpu1.snp_vmsa_gpa == VMSA_GPA
    assert vcpu1.run().exit_reason == KVM_EXIT_SYSTEM_EVENT, vcpu1.guest_exception
    assert out[2] == ("ap", MSR_AMD64_SEV_SNP_ENABLED)
    pfn = vm.gfn_to_memslot(0).gmem_file.page_cache.lookup(VMSA_GPA >> 12)
    assert vcpu1.snp_guest_vmsa_spa == pfn << 12 and vcpu1.snp_vmsa_gpa is None
    e = vm.host.rmp.entry(pfn)
    assert e.vmsa and e.validated and e.asid == vm.sev.asid and e.gpa == VMSA_GPA


@pytest.mark.parametrize("create", [
    dict(apic_id=7), dict(sev_features=0), dict(vmsa_gpa=VMSA_GPA + 8),
    dict(vmsa_gpa=0), dict(request=3)],
    ids=["no-such-apic-id", "sev-features", "unaligned-vmsa", "2m-aligned-vmsa", "request"])
def test_ap_creation_refusals(kvm, create):
    """An unknown APIC ID, SEV features other than the VM's, a VMSA GPA not page aligned or
    2 MiB aligned, and an unknown request are GHCB_ERR_INVALID_INPUT to the guest; the target
    is left as it was."""
    out = []
    vm, vcpu0, vcpu1 = two_vcpus(kvm, out, create=create)
    run_bsp(vm, vcpu0)
    assert len(out) == 1 and "response 0x2, info 0x5" in out[0], out
    assert not vcpu1.snp_update_requested and not vcpu1.snp_ap_waiting_for_reset
    assert vcpu1.snp_vmsa_gpa is None


def test_vmsa_without_the_vmsa_bit_fails_the_entry(kvm):
    """A VMSA page the guest did not mark with RMPADJUST is accepted by KVM, but VMRUN refuses
    it: the AP's KVM_RUN reports KVM_EXIT_FAIL_ENTRY."""
    out = []
    vm, vcpu0, vcpu1 = two_vcpus(kvm, out, create=dict(make_vmsa=False))
    run_bsp(vm, vcpu0)
    assert out == ["created"]
    assert vcpu1.run().exit_reason == KVM_EXIT_FAIL_ENTRY and out == ["created"]


def test_destroyed_ap_is_halted(kvm):
    """AP_DESTROY after AP_CREATE leaves the AP with no VMSA (KVM_MP_STATE_HALTED): its KVM_RUN
    blocks, KVM_EXIT_INTR with EINTR here; the guest cleared the page's VMSA bit."""
    out = []
    vm, vcpu0, vcpu1 = two_vcpus(kvm, out, create=None, destroy=True)
    run_bsp(vm, vcpu0)
    assert out == ["created", 0]
    with raises_errno(EINTR, "KVM_RUN"):
        vcpu1.run()
    assert vcpu1.kvm_run.exit_reason == KVM_EXIT_INTR and vcpu1.snp_guest_vmsa_spa is None
    pfn = vm.gfn_to_memslot(0).gmem_file.page_cache.lookup(VMSA_GPA >> 12)
    assert not vm.host.rmp.entry(pfn).vmsa
