"""Bitmaps in the layout of KVM's dirty log, backed by C kernels.

A :class:`Bitmap` of ``nbits`` bits stores them in ``words``, a numpy ``uint64`` array of
``ceil(nbits / 64)`` words where bit ``i`` is bit ``i % 64`` of ``words[i // 64]``: exactly the
buffer ``KVM_GET_DIRTY_LOG`` fills and ``KVM_CLEAR_DIRTY_LOG`` reads, so it can be passed to and
from such APIs without copying. Bits of the last word at or past ``nbits`` are not part of the
bitmap: nothing reports, counts or changes them.

>>> bm = Bitmap(1 << 20)            # one bit per 4 KiB page of a 4 GiB guest
>>> bm.set_range(4096, 3); bm.set(7)
>>> bm.count(), list(bm.iter_runs())
(4, [(7, 1), (4096, 3)])
>>> bm.harvest().tolist(), bm.count()
([7, 4096, 4097, 4098], 0)
"""
import operator
import sys

import numpy as np

from sevcore import _bindings as _b

#: Largest bitmap accepted: one bit per 4 KiB page of a 52-bit physical address space.
MAX_NBITS = _b.BITMAP_MAX_NBITS

# Indices handed to Python per C call when streaming; big enough that the call (~1 us) is noise
# next to building the Python ints, small enough to stay in L1/L2.
_CHUNK = 4096

# Single-bit operations address the byte holding the bit through a memoryview, which costs less
# than a cffi call (measured ~120-170 ns vs ~170-200 ns per call); that needs the words'
# little-endian byte order, which is also the only order the dirty-log layout is defined for here.
if sys.byteorder != "little":  # pragma: no cover
    raise ImportError("sevcore bitmaps need a little-endian host (the KVM dirty-log layout)")


def _nbits_arg(nbits):
    nbits = operator.index(nbits)
    if not 0 < nbits <= MAX_NBITS:
        raise ValueError(f"nbits must be in [1, {MAX_NBITS}], not {nbits}")
    return nbits


