"""guest_memfd: a file of guest-private pages owned by a VM (virt/kvm/guest_memfd.c).

Its pages are host frames that the VMM cannot map, unless the file was created with
``GUEST_MEMFD_FLAG_MMAP | GUEST_MEMFD_FLAG_INIT_SHARED`` on a VM without private memory. Pages
are allocated (zeroed) on first use: a guest fault, ``fallocate`` or a host fault on a shared
mapping, and kept in a :class:`PageCache` (the C radix, keyed by file page index). Behaviour
follows ``kvm_gmem_*`` in ``virt/kvm/guest_memfd.c``.
"""
import collections
import itertools
from errno import EBADF, EEXIST, EFAULT, EFBIG, EINVAL, EIO, ENODEV, ENOMEM, EOPNOTSUPP
import mmap as _mmap

import numpy as np

from sevcore import uapi as U
from sevcore.core.arrays import sorted_unique
from sevcore.core.ranges import RangeSet
from sevcore.errors import SigBus
from sevcore.hw.hostmem import PAGE_SHIFT, PAGE_SIZE
from sevcore.core.npt import GFN_LIMIT, Npt
from sevcore.kvm.mmu import KVM_FILTER_PRIVATE, KVM_FILTER_SHARED

MAP_SHARED = _mmap.MAP_SHARED
MAP_PRIVATE = _mmap.MAP_PRIVATE

#: What :meth:`PageCache.lookup_batch` returns for a page the file does not hold.
MISS = Npt.MISS
_WINDOW_SHIFT = GFN_LIMIT.bit_length() - 1       # one radix table keys 2**36 page indexes
_WINDOW_MASK = GFN_LIMIT - 1

GmemStat = collections.namedtuple("GmemStat", "st_size st_blksize st_ino st_mode")
_inodes = itertools.count(1)


def _fs_error(err, op, detail):
    return OSError(err, f"{detail}", op)


def _vfs_fallocate(mode, offset, length):
    """vfs_fallocate's checks (fs/open.c), in its order, before the file's fallocate: EINVAL for
    a negative offset or a length <= 0, EOPNOTSUPP for an unknown bit or a mix of modes the VFS
    refuses, EFBIG when offset + len passes MAX_LFS_FILESIZE (the pseudo filesystem's s_maxbytes).
    Arguments that are no C int / loff_t raise TypeError or ValueError first."""
    for name, value, bits in (("mode", mode, 32), ("offset", offset, 64), ("len", length, 64)):
        if not isinstance(value, int) or isinstance(value, bool):
            raise TypeError(f"fallocate {name} must be an int, not {type(value).__name__}")
        if not -(1 << (bits - 1)) <= value < 1 << (bits - 1):
            raise ValueError(f"fallocate {name} {value} is outside a {bits}-bit signed int")
    if offset < 0 or length <= 0:
        raise _fs_error(EINVAL, "fallocate", "negative offset or length <= 0")
    if mode & ~(U.FALLOC_FL_MODE_MASK | U.FALLOC_FL_KEEP_SIZE):
        raise _fs_error(EOPNOTSUPP, "fallocate", f"unknown mode bits in {mode:#x}")
    op, keep = mode & U.FALLOC_FL_MODE_MASK, mode & U.FALLOC_FL_KEEP_SIZE
    if op == U.FALLOC_FL_PUNCH_HOLE:
        ok = keep
    elif op in (U.FALLOC_FL_COLLAPSE_RANGE, U.FALLOC_FL_INSERT_RANGE, U.FALLOC_FL_WRITE_ZEROES):
        ok = not keep
    else:
        ok = op in (U.FALLOC_FL_ALLOCATE_RANGE, U.FALLOC_FL_UNSHARE_RANGE, U.FALLOC_FL_ZERO_RANGE)
    if not ok:
        raise _fs_error(EOPNOTSUPP, "fallocate", f"mode {mode:#x} refused by the VFS")
    if offset + length > U.MAX_LFS_FILESIZE:
        raise _fs_error(EFBIG, "fallocate", "offset + len past MAX_LFS_FILESIZE")


