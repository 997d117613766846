"""MSR emulation, user-space MSR filters and KVM's paravirtual MSRs (arch/x86/kvm/x86.c).

``MsrFilter`` is what ``KVM_X86_SET_MSR_FILTER`` installs; ``kvm_msr_allowed`` decides an access
the way the kernel does: x2APIC MSRs (0x800-0x8ff) always pass, the first range whose span and
READ/WRITE flag match decides by its bitmap bit (1 = allow), otherwise the filter's default.

The emulated MSR table is the subset of ``kvm_{get,set}_msr_common`` and the SVM handlers that
guest programs touch: the syscall and segment-base MSRs, PAT, EFER, TSC_AUX, XSS, FLUSH_CMD,
POWER_CTL and KVM's paravirtual MSRs, each with its #GP rules. An MSR outside the table is
unknown to KVM (``KVM_MSR_RET_UNSUPPORTED``), as ``MSR_KVM_MIGRATION_CONTROL`` is.
"""
from errno import EFAULT, EINVAL

from sevcore.core.arrays import U64_MAX
from sevcore import uapi as U
from sevcore.errors import KvmError
from sevcore.kvm.kvm_run import EXIT, NOT_HW

#: Return codes of the in-kernel MSR handlers (arch/x86/kvm/x86.h).
MSR_OK = 0
MSR_RET_INVALID = 1        # #GP condition inside KVM's emulation
MSR_RET_UNSUPPORTED = 2    # MSR unknown to KVM / not in the vCPU model
MSR_RET_FILTERED = 3       # denied by the user-space filter

MSR_TYPE_R = 1
MSR_TYPE_W = 2


class MsrFilterRange:
    """struct kvm_msr_filter_range after KVM copied it in."""

    __slots__ = ("flags", "base", "nmsrs", "bitmap")

    def __init__(self, flags, base, nmsrs, bitmap):
        self.flags, self.base, self.nmsrs, self.bitmap = flags, base, nmsrs, bitmap

    def covers(self, index, type):
        return self.flags & type and self.base <= index < self.base + self.nmsrs

    def allows(self, index):
        bit = index - self.base
        return bool(self.bitmap[bit >> 3] >> (bit & 7) & 1)


class MsrFilter:
    """A validated filter (struct kvm_x86_msr_filter)."""

    __slots__ = ("default_allow", "ranges")

    def __init__(self, default_allow, ranges):
        self.default_allow = default_allow
        self.ranges = ranges

    @classmethod
    def from_user(cls, flags, ranges, ioctl="KVM_X86_SET_MSR_FILTER"):
        """kvm_vm_ioctl_set_msr_filter's checks: EINVAL for unknown filter flags, a DENY filter
        without ranges, a range with unknown or no flags, or a bitmap over 0x600 bytes.

        ``ranges`` holds up to 16 ``(flags, nmsrs, base, bitmap)`` tuples or dicts with those
        keys; ``bitmap`` is bytes (bit i allows MSR base + i)."""
        if not isinstance(flags, int) or flags < 0 or flags & ~U.KVM_MSR_FILTER_VALID_MASK:
            raise KvmError(EINVAL, ioctl, f"filter flags {flags!r} invalid")
        ranges = list(ranges)
        if len(ranges) > U.KVM_MSR_FILTER_MAX_RANGES:
            raise KvmError(EINVAL, ioctl, "more than 16 ranges")
        parsed = []
        for r in ranges:
            if isinstance(r, dict):
                r = (r.get("flags", 0), r.get("nmsrs", 0), r.get("base", 0), r.get("bitmap", b""))
            rflags, nmsrs, base, bitmap = r
            parsed.append((rflags, nmsrs, base, bytes(bitmap)))
        default_allow = not flags & U.KVM_MSR_FILTER_DEFAULT_DENY
        if all(nmsrs == 0 for _, nmsrs, _, _ in parsed) and not default_allow:
            raise KvmError(EINVAL, ioctl, "a default-deny filter needs at least one range")
        out = []
        for rflags, nmsrs, base, bitmap in parsed:
            if not nmsrs:
                continue
            if rflags & ~U.KVM_MSR_FILTER_RANGE_VALID_MASK:
                raise KvmError(EINVAL, ioctl, f"range flags {rflags:#x} invalid")
            if not rflags:
                raise KvmError(EINVAL, ioctl, "a range needs READ and/or WRITE")
            size = (nmsrs + 63) // 64 * 8          # BITS_TO_LONGS(nmsrs) * sizeof(long)
            if size > U.KVM_MSR_FILTER_MAX_BITMAP_SIZE:
                raise KvmError(EINVAL, ioctl, f"range bitmap of {size} bytes is too large")
            if len(bitmap) < (nmsrs + 7) // 8:
                raise KvmError(EFAULT, ioctl, "range bitmap shorter than nmsrs bits")
            out.append(MsrFilterRange(rflags, base & 0xffffffff, nmsrs, bitmap))
        return cls(default_allow, out)

    def allowed(self, index, type):
        """kvm_msr_allowed."""
        if 0x800 <= index <= 0x8ff:
            return True
        for r in self.ranges:
            if r.covers(index, type):
                return r.allows(index)
        return self.default_allow


