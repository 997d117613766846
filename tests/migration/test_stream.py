"""The migration stream over both transports: round trips of every record type, exact byte
accounting, and refusal of truncated, corrupted, foreign and other-version streams."""
import json
import struct
import sys
import zlib

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from sevcore.migration import (BadMagic, BadRecord, ChecksumMismatch, StreamError, StreamReader,
                               StreamTruncated, StreamWriter, UnsupportedFlags,
                               UnsupportedVersion, inprocess_pair)
from sevcore.migration import stream as S

PAGE = 4096


def write_sample(w, rng=None):
    """One of every record type, in the order a PSP-path migration would send them."""
    rng = rng or np.random.default_rng(7)
    b = lambda n: rng.bytes(n)  # noqa: E731
    w.setup({"ram_size": 1 << 30, "path": "psp", "vcpus": 2})
    w.sev_session(0x5, b(2084), b(128))
    w.iteration(0, 3)
    w.encrypted_page(0x100, b(52), b(PAGE))
    w.encrypted_pages([0x101, 0x102], b(104), b(2 * PAGE))
    w.shared_page(0x200, b(PAGE))
    w.zero_pages(0x300, 16)
    w.helper_page(0x400, 7, b(PAGE + 28))
    w.encrypted_batch([0x500, 0x501, 0x502], b(3 * 52), b(3 * PAGE))
    w.shared_batch([0x600, 0x601], b(2 * PAGE))
    w.helper_batch([0x700, 0x701], [9, 10], b(2 * (PAGE + 28)))
    w.iteration(1, 1, stop=True)
    w.encrypted_page(0x100, b(52), b(PAGE))
    w.vcpu_state(0, b(512))
    w.vcpu_state(1, b(512))
    w.end()


def expected_sample():
    rng = np.random.default_rng(7)
    b = rng.bytes
    recs = [S.Setup({"ram_size": 1 << 30, "path": "psp", "vcpus": 2}),
            S.SevSession(5, b(2084), b(128)), S.Iteration(0, 3, False),
            S.EncryptedPage(0x100, b(52), b(PAGE))]
    hdrs, cts = b(104), b(2 * PAGE)
    recs += [S.EncryptedPage(0x101, hdrs[:52], cts[:PAGE]),
             S.EncryptedPage(0x102, hdrs[52:], cts[PAGE:])]
    recs += [S.SharedPage(0x200, b(PAGE)), S.ZeroPages(0x300, 16),
             S.HelperPage(0x400, 7, b(PAGE + 28))]
    rows = lambda n, size: np.frombuffer(b(n * size), np.uint8).reshape(n, size)  # noqa: E731
    u64 = lambda *v: np.array(v, np.uint64)  # noqa: E731
    recs += [S.EncryptedPages(u64(0x500, 0x501, 0x502), rows(3, 52), rows(3, PAGE)),
             S.SharedPages(u64(0x600, 0x601), rows(2, PAGE)),
             S.HelperPages(u64(0x700, 0x701), u64(9, 10), rows(2, PAGE + 28))]
    recs += [S.Iteration(1, 1, True),
             S.EncryptedPage(0x100, b(52), b(PAGE)), S.VcpuState(0, b(512)),
             S.VcpuState(1, b(512)), S.End(16)]
    return recs


def blob_of(fn, *args, **kw):
    """The bytes sent by ``fn(StreamWriter(channel, *args, **kw))`` (which ends the stream)."""
    a, b = inprocess_pair(capacity=1 << 26)
    fn(StreamWriter(a, *args, **kw))
    a.close()
    blob = bytearray(a.bytes_sent + 1)
    n = 0
    while (got := b.recv_into(memoryview(blob)[n:])):
        n += got
    return bytes(blob[:n])


def sample_blob(**kw):
    """The sample stream as bytes, and the stream offset at which each record ends."""
    blob = blob_of(write_sample, S.FLAG_ENCRYPTED, **kw)
    ends = []
    if kw.get("version", S.VERSION) == S.VERSION:
        r = StreamReader(source(blob))
        for _ in r:
            ends.append(r.offset)
    return blob, ends


def source(blob):
    """A channel that delivers ``blob`` and then the end of the stream."""
    a, b = inprocess_pair(capacity=max(1, len(blob)))
    if blob:
        a.send(blob)
    a.close()
    return b


def read_until_error(blob):
    """Records delivered before the reader raised, and the exception."""
    r = StreamReader(source(blob))
    got = []
    with pytest.raises(StreamError) as info:
        while True:
            rec = r.read()
            if rec is None:
                break
            got.append(rec)
    return got, info.value, r


def test_round_trip_every_record_type(pair):
    """Every record type written on the source arrives on the target unchanged, then END."""
    pair.write_in_thread(lambda ch: write_sample(StreamWriter(ch, S.FLAG_ENCRYPTED)))
    r = StreamReader(pair.dst)
    assert r.read_all() == expected_sample()
    assert r.read() is None and r.ended and r.flags == S.FLAG_ENCRYPTED and r.version == 1
    assert pair.join() == []


