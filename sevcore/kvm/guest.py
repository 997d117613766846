"""Guest programs: what a simulated vCPU executes.

A guest program is a generator function ``fn(g, *args)``. Each guest instruction that matters to
the host is an operation the program yields; the vCPU performs it (in the kernel or by exiting
to user space) and sends the result back::

    def guest_code(g, gpa):
        yield g.write(gpa, b"\\xaa" * 4096)
        ret = yield g.hypercall(KVM_HC_MAP_GPA_RANGE, gpa, 1, KVM_MAP_GPA_RANGE_ENCRYPTED)
        data = yield g.read(gpa, 8)
        assert data == b"\\xaa" * 8, "private page lost its contents"   # -> UCALL_ABORT
        yield g.sync(1)                                            # -> KVM_EXIT_IO, UCALL_SYNC
        yield g.done()

A guest exception (a failed ``assert`` included) reaches the host as ``UCALL_ABORT`` with its
message, as a selftest's ``GUEST_ASSERT`` does. ``rdmsr``/``wrmsr`` raise :class:`GuestException`
inside the guest on #GP; ``rdmsr_safe``/``wrmsr_safe`` return the vector instead, like the
selftests' helpers.

An SEV-ES guest (its VMSA encrypted by LAUNCH_UPDATE_VMSA) talks to the host only through the
GHCB: ``wrmsr(MSR_AMD64_SEV_ES_GHCB, ...)`` and ``vmgexit()`` (``sevcore.kvm.ghcb.ghcb_program``
gives a program a #VC handler that goes through the GHCB page). Every operation that would need an
intercept (a hypercall, an intercepted MSR, a ucall's port I/O, MMIO) raises
:class:`VmmCommunicationException` (#VC) in it instead; an exception the program does not catch,
or the program's end, is a triple fault: ``KVM_EXIT_SHUTDOWN``. An SEV-SNP guest's private access
to a page it has not validated (PVALIDATE) raises :class:`PageNotValidated` (#VC) in it.

Bulk operations (``fill``, ``write_pattern``, ``check_pattern``, ``stamp``, ``digest``, and the
gather/scatter ``read_pages``/``write_pages``) touch many pages in one operation, executed in C
through the NPT.
"""
from typing import NamedTuple

import numpy as np

from sevcore.core.arrays import u64
from sevcore.hw.hostmem import PAGE_SIZE
from sevcore.uapi import GP_VECTOR, SVM_EXIT_PAGE_NOT_VALIDATED, X86_TRAP_VC

UCALL_SYNC = "sync"
UCALL_DONE = "done"
UCALL_ABORT = "abort"
#: The port the selftests' ucalls use (UCALL_PIO_PORT).
UCALL_PIO_PORT = 0x1000


class GuestException(Exception):
    """An exception delivered to the guest (``vector`` is the x86 vector, 13 for #GP)."""

    def __init__(self, vector, what):
        super().__init__(f"vector {vector} on {what}")
        self.vector = vector


class VmmCommunicationException(GuestException):
    """#VC: an SEV-ES guest executed an instruction the hypervisor would have to intercept;
    ``exit_code`` is the SVM exit code a #VC handler would put in the GHCB."""

    def __init__(self, exit_code, what):
        super().__init__(X86_TRAP_VC, what)
        self.exit_code = exit_code


class PageNotValidated(VmmCommunicationException):
    """#VC with error code PAGE_NOT_VALIDATED: an SEV-SNP guest's private access reached a page
    whose RMP entry is its own but not validated (AMD64 APM vol. 2 15.36.10). ``gpa`` is the
    faulting address (the hardware saves it in CR2), ``write`` whether the access wrote. Linux's
    #VC handler has no case for it (``vc_handle_exitcode`` answers ES_UNSUPPORTED) and
    terminates the guest."""

    def __init__(self, gpa, write):
        super().__init__(SVM_EXIT_PAGE_NOT_VALIDATED,
                         f"{'write' if write else 'read'} of gpa {gpa:#x}: page not validated")
        self.gpa, self.write = gpa, write


