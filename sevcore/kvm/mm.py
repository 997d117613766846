"""The VMM process's address space (``struct mm_struct``): host virtual addresses (HVAs).

``mm.mmap(length)`` returns a page-aligned HVA range backed lazily by host frames, as anonymous
memory is; ``map_file`` maps a guest_memfd's pages, each access faulting through the file (the
mapping holds a reference on the file, as a VMA does). Reads and writes of VMM memory see what
the frames hold: ciphertext for SEV-private pages.

Every VM created through this address space registers as its MMU notifier (kvm_init_mmu_notifier):
before ``munmap`` frees or drops pages, and before a guest_memfd's punch-hole takes pages from
under a mapping of the file (unmap_mapping_range), the VMs zap the gfns their memslots map there
(kvm_mmu_notifier_invalidate_range_start), so no NPT entry outlives the page it maps.
"""
import bisect
import threading
from errno import EFAULT, EINVAL, ENOMEM

import numpy as np

from sevcore.core.npt import NPT_WRITABLE, Npt
from sevcore.errors import SigBus
from sevcore.core.arrays import sorted_unique
from sevcore.hw.hostmem import PAGE_SHIFT, PAGE_SIZE

#: Where the VMM's mmap() places mappings, and x86-64's user address limit (access_ok).
HVA_BASE = 0x7f0000000000
TASK_SIZE_MAX = 0x7ffffffff000


class _Mapping:
    __slots__ = ("start", "end", "kind", "file", "pgoff")

    def __init__(self, start, end, kind, file=None, pgoff=0):
        self.start, self.end, self.kind, self.file, self.pgoff = start, end, kind, file, pgoff


