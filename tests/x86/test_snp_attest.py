"""An SNP launch of normal, zero, unmeasured, secrets and CPUID pages and N vCPUs, measured by
KVM and the firmware, against the launch digest the sev-snp-measure package (PyPI) computes for
the same pages and VMSAs; the guest asks for its report through the guest-message protocol and
the guest owner checks it (sevcore.vmm.attest) against the chain."""
import os

import pytest

import sevcore
from sevcore.kvm.sev_es import build_vmsa
from sevcore.psp import amd_root
from sevcore.uapi import *
from sevcore.vmm import attest
from sevcore.vmm.kvm_util import (snp_guest_msg_init, snp_launch_update_data,
                                  vm_mem_add, vm_mem_set_private, vm_vcpu_add)

from support.qemu import qemu_reset

gctx = pytest.importorskip("sevsnpmeasure.gctx")

POLICY = SNP_POLICY_MASK_RSVD_MBO | SNP_POLICY_MASK_SMT
NORMAL, ZERO, UNMEASURED, SECRETS, CPUID = 0, 4, 5, 6, 7     # gfns
REQ, RESP = 8, 9                                               # shared message pages
NPAGES = 16


def guest_report(g, user_data, out):
    """Ask for a report, hand it to the test, terminate."""
    out.append((yield g.snp_get_report(user_data)))
    yield g.wrmsr(MSR_AMD64_SEV_ES_GHCB, GHCB_MSR_TERM_REQ)
    yield g.vmgexit()


def launch(kvm, nvcpus, user_data, out, before_finish=None):
    """The launch, with the pages measured (``before_finish(vcpu)`` sets each vCPU's state
    first); returns the VM, its vCPUs and the normal bytes."""
    vm = kvm.create_vm(KVM_X86_SNP_VM)
    vm.memory_encrypt_op(KVM_SEV_INIT2)
    hva = vm_mem_add(vm, 0, 0, NPAGES, KVM_MEM_GUEST_MEMFD)
    vcpus = [vm_vcpu_add(vm, i) for i in range(nvcpus)]
    vcpus[0].set_guest_code(guest_report, user_data, out)
    vm.enable_cap(KVM_CAP_EXIT_HYPERCALL, 1 << KVM_HC_MAP_GPA_RANGE)
    vm.memory_encrypt_op(KVM_SEV_SNP_LAUNCH_START, policy=POLICY)
    vm_mem_set_private(vm, 0, REQ << 12)
    normal = os.urandom(4 << 12)
    kvm.write(hva, normal)
    snp_launch_update_data(vm, 0, hva, 4 << 12, KVM_SEV_SNP_PAGE_TYPE_NORMAL)
    for gfn, type in ((ZERO, KVM_SEV_SNP_PAGE_TYPE_ZERO),
                      (UNMEASURED, KVM_SEV_SNP_PAGE_TYPE_UNMEASURED),
                      (SECRETS, KVM_SEV_SNP_PAGE_TYPE_SECRETS),
                      (CPUID, KVM_SEV_SNP_PAGE_TYPE_CPUID)):
        snp_launch_update_data(vm, gfn << 12, hva + (gfn << 12), 4096, type)
    if before_finish is not None:
        for v in vcpus:
            before_finish(v)
    vm.memory_encrypt_op(KVM_SEV_SNP_LAUNCH_FINISH)
    snp_guest_msg_init(vm, SECRETS << 12, REQ << 12, RESP << 12)
    return vm, vcpus, normal


def chain(vm):
    """The ARK, ASK and this chip's VCEK certificates (DER), as the KDS serves them."""
    return amd_root.ark_x509(), amd_root.ask_x509(), vm.host.psp.snp_vcek_cert()


def expected_digest(vm, vcpus, normal):
    """sev-snp-measure's GCTX replaying the same PAGE_INFO chain."""
    g = gctx.GCTX()
    g.update_normal_pages(0, normal)
    g.update_zero_pages(ZERO << 12, 4096)
    g.update_unmeasured_pages(UNMEASURED << 12, 4096)
    g.update_secrets_page(SECRETS << 12)
    g.update_cpuid_page(CPUID << 12)
    for v in vcpus:
        g.update_vmsa_page(build_vmsa(v, vm.sev.vmsa_features))
    return g.ld()


@pytest.mark.parametrize("nvcpus", [1, 3])
def test_report_measurement_matches_sev_snp_measure(nvcpus):
    """The report's measurement is sev-snp-measure's launch digest for the same pages and
    VMSAs, and the report verifies against the ARK/ASK/VCEK chain with its user data."""
    kvm = sevcore.Kvm()
    user_data = os.urandom(64)
    out = []
    vm, vcpus, normal = launch(kvm, nvcpus, user_data, out)
    run = vcpus[0].run()
    assert run.exit_reason == KVM_EXIT_SYSTEM_EVENT, vcpus[0].guest_exception
    (report,) = out
    assert len(report) == 1184
    want = expected_digest(vm, vcpus, normal)
    ark, ask, vcek = chain(vm)
    rep = attest.verify_report(report, ark=ark, ask=ask, vcek=vcek, measurement=want,
                               report_data=user_data, vmpl=0)
    assert rep.policy == POLICY


def test_tampered_report_fails_verification():
    """A report with one measurement byte changed fails its signature check, and a wrong
    expected measurement is refused by name."""
    kvm = sevcore.Kvm()
    out = []
    vm, vcpus, normal = launch(kvm, 1, bytes(64), out)
    vcpus[0].run()
    (report,) = out
    ark, ask, vcek = chain(vm)
    bad = bytearray(report)
    bad[0x90] ^= 1
    with pytest.raises(attest.AttestationError, match="signature"):
        attest.verify_report(bytes(bad), ark=ark, ask=ask, vcek=vcek)
    with pytest.raises(attest.AttestationError, match="measurement"):
        attest.verify_report(report, ark=ark, ask=ask, vcek=vcek, measurement=bytes(48))


@pytest.mark.parametrize("nvcpus", [1, 2])
def test_qemu_reset_vcpus_measure_as_sev_snp_measure(nvcpus):
    """With every vCPU in QEMU's reset state (KVM_SET_SREGS/REGS/FPU/XCRS/MSRS), the report's
    measurement is the digest sev-snp-measure computes from its own QEMU VMSAs, with no sevcore
    code on the expected side."""
    ssm = pytest.importorskip("sevsnpmeasure.vmsa")
    from sevsnpmeasure.vcpu_types import CPU_SIGS
    from sevsnpmeasure.vmm_types import VMMType
    sig = CPU_SIGS["EPYC-Genoa"]
    kvm = sevcore.Kvm()
    out = []
    vm, vcpus, normal = launch(kvm, nvcpus, bytes(64), out,
                               before_finish=lambda v: qemu_reset(v, sig))
    assert vcpus[0].run().exit_reason == KVM_EXIT_SYSTEM_EVENT, vcpus[0].guest_exception
    (report,) = out
    g = gctx.GCTX()
    g.update_normal_pages(0, normal)
    g.update_zero_pages(ZERO << 12, 4096)
    g.update_unmeasured_pages(UNMEASURED << 12, 4096)
    g.update_secrets_page(SECRETS << 12)
    g.update_cpuid_page(CPUID << 12)
    page = bytes(ssm.VMSA.build_save_area(ssm.VMSA.BSP_EIP, SVM_SEV_FEAT_SNP_ACTIVE, sig,
                                          VMMType.QEMU))
    for _ in range(nvcpus):
        g.update_vmsa_page(page)
    assert attest.parse_report(report).measurement == g.ld()
