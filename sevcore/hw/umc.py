"""The memory controller (UMC): per-ASID keys in front of host physical memory.

On an SEV host every access to DRAM goes through the memory controller, which encrypts and decrypts
16-byte blocks with the key of the access's ASID as a function of the block's system physical
address. ASID 0 is the host's own view: SME is off in this model, so it reads and writes the frames
as they are. The PSP installs a guest's key at ACTIVATE and reads or writes guest memory through
this object, as the real firmware does through ``copy_{to,from}_x86_encrypted``
(AMD-ASPFW ``x86_copy.c``); so will the guest once it runs.

>>> umc = host.umc
>>> umc.install_key(5, key16)
>>> umc.write(spa, b"secret", asid=5)       # ciphertext lands in host.mem.frames
>>> umc.read(spa, 6, asid=5)                # b"secret"
>>> umc.read(spa, 6, asid=0)                # the ciphertext as the host sees it

The engine works on whole pages (``sevcore.core.memcrypt``). Both modes encrypt 16-byte blocks
independently once the page's tweak is fixed, so ``encrypt(decrypt(page))`` returns every block a
write does not touch to the exact bytes it had: a partial write is a read-modify-write of its pages
that changes only the written blocks, as the hardware's block-granular writes do.
"""
import numpy as np

from sevcore.hw.hostmem import PAGE_SHIFT, PAGE_SIZE
from sevcore.core.memcrypt import AES128_XEX, AES256_XTS, MemoryEngine

_KEY_LEN = {AES128_XEX: 16, AES256_XTS: 64}

#: Bytes per engine call in the bulk paths: large enough that the call costs nothing, small
#: enough that a hash and the cipher pass over the same bytes while they are still in cache.
CHUNK = 1 << 20


