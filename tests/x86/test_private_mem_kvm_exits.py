"""Port of tools/testing/selftests/kvm/x86/private_mem_kvm_exits_test.c,
plus the other memory-fault exits of kvm_mmu_faultin_pfn (arch/x86/kvm/mmu/mmu.c)."""
from errno import EFAULT


import sevcore
from sevcore.vmm.kvm_util import vm_mem_add, vm_mem_set_private
from sevcore.uapi import *

from support import raises_errno

EXITS_TEST_GPA = 0xc0000000
EXITS_TEST_SLOT = 10


def guest_repeatedly_read(g):
    while True:
        yield g.read(EXITS_TEST_GPA, 8)


def create_vm(type, host=None):
    """A VM with slot 0 at gpa 0 standing in for the selftests' code and data slot."""
    host = host or sevcore.Host()
    vm = host.kvm.create_vm(type)
    vm_mem_add(vm, 0, 0, 16)
    return vm


def assert_memory_fault(run, flags, gpa):
    """The exit kvm_prepare_memory_fault_exit leaves: page-aligned gpa, size 4096."""
    assert (run.exit_reason, run.memory_fault.flags, run.memory_fault.gpa,
            run.memory_fault.size) == (KVM_EXIT_MEMORY_FAULT, flags, gpa, PAGE_SIZE)


def run_expect_memory_fault(vcpu, err=EFAULT):
    with raises_errno(err, "KVM_RUN"):
        vcpu.run()
    return vcpu.kvm_run


def test_private_access_memslot_deleted():
    """A private access after its gmem slot is deleted fails KVM_RUN with EFAULT and a private
    memory-fault exit for the page."""
    vm = create_vm(KVM_X86_SW_PROTECTED_VM)
    vcpu = vm.create_vcpu(0)
    vcpu.set_guest_code(guest_repeatedly_read)
    vm_mem_add(vm, EXITS_TEST_GPA, EXITS_TEST_SLOT, 1, KVM_MEM_GUEST_MEMFD)
    vm_mem_set_private(vm, EXITS_TEST_GPA, PAGE_SIZE)
    vm.set_user_memory_region2(EXITS_TEST_SLOT, KVM_MEM_GUEST_MEMFD, EXITS_TEST_GPA, 0, 0)
    run = run_expect_memory_fault(vcpu)
    assert_memory_fault(run, KVM_MEMORY_EXIT_FLAG_PRIVATE, EXITS_TEST_GPA)


def test_private_access_after_mapping_then_delete():
    """Pages already mapped from guest_memfd are zapped by the deletion, so the next access
    exits instead of reading a stale mapping."""
    vm = create_vm(KVM_X86_SW_PROTECTED_VM)
    vm_mem_add(vm, EXITS_TEST_GPA, EXITS_TEST_SLOT, 1, KVM_MEM_GUEST_MEMFD)
    vm_mem_set_private(vm, EXITS_TEST_GPA, PAGE_SIZE)

    def guest(g):
        yield g.read(EXITS_TEST_GPA, 8)
        yield g.sync(1)
        while True:
            yield g.read(EXITS_TEST_GPA, 8)
    vcpu = vm.create_vcpu(0)
    vcpu.set_guest_code(guest)
    assert vcpu.run().ucall == ("sync", (1,))
    assert vm.npt.lookup(EXITS_TEST_GPA >> 12) is not None
    vm.set_user_memory_region2(EXITS_TEST_SLOT, KVM_MEM_GUEST_MEMFD, EXITS_TEST_GPA, 0, 0)
    assert vm.npt.lookup(EXITS_TEST_GPA >> 12) is None
    run = run_expect_memory_fault(vcpu)
    assert_memory_fault(run, KVM_MEMORY_EXIT_FLAG_PRIVATE, EXITS_TEST_GPA)


def test_run_without_memslots_is_an_emulation_error():
    """KVM_RUN of a VM with no memory at all exits with KVM_EXIT_INTERNAL_ERROR (emulation), as
    set_memory_region_test's test_zero_memory_regions expects on x86."""
    vm = sevcore.Kvm().create_vm(KVM_X86_DEFAULT_VM)
    vcpu = vm.create_vcpu(0)
    vcpu.set_guest_code(guest_repeatedly_read)
    run = vcpu.run()
    assert run.exit_reason == KVM_EXIT_INTERNAL_ERROR
    assert run.internal.suberror == KVM_INTERNAL_ERROR_EMULATION


