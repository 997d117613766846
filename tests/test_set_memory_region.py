"""Port of tools/testing/selftests/kvm/set_memory_region_test.c (the tests of the same names),
plus the memslot checks of kvm_set_memory_region and the memory-attribute checks of
kvm_vm_ioctl_set_mem_attributes (virt/kvm/kvm_main.c), each with its errno and with nothing
changed by a refused call."""
import errno

import pytest

import sevcore
from sevcore.uapi import *

from support import raises_errno

P = PAGE_SIZE
MB2 = 2 << 20
G = 0xc0000000


def slots_of(vm):
    return {k: (s.base_gfn, s.npages, s.flags, s.userspace_addr) for k, s in vm.memslots.items()}


@pytest.fixture
def kvm():
    return sevcore.Kvm()


def test_invalid_memory_region_flags(kvm):
    """Every unsupported flag bit, and GUEST_MEMFD through v1, is EINVAL."""
    vm_type = (KVM_X86_SW_PROTECTED_VM if kvm.check_extension(KVM_CAP_VM_TYPES)
               & (1 << KVM_X86_SW_PROTECTED_VM) else KVM_X86_DEFAULT_VM)
    vm = kvm.create_vm(vm_type)
    supported = KVM_MEM_LOG_DIRTY_PAGES | KVM_MEM_READONLY
    if kvm.check_extension(KVM_CAP_MEMORY_ATTRIBUTES) & KVM_MEMORY_ATTRIBUTE_PRIVATE:
        supported |= KVM_MEM_GUEST_MEMFD
    for i in range(32):
        if not supported & (1 << i) or (1 << i) == KVM_MEM_GUEST_MEMFD:
            with raises_errno(errno.EINVAL, "KVM_SET_USER_MEMORY_REGION"):
                vm.set_user_memory_region(0, 1 << i, 0, MB2, 0)
    for i in range(32):
        if not supported & (1 << i):
            with raises_errno(errno.EINVAL):
                vm.set_user_memory_region2(0, 1 << i, 0, MB2, 0, 0, 0)
    assert vm.memslots == {}


def test_log_dirty_and_readonly_refused_on_gmem_slots(kvm):
    """test_invalid_memory_region_flags: LOG_DIRTY or READONLY with GUEST_MEMFD is EINVAL."""
    vm = kvm.create_vm(KVM_X86_SW_PROTECTED_VM)
    gmem = vm.create_guest_memfd(MB2)
    for extra in (KVM_MEM_LOG_DIRTY_PAGES, KVM_MEM_READONLY):
        with raises_errno(errno.EINVAL):
            vm.set_user_memory_region2(0, extra | KVM_MEM_GUEST_MEMFD, 0, MB2, 0, 0, gmem)
    assert vm.memslots == {} and gmem.bindings == []


def test_add_max_memory_regions(kvm):
    """KVM_CAP_NR_MEMSLOTS slots fit; the next slot id is EINVAL."""
    vm = kvm.create_vm(KVM_X86_DEFAULT_VM)
    n = kvm.check_extension(KVM_CAP_NR_MEMSLOTS)
    assert n == 32764
    base = kvm.mmap(P)
    for i in range(n):
        vm.set_user_memory_region(i, 0, i * MB2, MB2, base)
    with raises_errno(errno.EINVAL):
        vm.set_user_memory_region(n, 0, n * MB2, MB2, base)
    assert len(vm.memslots) == n


