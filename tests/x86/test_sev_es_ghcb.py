"""The GHCB page protocol of an SEV-ES guest: the page layout (struct ghcb, arch/x86/include/asm/
svm.h), KVM's sev_handle_vmgexit / sev_es_validate_vmgexit (arch/x86/kvm/svm/sev.c) and the guest's
#VC handler (arch/x86/coco/sev: vc_handle_msr, vc_handle_vmmcall, vc_handle_cpuid, vc_handle_ioio,
sev_es_ghcb_hv_call, verify_exception_info)."""
import struct
from errno import EINVAL

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import sevcore
from sevcore.errors import KvmError, NotModelled
from sevcore.kvm.ghcb import (GHCB_FIELDS, GHCB_HV_FT_SUPPORTED, GHCB_PROTOCOL_VERSION,
                              GHCB_SAVE_AREA_SIZE, GHCB_SHARED_BUFFER, GHCB_USAGE, VMGEXIT_INPUTS,
                              Ghcb, GhcbGuest, ghcb_program, valid_bit)
from sevcore.kvm.guest import GuestException
from sevcore.kvm.vcpu import GuestAssertionError, UCALL_PIO_PORT
from sevcore.uapi import *
from sevcore.vmm.kvm_util import addr_gpa2hva, vm_mem_add, vm_sev_launch, vm_vcpu_add

from support import raises_errno

GHCB_GPA = 0x8000                 # shared: the guest maps it without the C-bit
SCRATCH_GPA = 0xa000
SHARED_GFN, SHARED_NPAGES = 11, 2


def launched_es(guest_code, *args, npages=16):
    """An SEV-ES VM (INIT2) with ``npages`` at gpa 0, MAP_GPA_RANGE and unknown-MSR exits to user
    space, and vCPU 0 running ``guest_code``, launched with policy ES."""
    kvm = sevcore.Kvm()
    vm = kvm.create_vm(KVM_X86_SEV_ES_VM)
    vm.memory_encrypt_op(KVM_SEV_INIT2)
    vm.enable_cap(KVM_CAP_EXIT_HYPERCALL, 1 << KVM_HC_MAP_GPA_RANGE)
    vm.enable_cap(KVM_CAP_X86_USER_SPACE_MSR, KVM_MSR_EXIT_REASON_UNKNOWN)
    vm_mem_add(vm, 0, 0, npages)
    vcpu = vm_vcpu_add(vm, 0)
    vcpu.set_guest_code(guest_code, *args)
    vm_sev_launch(vm, SEV_POLICY_ES)
    return kvm, vm, vcpu


def page_of(kvm, vm, gpa=GHCB_GPA):
    """The GHCB page as the host sees it."""
    return Ghcb(kvm.read(addr_gpa2hva(vm, gpa), 4096))


# -- the page -------------------------------------------------------------------------------------

def test_ghcb_layout_matches_the_kernel_struct():
    """The save-area offsets, the valid-bitmap bit of each field and the trailer sit where
    struct ghcb_save_area / struct ghcb put them (EXPECTED_GHCB_SAVE_AREA_SIZE 1032)."""
    assert GHCB_SAVE_AREA_SIZE == 1032
    assert {k: GHCB_FIELDS[k][0] for k in ("cpl", "rax", "rcx", "rdx", "rbx", "rsi",
                                             "sw_exit_code", "sw_scratch", "xcr0")} == {
        "cpl": 0xcb, "rax": 0x1f8, "rcx": 0x308, "rdx": 0x310, "rbx": 0x318, "rsi": 0x330,
        "sw_exit_code": 0x390, "sw_scratch": 0x3a8, "xcr0": 0x3e8}
    assert [valid_bit(n) for n in ("cpl", "rax", "rcx", "sw_exit_code", "sw_exit_info_2",
                                   "xcr0")] == [25, 63, 97, 114, 116, 125]
    assert GHCB_SHARED_BUFFER + GHCB_SHARED_BUF_SIZE + 10 == GHCB_PROTOCOL_VERSION
    assert GHCB_USAGE == 4096 - 4
    g = Ghcb()
    g.set("rax", -1)
    assert g.get("rax") == (1 << 64) - 1 and g.is_valid("rax") and not g.is_valid("rcx")
    assert g.get_if_valid("rcx") == 0 and g.valid_bitmap == 1 << 63


