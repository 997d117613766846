"""The RMP's validation check on an SEV-SNP guest's private accesses (AMD64 APM vol. 2 15.36.10):
an access to a page whose RMP entry is the guest's but not validated raises #VC with error code
PAGE_NOT_VALIDATED (0x404) in the guest, before any byte moves; PVALIDATE makes it work, a
rescind or a round trip through shared needs PVALIDATE again. Linux's #VC handler has no case
for the code (vc_handle_exitcode in arch/x86/coco/sev/vc-handle.c answers ES_UNSUPPORTED) and
terminates, which a program under ghcb_program does too."""
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import sevcore
from sevcore.kvm.ghcb import ghcb_program
from sevcore.kvm.guest import PageNotValidated
from sevcore.uapi import *
from sevcore.vmm.kvm_util import (addr_gpa2hva, handle_map_gpa_range, snp_launch_update_data,
                                  vm_mem_add, vm_mem_set_private, vm_vcpu_add)

POLICY = SNP_POLICY_MASK_RSVD_MBO | SNP_POLICY_MASK_SMT
CBIT = 1 << 51
PAGE = 12                      # never launched: assigned, not validated, by its first fault
PAGE_GPA = PAGE << 12


@pytest.fixture
def kvm():
    return sevcore.Kvm()


def launched(kvm, code, *args):
    """An SNP VM of 16 private guest_memfd pages of which only page 0 was launched (so
    validated), running ``code``; returns (vm, vcpu)."""
    vm = kvm.create_vm(KVM_X86_SNP_VM)
    vm.memory_encrypt_op(KVM_SEV_INIT2)
    vm_mem_add(vm, 0, 0, 16, KVM_MEM_GUEST_MEMFD)
    vcpu = vm_vcpu_add(vm, 0)
    vcpu.set_guest_code(code, *args)
    vm.memory_encrypt_op(KVM_SEV_SNP_LAUNCH_START, policy=POLICY)
    vm_mem_set_private(vm, 0, 16 << 12)
    snp_launch_update_data(vm, 0, addr_gpa2hva(vm, 0), 4096, KVM_SEV_SNP_PAGE_TYPE_NORMAL)
    vm.memory_encrypt_op(KVM_SEV_SNP_LAUNCH_FINISH)
    vm.enable_cap(KVM_CAP_EXIT_HYPERCALL, 1 << KVM_HC_MAP_GPA_RANGE)
    return vm, vcpu


def terminate(g):
    """GHCB MSR protocol termination request: KVM_EXIT_SYSTEM_EVENT."""
    yield g.wrmsr(MSR_AMD64_SEV_ES_GHCB, GHCB_MSR_TERM_REQ)
    yield g.vmgexit()


def attempt(g, op, out):
    """Yield ``op``; record the #VC it raised (vector, error code, gpa, write) or its result."""
    try:
        out.append((yield op))
    except PageNotValidated as e:
        out.append((e.vector, e.exit_code, e.gpa, e.write))


def vc(gpa, write):
    return (X86_TRAP_VC, SVM_EXIT_PAGE_NOT_VALIDATED, gpa, write)


def run_to_end(vm, vcpu):
    """Run the vCPU, answering page-state changes as a VMM does, up to its last exit."""
    while True:
        run = vcpu.run()
        if run.exit_reason != KVM_EXIT_HYPERCALL:
            return run
        handle_map_gpa_range(vm, run)


def frame_of(vm, gfn):
    return vm.gfn_to_memslot(0).gmem_file.page_cache.lookup(gfn)


def guest_validate_rescind(g, out):
    """Read and write an unvalidated page, validate it, use it, rescind it, touch it again."""
    yield from attempt(g, g.read(PAGE_GPA | CBIT, 8), out)
    yield from attempt(g, g.write(PAGE_GPA | CBIT, b"abcd"), out)
    out.append((yield g.pvalidate(PAGE_GPA, 1, True)))
    yield g.write(PAGE_GPA | CBIT, b"abcd")
    out.append((yield g.read(PAGE_GPA | CBIT, 4)))
    out.append((yield g.pvalidate(PAGE_GPA, 1, False)))
    yield from attempt(g, g.read(PAGE_GPA | CBIT, 4096), out)
    yield from attempt(g, g.fill(PAGE_GPA | CBIT, 1, 7), out)
    yield from terminate(g)