def test_byte_accounting_is_exact(pair):
    """Writer, reader and both channel ends count the same bytes, matching the hand sum."""
    box = {}

    def write(ch):
        box["w"] = w = StreamWriter(ch)
        write_sample(w)
    pair.write_in_thread(write)
    r = StreamReader(pair.dst)
    r.read_all()
    assert pair.join() == []
    w = box["w"]
    enc = 16 + 8 + 4 + 52 + 4 + PAGE                 # 4,180 per encrypted page record
    setup_json = len(b'{"path": "psp", "ram_size": 1073741824, "vcpus": 2}')
    setup = 16 + (16 + setup_json) + (16 + 12 + 2084 + 128)
    batches = (16 + 4 + 3 * (8 + 4 + 52 + 4 + PAGE)) + (16 + 4 + 2 * (8 + PAGE)) + \
        (16 + 8 + 2 * (16 + PAGE + 28))
    precopy = 32 + 3 * enc + (16 + 8 + PAGE) + (16 + 12) + (16 + 16 + PAGE + 28) + batches
    downtime = 32 + enc + 2 * (16 + 4 + 512) + (16 + 8)
    q = r.stats.qemu()
    assert q == {"transferred": setup + precopy + downtime, "precopy-bytes": setup + precopy,
                 "downtime-bytes": downtime, "normal": 13, "normal-bytes": 13 * PAGE,
                 "duplicate": 16}
    assert r.stats.records["EncryptedPages"] == r.stats.records["HelperPages"] == 1
    assert w.stats == r.stats
    assert r.stats.bytes["EncryptedPage"] == 4 * enc
    assert r.stats.records["EncryptedPage"] == 4 and r.stats.records["End"] == 1
    assert pair.src.bytes_sent == pair.dst.bytes_received == q["transferred"]


def test_encrypted_page_carries_qemus_4156_bytes():
    """An encrypted page record is gfn + QEMU's be32 hdr_len, header, be32 trans_len, ciphertext."""
    a, b = inprocess_pair()
    w = StreamWriter(a)
    hdr, ct = bytes(range(52)), bytes(PAGE)
    w.encrypted_page(0x1234, hdr, ct)
    w.flush()
    buf = bytearray(1 << 14)
    n = b.recv_into(buf)
    payload = bytes(buf[16 + 12:n - 4])
    assert len(payload) == 8 + 4156
    assert payload == struct.pack(">QI", 0x1234, 52) + hdr + struct.pack(">I", PAGE) + ct


def test_truncated_anywhere_delivers_only_whole_records():
    """Cut at any point, the reader yields exactly the records wholly before the cut, then
    StreamTruncated."""
    blob, ends = sample_blob()
    recs = expected_sample()
    cuts = sorted({0, 5, 15, 16, 17, 30, len(blob) - 1, *ends[:-1], *(e + 3 for e in ends[:-1]),
                   *range(100, len(blob), 1999)})
    for cut in cuts:
        got, err, _ = read_until_error(blob[:cut])
        assert isinstance(err, StreamTruncated), (cut, err)
        assert got == recs[:sum(e <= cut for e in ends)], cut
        assert "before END" in str(err)


def test_bit_flip_anywhere_is_refused_at_its_record():
    """A flipped bit in any record is ChecksumMismatch or BadRecord, with nothing from its record
    on delivered."""
    blob, ends = sample_blob()
    recs = expected_sample()
    for off in [*range(16, len(blob), 61), len(blob) - 1]:
        for bit in (0, 7):
            bad = bytearray(blob)
            bad[off] ^= 1 << bit
            got, err, _ = read_until_error(bytes(bad))
            assert isinstance(err, ChecksumMismatch), (off, bit, err)
            assert got == recs[:sum(e <= off for e in ends)], (off, bit)


@pytest.mark.parametrize("off, cls", [(0, BadMagic), (7, BadMagic), (9, UnsupportedVersion),
                                      (11, ChecksumMismatch), (13, ChecksumMismatch)])
def test_bit_flip_in_header(off, cls):
    """A flipped header bit is refused as the field it hits, before any record."""
    blob, _ = sample_blob()
    bad = bytearray(blob)
    bad[off] ^= 1
    got, err, _ = read_until_error(bytes(bad))
    assert isinstance(err, cls) and got == []


def test_wrong_magic_is_refused():
    """Something that is not a migration stream is BadMagic, naming what was found."""
    got, err, _ = read_until_error(b"\x89PNG\r\n\x1a\n" + bytes(100))
    assert isinstance(err, BadMagic) and "PNG" in str(err) and got == []


def test_other_version_is_refused():
    """A stream of format version 2 is UnsupportedVersion (version 2) before any record."""
    blob, _ = sample_blob(version=2)
    got, err, _ = read_until_error(blob)
    assert isinstance(err, UnsupportedVersion) and err.version == 2 and got == []
    assert "version 2" in str(err) and "version 1" in str(err)