def _canonical(v):
    # 48-bit virtual addresses: bits 63..47 all equal.
    top = v >> 47
    return top == 0 or top == (1 << 17) - 1


# PV MSRs and the KVM_CPUID_FEATURES bit each needs (kvm_pv_msr_feature in x86.c).
PV_MSR_FEATURE = {
    U.MSR_KVM_WALL_CLOCK: U.KVM_FEATURE_CLOCKSOURCE,
    U.MSR_KVM_SYSTEM_TIME: U.KVM_FEATURE_CLOCKSOURCE,
    U.MSR_KVM_WALL_CLOCK_NEW: U.KVM_FEATURE_CLOCKSOURCE2,
    U.MSR_KVM_SYSTEM_TIME_NEW: U.KVM_FEATURE_CLOCKSOURCE2,
    U.MSR_KVM_ASYNC_PF_EN: U.KVM_FEATURE_ASYNC_PF,
    U.MSR_KVM_ASYNC_PF_INT: U.KVM_FEATURE_ASYNC_PF_INT,
    U.MSR_KVM_ASYNC_PF_ACK: U.KVM_FEATURE_ASYNC_PF_INT,
    U.MSR_KVM_STEAL_TIME: U.KVM_FEATURE_STEAL_TIME,
    U.MSR_KVM_PV_EOI_EN: U.KVM_FEATURE_PV_EOI,
    U.MSR_KVM_POLL_CONTROL: U.KVM_FEATURE_POLL_CONTROL,
}

# The hypercalls that need a PV feature bit when enforcement is on (____kvm_emulate_hypercall).
PV_HC_FEATURE = {
    U.KVM_HC_KICK_CPU: U.KVM_FEATURE_PV_UNHALT,
    U.KVM_HC_SEND_IPI: U.KVM_FEATURE_PV_SEND_IPI,
    U.KVM_HC_SCHED_YIELD: U.KVM_FEATURE_PV_SCHED_YIELD,
}

#: Writable bits (None: any value, subject to the canonical check) and reset values of the
#: architectural MSRs emulated here.
_ARCH = {
    U.MSR_IA32_TSC: (None, 0),
    U.MSR_IA32_APICBASE: ((1 << 52) - (1 << 12) | 1 << 11 | 1 << 10 | 1 << 8, 0xfee00900),
    U.MSR_IA32_MISC_ENABLE: (None, 1),
    U.MSR_IA32_POWER_CTL: (None, 0),
    U.MSR_IA32_CR_PAT: (None, 0x0007040600070406),
    U.MSR_IA32_XSS: (0, 0),                   # no XSAVES-managed state is offered to guests
    U.MSR_EFER: (1 << 0 | 1 << 8 | 1 << 10 | 1 << 11 | 1 << 12, 0),   # in vcpu.x86
    U.MSR_STAR: (None, 0),
    U.MSR_LSTAR: ("canonical", 0),
    U.MSR_CSTAR: ("canonical", 0),
    U.MSR_SYSCALL_MASK: (0xffffffff, 0),
    U.MSR_FS_BASE: ("canonical", 0),
    U.MSR_GS_BASE: ("canonical", 0),
    U.MSR_KERNEL_GS_BASE: ("canonical", 0),
    U.MSR_TSC_AUX: (0xffffffff, 0),
}


#: The MSRs that are a segment register's base in the VMCB.
_SEGMENT_BASE = {U.MSR_FS_BASE: "fs", U.MSR_GS_BASE: "gs"}


