"""Bitmap kernels on a 1 TiB guest's dirty log (2^28 bits = 32 MiB) against numpy, in one run.

    pytest bench/bench_bitmap.py --benchmark-enable [--benchmark-columns=min,median,max,rounds]

Inputs are fixed: uniformly random bits at 0.1 %, 10 % and 50 % density from seeded generators
(the same bitmaps at every size of the ladder). Each group puts one job beside its peers:

count      Bitmap.count() | np.bitwise_count(words).sum() | C read pass (XOR of every word,
           the DRAM-bandwidth floor any full pass sits on; target: count <= 1.5x of it). Count
           and read pass run on each tier the CPU has (targets, issue: cpu tiers: within 1.2x
           of the read pass on avx2, 1.5x on aesni)
harvest    Bitmap.harvest() | the same into one reused out= buffer (no fresh result to fault in) |
           numpy, non-zero words only: flatnonzero, unpack those, fill(0) |
           numpy, unpack everything, fill(0)   (target at 10 %: >= 15x the best numpy)
set_indices  Bitmap.set_indices() | numpy unpackbits + flatnonzero | numpy non-zero words only
iter_set   Python ints from Bitmap.iter_set() | from numpy's index array .tolist() (0.1 % only)
runs       Bitmap.runs() | Bitmap.count_runs() | numpy unpackbits + diff + flatnonzero;
           at 0.1 % also the Python-level Bitmap.iter_runs() stream

Harvest is destructive, so every round restores the bitmap in pedantic setup, outside the timed
region. Results are checked after timing against an index array computed once with numpy.
Rounds are few: the machine is small and shared, and a numpy 50 % round takes seconds.
"""
import numpy as np
import pytest

from benchutil import on_tier, tier_params
from sevcore import _bindings as _b
from sevcore.core.bitmap import Bitmap

NBITS = 1 << 28
DENSITIES = {"0.1%": 0.001, "10%": 0.10, "50%": 0.50}
SEEDS = {"0.1%": 1, "10%": 10, "50%": 50}
FAST, SLOW = 15, 3  # rounds for C kernels / for numpy and Python-level streams

_cache = {}


def _random_words(p, seed):
    """2^28 bits, each set with probability p, built one bit-plane (bit k of every word) at a
    time so no 2^28-element temporary is needed."""
    rng = np.random.default_rng(seed)
    nwords = NBITS // 64
    words = np.zeros(nwords, np.uint64)
    for k in range(64):
        plane = rng.random(nwords, dtype=np.float32) < p
        words |= plane.astype(np.uint64) << np.uint64(k)
    return words


def case(density):
    """(pristine words, working Bitmap over a copy, expected set-bit indices) for one density."""
    if density not in _cache:
        words = _random_words(DENSITIES[density], SEEDS[density])
        expected = np.flatnonzero(np.unpackbits(words.view(np.uint8), bitorder="little"))
        _cache[density] = (words, Bitmap.from_words(words.copy()), expected)
    return _cache[density]


def numpy_indices_sparse(words):
    """Set-bit indices touching only the non-zero words: flatnonzero, unpack those, rebuild."""
    nz = np.flatnonzero(words)
    pos = np.flatnonzero(np.unpackbits(words[nz].view(np.uint8), bitorder="little"))
    return (nz[pos >> 6] << 6) | (pos & 63)


def numpy_indices_full(words):
    return np.flatnonzero(np.unpackbits(words.view(np.uint8), bitorder="little"))


def numpy_runs(words):
    bits = np.unpackbits(words.view(np.uint8), bitorder="little").view(np.int8)
    edges = np.diff(bits, prepend=np.int8(0), append=np.int8(0))
    starts = np.flatnonzero(edges == 1)
    return starts, np.flatnonzero(edges == -1) - starts


@pytest.fixture(params=list(DENSITIES), scope="module")
def density(request):
    return request.param


def _restore(words, pristine):
    def setup():
        np.copyto(words, pristine)
    return setup


# --- count -----------------------------------------------------------------------------------

@pytest.mark.parametrize("tier", tier_params())
def test_count_sevcore(benchmark, density, tier):
    pristine, bm, expected = case(density)
    benchmark.group = f"count {density}"
    with on_tier(benchmark, tier):
        got = benchmark.pedantic(bm.count, rounds=100, warmup_rounds=3)
    assert got == expected.size


def test_count_numpy_bitwise_count(benchmark, density):
    pristine, bm, expected = case(density)
    benchmark.group = f"count {density}"
    got = benchmark.pedantic(lambda: int(np.bitwise_count(bm.words).sum()), rounds=FAST,
                             warmup_rounds=1)
    assert got == expected.size


@pytest.mark.parametrize("tier", tier_params())
def test_count_read_pass_anchor(benchmark, density, tier):
    pristine, bm, expected = case(density)
    benchmark.group = f"count {density}"
    with on_tier(benchmark, tier):
        got = benchmark.pedantic(_b.bitmap_read_pass, args=(bm.words,), rounds=100,
                                 warmup_rounds=3)
    assert got == int(np.bitwise_xor.reduce(bm.words))


