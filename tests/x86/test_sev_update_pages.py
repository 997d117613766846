"""The batched whole-page KVM_SEV_SEND_UPDATE_DATA / RECEIVE_UPDATE_DATA extension
(vm.sev_send_update_data_pages, vm.sev_receive_update_data_pages) against the oracle that
defines it: the same ioctls one page at a time, on a host built from the same seed. Every
result, refusal (errno, firmware status, message, index), page written, frame allocated and DRBG
draw must be the same."""
from errno import EBADF, EINVAL, EIO, ENOMEM, ENOTTY, EPERM
from types import SimpleNamespace

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

import sevcore
from sevcore.errors import KvmError
from sevcore.vmm.kvm_util import sev_receive_start, sev_send_start, vm_mem_add, vm_sev_launch
from sevcore.psp import RingBuffer
from sevcore.kvm.sev import SevError
from sevcore.kvm.sev_pages import _PageBatch
from sevcore.uapi import *

P = 4096
NPAGES = 24
HOLE = 0x10000          # never mapped: pinning it fails (ENOMEM)


class Pair:
    """A RUNNING source VM in SEND_UPDATE (after SEND_START) on one host and a target VM in
    RECEIVE_UPDATE (after RECEIVE_START) on another; user buffers for the one-page ioctls are
    mapped and touched up front, so that both ways of migrating allocate the same frames."""

    def __init__(self, seed=3, npages=NPAGES):
        self.src = sevcore.Host(seed=seed).kvm
        self.dst = sevcore.Host(seed=seed + 1).kvm
        self.vm = self.src.create_vm(KVM_X86_SEV_VM)
        self.vm.memory_encrypt_op(KVM_SEV_INIT2)
        self.hva = vm_mem_add(self.vm, 0, 0, npages)
        self.data = np.random.default_rng(seed).bytes(npages * P)
        self.src.write(self.hva, self.data)
        vm_sev_launch(self.vm, 0)
        self.uaddrs = self.hva + P * np.arange(npages, dtype=np.uint64)
        for kvm in (self.src, self.dst):
            kvm.hbuf, kvm.tbuf = kvm.mmap(5 * P), kvm.mmap(5 * P)
            kvm.write(kvm.hbuf, bytes(5 * P))
            kvm.write(kvm.tbuf, bytes(5 * P))
        self.tvm = self.dst.create_vm(KVM_X86_SEV_VM)
        self.tvm.memory_encrypt_op(KVM_SEV_INIT2)            # the target platform's INIT
        session = sev_send_start(self.vm, self.dst.host.psp.export_cert_chain())
        self.thva = vm_mem_add(self.tvm, 0, 0, npages)
        self.tuaddrs = self.thva + P * np.arange(npages, dtype=np.uint64)
        sev_receive_start(self.tvm, 0, self.src.host.psp.pdh_cert_export().pdh_cert, session)

    def received(self, npages=NPAGES):
        """Per target page: None while its frame holds only zeroes as the host sees it (nothing
        was written), else the plaintext the target guest reads through its key."""
        out = []
        for i in range(npages):
            hva = self.thva + P * i
            pfn = self.dst.hva_to_pfn(hva, False, allocate=False)
            if pfn is None or self.dst.read(hva, P) == bytes(P):
                out.append(None)
            else:
                out.append(self.dst.host.umc.read(pfn << 12, P, self.tvm.sev.asid))
        return out

    def pages(self, lo=0, hi=NPAGES):
        return [self.data[P * i:P * (i + 1)] for i in range(lo, hi)]


def snapshot(kvm, vm, hva, npages=NPAGES, draw=True):
    """What must match after either way: frames of the guest's memory as the host sees them,
    pinned-page count, allocated frames, the firmware guest's state, and (``draw``) the next
    DRBG bytes."""
    psp = kvm.host.psp
    g = psp.guest(vm.sev.handle) if vm.sev.handle else None
    return (kvm.read(hva, npages * P), vm.sev.pages_locked, kvm.host.mem.allocated,
            kvm.host.mem._next, None if g is None else (g.state, g.asid, g.tek, g.tik),
            psp.rb_enabled, psp._rng(16) if draw else None)