class MsrState:
    """A vCPU's MSRs as KVM emulates them."""

    def __init__(self, vcpu):
        self.vcpu = vcpu
        self.values = {index: reset for index, (_, reset) in _ARCH.items()}
        self.values.update({index: 0 for index in PV_MSR_FEATURE})

    def _pv_ok(self, index):
        feature = PV_MSR_FEATURE[index]
        return self.vcpu.guest_pv_has(feature)

    def _tsc_now(self):
        """The host TSC: the Host's simulated clock, one tick per nanosecond (a 1 GHz TSC), so a
        guest measures simulated time, as a workload that dirties memory at a rate must."""
        return int(self.vcpu.vm.host.clock.now_ns)

    def get(self, index):
        """kvm_get_msr_common and the vendor handler: ``(ret, value)``."""
        if index in PV_MSR_FEATURE:
            if not self._pv_ok(index):
                return MSR_RET_INVALID, 0
            return MSR_OK, self.values[index]
        if index == U.MSR_IA32_FLUSH_CMD:
            return MSR_RET_UNSUPPORTED, 0        # write-only command MSR
        if index == U.MSR_IA32_TSC:
            return MSR_OK, (self._tsc_now() + self.values[index]) & U64_MAX
        if index == U.MSR_EFER:               # vcpu->arch.efer
            return MSR_OK, self.vcpu.x86.efer
        if index in _SEGMENT_BASE:            # svm_get_msr: the VMCB's FS/GS base
            return MSR_OK, self.vcpu.x86.seg[_SEGMENT_BASE[index]].base
        if index in _ARCH:
            return MSR_OK, self.values[index]
        return MSR_RET_UNSUPPORTED, 0

    def set(self, index, value, host_initiated=False):
        """kvm_set_msr_common and the vendor handler: the return code. ``host_initiated``:
        KVM_SET_MSRS rather than the guest's WRMSR."""
        if index in PV_MSR_FEATURE:
            if not self._pv_ok(index):
                return MSR_RET_INVALID
            self.values[index] = value
            return MSR_OK
        if index == U.MSR_IA32_FLUSH_CMD:
            return MSR_RET_INVALID if value & ~U.L1D_FLUSH else MSR_OK
        spec = _ARCH.get(index)
        if spec is None:
            return MSR_RET_UNSUPPORTED
        mask = spec[0]
        if mask == "canonical":
            if not _canonical(value):
                return MSR_RET_INVALID
        elif mask is not None and value & ~mask:
            return MSR_RET_INVALID
        if index == U.MSR_IA32_TSC:
            value = (value - self._tsc_now()) & U64_MAX       # kept as the TSC offset
        if index == U.MSR_EFER:
            return self._set_efer(value, host_initiated)
        if index in _SEGMENT_BASE:            # svm_set_msr: the VMCB's FS/GS base
            self.vcpu.x86.seg[_SEGMENT_BASE[index]].base = value
            return MSR_OK
        self.values[index] = value
        return MSR_OK

    def _set_efer(self, efer, host_initiated):
        """set_efer (arch/x86/kvm/x86.c): the guest may not toggle LME while paging; LMA is
        KVM's to set (it follows CR0.PG), so the written value's LMA is replaced."""
        x86 = self.vcpu.x86
        if not host_initiated and x86.cr0 & U.X86_CR0_PG and \
                (x86.efer ^ efer) & U.EFER_LME:
            return MSR_RET_INVALID
        x86.set_efer((efer & ~U.EFER_LMA) | (x86.efer & U.EFER_LMA))
        return MSR_OK


def msr_exit_reason(ret):
    """kvm_msr_reason: the KVM_MSR_EXIT_REASON_* for an in-kernel failure code."""
    if ret == MSR_RET_FILTERED:
        return U.KVM_MSR_EXIT_REASON_FILTER
    if ret == MSR_RET_UNSUPPORTED:
        return U.KVM_MSR_EXIT_REASON_UNKNOWN
    return U.KVM_MSR_EXIT_REASON_INVAL


class MsrVcpu:
    """Mixin of Vcpu: RDMSR and WRMSR in KVM_RUN (kvm_emulate_rdmsr/wrmsr): what the hardware
    answers for an SEV guest, then the filter, KVM's emulation and the user-space exit."""

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
        if hw is not NOT_HW:
            return hw
        if self.guest_state_protected:
            return self._vc(U.SVM_EXIT_MSR, f"RDMSR {index:#x}", safe, (U.X86_TRAP_VC, 0))
        return self._emulate_rdmsr(index, safe)

    def _emulate_rdmsr(self, index, safe):
        """kvm_emulate_rdmsr: the filter, KVM's emulation, the user-space exit (also reached
        from a GHCB's SVM_EXIT_MSR)."""
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
                v = run.msr.data & U64_MAX
                self._send = (0, v) if safe else v
        self._complete = complete
        return EXIT

    def _wrmsr(self, index, value, safe):
        hw = self._sev_msr(index, value, safe)
        if hw is not NOT_HW:
            return hw
        if self.guest_state_protected:
            return self._vc(U.SVM_EXIT_MSR, f"WRMSR {index:#x}", safe, U.X86_TRAP_VC)
        return self._emulate_wrmsr(index, value, safe)

    def _emulate_wrmsr(self, index, value, safe):
        """kvm_emulate_wrmsr: as :meth:`_emulate_rdmsr`, for a write."""
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
        return EXIT
