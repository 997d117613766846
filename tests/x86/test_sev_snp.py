"""KVM's SEV-SNP layer: the SNP parts of tools/testing/selftests/kvm/x86/sev_smoke_test.c and
sev_init2_tests.c, KVM_SEV_SNP_LAUNCH_* (snp_launch_start, snp_launch_update through
kvm_gmem_populate and sev_gmem_post_populate, snp_launch_finish in arch/x86/kvm/svm/sev.c), the
refusals of SNP guests, and the GHCB MSR protocol's page-state change reaching user space as
KVM_EXIT_HYPERCALL (snp_begin_psc_msr)."""
from errno import EFAULT, EINVAL, EIO, ENOTTY, EPERM

import pytest

import sevcore
from sevcore.kvm import snp_guest_msg as M
from sevcore.kvm.ghcb import Ghcb, GhcbGuest, ghcb_program
from sevcore.kvm.sev import SevError
from sevcore.kvm.snp_guest import ghcb_page_state_change
from sevcore.kvm.snp_vcpu import PageStateChangeFailed
from sevcore.uapi import *
from sevcore.psp import snp_layout as SL
from sevcore.vmm.kvm_util import (addr_gpa2hva, handle_map_gpa_range, kvm_vm_free,
                                  snp_launch_update_data, vm_mem_add,
                                  vm_mem_set_private, vm_sev_create_with_one_vcpu, vm_sev_launch,
                                  vm_vcpu_add)

from support import raises_errno

X86_FEATURE_SEV_SNP = 1 << 4                     # CPUID 0x8000001F EAX
POLICY = SNP_POLICY_MASK_RSVD_MBO | SNP_POLICY_MASK_SMT


@pytest.fixture
def kvm():
    return sevcore.Kvm()


def snp_vm(kvm, npages=16, private=True):
    """An SNP VM after INIT2 with one guest_memfd slot of ``npages`` at gpa 0 (private)."""
    vm = kvm.create_vm(KVM_X86_SNP_VM)
    vm.memory_encrypt_op(KVM_SEV_INIT2)
    hva = vm_mem_add(vm, 0, 0, npages, KVM_MEM_GUEST_MEMFD)
    if private:
        vm_mem_set_private(vm, 0, npages << 12)
    return vm, hva


def sev_state(vm):
    s = vm.sev
    return (s.active, s.snp_active, s.asid, s.policy, s.snp_context, s.fd, vm.pre_fault_allowed)


# -- refusals (sev_mem_enc_ioctl, snp_launch_*, sev_vm_copy/move_enc_context_from) ---------------

def test_snp_cpuid_and_vm_type(kvm):
    """KVM reports SEV-SNP in CPUID 0x8000001F and accepts KVM_X86_SNP_VM, as sev_init2_tests
    requires of a host that has it."""
    assert kvm.check_extension(KVM_CAP_VM_TYPES) & 1 << KVM_X86_SNP_VM
    vm = kvm.create_vm(KVM_X86_SNP_VM)
    vcpu = vm.create_vcpu(0)
    assert vcpu.cpuid_entry(0x8000001F)["eax"] & X86_FEATURE_SEV_SNP


@pytest.mark.parametrize("cmd", [KVM_SEV_INIT, KVM_SEV_ES_INIT, KVM_SEV_LAUNCH_START,
                                 KVM_SEV_LAUNCH_UPDATE_DATA, KVM_SEV_LAUNCH_UPDATE_VMSA,
                                 KVM_SEV_LAUNCH_MEASURE, KVM_SEV_LAUNCH_FINISH,
                                 KVM_SEV_GUEST_STATUS, KVM_SEV_DBG_DECRYPT, KVM_SEV_SEND_START,
                                 KVM_SEV_RECEIVE_START, KVM_SEV_GET_ATTESTATION_REPORT,
                                 KVM_SEV_INIT2])
def test_legacy_commands_refused(kvm, cmd):
    """Once INIT2 made the VM an SNP guest, every command below KVM_SEV_SNP_LAUNCH_START is
    EPERM and changes nothing."""
    vm, _ = snp_vm(kvm)
    before = sev_state(vm)
    with raises_errno(EPERM):
        vm.memory_encrypt_op(cmd)
    assert sev_state(vm) == before


@pytest.mark.parametrize("type", [KVM_X86_SEV_VM, KVM_X86_SEV_ES_VM])
def test_snp_commands_on_other_guests(kvm, type):
    """SNP LAUNCH_START and LAUNCH_FINISH are ENOTTY and LAUNCH_UPDATE is EINVAL on an SEV or
    SEV-ES guest."""
    vm = kvm.create_vm(type)
    vm.memory_encrypt_op(KVM_SEV_INIT2)
    with raises_errno(ENOTTY):
        vm.memory_encrypt_op(KVM_SEV_SNP_LAUNCH_START, policy=POLICY)
    with raises_errno(EINVAL):
        vm.memory_encrypt_op(KVM_SEV_SNP_LAUNCH_UPDATE, len=4096,
                             type=KVM_SEV_SNP_PAGE_TYPE_NORMAL)
    with raises_errno(ENOTTY):
        vm.memory_encrypt_op(KVM_SEV_SNP_LAUNCH_FINISH)