def header(version=1, flags=0):
    head = struct.pack(">8sHH", S.MAGIC, version, flags)
    return head + struct.pack(">I", zlib.crc32(head))


def frame(rtype, payload, running, reserved=0):
    """A well-checksummed frame; returns (bytes, new running CRC)."""
    head = struct.pack(">HHI", rtype, reserved, len(payload))
    hc = zlib.crc32(head, running)
    c = zlib.crc32(payload, hc)
    return head + struct.pack(">I", hc) + payload + struct.pack(">I", c), c


def test_unknown_header_flags_are_refused():
    """A header with a flag this reader does not know is UnsupportedFlags."""
    got, err, _ = read_until_error(header(flags=0x80))
    assert isinstance(err, UnsupportedFlags) and "0x80" in str(err)


@pytest.mark.parametrize("rtype, payload, reserved, text", [
    (99, b"", 0, "unknown record type 99"),
    (S.ZeroPages.TYPE, struct.pack(">QI", 1, 1), 1, "reserved"),
    (S.ZeroPages.TYPE, struct.pack(">QI", 1, 0), 0, "npages is 0"),
    (S.SharedPage.TYPE, bytes(8 + 100), 0, "not 4104"),
    (S.EncryptedPage.TYPE, struct.pack(">QI", 1, 52) + bytes(52) + struct.pack(">I", 10)
     + bytes(9), 0, "trans_len 10"),
    (S.EncryptedPage.TYPE, struct.pack(">QI", 1, 9999) + bytes(8), 0, "hdr_len 9999"),
    (S.SevSession.TYPE, struct.pack(">II", 1, 3000) + bytes(10), 0, "pdh_len 3000"),
    (S.Iteration.TYPE, struct.pack(">IIQ", 1, 2, 0), 0, "unknown flags"),
    (S.Setup.TYPE, b"[1]", 0, "not a JSON object"),
    (S.Setup.TYPE, b"\xff", 0, "not JSON"),
    (S.End.TYPE, struct.pack(">Q", 5), 0, "END counts 5 records"),
    (S.EncryptedPages.TYPE, b"\0\0", 0, "shorter than 4"),
    (S.EncryptedPages.TYPE, struct.pack(">I", 0), 0, "npages is 0"),
    (S.EncryptedPages.TYPE, struct.pack(">IQ", 1, 5), 0, "shorter than one page's head"),
    (S.EncryptedPages.TYPE, struct.pack(">IQI", 1, 5, 9999) + bytes(60), 0, "hdr_len 9999"),
    (S.EncryptedPages.TYPE, struct.pack(">IQI", 2, 5, 52) + bytes(52) + struct.pack(">I", 16)
     + bytes(16), 0, "2 pages of hdr_len 52 and trans_len 16"),
    (S.EncryptedPages.TYPE, struct.pack(">IQI", 1, 5, 52) + bytes(52) + struct.pack(">I", 0),
     0, "trans_len 0"),
    (S.EncryptedPages.TYPE, struct.pack(">I", 2) + struct.pack(">QI", 5, 4) + bytes(4)
     + struct.pack(">I", 16) + bytes(16) + struct.pack(">QI", 6, 8) + bytes(4)
     + struct.pack(">I", 12) + bytes(16), 0, "equal hdr_len"),
    (S.SharedPages.TYPE, struct.pack(">I", 2) + bytes(2 * (8 + PAGE) - 1), 0,
     "2 pages need 8212 bytes"),
    (S.HelperPages.TYPE, struct.pack(">I", 1), 0, "shorter than 8"),
    (S.HelperPages.TYPE, struct.pack(">II", 1, 0) + bytes(16), 0, "1 packets of 0 bytes"),
    (S.HelperPages.TYPE, struct.pack(">II", 2, 32) + bytes(2 * 48 + 1), 0,
     "2 packets of 32 bytes"),
])
def test_well_checksummed_but_bad_records(rtype, payload, reserved, text):
    """Records with valid CRCs but an unknown type or inconsistent layout are BadRecord."""
    h = header()
    ok, crc = frame(S.ZeroPages.TYPE, struct.pack(">QI", 0, 1), zlib.crc32(h[:12]))
    bad, _ = frame(rtype, payload, crc, reserved)
    got, err, _ = read_until_error(h + ok + bad)
    assert isinstance(err, BadRecord) and text in str(err), err
    assert got == [S.ZeroPages(0, 1)] and err.record == 1 and err.offset == len(h + ok)


def test_dropped_duplicated_or_swapped_records_are_refused():
    """The running checksum refuses a stream with a record removed, repeated or reordered."""
    blob, ends = sample_blob()
    starts = [16] + ends[:-1]
    a, b = slice(starts[3], ends[3]), slice(starts[4], ends[4])
    for bad, at in ((blob[:a.start] + blob[a.stop:], 3),
                    (blob[:a.stop] + blob[a] + blob[a.stop:], 4),
                    (blob[:a.start] + blob[b] + blob[a] + blob[b.stop:], 3)):
        got, err, _ = read_until_error(bad)
        assert isinstance(err, ChecksumMismatch) and len(got) == at and err.record == at


