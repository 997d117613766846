"""A slow, obviously correct bitmap backed by a Python ``set``: the oracle for sevcore.core.bitmap.

Same method names and results as :class:`sevcore.core.bitmap.Bitmap`, with plain Python values
(lists, tuples, ints) where the fast class returns numpy arrays. No word layout, no tail bits,
no C: every answer follows from the definition over the set of set bits.
"""
import operator

MAX_NBITS = 1 << 40


class Bitmap:
    """``nbits`` bits, stored as the set of indices that are set."""

    def __init__(self, nbits):
        nbits = operator.index(nbits)
        if not 0 < nbits <= MAX_NBITS:
            raise ValueError(f"nbits must be in [1, {MAX_NBITS}], not {nbits}")
        self.nbits = nbits
        self.bits = set()

    @classmethod
    def from_indices(cls, nbits, indices):
        self = cls(nbits)
        for i in indices:
            self.set(int(i))
        return self

    def __len__(self):
        return self.nbits

    def __eq__(self, other):
        if not isinstance(other, Bitmap):
            return NotImplemented
        return self.nbits == other.nbits and self.bits == other.bits

    __hash__ = None

    def copy(self):
        c = Bitmap(self.nbits)
        c.bits = set(self.bits)
        return c

    def _check(self, i):
        i = operator.index(i)
        if not 0 <= i < self.nbits:
            raise IndexError(f"bit {i} out of range for a {self.nbits}-bit bitmap")
        return i

    def set(self, i):
        self.bits.add(self._check(i))

    def clear(self, i):
        self.bits.discard(self._check(i))

    def test(self, i):
        return self._check(i) in self.bits

    def _range(self, start, end):
        end = self.nbits if end is None else end
        if not 0 <= start <= end <= self.nbits:
            raise IndexError(f"range [{start}, {end}) is not within [0, {self.nbits})")
        return start, end

    def _span(self, start, n):
        if n < 0:
            raise ValueError(f"bit count must not be negative, not {n}")
        return self._range(start, start + n)

    def set_range(self, start, n):
        start, end = self._span(start, n)
        self.bits.update(range(start, end))

    def clear_range(self, start, n):
        start, end = self._span(start, n)
        self.bits.difference_update(range(start, end))

    def clear_all(self):
        self.bits.clear()

    def set_indices(self, start=0, end=None, *, out=None):
        start, end = self._range(start, end)
        return sorted(i for i in self.bits if start <= i < end)

    def iter_set(self, start=0, end=None):
        return iter(self.set_indices(start, end))

    __iter__ = iter_set

    def count(self, start=0, end=None):
        return len(self.set_indices(start, end))

    def find_next_set(self, start=0):
        if start < 0:
            raise IndexError(f"start must not be negative, not {start}")
        return min((i for i in self.bits if i >= start), default=self.nbits)

    def find_next_zero(self, start=0):
        if start < 0:
            raise IndexError(f"start must not be negative, not {start}")
        i = start
        while i in self.bits:
            i += 1
        return min(i, self.nbits)

    def iter_runs(self, start=0, end=None):
        runs = []
        for i in self.set_indices(start, end):
            if runs and runs[-1][0] + runs[-1][1] == i:
                runs[-1][1] += 1
            else:
                runs.append([i, 1])
        return iter([tuple(r) for r in runs])

    def runs(self, start=0, end=None):
        runs = list(self.iter_runs(start, end))
        return [s for s, _ in runs], [n for _, n in runs]

    def count_runs(self, start=0, end=None):
        return len(list(self.iter_runs(start, end)))

    def harvest(self, start=0, end=None, *, out=None):
        taken = self.set_indices(start, end)
        self.bits.difference_update(taken)
        return taken

    def _combine(self, other, out, bits):
        if other.nbits != self.nbits:
            raise ValueError(f"bitmap sizes differ: {self.nbits} != {other.nbits} bits")
        out = Bitmap(self.nbits) if out is None else out
        out.bits = bits
        return out

    def and_(self, other, out=None):
        return self._combine(other, out, self.bits & other.bits)

    def or_(self, other, out=None):
        return self._combine(other, out, self.bits | other.bits)

    def andnot(self, other, out=None):
        return self._combine(other, out, self.bits - other.bits)

    def __and__(self, other):
        return self.and_(other)

    def __or__(self, other):
        return self.or_(other)

    def __sub__(self, other):
        return self.andnot(other)

    def __iand__(self, other):
        return self.and_(other, out=self)

    def __ior__(self, other):
        return self.or_(other, out=self)

    def __isub__(self, other):
        return self.andnot(other, out=self)
