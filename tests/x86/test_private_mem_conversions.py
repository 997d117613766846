"""Port of tools/testing/selftests/kvm/x86/private_mem_conversions_test.c.

The guest converts ranges between shared and private with KVM_HC_MAP_GPA_RANGE; the host
converts attributes (and allocates or punches guest_memfd) on each exit, and checks through the
memslots' HVAs that it only ever sees the shared data.
"""
import pytest

import sevcore
from sevcore.vmm.kvm_util import (addr_gpa2hva, kvm_vm_free, vm_create_with_vcpus,
                                  vm_guest_mem_fallocate, vm_set_memory_attributes)
from sevcore.uapi import *

BASE_DATA_SLOT = 10
BASE_DATA_GPA = 1 << 32
SZ_2M = 2 << 20
PER_CPU_DATA_SIZE = SZ_2M + PAGE_SIZE

SYNC_SHARED, SYNC_PRIVATE = 0, 1
# Arbitrary values, KVM doesn't care about the attribute flags.
MAP_GPA_SET_ATTRIBUTES = 1 << 0
MAP_GPA_SHARED = 1 << 1
MAP_GPA_DO_FALLOCATE = 1 << 2

TEST_RANGES = [(0, PAGE_SIZE), (0, SZ_2M), (PAGE_SIZE, PAGE_SIZE), (PAGE_SIZE, SZ_2M),
               (SZ_2M, PAGE_SIZE)]


# -- guest ------------------------------------------------------------------------------------------

def memset(g, gpa, pattern, size):
    yield g.write(gpa, bytes([pattern]) * size)


def memcmp_g(g, gpa, pattern, size):
    data = yield g.read(gpa, size)
    if data != bytes([pattern]) * size:
        i = next(i for i, b in enumerate(data) if b != pattern)
        raise AssertionError(f"Guest expected {pattern:#x} at offset {i} "
                             f"(gpa {gpa + i:#x}), got {data[i]:#x}")


def guest_sync_shared(g, gpa, size, cur, new):
    yield g.sync(SYNC_SHARED, gpa, size, cur, new)


def guest_sync_private(g, gpa, size, pattern):
    yield g.sync(SYNC_PRIVATE, gpa, size, pattern)


def guest_map_mem(g, gpa, size, map_shared, do_fallocate):
    flags = MAP_GPA_SET_ATTRIBUTES
    if map_shared:
        flags |= MAP_GPA_SHARED
    if do_fallocate:
        flags |= MAP_GPA_DO_FALLOCATE
    ret = yield g.hypercall(KVM_HC_MAP_GPA_RANGE, gpa, size >> PAGE_SHIFT, flags, 0)
    assert ret == 0, f"MAP_GPA_RANGE returned {ret}"


def guest_test_explicit_conversion(g, base_gpa, do_fallocate):
    def_p, init_p = 0xaa, 0xcc
    # Memory should be shared by default.
    yield from memset(g, base_gpa, def_p, PER_CPU_DATA_SIZE)
    yield from memcmp_g(g, base_gpa, def_p, PER_CPU_DATA_SIZE)
    yield from guest_sync_shared(g, base_gpa, PER_CPU_DATA_SIZE, def_p, init_p)
    yield from memcmp_g(g, base_gpa, init_p, PER_CPU_DATA_SIZE)

    for offset, size in TEST_RANGES:
        gpa = base_gpa + offset
        p1, p2, p3, p4 = 0x11, 0x22, 0x33, 0x44
        yield from memset(g, gpa, p1, size)
        yield from guest_map_mem(g, gpa, size, False, do_fallocate)
        if size > PAGE_SIZE:
            yield from memset(g, gpa, p2, PAGE_SIZE)
        else:
            yield from memset(g, gpa, p2, size)
            yield from guest_sync_private(g, gpa, size, p1)
            # The private data is pattern two; shared memory keeps the initial pattern.
            yield from memcmp_g(g, gpa, p2, size)
            if gpa > base_gpa:
                yield from memcmp_g(g, base_gpa, init_p, gpa - base_gpa)
            if gpa + size < base_gpa + PER_CPU_DATA_SIZE:
                yield from memcmp_g(g, gpa + size, init_p,
                                    base_gpa + PER_CPU_DATA_SIZE - (gpa + size))
            # Odd pages back to shared: holes in private ranges.
            for j in range(0, size, PAGE_SIZE):
                if (j >> PAGE_SHIFT) & 1:
                    yield from guest_map_mem(g, gpa + j, PAGE_SIZE, True, do_fallocate)
                    yield from guest_sync_shared(g, gpa + j, PAGE_SIZE, p1, p3)
                    yield from memcmp_g(g, gpa + j, p3, PAGE_SIZE)
                else:
                    yield from guest_sync_private(g, gpa + j, PAGE_SIZE, p1)
        # skip:
        yield from guest_map_mem(g, gpa, size, True, do_fallocate)
        yield from memset(g, gpa, p3, size)
        yield from guest_sync_shared(g, gpa, size, p3, p4)
        yield from memcmp_g(g, gpa, p4, size)
        yield from memset(g, gpa, init_p, size)
        # Free all private memory so the next iteration starts clean.
        yield from guest_map_mem(g, base_gpa, PER_CPU_DATA_SIZE, True, True)


def guest_punch_hole(g, gpa, size):
    # "Mapping" memory shared via fallocate() is done via PUNCH_HOLE.
    flags = MAP_GPA_SHARED | MAP_GPA_DO_FALLOCATE
    ret = yield g.hypercall(KVM_HC_MAP_GPA_RANGE, gpa, size >> PAGE_SHIFT, flags, 0)
    assert ret == 0