def test_add_private_memory_region(kvm):
    """Non-gmem fds, another VM's gmem and unaligned offsets are refused; offset 0 works."""
    vm = kvm.create_vm(KVM_X86_SW_PROTECTED_VM)
    region = dict(slot=10, flags=KVM_MEM_GUEST_MEMFD, guest_phys_addr=G, memory_size=MB2,
                  userspace_addr=0)
    with raises_errno(errno.EINVAL):
        vm.set_user_memory_region2(**region, guest_memfd=kvm.fd)
    with raises_errno(errno.EINVAL):
        vm.set_user_memory_region2(**region, guest_memfd=vm.fd)
    memfd = kvm.host.memfd_create()
    with raises_errno(errno.EINVAL):
        vm.set_user_memory_region2(**region, guest_memfd=memfd.fd)
    vm2 = kvm.create_vm(KVM_X86_SW_PROTECTED_VM)
    g2 = vm2.create_guest_memfd(MB2)
    with raises_errno(errno.EINVAL):
        vm.set_user_memory_region2(**region, guest_memfd=g2)
    assert vm2.set_user_memory_region2(**region, guest_memfd=g2) == 0
    g2.close()
    vm2.close()
    g = vm.create_guest_memfd(MB2)
    for offset in (1, 2, 511, 2048, P - 1):
        with raises_errno(errno.EINVAL):
            vm.set_user_memory_region2(**region, guest_memfd=g, guest_memfd_offset=offset)
    assert vm.memslots == {} and g.bindings == []
    assert vm.set_user_memory_region2(**region, guest_memfd=g, guest_memfd_offset=0) == 0
    # Closed and never-opened fds are EBADF.
    with raises_errno(errno.EBADF):
        vm.set_user_memory_region2(11, KVM_MEM_GUEST_MEMFD, 2 * G, MB2, 0, 0, 9999)


def test_add_overlapping_private_memory_regions(kvm):
    """guest_memfd ranges and GPA ranges may not overlap another slot's: EEXIST."""
    vm = kvm.create_vm(KVM_X86_SW_PROTECTED_VM)
    g = vm.create_guest_memfd(5 * MB2)
    F = KVM_MEM_GUEST_MEMFD
    assert vm.set_user_memory_region2(10, F, G, 2 * MB2, 0, 0, g) == 0
    assert vm.set_user_memory_region2(11, F, 2 * G, 2 * MB2, 0, 2 * MB2, g) == 0
    assert vm.set_user_memory_region2(10, F, G, 0, 0, 0, -1) == 0       # delete
    before = slots_of(vm)
    with raises_errno(errno.EEXIST):
        vm.set_user_memory_region2(10, F, G, 2 * MB2, 0, MB2, g)
    with raises_errno(errno.EEXIST):
        vm.set_user_memory_region2(10, F, G, 2 * MB2, 0, 3 * MB2, g)
    with raises_errno(errno.EEXIST):
        vm.set_user_memory_region2(10, F, 2 * G - MB2, 2 * MB2, 0, 0, g)
    with raises_errno(errno.EEXIST):
        vm.set_user_memory_region2(10, F, 2 * G + MB2, 2 * MB2, 0, 0, g)
    assert slots_of(vm) == before and len(g.bindings) == 1


def test_gmem_range_past_end_of_file(kvm):
    """A binding past the end of the guest_memfd is EINVAL and binds nothing."""
    vm = kvm.create_vm(KVM_X86_SW_PROTECTED_VM)
    g = vm.create_guest_memfd(MB2)
    with raises_errno(errno.EINVAL):
        vm.set_user_memory_region2(1, KVM_MEM_GUEST_MEMFD, G, MB2, 0, P, g)
    assert g.bindings == [] and vm.memslots == {}


@pytest.mark.parametrize("args,why", [
    ((1, 0, G, MB2 + 1, 0), "size unaligned"),
    ((1, 0, G + 1, MB2, 0), "gpa unaligned"),
    ((1, 0, G, MB2, 0x1001), "uaddr unaligned"),
    ((1, 0, G, MB2, 0x7ffffffff000), "uaddr beyond TASK_SIZE_MAX"),
    (((1 << 16) | 1, 0, G, MB2, 0), "SMM address space on a private-memory VM"),
    ((1, 0, (1 << 64) - P, MB2, 0), "gpa + size overflows"),
    ((1, 0, G, (KVM_MEM_MAX_NR_PAGES + 1) * P, 0), "too many pages"),
    ((1, 0, G, 0, 0), "delete of a missing slot"),
    ((1, 0, 1 << 48, P, 0), "beyond the largest gfn"),
])
def test_memslot_checks(kvm, args, why):
    """Each check of kvm_set_memory_region refuses with EINVAL and creates nothing."""
    vm = kvm.create_vm(KVM_X86_SW_PROTECTED_VM)
    with raises_errno(errno.EINVAL):
        vm.set_user_memory_region2(*args)
    assert vm.memslots == {}


