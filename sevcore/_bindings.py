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


_CHAR_ARRAY = ffi.typeof("char[]")
_U64_ARRAY = ffi.typeof("uint64_t[]")


def buffer_ptr(buf, what, writable=False):
    """A ``char[]`` over any buffer-protocol object, without copying it."""
    try:
        return ffi.from_buffer(_CHAR_ARRAY, buf, writable)
    except TypeError as exc:
        kind = "a writable buffer" if writable else "a buffer"
        raise TypeError(f"{what} must be {kind} (bytes, bytearray, memoryview, numpy array), "
                        f"not {type(buf).__name__}") from exc


def overlaps_buffers(a, b):
    """True if buffers ``a`` and ``b`` share memory without being the same region."""
    pa, pb = ffi.from_buffer(_CHAR_ARRAY, a), ffi.from_buffer(_CHAR_ARRAY, b)
    ia, ib = int(ffi.cast("uintptr_t", pa)), int(ffi.cast("uintptr_t", pb))
    if ia == ib and len(pa) == len(pb):
        return False
    return ia < ib + len(pb) and ib < ia + len(pa)


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


# --- memory encryption engine (csrc/memcrypt.h) -----------------------------------------------

MEM_PAGE_SIZE = lib.SC_MEM_PAGE_SIZE


def memcrypt_new(mode, key, tweak_table):
    """Create a C engine; ``tweak_table`` is a uint32 numpy array of 64 entries or None."""
    out = ffi.new("sc_memcrypt **")
    table = ffi.NULL if tweak_table is None else ffi.from_buffer("uint32_t[]", tweak_table)
    check(lib.sc_memcrypt_new(mode, key, len(key), table, out), "sc_memcrypt_new")
    return ffi.gc(out[0], lib.sc_memcrypt_free)


def memcrypt_free(eng):
    """Free (and wipe) a C engine now rather than at garbage collection."""
    ffi.release(eng)


def memcrypt_pages(eng, encrypt, data, out, spas):
    """Encrypt/decrypt ``data`` into ``out`` (a new bytearray if None; ``data`` for in place),
    page ``i`` at ``spas[i]`` (contiguous uint64 numpy array). Returns ``(rc, out)``."""
    src = ffi.from_buffer(_CHAR_ARRAY, data)
    if out is None:
        out = bytearray(len(src))
    dst = src if out is data else ffi.from_buffer(_CHAR_ARRAY, out, True)
    return lib.sc_memcrypt_pages(eng, encrypt, src, len(src), dst, len(dst),
                                 ffi.from_buffer(_U64_ARRAY, spas), len(spas)), out


def memcrypt_run(eng, encrypt, data, out, spa):
    """As :func:`memcrypt_pages`, for pages at consecutive SPAs from ``spa``."""
    src = ffi.from_buffer(_CHAR_ARRAY, data)
    if out is None:
        out = bytearray(len(src))
    dst = src if out is data else ffi.from_buffer(_CHAR_ARRAY, out, True)
    return lib.sc_memcrypt_run(eng, encrypt, src, len(src), dst, len(dst), spa), out


def memcrypt_split(data, out, npages, parts):
    """Split ``data``/``out`` into ``parts`` page-aligned memoryview slices for worker threads."""
    src = memoryview(data).cast("B")
    dst = src if out is data else memoryview(out).cast("B")
    bounds = [npages * i // parts for i in range(parts + 1)]
    return [(a, b, src[a * MEM_PAGE_SIZE:b * MEM_PAGE_SIZE], dst[a * MEM_PAGE_SIZE:b * MEM_PAGE_SIZE])
            for a, b in zip(bounds[:-1], bounds[1:])]


def memcrypt_impl():
    return {lib.SC_MEM_IMPL_PORTABLE: "portable", lib.SC_MEM_IMPL_AESNI: "aesni",
            lib.SC_MEM_IMPL_VAES: "vaes"}[lib.sc_memcrypt_impl()]