def test_errors_are_sticky_and_read_all_delivers_nothing():
    """After a refusal every read raises the same error; read_all returns no records at all."""
    blob, ends = sample_blob()
    bad = bytearray(blob)
    bad[ends[5] + 20] ^= 4
    r = StreamReader(source(bytes(bad)))
    with pytest.raises(ChecksumMismatch) as first:
        r.read_all()
    with pytest.raises(ChecksumMismatch) as again:
        r.read()
    assert again.value is first.value and r.stats.nrecords == 6


def test_writer_checks_arguments_before_buffering():
    """Bad arguments are ValueError/TypeError and leave the stream unchanged."""
    a, b = inprocess_pair()
    w = StreamWriter(a)
    before = w.stats.transferred
    for call in (lambda: w.shared_page(-1, bytes(PAGE)), lambda: w.shared_page(1, bytes(10)),
                 lambda: w.encrypted_page(1, bytes(52), b""), lambda: w.zero_pages(1, 0),
                 lambda: w.helper_page(1, 2, b""), lambda: w.sev_session(1 << 32, b"", b""),
                 lambda: w.iteration(True, 0), lambda: w.encrypted_pages([1, 2], bytes(52),
                                                                         bytes(2 * PAGE))):
        with pytest.raises(ValueError):
            call()
    with pytest.raises(TypeError):
        w.setup([1])
    assert w.stats.transferred == before
    w.end()
    with pytest.raises(ValueError, match="ended"):
        w.zero_pages(1)
    with pytest.raises(ValueError, match="flags"):
        StreamWriter(a, flags=0x100)


def test_encrypted_pages_bad_gfn_buffers_nothing():
    """A bad gfn anywhere in a batch is a ValueError before any record of the batch is buffered."""
    a, b = inprocess_pair()
    w = StreamWriter(a)
    before = w.stats.transferred
    with pytest.raises(ValueError, match="gfn"):
        w.encrypted_pages([1, 2, -1], bytes(3 * 52), bytes(3 * PAGE))
    assert w.stats.transferred == before and w.stats.nrecords == 0
    w.encrypted_pages([1, 2], bytes(2 * 52), bytes(2 * PAGE))
    w.end()
    assert [r.gfn for r in StreamReader(b).read_all()[:-1]] == [1, 2]


def test_numpy_pages_are_accepted():
    """Pages held in numpy arrays are written as their bytes."""
    a, b = inprocess_pair()
    w = StreamWriter(a)
    page = np.arange(PAGE, dtype=np.uint8)
    w.shared_page(1, page)
    w.encrypted_pages([2, 3], np.zeros(104, np.uint8), np.ones(2 * PAGE, np.uint8))
    w.end()
    recs = StreamReader(b).read_all()
    assert recs[0].data == page.tobytes() and recs[2].trans == bytes([1]) * PAGE


# -- batch records ---------------------------------------------------------------------------------

def written(fn, **kw):
    """The records a writer function produces, read back, and the writer."""
    a, b = inprocess_pair(capacity=1 << 26)
    w = StreamWriter(a, **kw)
    fn(w)
    w.end()
    return StreamReader(b).read_all()[:-1], w


def test_batch_views_share_one_read_only_buffer():
    """A batch record's arrays are read-only views into one buffer of its own (no copy per
    page); gfns are uint64; iterating gives the single-page records."""
    rng = np.random.default_rng(1)
    hdrs, trans = rng.bytes(4 * 52), rng.bytes(4 * PAGE)
    (rec,), _ = written(lambda w: w.encrypted_batch([7, 3, 9, 1 << 40], hdrs, trans))
    assert isinstance(rec, S.EncryptedPages) and len(rec) == 4
    assert rec.gfns.dtype == np.uint64 and rec.gfns.tolist() == [7, 3, 9, 1 << 40]
    assert rec.hdrs.shape == (4, 52) and rec.trans.shape == (4, PAGE)
    assert (rec.hdr_len, rec.trans_len) == (52, PAGE)
    assert np.may_share_memory(rec.hdrs, rec.trans) and rec.trans.base is rec.hdrs.base
    assert not rec.hdrs.flags.writeable and not rec.trans.flags.writeable
    assert list(rec) == [S.EncryptedPage(g, hdrs[52 * i:52 * (i + 1)],
                                         trans[PAGE * i:PAGE * (i + 1)])
                         for i, g in enumerate([7, 3, 9, 1 << 40])]


