"""A vCPU fd: ``KVM_RUN`` over a guest program, with the exits KVM gives user space.

``vcpu.run()`` resumes the guest program (:mod:`sevcore.kvm.guest`) and performs its operations as
KVM would: memory accesses through the NPT and the fault path (:mod:`sevcore.kvm.mmu`), hypercalls
(``____kvm_emulate_hypercall``), RDMSR/WRMSR (in-kernel emulation, the MSR filter, user-space
exits), and ucalls (``KVM_EXIT_IO``). It returns when the kernel would return to user space,
with the exit described in ``vcpu.kvm_run``; it raises ``OSError(EFAULT/EIO/...)`` where
``KVM_RUN`` fails, leaving ``KVM_EXIT_MEMORY_FAULT`` in ``kvm_run`` for memory faults
(api.rst, ``KVM_EXIT_MEMORY_FAULT``). What user space writes into ``kvm_run`` before the next
``run()`` (``hypercall.ret``, ``msr.data``/``msr.error``, ``mmio.data``) completes the exit.

An SEV-ES vCPU runs from its encrypted VMSA: it has the GHCB MSR and VMGEXIT (the GHCB MSR
protocol of ``sev_handle_vmgexit_msr_protocol``), SEV_STATUS, and #VC instead of every intercept;
the register ioctls are refused once its state is protected (``docs/fidelity.md``, "SEV-ES
guests").
"""
from errno import EBADF, EINTR, EINVAL, EIO

import numpy as np

from sevcore.kvm import fpu
from sevcore import uapi as U
from sevcore.errors import KvmError, NotModelled
from sevcore.kvm.guest import (UCALL_ABORT, UCALL_DONE, Guest, GuestException, Op,
                           VmmCommunicationException)
from sevcore.hw.hostmem import PAGE_SHIFT, PAGE_SIZE
from sevcore.kvm.mmu import MemoryFault, MmioAccess, decode_gpa, faultin_pages, translate
from sevcore.kvm.msr import (MSR_OK, MSR_RET_FILTERED, MSR_TYPE_R, MSR_TYPE_W, PV_HC_FEATURE,
                         MsrState, msr_exit_reason)
from sevcore.core.npt import NPT_DIRTY_LOG

U64 = (1 << 64) - 1
#: VMCB exit code of a failed VMRUN (SVM_EXIT_ERR, -1), KVM's fail_entry reason.
SVM_EXIT_ERR = (1 << 64) - 1
#: The port the selftests' ucalls use (UCALL_PIO_PORT).
UCALL_PIO_PORT = 0x1000

#: PV features KVM_GET_SUPPORTED_CPUID reports in KVM_CPUID_FEATURES.eax (arch/x86/kvm/cpuid.c);
#: HC_MAP_GPA_RANGE and MIGRATION_CONTROL are set by user space only.
KVM_SUPPORTED_PV_FEATURES = sum(1 << b for b in (
    U.KVM_FEATURE_CLOCKSOURCE, U.KVM_FEATURE_NOP_IO_DELAY, U.KVM_FEATURE_CLOCKSOURCE2,
    U.KVM_FEATURE_ASYNC_PF, U.KVM_FEATURE_PV_EOI, U.KVM_FEATURE_CLOCKSOURCE_STABLE_BIT,
    U.KVM_FEATURE_PV_UNHALT, U.KVM_FEATURE_PV_TLB_FLUSH, U.KVM_FEATURE_ASYNC_PF_VMEXIT,
    U.KVM_FEATURE_PV_SEND_IPI, U.KVM_FEATURE_POLL_CONTROL, U.KVM_FEATURE_PV_SCHED_YIELD,
    U.KVM_FEATURE_ASYNC_PF_INT, U.KVM_FEATURE_MSI_EXT_DEST_ID, U.KVM_FEATURE_STEAL_TIME))


# -- struct kvm_run ------------------------------------------------------------------------------

class _Struct:
    __slots__ = ()

    def __repr__(self):
        fields = ", ".join(f"{k}={getattr(self, k)!r}" for k in self.__slots__)
        return f"{type(self).__name__}({fields})"


class Hypercall(_Struct):
    __slots__ = ("nr", "args", "ret", "flags")

    def __init__(self):
        self.nr, self.args, self.ret, self.flags = 0, [0] * 6, 0, 0

    @property
    def longmode(self):
        return self.flags & U.KVM_EXIT_HYPERCALL_LONG_MODE


class MemoryFaultInfo(_Struct):
    __slots__ = ("flags", "gpa", "size")

    def __init__(self):
        self.flags, self.gpa, self.size = 0, 0, 0


class MsrExit(_Struct):
    __slots__ = ("error", "reason", "index", "data")

    def __init__(self):
        self.error, self.reason, self.index, self.data = 0, 0, 0, 0


class MmioExit(_Struct):
    __slots__ = ("phys_addr", "data", "len", "is_write")

    def __init__(self):
        self.phys_addr, self.data, self.len, self.is_write = 0, bytearray(8), 0, 0


class IoExit(_Struct):
    __slots__ = ("direction", "size", "port", "count")

    def __init__(self):
        self.direction, self.size, self.port, self.count = 0, 0, 0, 0


class InternalError(_Struct):
    __slots__ = ("suberror", "ndata", "data")

    def __init__(self):
        self.suberror, self.ndata, self.data = 0, 0, []


class SystemEvent(_Struct):
    __slots__ = ("type", "ndata", "data")

    def __init__(self):
        self.type, self.ndata, self.data = 0, 0, [0] * 16


class KvmRun:
    """struct kvm_run: the shared page KVM_RUN reports exits in. ``ucall`` is the decoded
    selftest ucall of a ``KVM_EXIT_IO`` exit: ``(cmd, values)``."""

    __slots__ = ("exit_reason", "immediate_exit", "hypercall", "memory_fault", "msr", "mmio",
                 "io", "internal", "ucall", "fail_entry_reason", "system_event")

    def __init__(self):
        self.exit_reason = U.KVM_EXIT_UNKNOWN
        self.immediate_exit = 0
        self.hypercall = Hypercall()
        self.memory_fault = MemoryFaultInfo()
        self.msr = MsrExit()
        self.mmio = MmioExit()
        self.io = IoExit()
        self.internal = InternalError()
        self.ucall = None
        self.fail_entry_reason = 0
        self.system_event = SystemEvent()

    def __repr__(self):
        return f"<kvm_run exit_reason={self.exit_reason}>"


