"""The GHCB page protocol of SEV-ES: the page, the guest's #VC handler and KVM's VMGEXIT handler.

The GHCB (guest-hypervisor communication block, ``struct ghcb`` in arch/x86/include/asm/svm.h) is
one 4 KiB page the guest shares with the hypervisor: a save area of register fields with a
bitmap saying which the guest filled in, a 2032-byte shared buffer, the protocol version and the
usage. A guest that needs the hypervisor fills it in and executes VMGEXIT with the page's GPA in
the GHCB MSR; KVM maps the page, copies what it needs, checks that the exit's inputs are there,
handles the exit and writes the results back before the guest runs again.

Guest side (:class:`GhcbGuest`, :func:`ghcb_program`), as arch/x86/coco/sev (``vc-shared.c``,
``sev-shared.c``) and arch/x86/kernel/kvm.c do it: a #VC for an intercepted instruction goes to
the handler, which puts the instruction's registers in the GHCB (``vc_handle_msr``,
``vc_handle_vmmcall`` with ``kvm_sev_es_hcall_prepare``, ``vc_handle_cpuid``, ``vc_handle_ioio``),
makes the call (``sev_es_ghcb_hv_call``) and checks the answer (``verify_exception_info``).

KVM side (:class:`GhcbVcpu`), as arch/x86/kvm/svm/sev.c does it: ``sev_handle_vmgexit`` maps the
page (``kvm_vcpu_map``), snapshots it (``sev_es_sync_from_ghcb``), validates it
(``sev_es_validate_vmgexit``: :data:`VMGEXIT_INPUTS`), answers NO_ACTION by default
(``svm_vmgexit_success``) and dispatches (:data:`VMGEXIT_HANDLERS`); the results go back into
the page when the guest resumes (``sev_es_unmap_ghcb`` with ``sev_es_sync_to_ghcb``).
A new exit (SNP's page-state change or guest request) is one entry in each table.
"""
import json
from errno import EFAULT, EINVAL

from sevcore.core.arrays import U32_MAX, U64_MAX
from sevcore import uapi as U
from sevcore.errors import KvmError, NotModelled
from sevcore.hw.hostmem import PAGE_SHIFT, PAGE_SIZE
from sevcore.kvm.guest import UCALL_PIO_PORT, GuestException, VmmCommunicationException
from sevcore.kvm.kvm_run import EXIT, THROW


# -- the page (struct ghcb_save_area, struct ghcb) ------------------------------------------------

#: The save-area fields the protocol uses: offset in the page and size. A field's bit in the
#: valid bitmap is its offset / 8 (GHCB_BITMAP_IDX).
GHCB_FIELDS = {
    "cpl": (0x0cb, 1), "xss": (0x140, 8), "dr7": (0x160, 8), "rip": (0x178, 8),
    "rsp": (0x1d8, 8), "rax": (0x1f8, 8), "rcx": (0x308, 8), "rdx": (0x310, 8),
    "rbx": (0x318, 8), "rbp": (0x328, 8), "rsi": (0x330, 8), "rdi": (0x338, 8),
    **{f"r{i}": (0x340 + 8 * (i - 8), 8) for i in range(8, 16)},
    "sw_exit_code": (0x390, 8), "sw_exit_info_1": (0x398, 8), "sw_exit_info_2": (0x3a0, 8),
    "sw_scratch": (0x3a8, 8), "xcr0": (0x3e8, 8),
}
GHCB_VALID_BITMAP = 0x3f0        # u8 valid_bitmap[16]
GHCB_SAVE_AREA_SIZE = 0x408      # EXPECTED_GHCB_SAVE_AREA_SIZE (1032)
GHCB_SHARED_BUFFER = 0x800       # u8 shared_buffer[GHCB_SHARED_BUF_SIZE]
GHCB_RESERVED_0XFF0 = 0xff0      # end of the shared buffer
GHCB_PROTOCOL_VERSION = 0xffa    # u16
GHCB_USAGE = 0xffc               # u32

#: The GHCB protocol versions the guest speaks (GHCB_PROTOCOL_MIN/MAX, arch/x86/include/asm/sev.h).
GHCB_PROTOCOL_MIN = 1
GHCB_PROTOCOL_MAX = 2

#: IOIO exit information a guest's #VC handler builds (arch/x86/coco/sev/vc-shared.c).
IOIO_TYPE_OUT = 0
IOIO_TYPE_IN = 1
IOIO_TYPE_OUTS = U.SVM_IOIO_STR_MASK
IOIO_REP = U.SVM_IOIO_REP_MASK
IOIO_DATA_8 = 1 << 4
IOIO_DATA_32 = 1 << 6
IOIO_ADDR_64 = 1 << 9
IOIO_SEG_DS = 1 << 11 | 1 << 10

