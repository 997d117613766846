"""KVM Userfault (the out-of-tree KVM_MEM_USERFAULT series that post-copy uses): a marked page
exits with KVM_EXIT_MEMORY_FAULT and the USERFAULT flag until user space clears its bit."""
from errno import EFAULT, EINVAL

import numpy as np
from hypothesis import settings, strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, rule

import sevcore
from sevcore.uapi import *

from support import raises_errno
from support.kvm import Guest, interpreter

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


def test_a_fault_maps_only_the_pages_before_the_first_marked_one():
    """The batch a fault maps ends at the first marked page, wherever it lies, and the pages
    after it are mapped once the access gets past it."""
    base = SLOT_GPA >> PAGE_SHIFT
    for mark in (100, 5):
        kvm, vm, hva, bitmap, vcpu = setup()
        vcpu.set_guest_code(guest_writes_pages, SLOT_GPA, NPAGES)
        set_bits(kvm, bitmap, [mark])
        vm.set_user_memory_region2(0, KVM_MEM_USERFAULT, SLOT_GPA, NPAGES * PAGE_SIZE, hva,
                                   userfault_bitmap=bitmap)
        with raises_errno(EFAULT, "KVM_RUN"):
            vcpu.run()
        assert vcpu.kvm_run.memory_fault.gpa == SLOT_GPA + mark * PAGE_SIZE
        assert vm.npt.lookup(base + mark - 1) is not None
        assert vm.npt.lookup(base + mark) is None and vm.npt.lookup(base + mark + 1) is None
        set_bits(kvm, bitmap, [])
        vcpu.run()
        assert vcpu.get_ucall() == ("sync", ("written",))
        assert vm.npt.lookup(base + NPAGES - 1) is not None


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


class UserfaultMachine(RuleBasedStateMachine):
    """Bits set and cleared, the flag toggled (and refused), guest reads and writes one page
    at a time, against a model of which pages are mapped: an access exits with the USERFAULT
    flag exactly when its page is marked and not mapped since the flag was last enabled, and
    such an access writes nothing."""

    def __init__(self):
        super().__init__()
        self.kvm, self.vm, self.hva, self.bitmap, vcpu = setup()
        self.guest = Guest(self.vm, vcpu)
        self.bits, self.mapped, self.on = set(), set(), False
        self.values = [0] * NPAGES

    def _slot(self, flags, bitmap):
        self.vm.set_user_memory_region2(0, flags, SLOT_GPA, NPAGES * PAGE_SIZE, self.hva,
                                        userfault_bitmap=bitmap)

    @rule(p=st.integers(0, NPAGES - 1), on=st.booleans())
    def set_bit(self, p, on):
        (self.bits.add if on else self.bits.discard)(p)
        set_bits(self.kvm, self.bitmap, self.bits)

    @rule()
    def enable(self):
        self._slot(KVM_MEM_USERFAULT, self.bitmap)
        if not self.on:
            self.mapped.clear()             # enabling zaps the slot's mappings
        self.on = True

    @rule()
    def disable(self):
        self._slot(0, 0)
        self.on = False

    @rule()
    def enable_without_bitmap(self):
        with raises_errno(EINVAL, "KVM_SET_USER_MEMORY_REGION2"):
            self._slot(KVM_MEM_USERFAULT, 0)
        assert bool(self.vm.memslots[(0, 0)].flags & KVM_MEM_USERFAULT) == self.on

    @rule(p=st.integers(0, NPAGES - 1), v=st.integers(1, (1 << 64) - 1) | st.none())
    def access(self, p, v):
        gpa = SLOT_GPA + p * PAGE_SIZE
        data = None if v is None else v.to_bytes(8, "little")
        faults = self.on and p in self.bits and p not in self.mapped
        op = (lambda g: g.read(gpa, 8)) if data is None else (lambda g: g.write(gpa, data))
        if faults:
            with raises_errno(EFAULT, "KVM_RUN"):
                self.guest.do(op)
            run = self.guest.vcpu.kvm_run
            assert (run.exit_reason, run.memory_fault.flags, run.memory_fault.gpa) == \
                (KVM_EXIT_MEMORY_FAULT, KVM_MEMORY_EXIT_FLAG_USERFAULT, gpa)
            # The access stays pending: drop it with a fresh program, as user space would not.
            self.guest.vcpu.set_guest_code(interpreter, self.guest.box)
            self.guest.box.clear()
        else:
            got = self.guest.do(op)
            self.mapped.add(p)
            if data is None:
                assert int.from_bytes(got, "little") == self.values[p]
            else:
                self.values[p] = v

    @invariant()
    def memory_matches(self):
        firsts = np.frombuffer(self.kvm.read(self.hva, NPAGES * PAGE_SIZE), "<u8")[::512]
        assert firsts.tolist() == self.values


UserfaultMachine.TestCase.settings = settings(max_examples=40, stateful_step_count=30,
                                              deadline=None)
TestUserfault = UserfaultMachine.TestCase
