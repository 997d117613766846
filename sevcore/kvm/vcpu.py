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

from sevcore.core.arrays import U64_MAX
from sevcore import uapi as U
from sevcore.errors import KvmError, NotModelled
from sevcore.hw.hostmem import PAGE_SHIFT, PAGE_SIZE
from sevcore.kvm import fpu
from sevcore.kvm.access import GuestAccess
from sevcore.kvm.dirty_ring import DirtyRingFull, DirtyRingVcpu
from sevcore.kvm.guest import (UCALL_ABORT, UCALL_DONE, UCALL_PIO_PORT, Guest, GuestException,
                               Op, VmmCommunicationException)
from sevcore.kvm.hypercall import HypercallVcpu
from sevcore.kvm.kvm_run import EXIT, THROW, KvmRun
from sevcore.kvm.mmu import MemoryFault
from sevcore.kvm.msr import MsrState, MsrVcpu
from sevcore.kvm.prefault import pre_fault_memory
from sevcore.kvm.sev_es import SevEsVcpu
from sevcore.kvm.snp_vcpu import SnpVcpu
from sevcore.kvm.sregs import SregsVcpu, X86State, find_cpuid_entry

#: VMCB exit code of a failed VMRUN (SVM_EXIT_ERR, -1), KVM's fail_entry reason.
SVM_EXIT_ERR = (1 << 64) - 1

#: PV features KVM_GET_SUPPORTED_CPUID reports in KVM_CPUID_FEATURES.eax (arch/x86/kvm/cpuid.c);
#: HC_MAP_GPA_RANGE and MIGRATION_CONTROL are set by user space only.
KVM_SUPPORTED_PV_FEATURES = sum(1 << b for b in (
    U.KVM_FEATURE_CLOCKSOURCE, U.KVM_FEATURE_NOP_IO_DELAY, U.KVM_FEATURE_CLOCKSOURCE2,
    U.KVM_FEATURE_ASYNC_PF, U.KVM_FEATURE_PV_EOI, U.KVM_FEATURE_CLOCKSOURCE_STABLE_BIT,
    U.KVM_FEATURE_PV_UNHALT, U.KVM_FEATURE_PV_TLB_FLUSH, U.KVM_FEATURE_ASYNC_PF_VMEXIT,
    U.KVM_FEATURE_PV_SEND_IPI, U.KVM_FEATURE_POLL_CONTROL, U.KVM_FEATURE_PV_SCHED_YIELD,
    U.KVM_FEATURE_ASYNC_PF_INT, U.KVM_FEATURE_MSI_EXT_DEST_ID, U.KVM_FEATURE_STEAL_TIME))


class GuestAssertionError(AssertionError):
    """A guest program's assertion, reported through UCALL_ABORT."""



#: The SVM exit code of each intercepted guest operation (a ucall is an OUT to its port).
_VC_EXIT_CODE = {"cpuid": U.SVM_EXIT_CPUID, "hypercall": U.SVM_EXIT_VMMCALL,
                 "ucall": U.SVM_EXIT_IOIO}

#: struct kvm_regs, in the kernel's order.
KVM_REGS = ("rax", "rbx", "rcx", "rdx", "rsi", "rdi", "rsp", "rbp", "r8", "r9", "r10", "r11",
            "r12", "r13", "r14", "r15", "rip", "rflags")


def _reset_regs(rdx=0x600):
    """kvm_vcpu_reset: every GPR 0 but RDX, the CPUID signature (0x600 without CPUID, as at
    RESET); RIP 0xfff0, RFLAGS 2."""
    regs = dict.fromkeys(KVM_REGS, 0)
    regs.update(rip=0xfff0, rflags=U.X86_EFLAGS_FIXED, rdx=rdx)
    return regs


#: The KVM signature in CPUID EBX, ECX, EDX of its base leaf ("KVMKVMKVM\0\0\0").
KVM_SIGNATURE = tuple(int.from_bytes(b"KVMKVMKVM\0\0\0"[i:i + 4], "little") for i in (0, 4, 8))


def default_cpuid(host):
    """The entries KVM_GET_SUPPORTED_CPUID gives a simulated AMD host: the basic and extended
    leaves a guest program looks at, Fn8000_001F (SEV, with the C-bit position), and KVM's
    paravirtual leaves 0x40000000/0x40000001."""
    def e(function, eax=0, ebx=0, ecx=0, edx=0, index=0, flags=0):
        return {"function": function, "index": index, "flags": flags,
                "eax": eax, "ebx": ebx, "ecx": ecx, "edx": edx}
    auth = int.from_bytes(b"Auth", "little"), int.from_bytes(b"enti", "little"), \
        int.from_bytes(b"cAMD", "little")
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
        # Fn8000_001F: SME, SEV, SEV-ES, SEV-SNP in EAX; EBX[5:0] = C-bit position.
        e(0x8000001F, 1 << 0 | 1 << 1 | 1 << 3 | 1 << 4, host.c_bit, 509, 0),
        e(U.KVM_CPUID_SIGNATURE, U.KVM_CPUID_FEATURES, *KVM_SIGNATURE),
        e(U.KVM_CPUID_FEATURES, KVM_SUPPORTED_PV_FEATURES),
    ]


