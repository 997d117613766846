"""The nested page table (csrc/npt.c through sevcore.core.npt.Npt) against known cases and against the
dict-backed reference (sevcore/_reference/npt.py)."""
import errno
import gc

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule

from sevcore import _bindings as _b
from sevcore._reference.npt import Npt as RefNpt
from sevcore.core.npt import (
    GFN_LIMIT, NPT_ACCESSED, NPT_DIRTY, NPT_DIRTY_LOG, NPT_FLAGS_MASK, NPT_PRESENT, NPT_PRIVATE,
    NPT_WRITABLE, PFN_LIMIT, Npt, NptLock,
)

from support import raises_errno

TABLE = 4096
FLAGS = [NPT_PRESENT, NPT_WRITABLE, NPT_ACCESSED, NPT_DIRTY, NPT_PRIVATE, NPT_DIRTY_LOG]
BOUNDARIES = [512, 512**2, 512**3]


@pytest.fixture
def npt():
    with Npt() as table:
        yield table


def snapshot(table):
    """Everything observable about a table's contents and memory."""
    gfns, pfns, flags = table.items()
    return gfns.tolist(), pfns.tolist(), flags.tolist(), len(table), table.table_bytes


def tables_for(gfns):
    """Tables a radix table holding exactly ``gfns`` needs: one per distinct prefix per level."""
    gfns = np.asarray(gfns, dtype=np.uint64)
    if gfns.size == 0:
        return 0
    return sum(np.unique(gfns >> np.uint64(s)).size for s in (9, 18, 27)) + 1


# --- known cases ----------------------------------------------------------------------------------


def test_flags_are_distinct_bits_taken_from_the_c_core():
    """The NPT_* flags are distinct single bits equal to the compiled enum, and the mask is their
    union."""
    assert [NPT_PRESENT, NPT_WRITABLE, NPT_ACCESSED, NPT_DIRTY, NPT_PRIVATE, NPT_DIRTY_LOG] == [
        _b.NPT_FLAGS[k]
        for k in ("PRESENT", "WRITABLE", "ACCESSED", "DIRTY", "PRIVATE", "DIRTY_LOG")]
    for f in FLAGS:
        assert f & (f - 1) == 0 and 0 < f < 1 << _b.NPT_PFN_SHIFT
    assert len(set(FLAGS)) == len(FLAGS)
    mask = 0
    for f in FLAGS:
        mask |= f
    assert mask == NPT_FLAGS_MASK
    assert Npt.MISS == 2**64 - 1 and GFN_LIMIT == 2**36 and PFN_LIMIT == 2**40


def test_new_table_is_empty_and_uses_no_table_memory(npt):
    """A new table maps nothing, iterates to nothing and holds no tables."""
    assert npt.lookup(0) is None and npt.lookup(GFN_LIMIT - 1) is None
    assert len(npt) == 0 and npt.count() == 0 and list(npt) == []
    assert npt.table_bytes == 0 and npt.reserved_bytes == 0
    assert [a.size for a in npt.items()] == [0, 0, 0]
    assert (npt.lookup_batch(np.arange(1000, dtype=np.uint64)) == Npt.MISS).all()


@pytest.mark.parametrize("gfn", [0, 511, 512, 512**2 - 1, 512**2, 512**3 - 1, 512**3,
                                 GFN_LIMIT - 1])
def test_single_mapping_at_table_boundaries(npt, gfn):
    """One mapping at a table boundary is found, its neighbours are not, and it costs one table
    per level."""
    npt.map(gfn, 0xABCDE, NPT_WRITABLE)
    assert npt.lookup(gfn) == (0xABCDE, NPT_PRESENT | NPT_WRITABLE)
    for other in (gfn - 1, gfn + 1):
        if 0 <= other < GFN_LIMIT:
            assert npt.lookup(other) is None
    assert list(npt) == [(gfn, 0xABCDE, NPT_PRESENT | NPT_WRITABLE)]
    assert npt.table_bytes == 4 * TABLE
    assert npt.unmap(gfn) == 1
    assert npt.table_bytes == 0 and len(npt) == 0