class MemoryController:
    """The key slots of one host's memory controllers and the encrypted view of its frames."""

    def __init__(self, host, mode=AES128_XEX):
        if mode not in _KEY_LEN:
            raise ValueError(f"mode must be AES128_XEX or AES256_XTS, not {mode!r}")
        self.host = host
        self.mode = mode
        self.key_len = _KEY_LEN[mode]
        self._engines = {}
        #: The RMP the CPU checks host writes against (AMD64 APM vol. 2 15.36.10), set by the
        #: firmware's SNP_INIT; None on a host without SNP, where nothing is checked.
        self.rmp = None

    # -- key slots ----------------------------------------------------------------------------

    def install_key(self, asid, key):
        """Program ``key`` into the slot of ``asid`` (what the PSP does at ACTIVATE)."""
        _check_asid(asid, zero_ok=False)
        table = None if self.mode == AES256_XTS else self.host.tweak_table
        old = self._engines.get(asid)
        self._engines[asid] = MemoryEngine(self.mode, key, table)
        if old is not None:
            old.close()

    def remove_key(self, asid):
        """Empty the slot of ``asid``; later accesses with it raise KeyError."""
        _check_asid(asid, zero_ok=False)
        eng = self._engines.pop(asid, None)
        if eng is not None:
            eng.close()

    def has_key(self, asid):
        return asid == 0 or asid in self._engines

    def keyed_asids(self):
        """The ASIDs whose slots hold a key, ascending."""
        return sorted(self._engines)

    def engine(self, asid):
        """The MemoryEngine of ``asid``, or None for ASID 0 (no encryption)."""
        _check_asid(asid, zero_ok=True)
        if asid == 0:
            return None
        try:
            return self._engines[asid]
        except KeyError:
            raise KeyError(f"no key installed for ASID {asid}") from None

    # -- byte ranges ----------------------------------------------------------------------------

    def read(self, spa, size, asid=0):
        """``size`` bytes at ``spa`` as an access with ``asid`` sees them."""
        self._check_range(spa, size)
        eng = self.engine(asid)
        frames = self.host.mem.frames
        if eng is None or size == 0:
            return frames[spa:spa + size].tobytes()
        first, end = _page_span(spa, size)
        plain = eng.decrypt_run(frames[first:end], first)
        off = spa - first
        return bytes(plain[off:off + size])

    def write(self, spa, data, asid=0):
        """Store ``data`` at ``spa`` through the key of ``asid``. Once SNP is on, a host write
        (ASID 0) to a frame a guest or the firmware owns raises RmpFault (sevcore.hw.rmp)."""
        data = memoryview(data).cast("B")
        size = data.nbytes
        self._check_range(spa, size)
        if asid == 0 and self.rmp is not None and size:
            self._rmp_check(spa, size)
        eng = self.engine(asid)
        frames = self.host.mem.frames
        if eng is None:
            frames[spa:spa + size] = np.frombuffer(data, np.uint8)
            return
        if size == 0:
            return
        first, end = _page_span(spa, size)
        if first == spa and end == spa + size:
            eng.encrypt_run(data, spa, frames[first:end])
            return
        # Partial pages: decrypt, patch, encrypt. Blocks outside [spa, spa + size) come back to
        # the exact bytes they had (module docstring).
        view = frames[first:end]
        plain = eng.decrypt_run(view, first)
        plain[spa - first:spa - first + size] = data
        eng.encrypt_run(plain, first, view)

    def encrypt_in_place(self, spa, size, asid, observe=None):
        """Encrypt the plaintext at ``[spa, spa + size)`` with the key of ``asid`` in place,
        handing each chunk of plaintext to ``observe`` first (LAUNCH_UPDATE_DATA: measure, then
        encrypt). Whole pages go through the engine in place, with no copy."""
        self._check_range(spa, size)
        if asid == 0 and self.rmp is not None and size:
            self._rmp_check(spa, size)
        eng = self.engine(asid)
        frames = self.host.mem.frames
        first, end = _page_span(spa, size)
        head_end = min(end, first + PAGE_SIZE)
        pos = spa
        if first != spa or head_end > spa + size:
            # A partial first page (or a range inside one page).
            n = min(head_end, spa + size) - spa
            chunk = frames[spa:spa + n].tobytes()
            if observe is not None:
                observe(chunk)
            self.write(spa, chunk, asid)
            pos = spa + n
        stop = spa + size
        body_end = stop & ~(PAGE_SIZE - 1)
        while pos < body_end:
            n = min(CHUNK, body_end - pos)
            view = frames[pos:pos + n]
            if observe is not None:
                observe(view)
            if eng is not None:
                eng.encrypt_run(view, pos, view)
            pos += n
        if pos < stop:
            chunk = frames[pos:stop].tobytes()
            if observe is not None:
                observe(chunk)
            self.write(pos, chunk, asid)

    # -- batches of pages -----------------------------------------------------------------------

    def read_pages(self, spas, asid=0, out=None):
        """The pages at ``spas`` (page aligned) as ``asid`` sees them, ``len(spas) * 4096`` bytes
        in one buffer (``out``, a writable buffer of that size, or a new uint8 array): one
        gather and one in-place engine call for the whole batch."""
        pfns = self._pfns(spas)
        if out is None:
            dst = np.empty((pfns.size, PAGE_SIZE), np.uint8)
            out = dst.reshape(-1)
        else:
            dst = np.frombuffer(memoryview(out).cast("B"), np.uint8)
            if dst.size != pfns.size * PAGE_SIZE:
                raise ValueError(f"out holds {dst.size} bytes, not {pfns.size} pages")
            dst = dst.reshape(-1, PAGE_SIZE)
        eng = self.engine(asid)
        run = _run_start(pfns)
        if eng is not None and run is not None:
            # One run of frames: decrypt straight from them, no gather.
            spa = run << PAGE_SHIFT
            eng.decrypt_run(self.host.mem.frames[spa:spa + dst.size], spa, out=out)
            return out
        # pfns were checked by _pfns: 'clip' only spares numpy its buffered bounds check.
        np.take(self._frames2d(), pfns.astype(np.intp), axis=0, out=dst, mode="clip")
        if eng is not None:
            eng.decrypt_pages(out, pfns << np.uint64(PAGE_SHIFT), out=out)
        return out

    def write_pages(self, spas, data, asid=0, *, in_place=False):
        """Store ``len(spas)`` pages of ``data`` at ``spas`` through the key of ``asid``, as
        that many page writes in order would (a page given twice keeps the later data).
        ``in_place``: encrypt ``data`` itself (writable, its plaintext is then gone) rather
        than a copy."""
        pfns = self._pfns(spas)
        buf = np.frombuffer(memoryview(data).cast("B"), np.uint8)
        if buf.size != pfns.size * PAGE_SIZE:
            raise ValueError(f"{buf.size} bytes for {pfns.size} pages")
        if asid == 0 and self.rmp is not None:
            self.rmp.check_write(pfns, 0, "MemoryController.write_pages")
        eng = self.engine(asid)
        run = _run_start(pfns)
        if eng is not None and run is not None:
            # One run of frames: encrypt straight into them, no scatter.
            spa = run << PAGE_SHIFT
            eng.encrypt_run(buf, spa, out=self.host.mem.frames[spa:spa + buf.size])
            return
        if eng is not None:
            buf = np.frombuffer(eng.encrypt_pages(buf, pfns << np.uint64(PAGE_SHIFT),
                                                  out=buf if in_place else None), np.uint8)
        rows = buf.reshape(-1, PAGE_SIZE)
        last = _last_of_each(pfns)
        if last is not None:
            pfns, rows = pfns[last], rows[last]
        self._frames2d()[pfns.astype(np.intp)] = rows

    # -- the RMP ----------------------------------------------------------------------------------

    def _rmp_check(self, spa, size):
        first = spa >> PAGE_SHIFT
        last = (spa + size - 1) >> PAGE_SHIFT
        pfn = self.rmp.next_assigned(first, last - first + 1)
        if pfn <= last:
            self.rmp.check_write([pfn], 0, "MemoryController.write", max(spa, pfn << PAGE_SHIFT))

    def rmp_asid(self, spa):
        """The ASID whose key the frame at ``spa`` is encrypted with when SNP owns it: the
        owner in the RMP (0 for a hypervisor or firmware page, or with no RMP)."""
        if self.rmp is None:
            return 0
        e = self.rmp.entry(spa >> PAGE_SHIFT)
        return e.asid if e.assigned else 0

    def write_owned(self, spa, data):
        """Store ``data`` at ``spa`` with the key of the ASID that owns the frame in the RMP
        (the owner's key for a guest page, plaintext for the rest): how a write by the frame's
        owner lands. The range must lie in one owner's frames (ValueError)."""
        data = memoryview(data).cast("B")
        asid = self.rmp_asid(spa)
        if data.nbytes and self.rmp_asid(spa + data.nbytes - 1) != asid:
            raise ValueError("write_owned across frames of different owners")
        if asid == 0:
            self._check_range(spa, data.nbytes)
            self.host.mem.write(spa, data)
        else:
            self.write(spa, data, asid)

    # -- internals --------------------------------------------------------------------------------

    def _frames2d(self):
        return self.host.mem.frames.reshape(-1, PAGE_SIZE)

    def _pfns(self, spas):
        arr = np.asarray(spas, dtype=np.uint64).reshape(-1)
        if arr.size and np.any(arr & np.uint64(PAGE_SIZE - 1)):
            raise ValueError("spas must be page aligned")
        pfns = arr >> np.uint64(PAGE_SHIFT)
        if pfns.size and int(pfns.max()) >= self.host.mem.nframes:
            raise ValueError("SPA outside host memory")
        return pfns

    def _check_range(self, spa, size):
        if not isinstance(spa, (int, np.integer)) or not isinstance(size, (int, np.integer)):
            raise TypeError("spa and size must be integers")
        if spa < 0 or size < 0 or spa + size > self.host.mem.size:
            raise ValueError(f"SPA range [{spa:#x}, {spa + size:#x}) outside host memory")


