"""Hypercalls in KVM_RUN (``kvm_emulate_hypercall`` and ``____kvm_emulate_hypercall``,
arch/x86/kvm/x86.c), with KVM_HC_MAP_GPA_RANGE forwarded to user space as KVM_EXIT_HYPERCALL.

The vCPU's mode decides the operand size (``is_64_bit_hypercall``: 64-bit mode, or any SEV-ES
guest): outside it the number, the arguments and the result are 32 bits, and the exit reports
``longmode`` 0. From CPL > 0 the result is -KVM_EPERM before any argument counts."""
from sevcore.core.arrays import U32_MAX, U64_MAX
from sevcore import uapi as U
from sevcore.hw.hostmem import PAGE_SHIFT, PAGE_SIZE
from sevcore.kvm.kvm_run import EXIT
from sevcore.kvm.msr import PV_HC_FEATURE



def _s64(v):
    v &= U64_MAX
    return v - (1 << 64) if v >> 63 else v


class HypercallVcpu:
    """Mixin of Vcpu: VMMCALL."""

    def _is_64_bit_hypercall(self):
        """is_64_bit_hypercall: an SEV-ES guest's state is unknown to KVM, so 64-bit."""
        return self.guest_state_protected or self.x86.is_64_bit_mode()

    def _hypercall_result(self, ret):
        """complete_hypercall_exit: RAX = the result, truncated to 32 bits outside 64-bit mode.
        The guest program receives RAX (signed in 64-bit mode, as it always has)."""
        if not self._is_64_bit_hypercall():
            ret &= U32_MAX
            self.regs["rax"] = ret
            return ret
        self.regs["rax"] = ret & U64_MAX
        return _s64(ret)

    def _hypercall(self, nr, a0, a1, a2, a3):
        """VMMCALL: RAX, RBX, RCX, RDX, RSI hold the number and arguments; the result goes back
        in RAX (kvm_emulate_hypercall with the CPL of svm_get_cpl)."""
        self.regs.update(rax=nr, rbx=a0, rcx=a1, rdx=a2, rsi=a3)
        ret = self._emulate_hypercall(self.x86.cpl, nr, a0, a1, a2, a3)
        return ret if ret is EXIT else self._hypercall_result(ret)

    def _emulate_hypercall(self, cpl, nr, a0, a1, a2, a3):
        """____kvm_emulate_hypercall: the in-kernel result, or EXIT."""
        vm = self.vm
        op_64_bit = self._is_64_bit_hypercall()
        if not op_64_bit:
            nr, a0, a1, a2, a3 = (v & U32_MAX for v in (nr, a0, a1, a2, a3))
        if cpl:
            return -U.KVM_EPERM
        if nr in PV_HC_FEATURE and not self.guest_pv_has(PV_HC_FEATURE[nr]):
            return -U.KVM_ENOSYS
        if nr == U.KVM_HC_MAP_GPA_RANGE:
            if not vm.hypercall_exit_enabled & (1 << U.KVM_HC_MAP_GPA_RANGE):
                return -U.KVM_ENOSYS
            gfn = a0 >> PAGE_SHIFT
            if a0 & (PAGE_SIZE - 1) or a1 == 0 or (gfn + a1) & U64_MAX <= gfn:
                return -U.KVM_EINVAL
            run = self.kvm_run
            run.exit_reason = U.KVM_EXIT_HYPERCALL
            hc = run.hypercall
            hc.nr = nr
            hc.args[0], hc.args[1], hc.args[2] = a0, a1, a2
            hc.ret = 0
            hc.flags = U.KVM_EXIT_HYPERCALL_LONG_MODE if op_64_bit else 0

            def complete():        # complete_hypercall_exit
                self._op = None
                self._send = self._hypercall_result(run.hypercall.ret)
            self._complete = complete
            return EXIT
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
