"""The bulk guest-memory kernel (csrc/guest.c through sevcore.core.pages.GuestPageOps) against known
answers and against the page-by-page reference (sevcore/_reference/guest.py), on every CPU path."""
import ctypes
import ctypes.util
import errno
import hashlib

import numpy as np
import pytest
from hypothesis import event, given
from hypothesis import strategies as st

from sevcore._bindings import ffi, lib
from sevcore._reference import guest as ref
from sevcore._reference.rmp import Rmp as RefRmp
from sevcore.core.pages import (
    GUEST_OP_CHECK, GUEST_OP_DIGEST, GUEST_OP_FILL, GUEST_OP_PATTERN, GUEST_OP_READ,
    GUEST_OP_STAMP, GUEST_OP_WRITE, NO_MISMATCH, PAGE_SIZE, WRITE_OPS, GuestPageOps, digest,
    pattern,
)
from sevcore.hw.hostmem import HostMemory
from sevcore.hw.rmp import Rmp
from sevcore.core.memcrypt import AES128_XEX, AES256_XTS, MemoryEngine
from sevcore.core.npt import GFN_LIMIT, NPT_DIRTY_LOG, NPT_PRIVATE, NPT_WRITABLE, Npt

from support import raises_errno
from support.cpu_paths import PAGES

OPS = [GUEST_OP_READ, GUEST_OP_WRITE, GUEST_OP_FILL, GUEST_OP_PATTERN, GUEST_OP_CHECK,
       GUEST_OP_STAMP, GUEST_OP_DIGEST]
W, P, DL = NPT_WRITABLE, NPT_PRIVATE, NPT_DIRTY_LOG
NFRAMES = 40
ENGINES = {
    None: None,
    "xex": MemoryEngine(AES128_XEX, bytes(range(16))),
    "xts": MemoryEngine(AES256_XTS, bytes(range(64))),
}

pytestmark = pytest.mark.cpu_paths(PAGES)         # cpu_path: avx512, avx2, portable