def test_unvalidated_page_raises_vc_until_pvalidate(kvm):
    """A read and a write of a private page the guest has not validated raise #VC
    PAGE_NOT_VALIDATED in it, work after PVALIDATE, and fault again after a rescind."""
    out = []
    vm, vcpu = launched(kvm, guest_validate_rescind, out)
    assert run_to_end(vm, vcpu).exit_reason == KVM_EXIT_SYSTEM_EVENT, vcpu.guest_exception
    assert out == [vc(PAGE_GPA, False), vc(PAGE_GPA, True), 0, b"abcd", 0,
                   vc(PAGE_GPA, False), vc(PAGE_GPA, True)]
    e = vm.host.rmp.entry(frame_of(vm, PAGE))
    assert e.assigned and not e.validated and e.asid == vm.sev.asid


def guest_one_access(g, kind, out):
    """One access of ``kind`` over the validated page PAGE - 1 and the unvalidated PAGE."""
    yield g.pvalidate(PAGE_GPA - 4096, 1, True)
    ops = {"partial_write": g.write(PAGE_GPA | CBIT | 100, b"x" * 8),
           "page_write": g.write((PAGE_GPA - 4096) | CBIT, b"y" * 8192),
           "fill": g.fill((PAGE_GPA - 4096) | CBIT, 2, 0x5a5a5a5a5a5a5a5a),
           "page_read": g.read((PAGE_GPA - 4096) | CBIT, 8192),
           "read_pages": g.read_pages([(PAGE_GPA - 4096) | CBIT, PAGE_GPA | CBIT])}
    yield from attempt(g, ops[kind], out)
    out.append((yield g.read((PAGE_GPA - 4096) | CBIT, 8)))
    yield from terminate(g)


@pytest.mark.parametrize("kind", ["partial_write", "page_write", "fill", "page_read",
                                  "read_pages"])
def test_vc_leaves_page_and_entry_unchanged(kvm, kind):
    """A refused access (partial, whole pages, bulk) changes neither the unvalidated page's
    frame nor its RMP entry, and pages before it in the same access complete."""
    out = []
    vm, vcpu = launched(kvm, guest_one_access, kind, out)
    vcpu.pre_fault_memory(PAGE_GPA, 4096)
    pfn = frame_of(vm, PAGE)
    before = (vm.host.mem.read(pfn << 12, 4096), vm.host.rmp.entry(pfn))
    assert run_to_end(vm, vcpu).exit_reason == KVM_EXIT_SYSTEM_EVENT, vcpu.guest_exception
    assert (vm.host.mem.read(pfn << 12, 4096), vm.host.rmp.entry(pfn)) == before
    write = kind in ("partial_write", "page_write", "fill")
    assert out[0] == vc(PAGE_GPA + (100 if kind == "partial_write" else 0), write)
    assert out[1] == {"page_write": b"y" * 8, "fill": b"Z" * 8}.get(kind, out[1])


def guest_uncaught(g):
    """Read an unvalidated page without a handler; terminate with a reason of its own after."""
    yield g.read(PAGE_GPA | CBIT, 8)
    yield g.wrmsr(MSR_AMD64_SEV_ES_GHCB, GHCB_MSR_TERM_REQ | GHCB_SEV_TERM_REASON(
        SEV_TERM_SET_LINUX, GHCB_TERM_PVALIDATE))
    yield g.vmgexit()


def test_uncaught_vc_shuts_down(kvm):
    """An uncaught #VC PAGE_NOT_VALIDATED is a triple fault (KVM_EXIT_SHUTDOWN), the
    exception kept as the vCPU's guest_exception."""
    vm, vcpu = launched(kvm, guest_uncaught)
    assert vcpu.run().exit_reason == KVM_EXIT_SHUTDOWN
    e = vcpu.guest_exception
    assert isinstance(e, PageNotValidated) and e.exit_code == SVM_EXIT_PAGE_NOT_VALIDATED