def test_batch_payload_is_qemus_bytes_per_page():
    """ENCRYPTED_PAGES carries be32 npages, then per page be64 gfn and QEMU's be32 hdr_len,
    header, be32 trans_len, ciphertext."""
    a, b = inprocess_pair()
    w = StreamWriter(a)
    hdrs, trans = bytes(range(104)), bytes(2 * PAGE)
    w.encrypted_batch([0x1234, 0x99], hdrs, trans)
    w.flush()
    buf = bytearray(1 << 15)
    n = b.recv_into(buf)
    payload = bytes(buf[16 + 12:n - 4])
    page = lambda g, h: struct.pack(">QI", g, 52) + h + struct.pack(">I", PAGE) + bytes(PAGE)  # noqa: E731
    assert payload == struct.pack(">I", 2) + page(0x1234, hdrs[:52]) + page(0x99, hdrs[52:])


def test_batches_split_by_batch_pages_and_count_pages_as_singles():
    """A batch call makes records of at most batch_pages pages; page counters match what the
    single-page records of the same pages count."""
    rng = np.random.default_rng(2)
    g = np.arange(10, dtype=np.uint64)
    h, t, d = rng.bytes(520), rng.bytes(10 * PAGE), rng.bytes(10 * PAGE)
    p = rng.bytes(10 * 64)

    def batches(w):
        w.encrypted_batch(g, h, t)
        w.shared_batch(g, d)
        w.helper_batch(g, g + 5, p)

    def singles(w):
        for i in range(10):
            w.encrypted_page(i, h[52 * i:52 * (i + 1)], t[PAGE * i:PAGE * (i + 1)])
        for i in range(10):
            w.shared_page(i, d[PAGE * i:PAGE * (i + 1)])
        for i in range(10):
            w.helper_page(i, i + 5, p[64 * i:64 * (i + 1)])
    recs, wb = written(batches, batch_pages=4)
    assert [len(r) for r in recs] == [4, 4, 2] * 3
    flat, ws = written(singles)
    assert [x for r in recs for x in r] == flat
    qb, qs = wb.stats.qemu(), ws.stats.qemu()
    assert qb["normal"] == qs["normal"] == 30 and qb["normal-bytes"] == qs["normal-bytes"]
    assert wb.stats.records["EncryptedPages"] == 3 and ws.stats.records["EncryptedPage"] == 10


def test_batch_larger_than_max_payload_is_split():
    """A batch that does not fit MAX_PAYLOAD in one record becomes several that do."""
    n = S.MAX_PAYLOAD // (16 + 52 + PAGE) + 5
    (a, b), w = written(lambda w: w.encrypted_batch(np.arange(n), np.zeros((n, 52), np.uint8),
                                                    np.zeros((n, PAGE), np.uint8)),
                        batch_pages=1 << 20)
    assert len(a) + len(b) == n and len(b) == 5
    assert w.stats.bytes["EncryptedPages"] <= 2 * (S.MAX_PAYLOAD + 16)


def test_batch_views_forward_without_gathering():
    """A reader's batch (strided views) can be written again as it is, and reads back equal."""
    rng = np.random.default_rng(4)
    (rec,), _ = written(lambda w: w.encrypted_batch([1, 2, 3], rng.bytes(3 * 60),
                                                    rng.bytes(3 * 2048)))
    assert (rec.hdr_len, rec.trans_len) == (60, 2048)
    (again,), _ = written(lambda w: w.encrypted_batch(rec.gfns, rec.hdrs, rec.trans))
    assert again == rec


@pytest.mark.parametrize("call", [
    lambda w: w.encrypted_batch([1, -2], bytes(104), bytes(2 * PAGE)),
    lambda w: w.encrypted_batch([1, 2], bytes(103), bytes(2 * PAGE)),
    lambda w: w.encrypted_batch([1, 2], bytes(104), b""),
    lambda w: w.encrypted_batch([1, 1 << 64], bytes(104), bytes(2 * PAGE)),
    lambda w: w.shared_batch([1, 2], bytes(2 * PAGE - 2)),
    lambda w: w.helper_batch([1, 2], [3], bytes(64)),
    lambda w: w.helper_batch([1, 2], [3, 4], b""),
    lambda w: w.encrypted_batch([1], bytes(52), bytes(S.MAX_PAYLOAD)),
], ids=["negative gfn", "hdrs split", "empty ct", "gfn too big", "shared size", "seqs",
        "empty packet", "page too big"])
def test_batch_arguments_are_checked_before_anything_is_buffered(call):
    """Bad batch arguments are ValueError (TypeError for non-ints) with nothing written."""
    a, _ = inprocess_pair()
    w = StreamWriter(a)
    with pytest.raises((ValueError, TypeError)):
        call(w)
    assert w.stats.nrecords == 0 and bytes(w._buf) == bytes(w._buf[:16])
    with pytest.raises(TypeError):
        w.shared_batch([1.5], bytes(PAGE))


def test_truncated_inside_a_batch_names_it():
    """A stream cut inside a batch payload is StreamTruncated naming the record and its size."""
    blob, ends = sample_blob()
    cut = ends[8] + 5000                     # inside the ENCRYPTED_PAGES record (#9)
    got, err, _ = read_until_error(blob[:cut])
    assert len(got) == 9 and err.record == 9
    assert f"EncryptedPages record needs {16 + 4 + 3 * 4164} bytes" in str(err)