class Bitmap:
    """A fixed-size bitmap of ``nbits`` bits over a numpy uint64 array in the KVM layout."""

    __slots__ = ("_words", "_nbits", "_map", "_bytes", "__weakref__")

    def __init__(self, nbits):
        """A cleared bitmap; raises ValueError unless ``0 < nbits <= MAX_NBITS``."""
        nbits = _nbits_arg(nbits)
        self._attach(np.zeros(_b.bitmap_words(nbits), dtype=np.uint64), nbits)

    def _attach(self, words, nbits):
        self._map = _b.bitmap_map(words, nbits)
        self._words = words
        self._nbits = nbits
        self._bytes = memoryview(words).cast("B")

    @classmethod
    def from_words(cls, words, nbits=None):
        """Wrap ``words`` (no copy): a writable, contiguous 1-D uint64 numpy array of exactly
        ``ceil(nbits / 64)`` words; ``nbits`` defaults to ``64 * len(words)``.

        Raises TypeError for another type or dtype and ValueError for a bad shape or size.
        """
        if not isinstance(words, np.ndarray):
            raise TypeError(f"words must be a numpy uint64 array, not {type(words).__name__}")
        if words.dtype != np.dtype(np.uint64):
            raise TypeError(f"words must have dtype uint64, not {words.dtype}")
        nbits = _nbits_arg(64 * words.size if nbits is None else nbits)
        self = cls.__new__(cls)
        self._attach(words, nbits)
        return self

    @classmethod
    def from_indices(cls, nbits, indices):
        """A bitmap of ``nbits`` bits with the bits at ``indices`` set (IndexError if any is
        outside ``[0, nbits)``)."""
        self = cls(nbits)
        idx = np.asarray(indices)
        if idx.size == 0:
            return self
        if idx.dtype.kind not in "iu":
            raise TypeError(f"indices must be integers, not {idx.dtype}")
        idx = idx.ravel()
        lo, hi = int(idx.min()), int(idx.max())
        if lo < 0 or hi >= nbits:
            raise IndexError(f"bit {lo if lo < 0 else hi} out of range for a {nbits}-bit bitmap")
        idx = idx.astype(np.uint64, copy=False)
        np.bitwise_or.at(self.words, idx >> np.uint64(6),
                         np.left_shift(np.uint64(1), idx & np.uint64(63)))
        return self

    # -- size, identity ----------------------------------------------------------------------

    @property
    def words(self):
        """The numpy uint64 array holding the bits (shared, not a copy)."""
        return self._words

    @property
    def nbits(self):
        """Number of bits."""
        return self._nbits

    def __len__(self):
        return self._nbits

    def __eq__(self, other):
        if not isinstance(other, Bitmap):
            return NotImplemented
        return self._nbits == other._nbits and _b.bitmap_equal(self._map, other._map,
                                                               self._nbits)

    __hash__ = None  # mutable

    def __repr__(self):
        return f"Bitmap(nbits={self._nbits}, count={self.count()})"

    def copy(self):
        """An independent bitmap with the same bits."""
        return Bitmap.from_words(self.words.copy(), self._nbits)

    # -- single bits (pure Python: cheaper than a cffi call) -----------------------------------
    #
    # Not atomic: a concurrent harvest() in another thread may report a bit twice. A setter that
    # races with harvesting belongs in C (sc_bitmap_set_bit_atomic in csrc/bitmap.h).

    def set(self, i):
        """Set bit ``i`` (IndexError outside ``[0, nbits)``)."""
        if not 0 <= i < self._nbits:
            self._bad_index(i)
        self._bytes[i >> 3] |= 1 << (i & 7)

    def clear(self, i):
        """Clear bit ``i`` (IndexError outside ``[0, nbits)``)."""
        if not 0 <= i < self._nbits:
            self._bad_index(i)
        self._bytes[i >> 3] &= ~(1 << (i & 7)) & 0xFF

    def test(self, i):
        """Whether bit ``i`` is set (IndexError outside ``[0, nbits)``)."""
        if not 0 <= i < self._nbits:
            self._bad_index(i)
        return (self._bytes[i >> 3] >> (i & 7)) & 1 == 1

    def _bad_index(self, i):
        i = operator.index(i)  # TypeError for non-integers
        raise IndexError(f"bit {i} out of range for a {self._nbits}-bit bitmap")

    # -- ranges --------------------------------------------------------------------------------

    def _range(self, start, end):
        start = operator.index(start)
        end = self._nbits if end is None else operator.index(end)
        if not 0 <= start <= end <= self._nbits:
            raise IndexError(f"range [{start}, {end}) is not within [0, {self._nbits})")
        return start, end

    def _span(self, start, n):
        start, n = operator.index(start), operator.index(n)
        if n < 0:
            raise ValueError(f"bit count must not be negative, not {n}")
        self._range(start, start + n)
        return start, n

    def set_range(self, start, n):
        """Set the ``n`` bits from ``start`` (IndexError past the end, ValueError if n < 0)."""
        start, n = self._span(start, n)
        _b.bitmap_set_range(self._map, self._nbits, start, n)

    def clear_range(self, start, n):
        """Clear the ``n`` bits from ``start`` (IndexError past the end, ValueError if n < 0)."""
        start, n = self._span(start, n)
        _b.bitmap_clear_range(self._map, self._nbits, start, n)

    def clear_all(self):
        """Clear every bit."""
        _b.bitmap_clear_range(self._map, self._nbits, 0, self._nbits)

    def count(self, start=0, end=None):
        """Number of set bits in ``[start, end)`` (default: all)."""
        start, end = self._range(start, end)
        return _b.bitmap_count(self._map, self._nbits, start, end)

    def count_runs(self, start=0, end=None):
        """Number of maximal runs of set bits in ``[start, end)``."""
        start, end = self._range(start, end)
        return _b.bitmap_count_runs(self._map, self._nbits, start, end)

    def find_next_set(self, start=0):
        """First set bit at or after ``start``, or ``nbits`` if none (Linux find_next_bit())."""
        start = operator.index(start)
        if start < 0:
            raise IndexError(f"start must not be negative, not {start}")
        return _b.bitmap_find_next_set(self._map, self._nbits, min(start, self._nbits))

    def find_next_zero(self, start=0):
        """First clear bit at or after ``start``, or ``nbits`` if none (find_next_zero_bit())."""
        start = operator.index(start)
        if start < 0:
            raise IndexError(f"start must not be negative, not {start}")
        return _b.bitmap_find_next_zero(self._map, self._nbits, min(start, self._nbits))

    # -- streaming -----------------------------------------------------------------------------

    def iter_set(self, start=0, end=None):
        """Yield the set bits in ``[start, end)`` in ascending order, fetched from C in chunks.

        Bits changed behind the scan position while iterating are not revisited."""
        start, end = self._range(start, end)
        return self._iter_set(start, end)

    def _iter_set(self, pos, end):
        buf = np.empty(_CHUNK, dtype=np.uint64)
        while pos < end:
            n, pos = _b.bitmap_iter_set(self._map, self._nbits, pos, end, buf)
            yield from buf[:n].tolist()

    __iter__ = iter_set

    def set_indices(self, start=0, end=None, *, out=None):
        """The set bits in ``[start, end)`` as an ascending numpy uint64 array.

        With ``out`` (a uint64 array) the result is a view of it when it has room: reusing one
        buffer spares allocating, and the kernel faulting in, a fresh result on every call."""
        start, end = self._range(start, end)
        return self._collect(_b.bitmap_iter_set, start, end, 1, out)

    def _collect(self, fn, pos, end, room, out):
        need = _b.bitmap_count(self._map, self._nbits, pos, end) + room
        if out is not None:
            if not isinstance(out, np.ndarray) or out.dtype != np.dtype(np.uint64):
                raise TypeError("out must be a numpy uint64 array")
            if out.ndim != 1 or not out.flags.c_contiguous or not out.flags.writeable:
                raise ValueError("out must be one-dimensional, contiguous and writable")
            if np.may_share_memory(out, self._words):
                raise ValueError("out must not overlap the bitmap's words")
        if out is None or out.size < need:
            out = np.empty(need, dtype=np.uint64)
        # The count sized the output; bits set meanwhile by another thread only make it grow.
        n = 0
        while True:
            k, pos = fn(self._map, self._nbits, pos, end, out[n:])
            n += k
            if pos == end:
                return out[:n]
            grown = np.empty(2 * out.size + room, dtype=np.uint64)
            grown[:n] = out[:n]
            out = grown

    def iter_runs(self, start=0, end=None):
        """Yield ``(start, length)`` of each maximal run of set bits in ``[start, end)``."""
        start, end = self._range(start, end)
        return self._iter_runs(start, end)

    def _iter_runs(self, pos, end):
        starts = np.empty(_CHUNK, dtype=np.uint64)
        lengths = np.empty(_CHUNK, dtype=np.uint64)
        while pos < end:
            n, pos = _b.bitmap_iter_runs(self._map, self._nbits, pos, end, starts, lengths)
            yield from zip(starts[:n].tolist(), lengths[:n].tolist())

    def runs(self, start=0, end=None):
        """The runs of set bits in ``[start, end)`` as two numpy uint64 arrays (starts, lengths)."""
        start, end = self._range(start, end)
        k = _b.bitmap_count_runs(self._map, self._nbits, start, end) + 1
        starts, lengths, n, pos = [], [], 0, start
        while pos < end:
            s = np.empty(k, dtype=np.uint64)
            ln = np.empty(k, dtype=np.uint64)
            n, pos = _b.bitmap_iter_runs(self._map, self._nbits, pos, end, s, ln)
            starts.append(s[:n])
            lengths.append(ln[:n])
            k *= 2  # only reached when another thread added runs after the count
        if len(starts) == 1:
            return starts[0], lengths[0]
        return (np.concatenate(starts or [np.empty(0, np.uint64)]),
                np.concatenate(lengths or [np.empty(0, np.uint64)]))

    def harvest(self, start=0, end=None, *, out=None):
        """Take and clear the set bits in ``[start, end)``: returns them as an ascending numpy
        uint64 array (a view of ``out`` when given and large enough, as for set_indices).

        Each word is taken with an atomic exchange, as KVM_GET_DIRTY_LOG does, so a bit set
        concurrently from C is either returned now or left for the next harvest."""
        start, end = self._range(start, end)
        # 64 spare slots: the C kernel takes a whole word only when all its bits fit.
        return self._collect(_b.bitmap_harvest, start, end, 64, out)

    # -- word-wise combinations ------------------------------------------------------------------

    def _wordop(self, fn, other, out):
        if not isinstance(other, Bitmap):
            raise TypeError(f"expected a Bitmap, not {type(other).__name__}")
        if other._nbits != self._nbits:
            raise ValueError(f"bitmap sizes differ: {self._nbits} != {other._nbits} bits")
        if out is None:
            out = Bitmap(self._nbits)
        elif not isinstance(out, Bitmap):
            raise TypeError(f"out must be a Bitmap, not {type(out).__name__}")
        elif out._nbits != self._nbits:
            raise ValueError(f"out has {out._nbits} bits, not {self._nbits}")
        else:
            dst = out.words.ctypes.data
            for src in (self, other):
                if (dst != src.words.ctypes.data
                        and np.may_share_memory(out.words, src.words)):
                    raise ValueError("out overlaps an operand without being the same words")
        fn(out._map, self._map, other._map, self._nbits)
        return out

    def and_(self, other, out=None):
        """``self & other`` into ``out`` (a new Bitmap when None; may be self or other)."""
        return self._wordop(_b.bitmap_and, other, out)

    def or_(self, other, out=None):
        """``self | other`` into ``out`` (a new Bitmap when None; may be self or other)."""
        return self._wordop(_b.bitmap_or, other, out)

    def andnot(self, other, out=None):
        """``self & ~other`` into ``out`` (a new Bitmap when None; may be self or other)."""
        return self._wordop(_b.bitmap_andnot, other, out)

    def __and__(self, other):
        return self.and_(other) if isinstance(other, Bitmap) else NotImplemented

    def __or__(self, other):
        return self.or_(other) if isinstance(other, Bitmap) else NotImplemented

    def __sub__(self, other):
        return self.andnot(other) if isinstance(other, Bitmap) else NotImplemented

    def __iand__(self, other):
        return self.and_(other, out=self) if isinstance(other, Bitmap) else NotImplemented

    def __ior__(self, other):
        return self.or_(other, out=self) if isinstance(other, Bitmap) else NotImplemented

    def __isub__(self, other):
        return self.andnot(other, out=self) if isinstance(other, Bitmap) else NotImplemented


def implementation():
    """The C path the scans and counts take with the active CPU features: 'avx512', 'avx2',
    'popcnt' (scalar POPCNT/TZCNT) or 'portable'."""
    return _b.bitmap_impl()
