"""An SNP vCPU in KVM_RUN (arch/x86/kvm/svm/sev.c): the SNP requests of the GHCB MSR protocol
(preferred and registered GHCB GPA, page-state change forwarded to user space as
``KVM_EXIT_HYPERCALL``/``KVM_HC_MAP_GPA_RANGE``), and the guest side of a page-state change as the
Linux guest does it (``__page_state_change`` in ``arch/x86/boot/startup/sev-shared.c``: rescind
the validation before making a page shared, validate after making it private)."""
from errno import EINVAL, EIO

import numpy as np

from sevcore.core.arrays import U64_MAX
from sevcore import uapi as U
from sevcore.errors import KvmError
from sevcore.hw.hostmem import PAGE_SHIFT, PAGE_SIZE
from sevcore.kvm import snp_guest_msg as M
from sevcore.kvm.access import access_state
from sevcore.kvm.ghcb import GHCB_RESERVED_0XFF0, GHCB_SHARED_BUFFER, VMGEXIT_HANDLERS
from sevcore.kvm.guest import GuestException
from sevcore.kvm.kvm_run import EXIT, THROW
from sevcore.hw.rmp import RmpFault
from sevcore.kvm.mmu import NPT_PRIVATE, translate
from sevcore.kvm.sev import KernelBuffers
from sevcore.kvm.sev_es import _set_bits
from sevcore.psp import snp_layout as SL



class PageStateChangeFailed(GuestException):
    """The hypervisor refused a page-state change; a Linux guest terminates with
    (SEV_TERM_SET_LINUX, GHCB_TERM_PSC)."""

    def __init__(self, gpa, response):
        super().__init__(0, f"page-state change of gpa {gpa:#x}: GHCB MSR {response:#x}")
        self.gpa, self.response = gpa, response


class PvalidateFailed(GuestException):
    """PVALIDATE failed during a page-state change; a Linux guest terminates with
    (SEV_TERM_SET_LINUX, GHCB_TERM_PVALIDATE)."""

    def __init__(self, gpa, status):
        super().__init__(0, f"PVALIDATE of gpa {gpa:#x}: status {status}")
        self.gpa, self.status = gpa, status


# -- page-state change through the GHCB page (snp_begin_psc) ------------------------------------------

PSC_HDR = 8                                  # struct psc_hdr: cur_entry, end_entry, reserved
PSC_ENTRY = 8                                # struct psc_entry: one u64 of bit fields


def _entry(buf, i):
    """struct psc_entry i: (cur_page, gfn, operation, pagesize)."""
    v = int.from_bytes(buf[PSC_HDR + PSC_ENTRY * i:PSC_HDR + PSC_ENTRY * (i + 1)], "little")
    return v & 0xfff, v >> 12 & ((1 << 40) - 1), v >> 52 & 0xf, v >> 56 & 1


def _set_cur_page(buf, i, cur_page):
    off = PSC_HDR + PSC_ENTRY * i
    v = int.from_bytes(buf[off:off + 8], "little")
    buf[off:off + 8] = ((v & ~0xfff) | cur_page).to_bytes(8, "little")


class _Psc:
    """A page-state change in flight (svm->sev_es.psc_idx, psc_inflight) over the guest's
    buffer ``buf``, written back to ``hva`` (the GHCB's mapping or the scratch area)."""

    def __init__(self, x, buf, hva):
        self.x, self.buf, self.hva = x, buf, hva
        self.idx = self.inflight = 0

    @property
    def cur_entry(self):
        return int.from_bytes(self.buf[0:2], "little")

    @cur_entry.setter
    def cur_entry(self, v):
        self.buf[0:2] = (v & 0xffff).to_bytes(2, "little")