@pytest.mark.parametrize("boundary", BOUNDARIES)
def test_run_crossing_a_table_boundary(npt, boundary):
    """A run across a leaf, level-1 or level-2 boundary maps every gfn to consecutive pfns."""
    ref = RefNpt()
    for table in (npt, ref):
        table.map(boundary - 3, 1000, NPT_PRIVATE, npages=7)
    gfns = np.arange(boundary - 5, boundary + 6, dtype=np.uint64)
    assert npt.lookup_batch(gfns).tolist() == ref.lookup_batch(gfns).tolist()
    assert [npt.lookup(boundary + i - 3) for i in range(7)] == [
        (1000 + i, NPT_PRESENT | NPT_PRIVATE) for i in range(7)]
    expected = tables_for(range(boundary - 3, boundary + 4)) * TABLE
    assert npt.table_bytes == ref.table_bytes == expected
    assert npt.unmap(boundary - 1, 2) == 2
    assert npt.count() == 5 and npt.lookup(boundary) is None


def test_map_overwrites_existing_entries(npt):
    """Mapping over existing entries replaces their pfn and flags without changing the count."""
    npt.map(100, 5000, NPT_WRITABLE, npages=10)
    npt.map(105, 9000, NPT_PRIVATE, npages=10)
    assert len(npt) == 15
    assert npt.lookup(104) == (5004, NPT_PRESENT | NPT_WRITABLE)
    assert npt.lookup(105) == (9000, NPT_PRESENT | NPT_PRIVATE)
    assert npt.lookup(114) == (9009, NPT_PRESENT | NPT_PRIVATE)


def test_zap_range_filters_on_match_and_exclude_flags(npt):
    """zap_range removes only entries carrying all match_flags and none of exclude_flags."""
    npt.map(0, 0, NPT_PRIVATE, npages=4)                          # 0-3 private
    npt.map(4, 4, NPT_WRITABLE, npages=4)                         # 4-7 shared, writable
    npt.map(8, 8, NPT_WRITABLE | NPT_DIRTY, npages=4)             # 8-11 shared, writable, dirty
    assert npt.zap_range(0, 12, match_flags=NPT_WRITABLE | NPT_DIRTY) == 4
    assert npt.zap_range(0, 12, exclude_flags=NPT_PRIVATE) == 4   # the shared kind
    assert [g for g, _, _ in npt] == [0, 1, 2, 3]
    assert npt.zap_range(2, 100, match_flags=NPT_PRIVATE) == 2    # the private kind, in range
    assert npt.zap_range(0, 12) == 2
    assert len(npt) == 0 and npt.table_bytes == 0


def test_protect_range_write_protects_for_dirty_logging(npt):
    """protect_range clears and sets flags on mapped entries only and counts those that changed."""
    npt.map(510, 70, NPT_WRITABLE | NPT_DIRTY, npages=4)
    npt.map(514, 74, NPT_DIRTY_LOG, npages=2)
    assert npt.protect_range(0, 1024, NPT_WRITABLE | NPT_DIRTY, NPT_DIRTY_LOG) == 4
    assert npt.protect_range(0, 1024, NPT_WRITABLE | NPT_DIRTY, NPT_DIRTY_LOG) == 0
    assert [f for _, _, f in npt] == [NPT_PRESENT | NPT_DIRTY_LOG] * 6
    assert len(npt) == 6 and npt.lookup(516) is None
    assert npt.protect_range(511, 2, NPT_DIRTY_LOG, NPT_WRITABLE) == 2
    assert npt.lookup(511) == (71, NPT_PRESENT | NPT_WRITABLE)
    with pytest.raises(ValueError):
        npt.protect_range(0, 1024, clear_flags=NPT_PRESENT)
    assert len(npt) == 6


def test_unmap_counts_removed_entries_and_frees_tables(npt):
    """unmap returns how many entries went and gives back tables that became empty."""
    npt.map(0, 0, 0, npages=2048)
    assert npt.table_bytes == (4 + 3) * TABLE
    assert npt.unmap(500, 600) == 600
    assert npt.table_bytes == (3 + 3) * TABLE   # leaf 1 (gfns 512-1023) emptied and went
    assert npt.unmap(0, 1 << 20) == 2048 - 600
    assert npt.table_bytes == 0