# -- the #VC path end to end ---------------------------------------------------------------------

def guest_migration_ready(g):
    """What a Linux SEV-ES guest does at boot for migration, each through #VC and the GHCB:
    MAP_GPA_RANGE of its shared pages (kvm_sev_hc_page_enc_status), MIGRATION_CONTROL read and
    written, CPUID and the TSC; then a ucall with what it saw."""
    ret = yield g.hypercall(KVM_HC_MAP_GPA_RANGE, SHARED_GFN << 12, SHARED_NPAGES,
                            KVM_MAP_GPA_RANGE_DECRYPTED | KVM_MAP_GPA_RANGE_PAGE_SZ_4K)
    before = yield g.rdmsr(MSR_KVM_MIGRATION_CONTROL)
    yield g.wrmsr(MSR_KVM_MIGRATION_CONTROL, KVM_MIGRATION_READY)
    after = yield g.rdmsr(MSR_KVM_MIGRATION_CONTROL)
    sig = yield g.cpuid(KVM_CPUID_SIGNATURE)
    tsc = yield g.rdmsr(MSR_IA32_TSC)
    yield g.sync("booted", ret, before, after, sig[1], tsc)
    yield g.done()


def test_sev_es_guest_reaches_user_space_through_the_ghcb():
    """MAP_GPA_RANGE arrives as KVM_EXIT_HYPERCALL and its return value reaches the guest,
    MIGRATION_CONTROL as user-space MSR exits, CPUID and the TSC are answered in KVM, and the
    ucall arrives as KVM_EXIT_IO from the ucall port: all from an SEV-ES guest via the GHCB."""
    kvm, vm, vcpu = launched_es(ghcb_program(guest_migration_ready, GHCB_GPA))
    run = vcpu.run()
    assert run.exit_reason == KVM_EXIT_HYPERCALL
    assert run.hypercall.nr == KVM_HC_MAP_GPA_RANGE
    assert run.hypercall.args[:3] == [SHARED_GFN << 12, SHARED_NPAGES,
                                      KVM_MAP_GPA_RANGE_DECRYPTED | KVM_MAP_GPA_RANGE_PAGE_SZ_4K]
    run.hypercall.ret = 7
    control = 0
    msr_exits = []
    while True:
        run = vcpu.run()
        if run.exit_reason in (KVM_EXIT_X86_RDMSR, KVM_EXIT_X86_WRMSR):
            assert run.msr.index == MSR_KVM_MIGRATION_CONTROL
            msr_exits.append(run.exit_reason)
            if run.exit_reason == KVM_EXIT_X86_WRMSR:
                control = run.msr.data
            else:
                run.msr.data = control
            continue
        break
    assert msr_exits == [KVM_EXIT_X86_RDMSR, KVM_EXIT_X86_WRMSR, KVM_EXIT_X86_RDMSR]
    assert run.exit_reason == KVM_EXIT_IO and run.io.port == UCALL_PIO_PORT
    kvm_sig = int.from_bytes(b"KVMK", "little")
    assert vcpu.get_ucall() == ("sync", ("booted", 7, 0, KVM_MIGRATION_READY, kvm_sig,
                                          int(vm.host.clock.now_ns)))
    vcpu.run()
    assert vcpu.get_ucall() == ("done", ())
    g = page_of(kvm, vm)
    assert g.get("sw_exit_info_1") == GHCB_HV_RESP_NO_ACTION
    assert g.protocol_version == 2


