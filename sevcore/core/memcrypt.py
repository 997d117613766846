"""The SEV memory encryption engine: per-key, SPA-tweaked encryption of 4 KiB pages.

The memory controller of an SEV host encrypts each 16-byte block of a guest page under the key of
the guest's ASID, as a function of the block's system physical address (SPA). Identical plaintext
at two addresses, or under two keys, gives different ciphertext, and ciphertext moved to another
SPA decrypts to garbage: the properties that make SEND/RECEIVE re-encryption necessary.

>>> from sevcore.core.memcrypt import MemoryEngine, AES128_XEX, AES256_XTS
>>> eng = MemoryEngine(AES128_XEX, key16)          # tweak_table=None: default_tweak_table(0)
>>> ct = eng.encrypt_pages(data, spas)            # data: n * 4096 bytes, spas: n page-aligned SPAs
>>> eng.decrypt_pages(ct, spas, out=ct)           # in place

Modes (see ``docs/fidelity.md`` and ``docs/sources.md``):

``AES128_XEX``
    The SEV / SEV-ES engine: ``C = AES-128_K(P ^ T(p)) ^ T(p)``, ``T(p)`` the XOR over the set bits
    ``i >= 4`` of the block's SPA ``p`` of ``t[i]`` repeated four times (Wilke et al., "SEVurity",
    IEEE S&P 2020).
``AES256_XTS``
    IEEE 1619 XTS-AES-256 with a 64-byte key, one 4096-byte data unit per page, tweak
    ``spa >> 12`` as 16 little-endian bytes; byte-identical to OpenSSL's ``aes-256-xts``.
"""
import concurrent.futures
import errno
import itertools
import os
import threading

import numpy as np

from sevcore import _bindings as _b

AES128_XEX = _b.lib.SC_MEM_AES128_XEX
AES256_XTS = _b.lib.SC_MEM_AES256_XTS
PAGE_SIZE = _b.MEM_PAGE_SIZE
TWEAK_ENTRIES = _b.lib.SC_MEM_TWEAK_ENTRIES

_MODES = {AES128_XEX: ("AES128_XEX", 16), AES256_XTS: ("AES256_XTS", 64)}
_MAX_SPA = (1 << 64) - 1


def default_tweak_table(seed=0):
    """A tweak table drawn from a seeded RNG: 64 uint32 values, entries 0-3 zero (unused).

    Real parts hard-code or fixed-seed their constants and share them across every key of a host
    (SEVurity, Table I), so a Host draws one table from its seed and gives it to every engine.
    """
    table = np.random.default_rng(np.random.PCG64(seed)).integers(
        0, 1 << 32, size=TWEAK_ENTRIES, dtype=np.uint64).astype(np.uint32)
    table[:4] = 0
    return table


def _as_tweak_table(tweak_table):
    arr = np.asarray(tweak_table)
    if arr.shape != (TWEAK_ENTRIES,):
        raise ValueError(f"tweak_table must hold {TWEAK_ENTRIES} entries, got shape {arr.shape}")
    if arr.dtype.kind not in "ui" and not (arr.dtype == object and
                                           all(isinstance(v, int) for v in arr)):
        raise TypeError(f"tweak_table entries must be integers, not {arr.dtype}")
    if any(int(v) < 0 or int(v) >= 1 << 32 for v in arr):
        raise ValueError("tweak_table entries must be unsigned 32-bit values")
    return np.ascontiguousarray(arr.astype(np.uint32))


def _as_spas(spas):
    """SPAs as a contiguous uint64 array, refusing negatives, non-integers and values over 64 bits."""
    if isinstance(spas, np.ndarray):
        if spas.dtype == np.uint64:
            return np.ascontiguousarray(spas).reshape(-1)
        if spas.size and spas.dtype.kind not in "ui":
            raise TypeError(f"spas must be integers, not {spas.dtype}")
        if spas.dtype.kind == "i" and spas.size and spas.min() < 0:
            raise ValueError("spas must be unsigned 64-bit physical addresses (got a negative)")
        return np.ascontiguousarray(spas, dtype=np.uint64).reshape(-1)
    # A Python sequence: numpy would silently turn a mix of large ints into float64, so convert
    # element by element as integers.
    vals = list(spas)
    for v in vals:
        if not isinstance(v, (int, np.integer)) or isinstance(v, bool):
            raise TypeError(f"spas must be integers, not {type(v).__name__}")
        if not 0 <= v <= _MAX_SPA:
            raise ValueError(f"spas must be unsigned 64-bit physical addresses, got {v:#x}")
    return np.array(vals, dtype=np.uint64)