def test_lookup_batch_shapes_misses_and_flags(npt):
    """lookup_batch keeps the input shape, gives MISS and flags 0 for unmapped gfns, and accepts
    int lists."""
    npt.map(10, 77, NPT_WRITABLE, npages=3)
    gfns = np.array([[9, 10], [11, 12]], dtype=np.int64)
    pfns, flags = npt.lookup_batch(gfns, with_flags=True)
    assert pfns.shape == flags.shape == (2, 2) and pfns.dtype == flags.dtype == np.uint64
    assert pfns.tolist() == [[Npt.MISS, 77], [78, 79]]
    assert flags.tolist() == [[0, NPT_PRESENT | NPT_WRITABLE]] + [[NPT_PRESENT | NPT_WRITABLE] * 2]
    assert npt.lookup_batch([12, 11]).tolist() == [79, 78]
    assert npt.lookup_batch(np.array([11], dtype=np.uint8)).tolist() == [78]
    assert npt.lookup_batch([]).shape == (0,)


def test_lookup_batch_agrees_with_single_lookups_across_many_blocks(npt):
    """A batch of thousands of mixed hits and misses, in random and sequential order, agrees with
    lookup()."""
    npt.map(0, 7, NPT_WRITABLE, npages=3000)
    npt.map(512**2 - 100, 9000, NPT_PRIVATE, npages=200)
    npt.map(2**35, 1, NPT_DIRTY, npages=64)
    rng = np.random.default_rng(7)
    spots = np.array([0, 512**2 - 100, 2**35], dtype=np.uint64)
    for gfns in (rng.choice(spots, 4099) + rng.integers(0, 4000, 4099, dtype=np.uint64),
                 np.arange(2**35 - 1000, 2**35 + 3001, dtype=np.uint64)):
        pfns, flags = npt.lookup_batch(gfns, with_flags=True)
        want = [npt.lookup(g) or (Npt.MISS, 0) for g in gfns.tolist()]
        assert list(zip(pfns.tolist(), flags.tolist())) == want
        assert (pfns != Npt.MISS).sum() not in (0, gfns.size)


def test_lookup_batch_of_a_nearly_sequential_run_looks_up_every_gfn(npt):
    """A sequential batch with a few gfns out of step gets those gfns' own pfns, not the run's."""
    npt.map(0, 100, 0, npages=4096)
    for pos in (0, 5, 63, 64, 200, 4000):
        gfns = np.arange(4096, dtype=np.uint64)
        gfns[pos] = 4095 - pos
        assert npt.lookup_batch(gfns).tolist() == (gfns + np.uint64(100)).tolist()


def test_lookup_batch_fills_given_out_arrays(npt):
    """lookup_batch writes into caller-provided out arrays and returns them."""
    npt.map(0, 5, 0, npages=4)
    gfns = np.arange(6, dtype=np.uint64)
    out, out_flags = np.zeros(6, np.uint64), np.zeros(6, np.uint64)
    assert npt.lookup_batch(gfns, out=out) is out
    assert out.tolist() == [5, 6, 7, 8, Npt.MISS, Npt.MISS]
    pfns, flags = npt.lookup_batch(gfns, with_flags=True, out=(out, out_flags))
    assert pfns is out and flags is out_flags and flags.tolist() == [NPT_PRESENT] * 4 + [0, 0]
    with pytest.raises(ValueError):
        npt.lookup_batch(gfns, out=np.zeros(12, np.uint64)[::2])
    with pytest.raises(TypeError):
        npt.lookup_batch(gfns, out=np.zeros(6, np.int64))


@pytest.mark.parametrize("gfns, exc", [
    (np.array([1.0, 2.0]), TypeError),
    (np.array([True]), TypeError),
    (np.array([3, -1], dtype=np.int64), ValueError),
    (np.array([-1], dtype=np.int8), ValueError),
    (np.array([GFN_LIMIT], dtype=np.uint64), ValueError),
    ([2**70], ValueError),
    (np.arange(GFN_LIMIT - 100, GFN_LIMIT + 1, dtype=np.uint64), ValueError),
])
def test_lookup_batch_rejects_bad_gfns(npt, gfns, exc):
    """lookup_batch raises for non-integer, negative or out-of-range gfns and leaves the table
    alone."""
    npt.map(3, 3, 0)
    with pytest.raises(exc):
        npt.lookup_batch(gfns)
    assert list(npt) == [(3, 3, NPT_PRESENT)]


