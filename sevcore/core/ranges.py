"""A set of integers kept as sorted, disjoint half-open ranges.

Used for per-VM memory attributes (which gfns are private) and for the VMM's list of the pages a
guest declared shared: both change by ranges, so they are stored as ranges, not one entry per page.
"""
import bisect

import numpy as np


class RangeSet:
    """Sorted disjoint ``[start, end)`` ranges with range add/remove and queries."""

    def __init__(self, ranges=()):
        self._starts = []
        self._ends = []
        for s, e in ranges:
            self.add(s, e)

    def __len__(self):
        """Number of integers in the set (not of the ranges iteration yields: ``list(rs)``
        preallocates this many slots, so take ``list(iter(rs))`` for the ranges)."""
        return sum(e - s for s, e in zip(self._starts, self._ends))

    def __iter__(self):
        return iter(list(zip(self._starts, self._ends)))

    def __eq__(self, other):
        return isinstance(other, RangeSet) and (self._starts, self._ends) == (other._starts,
                                                                              other._ends)

    def __repr__(self):
        return f"RangeSet({list(zip(self._starts, self._ends))!r})"

    def copy(self):
        out = RangeSet()
        out._starts, out._ends = list(self._starts), list(self._ends)
        return out

    def clear(self):
        self._starts.clear()
        self._ends.clear()

    def _span(self, start, end):
        """Indices [i, j) of the stored ranges that overlap or touch [start, end)."""
        i = bisect.bisect_left(self._ends, start)
        j = bisect.bisect_right(self._starts, end)
        return i, j

    def add(self, start, end):
        """Add every integer in ``[start, end)``."""
        if start >= end:
            return
        i, j = self._span(start, end)
        if i < j:
            start = min(start, self._starts[i])
            end = max(end, self._ends[j - 1])
        self._starts[i:j] = [start]
        self._ends[i:j] = [end]

    def remove(self, start, end):
        """Remove every integer in ``[start, end)``."""
        if start >= end:
            return
        i = bisect.bisect_right(self._ends, start)
        j = bisect.bisect_left(self._starts, end)
        if i >= j:
            return
        new_s, new_e = [], []
        if self._starts[i] < start:
            new_s.append(self._starts[i])
            new_e.append(start)
        if self._ends[j - 1] > end:
            new_s.append(end)
            new_e.append(self._ends[j - 1])
        self._starts[i:j] = new_s
        self._ends[i:j] = new_e

    def __contains__(self, x):
        i = bisect.bisect_right(self._starts, x) - 1
        return i >= 0 and x < self._ends[i]

    def covers(self, start, end):
        """True if every integer of ``[start, end)`` is in the set (True for an empty range)."""
        if start >= end:
            return True
        i = bisect.bisect_right(self._starts, start) - 1
        return i >= 0 and self._ends[i] >= end

    def disjoint(self, start, end):
        """True if no integer of ``[start, end)`` is in the set."""
        if start >= end:
            return True
        i = bisect.bisect_right(self._ends, start)
        return i >= len(self._starts) or self._starts[i] >= end

    def intersect(self, start, end):
        """The stored ranges clipped to ``[start, end)``."""
        out = []
        i = bisect.bisect_right(self._ends, start)
        while i < len(self._starts) and self._starts[i] < end:
            out.append((max(self._starts[i], start), min(self._ends[i], end)))
            i += 1
        return out

    def contains_array(self, xs):
        """Membership of each element of the integer array ``xs`` (a bool array)."""
        xs = np.asarray(xs)
        starts = np.asarray(self._starts, dtype=xs.dtype)
        ends = np.asarray(self._ends, dtype=xs.dtype)
        i = np.searchsorted(starts, xs, side="right").astype(np.int64) - 1
        inside = i >= 0
        inside[inside] = xs[inside] < ends[i[inside]]
        return inside