class PageCache:
    """A guest_memfd's pages (its inode's page cache, ``i_mapping``): file page index -> host
    pfn, kept in the C radix of :class:`sevcore.core.npt.Npt` as the VMM address space keeps its
    pages, so that the fault, fallocate and punch paths run as numpy/C batches. One table
    covers 2**36 pages (256 TiB of file); a larger file gets a table per such window it uses.
    Each call is one batch; a per-page loop stays in C."""

    def __init__(self):
        self._tables = {}          # index >> _WINDOW_SHIFT -> Npt

    def __len__(self):
        return sum(len(t) for t in self._tables.values())

    @property
    def table_bytes(self):
        """Bytes of radix tables in use."""
        return sum(t.table_bytes for t in self._tables.values())

    def lookup(self, index):
        """The pfn of page ``index``, or None."""
        t = self._tables.get(index >> _WINDOW_SHIFT)
        hit = None if t is None else t.lookup(index & _WINDOW_MASK)
        return None if hit is None else hit[0]

    def lookup_batch(self, index):
        """The pfns of the pages ``index`` (a uint64 array), :data:`MISS` where none."""
        index = np.asarray(index, dtype=np.uint64)
        if not self._tables or not len(index):
            return np.full(index.shape, MISS, np.uint64)
        win = index >> np.uint64(_WINDOW_SHIFT)
        lo, hi = int(win.min()), int(win.max())
        if lo == hi:
            t = self._tables.get(lo)
            if t is None:
                return np.full(index.shape, MISS, np.uint64)
            return t.lookup_batch(index & np.uint64(_WINDOW_MASK))
        out = np.full(index.shape, MISS, np.uint64)
        for w, t in self._tables.items():
            sel = win == np.uint64(w)
            if sel.any():
                out[sel] = t.lookup_batch(index[sel] & np.uint64(_WINDOW_MASK))
        return out

    def insert(self, index, pfn):
        """Insert one page (not present): the single-page fault's path."""
        t = self._tables.get(index >> _WINDOW_SHIFT)
        if t is None:
            t = self._tables[index >> _WINDOW_SHIFT] = Npt()
        t.map(index & _WINDOW_MASK, pfn, 0)

    def add(self, index, pfns):
        """Insert pages ``index`` (uint64, not present) with frames ``pfns``."""
        index = np.asarray(index, dtype=np.uint64)
        if not len(index):
            return
        pfns = np.asarray(pfns, dtype=np.uint64)
        win = index >> np.uint64(_WINDOW_SHIFT)
        if (win == win[0]).all():
            groups = [(int(win[0]), slice(None))]
        else:
            groups = [(w, win == np.uint64(w)) for w in np.unique(win).tolist()]
        for w, sel in groups:
            t = self._tables.get(w)
            if t is None:
                t = self._tables[w] = Npt()
            t.map_runs(index[sel] & np.uint64(_WINDOW_MASK), pfns[sel], 0)

    def _windows(self, start, end):
        """``(window, table, first, last + 1)`` for each table holding part of [start, end)."""
        for w in sorted(self._tables):
            base = w << _WINDOW_SHIFT
            lo, hi = max(start, base), min(end, base + (1 << _WINDOW_SHIFT))
            if lo < hi:
                yield w, self._tables[w], lo - base, hi - base

    def items(self, start=0, end=None):
        """``(index, pfns)``: the pages in [start, end) (default: all) as uint64 arrays in
        index order."""
        end = (1 << 64) if end is None else end
        parts = [(t.items(lo, hi), w) for w, t, lo, hi in self._windows(start, end)]
        if not parts:
            return np.empty(0, np.uint64), np.empty(0, np.uint64)
        index = np.concatenate([g + np.uint64(w << _WINDOW_SHIFT) for (g, _, _), w in parts])
        return index, np.concatenate([p for (_, p, _), _ in parts])

    def remove(self, start, end):
        """Drop the pages in [start, end); returns their pfns (uint64)."""
        out = []
        for w, t, lo, hi in list(self._windows(start, end)):
            _, pfns, _ = t.items(lo, hi)
            if len(pfns):
                t.unmap(lo, hi - lo)
                out.append(pfns)
            if not len(t):
                t.close()
                del self._tables[w]
        return np.concatenate(out) if out else np.empty(0, np.uint64)

    def clear(self):
        """Drop every page; returns their pfns (uint64) and frees the tables."""
        pfns = self.items()[1]
        for t in self._tables.values():
            t.close()
        self._tables = {}
        return pfns


