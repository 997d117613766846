"""Bitmaps in the KVM dirty-log layout: sevcore.core.bitmap.Bitmap and its C kernels (csrc/bitmap.c).

Known small cases pin the layout and the edges (bit 0, the 63/64 word boundary, a partial last
word, empty and full maps); hypothesis compares every kernel with the set-based reference in
sevcore/_reference/bitmap.py, directly and through a state machine; raw-binding tables pin the
errno of each bad argument. Every test runs once per kernel path: AVX-512 (VPOPCNTQ), scalar
POPCNT/BMI, and the portable C.
"""
import errno

import numpy as np
import pytest
from hypothesis import given, settings, strategies as st
from hypothesis.stateful import (RuleBasedStateMachine, initialize, invariant, rule,
                                 run_state_machine_as_test)

from sevcore import _bindings as _b
from sevcore._reference.bitmap import Bitmap as RefBitmap
from sevcore.core.bitmap import MAX_NBITS, Bitmap

from support.cpu_paths import BITMAP

ffi, lib = _b.ffi, _b.lib

pytestmark = pytest.mark.cpu_paths(BITMAP)        # cpu_path: avx512, avx2, popcnt, portable


@pytest.fixture(autouse=True)
def every_path(cpu_path):
    """Every test of this module runs once on each bitmap path."""
    return cpu_path


def make(nbits, bits, tail=0):
    """A Bitmap and its reference with ``bits`` set; ``tail`` fills the unused last-word bits."""
    bm = Bitmap.from_indices(nbits, sorted(bits))
    if nbits % 64:
        bm.words[-1] |= np.uint64((tail << (nbits % 64)) & ((1 << 64) - 1))
    return bm, RefBitmap.from_indices(nbits, bits)


def runs_of(bm, start=0, end=None):
    s, n = bm.runs(start, end)
    return list(zip(s.tolist(), n.tolist()))


# --- layout and edges ----------------------------------------------------------------------------

def test_layout_is_the_kernel_dirty_log_layout():
    """Bit i is bit i % 64 of word i // 64, little-endian within the array."""
    bm = Bitmap(200)
    for i in (0, 1, 63, 64, 127, 128, 199):
        bm.set(i)
    assert bm.words.tolist() == [1 | 2 | 1 << 63, 1 | 1 << 63, 1, 1 << 7]
    assert bm.words.dtype == np.uint64 and bm.words.size == 4


@pytest.mark.parametrize("nbits", [1, 2, 63, 64, 65, 127, 128, 129, 191, 640, 1000])
def test_edge_bits_are_found_by_every_kernel(nbits):
    """Bits 0, 63/64, 127/128 and the last bit are counted, found, iterated and harvested."""
    bits = {i for i in (0, 63, 64, 127, 128, nbits - 1) if i < nbits}
    bm, ref = make(nbits, bits)
    assert bm.count() == len(bits) == ref.count()
    assert bm.set_indices().tolist() == sorted(bits) == list(bm.iter_set())
    assert runs_of(bm) == list(ref.iter_runs()) == list(bm.iter_runs())
    assert bm.count_runs() == ref.count_runs()
    for s in range(nbits + 1):
        assert bm.find_next_set(s) == ref.find_next_set(s)
        assert bm.find_next_zero(s) == ref.find_next_zero(s)
    for i in range(nbits):
        assert bm.test(i) == (i in bits)
    assert bm.harvest().tolist() == sorted(bits)
    assert bm.count() == 0 and not bm.words.any()


@pytest.mark.parametrize("nbits", [1, 64, 65, 1000])
def test_empty_bitmap_reports_nothing(nbits):
    """A new bitmap has no set bits, no runs, nothing to harvest, and its first zero is bit 0."""
    bm = Bitmap(nbits)
    assert bm.count() == 0 and bm.count_runs() == 0
    assert bm.find_next_set() == nbits and bm.find_next_zero() == 0
    assert list(bm.iter_set()) == [] and list(bm.iter_runs()) == []
    assert bm.set_indices().size == 0 and bm.harvest().size == 0
    assert len(bm) == nbits and bm.words.size == (nbits + 63) // 64


