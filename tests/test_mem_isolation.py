"""A guest never reaches a frame its VM does not own: every path that frees a frame, or takes it
away from a gfn, first zaps the NPT entries that point at it (kvm_unmap_gfn_range, reached from
guest_memfd's invalidation, the mmu notifier, memslot updates and attribute changes).

Each test plants a VMM secret where a stale entry would lead and checks the guest cannot see it;
``stray_npt_entries`` checks every entry against what backs its gfn now.
"""
import errno

import numpy as np
import pytest

import sevcore
from sevcore.core.npt import NPT_PRESENT, NPT_PRIVATE, Npt
from sevcore.kvm.mmu import KVM_FILTER_PRIVATE, KVM_FILTER_SHARED
from sevcore.migration.engine import MigrationParams, migrate
from sevcore.migration.machine import Machine
from sevcore.migration.workload import GuestConfig
from sevcore.uapi import *
from sevcore.vmm.kvm_util import kvm_vm_free, vm_sev_create_with_one_vcpu, vm_sev_launch

from support.kvm import Guest, stray_npt_entries
from support import raises_errno

P = PAGE_SIZE
GPA = 1 << 32
GFN = GPA >> PAGE_SHIFT
SLOT = 10
SECRET = b"VMM secret, not the guest's"
PUNCH = FALLOC_FL_KEEP_SIZE | FALLOC_FL_PUNCH_HOLE
MMAP_SHARED = GUEST_MEMFD_FLAG_MMAP | GUEST_MEMFD_FLAG_INIT_SHARED
MISS = Npt.MISS


def vmm_secret(vm):
    """A fresh VMM page holding SECRET: the first frame freed before this is the one it gets."""
    hva = vm.kvm.mmap(P)
    vm.kvm.write(hva, SECRET)
    return hva


def gmem_only_vm(vm_type, flags):
    """A VM with one 4-page memslot bound to a guest_memfd created with ``flags`` (MMAP: the
    slot is gmem-only, shared accesses come from the file too)."""
    vm = sevcore.Host().kvm.create_vm(vm_type)
    gmem = vm.create_guest_memfd(4 * P, flags)
    hva = vm.kvm.mmap(4 * P)
    vm.set_user_memory_region2(SLOT, KVM_MEM_GUEST_MEMFD, GPA, 4 * P, hva, 0, gmem)
    return vm, gmem, hva


def expect_memory_fault(guest, gpa):
    """The guest's read of ``gpa`` fails KVM_RUN with EFAULT and a shared memory-fault exit (the
    vCPU then retries that read on every KVM_RUN: call it last)."""
    with raises_errno(errno.EFAULT, "KVM_RUN"):
        guest.read(gpa, len(SECRET))
    run = guest.vcpu.kvm_run
    assert (run.exit_reason, run.memory_fault.gpa, run.memory_fault.flags) == \
        (KVM_EXIT_MEMORY_FAULT, gpa, 0)


def test_pagemap_reports_present_frames_only():
    """kvm.pagemap gives the frame behind each VMM page that has one (touched anonymous memory,
    a page a shared guest_memfd mapping holds) and MISS for the rest, allocating nothing."""
    vm = sevcore.Host().kvm.create_vm(KVM_X86_DEFAULT_VM)
    kvm = vm.kvm
    anon = kvm.mmap(2 * P)
    kvm.write(anon + P, b"x")
    shared = vm.create_guest_memfd(2 * P, MMAP_SHARED)
    private = vm.create_guest_memfd(2 * P, GUEST_MEMFD_FLAG_MMAP)
    shared_hva, private_hva = shared.mmap(4 * P), private.mmap(2 * P)
    kvm.write(shared_hva + P, b"y")
    private.fallocate(FALLOC_FL_KEEP_SIZE, 0, 2 * P)
    hvas = [anon, anon + P, shared_hva, shared_hva + P, shared_hva + 2 * P, private_hva,
            private_hva + P, 0x1000]
    allocated = vm.host.mem.allocated
    got = kvm.pagemap(np.array(hvas, np.uint64) >> np.uint64(PAGE_SHIFT)).tolist()
    assert got == [MISS, kvm.hva_to_pfn(anon + P, False), MISS, shared.page_cache.lookup(1),
                   MISS, MISS, MISS, MISS]
    assert vm.host.mem.allocated == allocated