class GuestMemfd:
    """A guest_memfd file. Created by :meth:`sevcore.kvm.vm.Vm.create_guest_memfd`."""

    def __init__(self, vm, size, flags):
        self.vm = vm
        self.host = vm.host
        self.size = size
        self.flags = flags
        self.npages = size >> PAGE_SHIFT
        self.ino = next(_inodes)
        self.page_cache = PageCache()
        #: Pages the architecture has prepared (the folio's uptodate flag:
        #: kvm_gmem_mark_prepared): populated at launch, or handed to the guest by a fault.
        self.prepared = RangeSet()
        self.bindings = []         # [start index, end index, memslot]
        self.closed = False        # the fd is closed
        self.released = False      # the last reference is gone (kvm_gmem_release ran)
        self._refs = 1             # the fd, and each VMM mapping of the file
        self.fd = self.host.install_fd(self)
        vm._get()                  # the file holds a reference on its VM (kvm_get_kvm)

    def __repr__(self):
        return f"<GuestMemfd fd={self.fd} size={self.size:#x} flags={self.flags:#x}>"

    # -- file operations ----------------------------------------------------------------------------

    def fstat(self):
        """``st_size`` is the size given at creation, ``st_blksize`` the page size."""
        return GmemStat(self.size, PAGE_SIZE, self.ino, 0o100600)

    def read(self, n):
        """guest_memfd has no read method: the VFS refuses with EINVAL."""
        raise _fs_error(EINVAL, "read", "guest_memfd cannot be read")

    def write(self, data):
        """guest_memfd has no write method: the VFS refuses with EINVAL."""
        raise _fs_error(EINVAL, "write", "guest_memfd cannot be written")

    def pread(self, n, offset):
        raise _fs_error(EINVAL, "pread", "guest_memfd cannot be read")

    def pwrite(self, data, offset):
        raise _fs_error(EINVAL, "pwrite", "guest_memfd cannot be written")

    def ftruncate(self, length):
        """The size is fixed at creation: EINVAL."""
        raise _fs_error(EINVAL, "ftruncate", "guest_memfd size is fixed")

    def mmap(self, length, flags=MAP_SHARED, offset=0):
        """Map the file into the VMM: ENODEV without ``GUEST_MEMFD_FLAG_MMAP``, EINVAL unless
        ``MAP_SHARED``. Touching a page that is private, or past the end, raises SigBus."""
        self._check_open("mmap")
        if not self.flags & U.GUEST_MEMFD_FLAG_MMAP:
            raise _fs_error(ENODEV, "mmap", "guest_memfd created without GUEST_MEMFD_FLAG_MMAP")
        if not flags & MAP_SHARED or flags & MAP_PRIVATE:
            raise _fs_error(EINVAL, "mmap", "guest_memfd mappings must be MAP_SHARED")
        if offset % PAGE_SIZE or length <= 0:
            raise _fs_error(EINVAL, "mmap", "unaligned offset or bad length")
        return self.vm.kvm.map_file(length, self, offset >> PAGE_SHIFT)

    def resident_pfns(self, index):
        """The frames a VMM mapping of this file has present at pages ``index`` (uint64):
        :data:`MISS` for a page the file does not hold, past its end, or private (a file
        without INIT_SHARED cannot be faulted into the VMM: kvm_gmem_fault_user_mapping)."""
        if not self.flags & U.GUEST_MEMFD_FLAG_INIT_SHARED:
            return np.full(len(index), MISS, np.uint64)
        return self.page_cache.lookup_batch(index)

    def host_fault(self, index, hva):
        """A VMM access through a mapping of this file (kvm_gmem_fault_user_mapping)."""
        if index >= self.npages:
            raise SigBus(hva, "guest_memfd offset past the end of the file")
        if not self.flags & U.GUEST_MEMFD_FLAG_INIT_SHARED:
            raise SigBus(hva, "guest_memfd page is private to the guest")
        return self._page(index)

    def fallocate(self, mode, offset, length):
        """Allocate (``FALLOC_FL_KEEP_SIZE``) or punch (``| FALLOC_FL_PUNCH_HOLE``) pages.

        Mirrors ``fallocate(2)``: EBADF for a closed fd, then vfs_fallocate's checks
        (:func:`_vfs_fallocate`: EINVAL, EOPNOTSUPP, EFBIG), then ``kvm_gmem_fallocate``'s:
        EOPNOTSUPP without KEEP_SIZE or with other bits, EINVAL for unaligned ranges or an
        allocation past the end; punching past the end is allowed. Punching zaps the guest
        mappings of the range first, so the next access sees zeroes.
        """
        self._check_open("fallocate")
        _vfs_fallocate(mode, offset, length)
        if not mode & U.FALLOC_FL_KEEP_SIZE:
            raise _fs_error(EOPNOTSUPP, "fallocate", "guest_memfd needs FALLOC_FL_KEEP_SIZE")
        if mode & ~(U.FALLOC_FL_KEEP_SIZE | U.FALLOC_FL_PUNCH_HOLE):
            raise _fs_error(EOPNOTSUPP, "fallocate", f"unsupported mode {mode:#x}")
        if offset % PAGE_SIZE or length % PAGE_SIZE:
            raise _fs_error(EINVAL, "fallocate", "offset and length must be page aligned")
        start, end = offset >> PAGE_SHIFT, (offset + length) >> PAGE_SHIFT
        if mode & U.FALLOC_FL_PUNCH_HOLE:
            self._punch(start, min(end, self.npages))
            return 0
        if offset + length > self.size:
            raise _fs_error(EINVAL, "fallocate", "range past the end of the file")
        mem = self.host.mem
        if end - start > mem.free_frames and \
                end - start - len(self.page_cache.items(start, end)[0]) > mem.free_frames:
            raise _fs_error(ENOMEM, "fallocate", "host memory exhausted")
        index = np.arange(start, end, dtype=np.uint64)
        missing = index[self.page_cache.lookup_batch(index) == MISS]
        if len(missing):
            self.page_cache.add(missing, mem.alloc(len(missing)))
        return 0

    def close(self):
        """Close the fd. The file lives on while the VMM maps it (a mapping holds a reference,
        as a VMA holds its file); the last reference releases it (:meth:`fput`)."""
        if self.closed:
            return
        self.closed = True
        self.host.release_fd(self.fd)
        self.fput()

    def get_file(self):
        """Take a reference on the file (get_file: a new mapping of it)."""
        self._refs += 1

    def fput(self):
        """Drop a reference; the last one releases the file (kvm_gmem_release): bound memslots
        lose it, their mappings are zapped and later guest faults on them fail with EFAULT; the
        pages go back to the host (the inode dies with its only file) and the VM reference is
        dropped."""
        self._refs -= 1
        if self._refs:
            return
        self.released = True
        for _, _, slot in self.bindings:
            slot.gmem_file = None
        self._invalidate(0, self.npages)
        self.bindings = []
        self.prepared.clear()
        self._free(self.page_cache.clear())
        self.vm._put()

    # -- used by KVM ----------------------------------------------------------------------------------

    def bind(self, slot, offset, npages):
        """kvm_gmem_bind: EINVAL past the end, EEXIST if any page is bound to another slot."""
        start = offset >> PAGE_SHIFT
        end = start + npages
        if offset + (npages << PAGE_SHIFT) > self.size:
            return EINVAL
        for s, e, _ in self.bindings:
            if s < end and start < e:
                return EEXIST
        self.bindings.append([start, end, slot])
        slot.gmem_file = self
        slot.gmem_pgoff = start
        # KVM_MEMSLOT_GMEM_ONLY: shared faults come from the file too, and stay with it (EFAULT)
        # after it is released.
        slot.gmem_only = bool(self.flags & U.GUEST_MEMFD_FLAG_MMAP)
        return 0

    def unbind(self, slot):
        self.bindings = [b for b in self.bindings if b[2] is not slot]
        slot.gmem_file = None

    def get_pfn(self, slot, gfn):
        """kvm_gmem_get_pfn: the frame for ``gfn`` of ``slot``, allocated on first use.
        Returns ``(errno, pfn)``: EFAULT if the file was released, EIO for a stale binding."""
        if slot.gmem_file is not self:
            return EFAULT, None
        index = slot.gmem_pgoff + (gfn - slot.base_gfn)
        if not any(s <= index < e and b is slot for s, e, b in self.bindings):
            return EIO, None
        pfn = self._page(index)
        if self.vm.gmem_needs_prepare and index not in self.prepared:
            err = self.vm.gmem_prepare([pfn], [gfn])     # kvm_gmem_prepare_folio
            if err:
                return -err, None
            self.prepared.add(index, index + 1)
        return 0, pfn

    def get_pfns(self, slot, offsets):
        """Bulk kvm_gmem_get_pfn for pages ``offsets`` (uint64, relative to the slot's base) of
        a slot bound to this file, allocating missing pages in one batch. The caller has
        already resolved one page of the slot through :meth:`get_pfn`."""
        index = np.asarray(offsets, dtype=np.uint64) + np.uint64(slot.gmem_pgoff)
        pfns = self.pages(index)
        if self.vm.gmem_needs_prepare:
            todo = ~self.prepared.contains_array(index)
            if todo.any():
                gfns = index[todo] - np.uint64(slot.gmem_pgoff) + np.uint64(slot.base_gfn)
                self.vm.gmem_prepare(pfns[todo], gfns)
                for i in index[todo].tolist():
                    self.prepared.add(i, i + 1)
        return pfns

    def pages(self, index):
        """The frames of file pages ``index`` (uint64), allocating the missing ones in one
        batch, with no preparation (__kvm_gmem_get_pfn)."""
        pfns = self.page_cache.lookup_batch(index)
        miss = np.flatnonzero(pfns == MISS)
        if len(miss):
            missing = index[miss]
            want = sorted_unique(missing)       # ``missing`` itself when already in order
            fresh = self.host.mem.alloc(len(want))
            self.page_cache.add(want, fresh)
            pfns[miss] = fresh if want is missing else fresh[np.searchsorted(want, missing)]
        return pfns

    def _page(self, index):
        pfn = self.page_cache.lookup(index)
        if pfn is None:
            pfn = int(self.host.mem.alloc(1)[0])
            self.page_cache.insert(index, pfn)
        return pfn

    def _punch(self, start, end):
        """kvm_gmem_punch_hole: invalidate the bound gfns' mappings and, through the VMM's
        mappings of the file, the gfns of memslots whose HVAs map these pages (truncation
        unmaps a mapped folio: truncate_cleanup_folio, mm/truncate.c, and the mmu notifier
        sees it), then free the folios."""
        if start >= end:
            return
        self._invalidate(start, end)
        self.vm.kvm.unmap_mapping_range(self, start, end)
        self.prepared.remove(start, end)
        self._free(self.page_cache.remove(start, end))

    def _free(self, pfns):
        """kvm_gmem_free_folio: the architecture takes the frames back first
        (kvm_arch_gmem_invalidate), then they return to the host."""
        if len(pfns):
            self.vm.gmem_invalidate(pfns)
        self.host.mem.free(pfns)

    def _invalidate(self, start, end):
        """kvm_gmem_invalidate_begin: zap the mappings of the gfns bound to pages [start, end).
        The filter is kvm_gmem_get_invalidate_filter's (shared for an INIT_SHARED file, else
        private); only a TDX VM's zap looks at it (:meth:`sevcore.kvm.vm.Vm._zap_gfns`)."""
        attr_filter = KVM_FILTER_SHARED if self.flags & U.GUEST_MEMFD_FLAG_INIT_SHARED \
            else KVM_FILTER_PRIVATE
        for s, e, slot in self.bindings:
            lo, hi = max(s, start), min(e, end)
            if lo < hi:
                self.vm._zap_gfns(slot.base_gfn + lo - slot.gmem_pgoff, hi - lo, attr_filter)

    def _check_open(self, op):
        if self.closed:
            raise _fs_error(EBADF, op, "guest_memfd is closed")