# --- harvest ---------------------------------------------------------------------------------

def test_harvest_sevcore(benchmark, density):
    pristine, bm, expected = case(density)
    benchmark.group = f"harvest {density}"
    got = benchmark.pedantic(bm.harvest, setup=_restore(bm.words, pristine), rounds=FAST,
                             warmup_rounds=1)
    assert np.array_equal(got, expected) and not bm.words.any()
    np.copyto(bm.words, pristine)


def test_harvest_sevcore_reused_out(benchmark, density):
    pristine, bm, expected = case(density)
    benchmark.group = f"harvest {density}"
    out = np.zeros(expected.size + 64, np.uint64)  # one buffer for every round, faulted in once
    got = benchmark.pedantic(lambda: bm.harvest(out=out), setup=_restore(bm.words, pristine),
                             rounds=FAST, warmup_rounds=1)
    assert np.shares_memory(got, out) and np.array_equal(got, expected) and not bm.words.any()
    np.copyto(bm.words, pristine)


def _numpy_harvest(indices):
    def run(words):
        idx = indices(words)
        words.fill(0)
        return idx
    return run


@pytest.mark.parametrize("way", ["sparse", "full"])
def test_harvest_numpy(benchmark, density, way):
    pristine, bm, expected = case(density)
    benchmark.group = f"harvest {density}"
    words = bm.words
    fn = _numpy_harvest(numpy_indices_sparse if way == "sparse" else numpy_indices_full)
    got = benchmark.pedantic(fn, args=(words,), setup=_restore(words, pristine), rounds=SLOW)
    assert np.array_equal(got, expected) and not words.any()
    np.copyto(words, pristine)


# --- set_indices / iterate -------------------------------------------------------------------

def test_set_indices_sevcore(benchmark, density):
    pristine, bm, expected = case(density)
    benchmark.group = f"set_indices {density}"
    got = benchmark.pedantic(bm.set_indices, rounds=FAST, warmup_rounds=1)
    assert np.array_equal(got, expected)


@pytest.mark.parametrize("way", ["sparse", "full"])
def test_set_indices_numpy(benchmark, density, way):
    pristine, bm, expected = case(density)
    benchmark.group = f"set_indices {density}"
    fn = numpy_indices_sparse if way == "sparse" else numpy_indices_full
    got = benchmark.pedantic(fn, args=(bm.words,), rounds=SLOW)
    assert np.array_equal(got, expected)


def test_iter_set_sevcore(benchmark):
    pristine, bm, expected = case("0.1%")
    benchmark.group = "iter_set 0.1% (Python ints)"
    got = benchmark.pedantic(lambda: sum(1 for _ in bm.iter_set()), rounds=SLOW)
    assert got == expected.size


def test_iter_set_numpy(benchmark):
    pristine, bm, expected = case("0.1%")
    benchmark.group = "iter_set 0.1% (Python ints)"
    got = benchmark.pedantic(lambda: sum(1 for _ in numpy_indices_sparse(bm.words).tolist()),
                             rounds=SLOW)
    assert got == expected.size


# --- runs ------------------------------------------------------------------------------------

def _expected_runs(expected):
    """(run starts, number of runs) from the sorted set-bit indices."""
    key = id(expected)
    if key not in _runs_cache:
        _runs_cache[key] = _runs_of(expected)
    return _runs_cache[key]


_runs_cache = {}


def _runs_of(expected):
    breaks = np.flatnonzero(np.diff(expected) != 1) + 1
    starts = expected[np.concatenate([[0], breaks])] if expected.size else expected
    return starts, breaks.size + (1 if expected.size else 0)


def test_runs_sevcore(benchmark, density):
    pristine, bm, expected = case(density)
    benchmark.group = f"runs {density}"
    starts, lengths = benchmark.pedantic(bm.runs, rounds=FAST // 3, warmup_rounds=1)
    want_starts, nruns = _expected_runs(expected)
    assert np.array_equal(starts, want_starts) and int(lengths.sum()) == expected.size


def test_count_runs_sevcore(benchmark, density):
    pristine, bm, expected = case(density)
    benchmark.group = f"runs {density}"
    got = benchmark.pedantic(bm.count_runs, rounds=100, warmup_rounds=3)
    assert got == _expected_runs(expected)[1]


def test_runs_numpy(benchmark, density):
    pristine, bm, expected = case(density)
    benchmark.group = f"runs {density}"
    starts, lengths = benchmark.pedantic(numpy_runs, args=(bm.words,), rounds=SLOW)
    assert np.array_equal(starts, _expected_runs(expected)[0])
    assert int(lengths.sum()) == expected.size


def test_iter_runs_sevcore(benchmark):
    pristine, bm, expected = case("0.1%")
    benchmark.group = "runs 0.1%"
    got = benchmark.pedantic(lambda: sum(1 for _ in bm.iter_runs()), rounds=SLOW)
    assert got == _expected_runs(expected)[1]