class GuestAssertionError(AssertionError):
    """A guest program's assertion, reported through UCALL_ABORT."""


_BULK_OPS = {"read": 1, "write": 2, "fill": 3, "pattern": 4, "check": 5, "stamp": 6, "digest": 7}
_EXIT = object()      # an operation stopped the run loop with an exit prepared
_THROW = object()     # an operation ends by raising an exception in the guest
_NOT_HW = object()    # an MSR access the hardware does not handle by itself

#: The SVM exit code of each intercepted guest operation (a ucall is an OUT to its port).
_VC_EXIT_CODE = {"cpuid": U.SVM_EXIT_CPUID, "hypercall": U.SVM_EXIT_VMMCALL,
                 "ucall": U.SVM_EXIT_IOIO}

#: GHCB_HV_FT_SUPPORTED (arch/x86/kvm/svm/sev.c): what KVM answers a hypervisor-feature request.
GHCB_HV_FT_SUPPORTED = U.GHCB_HV_FT_SNP | U.GHCB_HV_FT_SNP_AP_CREATION


def _access_state(size, data):
    return {"pos": 0, "buf": bytearray(size) if data is None else None}


def _set_bits(value, field, mask, pos):
    """set_ghcb_msr_bits: replace the ``mask`` field at ``pos`` of ``value``."""
    return (value & ~(mask << pos)) | ((field & mask) << pos)


def _s64(v):
    v &= U64
    return v - (1 << 64) if v >> 63 else v


#: struct kvm_regs, in the kernel's order.
KVM_REGS = ("rax", "rbx", "rcx", "rdx", "rsi", "rdi", "rsp", "rbp", "r8", "r9", "r10", "r11",
            "r12", "r13", "r14", "r15", "rip", "rflags")


def _reset_regs():
    regs = dict.fromkeys(KVM_REGS, 0)
    regs.update(rip=0xfff0, rflags=0x2, rdx=0x600)
    return regs


def default_cpuid(host):
    """The entries KVM_GET_SUPPORTED_CPUID gives a simulated AMD host: the basic and extended
    leaves a guest program looks at, Fn8000_001F (SEV, with the C-bit position), and KVM's
    paravirtual leaves 0x40000000/0x40000001."""
    def e(function, eax=0, ebx=0, ecx=0, edx=0, index=0, flags=0):
        return {"function": function, "index": index, "flags": flags,
                "eax": eax, "ebx": ebx, "ecx": ecx, "edx": edx}
    auth = int.from_bytes(b"Auth", "little"), int.from_bytes(b"enti", "little"), \
        int.from_bytes(b"cAMD", "little")
    kvm_sig = [int.from_bytes(b"KVMKVMKVM\0\0\0"[i:i + 4], "little") for i in (0, 4, 8)]
    return [
        e(0x0, 0x10, auth[0], auth[2], auth[1]),
        # ECX: XSAVE (26), AVX (28), hypervisor (31).
        e(0x1, 0x00a10f11, 0, 1 << 26 | 1 << 28 | 1 << 31, 0x178bfbff),
        # XSAVE: the supported XCR0 and its area size; the YMM component's size and offset.
        e(0xd, fpu.SUPPORTED_XCR0, fpu.xstate_size(fpu.SUPPORTED_XCR0),
          fpu.xstate_size(fpu.SUPPORTED_XCR0), 0, index=0, flags=U.KVM_CPUID_FLAG_SIGNIFCANT_INDEX),
        e(0xd, fpu.XSAVE_YMM_SIZE, fpu.XSAVE_YMM_OFFSET, index=2,
          flags=U.KVM_CPUID_FLAG_SIGNIFCANT_INDEX),
        e(0x80000000, 0x80000021, auth[0], auth[2], auth[1]),
        e(0x80000001, 0, 0, 1 << 2, 1 << 29 | 1 << 20),
        e(0x80000008, 0x3030, 0, 0, 0),
        # Fn8000_001F: SME, SEV, SEV-ES in EAX; EBX[5:0] = C-bit position.
        e(0x8000001F, 1 << 0 | 1 << 1 | 1 << 3, host.c_bit, 509, 0),
        e(U.KVM_CPUID_SIGNATURE, U.KVM_CPUID_FEATURES, *kvm_sig),
        e(U.KVM_CPUID_FEATURES, KVM_SUPPORTED_PV_FEATURES),
    ]


