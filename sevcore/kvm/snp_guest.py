"""An SNP guest's side of two GHCB-page protocols, as Linux does them (arch/x86/coco/sev/core.c):
the page-state change (``__set_pages_state`` and ``vmgexit_psc``: a ``struct snp_psc_desc`` of up
to VMGEXIT_PSC_MAX_ENTRY entries in the GHCB's shared buffer, SW_SCRATCH pointing at it, the
SVM_VMGEXIT_PSC event repeated until the hypervisor has moved ``cur_entry`` past ``end_entry``;
pages made shared are rescinded before, pages made private validated after), and the start and
stop of an AP (``wakeup_cpu_via_vmgexit``: :func:`snp_ap_create`, :func:`snp_ap_destroy`).
Generators for ``yield from`` in a guest program, over a :class:`sevcore.kvm.ghcb.GhcbGuest`.
"""
from sevcore import uapi as U
from sevcore.hw import vmsa as V
from sevcore.hw.hostmem import PAGE_SHIFT
from sevcore.kvm.ghcb import GHCB_SHARED_BUFFER, Ghcb
from sevcore.kvm.guest import GuestException
from sevcore.kvm.snp_vcpu import PageStateChangeFailed, PvalidateFailed


def _desc(gfns, op):
    """struct snp_psc_desc for ``gfns`` (4 KiB entries): header, then one u64 per entry."""
    out = bytearray((0).to_bytes(2, "little") + (len(gfns) - 1).to_bytes(2, "little") +
                    bytes(4))
    for gfn in gfns:
        out += ((op << 52) | (gfn << 12)).to_bytes(8, "little")
    return out


def ghcb_page_state_change(g, ghcb, gpa, npages, private):
    """Make ``npages`` pages from ``gpa`` private or shared through ``ghcb`` (a negotiated
    GhcbGuest); raises PageStateChangeFailed (SW_EXITINFO2 non-zero) or PvalidateFailed."""
    op = U.VMGEXIT_PSC_OP_PRIVATE if private else U.VMGEXIT_PSC_OP_SHARED
    gfns = [(gpa >> PAGE_SHIFT) + i for i in range(npages)]
    if not private:
        for gfn in gfns:
            status = yield g.pvalidate(gfn << PAGE_SHIFT, 1, False)
            if status:
                raise PvalidateFailed(gfn << PAGE_SHIFT, status)
    for lo in range(0, npages, U.VMGEXIT_PSC_MAX_ENTRY):
        desc = _desc(gfns[lo:lo + U.VMGEXIT_PSC_MAX_ENTRY], op)
        page = Ghcb()
        page.page[GHCB_SHARED_BUFFER:GHCB_SHARED_BUFFER + len(desc)] = desc
        page.set("sw_scratch", ghcb.gpa + GHCB_SHARED_BUFFER)
        while True:
            out = yield from ghcb.hv_call(g, page, U.SVM_VMGEXIT_PSC, 0, 0)
            if out.get("sw_exit_info_2"):
                raise PageStateChangeFailed(gpa, out.get("sw_exit_info_2"))
            hdr = out.page[GHCB_SHARED_BUFFER:GHCB_SHARED_BUFFER + 4]
            if int.from_bytes(hdr[0:2], "little") > int.from_bytes(hdr[2:4], "little"):
                break
            page = Ghcb(out.page)
            page.set("sw_scratch", ghcb.gpa + GHCB_SHARED_BUFFER)
    if private:
        for gfn in gfns:
            status = yield g.pvalidate(gfn << PAGE_SHIFT, 1, True)
            if status:
                raise PvalidateFailed(gfn << PAGE_SHIFT, status)
    return npages


# -- AP creation (wakeup_cpu_via_vmgexit, arch/x86/coco/sev/core.c) ------------------------------------

#: The C-bit of a guest-physical address on the simulated host (CPUID 0x8000001F EBX[5:0]).
C_BIT = 51


class ApCreationFailed(GuestException):
    """RMPADJUST refused to make the page a VMSA; Linux's wakeup_cpu_via_vmgexit gives up
    (-EINVAL) with the page left as it was."""

    def __init__(self, gpa, status):
        super().__init__(0, f"RMPADJUST of the VMSA at {gpa:#x}: status {status}")
        self.gpa, self.status = gpa, status


def snp_ap_vmsa(sev_features, regs=None):
    """A VMSA page for an AP as the guest builds one (struct sev_es_save_area): the register
    fields of ``regs`` (names of sevcore.hw.vmsa.REGS) and SEV_FEATURES; the rest zero."""
    page = bytearray(V.VMSA_SIZE)
    for name, value in (regs or {}).items():
        page[V.REGS[name]:V.REGS[name] + 8] = value.to_bytes(8, "little")
    page[V.SEV_FEATURES:V.SEV_FEATURES + 8] = sev_features.to_bytes(8, "little")
    return bytes(page)


def snp_ap_create(g, ghcb, apic_id, vmsa_gpa, sev_features, regs=None, *, make_vmsa=True,
                  request=U.SVM_VMGEXIT_AP_CREATE):
    """Start the AP ``apic_id`` as Linux's wakeup_cpu_via_vmgexit does: the AP's VMSA written
    into the guest's private, validated page at ``vmsa_gpa`` (not 2 MiB aligned:
    snp_alloc_vmsa_page), made a VMSA with RMPADJUST (snp_set_vmsa: target VMPL1, VMSA bit;
    ``make_vmsa`` False skips it), then SVM_VMGEXIT_AP_CREATION through ``ghcb`` (a negotiated,
    registered GhcbGuest) with RAX = ``sev_features``, SW_EXITINFO1 = APIC ID << 32 |
    ``request``, SW_EXITINFO2 = the VMSA's GPA. Raises ApCreationFailed, or GhcbProtocolError
    when KVM refuses the request (GHCB_ERR_INVALID_INPUT)."""
    yield g.write(vmsa_gpa | 1 << C_BIT, snp_ap_vmsa(sev_features, regs))
    if make_vmsa:
        status = yield g.rmpadjust(vmsa_gpa, 1, 0, vmsa=True)
        if status:
            raise ApCreationFailed(vmsa_gpa, status)
    page = Ghcb()
    page.set("rax", sev_features)
    return (yield from ghcb.hv_call(g, page, U.SVM_VMGEXIT_AP_CREATION,
                                    apic_id << 32 | request, vmsa_gpa))


def snp_ap_destroy(g, ghcb, apic_id, vmsa_gpa=None):
    """SVM_VMGEXIT_AP_CREATION with AP_DESTROY for ``apic_id``; then, as snp_cleanup_vmsa
    does for a VMSA the guest no longer uses, the VMSA bit of the page at ``vmsa_gpa`` (if
    given) cleared with RMPADJUST. Returns that status (0 without a page)."""
    yield from ghcb.hv_call(g, Ghcb(), U.SVM_VMGEXIT_AP_CREATION,
                            apic_id << 32 | U.SVM_VMGEXIT_AP_DESTROY, 0)
    if vmsa_gpa is None:
        return 0
    return (yield g.rmpadjust(vmsa_gpa, 1, 0, vmsa=False))