#: GHCB_HV_FT_SUPPORTED (arch/x86/kvm/svm/sev.c): what KVM answers a hypervisor-feature request.
GHCB_HV_FT_SUPPORTED = U.GHCB_HV_FT_SNP | U.GHCB_HV_FT_SNP_AP_CREATION

#: KVM's cap on a scratch area outside the GHCB (GHCB_SCRATCH_AREA_LIMIT in sev.c).
GHCB_SCRATCH_AREA_LIMIT = 16 * PAGE_SIZE


def valid_bit(name):
    """GHCB_BITMAP_IDX: the valid-bitmap bit of save-area field ``name``."""
    return GHCB_FIELDS[name][0] // 8


def _page_int(off, size):
    """Getter and setter of the little-endian integer at ``off`` in a Ghcb's page."""
    def get(self):
        return int.from_bytes(self.page[off:off + size], "little")

    def put(self, value):
        self.page[off:off + size] = value.to_bytes(size, "little")
    return get, put


class Ghcb:
    """A GHCB page's bytes with the accessors of DEFINE_GHCB_ACCESSORS: ``set`` also marks the
    field valid, ``get_if_valid`` reads 0 for a field the bitmap does not mark."""

    __slots__ = ("page",)

    def __init__(self, page=None):
        self.page = bytearray(PAGE_SIZE) if page is None else bytearray(page)
        if len(self.page) != PAGE_SIZE:
            raise ValueError(f"a GHCB is {PAGE_SIZE} bytes, not {len(self.page)}")

    def get(self, name):
        off, size = GHCB_FIELDS[name]
        return int.from_bytes(self.page[off:off + size], "little")

    def set(self, name, value):
        off, size = GHCB_FIELDS[name]
        self.page[off:off + size] = (value & ((1 << 8 * size) - 1)).to_bytes(size, "little")
        self.valid_bitmap |= 1 << valid_bit(name)

    def is_valid(self, name):
        return bool(self.valid_bitmap >> valid_bit(name) & 1)

    def get_if_valid(self, name):
        return self.get(name) if self.is_valid(name) else 0

    @property
    def valid_bitmap(self):
        return int.from_bytes(self.page[GHCB_VALID_BITMAP:GHCB_VALID_BITMAP + 16], "little")

    @valid_bitmap.setter
    def valid_bitmap(self, bits):
        self.page[GHCB_VALID_BITMAP:GHCB_VALID_BITMAP + 16] = bits.to_bytes(16, "little")

    protocol_version = property(*_page_int(GHCB_PROTOCOL_VERSION, 2))
    ghcb_usage = property(*_page_int(GHCB_USAGE, 4))

    def invalidate(self):
        """vc_ghcb_invalidate: SW_EXITCODE 0 and no field valid."""
        off, size = GHCB_FIELDS["sw_exit_code"]
        self.page[off:off + size] = bytes(size)
        self.valid_bitmap = 0


# -- the ucall struct a guest sends with its port I/O -------------------------------------------

def encode_ucall(cmd, values):
    """The model's ``struct ucall``: the command and its values as JSON (what a selftest's ucall
    keeps in guest memory at the address it passes to the port I/O)."""
    return json.dumps([cmd, list(values)]).encode()


def decode_ucall(data):
    """The ``(cmd, values)`` of :func:`encode_ucall`'s bytes, or None for anything else."""
    try:
        cmd, values = json.loads(bytes(data))
    except (ValueError, TypeError):
        return None
    return (cmd, tuple(values)) if isinstance(cmd, str) and isinstance(values, list) else None


# -- the guest's side ------------------------------------------------------------------------------

class GhcbProtocolError(RuntimeError):
    """The guest's #VC handler got an answer it cannot use (ES_VMM_ERROR) or met an exit it does
    not handle (ES_UNSUPPORTED); the kernel asks the hypervisor to terminate it."""


