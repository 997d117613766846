"""The migration stream: a framed, versioned, checksummed sequence of typed records.

Layout (docs/migration-stream.md has every field; integers are big-endian, as QEMUFile's):

    header   magic "SEVMIG\\r\\n" (8) | be16 version | be16 flags | be32 CRC-32 of the 12 bytes before
    record   be16 type | be16 reserved (0) | be32 payload_len | be32 head_crc | payload | be32 crc
    ...
    END      the last record: be64 number of records before it

The checksums run: ``head_crc = crc32(frame head, running)``, ``crc = crc32(payload, head_crc)``,
and ``crc`` becomes the running value, seeded with the header's CRC. So a flipped bit anywhere, a
dropped, duplicated or reordered record is refused at the first frame it touches, and a corrupt
length is caught (by the head CRC) before it is used to read anything.

>>> w = StreamWriter(channel)                       # writes the header
>>> w.sev_session(policy, pdh, session); w.encrypted_page(gfn, hdr, ct); w.end()
>>> for rec in StreamReader(channel): ...           # records, each verified before it is yielded

Batch records (ENCRYPTED_PAGES, SHARED_PAGES, HELPER_PAGES) carry many pages in one frame: the
writer builds the payload with numpy in one pass (``w.encrypted_batch(gfns, hdrs, trans)``) and
the reader hands on an object of numpy views into a buffer of its own (``rec.gfns``,
``rec.hdrs``, ``rec.trans``), with no per-page Python work on either side. CRCs run in C
(sevcore.core.checksum).

A reader yields a record only after its checksum and layout are verified and raises a
``StreamError`` subclass (errors.py) at the first bad byte: nothing after that point is handed
on. ``read_all()`` returns the records only if the stream is complete up to a valid END, so a
target that wants all or nothing gets it.
"""
import json
import struct
import zlib
from dataclasses import dataclass

import numpy as np

from sevcore.core.arrays import byte_rows, u64
from sevcore.core.checksum import crc32
from sevcore.migration.errors import (BadMagic, BadRecord, ChecksumMismatch, StreamTruncated,
                                      UnsupportedFlags, UnsupportedVersion)

MAGIC = b"SEVMIG\r\n"
VERSION = 1
#: Header flags: the stream carries pages of an encrypted guest; private pages travel through the
#: in-guest migration helper rather than the PSP.
FLAG_ENCRYPTED = 1 << 0
FLAG_HELPER = 1 << 1
KNOWN_FLAGS = FLAG_ENCRYPTED | FLAG_HELPER

PAGE_SIZE = 4096
#: Largest payload a reader accepts (refused as BadRecord before any allocation).
MAX_PAYLOAD = 1 << 24
#: Deepest nesting of SETUP's JSON (containers, the top object included) that a writer writes
#: and a reader accepts; deeper is ValueError / BadRecord.
MAX_JSON_DEPTH = 32
#: Pages per batch record the writer makes by default (about 1 MiB of encrypted pages).
BATCH_PAGES = 256
_SMALL = 1 << 16              # bytes below which zlib computes a CRC (see _crc)

HEADER = struct.Struct(">8sHHI")
FRAME = struct.Struct(">HHII")            # type, reserved, payload_len, head_crc
_HEAD = struct.Struct(">HHI")             # the part head_crc covers
_U32 = struct.Struct(">I")                # lengths, ids and the CRC-32 trailers
HEADER_SIZE = HEADER.size                 # 16
FRAME_OVERHEAD = FRAME.size + _U32.size   # 16

_U32X2 = struct.Struct(">II")             # policy, pdh_len (SEV session)
_GFN = struct.Struct(">Q")
_GFN_SEQ = struct.Struct(">QQ")
_ZERO = struct.Struct(">QI")
_ITER = struct.Struct(">IIQ")
_HDR_LEN = struct.Struct(">QI")           # gfn, hdr_len (encrypted page)

#: ITERATION flags: the source stopped the guest; what follows is the stop-and-copy.
ITER_STOP = 1 << 0
MAX_GFN = (1 << 64) - 1


# -- records -----------------------------------------------------------------------------------------

@dataclass(frozen=True, slots=True)
class Setup:
    """Migration parameters, a JSON object (the first record)."""
    params: dict
    TYPE = 1


@dataclass(frozen=True, slots=True)
class SevSession:
    """What SEND_START produced, as QEMU sends it: policy, the source's PDH, the 128-byte session."""
    policy: int
    pdh: bytes
    session: bytes
    TYPE = 2


@dataclass(frozen=True, slots=True)
class SharedPage:
    """A shared (plaintext) page of guest frame ``gfn``."""
    gfn: int
    data: bytes
    TYPE = 3


@dataclass(frozen=True, slots=True)
class EncryptedPage:
    """A SEND_UPDATE_DATA packet of ``gfn``: the 52-byte header and the ciphertext."""
    gfn: int
    hdr: bytes
    trans: bytes
    TYPE = 4


@dataclass(frozen=True, slots=True)
class HelperPage:
    """A page sealed by the in-guest migration helper: an opaque AEAD packet and its sequence
    number, which the target's helper checks."""
    gfn: int
    seq: int
    packet: bytes
    TYPE = 5


@dataclass(frozen=True, slots=True)
class ZeroPages:
    """``npages`` zero pages from ``gfn`` (QEMU's duplicate pages)."""
    gfn: int
    npages: int
    TYPE = 6