@pytest.mark.parametrize("nbits", [1, 63, 64, 65, 1000])
def test_full_bitmap_is_one_run(nbits):
    """With every bit set there is one run [0, nbits), no zero, and harvest takes all of it."""
    bm = Bitmap(nbits)
    bm.set_range(0, nbits)
    assert bm.count() == nbits and bm.count_runs() == 1
    assert runs_of(bm) == [(0, nbits)] and list(bm.iter_runs()) == [(0, nbits)]
    assert bm.find_next_zero() == nbits and bm.find_next_set(nbits - 1) == nbits - 1
    assert bm.harvest().tolist() == list(range(nbits))
    assert bm.count() == 0


@pytest.mark.parametrize("nbits", [1, 65, 100, 1000])
def test_bits_past_nbits_are_ignored_and_kept(nbits):
    """Set bits beyond nbits in the last word are never reported, counted or changed."""
    words = np.zeros((nbits + 63) // 64, np.uint64)
    words[-1] = np.uint64(~((1 << (nbits % 64)) - 1) & ((1 << 64) - 1))
    garbage = int(words[-1])
    bm = Bitmap.from_words(words, nbits)
    assert bm.count() == 0 and bm.find_next_set() == nbits and bm.set_indices().size == 0
    assert bm.harvest().size == 0 and bm.count_runs() == 0
    bm.set_range(0, nbits)
    assert bm.count() == nbits and bm.find_next_zero() == nbits
    assert runs_of(bm) == [(0, nbits)] and bm.count_runs() == 1
    assert bm == Bitmap.from_indices(nbits, range(nbits))
    assert bm.harvest().tolist() == list(range(nbits))
    assert int(words[-1]) == garbage
    other = Bitmap(nbits)
    bm.or_(other, out=bm)
    bm.clear_all()
    assert int(words[-1]) == garbage and bm == other


def test_find_next_follows_linux_semantics():
    """find_next_* return nbits when nothing is found, including from a start at or past nbits."""
    bm = Bitmap(130)
    bm.set(129)
    assert bm.find_next_set(0) == 129 and bm.find_next_set(129) == 129
    assert bm.find_next_set(130) == 130 and bm.find_next_set(10**12) == 130
    assert bm.find_next_zero(129) == 130 and bm.find_next_zero(500) == 130


def test_set_range_across_words():
    """set_range and clear_range touch exactly [start, start + n) across word boundaries."""
    bm = Bitmap(300)
    bm.set_range(60, 200)
    assert bm.set_indices().tolist() == list(range(60, 260))
    bm.clear_range(63, 66)
    assert bm.set_indices().tolist() == list(range(60, 63)) + list(range(129, 260))
    bm.set_range(299, 1)
    bm.set_range(0, 0)
    bm.set_range(300, 0)
    assert bm.count() == 3 + 131 + 1


def test_from_words_shares_memory():
    """from_words wraps the caller's array: changes show through in both directions."""
    words = np.zeros(4, np.uint64)
    bm = Bitmap.from_words(words)
    assert len(bm) == 256 and bm.words is words
    bm.set(65)
    assert words[1] == 2
    words[3] = 1 << 63
    assert bm.test(255) and bm.find_next_set(66) == 255


def test_iter_set_streams_past_one_chunk():
    """iter_set yields every set bit in order when there are many more than one C chunk holds."""
    bits = list(range(3, 50000, 3))
    bm = Bitmap.from_indices(50000, bits)
    assert list(bm.iter_set()) == bits
    assert list(bm.iter_set(1000, 2000)) == [i for i in bits if 1000 <= i < 2000]
    runs = list(bm.iter_runs())
    assert runs == [(i, 1) for i in bits] and bm.count_runs() == len(bits)


def test_operators_and_in_place_forms():
    """&, |, - build new bitmaps; &=, |=, -= and out=self update in place and return self."""
    a = Bitmap.from_indices(100, [1, 2, 64, 99])
    b = Bitmap.from_indices(100, [2, 3, 64])
    assert (a & b).set_indices().tolist() == [2, 64]
    assert (a | b).set_indices().tolist() == [1, 2, 3, 64, 99]
    assert (a - b).set_indices().tolist() == [1, 99]
    assert a.and_(b).set_indices().tolist() == [2, 64]
    c = a.copy()
    c_words = c.words
    c &= b
    assert c.words is c_words and c.set_indices().tolist() == [2, 64]
    c |= a
    assert c == a
    c -= b
    assert c.set_indices().tolist() == [1, 99]
    assert a.andnot(b, out=b) is b and b.set_indices().tolist() == [1, 99]
    assert a.__and__(5) is NotImplemented


def test_out_buffer_is_reused_when_large_enough():
    """set_indices and harvest with out= return a view of it if it has room, else a new array."""
    bits = [0, 64, 65, 300]
    bm = Bitmap.from_indices(400, bits)
    out = np.full(200, 7, np.uint64)
    got = bm.set_indices(out=out)
    assert got.tolist() == bits and np.shares_memory(got, out)
    small = np.zeros(2, np.uint64)
    got = bm.set_indices(out=small)
    assert got.tolist() == bits and not np.shares_memory(got, small)
    got = bm.harvest(out=out)
    assert got.tolist() == bits and np.shares_memory(got, out) and bm.count() == 0
    bm.set_range(0, 100)
    got = bm.harvest(out=np.zeros(64, np.uint64))  # 100 bits + 64 spare do not fit in 64
    assert got.tolist() == list(range(100)) and bm.count() == 0


@pytest.mark.parametrize("method", ["set_indices", "harvest"])
@pytest.mark.parametrize("out, exc", [
    ([0] * 200, TypeError), (np.zeros(200, np.int64), TypeError),
    (np.zeros((2, 100), np.uint64), ValueError), (np.zeros(400, np.uint64)[::2], ValueError),
    (np.frombuffer(bytes(1600), np.uint64), ValueError), ("words", ValueError),
])
def test_bad_out_buffer_changes_nothing(method, out, exc):
    """An out that is not a writable contiguous uint64 vector, or that overlaps the words, raises
    before any bit is taken."""
    bm = Bitmap.from_indices(640, [1, 2, 639])
    if isinstance(out, str):
        out = bm.words[2:]
    before = bm.words.copy()
    with pytest.raises(exc):
        getattr(bm, method)(out=out)
    assert np.array_equal(bm.words, before)


def test_copy_is_independent():
    """copy() yields an equal bitmap whose changes do not affect the original."""
    a = Bitmap.from_indices(70, [0, 69])
    c = a.copy()
    assert c == a and c.words is not a.words
    c.clear(0)
    assert a.test(0) and c != a


def test_equality_needs_same_size_and_bits():
    """Bitmaps are equal when they have the same nbits and the same bits."""
    assert Bitmap(100) == Bitmap(100)
    assert Bitmap(100) != Bitmap(101)
    assert Bitmap.from_indices(100, [5]) != Bitmap(100)
    assert Bitmap(100) != RefBitmap(100) and Bitmap(100) != "x"


def test_read_pass_folds_every_word():
    """The read pass returns the XOR of all words, for any length and alignment."""
    rng = np.random.default_rng(1)
    words = rng.integers(0, 2**64, size=1000, dtype=np.uint64)
    for lo, hi in [(0, 1000), (1, 1000), (3, 37), (5, 5), (0, 999)]:
        assert _b.bitmap_read_pass(words[lo:hi]) == int(np.bitwise_xor.reduce(words[lo:hi],
                                                                               initial=0))


@settings(max_examples=30)
@given(nwords=st.integers(0, 200), density=st.sampled_from([0.0, 0.02, 0.5, 1.0]),
       seed=st.integers(0, 2**32 - 1), cut=st.integers(0, 63))
def test_counts_and_scans_over_many_words_match_the_reference(nwords, density, seed, cut):
    """Counts, run counts and set-bit scans over up to 200 words (several steps of the widest
    vector loop, with every remainder) agree with the reference from any start bit."""
    rng = np.random.default_rng(seed)
    nbits = 64 * nwords + 7
    bits = np.flatnonzero(rng.random(nbits) < density)
    bm, ref = Bitmap.from_indices(nbits, bits), RefBitmap.from_indices(nbits, bits)
    start = min(cut, nbits)
    assert bm.count(start) == ref.count(start)
    assert bm.count_runs(start) == ref.count_runs(start)
    assert bm.set_indices(start).tolist() == list(ref.set_indices(start))
    assert bm.harvest().tolist() == bits.tolist() and bm.count() == 0


def test_large_sparse_bitmap_smoke():
    """A 2^28-bit (32 MiB, 1 TiB guest) sparse bitmap counts, iterates and harvests exactly."""
    nbits = 1 << 28
    rng = np.random.default_rng(28)
    bits = np.unique(np.concatenate([rng.integers(0, nbits, 5000), [0, 63, 64, nbits - 1]]))
    bm = Bitmap.from_indices(nbits, bits)
    assert bm.words.nbytes == 32 << 20
    assert bm.count() == bits.size
    assert bm.count(1 << 27) == int((bits >= 1 << 27).sum())
    assert bm.find_next_set(1) == 63
    assert np.array_equal(bm.set_indices(), bits)
    got = bm.harvest()
    assert np.array_equal(got, bits)
    assert bm.count() == 0 and bm.find_next_set() == nbits


# --- bad input changes nothing -----------------------------------------------------------------

@pytest.mark.parametrize("nbits, exc", [(0, ValueError), (-1, ValueError),
                                        (MAX_NBITS + 1, ValueError), (1.5, TypeError),
                                        ("8", TypeError)])
def test_constructor_rejects_bad_sizes(nbits, exc):
    """Bitmap(nbits) rejects sizes outside [1, MAX_NBITS] and non-integers."""
    with pytest.raises(exc):
        Bitmap(nbits)


@pytest.mark.parametrize("words, nbits, exc", [
    (np.zeros(2, np.int64), None, TypeError),
    (np.zeros(2, ">u8"), None, TypeError),
    ([0, 0], None, TypeError),
    (np.zeros(4, np.uint64)[::2], None, ValueError),
    (np.zeros((2, 2), np.uint64), None, ValueError),
    (np.zeros(2, np.uint64), 129, ValueError),
    (np.zeros(2, np.uint64), 64, ValueError),
    (np.zeros(2, np.uint64), 0, ValueError),
    (np.zeros(0, np.uint64), None, ValueError),
    (np.frombuffer(bytes(16), np.uint64), None, ValueError),
    (np.frombuffer(bytearray(17), np.uint8)[1:].view(np.uint64), None, ValueError),
])
def test_from_words_rejects_unusable_arrays(words, nbits, exc):
    """from_words refuses wrong dtypes, strides, shapes, sizes, read-only and misaligned arrays."""
    with pytest.raises(exc):
        Bitmap.from_words(words, nbits)


BAD_CALLS = [
    ("set", (100,), IndexError), ("set", (-1,), IndexError), ("set", (2.0,), TypeError),
    ("clear", (100,), IndexError), ("test", (-1,), IndexError), ("test", (1000,), IndexError),
    ("set_range", (99, 2), IndexError), ("set_range", (-1, 2), IndexError),
    ("set_range", (0, -1), ValueError), ("set_range", (101, 0), IndexError),
    ("clear_range", (50, 51), IndexError), ("clear_range", (0, -5), ValueError),
    ("count", (5, 4), IndexError), ("count", (0, 101), IndexError), ("count", (-1,), IndexError),
    ("count_runs", (0, 101), IndexError), ("set_indices", (7, 3), IndexError),
    ("iter_set", (0, 101), IndexError), ("iter_runs", (-2,), IndexError),
    ("runs", (3, 2), IndexError), ("harvest", (0, 101), IndexError),
    ("harvest", (60, 59), IndexError), ("find_next_set", (-1,), IndexError),
    ("find_next_zero", (-1,), IndexError),
]


@pytest.mark.parametrize("method, args, exc", BAD_CALLS)
def test_bad_arguments_change_nothing(method, args, exc):
    """Out-of-range or mistyped arguments raise before any bit changes."""
    bm = Bitmap.from_indices(100, [0, 5, 63, 64, 99])
    before = bm.words.copy()
    with pytest.raises(exc):
        getattr(bm, method)(*args)  # the iter_* generators also check on the call itself
    assert np.array_equal(bm.words, before)


@pytest.mark.parametrize("op", ["and_", "or_", "andnot"])
def test_wordops_reject_mismatched_sizes_and_overlap(op):
    """Word-wise ops refuse another size, a non-Bitmap, and an out overlapping a source shifted."""
    a = Bitmap.from_indices(128, [1, 70])
    b = Bitmap.from_indices(128, [70, 127])
    before = (a.words.copy(), b.words.copy())
    with pytest.raises(ValueError):
        getattr(a, op)(Bitmap(129))
    with pytest.raises(ValueError):
        getattr(a, op)(b, out=Bitmap(64))
    with pytest.raises(TypeError):
        getattr(a, op)(np.zeros(2, np.uint64))
    big = np.zeros(3, np.uint64)
    big[:2] = a.words
    shifted_src = Bitmap.from_words(big[:2])
    shifted_out = Bitmap.from_words(big[1:])
    with pytest.raises(ValueError):
        getattr(shifted_src, op)(b, out=shifted_out)
    assert np.array_equal(a.words, before[0]) and np.array_equal(b.words, before[1])
    assert big.tolist() == [a.words[0], a.words[1], 0]


def test_wordop_out_may_alias_the_same_words():
    """A Bitmap wrapping the very words of an operand is accepted as out."""
    a = Bitmap.from_indices(128, [1, 70])
    alias = Bitmap.from_words(a.words)
    a.or_(Bitmap.from_indices(128, [2]), out=alias)
    assert a.set_indices().tolist() == [1, 2, 70]


# --- raw C kernels: errno table, resumption ------------------------------------------------------

def _raw(nbits=130):
    words = np.zeros((nbits + 63) // 64, np.uint64)
    return words, ffi.from_buffer("uint64_t[]", words)


def _call(name, nbits=130, map_=True, start=0, end=None, pos=None, cap=8, out=True):
    """Call sc_bitmap_<name> with one argument perturbed; returns (rc, words after)."""
    words, m = _raw(130)
    words[:] = [0xF0, 0x3, 0xFF]
    m = m if map_ else ffi.NULL
    end = 130 if end is None else end
    o = ffi.new("uint64_t[]", max(cap, 1)) if out else ffi.NULL
    p = ffi.new("uint64_t *", start if pos is None else pos)
    fn = getattr(lib, "sc_bitmap_" + name)
    if name in ("count", "count_runs"):
        rc = fn(m, nbits, start, end)
    elif name in ("find_next_set", "find_next_zero"):
        rc = fn(m, nbits, start)
    elif name in ("set_range", "clear_range"):
        rc = fn(m, nbits, start, end)  # end is n here
    elif name == "iter_runs":
        o2 = ffi.new("uint64_t[]", max(cap, 1)) if out else ffi.NULL
        rc = fn(m, nbits, p, end, o, o2, cap)
    else:
        rc = fn(m, nbits, p, end, o, cap)
    return rc, words.tolist()


ERRNO_TABLE = [
    # (kernel, perturbation, expected return)
    ("count", dict(map_=False), -errno.EINVAL),
    ("count", dict(nbits=MAX_NBITS + 1), -errno.EINVAL),
    ("count", dict(start=5, end=4), -errno.ERANGE),
    ("count", dict(end=131), -errno.ERANGE),
    ("count_runs", dict(map_=False), -errno.EINVAL),
    ("count_runs", dict(start=131, end=131), -errno.ERANGE),
    ("find_next_set", dict(map_=False), -errno.EINVAL),
    ("find_next_set", dict(start=131), 130),
    ("find_next_zero", dict(nbits=MAX_NBITS + 64), -errno.EINVAL),
    ("find_next_zero", dict(start=2**64 - 1), 130),
    ("set_range", dict(map_=False), -errno.EINVAL),
    ("set_range", dict(start=129, end=2), -errno.ERANGE),
    ("set_range", dict(start=131, end=0), -errno.ERANGE),
    ("set_range", dict(start=1, end=2**64 - 1), -errno.ERANGE),
    ("clear_range", dict(start=0, end=131), -errno.ERANGE),
    ("iter_set", dict(map_=False), -errno.EINVAL),
    ("iter_set", dict(out=False), -errno.EINVAL),
    ("iter_set", dict(cap=0), -errno.EINVAL),
    ("iter_set", dict(pos=5, end=4), -errno.ERANGE),
    ("iter_set", dict(end=131), -errno.ERANGE),
    ("iter_runs", dict(out=False), -errno.EINVAL),
    ("iter_runs", dict(cap=0), -errno.EINVAL),
    ("iter_runs", dict(pos=131, end=131), -errno.ERANGE),
    ("harvest", dict(map_=False), -errno.EINVAL),
    ("harvest", dict(out=False), -errno.EINVAL),
    ("harvest", dict(cap=0), -errno.EINVAL),
    ("harvest", dict(end=2**64 - 1), -errno.ERANGE),
    ("harvest", dict(cap=3), -errno.ENOSPC),  # word 0 holds 4 bits
]


@pytest.mark.parametrize("name, kw, expected", ERRNO_TABLE)
def test_raw_kernels_return_errno_and_change_nothing(name, kw, expected):
    """Each kernel returns the documented errno for a bad argument and leaves the bitmap intact."""
    rc, after = _call(name, **kw)
    assert rc == expected
    assert after == [0xF0, 0x3, 0xFF]


@pytest.mark.parametrize("name", ["and", "or", "andnot"])
def test_raw_wordops_reject_null_and_shifted_overlap(name):
    """and/or/andnot return -EINVAL for NULL pointers, a huge nbits, or a shifted overlap."""
    words = np.arange(1, 5, dtype=np.uint64)
    p = ffi.from_buffer("uint64_t[]", words)
    fn = getattr(lib, "sc_bitmap_" + name)
    assert fn(ffi.NULL, p, p, 64) == -errno.EINVAL
    assert fn(p, ffi.NULL, p, 64) == -errno.EINVAL
    assert fn(p, p, ffi.NULL, 64) == -errno.EINVAL
    assert fn(p, p, p, MAX_NBITS + 1) == -errno.EINVAL
    assert fn(p + 1, p, p + 2, 128) == -errno.EINVAL
    assert fn(p, p + 1, p + 2, 64) == 0  # exact or disjoint words are fine
    assert lib.sc_bitmap_equal(ffi.NULL, p, 64) == -errno.EINVAL
    assert lib.sc_bitmap_read_pass(ffi.NULL, 1, ffi.new("uint64_t *")) == -errno.EINVAL


def test_harvest_cas_takes_a_word_only_when_it_fits():
    """With fewer than 64 slots left, harvest takes a word only if all its bits fit, then stops."""
    words, m = _raw(192)
    words[:] = [0b111, 0b11, 1]
    out = np.zeros(4, np.uint64)
    n, pos = _b.bitmap_harvest(m, 192, 0, 192, out)
    assert (n, pos) == (3, 64) and words.tolist() == [0, 0b11, 1]
    n, pos = _b.bitmap_harvest(m, 192, pos, 192, out)
    assert (n, pos) == (3, 192) and out[:3].tolist() == [64, 65, 128]
    assert words.tolist() == [0, 0, 0]


@st.composite
def bitmaps(draw, max_nbits=700):
    """(nbits, set of bits, tail garbage): random dense/sparse bits plus a few long runs."""
    nbits = draw(st.integers(1, max_nbits))
    dense = draw(st.integers(0, 2**nbits - 1))
    sparse = draw(st.integers(0, 2**nbits - 1)) & draw(st.integers(0, 2**nbits - 1))
    value = draw(st.sampled_from([dense, sparse, 0, 2**nbits - 1]))
    bits = {i for i in range(nbits) if value >> i & 1}
    for _ in range(draw(st.integers(0, 3))):
        s = draw(st.integers(0, nbits - 1))
        n = draw(st.integers(0, nbits - s))
        bits.update(range(s, s + n))
    return nbits, bits, draw(st.integers(0, 2**64 - 1))


@st.composite
def bitmap_and_range(draw):
    nbits, bits, tail = draw(bitmaps())
    a = draw(st.integers(0, nbits))
    b = draw(st.integers(0, nbits))
    return nbits, bits, tail, min(a, b), max(a, b)


@given(bitmap_and_range())
def test_queries_match_reference(case):
    """count, count_runs, find_next_*, iter_set, set_indices, runs and test agree with the set."""
    nbits, bits, tail, start, end = case
    bm, ref = make(nbits, bits, tail)
    assert bm.count() == ref.count() and bm.count(start, end) == ref.count(start, end)
    assert bm.count_runs(start, end) == ref.count_runs(start, end)
    assert bm.set_indices(start, end).tolist() == ref.set_indices(start, end)
    assert list(bm.iter_set(start, end)) == ref.set_indices(start, end)
    assert runs_of(bm, start, end) == list(ref.iter_runs(start, end))
    assert list(bm.iter_runs(start, end)) == list(ref.iter_runs(start, end))
    for s in {0, start, end, nbits - 1, nbits, nbits + 5}:
        assert bm.find_next_set(s) == ref.find_next_set(s)
        assert bm.find_next_zero(s) == ref.find_next_zero(s)
    assert [bm.test(i) for i in range(nbits)] == [ref.test(i) for i in range(nbits)]


@given(bitmap_and_range())
def test_harvest_matches_reference(case):
    """harvest(start, end) returns and clears exactly the reference's bits, keeping tail bits."""
    nbits, bits, tail, start, end = case
    bm, ref = make(nbits, bits, tail)
    last = int(bm.words[-1])
    assert bm.harvest(start, end).tolist() == ref.harvest(start, end)
    assert bm.set_indices().tolist() == ref.set_indices()
    if nbits % 64:
        mask = ~((1 << (nbits % 64)) - 1) & ((1 << 64) - 1)
        assert int(bm.words[-1]) & mask == last & mask


@given(bitmap_and_range(), st.integers(1, 70), st.integers(64, 200))
def test_streaming_resumes_without_loss_or_repeat(case, cap, hcap):
    """iter_set, iter_runs and harvest, called with small outputs, resume exactly at *pos."""
    nbits, bits, tail, start, end = case
    bm, ref = make(nbits, bits, tail)
    m = _b.bitmap_map(bm.words, nbits)
    got, pos, out = [], start, np.empty(cap, np.uint64)
    while pos < end:
        n, pos = _b.bitmap_iter_set(m, nbits, pos, end, out)
        assert n == cap or pos == end
        got += out[:n].tolist()
    assert got == ref.set_indices(start, end)
    runs, pos = [], start
    s, ln = np.empty(cap, np.uint64), np.empty(cap, np.uint64)
    while pos < end:
        n, pos = _b.bitmap_iter_runs(m, nbits, pos, end, s, ln)
        assert n == cap or pos == end
        runs += list(zip(s[:n].tolist(), ln[:n].tolist()))
    assert runs == list(ref.iter_runs(start, end))
    got, pos, out = [], start, np.empty(hcap, np.uint64)
    while pos < end:
        n, pos = _b.bitmap_harvest(m, nbits, pos, end, out)
        assert n > hcap - 64 or pos == end
        got += out[:n].tolist()
    assert got == ref.harvest(start, end)
    assert bm.set_indices().tolist() == ref.set_indices()


@given(st.data())
def test_range_ops_match_reference(data):
    """set_range and clear_range change exactly the bits the reference changes."""
    nbits, bits, tail = data.draw(bitmaps())
    bm, ref = make(nbits, bits, tail)
    for _ in range(data.draw(st.integers(1, 4))):
        s = data.draw(st.integers(0, nbits))
        n = data.draw(st.integers(0, nbits - s))
        op = data.draw(st.sampled_from(["set_range", "clear_range"]))
        getattr(bm, op)(s, n)
        getattr(ref, op)(s, n)
    assert bm.set_indices().tolist() == ref.set_indices()
    assert bm == Bitmap.from_indices(nbits, ref.set_indices())


@given(st.data(), st.sampled_from(["and_", "or_", "andnot"]),
       st.sampled_from(["new", "self", "other", "third"]))
def test_wordops_match_reference(data, op, into):
    """and_/or_/andnot agree with set algebra whether out is new, self, the other or a third map."""
    nbits, abits, atail = data.draw(bitmaps())
    bbits = data.draw(st.sets(st.integers(0, nbits - 1)))
    a, ra = make(nbits, abits, atail)
    b, rb = make(nbits, bbits, data.draw(st.integers(0, 2**64 - 1)))
    third = make(nbits, data.draw(st.sets(st.integers(0, nbits - 1))), 0)[0]
    out = {"new": None, "self": a, "other": b, "third": third}[into]
    tail_before = int(out.words[-1]) if out is not None else 0
    expect = getattr(ra, op)(rb)
    res = getattr(a, op)(b, out=out)
    assert res is out or out is None
    assert res.set_indices().tolist() == expect.set_indices()
    if out is not None and nbits % 64:
        mask = ~((1 << (nbits % 64)) - 1) & ((1 << 64) - 1)
        assert int(res.words[-1]) & mask == tail_before & mask


# --- state machine ---------------------------------------------------------------------------

class BitmapMachine(RuleBasedStateMachine):
    """Drives a Bitmap and the set-based reference with the same operations."""

    @initialize(nbits=st.integers(1, 400))
    def init(self, nbits):
        self.nbits = nbits
        self.bm = Bitmap(nbits)
        self.ref = RefBitmap(nbits)

    @rule(i=st.integers(0, 399))
    def set(self, i):
        i %= self.nbits
        self.bm.set(i)
        self.ref.set(i)

    @rule(i=st.integers(0, 399))
    def clear(self, i):
        i %= self.nbits
        self.bm.clear(i)
        self.ref.clear(i)

    @rule(i=st.integers(0, 399))
    def test(self, i):
        i %= self.nbits
        assert self.bm.test(i) == self.ref.test(i)

    @rule(s=st.integers(0, 400), n=st.integers(0, 400), on=st.booleans())
    def range_op(self, s, n, on):
        s %= self.nbits + 1
        n %= self.nbits - s + 1
        name = "set_range" if on else "clear_range"
        getattr(self.bm, name)(s, n)
        getattr(self.ref, name)(s, n)

    @rule(s=st.integers(0, 400))
    def find(self, s):
        assert self.bm.find_next_set(s) == self.ref.find_next_set(s)
        assert self.bm.find_next_zero(s) == self.ref.find_next_zero(s)

    @rule(a=st.integers(0, 400), b=st.integers(0, 400))
    def harvest(self, a, b):
        a, b = sorted((a % (self.nbits + 1), b % (self.nbits + 1)))
        assert self.bm.harvest(a, b).tolist() == self.ref.harvest(a, b)

    @rule(bits=st.sets(st.integers(0, 399), max_size=50),
          op=st.sampled_from(["and_", "or_", "andnot"]), in_place=st.booleans())
    def combine(self, bits, op, in_place):
        bits = {i % self.nbits for i in bits}
        other, rother = Bitmap.from_indices(self.nbits, sorted(bits)), \
            RefBitmap.from_indices(self.nbits, bits)
        if in_place:
            getattr(self.bm, op)(other, out=self.bm)
            getattr(self.ref, op)(rother, out=self.ref)
        else:
            self.bm = getattr(self.bm, op)(other)
            self.ref = getattr(self.ref, op)(rother)

    @rule()
    def copy(self):
        c = self.bm.copy()
        assert c == self.bm and c.words is not self.bm.words
        self.bm = c
        self.ref = self.ref.copy()

    @rule()
    def clear_all(self):
        self.bm.clear_all()
        self.ref.clear_all()

    @invariant()
    def same_bits(self):
        assert self.bm.count() == self.ref.count()
        assert self.bm.set_indices().tolist() == self.ref.set_indices()
        assert list(self.bm.iter_runs()) == list(self.ref.iter_runs())
        assert self.bm.count_runs() == self.ref.count_runs()


def test_bitmap_state_machine():
    """Any sequence of operations leaves the Bitmap and the set-based reference with equal bits."""
    run_state_machine_as_test(BitmapMachine,
                              settings=settings(max_examples=60, stateful_step_count=30))
