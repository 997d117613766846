"""Dirty logging of guest_memfd slots (out of tree: sevcore.kvm.snp_ma.snp_enable_gmem_dirty_log):
upstream's EINVAL stays the default; once an SNP VM opts in, KVM_MEM_LOG_DIRTY_PAGES is taken on
its guest_memfd slot and the guest's private writes land in KVM_GET_DIRTY_LOG."""
from errno import EINVAL, ENOENT

import numpy as np
import pytest

import sevcore
from sevcore.kvm import snp_ma as K
from sevcore.migration import ma
from sevcore.uapi import *
from sevcore.vmm.kvm_util import vm_mem_add

from support import raises_errno

NPAGES = 64
F = KVM_MEM_GUEST_MEMFD
LOG = KVM_MEM_LOG_DIRTY_PAGES


def snp_vm(kvm):
    vm = kvm.create_vm(KVM_X86_SNP_VM)
    vm.memory_encrypt_op(KVM_SEV_INIT2)
    hva = vm_mem_add(vm, 0, 0, NPAGES, F)
    return vm, hva


def set_flags(vm, flags, **change):
    s = vm.gfn_to_memslot(0)
    region = dict(slot=s.id, flags=flags, guest_phys_addr=s.base_gfn << PAGE_SHIFT,
                  memory_size=s.npages << PAGE_SHIFT, userspace_addr=s.userspace_addr,
                  guest_memfd_offset=s.gmem_pgoff << PAGE_SHIFT, guest_memfd=s.gmem_file)
    region.update(change)
    return vm.set_user_memory_region2(**region)


def dirty(vm):
    words = vm.get_dirty_log(vm.gfn_to_memslot(0).id)
    return set(np.flatnonzero(np.unpackbits(words.view(np.uint8), bitorder="little")).tolist())


def test_upstream_refuses_log_dirty_on_a_gmem_slot_by_default():
    """Without the opt-in, LOG_DIRTY_PAGES on an SNP VM's guest_memfd slot is EINVAL, at
    creation or as a change, and the slot stays as it was."""
    kvm = sevcore.Kvm()
    vm, hva = snp_vm(kvm)
    slot = vm.gfn_to_memslot(0)
    with raises_errno(EINVAL, "KVM_SET_USER_MEMORY_REGION2"):
        set_flags(vm, F | LOG)
    with raises_errno(EINVAL, "KVM_SET_USER_MEMORY_REGION2"):
        vm_mem_add(vm, NPAGES << PAGE_SHIFT, 1, NPAGES, F | LOG)
    assert vm.gfn_to_memslot(0) is slot and slot.flags == F and slot.dirty_bitmap is None
    assert slot.gmem_file.bindings[0][2] is slot and len(vm.memslots) == 1
    assert not vm.gmem_dirty_log


@pytest.mark.parametrize("vm_type", [KVM_X86_DEFAULT_VM, KVM_X86_SW_PROTECTED_VM,
                                     KVM_X86_SEV_VM, KVM_X86_SEV_ES_VM])
def test_the_opt_in_is_for_snp_vms_only(vm_type):
    """snp_enable_gmem_dirty_log on a VM that is not KVM_X86_SNP_VM is EINVAL and changes
    nothing: the flag stays refused there."""
    kvm = sevcore.Kvm()
    vm = kvm.create_vm(vm_type)
    with raises_errno(EINVAL, "KVM_ENABLE_CAP"):
        K.snp_enable_gmem_dirty_log(vm)
    assert not vm.gmem_dirty_log
    if vm_type == KVM_X86_SW_PROTECTED_VM:
        with raises_errno(EINVAL):
            vm_mem_add(vm, 0, 0, NPAGES, F | LOG)


def test_the_opt_in_is_refused_with_a_dirty_ring():
    """An SNP VM that logs to dirty rings cannot opt in (EINVAL); nothing changes."""
    kvm = sevcore.Kvm()
    vm = kvm.create_vm(KVM_X86_SNP_VM)
    vm.enable_cap(KVM_CAP_DIRTY_LOG_RING, 4096 * 16)
    with raises_errno(EINVAL, "KVM_ENABLE_CAP"):
        K.snp_enable_gmem_dirty_log(vm)
    assert not vm.gmem_dirty_log