class Op(NamedTuple):
    """One guest operation: ``kind`` and its arguments."""
    kind: str
    args: tuple


class Guest:
    """The ``g`` a guest program receives: builds the operations it yields."""

    __slots__ = ("vcpu",)

    def __init__(self, vcpu):
        self.vcpu = vcpu

    @property
    def vcpu_id(self):
        return self.vcpu.vcpu_id

    # -- memory -------------------------------------------------------------------------------------

    def read(self, gpa, size):
        """Read ``size`` bytes at ``gpa`` (with the C-bit / shared bit as the VM type wants)."""
        return Op("read", (u64(gpa, "gpa", ndim=0), _size(size)))

    def write(self, gpa, data):
        """Write ``data`` at ``gpa``."""
        return Op("write", (u64(gpa, "gpa", ndim=0), bytes(data)))

    def cmpxchg(self, gpa, expected, new):
        """``LOCK CMPXCHG`` on the 8-byte little-endian word at 8-byte-aligned ``gpa``: store
        ``new`` if the word holds ``expected``. Returns the value the word held (``expected``
        when the store happened); atomic with respect to every vCPU's locked instruction and
        other accesses of the word, as a locked read-modify-write of one cache line is."""
        gpa = u64(gpa, "gpa", ndim=0)
        if gpa & 7:
            raise ValueError(f"cmpxchg of gpa {gpa:#x}: not 8-byte aligned")
        return Op("cmpxchg", (gpa, u64(expected, "expected", ndim=0), u64(new, "new", ndim=0)))

    def fill(self, gpa, npages, pattern):
        """Bulk: every 8-byte word of ``npages`` pages from page-aligned ``gpa`` = ``pattern``."""
        return Op("bulk", ("fill", _page_gpa(gpa), _size(npages),
                           u64(pattern, "pattern", ndim=0)))

    def write_pattern(self, gpa, npages, seed):
        """Bulk: write each page's deterministic per-gfn pattern for ``seed``."""
        return Op("bulk", ("pattern", _page_gpa(gpa), _size(npages), u64(seed, "seed", ndim=0)))

    def check_pattern(self, gpa, npages, seed):
        """Bulk: compare the pages with their ``seed`` pattern; returns the mismatching page
        count and the index of the first (None if all match)."""
        return Op("bulk", ("check", _page_gpa(gpa), _size(npages), u64(seed, "seed", ndim=0)))

    def stamp(self, gpa, npages, value):
        """Bulk: write ``value`` in the first 8 bytes of each page (dirties without rewriting)."""
        return Op("bulk", ("stamp", _page_gpa(gpa), _size(npages), u64(value, "value", ndim=0)))

    def stamp_pages(self, gpas, value):
        """Bulk: :meth:`stamp` on a list of page-aligned GPAs (e.g. a random dirty set)."""
        return Op("bulk_list", ("stamp", _page_gpas(gpas), u64(value, "value", ndim=0), None))

    def read_pages(self, gpas, out=None):
        """Bulk gather: the pages at the page-aligned ``gpas`` (with the C-bit / shared bit as
        :meth:`read` takes it, the same for all), as a ``(len(gpas), 4096)`` uint8 numpy array,
        or into ``out`` (a writable buffer of ``len(gpas) * 4096`` bytes), which is returned."""
        gpas = _page_gpas(gpas)
        if out is not None:
            _page_buffer(out, len(gpas), "read_pages", writable=True)
        return Op("bulk_list", ("read", gpas, 0, out))

    def write_pages(self, gpas, data):
        """Bulk scatter: page ``i`` of ``data`` (``len(gpas) * 4096`` bytes, any buffer; read when
        the operation runs, not copied) to the page-aligned ``gpas[i]``."""
        gpas = _page_gpas(gpas)
        return Op("bulk_list", ("write", gpas, 0, _page_buffer(data, len(gpas), "write_pages")))

    def write_pattern_pages(self, gpas, seed):
        """Bulk: :meth:`write_pattern` on a list of page-aligned GPAs."""
        return Op("bulk_list", ("pattern", _page_gpas(gpas), u64(seed, "seed", ndim=0), None))

    def check_pattern_pages(self, gpas, seed):
        """Bulk: :meth:`check_pattern` on a list of page-aligned GPAs; returns the mismatch count
        and the list index of the first mismatch (None if all match)."""
        return Op("bulk_list", ("check", _page_gpas(gpas), u64(seed, "seed", ndim=0), None))

    def digest(self, gpa, npages):
        """Bulk: a 64-bit hash of each page's contents (a numpy uint64 array)."""
        return Op("bulk", ("digest", _page_gpa(gpa), _size(npages), 0))

    # -- instructions ------------------------------------------------------------------------------

    def hypercall(self, nr, a0=0, a1=0, a2=0, a3=0):
        """VMMCALL with ``nr`` in RAX and a0-a3 in RBX, RCX, RDX, RSI; returns RAX."""
        return Op("hypercall", tuple(u64(v, "hypercall argument", ndim=0)
                                     for v in (nr, a0, a1, a2, a3)))

    def cpuid(self, function, index=0):
        """CPUID with EAX = ``function``, ECX = ``index``; returns ``(eax, ebx, ecx, edx)``."""
        return Op("cpuid", (_u32(function, "CPUID function"), _u32(index, "CPUID index")))

    def rdmsr(self, index):
        """RDMSR; a #GP raises :class:`GuestException` in the guest."""
        return Op("rdmsr", (_u32(index), False))

    def wrmsr(self, index, value):
        """WRMSR; a #GP raises :class:`GuestException` in the guest."""
        return Op("wrmsr", (_u32(index), u64(value, "value", ndim=0), False))

    def rdmsr_safe(self, index):
        """RDMSR returning ``(vector, value)``: vector 0, or GP_VECTOR on #GP."""
        return Op("rdmsr", (_u32(index), True))

    def wrmsr_safe(self, index, value):
        """WRMSR returning the vector: 0, or GP_VECTOR on #GP."""
        return Op("wrmsr", (_u32(index), u64(value, "value", ndim=0), True))

    def vmgexit(self):
        """VMGEXIT (``rep; vmmcall``): hand the GHCB MSR's request (or the GHCB page) to the
        hypervisor. Outside an SEV-ES guest it is a VMMCALL with RAX 0."""
        return Op("vmgexit", ())

    # -- SEV-SNP --------------------------------------------------------------------------------

    def pvalidate(self, gpa, npages, validate=True):
        """PVALIDATE of ``npages`` 4 KiB pages from ``gpa`` (validate or rescind); returns 0,
        or the first failing page's status (PVALIDATE_FAIL_*; PVALIDATE_FAIL_NOUPDATE when
        rFLAGS.CF reports that nothing changed) and stops there."""
        return Op("pvalidate", (_page_gpa(gpa), _size(npages), bool(validate)))

    def rmpadjust(self, gpa, target_vmpl=1, perms=0, vmsa=False):
        """RMPADJUST (at VMPL0) of the 4 KiB page at ``gpa``: ``target_vmpl``'s permission
        mask to ``perms`` and the page's VMSA bit to ``vmsa`` (Linux's snp_set_vmsa names
        VMPL1: the target must be less privileged than the caller, and only VMPL0 may change
        the bit); returns the status (0, or PVALIDATE_FAIL_INPUT)."""
        return Op("rmpadjust", (u64(gpa, "gpa", ndim=0), _size(target_vmpl), _size(perms),
                                bool(vmsa)))

    def page_state_change(self, gpa, npages, private):
        """Make ``npages`` pages from ``gpa`` private or shared as a Linux SNP guest does:
        rescind, ask the hypervisor (GHCB MSR protocol page-state change), validate. Returns
        ``npages``; a refusal raises ``PageStateChangeFailed`` in the guest."""
        return Op("page_state_change", (_page_gpa(gpa), _size(npages), bool(private)))

    def snp_get_report(self, user_data, vmpl=0):
        """The guest side of /dev/sev-guest's SNP_GET_REPORT: a MSG_REPORT_REQ with
        ``user_data`` (64 bytes) for ``vmpl``, encrypted with VMPCK0, sent with the SNP guest
        request VMGEXIT, the response decrypted; returns the 1184-byte report."""
        user_data = bytes(user_data)
        if len(user_data) != 64:
            raise ValueError("user_data is 64 bytes")
        return Op("snp_guest_request", ("report", user_data, _size(vmpl)))

    def snp_guest_message(self, msg_type, payload):
        """A guest message of type ``msg_type`` (MSG_*_REQ) with ``payload``, sent as
        snp_send_guest_request sends it (VMPCK0, the next sequence number); returns the
        response's decrypted payload, whose STATUS is the caller's to read."""
        return Op("snp_guest_request", ("message", bytes(payload), _size(msg_type)))

    def xsave(self, gpa, rfbm):
        """XSAVE to the 64-byte aligned ``gpa`` with EDX:EAX = ``rfbm`` (masked by XCR0)."""
        return Op("xsave", (u64(gpa, "gpa", ndim=0), u64(rfbm, "rfbm", ndim=0)))

    def shutdown(self):
        """Load an empty IDT and execute UD2: the #UD cannot be delivered and the CPU shuts
        down (a triple fault)."""
        return Op("shutdown", ())

    # -- ucalls -------------------------------------------------------------------------------------

    def sync(self, *values):
        """GUEST_SYNC: exit to the host with ``values`` (KVM_EXIT_IO, UCALL_SYNC)."""
        return Op("ucall", (UCALL_SYNC, values))

    def done(self):
        """GUEST_DONE."""
        return Op("ucall", (UCALL_DONE, ()))

    def abort(self, message):
        """GUEST_FAIL: report ``message`` to the host as UCALL_ABORT."""
        return Op("ucall", (UCALL_ABORT, (str(message),)))


