"""The SNP guest's page-state change through the GHCB page, as Linux's ``__set_pages_state`` and
``vmgexit_psc`` (arch/x86/coco/sev/core.c) do it: a ``struct snp_psc_desc`` of up to
VMGEXIT_PSC_MAX_ENTRY entries in the GHCB's shared buffer, SW_SCRATCH pointing at it, the
SVM_VMGEXIT_PSC event repeated until the hypervisor has moved ``cur_entry`` past
``end_entry``; pages made shared are rescinded before, pages made private validated after.
A generator for ``yield from`` in a guest program, over a :class:`sevcore.kvm.ghcb.GhcbGuest`.
"""
from sevcore import uapi as U
from sevcore.hw.hostmem import PAGE_SHIFT
from sevcore.kvm.ghcb import GHCB_SHARED_BUFFER, Ghcb
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