def test_stray_npt_entries_finds_a_planted_entry():
    """The ownership check passes on faulted-in entries and reports an entry to another frame,
    to the VMM page behind a gmem-only slot, or outside every memslot."""
    vm, gmem, hva = gmem_only_vm(KVM_X86_SW_PROTECTED_VM, GUEST_MEMFD_FLAG_MMAP)
    vm.set_user_memory_region2(SLOT + 1, 0, GPA + 8 * P, P, vm.kvm.mmap(P))
    guest = Guest(vm)
    guest.write(GPA, b"shared")
    guest.write(GPA + 8 * P, b"anon")
    vm.set_memory_attributes(GPA + P, P, KVM_MEMORY_ATTRIBUTE_PRIVATE)
    guest.write(GPA + P, b"private")
    assert vm.npt.count() == 3 and stray_npt_entries(vm) == []
    other = vm.kvm.hva_to_pfn(vmm_secret(vm), False)
    behind_hva = vm.kvm.hva_to_pfn(hva + 3 * P, True)   # the VMM page a gmem-only slot skips
    vm.npt.map(GFN + 2, other, 0)
    vm.npt.map(GFN + 3, behind_hva, 0)
    vm.npt.map(GFN + 100, other, 0)
    assert stray_npt_entries(vm) == [(GFN + 2, other, NPT_PRESENT),
                                     (GFN + 3, behind_hva, NPT_PRESENT),
                                     (GFN + 100, other, NPT_PRESENT)]


@pytest.mark.parametrize("vm_type,flags", [
    (KVM_X86_SW_PROTECTED_VM, GUEST_MEMFD_FLAG_MMAP),
    (KVM_X86_DEFAULT_VM, GUEST_MEMFD_FLAG_MMAP),
    (KVM_X86_DEFAULT_VM, MMAP_SHARED),
])
def test_punch_hole_zaps_shared_guest_memfd_mappings(vm_type, flags):
    """A punched page mapped by a shared guest access is zapped: the guest sees a fresh zero
    page, not the VMM memory the freed frame is handed to next."""
    vm, gmem, _ = gmem_only_vm(vm_type, flags)
    guest = Guest(vm)
    guest.write(GPA, b"guest data")
    gmem.fallocate(PUNCH, 0, P)
    assert vm.npt.lookup(GFN) is None
    hva = vmm_secret(vm)
    assert guest.read(GPA, len(SECRET)) == bytes(len(SECRET))
    guest.write(GPA, b"X" * len(SECRET))
    assert vm.kvm.read(hva, len(SECRET)) == SECRET
    assert stray_npt_entries(vm) == []


@pytest.mark.parametrize("vm_type", [KVM_X86_DEFAULT_VM, KVM_X86_SW_PROTECTED_VM])
def test_munmap_zaps_the_guest_mappings_of_the_range(vm_type):
    """munmap of a memslot's VMM memory zaps the gfns it backed before the frames are freed
    (the mmu notifier): the guest's next access to them is a memory fault, the pages outside
    the range stay mapped, and the freed frames' next owner is out of the guest's reach."""
    vm = sevcore.Host().kvm.create_vm(vm_type)
    hva = vm.kvm.mmap(4 * P)
    vm.set_user_memory_region2(SLOT, 0, GPA, 4 * P, hva)
    guest = Guest(vm)
    for i in range(4):
        guest.write(GPA + i * P, b"guest data")
    vm.kvm.munmap(hva + P, 2 * P)
    assert [g - GFN for g in vm.npt.items()[0].tolist()] == [0, 3]
    assert stray_npt_entries(vm) == []
    secret = vmm_secret(vm)
    assert guest.read(GPA + 3 * P, 10) == b"guest data"
    expect_memory_fault(guest, GPA + P)
    assert vm.kvm.read(secret, len(SECRET)) == SECRET


def test_punch_hole_zaps_mappings_through_a_vmm_mapping_of_the_file():
    """A memslot whose HVAs are a VMM mapping of a guest_memfd loses the gfns of a punched page
    (truncation unmaps it from the VMM: the mmu notifier): the guest then faults a fresh page in
    through the mapping instead of keeping the freed frame."""
    vm = sevcore.Host().kvm.create_vm(KVM_X86_DEFAULT_VM)
    gmem = vm.create_guest_memfd(4 * P, MMAP_SHARED)
    hva = gmem.mmap(4 * P)
    vm.set_user_memory_region2(SLOT, 0, GPA, 4 * P, hva)
    guest = Guest(vm)
    guest.write(GPA, b"guest data")
    assert vm.npt.lookup(GFN)[0] == gmem.page_cache.lookup(0)
    gmem.fallocate(PUNCH, 0, P)
    assert vm.npt.lookup(GFN) is None
    secret = vmm_secret(vm)
    assert guest.read(GPA, len(SECRET)) == bytes(len(SECRET))
    guest.write(GPA, b"X" * len(SECRET))
    assert vm.kvm.read(hva, 1) == b"X"
    assert vm.kvm.read(secret, len(SECRET)) == SECRET
    assert stray_npt_entries(vm) == []


