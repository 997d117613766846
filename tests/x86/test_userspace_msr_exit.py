"""Port of tools/testing/selftests/kvm/x86/userspace_msr_exit_test.c: MSR
filters and user-space MSR exits, the mechanism MSR_KVM_MIGRATION_CONTROL relies on."""
from errno import EINVAL


import sevcore
from sevcore.vmm.kvm_util import vm_mem_add
from sevcore.uapi import *

from support import raises_errno

MSR_NON_EXISTENT = 0x474f4f00
DENY = b"\x00"


def create(guest, *args):
    vm = sevcore.Kvm().create_vm(KVM_X86_DEFAULT_VM)
    vm_mem_add(vm, 0, 0, 16)
    vcpu = vm.create_vcpu(0)
    vcpu.set_guest_code(guest, *args)
    return vm, vcpu


def deny_range(msr):
    return (KVM_MSR_FILTER_READ | KVM_MSR_FILTER_WRITE, 1, msr, DENY)


# -- msr_filter_allow ---------------------------------------------------------------------------

def guest_filter_allow(g):
    v = yield g.rdmsr(MSR_IA32_XSS)
    assert v == 0
    yield g.wrmsr(MSR_IA32_XSS, 0)
    vec = yield g.wrmsr_safe(MSR_IA32_XSS, 1)
    assert vec == GP_VECTOR
    vec, _ = yield g.rdmsr_safe(MSR_IA32_FLUSH_CMD)
    assert vec == GP_VECTOR
    vec = yield g.wrmsr_safe(MSR_IA32_FLUSH_CMD, 0)
    assert vec == GP_VECTOR
    vec = yield g.wrmsr_safe(MSR_IA32_FLUSH_CMD, 1)
    assert vec == 0
    yield g.wrmsr(MSR_NON_EXISTENT, 2)
    v = yield g.rdmsr(MSR_NON_EXISTENT)
    assert v == 2
    yield g.done()


def handle_allow(run, store):
    """The selftest's handlers: XSS reads 0 and accepts only 0; FLUSH_CMD reads #GP and accepts
    only 1; MSR_NON_EXISTENT is a scratch register."""
    m = run.msr
    assert m.reason == KVM_MSR_EXIT_REASON_FILTER
    if run.exit_reason == KVM_EXIT_X86_RDMSR:
        if m.index == MSR_IA32_XSS:
            m.data = 0
        elif m.index == MSR_IA32_FLUSH_CMD:
            m.error = 1
        elif m.index == MSR_NON_EXISTENT:
            m.data = store.get(m.index, 0)
    else:
        if m.index == MSR_IA32_XSS and m.data != 0:
            m.error = 1
        elif m.index == MSR_IA32_FLUSH_CMD and m.data != 1:
            m.error = 1
        elif m.index == MSR_NON_EXISTENT:
            store[m.index] = m.data


def run_guest(vcpu, handler, *extra):
    counts = {KVM_EXIT_X86_RDMSR: 0, KVM_EXIT_X86_WRMSR: 0}
    while True:
        run = vcpu.run()
        if run.exit_reason in counts:
            counts[run.exit_reason] += 1
            handler(run, *extra)
            continue
        assert run.exit_reason == KVM_EXIT_IO
        uc = vcpu.get_ucall()
        if uc[0] == "done":
            return counts
        handler(run, *extra)      # a sync: the handler sees it too


def test_msr_filter_allow():
    """Denied MSRs exit with reason FILTER, and user space's data and #GP decisions reach the
    guest."""
    vm, vcpu = create(guest_filter_allow)
    vm.enable_cap(KVM_CAP_X86_USER_SPACE_MSR, KVM_MSR_EXIT_REASON_FILTER)
    vm.x86_set_msr_filter(KVM_MSR_FILTER_DEFAULT_ALLOW,
                          [deny_range(MSR_IA32_XSS), deny_range(MSR_IA32_FLUSH_CMD),
                           deny_range(MSR_NON_EXISTENT)])
    store = {}
    counts = run_guest(vcpu, lambda run: run.exit_reason != KVM_EXIT_IO
                       and handle_allow(run, store))
    assert counts == {KVM_EXIT_X86_RDMSR: 3, KVM_EXIT_X86_WRMSR: 5}


# -- msr_filter_deny ----------------------------------------------------------------------------

