"""Whole-page batches of KVM_SEV_SEND_UPDATE_DATA and KVM_SEV_RECEIVE_UPDATE_DATA: a sevcore
extension (``vm.sev_send_update_data_pages``, ``vm.sev_receive_update_data_pages``).

n whole-page ioctls run as one, with exactly the checks, errnos, firmware statuses and bytes of
those ioctls in order (docs/fidelity.md): KVM's checks (``sev_send_update_data``,
``sev_receive_update_data`` in arch/x86/kvm/svm/sev.c) vectorised over the pages, the pages
pinned in one batch, and the firmware's work through a PSP page session
(``sevcore.psp.batch.PageSession``).
"""
from errno import ENOMEM

import numpy as np

from sevcore import uapi as U
from sevcore.core.arrays import byte_rows, u64
from sevcore.errors import KvmError
from sevcore.hw.hostmem import PAGE_SHIFT, PAGE_SIZE
from sevcore.kvm.sev import (IOCTL, ULONG_MAX, SevCmd, SevError, _blob_size, _Cmd,
                             _command_allowed, _lock_limit, _pin_range, _sev_fd_error,
                             _update_data_checks, _update_data_params)
from sevcore.psp.batch import first, packet_rows
from sevcore.psp.crypto import HEADER_SIZE as L_HDR


class _PageBatch:
    """n whole-page SEND or RECEIVE_UPDATE_DATA ioctls run as one: the checks every one of them
    makes alike are made once, the per-page ones are vectorised, and a refusal is raised as the
    ioctl of page ``index`` would raise it (``err.index``). The user buffers of the ioctls are
    the batch's arrays, so their addresses are reported as 0 and can never fault."""

    def __init__(self, vm, send, uaddrs, hdr_len, trans_len):
        self.vm, self.send, self.uaddrs = vm, send, uaddrs
        self.id = U.KVM_SEV_SEND_UPDATE_DATA if send else U.KVM_SEV_RECEIVE_UPDATE_DATA
        self.hdr_len, self.trans_len = hdr_len, trans_len
        self.psp = vm.host.psp

    def start(self):
        """Everything before the pages are pinned: ``(k, session)``, ``k`` the first page the
        handler refuses before pinning (or n); a refusal of the whole batch is raised here."""
        try:
            self.begin()
        except KvmError as exc:
            raise self.at(0, exc) from None
        k = self.user_checks()
        if k == 0:
            raise self.at(0, self.user_error(0))
        session = self.psp.page_session(self.send, self.vm.sev.handle, self.hdr_len,
                                        self.trans_len)
        fd_error = _sev_fd_error(self.vm.host, self.vm.sev.fd)
        if session.status or fd_error is not None:
            self.refuse_first(session, fd_error)
        return k, session

    def begin(self):
        """sev_mem_enc_ioctl up to the handler, and the handler's first checks."""
        vm = self.vm
        vm._enter(IOCTL)
        _command_allowed(vm, self.id)
        c = _Cmd(vm, SevCmd(self.id, {}), vm.host.kvm_sev.sev_fd())
        try:
            _update_data_params(c, {}, self.send)
        finally:
            c.buf.free()

    def at(self, index, exc):
        exc.index = index
        if isinstance(exc, SevError):
            exc.out = SevCmd(self.id, dict(hdr_uaddr=0, hdr_len=self.hdr_len,
                                           guest_uaddr=int(self.uaddrs[index]),
                                           guest_len=PAGE_SIZE, trans_uaddr=0,
                                           trans_len=self.trans_len), exc.fw_error)
        return exc

    def user_checks(self):
        """The index of the first page refused before anything is pinned (an address or a
        length of 0, a range crossing a page, a blob above SEV_FW_BLOB_MAX_SIZE, a range that
        wraps, which sev_pin_memory checks first), or n."""
        u = self.uaddrs
        bad = (u == 0) | (u & np.uint64(PAGE_SIZE - 1) != 0)
        bad |= u > np.uint64(ULONG_MAX - PAGE_SIZE)
        if not self.send and (not self.hdr_len or not self.trans_len
                              or max(self.hdr_len, self.trans_len) > U.SEV_FW_BLOB_MAX_SIZE):
            bad[:] = True
        return first(bad)

    def user_error(self, i):
        """The KvmError page ``i``'s ioctl raises before pinning, in the kernel's order: the
        handler's checks (the batch's arrays are its header and packet buffers), RECEIVE's blob
        sizes as it copies them in (an array cannot fault), sev_pin_memory's range check."""
        uaddr = int(self.uaddrs[i])
        try:
            _update_data_checks(self.send, uaddr, PAGE_SIZE, self.hdr_len, self.trans_len)
            if not self.send:
                _blob_size(self.hdr_len)
                _blob_size(self.trans_len)
            _pin_range(uaddr, PAGE_SIZE, IOCTL)
        except KvmError as exc:
            return exc
        raise AssertionError("page passes the handler's checks")

    def pin(self, count):
        """sev_pin_memory of one page at each of the first ``count`` addresses, each undone
        before the next (pages_locked ends as it was): (their pfns, or fewer, and the error of
        the first that did not pin)."""
        try:
            _lock_limit(self.vm, 1, IOCTL)
        except KvmError as exc:
            return np.empty(0, np.uint64), exc
        pfns, exc = self.vm.kvm.hva_to_pfns(self.uaddrs[:count], write=not self.send)
        if exc is not None:
            exc = KvmError(ENOMEM, IOCTL, "could not pin every page")
        return pfns, exc

    def refuse_first(self, session, fd_error):
        """The first ioctl fails after pinning its page: /dev/sev gone (``fd_error``), or the
        firmware refuses the command (``status``; every later one would refuse alike)."""
        _, exc = self.pin(1)
        if exc is None:
            exc = fd_error
        if exc is None:
            session.refuse()
            exc = SevError(session.status)
        raise self.at(0, exc)