def guest_gp_through_ghcb(g):
    """A WRMSR KVM refuses and an RDMSR user space refuses (#GP) through the GHCB: the safe forms
    return the vector, the other raises it; a program that does not catch it ends in
    UCALL_ABORT."""
    v = yield g.wrmsr_safe(MSR_IA32_XSS, 1)
    r = yield g.rdmsr_safe(MSR_IA32_FLUSH_CMD)
    yield g.sync(v, r[0])
    try:
        yield g.wrmsr(MSR_IA32_XSS, 1)
    except GuestException as e:
        yield g.sync("raised", e.vector)
    yield g.wrmsr(MSR_IA32_XSS, 1)


def test_gp_from_kvm_comes_back_as_an_exception_to_raise():
    """KVM answers an MSR access it or user space refuses with ISSUE_EXCEPTION #GP in the GHCB
    (svm_complete_emulated_msr); the guest's handler raises it (verify_exception_info)."""
    kvm, vm, vcpu = launched_es(ghcb_program(guest_gp_through_ghcb, GHCB_GPA))
    run = vcpu.run()
    assert run.exit_reason == KVM_EXIT_X86_RDMSR and run.msr.index == MSR_IA32_FLUSH_CMD
    run.msr.error = 1                       # user space refuses it: #GP
    vcpu.run()
    assert vcpu.get_ucall() == ("sync", (GP_VECTOR, GP_VECTOR))
    vcpu.run()
    assert vcpu.get_ucall() == ("sync", ("raised", GP_VECTOR))
    vcpu.run()
    with pytest.raises(GuestAssertionError, match="vector 13"):
        vcpu.get_ucall()


def guest_version_check(g):
    ghcb = GhcbGuest(GHCB_GPA)
    version = yield from ghcb.negotiate(g)
    yield g.write(GHCB_GPA + 0x100 * 0 + 0x800, struct.pack("<Q", version))
    yield from ghcb.terminate(g)


@pytest.mark.parametrize("init,version", [("init2", 2), ("legacy", 1)])
def test_protocol_negotiation_takes_the_highest_common_version(init, version):
    """sev_es_negotiate_protocol: KVM_SEV_INIT2 offers GHCB 2, legacy ES_INIT 1; the guest speaks
    the highest both know, then TERM_REQ ends the run as SEV_TERM."""
    kvm = sevcore.Kvm()
    if init == "legacy":
        vm = kvm.create_vm(KVM_X86_DEFAULT_VM)
        vm.memory_encrypt_op(KVM_SEV_ES_INIT, data=None)
    else:
        vm = kvm.create_vm(KVM_X86_SEV_ES_VM)
        vm.memory_encrypt_op(KVM_SEV_INIT2)
    vm_mem_add(vm, 0, 0, 16)
    vcpu = vm_vcpu_add(vm, 0)
    vcpu.set_guest_code(guest_version_check)
    vm_sev_launch(vm, SEV_POLICY_ES)
    run = vcpu.run()
    assert run.exit_reason == KVM_EXIT_SYSTEM_EVENT
    assert run.system_event.type == KVM_SYSTEM_EVENT_SEV_TERM
    assert struct.unpack("<Q", kvm.read(addr_gpa2hva(vm, GHCB_GPA + 0x800), 8))[0] == version


# -- KVM's side with pages the test builds -----------------------------------------------------------

def guest_raw_vmgexit(g, page, gpa=GHCB_GPA):
    """Write ``page`` at the GHCB gpa, VMGEXIT with ``gpa`` in the GHCB MSR, then TERM_REQ so
    the host can read what KVM left in the page."""
    yield g.write(GHCB_GPA, page)
    yield g.wrmsr(MSR_AMD64_SEV_ES_GHCB, gpa)
    yield g.vmgexit()
    yield g.wrmsr(MSR_AMD64_SEV_ES_GHCB, GHCB_MSR_TERM_REQ)
    yield g.vmgexit()