class GhcbGuest:
    """A guest kernel's GHCB at the shared, page-aligned ``gpa`` (no C-bit) and its #VC handler.

    Every method is a generator for ``yield from`` inside a guest program."""

    def __init__(self, gpa):
        if gpa & (PAGE_SIZE - 1):
            raise ValueError(f"the GHCB must be page aligned, got {gpa:#x}")
        self.gpa = gpa
        self.version = 0

    def register(self, g):
        """snp_register_ghcb_early (arch/x86/boot/startup/sev-shared.c): an SNP guest registers
        its GHCB's gfn through the GHCB MSR (REG_GPA_REQ) before it uses the page, and
        terminates (SEV_TERM_SET_LINUX, GHCB_TERM_REGISTER) unless the hypervisor echoes it."""
        gfn = self.gpa >> PAGE_SHIFT
        yield g.wrmsr(U.MSR_AMD64_SEV_ES_GHCB, U.GHCB_MSR_REG_GPA_REQ_VAL(gfn))
        yield g.vmgexit()
        val = yield g.rdmsr(U.MSR_AMD64_SEV_ES_GHCB)
        if val & U.GHCB_MSR_INFO_MASK != U.GHCB_MSR_REG_GPA_RESP or \
                (val >> U.GHCB_MSR_GPA_VALUE_POS) & U.GHCB_MSR_GPA_VALUE_MASK != gfn:
            yield from self.terminate(g, U.SEV_TERM_SET_LINUX, U.GHCB_TERM_REGISTER)
        return gfn

    def negotiate(self, g):
        """sev_es_negotiate_protocol: SEV_INFO through the GHCB MSR; the version is the highest
        both sides speak. Terminates (GHCB_SEV_ES_PROT_UNSUPPORTED) if there is none."""
        yield g.wrmsr(U.MSR_AMD64_SEV_ES_GHCB, U.GHCB_MSR_SEV_INFO_REQ)
        yield g.vmgexit()
        val = yield g.rdmsr(U.MSR_AMD64_SEV_ES_GHCB)
        hv_max, hv_min = val >> 48 & 0xffff, val >> 32 & 0xffff
        if val & U.GHCB_MSR_INFO_MASK != U.GHCB_MSR_SEV_INFO_RESP or \
                hv_max < GHCB_PROTOCOL_MIN or hv_min > GHCB_PROTOCOL_MAX:
            yield from self.terminate(g, U.SEV_TERM_SET_GEN, U.GHCB_SEV_ES_PROT_UNSUPPORTED)
        self.version = min(hv_max, GHCB_PROTOCOL_MAX)
        return self.version

    def terminate(self, g, reason_set=U.SEV_TERM_SET_GEN, reason=U.GHCB_SEV_ES_GEN_REQ):
        """sev_es_terminate: TERM_REQ through the GHCB MSR; never returns."""
        yield g.wrmsr(U.MSR_AMD64_SEV_ES_GHCB,
                      U.GHCB_MSR_TERM_REQ | U.GHCB_SEV_TERM_REASON(reason_set, reason))
        yield g.vmgexit()
        raise GhcbProtocolError(f"terminated: reason set {reason_set}, reason {reason}")

    def hv_call(self, g, ghcb, exit_code, exit_info_1, exit_info_2):
        """sev_es_ghcb_hv_call: protocol version, usage and exit fields into ``ghcb``, the page
        written, its GPA in the GHCB MSR, VMGEXIT; returns the page as the hypervisor left it.
        verify_exception_info: a #GP/#UD the hypervisor asks for is raised as GuestException
        (ES_EXCEPTION); any other nonzero response is GhcbProtocolError (ES_VMM_ERROR)."""
        ghcb.protocol_version = self.version
        ghcb.ghcb_usage = U.GHCB_DEFAULT_USAGE
        ghcb.set("sw_exit_code", exit_code)
        ghcb.set("sw_exit_info_1", exit_info_1)
        ghcb.set("sw_exit_info_2", exit_info_2)
        yield g.write(self.gpa, bytes(ghcb.page))
        yield g.wrmsr(U.MSR_AMD64_SEV_ES_GHCB, self.gpa)
        yield g.vmgexit()
        out = Ghcb((yield g.read(self.gpa, PAGE_SIZE)))
        ret = out.get("sw_exit_info_1") & U32_MAX
        if ret == U.GHCB_HV_RESP_NO_ACTION:
            return out
        if ret == U.GHCB_HV_RESP_ISSUE_EXCEPTION:
            info = out.get("sw_exit_info_2")
            vector = info & U.SVM_EVTINJ_VEC_MASK
            if info & U.SVM_EVTINJ_VALID and vector in (U.GP_VECTOR, U.UD_VECTOR) and \
                    info & U.SVM_EVTINJ_TYPE_MASK == U.SVM_EVTINJ_TYPE_EXEPT:
                raise GuestException(vector, f"VMGEXIT {exit_code:#x}")
        raise GhcbProtocolError(f"VMGEXIT {exit_code:#x}: response {ret:#x}, info "
                                f"{out.get('sw_exit_info_2'):#x}")

    # -- #VC for one instruction (vc_handle_exitcode) ----------------------------------------------

    def handle_vc(self, g, op, vc):
        """The #VC handler for the guest operation ``op`` that raised ``vc``: the instruction's
        result, as the operation would have returned it without SEV-ES."""
        kind, args = op
        handler = _VC_HANDLERS.get(kind)
        if handler is None:
            yield from self.terminate(g)
        try:
            return (yield from handler(self, g, *args))
        except GhcbProtocolError:
            yield from self.terminate(g)

    def _msr(self, g, index, *rest):
        """vc_handle_msr: RCX (and EDX:EAX for a write) in the GHCB, SW_EXITINFO1 = write."""
        write = len(rest) == 2
        value, safe = rest if write else (None, rest[0])
        ghcb = Ghcb()
        ghcb.set("rcx", index)
        if write:
            ghcb.set("rax", value & U32_MAX)
            ghcb.set("rdx", value >> 32)
        try:
            out = yield from self.hv_call(g, ghcb, U.SVM_EXIT_MSR, int(write), 0)
        except GuestException as e:
            if not safe:
                raise
            return e.vector if write else (e.vector, 0)
        if write:
            return 0 if safe else None
        value = (out.get("rdx") & U32_MAX) << 32 | out.get("rax") & U32_MAX
        return (0, value) if safe else value

    def _vmmcall(self, g, nr, a0, a1, a2, a3):
        """vc_handle_vmmcall with kvm_sev_es_hcall_prepare: RAX and CPL 0, then RBX, RCX, RDX,
        RSI; the answer is RAX, which must come back valid."""
        ghcb = Ghcb()
        ghcb.set("rax", nr)
        ghcb.set("cpl", 0)
        for name, v in (("rbx", a0), ("rcx", a1), ("rdx", a2), ("rsi", a3)):
            ghcb.set(name, v)
        out = yield from self.hv_call(g, ghcb, U.SVM_EXIT_VMMCALL, 0, 0)
        if not out.is_valid("rax"):
            raise GhcbProtocolError("VMMCALL answered without RAX")
        rax = out.get("rax")
        return rax - (1 << 64) if rax >> 63 else rax

    def _cpuid(self, g, function, index):
        """vc_handle_cpuid: RAX, RCX and XCR0 in; all four registers must come back valid."""
        ghcb = Ghcb()
        ghcb.set("rax", function)
        ghcb.set("rcx", index)
        ghcb.set("xcr0", U.XFEATURE_MASK_FP)
        out = yield from self.hv_call(g, ghcb, U.SVM_EXIT_CPUID, 0, 0)
        regs = ("rax", "rbx", "rcx", "rdx")
        if not all(out.is_valid(r) for r in regs):
            raise GhcbProtocolError("CPUID answered without all four registers")
        return tuple(out.get(r) & U32_MAX for r in regs)

    def _ucall(self, g, cmd, values):
        """vc_handle_ioio for the selftests' ucall port: a REP OUTSB of the ucall struct from the
        GHCB's shared buffer (SW_SCRATCH), SW_EXITINFO2 = the byte count."""
        data = encode_ucall(cmd, values)
        if len(data) > U.GHCB_SHARED_BUF_SIZE:
            raise GhcbProtocolError(f"a {len(data)}-byte ucall does not fit the shared buffer")
        ghcb = Ghcb()
        ghcb.page[GHCB_SHARED_BUFFER:GHCB_SHARED_BUFFER + len(data)] = data
        ghcb.set("sw_scratch", self.gpa + GHCB_SHARED_BUFFER)
        info = UCALL_PIO_PORT << 16 | IOIO_TYPE_OUTS | IOIO_REP | IOIO_DATA_8 | IOIO_ADDR_64 | \
            IOIO_SEG_DS
        yield from self.hv_call(g, ghcb, U.SVM_EXIT_IOIO, info, len(data))