def _u32(v, what="MSR index"):
    if not isinstance(v, int) or not 0 <= v < 1 << 32:
        raise ValueError(f"{what} must be a u32, got {v!r}")
    return v


def _size(n):
    if not isinstance(n, int) or n < 0:
        raise ValueError(f"size must be a non-negative int, got {n!r}")
    return n


def _page_buffer(buf, npages, what, writable=False):
    """``buf`` as a flat byte view, checked to hold exactly ``npages`` pages."""
    view = memoryview(buf).cast("B")
    if view.nbytes != npages * PAGE_SIZE:
        raise ValueError(f"{what} of {npages} pages needs {npages * PAGE_SIZE} bytes, got "
                         f"{view.nbytes}")
    if writable and view.readonly:
        raise ValueError(f"{what} needs a writable buffer")
    return view


def _page_gpa(gpa):
    gpa = u64(gpa, "gpa", ndim=0)
    if gpa & 0xfff:
        raise ValueError(f"bulk operations take a page-aligned gpa, got {gpa:#x}")
    return gpa


def _page_gpas(gpas):
    """A list of gpas as a uint64 array, every one page aligned."""
    gpas = u64(gpas, "gpas", ndim=1)
    bad = np.flatnonzero(gpas & np.uint64(0xfff))
    if len(bad):
        raise ValueError(f"bulk operations take page-aligned gpas, got {int(gpas[bad[0]]):#x} "
                         f"at index {int(bad[0])}")
    return gpas


__all__ = ["Guest", "GuestException", "VmmCommunicationException", "PageNotValidated", "Op",
           "UCALL_SYNC", "UCALL_DONE", "UCALL_ABORT", "GP_VECTOR"]