def test_launch_order_and_struct_checks(kvm):
    """Before LAUNCH_START, UPDATE and FINISH are EINVAL; a NULL struct is EFAULT; a policy
    without the must-be-one bit, with a bit KVM does not know (MIGRATE_MA included) or nonzero
    flags is EINVAL; none of them changes the VM."""
    vm, _ = snp_vm(kvm)
    before = sev_state(vm)
    for cmd in (KVM_SEV_SNP_LAUNCH_UPDATE, KVM_SEV_SNP_LAUNCH_FINISH):
        with raises_errno(EINVAL):
            vm.memory_encrypt_op(cmd)
    with raises_errno(EFAULT):
        vm.memory_encrypt_op(KVM_SEV_SNP_LAUNCH_START, data=None)
    for fields in (dict(policy=0), dict(policy=SNP_POLICY_MASK_SMT),
                   dict(policy=POLICY | SNP_POLICY_MASK_MIGRATE_MA),
                   dict(policy=POLICY | 1 << 63), dict(policy=POLICY, flags=1)):
        with raises_errno(EINVAL):
            vm.memory_encrypt_op(KVM_SEV_SNP_LAUNCH_START, **fields)
    assert sev_state(vm) == before


def test_struct_fields_checked_before_anything(kvm):
    """A byte field of the wrong size, an unknown field or a value too wide for its __u8 is a
    TypeError/ValueError before the command runs."""
    vm, _ = snp_vm(kvm)
    with pytest.raises(TypeError):
        vm.memory_encrypt_op(KVM_SEV_SNP_LAUNCH_START, policy=POLICY, gosvw=b"short")
    with pytest.raises(TypeError):
        vm.memory_encrypt_op(KVM_SEV_SNP_LAUNCH_START, policy=POLICY, handle=1)
    with pytest.raises(ValueError):
        vm.memory_encrypt_op(KVM_SEV_SNP_LAUNCH_UPDATE, type=256)
    assert vm.sev.snp_context is None


def test_no_mirror_or_move_of_snp(kvm):
    """An SNP guest can be neither mirrored nor moved (EINVAL), and stays whole."""
    src, _ = snp_vm(kvm)
    before = sev_state(src)
    for cap in (KVM_CAP_VM_COPY_ENC_CONTEXT_FROM, KVM_CAP_VM_MOVE_ENC_CONTEXT_FROM):
        dst = kvm.create_vm(KVM_X86_SNP_VM if cap == KVM_CAP_VM_MOVE_ENC_CONTEXT_FROM
                            else KVM_X86_DEFAULT_VM)
        with raises_errno(EINVAL):
            dst.enable_cap(cap, src.fd)
        assert not dst.sev_guest
    assert sev_state(src) == before and not src.dead


# -- the launch -------------------------------------------------------------------------------------

def test_launch_start_creates_context(kvm):
    """LAUNCH_START makes a guest context bound to the VM's ASID; a second one is EINVAL."""
    vm, _ = snp_vm(kvm)
    out = vm.memory_encrypt_op(KVM_SEV_SNP_LAUNCH_START, policy=POLICY)
    assert out.error == 0 and vm.sev.snp_context is not None and vm.sev.policy == POLICY
    assert vm.host.umc.has_key(vm.sev.asid)
    with raises_errno(EINVAL):
        vm.memory_encrypt_op(KVM_SEV_SNP_LAUNCH_START, policy=POLICY)


def test_launch_update_copies_from_source(kvm):
    """LAUNCH_UPDATE copies the source bytes into the guest_memfd page (not in place): the
    VMM's page keeps its plaintext, the guest reads it back through its private mapping, and
    the struct comes back advanced to the end."""
    vm, hva = snp_vm(kvm, 4)
    vm.memory_encrypt_op(KVM_SEV_SNP_LAUNCH_START, policy=POLICY)
    payload = bytes(range(256)) * 16 * 4
    kvm.write(hva, payload)
    out = vm.memory_encrypt_op(KVM_SEV_SNP_LAUNCH_UPDATE, gfn_start=0, uaddr=hva, len=4 << 12,
                               type=KVM_SEV_SNP_PAGE_TYPE_NORMAL)
    assert (out.gfn_start, out.uaddr, out.len) == (4, hva + (4 << 12), 0)
    assert kvm.read(hva, len(payload)) == payload
    slot = vm.gfn_to_memslot(0)
    pfn = slot.gmem_file.page_cache.lookup(0)
    entry = vm.host.rmp.entry(pfn)
    assert entry.assigned and entry.asid == vm.sev.asid and entry.gpa == 0
    assert vm.host.mem.frames[pfn << 12:(pfn << 12) + 16].tobytes() != payload[:16]


def test_launch_update_refusals_change_nothing(kvm):
    """A shared gfn, a gfn outside any guest_memfd slot, an unaligned len, flags, the VMSA
    type and an unreadable source are refused; a page already populated is EIO (EEXIST
    below); the struct and the RMP stay as they were."""
    vm, hva = snp_vm(kvm, 4)
    vm.memory_encrypt_op(KVM_SEV_SNP_LAUNCH_START, policy=POLICY)
    vm.set_memory_attributes(3 << 12, 4096, 0)
    base = dict(gfn_start=0, uaddr=hva, len=4096, type=KVM_SEV_SNP_PAGE_TYPE_NORMAL)
    assigned = vm.host.rmp.assigned          # the context and the guest-request response page
    for change, err in ((dict(gfn_start=3), EIO), (dict(gfn_start=100), EINVAL),
                        (dict(len=100), EINVAL), (dict(flags=1), EINVAL),
                        (dict(type=2), EINVAL), (dict(uaddr=0x1000), EIO)):
        with raises_errno(err):
            vm.memory_encrypt_op(KVM_SEV_SNP_LAUNCH_UPDATE, **dict(base, **change))
    assert vm.host.rmp.assigned == assigned
    vm.memory_encrypt_op(KVM_SEV_SNP_LAUNCH_UPDATE, **base)
    with raises_errno(EIO):
        vm.memory_encrypt_op(KVM_SEV_SNP_LAUNCH_UPDATE, **base)


