"""The seam between Python and the C core.

This is the only module that imports the generated ``sevcore._native``. Each wrapper checks its
arguments first (sizes, alignment, dtypes), passes buffers without copying, calls C, and turns a
negative return code into an exception in one place, :func:`check`.
"""
import errno as _errno
import os

try:
    from sevcore._native import ffi, lib
except ImportError as exc:  # pragma: no cover - exercised only on a broken install
    raise ImportError(
        "sevcore's compiled core (sevcore._native) is missing or cannot be loaded: "
        f"{exc}. Build it with `pip install -e .` (or `python setup.py build_ext --inplace`)."
    ) from exc

#: The C-core ABI this Python package was written against (csrc/sevcore.h SC_ABI_VERSION).
ABI_VERSION = 1

if lib.sc_abi_version() != ABI_VERSION or lib.SC_ABI_VERSION != ABI_VERSION:
    raise ImportError(
        f"sevcore._native has ABI version {lib.sc_abi_version()}, but this sevcore package "
        f"needs {ABI_VERSION}: the compiled module is stale. Rebuild it with `pip install -e .` "
        "(or `python setup.py build_ext --inplace`)."
    )


def check(rc, what):
    """Return ``rc`` if it is not negative, else raise ``OSError(-rc)`` naming ``what``."""
    if rc < 0:
        err = -rc
        raise OSError(err, f"{what}: {os.strerror(err)} ({_errno.errorcode.get(err, err)})")
    return rc


def buffer_ptr(buf, what, writable=False):
    """A ``char *`` over any buffer-protocol object without copying it."""
    try:
        return ffi.from_buffer("char[]", buf, require_writable=writable)
    except TypeError as exc:
        kind = "a writable buffer" if writable else "a buffer"
        raise TypeError(f"{what} must be {kind} (bytes, bytearray, memoryview, numpy array), "
                        f"not {type(buf).__name__}") from exc


def nbytes(buf):
    """Length in bytes of a buffer-protocol object."""
    return memoryview(buf).nbytes


# --- CPU features -----------------------------------------------------------------------------

CPU_FEATURES = {
    "aesni": lib.SC_CPU_AESNI,
    "avx512": lib.SC_CPU_AVX512,
    "vaes": lib.SC_CPU_VAES,
    "popcnt": lib.SC_CPU_POPCNT,
    "vpopcntdq": lib.SC_CPU_VPOPCNTDQ,
    "shani": lib.SC_CPU_SHANI,
}


def cpu_detected():
    return lib.sc_cpu_detected()


def cpu_active():
    return lib.sc_cpu_active()


def cpu_restrict(mask):
    return lib.sc_cpu_restrict(mask)


# --- Bitmaps (csrc/bitmap.h) ------------------------------------------------------------------
#
# A bitmap crosses the seam as a ``uint64_t[]`` cdata made once by :func:`bitmap_map` over the
# caller's word array (no copy); every wrapper takes that handle plus ``nbits``, re-checks that
# the handle holds enough words, and returns the C count or raises through :func:`check`.

if not hasattr(lib, "sc_bitmap_count"):  # pragma: no cover - a core built before bitmap.c
    raise ImportError("sevcore._native has no bitmap kernels: the compiled module is stale. "
                      "Rebuild it with `python setup.py build_ext --inplace`.")

BITMAP_MAX_NBITS = lib.SC_BITMAP_MAX_NBITS
_U64_FORMATS = frozenset({"L", "Q", "=Q", "<Q", "@L", "@Q"})  # little-endian hosts only


def _u64_array(buf, what, writable):
    """A ``uint64_t[]`` over a 1-D, C-contiguous, 8-byte aligned buffer of 64-bit unsigned words."""
    try:
        mv = memoryview(buf)
    except TypeError as exc:
        raise TypeError(f"{what} must be a buffer of uint64 words, not {type(buf).__name__}") \
            from exc
    if mv.format not in _U64_FORMATS or mv.itemsize != 8:
        raise TypeError(f"{what} must hold native uint64 words, not format {mv.format!r}")
    if mv.ndim != 1 or not mv.c_contiguous:
        raise ValueError(f"{what} must be one-dimensional and contiguous")
    if writable and mv.readonly:
        raise ValueError(f"{what} must be writable")
    arr = ffi.from_buffer("uint64_t[]", buf, require_writable=writable)
    if int(ffi.cast("uintptr_t", arr)) % 8:
        raise ValueError(f"{what} must be 8-byte aligned")
    return arr


def bitmap_words(nbits):
    """Number of 64-bit words holding ``nbits`` bits (BITS_TO_LONGS)."""
    return (nbits + 63) // 64


