"""Bulk guest operations (g.fill, write_pattern, check_pattern, stamp, stamp_pages, digest):
executed by the C page kernel through the NPT, with the fault path resolving whole runs."""
from errno import EFAULT

import numpy as np
import pytest

import sevcore
from sevcore.core import pages as guestmem
from sevcore.vmm.kvm_util import (addr_gpa2hva, vm_mem_add, vm_mem_set_private,
                              vm_sev_create_with_one_vcpu, vm_sev_launch)
from sevcore.uapi import *

from support import raises_errno

GPA = 1 << 32
NPAGES = 1024


def create(type=KVM_X86_DEFAULT_VM, flags=0):
    vm = sevcore.Kvm().create_vm(type)
    vm_mem_add(vm, 0, 0, 16)
    hva = vm_mem_add(vm, GPA, 1, NPAGES, flags)
    return vm, hva


def run_ops(vm, *ops):
    """Run a guest that performs ``ops`` (functions of g) and syncs each result."""
    def guest(g):
        for op in ops:
            r = yield op(g)
            yield g.sync(r)
    v = vm.create_vcpu(len(vm.vcpus))
    v.set_guest_code(guest)
    out = []
    for _ in ops:
        v.run()
        out.append(v.get_ucall()[1][0])
    return out


def test_fill_reaches_vmm_memory():
    """A shared fill is what the VMM then reads through the slot's HVA."""
    vm, hva = create()
    run_ops(vm, lambda g: g.fill(GPA + 4096, NPAGES - 2, 0x0102030405060708))
    mem = vm.kvm.read(hva, NPAGES * 4096)
    assert mem[:4096] == bytes(4096)
    assert mem[4096:-4096] == (0x0102030405060708).to_bytes(8, "little") * ((NPAGES - 2) * 512)
    assert mem[-4096:] == bytes(4096)


def test_pattern_check_and_digest():
    """write_pattern then check_pattern finds no mismatch; a VMM write to one page is found
    at its index; digests match the host-side digest of the pages."""
    vm, hva = create()
    r = run_ops(vm, lambda g: g.write_pattern(GPA, NPAGES, 99),
                lambda g: g.check_pattern(GPA, NPAGES, 99))
    assert r[1] == (0, None)
    vm.kvm.write(hva + 37 * 4096 + 100, b"\xff")
    vm.kvm.write(hva + 700 * 4096, b"\xff")
    mism, digests = run_ops(vm, lambda g: g.check_pattern(GPA, NPAGES, 99),
                            lambda g: g.digest(GPA, 4))
    assert mism == (2, 37)
    for i in range(4):
        assert int(digests[i]) == guestmem.digest(vm.kvm.read(hva + i * 4096, 4096))
    assert vm.kvm.read(hva + 5 * 4096, 4096) == guestmem.pattern(99, (GPA >> 12) + 5)


