"""guest_memfd's page cache (sevcore.kvm.guest_memfd.PageCache, the C radix keyed by file page
index) against a dict oracle, across the 2**36-page windows a file larger than 256 TiB spans."""
import numpy as np
from hypothesis import given, strategies as st

from sevcore.kvm.guest_memfd import MISS, PageCache

W = 1 << 36
# Indexes near the edges of the first windows and near 2**51 (the last page of a 2**63-byte file).
index = st.one_of(st.integers(0, 40), st.integers(W - 20, W + 20), st.integers(2 * W - 4, 2 * W),
                  st.integers((1 << 51) - 8, (1 << 51) - 1))
ops = st.lists(st.one_of(
    st.tuples(st.just("add"), st.lists(index, max_size=12)),
    st.tuples(st.just("insert"), index),
    st.tuples(st.just("remove"), index, st.integers(0, W + 50)),
    st.tuples(st.just("lookup"), st.lists(index, max_size=12)),
), max_size=25)


@given(ops)
def test_page_cache_matches_a_dict(steps):
    """Any sequence of add, insert, remove and lookups leaves the pages a dict holds, in order."""
    cache, oracle, next_pfn = PageCache(), {}, 0x1000
    for op, *args in steps:
        if op == "add":
            new = sorted({i for i in args[0] if i not in oracle})
            pfns = np.arange(next_pfn, next_pfn + len(new), dtype=np.uint64)
            next_pfn += len(new) + 3
            cache.add(np.array(new, np.uint64), pfns)
            oracle.update(zip(new, pfns.tolist()))
        elif op == "insert":
            if args[0] not in oracle:
                cache.insert(args[0], next_pfn)
                oracle[args[0]] = next_pfn
                next_pfn += 2
        elif op == "remove":
            start, end = args[0], args[0] + args[1]
            gone = sorted(i for i in oracle if start <= i < end)
            assert sorted(cache.remove(start, end).tolist()) == sorted(oracle.pop(i) for i in gone)
        else:
            got = cache.lookup_batch(np.array(args[0], np.uint64)).tolist()
            assert got == [oracle.get(i, MISS) for i in args[0]]
            assert [cache.lookup(i) for i in args[0]] == [oracle.get(i) for i in args[0]]
        keys = sorted(oracle)
        assert [a.tolist() for a in cache.items()] == [keys, [oracle[k] for k in keys]]
        assert len(cache) == len(oracle)
    assert sorted(cache.clear().tolist()) == sorted(oracle.values())
    assert len(cache) == 0 and cache.table_bytes == 0