def test_launch_update_bad_sev_fd(kvm):
    """A sev_fd that is not /dev/sev fails the first page's firmware call: EIO, as every
    kvm_gmem_populate failure, the frame back to the hypervisor and no page prepared."""
    vm, hva = snp_vm(kvm, 4)
    vm.memory_encrypt_op(KVM_SEV_SNP_LAUNCH_START, policy=POLICY)
    assigned = vm.host.rmp.assigned
    with raises_errno(EIO):
        vm.memory_encrypt_op(KVM_SEV_SNP_LAUNCH_UPDATE, sev_fd=vm.fd, gfn_start=0, uaddr=hva,
                             len=4 << 12, type=KVM_SEV_SNP_PAGE_TYPE_NORMAL)
    assert vm.host.rmp.assigned == assigned and not len(vm.gfn_to_memslot(0).gmem_file.prepared)


def test_launch_update_partial_progress(kvm):
    """A range whose last page is shared stops there: the pages before it are done and
    written back, and the call succeeds, as kvm_gmem_populate returns the count."""
    vm, hva = snp_vm(kvm, 4)
    vm.memory_encrypt_op(KVM_SEV_SNP_LAUNCH_START, policy=POLICY)
    vm.set_memory_attributes(2 << 12, 4096, 0)
    out = vm.memory_encrypt_op(KVM_SEV_SNP_LAUNCH_UPDATE, gfn_start=0, uaddr=hva, len=4 << 12,
                               type=KVM_SEV_SNP_PAGE_TYPE_NORMAL)
    assert (out.gfn_start, out.uaddr, out.len) == (2, hva + (2 << 12), 2 << 12)
    zero = vm.memory_encrypt_op(KVM_SEV_SNP_LAUNCH_UPDATE, gfn_start=3, uaddr=12345,
                                len=4096, type=KVM_SEV_SNP_PAGE_TYPE_ZERO)
    assert (zero.gfn_start, zero.uaddr, zero.len) == (4, 12345, 0)


def guest_snp_code(g):
    """sev_smoke_test's guest_snp_code: SEV, SEV-ES and SNP all on, then TERM_REQ."""
    status = yield g.rdmsr(MSR_AMD64_SEV)
    assert status & MSR_AMD64_SEV_ENABLED and status & MSR_AMD64_SEV_ES_ENABLED
    assert status & MSR_AMD64_SEV_SNP_ENABLED
    yield g.wrmsr(MSR_AMD64_SEV_ES_GHCB, GHCB_MSR_TERM_REQ)
    yield g.vmgexit()


@pytest.mark.parametrize("policy", [POLICY, POLICY | SNP_POLICY_MASK_DEBUG])
def test_sev_smoke_snp(kvm, policy):
    """sev_smoke_test's SNP variant: the launched guest sees SNP in SEV_STATUS and terminates
    through the GHCB MSR protocol; its registers are protected afterwards."""
    vm, vcpu = vm_sev_create_with_one_vcpu(kvm, KVM_X86_SNP_VM, guest_snp_code)
    vm_sev_launch(vm, policy)
    assert vcpu.guest_state_protected and vm.pre_fault_allowed
    run = vcpu.run()
    assert run.exit_reason == KVM_EXIT_SYSTEM_EVENT, vcpu.guest_exception
    assert run.system_event.type == KVM_SYSTEM_EVENT_SEV_TERM
    assert run.system_event.data[0] == GHCB_MSR_TERM_REQ
    with raises_errno(EINVAL):
        vcpu.get_regs()


def test_snp_vcpu_needs_launch(kvm):
    """KVM_RUN of an SNP vCPU whose VMSA was never measured fails its entry."""
    vm, vcpu = vm_sev_create_with_one_vcpu(kvm, KVM_X86_SNP_VM, guest_snp_code)
    assert vcpu.run().exit_reason == KVM_EXIT_FAIL_ENTRY


# -- page-state change through the GHCB MSR protocol --------------------------------------------------

def guest_psc_code(g, gpa, npages):
    """Make pages shared, write them (plaintext), make them private again, then terminate."""
    yield g.page_state_change(gpa, npages, private=False)
    yield g.write(gpa, b"shared!")
    yield g.page_state_change(gpa, npages, private=True)
    yield g.wrmsr(MSR_AMD64_SEV_ES_GHCB, GHCB_MSR_TERM_REQ)
    yield g.vmgexit()


