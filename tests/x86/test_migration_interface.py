"""The guest's live-migration interface seen from the VMM: MAP_GPA_RANGE reports and
MSR_KVM_MIGRATION_CONTROL, kept by sevcore.vmm.shared_pages.SharedPagesTracker
(Documentation/virt/kvm/x86/hypercalls.rst and msr.rst; arch/x86/kernel/kvm.c)."""
import pytest

import sevcore
from sevcore.vmm.kvm_util import vm_mem_add, vm_vcpu_add
from sevcore.uapi import *
from sevcore.vmm.shared_pages import SharedPagesTracker

RAM_PAGES = 1 << 20          # a 4 GiB guest: the tracker keeps ranges, never pages
BSS_DECRYPTED = (0x1234000, 5)


def linux_guest_boot(g, ram_pages):
    """What kvm_init_platform does: every E820 RAM range reported encrypted, .bss..decrypted
    reported decrypted, then the MSR set to MIGRATION_READY; later a runtime
    set_memory_decrypted of a 2 MiB mapping (one call, 512 pages)."""
    ret = yield g.hypercall(KVM_HC_MAP_GPA_RANGE, 0, 0xa0, KVM_MAP_GPA_RANGE_ENCRYPTED)
    assert ret == 0
    ret = yield g.hypercall(KVM_HC_MAP_GPA_RANGE, 0x100000, ram_pages - 0x100,
                            KVM_MAP_GPA_RANGE_ENCRYPTED)
    assert ret == 0
    gpa, n = BSS_DECRYPTED
    ret = yield g.hypercall(KVM_HC_MAP_GPA_RANGE, gpa, n, KVM_MAP_GPA_RANGE_DECRYPTED)
    assert ret == 0
    v = yield g.rdmsr(MSR_KVM_MIGRATION_CONTROL)
    assert v == 0
    yield g.wrmsr(MSR_KVM_MIGRATION_CONTROL, KVM_MIGRATION_READY)
    yield g.sync("booted")
    ret = yield g.hypercall(KVM_HC_MAP_GPA_RANGE, 0x40000000, 512, KVM_MAP_GPA_RANGE_DECRYPTED)
    assert ret == 0
    ret = yield g.hypercall(KVM_HC_MAP_GPA_RANGE, 0x40000000, 1, 0x20)   # reserved bit
    assert ret == -KVM_EINVAL
    vec = yield g.wrmsr_safe(MSR_KVM_MIGRATION_CONTROL, 2)
    assert vec == GP_VECTOR
    yield g.wrmsr(MSR_KVM_MIGRATION_CONTROL, 0)      # kvm_guest_cpu_offline
    yield g.done()


def run_until_ucall(vcpu, tracker):
    while True:
        vcpu.run()
        if tracker.handle_exit(vcpu):
            continue
        return vcpu.get_ucall()


@pytest.mark.parametrize("type", [KVM_X86_SEV_VM, KVM_X86_SW_PROTECTED_VM])
def test_tracker_follows_guest_reports(type):
    """The shared list follows the reports as ranges, the ready flag follows the MSR, bad
    reports and MSR values are refused without effect; private-memory VMs also get their
    attributes converted."""
    vm = sevcore.Kvm().create_vm(type)
    vm.sev_need_init = False          # the SEV layer's INIT; not under test here
    vm_mem_add(vm, 0, 0, 16)
    vcpu = vm_vcpu_add(vm, 0)
    tracker = SharedPagesTracker(vm)
    tracker.setup([vcpu])
    feat = vcpu.cpuid_entry(KVM_CPUID_FEATURES)["eax"]
    assert feat >> KVM_FEATURE_HC_MAP_GPA_RANGE & 1 and feat >> KVM_FEATURE_MIGRATION_CONTROL & 1
    vcpu.set_guest_code(linux_guest_boot, RAM_PAGES)
    assert not tracker.migration_ready
    assert run_until_ucall(vcpu, tracker) == ("sync", ("booted",))
    gfn, n = BSS_DECRYPTED[0] >> 12, BSS_DECRYPTED[1]
    assert tracker.shared_ranges() == [(gfn, gfn + n)]
    assert tracker.migration_ready
    assert tracker.private_ranges(0, 0x2000) == [(0, gfn), (gfn + n, 0x2000)]
    if type == KVM_X86_SW_PROTECTED_VM:
        assert vm.mem_is_private(0x100) and not vm.mem_is_private(gfn)
    assert run_until_ucall(vcpu, tracker) == ("done", ())
    assert tracker.shared_ranges() == [(gfn, gfn + n), (0x40000, 0x40000 + 512)]
    assert not tracker.migration_ready
    assert len(list(tracker.shared)) == 2


def test_msr_needs_the_feature():
    """Without KVM_FEATURE_MIGRATION_CONTROL in the guest's CPUID the MSR #GPs."""
    vm = sevcore.Kvm().create_vm(KVM_X86_DEFAULT_VM)
    vm_mem_add(vm, 0, 0, 16)
    vcpu = vm_vcpu_add(vm, 0)
    tracker = SharedPagesTracker(vm)
    tracker.setup([vcpu])
    entries = vcpu.get_cpuid2()
    for e in entries:
        if e["function"] == KVM_CPUID_FEATURES:
            e["eax"] &= ~(1 << KVM_FEATURE_MIGRATION_CONTROL)
    vcpu.set_cpuid2(entries)

    def guest(g):
        vec = yield g.wrmsr_safe(MSR_KVM_MIGRATION_CONTROL, KVM_MIGRATION_READY)
        yield g.sync(vec)
    vcpu.set_guest_code(guest)
    assert run_until_ucall(vcpu, tracker) == ("sync", (GP_VECTOR,))
    # A guest without encrypted memory starts migratable.
    assert tracker.migration_ready
