"""The reverse map table (RMP) of an SEV-SNP host, on the C core (csrc/rmp.c).

One entry per 4 KiB host frame says who owns it: ``assigned`` (to a guest, or to the firmware
when its ASID is 0), ``pagesize`` (4 KiB or 2 MiB), ``immutable`` (locked: only the firmware may
change it), ``validated`` (the guest accepted it with PVALIDATE), ``vmsa``, the owning ``asid``,
the ``gpa`` the guest may reach it at, and the VMPL1..3 permission masks (AMD64 APM vol. 2
15.36.3; the kernel's ``struct rmpentry``, arch/x86/virt/svm/sev.c). The instructions are
methods named after them: :meth:`Rmp.rmpupdate` (the hypervisor), :meth:`Rmp.pvalidate` and
:meth:`Rmp.rmpadjust` (the guest); the kernel's helpers ``rmp_make_private`` and
``rmp_make_shared`` are there too. An instruction's status (``RMPUPDATE_FAIL_*``,
``PVALIDATE_FAIL_*``, rFLAGS.CF) is its return value, as the instruction reports it in RAX and
rFLAGS; what the hardware turns into a page fault is :class:`RmpFault`.

>>> rmp = Rmp(1 << 20)
>>> rmp.rmp_make_private(0x1234, gpa=0x5000, asid=7)
0
>>> rmp.pvalidate(0x1234, gpa=0x5000, asid=7, validate=True)
(0, 0)
>>> rmp.pvalidate(0x1234, gpa=0x5000, asid=7, validate=True)     # CF=1: already validated
(0, 1)

The table costs memory only for frames whose entry is not all zero (``stats()["bytes"]``).
"""
import errno
from typing import NamedTuple

import numpy as np

from sevcore import _bindings as B
from sevcore import uapi as U
from sevcore.core.arrays import u64

PAGE_SHIFT = 12
PAGES_PER_2M = 512


class RmpEntry(NamedTuple):
    """One RMP entry (``struct rmpentry``'s fields, plus the VMPL1..3 permission masks)."""
    assigned: int
    pagesize: int
    immutable: int
    validated: int
    vmsa: int
    asid: int
    gpa: int
    vmpl_perms: int


class RmpFault(OSError):
    """An access the RMP check refuses: the page fault the CPU raises with the RMP bit
    (``X86_PF_RMP``) in its error code. A host (kernel or VMM) write to a guest's frame is one;
    the kernel's page-fault handler reports it by dumping the entry (``dump_rmpentry``,
    arch/x86/virt/svm/sev.c) and, for a user-space access, sending SIGBUS. ``errno`` is EFAULT,
    ``pfn`` the frame, ``address`` the faulting address, ``error_code`` the page-fault error
    code, ``entry`` the entry that refused it."""

    def __init__(self, what, pfn, address, error_code, entry):
        self.pfn, self.address, self.error_code, self.entry = pfn, address, error_code, entry
        super().__init__(errno.EFAULT, f"RMP #PF at {address:#x} (frame {pfn:#x}, error code "
                                       f"{error_code:#x}): {entry}", what)