def kvm_gmem_populate(vm, start_gfn, src, npages, post_populate):
    """kvm_gmem_populate (virt/kvm/guest_memfd.c): hand the pages of ``npages`` gfns from
    ``start_gfn`` (clipped to its memslot) to ``post_populate(vm, gfn, pfn, src_page,
    order)`` one at a time, ``src_page`` being ``src + i * 4096`` (None when ``src`` is None).
    The slot must be a guest_memfd slot (EINVAL) whose file is still open (EFAULT); a page the
    architecture has already prepared is EEXIST, a gfn that is not private EINVAL. A page the
    callback accepts (0) is marked prepared. Returns the number of pages done, or the
    negative errno when the first page failed."""
    if npages < 0:
        return -EINVAL
    slot = vm.gfn_to_memslot(start_gfn) if start_gfn <= vm.max_gfn else None
    if slot is None or not slot.flags & U.KVM_MEM_GUEST_MEMFD:
        return -EINVAL
    file = slot.gmem_file
    if file is None:
        return -EFAULT
    npages = min(slot.npages - (start_gfn - slot.base_gfn), npages)
    ret = i = 0
    while i < npages:
        gfn = start_gfn + i
        index = slot.gmem_pgoff + (gfn - slot.base_gfn)
        if not any(s <= index < e and b is slot for s, e, b in file.bindings):
            ret = -EIO
            break
        pfn = file._page(index)          # __kvm_gmem_get_pfn: no preparation here
        if index in file.prepared:
            ret = -EEXIST
            break
        if not vm.mem_is_private(gfn):
            ret = -EINVAL
            break
        ret = post_populate(vm, gfn, pfn, None if src is None else src + i * PAGE_SIZE, 0)
        if ret:
            break
        file.prepared.add(index, index + 1)       # kvm_gmem_mark_prepared
        i += 1
    return ret if ret and not i else i