def test_readonly_slots_by_vm_type(kvm):
    """READONLY is allowed on VMs without protected state and EINVAL on SEV-ES, SNP and TDX."""
    for t in (KVM_X86_DEFAULT_VM, KVM_X86_SW_PROTECTED_VM, KVM_X86_SEV_VM):
        vm = kvm.create_vm(t)
        assert vm.check_extension(KVM_CAP_READONLY_MEM) == 1
        assert vm.set_user_memory_region(0, KVM_MEM_READONLY, 0, P, 0) == 0
    for t in (KVM_X86_SEV_ES_VM, KVM_X86_SNP_VM, KVM_X86_TDX_VM):
        vm = kvm.create_vm(t)
        assert vm.check_extension(KVM_CAP_READONLY_MEM) == 0
        with raises_errno(errno.EINVAL):
            vm.set_user_memory_region(0, KVM_MEM_READONLY, 0, P, 0)


def test_smm_address_space_by_vm_type(kvm):
    """as_id 1 (SMM) works where there are two address spaces, and is EINVAL on private VMs."""
    for t in range(6):
        vm = kvm.create_vm(t)
        slot = (1 << 16) | 3
        if vm.check_extension(KVM_CAP_MULTI_ADDRESS_SPACE) == 2:
            assert vm.set_user_memory_region(slot, 0, 0, P, 0) == 0
        else:
            assert t in (KVM_X86_SW_PROTECTED_VM, KVM_X86_SNP_VM, KVM_X86_TDX_VM)
            with raises_errno(errno.EINVAL):
                vm.set_user_memory_region(slot, 0, 0, P, 0)


def test_slot_changes(kvm):
    """Existing slots: moving and toggling LOG_DIRTY work; other changes are EINVAL."""
    vm = kvm.create_vm(KVM_X86_DEFAULT_VM)
    hva = kvm.mmap(4 * P)
    vm.set_user_memory_region(5, 0, G, 4 * P, hva)
    with raises_errno(errno.EINVAL):
        vm.set_user_memory_region(5, 0, G, 4 * P, hva + P)
    with raises_errno(errno.EINVAL):
        vm.set_user_memory_region(5, 0, G, 2 * P, hva)
    with raises_errno(errno.EINVAL):
        vm.set_user_memory_region(5, KVM_MEM_READONLY, G, 4 * P, hva)
    assert vm.set_user_memory_region(5, KVM_MEM_LOG_DIRTY_PAGES, G, 4 * P, hva) == 0
    assert vm.memslots[(0, 5)].dirty_bitmap is not None
    assert vm.set_user_memory_region(5, 0, 2 * G, 4 * P, hva) == 0          # move
    assert vm.memslots[(0, 5)].base_gfn == 2 * G >> 12
    assert vm.gfn_to_memslot(G >> 12) is None and vm.gfn_to_memslot(2 * G >> 12).id == 5
    vm.set_user_memory_region(6, 0, G, 4 * P, hva)
    with raises_errno(errno.EEXIST):
        vm.set_user_memory_region(6, 0, 2 * G + P, 4 * P, hva)


def test_gmem_slot_cannot_change_and_rebinds_after_delete(kvm):
    """A guest_memfd slot cannot be changed; after deletion its range can be bound again."""
    vm = kvm.create_vm(KVM_X86_SW_PROTECTED_VM)
    g = vm.create_guest_memfd(MB2)
    F = KVM_MEM_GUEST_MEMFD
    vm.set_user_memory_region2(1, F, G, MB2, 0, 0, g)
    with raises_errno(errno.EINVAL):
        vm.set_user_memory_region2(1, F, 2 * G, MB2, 0, 0, g)
    with raises_errno(errno.EINVAL):
        vm.set_user_memory_region2(1, 0, G, MB2, 0)
    vm.set_user_memory_region2(1, F, G, 0, 0, 0, -1)
    assert g.bindings == []
    assert vm.set_user_memory_region2(2, F, 2 * G, MB2, 0, 0, g) == 0