def raw(exit_code, info1=0, info2=0, usage=0, exit_fields=True, **fields):
    """A GHCB page with the exit fields (valid unless ``exit_fields`` is False) and ``fields``."""
    g = Ghcb()
    g.protocol_version = 2
    g.ghcb_usage = usage
    if exit_fields:
        g.set("sw_exit_code", exit_code)
        g.set("sw_exit_info_1", info1)
        g.set("sw_exit_info_2", info2)
    for k, v in fields.items():
        g.set(k, v)
    return bytes(g.page)


def answer(page):
    """Run ``page`` through KVM; returns (SW_EXITINFO1, SW_EXITINFO2, the page afterwards)."""
    kvm, vm, vcpu = launched_es(guest_raw_vmgexit, page)
    run = vcpu.run()
    assert run.exit_reason == KVM_EXIT_SYSTEM_EVENT, vcpu.guest_exception
    g = page_of(kvm, vm)
    return g.get("sw_exit_info_1"), g.get("sw_exit_info_2"), g


IN_BUFFER = GHCB_GPA + GHCB_SHARED_BUFFER
STRING_OUT = UCALL_PIO_PORT << 16 | SVM_IOIO_STR_MASK | 1 << 4


@pytest.mark.parametrize("page,reason", [
    (raw(SVM_EXIT_MSR, rcx=0x10, usage=1), GHCB_ERR_INVALID_USAGE),
    (raw(SVM_EXIT_MSR, rcx=0x10, exit_fields=False), GHCB_ERR_MISSING_INPUT),
    (raw(0x1234, rcx=0x10), GHCB_ERR_INVALID_EVENT),
    (raw(SVM_EXIT_MSR), GHCB_ERR_MISSING_INPUT),
    (raw(SVM_EXIT_MSR, 1, rcx=0x10, rax=1), GHCB_ERR_MISSING_INPUT),
    (raw(SVM_EXIT_VMMCALL, rax=KVM_HC_MAP_GPA_RANGE), GHCB_ERR_MISSING_INPUT),
    (raw(SVM_EXIT_CPUID, rax=0xd, rcx=0), GHCB_ERR_MISSING_INPUT),
    (raw(SVM_EXIT_IOIO, STRING_OUT, 8), GHCB_ERR_MISSING_INPUT),
    (raw(SVM_EXIT_IOIO, UCALL_PIO_PORT << 16), GHCB_ERR_MISSING_INPUT),
    (raw(SVM_VMGEXIT_PSC, sw_scratch=IN_BUFFER), GHCB_ERR_MISSING_INPUT),
    (raw(SVM_VMGEXIT_GUEST_REQUEST, 0x1000, 0x2000), GHCB_ERR_MISSING_INPUT),
    (raw(SVM_EXIT_IOIO, STRING_OUT, 8, sw_scratch=GHCB_GPA + 0x400),
     GHCB_ERR_INVALID_SCRATCH_AREA),
    (raw(SVM_EXIT_IOIO, STRING_OUT, 0x10, sw_scratch=GHCB_GPA + 0xfe8),
     GHCB_ERR_INVALID_SCRATCH_AREA),
    (raw(SVM_EXIT_IOIO, STRING_OUT, 17 * 4096, sw_scratch=SCRATCH_GPA),
     GHCB_ERR_INVALID_SCRATCH_AREA),
])
def test_malformed_ghcb_is_answered_in_the_page(page, reason):
    """sev_es_validate_vmgexit / setup_vmgexit_scratch: bad usage, missing inputs, an unknown or
    SNP-only exit code on SEV-ES and a bad scratch area get MALFORMED_INPUT with the reason in
    SW_EXITINFO2, the guest resumes, and RAX..RDX and the exit info are the only fields marked
    valid afterwards."""
    info1, info2, g = answer(page)
    assert (info1, info2) == (GHCB_HV_RESP_MALFORMED_INPUT, reason)
    assert g.valid_bitmap == sum(1 << valid_bit(n) for n in (
        "rax", "rbx", "rcx", "rdx", "sw_exit_info_1", "sw_exit_info_2"))