def _run_start(pfns):
    """The first pfn if ``pfns`` are consecutive ascending frames (a run the engine can work on
    in place), else None."""
    if pfns.size < 2 or int(pfns[-1]) - int(pfns[0]) != pfns.size - 1:
        return int(pfns[0]) if pfns.size == 1 else None
    return int(pfns[0]) if np.all(np.diff(pfns) == 1) else None


def _last_of_each(pfns):
    """Indices of the last occurrence of each pfn, in order, or None if none repeats (numpy
    does not define which of repeated fancy-index assignments wins)."""
    if pfns.size < 2:
        return None
    uniq, first_rev = np.unique(pfns[::-1], return_index=True)
    if uniq.size == pfns.size:
        return None
    return np.sort(pfns.size - 1 - first_rev)


def _page_span(spa, size):
    first = spa & ~(PAGE_SIZE - 1)
    end = (spa + size + PAGE_SIZE - 1) & ~(PAGE_SIZE - 1)
    return first, end


def _check_asid(asid, zero_ok):
    if not isinstance(asid, (int, np.integer)) or isinstance(asid, bool):
        raise TypeError(f"asid must be an int, not {type(asid).__name__}")
    if asid < 0 or (asid == 0 and not zero_ok) or asid >= 1 << 32:
        raise ValueError(f"ASID {asid} out of range")