def send_update_data_pages(vm, guest_uaddrs, out=None):
    """n KVM_SEV_SEND_UPDATE_DATA ioctls of whole pages (see Vm.sev_send_update_data_pages)."""
    uaddrs = u64(guest_uaddrs, "guest_uaddrs", ndim=1)
    n = len(uaddrs)
    hdrs, trans, h, t = packet_rows(out, n)
    if not n:
        return hdrs, trans
    b = _PageBatch(vm, True, uaddrs, L_HDR, PAGE_SIZE)
    k, session = b.start()
    pfns, exc = b.pin(k)
    m = len(pfns)
    if m:
        session.seal(pfns << np.uint64(PAGE_SHIFT), h[:m], t[:m])
    if m < n:
        exc = b.at(m, exc if exc is not None else b.user_error(m))
        exc.hdrs, exc.trans = h[:m], t[:m]
        raise exc
    return hdrs, trans


def receive_update_data_pages(vm, guest_uaddrs, hdrs, trans):
    """n KVM_SEV_RECEIVE_UPDATE_DATA ioctls of whole pages (see
    Vm.sev_receive_update_data_pages)."""
    uaddrs = u64(guest_uaddrs, "guest_uaddrs", ndim=1)
    n = len(uaddrs)
    h, t = byte_rows(hdrs, n, "hdrs"), byte_rows(trans, n, "trans")
    if not n:
        return
    b = _PageBatch(vm, False, uaddrs, h.shape[1], t.shape[1])
    k, session = b.start()
    # The firmware's verdict on each packet does not depend on where it goes, so it is known
    # before pinning; page p (the first refused) is still pinned, as its ioctl pins it.
    p, fw_status, plain = session.open(h[:k, :L_HDR], t[:k])
    pfns, exc = b.pin(min(k, p + 1))
    done = min(len(pfns), p)
    if done:
        session.write(pfns[:done] << np.uint64(PAGE_SHIFT), memoryview(plain)[:done * PAGE_SIZE])
    if exc is not None:
        raise b.at(len(pfns), exc)
    if p < k:
        raise b.at(p, SevError(fw_status))
    if k < n:
        raise b.at(k, b.user_error(k))