def test_empty_batch_writes_nothing():
    """A batch of no pages is no record."""
    recs, w = written(lambda w: (w.encrypted_batch([], b"", b""), w.shared_batch([], b"")))
    assert recs == [] and w.stats.nrecords == 1


def _batch_payload(rtype, count, lens, body, exact, flip):
    """A batch payload of ``rtype``: ``count``, the lengths ``lens`` (hdr_len and trans_len, or
    packet_len) and ``body``; with ``exact`` the body is cut to the size the head says and every
    page gets the lengths; ``flip`` (an offset or None) then flips one bit."""
    hl, tl = lens
    head = 8 if rtype == S.HelperPages.TYPE else 4
    stride = {S.EncryptedPages.TYPE: 16 + hl + tl, S.SharedPages.TYPE: 8 + PAGE,
              S.HelperPages.TYPE: 16 + hl}[rtype]
    if exact:
        body = (body or b"\1") * (count * stride // max(1, len(body)) + 1)
        body = body[:count * stride]
    p = bytearray(struct.pack(">I", count) + (struct.pack(">I", hl) if head == 8 else b"") + body)
    if rtype == S.EncryptedPages.TYPE:
        for i in range(count if exact else 1):
            off = 4 + i * stride
            if len(p) >= off + 16 + hl:
                p[off + 8:off + 12] = struct.pack(">I", hl)
                p[off + 12 + hl:off + 16 + hl] = struct.pack(">I", tl)
    if flip is not None and p:
        p[flip % len(p)] ^= 1 << (flip % 8)
    return bytes(p)


@settings(max_examples=400, deadline=None)
@given(rtype=st.sampled_from(S.BATCH_RECORDS), count=st.integers(0, 4),
       lens=st.tuples(st.integers(0, 70), st.integers(0, 70)), body=st.binary(max_size=300),
       exact=st.booleans(), flip=st.none() | st.integers(0, 1 << 20))
def test_any_well_checksummed_batch_payload_is_a_record_or_bad_record(rtype, count, lens, body,
                                                                       exact, flip):
    """Whatever a checksummed batch payload holds, the reader returns a record whose arrays add
    up to it (and that writes back to the very same payload), or BadRecord; never another
    error."""
    payload = _batch_payload(rtype, count, lens, body, exact, flip)
    h = header()
    blob, _ = frame(rtype, payload, zlib.crc32(h[:12]))
    r = StreamReader(source(h + blob))
    try:
        rec = r.read()
    except BadRecord:
        return
    assert len(rec) == count >= 1
    a, b = inprocess_pair(capacity=1 << 20)
    w = StreamWriter(a)
    if rtype == S.EncryptedPages.TYPE:
        w.encrypted_batch(rec.gfns, rec.hdrs, rec.trans)
    elif rtype == S.SharedPages.TYPE:
        w.shared_batch(rec.gfns, rec.data)
    else:
        w.helper_batch(rec.gfns, rec.seqs, rec.packets)
    w.flush()
    out = bytearray(1 << 20)
    n = b.recv_into(out)
    assert bytes(out[16 + 12:n - 4]) == payload


# -- batch records filled in place, and buffers reused -----------------------------------------------

def test_fill_writes_the_same_records_as_the_copying_calls():
    """encrypted_batch_fill and helper_batch_fill make byte-identical streams to
    encrypted_batch and helper_batch, record splits included; fill sees writable strided
    views of exactly its pages."""
    rng = np.random.default_rng(11)
    g = np.arange(100, 110, dtype=np.uint64)
    h, t = rng.bytes(10 * 52), rng.bytes(10 * PAGE)
    q, p = np.arange(7, 17, dtype=np.uint64), rng.bytes(10 * 4128)
    hr = np.frombuffer(h, np.uint8).reshape(10, 52)
    tr = np.frombuffer(t, np.uint8).reshape(10, PAGE)
    pr = np.frombuffer(p, np.uint8).reshape(10, 4128)
    seen = []

    def fill_enc(lo, n, hdrs, trans):
        assert hdrs.shape == (n, 52) and trans.shape == (n, PAGE) and trans.flags.writeable
        assert trans.strides[0] == 16 + 52 + PAGE
        seen.append((lo, n))
        hdrs[:] = hr[lo:lo + n]
        trans[:] = tr[lo:lo + n]

    def fill_helper(lo, n, seqs, packets):
        assert seqs.dtype == np.dtype(">u8") and packets.shape == (n, 4128)
        seqs[:] = q[lo:lo + n]
        packets[:] = pr[lo:lo + n]

    def blob(fn):
        a, b = inprocess_pair(capacity=1 << 22)
        w = StreamWriter(a, batch_pages=4)
        fn(w)
        w.end()
        a.close()
        out = bytearray(1 << 22)
        n = 0
        while (got := b.recv_into(memoryview(out)[n:])):
            n += got
        return bytes(out[:n])
    filled = blob(lambda w: (w.encrypted_batch_fill(g, fill_enc, 52, PAGE),
                             w.helper_batch_fill(g, fill_helper, 4128)))
    copied = blob(lambda w: (w.encrypted_batch(g, h, t), w.helper_batch(g, q, p)))
    assert filled == copied and seen == [(0, 4), (4, 4), (8, 2)]


def test_a_failing_fill_writes_nothing_of_its_record():
    """If fill raises, its record is not framed: the stream holds the records before it and
    goes on correctly after (the writer's reused payload buffer is not left half-framed)."""
    a, b = inprocess_pair(capacity=1 << 24)
    w = StreamWriter(a, batch_pages=2)
    g = np.arange(6, dtype=np.uint64)

    def fill(lo, n, hdrs, trans):
        if lo == 4:
            raise RuntimeError("the firmware refused page 4")
        hdrs[:] = lo
        trans[:] = lo
    with pytest.raises(RuntimeError, match="page 4"):
        w.encrypted_batch_fill(g, fill, 52, PAGE)
    assert w.stats.records["EncryptedPages"] == 2
    w.shared_batch([9], bytes(PAGE))
    w.end()
    recs = StreamReader(b).read_all()
    assert [type(r).__name__ for r in recs] == ["EncryptedPages", "EncryptedPages",
                                                "SharedPages", "End"]
    assert recs[1].gfns.tolist() == [2, 3] and int(recs[1].trans[1, 0]) == 2


def test_fill_arguments_are_checked_before_anything_is_buffered():
    """An empty ciphertext, a negative header length, an empty helper packet or a negative gfn
    is a ValueError before the fill function runs or any record is buffered."""
    a, _ = inprocess_pair()
    w = StreamWriter(a)
    never = lambda *args: pytest.fail("fill must not run")  # noqa: E731
    for call in (lambda: w.encrypted_batch_fill([1], never, 52, 0),
                 lambda: w.encrypted_batch_fill([1], never, -1, PAGE),
                 lambda: w.helper_batch_fill([1], never, 0),
                 lambda: w.helper_batch_fill([-1], never, 64)):
        with pytest.raises(ValueError):
            call()
    assert w.stats.nrecords == 0


def test_reader_reuse_hands_out_one_buffer_and_the_same_records():
    """With reuse=True a batch record is a view of the reader's own buffer, which the next
    batch record overwrites; the records read are the same as without reuse."""
    rng = np.random.default_rng(5)

    def write(w):
        for k in range(3):
            w.encrypted_batch(np.arange(k, k + 3), rng.bytes(3 * 52), rng.bytes(3 * PAGE))
    a, b = inprocess_pair(capacity=1 << 24)
    w = StreamWriter(a)
    write(w)
    w.end()
    a.close()
    r = StreamReader(b, reuse=True)
    recs, bases = [], []
    for rec in r:
        if isinstance(rec, S.EncryptedPages):
            recs.append(S.EncryptedPages(rec.gfns.copy(), rec.hdrs.copy(), rec.trans.copy()))
            bases.append(rec.trans.base.base if rec.trans.base.base is not None
                         else rec.trans.base)
            assert not rec.trans.flags.writeable
    rng = np.random.default_rng(5)
    plain, _ = written(write)
    assert recs == plain
    assert all(np.shares_memory(bases[0], x) for x in bases[1:])


# -- records larger than the reader's buffer, and limits a hostile peer runs into --------------------

def test_single_record_larger_than_the_reader_buffer_reads_back():
    """A 2 MiB VCPU_STATE, a 3 MiB HELPER_PAGE and, with a 4 KiB buffer, an ENCRYPTED_PAGE are
    read back whole, the buffer growing as they need."""
    rng = np.random.default_rng(11)
    state, packet, hdr, ct = rng.bytes(2 << 20), rng.bytes(3 << 20), rng.bytes(52), rng.bytes(PAGE)

    def write(w):
        w.vcpu_state(0, state)
        w.helper_page(1, 2, packet)
        w.encrypted_page(3, hdr, ct)
        w.end()
    blob = blob_of(write)
    want = [S.VcpuState(0, state), S.HelperPage(1, 2, packet), S.EncryptedPage(3, hdr, ct),
            S.End(3)]
    for size in (1 << 20, 4096):
        assert StreamReader(source(blob), buffer_size=size).read_all() == want, size


def test_record_larger_than_the_buffer_over_a_channel_of_small_reads(pair):
    """A 2 MiB VCPU_STATE arrives whole over both transports, in however many reads it takes."""
    state = np.random.default_rng(12).bytes(2 << 20)

    def write(ch):
        w = StreamWriter(ch)
        w.vcpu_state(7, state)
        w.end()
    pair.write_in_thread(write)
    assert StreamReader(pair.dst, buffer_size=1 << 16).read_all() == [S.VcpuState(7, state),
                                                                      S.End(1)]
    assert pair.join() == []


def deep_params(depth):
    """A SETUP dict nested ``depth`` containers deep (itself included), objects and lists
    alternating."""
    doc = []
    for i in range(depth - 2):
        doc = {"k": doc} if i % 2 == 0 else [doc]
    return {"top": doc}


def test_deeply_nested_setup_is_bad_record():
    """SETUP JSON nested deeper than MAX_JSON_DEPTH is BadRecord at its offset, however deep."""
    h = header()
    ok, crc = frame(S.ZeroPages.TYPE, struct.pack(">QI", 0, 1), zlib.crc32(h[:12]))
    for depth in (S.MAX_JSON_DEPTH + 1, 5000, 1 << 20):
        doc = b'{"a": ' * (depth - 1) + b"[]" + b"}" * (depth - 1)
        bad, _ = frame(S.Setup.TYPE, doc, crc)
        got, err, _ = read_until_error(h + ok + bad)
        assert isinstance(err, BadRecord) and f"deeper than {S.MAX_JSON_DEPTH}" in str(err), depth
        assert got == [S.ZeroPages(0, 1)] and err.offset == len(h + ok) and err.record == 1


def json_nesting(v):
    """Lists and dicts nested in a JSON value, the value itself included."""
    if isinstance(v, (list, dict)):
        return 1 + max(map(json_nesting, v.values() if isinstance(v, dict) else v), default=0)
    return 0


TRICKY = '[]{}"\\:,a\u00e9'
json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(TRICKY),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(TRICKY), inner,
                                                                max_size=4),
    max_leaves=30)


