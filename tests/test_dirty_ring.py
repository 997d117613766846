"""KVM's dirty ring: KVM_CAP_DIRTY_LOG_RING(_ACQ_REL), the ring mapped from the vCPU fd, the
DIRTY/RESET protocol, KVM_RESET_DIRTY_RINGS and KVM_EXIT_DIRTY_RING_FULL (virt/kvm/dirty_ring.c,
kvm_vm_ioctl_enable_dirty_log_ring and kvm_vcpu_mmap in virt/kvm/kvm_main.c; the ring mode of
tools/testing/selftests/kvm/dirty_log_test.c)."""
import mmap
import struct
from errno import E2BIG, EINVAL, ENXIO

import numpy as np
import pytest
from hypothesis import given, settings, strategies as st

import sevcore
from sevcore._reference import dirty_ring as ref
from sevcore.core.dirty_ring import DirtyRingBuffer, collect, entries
from sevcore.core.npt import NPT_DIRTY_LOG, NPT_WRITABLE, Npt
from sevcore.core.pages import GuestPageOps
from sevcore.errors import NotModelled, SigBus
from sevcore.vmm.dirty_ring import DirtyRings
from sevcore.vmm.kvm_util import vm_mem_add
from sevcore.uapi import *

from support import raises_errno

GPA = 1 << 30
NPAGES = 512
SLOT = 1
RING = 4096                     # 256 entries, soft limit 192
SOFT = RING // 16 - KVM_DIRTY_RING_RSVD_ENTRIES


def ring_vm(size=RING, cap=KVM_CAP_DIRTY_LOG_RING, logging=True):
    """A DEFAULT VM with a ring of ``size`` bytes, a logging slot at GPA and vCPU 0."""
    kvm = sevcore.Kvm()
    vm = kvm.create_vm(KVM_X86_DEFAULT_VM)
    vm.enable_cap(cap, size)
    vm_mem_add(vm, 0, 0, 16)
    vm_mem_add(vm, GPA, SLOT, NPAGES, KVM_MEM_LOG_DIRTY_PAGES if logging else 0)
    return kvm, vm, vm.create_vcpu(0)


def run_guest(vcpu, *ops):
    """Run ``ops`` (each ``g -> operation``) then a sync; the exits on the way."""
    def guest(g):
        for op in ops:
            yield op(g)
        yield g.sync()
    vcpu.set_guest_code(guest)
    return vcpu.run().exit_reason


def raw_entries(kvm, hva, n):
    """The first ``n`` struct kvm_dirty_gfn of the mapping at ``hva``, as the VMM reads them."""
    data = kvm.read(hva, 16 * n)
    return [struct.unpack_from("<IIQ", data, 16 * i) for i in range(n)]


def test_check_extension_reports_the_largest_ring():
    """Both ring flavours report 64K entries of 16 bytes; ring-with-bitmap is 0 on x86."""
    kvm = sevcore.Kvm()
    vm = kvm.create_vm(KVM_X86_DEFAULT_VM)
    for k in (kvm, vm):
        assert k.check_extension(KVM_CAP_DIRTY_LOG_RING) == 1 << 20
        assert k.check_extension(KVM_CAP_DIRTY_LOG_RING_ACQ_REL) == 1 << 20
        assert k.check_extension(KVM_CAP_DIRTY_LOG_RING_WITH_BITMAP) == 0


@pytest.mark.parametrize("size,err", [
    (0, EINVAL), (4096 + 16, EINVAL), (3 * 4096, EINVAL),      # not a power of two
    (2048, EINVAL), (1024, EINVAL),                           # below a page
    (2 << 20, E2BIG), (1 << 31, E2BIG),                       # above 64K entries
])
def test_enable_refuses_bad_sizes(size, err):
    """kvm_vm_ioctl_enable_dirty_log_ring: a size that is no power of two or below a page is
    EINVAL, one above the largest ring E2BIG, and the VM keeps no ring."""
    vm = sevcore.Kvm().create_vm(KVM_X86_DEFAULT_VM)
    with raises_errno(err, "KVM_ENABLE_CAP"):
        vm.enable_cap(KVM_CAP_DIRTY_LOG_RING, size)
    assert vm.dirty_ring_size == 0 and vm.create_vcpu(0).dirty_ring is None


