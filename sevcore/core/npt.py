"""Nested page tables: a VM's GFN -> (host pfn, flags) map, kept in C as KVM's TDP MMU keeps it.

A 4-level, 512-ary radix table over 36-bit GFNs (48-bit GPAs) whose memory grows with what is
mapped (csrc/npt.c). Mutations mirror what KVM does to its TDP page tables: a fault installs a
mapping (:meth:`Npt.map`), an attribute change, a guest_memfd punch-hole or a memslot deletion
zaps a range (:meth:`Npt.zap_range`), and dirty logging write-protects one
(:meth:`Npt.protect_range`).

>>> from sevcore.core.npt import Npt, NPT_WRITABLE
>>> with Npt() as npt:
...     npt.map(0x100, 0x8000, NPT_WRITABLE, npages=4)
...     npt.lookup(0x102)                     # (0x8002, NPT_PRESENT | NPT_WRITABLE)
"""
import threading

import numpy as np

from sevcore import _bindings as _b
from sevcore.core.arrays import u64

NPT_PRESENT = _b.NPT_FLAGS["PRESENT"]
NPT_WRITABLE = _b.NPT_FLAGS["WRITABLE"]
NPT_ACCESSED = _b.NPT_FLAGS["ACCESSED"]
NPT_DIRTY = _b.NPT_FLAGS["DIRTY"]
NPT_PRIVATE = _b.NPT_FLAGS["PRIVATE"]
NPT_DIRTY_LOG = _b.NPT_FLAGS["DIRTY_LOG"]
#: Every flag bit an entry may carry.
NPT_FLAGS_MASK = _b.NPT_FLAGS_MASK

#: GFNs are below this (48-bit guest physical addresses); pfns below PFN_LIMIT.
GFN_LIMIT = 1 << _b.NPT_GFN_BITS
PFN_LIMIT = 1 << _b.NPT_PFN_BITS

_PFN_SHIFT = _b.NPT_PFN_SHIFT
_ENTRY_FLAGS = (1 << _PFN_SHIFT) - 1


class NptLock:
    """The table's lock as KVM's ``kvm->mmu_lock`` on x86 is an rwlock (``KVM_HAVE_MMU_RWLOCK``,
    arch/x86/include/asm/kvm_host.h): ``with lock:`` holds it for write (a mutation: nothing else
    runs), ``with lock.shared():`` for read (walks and lookups, any number at once; the TDP MMU
    takes it for read in ``kvm_tdp_mmu_map``). A waiting writer holds back new readers, so a
    stream of walkers cannot starve a fault. Not reentrant."""

    __slots__ = ("_cond", "_readers", "_writer", "_waiting", "_shared")

    def __init__(self):
        self._cond = threading.Condition(threading.Lock())
        self._readers = 0
        self._writer = False
        self._waiting = 0
        self._shared = _Shared(self)

    def __enter__(self):
        with self._cond:
            self._waiting += 1
            try:
                while self._writer or self._readers:
                    self._cond.wait()
            except BaseException:
                # Interrupted while queued: leave the queue, so readers held back get in.
                self._waiting -= 1
                self._cond.notify_all()
                raise
            self._waiting -= 1
            self._writer = True
        return self

    def __exit__(self, *exc):
        with self._cond:
            self._writer = False
            self._cond.notify_all()

    def shared(self):
        """The lock held for read, as a context manager."""
        return self._shared

    def _enter_shared(self):
        with self._cond:
            while self._writer or self._waiting:
                self._cond.wait()
            self._readers += 1

    def _exit_shared(self):
        with self._cond:
            self._readers -= 1
            if not self._readers:
                self._cond.notify_all()


class _Shared:
    __slots__ = ("_lock",)

    def __init__(self, lock):
        self._lock = lock

    def __enter__(self):
        self._lock._enter_shared()
        return self

    def __exit__(self, *exc):
        self._lock._exit_shared()