def test_iteration_resumes_across_chunks(npt):
    """Iteration streamed in small chunks yields every mapping once, in gfn order."""
    rng = np.random.default_rng(1)
    gfns = np.unique(np.concatenate([rng.integers(0, GFN_LIMIT, 500, dtype=np.uint64),
                                     np.arange(10**6, 10**6 + 10000, dtype=np.uint64)]))
    for i, g in enumerate(gfns.tolist()):
        npt.map(g, i, NPT_PRIVATE if i % 2 else 0)
    expected = [(g, i, NPT_PRESENT | (NPT_PRIVATE if i % 2 else 0))
                for i, g in enumerate(gfns.tolist())]
    assert list(npt) == expected
    npt.ITER_CHUNK = 7
    assert list(npt) == expected
    got_gfns, got_pfns, got_flags = npt.items()
    assert list(zip(got_gfns.tolist(), got_pfns.tolist(), got_flags.tolist())) == expected


def test_iteration_sees_mutations_made_between_chunks(npt):
    """A mapping removed after its chunk has not been fetched yet is not yielded."""
    npt.map(0, 0, 0, npages=10)
    npt.ITER_CHUNK = 2
    seen = []
    for gfn, _, _ in npt:
        seen.append(gfn)
        if gfn == 1:
            npt.unmap(5)
    assert seen == [0, 1, 2, 3, 4, 6, 7, 8, 9]


def test_items_selects_a_gfn_range(npt):
    """items(start_gfn, end_gfn) returns exactly the mappings in [start_gfn, end_gfn)."""
    npt.map(510, 0, 0, npages=5)
    npt.map(512**3, 9, NPT_DIRTY)
    assert npt.items(511, 514)[0].tolist() == [511, 512, 513]
    assert npt.items(513)[0].tolist() == [513, 514, 512**3]
    assert npt.items(0, 512**3)[1].tolist() == [0, 1, 2, 3, 4]
    assert npt.items(600, 500)[0].size == 0
    with pytest.raises(ValueError):
        npt.items(0, GFN_LIMIT + 1)


def test_close_frees_and_disables_the_table():
    """close() and the context manager free the table; later calls raise ValueError; closing
    twice is fine."""
    with Npt() as table:
        table.map(0, 0, 0)
    assert table.closed and repr(table) == "<Npt closed>"
    for call in (lambda: table.lookup(0), lambda: table.map(0, 0, 0), lambda: len(table),
                 lambda: table.table_bytes, lambda: list(table)):
        with pytest.raises(ValueError):
            call()
    table.close()


def _rss_bytes():
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * 4096


@pytest.mark.parametrize("release", ["close", "collect"])
def test_table_memory_is_returned_on_close_and_on_collection(release):
    """The C memory of a table goes back to the system on close() and when the Npt is collected."""
    before = _rss_bytes()
    for _ in range(25):
        table = Npt()
        table.map(0, 0, NPT_WRITABLE, npages=1 << 20)   # 8 MiB of leaf tables
        assert table.reserved_bytes >= 8 << 20
        if release == "close":
            table.close()
        else:
            del table
            gc.collect()
    assert _rss_bytes() - before < 64 << 20


def test_out_of_memory_map_changes_nothing():
    """A map that needs more table memory than the limit fails with ENOMEM and leaves no trace."""
    with Npt(limit_bytes=2 << 20) as table:          # one chunk: 511 tables
        table.map(5, 5, NPT_WRITABLE, npages=3)
        before, reserved = snapshot(table), table.reserved_bytes
        with raises_errno(errno.ENOMEM):
            table.map(0, 100, NPT_PRIVATE, npages=512 * 511)  # 511 leaves + the upper tables
        assert snapshot(table) == before and table.reserved_bytes == reserved
        table.map(0, 100, NPT_PRIVATE, npages=512 * 500)
        assert len(table) == 512 * 500
    with Npt() as table:                              # needs 512 GiB of tables: fails at once
        table.map(5, 5, NPT_WRITABLE)
        with raises_errno(errno.ENOMEM):
            table.map(0, 0, NPT_WRITABLE, npages=GFN_LIMIT)
        assert list(table) == [(5, 5, NPT_PRESENT | NPT_WRITABLE)]
        assert table.table_bytes == 4 * TABLE
    with Npt(limit_bytes=0) as table:
        with raises_errno(errno.ENOMEM):
            table.map(0, 0, 0)
        assert snapshot(table) == ([], [], [], 0, 0) and table.reserved_bytes == 0


