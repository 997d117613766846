"""Host physical memory: 4 KiB frames addressed by system physical address (SPA).

The frames live in one anonymous mapping reserved with MAP_NORESERVE, so a host of hundreds of GiB
costs only the frames that are touched. A frame is zero when it is allocated (fresh from the kernel,
or released with MADV_DONTNEED when it was freed), as the kernel's page allocator hands out zeroed
pages to user space and guest_memfd. What a frame holds is what the memory bus holds: plaintext for
host and shared pages, ciphertext for pages written through an SEV key.
"""
import contextlib
import errno
import mmap
import sys
import threading

import numpy as np

from sevcore._bindings import populate_write
from sevcore.core.arrays import runs

PAGE_SIZE = 4096
PAGE_SHIFT = 12
#: Frames below 1 MiB are never handed out (real hosts keep them for firmware and the kernel).
FIRST_PFN = 0x100
DEFAULT_SIZE = 1 << 40
# Python < 3.12's mmap module does not export MAP_NORESERVE; without it the kernel's overcommit
# heuristic refuses a reservation larger than RAM. 0x4000 is its value on Linux (asm-generic/mman.h).
MAP_NORESERVE = getattr(mmap, "MAP_NORESERVE", 0x4000 if sys.platform.startswith("linux") else 0)
#: Bytes of frames ``populating`` faults in per call (each call releases the GIL).
POPULATE_CHUNK = 4 << 20