@dataclass(frozen=True, slots=True)
class Iteration:
    """A dirty-sync marker: pre-copy pass ``iteration`` begins with ``dirty_pages`` to send; with
    ``stop`` the guest is paused and what follows is the stop-and-copy (downtime)."""
    iteration: int
    dirty_pages: int
    stop: bool = False
    TYPE = 7


@dataclass(frozen=True, slots=True)
class VcpuState:
    """The state of vCPU ``vcpu_id`` (opaque to the stream: registers, or a VMSA packet)."""
    vcpu_id: int
    data: bytes
    TYPE = 8


@dataclass(frozen=True, slots=True)
class End:
    """The last record; ``nrecords`` is how many records came before it."""
    nrecords: int
    TYPE = 9


class _Batch:
    """A batch record as the reader hands it on: numpy views of one payload buffer that the
    record owns (the reader never reuses it), read-only, without a copy per page. ``gfns`` is a
    uint64 array. Iterating yields the equivalent single-page records (copies; for tests and
    tools, not for hot paths)."""

    __slots__ = ()
    FIELDS = ()

    def __init__(self, *columns):
        for name, column in zip(self.FIELDS, columns, strict=True):
            setattr(self, name, column)

    def __len__(self):
        return len(self.gfns)

    def __iter__(self):
        columns = (getattr(self, f) for f in self.FIELDS)
        return map(self.SINGLE, *(c.tolist() if c.ndim == 1 else map(bytes, c) for c in columns))

    def __eq__(self, other):
        return type(other) is type(self) and all(
            np.array_equal(getattr(self, f), getattr(other, f)) for f in self.FIELDS)

    def __repr__(self):
        sizes = ", ".join(f"{f}={getattr(self, f).shape}" for f in self.FIELDS)
        return f"{type(self).__name__}(n={len(self)}, {sizes})"


class EncryptedPages(_Batch):
    """ENCRYPTED_PAGES: SEND_UPDATE_DATA packets of ``len(gfns)`` pages; ``hdrs`` and ``trans``
    are ``(n, hdr_len)`` and ``(n, trans_len)`` uint8 views (every page of a record has the same
    two lengths)."""
    __slots__ = FIELDS = ("gfns", "hdrs", "trans")
    TYPE, SINGLE = 10, EncryptedPage

    @property
    def hdr_len(self):
        return self.hdrs.shape[1]

    @property
    def trans_len(self):
        return self.trans.shape[1]


class SharedPages(_Batch):
    """SHARED_PAGES: ``len(gfns)`` plaintext pages; ``data`` is an ``(n, 4096)`` uint8 view."""
    __slots__ = FIELDS = ("gfns", "data")
    TYPE, SINGLE = 11, SharedPage


class HelperPages(_Batch):
    """HELPER_PAGES: ``len(gfns)`` migration-helper packets of one length; ``seqs`` is a uint64
    array, ``packets`` an ``(n, packet_len)`` uint8 view."""
    __slots__ = FIELDS = ("gfns", "seqs", "packets")
    TYPE, SINGLE = 12, HelperPage

    @property
    def packet_len(self):
        return self.packets.shape[1]


RECORD_TYPES = {cls.TYPE: cls for cls in (Setup, SevSession, SharedPage, EncryptedPage,
                                          HelperPage, ZeroPages, Iteration, VcpuState, End,
                                          EncryptedPages, SharedPages, HelperPages)}
TYPE_NAMES = {t: cls.__name__ for t, cls in RECORD_TYPES.items()}
BATCH_RECORDS = (EncryptedPages.TYPE, SharedPages.TYPE, HelperPages.TYPE)


# -- statistics --------------------------------------------------------------------------------------

class StreamStats:
    """Bytes and records per record type and per phase, counted identically by writer and reader.

    Phases: ``setup`` (header and records before the first ITERATION), ``precopy`` (after an
    ITERATION without stop), ``downtime`` (from an ITERATION with stop). QEMU has no setup bytes,
    so ``precopy_bytes`` includes them, and ``transferred = precopy_bytes + downtime_bytes``.
    """

    def __init__(self):
        self.header_bytes = 0
        self.records = dict.fromkeys(TYPE_NAMES.values(), 0)
        self.bytes = dict.fromkeys(TYPE_NAMES.values(), 0)
        self.phase = "setup"
        self.phase_bytes = {"setup": 0, "precopy": 0, "downtime": 0}
        self.normal = 0             # pages sent whole (shared, encrypted, helper)
        self.duplicate = 0          # zero pages

    def _header(self, n):
        self.header_bytes += n
        self.phase_bytes[self.phase] += n

    def _record(self, rtype, nbytes, rec_pages=0, zero_pages=0, stop=None):
        if stop is not None:
            self.phase = "downtime" if stop or self.phase == "downtime" else "precopy"
        name = TYPE_NAMES[rtype]
        self.records[name] += 1
        self.bytes[name] += nbytes
        self.phase_bytes[self.phase] += nbytes
        self.normal += rec_pages
        self.duplicate += zero_pages

    @property
    def transferred(self):
        return sum(self.phase_bytes.values())

    @property
    def nrecords(self):
        return sum(self.records.values())

    def qemu(self):
        """The byte and page counters as QEMU's query-migrate names them."""
        return {"transferred": self.transferred,
                "precopy-bytes": self.phase_bytes["setup"] + self.phase_bytes["precopy"],
                "downtime-bytes": self.phase_bytes["downtime"],
                "normal": self.normal, "normal-bytes": self.normal * PAGE_SIZE,
                "duplicate": self.duplicate}

    def __eq__(self, other):
        return isinstance(other, StreamStats) and vars(self) == vars(other)

    def __repr__(self):
        return f"StreamStats({self.qemu()}, records={self.records})"