def described(exc):
    """Everything a caller sees of a refusal (the uaddrs of the user buffers aside)."""
    if exc is None:
        return None
    out = getattr(exc, "out", None)
    fields = None if out is None else {k: v for k, v in vars(out).items()
                                       if k not in ("hdr_uaddr", "trans_uaddr")}
    return (type(exc), exc.errno, str(exc), exc.index, getattr(exc, "fw_error", None), fields)


def ioctl_send(vm, kvm, uaddrs):
    """The oracle: one KVM_SEV_SEND_UPDATE_DATA per page until one fails."""
    hdrs, trans = [], []
    for i, u in enumerate(uaddrs):
        try:
            vm.memory_encrypt_op(KVM_SEV_SEND_UPDATE_DATA, hdr_uaddr=kvm.hbuf, hdr_len=52,
                                 guest_uaddr=int(u), guest_len=P, trans_uaddr=kvm.tbuf,
                                 trans_len=P)
        except OSError as exc:
            exc.index = i
            return b"".join(hdrs), b"".join(trans), exc
        hdrs.append(kvm.read(kvm.hbuf, 52))
        trans.append(kvm.read(kvm.tbuf, P))
    return b"".join(hdrs), b"".join(trans), None


def batch_send(vm, kvm, uaddrs):
    try:
        hdrs, trans = vm.sev_send_update_data_pages(uaddrs)
    except OSError as exc:
        return bytes(getattr(exc, "hdrs", b"")), bytes(getattr(exc, "trans", b"")), exc
    return bytes(hdrs), bytes(trans), None