BAD_CALLS = [
    ("map", (GFN_LIMIT, 0, 0), ValueError),
    ("map", (-1, 0, 0), ValueError),
    ("map", (0, -1, 0), ValueError),
    ("map", (0, PFN_LIMIT, 0), ValueError),
    ("map", (0, PFN_LIMIT - 1, 0, 2), ValueError),
    ("map", (0, 0, 0, 0), ValueError),
    ("map", (0, 0, 0, -5), ValueError),
    ("map", (GFN_LIMIT - 1, 0, 0, 2), ValueError),
    ("map", (0, 0, 1 << 3), ValueError),
    ("map", (0, 0, 1 << 12), ValueError),
    ("map", (0, 0, -1), ValueError),
    ("map", (1.0, 0, 0), TypeError),
    ("map", ("0", 0, 0), TypeError),
    ("unmap", (0, 0), ValueError),
    ("unmap", (GFN_LIMIT, 1), ValueError),
    ("unmap", (1, GFN_LIMIT), ValueError),
    ("zap_range", (0, 10, 1 << 4), ValueError),
    ("zap_range", (0, 10, 0, 1 << 11), ValueError),
    ("zap_range", (0, 0), ValueError),
    ("protect_range", (0, 10, NPT_PRESENT, 0), ValueError),
    ("protect_range", (0, 10, 0, 1 << 2), ValueError),
    ("protect_range", (-1, 10), ValueError),
    ("lookup", (GFN_LIMIT,), ValueError),
    ("lookup", (-1,), ValueError),
]


@pytest.mark.parametrize("impl", [Npt, RefNpt])
@pytest.mark.parametrize("method, args, exc", BAD_CALLS)
def test_bad_arguments_raise_before_any_change(impl, method, args, exc):
    """Out-of-range gfns, pfns and npages, unknown flag bits and non-ints raise and change
    nothing."""
    with impl() as table:
        table.map(510, 10, NPT_WRITABLE, npages=4)
        before = (list(table), table.table_bytes)
        with pytest.raises(exc):
            getattr(table, method)(*args)
        assert (list(table), table.table_bytes) == before


EINVAL_CALLS = [
    ("map", (GFN_LIMIT, 0, 0, 1), "NPT_GFN"),
    ("map", (0, 0, 0, 0), "NPT_NPAGES"),
    ("map", (GFN_LIMIT - 1, 0, 0, 2), "NPT_NPAGES"),
    ("map", (0, 0, 0, 2**64 - 1), "NPT_NPAGES"),
    ("map", (0, PFN_LIMIT, 0, 1), "NPT_PFN"),
    ("map", (0, PFN_LIMIT - 1, 0, 2), "NPT_PFN"),
    ("map", (0, 0, 1 << 3, 1), "NPT_FLAGS"),
    ("unmap", (0, 0), "NPT_NPAGES"),
    ("unmap", (2**64 - 1, 1), "NPT_GFN"),
    ("zap_range", (0, 1, 0, 1 << 63), "NPT_FLAGS"),
    ("zap_range", (0, 1, 1 << 12, 0), "NPT_FLAGS"),
    ("protect_range", (0, 1, NPT_PRESENT, 0), "NPT_CLEAR_PRESENT"),
    ("protect_range", (0, 1, 0, 1 << 8), "NPT_FLAGS"),
    ("lookup", (GFN_LIMIT, _b.ffi.new("uint64_t *")), "NPT_GFN"),
]


