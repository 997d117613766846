"""Port of tools/testing/selftests/kvm/x86/kvm_pv_test.c: with
KVM_CAP_ENFORCE_PV_FEATURE_CPUID and the PV feature leaf cleared, PV MSRs #GP and PV
hypercalls return -KVM_ENOSYS."""
from errno import EINVAL

import pytest

import sevcore
from sevcore.vmm.kvm_util import vm_mem_add, vm_vcpu_add
from sevcore.uapi import *

from support import raises_errno

MSRS_TO_TEST = [MSR_KVM_SYSTEM_TIME, MSR_KVM_SYSTEM_TIME_NEW, MSR_KVM_WALL_CLOCK,
                MSR_KVM_WALL_CLOCK_NEW, MSR_KVM_ASYNC_PF_EN, MSR_KVM_STEAL_TIME,
                MSR_KVM_PV_EOI_EN, MSR_KVM_POLL_CONTROL, MSR_KVM_ASYNC_PF_INT,
                MSR_KVM_ASYNC_PF_ACK]
HCALLS_TO_TEST = [KVM_HC_KICK_CPU, KVM_HC_SEND_IPI, KVM_HC_SCHED_YIELD]
UCALL_PR_MSR = 0xdeadbeef
UCALL_PR_HCALL = 0xdeadc0de


def guest_main(g):
    for msr in MSRS_TO_TEST:
        yield g.sync(UCALL_PR_MSR, msr)
        vector, _ = yield g.rdmsr_safe(msr)
        assert vector == GP_VECTOR, f"RDMSR {msr:#x}: vector {vector}"
        vector = yield g.wrmsr_safe(msr, 0)
        assert vector == GP_VECTOR, f"WRMSR {msr:#x}: vector {vector}"
    for nr in HCALLS_TO_TEST:
        yield g.sync(UCALL_PR_HCALL, nr)
        r = yield g.hypercall(nr, 0, 0, 0, 0)
        assert r == -KVM_ENOSYS, f"hypercall {nr}: {r}"
    yield g.done()


def create_vm_with_one_vcpu(guest_code):
    vm = sevcore.Kvm().create_vm(KVM_X86_DEFAULT_VM)
    vm_mem_add(vm, 0, 0, 16)
    vcpu = vm_vcpu_add(vm, 0)
    vcpu.set_guest_code(guest_code)
    return vm, vcpu


def enter_guest(vcpu):
    seen = []
    while True:
        run = vcpu.run()
        assert run.exit_reason == KVM_EXIT_IO
        cmd, args = vcpu.get_ucall()
        if cmd == "done":
            return seen
        seen.append(args)


def clear_cpuid_entry(vcpu, function):
    entries = vcpu.get_cpuid2()
    for e in entries:
        if e["function"] == function:
            e["eax"] = e["ebx"] = e["ecx"] = e["edx"] = 0
    vcpu.set_cpuid2(entries)


def test_pv_features_enforced():
    """Every PV MSR #GPs on read and write, every PV hypercall returns -KVM_ENOSYS."""
    vm, vcpu = create_vm_with_one_vcpu(guest_main)
    vcpu.enable_cap(KVM_CAP_ENFORCE_PV_FEATURE_CPUID, 1)
    clear_cpuid_entry(vcpu, KVM_CPUID_FEATURES)
    seen = enter_guest(vcpu)
    assert len(seen) == len(MSRS_TO_TEST) + len(HCALLS_TO_TEST)


def test_pv_features_not_enforced_by_default():
    """Without the capability, a cleared feature leaf does not stop the PV MSRs."""
    def guest(g):
        vector, _ = yield g.rdmsr_safe(MSR_KVM_STEAL_TIME)
        assert vector == 0
        r = yield g.hypercall(KVM_HC_SCHED_YIELD, 0)
        assert r == 0
        yield g.done()
    vm, vcpu = create_vm_with_one_vcpu(guest)
    clear_cpuid_entry(vcpu, KVM_CPUID_FEATURES)
    assert enter_guest(vcpu) == []


def test_pv_feature_present_allows_msr():
    """With enforcement on and KVM_FEATURE_STEAL_TIME set, MSR_KVM_STEAL_TIME works."""
    def guest(g):
        yield g.wrmsr(MSR_KVM_STEAL_TIME, 0x1000)
        v = yield g.rdmsr(MSR_KVM_STEAL_TIME)
        assert v == 0x1000
        yield g.done()
    vm, vcpu = create_vm_with_one_vcpu(guest)
    vcpu.enable_cap(KVM_CAP_ENFORCE_PV_FEATURE_CPUID, 1)
    entries = vcpu.get_cpuid2()
    for e in entries:
        if e["function"] == KVM_CPUID_FEATURES:
            e["eax"] = 1 << KVM_FEATURE_STEAL_TIME
    vcpu.set_cpuid2(entries)
    assert enter_guest(vcpu) == []


def test_unhandled_gp_aborts_guest():
    """A #GP from plain rdmsr that the guest does not catch reaches the host as UCALL_ABORT."""
    def guest(g):
        yield g.rdmsr(0xdeadbeef)
        yield g.done()
    vm, vcpu = create_vm_with_one_vcpu(guest)
    vcpu.run()
    with pytest.raises(AssertionError, match="vector 13"):
        vcpu.get_ucall()


def test_pv_unhalt_cleared_with_hlt_exits_disabled():
    """With HLT exits disabled, KVM clears KVM_FEATURE_PV_UNHALT from the vCPU's CPUID; disabling
    exits once vCPUs exist is refused with EINVAL."""
    kvm = sevcore.Kvm()
    assert kvm.check_extension(KVM_CAP_X86_DISABLE_EXITS) & KVM_X86_DISABLE_EXITS_HLT
    vm, vcpu = create_vm_with_one_vcpu(guest_main)
    entries = vcpu.get_cpuid2()
    assert vcpu.cpuid_entry(KVM_CPUID_FEATURES)["eax"] & 1 << KVM_FEATURE_PV_UNHALT
    with raises_errno(EINVAL):
        vm.enable_cap(KVM_CAP_X86_DISABLE_EXITS, KVM_X86_DISABLE_EXITS_HLT)

    vm = kvm.create_vm(KVM_X86_DEFAULT_VM)
    vm.enable_cap(KVM_CAP_X86_DISABLE_EXITS, KVM_X86_DISABLE_EXITS_HLT)
    vcpu = vm_vcpu_add(vm, 0)
    vcpu.set_cpuid2(entries)
    assert not vcpu.cpuid_entry(KVM_CPUID_FEATURES)["eax"] & 1 << KVM_FEATURE_PV_UNHALT


def test_cpuid_frozen_after_run():
    """KVM_SET_CPUID2 with different entries after KVM_RUN fails with EINVAL; the same entries
    are accepted."""
    def guest(g):
        yield g.sync()
    vm, vcpu = create_vm_with_one_vcpu(guest)
    vcpu.run()
    entries = vcpu.get_cpuid2()
    vcpu.set_cpuid2(entries)
    entries[0]["eax"] ^= 1
    with raises_errno(EINVAL):
        vcpu.set_cpuid2(entries)
    assert vcpu.get_cpuid2()[0]["eax"] != entries[0]["eax"]


def test_cpuid_reports_sev_c_bit():
    """CPUID Fn8000_001F reports SEV and the host's C-bit position."""
    host = sevcore.Host(c_bit=47)
    vcpu = host.kvm.create_vm().create_vcpu(0)
    leaf = vcpu.cpuid_entry(0x8000001F)
    assert leaf["eax"] & 2 and leaf["ebx"] & 0x3f == 47