class Guest:
    """An Npt over a small host, the same frames twice (C's and the reference's), dirty slots."""

    def __init__(self, entries, base_gfn=0x1000, frame_seed=0, slot_cuts=()):
        """``entries[i]``: None (absent) or (pfn, flags) for gfn base_gfn + i. The slots split
        the range at ``slot_cuts`` (offsets), each with a few bits already set."""
        self.base = base_gfn
        self.npt = Npt()
        for i, e in enumerate(entries):
            if e is not None:
                self.npt.map(base_gfn + i, e[0], e[1])
        rng = np.random.default_rng(frame_seed)
        self.frames = rng.integers(0, 256, NFRAMES * PAGE_SIZE, dtype=np.uint8)
        self.ref_frames = self.frames.copy()
        self.ops = GuestPageOps(self.npt, self.frames)
        self.ref = ref.GuestPageOps(self.npt, self.ref_frames)
        bounds = [0, *sorted(set(c for c in slot_cuts if 0 < c < len(entries))), len(entries)]
        self.slots = []
        for lo, hi in zip(bounds, bounds[1:]):
            words = np.zeros((hi - lo + 63) // 64, np.uint64)
            words[0] = 1 << ((lo * 7) % (hi - lo))  # one bit set before the call
            self.slots.append((base_gfn + lo, hi - lo, words))
        self.ops.set_dirty_slots(self.slots)
        self.ref.set_dirty_slots(self.slots)

    def dirty(self):
        """The set dirty gfns per slot, read from the C side's words."""
        out = []
        for base, npages, words in self.slots:
            bits = np.unpackbits(words.view(np.uint8), bitorder="little")[:npages]
            out.append({base + int(i) for i in np.flatnonzero(bits)})
        return out

    def close(self):
        self.ops.close()
        self.npt.close()


def frame(g, pfn):
    return g.frames[pfn * PAGE_SIZE:(pfn + 1) * PAGE_SIZE]


# --- known answers ------------------------------------------------------------------------------

def test_pattern_is_splitmix64_known_answer():
    """The pattern stream is splitmix64 from state 0 (Vigna's published outputs) and the pinned
    page prefix and hash do not drift."""
    assert ref.splitmix64(0, 3) == [0xE220A8397B1DCDAF, 0x6E789E6AA1B965F4, 0x06C45D188009454F]
    assert ref.splitmix64(1234567, 1) == [6457827717110365317]
    page = pattern(0, 0)
    assert page[:16].hex() == "101921841f2a01aa4bb1855e4c1c5926"
    assert hashlib.sha256(pattern(0xDEADBEEF, 0x12345)).hexdigest() == (
        "179307b8857d672fd882bab9310a322f48c14fe88a8c94efe196f0ed666a20e2")
    key = ref.mix64(ref.splitmix64(0xDEADBEEF, 1)[0] ^ 0x12345)
    words = np.frombuffer(pattern(0xDEADBEEF, 0x12345), "<u8")
    assert (words ^ np.uint64(key)).tolist() == ref.splitmix64(0, 512)


@pytest.mark.parametrize("seed, gfn", [(0, 0), (1, 2), (2**64 - 1, GFN_LIMIT - 1), (77, 511)])
def test_pattern_matches_reference(cpu_path, seed, gfn):
    """C's pattern page is the reference's, on every path."""
    assert pattern(seed, gfn) == ref.pattern(seed, gfn)


def test_patterns_differ_in_every_word_across_gfns_and_seeds():
    """Two gfns under one seed, or one gfn under two seeds, give pages that differ in every word."""
    a = np.frombuffer(pattern(5, 100), "<u8")
    for other in (pattern(5, 101), pattern(5, 100 + 512), pattern(6, 100)):
        assert (a != np.frombuffer(other, "<u8")).all()
    assert len(set(a.tolist())) == 512


# XXH3_64bits() of libxxhash 0.8.1 (Debian libxxhash0), computed once and pinned.
XXH3_VECTORS = [
    (bytes(PAGE_SIZE), 0x93D76FE148C689BA),
    (bytes(range(256)) * 16, 0xEB4B7C3707879151),
    (pattern(0, 0), 0x4EEC46F7B10668CE),
]


@pytest.mark.parametrize("page, expected", XXH3_VECTORS)
def test_digest_is_xxh3_64_known_answers(cpu_path, page, expected):
    """DIGEST of a page is its XXH3-64, in C on every path and in the reference."""
    assert digest(page) == expected
    assert ref.xxh3_64(page) == expected


def _libxxhash():
    name = ctypes.util.find_library("xxhash")
    if name is None:
        return None
    lib_ = ctypes.CDLL(name)
    lib_.XXH3_64bits.restype = ctypes.c_uint64
    lib_.XXH3_64bits.argtypes = [ctypes.c_char_p, ctypes.c_size_t]
    return lib_


def test_digest_matches_libxxhash(cpu_path, rng):
    """On random pages DIGEST equals XXH3_64bits() of the system's libxxhash."""
    xxh = _libxxhash()
    if xxh is None:
        pytest.skip("libxxhash not installed")
    for _ in range(50):
        page = rng.integers(0, 256, PAGE_SIZE, dtype=np.uint8).tobytes()
        assert digest(page) == xxh.XXH3_64bits(page, PAGE_SIZE)


# --- every op against the reference ---------------------------------------------------------------

R = 20  # gfns in the generated region


@st.composite
def cases(draw):
    private = draw(st.booleans())
    own = P if private else 0
    good = st.sampled_from([own | W, own | W | DL])
    # Absent, read-only (a fault for writes only), or the other kind of mapping.
    bad = st.sampled_from([None, own, own | DL, (P - own) | W, (P - own) | W | DL])
    faulting = draw(st.sets(st.integers(0, R - 1), max_size=draw(st.sampled_from([0, 1, 3, 8]))))
    entries = []
    for i, pfn in enumerate(draw(st.permutations(range(NFRAMES)))[:R]):
        f = draw(bad if i in faulting else good)
        entries.append(None if f is None else (pfn, f))
    op = draw(st.sampled_from(OPS))
    if draw(st.booleans()):
        gfns = draw(st.lists(st.integers(0, R - 1), min_size=1, max_size=12))
        start, n = None, len(gfns)
    else:
        start = draw(st.integers(0, R - 1))
        gfns, n = None, draw(st.integers(1, R - start))
    return dict(
        path=draw(st.sampled_from(PAGES.runnable())), private=private, entries=entries, op=op,
        engine=draw(st.sampled_from(list(ENGINES))),
        base=draw(st.sampled_from([0, 0x1000, 512 - 7, 512**2 - 13, GFN_LIMIT - R])),
        gfns=gfns, start=start, n=n, arg=draw(st.integers(0, 2**64 - 1)),
        slot_cuts=draw(st.lists(st.integers(1, R - 1), max_size=3)),
        unseeded=draw(st.sets(st.integers(0, R - 1), max_size=4)),
        frame_seed=draw(st.integers(0, 2**32 - 1)))


def _seed_patterns(g, case, engine):
    """Write the CHECK-expected plaintext into some mapped frames (both copies), so CHECK sees
    matches as well as mismatches."""
    for i, e in enumerate(case["entries"]):
        if e is not None and i not in case["unseeded"]:
            spa = e[0] * PAGE_SIZE
            data = ref.pattern(case["arg"], g.base + i)
            if engine is not None:
                data = bytes(engine.encrypt_page(data, spa))
            for frames in (g.frames, g.ref_frames):
                frames[spa:spa + PAGE_SIZE] = np.frombuffer(data, np.uint8)


@given(cases())
def test_each_op_matches_reference(case):
    """Every op, on generated mixes of absent, private, read-only and dirty-logged entries, in
    plaintext and under both engines, over gfn lists and ranges, returns what the reference
    returns and leaves the same frames, buffers, outputs and dirty bits."""
    g = Guest(case["entries"], case["base"], case["frame_seed"], case["slot_cuts"])
    engine = ENGINES[case["engine"]]
    op, n = case["op"], case["n"]
    if op == GUEST_OP_CHECK:
        _seed_patterns(g, case, engine)
    if case["gfns"] is not None:
        where = dict(gfns=np.array([g.base + i for i in case["gfns"]], np.uint64))
    else:
        where = dict(gfn0=g.base + case["start"], n=n)
    rng = np.random.default_rng(case["frame_seed"])
    buf = out = None
    if op in (GUEST_OP_READ, GUEST_OP_WRITE):
        buf = rng.integers(0, 256, n * PAGE_SIZE, dtype=np.uint8)
    if op in (GUEST_OP_CHECK, GUEST_OP_DIGEST):
        out = np.full(2 if op == GUEST_OP_CHECK else n, 7, np.uint64)
    ref_buf = None if buf is None else buf.copy()
    ref_out = None if out is None else out.copy()
    kw = dict(private=case["private"], engine=engine, arg=case["arg"])
    try:
        with PAGES.restricted(case["path"]):
            done = g.ops.run(op, **where, buf=buf, out=out, **kw)
        expected = g.ref.run(op, **where, buf=ref_buf, out=ref_out, **kw)
        assert done == expected
        event("no page" if done == 0 else "all pages" if done == n else "stopped part way")
        assert np.array_equal(g.frames, g.ref_frames)
        if buf is not None:
            assert np.array_equal(buf, ref_buf)
        if out is not None:
            assert out.tolist() == ref_out.tolist()
        assert g.dirty() == g.ref.dirty
    finally:
        g.close()


# --- stopping and resuming ------------------------------------------------------------------------

@pytest.mark.parametrize("why, flags, private", [
    ("absent", None, False),
    ("shared entry, private access", W, True),
    ("private entry, shared access", P | W, False),
    ("read-only entry, write", 0, False),
])
def test_stops_in_front_of_the_faulting_page(cpu_path, why, flags, private):
    """A write stops at the page that faults and touches nothing from it on; a read stops at
    the same page unless the fault is only read-only."""
    own = P if private else 0
    entries = [(pfn, own | W) for pfn in range(8)]
    entries[5] = None if flags is None else (5, flags)
    g = Guest(entries)
    before = g.frames.copy()
    try:
        assert g.ops.run(GUEST_OP_FILL, gfn0=g.base, n=8, arg=0xAB, private=private) == 5
        assert (g.frames[:5 * PAGE_SIZE].view("<u8") == 0xAB).all()
        assert np.array_equal(g.frames[5 * PAGE_SIZE:], before[5 * PAGE_SIZE:])
        out = np.zeros(8, np.uint64)
        read_stop = 8 if flags == 0 else 5
        assert g.ops.run(GUEST_OP_DIGEST, gfn0=g.base, n=8, private=private, out=out) == read_stop
    finally:
        g.close()


def test_fault_and_resume_equals_one_call_on_a_mapped_guest(cpu_path):
    """Faulting pages in where the kernel stops and resuming there leaves the same memory as one
    call over the guest mapped up front."""
    n = 1100  # across two leaf-table boundaries
    pfn_of = lambda i: (i * 7) % n  # noqa: E731
    frames_a = np.zeros(n * PAGE_SIZE, np.uint8)
    frames_b = np.zeros(n * PAGE_SIZE, np.uint8)
    eng = ENGINES["xts"]
    with Npt() as lazy, Npt() as full:
        for i in range(n):
            full.map(i, pfn_of(i), W)
        ops = GuestPageOps(lazy, frames_a)
        done, calls = 0, 0
        while done < n:
            done += ops.run(GUEST_OP_PATTERN, gfn0=done, n=n - done, arg=9, engine=eng)
            calls += 1
            for i in range(done, min(done + 100, n)):     # a batch of faults
                lazy.map(i, pfn_of(i), W)
        assert calls == 12
        assert GuestPageOps(full, frames_b).run(GUEST_OP_PATTERN, gfn0=0, n=n, arg=9,
                                                engine=eng) == n
        assert np.array_equal(frames_a, frames_b)
        out = np.zeros(2, np.uint64)
        assert ops.run(GUEST_OP_CHECK, gfn0=0, n=n, arg=9, engine=eng, out=out) == n
        assert out.tolist() == [0, NO_MISMATCH]
        ops.close()


# --- ops in detail --------------------------------------------------------------------------------

@pytest.mark.parametrize("engine", list(ENGINES))
def test_pattern_then_check_finds_exactly_the_corrupted_pages(cpu_path, engine):
    """CHECK passes on PATTERN's pages, counts every corrupted page without stopping and names
    the first; encrypted pages hold the engine's ciphertext of the pattern at their SPA."""
    eng = ENGINES[engine]
    g = Guest([(pfn, W) for pfn in (3, 9, 4, 30, 31, 0)])
    try:
        assert g.ops.run(GUEST_OP_PATTERN, gfn0=g.base, n=6, arg=42, engine=eng) == 6
        want = pattern(42, g.base + 2)
        if eng is not None:
            want = bytes(eng.encrypt_page(want, 4 * PAGE_SIZE))
        assert frame(g, 4).tobytes() == want
        out = np.zeros(2, np.uint64)
        assert g.ops.run(GUEST_OP_CHECK, gfn0=g.base, n=6, arg=42, engine=eng, out=out) == 6
        assert out.tolist() == [0, NO_MISMATCH]
        frame(g, 30)[100] ^= 1
        frame(g, 0)[4095] ^= 0x80
        assert g.ops.run(GUEST_OP_CHECK, gfn0=g.base, n=6, arg=42, engine=eng, out=out) == 6
        assert out.tolist() == [2, 3]
        assert g.ops.run(GUEST_OP_CHECK, gfn0=g.base, n=6, arg=43, engine=eng, out=out) == 6
        assert out.tolist() == [6, 0]
    finally:
        g.close()


@pytest.mark.parametrize("engine", list(ENGINES))
def test_write_read_round_trip_and_stamp_keeps_the_rest(cpu_path, engine, rng):
    """WRITE then READ returns the data; STAMP changes the first 8 bytes only; FILL repeats the
    word; DIGEST hashes the plaintext."""
    eng = ENGINES[engine]
    g = Guest([(pfn, W) for pfn in range(10, 15)])
    try:
        data = rng.integers(0, 256, 5 * PAGE_SIZE, dtype=np.uint8)
        gfns = np.array([g.base + i for i in (4, 0, 2)], np.uint64)
        assert g.ops.run(GUEST_OP_WRITE, gfns, buf=data[:3 * PAGE_SIZE], engine=eng) == 3
        assert g.ops.run(GUEST_OP_STAMP, gfns[:1], arg=0x1122334455667788, engine=eng) == 1
        back = bytearray(3 * PAGE_SIZE)
        assert g.ops.run(GUEST_OP_READ, gfns, buf=back, engine=eng) == 3
        expect = bytearray(data[:3 * PAGE_SIZE].tobytes())
        expect[:8] = (0x1122334455667788).to_bytes(8, "little")
        assert back == expect
        out = np.zeros(3, np.uint64)
        assert g.ops.run(GUEST_OP_DIGEST, gfns, out=out, engine=eng) == 3
        assert out.tolist() == [digest(expect[i * PAGE_SIZE:(i + 1) * PAGE_SIZE]) for i in range(3)]
        assert g.ops.run(GUEST_OP_FILL, gfn0=g.base, n=5, arg=0x0102030405060708, engine=eng) == 5
        assert g.ops.run(GUEST_OP_READ, gfn0=g.base, n=1, buf=back, engine=eng) == 1
        assert back[:PAGE_SIZE] == bytes(range(8, 0, -1)) * 512
    finally:
        g.close()


def test_zero_pages_do_nothing_but_check_reports_no_mismatch():
    """n = 0 returns 0 for every op, writes nothing, and CHECK still reports (0, none)."""
    g = Guest([(0, W)])
    before = g.frames.copy()
    try:
        for op in OPS:
            out = np.full(2, 5, np.uint64)
            assert g.ops.run(op, gfn0=g.base, n=0, buf=bytearray(), out=out) == 0
            assert out.tolist() == ([0, NO_MISMATCH] if op == GUEST_OP_CHECK else [5, 5])
        assert g.ops.run(GUEST_OP_FILL, gfns=[]) == 0
        assert np.array_equal(g.frames, before)
    finally:
        g.close()


@pytest.mark.parametrize("op", [GUEST_OP_READ, GUEST_OP_WRITE, GUEST_OP_FILL, GUEST_OP_PATTERN])
@pytest.mark.parametrize("misalign", [0, 8])
def test_large_calls_match_the_same_pages_in_small_calls(op, misalign):
    """A call of more than 4096 pages (streaming stores where frames or buf allow) leaves the
    memory, buffer and dirty bits that calls of 1000 pages leave, logged pages included."""
    n = 4700
    pfns = np.random.default_rng(1).permutation(n)
    data = np.random.default_rng(2).integers(0, 256, n * PAGE_SIZE + 64, dtype=np.uint8)
    results = []
    with Npt() as npt:
        for gfn, pfn in enumerate(pfns.tolist()):
            npt.map(gfn, pfn, W | (DL if gfn % 7 == 3 else 0))
        for chunk in (n, 1000):
            backing = data.copy()
            frames = backing[misalign:misalign + n * PAGE_SIZE]
            buf = np.zeros(n * PAGE_SIZE + 64, np.uint8)[misalign:misalign + n * PAGE_SIZE]
            if op == GUEST_OP_WRITE:
                buf[:] = data[::-1][:buf.size]
            words = np.zeros((n + 63) // 64, np.uint64)
            ops = GuestPageOps(npt, frames)
            ops.set_dirty_slots([(0, n, words)])
            for lo in range(0, n, chunk):
                hi = min(n, lo + chunk)
                assert ops.run(op, gfn0=lo, n=hi - lo, arg=0xC0FFEE,
                               buf=buf[lo * PAGE_SIZE:hi * PAGE_SIZE]) == hi - lo
            ops.close()
            results.append((frames.copy(), buf.copy(), words.copy()))
    (fa, ba, wa), (fb, bb, wb) = results
    assert np.array_equal(fa, fb) and np.array_equal(ba, bb) and np.array_equal(wa, wb)
    logged = np.unpackbits(wa.view(np.uint8), bitorder="little")[:n]
    assert np.flatnonzero(logged).tolist() == (
        list(range(3, n, 7)) if op in WRITE_OPS else [])
    if op == GUEST_OP_PATTERN:
        assert frame_of(fa, pfns[4321]) == pattern(0xC0FFEE, 4321)
    elif op == GUEST_OP_READ:
        assert ba[4321 * PAGE_SIZE:4322 * PAGE_SIZE].tobytes() == frame_of(fa, pfns[4321])


def frame_of(frames, pfn):
    return frames[pfn * PAGE_SIZE:(pfn + 1) * PAGE_SIZE].tobytes()


# --- dirty logging --------------------------------------------------------------------------------

@pytest.mark.parametrize("op", OPS)
def test_dirty_bits_are_set_exactly_for_written_logged_pages(cpu_path, op):
    """A write sets the bits of the pages it wrote through DIRTY_LOG entries, in the right slot,
    and no others; a read sets none; bits already set stay set."""
    flags = [W | DL, W, W | DL, W | DL, W, W | DL, W | DL, W]
    g = Guest([(i, f) for i, f in enumerate(flags)], slot_cuts=(3, 5))
    g.slots[1][2][0] |= np.uint64(0b10)  # gfn base + 4, not logged by its entry
    g.ops.set_dirty_slots(g.slots)
    before = g.dirty()
    buf = np.zeros(8 * PAGE_SIZE, np.uint8)
    out = np.zeros(8, np.uint64)
    try:
        gfns = np.array([g.base + i for i in (6, 0, 1, 3, 4)], np.uint64)
        assert g.ops.run(op, gfns, buf=buf, out=out) == 5
        after = g.dirty()
        if op in WRITE_OPS:
            written = {g.base + i for i in (6, 0, 3)}
            assert set().union(*after) == set().union(*before) | written
            assert g.base + 3 in after[1] and g.base + 6 in after[2] and g.base in after[0]
        else:
            assert after == before
    finally:
        g.close()


def test_many_slots_are_found_by_binary_search(rng):
    """With 100 one-to-five-page slots, each logged write lands in its own slot's bitmap."""
    sizes = rng.integers(1, 6, 100)
    n = int(sizes.sum())
    starts = np.concatenate([[0], np.cumsum(sizes)[:-1]]) + 0x5000
    slots = [(int(s), int(k), np.zeros(1, np.uint64)) for s, k in zip(starts, sizes)]
    frames = np.zeros(n * PAGE_SIZE, np.uint8)
    with Npt() as npt:
        npt.map(0x5000, 0, W | DL, npages=n)
        ops = GuestPageOps(npt, frames)
        ops.set_dirty_slots(slots)
        gfns = rng.permutation(n)[:n // 3].astype(np.uint64) + np.uint64(0x5000)
        assert ops.run(GUEST_OP_STAMP, gfns, arg=1) == gfns.size
        got = {base + int(i) for base, k, words in slots
               for i in np.flatnonzero(np.unpackbits(words.view(np.uint8), bitorder="little")[:k])}
        assert got == set(gfns.tolist())
        ops.close()


# --- refusals ------------------------------------------------------------------------------------

class Raw:
    """A ctx built by hand over a 16-frame host with gfns 0x10..0x17 mapped (0x14-0x17 dirty
    logged into one slot), for calling sc_guest_pages with one argument wrong."""

    def __init__(self):
        self.frames = np.arange(16 * PAGE_SIZE, dtype=np.uint64).astype(np.uint8)
        self.npt = Npt()
        self.npt.map(0x10, 2, W, npages=4)
        self.npt.map(0x14, 6, W | DL, npages=4)
        self.words = np.zeros(1, np.uint64)
        self.buf = np.full(4 * PAGE_SIZE + 8, 0xEE, np.uint8)
        self.out = np.full(8, 3, np.uint64)
        self.gfns = np.array([0x10, 0x11, 0x15, 0x16], np.uint64)
        self.slots = ffi.new("struct sc_guest_slot[]", 2)
        self.slots[0] = (0x14, 4, ffi.from_buffer("uint64_t[]", self.words))
        self.slots[1] = (0x40, 4, ffi.from_buffer("uint64_t[]", self.words))
        self.ctx = ffi.new("struct sc_guest_ctx *")
        self.ctx.npt = self.npt._p()
        self.ctx.frames = ffi.from_buffer("uint8_t[]", self.frames)
        self.ctx.frames_size = self.frames.size
        self.ctx.slots = self.slots
        self.ctx.nslots = 1
        self.err = ffi.new("struct sc_err *")
        self.snapshot = self.state()

    def state(self):
        return (self.frames.tobytes(), self.buf.tobytes(), self.out.tolist(), self.words.tolist())

    def call(self, op=GUEST_OP_WRITE, gfns=True, gfn0=0x10, n=4, buf=None, buf_size=None,
             out=None, out_len=8, ctx=None):
        g = ffi.from_buffer("uint64_t[]", self.gfns) if gfns is True else gfns
        b = ffi.from_buffer("uint8_t[]", self.buf) if buf is None else buf
        o = ffi.from_buffer("uint64_t[]", self.out) if out is None else out
        size = 4 * PAGE_SIZE if buf_size is None else buf_size
        return lib.sc_guest_pages(self.ctx if ctx is None else ctx, op, g, gfn0, n, 0x77, b, size,
                                  o, out_len, self.err)


def _frames_ptr(r, offset):
    return ffi.cast("uint8_t *", r.ctx.frames) + offset


E, F = -errno.EINVAL, -errno.EFAULT

BAD_CALLS = [
    # (what is wrong, how, expected return, the reason C gives, the page or slot it names)
    ("no ctx", lambda r: r.call(ctx=ffi.NULL), E, "NULL", None),
    ("no npt", lambda r: setattr(r.ctx, "npt", ffi.NULL) or r.call(), E, "NULL", None),
    ("no frames", lambda r: setattr(r.ctx, "frames", ffi.NULL) or r.call(), E, "NULL", None),
    ("op 0", lambda r: r.call(op=0), E, "GUEST_OP", None),
    ("op 8", lambda r: r.call(op=8), E, "GUEST_OP", None),
    ("no buf", lambda r: r.call(buf=ffi.NULL), E, "GUEST_BUF_SIZE", None),
    ("short buf", lambda r: r.call(buf_size=4 * PAGE_SIZE - 1), E, "GUEST_BUF_SIZE", None),
    ("short READ buf", lambda r: r.call(op=GUEST_OP_READ, buf_size=PAGE_SIZE), E,
     "GUEST_BUF_SIZE", None),
    ("buf in frames", lambda r: r.call(buf=_frames_ptr(r, 15 * PAGE_SIZE)), E,
     "GUEST_BUF_OVERLAP", None),
    ("READ buf over gfns", lambda r: r.call(op=GUEST_OP_READ, buf=ffi.cast(
        "uint8_t *", ffi.from_buffer("uint64_t[]", r.gfns))), E, "GUEST_BUF_OVERLAP", None),
    ("no out", lambda r: r.call(op=GUEST_OP_DIGEST, out=ffi.NULL), E, "GUEST_OUT_SIZE", None),
    ("short DIGEST out", lambda r: r.call(op=GUEST_OP_DIGEST, out_len=3), E, "GUEST_OUT_SIZE",
     None),
    ("short CHECK out", lambda r: r.call(op=GUEST_OP_CHECK, out_len=1), E, "GUEST_OUT_SIZE",
     None),
    ("misaligned out", lambda r: r.call(op=GUEST_OP_CHECK, out=ffi.cast(
        "uint64_t *", ffi.cast("uint8_t *", ffi.from_buffer("uint64_t[]", r.out)) + 4),
        out_len=2), E, "MISALIGNED", None),
    ("out in frames", lambda r: r.call(op=GUEST_OP_DIGEST, out=ffi.cast(
        "uint64_t *", _frames_ptr(r, 8 * PAGE_SIZE))), E, "GUEST_OUT_OVERLAP", None),
    ("out over gfns", lambda r: r.call(op=GUEST_OP_DIGEST, out=ffi.from_buffer(
        "uint64_t[]", r.gfns)), E, "GUEST_OUT_OVERLAP", None),
    ("gfn >= 2^36", lambda r: r.gfns.__setitem__(3, GFN_LIMIT) or r.call(), E, "GUEST_GFN", 3),
    ("misaligned gfns", lambda r: r.call(gfns=ffi.cast("uint64_t *", ffi.cast(
        "uint8_t *", ffi.from_buffer("uint64_t[]", r.gfns)) + 1), n=2), E, "MISALIGNED", None),
    ("range past 2^36", lambda r: r.call(gfns=ffi.NULL, gfn0=GFN_LIMIT - 1, n=2), E, "GUEST_RUN",
     None),
    ("n > 2^36", lambda r: r.call(gfns=ffi.NULL, gfn0=0, n=GFN_LIMIT + 1), E, "GUEST_COUNT",
     None),
    ("slots unsorted", lambda r: setattr(r.ctx, "nslots", 2) or setattr(
        r.slots[1], "base_gfn", 0x10) or r.call(), E, "GUEST_SLOT_ORDER", 1),
    ("slots overlap", lambda r: setattr(r.ctx, "nslots", 2) or setattr(
        r.slots[1], "base_gfn", 0x17) or r.call(), E, "GUEST_SLOT_ORDER", 1),
    ("empty slot", lambda r: setattr(r.slots[0], "npages", 0) or r.call(), E, "GUEST_SLOT", 0),
    ("slot past 2^36", lambda r: setattr(r.slots[0], "npages", GFN_LIMIT) or r.call(), E,
     "GUEST_SLOT", 0),
    ("slot without bitmap", lambda r: setattr(r.slots[0], "dirty_bitmap", ffi.NULL) or r.call(),
     E, "NULL", 0),
    ("no slots array", lambda r: setattr(r.ctx, "slots", ffi.NULL) or r.call(), E, "NULL", None),
    ("logged write outside every slot", lambda r: setattr(r.slots[0], "base_gfn", 0x15) or r.call(
        gfns=ffi.NULL, gfn0=0x12, n=3), E, "GUEST_UNLOGGED", 2),
    ("frame outside host memory", lambda r: r.npt.map(0x11, 16, W) or r.call(), F,
     "GUEST_FRAME", 1),
    ("last frame cut short", lambda r: setattr(r.ctx, "frames_size", 8 * PAGE_SIZE - 1) or r.call(
        op=GUEST_OP_READ), F, "GUEST_FRAME", 2),
]


@pytest.mark.parametrize("what, how, expected, reason, index", BAD_CALLS,
                         ids=[c[0] for c in BAD_CALLS])
def test_raw_refusals_return_errno_and_write_nothing(what, how, expected, reason, index):
    """Each bad argument, or a page that cannot be served safely, is refused with its errno and
    the reason (and page or slot) C names, before any frame, buffer, output or dirty bit
    changes."""
    r = Raw()
    try:
        assert r.call() == 4  # the unperturbed call works (on a copy of the state)
        r.frames[:] = np.frombuffer(r.snapshot[0], np.uint8)
        r.words[:] = 0
        assert how(r) == expected
        assert r.err.reason == getattr(lib, "SC_ERR_" + reason)
        if index is not None:
            assert r.err.index == index
        assert r.state() == r.snapshot
    finally:
        r.npt.close()


def test_pages_past_the_stop_are_not_checked():
    """A bad frame or an unlogged slot behind the faulting page does not refuse the call."""
    r = Raw()
    try:
        r.npt.map(0x13, 16, W)       # outside host memory, behind the hole
        r.npt.unmap(0x12)
        assert r.call(gfns=ffi.NULL, gfn0=0x10, n=4, op=GUEST_OP_FILL) == 2
        assert r.call(gfns=ffi.NULL, gfn0=0x10, n=4, op=GUEST_OP_READ) == 2
    finally:
        r.npt.close()


def test_reads_through_logged_entries_need_no_slot():
    """A read through a DIRTY_LOG entry outside every slot is served: only writes mark pages."""
    r = Raw()
    try:
        r.ctx.nslots = 0
        assert r.call(op=GUEST_OP_DIGEST) == 4
        assert r.call(op=GUEST_OP_WRITE) == -errno.EINVAL
    finally:
        r.npt.close()


@pytest.mark.parametrize("kw, match", [
    (dict(op=99, gfn0=0x1000, n=1), "unknown guest op"),
    (dict(op=GUEST_OP_WRITE, gfn0=0x1000, n=2, buf=bytes(PAGE_SIZE)), "needs a buf of 8192"),
    (dict(op=GUEST_OP_READ, gfn0=0x1000, n=1), "needs a buf"),
    (dict(op=GUEST_OP_DIGEST, gfn0=0x1000, n=2, out=np.zeros(1, np.uint64)), "2 uint64 words"),
    (dict(op=GUEST_OP_CHECK, gfn0=0x1000, n=2), "2 uint64 words"),
    (dict(op=GUEST_OP_FILL, gfn0=GFN_LIMIT - 1, n=2), "run past the guest space"),
    (dict(op=GUEST_OP_FILL, gfns=[0x1000, GFN_LIMIT]), r"must be in \[0"),
    (dict(op=GUEST_OP_FILL, gfns=[0x1000], n=2), "gfns holds 1"),
    (dict(op=GUEST_OP_FILL, gfns=[1.5]), None),
    (dict(op=GUEST_OP_FILL, gfn0=-1, n=1), "gfn0 = -1 is not a u64"),
    (dict(op=GUEST_OP_FILL, gfns=[0x1000, -1]), r"gfns\[1\] = -1 is not a u64"),
    (dict(op=GUEST_OP_FILL, gfns=np.array([0x1000, 0x1001, -1], np.int64)),
     r"gfns\[2\] = -1 is not a u64"),
    (dict(op=GUEST_OP_FILL), "give gfns"),
])
def test_friendly_errors_name_the_problem(kw, match):
    """GuestPageOps.run raises ValueError or TypeError naming the bad argument, writing nothing."""
    g = Guest([(0, W), (1, W)])
    before = g.frames.copy()
    try:
        with pytest.raises((ValueError, TypeError), match=match):
            g.ops.run(**kw)
        assert np.array_equal(g.frames, before)
    finally:
        g.close()


def test_unsorted_slots_and_closed_objects_are_refused():
    """Overlapping slots are named at the next run; a closed Npt, engine or GuestPageOps raise
    ValueError; an out-of-frame entry raises OSError(EFAULT)."""
    g = Guest([(0, W | DL), (1, W)])
    try:
        g.ops.set_dirty_slots([(0x1000, 4, np.zeros(1, np.uint64)),
                               (0x1002, 4, np.zeros(1, np.uint64))])
        with pytest.raises(ValueError, match="sorted and disjoint"):
            g.ops.run(GUEST_OP_FILL, gfn0=0x1000, n=1)
        with pytest.raises(ValueError, match="cannot hold 65 pages"):
            g.ops.set_dirty_slots([(0x1000, 65, np.zeros(1, np.uint64))])
        g.ops.set_dirty_slots([])
        with pytest.raises(ValueError, match="no dirty slot"):
            g.ops.run(GUEST_OP_FILL, gfn0=0x1000, n=1)
        g.npt.map(0x1001, NFRAMES, W)
        with raises_errno(errno.EFAULT):
            g.ops.run(GUEST_OP_READ, gfn0=0x1001, n=1, buf=bytearray(PAGE_SIZE))
        eng = MemoryEngine(AES128_XEX, bytes(16))
        eng.close()
        with pytest.raises(ValueError, match="closed"):
            g.ops.run(GUEST_OP_FILL, gfn0=0x1000, n=1, engine=eng)
        g.npt.close()
        with pytest.raises(ValueError, match="closed Npt"):
            g.ops.run(GUEST_OP_FILL, gfn0=0x1000, n=1)
        g.ops.close()
        with pytest.raises(ValueError, match="closed GuestPageOps"):
            g.ops.run(GUEST_OP_FILL, gfn0=0x1000, n=1)
    finally:
        g.close()


def test_close_lets_host_memory_be_unmapped():
    """After GuestPageOps.close the host frames are no longer exported, so HostMemory can close."""
    mem = HostMemory(size=4 << 20)
    with Npt() as npt:
        pfn = int(mem.alloc(1)[0])
        npt.map(7, pfn, W)
        ops = GuestPageOps(npt, mem.frames)
        assert ops.run(GUEST_OP_FILL, gfn0=7, n=1, arg=3) == 1
        assert mem.frame(pfn)[:8].tobytes() == (3).to_bytes(8, "little")
        ops.close()
    mem.close()


# --- the RMP's validation check (an SEV-SNP guest's private accesses) ----------------------------

RMP_ASID = 5


@given(states=st.lists(st.sampled_from(["valid", "unvalidated", "other asid", "unassigned"]),
                       min_size=R, max_size=R),
       op=st.sampled_from([GUEST_OP_FILL, GUEST_OP_DIGEST]), private=st.booleans())
def test_rmp_check_matches_reference(states, op, private):
    """With an RMP, a private access stops in front of the first page whose frame is not
    validated by the guest's ASID, as the reference does, and a shared access ignores it."""
    own = P if private else 0
    g = Guest([(pfn, own | W) for pfn in range(R)])
    rmps = Rmp(NFRAMES), RefRmp(NFRAMES)
    for pfn, state in enumerate(states):
        gpa = (g.base + pfn) << 12
        for rmp in rmps:
            if state != "unassigned":
                asid = RMP_ASID + (state == "other asid")
                assert rmp.rmp_make_private(pfn, gpa, asid) == 0
                if state != "unvalidated":
                    assert rmp.pvalidate(pfn, gpa=gpa, asid=asid, validate=True) == (0, 0)
    out, ref_out = np.zeros(R, np.uint64), np.zeros(R, np.uint64)
    try:
        done = g.ops.run(op, gfn0=g.base, n=R, private=private, arg=0x77, out=out,
                         rmp=rmps[0].cdata(), asid=RMP_ASID)
        expected = g.ref.run(op, gfn0=g.base, n=R, private=private, arg=0x77, out=ref_out,
                             rmp=rmps[1], asid=RMP_ASID)
        assert done == expected
        first_bad = next((i for i, s in enumerate(states) if s != "valid"), R)
        assert done == (first_bad if private else R)
        assert np.array_equal(g.frames, g.ref_frames) and out.tolist() == ref_out.tolist()
    finally:
        g.close()


def test_calls_from_threads_at_once_each_use_their_own_context():
    """Threads reading the same pages at once, one through the memory engine and one in
    plaintext, each get their own access's result every time (no call sees another's
    engine or kind of access)."""
    import threading
    eng = ENGINES["xex"]
    g = Guest([(pfn, W) for pfn in range(NFRAMES)])
    try:
        n = NFRAMES
        plain = g.frames.copy().reshape(n, PAGE_SIZE)
        clear = np.stack([np.frombuffer(eng.decrypt_page(plain[i].tobytes(), i * PAGE_SIZE),
                                        np.uint8) for i in range(n)])
        bad = []

        def reader(engine, want):
            buf = np.empty((n, PAGE_SIZE), np.uint8)
            for _ in range(200):
                assert g.ops.run(GUEST_OP_READ, gfn0=g.base, n=n, buf=buf, engine=engine) == n
                if not np.array_equal(buf, want):
                    bad.append(engine)
        threads = [threading.Thread(target=reader, args=a)
                   for a in ((eng, clear), (None, plain), (eng, clear), (None, plain))]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert bad == []
    finally:
        g.close()
