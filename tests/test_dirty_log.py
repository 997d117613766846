"""KVM_GET_DIRTY_LOG / KVM_CLEAR_DIRTY_LOG and KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2
(virt/kvm/kvm_main.c: kvm_get_dirty_log_protect, kvm_clear_dirty_log_protect)."""
from errno import EINVAL, ENOENT

import numpy as np
import pytest

import sevcore
from sevcore.vmm.kvm_util import vm_mem_add
from sevcore.uapi import *

from support import raises_errno

GPA = 0x10000000
NPAGES = 200


def setup(manual=0, logging=True):
    vm = sevcore.Kvm().create_vm(KVM_X86_DEFAULT_VM)
    vm_mem_add(vm, 0, 0, 16)
    if manual:
        vm.enable_cap(KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2, manual)
    vm_mem_add(vm, GPA, 1, NPAGES, KVM_MEM_LOG_DIRTY_PAGES if logging else 0)
    return vm


def touch(vm, pages, write=True):
    def guest(g):
        for p in pages:
            if write:
                yield g.write(GPA + p * PAGE_SIZE + 8, b"x")
            else:
                yield g.read(GPA + p * PAGE_SIZE, 1)
        yield g.sync()
    v = vm.create_vcpu(len(vm.vcpus))
    v.set_guest_code(guest)
    assert v.run().ucall == ("sync", ())


def bits(words, n=NPAGES):
    return {i for i in range(n) if int(words[i // 64]) >> (i % 64) & 1}


def test_writes_are_logged_and_get_clears():
    """Guest writes set their bits, reads do not; without manual protect GET also clears."""
    vm = setup()
    touch(vm, [0, 5, 64, 199])
    touch(vm, [7], write=False)
    log = vm.get_dirty_log(1)
    assert log.dtype == np.uint64 and len(log) == (NPAGES + 63) // 64
    assert bits(log) == {0, 5, 64, 199}
    assert bits(vm.get_dirty_log(1)) == set()
    touch(vm, [5])          # the mapping is still there: the write is logged again
    assert bits(vm.get_dirty_log(1)) == {5}


def test_manual_protect_get_keeps_and_clear_clears():
    """With manual protect GET leaves the log as it is; CLEAR removes exactly the given bits."""
    vm = setup(KVM_DIRTY_LOG_MANUAL_PROTECT_ENABLE)
    touch(vm, [1, 2, 70, 150])
    assert bits(vm.get_dirty_log(1)) == {1, 2, 70, 150}
    assert bits(vm.get_dirty_log(1)) == {1, 2, 70, 150}
    mask = np.zeros(4, np.uint64)
    mask[0] = 1 << 2
    mask[1] = 1 << (70 - 64)
    vm.clear_dirty_log(1, 0, NPAGES, mask)
    assert bits(vm.get_dirty_log(1)) == {1, 150}
    # From first_page 128 to the end: num_pages need not be a multiple of 64.
    mask = np.zeros(2, np.uint64)
    mask[0] = 1 << (150 - 128)
    vm.clear_dirty_log(1, 128, NPAGES - 128, mask)
    assert bits(vm.get_dirty_log(1)) == {1}


def test_initially_set():
    """KVM_DIRTY_LOG_INITIALLY_SET starts a newly logging slot with every bit set, and only
    the slot's bits."""
    vm = setup(KVM_DIRTY_LOG_MANUAL_PROTECT_ENABLE | KVM_DIRTY_LOG_INITIALLY_SET)
    log = vm.get_dirty_log(1)
    assert bits(log) == set(range(NPAGES))
    assert int(log[-1]) >> (NPAGES % 64) == 0


@pytest.mark.parametrize("first,num,err", [
    (1, 64, EINVAL), (0, 65, EINVAL), (0, NPAGES + 1, EINVAL), (256, 0, EINVAL), (64, 100, EINVAL),
])
def test_clear_dirty_log_checks(first, num, err):
    """CLEAR refuses unaligned first_page, a partial last word short of the slot's end, and
    ranges past the slot; the log is unchanged."""
    vm = setup(KVM_DIRTY_LOG_MANUAL_PROTECT_ENABLE)
    touch(vm, [3, 100])
    with raises_errno(err, "KVM_CLEAR_DIRTY_LOG"):
        vm.clear_dirty_log(1, first, num, np.full(4, ~np.uint64(0)))
    assert bits(vm.get_dirty_log(1)) == {3, 100}


@pytest.mark.parametrize("bitmap, message", [
    ([1, -1, 0, 0], r"bitmap\[1\] = -1 is not a u64"),
    ([0, 0, 2**64, 0], r"bitmap\[2\] = 18446744073709551616 is not a u64"),
    (np.array([0, 0, 0, -4], np.int64), r"bitmap\[3\] = -4 is not a u64"),
    ([1.5, 0, 0, 0], r"bitmap\[0\] = 1.5 is not an integer"),
])
def test_clear_dirty_log_names_a_word_that_is_no_u64(bitmap, message):
    """A bitmap word that is no u64 is a ValueError naming it (numpy's uint64 conversion used to
    raise OverflowError, or wrap a negative), and the log is unchanged."""
    vm = setup(KVM_DIRTY_LOG_MANUAL_PROTECT_ENABLE)
    touch(vm, [3, 100])
    with pytest.raises(ValueError, match=message):
        vm.clear_dirty_log(1, 0, NPAGES, bitmap)
    assert bits(vm.get_dirty_log(1)) == {3, 100}


def test_get_dirty_log_checks():
    """GET on a slot that does not log, or does not exist, is ENOENT; a bad slot id EINVAL."""
    vm = setup(logging=False)
    for slot, err in [(1, ENOENT), (9, ENOENT), (KVM_USER_MEM_SLOTS, EINVAL), (2 << 16, EINVAL)]:
        with raises_errno(err):
            vm.get_dirty_log(slot)


def test_logging_toggled_on_existing_mappings():
    """Turning logging on for a slot whose pages are already mapped logs later writes; turning
    it off drops the bitmap."""
    vm = setup(logging=False)
    touch(vm, [4])
    hva = vm.memslots[(0, 1)].userspace_addr
    vm.set_user_memory_region(1, KVM_MEM_LOG_DIRTY_PAGES, GPA, NPAGES * PAGE_SIZE, hva)
    touch(vm, [4, 9])
    assert bits(vm.get_dirty_log(1)) == {4, 9}
    vm.set_user_memory_region(1, 0, GPA, NPAGES * PAGE_SIZE, hva)
    with raises_errno(ENOENT):
        vm.get_dirty_log(1)
    touch(vm, [10])                 # writes still land, and nothing logs them
    assert vm.kvm.read(hva + 10 * PAGE_SIZE + 8, 1) == b"x"


def test_manual_cap_checks():
    """INITIALLY_SET without ENABLE, unknown bits and non-zero flags are EINVAL."""
    vm = sevcore.Kvm().create_vm()
    assert vm.check_extension(KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2) == 3
    for args, flags in [((2,), 0), ((4,), 0), ((1,), 1), ((1 | 8,), 0)]:
        with raises_errno(EINVAL):
            vm.enable_cap(KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2, *args, flags=flags)
    assert vm.manual_dirty_log_protect == 0