_VC_HANDLERS = {"rdmsr": GhcbGuest._msr, "wrmsr": GhcbGuest._msr,
                "hypercall": GhcbGuest._vmmcall, "cpuid": GhcbGuest._cpuid,
                "ucall": GhcbGuest._ucall}


def ghcb_program(fn, ghcb_gpa, version=None):
    """A guest program that runs ``fn(g, *args)`` as an SEV-ES kernel runs its code: the GHCB
    protocol negotiated first, every #VC handled through the GHCB at ``ghcb_gpa`` (the ``_safe``
    MSR forms report #VC as vector 29; the handler takes that as the #VC too), and an exception
    the program does not catch reported as UCALL_ABORT through the GHCB, as GUEST_FAIL would.
    ``version``: speak that protocol version without negotiating (a mirror's KVM offers none,
    and KVM does not check the version a GHCB carries)."""
    def program(g, *args):
        ghcb = GhcbGuest(ghcb_gpa)
        if version is None:
            yield from ghcb.negotiate(g)
        else:
            ghcb.version = version
        if (yield g.rdmsr(U.MSR_AMD64_SEV)) & U.MSR_AMD64_SEV_SNP_ENABLED:
            yield from ghcb.register(g)         # an SNP kernel registers its GHCB first
        inner = fn(g, *args)
        send, throw = None, None
        while True:
            try:
                op = inner.throw(throw) if throw is not None else inner.send(send)
            except StopIteration:
                return
            except Exception as e:                 # the program's own failure
                yield from ghcb.handle_vc(g, g.abort(f"{type(e).__name__}: {e}"), None)
                return
            send = throw = None
            try:
                send = yield op
                if _safe_vc(op, send):
                    send = yield from ghcb.handle_vc(g, op, None)
            except VmmCommunicationException as vc:
                try:
                    send = yield from ghcb.handle_vc(g, op, vc)
                except GuestException as e:
                    throw = e
            except GuestException as e:
                throw = e
    program.__name__ = f"ghcb_{getattr(fn, '__name__', 'program')}"
    return program


