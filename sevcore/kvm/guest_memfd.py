"""guest_memfd: a file of guest-private pages owned by a VM (virt/kvm/guest_memfd.c).

Its pages are host frames that the VMM cannot map, unless the file was created with
``GUEST_MEMFD_FLAG_MMAP | GUEST_MEMFD_FLAG_INIT_SHARED`` on a VM without private memory. Pages
are allocated (zeroed) on first use: a guest fault, ``fallocate`` or a host fault on a shared
mapping. Behaviour follows ``kvm_gmem_*`` in ``virt/kvm/guest_memfd.c``.
"""
import collections
import itertools
from errno import EBADF, EEXIST, EFAULT, EINVAL, EIO, ENODEV, EOPNOTSUPP
import mmap as _mmap

import numpy as np

from sevcore import uapi as U
from sevcore.errors import SigBus
from sevcore.hw.hostmem import PAGE_SHIFT, PAGE_SIZE
from sevcore.core.npt import NPT_PRIVATE

MAP_SHARED = _mmap.MAP_SHARED
MAP_PRIVATE = _mmap.MAP_PRIVATE

GmemStat = collections.namedtuple("GmemStat", "st_size st_blksize st_ino st_mode")
_inodes = itertools.count(1)


def _fs_error(err, op, detail):
    return OSError(err, f"{detail}", op)


class GuestMemfd:
    """A guest_memfd file. Created by :meth:`sevcore.kvm.vm.Vm.create_guest_memfd`."""

    def __init__(self, vm, size, flags):
        self.vm = vm
        self.host = vm.host
        self.size = size
        self.flags = flags
        self.npages = size >> PAGE_SHIFT
        self.ino = next(_inodes)
        self.pages = {}            # page index -> host pfn
        self.bindings = []         # [start index, end index, memslot]
        self.closed = False
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

    def host_fault(self, index, hva):
        """A VMM access through a mapping of this file (kvm_gmem_fault_user_mapping)."""
        if index >= self.npages:
            raise SigBus(hva, "guest_memfd offset past the end of the file")
        if not self.flags & U.GUEST_MEMFD_FLAG_INIT_SHARED:
            raise SigBus(hva, "guest_memfd page is private to the guest")
        return self._page(index)

    def fallocate(self, mode, offset, length):
        """Allocate (``FALLOC_FL_KEEP_SIZE``) or punch (``| FALLOC_FL_PUNCH_HOLE``) pages.

        Mirrors ``kvm_gmem_fallocate``: EOPNOTSUPP without KEEP_SIZE or with other bits, EINVAL
        for unaligned ranges or an allocation past the end; punching past the end is allowed.
        Punching zaps the guest mappings of the range first, so the next access sees zeroes.
        """
        self._check_open("fallocate")
        if not mode & U.FALLOC_FL_KEEP_SIZE:
            raise _fs_error(EOPNOTSUPP, "fallocate", "guest_memfd needs FALLOC_FL_KEEP_SIZE")
        if mode & ~(U.FALLOC_FL_KEEP_SIZE | U.FALLOC_FL_PUNCH_HOLE):
            raise _fs_error(EOPNOTSUPP, "fallocate", f"unsupported mode {mode:#x}")
        if offset < 0 or length <= 0 or offset % PAGE_SIZE or length % PAGE_SIZE:
            raise _fs_error(EINVAL, "fallocate", "offset and length must be page aligned")
        start, end = offset >> PAGE_SHIFT, (offset + length) >> PAGE_SHIFT
        if mode & U.FALLOC_FL_PUNCH_HOLE:
            self._punch(start, min(end, self.npages))
            return 0
        if offset + length > self.size:
            raise _fs_error(EINVAL, "fallocate", "range past the end of the file")
        missing = [i for i in range(start, end) if i not in self.pages]
        if missing:
            pfns = self.host.mem.alloc(len(missing))
            self.pages.update(zip(missing, (int(p) for p in pfns)))
        return 0

    def close(self):
        """Release the fd. Bound memslots lose their file: their mappings are zapped and later
        guest faults on them fail with EFAULT. The VM reference is dropped."""
        if self.closed:
            return
        self.closed = True
        self.host.release_fd(self.fd)
        for start, end, slot in self.bindings:
            slot.gmem_file = None
            self.vm._zap_gfns(slot.base_gfn + start - slot.gmem_pgoff, end - start)
        self.bindings = []
        if self.pages:
            self.host.mem.free(np.fromiter(self.pages.values(), np.uint64, len(self.pages)))
            self.pages = {}
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
        return 0

    def unbind(self, slot):
        self.bindings = [b for b in self.bindings if b[2] is not slot]
        slot.gmem_file = None

    def get_pfn(self, slot, gfn):
        """kvm_gmem_get_pfn: the frame for ``gfn`` of ``slot``, allocated on first use.
        Returns ``(errno, pfn)``: EFAULT if the file was closed, EIO for a stale binding."""
        if self.closed or slot.gmem_file is not self:
            return EFAULT, None
        index = slot.gmem_pgoff + (gfn - slot.base_gfn)
        if not any(s <= index < e and b is slot for s, e, b in self.bindings):
            return EIO, None
        return 0, self._page(index)

    def get_pfns(self, slot, offsets):
        """Bulk kvm_gmem_get_pfn for pages ``offsets`` (uint64, relative to the slot's base) of
        a slot bound to this file, allocating missing pages in one batch. The caller has
        already resolved one page of the slot through :meth:`get_pfn`."""
        index = np.asarray(offsets, dtype=np.uint64) + np.uint64(slot.gmem_pgoff)
        keys = index.tolist()
        pages = self.pages
        missing = [i for i in keys if i not in pages]
        if missing:
            fresh = self.host.mem.alloc(len(missing))
            pages.update(zip(missing, fresh.tolist()))
        return np.fromiter((pages[i] for i in keys), np.uint64, len(keys))

    def _page(self, index):
        pfn = self.pages.get(index)
        if pfn is None:
            (pfn,) = self.host.mem.alloc(1)
            pfn = int(pfn)
            self.pages[index] = pfn
        return pfn

    def _punch(self, start, end):
        if start >= end:
            return
        # Invalidate first (kvm_gmem_invalidate_begin): zap the bound gfns' mappings of the
        # kind this file serves, then free the folios.
        shared = bool(self.flags & U.GUEST_MEMFD_FLAG_INIT_SHARED)
        for s, e, slot in self.bindings:
            lo, hi = max(s, start), min(e, end)
            if lo < hi:
                gfn = slot.base_gfn + lo - slot.gmem_pgoff
                if shared:
                    self.vm._zap_gfns(gfn, hi - lo, exclude=NPT_PRIVATE)
                else:
                    self.vm._zap_gfns(gfn, hi - lo, match=NPT_PRIVATE)
        if end - start > len(self.pages):
            gone = [i for i in self.pages if start <= i < end]
        else:
            gone = [i for i in range(start, end) if i in self.pages]
        if gone:
            self.host.mem.free(np.fromiter((self.pages.pop(i) for i in gone), np.uint64,
                                           len(gone)))

    def _check_open(self, op):
        if self.closed:
            raise _fs_error(EBADF, op, "guest_memfd is closed")
