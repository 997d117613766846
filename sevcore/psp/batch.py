"""Whole-page batches of SEND_UPDATE_DATA and RECEIVE_UPDATE_DATA: a sevcore extension.

The firmware has no batched migration command: each page is one mailbox command (or one
ring-buffer entry). What a batch of them does is nevertheless fixed by the single command, so
the model runs a batch in one pass when it can prove the result identical: the guest-level
checks once, then one gather of the guest pages through the memory controller, one call to the
packet cipher (``sevcore.core.sevpkt``) and one scatter.

``psp.send_update_data_pages(handle, guest_addresses)`` is exactly ``n`` SEND_UPDATE_DATA
commands, page ``i`` from ``guest_addresses[i]`` with ``guest_len = trans_len = 4096`` and
``hdr_len = 52``, their headers and packets delivered by value; IVs come from the DRBG in page
order, so the bytes equal those of the single commands. ``psp.receive_update_data_pages(handle,
guest_addresses, hdrs, trans)`` is ``n`` RECEIVE_UPDATE_DATA commands. A failure at page ``i``
raises PspError with ``index = i`` after pages ``0..i-1`` took effect, as ``i`` commands would
have, and nothing of page ``i`` or later.

The work steps (``_seal_pages``, ``_open_pages``, ``_write_pages``) are shared by the typed
entries here, the ring-buffer batch path (ring.py) and, through a :class:`PageSession`
(``psp.page_session``), KVM's batched ioctls (``sevcore.kvm.sev_pages``), which make the kernel's
checks and pin pages between the firmware's steps; the single RECEIVE_UPDATE_DATA/VMSA command
judges its one packet with ``_open_pages`` too, so the order of its checks is written once.
"""
import threading

import numpy as np

from sevcore.core import sevpkt
from sevcore import uapi as U
from sevcore.core.arrays import byte_rows, u64
from sevcore.psp import crypto as X
from sevcore.psp.status import PspError

PAGE = 4096
_SEND, _RECEIVE = U.SEV_CMD_SEND_UPDATE_DATA, U.SEV_CMD_RECEIVE_UPDATE_DATA
_tls = threading.local()


def _scratch(nbytes):
    """The firmware's working buffer for a batch's plaintext: ``nbytes`` of a per-thread uint8
    array that the thread's next batch reuses (its caller is done with it by then), so a
    migration's batches allocate, and first touch, one buffer rather than one per batch."""
    buf = getattr(_tls, "buf", None)
    if buf is None or buf.size < nbytes:
        buf = _tls.buf = np.empty(nbytes, np.uint8)
    return buf[:nbytes]


def first(mask):
    """Index of the first True of a boolean array, or its length."""
    hit = np.flatnonzero(mask)
    return int(hit[0]) if len(hit) else len(mask)


class PageSession:
    """A run of whole-page SEND_UPDATE_DATA or RECEIVE_UPDATE_DATA commands of one guest, taken
    step by step by a caller that works between the firmware's steps (KVM pins each page
    between the checks and the copy). ``status`` is what the first command answers before it
    touches memory (every later one would answer alike); the steps run only when it is
    SUCCESS."""

    def __init__(self, psp, send, handle, hdr_len, trans_len):
        self.psp, self.send = psp, send
        self.status, self._guest = psp._pages_gate(send, handle, hdr_len, trans_len)

    def refuse(self):
        """The side effect of the first command's refusal (a mailbox write in ring-buffer mode
        ends ring-buffer mode)."""
        self.psp._pages_refused(self.status)

    def seal(self, spas, hdrs, trans):
        """SEND_UPDATE_DATA's work for the whole pages at ``spas`` into ``hdrs``/``trans``
        (``packet_rows``)."""
        return self.psp._seal_pages(self._guest, spas, hdrs, trans)

    def open(self, hdrs, trans):
        """RECEIVE_UPDATE_DATA's judgement of the packets: ``(count, status, plaintext)`` for
        the leading packets that pass (see ``UpdatePages._open_pages``)."""
        return self.psp._open_pages(self._guest, hdrs, trans)

    def write(self, spas, plain):
        """RECEIVE_UPDATE_DATA's last step: the plaintext into the pages at ``spas``."""
        self.psp._write_pages(self._guest, spas, plain)


