"""Port of tools/testing/selftests/kvm/guest_memfd_test.c,
run for every VM type in KVM_CAP_VM_TYPES and every supported flag set."""
import errno

import pytest

import sevcore
from sevcore.errors import SigBus
from sevcore.kvm.guest_memfd import MAP_PRIVATE, MAP_SHARED
from sevcore.uapi import *

from support import raises_errno

P = PAGE_SIZE
KEEP = FALLOC_FL_KEEP_SIZE
PUNCH = FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE


def vm_types():
    kvm = sevcore.Kvm()
    mask = kvm.check_extension(KVM_CAP_VM_TYPES)
    return [t for t in range(32) if mask & (1 << t)]


def flag_sets(vm):
    valid = vm.check_extension(KVM_CAP_GUEST_MEMFD_FLAGS)
    sets = [0]
    if valid & GUEST_MEMFD_FLAG_MMAP:
        sets.append(GUEST_MEMFD_FLAG_MMAP)
    if valid & GUEST_MEMFD_FLAG_INIT_SHARED:
        sets.append(GUEST_MEMFD_FLAG_MMAP | GUEST_MEMFD_FLAG_INIT_SHARED)
    return sets


CASES = [(t, f) for t in vm_types() for f in flag_sets(sevcore.Kvm().create_vm(t))]


@pytest.fixture(params=vm_types())
def vm(request):
    return sevcore.Kvm().create_vm(request.param)


@pytest.fixture(params=CASES, ids=[f"type{t}-flags{f}" for t, f in CASES])
def vm_flags(request):
    t, f = request.param
    return sevcore.Kvm().create_vm(t), f


def test_flags_walk_every_bit(vm):
    """test_guest_memfd_flags: each single flag bit is accepted iff KVM_CAP_GUEST_MEMFD_FLAGS
    has it, else EINVAL."""
    valid = vm.check_extension(KVM_CAP_GUEST_MEMFD_FLAGS)
    private = vm.type in (KVM_X86_SW_PROTECTED_VM, KVM_X86_SNP_VM, KVM_X86_TDX_VM)
    assert valid == (GUEST_MEMFD_FLAG_MMAP if private
                     else GUEST_MEMFD_FLAG_MMAP | GUEST_MEMFD_FLAG_INIT_SHARED)
    for i in range(64):
        if valid & (1 << i):
            vm.create_guest_memfd(P, 1 << i).close()
        else:
            with raises_errno(errno.EINVAL, "KVM_CREATE_GUEST_MEMFD"):
                vm.create_guest_memfd(P, 1 << i)


def test_several_files(vm_flags):
    """test_create_guest_memfd_multiple: files have their own sizes and inodes."""
    vm, flags = vm_flags
    fd1 = vm.create_guest_memfd(P, flags)
    fd2 = vm.create_guest_memfd(2 * P, flags)
    assert fd1.fstat().st_size == P and fd2.fstat().st_size == 2 * P
    assert fd1.fstat().st_ino != fd2.fstat().st_ino