# -- writer ------------------------------------------------------------------------------------------

def _view(b):
    """A flat byte view of any buffer (bytes, bytearray, memoryview, numpy array)."""
    return b if type(b) is bytes else memoryview(b).cast("B")


def _u32_len(b, what):
    n = memoryview(b).nbytes
    if n > 0xFFFFFFFF:
        raise ValueError(f"{what} of {n} bytes does not fit a be32 length")
    return n


def _crc(data, crc):
    """The running CRC-32 over ``data``: zlib's for up to a few pages, the C kernel
    (sevcore.core.checksum, the same CRC at several times the speed) for more. The C call releases
    the GIL, which pays for a batch payload but, for one page, mostly hands the GIL to the
    other end's thread and waits to get it back."""
    return zlib.crc32(data, crc) if len(data) < _SMALL else crc32(data, crc)


def _too_deep(text):
    """Whether the JSON ``text`` (bytes) nests deeper than MAX_JSON_DEPTH: no deeper than its
    opening brackets (in strings or not) number, which a ``bytes.count`` each tells for the small
    records of a migration's control messages; otherwise :func:`_json_depth`."""
    if text.count(b"{") + text.count(b"[") <= MAX_JSON_DEPTH:
        return False
    return _json_depth(text) > MAX_JSON_DEPTH


def _json_depth(text, chunk=1 << 20):
    """How deeply the lists and objects of the JSON ``text`` (bytes) nest, ``[]`` being 1,
    counted on the brackets outside strings without parsing: two ``bytes.replace`` and a few
    numpy passes, linear in the text whatever it holds (``chunk`` bounds the int32 scratch).
    For valid JSON it is the nesting json.loads recurses through; for text json refuses, at
    least the nesting it reaches before the error (up to there the text is valid, and both
    read strings alike)."""
    # Escapes out, pairs first, left to right as JSON reads them: a quote left is a delimiter.
    text = text.replace(b"\\\\", b"__").replace(b'\\"', b"__")
    b = np.frombuffer(text, np.uint8)
    outside = ~np.logical_xor.accumulate(b == ord('"'))
    folded = b | 0x20                               # "[" -> "{", "]" -> "}"
    steps = (((folded == ord("{")) & outside).view(np.int8)
             - ((folded == ord("}")) & outside).view(np.int8))
    depth = top = 0
    for lo in range(0, steps.size, chunk):
        running = np.cumsum(steps[lo:lo + chunk], dtype=np.int32) + depth
        top, depth = max(top, int(running.max())), int(running[-1])
    return top


def _check_int(v, lo, hi, what):
    if isinstance(v, bool) or not isinstance(v, int) or not lo <= v <= hi:
        raise ValueError(f"{what} must be an int in [{lo}, {hi}], not {v!r}")
    return v


def _columns(buf, head, stride, n):
    """``column(offset, dtype or width)``: one field of each of ``n`` rows of ``stride`` bytes
    after ``head`` bytes of ``buf``, as a strided ``(n,)`` view of that dtype or ``(n, width)``
    bytes; a view of a read-only buffer is read-only."""
    def column(offset, kind):
        if isinstance(kind, int):
            return np.ndarray((n, kind), np.uint8, buf, head + offset, (stride, 1))
        return np.ndarray((n,), kind, buf, head + offset, (stride,))
    return column


