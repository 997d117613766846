"""Helpers of the batched fault path: mmu.sorted_unique and Npt.map_runs."""
import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from sevcore.kvm.mmu import sorted_unique
from sevcore.core.npt import NPT_WRITABLE, Npt


@given(hnp.arrays(np.uint64, st.integers(0, 40), elements=st.integers(0, 50)))
def test_sorted_unique_is_np_unique(values):
    """sorted_unique gives np.unique's sorted distinct values, for runs and any other list."""
    assert sorted_unique(values).tolist() == np.unique(values).tolist()
    run = np.arange(7, 7 + len(values), dtype=np.uint64)
    assert sorted_unique(run).tolist() == run.tolist()


@given(st.lists(st.tuples(st.integers(0, 300), st.integers(0, 3)), max_size=30))
def test_npt_map_runs_maps_as_one_map_per_page(pairs):
    """Npt.map_runs of any gfn -> pfn list leaves the table one Npt.map per page would."""
    gfns = np.array([g for g, _ in pairs], np.uint64)
    pfns = np.array([0x1000 + g * 2 % 7 + d for g, d in pairs], np.uint64)
    with Npt() as batch, Npt() as loop:
        batch.map_runs(gfns, pfns, NPT_WRITABLE)
        for g, p in zip(gfns.tolist(), pfns.tolist()):
            loop.map(g, p, NPT_WRITABLE)
        assert [a.tolist() for a in batch.items()] == [a.tolist() for a in loop.items()]


def test_npt_map_runs_checks_everything_first():
    """A bad gfn, pfn, flag or length anywhere in the batch is a ValueError with nothing mapped."""
    with Npt() as npt:
        for gfns, pfns, flags in (([1, 2, 1 << 36], [5, 6, 7], NPT_WRITABLE),
                                  ([1, 2], [5, 1 << 62], NPT_WRITABLE),
                                  ([1, 2], [5], NPT_WRITABLE),
                                  ([1, 2], [5, 6], 1 << 20)):
            with pytest.raises(ValueError):
                npt.map_runs(np.array(gfns, np.uint64), np.array(pfns, np.uint64), flags)
        assert len(npt) == 0