def test_ghcb_answers_in_kvm():
    """CPUID, HV_FEATURES, a refused WRMSR and a VMMCALL from CPL 3 are answered without leaving
    KVM: the registers in RAX..RDX, GHCB_HV_FT_SUPPORTED, ISSUE_EXCEPTION #GP
    (svm_vmgexit_inject_exception), -KVM_EPERM (____kvm_emulate_hypercall)."""
    info1, _, g = answer(raw(SVM_EXIT_CPUID, rax=KVM_CPUID_SIGNATURE, rcx=0))
    assert info1 == GHCB_HV_RESP_NO_ACTION
    assert g.get("rbx").to_bytes(4, "little") == b"KVMK"
    assert answer(raw(SVM_VMGEXIT_HV_FEATURES))[:2] == (0, GHCB_HV_FT_SUPPORTED)
    assert answer(raw(SVM_EXIT_MSR, 1, rcx=MSR_IA32_XSS, rax=1, rdx=0))[:2] == (
        GHCB_HV_RESP_ISSUE_EXCEPTION, SVM_EVTINJ_VALID | SVM_EVTINJ_TYPE_EXEPT | GP_VECTOR)
    info1, _, g = answer(raw(SVM_EXIT_VMMCALL, rax=KVM_HC_MAP_GPA_RANGE, cpl=3))
    assert info1 == 0 and g.get("rax") == (-KVM_EPERM) & ((1 << 64) - 1)


def test_scratch_area_outside_the_ghcb_is_read_from_guest_memory():
    """A string OUT whose scratch area is another shared page is read through the memslot
    (kvm_read_guest) and carries the ucall."""
    def guest(g):
        from sevcore.kvm.ghcb import encode_ucall     # local: only this guest needs it
        data = encode_ucall("sync", ["far"])
        yield g.write(SCRATCH_GPA, data)
        yield from guest_raw_vmgexit(g, raw(SVM_EXIT_IOIO, STRING_OUT, len(data),
                                            sw_scratch=SCRATCH_GPA))
    kvm, vm, vcpu = launched_es(guest)
    vcpu.run()
    assert vcpu.get_ucall() == ("sync", ("far",))


def test_term_request_and_unsupported_event():
    """SVM_VMGEXIT_TERM_REQUEST ends the run as SEV_TERM with the GHCB gpa in data[0];
    SVM_VMGEXIT_UNSUPPORTED_EVENT fails KVM_RUN with EINVAL; an exit that validates but is
    not simulated (MMIO) raises NotModelled."""
    kvm, vm, vcpu = launched_es(guest_raw_vmgexit, raw(SVM_VMGEXIT_TERM_REQUEST, 1, 2))
    run = vcpu.run()
    assert run.exit_reason == KVM_EXIT_SYSTEM_EVENT and run.system_event.data[0] == GHCB_GPA
    kvm, vm, vcpu = launched_es(guest_raw_vmgexit, raw(SVM_VMGEXIT_UNSUPPORTED_EVENT, 1, 2))
    with raises_errno(EINVAL, "KVM_RUN"):
        vcpu.run()
    kvm, vm, vcpu = launched_es(guest_raw_vmgexit,
                                raw(SVM_VMGEXIT_MMIO_READ, 0, 8, sw_scratch=IN_BUFFER))
    with pytest.raises(NotModelled):
        vcpu.run()


def test_ghcb_outside_memory_returns_to_the_guest_and_kvm_marks_the_page_dirty():
    """A GHCB gpa with no memslot is not mapped: the guest resumes with nothing written; a
    mapped GHCB is written back at unmap and logged dirty (kvm_vcpu_unmap)."""
    page = raw(SVM_EXIT_CPUID, rax=0, rcx=0)
    kvm, vm, vcpu = launched_es(guest_raw_vmgexit, page, 1 << 30)
    assert vcpu.run().exit_reason == KVM_EXIT_SYSTEM_EVENT
    assert bytes(page_of(kvm, vm).page) == page
    kvm, vm, vcpu = launched_es(guest_raw_vmgexit, page)
    vm.set_user_memory_region2(0, KVM_MEM_LOG_DIRTY_PAGES, 0, 16 << 12, addr_gpa2hva(vm, 0))
    vcpu.run()
    assert int(vm.get_dirty_log(0)[0]) >> (GHCB_GPA >> 12) & 1