@pytest.mark.parametrize("func, args, reason", EINVAL_CALLS)
def test_c_core_rejects_bad_arguments_with_einval(func, args, reason):
    """The C functions themselves answer bad arguments with -EINVAL and the reason, and change
    nothing."""
    with Npt() as table:
        table.map(0, 0, NPT_WRITABLE, npages=600)
        before = snapshot(table)
        err = _b.ffi.new("struct sc_err *")
        assert getattr(_b.lib, "sc_npt_" + func)(table._npt, *args, err) == -errno.EINVAL
        assert err.reason == getattr(_b.lib, "SC_ERR_" + reason)
        assert snapshot(table) == before


def test_c_core_rejects_null_tables_and_bad_iteration_bounds():
    """The C functions answer a NULL table with OSError(EINVAL) instead of crashing, and an end
    gfn past 2**36 with a ValueError naming it."""
    buf = np.zeros(4, np.uint64)
    for call in (lambda: _b.npt_count(_b.ffi.NULL), lambda: _b.npt_stats(_b.ffi.NULL),
                 lambda: _b.npt_map(_b.ffi.NULL, 0, 0, 0, 1),
                 lambda: _b.npt_map_pairs(_b.ffi.NULL, buf, buf, 0),
                 lambda: _b.npt_lookup(_b.ffi.NULL, 0),
                 lambda: _b.npt_lookup_batch(_b.ffi.NULL, buf, buf),
                 lambda: _b.npt_next_mapped(_b.ffi.NULL, 0, 1, buf, buf)):
        with raises_errno(errno.EINVAL):
            call()
    with Npt() as table:
        for start, end in ((0, GFN_LIMIT + 1), (GFN_LIMIT + 1, GFN_LIMIT)):
            with pytest.raises(ValueError, match=f"gfn bound {GFN_LIMIT + 1:#x} is past"):
                _b.npt_next_mapped(table._npt, start, end, buf, buf)


def test_map_pairs_refuses_a_batch_whole_naming_the_pair():
    """map_runs checks every pair in C before mapping any: the first gfn or pfn out of range is
    named with its index, and nothing is mapped."""
    with Npt() as table:
        gfns = np.array([1, 2, 3, GFN_LIMIT], np.uint64)
        with pytest.raises(ValueError, match=rf"gfns\[3\] = {GFN_LIMIT:#x} is outside"):
            table.map_runs(gfns, np.arange(4, dtype=np.uint64), NPT_WRITABLE)
        with pytest.raises(ValueError, match=rf"pfns\[1\] = {PFN_LIMIT:#x} is outside"):
            table.map_runs([1, 2], [5, PFN_LIMIT], NPT_WRITABLE)
        with pytest.raises(ValueError, match=r"gfns\[1\] = -1 is not a u64"):
            table.map_runs([1, -1], [5, 6], NPT_WRITABLE)
        assert len(table) == 0


# --- memory follows what is mapped ----------------------------------------------------------------

GUEST_64G = 1 << 24                                    # 4 KiB pages in a 64 GiB guest
FULL_64G_TABLES = GUEST_64G // 512 + GUEST_64G // 512**2 + 1 + 1