def bitmap_map(words, nbits):
    """The handle the bitmap wrappers take: ``words`` (exactly ``bitmap_words(nbits)`` words)."""
    if not 0 <= nbits <= BITMAP_MAX_NBITS:
        raise ValueError(f"nbits must be in [0, {BITMAP_MAX_NBITS}], not {nbits}")
    arr = _u64_array(words, "bitmap words", writable=True)
    if len(arr) != bitmap_words(nbits):
        raise ValueError(f"a {nbits}-bit bitmap needs {bitmap_words(nbits)} words, "
                         f"got {len(arr)}")
    return arr


def _need(map_, nbits):
    if nbits > 64 * len(map_):
        raise ValueError(f"{nbits} bits do not fit in {len(map_)} words")


def bitmap_count(map_, nbits, start, end):
    _need(map_, nbits)
    return check(lib.sc_bitmap_count(map_, nbits, start, end), "sc_bitmap_count")


def bitmap_count_runs(map_, nbits, start, end):
    _need(map_, nbits)
    return check(lib.sc_bitmap_count_runs(map_, nbits, start, end), "sc_bitmap_count_runs")


def bitmap_find_next_set(map_, nbits, start):
    _need(map_, nbits)
    return check(lib.sc_bitmap_find_next_set(map_, nbits, start), "sc_bitmap_find_next_set")


def bitmap_find_next_zero(map_, nbits, start):
    _need(map_, nbits)
    return check(lib.sc_bitmap_find_next_zero(map_, nbits, start), "sc_bitmap_find_next_zero")


def bitmap_set_range(map_, nbits, start, n):
    _need(map_, nbits)
    return check(lib.sc_bitmap_set_range(map_, nbits, start, n), "sc_bitmap_set_range")


def bitmap_clear_range(map_, nbits, start, n):
    _need(map_, nbits)
    return check(lib.sc_bitmap_clear_range(map_, nbits, start, n), "sc_bitmap_clear_range")


def bitmap_iter_set(map_, nbits, pos, end, out):
    """Indices of set bits in [pos, end) into ``out``; returns (count written, next pos)."""
    _need(map_, nbits)
    o = _u64_array(out, "out", writable=True)
    p = ffi.new("uint64_t *", pos)
    n = check(lib.sc_bitmap_iter_set(map_, nbits, p, end, o, len(o)), "sc_bitmap_iter_set")
    return n, p[0]


def bitmap_iter_runs(map_, nbits, pos, end, starts, lengths):
    """Runs of set bits in [pos, end) into ``starts``/``lengths``; returns (count, next pos)."""
    _need(map_, nbits)
    s = _u64_array(starts, "starts", writable=True)
    ln = _u64_array(lengths, "lengths", writable=True)
    if len(s) != len(ln):
        raise ValueError(f"starts and lengths differ in length ({len(s)} != {len(ln)})")
    p = ffi.new("uint64_t *", pos)
    n = check(lib.sc_bitmap_iter_runs(map_, nbits, p, end, s, ln, len(s)),
              "sc_bitmap_iter_runs")
    return n, p[0]


def bitmap_harvest(map_, nbits, pos, end, out):
    """Take and clear the set bits of [pos, end) into ``out``; returns (count, next pos)."""
    _need(map_, nbits)
    o = _u64_array(out, "out", writable=True)
    p = ffi.new("uint64_t *", pos)
    n = check(lib.sc_bitmap_harvest(map_, nbits, p, end, o, len(o)), "sc_bitmap_harvest")
    return n, p[0]


def _wordop(fn, name, dst, a, b, nbits):
    for m in (dst, a, b):
        _need(m, nbits)
    return check(fn(dst, a, b, nbits), name)


def bitmap_and(dst, a, b, nbits):
    return _wordop(lib.sc_bitmap_and, "sc_bitmap_and", dst, a, b, nbits)


def bitmap_or(dst, a, b, nbits):
    return _wordop(lib.sc_bitmap_or, "sc_bitmap_or", dst, a, b, nbits)


def bitmap_andnot(dst, a, b, nbits):
    return _wordop(lib.sc_bitmap_andnot, "sc_bitmap_andnot", dst, a, b, nbits)


def bitmap_equal(a, b, nbits):
    _need(a, nbits)
    _need(b, nbits)
    return check(lib.sc_bitmap_equal(a, b, nbits), "sc_bitmap_equal") == 1


def bitmap_read_pass(words):
    """XOR of all words of a uint64 buffer: one streaming read pass (the benchmarks' anchor)."""
    w = _u64_array(words, "words", writable=False)
    fold = ffi.new("uint64_t *")
    check(lib.sc_bitmap_read_pass(w, len(w), fold), "sc_bitmap_read_pass")
    return fold[0]