class Npt:
    """One VM's nested page table. Every call holds the table's lock (:class:`NptLock`), so one
    Npt may be shared between threads: lookups hold it for read and run together, mutations for
    write, as the C table (csrc/npt.h) lets only readers run together."""

    #: What :meth:`lookup_batch` returns for a gfn that is not mapped.
    MISS = _b.NPT_MISS
    #: Entries fetched from C per step of :meth:`__iter__`.
    ITER_CHUNK = 4096

    def __init__(self, limit_bytes=None):
        """An empty table. ``limit_bytes`` caps the table memory, in whole 2 MiB chunks (default:
        physical RAM); a map needing more raises ``OSError(ENOMEM)`` and changes nothing."""
        if limit_bytes is not None:
            limit_bytes = u64(limit_bytes, "limit_bytes")
        self._lock = NptLock()
        self._npt = _b.npt_create(limit_bytes)

    # -- lifetime ------------------------------------------------------------------------------

    def close(self):
        """Free the C table now; later calls raise ValueError. Closing twice is harmless."""
        with self._lock:
            if self._npt is not None:
                _b.npt_destroy(self._npt)
                self._npt = None

    @property
    def closed(self):
        return self._npt is None

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def _p(self):
        if self._npt is None:
            raise ValueError("operation on a closed Npt")
        return self._npt

    @property
    def lock(self):
        """The lock every operation on the table holds (:class:`NptLock`); another C kernel that
        walks the table (the guest page kernels of sevcore.core.pages) holds it too, around
        :meth:`cdata`: ``lock.shared()`` to read the entries, ``lock`` to change them."""
        return self._lock

    def cdata(self):
        """The C table, for another C kernel to walk while it holds :attr:`lock`; ValueError
        once closed."""
        return self._p()

    # -- mutations -------------------------------------------------------------------------------

    def _call(self, fn, names, *scalars, shared=False):
        """``fn(table, *scalars)`` under the lock (for read if ``shared``). C judges every range
        and flag; a scalar that is no u64 at all cffi refuses (OverflowError, TypeError), and it
        is then named."""
        with self._lock.shared() if shared else self._lock:
            try:
                return fn(self._p(), *scalars)
            except (OverflowError, TypeError):
                for name, value in zip(names, scalars):
                    u64(value, name)
                raise

    def map(self, gfn, pfn, flags, npages=1):
        """Map gfn..gfn+npages-1 to pfn..pfn+npages-1 with ``flags`` (NPT_PRESENT implied),
        replacing what was there. All or nothing: raises ``OSError(ENOMEM)`` with no change, and
        ValueError naming the gfn, pfn, npages or flags out of range."""
        self._call(_b.npt_map, ("gfn", "pfn", "flags", "npages"), gfn, pfn, flags, npages)

    def map_runs(self, gfns, pfns, flags):
        """Map ``gfns[i]`` to ``pfns[i]`` (integer arrays of one length) with ``flags``: one
        :meth:`map` per run contiguous in both, checked once for the whole batch and under one
        hold of the lock (a fault batch of scattered pages is one run per page). Raises
        ValueError naming the first gfn or pfn out of range with nothing mapped; an
        ``OSError(ENOMEM)`` keeps the runs before it."""
        gfns = u64(gfns, "gfns")
        pfns = u64(pfns, "pfns")
        if type(gfns) is int or type(pfns) is int:
            raise TypeError("gfns and pfns must be arrays, not one int")
        gfns, pfns = gfns.reshape(-1), pfns.reshape(-1)
        self._call(lambda npt, flags: _b.npt_map_pairs(npt, gfns, pfns, flags), ("flags",), flags)

    def unmap(self, gfn, npages=1):
        """Remove every mapping in gfn..gfn+npages-1; returns how many there were."""
        return self._call(_b.npt_unmap, ("gfn", "npages"), gfn, npages)

    def zap_range(self, gfn, npages, match_flags=0, exclude_flags=0):
        """Remove the mappings in the range whose flags include all of ``match_flags`` and none of
        ``exclude_flags``; returns the count. Zapping the private kind is
        ``match_flags=NPT_PRIVATE``, the shared kind ``exclude_flags=NPT_PRIVATE``."""
        return self._call(_b.npt_zap_range, ("gfn", "npages", "match_flags", "exclude_flags"),
                          gfn, npages, match_flags, exclude_flags)

    def protect_range(self, gfn, npages, clear_flags=0, set_flags=0):
        """Clear then set flag bits on every mapping in the range (write-protection for dirty
        logging); returns how many entries changed. NPT_PRESENT cannot be cleared."""
        return self._call(_b.npt_protect_range, ("gfn", "npages", "clear_flags", "set_flags"),
                          gfn, npages, clear_flags, set_flags)

    # -- lookups ---------------------------------------------------------------------------------

    def lookup(self, gfn):
        """``(pfn, flags)`` for ``gfn``, or None if it is not mapped."""
        entry = self._call(_b.npt_lookup, ("gfn",), gfn, shared=True)
        return None if entry is None else (entry >> _PFN_SHIFT, entry & _ENTRY_FLAGS)

    def lookup_batch(self, gfns, with_flags=False, out=None):
        """pfns for an integer array of gfns, as uint64 of the same shape with :attr:`MISS` where
        nothing is mapped; ``with_flags`` returns ``(pfns, flags)`` (flags 0 on a miss).
        ``out`` (an array, or a pair with ``with_flags``) receives the result instead of new
        arrays. Raises ValueError naming the first gfn that is negative or >= 2**36 (``out`` is
        then undefined)."""
        g = u64(gfns, "gfns")
        if type(g) is int:
            raise TypeError("gfns must be an array of gfns, not one int")
        if out is None:
            pfns = np.empty(g.shape, np.uint64)
            flags = np.empty(g.shape, np.uint64) if with_flags else None
        else:
            pfns, flags = out if with_flags else (out, None)
            for arr in (pfns, flags) if with_flags else (pfns,):
                if (not isinstance(arr, np.ndarray) or arr.shape != g.shape
                        or not arr.flags.c_contiguous):
                    raise ValueError(f"out must be C-contiguous uint64 of shape {g.shape}")
        with self._lock.shared():
            _b.npt_lookup_batch(self._p(), g.reshape(-1), pfns.reshape(-1),
                                None if flags is None else flags.reshape(-1))
        return (pfns, flags) if with_flags else pfns

    # -- contents --------------------------------------------------------------------------------

    def count(self):
        """Number of mapped gfns."""
        with self._lock.shared():
            return _b.npt_count(self._p())

    __len__ = count

    def __iter__(self):
        """``(gfn, pfn, flags)`` for every mapping in gfn order, fetched from C in chunks of
        :attr:`ITER_CHUNK`. A mutation between chunks is seen from the next gfn on."""
        gfns = np.empty(self.ITER_CHUNK, np.uint64)
        entries = np.empty(self.ITER_CHUNK, np.uint64)
        start = 0
        while start < GFN_LIMIT:
            with self._lock.shared():
                n = _b.npt_next_mapped(self._p(), start, GFN_LIMIT, gfns, entries)
            chunk = gfns[:n].tolist()
            for gfn, entry in zip(chunk, entries[:n].tolist()):
                yield gfn, entry >> _PFN_SHIFT, entry & _ENTRY_FLAGS
            if n < self.ITER_CHUNK:
                return
            start = chunk[-1] + 1

    def items(self, start_gfn=0, end_gfn=None):
        """The mappings with start_gfn <= gfn < end_gfn (default: to the end) as three uint64
        arrays ``(gfns, pfns, flags)`` in gfn order."""
        start_gfn = u64(start_gfn, "start_gfn")
        end_gfn = GFN_LIMIT if end_gfn is None else u64(end_gfn, "end_gfn")
        with self._lock.shared():
            npt = self._p()
            cap = _b.npt_count(npt)
            gfns = np.empty(cap, np.uint64)
            entries = np.empty(cap, np.uint64)
            n = _b.npt_next_mapped(npt, start_gfn, end_gfn, gfns, entries)
        entries = entries[:n]
        return gfns[:n], entries >> np.uint64(_PFN_SHIFT), entries & np.uint64(_ENTRY_FLAGS)

    # -- memory ----------------------------------------------------------------------------------

    def _stats(self):
        with self._lock.shared():
            return _b.npt_stats(self._p())

    @property
    def table_bytes(self):
        """Bytes of page tables in use (4 KiB per table, root included; 0 when empty)."""
        return self._stats()["table_bytes"]

    @property
    def reserved_bytes(self):
        """Bytes of 2 MiB chunks the tables are carved from (one empty chunk is kept spare)."""
        return self._stats()["reserved_bytes"]

    @property
    def limit_bytes(self):
        return self._stats()["limit_bytes"]

    def __repr__(self):
        if self._npt is None:
            return "<Npt closed>"
        s = self._stats()
        return f"<Npt {s['present']} mappings, {s['table_bytes']} table bytes>"