def test_private_access_memslot_not_private():
    """A private access to a slot without guest_memfd fails with EFAULT and a private
    memory-fault exit."""
    vm = create_vm(KVM_X86_SW_PROTECTED_VM)
    vcpu = vm.create_vcpu(0)
    vcpu.set_guest_code(guest_repeatedly_read)
    vm_mem_add(vm, EXITS_TEST_GPA, EXITS_TEST_SLOT, 1, 0)
    vm_mem_set_private(vm, EXITS_TEST_GPA, PAGE_SIZE)
    run = run_expect_memory_fault(vcpu)
    assert_memory_fault(run, KVM_MEMORY_EXIT_FLAG_PRIVATE, EXITS_TEST_GPA)


def test_fault_retried_after_user_space_fixes_it():
    """KVM_RUN after a memory fault retries the access: once user space converts the page back
    to shared, the read completes and the guest goes on."""
    vm = create_vm(KVM_X86_SW_PROTECTED_VM)
    kvm = vm.kvm
    hva = vm_mem_add(vm, EXITS_TEST_GPA, EXITS_TEST_SLOT, 1, 0)
    kvm.write(hva, b"shared!!")
    vm_mem_set_private(vm, EXITS_TEST_GPA, PAGE_SIZE)

    def guest(g):
        data = yield g.read(EXITS_TEST_GPA, 8)
        yield g.sync(data)
    vcpu = vm.create_vcpu(0)
    vcpu.set_guest_code(guest)
    run_expect_memory_fault(vcpu)
    run_expect_memory_fault(vcpu)             # nothing fixed: the same exit again
    vm.set_memory_attributes(EXITS_TEST_GPA, PAGE_SIZE, 0)
    assert vcpu.run().ucall == ("sync", (b"shared!!",))


def test_closed_guest_memfd_faults_efault():
    """A private fault on a slot whose guest_memfd was closed fails with EFAULT."""
    vm = create_vm(KVM_X86_SW_PROTECTED_VM)
    kvm = vm.kvm
    gmem = vm.create_guest_memfd(PAGE_SIZE)
    hva = kvm.mmap(PAGE_SIZE)
    vm.set_user_memory_region2(EXITS_TEST_SLOT, KVM_MEM_GUEST_MEMFD, EXITS_TEST_GPA, PAGE_SIZE,
                               hva, 0, gmem)
    vm_mem_set_private(vm, EXITS_TEST_GPA, PAGE_SIZE)
    gmem.close()
    vcpu = vm.create_vcpu(0)
    vcpu.set_guest_code(guest_repeatedly_read)
    run = run_expect_memory_fault(vcpu)
    assert run.memory_fault.flags == KVM_MEMORY_EXIT_FLAG_PRIVATE


def test_shared_access_bad_hva_faults_efault():
    """A shared fault whose slot HVA is not mapped in the VMM fails with EFAULT and a shared
    memory-fault exit (flags 0)."""
    vm = create_vm(KVM_X86_DEFAULT_VM)
    kvm = vm.kvm
    hva = kvm.mmap(PAGE_SIZE)
    vm.set_user_memory_region2(1, 0, EXITS_TEST_GPA, PAGE_SIZE, hva)
    kvm.munmap(hva, PAGE_SIZE)
    vcpu = vm.create_vcpu(0)
    vcpu.set_guest_code(guest_repeatedly_read)
    run = run_expect_memory_fault(vcpu)
    assert_memory_fault(run, 0, EXITS_TEST_GPA)