def test_psc_msr_reaches_user_space(kvm):
    """Each page of a page-state change is one KVM_EXIT_HYPERCALL (KVM_HC_MAP_GPA_RANGE, one
    4 KiB page, DECRYPTED then ENCRYPTED); the VMM converts it and the guest goes on."""
    gpa = 8 << 12
    vm, vcpu = vm_sev_create_with_one_vcpu(kvm, KVM_X86_SNP_VM, guest_psc_code, gpa, 2)
    vm_sev_launch(vm, POLICY)
    seen = []
    while True:
        run = vcpu.run()
        if run.exit_reason != KVM_EXIT_HYPERCALL:
            break
        seen.append((run.hypercall.args[0], run.hypercall.args[1], run.hypercall.args[2]))
        handle_map_gpa_range(vm, run)
    assert run.exit_reason == KVM_EXIT_SYSTEM_EVENT, vcpu.guest_exception
    dec = KVM_MAP_GPA_RANGE_DECRYPTED | KVM_MAP_GPA_RANGE_PAGE_SZ_4K
    enc = KVM_MAP_GPA_RANGE_ENCRYPTED | KVM_MAP_GPA_RANGE_PAGE_SZ_4K
    assert seen == [(gpa, 1, dec), (gpa + 4096, 1, dec), (gpa, 1, enc), (gpa + 4096, 1, enc)]
    assert vm.mem_is_private(8) and vm.mem_is_private(9)


def test_psc_refused_by_vmm(kvm):
    """A non-zero hypercall.ret answers PSC_RESP_ERROR: the guest sees the refusal."""
    vm, vcpu = vm_sev_create_with_one_vcpu(kvm, KVM_X86_SNP_VM, guest_psc_code, 8 << 12, 1)
    vm_sev_launch(vm, POLICY)
    run = vcpu.run()
    assert run.exit_reason == KVM_EXIT_HYPERCALL
    run.hypercall.ret = 1
    run = vcpu.run()
    assert run.exit_reason == KVM_EXIT_SHUTDOWN
    assert isinstance(vcpu.guest_exception, PageStateChangeFailed)
    assert vcpu.guest_exception.response == GHCB_MSR_PSC_RESP_ERROR


def guest_msr_requests(g, reqs, out):
    """Each GHCB MSR request in turn, its answer appended to ``out``, then TERM_REQ."""
    for r in reqs:
        yield g.wrmsr(MSR_AMD64_SEV_ES_GHCB, r)
        yield g.vmgexit()
        out.append((yield g.rdmsr(MSR_AMD64_SEV_ES_GHCB)))
    yield g.wrmsr(MSR_AMD64_SEV_ES_GHCB, GHCB_MSR_TERM_REQ)
    yield g.vmgexit()


def test_snp_msr_requests_without_exit(kvm):
    """PREF_GPA answers "no preference", REG_GPA echoes the gfn, and a page-state change with
    a bad operation or without KVM_HC_MAP_GPA_RANGE exits answers PSC_RESP_ERROR, all without
    leaving KVM_RUN."""
    reqs = [GHCB_MSR_PREF_GPA_REQ, GHCB_MSR_REG_GPA_REQ_VAL(0x42),
            GHCB_MSR_PSC_REQ_GFN(3, 7), GHCB_MSR_PSC_REQ_GFN(3, SNP_PAGE_STATE_SHARED)]
    out = []
    vm, vcpu = vm_sev_create_with_one_vcpu(kvm, KVM_X86_SNP_VM, guest_msr_requests, reqs, out)
    vm_sev_launch(vm, POLICY)
    vm.enable_cap(KVM_CAP_EXIT_HYPERCALL, 0)
    assert vcpu.run().exit_reason == KVM_EXIT_SYSTEM_EVENT
    assert out[0] == GHCB_MSR_PREF_GPA_NONE << 12 | GHCB_MSR_PREF_GPA_RESP
    assert out[1] == 0x42 << 12 | GHCB_MSR_REG_GPA_RESP and vcpu.ghcb_registered_gpa == 0x42000
    assert out[2] == out[3] == GHCB_MSR_PSC_RESP_ERROR


# -- the CPUID page, PVALIDATE, guest_memfd's hooks ------------------------------------------------

def cpuid_page(edx):
    """A CPUID page with one function, 0x80000001, its EDX as given."""
    head = SL.snp_cpuid_table.pack(count=1)
    fn = SL.snp_cpuid_fn.pack(eax_in=0x80000001, ecx_in=0, edx=edx)
    return (head + fn).ljust(4096, b"\0")


def test_cpuid_page_corrected_and_copied_back(kvm):
    """A CPUID page the firmware refuses (INVALID_PARAM) comes back in the source buffer with
    the values the firmware expects; the call is EIO with the status and the frame is the
    hypervisor's again; a page the firmware accepts is measured."""
    vm, hva = snp_vm(kvm, 2)
    vm.memory_encrypt_op(KVM_SEV_SNP_LAUNCH_START, policy=POLICY)
    bad = cpuid_page(0xFFFFFFFF)
    kvm.write(hva, bad)
    with pytest.raises(SevError) as e:
        vm.memory_encrypt_op(KVM_SEV_SNP_LAUNCH_UPDATE, gfn_start=0, uaddr=hva, len=4096,
                             type=KVM_SEV_SNP_PAGE_TYPE_CPUID)
    assert e.value.errno == EIO and e.value.fw_error == SEV_RET_INVALID_PARAM
    fixed = kvm.read(hva, 4096)
    assert fixed != bad and fixed == cpuid_page(0x2FD3FBFF)
    pfn = vm.gfn_to_memslot(0).gmem_file.page_cache.lookup(0)
    assert not vm.host.rmp.entry(pfn).assigned
    out = vm.memory_encrypt_op(KVM_SEV_SNP_LAUNCH_UPDATE, gfn_start=0, uaddr=hva, len=4096,
                               type=KVM_SEV_SNP_PAGE_TYPE_CPUID)
    assert out.len == 0 and vm.host.rmp.entry(pfn).assigned