class StreamWriter:
    """Writes a migration stream to a channel (anything with ``send(bytes)``).

    The header goes out at construction. Records are buffered and sent in chunks of about
    ``flush_size`` bytes (a large batch payload goes out as it is); ``end()`` writes END and
    flushes. A batch call writes records of at most ``batch_pages`` pages. Arguments are checked (TypeError,
    ValueError) before anything of the record is buffered. ``stats`` counts what was written.
    """

    def __init__(self, channel, flags=0, *, version=VERSION, flush_size=1 << 20,
                 batch_pages=BATCH_PAGES):
        if flags & ~KNOWN_FLAGS and version == VERSION:
            raise ValueError(f"unknown stream flags {flags & ~KNOWN_FLAGS:#x}")
        _check_int(batch_pages, 1, 1 << 20, "batch_pages")
        self.channel = channel
        self.flush_size = flush_size
        self.batch_pages = batch_pages
        self.stats = StreamStats()
        self.ended = False
        head = HEADER.pack(MAGIC, version, flags, 0)[:12]
        self._crc = zlib.crc32(head)
        self._buf = bytearray(head + _U32.pack(self._crc))
        self._payload = np.empty(0, np.uint8)       # batch payloads, reused (see _batches)
        self.stats._header(HEADER_SIZE)

    def _frame(self, rtype, parts, **count):
        if self.ended:
            raise ValueError("the stream has ended")
        n = sum(map(len, parts))
        if n > MAX_PAYLOAD:
            raise ValueError(f"{TYPE_NAMES[rtype]} payload of {n} bytes exceeds {MAX_PAYLOAD}")
        head = _HEAD.pack(rtype, 0, n)
        crc = zlib.crc32(head, self._crc)
        buf = self._buf
        buf += head
        buf += _U32.pack(crc)
        for p in parts:
            crc = _crc(p, crc)
            buf += p
        buf += _U32.pack(crc)
        self._crc = crc
        self.stats._record(rtype, n + FRAME_OVERHEAD, **count)
        if len(buf) >= self.flush_size:
            self.flush()

    def flush(self):
        """Send what is buffered."""
        if self._buf:
            self.channel.send(self._buf)
            self._buf = bytearray()

    def setup(self, params):
        """SETUP: a JSON-serialisable dict of migration parameters."""
        if not isinstance(params, dict):
            raise TypeError(f"params must be a dict, not {type(params).__name__}")
        deep = f"params nest deeper than {MAX_JSON_DEPTH} lists and dicts"
        try:
            text = json.dumps(params, sort_keys=True).encode()
        except RecursionError:      # json's encoder recurses once per level
            raise ValueError(deep) from None
        if _too_deep(text):
            raise ValueError(deep)
        self._frame(Setup.TYPE, [text])

    def sev_session(self, policy, pdh, session):
        """SEV_SESSION: be32 policy, be32 pdh_len, PDH, be32 session_len, session (QEMU's order)."""
        _check_int(policy, 0, 0xFFFFFFFF, "policy")
        pdh, session = bytes(pdh), bytes(session)
        self._frame(SevSession.TYPE, [_U32.pack(policy), _U32.pack(_u32_len(pdh, "pdh")), pdh,
                                      _U32.pack(_u32_len(session, "session")), session])

    def shared_page(self, gfn, data):
        """SHARED_PAGE: be64 gfn, the 4096 plaintext bytes."""
        _check_int(gfn, 0, MAX_GFN, "gfn")
        data = _view(data)
        if len(data) != PAGE_SIZE:
            raise ValueError(f"a shared page is {PAGE_SIZE} bytes, not {len(data)}")
        self._frame(SharedPage.TYPE, [_GFN.pack(gfn), data], rec_pages=1)

    def encrypted_page(self, gfn, hdr, trans):
        """ENCRYPTED_PAGE: be64 gfn, then what QEMU sends per page: be32 hdr_len, header (52),
        be32 trans_len, ciphertext (4096)."""
        _check_int(gfn, 0, MAX_GFN, "gfn")
        hdr, trans = _view(hdr), _view(trans)
        tl = _u32_len(trans, "trans")
        if tl == 0:
            raise ValueError("an encrypted page needs a non-empty ciphertext")
        self._frame(EncryptedPage.TYPE, [_HDR_LEN.pack(gfn, _u32_len(hdr, "hdr")), hdr,
                                         _U32.pack(tl), trans], rec_pages=1)

    def encrypted_pages(self, gfns, hdrs, trans):
        """ENCRYPTED_PAGE records for a batch: ``hdrs`` is ``n * 52`` bytes and ``trans`` is
        ``n * 4096`` bytes (what a batch of SEND_UPDATE_DATA wrote). Every argument is checked
        before the first record is buffered."""
        gfns = list(gfns)
        n = len(gfns)
        h, t = memoryview(_view(hdrs)), memoryview(_view(trans))
        if h.nbytes != 52 * n or t.nbytes != PAGE_SIZE * n:
            raise ValueError(f"{n} pages need {52 * n} header and {PAGE_SIZE * n} ciphertext "
                             f"bytes, not {h.nbytes} and {t.nbytes}")
        for gfn in gfns:
            _check_int(gfn, 0, MAX_GFN, "gfn")
        trans_len = _U32.pack(PAGE_SIZE)
        for i, gfn in enumerate(gfns):
            self._frame(EncryptedPage.TYPE, [_HDR_LEN.pack(gfn, 52), h[52 * i:52 * i + 52],
                                             trans_len, t[PAGE_SIZE * i:PAGE_SIZE * (i + 1)]],
                        rec_pages=1)

    def helper_page(self, gfn, seq, packet):
        """HELPER_PAGE: be64 gfn, be64 sequence number, the helper's AEAD packet."""
        _check_int(gfn, 0, MAX_GFN, "gfn")
        _check_int(seq, 0, MAX_GFN, "seq")
        packet = _view(packet)
        if len(packet) == 0:
            raise ValueError("a helper packet cannot be empty")
        self._frame(HelperPage.TYPE, [_GFN_SEQ.pack(gfn, seq), packet], rec_pages=1)

    # -- batch records: one frame per record, the payload built by numpy in one pass ----------

    def encrypted_batch(self, gfns, hdrs, trans):
        """ENCRYPTED_PAGES: ``be32 npages``, then per page ``be64 gfn`` and QEMU's bytes
        ``be32 hdr_len, header, be32 trans_len, ciphertext``. ``hdrs`` and ``trans`` are ``n``
        rows of one length each (2-D uint8 arrays, any strides, or flat buffers that split
        evenly). As many records as ``batch_pages`` and MAX_PAYLOAD need; everything is checked
        (TypeError, ValueError) before the first is buffered."""
        g = u64(gfns, "gfns", ndim=1)
        h, t = byte_rows(hdrs, len(g), "hdrs"), byte_rows(trans, len(g), "trans")

        def fill(lo, n, hcol, tcol):
            hcol[:] = h[lo:lo + n]
            tcol[:] = t[lo:lo + n]
        self.encrypted_batch_fill(g, fill, h.shape[1], t.shape[1])

    def encrypted_batch_fill(self, gfns, fill, hdr_len, trans_len):
        """ENCRYPTED_PAGES records whose packets are written in place: for each record,
        ``fill(lo, n, hdrs, trans)`` writes the packets of pages ``gfns[lo:lo + n]`` into
        ``hdrs`` and ``trans``, writable ``(n, hdr_len)`` and ``(n, trans_len)`` uint8 views of
        the record (rows strided), as a batched SEND_UPDATE_DATA's ``out`` pair does. If
        ``fill`` raises, that record is not written and the exception propagates."""
        g = u64(gfns, "gfns", ndim=1)
        hl, tl = _check_int(hdr_len, 0, MAX_PAYLOAD, "hdr_len"), \
            _check_int(trans_len, 0, MAX_PAYLOAD, "trans_len")
        if len(g) and not tl:
            raise ValueError("encrypted pages need a non-empty ciphertext")
        for lo, n, buf, col in self._batches(len(g), 4, 16 + hl + tl):
            col(0, ">u8")[:] = g[lo:lo + n]
            col(8, ">u4")[:] = hl
            col(12 + hl, ">u4")[:] = tl
            fill(lo, n, col(12, hl), col(16 + hl, tl))
            self._frame_payload(EncryptedPages.TYPE, buf, n)

    def shared_batch(self, gfns, data):
        """SHARED_PAGES: ``be32 npages``, then per page ``be64 gfn`` and 4096 plaintext bytes;
        ``data`` is ``n`` pages (an ``(n, 4096)`` uint8 array or ``n * 4096`` bytes)."""
        g = u64(gfns, "gfns", ndim=1)
        d = byte_rows(data, len(g), "data")
        if len(g) and d.shape[1] != PAGE_SIZE:
            raise ValueError(f"shared pages are {PAGE_SIZE} bytes, not {d.shape[1]}")
        for lo, n, buf, col in self._batches(len(g), 4, 8 + PAGE_SIZE):
            col(0, ">u8")[:] = g[lo:lo + n]
            col(8, PAGE_SIZE)[:] = d[lo:lo + n]
            self._frame_payload(SharedPages.TYPE, buf, n)

    def helper_batch(self, gfns, seqs, packets):
        """HELPER_PAGES: ``be32 npages, be32 packet_len``, then per page ``be64 gfn, be64 seq``
        and the packet; the packets are ``n`` rows of one (non-zero) length."""
        g, q = u64(gfns, "gfns", ndim=1), u64(seqs, "seqs", ndim=1)
        if len(q) != len(g):
            raise ValueError(f"{len(g)} gfns but {len(q)} sequence numbers")
        p = byte_rows(packets, len(g), "packets")

        def fill(lo, n, qcol, pcol):
            qcol[:] = q[lo:lo + n]
            pcol[:] = p[lo:lo + n]
        self.helper_batch_fill(g, fill, p.shape[1])

    def helper_batch_fill(self, gfns, fill, packet_len):
        """HELPER_PAGES records whose packets are written in place: for each record,
        ``fill(lo, n, seqs, packets)`` writes the sequence numbers and packets of pages
        ``gfns[lo:lo + n]`` into ``seqs`` (a writable ``(n,)`` big-endian uint64 view) and
        ``packets`` (a writable ``(n, packet_len)`` uint8 view, rows strided). If ``fill``
        raises, that record is not written and the exception propagates."""
        g = u64(gfns, "gfns", ndim=1)
        pl = _check_int(packet_len, 0, MAX_PAYLOAD, "packet_len")
        if len(g) and not pl:
            raise ValueError("a helper packet cannot be empty")
        for lo, n, buf, col in self._batches(len(g), 8, 16 + pl):
            _U32.pack_into(buf, 4, pl)
            col(0, ">u8")[:] = g[lo:lo + n]
            fill(lo, n, col(8, ">u8"), col(16, pl))
            self._frame_payload(HelperPages.TYPE, buf, n)

    def _batches(self, npages, head, stride):
        """Payload buffers for ``npages`` pages of ``stride`` bytes after a ``head``-byte record
        head that starts with be32 npages: ``(first page, count, buffer, column)``, where
        ``column(offset, dtype or width)`` views one field of every page of the buffer. The
        buffer is the writer's own and reused by the next batch: ``_frame_payload`` copies or
        sends it before that (a channel's ``send`` takes all its bytes before it returns), so
        a batch allocates nothing once the first has run."""
        if self.ended:
            raise ValueError("the stream has ended")
        per = min(self.batch_pages, (MAX_PAYLOAD - head) // stride)
        if per < 1 or stride > 0xFFFFFFFF:
            raise ValueError(f"a page of {stride} bytes does not fit a record")
        for lo in range(0, npages, per):
            n = min(per, npages - lo)
            size = head + n * stride
            if self._payload.size < size:
                self._payload = np.empty(size, np.uint8)
            buf = self._payload[:size]
            _U32.pack_into(buf, 0, n)
            yield lo, n, buf, _columns(buf, head, stride, n)

    def _frame_payload(self, rtype, payload, npages):
        """Frame a batch payload: small ones go through the buffer, large ones are sent as they
        are, between the buffered frame head and the trailer."""
        n = payload.nbytes
        head = _HEAD.pack(rtype, 0, n)
        crc = zlib.crc32(head, self._crc)
        self._buf += head
        self._buf += _U32.pack(crc)
        crc = _crc(payload, crc)
        if n < self.flush_size // 4:
            self._buf += memoryview(payload)
        else:
            self.flush()
            self.channel.send(payload)
        self._buf += _U32.pack(crc)
        self._crc = crc
        self.stats._record(rtype, n + FRAME_OVERHEAD, rec_pages=npages)
        if len(self._buf) >= self.flush_size:
            self.flush()

    def zero_pages(self, gfn, npages=1):
        """ZERO_PAGES: be64 gfn, be32 npages (>= 1)."""
        _check_int(gfn, 0, MAX_GFN, "gfn")
        _check_int(npages, 1, 0xFFFFFFFF, "npages")
        self._frame(ZeroPages.TYPE, [_ZERO.pack(gfn, npages)], zero_pages=npages)

    def iteration(self, iteration, dirty_pages, stop=False):
        """ITERATION: be32 iteration, be32 flags (bit 0: guest stopped), be64 dirty pages."""
        _check_int(iteration, 0, 0xFFFFFFFF, "iteration")
        _check_int(dirty_pages, 0, MAX_GFN, "dirty_pages")
        self._frame(Iteration.TYPE, [_ITER.pack(iteration, ITER_STOP if stop else 0,
                                                dirty_pages)], stop=bool(stop))

    def vcpu_state(self, vcpu_id, data):
        """VCPU_STATE: be32 vcpu_id, the opaque state."""
        _check_int(vcpu_id, 0, 0xFFFFFFFF, "vcpu_id")
        self._frame(VcpuState.TYPE, [_U32.pack(vcpu_id), bytes(data)])

    def end(self):
        """END: be64 count of the records before it; flushes. Nothing can be written after."""
        self._frame(End.TYPE, [_GFN.pack(self.stats.nrecords)])
        self.ended = True
        self.flush()


# -- reader ------------------------------------------------------------------------------------------

class StreamReader:
    """Reads and verifies a migration stream from a channel (anything with ``recv_into``).

    Iterating yields records (Setup, SevSession, SharedPage, ...) until END, each only after its
    checksums and layout are verified. The first problem raises its StreamError subclass and
    every later call raises it again: nothing from the bad point on is delivered. ``stats`` counts
    what was accepted; ``version`` and ``flags`` are the header's once read.

    A batch record's arrays are read-only views of a buffer of its own; with ``reuse=True``
    that buffer is the reader's, reused by the next batch record, so a consumer that is done
    with each record before it reads the next (the migration target) allocates nothing per
    batch. Such a record is valid only until the next read.
    """

    def __init__(self, channel, *, buffer_size=1 << 20, reuse=False):
        self.channel = channel
        self.reuse = reuse
        self._own = np.empty(0, np.uint8)   # batch payloads when reused (see _payload)
        self._buf = bytearray(buffer_size)
        self._pos = self._end = 0
        self.offset = 0             # stream offset of _buf[_pos]
        self.stats = StreamStats()
        self.version = self.flags = None
        self.ended = False
        self._crc = None
        self._error = None
        self._index = 0
        self._lean = False          # the last record was a batch record

    # buffering

    def _fill(self, n, what, exact=False):
        """Make ``n`` bytes available at ``_pos``; raise StreamTruncated at the end of input.
        ``exact``: receive no more than that (after a batch record the next frame head is
        read alone, so the next batch's payload goes straight into its own buffer).

        A record larger than the buffer gets a new, larger buffer (``n`` is at most one frame,
        so at most MAX_PAYLOAD + 16 bytes): the old one is never resized, which a view of it
        (the caller's, or an exception's traceback) would forbid. Views of ``_buf`` taken
        before a call are stale after it."""
        while self._end - self._pos < n:
            if len(self._buf) - self._pos < n:          # compact, into a larger buffer if need be
                rem = self._end - self._pos
                buf = bytearray(n) if len(self._buf) < n else self._buf
                buf[:rem] = self._buf[self._pos:self._end]
                self._buf = buf
                self._pos, self._end = 0, rem
            stop = self._pos + n if exact else len(self._buf)
            got = self.channel.recv_into(memoryview(self._buf)[self._end:stop])
            if got == 0:
                have = self._end - self._pos
                raise StreamTruncated(f"the stream ended before END: {what} needs {n} bytes, "
                                      f"only {have} arrived", self.offset, self._index_or_none())
            self._end += got

    def _take(self, n):
        start = self._pos
        self._pos += n
        self.offset += n
        return start

    def _index_or_none(self):
        return None if self._crc is None else self._index

    def _fail(self, exc):
        self._error = exc
        raise exc

    # header and records

    def read_header(self):
        """Read and check the stream header (magic, version, flags, CRC); idempotent."""
        if self._crc is not None:
            return
        if self._error:
            raise self._error
        try:
            self._fill(8, "the magic")
            magic = bytes(self._buf[self._pos:self._pos + 8])
            if magic != MAGIC:
                raise BadMagic(f"not a sevcore migration stream: magic {magic!r}, expected "
                               f"{MAGIC!r}", 0)
            self._fill(HEADER_SIZE, "the stream header")
            _, version, flags, crc = HEADER.unpack_from(self._buf, self._pos)
            if version != VERSION:
                raise UnsupportedVersion(f"stream format version {version}; this reader "
                                         f"implements version {VERSION} only", version, 8)
            want = zlib.crc32(memoryview(self._buf)[self._pos:self._pos + 12])
            if crc != want:
                raise ChecksumMismatch(f"stream header CRC {crc:#010x}, computed {want:#010x}",
                                       12)
            if flags & ~KNOWN_FLAGS:
                raise UnsupportedFlags(f"unknown stream header flags {flags & ~KNOWN_FLAGS:#x}",
                                       10)
        except Exception as e:
            self._fail(e)
        self._take(HEADER_SIZE)
        self.version, self.flags, self._crc = version, flags, crc
        self.stats._header(HEADER_SIZE)

    def read(self):
        """The next verified record, or None after END. Raises a StreamError subclass."""
        if self._error:
            raise self._error
        if self.ended:
            return None
        self.read_header()
        try:
            rec, nbytes, count = self._read_record()
        except Exception as e:
            self._fail(e)
        self.stats._record(rec.TYPE, nbytes, **count)
        self._index += 1
        if rec.TYPE == End.TYPE:
            self.ended = True
        return rec

    def _read_record(self):
        start_off = self.offset
        self._fill(FRAME.size, "a record's frame head", exact=self._lean)
        rtype, reserved, n, head_crc = FRAME.unpack_from(self._buf, self._pos)
        mv = memoryview(self._buf)
        crc = zlib.crc32(mv[self._pos:self._pos + 8], self._crc)
        if crc != head_crc:
            raise ChecksumMismatch(f"frame head CRC {head_crc:#010x}, computed {crc:#010x} "
                                   "(corrupted, or a record was lost or reordered)",
                                   start_off, self._index)
        if rtype not in RECORD_TYPES:
            raise BadRecord(f"unknown record type {rtype}", start_off, self._index)
        name = TYPE_NAMES[rtype]
        if reserved:
            raise BadRecord(f"{name}: reserved field is {reserved:#x}, not 0", start_off,
                            self._index)
        if n > MAX_PAYLOAD:
            raise BadRecord(f"{name}: payload of {n} bytes exceeds {MAX_PAYLOAD}", start_off,
                            self._index)
        self._lean = rtype in BATCH_RECORDS
        if self._lean:
            payload = self._payload(n, name)
        else:
            self._fill(FRAME_OVERHEAD + n, f"a {name} record")
            p = self._pos + FRAME.size
            payload = memoryview(self._buf)[p:p + n + 4]
        crc = _crc(payload[:n], crc)
        (got,) = _U32.unpack_from(payload, n)
        if crc != got:
            raise ChecksumMismatch(f"{name} record CRC {got:#010x}, computed {crc:#010x}",
                                   start_off, self._index)
        try:
            if self._lean:
                payload.flags.writeable = False
                rec, count = _decode_batch(rtype, payload[:n])
            else:
                rec, count = _decode(rtype, payload[:n], self._index)
        except BadRecord as e:
            raise BadRecord(f"{name}: {e.args[0]}", start_off, self._index) from None
        if not self._lean:
            self._take(FRAME_OVERHEAD + n)
        self._crc = crc
        return rec, FRAME_OVERHEAD + n, count

    def _payload(self, n, name):
        """The payload and trailer of the batch record whose frame head is at ``_pos``, in a
        buffer of its own (the record's views keep it): what is already buffered is copied,
        the rest received straight into it (the reader's reused buffer with ``reuse``)."""
        if not self.reuse:
            own = np.empty(n + 4, np.uint8)
        else:
            if self._own.size < n + 4:
                self._own = np.empty(n + 4, np.uint8)
            own = self._own[:n + 4]
        p = self._pos + FRAME.size
        have = min(self._end - p, n + 4)
        own[:have] = memoryview(self._buf)[p:p + have]
        view = memoryview(own)
        while have < n + 4:
            got = self.channel.recv_into(view[have:])
            if got == 0:
                raise StreamTruncated(f"the stream ended before END: a {name} record needs "
                                      f"{FRAME_OVERHEAD + n} bytes, only {FRAME.size + have} "
                                      "arrived", self.offset, self._index)
            have += got
        self._pos = min(self._end, p + n + 4)
        self.offset += FRAME_OVERHEAD + n
        return own

    def __iter__(self):
        while (rec := self.read()) is not None:
            yield rec

    def read_all(self):
        """Every record up to and including END, or the StreamError of the first bad byte (then
        no record is returned at all)."""
        return list(self)


def _need(ok, message):
    if not ok:
        raise BadRecord(message)


def _decode_batch(rtype, arr):
    """Decode a verified batch payload (a read-only uint8 array the record then owns)."""
    n = arr.size
    head = 8 if rtype == HelperPages.TYPE else 4
    _need(n >= head, f"payload of {n} bytes is shorter than {head}")
    (count,) = _U32.unpack_from(arr, 0)
    _need(count >= 1, "npages is 0")
    if rtype == EncryptedPages.TYPE:
        _need(n >= 20, f"payload of {n} bytes is shorter than one page's head (20)")
        (hl,) = _U32.unpack_from(arr, 12)
        _need(n >= 20 + hl, f"hdr_len {hl} runs past the payload ({n} bytes)")
        (tl,) = _U32.unpack_from(arr, 16 + hl)
        stride = 16 + hl + tl
        _need(tl > 0 and n == 4 + count * stride,
              f"{count} pages of hdr_len {hl} and trans_len {tl} do not make the payload "
              f"({n} bytes)")
        col = _columns(arr, 4, stride, count)
        _need(bool(np.all(col(8, ">u4") == hl) and np.all(col(12 + hl, ">u4") == tl)),
              "the pages of a record must have equal hdr_len and equal trans_len")
        rec = EncryptedPages(col(0, ">u8").astype(np.uint64), col(12, hl), col(16 + hl, tl))
    elif rtype == SharedPages.TYPE:
        stride = 8 + PAGE_SIZE
        _need(n == 4 + count * stride, f"{count} pages need {4 + count * stride} bytes, not {n}")
        col = _columns(arr, 4, stride, count)
        rec = SharedPages(col(0, ">u8").astype(np.uint64), col(8, PAGE_SIZE))
    else:
        (pl,) = _U32.unpack_from(arr, 4)
        stride = 16 + pl
        _need(pl > 0 and n == 8 + count * stride,
              f"{count} packets of {pl} bytes do not make the payload ({n} bytes)")
        col = _columns(arr, 8, stride, count)
        rec = HelperPages(col(0, ">u8").astype(np.uint64), col(8, ">u8").astype(np.uint64),
                          col(16, pl))
    return rec, {"rec_pages": count}


def _decode(rtype, mv, index):
    """Decode one verified payload; returns ``(record, counts for StreamStats)``."""
    n = mv.nbytes
    if rtype == EncryptedPage.TYPE:
        _need(n >= 16, f"payload of {n} bytes is shorter than 16")
        gfn, hl = _HDR_LEN.unpack_from(mv, 0)
        _need(n >= 16 + hl, f"hdr_len {hl} runs past the payload ({n} bytes)")
        (tl,) = _U32.unpack_from(mv, 12 + hl)
        _need(tl > 0 and n == 16 + hl + tl, f"trans_len {tl} does not match the payload "
                                             f"({n} bytes with hdr_len {hl})")
        return EncryptedPage(gfn, bytes(mv[12:12 + hl]), bytes(mv[16 + hl:])), {"rec_pages": 1}
    if rtype == SharedPage.TYPE:
        _need(n == 8 + PAGE_SIZE, f"payload is {n} bytes, not {8 + PAGE_SIZE}")
        return SharedPage(_GFN.unpack_from(mv)[0], bytes(mv[8:])), {"rec_pages": 1}
    if rtype == HelperPage.TYPE:
        _need(n > 16, f"payload of {n} bytes has no packet")
        gfn, seq = _GFN_SEQ.unpack_from(mv)
        return HelperPage(gfn, seq, bytes(mv[16:])), {"rec_pages": 1}
    if rtype == ZeroPages.TYPE:
        _need(n == _ZERO.size, f"payload is {n} bytes, not {_ZERO.size}")
        gfn, npages = _ZERO.unpack(mv)
        _need(npages >= 1, "npages is 0")
        return ZeroPages(gfn, npages), {"zero_pages": npages}
    if rtype == Iteration.TYPE:
        _need(n == _ITER.size, f"payload is {n} bytes, not {_ITER.size}")
        it, flags, dirty = _ITER.unpack(mv)
        _need(not flags & ~ITER_STOP, f"unknown flags {flags:#x}")
        stop = bool(flags & ITER_STOP)
        return Iteration(it, dirty, stop), {"stop": stop}
    if rtype == SevSession.TYPE:
        _need(n >= 12, f"payload of {n} bytes is shorter than 12")
        policy, pl = _U32X2.unpack_from(mv)
        _need(n >= 12 + pl, f"pdh_len {pl} runs past the payload ({n} bytes)")
        (sl,) = _U32.unpack_from(mv, 8 + pl)
        _need(n == 12 + pl + sl, f"session_len {sl} does not match the payload ({n} bytes)")
        return SevSession(policy, bytes(mv[8:8 + pl]), bytes(mv[12 + pl:])), {}
    if rtype == Setup.TYPE:
        text = bytes(mv)
        # Checked before json.loads, which recurses once per level.
        _need(not _too_deep(text),
              f"parameters nest deeper than {MAX_JSON_DEPTH} lists and objects")
        try:
            params = json.loads(text.decode())
        except (UnicodeDecodeError, ValueError) as e:
            raise BadRecord(f"parameters are not JSON ({e})") from None
        _need(isinstance(params, dict), "parameters are not a JSON object")
        return Setup(params), {}
    if rtype == VcpuState.TYPE:
        _need(n >= 4, f"payload of {n} bytes is shorter than 4")
        return VcpuState(_U32.unpack_from(mv)[0], bytes(mv[4:])), {}
    # END
    _need(n == 8, f"payload is {n} bytes, not 8")
    (count,) = _GFN.unpack(mv)
    _need(count == index, f"END counts {count} records before it, the stream had {index}")
    return End(count), {}