class UpdatePages:
    """Mixin of Psp: batched whole-page SEND/RECEIVE_UPDATE_DATA."""

    def page_session(self, send, handle, hdr_len, trans_len):
        """A :class:`PageSession` of SEND (``send``) or RECEIVE_UPDATE_DATA commands of the
        guest ``handle`` with these header and packet lengths."""
        return PageSession(self, send, handle, hdr_len, trans_len)

    # -- the steps ------------------------------------------------------------------------------

    def _pages_gate(self, send, handle, hdr_len, trans_len):
        """(status, guest): what the first of the batch's commands answers before it touches
        memory (every later one would answer the same). Pure: a mailbox write in ring-buffer
        mode reports EXIT_RING_BUFFER here, and ``_pages_refused`` applies it."""
        if self.rb_enabled:
            return U.SEV_RET_EXIT_RING_BUFFER, None
        if send:
            return self._send_update_gate(handle, hdr_len, PAGE, trans_len, False)
        return self._receive_update_gate(handle, hdr_len, PAGE, trans_len, False)

    def _pages_refused(self, status):
        """The side effect of a refused first command: a mailbox write ends ring-buffer mode."""
        if status == U.SEV_RET_EXIT_RING_BUFFER:
            self._rb_disable()

    def _seal_pages(self, g, spas, hdrs, trans):
        """SEND_UPDATE_DATA's work for whole pages at ``spas`` (page-aligned SPAs): read them
        with the guest's key, seal each under 16 fresh DRBG bytes drawn in page order, into
        ``hdrs`` and ``trans``, writable rows of 52 and 4096 bytes per page (``packet_rows``;
        ``trans`` holds the plaintext before it is encrypted in place)."""
        n = len(spas)
        if isinstance(trans, np.ndarray) and not trans.flags.c_contiguous:
            # Strided rows (a stream record's): gather here, then seal into the rows.
            plain = self.host.umc.read_pages(spas, g.asid, out=_scratch(n * PAGE))
        else:
            plain = self.host.umc.read_pages(spas, g.asid, out=trans)
        return sevpkt.seal(g.tek, g.tik, plain, self._rng(16 * n), out=(hdrs, trans))

    def _open_pages(self, g, hdrs, trans):
        """RECEIVE_UPDATE_DATA's judgement of packets in order (COMPRESSED, then the MAC, as
        ``sev_mcmd_receive_update``): ``(count, status, plaintext)`` for the leading packets that
        pass, the status of the first that does not (SUCCESS if all pass) and their plaintext.
        ``hdrs`` and ``trans`` are ``(n, 52)`` and ``(n, trans_len)`` uint8 arrays, rows strided
        or not (a stream record's columns are read in place). The plaintext is ``_scratch``:
        valid until the thread's next batch."""
        n = len(hdrs)
        ok = first(hdrs[:, 0] & X.COMPRESSED) if n else 0
        status = U.SEV_RET_UNSUPPORTED if ok < n else U.SEV_RET_SUCCESS
        while ok:
            try:
                plain = _scratch(ok * trans.shape[1])
                return ok, status, sevpkt.open(g.tek, g.tik, hdrs[:ok], trans[:ok], out=plain)
            except sevpkt.PacketAuthError as bad:
                ok, status = bad.index, U.SEV_RET_BAD_MEASUREMENT
        return 0, status, None

    def _write_pages(self, g, spas, plain):
        """RECEIVE_UPDATE_DATA's last step for whole pages: the plaintext through the guest's
        key (``plain`` is consumed; a page given twice keeps its later data)."""
        self.host.umc.write_pages(spas, plain, g.asid, in_place=True)

    def _page_spas(self, guest_addresses):
        """The SPAs of page-aligned guest addresses (the C-bit stripped) and the index of the
        first outside host memory (INVALID_ADDRESS), or n."""
        addrs = u64(guest_addresses, "guest_addresses", ndim=1)
        spas = addrs & ~np.uint64(1 << self.host.c_bit)
        if np.any(spas & np.uint64(PAGE - 1)):
            raise ValueError("guest addresses must be page aligned: the batch moves whole pages")
        return spas, first(spas > np.uint64(self.host.mem.size - PAGE))

    # -- the typed entries -----------------------------------------------------------------------

    def send_update_data_pages(self, handle, guest_addresses, out=None):
        """SEND_UPDATE_DATA of each whole page at ``guest_addresses`` (page aligned, C-bit
        allowed), as that many commands in order -> ``(hdrs, trans)``, ``(n, 52)`` and
        ``(n, 4096)`` uint8 arrays, or the writable ``out`` pair filled. Raises PspError with
        ``index`` (pages before it were sent, their packets in ``hdrs``/``trans`` of the error)."""
        spas, bad = self._page_spas(guest_addresses)
        n = len(spas)
        hdrs, trans, h, t = packet_rows(out, n)
        if not n:
            return hdrs, trans
        status, g = self._pages_gate(True, handle, X.HEADER_SIZE, PAGE)
        if status:
            self._pages_refused(status)
            raise PspError(_SEND, status, index=0)
        if bad:
            self._seal_pages(g, spas[:bad], h[:bad], t[:bad])
        if bad < n:
            err = PspError(_SEND, U.SEV_RET_INVALID_ADDRESS, index=bad)
            err.hdrs, err.trans = h[:bad], t[:bad]
            raise err
        return hdrs, trans

    def receive_update_data_pages(self, handle, guest_addresses, hdrs, trans):
        """RECEIVE_UPDATE_DATA of packet ``i`` (header row ``i`` of ``hdrs``, ``hdr_len`` = its
        length; ciphertext row ``i`` of ``trans``) into the whole page at ``guest_addresses[i]``,
        as that many commands in order. Raises PspError with ``index``: pages before it were
        written, it and later ones were not."""
        spas, bad = self._page_spas(guest_addresses)
        n = len(spas)
        h, t = byte_rows(hdrs, n, "hdrs"), byte_rows(trans, n, "trans")
        if not n:
            return
        status, g = self._pages_gate(False, handle, h.shape[1], t.shape[1])
        if status:
            self._pages_refused(status)
            raise PspError(_RECEIVE, status, index=0)
        done, status, plain = self._open_pages(g, h[:bad, :X.HEADER_SIZE], t[:bad])
        if done:
            self._write_pages(g, spas[:done], plain)
        if done < bad:
            raise PspError(_RECEIVE, status, index=done)
        if bad < n:
            raise PspError(_RECEIVE, U.SEV_RET_INVALID_ADDRESS, index=bad)


