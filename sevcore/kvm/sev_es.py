"""SEV-ES in KVM_RUN (arch/x86/kvm/svm/sev.c): VMGEXIT (the GHCB MSR protocol here, the GHCB
page protocol in :mod:`sevcore.kvm.ghcb`), SEV_STATUS,
the GHCB MSR, #VC, XSAVE of state loaded from the VMSA; and the VMSA LAUNCH_UPDATE_VMSA
encrypts (``sev_es_sync_vmsa``)."""
from sevcore.core.arrays import U64_MAX
from sevcore import uapi as U
from sevcore.hw.hostmem import PAGE_SIZE
from sevcore.hw import vmsa as V
from sevcore.kvm import fpu
from sevcore.kvm.access import access_state
from sevcore.kvm.ghcb import GHCB_HV_FT_SUPPORTED, GhcbVcpu
from sevcore.kvm.kvm_run import EXIT, NOT_HW, THROW



def _set_bits(value, field, mask, pos):
    """set_ghcb_msr_bits: replace the ``mask`` field at ``pos`` of ``value``."""
    return (value & ~(mask << pos)) | ((field & mask) << pos)


class SevEsVcpu(GhcbVcpu):
    """Mixin of Vcpu: what an SEV-ES vCPU does differently in KVM_RUN."""

    def _vmsa(self):
        """The VMSA as VMRUN sees it: the page decrypted with the guest's key (an SNP AP's own
        page once AP creation installed one)."""
        spa = self.snp_guest_vmsa_spa if self.snp_guest_vmsa_spa is not None else self.vmsa_spa
        return self.vm.host.umc.read(spa, PAGE_SIZE, self.vm.sev.asid)

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
        return self._ghcb_vmgexit(ghcb)

    def _ghcb_msr_protocol(self, ghcb):
        """sev_handle_vmgexit_msr_protocol: answer SEV_INFO, CPUID and hypervisor-feature
        requests in the MSR; AP reset hold halts (no in-kernel local APIC: an exit); TERM_REQ,
        and the SNP-only requests from a non-SNP guest, end in KVM_EXIT_SYSTEM_EVENT SEV_TERM
        with the MSR in data[0]; an SNP guest's GHCB GPA and page-state requests go to
        :meth:`_snp_msr_protocol`; anything else leaves the MSR as it is."""
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
            return EXIT
        elif info == U.GHCB_MSR_HV_FT_REQ:
            ghcb = _set_bits(ghcb, GHCB_HV_FT_SUPPORTED, U.GHCB_MSR_HV_FT_MASK,
                             U.GHCB_MSR_HV_FT_POS)
            self.ghcb_gpa = _set_bits(ghcb, U.GHCB_MSR_HV_FT_RESP, U.GHCB_MSR_INFO_MASK,
                                      U.GHCB_MSR_INFO_POS)
        elif info in (U.GHCB_MSR_PREF_GPA_REQ, U.GHCB_MSR_REG_GPA_REQ, U.GHCB_MSR_PSC_REQ) \
                and vm.sev.snp_active:
            return self._snp_msr_protocol(ghcb, info)
        elif info == U.GHCB_MSR_TERM_REQ or info in (
                U.GHCB_MSR_PREF_GPA_REQ, U.GHCB_MSR_REG_GPA_REQ, U.GHCB_MSR_PSC_REQ):
            run = self.kvm_run
            run.exit_reason = U.KVM_EXIT_SYSTEM_EVENT
            run.system_event.type = U.KVM_SYSTEM_EVENT_SEV_TERM
            run.system_event.ndata = 1
            run.system_event.data[0] = ghcb
            self._op = None
            return EXIT
        return None

    def _sev_status(self):
        """MSR_AMD64_SEV (SEV_STATUS), which the CPU answers for an SEV guest: SEV enabled, and
        for SEV-ES also ES enabled with the VMSA's SEV_FEATURES from bit 2 on (SNPActive is bit
        2, DebugSwap bit 7, as msr-index.h numbers them)."""
        if not self.guest_state_protected:
            return U.MSR_AMD64_SEV_ENABLED
        vmsa = self._vmsa()
        features = int.from_bytes(vmsa[V.SEV_FEATURES:V.SEV_FEATURES + 8], "little")
        return (U.MSR_AMD64_SEV_ENABLED | U.MSR_AMD64_SEV_ES_ENABLED | features << 2) & U64_MAX

    def _sev_msr(self, index, value, safe):
        """An RDMSR (``value`` None) or WRMSR the hardware handles for an SEV guest:
        SEV_STATUS (read-only), and an SEV-ES guest's GHCB MSR. NOT_HW for any other."""
        if not self.vm.sev.active:
            return NOT_HW
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
        return NOT_HW

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
            st = self._progress = {"read": access_state(n, None), "write": None}
        if st["write"] is None:
            mem = self._access(gpa, n, None, st["read"])
            if mem is EXIT or mem is THROW:
                return mem
            mem = bytearray(mem)
            fpu.xsave(mem, img, xinuse, rfbm)
            st["write"] = dict(access_state(n, mem), data=bytes(mem))
        done = self._access(gpa, n, st["write"]["data"], st["write"])
        return done if done is EXIT or done is THROW else None


