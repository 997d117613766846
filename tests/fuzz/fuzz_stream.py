"""Coverage-guided fuzzing of the migration stream reader (``sevcore.migration.stream``).

Contract (docs/migration-stream.md, "Limits" and "Errors"): whatever bytes a peer sends, however
the channel splits them and whatever the reader's buffer size, ``StreamReader`` hands on verified
records and then either ends at END or raises a ``StreamError`` whose ``offset`` lies inside
the input; it never raises anything else, and raises the same error again on the next read. A
stream it accepts is one a ``StreamWriter`` can write: its records, written again, read back
equal (and, without SETUP, byte for byte).

Input: one option byte, then the stream. Bits 0-1 pick the reader's buffer size, bits 2-3 how
many bytes each ``recv_into`` delivers, bit 4 ``reuse``; with bit 7 the harness first sets every
CRC (the header's, then each frame's as its ``payload_len`` says), so that mutations get past
the checksums to the record decoders.

    python tests/fuzz/fuzz_stream.py -max_total_time=30
"""
import json
import struct
import zlib

import atheris

with atheris.instrument_imports(include=["sevcore"]):
    from sevcore.migration import stream as S
    from sevcore.migration.errors import StreamError

import fuzzutil  # noqa: E402 -- this folder's, not instrumented

BUFFER_SIZES = (4096, 1 << 20, 100, 1)
CHUNKS = (1 << 30, 4096, 7, 1)
FIX_CRCS = 1 << 7
_U32 = struct.Struct(">I")


class Bytes:
    """A channel delivering ``data``, at most ``chunk`` bytes per ``recv_into``, then its end."""

    def __init__(self, data, chunk):
        self.data, self.chunk, self.pos = memoryview(data), chunk, 0

    def recv_into(self, buf):
        n = min(len(buf), self.chunk, len(self.data) - self.pos)
        buf[:n] = self.data[self.pos:self.pos + n]
        self.pos += n
        return n


class Sink:
    """A channel collecting what is sent."""

    def __init__(self):
        self.data = bytearray()

    def send(self, data):
        self.data += data


def fix_crcs(stream):
    """``stream`` with the header CRC and every frame's two CRCs set as a writer sets them, frames
    delimited by their ``payload_len``; a frame that runs past the end is left as it is."""
    b = bytearray(stream)
    if len(b) < S.HEADER_SIZE:
        return bytes(b)
    crc = zlib.crc32(b[:12])
    b[12:16] = _U32.pack(crc)
    off = S.HEADER_SIZE
    while off + 12 <= len(b):
        (n,) = _U32.unpack_from(b, off + 4)
        head = zlib.crc32(b[off:off + 8], crc)
        b[off + 8:off + 12] = _U32.pack(head)
        end = off + 12 + n
        if end + 4 > len(b):
            break
        crc = zlib.crc32(b[off + 12:end], head)
        b[end:end + 4] = _U32.pack(crc)
        off = end + 4
    return bytes(b)


WRITE = {
    S.Setup: lambda w, r: w.setup(r.params),
    S.SevSession: lambda w, r: w.sev_session(r.policy, r.pdh, r.session),
    S.SharedPage: lambda w, r: w.shared_page(r.gfn, r.data),
    S.EncryptedPage: lambda w, r: w.encrypted_page(r.gfn, r.hdr, r.trans),
    S.HelperPage: lambda w, r: w.helper_page(r.gfn, r.seq, r.packet),
    S.ZeroPages: lambda w, r: w.zero_pages(r.gfn, r.npages),
    S.Iteration: lambda w, r: w.iteration(r.iteration, r.dirty_pages, r.stop),
    S.VcpuState: lambda w, r: w.vcpu_state(r.vcpu_id, r.data),
    S.EncryptedPages: lambda w, r: w.encrypted_batch(r.gfns, r.hdrs, r.trans),
    S.SharedPages: lambda w, r: w.shared_batch(r.gfns, r.data),
    S.HelperPages: lambda w, r: w.helper_batch(r.gfns, r.seqs, r.packets),
}


def comparable(rec):
    """A record as compared across a rewrite: SETUP by its canonical JSON (NaN != NaN)."""
    return json.dumps(rec.params, sort_keys=True) if isinstance(rec, S.Setup) else rec


def check_rewrite(recs, flags, stream):
    """The accepted records, written again (batches unsplit), read back the same; without
    SETUP (whose JSON the writer formats its own way) the bytes are the very same too."""
    sink = Sink()
    w = S.StreamWriter(sink, flags, batch_pages=1 << 20)
    for rec in recs[:-1]:
        WRITE[type(rec)](w, rec)
    w.end()
    again = S.StreamReader(Bytes(bytes(sink.data), 1 << 30)).read_all()
    assert list(map(comparable, again)) == list(map(comparable, recs)), (again, recs)
    if not any(isinstance(r, S.Setup) for r in recs):
        assert bytes(sink.data) == stream[:len(sink.data)], "the rewrite differs"


def TestOneInput(data):
    """One stream: read it all; check the outcome against the contract."""
    if not data:
        return
    opt, stream = data[0], data[1:]
    if opt & FIX_CRCS:
        stream = fix_crcs(stream)
    r = S.StreamReader(Bytes(stream, CHUNKS[opt >> 2 & 3]), buffer_size=BUFFER_SIZES[opt & 3],
                       reuse=bool(opt & 1 << 4))
    recs = []
    try:
        while (rec := r.read()) is not None:
            recs.append(rec)
    except StreamError as e:
        assert isinstance(e.offset, int) and 0 <= e.offset <= len(stream), e.offset
        assert e.record in (None, len(recs)), (e.record, len(recs))
        assert f"byte {e.offset}" in str(e), str(e)
        try:
            r.read()
        except StreamError as again:
            assert again is e, "errors must be sticky"
        else:
            raise AssertionError("a reader that raised read on")
        return
    assert r.offset == r.stats.transferred <= len(stream)
    if not r.reuse:                     # with reuse, batch records share one buffer
        check_rewrite(recs, r.flags, stream)


if __name__ == "__main__":
    fuzzutil.main(TestOneInput, "stream")