class Rmp:
    """The RMP of a host with ``nframes`` 4 KiB frames."""

    def __init__(self, nframes):
        self.nframes = int(nframes)
        self._t = B.rmp_create(self.nframes)

    def __repr__(self):
        return f"<Rmp {self.nframes} frames, {self.assigned} assigned>"

    # -- reading --------------------------------------------------------------------------------

    def entry(self, pfn):
        """The entry of frame ``pfn`` (an RmpEntry)."""
        return RmpEntry(*B.rmp_read(self._t, pfn))

    @property
    def assigned(self):
        """Entries that are assigned (a 2 MiB page counts once)."""
        return B.rmp_stats(self._t)["assigned"]

    def stats(self):
        """{"assigned", "leaves", "bytes"}: what the sparse table holds and costs."""
        return B.rmp_stats(self._t)

    def validated(self, pfn, asid):
        """Whether a private access by a guest of ``asid`` to frame ``pfn`` passes the RMP's
        validation check (AMD64 APM vol. 2 15.36.10): the entry governing the frame is
        assigned to ``asid`` and validated."""
        return B.rmp_validated(self._t, pfn, asid)

    def cdata(self):
        """The C table, for the guest page kernel's RMP check (csrc/guest.h)."""
        return self._t

    def next_assigned(self, pfn, npages):
        """The first frame of [pfn, pfn + npages) a guest or the firmware owns, or pfn + npages
        (a frame under an assigned 2 MiB entry counts)."""
        return B.rmp_next_assigned(self._t, pfn, npages)

    # -- the hypervisor's instruction and the kernel's helpers -----------------------------------

    def rmpupdate(self, spa, *, assigned=0, pagesize=U.RMP_PG_SIZE_4K, immutable=0, asid=0,
                  gpa=0):
        """RMPUPDATE of the entry of the frame at ``spa`` (APM vol. 3): returns 0 or the
        ``RMPUPDATE_FAIL_*`` status, the entry unchanged then. The new entry is not validated
        and has no VMPL1..3 permissions. ValueError for an SPA outside host memory."""
        if spa & ((1 << PAGE_SHIFT) - 1):
            return U.RMPUPDATE_FAIL_INPUT
        if asid >= 1 << 16 or not 0 <= gpa < 1 << 52:
            return U.RMPUPDATE_FAIL_INPUT
        return B.rmp_update(self._t, spa >> PAGE_SHIFT, bool(assigned), int(pagesize),
                            bool(immutable), asid, gpa)

    def psmash(self, spa):
        """PSMASH of the 2 MiB page at ``spa`` (APM vol. 3): its 2 MiB entry becomes 512 4 KiB
        entries with the same state (validated included) at consecutive GPAs. Returns 0,
        ``PSMASH_FAIL_INPUT`` (``spa`` not 2 MiB aligned) or ``PSMASH_FAIL_BADADDR`` (not a
        2 MiB entry). ValueError for an SPA outside host memory."""
        if spa & ((PAGES_PER_2M << PAGE_SHIFT) - 1):
            return U.PSMASH_FAIL_INPUT
        return B.rmp_psmash(self._t, spa >> PAGE_SHIFT)

    def rmp_make_private(self, pfn, gpa, asid, *, immutable=False, pagesize=U.RMP_PG_SIZE_4K):
        """``rmp_make_private`` (arch/x86/virt/svm/sev.c): assign frame ``pfn`` to ``asid`` at
        ``gpa``. Returns the RMPUPDATE status."""
        return self.rmpupdate(pfn << PAGE_SHIFT, assigned=1, pagesize=pagesize,
                              immutable=immutable, asid=asid, gpa=gpa)

    def rmp_make_shared(self, pfn, *, pagesize=U.RMP_PG_SIZE_4K):
        """``rmp_make_shared``: give frame ``pfn`` back to the hypervisor. Returns the status."""
        return self.rmpupdate(pfn << PAGE_SHIFT, pagesize=pagesize)

    def make_private_pages(self, pfns, gfns, asid, *, immutable=False):
        """``rmp_make_private`` of ``pfns[i]`` at ``gfns[i] << 12``, page by page, stopping at
        the first refusal: returns (status, pages done)."""
        return B.rmp_make_private_batch(self._t, u64(pfns, "pfns"), u64(gfns, "gfns"), asid,
                                        bool(immutable))

    def make_shared_pages(self, pfns):
        """``rmp_make_shared`` of each frame of ``pfns`` in order, stopping at the first
        refusal: returns (status, pages done)."""
        return B.rmp_make_shared_batch(self._t, u64(pfns, "pfns"))

    def assigned_mask(self, pfns):
        """A bool array: which frames of ``pfns`` have an assigned entry (their own 4 KiB
        entry, as ``snp_lookup_rmpentry`` reports ``assigned``)."""
        return B.rmp_assigned_mask(self._t, u64(pfns, "pfns"))

    # -- the firmware ---------------------------------------------------------------------------

    def preguest_prefix(self, pfns, asid):
        """How many of ``pfns``, in order, are in the Pre-Guest state of ``asid`` (assigned,
        immutable, not validated, 4 KiB): the state SNP_LAUNCH_UPDATE takes a page in."""
        return B.rmp_preguest_prefix(self._t, u64(pfns, "pfns"), asid)

    def gpas(self, pfns):
        """The GPA each frame of ``pfns`` is assigned at (0 for an unassigned frame)."""
        pfns = np.ascontiguousarray(u64(pfns, "pfns"))
        out = np.empty(len(pfns), np.uint64)
        B.rmp_gpas(self._t, pfns, out)
        return out

    def fw_validate(self, pfns, asid, *, vmsa=False):
        """What SNP_LAUNCH_UPDATE leaves in the entries of the pages it measured: validated,
        no longer immutable (``vmsa`` marks VMSA pages). ValueError, nothing changed, unless
        every frame is assigned to ``asid``."""
        B.rmp_fw_validate_batch(self._t, u64(pfns, "pfns"), asid, bool(vmsa))

    def fw_set(self, pfn, entry):
        """The firmware writes the entry of frame ``pfn`` (an RmpEntry; VMPL permissions are
        cleared), bound by no lock: SNP_PAGE_RECLAIM, SNP_DECOMMISSION, firmware pages."""
        B.rmp_fw_store(self._t, pfn, tuple(entry))

    # -- the guest's instructions ---------------------------------------------------------------

    def pvalidate(self, pfn, *, gpa, asid, validate, pagesize=U.RMP_PG_SIZE_4K):
        """PVALIDATE by a guest of ``asid`` of its page at ``gpa``, backed by frame ``pfn``
        (APM vol. 3): returns (status, cf), status 0 or ``PVALIDATE_FAIL_INPUT`` /
        ``PVALIDATE_FAIL_SIZEMISMATCH``, cf the rFLAGS.CF bit (1: the page already had that
        state, nothing changed). RmpFault (the #NPF the hypervisor sees) when the page is not
        the guest's, is locked, sits at another GPA, or is a 4 KiB page of a 2 MiB entry."""
        try:
            return B.rmp_pvalidate(self._t, pfn, gpa, asid, int(pagesize), bool(validate))
        except OSError as e:
            if e.errno != errno.EFAULT:
                raise
            raise RmpFault("PVALIDATE", pfn, gpa, U.X86_PF_RMP, self.entry(pfn)) from None

    def rmpadjust(self, pfn, *, gpa, asid, target_vmpl, perms, vmsa=False):
        """RMPADJUST by VMPL0 of ``asid``: set ``target_vmpl``'s (1..3) permission mask on its
        page at ``gpa``, and the page's VMSA bit to ``vmsa`` (RDX bit 16, which VMPL0 alone may
        change). Returns 0 or ``PVALIDATE_FAIL_INPUT``; RmpFault as for PVALIDATE."""
        try:
            return B.rmp_adjust(self._t, pfn, gpa, asid, target_vmpl, perms, bool(vmsa))
        except OSError as e:
            if e.errno != errno.EFAULT:
                raise
            raise RmpFault("RMPADJUST", pfn, gpa, U.X86_PF_RMP, self.entry(pfn)) from None

    def pvalidate_pages(self, pfns, gpas, *, asid, validate):
        """PVALIDATE (4 KiB) of the guest's pages at ``gpas`` backed by ``pfns``, in order, as
        a guest's loop runs it, stopping at the first page with a non-zero status or rFLAGS.CF
        set: returns (status, cf, pages before it). RmpFault for the first page the check
        faults, its ``index`` that page (the pages before it changed)."""
        pfns = u64(pfns, "pfns")
        try:
            return B.rmp_pvalidate_batch(self._t, pfns, u64(gpas, "gpas"), asid, bool(validate))
        except OSError as e:
            if e.errno != errno.EFAULT:
                raise
            self._fault("PVALIDATE", pfns, gpas, e.index)

    def adjust_pages(self, pfns, gpas, *, asid, target_vmpl, perms):
        """RMPADJUST of ``target_vmpl``'s mask on each page, in order, each page's VMSA bit
        kept (the firmware's permissions at SNP_LAUNCH_UPDATE), stopping at the first refusal:
        returns (status, pages before it). RmpFault as for pvalidate_pages."""
        pfns = u64(pfns, "pfns")
        try:
            return B.rmp_adjust_batch(self._t, pfns, u64(gpas, "gpas"), asid, target_vmpl,
                                      perms)
        except OSError as e:
            if e.errno != errno.EFAULT:
                raise
            self._fault("RMPADJUST", pfns, gpas, e.index)

    def _fault(self, what, pfns, gpas, i):
        """The RmpFault of page ``i`` of a batch, its ``index`` set to ``i``."""
        pfn = int(pfns[i])
        fault = RmpFault(what, pfn, int(gpas[i]), U.X86_PF_RMP, self.entry(pfn))
        fault.index = i
        raise fault from None

    # -- the check on accesses ------------------------------------------------------------------

    def first_denied(self, pfns, asid):
        """Index of the first frame of ``pfns`` a write with ``asid`` may not make (ASID 0: a
        frame a guest or the firmware owns; a guest: a frame not assigned to it), or
        ``len(pfns)``."""
        return B.rmp_first_denied(self._t, u64(pfns, "pfns"), asid)

    def check_write(self, pfns, asid, what, address=None):
        """Raise RmpFault for the first frame of ``pfns`` a write with ``asid`` may not make
        (the RMP check of a write: error code X86_PF_RMP | X86_PF_WRITE)."""
        pfns = u64(pfns, "pfns")
        i = B.rmp_first_denied(self._t, pfns, asid)
        if i < len(pfns):
            pfn = int(pfns[i])
            addr = (pfn << PAGE_SHIFT) if address is None else address
            raise RmpFault(what, pfn, addr, U.X86_PF_RMP | U.X86_PF_WRITE, self.entry(pfn))