def vmcb_save_area(vcpu):
    """The VMCB save area (``struct vmcb_save_area``) as KVM has built it for this vCPU: the
    segments in attribute form and the CPL (svm_set_segment), EFER, CR4, CR0 as the SVM
    callbacks leave them (EFER.SVME, CR4.MCE, CR0 without CD/NW), CR3 (svm_post_set_cr3 writes
    it for SEV-ES guests), DR7, RFLAGS, the syscall MSRs and PAT. CR2 is 0: KVM copies it in
    only on VMRUN, which an SEV-ES vCPU has not done before its VMSA is built."""
    x = vcpu.x86
    v = bytearray(V.VMCB_SAVE_SIZE)

    def put(off, value, size=8):
        v[off:off + size] = value.to_bytes(size, "little")
    for name, off in V.SEGMENTS.items():
        v[off:off + V.SEG_SIZE] = x.seg[name].pack()
    put(V.CPL, x.cpl, 1)
    put(V.EFER, x.vmcb_efer)
    put(V.CR4, x.vmcb_cr4)
    put(V.CR3, x.cr3)
    put(V.CR0, x.vmcb_cr0)
    put(V.DR7, x.dr7)
    put(V.REGS["rflags"], vcpu.regs["rflags"])
    msrs = vcpu.msrs.values
    for name, index in (("star", U.MSR_STAR), ("lstar", U.MSR_LSTAR), ("cstar", U.MSR_CSTAR),
                        ("sfmask", U.MSR_SYSCALL_MASK),
                        ("kernel_gs_base", U.MSR_KERNEL_GS_BASE)):
        put(V.MSRS[name], msrs[index])
    put(V.G_PAT, msrs[U.MSR_IA32_CR_PAT])
    return bytes(v)


def build_vmsa(vcpu, sev_features):
    """The 4 KiB VMSA ``sev_es_sync_vmsa`` builds for this vCPU: a copy of the VMCB save area
    (:func:`vmcb_save_area`), then the GPRs and RIP of KVM_SET_REGS, XCR0, PKRU and XSS (0:
    neither is offered), DR6 and sev_features; for VM types other than KVM_X86_DEFAULT_VM also
    the x87/SSE/AVX state (legacy ES_INIT skips it, to keep older measurements)."""
    v = bytearray(V.VMSA_SIZE)
    v[:V.VMCB_SAVE_SIZE] = vmcb_save_area(vcpu)

    def put(off, value, size=8):
        v[off:off + size] = value.to_bytes(size, "little")
    for name, off in V.REGS.items():
        if name != "rflags":              # RFLAGS is the VMCB's (svm_set_rflags)
            put(off, vcpu.regs[name])
    put(V.XCR0, vcpu.xcr0)
    put(V.DR6, vcpu.x86.dr6)
    put(V.SEV_FEATURES, sev_features)
    if vcpu.vm.type != U.KVM_X86_DEFAULT_VM:
        fpu.sync_vmsa(v, vcpu.fpu)
    return bytes(v)