class Vcpu:
    """A vCPU fd. Created by :meth:`sevcore.kvm.vm.Vm.create_vcpu`."""

    def __init__(self, vm, vcpu_id):
        self.vm = vm
        self.vcpu_id = vcpu_id
        self.kvm_run = KvmRun()
        self.cpuid = []
        self._pv_features = 0
        self.pv_enforce = False
        self.msrs = MsrState(self)
        self.has_run = False
        self.closed = False
        self._code = None
        self._gen = None
        self._op = None          # the operation being executed (kept across exits)
        self._progress = None    # per-operation state that survives an exit
        self._send = None        # what the guest receives next
        self._throw = None       # or an exception to raise in it
        self._complete = None    # complete_userspace_io callback
        self._finished = False
        #: SEV-ES: the VMSA page (an SPA) and whether LAUNCH_UPDATE_VMSA encrypted it.
        self.vmsa_spa = None
        self.guest_state_protected = False
        self.guest_debug = 0
        #: struct kvm_regs as KVM holds it (kvm_vcpu_reset: RIP 0xfff0, RFLAGS 2, RDX 0x600
        #: before any CPUID is set), XCR0 (FP only) and the FPU image (sevcore.kvm.fpu).
        self.regs = _reset_regs()
        self.xcr0 = U.XFEATURE_MASK_FP
        self.fpu = fpu.reset_image()
        #: fpstate_set_confidential: KVM no longer holds the FPU state (LAUNCH_UPDATE_VMSA).
        self.fpu_confidential = False
        #: The VMCB's GHCB MSR. An SEV-ES vCPU comes out of RESET with the SEV_INFO response
        #: (sev_es_init_vmcb / sev_es_vcpu_reset).
        sev = vm.sev
        self.ghcb_gpa = U.GHCB_MSR_SEV_INFO(sev.ghcb_version, U.GHCB_VERSION_MIN,
                                            vm.host.c_bit) if sev.es_active else 0
        #: SEV-ES: the VMSA still holds the state that shut down, so every VMRUN shuts down again.
        self.in_shutdown = False
        #: SEV-ES: what ended the guest program (None: it returned) when it triple-faulted.
        self.guest_exception = None
        self.fd = vm.host.install_fd(self)

    def __repr__(self):
        return f"<Vcpu {self.vcpu_id} of {self.vm!r}>"

    def close(self):
        """Close the vCPU fd (the VM keeps the vCPU, as KVM does, until it is destroyed)."""
        if not self.closed:
            self.closed = True
            self.vm.host.release_fd(self.fd)

    def _enter(self, ioctl):
        if self.closed:
            raise KvmError(EBADF, ioctl, "vCPU fd is closed")
        if self.vm.dead:
            raise KvmError(EIO, ioctl, "VM is dead")

    # -- CPUID and capabilities ----------------------------------------------------------------------

    def set_cpuid2(self, entries):
        """Mirrors ``KVM_SET_CPUID2``: EINVAL for a CPUID that differs from the current one after
        the vCPU has run. KVM clears KVM_FEATURE_PV_UNHALT when HLT exits are disabled."""
        ioctl = "KVM_SET_CPUID2"
        self._enter(ioctl)
        new = [dict(e) for e in entries]
        for e in new:
            for k in ("function", "index", "flags", "eax", "ebx", "ecx", "edx"):
                e.setdefault(k, 0)
                if not isinstance(e[k], int) or not 0 <= e[k] < 1 << 32:
                    raise KvmError(EINVAL, ioctl, f"cpuid entry field {k} is not a u32")
        if self.vm.hlt_in_guest:           # kvm_update_cpuid_runtime
            for e in new:
                if e["function"] == U.KVM_CPUID_FEATURES:
                    e["eax"] &= ~(1 << U.KVM_FEATURE_PV_UNHALT)
        if self.has_run and new != self.cpuid:
            raise KvmError(EINVAL, ioctl, "CPUID cannot change after KVM_RUN")
        self.cpuid = new
        leaf = self.cpuid_entry(U.KVM_CPUID_FEATURES)
        self._pv_features = leaf["eax"] if leaf else 0
        return 0

    def get_cpuid2(self):
        """Mirrors ``KVM_GET_CPUID2``: a copy of the entries."""
        self._enter("KVM_GET_CPUID2")
        return [dict(e) for e in self.cpuid]

    def cpuid_entry(self, function, index=0):
        """kvm_find_cpuid_entry_index: the index counts only for leaves flagged
        KVM_CPUID_FLAG_SIGNIFCANT_INDEX."""
        for e in self.cpuid:
            if e["function"] == function and (
                    not e["flags"] & U.KVM_CPUID_FLAG_SIGNIFCANT_INDEX or e["index"] == index):
                return e
        return None

    def guest_pv_has(self, feature):
        """guest_pv_has: without KVM_CAP_ENFORCE_PV_FEATURE_CPUID every PV feature is allowed."""
        return not self.pv_enforce or bool(self._pv_features >> feature & 1)

    def enable_cap(self, cap, *args, flags=0):
        """Mirrors ``KVM_ENABLE_CAP`` on a vCPU fd (KVM_CAP_ENFORCE_PV_FEATURE_CPUID)."""
        ioctl = "KVM_ENABLE_CAP"
        self._enter(ioctl)
        a = list(args) + [0] * (4 - len(args))
        if flags != 0:
            raise KvmError(EINVAL, ioctl, "flags must be 0")
        if cap == U.KVM_CAP_ENFORCE_PV_FEATURE_CPUID:
            self.pv_enforce = bool(a[0])
            return 0
        raise KvmError(EINVAL, ioctl, f"capability {cap} cannot be enabled on a vCPU")

    # -- registers and FPU state -------------------------------------------------------------------

    def _state_ioctl(self, ioctl):
        """The check of every register ioctl on a VM type with protected state: once the VMSA is
        encrypted KVM has nothing to read or write (EINVAL)."""
        self._enter(ioctl)
        if self.vm.has_protected_state and self.guest_state_protected:
            raise KvmError(EINVAL, ioctl, "guest state is protected")

    def get_regs(self):
        """Mirrors ``KVM_GET_REGS``: the ``struct kvm_regs`` fields as a dict; EINVAL once the
        state of an SEV-ES/SNP-type VM is protected (a legacy ES_INIT VM reads KVM's stale
        copy)."""
        self._state_ioctl("KVM_GET_REGS")
        return dict(self.regs)

    def set_regs(self, **regs):
        """Mirrors ``KVM_SET_REGS`` with ``struct kvm_regs`` field names (the others keep their
        values, as a read-modify-write would); EINVAL once the state is protected."""
        ioctl = "KVM_SET_REGS"
        unknown = set(regs) - set(KVM_REGS)
        if unknown:
            raise TypeError(f"struct kvm_regs has no field(s) {sorted(unknown)}")
        for k, v in regs.items():
            if not isinstance(v, int) or not 0 <= v <= U64:
                raise ValueError(f"{k} must be a u64")
        self._state_ioctl(ioctl)
        self.regs.update(regs)
        return 0

    def get_xsave(self):
        """Mirrors ``KVM_GET_XSAVE``: the 4096-byte ``struct kvm_xsave``. Once the FPU state is
        confidential: EINVAL on an SEV-ES/SNP-type VM, zeros (and success) on a legacy one."""
        ioctl = "KVM_GET_XSAVE"
        self._enter(ioctl)
        if self.fpu_confidential:
            if self.vm.has_protected_state:
                raise KvmError(EINVAL, ioctl, "FPU state is confidential")
            return bytes(fpu.XSAVE_SIZE)
        return bytes(self.fpu)

    def set_xsave(self, region):
        """Mirrors ``KVM_SET_XSAVE``: ``region`` is the 4096-byte ``struct kvm_xsave``. EINVAL for
        XSTATE_BV bits outside the supported XCR0, a compacted header, reserved header bytes or
        MXCSR bits. Once the FPU state is confidential: EINVAL on an SEV-ES/SNP-type VM, ignored
        on a legacy one."""
        ioctl = "KVM_SET_XSAVE"
        region = bytes(region)
        if len(region) != fpu.XSAVE_SIZE:
            raise ValueError(f"struct kvm_xsave is {fpu.XSAVE_SIZE} bytes, not {len(region)}")
        self._enter(ioctl)
        if self.fpu_confidential:
            if self.vm.has_protected_state:
                raise KvmError(EINVAL, ioctl, "FPU state is confidential")
            return 0
        why = fpu.check_uabi(region, fpu.SUPPORTED_XCR0)
        if why:
            raise KvmError(EINVAL, ioctl, why)
        self.fpu = fpu.copy_uabi(region)
        return 0

    def get_xcrs(self):
        """Mirrors ``KVM_GET_XCRS``: ``[(xcr, value)]`` (XCR0 only); EINVAL once the state is
        protected."""
        self._state_ioctl("KVM_GET_XCRS")
        return [(U.XCR_XFEATURE_ENABLED_MASK, self.xcr0)]

    def set_xcrs(self, xcrs, flags=0):
        """Mirrors ``KVM_SET_XCRS``: ``xcrs`` are ``(xcr, value)`` pairs; the first XCR0 entry is
        set as ``__kvm_set_xcr`` allows (FP set, YMM only with SSE, nothing beyond the guest's
        CPUID 0xD), the others are ignored. EINVAL when protected, for more than KVM_MAX_XCRS
        entries, nonzero flags or a refused XCR0."""
        ioctl = "KVM_SET_XCRS"
        xcrs = [tuple(x) for x in xcrs]
        self._state_ioctl(ioctl)
        if len(xcrs) > U.KVM_MAX_XCRS or flags:
            raise KvmError(EINVAL, ioctl, "too many XCRs or nonzero flags")
        for xcr, value in xcrs:
            if xcr == U.XCR_XFEATURE_ENABLED_MASK:
                why = self._check_xcr0(value)
                if why:
                    raise KvmError(EINVAL, ioctl, why)
                self.xcr0 = value
                break
        return 0

    def _check_xcr0(self, xcr0):
        """__kvm_set_xcr for XCR0: the reason it is refused, or None."""
        if not xcr0 & U.XFEATURE_MASK_FP:
            return "XCR0 without FP"
        if xcr0 & U.XFEATURE_MASK_YMM and not xcr0 & U.XFEATURE_MASK_SSE:
            return "XCR0 has YMM without SSE"
        leaf = self.cpuid_entry(0xd, 0)
        guest_supported = ((leaf["eax"] | leaf["edx"] << 32) & fpu.SUPPORTED_XCR0) if leaf else 0
        if xcr0 & ~(guest_supported | U.XFEATURE_MASK_FP):
            return f"XCR0 {xcr0:#x} beyond the guest's CPUID {guest_supported:#x}"
        return None

    def _kvm_cpuid(self, function, index):
        """kvm_cpuid: the entry's registers, zeros for a leaf the guest has not got (an AMD
        vendor string gets no out-of-range fallback); CPUID 0xD.0 EBX follows XCR0."""
        e = self.cpuid_entry(function, index)
        if e is None:
            return 0, 0, 0, 0
        ebx = fpu.xstate_size(self.xcr0) if (function, index) == (0xd, 0) else e["ebx"]
        return e["eax"], ebx, e["ecx"], e["edx"]

    # -- the guest -------------------------------------------------------------------------------------

    def set_guest_code(self, fn, *args):
        """Load a guest program: ``fn(g, *args)`` is a generator function (sevcore.kvm.guest)."""
        self._code = (fn, args)
        self._gen = None
        self._op = self._progress = self._complete = self._throw = self._send = None
        self._finished = False

    def get_ucall(self):
        """The ucall of the last exit, ``(cmd, values)``, or None if it was not a ucall; raises
        GuestAssertionError for UCALL_ABORT (REPORT_GUEST_ASSERT)."""
        run = self.kvm_run
        if run.exit_reason != U.KVM_EXIT_IO or run.ucall is None:
            return None
        if run.ucall[0] == UCALL_ABORT:
            raise GuestAssertionError(run.ucall[1][0])
        return run.ucall

    # -- KVM_RUN -----------------------------------------------------------------------------------------

    def run(self):
        """Mirrors ``KVM_RUN``: run the guest until an exit to user space; returns ``kvm_run``.

        Raises EINVAL for an SEV VM that was never initialised, EIO for a dead VM, EINTR for
        ``immediate_exit``, and EFAULT/EIO/... with ``KVM_EXIT_MEMORY_FAULT`` for memory faults."""
        ioctl = "KVM_RUN"
        self._enter(ioctl)
        vm = self.vm
        if vm.sev_need_init:
            raise KvmError(EINVAL, ioctl, "SEV VM has not been initialised (KVM_SEV_INIT2)")
        if vm.sev.active and self._sev_entry_fails():
            # VMRUN of a guest whose firmware context was SENT (SEND_FINISH) or has no key, or
            # of an SEV-ES vCPU whose VMSA never went through LAUNCH_UPDATE_VMSA: the entry
            # fails (SVM_EXIT_ERR) and KVM reports KVM_EXIT_FAIL_ENTRY.
            run = self.kvm_run
            run.exit_reason = U.KVM_EXIT_FAIL_ENTRY
            run.fail_entry_reason = SVM_EXIT_ERR
            return run
        if self.in_shutdown:
            # shutdown_interception did not INIT an SEV-ES vCPU: VMRUN resumes the VMSA that
            # triple-faulted, and it faults again.
            self.kvm_run.exit_reason = U.KVM_EXIT_SHUTDOWN
            return self.kvm_run
        if self._code is None:
            raise ValueError("no guest program: call vcpu.set_guest_code(fn, ...) first")
        run = self.kvm_run
        self.has_run = True
        if self._complete is not None:
            complete, self._complete = self._complete, None
            complete()
        if run.immediate_exit:
            run.exit_reason = U.KVM_EXIT_INTR
            raise KvmError(EINTR, ioctl, "immediate_exit")
        if not vm.has_memslots():
            # Nothing to fetch instructions from: emulation of the first fetch fails.
            run.exit_reason = U.KVM_EXIT_INTERNAL_ERROR
            run.internal.suberror = U.KVM_INTERNAL_ERROR_EMULATION
            run.internal.ndata = 0
            return run
        run.ucall = None
        while True:
            if self._op is None:
                op = self._next_op()
                if op is _EXIT:
                    return run
                self._op, self._progress = op, None
            try:
                result = self._execute(self._op)
            except MemoryFault as f:
                run.exit_reason = U.KVM_EXIT_MEMORY_FAULT
                run.memory_fault.flags = f.flags
                run.memory_fault.gpa = f.gpa
                run.memory_fault.size = PAGE_SIZE
                raise KvmError(f.errno, ioctl, f.why) from None
            if result is _EXIT:
                return run
            self._op = None
            if result is not _THROW:
                self._send = result

    def _sev_entry_fails(self):
        vm = self.vm
        psp = vm.host.psp
        g = psp.guest(vm.sev.handle)
        return g is None or g.state == U.SEV_GUEST_STATE_SENT or \
            not vm.host.umc.has_key(vm.sev.asid) or \
            (vm.sev.es_active and not self.guest_state_protected)

    def _next_op(self):
        """Resume the generator with the last result; a ucall exit when it ends or raises."""
        run = self.kvm_run
        if self._finished:
            run.exit_reason = U.KVM_EXIT_HLT
            return _EXIT
        if self._gen is None:
            fn, args = self._code
            self._gen = fn(Guest(self), *args)
            if not hasattr(self._gen, "send"):
                self._finished = True
                raise TypeError("guest code must be a generator function")
        try:
            if self._throw is not None:
                exc, self._throw = self._throw, None
                op = self._gen.throw(exc)
            elif self._send is None:
                op = next(self._gen)
            else:
                send, self._send = self._send, None
                op = self._gen.send(send)
        except StopIteration:
            return self._guest_ended(None)
        except Exception as e:             # a guest assert or any guest error: UCALL_ABORT
            return self._guest_ended(e)
        if not isinstance(op, Op):
            return self._guest_ended(TypeError(f"guest yielded {op!r}, not a g.* operation"))
        return op

    def _guest_ended(self, exc):
        """The program returned (``exc`` None) or raised: GUEST_DONE or UCALL_ABORT. An SEV-ES
        guest cannot make a ucall, so its end is a triple fault."""
        self._finished = True
        if self.guest_state_protected:
            self.guest_exception = exc
            return self._shutdown()
        if exc is None:
            return self._ucall_exit(UCALL_DONE, ())
        msg = str(exc) or type(exc).__name__
        return self._ucall_exit(UCALL_ABORT, (f"{type(exc).__name__}: {msg}",))

    def _shutdown(self):
        """shutdown_interception: KVM_EXIT_SHUTDOWN. Any other vCPU gets INIT, which restarts the
        guest program (the model's reset vector) with the reset registers; an SEV-ES vCPU's
        encrypted VMSA cannot be reinitialised, so it stays in shutdown."""
        self._op = None
        if self.guest_state_protected:
            self.in_shutdown = True
        else:
            self._gen = None
            self._finished = False
            self._send = self._throw = None
            self.regs = _reset_regs()
        self.kvm_run.exit_reason = U.KVM_EXIT_SHUTDOWN
        return _EXIT

    def _ucall_exit(self, cmd, values):
        run = self.kvm_run
        run.exit_reason = U.KVM_EXIT_IO
        run.io.direction, run.io.size, run.io.port, run.io.count = U.KVM_EXIT_IO_OUT, 4, \
            UCALL_PIO_PORT, 1
        run.ucall = (cmd, tuple(values))
        if cmd == UCALL_DONE:
            self._finished = True
        return _EXIT

    def _execute(self, op):
        kind, args = op
        if kind == "read":
            return self._access(args[0], args[1], None)
        if kind == "write":
            return self._access(args[0], len(args[1]), args[1])
        if kind in ("bulk", "bulk_list"):
            return self._bulk(kind, args)
        if kind == "rdmsr":
            return self._rdmsr(*args)
        if kind == "wrmsr":
            return self._wrmsr(*args)
        if kind == "xsave":
            return self._xsave(*args)
        if kind == "vmgexit":
            return self._vmgexit()
        if kind == "shutdown":
            return self._shutdown()
        if self.guest_state_protected:
            # Intercepted instructions raise #VC in an SEV-ES guest.
            return self._vc(_VC_EXIT_CODE[kind], kind)
        if kind == "cpuid":
            return self._kvm_cpuid(*args)
        if kind == "hypercall":
            return self._hypercall(*args)
        if kind == "ucall":
            self._op = None          # the OUT completes before user space sees the exit
            return self._ucall_exit(*args)
        raise ValueError(f"unknown guest operation {kind!r}")

    def _vc(self, exit_code, what, safe=False, safe_result=None):
        """#VC for the current instruction of an SEV-ES guest."""
        return self._deliver(safe, safe_result,
                             VmmCommunicationException(exit_code, what))

    # -- memory ---------------------------------------------------------------------------------------

    def _access(self, gpa, size, data, st=None):
        """A guest read (data None) or write of [gpa, gpa + size). Whole pages go to the C page
        kernel, partial pages (and MMIO) are handled here; progress is kept across exits so a
        retried access resumes where it stopped (in ``self._progress``, or in ``st``, a
        :func:`_access_state`, for an instruction that makes several accesses)."""
        from sevcore.core import pages as gm
        if st is None:
            if self._progress is None:
                self._progress = _access_state(size, data)
            st = self._progress
        write = data is not None
        while st["pos"] < size:
            pos = st["pos"]
            addr = gpa + pos
            off = addr & (PAGE_SIZE - 1)
            n = min(PAGE_SIZE - off, size - pos)
            if off == 0 and size - pos >= PAGE_SIZE:
                npages = (size - pos) >> PAGE_SHIFT
                span = slice(pos, pos + (npages << PAGE_SHIFT))
                buf = memoryview(data)[span] if write else memoryview(st["buf"])[span]
                done = [0]
                try:
                    self._page_kernel(gm.GUEST_OP_WRITE if write else gm.GUEST_OP_READ, addr,
                                      npages, done, buf=buf)
                except MmioAccess as e:
                    return self._mmio(st, e.gpa, data, pos + (done[0] << PAGE_SHIFT), 8)
                finally:
                    st["pos"] = pos + (done[0] << PAGE_SHIFT)
                continue
            try:
                self._access_partial(addr, off, n, data, pos, st["buf"])
            except MmioAccess as e:
                return self._mmio(st, e.gpa + off, data, pos, min(n, 8))
            st["pos"] = pos + n
        return None if write else bytes(st["buf"])

    def _access_partial(self, addr, off, n, data, pos, buf):
        """Bytes [off, off + n) of one page, through the NPT (and the key for C-bit accesses)."""
        vm = self.vm
        write = data is not None
        real, private, encrypted = decode_gpa(vm, addr)
        gfn = real >> PAGE_SHIFT
        pfn, flags = translate(vm, gfn, private, write)
        spa = (pfn << PAGE_SHIFT) + off
        # The memory controller patches a partial encrypted page (decrypt, patch, encrypt).
        asid = vm.sev.asid if encrypted and vm.encryption_engine() is not None else 0
        if write:
            vm.host.umc.write(spa, memoryview(data)[pos:pos + n], asid)
        else:
            buf[pos:pos + n] = vm.host.umc.read(spa, n, asid)
        if write and flags & NPT_DIRTY_LOG:
            vm.mark_page_dirty(gfn)

    def _mmio(self, st, gpa, data, pos, n):
        """KVM_EXIT_MMIO for ``n`` bytes at ``gpa`` (C-bit / shared bit stripped); the read
        data user space supplies completes the access on the next KVM_RUN. KVM cannot decode an
        SEV-ES guest's instruction: the MMIO SPTE's reserved bits reflect the #NPF as #VC."""
        if self.guest_state_protected:
            return self._vc(U.SVM_EXIT_NPF, f"MMIO at gpa {gpa:#x}")
        run = self.kvm_run
        run.exit_reason = U.KVM_EXIT_MMIO
        run.mmio.phys_addr = gpa
        run.mmio.len = n
        run.mmio.is_write = int(data is not None)
        run.mmio.data = bytearray(8)
        if data is not None:
            run.mmio.data[:n] = data[pos:pos + n]

        def complete():
            if data is None:
                st["buf"][pos:pos + n] = bytes(run.mmio.data[:n])
            st["pos"] = pos + n
        self._complete = complete
        return _EXIT

    def _page_kernel(self, op, first_gpa, n, done, *, gpas=None, arg=0, buf=None, out=None,
                     on_chunk=None):
        """Run the C page kernel over ``n`` pages from the page-aligned ``first_gpa`` (or the
        page-aligned list ``gpas``), from page ``done[0]`` on (``out``: CHECK's two words, or DIGEST's word per
        page), faulting in the pages it stops at in batches
        (:func:`sevcore.kvm.mmu.faultin_pages`). ``done[0]`` always holds the pages completed, also
        when MemoryFault or MmioAccess propagates. ``on_chunk(start, k)`` sees each kernel
        call's result (CHECK accumulates its ``out`` there)."""
        from sevcore.core import pages as gm
        vm = self.vm
        write = op in gm.WRITE_OPS
        ops = vm.page_ops()
        while done[0] < n:
            start = done[0]
            first = first_gpa + (start << PAGE_SHIFT) if gpas is None else int(gpas[start])
            real, private, encrypted = decode_gpa(vm, first)
            tag = first - real             # the C-bit or shared bit, common to the access
            engine = vm.encryption_engine() if encrypted else None
            if gpas is None:
                gfns = np.arange(real >> PAGE_SHIFT, (real >> PAGE_SHIFT) + n - start,
                                 dtype=np.uint64)
            else:
                gfns = (gpas[start:] - np.uint64(tag)) >> np.uint64(PAGE_SHIFT)
            page_buf = None if buf is None else buf[start << PAGE_SHIFT:]
            k = ops.run(op, gfns=gfns, private=private, engine=engine, arg=arg, buf=page_buf,
                        out=out[start:] if op == gm.GUEST_OP_DIGEST else out)
            if on_chunk is not None:
                on_chunk(start, k)
            done[0] = start + k
            if done[0] == n:
                return
            g = int(gfns[k])
            if g > vm.max_gfn:
                raise MmioAccess(g << PAGE_SHIFT)
            _, private, _ = decode_gpa(vm, (g << PAGE_SHIFT) | tag)
            faultin_pages(vm, gfns[k:], private, write)

    def _bulk(self, kind, args):
        """A bulk operation: the C page kernel over all its pages (progress survives exits)."""
        from sevcore.core import pages as gm
        if kind == "bulk":
            name, gpa, n, arg = args
            gpas = buf = None
        else:
            name, gpas, arg, buf = args       # gpas: page aligned (sevcore.kvm.guest._page_gpas)
            gpa, n = 0, len(gpas)
        st = self._progress
        if st is None:
            result = None                  # what the operation returns, filled across exits
            if name == "digest":
                result = np.zeros(n, np.uint64)
            elif name == "read":
                result = np.empty((n, PAGE_SIZE), np.uint8) if buf is None else buf
            elif name == "check":
                result = [0, None]         # mismatching pages, index of the first
            st = self._progress = {"done": [0], "result": result}
        result = st["result"]
        out = on_chunk = None
        if name == "digest":
            out = result
        elif name == "read":
            buf = np.frombuffer(result, np.uint8)
        elif name == "check":
            out = np.zeros(2, np.uint64)

            def on_chunk(start, k):
                if k:
                    result[0] += int(out[0])
                    if result[1] is None and int(out[1]) != gm.NO_MISMATCH:
                        result[1] = start + int(out[1])
        try:
            self._page_kernel(_BULK_OPS[name], gpa, n, st["done"], gpas=gpas, arg=arg, buf=buf,
                              out=out, on_chunk=on_chunk)
        except MmioAccess as e:
            # Bulk operations are for RAM; the guest sees the failure as an exception.
            self._throw = RuntimeError(f"bulk {name} reached MMIO at gpa {e.gpa:#x}")
            return _THROW
        return tuple(result) if name == "check" else result

    # -- SEV-ES: the GHCB, SEV_STATUS, XSAVE -------------------------------------------------------

    def _vmsa(self):
        """The VMSA as VMRUN sees it: the page decrypted with the guest's key."""
        return self.vm.host.umc.read(self.vmsa_spa, PAGE_SIZE, self.vm.sev.asid)

    def _vmgexit(self):
        """VMGEXIT (sev_handle_vmgexit): the GHCB MSR protocol when the MSR's low 12 bits hold a
        request; no GHCB (0): straight back to the guest. Outside SEV-ES: VMMCALL."""
        if not self.guest_state_protected:
            return self._hypercall(0, 0, 0, 0, 0)
        ghcb = self.ghcb_gpa
        if ghcb & U.GHCB_MSR_INFO_MASK:
            return self._ghcb_msr_protocol(ghcb)
        if ghcb == 0:
            return None
        raise NotModelled(f"VMGEXIT through a GHCB page (gpa {ghcb:#x}); only the GHCB MSR "
                          "protocol is simulated")

    def _ghcb_msr_protocol(self, ghcb):
        """sev_handle_vmgexit_msr_protocol: answer SEV_INFO, CPUID and hypervisor-feature
        requests in the MSR; AP reset hold halts (no in-kernel local APIC: an exit); TERM_REQ,
        and the SNP-only requests from a non-SNP guest, end in KVM_EXIT_SYSTEM_EVENT SEV_TERM
        with the MSR in data[0]; anything else leaves the MSR as it is."""
        vm = self.vm
        info = ghcb & U.GHCB_MSR_INFO_MASK
        if info == U.GHCB_MSR_SEV_INFO_REQ:
            self.ghcb_gpa = U.GHCB_MSR_SEV_INFO(vm.sev.ghcb_version, U.GHCB_VERSION_MIN,
                                                vm.host.c_bit)
        elif info == U.GHCB_MSR_CPUID_REQ:
            # The CPUID intercept with RAX = function, RCX = 0; the register asked for goes in
            # GHCBData[63:32], GHCBData[31:12] stay.
            fn = (ghcb >> U.GHCB_MSR_CPUID_FUNC_POS) & U.GHCB_MSR_CPUID_FUNC_MASK
            reg = (ghcb >> U.GHCB_MSR_CPUID_REG_POS) & U.GHCB_MSR_CPUID_REG_MASK
            value = self._kvm_cpuid(fn, 0)[reg]
            ghcb = _set_bits(ghcb, value, U.GHCB_MSR_CPUID_VALUE_MASK, U.GHCB_MSR_CPUID_VALUE_POS)
            self.ghcb_gpa = _set_bits(ghcb, U.GHCB_MSR_CPUID_RESP, U.GHCB_MSR_INFO_MASK,
                                      U.GHCB_MSR_INFO_POS)
        elif info == U.GHCB_MSR_AP_RESET_HOLD_REQ:
            ghcb = _set_bits(ghcb, 0, U.GHCB_MSR_AP_RESET_HOLD_RESULT_MASK,
                             U.GHCB_MSR_AP_RESET_HOLD_RESULT_POS)
            self.ghcb_gpa = _set_bits(ghcb, U.GHCB_MSR_AP_RESET_HOLD_RESP, U.GHCB_MSR_INFO_MASK,
                                      U.GHCB_MSR_INFO_POS)
            self._op = None
            self.kvm_run.exit_reason = U.KVM_EXIT_AP_RESET_HOLD
            return _EXIT
        elif info == U.GHCB_MSR_HV_FT_REQ:
            ghcb = _set_bits(ghcb, GHCB_HV_FT_SUPPORTED, U.GHCB_MSR_HV_FT_MASK,
                             U.GHCB_MSR_HV_FT_POS)
            self.ghcb_gpa = _set_bits(ghcb, U.GHCB_MSR_HV_FT_RESP, U.GHCB_MSR_INFO_MASK,
                                      U.GHCB_MSR_INFO_POS)
        elif info == U.GHCB_MSR_TERM_REQ or info in (
                U.GHCB_MSR_PREF_GPA_REQ, U.GHCB_MSR_REG_GPA_REQ, U.GHCB_MSR_PSC_REQ):
            if vm.sev.snp_active and info != U.GHCB_MSR_TERM_REQ:
                raise NotModelled(f"SNP GHCB MSR request {info:#x}")
            run = self.kvm_run
            run.exit_reason = U.KVM_EXIT_SYSTEM_EVENT
            run.system_event.type = U.KVM_SYSTEM_EVENT_SEV_TERM
            run.system_event.ndata = 1
            run.system_event.data[0] = ghcb
            self._op = None
            return _EXIT
        return None

    def _sev_status(self):
        """MSR_AMD64_SEV (SEV_STATUS), which the CPU answers for an SEV guest: SEV enabled, and
        for SEV-ES also ES enabled with the VMSA's SEV_FEATURES from bit 2 on (SNPActive is bit
        2, DebugSwap bit 7, as msr-index.h numbers them)."""
        if not self.guest_state_protected:
            return U.MSR_AMD64_SEV_ENABLED
        vmsa = self._vmsa()
        features = int.from_bytes(vmsa[fpu.VMSA_SEV_FEATURES:fpu.VMSA_SEV_FEATURES + 8], "little")
        return (U.MSR_AMD64_SEV_ENABLED | U.MSR_AMD64_SEV_ES_ENABLED | features << 2) & U64

    def _sev_msr(self, index, value, safe):
        """An RDMSR (``value`` None) or WRMSR the hardware handles for an SEV guest:
        SEV_STATUS (read-only), and an SEV-ES guest's GHCB MSR. _NOT_HW for any other."""
        if not self.vm.sev.active:
            return _NOT_HW
        if index == U.MSR_AMD64_SEV:
            if value is not None:
                return self._deliver_gp(safe, U.GP_VECTOR, f"WRMSR {index:#x}")
            status = self._sev_status()
            return (0, status) if safe else status
        if index == U.MSR_AMD64_SEV_ES_GHCB and self.guest_state_protected:
            if value is None:
                return (0, self.ghcb_gpa) if safe else self.ghcb_gpa
            self.ghcb_gpa = value
            return 0 if safe else None
        return _NOT_HW

    def _xsave(self, gpa, rfbm):
        """XSAVE of the guest's live state (for SEV-ES the state VMRUN loaded from the VMSA)
        with RFBM = ``rfbm`` & XCR0: a read-modify-write of the area, as XSAVE leaves the bytes
        of components it does not save and the rest of the header alone."""
        if gpa & 63:
            return self._deliver_gp(False, None, f"XSAVE to unaligned gpa {gpa:#x}")
        if self.guest_state_protected:
            img, xinuse, xcr0 = fpu.vmsa_state(self._vmsa())
        else:
            img, xinuse, xcr0 = self.fpu, fpu.xstate_bv(self.fpu), self.xcr0
        rfbm &= xcr0
        n = fpu.xsave_span(rfbm)
        st = self._progress
        if st is None:
            st = self._progress = {"read": _access_state(n, None), "write": None}
        if st["write"] is None:
            mem = self._access(gpa, n, None, st["read"])
            if mem is _EXIT or mem is _THROW:
                return mem
            mem = bytearray(mem)
            fpu.xsave(mem, img, xinuse, rfbm)
            st["write"] = dict(_access_state(n, mem), data=bytes(mem))
        done = self._access(gpa, n, st["write"]["data"], st["write"])
        return done if done is _EXIT or done is _THROW else None

    # -- hypercalls ---------------------------------------------------------------------------------

    def _hypercall(self, nr, a0, a1, a2, a3):
        """____kvm_emulate_hypercall (64-bit mode, CPL 0)."""
        vm = self.vm
        if nr in PV_HC_FEATURE and not self.guest_pv_has(PV_HC_FEATURE[nr]):
            return -U.KVM_ENOSYS
        if nr == U.KVM_HC_MAP_GPA_RANGE:
            if not vm.hypercall_exit_enabled & (1 << U.KVM_HC_MAP_GPA_RANGE):
                return -U.KVM_ENOSYS
            gfn = a0 >> PAGE_SHIFT
            if a0 & (PAGE_SIZE - 1) or a1 == 0 or (gfn + a1) & U64 <= gfn:
                return -U.KVM_EINVAL
            run = self.kvm_run
            run.exit_reason = U.KVM_EXIT_HYPERCALL
            hc = run.hypercall
            hc.nr = nr
            hc.args[0], hc.args[1], hc.args[2] = a0, a1, a2
            hc.ret = 0
            hc.flags = U.KVM_EXIT_HYPERCALL_LONG_MODE

            def complete():        # complete_hypercall_exit
                self._op = None
                self._send = _s64(run.hypercall.ret)
            self._complete = complete
            return _EXIT
        if nr in (U.KVM_HC_KICK_CPU, U.KVM_HC_SCHED_YIELD, U.KVM_HC_VAPIC_POLL_IRQ):
            return 0
        if nr == U.KVM_HC_SEND_IPI:
            # kvm_pv_send_ipi: bitmap a0 (low) / a1 (high) of APIC ids from a2; returns the
            # number of vCPUs the IPI reached.
            ids = {v.vcpu_id for v in vm.vcpus}
            bits = a0 | (a1 << 64)
            return sum(1 for i in range(128) if bits >> i & 1 and (a2 + i) in ids)
        if nr == U.KVM_HC_CLOCK_PAIRING:
            return -U.KVM_EOPNOTSUPP      # no stable TSC-based kvmclock is simulated
        return -U.KVM_ENOSYS

    # -- MSRs ---------------------------------------------------------------------------------------

    def _msr_allowed(self, index, type):
        f = self.vm.msr_filter
        return f is None or f.allowed(index, type)

    def _msr_user_exit(self, exit_reason, index, data, ret):
        """kvm_msr_user_space: exit if user space asked for this reason, else None."""
        reason = msr_exit_reason(ret)
        if not self.vm.user_space_msr_mask & reason:
            return None
        run = self.kvm_run
        run.exit_reason = exit_reason
        run.msr.error = 0
        run.msr.reason = reason
        run.msr.index = index
        run.msr.data = data
        return run

    def _rdmsr(self, index, safe):
        hw = self._sev_msr(index, None, safe)
        if hw is not _NOT_HW:
            return hw
        if self.guest_state_protected:
            return self._vc(U.SVM_EXIT_MSR, f"RDMSR {index:#x}", safe, (U.X86_TRAP_VC, 0))
        ret = MSR_RET_FILTERED if not self._msr_allowed(index, MSR_TYPE_R) else None
        value = 0
        if ret is None:
            ret, value = self.msrs.get(index)
        if ret == MSR_OK:
            return (0, value) if safe else value
        run = self._msr_user_exit(U.KVM_EXIT_X86_RDMSR, index, 0, ret)
        if run is None:
            return self._deliver_gp(safe, (U.GP_VECTOR, 0), f"RDMSR {index:#x}")

        def complete():
            self._op = None
            if run.msr.error:
                self._complete_with(self._deliver_gp(safe, (U.GP_VECTOR, 0), f"RDMSR {index:#x}"))
            else:
                v = run.msr.data & U64
                self._send = (0, v) if safe else v
        self._complete = complete
        return _EXIT

    def _wrmsr(self, index, value, safe):
        hw = self._sev_msr(index, value, safe)
        if hw is not _NOT_HW:
            return hw
        if self.guest_state_protected:
            return self._vc(U.SVM_EXIT_MSR, f"WRMSR {index:#x}", safe, U.X86_TRAP_VC)
        ret = MSR_RET_FILTERED if not self._msr_allowed(index, MSR_TYPE_W) else None
        if ret is None:
            ret = self.msrs.set(index, value)
        if ret == MSR_OK:
            return 0 if safe else None
        run = self._msr_user_exit(U.KVM_EXIT_X86_WRMSR, index, value, ret)
        if run is None:
            return self._deliver_gp(safe, U.GP_VECTOR, f"WRMSR {index:#x}")

        def complete():
            self._op = None
            if run.msr.error:
                self._complete_with(self._deliver_gp(safe, U.GP_VECTOR, f"WRMSR {index:#x}"))
            else:
                self._send = 0 if safe else None
        self._complete = complete
        return _EXIT

    def _deliver_gp(self, safe, safe_result, what):
        """#GP for the current instruction."""
        return self._deliver(safe, safe_result, GuestException(U.GP_VECTOR, what))

    def _deliver(self, safe, safe_result, exc):
        """An exception for the current instruction: the *_safe forms return ``safe_result``
        (the vector), the others raise ``exc`` in the guest."""
        if safe:
            return safe_result
        self._throw = exc
        return _THROW

    def _complete_with(self, result):
        """Finish the pending instruction from a completion callback with ``result``."""
        if result is not _THROW:
            self._send = result