@settings(max_examples=300, deadline=None)
@given(value=json_values, ascii_only=st.booleans(), indent=st.sampled_from([None, 0, 2]))
def test_json_depth_of_valid_json_is_its_nesting(value, ascii_only, indent):
    """The reader's bracket count gives any JSON text's nesting, strings with brackets, quotes
    and backslashes included."""
    text = json.dumps(value, ensure_ascii=ascii_only, indent=indent).encode()
    assert S._json_depth(text) == S._json_depth(text, chunk=3) == json_nesting(value)


@settings(max_examples=300, deadline=None)
@given(st.lists(st.sampled_from(["[", "]", "{", "}", '"', "\\", '"a"', ",", "[" * 20,
                                 '"' + "{" * 20 + '"']), max_size=60))
def test_the_quick_depth_check_agrees_with_the_bracket_count(tokens):
    """The reader's quick refusal of text nested past MAX_JSON_DEPTH (a count of opening
    brackets first) refuses exactly what the full bracket count does, on any text."""
    text = "".join(tokens).encode()
    assert S._too_deep(text) == (S._json_depth(text) > S.MAX_JSON_DEPTH)


def frames():
    """How many frames the stack holds (what counts towards the recursion limit)."""
    n, f = 0, sys._getframe()
    while f is not None:
        n, f = n + 1, f.f_back
    return n


