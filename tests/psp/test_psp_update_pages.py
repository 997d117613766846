"""The firmware's batched whole-page entries (psp.send_update_data_pages,
psp.receive_update_data_pages) against the same commands one page at a time on twin hosts."""
import numpy as np
import pytest

from sevcore import uapi as U
from sevcore.psp import PspError, RingBuffer
from sevcore.psp.api import Packet

from support.psp import SEV_ASID, migration_pair, pages

N = 6


def twins(npages=N):
    """Two identical migration pairs (same seeds): one for the oracle, one for the batch."""
    return [migration_pair(npages=npages) for _ in range(2)]


def addrs(src, n=N):
    return [src.spa + 4096 * i for i in range(n)]


def test_send_pages_are_the_single_commands():
    """The batch's headers and packets are those of n SEND_UPDATE_DATA commands in order, and
    the DRBG continues from the same place."""
    (a, *_), (b, *_) = twins()
    single = [a.psp.send_update_data(a.handle, s, 4096) for s in addrs(a)]
    hdrs, trans = b.psp.send_update_data_pages(b.handle, addrs(b))
    assert bytes(hdrs) == b"".join(p.header for p in single)
    assert bytes(trans) == b"".join(p.ciphertext for p in single)
    assert a.psp._rng(16) == b.psp._rng(16)


def test_send_pages_take_the_c_bit_and_out_buffers():
    """Guest addresses may carry the C-bit; ``out`` buffers are filled and returned."""
    (a, *_), (b, *_) = twins()
    c = 1 << a.host.c_bit
    want = a.psp.send_update_data_pages(a.handle, [s | c for s in addrs(a)])
    out = (bytearray(52 * N), np.empty((N, 4096), np.uint8))
    got = b.psp.send_update_data_pages(b.handle, addrs(b), out=out)
    assert got[0] is out[0] and bytes(got[0]) == bytes(want[0]) and bytes(got[1]) == bytes(want[1])


def test_send_invalid_address_mid_batch():
    """An address outside host memory is INVALID_ADDRESS at its index; the pages before it are
    sent (their packets on the error), with the IVs single commands would have drawn."""
    (a, *_), (b, *_) = twins()
    bad = addrs(b)
    bad[3] = b.host.mem.size
    with pytest.raises(PspError) as e:
        b.psp.send_update_data_pages(b.handle, bad)
    assert (e.value.fw_error, e.value.index) == (U.SEV_RET_INVALID_ADDRESS, 3)
    single = [a.psp.send_update_data(a.handle, s, 4096) for s in addrs(a)[:3]]
    assert bytes(e.value.trans) == b"".join(p.ciphertext for p in single)
    assert a.psp._rng(16) == b.psp._rng(16)
    with pytest.raises(ValueError):
        b.psp.send_update_data_pages(b.handle, [b.spa + 16])


@pytest.mark.parametrize("prepare, status", [
    (lambda s: s.psp.send_cancel(s.handle), U.SEV_RET_INVALID_GUEST_STATE),
    (lambda s: s.psp.deactivate(s.handle), U.SEV_RET_INACTIVE),
    (lambda s: RingBuffer(s.psp), U.SEV_RET_EXIT_RING_BUFFER)])
def test_send_refused_as_a_whole(prepare, status):
    """State refusals are the first command's status at index 0; nothing is drawn or sent; a
    mailbox write in ring-buffer mode ends the mode, as a single command does."""
    src, *_ = migration_pair(npages=N)
    prepare(src)
    with pytest.raises(PspError) as e:
        src.psp.send_update_data_pages(src.handle, addrs(src))
    assert (e.value.fw_error, e.value.index) == (status, 0) and not src.psp.rb_enabled


def received(dst, where, n=N):
    return [dst.umc.read(where + 4096 * i, 4096, SEV_ASID) for i in range(n)]


def test_receive_pages_are_the_single_commands():
    """Received as a batch, the target's frames are those n RECEIVE_UPDATE_DATA commands write."""
    results = []
    for batch in (False, True):
        src, dst, handle, _ = migration_pair(npages=N)
        hdrs, trans = src.psp.send_update_data_pages(src.handle, addrs(src))
        where = pages(dst, N)
        if batch:
            dst.psp.receive_update_data_pages(handle, addrs_at(where), hdrs, trans)
        else:
            for i in range(N):
                dst.psp.receive_update_data(handle, Packet(bytes(hdrs[i]), bytes(trans[i])),
                                            where + 4096 * i)
        results.append(dst.mem.read(where, N * 4096))
        assert b"".join(received(dst, where)) == src.data
    assert results[0] == results[1]


def addrs_at(where, n=N):
    return [where + 4096 * i for i in range(n)]


@pytest.mark.parametrize("k", [0, 4])
def test_receive_mac_flip_and_compressed_at_k(k):
    """A bad MAC at k is BAD_MEASUREMENT with index k, COMPRESSED is UNSUPPORTED: pages before
    k are written, the rest keep their bytes."""
    for offset, bit, status in ((30, 1, U.SEV_RET_BAD_MEASUREMENT), (0, 1, U.SEV_RET_UNSUPPORTED)):
        src, dst, handle, _ = migration_pair(npages=N)
        hdrs, trans = src.psp.send_update_data_pages(src.handle, addrs(src))
        hdrs = hdrs.copy()
        hdrs[k, offset] ^= bit
        where = pages(dst, N)
        before = dst.mem.read(where, N * 4096)
        with pytest.raises(PspError) as e:
            dst.psp.receive_update_data_pages(handle, addrs_at(where), hdrs, trans)
        assert (e.value.fw_error, e.value.index) == (status, k)
        assert received(dst, where)[:k] == [src.data[4096 * i:4096 * (i + 1)] for i in range(k)]
        assert dst.mem.read(where + 4096 * k, (N - k) * 4096) == before[4096 * k:]


def test_receive_lengths_and_addresses():
    """Header rows shorter than 52 bytes or packets other than 4096 bytes are INVALID_LEN at 0;
    an address outside memory is INVALID_ADDRESS at its index after the pages before it."""
    src, dst, handle, _ = migration_pair(npages=N)
    hdrs, trans = src.psp.send_update_data_pages(src.handle, addrs(src))
    where = pages(dst, N)
    for h, t in ((hdrs[:, :40], trans), (hdrs, trans[:, :4080])):
        with pytest.raises(PspError) as e:
            dst.psp.receive_update_data_pages(handle, addrs_at(where), h, t)
        assert (e.value.fw_error, e.value.index) == (U.SEV_RET_INVALID_LEN, 0)
    bad = addrs_at(where)
    bad[2] = dst.mem.size
    with pytest.raises(PspError) as e:
        dst.psp.receive_update_data_pages(handle, bad, np.pad(hdrs, ((0, 0), (0, 8))), trans)
    assert (e.value.fw_error, e.value.index) == (U.SEV_RET_INVALID_ADDRESS, 2)
    assert b"".join(received(dst, where, 2)) == src.data[:2 * 4096]
