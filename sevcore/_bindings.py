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