def _safe_vc(op, result):
    """Whether a ``_safe`` MSR operation reported #VC (its vector 29) instead of a value."""
    kind, args = op
    if kind not in ("rdmsr", "wrmsr") or not args[-1]:
        return False
    vector = result[0] if kind == "rdmsr" else result
    return vector == U.X86_TRAP_VC


# -- KVM's side --------------------------------------------------------------------------------------

class GhcbExit:
    """KVM's snapshot of one VMGEXIT through a GHCB page (the fields sev_es_sync_from_ghcb copies
    into the VMCB and vcpu->arch.regs), and what it writes back at unmap."""

    __slots__ = ("gpa", "hva", "ghcb", "exit_code", "exit_info_1", "exit_info_2", "sw_scratch",
                 "regs", "valid", "response")

    def __init__(self, gpa, hva, page):
        self.gpa, self.hva = gpa, hva
        self.ghcb = g = Ghcb(page)
        self.valid = g.valid_bitmap
        self.regs = {r: g.get_if_valid(r) for r in ("rax", "rbx", "rcx", "rdx", "rsi")}
        self.exit_code = g.get("sw_exit_code")
        self.exit_info_1 = g.get("sw_exit_info_1")
        self.exit_info_2 = g.get("sw_exit_info_2")
        self.sw_scratch = g.get_if_valid("sw_scratch")
        self.response = (U.GHCB_HV_RESP_NO_ACTION, 0)

    def is_valid(self, name):
        """kvm_ghcb_<field>_is_valid: the bit in KVM's copy of the bitmap."""
        return bool(self.valid >> valid_bit(name) & 1)

    def success(self, data=0):
        """svm_vmgexit_success."""
        self.response = (U.GHCB_HV_RESP_NO_ACTION, data)

    def bad_input(self, reason):
        """svm_vmgexit_bad_input."""
        self.response = (U.GHCB_HV_RESP_MALFORMED_INPUT, reason)

    def inject_exception(self, vector):
        """svm_vmgexit_inject_exception."""
        self.response = (U.GHCB_HV_RESP_ISSUE_EXCEPTION,
                         U.SVM_EVTINJ_VALID | U.SVM_EVTINJ_TYPE_EXEPT | vector)


def _ok(vcpu, x):
    return True


def _has(*names):
    return lambda vcpu, x: all(x.is_valid(n) for n in names)


def _snp_only(check):
    return lambda vcpu, x: vcpu.vm.sev.snp_active and check(vcpu, x)


def _ioio_inputs(vcpu, x):
    if x.exit_info_1 & U.SVM_IOIO_STR_MASK:
        return x.is_valid("sw_scratch")
    return bool(x.exit_info_1 & U.SVM_IOIO_TYPE_MASK) or x.is_valid("rax")


def _cpuid_inputs(vcpu, x):
    return x.is_valid("rax") and x.is_valid("rcx") and (
        x.regs["rax"] != 0xd or x.is_valid("xcr0"))


def _msr_inputs(vcpu, x):
    return x.is_valid("rcx") and (not x.exit_info_1 or (x.is_valid("rax") and
                                                        x.is_valid("rdx")))


def _guest_request_inputs(vcpu, x):
    return not x.exit_info_1 & (PAGE_SIZE - 1) and not x.exit_info_2 & (PAGE_SIZE - 1) and \
        x.exit_info_1 != x.exit_info_2


