"""The seam between Python and the C core.

This is the only module that imports the generated ``sevcore._native``. Each wrapper checks what
only Python can see (buffer sizes, alignment, dtypes), passes buffers without copying, calls C,
and turns a negative return code into an exception in one place: :func:`check` for a bare errno,
:func:`refused` for a kernel that also says why (``struct sc_err``, csrc/sevcore.h), through the
one table :data:`REFUSALS`.
"""
import errno as _errno
import os
import threading

import numpy as np

from sevcore.errors import PacketAuthError, PacketFlagsError

try:
    from sevcore._native import ffi, lib
except ImportError as exc:  # pragma: no cover - exercised only on a broken install
    raise ImportError(
        "sevcore's compiled core (sevcore._native) is missing or cannot be loaded: "
        f"{exc}. Build it with `pip install -e .` (or `python setup.py build_ext --inplace`)."
    ) from exc

#: The C-core ABI this Python package was written against (csrc/sevcore.h SC_ABI_VERSION).
ABI_VERSION = 13

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


# --- Why C refused a call (csrc/sevcore.h struct sc_err) ----------------------------------------
#
# Every kernel that takes a ``struct sc_err *`` writes the reason of a refusal there. The struct
# is one per thread (a C call releases the GIL, so threads refuse calls at the same time), made
# once, so passing it costs a C call nothing.

class _Err(threading.local):
    def __init__(self):
        self.p = ffi.new("struct sc_err *")


_err = _Err()
_GFN_SPACE = "the guest physical space [0, {limit:#x})"

#: ``(errno, reason)`` -> ``(exception, message)``: the one place a C refusal becomes a Python
#: exception. The message is formatted with the fields of ``struct sc_err`` (index, value, limit,
#: count) and follows the name of the C call. ValueError is the caller's bad argument; OSError a
#: refusal no argument of the caller explains (a NULL or misaligned pointer from this module, a
#: model bug), with C's errno.
REFUSALS = {
    (_errno.EINVAL, lib.SC_ERR_NULL): (OSError, "a pointer the call needs is NULL"),
    (_errno.EINVAL, lib.SC_ERR_MISALIGNED): (OSError, "a uint64 array is not 8-byte aligned"),

    (_errno.EINVAL, lib.SC_ERR_MEM_MODE): (
        ValueError, "mode {value} is neither AES128_XEX nor AES256_XTS"),
    (_errno.EINVAL, lib.SC_ERR_MEM_KEY_SIZE): (
        ValueError, "the mode needs a {limit}-byte key, got {value} bytes"),
    (_errno.EINVAL, lib.SC_ERR_MEM_XEX_TABLE): (ValueError, "AES128_XEX needs a tweak_table"),
    (_errno.EINVAL, lib.SC_ERR_MEM_XTS_TABLE): (
        ValueError, "AES256_XTS takes no tweak_table (its tweak is AES_K2(spa >> 12))"),
    (_errno.EINVAL, lib.SC_ERR_MEM_XTS_HALVES): (
        ValueError, "AES256_XTS key halves must differ (IEEE 1619; OpenSSL refuses duplicated "
                    "XTS keys)"),
    (_errno.EINVAL, lib.SC_ERR_MEM_PARTIAL_PAGE): (
        ValueError, "data must be a whole number of {limit}-byte pages, got {value} bytes"),
    (_errno.EINVAL, lib.SC_ERR_MEM_OUT_SIZE): (ValueError, "out holds {value} bytes, data {limit}"),
    (_errno.EINVAL, lib.SC_ERR_MEM_OVERLAP): (
        ValueError, "out overlaps data without being the same buffer"),
    (_errno.EINVAL, lib.SC_ERR_MEM_SPA_COUNT): (ValueError, "{value} SPAs for {limit} pages"),
    (_errno.EINVAL, lib.SC_ERR_MEM_SPA_UNALIGNED): (
        ValueError, "spas[{index}] = {value:#x} is not page aligned"),
    (_errno.EINVAL, lib.SC_ERR_MEM_RUN_UNALIGNED): (
        ValueError, "spa {value:#x} is not page aligned"),
    (_errno.EINVAL, lib.SC_ERR_MEM_RUN_END): (
        ValueError, "{count} pages from spa {value:#x} run past the address space"),

    (_errno.EINVAL, lib.SC_ERR_GUEST_OP): (ValueError, "unknown guest op {value}"),
    (_errno.EINVAL, lib.SC_ERR_GUEST_COUNT): (
        ValueError, "n = {value} pages, more than the guest space holds ({limit:#x})"),
    (_errno.EINVAL, lib.SC_ERR_GUEST_BUF_SIZE): (
        ValueError, "the op on {count} pages needs a buf of {limit} bytes, got {value}"),
    (_errno.EINVAL, lib.SC_ERR_GUEST_BUF_OVERLAP): (
        ValueError, "buf overlaps the host frames or the gfns"),
    (_errno.EINVAL, lib.SC_ERR_GUEST_OUT_SIZE): (
        ValueError, "the op on {count} pages needs an out array of {limit} uint64 words, got "
                    "{value}"),
    (_errno.EINVAL, lib.SC_ERR_GUEST_OUT_OVERLAP): (
        ValueError, "out overlaps the host frames or the gfns"),
    (_errno.EINVAL, lib.SC_ERR_GUEST_GFN): (
        ValueError, "gfns[{index}] = {value:#x} must be in [0, {limit:#x})"),
    (_errno.EINVAL, lib.SC_ERR_GUEST_RUN): (
        ValueError, "gfns {value:#x}+{count} run past the guest space [0, {limit:#x})"),
    (_errno.EINVAL, lib.SC_ERR_GUEST_SLOT): (
        ValueError, "dirty slot {index} ({value:#x}+{count:#x}) is empty or runs past the guest "
                    "space [0, {limit:#x})"),
    (_errno.EINVAL, lib.SC_ERR_GUEST_SLOT_ORDER): (
        ValueError, "dirty slot {index} ({value:#x}+{count:#x}) starts before the slot ahead of "
                    "it ends ({limit:#x}): slots must be sorted and disjoint"),
    (_errno.EINVAL, lib.SC_ERR_GUEST_UNLOGGED): (
        ValueError, "page {index} (gfn {value:#x}) would be written through an NPT_DIRTY_LOG "
                    "entry in no dirty slot, losing its dirty bit"),
    (_errno.EFAULT, lib.SC_ERR_GUEST_FRAME): (
        OSError, "page {index} maps pfn {value:#x}, outside the {limit} host frames"),
    (_errno.EINVAL, lib.SC_ERR_RING_SIZE): (
        ValueError, "a dirty ring of {value} entries: the size must be a power of two"),

    (_errno.EINVAL, lib.SC_ERR_PKT_LEN): (
        ValueError, "packet length {value} must be a non-zero multiple of 16 and at most "
                    "{limit:#x}"),
    (_errno.EINVAL, lib.SC_ERR_PKT_COUNT): (ValueError, "{value} packets are more than {limit}"),
    (_errno.EINVAL, lib.SC_ERR_PKT_STRIDE): (
        ValueError, "rows {value} bytes apart cannot hold {limit} bytes each"),
    (_errno.EINVAL, lib.SC_ERR_PKT_CT_OVERLAP): (
        ValueError, "the ciphertext overlaps the plaintext without being it (in place needs "
                    "rows back to back)"),
    (_errno.EINVAL, lib.SC_ERR_PKT_HDRS_OVERLAP): (
        ValueError, "the headers out overlap the plaintext, the ciphertext or the IVs"),
    (_errno.EINVAL, lib.SC_ERR_PKT_IVS_OVERLAP): (
        ValueError, "the ciphertext out overlaps the IVs"),
    (_errno.EINVAL, lib.SC_ERR_PKT_PT_OVERLAP): (ValueError, "out overlaps the headers"),
    (_errno.EBADMSG, lib.SC_ERR_PKT_MAC): (PacketAuthError, None),
    (_errno.EOPNOTSUPP, lib.SC_ERR_PKT_COMPRESSED): (PacketFlagsError, None),
    (_errno.EINVAL, lib.SC_ERR_CTR_OVERLAP): (
        ValueError, "out overlaps data without being the same buffer"),

    (_errno.EINVAL, lib.SC_ERR_NPT_GFN): (ValueError, "gfn {value:#x} is outside " + _GFN_SPACE),
    (_errno.EINVAL, lib.SC_ERR_NPT_NPAGES): (
        ValueError, "npages {value} must be >= 1 and at most {limit:#x}, the pages from gfn to "
                    "the end of the guest physical space"),
    (_errno.EINVAL, lib.SC_ERR_NPT_PFN): (
        ValueError, "pfns {value:#x}+{count} must lie in [0, {limit:#x})"),
    (_errno.EINVAL, lib.SC_ERR_NPT_FLAGS): (
        ValueError, "flags {value:#x} have bits outside NPT_FLAGS_MASK {limit:#x}"),
    (_errno.EINVAL, lib.SC_ERR_NPT_CLEAR_PRESENT): (
        ValueError, "protect_range cannot clear NPT_PRESENT; use zap_range"),
    (_errno.EINVAL, lib.SC_ERR_NPT_GFNS): (
        ValueError, "gfns[{index}] = {value:#x} is outside " + _GFN_SPACE),
    (_errno.EINVAL, lib.SC_ERR_NPT_BOUND): (
        ValueError, "gfn bound {value:#x} is past the guest physical space [0, {limit:#x}]"),
    (_errno.EINVAL, lib.SC_ERR_NPT_PFNS): (
        ValueError, "pfns[{index}] = {value:#x} is outside the host frames [0, {limit:#x})"),

    (_errno.EINVAL, lib.SC_ERR_RMP_PFN): (
        ValueError, "pfn {value:#x} (item {index}) is outside the RMP's frames [0, {limit:#x})"),
    (_errno.EINVAL, lib.SC_ERR_RMP_STATE): (
        ValueError, "the frame {value:#x} (item {index}) is not assigned to ASID {limit}"),
    (_errno.EFAULT, lib.SC_ERR_RMP_NPF_OWNER): (
        OSError, "RMP fault: frame {value:#x} is not the accessing ASID {limit}'s (owner ASID "
                 "{count}, or locked)"),
    (_errno.EFAULT, lib.SC_ERR_RMP_NPF_GPA): (
        OSError, "RMP fault: GPA {value:#x} does not match the entry's GPA {limit:#x}"),
    (_errno.EFAULT, lib.SC_ERR_RMP_NPF_SIZE): (
        OSError, "RMP fault: a 4 KiB access to frame {value:#x} inside a 2 MiB entry"),
}


