"""A slow, obviously correct twin of :class:`sevcore.core.npt.Npt` backed by a dict gfn -> (pfn, flags).

The test oracle for csrc/npt.c: same methods, same results, same exceptions for bad arguments.
Its :attr:`Npt.table_bytes` is what a radix table that holds exactly the tables its mappings need
must use: one 4 KiB table per distinct gfn prefix at each level.
"""
import operator

import numpy as np

from sevcore.core.npt import GFN_LIMIT, NPT_FLAGS_MASK, NPT_PRESENT, PFN_LIMIT

TABLE_BYTES = 4096
MISS = 2**64 - 1


def _int(value, what):
    try:
        return operator.index(value)
    except TypeError:
        raise TypeError(f"{what} must be an int, not {type(value).__name__}") from None


def _range(gfn, npages):
    gfn, npages = _int(gfn, "gfn"), _int(npages, "npages")
    if gfn < 0 or gfn >= GFN_LIMIT or npages < 1 or gfn + npages > GFN_LIMIT:
        raise ValueError(f"bad gfn range {gfn}+{npages}")
    return gfn, npages


def _flags(flags, what):
    flags = _int(flags, what)
    if flags < 0 or flags & ~NPT_FLAGS_MASK:
        raise ValueError(f"bad {what} {flags:#x}")
    return flags


class Npt:
    MISS = MISS

    def __init__(self, limit_bytes=None):
        self._map = {}
        self._closed = False

    def close(self):
        self._closed = True
        self._map = {}

    @property
    def closed(self):
        return self._closed

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def _d(self):
        if self._closed:
            raise ValueError("operation on a closed Npt")
        return self._map

    def map(self, gfn, pfn, flags, npages=1):
        gfn, npages = _range(gfn, npages)
        pfn, flags = _int(pfn, "pfn"), _flags(flags, "flags")
        if pfn < 0 or pfn + npages > PFN_LIMIT:
            raise ValueError("bad pfn range")
        d = self._d()
        for i in range(npages):
            d[gfn + i] = (pfn + i, flags | NPT_PRESENT)

    def _in_range(self, gfn, npages):
        return sorted(g for g in self._d() if gfn <= g < gfn + npages)

    def zap_range(self, gfn, npages, match_flags=0, exclude_flags=0):
        gfn, npages = _range(gfn, npages)
        match_flags = _flags(match_flags, "match_flags")
        exclude_flags = _flags(exclude_flags, "exclude_flags")
        d = self._d()
        gone = [g for g in self._in_range(gfn, npages)
                if d[g][1] & match_flags == match_flags and not d[g][1] & exclude_flags]
        for g in gone:
            del d[g]
        return len(gone)

    def unmap(self, gfn, npages=1):
        return self.zap_range(gfn, npages)

    def protect_range(self, gfn, npages, clear_flags=0, set_flags=0):
        gfn, npages = _range(gfn, npages)
        clear_flags = _flags(clear_flags, "clear_flags")
        set_flags = _flags(set_flags, "set_flags")
        if clear_flags & NPT_PRESENT:
            raise ValueError("cannot clear NPT_PRESENT")
        d = self._d()
        changed = 0
        for g in self._in_range(gfn, npages):
            pfn, flags = d[g]
            new = (flags & ~clear_flags) | set_flags
            if new != flags:
                d[g] = (pfn, new)
                changed += 1
        return changed

    def lookup(self, gfn):
        gfn, _ = _range(gfn, 1)
        return self._d().get(gfn)

    def lookup_batch(self, gfns, with_flags=False):
        d = self._d()
        keys = np.asarray(gfns)
        pfns = np.empty(keys.shape, np.uint64)
        flags = np.empty(keys.shape, np.uint64)
        for i, g in enumerate(keys.reshape(-1).tolist()):
            if not 0 <= g < GFN_LIMIT:
                raise ValueError(f"gfn {g} out of range")
            pfn, f = d.get(g, (MISS, 0))
            pfns.reshape(-1)[i] = pfn
            flags.reshape(-1)[i] = f
        return (pfns, flags) if with_flags else pfns

    def count(self):
        return len(self._d())

    __len__ = count

    def __iter__(self):
        d = self._d()
        for g in sorted(d):
            yield (g, *d[g])

    def items(self, start_gfn=0, end_gfn=None):
        end_gfn = GFN_LIMIT if end_gfn is None else end_gfn
        rows = [(g, p, f) for g, p, f in self if start_gfn <= g < end_gfn]
        cols = list(zip(*rows)) or [(), (), ()]
        return tuple(np.array(c, dtype=np.uint64) for c in cols)

    @property
    def table_bytes(self):
        """One table per distinct gfn >> 9 (leaves), >> 18, >> 27, plus the root if anything
        is mapped."""
        d = self._d()
        tables = sum(len({g >> shift for g in d}) for shift in (9, 18, 27, 36))
        return tables * TABLE_BYTES