def helper_like(g, secret_gpa):
    """What a migration helper does in its mirror: read the guest's private memory in plaintext
    (C-bit) and talk to its VMM by ucalls, here through the GHCB."""
    data = yield g.read(secret_gpa | 1 << g.vcpu.vm.host.c_bit, 16)
    yield g.sync(data.hex())


def test_sev_es_mirror_with_a_measured_vmsa_talks_through_its_ghcb():
    """A mirror of an SEV-ES guest whose vCPU's VMSA was launched with the guest
    (LAUNCH_UPDATE_VMSA on the mirror, in the guest's measurement) runs a helper-like program
    that reads the guest's private page and reaches its VMM through a GHCB page with protocol
    version 1 (the mirror's KVM offers no version: sev_vm_copy_enc_context_from copies none)."""
    from sevcore.vmm import owner
    from sevcore.kvm.sev_es import build_vmsa
    kvm = sevcore.Kvm()
    vm = kvm.create_vm(KVM_X86_SEV_ES_VM)
    vm.memory_encrypt_op(KVM_SEV_INIT2)
    hva = vm_mem_add(vm, 0, 0, 16)
    kvm.write(hva + SCRATCH_GPA, b"private to guest")
    vcpu = vm_vcpu_add(vm, 0)
    vcpu.set_guest_code(guest_raw_vmgexit, raw(SVM_EXIT_CPUID, rax=0, rcx=0))
    chain = kvm.host.psp.export_cert_chain()
    session = owner.create_launch_session(chain.pdh, SEV_POLICY_ES)
    dh, blob = kvm.mmap(4096), kvm.mmap(4096)
    kvm.write(dh, session.godh_cert)
    kvm.write(blob, session.session)
    vm.memory_encrypt_op(KVM_SEV_LAUNCH_START, policy=SEV_POLICY_ES, dh_uaddr=dh,
                         dh_len=len(session.godh_cert), session_uaddr=blob,
                         session_len=len(session.session))
    # The mirror takes the context's handle and ASID: after LAUNCH_START.
    mirror = kvm.create_vm(KVM_X86_DEFAULT_VM)
    mirror.enable_cap(KVM_CAP_VM_COPY_ENC_CONTEXT_FROM, vm.fd)
    mirror.set_user_memory_region2(0, 0, 0, 16 << 12, hva)
    mvcpu = vm_vcpu_add(mirror, 0)
    mvcpu.set_guest_code(ghcb_program(helper_like, GHCB_GPA + 4096, version=1), SCRATCH_GPA)
    vm.memory_encrypt_reg_region(hva, 16 << 12)
    image = kvm.read(hva, 16 << 12)
    vm.memory_encrypt_op(KVM_SEV_LAUNCH_UPDATE_DATA, uaddr=hva, len=16 << 12)
    vmsas = [build_vmsa(vcpu, vm.sev.vmsa_features), build_vmsa(mvcpu, mirror.sev.vmsa_features)]
    vm.memory_encrypt_op(KVM_SEV_LAUNCH_UPDATE_VMSA)
    mirror.memory_encrypt_op(KVM_SEV_LAUNCH_UPDATE_VMSA)
    out = kvm.mmap(4096)
    vm.memory_encrypt_op(KVM_SEV_LAUNCH_MEASURE, uaddr=out, len=48)
    st = kvm.host.psp.platform_status()
    assert owner.verify_measurement(session.tik, kvm.read(out, 48),
                                    owner.launch_digest(image, *vmsas), st.api_major,
                                    st.api_minor, st.build, SEV_POLICY_ES)
    vm.memory_encrypt_op(KVM_SEV_LAUNCH_FINISH)
    assert mvcpu.guest_state_protected
    mvcpu.run()
    assert mvcpu.get_ucall() == ("sync", (b"private to guest".hex(),))
    assert kvm.read(hva + SCRATCH_GPA, 16) != b"private to guest"