def guest_filter_deny(g):
    yield g.wrmsr(MSR_SYSCALL_MASK, 0)              # in the kernel
    v = yield g.rdmsr(MSR_SYSCALL_MASK)              # to user space: FILTER
    assert v == MSR_SYSCALL_MASK
    v = yield g.rdmsr(MSR_GS_BASE)                   # to user space: FILTER
    assert v == MSR_GS_BASE
    yield g.wrmsr(MSR_IA32_POWER_CTL, 0x1234)        # to user space: FILTER
    yield g.rdmsr(MSR_IA32_POWER_CTL)                # in the kernel
    v = yield g.rdmsr(0xdeadbeef)                    # to user space: UNKNOWN
    assert v == 0xdeadbeef
    yield g.wrmsr(0xdeadbeef, 0x1234)                # to user space: UNKNOWN
    yield g.sync("untrapped")
    yield g.wrmsr(MSR_SYSCALL_MASK, 0)
    yield g.rdmsr(MSR_SYSCALL_MASK)
    yield g.rdmsr(MSR_GS_BASE)
    yield g.wrmsr(MSR_IA32_POWER_CTL, 0x1234)
    yield g.rdmsr(MSR_IA32_POWER_CTL)
    v = yield g.rdmsr(0xdeadbeef)
    assert v == 0xdeadbeef
    yield g.wrmsr(0xdeadbeef, 0x1234)
    yield g.done()


def test_msr_filter_deny():
    """A default-deny filter sends denied accesses to user space as FILTER and unknown MSRs as
    UNKNOWN; after the filter is replaced by allow-all only the unknown MSR exits: 4 RDMSR and
    3 WRMSR exits in the trapped run."""
    vm, vcpu = create(guest_filter_deny)
    vm.enable_cap(KVM_CAP_X86_USER_SPACE_MSR, KVM_MSR_EXIT_REASON_INVAL
                  | KVM_MSR_EXIT_REASON_UNKNOWN | KVM_MSR_EXIT_REASON_FILTER)
    vm.x86_set_msr_filter(KVM_MSR_FILTER_DEFAULT_DENY, [
        (KVM_MSR_FILTER_READ, 1, MSR_IA32_POWER_CTL, b"\x01"),
        (KVM_MSR_FILTER_WRITE, 1, MSR_IA32_POWER_CTL, b"\x00"),
        (KVM_MSR_FILTER_READ, 1, MSR_SYSCALL_MASK, b"\x00"),
        (KVM_MSR_FILTER_WRITE, 1, MSR_SYSCALL_MASK, b"\x01"),
        (KVM_MSR_FILTER_READ, 1, MSR_GS_BASE, b"\x00"),
        (KVM_MSR_FILTER_READ | KVM_MSR_FILTER_WRITE, 1, 0xdeadbeef, b"\x01"),
    ])
    exits = []

    def handler(run):
        if run.exit_reason == KVM_EXIT_IO:
            vm.x86_set_msr_filter(KVM_MSR_FILTER_DEFAULT_ALLOW, [])
            exits.append("sync")
            return
        exits.append((run.exit_reason, run.msr.index, run.msr.reason))
        if run.exit_reason == KVM_EXIT_X86_RDMSR:
            run.msr.data = run.msr.index
        elif run.msr.index == MSR_IA32_POWER_CTL:
            assert run.msr.data == 0x1234
        elif run.msr.index == 0xdeadbeef:
            assert run.msr.data == 0x1234
    run_guest(vcpu, handler)
    trapped = exits[:exits.index("sync")]
    assert trapped == [
        (KVM_EXIT_X86_RDMSR, MSR_SYSCALL_MASK, KVM_MSR_EXIT_REASON_FILTER),
        (KVM_EXIT_X86_RDMSR, MSR_GS_BASE, KVM_MSR_EXIT_REASON_FILTER),
        (KVM_EXIT_X86_WRMSR, MSR_IA32_POWER_CTL, KVM_MSR_EXIT_REASON_FILTER),
        (KVM_EXIT_X86_RDMSR, 0xdeadbeef, KVM_MSR_EXIT_REASON_UNKNOWN),
        (KVM_EXIT_X86_WRMSR, 0xdeadbeef, KVM_MSR_EXIT_REASON_UNKNOWN),
    ]
    assert sum(1 for e in trapped if e[0] == KVM_EXIT_X86_RDMSR) == 3
    untrapped = exits[exits.index("sync") + 1:]
    assert untrapped == [(KVM_EXIT_X86_RDMSR, 0xdeadbeef, KVM_MSR_EXIT_REASON_UNKNOWN),
                         (KVM_EXIT_X86_WRMSR, 0xdeadbeef, KVM_MSR_EXIT_REASON_UNKNOWN)]


# -- msr_permission_bitmap --------------------------------------------------------------------------

def guest_permission_bitmap(g):
    for _ in range(3):
        fs = yield g.rdmsr(MSR_FS_BASE)
        gs = yield g.rdmsr(MSR_GS_BASE)
        yield g.sync(fs, gs)
    yield g.done()