def test_enable_once_before_vcpus_and_flags_ignored():
    """The size is set once and only before any vCPU exists (EINVAL otherwise); the u32
    parameter drops args[0]'s upper half and flags are not looked at, while ring-with-bitmap
    is EINVAL on x86."""
    vm = sevcore.Kvm().create_vm(KVM_X86_DEFAULT_VM)
    with raises_errno(EINVAL):
        vm.enable_cap(KVM_CAP_DIRTY_LOG_RING_WITH_BITMAP)
    assert vm.enable_cap(KVM_CAP_DIRTY_LOG_RING_ACQ_REL, (1 << 32) | 8192, flags=1) == 0
    assert vm.dirty_ring_size == 8192
    with raises_errno(EINVAL):
        vm.enable_cap(KVM_CAP_DIRTY_LOG_RING, 8192)
    with raises_errno(EINVAL):
        vm.enable_cap(KVM_CAP_DIRTY_LOG_RING_WITH_BITMAP)
    late = sevcore.Kvm().create_vm(KVM_X86_DEFAULT_VM)
    late.create_vcpu(0)
    with raises_errno(EINVAL):
        late.enable_cap(KVM_CAP_DIRTY_LOG_RING, 8192)
    assert late.dirty_ring_size == 0
    assert vm.create_vcpu(0).dirty_ring.size == 512


def test_bitmap_ioctls_are_enxio_with_a_ring_and_reset_einval_without():
    """With a ring the slot keeps no bitmap and GET/CLEAR_DIRTY_LOG are ENXIO
    (kvm_use_dirty_bitmap); KVM_RESET_DIRTY_RINGS without a ring is EINVAL."""
    kvm, vm, vcpu = ring_vm()
    assert vm.memslots[(0, SLOT)].dirty_bitmap is None
    with raises_errno(ENXIO, "KVM_GET_DIRTY_LOG"):
        vm.get_dirty_log(SLOT)
    with raises_errno(ENXIO, "KVM_CLEAR_DIRTY_LOG"):
        vm.clear_dirty_log(SLOT, 0, 64, np.zeros(1, np.uint64))
    plain = sevcore.Kvm().create_vm(KVM_X86_DEFAULT_VM)
    with raises_errno(EINVAL, "KVM_RESET_DIRTY_RINGS"):
        plain.reset_dirty_rings()


def test_push_collect_reset_protocol():
    """A guest write pushes (DIRTY, slot, offset) once per page until the VMM marks the entry
    RESET and resets the rings, which frees the entry (flags 0) and makes the next write to the
    page push again; unlogged slots and reads push nothing."""
    kvm, vm, vcpu = ring_vm()
    hva = vcpu.mmap(RING, mmap.MAP_SHARED, KVM_DIRTY_LOG_PAGE_OFFSET * PAGE_SIZE)
    w = lambda p: lambda g: g.write(GPA + p * PAGE_SIZE + 8, b"xyz")   # noqa: E731
    assert run_guest(vcpu, w(3), w(7), w(3), w(9), lambda g: g.read(GPA + 20 * PAGE_SIZE, 8),
                     lambda g: g.write(0x1000, b"unlogged")) == KVM_EXIT_IO
    assert raw_entries(kvm, hva, 4) == [(1, SLOT, 3), (1, SLOT, 7), (1, SLOT, 9), (0, 0, 0)]
    assert vm.reset_dirty_rings() == 0                  # nothing collected yet
    kvm.write(hva, struct.pack("<I", KVM_DIRTY_GFN_F_RESET))       # collect entry 0 only
    assert vm.reset_dirty_rings() == 1
    assert raw_entries(kvm, hva, 3) == [(0, SLOT, 3), (1, SLOT, 7), (1, SLOT, 9)]
    run_guest(vcpu, w(3), w(7), w(3))                   # 3 pushes again, 7 does not
    assert raw_entries(kvm, hva, 5) == [(0, SLOT, 3), (1, SLOT, 7), (1, SLOT, 9),
                                        (1, SLOT, 3), (0, 0, 0)]
    assert vcpu.dirty_ring.used == 3


def test_bulk_writes_push_each_page_once():
    """A bulk write over many pages pushes every logged page once, in order, whatever the
    page kernel batches."""
    kvm, vm, vcpu = ring_vm(size=1 << 16)
    rings = DirtyRings(vm)
    assert run_guest(vcpu, lambda g: g.fill(GPA, 100, 5), lambda g: g.fill(GPA, 100, 6)) == \
        KVM_EXIT_IO
    got = rings.collect()
    assert got.tolist() == list(range(GPA >> 12, (GPA >> 12) + 100))