class Mm:
    """A VMM process's address space: anonymous mappings and file (guest_memfd) mappings."""

    def __init__(self, host):
        self.host = host
        self._maps = []          # sorted by start
        self._starts = []        # their start addresses, for bisect
        self._pt = Npt()         # hva page -> host pfn for anonymous memory
        # First touch of anonymous pages (look up, allocate, map) is one step, so two threads
        # touching one page get one frame: the page table lock of do_anonymous_page().
        self._anon_lock = threading.RLock()
        self._next_hva = HVA_BASE
        self._notifiers = []     # the VMs of this process (their mmu_notifier registrations)

    # -- MMU notifiers -------------------------------------------------------------------------------

    def mmu_notifier_register(self, vm):
        """mmu_notifier_register: ``vm`` hears of every range of this address space that is
        unmapped (``vm.mmu_notifier_invalidate_range_start(start, end)``)."""
        self._notifiers.append(vm)

    def mmu_notifier_unregister(self, vm):
        if vm in self._notifiers:
            self._notifiers.remove(vm)

    def _invalidate_range(self, start, end):
        """mmu_notifier_invalidate_range_start over the HVAs [start, end)."""
        for vm in self._notifiers:
            vm.mmu_notifier_invalidate_range_start(start, end)

    def unmap_mapping_range(self, file, start, end):
        """unmap_mapping_range: pages [start, end) of ``file`` are about to leave it (a
        guest_memfd's punch-hole truncating its page cache): invalidate every mapping of them.
        The mappings themselves stay; a later access faults the page in through the file."""
        for m in self._maps:
            if m.file is not file:
                continue
            lo = max(start, m.pgoff)
            hi = min(end, m.pgoff + ((m.end - m.start) >> PAGE_SHIFT))
            if lo < hi:
                self._invalidate_range(m.start + ((lo - m.pgoff) << PAGE_SHIFT),
                                       m.start + ((hi - m.pgoff) << PAGE_SHIFT))

    def mmap(self, length):
        """Anonymous memory for the VMM: a page-aligned, zero-filled HVA range, lazily backed."""
        return self._map(length, "anon", None, 0)

    def map_file(self, length, file, pgoff):
        """A shared mapping of ``file`` (a guest_memfd) from page ``pgoff``: each access faults
        through ``file.host_fault(index, hva)``. The file checks its own mmap rules first; the
        mapping holds a reference on it (``file.get_file()``) until it is unmapped."""
        hva = self._map(length, "gmem", file, pgoff)
        file.get_file()
        return hva

    def _map(self, length, kind, file, pgoff):
        if not isinstance(length, int) or length <= 0:
            raise OSError(EINVAL, "mmap: length must be a positive int")
        length = (length + PAGE_SIZE - 1) & ~(PAGE_SIZE - 1)
        hva = self._next_hva
        if hva + length > TASK_SIZE_MAX:
            raise OSError(ENOMEM, "mmap: VMM address space exhausted")
        # A guard page between mappings catches overruns as EFAULT.
        self._next_hva = hva + length + PAGE_SIZE
        m = _Mapping(hva, hva + length, kind, file, pgoff)
        i = bisect.bisect_left(self._starts, hva)
        self._maps.insert(i, m)
        self._starts.insert(i, hva)
        return hva

    def munmap(self, hva, length):
        """Unmap ``[hva, hva + length)``: the VMs zap what their memslots map there first, then
        anonymous frames in it go back to the host and file mappings drop their reference."""
        if hva % PAGE_SIZE or length <= 0:
            raise OSError(EINVAL, "munmap: unaligned address or bad length")
        end = hva + ((length + PAGE_SIZE - 1) & ~(PAGE_SIZE - 1))
        self._invalidate_range(hva, end)
        kept, unmapped = [], []
        for m in self._maps:
            if m.end <= hva or m.start >= end:
                kept.append(m)
                continue
            lo, hi = max(m.start, hva), min(m.end, end)
            if m.kind == "anon":
                self._drop_anon(lo, hi)
            pieces = 0
            if m.start < lo:
                kept.append(_Mapping(m.start, lo, m.kind, m.file, m.pgoff))
                pieces += 1
            if hi < m.end:
                kept.append(_Mapping(hi, m.end, m.kind, m.file,
                                     m.pgoff + ((hi - m.start) >> PAGE_SHIFT)))
                pieces += 1
            if m.file is not None:
                if pieces == 2:
                    m.file.get_file()        # a split mapping: both halves hold the file
                elif pieces == 0:
                    unmapped.append(m.file)
        self._maps = sorted(kept, key=lambda x: x.start)
        self._starts = [x.start for x in self._maps]
        for file in unmapped:
            file.fput()

    def _drop_anon(self, lo, hi):
        gfns, pfns, _ = self._pt.items(lo >> PAGE_SHIFT, hi >> PAGE_SHIFT)
        if len(gfns):
            self._pt.unmap(lo >> PAGE_SHIFT, (hi - lo) >> PAGE_SHIFT)
            self.host.mem.free(pfns)

    def _mapping(self, hva):
        i = bisect.bisect_right(self._starts, hva) - 1
        if i >= 0 and hva < self._maps[i].end:
            return self._maps[i]
        return None

    def pagemap(self, pages):
        """The frames behind the VMM pages ``pages`` (hva >> 12, a uint64 array) now, as
        /proc/self/pagemap reports them (pagemap_read, fs/proc/task_mmu.c): ``Npt.MISS`` for
        a page that is not mapped or not present (untouched anonymous memory, a guest_memfd
        page the file does not hold). Allocates nothing; one batch per mapping."""
        pages = np.asarray(pages, dtype=np.uint64)
        pfns = self._pt.lookup_batch(pages)
        for m in self._maps:
            if m.file is None:
                continue
            first, last = m.start >> PAGE_SHIFT, m.end >> PAGE_SHIFT
            sel = np.flatnonzero((pages >= np.uint64(first)) & (pages < np.uint64(last)))
            if len(sel):
                index = pages[sel] - np.uint64(first) + np.uint64(m.pgoff)
                pfns[sel] = m.file.resident_pfns(index)
        return pfns

    def mapped_pages(self, page, npages):
        """How many of the VMM pages ``page, page + 1, ...`` (hva >> 12; at most ``npages``)
        lie in mappings, counted up to the first that does not."""
        pos, end = page << PAGE_SHIFT, (page + npages) << PAGE_SHIFT
        while pos < end:
            m = self._mapping(pos)
            if m is None:
                break
            pos = m.end
        return (min(pos, end) >> PAGE_SHIFT) - page

    def hva_to_pfn(self, hva, write, allocate=True):
        """The host frame behind ``hva`` (what get_user_pages returns), allocating anonymous
        memory on first touch. Returns None for an untouched page when ``allocate`` is False.
        Raises OSError(EFAULT) for an unmapped HVA and SigBus where the kernel would."""
        m = self._mapping(hva)
        if m is None:
            raise OSError(EFAULT, f"hva {hva:#x} is not mapped")
        if m.kind == "gmem":
            index = m.pgoff + ((hva - m.start) >> PAGE_SHIFT)
            return m.file.host_fault(index, hva)
        page = hva >> PAGE_SHIFT
        hit = self._pt.lookup(page)
        if hit is not None:
            return hit[0]
        if not allocate:
            return None
        with self._anon_lock:
            hit = self._pt.lookup(page)
            if hit is not None:
                return hit[0]
            (pfn,) = self.host.mem.alloc(1)
            self._pt.map(page, int(pfn), NPT_WRITABLE)
        return int(pfn)

    def anon_pfns(self, pages):
        """The frames behind the VMM pages ``pages`` (hva >> 12, a uint64 array) of one
        anonymous mapping, allocating the untouched ones in one batch; None if the pages are
        not all inside one anonymous mapping."""
        if self.anon_span_pages(pages) is None:
            return None
        pfns = self._pt.lookup_batch(pages)
        miss = np.flatnonzero(pfns == Npt.MISS)
        if len(miss):
            with self._anon_lock:
                self._pt.lookup_batch(pages, out=pfns)
                miss = np.flatnonzero(pfns == Npt.MISS)
                want = sorted_unique(pages[miss])
                fresh = self.host.mem.alloc(len(want))
                self._pt.map_runs(want, fresh, NPT_WRITABLE)
            pfns[miss] = fresh[np.searchsorted(want, pages[miss])]
        return pfns

    def hva_to_pfns(self, hvas, write):
        """``hva_to_pfn`` of each page-aligned HVA of ``hvas`` (a uint64 array), in order, as a
        loop of single calls would resolve them: untouched anonymous pages get frames in the
        order such a loop allocates them. Returns ``(pfns, error)``: the frames of the leading
        pages that resolved, and the exception the next page raised (None when all did); the
        pages after a failure are not touched."""
        hvas = np.asarray(hvas, dtype=np.uint64)
        pfns = np.full(len(hvas), Npt.MISS, dtype=np.uint64)
        if not len(hvas):
            return pfns, None
        starts = np.array(self._starts, dtype=np.uint64)
        ends = np.array([m.end for m in self._maps], dtype=np.uint64)
        which = np.searchsorted(starts, hvas, side="right").astype(np.intp) - 1
        anon_map = np.array([m.kind == "anon" for m in self._maps] + [False])
        inside = (which >= 0) & (hvas < ends[which] if len(ends) else False)
        anon = inside & anon_map[np.where(inside, which, -1)]
        pages = hvas >> np.uint64(PAGE_SHIFT)
        pos = 0
        # Pages outside anonymous memory (guest_memfd mappings, holes) go one at a time, the
        # anonymous runs between them in one batch each.
        for p in [*np.flatnonzero(~anon).tolist(), len(hvas)]:
            self._fill_anon(pages, pfns, pos, p)
            if p == len(hvas):
                break
            try:
                pfns[p] = self.hva_to_pfn(int(hvas[p]), write=write)
            except Exception as exc:          # noqa: BLE001 - handed to the caller as is
                return pfns[:p], exc
            pos = p + 1
        return pfns, None

    def _fill_anon(self, pages, pfns, lo, hi):
        """``pfns[lo:hi]``: the frames behind the anonymous pages ``pages[lo:hi]``, looked up
        now (an earlier run may have allocated some), the untouched ones allocated in the order
        of first appearance (a repeated page gets the frame its first use allocated)."""
        if lo == hi:
            return
        with self._anon_lock:
            self._fill_anon_locked(pages, pfns[lo:hi], lo, hi)

    def _fill_anon_locked(self, pages, got, lo, hi):
        self._pt.lookup_batch(pages[lo:hi], out=got)
        miss = np.flatnonzero(got == Npt.MISS)
        if not len(miss):
            return
        want = pages[lo:hi][miss]
        uniq, first = np.unique(want, return_index=True)
        order = np.argsort(first, kind="stable")
        fresh = self.host.mem.alloc(len(uniq), singly=True)
        self._pt.map_runs(uniq[order], fresh, NPT_WRITABLE)
        by_page = np.empty_like(fresh)
        by_page[order] = fresh
        got[miss] = by_page[np.searchsorted(uniq, want)]

    def _anon_span(self, hva, size):
        """``(first page, page count, offset in first page)`` if ``[hva, hva + size)`` lies in
        one anonymous mapping, else None (the page-by-page path handles it)."""
        if size == 0:
            return None
        first, last = hva >> PAGE_SHIFT, (hva + size - 1) >> PAGE_SHIFT
        if self._anon_mapping(first, last) is None:
            return None
        return first, last - first + 1, hva & (PAGE_SIZE - 1)

    def _anon_mapping(self, first, last):
        """The anonymous mapping holding the VMM pages ``first..last`` (hva >> 12), or None."""
        m = self._mapping(first << PAGE_SHIFT)
        if m is None or m.kind != "anon" or (last + 1) << PAGE_SHIFT > m.end:
            return None
        return m

    def _gather(self, pages, out, zeroed=False):
        """``out[i]`` = the VMM page ``pages[i]`` (all in one anonymous mapping), ``out`` an
        ``(n, 4096)`` uint8 array (``zeroed``: already all zero). Untouched pages read as
        zeroes and stay unallocated."""
        pfns = self._pt.lookup_batch(pages)
        hit = pfns != Npt.MISS
        frames = self.host.mem.frames.reshape(-1, PAGE_SIZE)
        if hit.all():
            # Every index is a frame: mode="clip" skips the temporary copy of ``out`` that
            # mode="raise" gathers through (7x slower for a 64 MiB batch).
            np.take(frames, pfns.astype(np.intp), axis=0, out=out, mode="clip")
            return out
        if not zeroed:
            out[~hit] = 0
        rows = np.flatnonzero(hit)
        out[rows] = frames[pfns[rows]]
        return out

    def copy_from_user(self, hva, size):
        """``size`` bytes of VMM memory at ``hva``, read the way the kernel's copy_from_user
        reads them: a page it cannot read (unmapped, or one that would SIGBUS a user access) is
        an OSError(EFAULT), which the ioctl returns."""
        try:
            return self.read(hva, size)
        except (OSError, SigBus) as e:
            raise OSError(EFAULT, f"copy_from_user at {hva:#x}: {e}") from None

    def copy_to_user(self, hva, data):
        """Write ``data`` to VMM memory at ``hva`` as copy_to_user does: EFAULT where the
        destination faults. Every page is checked before any byte is written."""
        size = len(data)
        page = hva & ~(PAGE_SIZE - 1)
        try:
            while page < hva + size:
                self.hva_to_pfn(page, write=True)
                page += PAGE_SIZE
            self.write(hva, data)
        except (OSError, SigBus) as e:
            raise OSError(EFAULT, f"copy_to_user at {hva:#x}: {e}") from None

    def read(self, hva, size):
        """Read VMM memory at ``hva``: what the frames hold (ciphertext for SEV-private pages).
        Untouched anonymous pages read as zeroes and stay unallocated."""
        span = self._anon_span(hva, size)
        if span is None:
            return self._read_pages(hva, size)
        first, npages, off = span
        # np.zeros: the rows of untouched pages are never written (the kernel's zero page).
        pages = self._gather(np.arange(first, first + npages, dtype=np.uint64),
                             np.zeros((npages, PAGE_SIZE), np.uint8), zeroed=True)
        return pages.reshape(-1)[off:off + size].tobytes()

    def _read_pages(self, hva, size):
        out = bytearray(size)
        pos = 0
        while pos < size:
            addr = hva + pos
            off = addr & (PAGE_SIZE - 1)
            n = min(PAGE_SIZE - off, size - pos)
            pfn = self.hva_to_pfn(addr, write=False, allocate=False)
            if pfn is not None:
                spa = (pfn << PAGE_SHIFT) + off
                out[pos:pos + n] = memoryview(self.host.mem.frames[spa:spa + n])
            pos += n
        return bytes(out)

    def write(self, hva, data):
        """Write VMM memory at ``hva``, allocating frames on first touch. Once SNP is on, a
        write to a frame a guest or the firmware owns is an RMP fault (sevcore.hw.rmp.RmpFault,
        errno EFAULT), before any byte is written."""
        data = np.frombuffer(memoryview(data).cast("B"), np.uint8)
        size = len(data)
        span = self._anon_span(hva, size)
        if span is None:
            return self._write_pages(hva, data)
        first, npages, off = span
        pfns = self.anon_pfns(np.arange(first, first + npages, dtype=np.uint64))
        if self.host.umc.rmp is not None:       # SNP on: the RMP check of a host write
            self.host.umc.rmp.check_write(pfns, 0, "VMM write", hva)
        frames = self.host.mem.frames
        head = min(PAGE_SIZE - off, size)
        spa = (int(pfns[0]) << PAGE_SHIFT) + off
        frames[spa:spa + head] = data[:head]
        full = (size - head) >> PAGE_SHIFT
        if full:
            frames.reshape(-1, PAGE_SIZE)[pfns[1:1 + full]] = \
                data[head:head + (full << PAGE_SHIFT)].reshape(full, PAGE_SIZE)
        tail = size - head - (full << PAGE_SHIFT)
        if tail:
            spa = int(pfns[-1]) << PAGE_SHIFT
            frames[spa:spa + tail] = data[size - tail:]

    def _write_pages(self, hva, data):
        pos = 0
        while pos < len(data):
            addr = hva + pos
            off = addr & (PAGE_SIZE - 1)
            n = min(PAGE_SIZE - off, len(data) - pos)
            pfn = self.hva_to_pfn(addr, write=True)
            if self.host.umc.rmp is not None:   # SNP on: the RMP check of a host write
                self.host.umc.rmp.check_write([pfn], 0, "VMM write", addr)
            spa = (pfn << PAGE_SHIFT) + off
            self.host.mem.frames[spa:spa + n] = data[pos:pos + n]
            pos += n

    def read_pages(self, hvas, out=None):
        """Gather whole VMM pages: page ``i`` of the result is the page at ``hvas[i]`` (page
        aligned, all in one anonymous mapping), as an ``(n, 4096)`` uint8 array (``out`` if
        given). Untouched pages read as zeroes and stay unallocated; ValueError otherwise."""
        pages, n = self._page_list(hvas)
        if out is None:
            out = np.empty((n, PAGE_SIZE), np.uint8)
        elif out.shape != (n, PAGE_SIZE) or out.dtype != np.uint8:
            raise ValueError(f"out must be a ({n}, {PAGE_SIZE}) uint8 array")
        if n:
            if self.anon_span_pages(pages) is None:
                raise ValueError("read_pages: pages must lie in one anonymous mapping")
            self._gather(pages, out)
        return out

    def write_pages(self, hvas, data):
        """Scatter whole VMM pages: ``data`` (``n * 4096`` bytes) to the pages at ``hvas`` (page
        aligned, one anonymous mapping), allocating frames on first touch. Every argument is
        checked before anything is written (ValueError)."""
        pages, n = self._page_list(hvas)
        data = data.reshape(-1) if isinstance(data, np.ndarray) and data.dtype == np.uint8 \
            else np.frombuffer(memoryview(data).cast("B"), np.uint8)
        if data.size != n * PAGE_SIZE:
            raise ValueError(f"{n} pages need {n * PAGE_SIZE} bytes, not {data.size}")
        if n:
            pfns = self.anon_pfns(pages)
            if pfns is None:
                raise ValueError("write_pages: pages must lie in one anonymous mapping")
            self.host.mem.frames.reshape(-1, PAGE_SIZE)[pfns] = data.reshape(n, PAGE_SIZE)

    def anon_span_pages(self, pages):
        """The anonymous mapping holding all VMM pages ``pages`` (hva >> 12), or None."""
        return self._anon_mapping(int(pages.min()), int(pages.max()))

    @staticmethod
    def _page_list(hvas):
        hvas = np.asarray(hvas, dtype=np.uint64).reshape(-1)
        if len(hvas) and np.any(hvas & np.uint64(PAGE_SIZE - 1)):
            raise ValueError("page lists take page-aligned HVAs")
        return hvas >> np.uint64(PAGE_SHIFT), len(hvas)

    def fill(self, hva, byte, size):
        """memset() of VMM memory."""
        self.write(hva, bytes([byte]) * size)