def ioctl_receive(vm, kvm, uaddrs, hdrs, trans):
    """The oracle: one KVM_SEV_RECEIVE_UPDATE_DATA per page until one fails."""
    n = len(uaddrs)
    hl, tl = (len(hdrs) // n, len(trans) // n) if n else (52, P)
    for i, u in enumerate(uaddrs):
        kvm.write(kvm.hbuf, hdrs[hl * i:hl * (i + 1)].ljust(1, b"\0"))
        kvm.write(kvm.tbuf, trans[tl * i:tl * (i + 1)].ljust(1, b"\0"))
        try:
            vm.memory_encrypt_op(KVM_SEV_RECEIVE_UPDATE_DATA, hdr_uaddr=kvm.hbuf, hdr_len=hl,
                                 guest_uaddr=int(u), guest_len=P, trans_uaddr=kvm.tbuf,
                                 trans_len=tl)
        except OSError as exc:
            exc.index = i
            return exc
    return None


def batch_receive(vm, kvm, uaddrs, hdrs, trans):
    n = len(uaddrs)
    hl, tl = (len(hdrs) // n, len(trans) // n) if n else (52, P)
    try:
        vm.sev_receive_update_data_pages(
            uaddrs, np.frombuffer(hdrs, np.uint8).reshape(n, hl),
            np.frombuffer(trans, np.uint8).reshape(n, tl))
    except OSError as exc:
        return exc
    return None


def both_send(uaddrs_of, prepare=None, seed=3):
    """Run the oracle and the batch on twin pairs; assert the same outcome; return it."""
    results = []
    for run in (ioctl_send, batch_send):
        p = Pair(seed)
        if prepare:
            prepare(p)
        hdrs, trans, exc = run(p.vm, p.src, uaddrs_of(p))
        results.append((hdrs, trans, described(exc), snapshot(p.src, p.vm, p.hva)))
    assert results[0] == results[1]
    return results[0]


def packets(p, uaddrs=None):
    """Packets of the source pages (one batch call)."""
    hdrs, trans = p.vm.sev_send_update_data_pages(p.uaddrs if uaddrs is None else uaddrs)
    return bytes(hdrs), bytes(trans)


def both_receive(tuaddrs_of, edit=None, prepare=None, seed=3):
    """Send every source page, optionally ``edit`` the packets, and receive them by both ways
    on twin pairs; assert the same outcome; return (refusal, snapshot, what each target page
    received, the source pages)."""
    results = []
    for run in (ioctl_receive, batch_receive):
        p = Pair(seed)
        hdrs, trans = packets(p)
        if edit:
            hdrs, trans = edit(hdrs, trans)
        if prepare:
            prepare(p)
        exc = run(p.tvm, p.dst, tuaddrs_of(p), hdrs, trans)
        results.append((described(exc), snapshot(p.dst, p.tvm, p.thva), p.received(),
                        p.pages()))
    assert results[0] == results[1]
    return results[0]


# -- equivalence on good batches -------------------------------------------------------------------

def test_send_batch_is_the_ioctls_byte_for_byte():
    """Same seed, same pages: the batch returns the very headers and packets (same IVs from the
    firmware's DRBG) the ioctls write, and leaves the same state behind."""
    hdrs, trans, exc, _ = both_send(lambda p: p.uaddrs)
    assert exc is None and len(hdrs) == 52 * NPAGES and len(trans) == P * NPAGES


def test_send_repeats_and_any_order():
    """Pages in any order, repeated, each sent as its ioctl would send it."""
    order = [5, 1, 1, 23, 0, 5]
    assert both_send(lambda p: p.uaddrs[order])[2] is None


def test_send_untouched_and_non_guest_pages_allocate_as_the_ioctls_do():
    """Pinning an untouched page allocates its frame in the ioctls' order, also after frames
    were freed (reused frames come back as single allocations would hand them out)."""
    def prepare(p):
        spare = p.src.mmap(8 * P)
        p.src.write(spare, bytes(8 * P))
        p.src.munmap(spare, 8 * P)                   # eight frames back in the free list
        p.fresh = p.src.mmap(16 * P)

    def uaddrs(p):
        return [p.fresh + P * i for i in (3, 0, 9, 3, 15, 1)] + [int(p.uaddrs[2])]
    assert both_send(uaddrs, prepare)[2] is None


def test_send_out_buffers_are_filled_in_place():
    """With ``out`` the batch writes into the caller's buffers and returns them."""
    p = Pair()
    hdrs, trans = bytearray(52 * NPAGES), np.zeros(P * NPAGES, np.uint8)
    got = p.vm.sev_send_update_data_pages(p.uaddrs, out=(hdrs, trans))
    assert got[0] is hdrs and got[1] is trans
    q = Pair()
    assert (bytes(hdrs), bytes(trans)) == packets(q)
    with pytest.raises(ValueError):
        p.vm.sev_send_update_data_pages(p.uaddrs, out=(bytearray(52), trans))
    with pytest.raises(ValueError):
        p.vm.sev_send_update_data_pages(p.uaddrs, out=(hdrs, bytes(P * NPAGES)))


def test_receive_batch_is_the_ioctls():
    """The target ends with the source's plaintext and the very frames, state and DRBG the
    one-page ioctls leave."""
    exc, _, got, pages = both_receive(lambda p: p.tuaddrs)
    assert exc is None and got == pages


def test_receive_repeated_page_keeps_the_later_packet():
    """A page received twice in one batch holds the later packet's data, as in ioctl order."""
    order = [0, 3, 0, 7]

    def edit(hdrs, trans):
        pick = lambda b, s: b"".join(b[s * i:s * (i + 1)] for i in (0, 1, 2, 3))  # noqa: E731
        return pick(hdrs, 52), pick(trans, P)
    exc, _, got, pages = both_receive(lambda p: p.tuaddrs[order], edit)
    assert exc is None and got[0] == pages[2] and got[3] == pages[1] and got[7] == pages[3]


def test_empty_batches_do_nothing():
    """Zero pages are zero ioctls: nothing is checked or changed, even on a dead VM."""
    p = Pair()
    p.vm.close()
    before = snapshot(p.src, p.vm, p.hva, draw=False)
    hdrs, trans = p.vm.sev_send_update_data_pages([])
    assert hdrs.shape == (0, 52) and trans.shape == (0, P)
    p.tvm.sev_receive_update_data_pages([], b"", b"")
    assert snapshot(p.src, p.vm, p.hva, draw=False) == before


def test_argument_misuse_is_python_errors_before_anything():
    """Non-integer or negative addresses, and buffers that do not split into n packets, are
    TypeError/ValueError with nothing changed."""
    p = Pair()
    before = snapshot(p.dst, p.tvm, p.thva, draw=False)
    for bad in ([1.5], [-4096], [[1, 2]], ["x"]):
        with pytest.raises((TypeError, ValueError)):
            p.vm.sev_send_update_data_pages(bad)
    with pytest.raises(ValueError):
        p.tvm.sev_receive_update_data_pages(p.tuaddrs[:2], bytes(105), bytes(2 * P))
    with pytest.raises(ValueError):
        p.tvm.sev_receive_update_data_pages(p.tuaddrs[:2], bytes(104), bytes(2 * P + 1))
    assert snapshot(p.dst, p.tvm, p.thva, draw=False) == before


# -- every refusal, at page 0 and mid-batch ----------------------------------------------------------

def _with(uaddrs, at, value):
    u = [int(x) for x in uaddrs]
    u[at] = value
    return u


PER_PAGE = [("zero", lambda p, u: 0, EINVAL), ("unaligned", lambda p, u: u + 8, EINVAL),
            ("unmapped", lambda p, u: HOLE, ENOMEM),
            ("ends_at_2^64", lambda p, u: (1 << 64) - P, EINVAL)]


@pytest.mark.parametrize("at", [0, 9])
@pytest.mark.parametrize("name, value, err", PER_PAGE, ids=[c[0] for c in PER_PAGE])
def test_send_per_page_refusals(name, value, err, at):
    """A bad page address fails exactly at its index with its ioctl's errno and message; the
    pages before it are sent (their packets on the exception)."""
    hdrs, trans, exc, _ = both_send(lambda p: _with(p.uaddrs, at, value(p, int(p.uaddrs[at]))))
    assert exc[1] == err and exc[3] == at and len(trans) == P * at


@pytest.mark.parametrize("at", [0, 9])
@pytest.mark.parametrize("name, value, err", PER_PAGE, ids=[c[0] for c in PER_PAGE])
def test_receive_per_page_refusals(name, value, err, at):
    """A bad target address fails exactly at its index; earlier pages are written, later ones
    not."""
    exc, _, got, pages = both_receive(
        lambda p: _with(p.tuaddrs, at, value(p, int(p.tuaddrs[at]))))
    assert exc[1] == err and exc[3] == at
    assert got[:at] == pages[:at] and got[at:] == [None] * (NPAGES - at)


@given(uaddrs=st.lists(st.sampled_from([0, P, 3 * P, P + 8, (1 << 64) - P, (1 << 64) - 2 * P]),
                      min_size=1, max_size=6),
       send=st.booleans(), hdr_len=st.sampled_from([0, 40, 52, 0x4000, 0x4001]),
       trans_len=st.sampled_from([0, P, 0x4001]))
def test_vectorised_filter_stops_where_the_handlers_checks_refuse(uaddrs, send, hdr_len,
                                                                  trans_len):
    """The batch's vectorised pre-pin filter stops at the first page that the one-page
    handler's checks refuse (a KvmError), and every page before it passes them."""
    if send:
        hdr_len, trans_len = 52, P                  # a batched SEND's fixed lengths
    vm = SimpleNamespace(host=SimpleNamespace(psp=None))
    b = _PageBatch(vm, send, np.array(uaddrs, np.uint64), hdr_len, trans_len)
    k = b.user_checks()
    for i in range(k):
        with pytest.raises(AssertionError, match="passes the handler's checks"):
            b.user_error(i)
    if k < len(uaddrs):
        assert isinstance(b.user_error(k), KvmError)


def test_guest_memfd_page_that_sigbuses_is_enomem():
    """A page of a private guest_memfd mapping cannot be pinned (SIGBUS): ENOMEM at its index."""
    def prepare(p):
        gmem = p.vm.create_guest_memfd(4 * P, 0)
        p.gmem_hva = p.src.map_file(4 * P, gmem, 0)
    hdrs, trans, exc, _ = both_send(lambda q: _with(q.uaddrs, 4, q.gmem_hva), prepare)
    assert exc[1] == ENOMEM and exc[3] == 4


def flip(index, byte, where="hdr"):
    def edit(hdrs, trans):
        buf, size = (bytearray(hdrs), 52) if where == "hdr" else (bytearray(trans), P)
        buf[size * index + byte] ^= 1
        return (bytes(buf), trans) if where == "hdr" else (hdrs, bytes(buf))
    return edit


@pytest.mark.parametrize("k", [0, 1, 11, NPAGES - 1])
@pytest.mark.parametrize("where, byte", [("hdr", 30), ("hdr", 6), ("trans", 1000)])
def test_mac_flip_at_k(k, where, byte):
    """A flipped MAC, IV or ciphertext bit of packet k is BAD_MEASUREMENT with index k: pages
    before k are written, k and later are untouched."""
    exc, _, got, pages = both_receive(lambda p: p.tuaddrs, flip(k, byte, where))
    assert (exc[0], exc[1], exc[3], exc[4]) == (SevError, EIO, k, SEV_RET_BAD_MEASUREMENT)
    assert "SEV_RET_BAD_MEASUREMENT" in exc[2]
    assert got[:k] == pages[:k] and got[k:] == [None] * (NPAGES - k)


@pytest.mark.parametrize("also_mac", [False, True])
def test_compressed_flag_is_unsupported_before_the_mac(also_mac):
    """COMPRESSED at packet 5 is UNSUPPORTED at index 5 even with a bad MAC (the firmware reads
    the flags first); a bad MAC earlier still wins by its index."""
    def edit(hdrs, trans):
        h = bytearray(hdrs)
        h[52 * 5] |= 1
        if also_mac:
            h[52 * 5 + 40] ^= 1
        return bytes(h), trans
    exc = both_receive(lambda p: p.tuaddrs, edit)[0]
    assert (exc[3], exc[4]) == (5, SEV_RET_UNSUPPORTED)
    exc = both_receive(lambda p: p.tuaddrs, lambda h, t: edit(*flip(2, 30)(h, t)))[0]
    assert (exc[3], exc[4]) == (2, SEV_RET_BAD_MEASUREMENT)


def test_first_refusal_wins_between_kernel_and_firmware():
    """A bad MAC at 6 and an unmapped page at 4: ENOMEM at 4; swapped, BAD_MEASUREMENT at 4;
    a bad MAC on the unmapped page itself: the pin fails first."""
    exc = both_receive(lambda p: _with(p.tuaddrs, 4, HOLE), flip(6, 30))[0]
    assert (exc[1], exc[3]) == (ENOMEM, 4)
    exc = both_receive(lambda p: _with(p.tuaddrs, 6, HOLE), flip(4, 30))[0]
    assert (exc[4], exc[3]) == (SEV_RET_BAD_MEASUREMENT, 4)
    exc = both_receive(lambda p: _with(p.tuaddrs, 4, HOLE), flip(4, 30))[0]
    assert (exc[1], exc[3]) == (ENOMEM, 4)


@pytest.mark.parametrize("hdr_len, trans_len, err, fw", [
    (40, P, EIO, SEV_RET_INVALID_LEN), (60, P, None, None), (52, P - 16, EIO, SEV_RET_INVALID_LEN),
    (52, 2 * P, EIO, SEV_RET_INVALID_LEN), (52, 0x4010, EINVAL, None), (0x4010, P, EINVAL, None)])
def test_receive_lengths_as_the_firmware_and_kvm_check_them(hdr_len, trans_len, err, fw):
    """hdr_len/trans_len are the rows' lengths: short headers or unequal lengths are the
    firmware's INVALID_LEN, blobs above 16 KiB KVM's EINVAL, longer headers are fine."""
    def edit(hdrs, trans):
        h = b"".join(hdrs[52 * i:52 * (i + 1)].ljust(hdr_len, b"\7")[:hdr_len]
                     for i in range(NPAGES))
        t = b"".join(trans[P * i:P * (i + 1)].ljust(trans_len, b"\7")[:trans_len]
                     for i in range(NPAGES))
        return h, t
    exc, _, got, pages = both_receive(lambda p: p.tuaddrs, edit)
    if err is None:
        assert exc is None and got == pages
    else:
        assert (exc[1], exc[3], exc[4]) == (err, 0, fw)


def _send_start_again(p):
    p.vm.memory_encrypt_op(KVM_SEV_SEND_CANCEL)


def _mirror(p):
    m = p.src.create_vm(KVM_X86_DEFAULT_VM)
    m.enable_cap(KVM_CAP_VM_COPY_ENC_CONTEXT_FROM, p.vm.fd)
    p.vm = m


def _not_sev(p):
    p.vm = p.src.create_vm(KVM_X86_SEV_VM)


def _dead(p):
    dst = p.src.create_vm(KVM_X86_SEV_VM)
    dst.enable_cap(KVM_CAP_VM_MOVE_ENC_CONTEXT_FROM, p.vm.fd)


def _closed(p):
    p.vm.close()


def _memlock(p):
    p.src.rlimit_memlock, p.src.cap_ipc_lock = p.vm.sev.pages_locked * P, False


def _sev_fd(p):
    p.src.host.release_fd(p.vm.sev.fd)


def _ring(p):
    RingBuffer(p.src.host.psp)


def _deactivated(p):
    p.src.host.psp.deactivate(p.vm.sev.handle)


def _snp(p):
    p.vm = p.src.create_vm(KVM_X86_SNP_VM)
    p.vm.memory_encrypt_op(KVM_SEV_INIT2)


WHOLE = [("running", _send_start_again, EIO, SEV_RET_INVALID_GUEST_STATE),
         ("mirror", _mirror, EINVAL, None), ("not_sev", _not_sev, ENOTTY, None),
         ("snp", _snp, EPERM, None), ("dead", _dead, EIO, None), ("closed", _closed, EBADF, None),
         ("memlock", _memlock, ENOMEM, None), ("sev_fd", _sev_fd, EBADF, None),
         ("ring_buffer", _ring, EIO, SEV_RET_EXIT_RING_BUFFER),
         ("inactive", _deactivated, EIO, SEV_RET_INACTIVE)]


@pytest.mark.parametrize("name, prepare, err, fw", WHOLE, ids=[c[0] for c in WHOLE])
def test_send_refusals_of_the_whole_batch(name, prepare, err, fw):
    """State-machine and VM-level refusals fail page 0 as its ioctl does (after pinning it),
    and change nothing else."""
    def uaddrs(p):
        return p.uaddrs
    hdrs, trans, exc, snap = both_send(uaddrs, prepare)
    assert (exc[1], exc[3], exc[4]) == (err, 0, fw) and hdrs == trans == b""


def _received(p):
    p.tvm.memory_encrypt_op(KVM_SEV_RECEIVE_FINISH)


def _target_not_sev(p):
    p.tvm = p.dst.create_vm(KVM_X86_SEV_VM)


def _target_ring(p):
    RingBuffer(p.dst.host.psp)


def _target_memlock(p):
    p.dst.rlimit_memlock, p.dst.cap_ipc_lock = 0, False


@pytest.mark.parametrize("prepare, err, fw", [(_received, EIO, SEV_RET_INVALID_GUEST_STATE),
                                              (_target_not_sev, EINVAL, None),
                                              (_target_ring, EIO, SEV_RET_EXIT_RING_BUFFER),
                                              (_target_memlock, ENOMEM, None)])
def test_receive_refusals_of_the_whole_batch(prepare, err, fw):
    """RECEIVE_UPDATE_DATA's state and VM-level refusals (EINVAL, not ENOTTY, for a VM that is
    not SEV: the kernel's quirk) fail page 0 and write nothing."""
    exc, _, got, _ = both_receive(lambda p: p.tuaddrs, prepare=prepare)
    assert (exc[1], exc[3], exc[4]) == (err, 0, fw) and got == [None] * NPAGES


def test_refusal_carries_the_ioctl_struct():
    """A firmware refusal carries ``out``, the struct of the failing page's ioctl, and names the
    status; a kernel refusal is a KvmError with the index."""
    p = Pair()
    hdrs, trans = packets(p)
    bad = bytearray(hdrs)
    bad[52 * 3 + 30] ^= 1
    with pytest.raises(SevError) as e:
        p.tvm.sev_receive_update_data_pages(p.tuaddrs, bytes(bad), trans)
    assert e.value.index == 3 and e.value.out.guest_uaddr == int(p.tuaddrs[3])
    assert e.value.out.error == SEV_RET_BAD_MEASUREMENT and e.value.ioctl == "KVM_MEMORY_ENCRYPT_OP"
    with pytest.raises(KvmError) as e:
        p.vm.sev_send_update_data_pages(_with(p.uaddrs, 2, 0))
    assert e.value.index == 2 and e.value.errno == EINVAL and e.value.hdrs.shape == (2, 52)


def test_pin_accounting_is_unchanged():
    """Each page is pinned for its command and unpinned after it: pages_locked ends where it
    began, after success and after a refusal."""
    p = Pair()
    locked = p.vm.sev.pages_locked
    p.vm.sev_send_update_data_pages(p.uaddrs)
    with pytest.raises(KvmError):
        p.vm.sev_send_update_data_pages(_with(p.uaddrs, 3, HOLE))
    assert p.vm.sev.pages_locked == locked


def test_batch_and_ioctls_interleave():
    """Batches and single ioctls draw from one DRBG stream: any split of the pages between them
    gives the same packets."""
    p, q = Pair(), Pair()
    whole = packets(p)
    h1, t1, _ = ioctl_send(q.vm, q.src, q.uaddrs[:5])
    h2, t2 = packets(q, q.uaddrs[5:])
    assert (h1 + h2, t1 + t2) == whole


def test_stream_record_views_in_and_strided_rows_out():
    """The batch reads the strided columns of a stream record in place (header rows longer than
    52 bytes included) and writes packets into strided rows of a caller's table: the same bytes
    and pages as contiguous buffers."""
    from sevcore.migration import StreamReader, StreamWriter, inprocess_pair
    p, q = Pair(), Pair()
    table = np.zeros((NPAGES, 8 + 60 + 4 + P), np.uint8)
    hdrs, trans = table[:, 8:60], table[:, 72:]
    got = p.vm.sev_send_update_data_pages(p.uaddrs, out=(hdrs, trans))
    assert got[0] is hdrs and got[1] is trans
    assert (hdrs.tobytes(), trans.tobytes()) == packets(q)
    assert not table[:, :8].any() and not table[:, 60:72].any()
    a, b = inprocess_pair(capacity=1 << 24)
    w = StreamWriter(a)
    w.encrypted_batch(np.arange(NPAGES)[::-1], np.pad(hdrs, ((0, 0), (0, 8)))[::-1],
                      trans[::-1])
    w.end()
    rec = StreamReader(b).read()
    assert rec.hdr_len == 60 and not rec.hdrs.flags.c_contiguous
    p.tvm.sev_receive_update_data_pages(p.tuaddrs[rec.gfns], rec.hdrs, rec.trans)
    assert p.received() == p.pages()