def test_a_dirty_ring_enabled_after_the_opt_in_keeps_gmem_slots_from_logging():
    """A ring enabled after the opt-in (before any vCPU, as KVM allows) leaves LOG_DIRTY_PAGES
    on a guest_memfd slot refused (EINVAL), as the opt-in itself is with a ring; no slot is
    made."""
    kvm = sevcore.Kvm()
    vm = kvm.create_vm(KVM_X86_SNP_VM)
    K.snp_enable_gmem_dirty_log(vm)
    vm.enable_cap(KVM_CAP_DIRTY_LOG_RING, 4096 * 16)
    vm.memory_encrypt_op(KVM_SEV_INIT2)
    with raises_errno(EINVAL, "KVM_SET_USER_MEMORY_REGION2"):
        vm_mem_add(vm, 0, 0, NPAGES, F | LOG)
    assert vm.memslots == {}


def test_with_the_opt_in_a_gmem_slot_logs_and_stops_logging():
    """After the opt-in, LOG_DIRTY_PAGES is taken on a new guest_memfd slot and toggled on an
    existing one (same file, offset and base); the log starts clear and goes when the flag
    does (ENOENT)."""
    kvm = sevcore.Kvm()
    vm, hva = snp_vm(kvm)
    K.snp_enable_gmem_dirty_log(vm)
    K.snp_enable_gmem_dirty_log(vm)               # twice is the same
    set_flags(vm, F | LOG)
    slot = vm.gfn_to_memslot(0)
    assert slot.flags == F | LOG and slot.gmem_file.bindings[0][2] is slot
    assert dirty(vm) == set()
    vm_mem_add(vm, NPAGES << PAGE_SHIFT, 1, NPAGES, F | LOG)
    assert vm.get_dirty_log(1).sum() == 0
    set_flags(vm, F)
    with raises_errno(ENOENT, "KVM_GET_DIRTY_LOG"):
        vm.get_dirty_log(0)


def test_with_the_opt_in_nothing_else_of_a_gmem_slot_changes():
    """Even with the opt-in, a guest_memfd slot's base, offset or file cannot change
    (EINVAL), nor another flag with LOG_DIRTY_PAGES; the slot stays bound as it was."""
    kvm = sevcore.Kvm()
    vm, hva = snp_vm(kvm)
    K.snp_enable_gmem_dirty_log(vm)
    slot = vm.gfn_to_memslot(0)
    other = vm.create_guest_memfd(NPAGES << PAGE_SHIFT)
    for flags, change in ((F | LOG, dict(guest_phys_addr=NPAGES << PAGE_SHIFT)),
                          (F | LOG, dict(guest_memfd_offset=4096)),
                          (F | LOG, dict(guest_memfd=other)), (F | LOG | KVM_MEM_READONLY, {})):
        with raises_errno(EINVAL, "KVM_SET_USER_MEMORY_REGION2"):
            set_flags(vm, flags, **change)
    assert vm.gfn_to_memslot(0) is slot and slot.flags == F and slot.dirty_bitmap is None
    assert slot.gmem_file.bindings == [[0, NPAGES, slot]] and other.bindings == []


def test_private_writes_of_an_snp_guest_land_in_the_dirty_log():
    """With logging on, each round of the guest's private writes is in KVM_GET_DIRTY_LOG (its
    data pages exactly, read-and-clear); pages it only reads are not."""
    kvm = sevcore.Kvm()
    agent = ma.Agent(kvm)
    guest = ma.SnpMaGuest.launch(kvm, 48 << 12, agent, seed=3, batch_pages=8)
    guest.start_work(seed=4, dirty_pages=5)
    guest.work()                                  # the pages are mapped before logging starts
    K.snp_enable_gmem_dirty_log(guest.vm)
    set_flags(guest.vm, F | LOG)
    data = set(range(ma.DATA_GFN, guest.layout.first_gfn))
    for _ in range(3):
        guest.work()
        assert dirty(guest.vm) & data == set(guest.written[-1].tolist())
        assert dirty(guest.vm) == set()
    guest.check()                                 # reads its data, writes none of it
    assert dirty(guest.vm) & data == set()
