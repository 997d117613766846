"""VMM page gather/scatter (Kvm.read_pages / write_pages), the live guest TSC, and the list
forms of the pattern operations."""
from errno import EFAULT

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import sevcore
from sevcore.vmm.kvm_util import vm_mem_add, vm_create_with_vcpus
from sevcore.uapi import (GUEST_MEMFD_FLAG_INIT_SHARED, GUEST_MEMFD_FLAG_MMAP,
                          KVM_X86_DEFAULT_VM, MSR_IA32_TSC)

PAGE = 4096


def test_read_write_pages_round_trip_and_untouched_zero():
    """Scattered pages written by write_pages come back from read_pages; untouched read zero."""
    kvm = sevcore.Kvm()
    base = kvm.mmap(64 * PAGE)
    hvas = np.array([base + 5 * PAGE, base + 2 * PAGE, base + 63 * PAGE], np.uint64)
    data = np.random.default_rng(1).integers(0, 256, (3, PAGE), dtype=np.uint8)
    kvm.write_pages(hvas, data)
    assert np.array_equal(kvm.read_pages(hvas), data)
    assert kvm.read(base + 2 * PAGE, PAGE) == data[1].tobytes()
    assert not kvm.read_pages([base + 7 * PAGE]).any()
    assert kvm.hva_to_pfn(base + 7 * PAGE, False, allocate=False) is None


def test_page_lists_refuse_bad_input_and_write_nothing():
    """Unaligned, out-of-mapping or wrongly sized input is a ValueError before any write."""
    kvm = sevcore.Kvm()
    base = kvm.mmap(4 * PAGE)
    with pytest.raises(ValueError):
        kvm.read_pages([base + 1])
    with pytest.raises(ValueError):
        kvm.write_pages([base, base + 8 * PAGE], bytes(2 * PAGE))
    with pytest.raises(ValueError):
        kvm.write_pages([base], bytes(PAGE - 1))
    assert kvm.hva_to_pfn(base, False, allocate=False) is None
    assert kvm.read_pages([]).shape == (0, PAGE)


def test_guest_tsc_follows_simulated_clock():
    """IA32_TSC counts the Host's simulated nanoseconds; a write sets the guest's offset."""
    kvm = sevcore.Kvm()

    def guest(g):
        a = yield g.rdmsr(MSR_IA32_TSC)
        yield g.sync(a)
        b = yield g.rdmsr(MSR_IA32_TSC)
        yield g.sync(b)
        yield g.wrmsr(MSR_IA32_TSC, 1000)
        c = yield g.rdmsr(MSR_IA32_TSC)
        yield g.sync(c)
    vm, (vcpu,) = vm_create_with_vcpus(kvm, KVM_X86_DEFAULT_VM, 1, guest)
    vm_mem_add(vm, 0, 0, 4)
    kvm.host.clock.advance(5_000, "test")
    vcpu.run()
    assert vcpu.get_ucall()[1] == (5_000,)
    kvm.host.clock.advance(250, "test")
    vcpu.run()
    assert vcpu.get_ucall()[1] == (5_250,)
    vcpu.run()
    assert vcpu.get_ucall()[1] == (1000,)


def test_guest_tsc_counts_on_from_a_written_value():
    """A TSC write sets an offset, not a value: the TSC goes on counting simulated time from
    what was written, and each vCPU keeps its own offset."""
    kvm = sevcore.Kvm()

    def guest(g, value):
        yield g.wrmsr(MSR_IA32_TSC, value)
        yield g.sync()
        now = yield g.rdmsr(MSR_IA32_TSC)
        yield g.sync(now)
    vm, (a, b) = vm_create_with_vcpus(kvm, KVM_X86_DEFAULT_VM, 2, guest, 1000)
    vm_mem_add(vm, 0, 0, 4)
    b.set_guest_code(guest, 1 << 40)
    kvm.host.clock.advance(7_000, "test")
    a.run()
    b.run()
    kvm.host.clock.advance(300, "test")
    a.run()
    b.run()
    assert a.get_ucall()[1] == (1300,) and b.get_ucall()[1] == ((1 << 40) + 300,)


def test_pattern_page_lists():
    """write_pattern_pages / check_pattern_pages act on exactly the listed pages."""
    kvm = sevcore.Kvm()

    def guest(g):
        yield g.write_pattern(0, 16, 1)
        yield g.write_pattern_pages([3 * PAGE, 9 * PAGE], 7)
        r = yield g.check_pattern(0, 16, 1)
        yield g.sync(r)
        r = yield g.check_pattern_pages([9 * PAGE, 3 * PAGE], 7)
        yield g.sync(r)
        r = yield g.check_pattern_pages([1 * PAGE, 9 * PAGE], 7)
        yield g.sync(r)
    vm, (vcpu,) = vm_create_with_vcpus(kvm, KVM_X86_DEFAULT_VM, 1, guest)
    vm_mem_add(vm, 0, 0, 16)
    results = []
    for _ in range(3):
        vcpu.run()
        results.append(vcpu.get_ucall()[1][0])
    assert results == [(2, 3), (0, None), (1, 0)]


def _vmm_with_history():
    """A VMM with an anonymous mapping (some pages touched), a shared guest_memfd mapping, a
    hole, and freed frames waiting in the allocator (so reuse order matters)."""
    kvm = sevcore.Kvm()
    spare = kvm.mmap(8 * PAGE)
    kvm.write(spare, bytes(8 * PAGE))
    anon = kvm.mmap(16 * PAGE)
    kvm.write(anon + 5 * PAGE, b"x")
    vm = kvm.create_vm(KVM_X86_DEFAULT_VM)
    gmem = vm.create_guest_memfd(4 * PAGE, GUEST_MEMFD_FLAG_MMAP | GUEST_MEMFD_FLAG_INIT_SHARED)
    shared = gmem.mmap(4 * PAGE)
    kvm.munmap(spare, 8 * PAGE)
    hvas = [anon + i * PAGE for i in range(16)] + [shared + i * PAGE for i in range(4)]
    return kvm, hvas + [shared + 5 * PAGE]          # the last one is unmapped


@settings(max_examples=60)
@given(st.lists(st.integers(0, 20), max_size=24))
def test_hva_to_pfns_allocates_as_a_loop_of_hva_to_pfn(picks):
    """hva_to_pfns gives the frames, allocation order and stopping point of a hva_to_pfn loop."""
    batch, hvas = _vmm_with_history()
    loop, _ = _vmm_with_history()
    pfns, err = batch.hva_to_pfns(np.array([hvas[i] for i in picks], np.uint64), write=True)
    want, want_err = [], None
    for i in picks:
        try:
            want.append(loop.hva_to_pfn(hvas[i], write=True))
        except OSError as e:
            want_err = e
            break
    assert pfns.tolist() == want
    assert (err is None) == (want_err is None)
    if err is not None:
        assert err.errno == want_err.errno == EFAULT
    assert batch.host.mem.allocated == loop.host.mem.allocated
    assert [a.tolist() for a in batch._pt.items()] == [a.tolist() for a in loop._pt.items()]