@settings(max_examples=300, deadline=None)
@given(st.lists(st.sampled_from(["[", "]", "{", "}", '"', "\\", '\\"', '"a"', ":", ",", "1",
                                 "[" * 40, '"' + "[" * 40 + '"', "\\" * 3]), max_size=60))
def test_json_depth_bounds_what_json_loads_recurses_through(tokens):
    """On any text, valid or not, json.loads nests no deeper than the reader's count says: with
    room for that many levels, and 25 frames for its own calls and its error (fewer than the
    40 levels a misread string token would add), it never hits the recursion limit."""
    text = "".join(tokens)
    depth = S._json_depth(text.encode())
    limit = sys.getrecursionlimit()
    sys.setrecursionlimit(frames() + max(depth, 0) + 25)
    try:
        json.loads(text)
    except ValueError:
        pass
    finally:
        sys.setrecursionlimit(limit)


def test_setup_at_max_json_depth_round_trips():
    """SETUP nested exactly MAX_JSON_DEPTH containers deep is written and read back equal."""
    params = deep_params(S.MAX_JSON_DEPTH)

    def write(w):
        w.setup(params)
        w.end()
    assert StreamReader(source(blob_of(write))).read_all() == [S.Setup(params), S.End(1)]


def test_writer_refuses_setup_the_reader_would_refuse():
    """SETUP nested deeper than MAX_JSON_DEPTH (a little or past the interpreter's recursion
    limit) or circular is ValueError, and buffers nothing."""
    loop = {}
    loop["self"] = loop
    a, _ = inprocess_pair()
    w = StreamWriter(a)
    for params, text in ((deep_params(S.MAX_JSON_DEPTH + 1), f"deeper than {S.MAX_JSON_DEPTH}"),
                         (deep_params(5000), f"deeper than {S.MAX_JSON_DEPTH}"),
                         (loop, "Circular reference")):
        with pytest.raises(ValueError, match=text):
            w.setup(params)
    assert w.stats.nrecords == 0