def test_msr_permission_bitmap():
    """Swapping filters changes which MSR exits: first FS_BASE, then GS_BASE, then neither."""
    vm, vcpu = create(guest_permission_bitmap)
    vm.enable_cap(KVM_CAP_X86_USER_SPACE_MSR, KVM_MSR_EXIT_REASON_FILTER)
    read_deny = lambda msr: (KVM_MSR_FILTER_READ, 1, msr, DENY)
    filters = [[read_deny(MSR_FS_BASE)], [read_deny(MSR_GS_BASE)],
               [(KVM_MSR_FILTER_READ, 1, MSR_IA32_POWER_CTL, b"\x01")]]
    vm.x86_set_msr_filter(KVM_MSR_FILTER_DEFAULT_ALLOW, filters[0])
    seen, syncs = [], []
    while True:
        run = vcpu.run()
        if run.exit_reason == KVM_EXIT_X86_RDMSR:
            seen.append(run.msr.index)
            run.msr.data = 0x5a5a
            continue
        uc = vcpu.get_ucall()
        if uc[0] == "done":
            break
        syncs.append(uc[1])
        if len(syncs) < 3:
            vm.x86_set_msr_filter(KVM_MSR_FILTER_DEFAULT_ALLOW, filters[len(syncs)])
    assert seen == [MSR_FS_BASE, MSR_GS_BASE]
    assert syncs == [(0x5a5a, 0), (0, 0x5a5a), (0, 0)]


# -- user_exit_msr_flags ----------------------------------------------------------------------------

def test_user_exit_msr_flags():
    """Only bits 0-2 enable user-space MSR exits, only DEFAULT_DENY is a filter flag, and only
    READ|WRITE are range flags; every other bit fails with EINVAL."""
    vm = sevcore.Kvm().create_vm(KVM_X86_DEFAULT_VM)
    one = [(KVM_MSR_FILTER_READ, 1, 0, b"\x01")]
    for i in range(64):
        if 1 << i & KVM_MSR_EXIT_REASON_VALID_MASK:
            vm.enable_cap(KVM_CAP_X86_USER_SPACE_MSR, 1 << i)
        else:
            with raises_errno(EINVAL):
                vm.enable_cap(KVM_CAP_X86_USER_SPACE_MSR, 1 << i)
    for i in range(32):
        if 1 << i & KVM_MSR_FILTER_VALID_MASK:
            vm.x86_set_msr_filter(1 << i, one)
        else:
            with raises_errno(EINVAL, "KVM_X86_SET_MSR_FILTER"):
                vm.x86_set_msr_filter(1 << i, one)
    for i in range(32):
        rng = [(1 << i, 1, 0, b"\x01")]
        if 1 << i & KVM_MSR_FILTER_RANGE_VALID_MASK:
            vm.x86_set_msr_filter(KVM_MSR_FILTER_DEFAULT_ALLOW, rng)
        else:
            with raises_errno(EINVAL):
                vm.x86_set_msr_filter(KVM_MSR_FILTER_DEFAULT_ALLOW, rng)


def test_msr_filter_refusals_change_nothing():
    """A refused filter leaves the previous one installed; a default-deny filter without ranges
    and an oversized bitmap are refused with EINVAL."""
    vm, vcpu = create(guest_permission_bitmap)
    vm.x86_set_msr_filter(KVM_MSR_FILTER_DEFAULT_ALLOW, [(KVM_MSR_FILTER_READ, 1, MSR_FS_BASE,
                                                          DENY)])
    before = vm.msr_filter
    for flags, ranges in [(KVM_MSR_FILTER_DEFAULT_DENY, []),
                          (0, [(KVM_MSR_FILTER_READ, 0x601 * 8, 0, b"\xff" * 0x601)]),
                          (0, [(KVM_MSR_FILTER_READ, 1, 0, b"")] + [(0, 0, 0, b"")] * 16)]:
        with raises_errno(EINVAL):
            vm.x86_set_msr_filter(flags, ranges)
        assert vm.msr_filter is before


def test_unknown_msr_without_user_exits_gp():
    """Without KVM_CAP_X86_USER_SPACE_MSR an unknown MSR (MSR_KVM_MIGRATION_CONTROL) #GPs."""
    def guest(g):
        vec, _ = yield g.rdmsr_safe(MSR_KVM_MIGRATION_CONTROL)
        assert vec == GP_VECTOR
        vec = yield g.wrmsr_safe(MSR_KVM_MIGRATION_CONTROL, KVM_MIGRATION_READY)
        assert vec == GP_VECTOR
        yield g.done()
    vm, vcpu = create(guest)
    assert vcpu.run().ucall == ("done", ())


def test_x2apic_msrs_bypass_filter():
    """x2APIC MSRs (0x800-0x8ff) are never filtered."""
    from sevcore.kvm.msr import MSR_TYPE_R, MsrFilter
    f = MsrFilter.from_user(KVM_MSR_FILTER_DEFAULT_DENY, [(KVM_MSR_FILTER_READ, 1, 0x10, DENY)])
    assert f.allowed(0x830, MSR_TYPE_R) and not f.allowed(0x10, MSR_TYPE_R)
