"""The migration stream over both transports: round trips of every record type, exact byte
accounting, and refusal of truncated, corrupted, foreign and other-version streams."""
import struct
import zlib

import numpy as np
import pytest

from sevcore.migration import (BadMagic, BadRecord, ChecksumMismatch, PeerClosed, StreamError, StreamReader,
                               StreamTimeout, StreamTruncated, StreamWriter, UnsupportedFlags,
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
             S.HelperPage(0x400, 7, b(PAGE + 28)), S.Iteration(1, 1, True),
             S.EncryptedPage(0x100, b(52), b(PAGE)), S.VcpuState(0, b(512)),
             S.VcpuState(1, b(512)), S.End(13)]
    return recs


def sample_blob(**kw):
    """The sample stream as bytes, and the stream offset at which each record ends."""
    a, b = inprocess_pair(capacity=1 << 22)
    w = StreamWriter(a, S.FLAG_ENCRYPTED, **kw)
    write_sample(w)
    a.close()
    blob = bytearray(b.bytes_received + 1 << 16)
    n = 0
    while (got := b.recv_into(memoryview(blob)[n:])):
        n += got
    blob = bytes(blob[:n])
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
    precopy = 32 + 3 * enc + (16 + 8 + PAGE) + (16 + 12) + (16 + 16 + PAGE + 28)
    downtime = 32 + enc + 2 * (16 + 4 + 512) + (16 + 8)
    q = r.stats.qemu()
    assert q == {"transferred": setup + precopy + downtime, "precopy-bytes": setup + precopy,
                 "downtime-bytes": downtime, "normal": 6, "normal-bytes": 6 * PAGE,
                 "duplicate": 16}
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