def test_invalid_sizes(vm_flags):
    """test_create_guest_memfd_invalid_sizes: sizes 1..P-1 (and 0) are EINVAL."""
    vm, flags = vm_flags
    for size in [0, 1, 2, P // 2, P - 1, P + 1]:
        with raises_errno(errno.EINVAL):
            vm.create_guest_memfd(size, flags)


def test_no_read_or_write(vm_flags):
    """test_file_read_write: read, write, pread and pwrite fail with EINVAL."""
    vm, flags = vm_flags
    fd = vm.create_guest_memfd(4 * P, flags)
    with raises_errno(errno.EINVAL):
        fd.read(P)
    with raises_errno(errno.EINVAL):
        fd.write(b"x" * P)
    with raises_errno(errno.EINVAL):
        fd.pread(P, 0)
    with raises_errno(errno.EINVAL):
        fd.pwrite(b"x" * P, 0)
    with raises_errno(errno.EINVAL):
        fd.ftruncate(8 * P)


def test_mmap_rules(vm_flags):
    """test_mmap_not_supported, test_mmap_cow, test_fault_private: no MMAP flag: ENODEV;
    MAP_PRIVATE: EINVAL; private pages SIGBUS on touch."""
    vm, flags = vm_flags
    fd = vm.create_guest_memfd(4 * P, flags)
    if not flags & GUEST_MEMFD_FLAG_MMAP:
        with raises_errno(errno.ENODEV):
            fd.mmap(P, MAP_SHARED)
        with raises_errno(errno.ENODEV):
            fd.mmap(4 * P, MAP_SHARED)
        return
    with raises_errno(errno.EINVAL):
        fd.mmap(4 * P, MAP_PRIVATE)
    hva = fd.mmap(4 * P, MAP_SHARED)
    if not flags & GUEST_MEMFD_FLAG_INIT_SHARED:
        with pytest.raises(SigBus):
            vm.kvm.write(hva, b"\x01")
        with pytest.raises(SigBus):
            vm.kvm.read(hva, 1)
        assert len(fd.page_cache) == 0      # the host never got a private page


SHARED_CASES = [t for t in vm_types()
                if sevcore.Kvm().create_vm(t).check_extension(KVM_CAP_GUEST_MEMFD_FLAGS)
                & GUEST_MEMFD_FLAG_INIT_SHARED]


@pytest.fixture(params=SHARED_CASES, ids=[f"type{t}" for t in SHARED_CASES])
def shared_gmem(request):
    """A VM whose guest_memfd can be MMAP|INIT_SHARED, with one such 4-page file."""
    vm = sevcore.Kvm().create_vm(request.param)
    return vm, vm.create_guest_memfd(4 * P, GUEST_MEMFD_FLAG_MMAP | GUEST_MEMFD_FLAG_INIT_SHARED)


def test_shared_mmap_and_punch(shared_gmem):
    """test_mmap_supported: an INIT_SHARED mapping reads back what was written; a punched page
    reads zero."""
    vm, fd = shared_gmem
    hva = fd.mmap(4 * P, MAP_SHARED)
    vm.kvm.fill(hva, 0xaa, 4 * P)
    assert vm.kvm.read(hva, 4 * P) == b"\xaa" * (4 * P)
    assert fd.fallocate(PUNCH, 0, P) == 0
    assert vm.kvm.read(hva, P) == bytes(P)
    assert vm.kvm.read(hva + P, 3 * P) == b"\xaa" * (3 * P)
    vm.kvm.fill(hva, 0x55, P)
    assert vm.kvm.read(hva, P) == b"\x55" * P
    vm.kvm.munmap(hva, 4 * P)


def test_faults_past_end_of_file(shared_gmem):
    """test_fault_overflow: a mapping longer than the file SIGBUSes past the end; the file part
    holds data."""
    vm, fd = shared_gmem
    hva = fd.mmap(16 * P, MAP_SHARED)
    with pytest.raises(SigBus):
        vm.kvm.fill(hva, 0xaa, 16 * P)
    with pytest.raises(SigBus):
        vm.kvm.read(hva + 4 * P, 1)
    assert vm.kvm.read(hva, 4 * P) == b"\xaa" * (4 * P)


def test_file_size(vm_flags):
    """test_file_size: st_size is the size, st_blksize the page size."""
    vm, flags = vm_flags
    st = vm.create_guest_memfd(4 * P, flags).fstat()
    assert st.st_size == 4 * P and st.st_blksize == P


@pytest.mark.parametrize("mode,off,length,ok", [
    (KEEP, 0, 4 * P, True),
    (PUNCH, P - 1, P, False),
    (KEEP, 4 * P, P, False),
    (KEEP, 5 * P, P, False),
    (PUNCH, 4 * P, P, True),
    (PUNCH, 5 * P, P, True),
    (PUNCH, P, P - 1, False),
    (PUNCH, P, P, True),
    (KEEP, P, P, True),
])
def test_fallocate_table(vm_flags, mode, off, length, ok):
    """test_fallocate: the fallocate table of a 4-page file, in the selftest's order."""
    vm, flags = vm_flags
    fd = vm.create_guest_memfd(4 * P, flags)
    if ok:
        assert fd.fallocate(mode, off, length) == 0
    else:
        with raises_errno(errno.EINVAL):
            fd.fallocate(mode, off, length)


@pytest.mark.parametrize("off,length", [(0, 1), (0, P - 1), (0, P + 1), (1, 1), (1, P - 1),
                                        (1, P), (1, P + 1), (P, 1), (P, P - 1), (P, P + 1)])
def test_invalid_punch_ranges(vm_flags, off, length):
    """test_invalid_punch_hole: unaligned punch ranges are EINVAL."""
    vm, flags = vm_flags
    with raises_errno(errno.EINVAL):
        vm.create_guest_memfd(4 * P, flags).fallocate(PUNCH, off, length)


def test_fallocate_modes(vm):
    """Without KEEP_SIZE, or with another mode bit, fallocate is EOPNOTSUPP."""
    fd = vm.create_guest_memfd(4 * P)
    with raises_errno(errno.EOPNOTSUPP):
        fd.fallocate(0, 0, P)
    with raises_errno(errno.EOPNOTSUPP):
        fd.fallocate(FALLOC_FL_PUNCH_HOLE, 0, P)
    with raises_errno(errno.EOPNOTSUPP):
        fd.fallocate(KEEP | 0x10, 0, P)


def test_allocate_and_punch_move_host_frames(vm):
    """fallocate allocates one zeroed host frame per page once; punching returns them."""
    host = vm.host
    fd = vm.create_guest_memfd(8 * P)
    before = host.mem.allocated
    fd.fallocate(KEEP, 0, 4 * P)
    fd.fallocate(KEEP, 0, 4 * P)
    assert host.mem.allocated - before == 4
    fd.fallocate(PUNCH, P, 2 * P)
    assert host.mem.allocated - before == 2 and fd.page_cache.items()[0].tolist() == [0, 3]
    fd.close()
    assert host.mem.allocated == before


def test_guest_memfd_keeps_the_vm_alive():
    """x86/private_mem_conversions_test.c, end of test_mem_conversions: closing the VM fd keeps
    the VM while a guest_memfd is open; fallocate still works."""
    vm = sevcore.Kvm().create_vm(KVM_X86_SW_PROTECTED_VM)
    fd = vm.create_guest_memfd(4 * P)
    vm.close()
    assert vm.alive
    with raises_errno(errno.EBADF):
        vm.create_guest_memfd(P)
    assert fd.fallocate(PUNCH, 0, 4 * P) == 0
    assert fd.fallocate(KEEP, 0, 4 * P) == 0
    fd.close()
    assert not vm.alive


def test_file_beyond_256_tib():
    """Pages of a file larger than 2**36 pages are allocated, found and freed on both sides of
    the 2**36th page, by fallocate and by a guest fault through a slot bound there."""
    vm = sevcore.Kvm().create_vm(KVM_X86_SW_PROTECTED_VM)
    host = vm.host
    before = host.mem.allocated
    fd = vm.create_guest_memfd(1 << 50)
    edge = 1 << 48                          # byte offset of page 2**36
    assert fd.fallocate(KEEP, edge - P, 2 * P) == 0
    assert fd.page_cache.items()[0].tolist() == [(edge >> 12) - 1, edge >> 12]
    hva = vm.kvm.mmap(P)
    vm.set_user_memory_region2(1, KVM_MEM_GUEST_MEMFD, 1 << 32, P, hva, edge + P, fd)
    vm.set_memory_attributes(1 << 32, P, KVM_MEMORY_ATTRIBUTE_PRIVATE)
    vcpu = vm.create_vcpu(0)

    def guest(g):
        yield g.write(1 << 32, b"far")
        yield g.sync((yield g.read(1 << 32, 3)))
    vcpu.set_guest_code(guest)
    vcpu.run()
    assert vcpu.get_ucall() == ("sync", (b"far",))
    assert fd.page_cache.lookup((edge >> 12) + 1) == vm.npt.lookup(1 << 20)[0]
    assert host.mem.allocated - before == 3
    assert fd.fallocate(PUNCH, edge, 1 << 40) == 0
    assert fd.page_cache.items()[0].tolist() == [(edge >> 12) - 1]
    fd.close()
    assert host.mem.allocated == before


def test_fallocate_beyond_host_memory_is_enomem():
    """An allocation larger than the free host frames fails with ENOMEM and allocates nothing."""
    host = sevcore.Host(memory_size=8 << 20)
    vm = host.kvm.create_vm(KVM_X86_SW_PROTECTED_VM)
    fd = vm.create_guest_memfd(1 << 40)
    fd.fallocate(KEEP, 0, 4 * P)
    before = host.mem.allocated
    with raises_errno(errno.ENOMEM, "fallocate"):
        fd.fallocate(KEEP, 0, 1 << 40)
    assert host.mem.allocated == before and len(fd.page_cache) == 4


ALL_MODES = [0, KEEP, FALLOC_FL_PUNCH_HOLE, PUNCH, KEEP | FALLOC_FL_ZERO_RANGE,
             FALLOC_FL_COLLAPSE_RANGE, KEEP | FALLOC_FL_NO_HIDE_STALE, 0x100, -1]


BAD_RANGES = [(0, 0), (P, 0), (0, -P), (-P, P), (-P, 0), (-1, -1)]


def test_fallocate_bad_range_is_einval_first(vm):
    """A negative offset or a length <= 0 is EINVAL whatever the mode: vfs_fallocate (fs/open.c)
    checks them before any mode check."""
    fd = vm.create_guest_memfd(4 * P)
    for mode in ALL_MODES:
        for off, length in BAD_RANGES:
            with raises_errno(errno.EINVAL, "fallocate"):
                fd.fallocate(mode, off, length)
    fd.close()
    for mode in ALL_MODES:                   # fdget comes first of all
        for off, length in BAD_RANGES:
            with raises_errno(errno.EBADF):
                fd.fallocate(mode, off, length)


@pytest.mark.parametrize("mode,err", [
    (KEEP, errno.EFBIG), (PUNCH, errno.EFBIG),
    (0, errno.EFBIG),                               # the VFS allocates; guest_memfd refuses later
    (KEEP | FALLOC_FL_ZERO_RANGE, errno.EFBIG),
    (FALLOC_FL_PUNCH_HOLE, errno.EOPNOTSUPP),       # the VFS's own mode checks come first
    (KEEP | FALLOC_FL_NO_HIDE_STALE, errno.EOPNOTSUPP),
    (KEEP | FALLOC_FL_COLLAPSE_RANGE, errno.EOPNOTSUPP),
    (FALLOC_FL_PUNCH_HOLE | FALLOC_FL_ZERO_RANGE | KEEP, errno.EOPNOTSUPP),
])
def test_fallocate_past_max_file_size(vm, mode, err):
    """offset + len beyond MAX_LFS_FILESIZE is EFBIG after vfs_fallocate's mode checks and before
    kvm_gmem_fallocate's (which refuses the modes the VFS lets through)."""
    fd = vm.create_guest_memfd(4 * P)
    with raises_errno(err):
        fd.fallocate(mode, P, MAX_LFS_FILESIZE)
    with raises_errno(err):
        fd.fallocate(mode, MAX_LFS_FILESIZE - P + 1, P)
    assert len(fd.page_cache) == 0


@pytest.mark.parametrize("args,exc", [((KEEP, 0.0, P), TypeError), ((KEEP, 0, None), TypeError),
                                      ((True, 0, P), TypeError), ((KEEP, 0, 1 << 63), ValueError),
                                      ((KEEP, -(1 << 63) - 1, P), ValueError),
                                      ((1 << 31, 0, P), ValueError)])
def test_fallocate_arguments_that_are_no_loff_t(vm, args, exc):
    """An argument that fallocate(2) cannot receive (not an int, or outside int / loff_t) is a
    TypeError or ValueError, and nothing is allocated."""
    fd = vm.create_guest_memfd(4 * P)
    with pytest.raises(exc):
        fd.fallocate(*args)
    assert len(fd.page_cache) == 0
