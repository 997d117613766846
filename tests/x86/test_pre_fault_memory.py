"""After tools/testing/selftests/kvm/pre_fault_memory_test.c: KVM_PRE_FAULT_MEMORY maps guest
memory before the guest touches it (kvm_vcpu_pre_fault_memory, kvm_arch_vcpu_pre_fault_memory)."""
from errno import EFAULT, EINVAL, EIO, ENOENT, EOPNOTSUPP

import pytest

import sevcore
from sevcore.core.npt import NPT_PRIVATE
from sevcore.kvm.vm import KVM_MMU_MAX_GFN
from sevcore.vmm.kvm_util import vm_mem_add
from sevcore.uapi import *

from support import raises_errno

P = PAGE_SIZE
GPA = 1 << 30
NPAGES = 64


@pytest.fixture
def vm():
    vm = sevcore.Kvm().create_vm(KVM_X86_DEFAULT_VM)
    vm_mem_add(vm, GPA, 0, NPAGES)
    return vm


def mapped(vm, gpa, npages):
    """The gfns of ``[gpa, gpa + npages pages)`` the NPT maps."""
    return [g for g in range(gpa >> 12, (gpa >> 12) + npages) if vm.npt.lookup(g) is not None]


def test_pre_fault_maps_the_range(vm):
    """A range inside a memslot is mapped whole and written back as empty; pre-faulting it again
    succeeds (the pages are already mapped), and KVM_CAP_PRE_FAULT_MEMORY says yes."""
    vcpu = vm.create_vcpu(0)
    assert vm.check_extension(KVM_CAP_PRE_FAULT_MEMORY) == 1
    assert mapped(vm, GPA, NPAGES) == []
    out = vcpu.pre_fault_memory(GPA, NPAGES * P)
    assert (out.gpa, out.size, out.flags) == (GPA + NPAGES * P, 0, 0)
    assert len(mapped(vm, GPA, NPAGES)) == NPAGES
    out = vcpu.pre_fault_memory(GPA + 8 * P, 4 * P)
    assert (out.gpa, out.size) == (GPA + 12 * P, 0)


def test_pre_fault_partial_progress_is_success(vm):
    """A range running past the memslot's end maps the slot's pages and reports the rest as the
    leftover range; one wholly outside any memslot fails with ENOENT and maps nothing."""
    vcpu = vm.create_vcpu(0)
    end = GPA + NPAGES * P
    out = vcpu.pre_fault_memory(end - 2 * P, 5 * P)
    assert (out.gpa, out.size) == (end, 3 * P)
    assert mapped(vm, end - 2 * P, 5) == [(end >> 12) - 2, (end >> 12) - 1]
    with raises_errno(ENOENT, "KVM_PRE_FAULT_MEMORY"):
        vcpu.pre_fault_memory(end, P)
    with raises_errno(ENOENT, "KVM_PRE_FAULT_MEMORY"):
        vcpu.pre_fault_memory((KVM_MMU_MAX_GFN + 1) << 12, P)


@pytest.mark.parametrize("gpa,size,flags", [
    (GPA, P, 1), (GPA, P, 1 << 63),           # flags
    (GPA + 1, P, 0), (GPA, P + 8, 0),         # unaligned
    (GPA, 0, 0),                              # empty: gpa + 0 <= gpa
    ((1 << 64) - P, P, 0),                    # ends at 2^64: wraps to 0
    ((1 << 64) - P, 2 * P, 0)])
def test_pre_fault_argument_checks(vm, gpa, size, flags):
    """Nonzero flags, an unaligned, empty or wrapping range are EINVAL and map nothing."""
    vcpu = vm.create_vcpu(0)
    with raises_errno(EINVAL, "KVM_PRE_FAULT_MEMORY"):
        vcpu.pre_fault_memory(gpa, size, flags)
    assert mapped(vm, GPA, NPAGES) == []


def test_pre_fault_private_memory():
    """On a SW_PROTECTED VM a private gfn is pre-faulted from the slot's guest_memfd as a
    private mapping, and a private gfn of a slot without guest_memfd is EFAULT."""
    kvm = sevcore.Kvm()
    vm = kvm.create_vm(KVM_X86_SW_PROTECTED_VM)
    vm_mem_add(vm, GPA, 0, 8, flags=KVM_MEM_GUEST_MEMFD)
    vm_mem_add(vm, 2 * GPA, 1, 8)
    vcpu = vm.create_vcpu(0)
    vm.set_memory_attributes(GPA, 4 * P, KVM_MEMORY_ATTRIBUTE_PRIVATE)
    vm.set_memory_attributes(2 * GPA, P, KVM_MEMORY_ATTRIBUTE_PRIVATE)
    out = vcpu.pre_fault_memory(GPA, 8 * P)
    assert out.size == 0
    flags = [vm.npt.lookup(g)[1] & NPT_PRIVATE for g in range(GPA >> 12, (GPA >> 12) + 8)]
    assert [bool(f) for f in flags] == [True] * 4 + [False] * 4
    with raises_errno(EFAULT, "KVM_PRE_FAULT_MEMORY"):
        vcpu.pre_fault_memory(2 * GPA, P)


def test_pre_fault_refused_where_not_allowed_and_on_a_dead_vm():
    """An SNP VM refuses pre-faulting with EOPNOTSUPP until its launch allows it
    (pre_fault_allowed), and a dead VM's vCPU answers EIO."""
    kvm = sevcore.Kvm()
    if kvm.host.supported_vm_types & 1 << KVM_X86_SNP_VM:
        snp = kvm.create_vm(KVM_X86_SNP_VM)
        vm_mem_add(snp, GPA, 0, 4)
        with raises_errno(EOPNOTSUPP, "KVM_PRE_FAULT_MEMORY"):
            snp.create_vcpu(0).pre_fault_memory(GPA, P)
    vm = kvm.create_vm(KVM_X86_DEFAULT_VM)
    vm_mem_add(vm, GPA, 0, 4)
    vcpu = vm.create_vcpu(0)
    vm.dead = True
    with raises_errno(EIO, "KVM_PRE_FAULT_MEMORY"):
        vcpu.pre_fault_memory(GPA, P)
