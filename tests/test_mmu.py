"""Helpers of the batched fault path (sevcore.mmu)."""
import numpy as np
from hypothesis import given
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from sevcore.mmu import sorted_unique


@given(hnp.arrays(np.uint64, st.integers(0, 40), elements=st.integers(0, 50)))
def test_sorted_unique_is_np_unique(values):
    """sorted_unique gives np.unique's sorted distinct values, for runs and any other list."""
    assert sorted_unique(values).tolist() == np.unique(values).tolist()
    run = np.arange(7, 7 + len(values), dtype=np.uint64)
    assert sorted_unique(run).tolist() == run.tolist()
