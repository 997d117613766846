"""KVM Userfault (the out-of-tree KVM_MEM_USERFAULT series that post-copy uses): a marked page
exits with KVM_EXIT_MEMORY_FAULT and the USERFAULT flag until user space clears its bit."""
from errno import EFAULT, EINVAL

import numpy as np

import sevcore
from sevcore.uapi import *

from support import raises_errno

SLOT_GPA = 0x100000
NPAGES = 128


def guest_writes_pages(g, gpa, npages):
    yield g.write_pattern(gpa, npages, 7)
    yield g.sync("written")


def setup():
    kvm = sevcore.Kvm()
    vm = kvm.create_vm(KVM_X86_DEFAULT_VM)
    hva = kvm.mmap(NPAGES * PAGE_SIZE)
    vm.set_user_memory_region2(0, 0, SLOT_GPA, NPAGES * PAGE_SIZE, hva)
    bitmap = kvm.mmap(PAGE_SIZE)
    vcpu = vm.create_vcpu(0)
    return kvm, vm, hva, bitmap, vcpu


def set_bits(kvm, bitmap, gfns):
    words = np.zeros(NPAGES // 64, "<u8")
    for g in gfns:
        words[g // 64] |= np.uint64(1 << (g % 64))
    kvm.write(bitmap, words.tobytes())


def test_marked_page_exits_until_its_bit_is_cleared():
    """A bulk write stops at the first marked page (those before it written), exits with the
    USERFAULT flag for it, and completes once user space clears the bits."""
    kvm, vm, hva, bitmap, vcpu = setup()
    vcpu.set_guest_code(guest_writes_pages, SLOT_GPA, NPAGES)
    set_bits(kvm, bitmap, [40, 90])
    vm.set_user_memory_region2(0, KVM_MEM_USERFAULT, SLOT_GPA, NPAGES * PAGE_SIZE, hva,
                               userfault_bitmap=bitmap)
    with raises_errno(EFAULT, "KVM_RUN"):
        vcpu.run()
    run = vcpu.kvm_run
    assert (run.exit_reason, run.memory_fault.flags, run.memory_fault.gpa) == \
        (KVM_EXIT_MEMORY_FAULT, KVM_MEMORY_EXIT_FLAG_USERFAULT, SLOT_GPA + 40 * PAGE_SIZE)
    assert kvm.read(hva + 39 * PAGE_SIZE, 8) != bytes(8)
    assert kvm.read(hva + 40 * PAGE_SIZE, 8) == kvm.read(hva + 90 * PAGE_SIZE, 8) == bytes(8)
    set_bits(kvm, bitmap, [90])
    with raises_errno(EFAULT, "KVM_RUN"):
        vcpu.run()
    assert vcpu.kvm_run.memory_fault.gpa == SLOT_GPA + 90 * PAGE_SIZE
    set_bits(kvm, bitmap, [])
    vcpu.run()
    assert vcpu.get_ucall() == ("sync", ("written",))
    assert kvm.read(hva + 90 * PAGE_SIZE, 8) != bytes(8)


def test_enabling_zaps_pages_already_mapped():
    """Pages the guest mapped before the flag was set fault again once marked."""
    kvm, vm, hva, bitmap, vcpu = setup()
    vcpu.set_guest_code(guest_writes_pages, SLOT_GPA, NPAGES)
    vcpu.run()
    set_bits(kvm, bitmap, [3])
    vm.set_user_memory_region2(0, KVM_MEM_USERFAULT, SLOT_GPA, NPAGES * PAGE_SIZE, hva,
                               userfault_bitmap=bitmap)
    vcpu.set_guest_code(guest_writes_pages, SLOT_GPA, NPAGES)
    with raises_errno(EFAULT, "KVM_RUN"):
        vcpu.run()
    assert vcpu.kvm_run.memory_fault.gpa == SLOT_GPA + 3 * PAGE_SIZE


def test_flag_without_an_aligned_bitmap_is_einval_and_changes_nothing():
    """KVM_MEM_USERFAULT with no bitmap, or a misaligned one, is EINVAL; the slot is as it
    was."""
    kvm, vm, hva, bitmap, vcpu = setup()
    for bad in (0, bitmap + 4):
        with raises_errno(EINVAL, "KVM_SET_USER_MEMORY_REGION2"):
            vm.set_user_memory_region2(0, KVM_MEM_USERFAULT, SLOT_GPA, NPAGES * PAGE_SIZE, hva,
                                       userfault_bitmap=bad)
    s = vm.memslots[(0, 0)]
    assert s.flags == 0 and s.userfault_bitmap == 0
    with raises_errno(EINVAL, "KVM_SET_USER_MEMORY_REGION"):
        vm.set_user_memory_region(0, KVM_MEM_USERFAULT, SLOT_GPA, NPAGES * PAGE_SIZE, hva)