def _vmgexit_psc(vcpu, x):
    """SVM_VMGEXIT_PSC: the descriptor at SW_SCRATCH (setup_vmgexit_scratch with SW_EXITINFO2
    as the length, kept in sync with the guest), then snp_begin_psc."""
    off = x.sw_scratch - x.gpa
    if 0 <= off < PAGE_SIZE:
        if off < GHCB_SHARED_BUFFER or x.sw_scratch + x.exit_info_2 > x.gpa + GHCB_RESERVED_0XFF0:
            x.bad_input(U.GHCB_ERR_INVALID_SCRATCH_AREA)
            return None
        buf = bytearray(vcpu.vm.kvm.read(x.hva + off, GHCB_RESERVED_0XFF0 - off))
        psc = _Psc(x, buf, x.hva + off)
    else:
        data = vcpu._ghcb_scratch(x, x.exit_info_2)
        if data is None:
            return None
        psc = _Psc(x, bytearray(data), _gpa_hva(vcpu.vm, x.sw_scratch))
    return vcpu._snp_begin_psc(psc)


class PscVcpu:
    """Mixin of SnpVcpu: snp_begin_psc, snp_complete_one_psc and snp_complete_psc."""

    def _snp_complete_psc(self, psc, psc_ret):
        """snp_complete_psc: "no action" with the PSC return code in SW_EXITINFO2; the buffer
        goes back to the guest."""
        psc.inflight = psc.idx = 0
        psc.x.success(psc_ret)
        self.vm.kvm.write(psc.hva, bytes(psc.buf))
        return None

    def _snp_complete_one_psc_done(self, psc):
        """__snp_complete_one_psc: the in-flight entries are complete."""
        idx = psc.idx
        while psc.inflight:
            _, _, _, size = _entry(psc.buf, idx)
            _set_cur_page(psc.buf, idx, 512 if size else 1)
            psc.inflight -= 1
            idx += 1
        psc.cur_entry = idx

    def _snp_begin_psc(self, psc):
        """snp_begin_psc: each run of adjacent entries of one operation becomes one
        KVM_EXIT_HYPERCALL (KVM_HC_MAP_GPA_RANGE, 4K or 2M); other operations complete with no
        exit; a bad header or entry ends the request with its error code."""
        vm = self.vm
        if not vm.hypercall_exit_enabled & (1 << U.KVM_HC_MAP_GPA_RANGE):
            return self._snp_complete_psc(psc, U.VMGEXIT_PSC_ERROR_GENERIC)
        buf = psc.buf
        while True:
            idx_start = psc.cur_entry
            idx_end = int.from_bytes(buf[2:4], "little")
            if idx_end >= U.VMGEXIT_PSC_MAX_COUNT or \
                    PSC_HDR + PSC_ENTRY * (idx_end + 1) > len(buf):
                return self._snp_complete_psc(psc, U.VMGEXIT_PSC_ERROR_INVALID_HDR)
            idx = idx_start
            while idx <= idx_end:
                cur_page, gfn, op, size = _entry(buf, idx)
                huge = bool(size)
                npages = 512 if huge else 1
                if cur_page > npages or gfn % npages:
                    return self._snp_complete_psc(psc, U.VMGEXIT_PSC_ERROR_INVALID_ENTRY)
                if cur_page:
                    npages -= cur_page
                    gfn += cur_page
                    huge = False
                if npages:
                    break
                idx += 1
                psc.cur_entry = psc.cur_entry + 1
            if idx > idx_end:
                return self._snp_complete_psc(psc, 0)
            first_op, first_gfn, first_size = op, gfn, size
            psc.idx, psc.inflight = idx, 1
            while idx + 1 <= idx_end:
                c2, g2, op2, s2 = _entry(buf, idx + 1)
                if op2 != first_op or g2 != first_gfn + npages or c2 or bool(s2) != huge:
                    break
                idx += 1
                psc.inflight += 1
                npages += 512 if huge else 1
            if first_op in (U.VMGEXIT_PSC_OP_PRIVATE, U.VMGEXIT_PSC_OP_SHARED):
                run = self.kvm_run
                run.exit_reason = U.KVM_EXIT_HYPERCALL
                hc = run.hypercall
                hc.nr, hc.ret = U.KVM_HC_MAP_GPA_RANGE, 0
                hc.args[0], hc.args[1] = first_gfn << PAGE_SHIFT, npages
                hc.args[2] = (U.KVM_MAP_GPA_RANGE_ENCRYPTED if first_op == U.VMGEXIT_PSC_OP_PRIVATE
                              else U.KVM_MAP_GPA_RANGE_DECRYPTED) | (
                    U.KVM_MAP_GPA_RANGE_PAGE_SZ_2M if first_size
                    else U.KVM_MAP_GPA_RANGE_PAGE_SZ_4K)
                hc.flags = U.KVM_EXIT_HYPERCALL_LONG_MODE

                def complete():            # snp_complete_one_psc
                    if run.hypercall.ret & U64_MAX:
                        return self._snp_complete_psc(psc, U.VMGEXIT_PSC_ERROR_GENERIC)
                    self._snp_complete_one_psc_done(psc)
                    return self._snp_begin_psc(psc)
                self._complete = complete
                return EXIT
            self._snp_complete_one_psc_done(psc)     # SMASH/UNSMASH: nothing to do