#: sev_es_validate_vmgexit: for each exit code KVM accepts, whether the inputs it needs beyond
#: SW_EXITCODE/SW_EXITINFO1/SW_EXITINFO2 are marked valid. An exit code not here is
#: GHCB_ERR_INVALID_EVENT, missing input GHCB_ERR_MISSING_INPUT.
VMGEXIT_INPUTS = {
    U.SVM_EXIT_READ_DR7: _ok,
    U.SVM_EXIT_WRITE_DR7: _has("rax"),
    U.SVM_EXIT_RDTSC: _ok,
    U.SVM_EXIT_RDPMC: _has("rcx"),
    U.SVM_EXIT_CPUID: _cpuid_inputs,
    U.SVM_EXIT_INVD: _ok,
    U.SVM_EXIT_IOIO: _ioio_inputs,
    U.SVM_EXIT_MSR: _msr_inputs,
    U.SVM_EXIT_VMMCALL: _has("rax", "cpl"),
    U.SVM_EXIT_RDTSCP: _ok,
    U.SVM_EXIT_WBINVD: _ok,
    U.SVM_EXIT_MONITOR: _has("rax", "rcx", "rdx"),
    U.SVM_EXIT_MWAIT: _has("rax", "rcx"),
    U.SVM_VMGEXIT_MMIO_READ: _has("sw_scratch"),
    U.SVM_VMGEXIT_MMIO_WRITE: _has("sw_scratch"),
    U.SVM_VMGEXIT_AP_CREATION: _snp_only(
        lambda vcpu, x: x.exit_info_1 & U32_MAX == U.SVM_VMGEXIT_AP_DESTROY or x.is_valid("rax")),
    U.SVM_VMGEXIT_NMI_COMPLETE: _ok,
    U.SVM_VMGEXIT_AP_HLT_LOOP: _ok,
    U.SVM_VMGEXIT_AP_JUMP_TABLE: _ok,
    U.SVM_VMGEXIT_UNSUPPORTED_EVENT: _ok,
    U.SVM_VMGEXIT_HV_FEATURES: _ok,
    U.SVM_VMGEXIT_TERM_REQUEST: _ok,
    U.SVM_VMGEXIT_PSC: _snp_only(_has("sw_scratch")),
    U.SVM_VMGEXIT_GUEST_REQUEST: _snp_only(_guest_request_inputs),
    U.SVM_VMGEXIT_EXT_GUEST_REQUEST: _snp_only(_guest_request_inputs),
}