def test_soft_full_exits_until_reset_and_the_guest_finishes():
    """Pushes that bring the ring to its soft limit end KVM_RUN with KVM_EXIT_DIRTY_RING_FULL
    before the pushing write is done; KVM_RUN keeps exiting while the ring is soft-full, and
    after collect and reset the guest completes with every page dirtied collected and its
    data in place."""
    kvm, vm, vcpu = ring_vm()
    rings = DirtyRings(vm)

    def guest(g):
        yield g.write_pattern(GPA, 300, 11)
        yield g.sync()
    vcpu.set_guest_code(guest)
    assert vcpu.run().exit_reason == KVM_EXIT_DIRTY_RING_FULL
    assert vcpu.dirty_ring.used == SOFT
    frozen = kvm.read(vm.memslots[(0, SLOT)].userspace_addr + (SOFT - 1) * PAGE_SIZE, 8)
    assert frozen == bytes(8)                            # the pushing write waits
    assert vcpu.run().exit_reason == KVM_EXIT_DIRTY_RING_FULL
    seen, exits = [], 0
    while vcpu.run().exit_reason == KVM_EXIT_DIRTY_RING_FULL or not seen:
        exits += 1
        seen.append(rings.harvest())
        if vcpu.kvm_run.exit_reason == KVM_EXIT_IO:
            break
    seen.append(rings.harvest())
    assert vcpu.get_ucall() == ("sync", ())
    assert np.unique(np.concatenate(seen)).tolist() == list(range(GPA >> 12, (GPA >> 12) + 300))

    vcpu.set_guest_code(lambda g: (yield g.sync((yield g.check_pattern(GPA, 300, 11)))))
    vcpu.run()
    assert vcpu.get_ucall()[1][0][0] == 0


def test_partial_write_that_fills_the_ring_waits():
    """A sub-page write whose push reaches the soft limit exits before storing, and stores on
    the next KVM_RUN after a reset, pushing the page again as the reset protected it."""
    kvm, vm, vcpu = ring_vm()
    rings = DirtyRings(vm)

    def guest(g):
        for p in range(SOFT):
            yield g.write(GPA + p * PAGE_SIZE + 1, b"\x01")
        yield g.sync()
    vcpu.set_guest_code(guest)
    assert vcpu.run().exit_reason == KVM_EXIT_DIRTY_RING_FULL
    last = vm.memslots[(0, SLOT)].userspace_addr + (SOFT - 1) * PAGE_SIZE
    assert kvm.read(last, 2) == b"\0\0"
    assert len(rings.harvest()) == SOFT
    assert vcpu.run().exit_reason == KVM_EXIT_IO and kvm.read(last, 2) == b"\0\x01"
    assert vcpu.dirty_ring.used == 1
    assert rings.collect().tolist() == [(GPA >> 12) + SOFT - 1]


def test_vcpu_mmap_rules():
    """The ring maps only MAP_SHARED and not executable (EINVAL); its pages are the ring's,
    the kvm_run pages are not modelled as memory, and other offsets are SIGBUS."""
    kvm, vm, vcpu = ring_vm()
    off = KVM_DIRTY_LOG_PAGE_OFFSET * PAGE_SIZE
    with pytest.raises(OSError) as e:
        vcpu.mmap(RING, mmap.MAP_PRIVATE, off)
    assert e.value.errno == EINVAL
    with pytest.raises(OSError) as e:
        vcpu.mmap(PAGE_SIZE, mmap.MAP_SHARED, off, prot=mmap.PROT_READ | mmap.PROT_EXEC)
    assert e.value.errno == EINVAL
    hva = vcpu.mmap(PAGE_SIZE * 4, mmap.MAP_SHARED, 0)
    with pytest.raises(NotModelled):
        kvm.read(hva, 8)
    with pytest.raises(SigBus):
        kvm.read(hva + 3 * PAGE_SIZE, 8)
    past = vcpu.mmap(PAGE_SIZE, mmap.MAP_SHARED, off + RING)
    with pytest.raises(SigBus):
        kvm.read(past, 8)