def test_linux_vc_handler_terminates(kvm):
    """Under a Linux-like #VC handler (ghcb_program) the unsupported error code terminates
    the guest with the general reason, as vc_raw_handle_exception's ES_UNSUPPORTED does."""
    vm, vcpu = launched(kvm, ghcb_program(guest_uncaught, 15 << 12, version=2))
    vm.set_memory_attributes(15 << 12, 4096, 0)
    run = vcpu.run()
    assert run.exit_reason == KVM_EXIT_SYSTEM_EVENT
    assert run.system_event.type == KVM_SYSTEM_EVENT_SEV_TERM
    assert run.system_event.data[0] == GHCB_MSR_TERM_REQ | GHCB_SEV_TERM_REASON(
        SEV_TERM_SET_GEN, GHCB_SEV_ES_GEN_REQ)


def guest_round_trip(g, out):
    """Validate and write the page, make it shared (rescinded), ask for it private again
    through the GHCB MSR protocol without validating, touch it, validate, read it."""
    yield g.pvalidate(PAGE_GPA, 1, True)
    yield g.write(PAGE_GPA | CBIT, b"kept")
    yield g.page_state_change(PAGE_GPA, 1, private=False)
    yield g.write(PAGE_GPA, b"open")
    out.append((yield g.read(PAGE_GPA, 4)))
    yield g.wrmsr(MSR_AMD64_SEV_ES_GHCB,
                  GHCB_MSR_PSC_REQ_GFN(PAGE, SNP_PAGE_STATE_PRIVATE))
    yield g.vmgexit()
    out.append((yield g.rdmsr(MSR_AMD64_SEV_ES_GHCB)) == GHCB_MSR_PSC_RESP)
    yield from attempt(g, g.read(PAGE_GPA | CBIT, 4), out)
    out.append((yield g.pvalidate(PAGE_GPA, 1, True)))
    out.append((yield g.read(PAGE_GPA | CBIT, 4)))
    yield from terminate(g)


def test_shared_and_back_needs_validation(kvm):
    """A page converted to shared and back to private is not validated (the guest rescinded
    it, the RMP keeps it so) until the guest validates it again, and then holds its data."""
    out = []
    vm, vcpu = launched(kvm, guest_round_trip, out)
    assert run_to_end(vm, vcpu).exit_reason == KVM_EXIT_SYSTEM_EVENT, vcpu.guest_exception
    assert out == [b"open", True, vc(PAGE_GPA, False), 0, b"kept"]


PAGES = range(8, 12)
STEP = st.tuples(st.sampled_from(PAGES), st.sampled_from(["validate", "rescind", "read",
                                                           "write"]))


def guest_steps(g, steps, out):
    """Run ``steps`` (page, action) in order, recording each result or #VC."""
    for i, (page, action) in enumerate(steps):
        gpa = page << 12
        if action in ("validate", "rescind"):
            out.append((yield g.pvalidate(gpa, 1, action == "validate")))
        elif action == "read":
            yield from attempt(g, g.read(gpa | CBIT, 8), out)
        else:
            yield from attempt(g, g.write(gpa | CBIT, i.to_bytes(8, "little")), out)
    yield from terminate(g)


def expected_results(steps):
    """What the RMP says each step gives: PVALIDATE's status (CF as NOUPDATE), the data last
    written while validated (None: never written), or the #VC."""
    validated, data, out = set(), {}, []
    for i, (page, action) in enumerate(steps):
        gpa = page << 12
        if action in ("validate", "rescind"):
            want = action == "validate"
            out.append(0 if (page in validated) != want else PVALIDATE_FAIL_NOUPDATE)
            (validated.add if want else validated.discard)(page)
        elif page not in validated:
            out.append(vc(gpa, action == "write"))
        elif action == "write":
            data[page] = i.to_bytes(8, "little")
            out.append(None)
        else:
            out.append(data.get(page))
    return out


@settings(max_examples=25, deadline=None)
@given(steps=st.lists(STEP, max_size=14))
def test_random_validate_rescind_access_sequences(steps):
    """Any sequence of PVALIDATE, rescind, read and write on a few pages gives, step by step,
    what the RMP's validated bit says: #VC exactly while a page is not validated."""
    out = []
    vm, vcpu = launched(sevcore.Kvm(), guest_steps, steps, out)
    assert vcpu.run().exit_reason == KVM_EXIT_SYSTEM_EVENT, vcpu.guest_exception
    want = expected_results(steps)
    assert len(out) == len(want)
    for got, exp in zip(out, want):
        assert got == exp or (exp is None and isinstance(got, bytes) and len(got) == 8)
