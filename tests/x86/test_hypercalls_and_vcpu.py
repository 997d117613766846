"""KVM_CREATE_VCPU, KVM_RUN's own checks, and hypercall emulation (arch/x86/kvm/x86.c:
____kvm_emulate_hypercall, complete_hypercall_exit; api.rst, KVM_CAP_EXIT_HYPERCALL)."""
from errno import EBADF, EEXIST, EINTR, EINVAL, EIO

import pytest

import sevcore
from sevcore.vmm.kvm_util import vm_mem_add, vm_vcpu_add
from sevcore.uapi import *

from support import raises_errno

U64 = (1 << 64) - 1


def create(type=KVM_X86_DEFAULT_VM):
    vm = sevcore.Kvm().create_vm(type)
    vm_mem_add(vm, 0, 0, 16)
    return vm


def run_hypercall(vm, nr, *args):
    """The value a guest gets from one hypercall, and the exit if it went to user space."""
    def guest(g):
        r = yield g.hypercall(nr, *args)
        yield g.sync(r)
    vcpu = vm_vcpu_add(vm, len(vm.vcpus))
    vcpu.set_guest_code(guest)
    run = vcpu.run()
    if run.exit_reason == KVM_EXIT_HYPERCALL:
        return None, run, vcpu
    return vcpu.get_ucall()[1][0], run, vcpu


@pytest.mark.parametrize("gpa,npages,why", [
    (0x1001, 1, "unaligned"), (0x1000, 0, "no pages"), (0x5000, U64 - 3, "wraps"),
    (0x1000, U64, "wraps"),
])
def test_map_gpa_range_invalid_args(gpa, npages, why):
    """An unaligned gpa, zero pages or a wrapping range complete in the kernel with
    -KVM_EINVAL; nothing exits."""
    vm = create()
    vm.enable_cap(KVM_CAP_EXIT_HYPERCALL, 1 << KVM_HC_MAP_GPA_RANGE)
    ret, run, _ = run_hypercall(vm, KVM_HC_MAP_GPA_RANGE, gpa, npages, 0)
    assert ret == -KVM_EINVAL, why


def test_map_gpa_range_without_cap_is_enosys():
    """Without KVM_CAP_EXIT_HYPERCALL's bit 12 the guest gets -KVM_ENOSYS (-1000)."""
    vm = create()
    ret, _, _ = run_hypercall(vm, KVM_HC_MAP_GPA_RANGE, 0x1000, 1, 0)
    assert ret == -KVM_ENOSYS
    vm.enable_cap(KVM_CAP_EXIT_HYPERCALL, 1 << KVM_HC_MAP_GPA_RANGE)
    vm.enable_cap(KVM_CAP_EXIT_HYPERCALL, 0)          # turned off again
    assert run_hypercall(vm, KVM_HC_MAP_GPA_RANGE, 0x1000, 1, 0)[0] == -KVM_ENOSYS


def test_map_gpa_range_exit_layout_and_return():
    """The exit carries nr 12, gpa/npages/attrs unchecked (reserved bits too), ret 0 and the
    long-mode flag; the value user space writes to ret is what RAX gets."""
    vm = create()
    vm.enable_cap(KVM_CAP_EXIT_HYPERCALL, 1 << KVM_HC_MAP_GPA_RANGE)
    run = None
    ret, run, vcpu = run_hypercall(vm, KVM_HC_MAP_GPA_RANGE, 0x200000, 512, 0xdead0010)
    hc = run.hypercall
    assert (hc.nr, hc.args[:3], hc.ret, hc.flags) == \
        (12, [0x200000, 512, 0xdead0010], 0, KVM_EXIT_HYPERCALL_LONG_MODE)
    hc.ret = -KVM_EINVAL & U64
    assert vcpu.run().ucall == ("sync", (-KVM_EINVAL,))


def test_map_gpa_range_default_return_is_zero():
    """User space that writes nothing to hypercall.ret returns 0 to the guest."""
    vm = create()
    vm.enable_cap(KVM_CAP_EXIT_HYPERCALL, 1 << KVM_HC_MAP_GPA_RANGE)
    _, run, vcpu = run_hypercall(vm, KVM_HC_MAP_GPA_RANGE, 0, 1, 0)
    assert vcpu.run().ucall == ("sync", (0,))


@pytest.mark.parametrize("nr,expected", [(0, -KVM_ENOSYS), (2, -KVM_ENOSYS), (3, -KVM_ENOSYS),
                                         (KVM_HC_KICK_CPU, 0), (KVM_HC_SCHED_YIELD, 0),
                                         (KVM_HC_CLOCK_PAIRING, -KVM_EOPNOTSUPP),
                                         (13, -KVM_ENOSYS), (1 << 40, -KVM_ENOSYS)])
def test_in_kernel_hypercalls(nr, expected):
    """Hypercalls KVM completes itself return their value in RAX without an exit."""
    vm = create()
    assert run_hypercall(vm, nr, 0, 0, 0, 0)[0] == expected


def test_send_ipi_counts_existing_targets():
    """KVM_HC_SEND_IPI returns how many of the bitmap's APIC ids are vCPUs."""
    vm = create()
    vm.create_vcpu(1)
    vm.create_vcpu(3)
    ret, _, _ = run_hypercall(vm, KVM_HC_SEND_IPI, 0b1011, 0, 0)   # ids 0, 1, 3; vCPU 2 runs it
    assert ret == 2