def test_a_mapping_keeps_a_closed_guest_memfd():
    """Closing the fd of a guest_memfd the VMM still maps keeps the file, its pages and its
    bindings (the mapping holds a reference, as a VMA holds its file); unmapping the last piece
    of the mapping releases it: the frames go back and the gmem-only slot faults with EFAULT."""
    vm, gmem, _ = gmem_only_vm(KVM_X86_DEFAULT_VM, MMAP_SHARED)
    host = vm.host
    before = host.mem.allocated
    hva = gmem.mmap(4 * P)
    vm.kvm.write(hva, b"vmm data")
    guest = Guest(vm)
    guest.write(GPA + 3 * P, b"guest data")
    gmem.close()
    with raises_errno(errno.EBADF):
        gmem.fallocate(PUNCH, 0, P)
    assert vm.kvm.read(hva, 8) == b"vmm data"
    assert guest.read(GPA, 8) == b"vmm data"
    assert vm.kvm.read(hva + 3 * P, 10) == b"guest data"
    vm.kvm.munmap(hva + P, P)                # split: both pieces hold the file
    vm.kvm.munmap(hva, P)
    assert not gmem.released and guest.read(GPA + 2 * P, 1) == b"\0"
    vm.kvm.munmap(hva + 2 * P, 2 * P)
    assert gmem.released and host.mem.allocated == before
    assert vm.npt.count() == 0
    expect_memory_fault(guest, GPA)


def test_gmem_only_slot_stays_gmem_only_after_release():
    """A shared access to a gmem-only slot whose guest_memfd was released is a memory fault
    (KVM_MEMSLOT_GMEM_ONLY stays), never a read of the VMM memory at the slot's HVA."""
    vm, gmem, hva = gmem_only_vm(KVM_X86_SW_PROTECTED_VM, GUEST_MEMFD_FLAG_MMAP)
    vm.kvm.write(hva, SECRET)
    guest = Guest(vm)
    guest.write(GPA, b"guest data")
    gmem.close()
    assert vm.npt.count() == 0
    expect_memory_fault(guest, GPA)
    assert stray_npt_entries(vm) == []


@pytest.mark.parametrize("path", ["psp", "helper"])
def test_migration_leaves_no_stray_entry(path):
    """A migration frees no frame under a VM: after it the source (whose helper mirror VM is
    gone), the target and the source's memslots agree with every NPT entry."""
    m = Machine.launch(sevcore.Kvm(), GuestConfig(mem_size=2 << 20, shared_size=64 << 10,
                                                  workload="random", dirty_pages_per_s=200,
                                                  helper_vcpus=1))
    r = migrate(m, sevcore.Kvm(), MigrationParams(path=path, max_iterations=3, timeout_s=20))
    assert r.stats.status == "completed" and r.stats.bad_pages == 0
    for vm in (m.vm, r.target.vm):
        assert vm.npt.count() and stray_npt_entries(vm) == []


def test_sev_regions_and_vm_teardown_leave_no_stray_entry():
    """SEV's pinned regions hold no mapping: unregistering one, or munmap under it, leaves
    every NPT entry on a frame the VM owns; destroying the VM drops its table and its MMU
    notifier."""
    vm, vcpu = vm_sev_create_with_one_vcpu(sevcore.Kvm(), KVM_X86_SEV_VM, None, npages=16)
    vm_sev_launch(vm, 0)
    hva = vm.memslots[(0, 0)].userspace_addr
    guest = Guest(vm, vcpu)
    for i in range(4):
        guest.write(i * P, b"guest data")
    vm.memory_encrypt_reg_region(hva, 4 * P)
    vm.kvm.munmap(hva + 2 * P, 2 * P)
    assert stray_npt_entries(vm) == []
    vm.memory_encrypt_unreg_region(hva, 4 * P)
    assert stray_npt_entries(vm) == [] and vm.npt.count() == 2
    kvm_vm_free(vm)                          # the vCPU fd too: it holds the VM
    assert vm.npt.closed
    vm.kvm.munmap(hva, 2 * P)                # the destroyed VM no longer hears of it


@pytest.mark.parametrize("vm_type", [KVM_X86_DEFAULT_VM, KVM_X86_SW_PROTECTED_VM, KVM_X86_SNP_VM,
                                     KVM_X86_TDX_VM])
def test_invalidation_filter_selects_roots_on_tdx_only(vm_type):
    """A filtered zap takes every entry of the range on a VM without mirrored TDP, and only the
    entries of the filtered kind (mirror root: private, direct root: shared) on TDX."""
    vm = sevcore.Host().kvm.create_vm(vm_type)
    for attr_filter, kept_flags in ((KVM_FILTER_PRIVATE, 0), (KVM_FILTER_SHARED, NPT_PRIVATE)):
        vm.npt.map(GFN, 0x1000, 0)
        vm.npt.map(GFN + 1, 0x1001, NPT_PRIVATE)
        vm._zap_gfns(GFN, 2, attr_filter)
        kept = [f & NPT_PRIVATE for f in vm.npt.items()[2].tolist()]
        assert kept == ([kept_flags] if vm_type == KVM_X86_TDX_VM else [])
        vm.npt.unmap(GFN, 2)