def kvm_cpuid_features(entries):
    """The KVM_CPUID_FEATURES entry of ``entries`` under KVM's signature, or None: the base is
    the first of 0x40000000..0x4000ff00 (steps of 0x100) whose EBX/ECX/EDX spell KVM_SIGNATURE
    (kvm_get_hypervisor_cpuid, for_each_possible_cpuid_base_hypervisor), the leaf is ``base |
    KVM_CPUID_FEATURES`` with its index not significant (__kvm_find_kvm_cpuid_features)."""
    def first(function):
        return next((e for e in entries if e["function"] == function), None)
    for base in range(U.KVM_CPUID_SIGNATURE, U.KVM_CPUID_SIGNATURE + 0x10000, 0x100):
        e = first(base)
        if e is not None and (e["ebx"], e["ecx"], e["edx"]) == KVM_SIGNATURE:
            return first(base | U.KVM_CPUID_FEATURES)
    return None


class Vcpu(GuestAccess, SevEsVcpu, SnpVcpu, MsrVcpu, HypercallVcpu, SregsVcpu, DirtyRingVcpu):
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
        #: Segments, descriptor tables, control registers and EFER (sevcore.kvm.sregs).
        self.x86 = X86State()
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
        """Close the vCPU fd: its reference on the VM goes (kvm_vcpu_release), and the VM keeps
        the vCPU, as KVM does, until the VM is destroyed."""
        if not self.closed:
            self.closed = True
            self.vm.host.release_fd(self.fd)
            self.vm._put()

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
        features = kvm_cpuid_features(new)
        if self.vm.hlt_in_guest and features is not None:
            # kvm_update_cpuid_runtime: only the features leaf of KVM's own signature base
            # (__kvm_find_kvm_cpuid_features); another hypervisor's leaves are left alone.
            features["eax"] &= ~(1 << U.KVM_FEATURE_PV_UNHALT)
        if self.has_run and new != self.cpuid:
            raise KvmError(EINVAL, ioctl, "CPUID cannot change after KVM_RUN")
        self.cpuid = new
        # kvm_update_pv_runtime reads the same leaf (kvm_find_kvm_cpuid_features).
        self._pv_features = features["eax"] if features is not None else 0
        return 0

    def get_cpuid2(self):
        """Mirrors ``KVM_GET_CPUID2``: a copy of the entries."""
        self._enter("KVM_GET_CPUID2")
        return [dict(e) for e in self.cpuid]

    def cpuid_entry(self, function, index=0):
        """kvm_find_cpuid_entry_index: the index counts only for leaves flagged
        KVM_CPUID_FLAG_SIGNIFCANT_INDEX."""
        return find_cpuid_entry(self.cpuid, function, index)

    def _supported_cpuid(self):
        """KVM_GET_SUPPORTED_CPUID of the host: what kvm_cpu_caps allow."""
        return default_cpuid(self.vm.host)

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
            if not isinstance(v, int) or not 0 <= v <= U64_MAX:
                raise ValueError(f"{k} must be a u64")
        self._state_ioctl(ioctl)
        self.regs.update(regs)
        self.regs["rflags"] |= U.X86_EFLAGS_FIXED      # __set_regs: kvm_set_rflags(... | FIXED)
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
        if self.snp_update_requested:
            self._snp_update_protected_guest_state()
        if self.snp_halted:
            # KVM_MP_STATE_HALTED (an AP destroyed, or given a VMSA KVM could not map): KVM_RUN
            # blocks in kvm_vcpu_block until an event; the model returns as a signal ends it.
            self.kvm_run.exit_reason = U.KVM_EXIT_INTR
            raise KvmError(EINTR, ioctl, "the SNP AP is halted with no VMSA (AP_DESTROY)")
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
        run = self.kvm_run
        self.has_run = True
        if self._complete is not None:
            complete, self._complete = self._complete, None
            if complete() is EXIT:       # the completion started another exit
                return run
        if run.immediate_exit:
            run.exit_reason = U.KVM_EXIT_INTR
            raise KvmError(EINTR, ioctl, "immediate_exit")
        if not vm.has_memslots() or (self._code is None and self._fetch_unbacked()):
            # Nothing to fetch instructions from: the fetch faults to an MMIO address and its
            # emulation fails (handle_emulation_failure).
            run.exit_reason = U.KVM_EXIT_INTERNAL_ERROR
            run.internal.suberror = U.KVM_INTERNAL_ERROR_EMULATION
            run.internal.ndata = 0
            return run
        if self._code is None:
            raise NotModelled("executing the x86 instructions at the vCPU's RIP; a guest "
                              "program (vcpu.set_guest_code) is how code runs here")
        self.x86.interrupt = None         # injected on VMRUN (no guest program handles it)
        run.ucall = None
        if self.dirty_ring is not None and self.dirty_ring.soft_full:
            # kvm_dirty_ring_check_request: no entry while the ring is soft-full.
            run.exit_reason = U.KVM_EXIT_DIRTY_RING_FULL
            return run
        while True:
            if self._op is None:
                op = self._next_op()
                if op is EXIT:
                    return run
                self._op, self._progress = op, None
            try:
                result = self._execute(self._op)
            except DirtyRingFull:
                # The push that filled the ring exits before the access is retried; its
                # progress is kept and the access resumes on the next KVM_RUN.
                run.exit_reason = U.KVM_EXIT_DIRTY_RING_FULL
                return run
            except MemoryFault as f:
                run.exit_reason = U.KVM_EXIT_MEMORY_FAULT
                run.memory_fault.flags = f.flags
                run.memory_fault.gpa = f.gpa
                run.memory_fault.size = PAGE_SIZE
                raise KvmError(f.errno, ioctl, f.why) from None
            if result is EXIT:
                return run
            self._op = None
            if result is not THROW:
                self._send = result

    def _fetch_unbacked(self):
        """Whether no memslot backs the instruction at CS:RIP (paging off)."""
        gpa = self.x86.fetch_gpa(self.regs["rip"])
        return gpa is not None and self.vm.gfn_to_memslot(gpa >> PAGE_SHIFT) is None

    def _sev_entry_fails(self):
        vm = self.vm
        psp = vm.host.psp
        if vm.sev.snp_active:
            return vm.sev.snp_context is None or not vm.host.umc.has_key(vm.sev.asid) or \
                not self.guest_state_protected or self._snp_vmsa_unusable()
        g = psp.guest(vm.sev.handle)
        return g is None or g.state == U.SEV_GUEST_STATE_SENT or \
            not vm.host.umc.has_key(vm.sev.asid) or \
            (vm.sev.es_active and not self.guest_state_protected)

    def _next_op(self):
        """Resume the generator with the last result; a ucall exit when it ends or raises."""
        run = self.kvm_run
        if self._finished:
            run.exit_reason = U.KVM_EXIT_HLT
            return EXIT
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

    def _restart_program(self):
        """The guest program starts over at its first operation (a new VMSA, or INIT)."""
        self._gen = None
        self._finished = False
        self._op = self._progress = self._complete = None
        self._send = self._throw = None
        self.in_shutdown = False
        self.guest_exception = None

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
            leaf = self.cpuid_entry(1)       # kvm_vcpu_reset(init_event=true)
            self.regs = _reset_regs(leaf["eax"] if leaf else 0x600)
            self.x86.reset(init_event=True)
        self.kvm_run.exit_reason = U.KVM_EXIT_SHUTDOWN
        return EXIT

    def _ucall_exit(self, cmd, values):
        run = self.kvm_run
        run.exit_reason = U.KVM_EXIT_IO
        run.io.direction, run.io.size, run.io.port, run.io.count = U.KVM_EXIT_IO_OUT, 4, \
            UCALL_PIO_PORT, 1
        run.ucall = (cmd, tuple(values))
        if cmd == UCALL_DONE:
            self._finished = True
        return EXIT

    def _execute(self, op):
        kind, args = op
        if kind == "read":
            return self._access(args[0], args[1], None)
        if kind == "write":
            return self._access(args[0], len(args[1]), args[1])
        if kind in ("bulk", "bulk_list"):
            return self._bulk(kind, args)
        if kind == "cmpxchg":
            return self._cmpxchg(*args)
        if kind == "rdmsr":
            return self._rdmsr(*args)
        if kind == "wrmsr":
            return self._wrmsr(*args)
        if kind == "xsave":
            return self._xsave(*args)
        if kind == "vmgexit":
            return self._vmgexit()
        if kind == "page_state_change":
            return self._page_state_change(*args)
        if kind == "pvalidate":
            return self._pvalidate(*args)
        if kind == "rmpadjust":
            return self._rmpadjust(*args)
        if kind == "snp_guest_request":
            return self._snp_guest_request(*args)
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

    # -- exceptions in the guest -------------------------------------------------------------------

    def _deliver_gp(self, safe, safe_result, what):
        """#GP for the current instruction."""
        return self._deliver(safe, safe_result, GuestException(U.GP_VECTOR, what))

    def _deliver(self, safe, safe_result, exc):
        """An exception for the current instruction: the *_safe forms return ``safe_result``
        (the vector), the others raise ``exc`` in the guest."""
        if safe:
            return safe_result
        self._throw = exc
        return THROW

    def _complete_with(self, result):
        """Finish the pending instruction from a completion callback with ``result``."""
        if result is not THROW:
            self._send = result

    # -- KVM_PRE_FAULT_MEMORY (sevcore.kvm.prefault) -----------------------------------------------

    def pre_fault_memory(self, gpa, size, flags=0):
        """Mirrors ``KVM_PRE_FAULT_MEMORY``: map ``[gpa, gpa + size)`` into the TDP MMU; returns the
        ``struct kvm_pre_fault_memory`` written back (the range left when a step failed after
        progress). Raises EINVAL (flags, unaligned, empty or wrapping range), EOPNOTSUPP (not
        allowed yet: SNP before LAUNCH_FINISH), ENOENT (no memslot), EFAULT (a private/shared
        mismatch or unbacked page), each only when no page was mapped."""
        return pre_fault_memory(self, gpa, size, flags)