def refused(rc, what, err=None):
    """Raise the exception :data:`REFUSALS` gives for C's ``rc`` (negative) and the reason C
    wrote to ``err`` (this thread's ``struct sc_err`` by default); an unlisted pair is an
    ``OSError(-rc)`` naming ``what``, as :func:`check` raises."""
    e = _err.p if err is None else err
    kind, text = REFUSALS.get((-rc, e.reason), (None, None))
    if kind is None:
        check(rc, what)
        raise RuntimeError(f"{what} returned {rc}, which is no refusal")
    if kind is PacketAuthError:
        raise PacketAuthError(e.index)
    if kind is PacketFlagsError:
        raise PacketFlagsError(e.index, e.value)
    msg = f"{what}: " + text.format(index=e.index, value=e.value, limit=e.limit, count=e.count)
    raise kind(msg) if kind is ValueError else kind(-rc, msg)


_CHAR_ARRAY = ffi.typeof("char[]")
_U64_ARRAY = ffi.typeof("uint64_t[]")


def _from_buffer(ctype, buf, writable=False):
    """``ffi.from_buffer``, holding no export of a memoryview.

    A cdata made over a memoryview keeps one of the memoryview's exports until the cdata dies.
    When a C call refuses, the exception's traceback keeps both alive in a reference cycle,
    and CPython before 3.12.7 clears such a memoryview with its export still held and then
    crashes freeing it (python/cpython#77894). A numpy array over the memoryview takes no
    export of it (numpy releases its view at once), so the cdata is made over that instead."""
    if type(buf) is memoryview:
        buf = np.frombuffer(buf, np.uint8)
    return ffi.from_buffer(ctype, buf, writable)


def buffer_ptr(buf, what, writable=False):
    """A ``char[]`` over any buffer-protocol object, without copying it."""
    try:
        return _from_buffer(_CHAR_ARRAY, buf, writable)
    except (TypeError, BufferError, ValueError) as exc:
        # TypeError: not a buffer; BufferError: read-only; ValueError: not contiguous.
        kind = "a writable buffer" if writable else "a buffer"
        raise TypeError(f"{what} must be {kind} (bytes, bytearray, memoryview, contiguous numpy "
                        f"array), not {type(buf).__name__} ({exc})") from exc


_U64_FORMATS = frozenset({"L", "Q", "=Q", "<Q", "@L", "@Q"})  # little-endian hosts only


def _words(buf, what, writable=False):
    """A ``uint64_t[]`` over a 1-D, C-contiguous, 8-byte aligned buffer of native uint64 words
    (a uint64 numpy array, or any buffer of that format), without copying. This checks the
    buffer's layout only: what the words mean is the caller's (sevcore.core.arrays.u64 judges
    values)."""
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
    arr = _from_buffer(_U64_ARRAY, buf, writable)
    if int(ffi.cast("uintptr_t", arr)) % 8:
        raise ValueError(f"{what} must be 8-byte aligned")
    return arr