class GhcbVcpu:
    """Mixin of Vcpu: VMGEXIT with a GHCB page's GPA in the GHCB MSR (sev_handle_vmgexit)."""

    def _ghcb_vmgexit(self, gpa):
        """sev_handle_vmgexit after the MSR-protocol check: map, snapshot, validate, dispatch.
        Returns None (the guest resumes after its VMGEXIT), EXIT or THROW."""
        x = self._ghcb_map(gpa)
        if x is None:
            return None                 # no GHCB: straight back to the guest
        if self.vm.sev.snp_active and self.ghcb_registered_gpa != gpa:
            # An SNP guest's GHCB must be the one it registered (GHCB_MSR_REG_GPA_REQ): the
            # exit handler fails and KVM_RUN with it (sev_handle_vmgexit's
            # ghcb_gpa_is_registered check, after the page was mapped and synced).
            raise KvmError(EINVAL, "KVM_RUN", f"vmgexit: GHCB GPA {gpa:#x} is not registered "
                           f"(registered: {self.ghcb_registered_gpa})")
        why = self._ghcb_validate(x)
        if why is not None:
            x.bad_input(why)
            return self._ghcb_unmap(x)
        x.success(0)
        self._ghcb_write(x, regs=False)        # through KVM's mapping, before the exit runs
        handler = VMGEXIT_HANDLERS.get(x.exit_code)
        if handler is None:
            raise NotModelled(f"VMGEXIT exit code {x.exit_code:#x} through the GHCB page")
        result = handler(self, x)
        if result is EXIT:
            self._complete = self._ghcb_completion(x, self._complete)
            return EXIT
        if result is THROW:
            return THROW
        return self._ghcb_unmap(x)

    def _ghcb_completion(self, x, inner):
        """What the next KVM_RUN does first: the exit's own completion, then sev_es_unmap_ghcb;
        a completion that starts another exit (snp_complete_one_psc) keeps the page mapped and
        returns EXIT for KVM_RUN to return with."""
        def complete():
            if inner is not None and inner() is EXIT:
                self._complete = self._ghcb_completion(x, self._complete)
                return EXIT
            self._op = None
            self._send = None
            self._ghcb_unmap(x)
            return None
        return complete

    def _ghcb_hva(self, gfn):
        """The VMM address behind ``gfn`` (kvm_vcpu_map goes through the memslot), or None."""
        vm = self.vm
        slot = vm.gfn_to_memslot(gfn) if gfn <= vm.max_gfn else None
        if slot is None:
            return None
        return slot.userspace_addr + ((gfn - slot.base_gfn) << PAGE_SHIFT)

    def _ghcb_map(self, gpa):
        """kvm_vcpu_map and sev_es_sync_from_ghcb: the snapshot, and the page's valid bitmap
        cleared; None if the page cannot be mapped."""
        hva = self._ghcb_hva(gpa >> PAGE_SHIFT)
        if hva is None:
            return None
        kvm = self.vm.kvm
        try:
            page = kvm.read(hva, PAGE_SIZE)
        except OSError:
            return None
        x = GhcbExit(gpa, hva, page)
        if x.is_valid("xcr0"):
            self.xcr0 = x.ghcb.get("xcr0")
        kvm.write(hva + GHCB_VALID_BITMAP, bytes(16))
        return x

    def _ghcb_validate(self, x):
        """sev_es_validate_vmgexit: the GHCB_ERR_* reason the exit is refused for, or None."""
        if x.ghcb.ghcb_usage != U.GHCB_DEFAULT_USAGE:
            return U.GHCB_ERR_INVALID_USAGE
        if not all(x.is_valid(n) for n in ("sw_exit_code", "sw_exit_info_1", "sw_exit_info_2")):
            return U.GHCB_ERR_MISSING_INPUT
        check = VMGEXIT_INPUTS.get(x.exit_code)
        if check is None:
            return U.GHCB_ERR_INVALID_EVENT
        return None if check(self, x) else U.GHCB_ERR_MISSING_INPUT

    def _ghcb_unmap(self, x):
        """sev_es_unmap_ghcb: the response and RAX, RBX, RCX, RDX (sev_es_sync_to_ghcb) written
        into the page, which is marked dirty (kvm_vcpu_unmap)."""
        self._ghcb_write(x, regs=True)
        self.vm.mark_page_dirty(x.gpa >> PAGE_SHIFT)
        return None

    def _ghcb_write(self, x, regs):
        """KVM's writes into the mapped page: the response in SW_EXITINFO1/2 (each marked valid,
        as the ghcb_set_* accessors do) and, with ``regs``, RAX..RDX."""
        kvm = self.vm.kvm
        g = Ghcb(kvm.read(x.hva, PAGE_SIZE))
        g.set("sw_exit_info_1", x.response[0])
        g.set("sw_exit_info_2", x.response[1])
        if regs:
            for r in ("rax", "rbx", "rcx", "rdx"):
                g.set(r, x.regs[r])
        kvm.write(x.hva, bytes(g.page[:GHCB_SAVE_AREA_SIZE]))

    def _ghcb_result(self, x, result, finish):
        """Apply ``finish(value)`` to an exit handler's result now, or once user space completes
        the exit it asked for (the handler's complete_userspace_io callback runs first)."""
        if result is not EXIT:
            finish(result)
            return None
        inner = self._complete

        def complete():
            if inner is not None:
                inner()
            value, self._send = self._send, None
            finish(value)
        self._complete = complete
        return EXIT

    # -- the exits --------------------------------------------------------------------------------

    def _vmgexit_msr(self, x):
        """msr_interception with RCX/EDX:EAX from the GHCB; a #GP becomes an exception the
        guest is asked to raise (svm_complete_emulated_msr)."""
        index = x.regs["rcx"] & U32_MAX
        write = bool(x.exit_info_1)

        def finish(res):
            vector, value = (res, 0) if write else res
            if vector:
                x.inject_exception(U.GP_VECTOR)
            elif not write:
                x.regs["rax"], x.regs["rdx"] = value & U32_MAX, value >> 32
        if write:
            value = (x.regs["rdx"] & U32_MAX) << 32 | x.regs["rax"] & U32_MAX
            return self._ghcb_result(x, self._emulate_wrmsr(index, value, True), finish)
        return self._ghcb_result(x, self._emulate_rdmsr(index, True), finish)

    def _vmgexit_vmmcall(self, x):
        """vmmcall_interception: the hypercall in RAX with RBX, RCX, RDX, RSI; a CPL other than
        0 gets -KVM_EPERM (____kvm_emulate_hypercall). KVM_HC_MAP_GPA_RANGE exits to user
        space as KVM_EXIT_HYPERCALL, as without SEV-ES."""
        def finish(ret):
            x.regs["rax"] = ret & U64_MAX
        if x.ghcb.get("cpl") & 3:
            finish(-U.KVM_EPERM)
            return None
        r = x.regs
        return self._ghcb_result(x, self._hypercall(r["rax"], r["rbx"], r["rcx"], r["rdx"],
                                                    r["rsi"]), finish)

    def _vmgexit_cpuid(self, x):
        """cpuid_interception: kvm_cpuid for RAX/RCX (CPUID 0xD with the GHCB's XCR0)."""
        regs = self._kvm_cpuid(x.regs["rax"] & U32_MAX, x.regs["rcx"] & U32_MAX)
        x.regs.update(zip(("rax", "rbx", "rcx", "rdx"), regs))

    def _vmgexit_ioio(self, x):
        """io_interception: string I/O through the scratch area (sev_es_string_io,
        setup_vmgexit_scratch), anything else as port I/O; both exit with KVM_EXIT_IO. An OUT
        to the ucall port carries a selftest's ucall."""
        info = x.exit_info_1
        port = info >> 16 & 0xffff
        size = (info & U.SVM_IOIO_SIZE_MASK) >> U.SVM_IOIO_SIZE_SHIFT
        out = not info & U.SVM_IOIO_TYPE_MASK
        data = None
        count = 1
        if info & U.SVM_IOIO_STR_MASK:
            if x.exit_info_2 > 0x7fffffff:
                raise KvmError(EINVAL, "KVM_RUN", "string I/O count over INT_MAX")
            count = x.exit_info_2
            data = self._ghcb_scratch(x, count * size)
            if data is None:
                return None
        if out and port == UCALL_PIO_PORT and data is not None:
            ucall = decode_ucall(data)
            if ucall is not None:
                self._ucall_exit(*ucall)
                self._complete = None
        else:
            run = self.kvm_run
            run.exit_reason = U.KVM_EXIT_IO
            run.ucall = None
        run = self.kvm_run
        run.io.direction = U.KVM_EXIT_IO_OUT if out else U.KVM_EXIT_IO_IN
        run.io.size, run.io.port, run.io.count = size, port, count
        return self._ghcb_result(x, EXIT, lambda _: None)

    def _ghcb_scratch(self, x, length):
        """setup_vmgexit_scratch: the bytes of the scratch area, inside the GHCB's shared buffer
        or (up to GHCB_SCRATCH_AREA_LIMIT) elsewhere in guest memory; None after answering
        GHCB_ERR_INVALID_SCRATCH_AREA."""
        beg = x.sw_scratch
        end = beg + length
        if not beg or end > U64_MAX:
            x.bad_input(U.GHCB_ERR_INVALID_SCRATCH_AREA)
            return None
        if beg & ~(PAGE_SIZE - 1) == x.gpa:
            if beg < x.gpa + GHCB_SHARED_BUFFER or end > x.gpa + GHCB_RESERVED_0XFF0:
                x.bad_input(U.GHCB_ERR_INVALID_SCRATCH_AREA)
                return None
            off = beg - x.gpa
            return bytes(x.ghcb.page[off:off + length])
        if length > GHCB_SCRATCH_AREA_LIMIT:
            x.bad_input(U.GHCB_ERR_INVALID_SCRATCH_AREA)
            return None
        out = bytearray()
        gpa = beg
        while gpa < end:                                     # kvm_read_guest
            n = min(end - gpa, PAGE_SIZE - (gpa & (PAGE_SIZE - 1)))
            hva = self._ghcb_hva(gpa >> PAGE_SHIFT)
            if hva is None:
                raise KvmError(EFAULT, "KVM_RUN", "the scratch area cannot be read")
            out += self.vm.kvm.read(hva + (gpa & (PAGE_SIZE - 1)), n)
            gpa += n
        return bytes(out)

    def _vmgexit_hv_features(self, x):
        """SVM_VMGEXIT_HV_FEATURES: GHCB_HV_FT_SUPPORTED in SW_EXITINFO2."""
        x.success(GHCB_HV_FT_SUPPORTED)

    def _vmgexit_term_request(self, x):
        """SVM_VMGEXIT_TERM_REQUEST: KVM_EXIT_SYSTEM_EVENT SEV_TERM with the GHCB MSR in
        data[0]."""
        run = self.kvm_run
        run.exit_reason = U.KVM_EXIT_SYSTEM_EVENT
        run.system_event.type = U.KVM_SYSTEM_EVENT_SEV_TERM
        run.system_event.ndata = 1
        run.system_event.data[0] = x.gpa
        self._complete = None
        return self._ghcb_result(x, EXIT, lambda _: None)

    def _vmgexit_unsupported_event(self, x):
        """SVM_VMGEXIT_UNSUPPORTED_EVENT: KVM_RUN fails with EINVAL."""
        raise KvmError(EINVAL, "KVM_RUN", f"VMGEXIT unsupported event {x.exit_info_1:#x}/"
                       f"{x.exit_info_2:#x}")