class SnpVcpu(PscVcpu):
    """Mixin of Vcpu: what an SNP vCPU adds to the GHCB MSR protocol, and the guest's
    page-state change built on it."""

    #: The GPA the guest registered as its GHCB (svm->sev_es.ghcb_registered_gpa).
    ghcb_registered_gpa = None
    #: AP creation (sev_snp_ap_creation): the VMSA GPA another vCPU named for this one
    #: (svm->sev_es.snp_vmsa_gpa; None is INVALID_PAGE), whether a request waits for the next
    #: entry (snp_ap_waiting_for_reset), whether KVM_REQ_UPDATE_PROTECTED_GUEST_STATE is set,
    #: the guest's VMSA page VMRUN uses once one was installed (vmcb->control.vmsa_pa; None:
    #: KVM's own page, vmsa_spa), and whether the AP was left with no VMSA (AP_DESTROY, or a
    #: VMSA GPA KVM could not resolve): KVM_MP_STATE_HALTED.
    snp_vmsa_gpa = None
    snp_ap_waiting_for_reset = False
    snp_update_requested = False
    snp_guest_vmsa_spa = None
    snp_halted = False

    def _snp_msr_protocol(self, ghcb, info):
        """sev_handle_vmgexit_msr_protocol for PREF_GPA_REQ (no preference), REG_GPA_REQ (the
        gfn is recorded and echoed) and PSC_REQ (:meth:`_snp_begin_psc_msr`) of an SNP guest."""
        if info == U.GHCB_MSR_PREF_GPA_REQ:
            ghcb = _set_bits(ghcb, U.GHCB_MSR_PREF_GPA_NONE, U.GHCB_MSR_GPA_VALUE_MASK,
                             U.GHCB_MSR_GPA_VALUE_POS)
            self.ghcb_gpa = _set_bits(ghcb, U.GHCB_MSR_PREF_GPA_RESP, U.GHCB_MSR_INFO_MASK,
                                      U.GHCB_MSR_INFO_POS)
            return None
        if info == U.GHCB_MSR_REG_GPA_REQ:
            gfn = (ghcb >> U.GHCB_MSR_GPA_VALUE_POS) & U.GHCB_MSR_GPA_VALUE_MASK
            self.ghcb_registered_gpa = gfn << PAGE_SHIFT
            ghcb = _set_bits(ghcb, gfn, U.GHCB_MSR_GPA_VALUE_MASK, U.GHCB_MSR_GPA_VALUE_POS)
            self.ghcb_gpa = _set_bits(ghcb, U.GHCB_MSR_REG_GPA_RESP, U.GHCB_MSR_INFO_MASK,
                                      U.GHCB_MSR_INFO_POS)
            return None
        return self._snp_begin_psc_msr(ghcb)

    def _snp_begin_psc_msr(self, ghcb):
        """snp_begin_psc_msr: a private or shared request for one 4 KiB page becomes a
        KVM_EXIT_HYPERCALL (KVM_HC_MAP_GPA_RANGE, 1 page, ENCRYPTED or DECRYPTED) when user space
        asked for that exit (KVM_CAP_EXIT_HYPERCALL); any other operation, or no such exit,
        answers PSC_RESP_ERROR and resumes the guest. hypercall.ret is zeroed for VMMs that
        never write it (QEMU <= 9.2); snp_complete_psc_msr answers PSC_RESP or, for a non-zero
        ret, PSC_RESP_ERROR."""
        gpa = U.GHCB_MSR_PSC_REQ_TO_GFN(ghcb) << PAGE_SHIFT
        op = U.GHCB_MSR_PSC_REQ_TO_OP(ghcb)
        if op not in (U.SNP_PAGE_STATE_PRIVATE, U.SNP_PAGE_STATE_SHARED) or \
                not self.vm.hypercall_exit_enabled & (1 << U.KVM_HC_MAP_GPA_RANGE):
            self.ghcb_gpa = U.GHCB_MSR_PSC_RESP_ERROR
            return None
        run = self.kvm_run
        run.exit_reason = U.KVM_EXIT_HYPERCALL
        hc = run.hypercall
        hc.nr = U.KVM_HC_MAP_GPA_RANGE
        hc.ret = 0
        hc.args[0], hc.args[1] = gpa, 1
        hc.args[2] = (U.KVM_MAP_GPA_RANGE_ENCRYPTED if op == U.SNP_PAGE_STATE_PRIVATE
                      else U.KVM_MAP_GPA_RANGE_DECRYPTED) | U.KVM_MAP_GPA_RANGE_PAGE_SZ_4K
        hc.flags = U.KVM_EXIT_HYPERCALL_LONG_MODE

        def complete():            # snp_complete_psc_msr
            self.ghcb_gpa = U.GHCB_MSR_PSC_RESP_ERROR if run.hypercall.ret & U64_MAX \
                else U.GHCB_MSR_PSC_RESP
        self._complete = complete
        return EXIT

    # -- the guest's side ----------------------------------------------------------------------------

    def _page_state_change(self, gpa, npages, private):
        """The guest's page-state change of ``npages`` pages from ``gpa`` through the GHCB MSR
        protocol, one page per request, saving and restoring the GHCB MSR around it: a page
        made shared is first rescinded (PVALIDATE with validate 0), a page made private is
        validated after the hypervisor's answer. A refused request raises
        :class:`PageStateChangeFailed` in the guest. Progress survives the exits to user
        space."""
        st = self._progress
        if st is None:
            st = self._progress = {"i": 0, "asked": False, "validated": False,
                                   "saved": self.ghcb_gpa}
        op = U.SNP_PAGE_STATE_PRIVATE if private else U.SNP_PAGE_STATE_SHARED
        while st["i"] < npages:
            page = gpa + (st["i"] << PAGE_SHIFT)
            if not private and not st["validated"]:
                failed = self._pvalidate_pages(page, 1, False)
                if failed is not None:
                    return self._raise_in_guest(failed, st)
                st["validated"] = True
            if not st["asked"]:
                st["asked"] = True
                self.ghcb_gpa = U.GHCB_MSR_PSC_REQ_GFN(page >> PAGE_SHIFT, op)
                if self._vmgexit() is EXIT:
                    return EXIT
            resp = self.ghcb_gpa
            if resp & U.GHCB_MSR_INFO_MASK != U.GHCB_MSR_PSC_RESP or \
                    U.GHCB_MSR_PSC_RESP_VAL(resp):
                return self._raise_in_guest(PageStateChangeFailed(page, resp), st)
            if private:
                failed = self._pvalidate_pages(page, 1, True)
                if failed is not None:
                    return self._raise_in_guest(failed, st)
            st.update(i=st["i"] + 1, asked=False, validated=False)
        self.ghcb_gpa = st["saved"]
        return npages

    def _raise_in_guest(self, exc, st):
        """End the page-state change with ``exc`` raised in the guest, GHCB MSR restored."""
        self.ghcb_gpa = st["saved"]
        self._throw = exc
        return THROW

    # -- PVALIDATE ----------------------------------------------------------------------------

    def _pvalidate_one(self, gpa, validate):
        """PVALIDATE of the 4 KiB page at ``gpa`` (C-bit stripped by the caller): the access
        goes through the NPT as a private one (a fault maps the guest_memfd page, and a shared
        gfn is KVM_EXIT_MEMORY_FAULT), then the instruction runs on the RMP. Returns the status,
        PVALIDATE_FAIL_NOUPDATE when rFLAGS.CF is set."""
        vm = self.vm
        gfn = gpa >> PAGE_SHIFT
        pfn, _ = translate(vm, gfn, True, False)
        status, cf = vm.host.rmp.pvalidate(int(pfn), gpa=gfn << PAGE_SHIFT, asid=vm.sev.asid,
                                           validate=validate)
        return status or (U.PVALIDATE_FAIL_NOUPDATE if cf else 0)

    def _pvalidate_pages(self, gpa, npages, validate):
        """PVALIDATE of ``npages`` pages for a page-state change: None, or the
        :class:`PvalidateFailed` of the first page that failed (an already-validated page
        too, as Linux's pvalidate_4k_page treats it)."""
        gpa &= ~(1 << self.vm.host.c_bit)
        for i in range(npages):
            page = gpa + (i << PAGE_SHIFT)
            status = self._pvalidate_one(page, validate)
            if status:
                return PvalidateFailed(page, status)
        return None

    def _pvalidate(self, gpa, npages, validate):
        """``g.pvalidate``: pages in order, stopping at the first non-zero status, which is the
        result (0 when all pages changed). Progress survives an exit to user space."""
        if self._progress is None:
            self._progress = {"i": 0}
        st = self._progress
        gpa &= ~(1 << self.vm.host.c_bit)
        while st["i"] < npages:
            status = self._pvalidate_mapped(gpa + (st["i"] << PAGE_SHIFT), npages - st["i"],
                                            validate, st)
            if status is None:              # the next page is not mapped: fault it in
                status = self._pvalidate_one(gpa + (st["i"] << PAGE_SHIFT), validate)
                if not status:
                    st["i"] += 1
            if status:
                return status
        return 0

    def _pvalidate_mapped(self, gpa, npages, validate, st):
        """PVALIDATE of the leading pages from ``gpa`` whose NPT entries already serve a private
        access, in one RMP batch, ``st["i"]`` advanced past each page that changed. Returns the
        status of the page it stopped at (PVALIDATE_FAIL_NOUPDATE for rFLAGS.CF), 0 when every
        page changed, None when it stopped at a page the NPT does not map privately; an RMP
        fault propagates after the pages before it are counted."""
        vm = self.vm
        gfn = gpa >> PAGE_SHIFT
        n = min(npages, vm.max_gfn + 1 - gfn) if gfn <= vm.max_gfn else 0
        gfns = np.arange(gfn, gfn + n, dtype=np.uint64)
        pfns, flags = vm.npt.lookup_batch(gfns, with_flags=True)
        ok = (pfns != vm.npt.MISS) & (flags & np.uint64(NPT_PRIVATE) != 0)
        m = int(np.argmin(ok)) if not ok.all() else n
        try:
            status, cf, done = vm.host.rmp.pvalidate_pages(
                pfns[:m], gfns[:m] << np.uint64(PAGE_SHIFT), asid=vm.sev.asid,
                validate=validate)
        except RmpFault as fault:
            st["i"] += fault.index
            raise
        st["i"] += done
        if status or cf:
            return status or U.PVALIDATE_FAIL_NOUPDATE
        return None if m < npages else 0

    # -- RMPADJUST ----------------------------------------------------------------------------

    def _rmpadjust(self, gpa, target_vmpl, perms, vmsa):
        """``g.rmpadjust``: RMPADJUST by the guest (at VMPL0) of its 4 KiB page at ``gpa``: the
        access goes through the NPT as a private one, then the instruction runs on the RMP
        (APM vol. 3 "RMPADJUST"). Returns its status; an RMP fault propagates."""
        vm = self.vm
        gpa &= ~(1 << vm.host.c_bit)
        pfn, _ = translate(vm, gpa >> PAGE_SHIFT, True, False)
        return vm.host.rmp.rmpadjust(int(pfn), gpa=gpa & ~(PAGE_SIZE - 1), asid=vm.sev.asid,
                                     target_vmpl=target_vmpl, perms=perms, vmsa=vmsa)

    # -- AP creation (sev_snp_ap_creation) ------------------------------------------------------

    def _snp_ap_creation(self, x):
        """sev_snp_ap_creation for SVM_VMGEXIT_AP_CREATION: SW_EXITINFO1 holds the request
        (low 32 bits) and the target's APIC ID (high 32), SW_EXITINFO2 the VMSA's GPA, RAX the
        AP's SEV features. The target must exist; CREATE and CREATE_ON_INIT need RAX equal to
        the VM's vmsa_features and a page-aligned VMSA GPA under MAXPHYADDR that is not 2 MiB
        aligned (the erratum KVM avoids); DESTROY forgets the VMSA. The target waits for its
        next entry (kvm_make_request_and_kick), or for INIT with CREATE_ON_INIT. Returns 0 or
        -EINVAL (the caller answers GHCB_ERR_INVALID_INPUT)."""
        vm = self.vm
        request = x.exit_info_1 & 0xFFFFFFFF
        apic_id = x.exit_info_1 >> 32
        target = next((v for v in vm.vcpus if v.vcpu_id == apic_id), None)
        if target is None:
            return -EINVAL
        if request in (U.SVM_VMGEXIT_AP_CREATE_ON_INIT, U.SVM_VMGEXIT_AP_CREATE):
            vmsa = x.exit_info_2
            if x.regs["rax"] != vm.sev.vmsa_features:
                return -EINVAL
            if vmsa & (PAGE_SIZE - 1) or vmsa >> self._maxphyaddr():
                return -EINVAL                       # page_address_valid
            if not vmsa & ((1 << 21) - 1):
                return -EINVAL                       # IS_ALIGNED(exit_info_2, PMD_SIZE)
            target.snp_vmsa_gpa = vmsa
        elif request == U.SVM_VMGEXIT_AP_DESTROY:
            target.snp_vmsa_gpa = None
        else:
            return -EINVAL
        target.snp_ap_waiting_for_reset = True
        if request != U.SVM_VMGEXIT_AP_CREATE_ON_INIT:
            target.snp_update_requested = True
        return 0

    def _snp_update_protected_guest_state(self):
        """KVM_REQ_UPDATE_PROTECTED_GUEST_STATE at entry: kvm_vcpu_reset(init_event) and
        sev_snp_init_protected_guest_state. The AP stops (HALTED, no VMSA) and, when a VMSA
        GPA was named and guest_memfd gives its frame (kvm_gmem_get_pfn), that page becomes
        the VMSA VMRUN loads and the vCPU is runnable again: its guest program starts over,
        the model's reading of the RIP in the new VMSA."""
        self.snp_update_requested = False
        if not self.vm.sev.snp_active or not self.snp_ap_waiting_for_reset:
            return
        self.snp_ap_waiting_for_reset = False
        self.snp_halted = True
        self.snp_guest_vmsa_spa = None
        gpa, self.snp_vmsa_gpa = self.snp_vmsa_gpa, None
        if gpa is None:
            return
        gfn = gpa >> PAGE_SHIFT
        slot = self.vm.gfn_to_memslot(gfn) if gfn <= self.vm.max_gfn else None
        if slot is None or slot.gmem_file is None:
            return
        err, pfn = slot.gmem_file.get_pfn(slot, gfn)
        if err:
            return
        self.snp_guest_vmsa_spa = int(pfn) << PAGE_SHIFT
        self.snp_halted = False
        self.guest_state_protected = True
        self._restart_program()

    def _snp_vmsa_unusable(self):
        """VMRUN's check of a guest-supplied VMSA page: its RMP entry must be assigned to the
        guest's ASID, validated and marked VMSA by RMPADJUST, else the entry fails
        (VMEXIT_INVALID). KVM's own VMSA pages are the firmware's to vouch for."""
        if self.snp_guest_vmsa_spa is None:
            return False
        e = self.vm.host.rmp.entry(self.snp_guest_vmsa_spa >> PAGE_SHIFT)
        return not (e.assigned and e.validated and e.vmsa and e.asid == self.vm.sev.asid)

    # -- SNP guest requests -------------------------------------------------------------------

    def _snp_handle_guest_req(self, req_gpa, resp_gpa):
        """snp_handle_guest_req, reached through the SVM_VMGEXIT_GUEST_REQUEST NAE event
        (sev_es_validate_vmgexit has checked that both GPAs are page aligned and differ): the
        request page is read from guest memory into
        KVM's bounce page, SNP_GUEST_REQUEST runs with the firmware-owned response page, and the
        response is written to guest memory; the firmware status is what the guest gets in
        SW_EXITINFO2 (SNP_GUEST_ERR(0, fw_err)). A page KVM cannot read or write fails KVM_RUN
        with EIO. Returns SW_EXITINFO2."""
        vm = self.vm
        sev = vm.sev
        if not sev.snp_active:
            raise KvmError(EINVAL, "KVM_RUN", "guest request from a guest that is not SNP")
        try:
            req = vm.kvm.copy_from_user(_gpa_hva(vm, req_gpa), PAGE_SIZE)
        except (OSError, LookupError):
            raise KvmError(EIO, "KVM_RUN", f"cannot read the guest request at {req_gpa:#x}") \
                from None
        host = vm.host
        host.umc.write(sev.guest_req_buf, req, 0)
        buf = KernelBuffers(host)
        try:
            status = host.psp.command(U.SEV_CMD_SNP_GUEST_REQUEST, buf.put(
                SL.sev_data_snp_guest_request.pack(gctx_paddr=sev.snp_context,
                                                   req_paddr=sev.guest_req_buf,
                                                   res_paddr=sev.guest_resp_buf)))
        finally:
            buf.free()
        resp = host.umc.read(sev.guest_resp_buf, PAGE_SIZE, 0)
        try:
            vm.kvm.copy_to_user(_gpa_hva(vm, resp_gpa), resp)
        except (OSError, LookupError):
            raise KvmError(EIO, "KVM_RUN", f"cannot write the guest response at {resp_gpa:#x}") \
                from None
        return status

    def _snp_guest_request(self, kind, payload, arg):
        """The guest driver's SNP_GET_REPORT (``kind`` "report", ``arg`` the VMPL), or any
        message (``kind`` "message", ``arg`` its MSG_*_REQ type, ``payload`` its body, as
        snp_send_guest_request sends them): sequence number from the secrets page, request
        encrypted with VMPCK0 into the shared request page, the guest-request NAE event, the
        response checked and decrypted, the sequence number advanced by 2; returns the report
        (or the response's payload). A firmware or VMM error raises
        :class:`SnpGuestRequestFailed` in the guest."""
        vm = self.vm
        info = vm.snp_guest_msg
        if info is None:
            raise ValueError("no secrets page or message pages: call "
                             "kvm_util.snp_guest_msg_init(vm, ...) first")
        secrets_gpa, req_gpa, resp_gpa = info
        cbit = 1 << vm.host.c_bit
        st = self._progress
        if st is None:
            st = self._progress = {"step": 0}
        if st["step"] == 0:
            secrets = self._access(secrets_gpa | cbit, PAGE_SIZE, None,
                                   st.setdefault("read", access_state(PAGE_SIZE, None)))
            if secrets is EXIT or secrets is THROW:
                return secrets
            st["vmpck"] = secrets[M.VMPCK_OFFSET:M.VMPCK_OFFSET + U.VMPCK_KEY_LEN]
            off = M.seqno_offset(0)
            st["seqno"] = int.from_bytes(secrets[off:off + 4], "little") + 1
            st["type"], body = (U.SNP_MSG_REPORT_REQ, SL.snp_report_req.pack(
                user_data=payload, vmpl=arg)) if kind == "report" else (arg, payload)
            st["page"] = M.build_request(st["vmpck"], st["seqno"], st["type"], body)
            st["step"] = 1
        if st["step"] == 1:
            done = self._access(req_gpa, PAGE_SIZE, st["page"],
                                st.setdefault("write", access_state(PAGE_SIZE, st["page"])))
            if done is EXIT or done is THROW:
                return done
            st["step"] = 2
        if st["step"] == 2:
            st["exit_info_2"] = self._snp_handle_guest_req(req_gpa, resp_gpa)
            st["step"] = 3
            if st["exit_info_2"]:
                self._throw = SnpGuestRequestFailed(st["exit_info_2"])
                return THROW
        if st["step"] == 3:
            page = self._access(resp_gpa, PAGE_SIZE, None,
                                st.setdefault("resp", access_state(PAGE_SIZE, None)))
            if page is EXIT or page is THROW:
                return page
            try:
                body = M.open_response(st["vmpck"], page, st["seqno"], st["type"],
                                       PAGE_SIZE - M.HDR.size)
            except M.GuestMessageError as e:
                self._throw = e
                return THROW
            st["body"] = body
            st["seq"] = (st["seqno"] + 1).to_bytes(4, "little")
            st["step"] = 4
        done = self._access((secrets_gpa | cbit) + M.seqno_offset(0), 4, st["seq"],
                            st.setdefault("seqw", access_state(4, st["seq"])))
        if done is EXIT or done is THROW:
            return done
        if kind == "message":
            return st["body"]
        rsp = SL.snp_report_resp.view(bytearray(st["body"][:SL.snp_report_resp.size]))
        if rsp.status:
            self._throw = SnpGuestRequestFailed(rsp.status)
            return THROW
        return bytes(rsp.report[:rsp.report_size])


