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
import itertools
import os
import threading

import numpy as np

from sevcore import _bindings as _b
from sevcore.core.arrays import u64

AES128_XEX = _b.lib.SC_MEM_AES128_XEX
AES256_XTS = _b.lib.SC_MEM_AES256_XTS
PAGE_SIZE = _b.MEM_PAGE_SIZE
TWEAK_ENTRIES = _b.lib.SC_MEM_TWEAK_ENTRIES

_MODE_NAMES = {AES128_XEX: "AES128_XEX", AES256_XTS: "AES256_XTS"}


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


class MemoryEngine:
    """One key of the memory encryption engine (one ASID's key, or a transport key)."""

    _pool = None
    _pool_lock = threading.Lock()

    def __init__(self, mode, key, tweak_table=None):
        """Raises TypeError for a key that is not bytes and ValueError for a mode, key length or
        tweak table the mode does not take (XTS takes none; its key halves must differ)."""
        if not isinstance(key, (bytes, bytearray, memoryview)):
            raise TypeError(f"key must be bytes, not {type(key).__name__}")
        key = bytes(key)
        if tweak_table is not None:
            table = _as_tweak_table(tweak_table)
        elif mode == AES128_XEX:
            table = _as_tweak_table(default_tweak_table(0))
        else:
            table = None
        try:
            self._eng = _b.memcrypt_new(mode, key, table)
        except (TypeError, OverflowError):
            # cffi refused a mode that is no C int; C judges every int.
            raise ValueError(f"mode must be AES128_XEX or AES256_XTS, not {mode!r}") from None
        self.mode = mode
        self.tweak_table = table

    def __repr__(self):
        return f"<MemoryEngine {_MODE_NAMES[self.mode]}>"

    def cdata(self):
        """The C engine, for another C kernel to encrypt through (the guest page kernels of
        sevcore.core.pages); ValueError once closed."""
        if self._eng is None:
            raise ValueError("MemoryEngine is closed")
        return self._eng

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
                return _b.memcrypt_run(self._eng, encrypt, data, out, spa)
            except (TypeError, BufferError, OverflowError) as exc:
                self._run_error(exc, spa)
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
        arr = u64(spas, "spas")
        if type(arr) is int:
            raise TypeError("spas must be a sequence of SPAs, not one int")
        if arr.ndim != 1:
            arr = arr.reshape(-1)
        if threads != 1:
            return self._pages_threaded(encrypt, data, arr, out, threads)
        try:
            return _b.memcrypt_pages(self._eng, encrypt, data, out, arr)
        except (TypeError, BufferError) as exc:
            raise TypeError(f"data and out must be buffers (out writable): {exc}") from None

    def _pages_threaded(self, encrypt, data, arr, out, threads):
        if not isinstance(threads, int) or threads < 1:
            raise ValueError(f"threads must be a positive int, not {threads!r}")
        # C checks the whole batch first, so no slice writes while another would be refused.
        try:
            out, slices = _b.memcrypt_split(self._eng, data, out, arr, threads)
        except (TypeError, BufferError) as exc:
            raise TypeError(f"data and out must be buffers (out writable): {exc}") from None
        pool = self._executor()
        jobs = [pool.submit(_b.memcrypt_pages, self._eng, encrypt, s, d, a) for s, d, a in slices]
        for job in jobs:
            job.result()
        return out

    def _run_error(self, exc, spa):
        # The fast path lets cffi reject bad arguments; this names what was wrong.
        if self._eng is None:
            raise ValueError("MemoryEngine is closed") from None
        u64(spa, "spa")
        raise TypeError(f"data and out must be buffers (out writable): {exc}") from None

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


def implementation():
    """Which C path the engine takes with the active CPU features: 'vaes' (the avx512 tier:
    VAES on zmm), 'avx2' (VAES on ymm), 'aesni' or 'portable'. ``cpu.kernels()`` names every
    path by its tier."""
    impl = _b.memcrypt_impl()
    return "vaes" if impl == "avx512" else impl