def guest_pvalidate(g, out):
    """PVALIDATE a launched page (already valid), a page never touched (twice), rescind it."""
    out.append((yield g.pvalidate(0, 1, True)))
    out.append((yield g.pvalidate(12 << 12, 2, True)))
    out.append((yield g.pvalidate(12 << 12, 1, True)))
    out.append((yield g.pvalidate(12 << 12, 1, False)))
    yield g.wrmsr(MSR_AMD64_SEV_ES_GHCB, GHCB_MSR_TERM_REQ)
    yield g.vmgexit()


def test_pvalidate(kvm):
    """PVALIDATE of a page the launch validated reports no update (CF); a page first touched
    by it is faulted in from guest_memfd, assigned by sev_gmem_prepare and validated."""
    out = []
    vm, vcpu = vm_sev_create_with_one_vcpu(kvm, KVM_X86_SNP_VM, guest_pvalidate, out)
    vm_sev_launch(vm, POLICY)
    assert vcpu.run().exit_reason == KVM_EXIT_SYSTEM_EVENT, vcpu.guest_exception
    assert out == [PVALIDATE_FAIL_NOUPDATE, PVALIDATE_FAIL_NOUPDATE, PVALIDATE_FAIL_NOUPDATE,
                   0]


def test_pvalidate_prepares_unpopulated_page(kvm):
    """A private gfn the launch did not populate is assigned to the guest (not validated) by
    the fault PVALIDATE takes, then validated."""
    out = []
    vm = kvm.create_vm(KVM_X86_SNP_VM)
    vm.memory_encrypt_op(KVM_SEV_INIT2)
    vm_mem_add(vm, 0, 0, 16, KVM_MEM_GUEST_MEMFD)
    vcpu = vm_vcpu_add(vm, 0)
    vcpu.set_guest_code(guest_pvalidate, out)
    vm.memory_encrypt_op(KVM_SEV_SNP_LAUNCH_START, policy=POLICY)
    vm_mem_set_private(vm, 0, 16 << 12)
    hva = addr_gpa2hva(vm, 0)
    snp_launch_update_data(vm, 0, hva, 4096, KVM_SEV_SNP_PAGE_TYPE_NORMAL)
    vm.memory_encrypt_op(KVM_SEV_SNP_LAUNCH_FINISH)
    assert vcpu.run().exit_reason == KVM_EXIT_SYSTEM_EVENT, vcpu.guest_exception
    assert out == [PVALIDATE_FAIL_NOUPDATE, 0, PVALIDATE_FAIL_NOUPDATE, 0]
    pfn = vm.gfn_to_memslot(0).gmem_file.page_cache.lookup(13)
    e = vm.host.rmp.entry(pfn)
    assert e.assigned and e.validated and e.asid == vm.sev.asid and e.gpa == 13 << 12


def guest_pvalidate_range(g, out):
    """PVALIDATE a range of never-touched pages (each faulted in), again (CF on the first),
    rescind it, rescind it again (CF)."""
    for validate in (True, True, False, False):
        out.append((yield g.pvalidate(4 << 12, 12, validate)))
    yield g.wrmsr(MSR_AMD64_SEV_ES_GHCB, GHCB_MSR_TERM_REQ)
    yield g.vmgexit()


def test_pvalidate_range_faults_in_and_batches(kvm):
    """A range PVALIDATE over pages not yet mapped faults each one in; over mapped pages it
    runs as one batch with the same results: CF stops it at the first page, every page ends
    in the state asked."""
    out = []
    vm = kvm.create_vm(KVM_X86_SNP_VM)
    vm.memory_encrypt_op(KVM_SEV_INIT2)
    hva = vm_mem_add(vm, 0, 0, 16, KVM_MEM_GUEST_MEMFD)
    vcpu = vm_vcpu_add(vm, 0)
    vcpu.set_guest_code(guest_pvalidate_range, out)
    vm.memory_encrypt_op(KVM_SEV_SNP_LAUNCH_START, policy=POLICY)
    vm_mem_set_private(vm, 0, 16 << 12)
    snp_launch_update_data(vm, 0, hva, 4096, KVM_SEV_SNP_PAGE_TYPE_NORMAL)
    vm.memory_encrypt_op(KVM_SEV_SNP_LAUNCH_FINISH)
    assert vcpu.run().exit_reason == KVM_EXIT_SYSTEM_EVENT, vcpu.guest_exception
    assert out == [0, PVALIDATE_FAIL_NOUPDATE, 0, PVALIDATE_FAIL_NOUPDATE]
    cache = vm.gfn_to_memslot(0).gmem_file.page_cache
    entries = [vm.host.rmp.entry(cache.lookup(gfn)) for gfn in range(4, 16)]
    assert all(e.assigned and not e.validated and e.gpa == gfn << 12
               for gfn, e in zip(range(4, 16), entries))