# --- memory attributes (kvm_vm_ioctl_set_mem_attributes, virt/kvm/kvm_main.c) --------------------------------

@pytest.mark.parametrize("t,supported", [(KVM_X86_DEFAULT_VM, 0), (KVM_X86_SW_PROTECTED_VM, 8),
                                         (KVM_X86_SEV_VM, 0), (KVM_X86_SEV_ES_VM, 0),
                                         (KVM_X86_SNP_VM, 8), (KVM_X86_TDX_VM, 8)])
def test_memory_attributes_capability(kvm, t, supported):
    """KVM_CAP_MEMORY_ATTRIBUTES is PRIVATE on /dev/kvm and on VMs with private memory only."""
    assert kvm.check_extension(KVM_CAP_MEMORY_ATTRIBUTES) == KVM_MEMORY_ATTRIBUTE_PRIVATE
    vm = kvm.create_vm(t)
    assert vm.check_extension(KVM_CAP_MEMORY_ATTRIBUTES) == supported
    if not supported:
        with raises_errno(errno.EINVAL):
            vm.set_memory_attributes(G, P, KVM_MEMORY_ATTRIBUTE_PRIVATE)
    assert vm.set_memory_attributes(G, P, 0) == 0


@pytest.mark.parametrize("address,size,attributes,flags", [
    (G, P, 0, 1),                                   # flags
    (G, P, 1 << 2, 0),                              # unsupported bit
    (G, P, KVM_MEMORY_ATTRIBUTE_PRIVATE | 1, 0),
    (G, 0, KVM_MEMORY_ATTRIBUTE_PRIVATE, 0),        # empty
    ((1 << 64) - P, 2 * P, KVM_MEMORY_ATTRIBUTE_PRIVATE, 0),   # wraps
    (G + 1, P, KVM_MEMORY_ATTRIBUTE_PRIVATE, 0),    # unaligned
    (G, P + 1, KVM_MEMORY_ATTRIBUTE_PRIVATE, 0),
])
def test_memory_attributes_checks(kvm, address, size, attributes, flags):
    """Each KVM_SET_MEMORY_ATTRIBUTES check is EINVAL and changes nothing."""
    vm = kvm.create_vm(KVM_X86_SW_PROTECTED_VM)
    vm.set_memory_attributes(0, 4 * P, KVM_MEMORY_ATTRIBUTE_PRIVATE)
    before = list(vm.private)
    with raises_errno(errno.EINVAL, "KVM_SET_MEMORY_ATTRIBUTES"):
        vm.set_memory_attributes(address, size, attributes, flags)
    assert list(vm.private) == before


def test_memory_attributes_need_no_memslot_and_convert_ranges(kvm):
    """Attributes are per gfn for the whole VM, settable without memslots, by whole ranges."""
    vm = kvm.create_vm(KVM_X86_SW_PROTECTED_VM)
    vm.set_memory_attributes(G, 16 * P, KVM_MEMORY_ATTRIBUTE_PRIVATE)
    vm.set_memory_attributes(G + 4 * P, 4 * P, 0)
    assert list(vm.private) == [(G >> 12, (G >> 12) + 4), ((G >> 12) + 8, (G >> 12) + 16)]
    assert vm.get_memory_attributes((G >> 12) + 9) == KVM_MEMORY_ATTRIBUTE_PRIVATE
    assert vm.get_memory_attributes((G >> 12) + 5) == 0


def test_zero_memory_regions(kvm):
    """test_zero_memory_regions: a vCPU with no guest code in a VM with no memslot runs into
    KVM_EXIT_INTERNAL_ERROR (emulation of the fetch at the reset vector fails); a memslot away
    from the reset vector does not change that."""
    vm = kvm.create_vm(KVM_X86_DEFAULT_VM)
    vcpu = vm.create_vcpu(0)
    run = vcpu.run()
    assert run.exit_reason == KVM_EXIT_INTERNAL_ERROR
    assert run.internal.suberror == KVM_INTERNAL_ERROR_EMULATION
    vm.set_user_memory_region(0, 0, 0, MB2, kvm.mmap(MB2))
    assert vcpu.run().exit_reason == KVM_EXIT_INTERNAL_ERROR