class MemoryEngine:
    """One key of the memory encryption engine (one ASID's key, or a transport key)."""

    _pool = None
    _pool_lock = threading.Lock()

    def __init__(self, mode, key, tweak_table=None):
        if mode not in _MODES:
            raise ValueError(f"mode must be AES128_XEX or AES256_XTS, not {mode!r}")
        name, key_len = _MODES[mode]
        if not isinstance(key, (bytes, bytearray, memoryview)):
            raise TypeError(f"key must be bytes, not {type(key).__name__}")
        key = bytes(key)
        if len(key) != key_len:
            raise ValueError(f"{name} needs a {key_len}-byte key, got {len(key)} bytes")
        if mode == AES256_XTS:
            if tweak_table is not None:
                raise ValueError("AES256_XTS takes no tweak_table (its tweak is AES_K2(spa >> 12))")
            if key[:32] == key[32:]:
                raise ValueError("AES256_XTS key halves must differ (IEEE 1619; OpenSSL refuses "
                                 "duplicated XTS keys)")
            table = None
        else:
            table = _as_tweak_table(default_tweak_table(0) if tweak_table is None
                                    else tweak_table)
        self.mode = mode
        self.tweak_table = table
        self._eng = _b.memcrypt_new(mode, key, table)

    def __repr__(self):
        return f"<MemoryEngine {_MODES[self.mode][0]}>"

    def close(self):
        """Wipe and free the key schedule now; the engine is unusable afterwards."""
        if self._eng is not None:
            _b.memcrypt_free(self._eng)
            self._eng = None

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    # -- batched pages at arbitrary SPAs --------------------------------------------------------

    def encrypt_pages(self, data, spas, out=None, *, threads=1):
        """Encrypt ``n`` pages of ``data``, page ``i`` at ``spas[i]``; returns ``out``.

        ``out`` (default: a new bytearray) may be ``data`` itself for in-place work. Raises
        ValueError, before writing anything, on a buffer that is not whole pages, a count
        mismatch, an unaligned SPA or a partially overlapping ``out``. ``threads`` > 1 splits the
        batch over worker threads (the C call releases the GIL).
        """
        return self._pages(1, data, spas, out, threads)

    def decrypt_pages(self, data, spas, out=None, *, threads=1):
        """Decrypt ``n`` pages of ``data``, page ``i`` at ``spas[i]``; see :meth:`encrypt_pages`."""
        return self._pages(0, data, spas, out, threads)

    # -- a contiguous run of frames (one page is a run of one) ------------------------------------

    def _make_run(encrypt, verb):
        # One function per direction, so the one-page fast path has no extra call layer.
        def run(self, data, spa, out=None):
            try:
                rc, out = _b.memcrypt_run(self._eng, encrypt, data, out, spa)
            except (TypeError, BufferError, OverflowError) as exc:
                self._run_error(exc, spa)
            if rc:
                _diagnose(rc, data, out, None, spa)
            return out
        run.__name__ = f"{verb}_run"
        run.__doc__ = f"{verb.capitalize()} pages at the consecutive SPAs ``spa, spa + 4096, ...``; " \
                      "returns ``out``."
        return run

    encrypt_run = _make_run(1, "encrypt")
    decrypt_run = _make_run(0, "decrypt")
    del _make_run
    encrypt_page = encrypt_run
    decrypt_page = decrypt_run

    # -- internals --------------------------------------------------------------------------------

    def _pages(self, encrypt, data, spas, out, threads):
        if self._eng is None:
            raise ValueError("MemoryEngine is closed")
        arr = _as_spas(spas)
        if threads != 1:
            return self._pages_threaded(encrypt, data, arr, out, threads)
        try:
            rc, out = _b.memcrypt_pages(self._eng, encrypt, data, out, arr)
        except (TypeError, BufferError) as exc:
            raise TypeError(f"data and out must be buffers (out writable): {exc}") from None
        if rc:
            _diagnose(rc, data, out, arr, None)
        return out

    def _pages_threaded(self, encrypt, data, arr, out, threads):
        if not isinstance(threads, int) or threads < 1:
            raise ValueError(f"threads must be a positive int, not {threads!r}")
        # C checks the whole batch first, so no slice writes while another would be refused.
        try:
            rc, out, slices = _b.memcrypt_split(self._eng, data, out, arr, threads)
        except (TypeError, BufferError) as exc:
            raise TypeError(f"data and out must be buffers (out writable): {exc}") from None
        if rc:
            _diagnose(rc, data, out, arr, None)
        pool = self._executor()
        jobs = [pool.submit(_b.memcrypt_pages, self._eng, encrypt, s, d, a) for s, d, a in slices]
        for job in jobs:
            rc, _ = job.result()
            if rc:
                _diagnose(rc, data, out, arr, None)
        return out

    def _run_error(self, exc, spa):
        # The fast path lets cffi reject bad arguments; this names what was wrong.
        if self._eng is None:
            raise ValueError("MemoryEngine is closed") from None
        if isinstance(exc, OverflowError):
            raise ValueError(f"spa {spa:#x} is not a 64-bit physical address") from None
        raise TypeError(f"data and out must be buffers (out writable) and spa an int: "
                        f"{exc}") from None

    @classmethod
    def _executor(cls):
        with cls._pool_lock:
            if cls._pool is None:
                cpus = sorted(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else []
                cls._pool = concurrent.futures.ThreadPoolExecutor(
                    max_workers=max(len(cpus), 1), thread_name_prefix="sevcore-memcrypt",
                    initializer=_pin_worker, initargs=(cpus, itertools.count()))
            return cls._pool


def _pin_worker(cpus, counter):
    """Pin each pool thread to its own CPU of the process's allowed set. Unpinned, the scheduler
    was seen to keep both workers of a short batch on one core for milliseconds at a time (1.4x
    instead of 1.9x on two cores)."""
    if cpus:
        try:
            os.sched_setaffinity(0, {cpus[next(counter) % len(cpus)]})
        except OSError:
            pass


def _diagnose(rc, data, out, spas, spa):
    """Raise the precise error for a refused call (runs only on the error path)."""
    if rc != -errno.EINVAL:
        _b.check(rc, "sc_memcrypt")
    size = memoryview(data).nbytes
    if size % PAGE_SIZE:
        raise ValueError(f"data must be a whole number of {PAGE_SIZE}-byte pages, got {size} bytes")
    if memoryview(out).nbytes != size:
        raise ValueError(f"out holds {memoryview(out).nbytes} bytes, data {size}")
    if out is not data and _b.overlaps_buffers(data, out):
        raise ValueError("out overlaps data without being the same buffer")
    npages = size // PAGE_SIZE
    if spas is not None:
        if spas.size != npages:
            raise ValueError(f"{spas.size} SPAs for {npages} pages")
        bad = np.flatnonzero(spas & np.uint64(PAGE_SIZE - 1))
        if bad.size:
            i = int(bad[0])
            raise ValueError(f"spas[{i}] = {int(spas[i]):#x} is not page aligned")
    else:
        if spa % PAGE_SIZE:
            raise ValueError(f"spa {spa:#x} is not page aligned")
        if (spa >> 12) + npages > 1 << 52:
            raise ValueError(f"{npages} pages from spa {spa:#x} run past the address space")
    _b.check(rc, "sc_memcrypt")


def implementation():
    """Which C path the engine takes with the active CPU features: 'vaes', 'aesni' or 'portable'."""
    return _b.memcrypt_impl()