def test_ring_mapping_keeps_the_vm_and_reset_ignores_forged_entries():
    """A mapping of the ring holds the VM after every fd is closed; an entry the VMM forged
    (a slot or an offset outside the memslots) is freed by the reset and protects nothing."""
    kvm, vm, vcpu = ring_vm()
    hva = vcpu.mmap(RING, mmap.MAP_SHARED, KVM_DIRTY_LOG_PAGE_OFFSET * PAGE_SIZE)
    run_guest(vcpu, lambda g: g.write(GPA, b"a"))
    vcpu.dirty_ring.push(SLOT, 1)     # a second entry for the test to forge
    kvm.write(hva, struct.pack("<IIQ", KVM_DIRTY_GFN_F_RESET, 77, 0))
    kvm.write(hva + 16, struct.pack("<IIQ", KVM_DIRTY_GFN_F_RESET, SLOT, NPAGES + 5))
    before = vm.npt.lookup(GPA >> 12)
    assert vm.reset_dirty_rings() == 2
    assert vm.npt.lookup(GPA >> 12) == before
    vcpu.close()
    vm.close()
    assert vm.alive
    kvm.munmap(hva, RING)
    assert not vm.alive


# -- the C loops against their twins --------------------------------------------------------------

flags_st = st.sampled_from([0, 0, KVM_DIRTY_GFN_F_DIRTY, KVM_DIRTY_GFN_F_DIRTY,
                            KVM_DIRTY_GFN_F_RESET, KVM_DIRTY_GFN_F_RESET, 3])
entry_st = st.tuples(flags_st, st.sampled_from([1, 2, 3, (1 << 16) | 1]),
                     st.one_of(st.integers(0, 300), st.integers(0, (1 << 64) - 1)))


N = 64                          # entries of the rings below


@settings(max_examples=60, deadline=None)
@given(ents=st.lists(entry_st, min_size=N, max_size=N),
       fetch=st.one_of(st.integers(0, 200), st.integers((1 << 32) - 100, (1 << 32) - 1)),
       cap=st.integers(0, 80))
def test_collect_matches_reference(ents, fetch, cap):
    """sc_dirty_ring_collect takes the same entries, marks the same RESET and advances the
    fetch index (wrapping at 2^32) as the Python twin."""
    mem = np.zeros(N * 16, np.uint8)
    e = entries(mem)
    e[:] = np.array(ents, dtype=e.dtype)
    model = [list(x) for x in ents]
    idx = np.array([fetch], np.uint32)
    slots, offsets = collect(mem, N, idx, cap)
    want_slots, want_offsets, want_idx = ref.collect(model, fetch, cap)
    assert slots.tolist() == want_slots and offsets.tolist() == want_offsets
    assert int(idx[0]) == want_idx
    assert [tuple(int(v) for v in x) for x in e] == [tuple(x) for x in model]


@settings(max_examples=60, deadline=None)
@given(ents=st.lists(entry_st, min_size=N, max_size=N),
       start=st.one_of(st.integers(0, 200), st.integers((1 << 32) - 100, (1 << 32) - 1)),
       runs=st.lists(st.tuples(st.integers(0, 300), st.integers(1, 40)), max_size=4))
def test_reset_matches_reference(ents, start, runs):
    """sc_dirty_ring_reset frees the same entries and write-protects the same gfns as the
    Python twin, batches, forged slots and offsets near 2^64 included."""
    # Runs of consecutive offsets, forwards and backwards, make the batching interesting.
    ents = list(ents)
    pos = start % N
    for first, n in runs:
        step = 1 if n % 2 else -1
        for k in range(n):
            ents[pos % N] = (KVM_DIRTY_GFN_F_RESET, 1, max(first + step * k, 0))
            pos += 1
    mem = np.zeros(N * 16, np.uint8)
    ring = DirtyRingBuffer(mem, N, N - 16)
    ring.entries[:] = np.array(ents, dtype=ring.entries.dtype)
    ring.cdata().reset_index = start
    slots = {1: (0x1000, 200), 2: (0x2000, 64), (1 << 16) | 1: (0x3000, 300)}
    npt = Npt()
    for base, n in slots.values():
        npt.map(base, 0x100, NPT_WRITABLE, npages=n)
    ops = GuestPageOps(npt, np.zeros(PAGE_SIZE * 2, np.uint8))
    ops.set_dirty_slots(sorted((b, n, None, i) for i, (b, n) in slots.items()))
    count = ops.reset_ring(ring)
    model = [list(x) for x in ents]
    protected = set()
    want_count, want_idx = ref.reset(model, start, slots, protected)
    assert count == want_count and ring.reset_index == want_idx
    got = set()
    for base, n in slots.values():
        gfns = np.arange(base, base + n, dtype=np.uint64)
        _, flags = npt.lookup_batch(gfns, with_flags=True)
        got |= set(gfns[(flags & np.uint64(NPT_DIRTY_LOG)) != 0].tolist())
    assert got == protected
    assert [int(x["flags"]) for x in ring.entries] == [x[0] for x in model]
    ops.close()
    ring.close()
    npt.close()