def test_launch_update_in_chunks_measures_as_one_pass(kvm, monkeypatch):
    """LAUNCH_UPDATE in chunks of 3 pages gives the launch digest and progress of one pass,
    and stops at a shared page in a later chunk with the pages before it done."""
    from sevcore.kvm import sev_snp

    def launch(chunk):
        monkeypatch.setattr(sev_snp, "POPULATE_CHUNK", chunk)
        vm, hva = snp_vm(kvm, 10)
        vm.memory_encrypt_op(KVM_SEV_SNP_LAUNCH_START, policy=POLICY)
        kvm.write(hva, bytes(range(251)) * 163)
        vm.set_memory_attributes(8 << 12, 4096, 0)
        out = vm.memory_encrypt_op(KVM_SEV_SNP_LAUNCH_UPDATE, gfn_start=0, uaddr=hva,
                                   len=10 << 12, type=KVM_SEV_SNP_PAGE_TYPE_NORMAL)
        ld = vm.host.psp.snp_guest(vm.sev.snp_context).ld
        return (out.gfn_start, out.uaddr - hva, out.len), ld
    chunked, whole = launch(3), launch(2048)
    assert chunked == whole and chunked[0] == (8, 8 << 12, 2 << 12)


def test_punch_hole_returns_frames_to_host(kvm):
    """Punching a hole in guest_memfd gives the guest's frames back to the hypervisor in the
    RMP before freeing them (sev_gmem_invalidate), and the page may be populated again."""
    vm, hva = snp_vm(kvm, 4)
    vm.memory_encrypt_op(KVM_SEV_SNP_LAUNCH_START, policy=POLICY)
    snp_launch_update_data(vm, 0, hva, 4 << 12, KVM_SEV_SNP_PAGE_TYPE_NORMAL)
    f = vm.gfn_to_memslot(0).gmem_file
    pfn = f.page_cache.lookup(1)
    assert vm.host.rmp.entry(pfn).assigned
    f.fallocate(FALLOC_FL_KEEP_SIZE | FALLOC_FL_PUNCH_HOLE, 4096, 4096)
    assert not vm.host.rmp.entry(pfn).assigned and f.page_cache.lookup(1) is None
    out = vm.memory_encrypt_op(KVM_SEV_SNP_LAUNCH_UPDATE, gfn_start=1, uaddr=hva + 4096,
                               len=4096, type=KVM_SEV_SNP_PAGE_TYPE_NORMAL)
    assert out.len == 0


def test_teardown_returns_every_frame(kvm):
    """Destroying a launched SNP VM (decommission, VMSAs, bounce pages, guest_memfd) leaves no
    frame assigned in the RMP and frees its ASID for reuse."""
    vm, vcpu = vm_sev_create_with_one_vcpu(kvm, KVM_X86_SNP_VM, guest_snp_code)
    vm_sev_launch(vm, POLICY)
    rmp = vm.host.rmp
    assert rmp.assigned > 16
    slot = vm.gfn_to_memslot(0)
    slot.gmem_file.close()
    kvm_vm_free(vm)
    assert not vm.alive and rmp.assigned == 0


def guest_mismatch(g):
    """A C-bit (private) write to a page the VMM has made shared."""
    yield g.write((8 << 12) | 1 << 51, b"x")


def test_private_access_to_shared_gfn_is_memory_fault(kvm):
    """An SNP guest's private access to a gfn whose attribute is shared exits with
    KVM_EXIT_MEMORY_FAULT (private flag) and EFAULT, as an implicit conversion request."""
    vm, vcpu = vm_sev_create_with_one_vcpu(kvm, KVM_X86_SNP_VM, guest_mismatch)
    vm_sev_launch(vm, POLICY)
    vm.set_memory_attributes(8 << 12, 4096, 0)
    with raises_errno(EFAULT):
        vcpu.run()
    mf = vcpu.kvm_run.memory_fault
    assert vcpu.kvm_run.exit_reason == KVM_EXIT_MEMORY_FAULT
    assert (mf.gpa, mf.size, mf.flags) == (8 << 12, 4096, KVM_MEMORY_EXIT_FLAG_PRIVATE)


# -- private-memory conversions on an SNP VM (private_mem_conversions_test.c) -----------------------

CBIT = 1 << 51
RANGES = [(0, 1), (1, 2), (4, 4)]           # (first page, pages) from BASE
BASE = 4 << 12


def guest_conversions(g, out):
    """For each range: private data, convert to shared, shared data read back, convert to
    private, the private data read back (the VMM did not punch the pages)."""
    for first, n in RANGES:
        gpa, size = BASE + (first << 12), n << 12
        yield g.write(gpa | CBIT, bytes([0xa0 + first]) * size)
        yield g.page_state_change(gpa, n, private=False)
        yield g.write(gpa, bytes([0x50 + first]) * size)
        assert (yield g.read(gpa, size)) == bytes([0x50 + first]) * size
        yield g.page_state_change(gpa, n, private=True)
        out.append((yield g.read(gpa | CBIT, size)) == bytes([0xa0 + first]) * size)
    yield g.wrmsr(MSR_AMD64_SEV_ES_GHCB, GHCB_MSR_TERM_REQ)
    yield g.vmgexit()


def test_private_mem_conversions(kvm):
    """The VMM converts each page on the guest's page-state change; at every exit its view of
    shared pages holds the guest's shared data and never the private data, and private data
    survives a round trip through shared when the VMM keeps the guest_memfd pages."""
    out = []
    vm, vcpu = vm_sev_create_with_one_vcpu(kvm, KVM_X86_SNP_VM, guest_conversions, out)
    vm_sev_launch(vm, POLICY)
    hva = addr_gpa2hva(vm, 0)
    exits = 0
    while True:
        run = vcpu.run()
        if run.exit_reason != KVM_EXIT_HYPERCALL:
            break
        exits += 1
        gpa = run.hypercall.args[0]
        if run.hypercall.args[2] & KVM_MAP_GPA_RANGE_ENCRYPTED:
            first = (gpa - BASE) >> 12
            owner = max(f for f, n in RANGES if f <= first)
            assert kvm.read(hva + gpa, 4096) == bytes([0x50 + owner]) * 4096
        handle_map_gpa_range(vm, run)
    assert run.exit_reason == KVM_EXIT_SYSTEM_EVENT, vcpu.guest_exception
    assert exits == 2 * sum(n for _, n in RANGES) and out == [True] * len(RANGES)
    frames = vm.host.mem.frames
    f = vm.gfn_to_memslot(0).gmem_file
    for first, n in RANGES:
        for i in range(first, first + n):
            pfn = f.page_cache.lookup(4 + i)
            assert bytes([0xa0 + first]) * 16 not in frames[pfn << 12:(pfn + 1) << 12].tobytes()