def packet_rows(out, n):
    """``(hdrs, trans, h, t)`` for a batched SEND of ``n`` pages: the buffers it returns, the
    ``out`` pair (either may be None) or new ``(n, 52)`` and ``(n, 4096)`` uint8 arrays, and
    their writable rows (``out_rows``)."""
    hdrs, trans = (None, None) if out is None else out
    if hdrs is None:
        hdrs = np.empty((n, X.HEADER_SIZE), np.uint8)
    if trans is None:
        trans = np.empty((n, PAGE), np.uint8)
    return hdrs, trans, out_rows(hdrs, n, X.HEADER_SIZE), out_rows(trans, n, PAGE)


def out_rows(buf, n, size):
    """A writable ``(n, size)`` uint8 view of an output buffer: ``n * size`` contiguous bytes, or
    an ``(n, size)`` uint8 array whose rows are contiguous and at least ``size`` bytes apart
    (the columns of a migration stream record, say)."""
    arr = buf if isinstance(buf, np.ndarray) else np.frombuffer(memoryview(buf).cast("B"),
                                                                 np.uint8)
    if (arr.dtype == np.uint8 and arr.ndim == 2 and arr.shape == (n, size)
            and arr.strides[1] == 1 and arr.strides[0] >= size):
        rows = arr
    elif arr.dtype == np.uint8 and arr.size == n * size and arr.flags.c_contiguous:
        rows = arr.reshape(n, size)
    else:
        raise ValueError(f"an output buffer for {n} pages must be {n * size} contiguous bytes "
                         f"or {n} rows of {size}")
    if not rows.flags.writeable:
        raise ValueError("output buffers must be writable")
    return rows