def test_bulk_writes_are_dirty_logged():
    """stamp_pages dirties exactly its pages in a logging slot; check/digest dirty nothing."""
    vm, hva = create(flags=KVM_MEM_LOG_DIRTY_PAGES)
    pages = [3, 64, 65, 1000]
    run_ops(vm, lambda g: g.digest(GPA, NPAGES))
    assert not vm.get_dirty_log(1).any()
    run_ops(vm, lambda g: g.stamp_pages([GPA + p * 4096 for p in pages], 7))
    log = vm.get_dirty_log(1)
    assert [i for i in range(NPAGES) if int(log[i // 64]) >> (i % 64) & 1] == pages
    for p in pages:
        assert vm.kvm.read(hva + p * 4096, 8) == (7).to_bytes(8, "little")


def test_private_fill_goes_to_guest_memfd():
    """On a SW_PROTECTED VM a fill over a half-private range lands in guest_memfd for the
    private half and in VMM memory for the shared half."""
    vm = sevcore.Kvm().create_vm(KVM_X86_SW_PROTECTED_VM)
    vm_mem_add(vm, 0, 0, 16)
    hva = vm_mem_add(vm, GPA, 1, NPAGES, KVM_MEM_GUEST_MEMFD)
    vm_mem_set_private(vm, GPA, NPAGES // 2 * 4096)
    run_ops(vm, lambda g: g.fill(GPA, NPAGES, 0x5a5a5a5a5a5a5a5a))
    assert vm.kvm.read(hva, NPAGES // 2 * 4096) == bytes(NPAGES // 2 * 4096)
    assert vm.kvm.read(hva + NPAGES // 2 * 4096, 4096) == b"\x5a" * 4096
    gmem = vm.memslots[(0, 1)].gmem_file
    assert len(gmem.page_cache) == NPAGES // 2
    r = run_ops(vm, lambda g: g.digest(GPA, 1))
    assert int(r[0][0]) == guestmem.digest(b"\x5a" * 4096)


def test_bulk_fault_resumes_where_it_stopped():
    """A bulk fill that hits a private page without gmem fails KVM_RUN with EFAULT at that
    page; after user space fixes it, the next KVM_RUN finishes the fill."""
    vm = sevcore.Kvm().create_vm(KVM_X86_SW_PROTECTED_VM)
    vm_mem_add(vm, 0, 0, 16)
    hva = vm_mem_add(vm, GPA, 1, 64)
    vm_mem_set_private(vm, GPA + 40 * 4096, 4096)

    def guest(g):
        yield g.fill(GPA, 64, 0x1111111111111111)
        yield g.done()
    v = vm.create_vcpu(0)
    v.set_guest_code(guest)
    with raises_errno(EFAULT):
        v.run()
    assert v.kvm_run.memory_fault.gpa == GPA + 40 * 4096
    assert vm.kvm.read(hva + 39 * 4096, 8) == b"\x11" * 8
    assert vm.kvm.read(hva + 41 * 4096, 8) == bytes(8)
    vm.set_memory_attributes(GPA + 40 * 4096, 4096, 0)
    assert v.run().ucall == ("done", ())
    assert vm.kvm.read(hva, 64 * 4096) == b"\x11" * (64 * 4096)


def test_bulk_into_mmio_aborts_guest():
    """A bulk operation that runs off guest RAM reaches the guest as an exception (abort)."""
    vm, hva = create()
    def guest(g):
        yield g.fill(GPA, NPAGES + 1, 1)
    v = vm.create_vcpu(0)
    v.set_guest_code(guest)
    v.run()
    with pytest.raises(AssertionError, match="MMIO"):
        v.get_ucall()


def test_bulk_argument_errors():
    """Unaligned bulk gpas are refused before anything runs."""
    vm, hva = create()
    g = sevcore.kvm.guest.Guest(None)
    with pytest.raises(ValueError):
        g.fill(GPA + 1, 1, 0)


def test_bulk_list_argument_errors():
    """Page lists are refused unless every gpa is a page-aligned u64, before anything runs."""
    g = sevcore.kvm.guest.Guest(None)
    for make in (lambda gpas: g.stamp_pages(gpas, 1), lambda gpas: g.read_pages(gpas),
                 lambda gpas: g.write_pages(gpas, bytes(4096 * len(gpas))),
                 lambda gpas: g.write_pattern_pages(gpas, 1),
                 lambda gpas: g.check_pattern_pages(gpas, 1)):
        with pytest.raises(ValueError, match="index 1"):
            make([GPA, GPA + 4096 + 8])
        with pytest.raises(ValueError):
            make([GPA, -4096])
        with pytest.raises(TypeError):
            make([GPA, 4096.0])


def test_unaligned_page_list_aborts_the_guest():
    """A guest passing an unaligned gpa in a page list gets the ValueError (UCALL_ABORT), and
    no page is written."""
    vm, hva = create()

    def guest(g):
        yield g.write_pages([GPA, GPA + 4096 + 1], bytes([7]) * 8192)
    v = vm.create_vcpu(0)
    v.set_guest_code(guest)
    v.run()
    with pytest.raises(AssertionError, match="page-aligned"):
        v.get_ucall()
    assert vm.kvm.read(hva, 2 * 4096) == bytes(2 * 4096)


def test_multi_page_access_stops_at_mmio_and_resumes():
    """A g.write of whole pages that runs off its slot writes the pages before the hole, exits
    MMIO at the hole's first bytes, and resumes there on the next KVM_RUN."""
    vm, hva = create()
    data = bytes(range(256)) * 16 * 3

    def guest(g):
        yield g.write(GPA + (NPAGES - 2) * 4096, data)
        yield g.done()
    v = vm.create_vcpu(0)
    v.set_guest_code(guest)
    run = v.run()
    assert (run.exit_reason, run.mmio.phys_addr, run.mmio.is_write, run.mmio.len) == \
        (KVM_EXIT_MMIO, GPA + NPAGES * 4096, 1, 8)
    assert bytes(run.mmio.data) == data[8192:8200]
    assert vm.kvm.read(hva + (NPAGES - 2) * 4096, 8192) == data[:8192]
    for _ in range(4096 // 8 - 1):
        assert v.run().exit_reason == KVM_EXIT_MMIO
    assert v.run().ucall == ("done", ())


def test_digest_of_two_pages_resumes_at_the_right_word():
    """A digest that faults between its pages writes each page's digest at its own index."""
    vm, hva = create()
    vm.kvm.write(hva + 4096, b"x" * 4096)
    # The first digest maps page 0 only, so the second one stops after page 0 to fault page 1.
    r = run_ops(vm, lambda g: g.digest(GPA, 1), lambda g: g.digest(GPA, 2))
    assert [int(d) for d in r[1]] == [guestmem.digest(bytes(4096)),
                                      guestmem.digest(b"x" * 4096)]


def test_read_and_write_pages_gather_and_scatter(rng):
    """read_pages gathers a page list in its order (repeats included), write_pages scatters to
    one: the VMM sees each page at its own HVA, and a logging slot records exactly those pages."""
    vm, hva = create(flags=KVM_MEM_LOG_DIRTY_PAGES)
    content = rng.integers(0, 256, (NPAGES, 4096), np.uint8)
    vm.kvm.write(hva, content)
    order = [700, 3, 3, 1023, 0, 64]
    data = rng.integers(0, 256, (4, 4096), np.uint8)
    targets = [9, 500, 2, 77]
    got, _ = run_ops(vm, lambda g: g.read_pages([GPA + p * 4096 for p in order]),
                     lambda g: g.write_pages(np.array([GPA + p * 4096 for p in targets],
                                                      np.uint64), data))
    assert got.shape == (len(order), 4096) and np.array_equal(got, content[order])
    for i, p in enumerate(targets):
        assert vm.kvm.read(hva + p * 4096, 4096) == data[i].tobytes()
    log = vm.get_dirty_log(1)
    assert [i for i in range(NPAGES) if int(log[i // 64]) >> (i % 64) & 1] == sorted(targets)


def test_read_and_write_pages_through_the_c_bit(rng):
    """With the C-bit, write_pages encrypts (the VMM sees ciphertext) and read_pages decrypts;
    the same pages read without the C-bit are the frames' ciphertext."""
    kvm = sevcore.Kvm()
    vm, _ = vm_sev_create_with_one_vcpu(kvm, KVM_X86_SEV_VM, npages=64)
    vm_sev_launch(vm, 0)
    c = 1 << kvm.host.c_bit
    gpas = np.array([5, 40, 6], np.uint64) * np.uint64(4096)
    data = rng.integers(0, 256, (3, 4096), np.uint8)
    plain, raw = run_ops(vm, lambda g: g.write_pages(gpas | np.uint64(c), data),
                         lambda g: g.read_pages(gpas | np.uint64(c)),
                         lambda g: g.read_pages(gpas))[1:]
    assert np.array_equal(plain, data)
    for i, gpa in enumerate(gpas):
        vmm = kvm.read(addr_gpa2hva(vm, int(gpa)), 4096)
        assert vmm == raw[i].tobytes() and vmm != data[i].tobytes()


def test_write_pages_fault_resumes_where_it_stopped(rng):
    """A scatter that reaches a private page without gmem fails KVM_RUN with EFAULT there, having
    written the pages before it; the next KVM_RUN writes the rest."""
    vm = sevcore.Kvm().create_vm(KVM_X86_SW_PROTECTED_VM)
    vm_mem_add(vm, 0, 0, 16)
    hva = vm_mem_add(vm, GPA, 1, 64)
    vm_mem_set_private(vm, GPA + 40 * 4096, 4096)
    pages = [3, 40, 7]
    data = rng.integers(0, 256, (3, 4096), np.uint8)

    def guest(g):
        yield g.write_pages([GPA + p * 4096 for p in pages], data)
        yield g.done()
    v = vm.create_vcpu(0)
    v.set_guest_code(guest)
    with raises_errno(EFAULT):
        v.run()
    assert v.kvm_run.memory_fault.gpa == GPA + 40 * 4096
    assert vm.kvm.read(hva + 3 * 4096, 4096) == data[0].tobytes()
    assert vm.kvm.read(hva + 7 * 4096, 4096) == bytes(4096)
    vm.set_memory_attributes(GPA + 40 * 4096, 4096, 0)
    assert v.run().ucall == ("done", ())
    for i, p in enumerate(pages):
        assert vm.kvm.read(hva + p * 4096, 4096) == data[i].tobytes()


def test_check_pattern_counts_across_a_failed_run():
    """A check_pattern stopped by a memory fault resumes on the next KVM_RUN with the
    mismatches before the fault still counted, and the first one's index kept."""
    vm = sevcore.Kvm().create_vm(KVM_X86_SW_PROTECTED_VM)
    vm_mem_add(vm, 0, 0, 16)
    hva = vm_mem_add(vm, GPA, 1, 64)

    def guest(g):
        yield g.write_pattern(GPA, 64, 5)
        yield g.sync()
        r = yield g.check_pattern(GPA, 64, 5)
        yield g.sync(r)
    v = vm.create_vcpu(0)
    v.set_guest_code(guest)
    v.run()
    for page in (10, 12, 50):
        vm.kvm.write(hva + page * 4096, b"\xff")
    vm_mem_set_private(vm, GPA + 40 * 4096, 4096)
    with raises_errno(EFAULT):
        v.run()
    assert v.kvm_run.memory_fault.gpa == GPA + 40 * 4096
    vm.set_memory_attributes(GPA + 40 * 4096, 4096, 0)
    v.run()
    assert v.get_ucall()[1] == ((3, 10),)


def test_read_pages_into_a_given_buffer(rng):
    """read_pages(out=) fills and returns the caller's buffer, so a guest reuses its memory."""
    vm, hva = create()
    content = rng.integers(0, 256, (4, 4096), np.uint8)
    vm.kvm.write(hva, content)
    out = np.zeros((8, 4096), np.uint8)
    view = out[2:4]
    got, = run_ops(vm, lambda g: g.read_pages([GPA + 3 * 4096, GPA], view))
    assert got is view
    assert np.array_equal(out[2:4], content[[3, 0]]) and not out[4:].any()


def test_page_buffers_must_hold_a_page_per_gpa():
    """write_pages and read_pages(out=) refuse a buffer that is not exactly one page per gpa,
    or a read-only one, before anything runs."""
    g = sevcore.kvm.guest.Guest(None)
    with pytest.raises(ValueError, match="8192"):
        g.write_pages([0, 4096], bytes(4096))
    with pytest.raises(ValueError, match="4096"):
        g.read_pages([0], bytearray(100))
    with pytest.raises(ValueError, match="writable"):
        g.read_pages([0], bytes(4096))


def test_cmpxchg_stores_only_over_the_expected_value():
    """LOCK CMPXCHG returns the word found and stores the new one only when it was the
    expected one; an unaligned address is refused before the guest runs it."""
    vm, hva = create()
    vm.kvm.write(hva + 8, (5).to_bytes(8, "little"))
    r = run_ops(vm, lambda g: g.cmpxchg(GPA + 8, 5, 2**64 - 1),
                lambda g: g.cmpxchg(GPA + 8, 5, 7))
    assert r == [5, 2**64 - 1]
    assert vm.kvm.read(hva, 24) == bytes(8) + b"\xff" * 8 + bytes(8)
    with pytest.raises(ValueError, match="8-byte aligned"):
        sevcore.kvm.guest.Guest(None).cmpxchg(GPA + 4, 0, 1)