def test_one_percent_of_a_64_gib_guest_in_scattered_runs_costs_one_percent_of_the_tables(npt):
    """Mapping 1% of a 64 GiB guest's pages as scattered 2 MiB runs costs about 1% of a full map's
    tables."""
    rng = np.random.default_rng(64)
    runs = rng.choice(GUEST_64G // 512, size=GUEST_64G // 512 // 100, replace=False)
    for run in runs.tolist():
        npt.map(run * 512, run * 512, NPT_PRIVATE, npages=512)
    mapped = np.concatenate([np.arange(r * 512, r * 512 + 512) for r in runs.tolist()])
    assert len(npt) == mapped.size == runs.size * 512
    assert npt.table_bytes == tables_for(mapped) * TABLE
    assert npt.table_bytes < 0.015 * FULL_64G_TABLES * TABLE
    # Nothing was freed, so the chunks (511 tables each) are exactly as many as needed.
    assert npt.reserved_bytes == -(-npt.table_bytes // TABLE // 511) * (2 << 20)


def test_scattered_single_pages_cost_exactly_the_tables_they_touch(npt):
    """Mapping 1% of a 64 GiB guest's pages one by one at random costs exactly one table per
    touched prefix."""
    rng = np.random.default_rng(65)
    gfns = rng.choice(GUEST_64G, size=GUEST_64G // 100, replace=False)
    for g in gfns.tolist():
        npt.map(g, g, 0)
    assert len(npt) == gfns.size
    assert npt.table_bytes == tables_for(gfns) * TABLE
    assert npt.unmap(0, GUEST_64G) == gfns.size
    assert npt.table_bytes == 0 and npt.reserved_bytes <= 2 << 20


def test_sparse_zap_over_a_huge_range_touches_only_what_is_mapped(npt):
    """Zapping 1 TiB and then the whole 256 TiB space with a few entries removes exactly those
    entries."""
    inside = [0, 511, 512**3 - 1, (1 << 28) - 1]
    outside = [1 << 28, 2**35, GFN_LIMIT - 1]
    for g in inside + outside:
        npt.map(g, 1, NPT_PRIVATE)
    assert npt.zap_range(0, 1 << 28) == len(inside)               # 1 TiB of guest space
    assert [g for g, _, _ in npt] == outside
    assert npt.protect_range(0, GFN_LIMIT, 0, NPT_DIRTY_LOG) == len(outside)
    assert npt.zap_range(0, GFN_LIMIT, match_flags=NPT_PRIVATE | NPT_DIRTY_LOG) == len(outside)
    assert len(npt) == 0 and npt.table_bytes == 0


# --- differential: C against the dict reference ---------------------------------------------------

ANCHORS = [0, 512, 512**2, 512**3, GFN_LIMIT - 2048]
flag_sets = st.integers(0, NPT_FLAGS_MASK).map(lambda f: f & NPT_FLAGS_MASK)


@st.composite
def gfn_ranges(draw, max_npages=1100):
    base = draw(st.sampled_from(ANCHORS))
    gfn = min(max(base + draw(st.integers(-700, 700)), 0), GFN_LIMIT - 1)
    npages = draw(st.integers(1, min(max_npages, GFN_LIMIT - gfn)))
    return gfn, npages


@st.composite
def operations(draw):
    kind = draw(st.sampled_from(["map", "unmap", "zap_range", "protect_range"]))
    gfn, npages = draw(gfn_ranges())
    if kind == "map":
        return kind, (gfn, draw(st.integers(0, PFN_LIMIT - npages)), draw(flag_sets), npages)
    if draw(st.booleans()):
        npages = GFN_LIMIT - gfn          # to the end of the address space
    if kind == "unmap":
        return kind, (gfn, npages)
    if kind == "zap_range":
        return kind, (gfn, npages, draw(flag_sets), draw(flag_sets))
    return kind, (gfn, npages, draw(flag_sets) & ~NPT_PRESENT, draw(flag_sets))


@given(ops=st.lists(operations(), max_size=25), probes=st.lists(gfn_ranges(4), max_size=20))
def test_matches_the_reference_on_random_operations(ops, probes):
    """Any sequence of maps, unmaps, zaps and protects gives the same results and contents as the
    dict reference."""
    ref = RefNpt()
    with Npt() as table:
        for kind, args in ops:
            assert getattr(table, kind)(*args) == getattr(ref, kind)(*args), (kind, args)
        gfns = np.array([g + i for g, n in probes for i in range(n)], dtype=np.uint64)
        got = table.lookup_batch(gfns, with_flags=True)
        want = ref.lookup_batch(gfns, with_flags=True)
        assert [a.tolist() for a in got] == [a.tolist() for a in want]
        assert list(table) == list(ref)
        assert len(table) == len(ref) and table.table_bytes == ref.table_bytes


class NptMachine(RuleBasedStateMachine):
    """Npt driven step by step beside the dict reference."""

    def __init__(self):
        super().__init__()
        self.table = Npt()
        self.ref = RefNpt()

    @rule(gfn_npages=gfn_ranges(), pfn=st.integers(0, PFN_LIMIT - 1100), flags=flag_sets)
    def map(self, gfn_npages, pfn, flags):
        gfn, npages = gfn_npages
        self.table.map(gfn, pfn, flags, npages)
        self.ref.map(gfn, pfn, flags, npages)

    @rule(gfn_npages=gfn_ranges())
    def unmap(self, gfn_npages):
        assert self.table.unmap(*gfn_npages) == self.ref.unmap(*gfn_npages)

    @rule(gfn_npages=gfn_ranges(), match=flag_sets, exclude=flag_sets)
    def zap_range(self, gfn_npages, match, exclude):
        assert (self.table.zap_range(*gfn_npages, match, exclude)
                == self.ref.zap_range(*gfn_npages, match, exclude))

    @rule(gfn_npages=gfn_ranges(), clear=flag_sets, set_=flag_sets)
    def protect_range(self, gfn_npages, clear, set_):
        clear &= ~NPT_PRESENT
        assert (self.table.protect_range(*gfn_npages, clear, set_)
                == self.ref.protect_range(*gfn_npages, clear, set_))

    @rule(gfn_npages=gfn_ranges(64))
    def lookups(self, gfn_npages):
        gfn, npages = gfn_npages
        gfns = np.arange(gfn, gfn + npages, dtype=np.uint64)
        assert self.table.lookup_batch(gfns).tolist() == self.ref.lookup_batch(gfns).tolist()
        assert self.table.lookup(gfn) == self.ref.lookup(gfn)

    @rule(gfn_npages=gfn_ranges(5000))
    def items(self, gfn_npages):
        gfn, npages = gfn_npages
        got = self.table.items(gfn, gfn + npages)
        assert [a.tolist() for a in got] == [a.tolist() for a in self.ref.items(gfn, gfn + npages)]

    @precondition(lambda self: len(self.ref) > 0)
    @rule()
    def unmap_everything(self):
        assert self.table.unmap(0, GFN_LIMIT) == self.ref.unmap(0, GFN_LIMIT)

    @invariant()
    def same_count_and_table_memory(self):
        assert len(self.table) == len(self.ref)
        assert self.table.table_bytes == self.ref.table_bytes
        if len(self.ref) == 0:
            assert self.table.table_bytes == 0 and self.table.reserved_bytes <= 2 << 20

    def teardown(self):
        assert list(self.table) == list(self.ref)
        self.table.close()


NptMachine.TestCase.settings = settings(stateful_step_count=30)
test_npt_state_machine = NptMachine.TestCase


def test_npt_lock_lets_readers_share_and_keeps_a_writer_out():
    """Holders of the lock for read do not wait for each other; a writer gets it only after
    the last reader leaves, and readers arriving while it waits queue behind it."""
    import threading
    import time
    lock = NptLock()
    order = []
    with lock.shared():
        inner = threading.Thread(target=lock._enter_shared)
        inner.start()
        inner.join(timeout=10)
        assert not inner.is_alive()             # a second reader got in beside the first
        lock._exit_shared()                     # (and leaves)

        def writer():
            with lock:
                order.append("writer")
        w = threading.Thread(target=writer)
        w.start()
        while not lock._waiting:
            time.sleep(0.001)
        late = threading.Thread(target=lambda: (lock._enter_shared(), order.append("reader"),
                                                lock._exit_shared()))
        late.start()
        time.sleep(0.05)
        order.append("first reader leaves")
    w.join(timeout=10)
    late.join(timeout=10)
    assert order == ["first reader leaves", "writer", "reader"]


def test_npt_lock_writer_interrupted_while_waiting_does_not_hold_readers_back():
    """A writer whose wait for the lock is interrupted (an exception in the wait) gives up its
    place in the queue: readers that come after it get in."""
    import threading
    lock = NptLock()
    real_wait = lock._cond.wait

    def interrupted(*args):
        raise KeyboardInterrupt
    with lock.shared():
        lock._cond.wait = interrupted
        with pytest.raises(KeyboardInterrupt):
            lock.__enter__()
        lock._cond.wait = real_wait
    reader = threading.Thread(target=lambda: (lock._enter_shared(), lock._exit_shared()))
    reader.start()
    reader.join(timeout=10)
    alive = reader.is_alive()
    if alive:                                   # let the stuck reader go before failing
        with lock._cond:
            lock._waiting = 0
            lock._cond.notify_all()
        reader.join(timeout=10)
    assert not alive and lock._waiting == 0