# -- page-state change through the GHCB page (snp_begin_psc) ------------------------------------------

GHCB_GFN = 15


def guest_ghcb_psc(g, out):
    """Share its GHCB page (MSR protocol), negotiate, register it, then make pages 8..11 shared
    and private again through the GHCB page, writing shared data in between."""
    yield g.page_state_change(GHCB_GFN << 12, 1, private=False)
    ghcb = GhcbGuest(GHCB_GFN << 12)
    yield from ghcb.negotiate(g)
    yield from ghcb.register(g)
    out.append((yield from ghcb_page_state_change(g, ghcb, 8 << 12, 4, False)))
    yield g.write(8 << 12, b"via the GHCB page")
    out.append((yield from ghcb_page_state_change(g, ghcb, 8 << 12, 4, True)))
    yield g.wrmsr(MSR_AMD64_SEV_ES_GHCB, GHCB_MSR_TERM_REQ)
    yield g.vmgexit()


def test_psc_through_ghcb_page(kvm):
    """A GHCB-page page-state change of 4 adjacent pages is one KVM_EXIT_HYPERCALL for the
    whole run (snp_begin_psc merges adjacent entries); the VMM converts the range and the
    guest sees every entry done."""
    out = []
    vm, vcpu = vm_sev_create_with_one_vcpu(kvm, KVM_X86_SNP_VM, guest_ghcb_psc, out)
    vm_sev_launch(vm, POLICY)
    seen = []
    while True:
        run = vcpu.run()
        if run.exit_reason != KVM_EXIT_HYPERCALL:
            break
        seen.append(tuple(run.hypercall.args[:3]))
        handle_map_gpa_range(vm, run)
    assert run.exit_reason == KVM_EXIT_SYSTEM_EVENT, vcpu.guest_exception
    dec = KVM_MAP_GPA_RANGE_DECRYPTED | KVM_MAP_GPA_RANGE_PAGE_SZ_4K
    enc = KVM_MAP_GPA_RANGE_ENCRYPTED | KVM_MAP_GPA_RANGE_PAGE_SZ_4K
    assert seen == [(GHCB_GFN << 12, 1, dec), (8 << 12, 4, dec), (8 << 12, 4, enc)]
    assert out == [4, 4] and all(vm.mem_is_private(g) for g in range(8, 12))
    assert kvm.read(addr_gpa2hva(vm, 8 << 12), 17) == b"via the GHCB page"


def test_psc_through_ghcb_page_refused(kvm):
    """Without KVM_HC_MAP_GPA_RANGE exits the request ends with VMGEXIT_PSC_ERROR_GENERIC in
    SW_EXITINFO2 and no exit to user space."""
    out = []
    vm, vcpu = vm_sev_create_with_one_vcpu(kvm, KVM_X86_SNP_VM, guest_ghcb_psc, out)
    vm_sev_launch(vm, POLICY)
    run = vcpu.run()
    handle_map_gpa_range(vm, run)            # the MSR-protocol request for the GHCB page
    vm.enable_cap(KVM_CAP_EXIT_HYPERCALL, 0)
    assert vcpu.run().exit_reason == KVM_EXIT_SHUTDOWN
    assert isinstance(vcpu.guest_exception, PageStateChangeFailed)
    assert vcpu.guest_exception.response == VMGEXIT_PSC_ERROR_GENERIC


# -- the registered GHCB (GHCB_MSR_REG_GPA_REQ, sev_handle_vmgexit) ------------------------------------

def guest_ghcb_unregistered(g, register_gfn):
    """Share its GHCB page, negotiate, register ``register_gfn`` (None: nothing), then ask for
    the hypervisor features through the GHCB page at GHCB_GFN."""
    yield g.page_state_change(GHCB_GFN << 12, 1, private=False)
    ghcb = GhcbGuest(GHCB_GFN << 12)
    yield from ghcb.negotiate(g)
    if register_gfn is not None:
        yield from GhcbGuest(register_gfn << 12).register(g)
    yield from ghcb.hv_call(g, Ghcb(), SVM_VMGEXIT_HV_FEATURES, 0, 0)