# --- CPU features -----------------------------------------------------------------------------

CPU_FEATURES = {
    "aesni": lib.SC_CPU_AESNI,
    "avx512": lib.SC_CPU_AVX512,
    "vaes": lib.SC_CPU_VAES,
    "popcnt": lib.SC_CPU_POPCNT,
    "vpopcntdq": lib.SC_CPU_VPOPCNTDQ,
    "shani": lib.SC_CPU_SHANI,
    "avx2": lib.SC_CPU_AVX2,
    "neon": lib.SC_CPU_NEON,
    "armce": lib.SC_CPU_ARMCE,
}

#: The tiers of kernel paths (csrc/sevcore.h SC_TIER_*), fastest first.
TIERS = {
    "avx512": lib.SC_TIER_AVX512,
    "avx2": lib.SC_TIER_AVX2,
    "aesni": lib.SC_TIER_AESNI,
    "armce": lib.SC_TIER_ARMCE,
    "neon": lib.SC_TIER_NEON,
    "portable": lib.SC_TIER_PORTABLE,
}
_TIER_NAMES = {v: k for k, v in TIERS.items()}


def cpu_detected():
    return lib.sc_cpu_detected()


def cpu_active():
    return lib.sc_cpu_active()


def cpu_restrict(mask):
    return lib.sc_cpu_restrict(mask)


def cpu_tier_needs(name):
    """The feature mask tier ``name`` needs, or None for a tier of another architecture."""
    rc = lib.sc_cpu_tier_needs(TIERS[name])
    if rc == -_errno.EOPNOTSUPP:
        return None
    return check(rc, "sc_cpu_tier_needs")


def cpu_tier():
    return _TIER_NAMES[lib.sc_cpu_tier()]


def tier_name(tier):
    """The name of an SC_TIER_* value."""
    return _TIER_NAMES[tier]


# --- memory encryption engine (csrc/memcrypt.h) -----------------------------------------------

MEM_PAGE_SIZE = lib.SC_MEM_PAGE_SIZE


def memcrypt_new(mode, key, tweak_table):
    """Create a C engine; ``tweak_table`` is a uint32 numpy array of 64 entries or None. C judges
    the mode, the key and whether the mode takes a table."""
    out = ffi.new("sc_memcrypt **")
    table = ffi.NULL if tweak_table is None else _from_buffer("uint32_t[]", tweak_table)
    err = _err.p
    rc = lib.sc_memcrypt_new(mode, key, len(key), table, out, err)
    if rc:
        refused(rc, "sc_memcrypt_new", err)
    return ffi.gc(out[0], lib.sc_memcrypt_free)


def memcrypt_free(eng):
    """Free (and wipe) a C engine now rather than at garbage collection."""
    ffi.release(eng)


def memcrypt_pages(eng, encrypt, data, out, spas):
    """Encrypt/decrypt ``data`` into ``out`` (a new bytearray if None; ``data`` for in place),
    page ``i`` at ``spas[i]`` (a contiguous uint64 numpy array). Returns ``out``."""
    src = _from_buffer(_CHAR_ARRAY, data)
    if out is None:
        out = bytearray(len(src))
    dst = src if out is data else _from_buffer(_CHAR_ARRAY, out, True)
    err = _err.p
    rc = lib.sc_memcrypt_pages(eng, encrypt, src, len(src), dst, len(dst),
                               _from_buffer(_U64_ARRAY, spas), len(spas), err)
    if rc:
        refused(rc, "sc_memcrypt_pages", err)
    return out


def memcrypt_run(eng, encrypt, data, out, spa):
    """As :func:`memcrypt_pages`, for pages at consecutive SPAs from ``spa``."""
    src = _from_buffer(_CHAR_ARRAY, data)
    if out is None:
        out = bytearray(len(src))
    dst = src if out is data else _from_buffer(_CHAR_ARRAY, out, True)
    if lib.sc_memcrypt_run(eng, encrypt, src, len(src), dst, len(dst), spa, ffi.NULL):
        # The one-page fast path carries no sc_err. The run's checks read only these arguments
        # (pointers, sizes, the SPA), never memory, so the same call refuses again, saying why.
        err = _err.p
        refused(lib.sc_memcrypt_run(eng, encrypt, src, len(src), dst, len(dst), spa, err),
                "sc_memcrypt_run", err)
    return out


