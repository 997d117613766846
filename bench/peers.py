"""The C peers and hardware limits of bench/peers.c, built once per run with the system C
compiler against the system OpenSSL (libcrypto), and called through ctypes.

``library()`` is None (and ``why()`` says why) where there is no compiler, no OpenSSL headers
or no x86 AES; the benchmarks that need it then skip.
"""
import ctypes
import functools
import hashlib
import pathlib
import shutil
import subprocess
import tempfile
import time

from sevcore.core import cpu

SOURCE = pathlib.Path(__file__).resolve().parent / "peers.c"
_why = []


@functools.cache
def library():
    """The built peers library, or None."""
    cc = shutil.which("cc") or shutil.which("gcc")
    if cc is None:
        _why.append("no C compiler")
        return None
    src = SOURCE.read_bytes()
    out = pathlib.Path(tempfile.gettempdir()) / \
        f"sevcore-bench-peers-{hashlib.sha256(src).hexdigest()[:12]}.so"
    if not out.exists():
        tmp = out.with_suffix(".tmp.so")
        res = subprocess.run([cc, "-O2", "-shared", "-fPIC", str(SOURCE), "-o", str(tmp),
                              "-lcrypto"], capture_output=True, text=True)
        if res.returncode:
            _why.append(f"bench/peers.c does not build: {res.stderr.strip()[-300:]}")
            return None
        tmp.replace(out)
    lib = ctypes.CDLL(str(out))
    lib.sc_bench_aes_rounds.restype = ctypes.c_uint64
    lib.sc_bench_aes_rounds.argtypes = [ctypes.c_int, ctypes.c_uint64,
                                        ctypes.POINTER(ctypes.c_uint64)]
    lib.sc_bench_evp_xts.restype = ctypes.c_int
    lib.sc_bench_evp_xts.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_char_p,
                                     ctypes.c_void_p, ctypes.c_void_p, ctypes.c_void_p,
                                     ctypes.c_size_t]
    return lib


def why():
    """Why library() is None."""
    return _why[-1] if _why else "bench/peers.c unavailable"


def aes_block_rounds_per_ns(width, runs=5, iters=2_000_000):
    """The AES-unit limit on ``width``-bit registers: AES block-rounds per ns of independent
    AESENC chains, the best of ``runs`` (the first runs warm the clock; a shared machine only
    ever makes a run slower). None where the CPU lacks the width."""
    lib = library()
    needs = {128: {"aesni"}, 256: {"avx2", "vaes"}, 512: {"avx512", "vaes"}}[width]
    if lib is None or not needs <= cpu.detected():
        return None
    sink = ctypes.c_uint64()
    best = 0.0
    for _ in range(runs):
        t = time.perf_counter()
        done = lib.sc_bench_aes_rounds(width, iters, ctypes.byref(sink))
        best = max(best, done / (time.perf_counter() - t) / 1e9)
    return best or None


def evp_xts(bits, encrypt, key, src, dst, spas):
    """OpenSSL EVP aes-<bits>-xts over the pages of src (numpy arrays), page i with tweak
    spas[i] >> 12, into dst."""
    rc = library().sc_bench_evp_xts(bits, int(encrypt), key, src.ctypes.data, dst.ctypes.data,
                                    spas.ctypes.data, len(spas))
    if rc:
        raise RuntimeError("OpenSSL EVP aes-xts failed")
