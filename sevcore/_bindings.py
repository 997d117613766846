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


# --- Nested page tables (csrc/npt.h) -----------------------------------------------------------
# Raw calls: scalars go to C unchecked (C answers -EINVAL, which negative tests rely on); buffers
# are checked here. Argument validation with friendly errors lives in sevcore/npt.py.

_U64 = "uint64_t[]"


def _u64_ptr(arr, what, n, writable=False):
    """A ``uint64_t *`` over a C-contiguous uint64 numpy array of at least ``n`` elements."""
    dt = getattr(arr, "dtype", None)
    if dt is None or dt.kind != "u" or dt.itemsize != 8 or not dt.isnative:
        raise TypeError(f"{what} must be a numpy uint64 array")
    if not arr.flags.c_contiguous:
        raise ValueError(f"{what} must be C-contiguous")
    if arr.size < n:
        raise ValueError(f"{what} holds {arr.size} elements, needs {n}")
    if n == 0:
        return ffi.NULL
    return ffi.from_buffer(_U64, arr, require_writable=writable)


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
    return check(lib.sc_npt_map(npt, gfn, pfn, flags, npages), "sc_npt_map")


def npt_unmap(npt, gfn, npages):
    return check(lib.sc_npt_unmap(npt, gfn, npages), "sc_npt_unmap")


def npt_zap_range(npt, gfn, npages, match_flags, exclude_flags):
    return check(lib.sc_npt_zap_range(npt, gfn, npages, match_flags, exclude_flags),
                 "sc_npt_zap_range")


def npt_protect_range(npt, gfn, npages, clear_flags, set_flags):
    return check(lib.sc_npt_protect_range(npt, gfn, npages, clear_flags, set_flags),
                 "sc_npt_protect_range")


def npt_lookup(npt, gfn):
    """The leaf entry for ``gfn``, or None if it is not mapped."""
    out = ffi.new("uint64_t *")
    present = check(lib.sc_npt_lookup(npt, gfn, out), "sc_npt_lookup")
    return out[0] if present else None


def npt_lookup_batch(npt, gfns, out_pfns, out_flags=None):
    """Fill ``out_pfns`` (and ``out_flags``) for the uint64 array ``gfns``; returns the hits."""
    n = gfns.size
    g = _u64_ptr(gfns, "gfns", n)
    p = _u64_ptr(out_pfns, "out_pfns", n, writable=True)
    f = ffi.NULL if out_flags is None else _u64_ptr(out_flags, "out_flags", n, writable=True)
    return check(lib.sc_npt_lookup_batch(npt, g, p, f, n), "sc_npt_lookup_batch")


def npt_next_mapped(npt, start_gfn, end_gfn, out_gfns, out_entries):
    """Fill the arrays with the mapped gfns in [start_gfn, end_gfn) and their entries, in order,
    as many as fit; returns how many."""
    cap = min(out_gfns.size, out_entries.size)
    g = _u64_ptr(out_gfns, "out_gfns", cap, writable=True)
    e = _u64_ptr(out_entries, "out_entries", cap, writable=True)
    return check(lib.sc_npt_next_mapped(npt, start_gfn, end_gfn, g, e, cap), "sc_npt_next_mapped")


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