def memcrypt_split(eng, data, out, spas, parts):
    """Check a whole batch in C, then split it into ``parts`` page-aligned slices for worker
    threads. Returns ``(out, slices)``."""
    src = memoryview(data).cast("B")
    if out is None:
        out = bytearray(len(src))
    dst = src if out is data else memoryview(out).cast("B")
    err = _err.p
    rc = lib.sc_memcrypt_check_pages(eng, _from_buffer(_CHAR_ARRAY, src), len(src),
                                     _from_buffer(_CHAR_ARRAY, dst), len(dst),
                                     _from_buffer(_U64_ARRAY, spas), len(spas), err)
    if rc:
        refused(rc, "sc_memcrypt_check_pages", err)
    npages = len(src) // MEM_PAGE_SIZE
    parts = max(1, min(parts, npages))
    bounds = [npages * i // parts for i in range(parts + 1)]
    return out, [(src[a * MEM_PAGE_SIZE:b * MEM_PAGE_SIZE],
                  dst[a * MEM_PAGE_SIZE:b * MEM_PAGE_SIZE], spas[a:b])
                 for a, b in zip(bounds[:-1], bounds[1:])]


def memcrypt_impl():
    return _TIER_NAMES[lib.sc_memcrypt_impl()]


# --- Bitmaps (csrc/bitmap.h) ------------------------------------------------------------------
#
# A bitmap crosses the seam as a ``uint64_t[]`` cdata made once by :func:`bitmap_map` over the
# caller's word array (no copy); every wrapper takes that handle plus ``nbits``, re-checks that
# the handle holds enough words, and returns the C count or raises through :func:`check`.

BITMAP_MAX_NBITS = lib.SC_BITMAP_MAX_NBITS


def bitmap_words(nbits):
    """Number of 64-bit words holding ``nbits`` bits (BITS_TO_LONGS)."""
    return (nbits + 63) // 64


def bitmap_map(words, nbits):
    """The handle the bitmap wrappers take: ``words`` (exactly ``bitmap_words(nbits)`` words)."""
    if not 0 <= nbits <= BITMAP_MAX_NBITS:
        raise ValueError(f"nbits must be in [0, {BITMAP_MAX_NBITS}], not {nbits}")
    arr = _words(words, "bitmap words", writable=True)
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


def _scan(fn, name, map_, nbits, pos, end, out):
    """A resumable C scan of [pos, end) into ``out``; returns (count written, next pos)."""
    _need(map_, nbits)
    o = _words(out, "out", writable=True)
    p = ffi.new("uint64_t *", pos)
    n = check(fn(map_, nbits, p, end, o, len(o)), name)
    return n, p[0]


def bitmap_iter_set(map_, nbits, pos, end, out):
    """Indices of set bits in [pos, end) into ``out``; returns (count written, next pos)."""
    return _scan(lib.sc_bitmap_iter_set, "sc_bitmap_iter_set", map_, nbits, pos, end, out)


def bitmap_iter_runs(map_, nbits, pos, end, starts, lengths):
    """Runs of set bits in [pos, end) into ``starts``/``lengths``; returns (count, next pos)."""
    _need(map_, nbits)
    s = _words(starts, "starts", writable=True)
    ln = _words(lengths, "lengths", writable=True)
    if len(s) != len(ln):
        raise ValueError(f"starts and lengths differ in length ({len(s)} != {len(ln)})")
    p = ffi.new("uint64_t *", pos)
    n = check(lib.sc_bitmap_iter_runs(map_, nbits, p, end, s, ln, len(s)),
              "sc_bitmap_iter_runs")
    return n, p[0]


def bitmap_harvest(map_, nbits, pos, end, out):
    """Take and clear the set bits of [pos, end) into ``out``; returns (count, next pos)."""
    return _scan(lib.sc_bitmap_harvest, "sc_bitmap_harvest", map_, nbits, pos, end, out)


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
    w = _words(words, "words")
    fold = ffi.new("uint64_t *")
    check(lib.sc_bitmap_read_pass(w, len(w), fold), "sc_bitmap_read_pass")
    return fold[0]


# --- Nested page tables (csrc/npt.h) -----------------------------------------------------------
# Scalars go to C as they are: C judges every range and flag and says which it refused (cffi
# itself raises OverflowError or TypeError for a value that is no u64, which sevcore/core/npt.py
# names). Buffers are checked here.


def npt_create(limit_bytes=None):
    """A new ``struct sc_npt *``, freed by :func:`npt_destroy` or when garbage-collected."""
    out = ffi.new("struct sc_npt **")
    check(lib.sc_npt_create(out), "sc_npt_create")
    npt = ffi.gc(out[0], lib.sc_npt_destroy)
    if limit_bytes is not None:
        check(lib.sc_npt_set_limit(npt, limit_bytes), "sc_npt_set_limit")
    return npt


def npt_destroy(npt):
    """Free the table now (the pointer must not be used again)."""
    ffi.release(npt)


def npt_map(npt, gfn, pfn, flags, npages):
    err = _err.p
    rc = lib.sc_npt_map(npt, gfn, pfn, flags, npages, err)
    return rc if rc >= 0 else refused(rc, "sc_npt_map", err)


def npt_map_pairs(npt, gfns, pfns, flags):
    """Map ``gfns[i]`` to ``pfns[i]`` (uint64 arrays of one length) run by run; all or nothing
    but for ENOMEM. Returns how many gfns were newly mapped."""
    g, p = _words(gfns, "gfns"), _words(pfns, "pfns")
    if len(g) != len(p):
        raise ValueError(f"{len(g)} gfns but {len(p)} pfns")
    err = _err.p
    rc = lib.sc_npt_map_pairs(npt, g, p, len(g), flags, err)
    return rc if rc >= 0 else refused(rc, "sc_npt_map_pairs", err)


def npt_unmap(npt, gfn, npages):
    err = _err.p
    rc = lib.sc_npt_unmap(npt, gfn, npages, err)
    return rc if rc >= 0 else refused(rc, "sc_npt_unmap", err)


def npt_zap_range(npt, gfn, npages, match_flags, exclude_flags):
    err = _err.p
    rc = lib.sc_npt_zap_range(npt, gfn, npages, match_flags, exclude_flags, err)
    return rc if rc >= 0 else refused(rc, "sc_npt_zap_range", err)


def npt_protect_range(npt, gfn, npages, clear_flags, set_flags):
    err = _err.p
    rc = lib.sc_npt_protect_range(npt, gfn, npages, clear_flags, set_flags, err)
    return rc if rc >= 0 else refused(rc, "sc_npt_protect_range", err)


def npt_lookup(npt, gfn):
    """The leaf entry for ``gfn``, or None if it is not mapped."""
    out = ffi.new("uint64_t *")
    err = _err.p
    rc = lib.sc_npt_lookup(npt, gfn, out, err)
    if rc < 0:
        refused(rc, "sc_npt_lookup", err)
    return out[0] if rc else None


def npt_lookup_batch(npt, gfns, out_pfns, out_flags=None):
    """Fill ``out_pfns`` (and ``out_flags``) for the uint64 array ``gfns``; returns the hits."""
    g = _words(gfns, "gfns")
    n = len(g)
    p = _words(out_pfns, "out_pfns", writable=True)
    f = ffi.NULL if out_flags is None else _words(out_flags, "out_flags", writable=True)
    if len(p) < n or (out_flags is not None and len(f) < n):
        raise ValueError(f"out_pfns and out_flags must hold the {n} elements of gfns")
    err = _err.p
    rc = lib.sc_npt_lookup_batch(npt, g, p, f, n, err)
    return rc if rc >= 0 else refused(rc, "sc_npt_lookup_batch", err)


def npt_next_mapped(npt, start_gfn, end_gfn, out_gfns, out_entries):
    """Fill the arrays with the mapped gfns in [start_gfn, end_gfn) and their entries, in order,
    as many as fit; returns how many."""
    g = _words(out_gfns, "out_gfns", writable=True)
    e = _words(out_entries, "out_entries", writable=True)
    err = _err.p
    rc = lib.sc_npt_next_mapped(npt, start_gfn, end_gfn, g, e, min(len(g), len(e)), err)
    return rc if rc >= 0 else refused(rc, "sc_npt_next_mapped", err)


def npt_count(npt):
    return check(lib.sc_npt_count(npt), "sc_npt_count")


def npt_stats(npt):
    """``struct sc_npt_stats`` as a dict."""
    out = ffi.new("struct sc_npt_stats *")
    check(lib.sc_npt_stats(npt, out), "sc_npt_stats")
    return {name: getattr(out, name)
            for name in ("present", "tables", "table_bytes", "reserved_bytes", "limit_bytes")}


NPT_MISS = lib.SC_NPT_MISS
NPT_GFN_BITS = lib.SC_NPT_GFN_BITS
NPT_PFN_BITS = lib.SC_NPT_PFN_BITS
NPT_PFN_SHIFT = lib.SC_NPT_PFN_SHIFT
NPT_FLAGS = {
    "PRESENT": lib.SC_NPT_PRESENT,
    "WRITABLE": lib.SC_NPT_WRITABLE,
    "ACCESSED": lib.SC_NPT_ACCESSED,
    "DIRTY": lib.SC_NPT_DIRTY,
    "PRIVATE": lib.SC_NPT_PRIVATE,
    "DIRTY_LOG": lib.SC_NPT_DIRTY_LOG,
}
NPT_FLAGS_MASK = lib.SC_NPT_FLAGS_MASK


# --- SEV transport packets (csrc/sevpkt.h) -----------------------------------------------------
# Each buffer is converted once (no copy), and its cdata length is what the size checks read:
# a one-page call is dominated by this layer, not by the C time. C judges the packet length, the
# strides and the overlaps, and a refused packet comes back as PacketAuthError/PacketFlagsError
# through REFUSALS.

PKT_HDR_SIZE = lib.SC_SEVPKT_HDR_SIZE
PKT_IV_SIZE = lib.SC_SEVPKT_IV_SIZE
PKT_MAC_SIZE = lib.SC_SEVPKT_MAC_SIZE
PKT_MEASURE_SIZE = lib.SC_SEVPKT_MEASURE_SIZE
PKT_MAX_LEN = lib.SC_SEVPKT_MAX_LEN
PKT_KEY_SIZE = 16
PKT_CTX = {"SECRET": lib.SC_SEVPKT_CTX_SECRET, "DATA": lib.SC_SEVPKT_CTX_DATA,
           "VMSA": lib.SC_SEVPKT_CTX_VMSA}
SHA256_SIZE = lib.SC_SHA256_SIZE


def _sized(buf, size, what, writable=False):
    """``buffer_ptr`` of a buffer that must hold exactly ``size`` bytes; an input that is a
    ``bytes`` object goes to C as it is (cffi passes its data pointer, the cheapest way)."""
    ptr = buf if type(buf) is bytes and not writable else buffer_ptr(buf, what, writable)
    if len(ptr) != size:
        raise ValueError(f"{what} must be {size} bytes, got {len(ptr)}")
    return ptr


def _in(buf, what):
    """An input buffer for C: a ``bytes`` object as it is, anything else through buffer_ptr."""
    return buf if type(buf) is bytes else buffer_ptr(buf, what)


def _packets(unit_bytes, unit, units, noun, total, what):
    """(count, length) of the packets: one per ``unit``-byte ``noun`` of ``units``, and ``total``
    bytes of ``what`` cut evenly. The length itself is C's to judge (sc_sevpkt_check_len)."""
    if unit_bytes % unit:
        raise ValueError(f"{units} must be whole {unit}-byte {noun}s, got {unit_bytes} bytes")
    n = unit_bytes // unit
    if not n:
        if total:
            raise ValueError(f"no {noun}s for {total} bytes of {what}")
        return 0, 16
    if total % n:
        raise ValueError(f"{what} holds {total} bytes, not {n} packets of equal length")
    return n, total // n


def _check_len(size):
    """Refuse a packet length as C does: called before an output buffer sized from it is
    blamed, so that a bad length is reported as such, as the C call reports it first."""
    err = _err.p
    rc = lib.sc_sevpkt_check_len(size, err)
    if rc:
        refused(rc, "sc_sevpkt_check_len", err)


def _session(tek, tik, measure):
    """The keys and the optional MEASURE of a batch, sizes checked."""
    return (_sized(tek, PKT_KEY_SIZE, "tek"), _sized(tik, PKT_KEY_SIZE, "tik"),
            ffi.NULL if measure is None else _sized(measure, PKT_MEASURE_SIZE, "measure"))


def sha256(data):
    src = _in(data, "data")
    out = ffi.new("uint8_t[]", SHA256_SIZE)
    check(lib.sc_sha256(src, len(src), out), "sc_sha256")
    return bytes(ffi.buffer(out))


def hmac_sha256(key, data):
    k, src = _in(key, "key"), _in(data, "data")
    out = ffi.new("uint8_t[]", SHA256_SIZE)
    check(lib.sc_hmac_sha256(k, len(k), src, len(src), out), "sc_hmac_sha256")
    return bytes(ffi.buffer(out))


def aes128_ctr(key, iv, data, out):
    """CTR-crypt ``data`` into ``out`` (a new bytearray if None; ``data`` for in place).
    Returns ``out``."""
    k, i = _sized(key, PKT_KEY_SIZE, "key"), _sized(iv, PKT_IV_SIZE, "iv")
    src = buffer_ptr(data, "data", True) if out is data else _in(data, "data")
    if out is None:
        out = bytearray(len(src))
    dst = src if out is data else _sized(out, len(src), "out", True)
    err = _err.p
    rc = lib.sc_aes128_ctr(k, i, src, len(src), dst, err)
    if rc:
        refused(rc, "sc_aes128_ctr", err)
    return out


def _strided_rows(buf):
    """``(rows, row length)`` of a 2-D array whose rows are not back to back (a column of a
    table, such as a stream record's headers), else None: such rows go to C as a pointer and a
    stride instead of one buffer."""
    if isinstance(buf, np.ndarray) and buf.ndim == 2 and not buf.flags.c_contiguous:
        return buf.shape
    return None


def _rows(buf, n, size, what, writable=False):
    """``(pointer, stride)`` of ``n`` rows of ``size`` bytes: strided rows of a uint8 array in
    place (each row contiguous, rows at least ``size`` apart), or one buffer of ``n * size``."""
    if _strided_rows(buf) is None:
        return _sized(buf, n * size, what, writable), size
    if (buf.dtype != np.uint8 or buf.shape != (n, size) or buf.strides[1] != 1
            or buf.strides[0] < size):
        raise ValueError(f"{what} must be {n} rows of {size} bytes, each contiguous and at least "
                         f"{size} bytes apart, not {buf.dtype} {buf.shape} strides {buf.strides}")
    if writable and not buf.flags.writeable:
        raise TypeError(f"{what} must be a writable buffer")
    return ffi.cast("uint8_t *", buf.__array_interface__["data"][0]), buf.strides[0]


def _nbytes(buf, what):
    shape = _strided_rows(buf)
    return shape[0] * shape[1] if shape is not None else len(_in(buf, what))


def sevpkt_seal(tek, tik, ctx, measure, pt, ivs, hdrs, ct):
    """Seal one packet per 16-byte IV of ``ivs``, cut evenly from ``pt``, into ``hdrs`` and
    ``ct`` (new bytearrays where None; ``ct`` may be ``pt``; either may be strided rows). Sizes
    are checked (ValueError) before C runs. Returns ``(hdrs, ct)``."""
    k1, k2, m = _session(tek, tik, measure)
    src = buffer_ptr(pt, "plaintext", True) if ct is pt else _in(pt, "plaintext")
    iv = _in(ivs, "ivs")
    n, size = _packets(len(iv), PKT_IV_SIZE, "ivs", "IV", len(src), "plaintext")
    if hdrs is None:
        hdrs = bytearray(n * PKT_HDR_SIZE)
    if ct is None:
        ct = bytearray(len(src))
    try:
        ph, hs = _rows(hdrs, n, PKT_HDR_SIZE, "headers out", True)
        pc, cs = (src, size) if ct is pt else _rows(ct, n, size, "ciphertext out", True)
    except ValueError:
        _check_len(size)
        raise
    err = _err.p
    rc = lib.sc_sevpkt_seal_rows(k1, k2, ctx, m, src, size, n, iv, ph, hs, pc, cs, err)
    if rc:
        refused(rc, "sc_sevpkt_seal", err)
    return hdrs, ct


def sevpkt_open(tek, tik, ctx, measure, hdrs, ct, pt):
    """Open one packet per 52-byte header of ``hdrs`` from ``ct`` into ``pt`` (a new bytearray
    if None; may be ``ct``); headers and ciphertext may be strided rows. Sizes are checked
    (ValueError) before C runs; a refused packet raises PacketAuthError or PacketFlagsError with
    its index. Returns ``pt``."""
    k1, k2, m = _session(tek, tik, measure)
    n, size = _packets(_nbytes(hdrs, "headers"), PKT_HDR_SIZE, "headers", "header",
                       _nbytes(ct, "ciphertext"), "ciphertext")
    try:
        ph, hs = _rows(hdrs, n, PKT_HDR_SIZE, "headers")
        src, cs = _rows(ct, n, size, "ciphertext", pt is ct)
        if pt is None:
            pt = bytearray(n * size)
        dst = src if pt is ct else _sized(pt, n * size, "out", True)
    except ValueError:
        _check_len(size)
        raise
    err = _err.p
    rc = lib.sc_sevpkt_open_rows(k1, k2, ctx, m, ph, hs, src, cs, size, n, dst, err)
    if rc:
        refused(rc, "sc_sevpkt_open", err)
    return pt


def sha256_impl():
    return {lib.SC_SHA256_IMPL_PORTABLE: "portable",
            lib.SC_SHA256_IMPL_SHANI: "shani"}[lib.sc_sha256_impl()]


def aes128_ctr_impl():
    return _TIER_NAMES[lib.sc_aes128_ctr_impl()]


# --- the SNP launch digest (csrc/snp_ld.h) ----------------------------------------------------------

def sha384(data):
    src = _in(data, "data")
    out = ffi.new("uint8_t[]", 48)
    lib.sc_sha384(src, len(src), out)
    return bytes(ffi.buffer(out))


def sha384_pages(frames, pfns):
    """SHA-384 of each 4 KiB frame ``pfns[i]`` of the byte buffer ``frames``, the digests
    concatenated (48 bytes each)."""
    p = _words(pfns, "pfns")
    src = buffer_ptr(frames, "frames")
    out = ffi.new("uint8_t[]", 48 * len(p))
    err = _err.p
    rc = lib.sc_sha384_pages(src, len(src) // 4096, p, len(p), out, err)
    if rc < 0:
        refused(rc, "sc_sha384_pages", err)
    return bytes(ffi.buffer(out))


def sha384_pages_impl():
    return _TIER_NAMES[lib.sc_sha384_pages_impl()]


def snp_ld_extend(ld, contents, tails):
    """The launch digest ``ld`` (48 bytes) extended by one PAGE_INFO per 16-byte record of
    ``tails``, with the 48-byte ``contents`` of each page (None: zero for every page)."""
    if len(ld) != 48:
        raise ValueError(f"a launch digest is 48 bytes, got {len(ld)}")
    n, rest = divmod(len(tails), 16)
    if rest or (contents is not None and len(contents) != 48 * n):
        raise ValueError(f"{len(tails)} bytes of PAGE_INFO tails and "
                         f"{None if contents is None else len(contents)} of contents do not "
                         f"make whole pages")
    out = ffi.new("uint8_t[48]", bytes(ld))
    err = _err.p
    rc = lib.sc_snp_ld_extend(out, ffi.NULL if contents is None else _in(contents, "contents"),
                              _in(tails, "tails"), n, err)
    if rc < 0:
        refused(rc, "sc_snp_ld_extend", err)
    return bytes(ffi.buffer(out))


# --- CRC-32 (csrc/crc32.h) ------------------------------------------------------------------------

def crc32(data, value):
    """zlib's crc32 of any contiguous buffer, continued from ``value``."""
    src = _in(data, "data")
    return check(lib.sc_crc32(value, src, len(src)), "sc_crc32")


def crc32_impl():
    return _TIER_NAMES[lib.sc_crc32_impl()]


# --- Host memory (csrc/hostmem.h) ------------------------------------------------------------------

def populate_write(buf, offset, length):
    """Fault in ``length`` bytes of the writable buffer ``buf`` from ``offset`` (page aligned),
    contents unchanged (MADV_POPULATE_WRITE). OSError(EINVAL) where the kernel lacks it."""
    if offset < 0 or length < 0 or offset + length > len(buf):
        raise ValueError(f"range [{offset}, {offset + length}) outside a {len(buf)}-byte buffer")
    p = ffi.cast("uint8_t *", _from_buffer(_CHAR_ARRAY, buf, True))
    return check(lib.sc_populate_write(p + offset, length), "sc_populate_write")


# --- Guest page access (csrc/guest.h) -----------------------------------------------------------
# C checks every argument (sizes included: each buffer goes with its length) and says which one
# it refused; these wrappers only make typed views of the caller's buffers, without copying. A
# gfn list is passed whole: its length is the page count.

GUEST_OPS = {name: getattr(lib, "SC_GUEST_OP_" + name)
             for name in ("READ", "WRITE", "FILL", "PATTERN", "CHECK", "STAMP", "DIGEST")}
GUEST_PAGE_SIZE = lib.SC_GUEST_PAGE_SIZE


def guest_ctx(frames):
    """A zeroed ``struct sc_guest_ctx`` over host memory ``frames`` (a writable buffer). Returns
    ``(ctx, frames_view)``; the view must outlive every call made with ``ctx``."""
    ctx = ffi.new("struct sc_guest_ctx *")
    view = buffer_ptr(frames, "frames", writable=True)
    ctx.frames = ffi.cast("uint8_t *", view)
    ctx.frames_size = len(view)
    return ctx, view


def guest_slots(slots):
    """A ``struct sc_guest_slot[]`` for ``(base_gfn, npages, words)`` triples, or quadruples
    with the slot's ring id ``(as_id << 16) | id`` last; returns ``(array, views)``, the views to
    be kept alive with the array. ``words`` must hold the slot's ``bitmap_words(npages)`` words
    (C cannot see a bitmap's length), or be None for a slot logged only to a dirty ring."""
    arr = ffi.new("struct sc_guest_slot[]", len(slots))
    views = []
    for i, (base_gfn, npages, words, *rest) in enumerate(slots):
        if words is None:
            view = ffi.NULL
        else:
            view = _words(words, f"slot {i} dirty bitmap", writable=True)
            if npages < 0 or len(view) < bitmap_words(npages):
                raise ValueError(f"slot {i}: {len(view)} bitmap words cannot hold {npages} pages")
            views.append(view)
        arr[i].base_gfn, arr[i].npages, arr[i].dirty_bitmap = base_gfn, npages, view
        arr[i].id = rest[0] if rest else 0
    return arr, views


# --- The dirty ring (csrc/dirty_ring.h) --------------------------------------------------------

#: struct kvm_dirty_gfn as numpy sees it.
DIRTY_GFN_DTYPE = [("flags", "<u4"), ("slot", "<u4"), ("offset", "<u8")]
DIRTY_GFN_SIZE = ffi.sizeof("struct sc_dirty_gfn")


def dirty_ring(mem, size, soft_limit):
    """A ``struct sc_dirty_ring`` over ``mem`` (a writable buffer of ``size`` 16-byte entries),
    indices at 0; returns ``(ring, view)``, the view to be kept alive with the ring."""
    view = buffer_ptr(mem, "ring memory", writable=True)
    if len(view) < size * DIRTY_GFN_SIZE:
        raise ValueError(f"{len(view)} bytes cannot hold {size} ring entries")
    ring = ffi.new("struct sc_dirty_ring *")
    ring.gfns = ffi.cast("struct sc_dirty_gfn *", view)
    ring.size, ring.soft_limit = size, soft_limit
    return ring, view


def dirty_ring_collect(mem, size, fetch_index, cap):
    """``sc_dirty_ring_collect`` over the entries in ``mem`` from ``fetch_index[0]`` (a uint32
    array of one, advanced); returns ``(slots, offsets)`` as uint32 and uint64 arrays."""
    view = buffer_ptr(mem, "ring memory", writable=True)
    if len(view) < size * DIRTY_GFN_SIZE:
        raise ValueError(f"{len(view)} bytes cannot hold {size} ring entries")
    slots = np.empty(cap, np.uint32)
    offsets = np.empty(cap, np.uint64)
    idx = ffi.from_buffer("uint32_t[]", fetch_index, require_writable=True)
    rc = lib.sc_dirty_ring_collect(ffi.cast("struct sc_dirty_gfn *", view), size, idx,
                                   ffi.from_buffer("uint32_t[]", slots, True),
                                   ffi.from_buffer("uint64_t[]", offsets, True), cap, _err.p)
    if rc < 0:
        refused(rc, "sc_dirty_ring_collect")
    return slots[:rc], offsets[:rc]


def dirty_ring_reset(ring, npt, slots, nslots):
    """``sc_dirty_ring_reset``: the entries freed."""
    rc = lib.sc_dirty_ring_reset(ring, npt, slots if nslots else ffi.NULL, nslots, _err.p)
    if rc < 0:
        refused(rc, "sc_dirty_ring_reset")
    return rc


_GUEST_OP_NAMES = {v: k for k, v in GUEST_OPS.items()}


def guest_pages(ctx, op, gfns, gfn0, n, arg, buf, out):
    """``sc_guest_pages`` on ``gfns`` (a uint64 buffer: all of it) or, if None, ``n`` pages from
    ``gfn0``. ``buf`` and ``out`` may be None. Returns the pages completed; a refusal raises
    through REFUSALS."""
    if gfns is not None:
        g = _words(gfns, "gfns")
        n = len(g)
    else:
        g = ffi.NULL
    if buf is None:
        b, bsize = ffi.NULL, 0
    else:
        b = buffer_ptr(buf, "buf", writable=op == lib.SC_GUEST_OP_READ)
        bsize = len(b)
    if out is None:
        o, olen = ffi.NULL, 0
    else:
        o = _words(out, "out", writable=True)
        olen = len(o)
    err = _err.p
    rc = lib.sc_guest_pages(ctx, op, g, gfn0, n, arg, b, bsize, o, olen, err)
    if rc < 0:
        refused(rc, f"sc_guest_pages({_GUEST_OP_NAMES.get(op, op)})", err)
    return rc


def guest_pattern(seed, gfn):
    """The PATTERN page of ``gfn`` under ``seed`` as bytes."""
    page = bytearray(GUEST_PAGE_SIZE)
    lib.sc_guest_pattern(seed, gfn, _from_buffer(_CHAR_ARRAY, page, True))
    return bytes(page)


def guest_digest(page):
    """The DIGEST (XXH3-64) of one 4096-byte page."""
    p = buffer_ptr(page, "page")
    if len(p) != GUEST_PAGE_SIZE:
        raise ValueError(f"a page is {GUEST_PAGE_SIZE} bytes, got {len(p)}")
    return lib.sc_guest_digest(p)


def bitmap_impl():
    impl = lib.sc_bitmap_impl()
    return "popcnt" if impl == lib.SC_BITMAP_IMPL_POPCNT else _TIER_NAMES[impl]


def guest_impl():
    return _TIER_NAMES[lib.sc_guest_impl()]


# --- the RMP (csrc/rmp.h) ------------------------------------------------------------------------
# An RMP instruction's status (RMPUPDATE/PVALIDATE FAIL_*) is a result, returned as it is; only a
# refusal (a pfn past the table, an RMP fault) is an exception, through REFUSALS.

RMP_ENTRY_FIELDS = ("assigned", "pagesize", "immutable", "validated", "vmsa", "asid", "gpa",
                    "vmpl_perms")


def rmp_create(nframes):
    """A new ``struct sc_rmp *`` for ``nframes`` frames, freed when garbage-collected."""
    rmp = lib.sc_rmp_create(nframes)
    if rmp == ffi.NULL:
        raise MemoryError(f"sc_rmp_create({nframes}) failed")
    return ffi.gc(rmp, lib.sc_rmp_destroy)


def rmp_read(rmp, pfn):
    """The entry of ``pfn`` as a tuple in :data:`RMP_ENTRY_FIELDS` order."""
    out = ffi.new("struct sc_rmp_entry *")
    err = _err.p
    rc = lib.sc_rmp_read(rmp, pfn, out, err)
    if rc < 0:
        refused(rc, "sc_rmp_read", err)
    return tuple(getattr(out, f) for f in RMP_ENTRY_FIELDS)


def rmp_update(rmp, pfn, assigned, pagesize, immutable, asid, gpa):
    st = ffi.new("struct sc_rmp_entry *", {"assigned": assigned, "pagesize": pagesize,
                                           "immutable": immutable, "asid": asid, "gpa": gpa})
    err = _err.p
    rc = lib.sc_rmp_update(rmp, pfn, st, err)
    return rc if rc >= 0 else refused(rc, "sc_rmp_update", err)


def rmp_fw_store(rmp, pfn, entry):
    """The firmware's unchecked write of an entry (a tuple in RMP_ENTRY_FIELDS order)."""
    st = ffi.new("struct sc_rmp_entry *", dict(zip(RMP_ENTRY_FIELDS, entry)))
    err = _err.p
    rc = lib.sc_rmp_fw_store(rmp, pfn, st, err)
    return rc if rc >= 0 else refused(rc, "sc_rmp_fw_store", err)


def rmp_psmash(rmp, pfn):
    err = _err.p
    rc = lib.sc_rmp_psmash(rmp, pfn, err)
    return rc if rc >= 0 else refused(rc, "sc_rmp_psmash", err)


def rmp_make_private_batch(rmp, pfns, gfns, asid, immutable):
    """(status, done): RMPUPDATE of each pfn to ``asid`` at ``gfns[i]``, up to the first
    refusal."""
    p, g = _words(pfns, "pfns"), _words(gfns, "gfns")
    if len(p) != len(g):
        raise ValueError(f"{len(p)} pfns but {len(g)} gfns")
    done = ffi.new("size_t *")
    err = _err.p
    rc = lib.sc_rmp_make_private_batch(rmp, p, g, len(p), asid, immutable, done, err)
    if rc < 0:
        refused(rc, "sc_rmp_make_private_batch", err)
    return rc, done[0]


def rmp_make_shared_batch(rmp, pfns):
    """(status, done): RMPUPDATE of each pfn back to the hypervisor, up to the first refusal."""
    p = _words(pfns, "pfns")
    done = ffi.new("size_t *")
    err = _err.p
    rc = lib.sc_rmp_make_shared_batch(rmp, p, len(p), done, err)
    if rc < 0:
        refused(rc, "sc_rmp_make_shared_batch", err)
    return rc, done[0]


def rmp_assigned_mask(rmp, pfns):
    """A bool array: which of ``pfns`` have an assigned entry."""
    p = _words(pfns, "pfns")
    out = np.empty(len(p), np.uint8)
    err = _err.p
    rc = lib.sc_rmp_assigned_mask(rmp, p, len(p), ffi.from_buffer("uint8_t[]", out, True), err)
    if rc < 0:
        refused(rc, "sc_rmp_assigned_mask", err)
    return out.view(bool)


def rmp_pvalidate_batch(rmp, pfns, gpas, asid, validate):
    """(status, cf, done) of PVALIDATE over the pages in order; an RMP fault is OSError(EFAULT)
    with ``index`` (the page) set."""
    p, g = _words(pfns, "pfns"), _words(gpas, "gpas")
    if len(p) != len(g):
        raise ValueError(f"{len(p)} pfns but {len(g)} gpas")
    done, cf = ffi.new("size_t *"), ffi.new("int *")
    err = _err.p
    rc = lib.sc_rmp_pvalidate_batch(rmp, p, g, len(p), asid, validate, done, cf, err)
    if rc < 0:
        _refused_at(rc, "sc_rmp_pvalidate_batch", err)
    return rc, cf[0], done[0]


def rmp_adjust_batch(rmp, pfns, gpas, asid, target_vmpl, perms):
    """(status, done) of RMPADJUST over the pages in order; an RMP fault as rmp_pvalidate_batch."""
    p, g = _words(pfns, "pfns"), _words(gpas, "gpas")
    if len(p) != len(g):
        raise ValueError(f"{len(p)} pfns but {len(g)} gpas")
    done = ffi.new("size_t *")
    err = _err.p
    rc = lib.sc_rmp_adjust_batch(rmp, p, g, len(p), asid, target_vmpl, perms, done, err)
    if rc < 0:
        _refused_at(rc, "sc_rmp_adjust_batch", err)
    return rc, done[0]


def _refused_at(rc, what, err):
    """refused(), the exception carrying the batch item C named in ``index``."""
    index = err.index
    try:
        refused(rc, what, err)
    except OSError as e:
        e.index = index
        raise


def rmp_preguest_prefix(rmp, pfns, asid):
    p = _words(pfns, "pfns")
    err = _err.p
    rc = lib.sc_rmp_preguest_prefix(rmp, p, len(p), asid, err)
    return rc if rc >= 0 else refused(rc, "sc_rmp_preguest_prefix", err)


def rmp_gpas(rmp, pfns, out):
    p = _words(pfns, "pfns")
    o = _words(out, "out", writable=True)
    if len(o) < len(p):
        raise ValueError(f"out must hold {len(p)} words")
    err = _err.p
    rc = lib.sc_rmp_gpas(rmp, p, len(p), o, err)
    return rc if rc >= 0 else refused(rc, "sc_rmp_gpas", err)


def rmp_fw_validate_batch(rmp, pfns, asid, vmsa):
    p = _words(pfns, "pfns")
    err = _err.p
    rc = lib.sc_rmp_fw_validate_batch(rmp, p, len(p), asid, vmsa, err)
    return rc if rc >= 0 else refused(rc, "sc_rmp_fw_validate_batch", err)



def rmp_pvalidate(rmp, pfn, gpa, asid, pagesize, validate):
    """(status, cf) of PVALIDATE; an RMP fault is OSError(EFAULT)."""
    cf = ffi.new("int *")
    err = _err.p
    rc = lib.sc_rmp_pvalidate(rmp, pfn, gpa, asid, pagesize, validate, cf, err)
    if rc < 0:
        refused(rc, "sc_rmp_pvalidate", err)
    return rc, cf[0]


def rmp_adjust(rmp, pfn, gpa, asid, target_vmpl, perms, vmsa):
    err = _err.p
    rc = lib.sc_rmp_adjust(rmp, pfn, gpa, asid, target_vmpl, perms, vmsa, err)
    return rc if rc >= 0 else refused(rc, "sc_rmp_adjust", err)


def rmp_first_denied(rmp, pfns, asid):
    p = _words(pfns, "pfns")
    err = _err.p
    rc = lib.sc_rmp_first_denied(rmp, p, len(p), asid, err)
    return rc if rc >= 0 else refused(rc, "sc_rmp_first_denied", err)


def rmp_next_assigned(rmp, pfn, n):
    return lib.sc_rmp_next_assigned(rmp, pfn, n)


def rmp_validated(rmp, pfn, asid):
    """Whether a private access of ``asid`` to frame ``pfn`` passes the validation check."""
    return bool(lib.sc_rmp_validated(rmp, pfn, asid))


def rmp_stats(rmp):
    """{"assigned", "leaves", "bytes"} of the table."""
    a, l, b = ffi.new("uint64_t *"), ffi.new("uint64_t *"), ffi.new("uint64_t *")
    lib.sc_rmp_stats(rmp, a, l, b)
    return {"assigned": a[0], "leaves": l[0], "bytes": b[0]}
