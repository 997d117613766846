"""sevcore.core.arrays.runs against the obvious loop."""
import numpy as np
from hypothesis import given
from hypothesis import strategies as st

from sevcore.core.arrays import runs


def runs_by_loop(values):
    out, i = [], 0
    while i < len(values):
        j = i + 1
        while j < len(values) and values[j] == values[j - 1] + 1:
            j += 1
        out.append((i, j - i))
        i = j
    return out


@given(st.lists(st.integers(0, 40), max_size=60))
def test_runs_match_the_loop(values):
    """Any list of small values splits into the same (start, length) runs as the plain loop."""
    assert runs(np.array(values, np.uint64)) == runs_by_loop(values)


def test_runs_edges():
    """No values, one value, a descent and u64 values near the top split where they should."""
    top = (1 << 64) - 1
    assert runs(np.empty(0, np.uint64)) == []
    assert runs(np.array([7], np.uint64)) == [(0, 1)]
    assert runs(np.array([3, 2, 3, 4], np.uint64)) == [(0, 1), (1, 3)]
    assert runs(np.array([top - 1, top, 0], np.uint64)) == [(0, 2), (2, 1)]