def _gpa_hva(vm, gpa):
    """kvm_read_guest/kvm_write_guest's translation: the HVA of ``gpa`` in its memslot."""
    slot = vm.gfn_to_memslot(gpa >> PAGE_SHIFT)
    if slot is None:
        raise LookupError(f"no memslot at {gpa:#x}")
    return slot.userspace_addr + gpa - (slot.base_gfn << PAGE_SHIFT)


class SnpGuestRequestFailed(GuestException):
    """The guest request came back with an error: the VMM's or firmware's in SW_EXITINFO2, or
    the status of the response message."""

    def __init__(self, code):
        super().__init__(0, f"SNP guest request failed: {code:#x}")
        self.code = code


def _vmgexit_guest_request(vcpu, x):
    """SVM_VMGEXIT_GUEST_REQUEST through the GHCB page: snp_handle_guest_req, its status in
    SW_EXITINFO2 with NO_ACTION (svm_vmgexit_no_action)."""
    x.success(vcpu._snp_handle_guest_req(x.exit_info_1, x.exit_info_2))


def _vmgexit_ap_creation(vcpu, x):
    """SVM_VMGEXIT_AP_CREATION: sev_snp_ap_creation; a refusal answers GHCB_ERR_INVALID_INPUT
    (svm_vmgexit_bad_input) and the guest resumes either way."""
    if vcpu._snp_ap_creation(x):
        x.bad_input(U.GHCB_ERR_INVALID_INPUT)


# sev_handle_vmgexit's case SVM_VMGEXIT_AP_CREATION.
VMGEXIT_HANDLERS[U.SVM_VMGEXIT_AP_CREATION] = _vmgexit_ap_creation

# sev_handle_vmgexit's case SVM_VMGEXIT_GUEST_REQUEST (sevcore.kvm.ghcb's dispatch table).
VMGEXIT_HANDLERS[U.SVM_VMGEXIT_GUEST_REQUEST] = _vmgexit_guest_request


# sev_handle_vmgexit's case SVM_VMGEXIT_PSC.
VMGEXIT_HANDLERS[U.SVM_VMGEXIT_PSC] = _vmgexit_psc