# -- any page the guest can write ------------------------------------------------------------------

KVM_WRITES = {"sw_exit_info_1", "sw_exit_info_2", "rax", "rbx", "rcx", "rdx"}


@st.composite
def ghcb_pages(draw):
    """A GHCB page: a known or random exit code, plausible or random infos, usage mostly 0, and
    a random set of save-area fields filled in and marked valid."""
    g = Ghcb()
    g.protocol_version = draw(st.sampled_from((1, 2)))
    g.ghcb_usage = draw(st.sampled_from((0,) * 6 + (1, 0xffffffff)))
    code = draw(st.sampled_from(sorted(VMGEXIT_INPUTS)) | st.integers(0, (1 << 64) - 1))
    small = st.sampled_from((0, 1, 8, STRING_OUT, UCALL_PIO_PORT << 16, 0x1000, 0x2000))
    for name, strat in (("sw_exit_code", st.just(code)), ("sw_exit_info_1", small),
                        ("sw_exit_info_2", small)):
        if draw(st.booleans()) or draw(st.booleans()):
            g.set(name, draw(strat))
    for name in draw(st.sets(st.sampled_from(sorted(set(GHCB_FIELDS) - {
            "sw_exit_code", "sw_exit_info_1", "sw_exit_info_2"})))):
        if name == "sw_scratch":
            g.set(name, draw(st.sampled_from((IN_BUFFER, SCRATCH_GPA, GHCB_GPA + 8, 0))))
        else:
            g.set(name, draw(st.sampled_from((0, 1, 3, 0xd, MSR_IA32_TSC,
                                              MSR_KVM_MIGRATION_CONTROL, KVM_HC_MAP_GPA_RANGE))))
    return bytes(g.page)


@settings(max_examples=60, deadline=None, derandomize=True)
@given(page=ghcb_pages())
def test_any_ghcb_page_gets_an_answer_and_only_kvm_fields_change(page):
    """Whatever the guest leaves in its GHCB, KVM_RUN ends in the guest's TERM_REQ (after user
    space completes any exit it asked for), refuses with EINVAL, or says NotModelled; and in the
    page only SW_EXITINFO1/2, RAX..RDX and the valid bitmap change, with a response code KVM
    defines."""
    kvm, vm, vcpu = launched_es(guest_raw_vmgexit, page)
    for _ in range(4):
        try:
            run = vcpu.run()
        except NotModelled:
            return
        except KvmError as e:
            assert e.errno == EINVAL
            return
        if run.exit_reason == KVM_EXIT_SYSTEM_EVENT:
            break
        assert run.exit_reason in (KVM_EXIT_IO, KVM_EXIT_HYPERCALL, KVM_EXIT_X86_RDMSR,
                                   KVM_EXIT_X86_WRMSR)
    else:
        raise AssertionError("the guest never reached its TERM_REQ")
    before, after = Ghcb(page), page_of(kvm, vm)
    for name in set(GHCB_FIELDS) - KVM_WRITES:
        assert after.get(name) == before.get(name), name
    assert after.page[0x800:] == before.page[0x800:]
    if run.system_event.data[0] == GHCB_GPA:
        return                          # TERM_REQUEST through the page: nothing is written back
    assert after.valid_bitmap == sum(1 << valid_bit(n) for n in KVM_WRITES)
    info1 = after.get("sw_exit_info_1")
    assert info1 in (GHCB_HV_RESP_NO_ACTION, GHCB_HV_RESP_ISSUE_EXCEPTION,
                     GHCB_HV_RESP_MALFORMED_INPUT)
    if info1 == GHCB_HV_RESP_MALFORMED_INPUT:
        assert GHCB_ERR_NOT_REGISTERED <= after.get("sw_exit_info_2") <= GHCB_ERR_INVALID_EVENT