class TestSnpAccessMismatch:
    """SNP: the C-bit decides private; an access of the other kind is an implicit conversion
    request (memory-fault exit) even where no memslot exists."""

    def setup_vm(self):
        host = sevcore.Host()
        vm = create_vm(KVM_X86_SNP_VM, host)
        vm.sev_need_init = False      # the SEV layer's INIT2; not under test here
        vm_mem_add(vm, EXITS_TEST_GPA, EXITS_TEST_SLOT, 1, KVM_MEM_GUEST_MEMFD)
        return host, vm

    def run_access(self, vm, gpa):
        def guest(g):
            yield g.read(gpa, 8)
            yield g.done()
        vcpu = vm.create_vcpu(len(vm.vcpus))
        vcpu.set_guest_code(guest)
        return vcpu

    def test_private_access_to_shared_gfn(self):
        """A C-bit access to a shared gfn exits with flags PRIVATE at the stripped gpa."""
        host, vm = self.setup_vm()
        vcpu = self.run_access(vm, EXITS_TEST_GPA | 1 << host.c_bit)
        run = run_expect_memory_fault(vcpu)
        assert (run.memory_fault.flags, run.memory_fault.gpa) == \
            (KVM_MEMORY_EXIT_FLAG_PRIVATE, EXITS_TEST_GPA)
        vm_mem_set_private(vm, EXITS_TEST_GPA, PAGE_SIZE)
        assert vcpu.run().ucall == ("done", ())

    def test_shared_access_to_private_gfn(self):
        """A plain access to a private gfn exits with flags 0."""
        host, vm = self.setup_vm()
        vm_mem_set_private(vm, EXITS_TEST_GPA, PAGE_SIZE)
        vcpu = self.run_access(vm, EXITS_TEST_GPA)
        run = run_expect_memory_fault(vcpu)
        assert (run.memory_fault.flags, run.memory_fault.gpa) == (0, EXITS_TEST_GPA)

    def test_mismatch_fires_without_a_memslot(self):
        """The mismatch check runs before the memslot lookup."""
        host, vm = self.setup_vm()
        vcpu = self.run_access(vm, 0x1_0000_0000 | 1 << host.c_bit)
        run = run_expect_memory_fault(vcpu)
        assert (run.memory_fault.flags, run.memory_fault.gpa) == \
            (KVM_MEMORY_EXIT_FLAG_PRIVATE, 0x1_0000_0000)


def test_tdx_shared_bit_selects_shared():
    """TDX: an access with the shared bit (47) goes to the slot's HVA; one without it is private."""
    host = sevcore.Host()
    vm = create_vm(KVM_X86_TDX_VM, host)
    vm.sev_need_init = False
    hva = vm_mem_add(vm, EXITS_TEST_GPA, EXITS_TEST_SLOT, 1, KVM_MEM_GUEST_MEMFD)
    host.kvm.write(hva, b"hostdata")

    def guest(g):
        data = yield g.read(EXITS_TEST_GPA | 1 << 47, 8)
        yield g.sync(data)
        yield g.read(EXITS_TEST_GPA, 8)
    vcpu = vm.create_vcpu(0)
    vcpu.set_guest_code(guest)
    assert vcpu.run().ucall == ("sync", (b"hostdata",))
    run = run_expect_memory_fault(vcpu)
    assert run.memory_fault.flags == KVM_MEMORY_EXIT_FLAG_PRIVATE


def test_mmio_exit_for_gpa_without_slot():
    """A shared access to a gpa without a memslot exits with KVM_EXIT_MMIO; user space supplies
    the data of a read and sees the data of a write."""
    vm = create_vm(KVM_X86_DEFAULT_VM)

    def guest(g):
        v = yield g.read(0xfee00000, 4)
        yield g.write(0xfee00010, v[::-1])
        yield g.done()
    vcpu = vm.create_vcpu(0)
    vcpu.set_guest_code(guest)
    run = vcpu.run()
    assert (run.exit_reason, run.mmio.phys_addr, run.mmio.len, run.mmio.is_write) == \
        (KVM_EXIT_MMIO, 0xfee00000, 4, 0)
    run.mmio.data[:4] = b"abcd"
    run = vcpu.run()
    assert (run.exit_reason, run.mmio.phys_addr, run.mmio.is_write) == \
        (KVM_EXIT_MMIO, 0xfee00010, 1)
    assert bytes(run.mmio.data[:4]) == b"dcba"
    assert vcpu.run().ucall == ("done", ())


def test_write_to_readonly_slot_is_mmio():
    """Reads of a read-only slot see its memory; writes exit as MMIO and change nothing."""
    vm = create_vm(KVM_X86_DEFAULT_VM)
    kvm = vm.kvm
    hva = kvm.mmap(PAGE_SIZE)
    kvm.write(hva, b"rom!")
    vm.set_user_memory_region2(2, KVM_MEM_READONLY, 0x100000, PAGE_SIZE, hva)

    def guest(g):
        v = yield g.read(0x100000, 4)
        yield g.sync(v)
        yield g.write(0x100000, b"RAM?")
        yield g.done()
    vcpu = vm.create_vcpu(0)
    vcpu.set_guest_code(guest)
    assert vcpu.run().ucall == ("sync", (b"rom!",))
    run = vcpu.run()
    assert (run.exit_reason, run.mmio.is_write, run.mmio.phys_addr) == (KVM_EXIT_MMIO, 1, 0x100000)
    assert vcpu.run().ucall == ("done", ())
    assert kvm.read(hva, 4) == b"rom!"