class HostMemory:
    """The frames of one simulated host, with a page allocator."""

    def __init__(self, size=DEFAULT_SIZE):
        if not isinstance(size, int) or size <= FIRST_PFN * PAGE_SIZE or size % PAGE_SIZE:
            raise ValueError(f"host memory size must be a page multiple above 1 MiB, got {size!r}")
        self.size = size
        self.nframes = size >> PAGE_SHIFT
        self._mm = mmap.mmap(-1, size, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS
                             | MAP_NORESERVE)
        # Frames are handed out in ascending runs, so transparent huge pages back them densely:
        # one kernel fault per 2 MiB instead of per 4 KiB on first touch (numpy's large arrays
        # get the same). Freed frames are still returned 4 KiB at a time (MADV_DONTNEED).
        if hasattr(mmap, "MADV_HUGEPAGE"):
            self._mm.madvise(mmap.MADV_HUGEPAGE)
        #: The whole physical address space as bytes; ``frames[spa:spa + n]`` is what the bus holds.
        self.frames = np.frombuffer(self._mm, dtype=np.uint8)
        self._lock = threading.Lock()
        self._next = FIRST_PFN
        self._free = []          # chunks (uint64 arrays) of freed pfns, reused before fresh ones
        self._nfree = 0
        self.allocated = 0       # frames currently handed out
        self._populater = None   # the populating() thread, if one runs

    # -- allocation -------------------------------------------------------------------------------

    @property
    def free_frames(self):
        """Frames an :meth:`alloc` can still hand out (freed ones and never-used ones)."""
        return self.nframes - self._next + self._nfree

    def alloc_contiguous(self, npages):
        """``npages`` physically contiguous zeroed frames (firmware buffers, bounce areas);
        returns the SPA of the first. MemoryError if 64 tries find no contiguous run."""
        held = []
        for _ in range(64):
            pfns = self.alloc(npages)
            if np.all(np.diff(pfns.astype(np.int64)) == 1):
                if held:
                    self.free(np.concatenate(held))
                return int(pfns[0]) << PAGE_SHIFT
            held.append(pfns)
        self.free(np.concatenate(held))
        raise MemoryError(f"no {npages} contiguous host frames")

    def alloc(self, n=1, *, singly=False):
        """Allocate ``n`` zeroed frames; returns their pfns (uint64 array, ascending runs).

        ``singly``: the frames ``n`` calls of ``alloc(1)`` would return, in that order (reused
        frames then come in descending runs), for batched paths that must allocate exactly as a
        page-at-a-time loop does."""
        if not isinstance(n, (int, np.integer)) or n < 0:
            raise ValueError(f"frame count must be a non-negative int, got {n!r}")
        n = int(n)
        with self._lock:
            reuse = min(n, self._nfree)
            fresh = n - reuse
            if self._next + fresh > self.nframes:
                raise OSError(errno.ENOMEM, f"host memory exhausted: {n} frames requested, "
                                            f"{self.free_frames} free")
            out = np.empty(n, dtype=np.uint64)
            got = 0
            while got < reuse:
                chunk = self._free[-1]
                take = min(len(chunk), reuse - got)
                tail = chunk[len(chunk) - take:]
                out[got:got + take] = tail[::-1] if singly else tail
                if take == len(chunk):
                    self._free.pop()
                else:
                    self._free[-1] = chunk[:len(chunk) - take]
                got += take
            self._nfree -= reuse
            out[reuse:] = np.arange(self._next, self._next + fresh, dtype=np.uint64)
            self._next += fresh
            self.allocated += n
        return out

    @contextlib.contextmanager
    def populating(self, pfns):
        """While inside, a background thread faults in the frames ``pfns`` (allocated ones, in
        the order given, contiguous runs a chunk at a time) with MADV_POPULATE_WRITE, so that the
        thread that writes them first (a migration target storing the incoming guest's pages)
        does not take the host's page faults itself. Nothing the model sees changes: frames,
        contents and allocation are the same; on exit the thread stops where it is. Nested use,
        or a kernel without MADV_POPULATE_WRITE, makes it do nothing."""
        pfns = np.asarray(pfns, dtype=np.uint64).reshape(-1)
        if len(pfns) and (int(pfns.min()) < FIRST_PFN or int(pfns.max()) >= self._next):
            raise ValueError("populating() of a frame that was never allocated")
        if self._populater is not None or not len(pfns):
            yield self
            return
        pop = _Populater(self, pfns)
        self._populater = pop
        pop.start()
        try:
            yield self
        finally:
            pop.stop.set()
            pop.join()
            self._populater = None

    def free(self, pfns):
        """Return frames to the allocator; their memory goes back to the OS (MADV_DONTNEED)."""
        pfns = np.unique(np.asarray(pfns, dtype=np.uint64))
        if pfns.size == 0:
            return
        if int(pfns[0]) < FIRST_PFN or int(pfns[-1]) >= self._next:
            raise ValueError("free() of a frame that was never allocated")
        # One madvise per contiguous run.
        for i, n in runs(pfns):
            self._mm.madvise(mmap.MADV_DONTNEED, int(pfns[i]) << PAGE_SHIFT, n << PAGE_SHIFT)
        with self._lock:
            self._free.append(pfns)
            self._nfree += len(pfns)
            self.allocated -= len(pfns)

    # -- raw access (what the memory bus holds) -----------------------------------------------------

    def _check(self, spa, size):
        if spa < 0 or size < 0 or spa + size > self.size:
            raise ValueError(f"SPA range [{spa:#x}, {spa + size:#x}) outside host memory")

    def read(self, spa, size):
        """The bytes at ``[spa, spa + size)`` as stored (ciphertext for encrypted pages)."""
        self._check(spa, size)
        return self.frames[spa:spa + size].tobytes()

    def write(self, spa, data):
        """Store ``data`` at ``spa`` as is (no encryption)."""
        data = memoryview(data).cast("B")
        self._check(spa, data.nbytes)
        self.frames[spa:spa + data.nbytes] = np.frombuffer(data, np.uint8)

    def frame(self, pfn):
        """A writable numpy view of one frame."""
        spa = int(pfn) << PAGE_SHIFT
        self._check(spa, PAGE_SIZE)
        return self.frames[spa:spa + PAGE_SIZE]

    def close(self):
        self.frames = None
        self._mm.close()


class _Populater(threading.Thread):
    """HostMemory.populating's thread. It stops for good at the first error (no
    MADV_POPULATE_WRITE, or no memory): the frames are then faulted in where they are written,
    as without it."""

    def __init__(self, mem, pfns):
        super().__init__(name="sevcore-hostmem-populate", daemon=True)
        self.mem = mem
        self.runs = [(int(pfns[i]), n) for i, n in runs(pfns)]
        self.stop = threading.Event()
        self.populated = 0              # frames faulted in so far
        self.error = None

    def run(self):
        chunk = POPULATE_CHUNK >> PAGE_SHIFT
        for first, n in self.runs:
            for lo in range(0, n, chunk):
                if self.stop.is_set():
                    return
                k = min(chunk, n - lo)
                try:
                    populate_write(self.mem.frames, (first + lo) << PAGE_SHIFT, k << PAGE_SHIFT)
                except OSError as e:
                    self.error = e
                    return
                self.populated += k