#: sev_handle_vmgexit's dispatch: exit code -> handler(vcpu, GhcbExit) returning None (the guest
#: resumes), EXIT (user space completes it first) or THROW. An exit code that validates but has
#: no handler here raises NotModelled.
VMGEXIT_HANDLERS = {
    U.SVM_EXIT_MSR: GhcbVcpu._vmgexit_msr,
    U.SVM_EXIT_VMMCALL: GhcbVcpu._vmgexit_vmmcall,
    U.SVM_EXIT_CPUID: GhcbVcpu._vmgexit_cpuid,
    U.SVM_EXIT_IOIO: GhcbVcpu._vmgexit_ioio,
    U.SVM_VMGEXIT_HV_FEATURES: GhcbVcpu._vmgexit_hv_features,
    U.SVM_VMGEXIT_TERM_REQUEST: GhcbVcpu._vmgexit_term_request,
    U.SVM_VMGEXIT_UNSUPPORTED_EVENT: GhcbVcpu._vmgexit_unsupported_event,
}

__all__ = ["GHCB_FIELDS", "Ghcb", "GhcbExit", "GhcbGuest", "GhcbProtocolError", "GhcbVcpu",
           "VMGEXIT_HANDLERS", "VMGEXIT_INPUTS", "decode_ucall", "encode_ucall", "ghcb_program",
           "valid_bit"]