@pytest.mark.parametrize("register_gfn", [None, GHCB_GFN - 1])
def test_unregistered_ghcb_is_refused(kvm, register_gfn):
    """An SNP guest's VMGEXIT through a GHCB page it did not register (none, or another gfn)
    fails KVM_RUN with EINVAL after KVM has mapped and synced the page (its valid bitmap
    cleared), and keeps failing."""
    vm, vcpu = vm_sev_create_with_one_vcpu(kvm, KVM_X86_SNP_VM, guest_ghcb_unregistered,
                                           register_gfn)
    vm_sev_launch(vm, POLICY)
    run = vcpu.run()
    handle_map_gpa_range(vm, run)            # the MSR-protocol request for the GHCB page
    with raises_errno(EINVAL, "KVM_RUN"):
        vcpu.run()
    page = Ghcb(kvm.read(addr_gpa2hva(vm, GHCB_GFN << 12), 4096))
    assert page.valid_bitmap == 0 and page.get("sw_exit_code") == SVM_VMGEXIT_HV_FEATURES
    with raises_errno(EINVAL, "KVM_RUN"):
        vcpu.run()
    want = None if register_gfn is None else register_gfn << 12
    assert vcpu.ghcb_registered_gpa == want


def guest_cpuid_via_ghcb(g, out):
    """CPUID, which the #VC handler of ghcb_program sends through its GHCB page."""
    out.append((yield g.cpuid(0x8000001F, 0)))
    yield g.wrmsr(MSR_AMD64_SEV_ES_GHCB, GHCB_MSR_TERM_REQ)
    yield g.vmgexit()


def test_ghcb_program_registers_its_ghcb_on_snp(kvm):
    """A program under ghcb_program on an SNP guest registers its GHCB (REG_GPA_REQ) after
    negotiating, so its #VC exits through the page are served."""
    out = []
    vm, vcpu = vm_sev_create_with_one_vcpu(
        kvm, KVM_X86_SNP_VM, ghcb_program(guest_cpuid_via_ghcb, GHCB_GFN << 12), out)
    vm_sev_launch(vm, POLICY)
    vm.set_memory_attributes(GHCB_GFN << 12, 4096, 0)
    assert vcpu.run().exit_reason == KVM_EXIT_SYSTEM_EVENT, vcpu.guest_exception
    assert vcpu.ghcb_registered_gpa == GHCB_GFN << 12
    assert out[0][0] & X86_FEATURE_SEV_SNP


# -- SNP guest requests through the GHCB page (snp_handle_guest_req) -------------------------------

def guest_ghcb_report(g, user_data, out):
    """The guest driver's report request built by hand and sent with the GHCB page's
    SVM_VMGEXIT_GUEST_REQUEST: secrets page read, request sealed under VMPCK0, response
    opened."""
    yield g.page_state_change(GHCB_GFN << 12, 1, private=False)
    yield g.page_state_change(13 << 12, 2, private=False)         # request, response pages
    ghcb = GhcbGuest(GHCB_GFN << 12)
    yield from ghcb.negotiate(g)
    yield from ghcb.register(g)
    secrets = yield g.read((6 << 12) | CBIT, 4096)
    vmpck = secrets[M.VMPCK_OFFSET:M.VMPCK_OFFSET + 32]
    body = SL.snp_report_req.pack(user_data=user_data, vmpl=0)
    yield g.write(13 << 12, M.build_request(vmpck, 1, SNP_MSG_REPORT_REQ, body))
    resp = yield from ghcb.hv_call(g, Ghcb(), SVM_VMGEXIT_GUEST_REQUEST, 13 << 12, 14 << 12)
    out.append(resp.get("sw_exit_info_2"))
    page = yield g.read(14 << 12, 4096)
    rsp = M.open_response(vmpck, page, 1, SNP_MSG_REPORT_REQ, 4000)
    out.append(SL.snp_report_resp.unpack(rsp[:SL.snp_report_resp.size]))
    yield g.wrmsr(MSR_AMD64_SEV_ES_GHCB, GHCB_MSR_TERM_REQ)
    yield g.vmgexit()


def test_guest_request_through_ghcb_page(kvm):
    """SVM_VMGEXIT_GUEST_REQUEST through the GHCB page reaches the firmware through KVM's
    bounce pages: SW_EXITINFO2 is 0 and the response carries a report of the user data."""
    out = []
    vm = kvm.create_vm(KVM_X86_SNP_VM)
    vm.memory_encrypt_op(KVM_SEV_INIT2)
    hva = vm_mem_add(vm, 0, 0, 16, KVM_MEM_GUEST_MEMFD)
    vcpu = vm_vcpu_add(vm, 0)
    vcpu.set_guest_code(guest_ghcb_report, b"u" * 64, out)
    vm.enable_cap(KVM_CAP_EXIT_HYPERCALL, 1 << KVM_HC_MAP_GPA_RANGE)
    vm.memory_encrypt_op(KVM_SEV_SNP_LAUNCH_START, policy=POLICY)
    vm_mem_set_private(vm, 0, 16 << 12)
    snp_launch_update_data(vm, 0, hva, 6 << 12, KVM_SEV_SNP_PAGE_TYPE_NORMAL)
    snp_launch_update_data(vm, 6 << 12, hva + (6 << 12), 4096, KVM_SEV_SNP_PAGE_TYPE_SECRETS)
    snp_launch_update_data(vm, 7 << 12, hva + (7 << 12), 9 << 12, KVM_SEV_SNP_PAGE_TYPE_ZERO)
    vm.memory_encrypt_op(KVM_SEV_SNP_LAUNCH_FINISH)
    while (run := vcpu.run()).exit_reason == KVM_EXIT_HYPERCALL:
        handle_map_gpa_range(vm, run)
    assert run.exit_reason == KVM_EXIT_SYSTEM_EVENT, vcpu.guest_exception
    status, rsp = out
    assert status == 0 and rsp["status"] == 0 and rsp["report_size"] == 1184
    assert rsp["report"][0x50:0x90] == b"u" * 64