def test_exit_hypercall_cap_checks():
    """KVM_CAP_EXIT_HYPERCALL reports 0x1000; bits outside it or non-zero flags are EINVAL and
    leave the setting unchanged."""
    vm = create()
    assert vm.check_extension(KVM_CAP_EXIT_HYPERCALL) == 0x1000
    vm.enable_cap(KVM_CAP_EXIT_HYPERCALL, 0x1000)
    for args, flags in [((0x1001,), 0), ((1 << 11,), 0), ((0x1000,), 1)]:
        with raises_errno(EINVAL):
            vm.enable_cap(KVM_CAP_EXIT_HYPERCALL, *args, flags=flags)
        assert vm.hypercall_exit_enabled == 0x1000


def test_create_vcpu_checks():
    """vcpu ids must be below KVM_MAX_VCPU_IDS (EINVAL) and unique (EEXIST)."""
    vm = create()
    vm.create_vcpu(0)
    with raises_errno(EEXIST, "KVM_CREATE_VCPU"):
        vm.create_vcpu(0)
    for bad in (KVM_MAX_VCPU_IDS, -1):
        with raises_errno(EINVAL):
            vm.create_vcpu(bad)
    assert [v.vcpu_id for v in vm.vcpus] == [0]


def test_run_of_uninitialised_sev_vm_is_einval():
    """KVM_RUN of an SEV-type VM before KVM_SEV_INIT2 fails with EINVAL."""
    for t in (KVM_X86_SEV_VM, KVM_X86_SEV_ES_VM, KVM_X86_SNP_VM):
        vm = create(t)
        vcpu = vm.create_vcpu(0)
        vcpu.set_guest_code(lambda g: (yield g.done()))
        with raises_errno(EINVAL):
            vcpu.run()


def test_immediate_exit_is_eintr():
    """With kvm_run.immediate_exit set, KVM_RUN returns EINTR and KVM_EXIT_INTR without
    running the guest, after completing a pending exit."""
    vm = create()
    vm.enable_cap(KVM_CAP_EXIT_HYPERCALL, 1 << KVM_HC_MAP_GPA_RANGE)
    _, run, vcpu = run_hypercall(vm, KVM_HC_MAP_GPA_RANGE, 0, 1, 0)
    run.hypercall.ret = 7
    run.immediate_exit = 1
    with raises_errno(EINTR):
        vcpu.run()
    assert run.exit_reason == KVM_EXIT_INTR
    run.immediate_exit = 0
    assert vcpu.run().ucall == ("sync", (7,))


def test_guest_end_and_errors():
    """A guest that returns reports UCALL_DONE, then halts; an exception or a bad yield is an
    abort whose message reaches the host."""
    vm = create()

    def ends(g):
        yield g.sync(1)
    v = vm.create_vcpu(0)
    v.set_guest_code(ends)
    assert v.run().ucall == ("sync", (1,))
    assert v.run().ucall == ("done", ())
    assert v.run().exit_reason == KVM_EXIT_HLT

    def fails(g):
        yield g.sync()
        assert 1 == 2, "guest says no"
    v = vm.create_vcpu(1)
    v.set_guest_code(fails)
    v.run()
    v.run()
    with pytest.raises(AssertionError, match="guest says no"):
        v.get_ucall()

    def junk(g):
        yield 42
    v = vm.create_vcpu(2)
    v.set_guest_code(junk)
    assert v.run().ucall[0] == "abort"


def test_dead_and_closed():
    """KVM_RUN on a closed vCPU fd is EBADF and on a dead VM EIO."""
    vm = create()
    v = vm.create_vcpu(0)
    v.set_guest_code(lambda g: (yield g.done()))
    vm.dead = True
    with raises_errno(EIO):
        v.run()
    vm.dead = False
    v.close()
    with raises_errno(EBADF):
        v.run()


def test_an_open_vcpu_fd_keeps_its_vm_alive():
    """Closing the VM fd while a vCPU fd is open leaves the VM whole: the vCPU still runs on its
    memslots (kvm_vm_ioctl_create_vcpu takes a VM reference that kvm_vcpu_release drops)."""
    vm = create()
    v = vm.create_vcpu(0)

    def guest(g):
        yield g.write(0x1000, b"still here")
        yield g.sync((yield g.read(0x1000, 10)))
    v.set_guest_code(guest)
    vm.close()
    assert vm.alive
    assert v.run().ucall == ("sync", (b"still here",))
    v.close()
    assert not vm.alive


def test_an_sev_vm_keeps_its_asid_while_a_vcpu_fd_is_open():
    """The SEV context (ASID, key) of a VM whose fd is closed lives until its last vCPU fd is
    closed."""
    from sevcore.vmm.kvm_util import vm_sev_create_with_one_vcpu, vm_sev_launch

    def guest(g):
        yield g.write(0x1000 | 1 << 51, b"secret")
        yield g.sync((yield g.read(0x1000 | 1 << 51, 6)))
    kvm = sevcore.Kvm()
    vm, v = vm_sev_create_with_one_vcpu(kvm, KVM_X86_SEV_VM, guest)
    vm_sev_launch(vm, 0)
    asid = vm.sev.asid
    vm.close()
    assert kvm.host.umc.has_key(asid)
    assert v.run().ucall == ("sync", (b"secret",))
    v.close()
    assert not vm.alive and not kvm.host.umc.has_key(asid)