def guest_test_punch_hole(g, base_gpa, precise):
    init_p = 0xcc
    yield from guest_map_mem(g, base_gpa, PER_CPU_DATA_SIZE, False, False)
    for offset, size in TEST_RANGES:
        gpa = base_gpa + offset
        yield from guest_punch_hole(g, base_gpa, PER_CPU_DATA_SIZE)
        if precise:
            yield from memset(g, gpa, init_p, size)
            yield from memcmp_g(g, gpa, init_p, size)
        else:
            yield from memset(g, base_gpa, init_p, PER_CPU_DATA_SIZE)
            yield from memcmp_g(g, base_gpa, init_p, PER_CPU_DATA_SIZE)
        # Reads after a punch succeed and return zeroes.
        yield from guest_punch_hole(g, gpa, size)
        yield from memcmp_g(g, gpa, 0, size)


def guest_code(g, base_gpa):
    yield from guest_test_explicit_conversion(g, base_gpa, False)
    yield from guest_test_explicit_conversion(g, base_gpa, True)
    yield from guest_test_punch_hole(g, base_gpa, False)
    yield from guest_test_punch_hole(g, base_gpa, True)
    yield g.done()


# -- host -------------------------------------------------------------------------------------------

def handle_exit_hypercall(vcpu):
    run = vcpu.kvm_run
    gpa = run.hypercall.args[0]
    size = run.hypercall.args[1] * PAGE_SIZE
    set_attributes = run.hypercall.args[2] & MAP_GPA_SET_ATTRIBUTES
    map_shared = run.hypercall.args[2] & MAP_GPA_SHARED
    do_fallocate = run.hypercall.args[2] & MAP_GPA_DO_FALLOCATE
    vm = vcpu.vm
    assert run.hypercall.nr == KVM_HC_MAP_GPA_RANGE
    if do_fallocate:
        vm_guest_mem_fallocate(vm, gpa, size, map_shared)
    if set_attributes:
        vm_set_memory_attributes(vm, gpa, size, 0 if map_shared else KVM_MEMORY_ATTRIBUTE_PRIVATE)
    run.hypercall.ret = 0


def step(vcpu):
    """One KVM_RUN and its handling; False once the guest is done."""
    vm = vcpu.vm
    run = vcpu.run()
    if run.exit_reason == KVM_EXIT_HYPERCALL:
        handle_exit_hypercall(vcpu)
        return True
    assert run.exit_reason == KVM_EXIT_IO, run.exit_reason
    cmd, args = vcpu.get_ucall()
    if cmd == "done":
        return False
    assert cmd == "sync"
    sync, gpa, size, cur = args[:4]
    assert sync in (SYNC_SHARED, SYNC_PRIVATE)
    for i in range(0, size, PAGE_SIZE):
        n = min(PAGE_SIZE, size - i)
        hva = addr_gpa2hva(vm, gpa + i)
        # In all cases, the host observes the shared data.
        assert vm.kvm.read(hva, n) == bytes([cur]) * n, f"host: wrong data at gpa {gpa + i:#x}"
        if sync == SYNC_SHARED:
            vm.kvm.fill(hva, args[4], n)
    return True


def test_mem_conversions_and_gmem_outlives_vm(nr_vcpus, nr_memslots):
    """Explicit conversions and punch-holes behave as the selftest expects for each vCPU and
    memslot layout, and the guest_memfd stays usable after the VM fd is closed."""
    kvm = sevcore.Kvm()
    per_cpu_size = 4 << 20          # align_up(2 MiB + 4 KiB, 2 MiB)
    memfd_size = per_cpu_size * nr_vcpus
    slot_size = memfd_size // nr_memslots
    assert slot_size * nr_memslots == memfd_size
    vm, vcpus = vm_create_with_vcpus(kvm, KVM_X86_SW_PROTECTED_VM, nr_vcpus)
    vm.enable_cap(KVM_CAP_EXIT_HYPERCALL, 1 << KVM_HC_MAP_GPA_RANGE)
    memfd = vm.create_guest_memfd(memfd_size, 0)
    for i in range(nr_memslots):
        hva = kvm.mmap(slot_size)
        vm.set_user_memory_region2(BASE_DATA_SLOT + i, KVM_MEM_GUEST_MEMFD,
                                   BASE_DATA_GPA + slot_size * i, slot_size, hva,
                                   slot_size * i, memfd)
    for i, v in enumerate(vcpus):
        v.set_guest_code(guest_code, BASE_DATA_GPA + i * per_cpu_size)
    # The vCPUs run interleaved, one exit at a time each, as threads would.
    live = list(vcpus)
    while live:
        live = [v for v in live if step(v)]
    kvm_vm_free(vm)
    memfd.fallocate(FALLOC_FL_KEEP_SIZE | FALLOC_FL_PUNCH_HOLE, 0, memfd_size)
    memfd.fallocate(FALLOC_FL_KEEP_SIZE, 0, memfd_size)
    assert vm.alive
    memfd.close()
    assert not vm.alive


@pytest.fixture(params=[(1, 1), (2, 1), (2, 2)], ids=["1vcpu-1slot", "2vcpu-1slot", "2vcpu-2slot"])
def layout(request):
    return request.param


@pytest.fixture
def nr_vcpus(layout):
    return layout[0]


@pytest.fixture
def nr_memslots(layout):
    return layout[1]
