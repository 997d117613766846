"""A short demonstration of the memory encryption engine: python -m sevcore.demo [MiB]

Encrypts guest pages at scattered system physical addresses with both engines, checks that they
decrypt, shows that ciphertext moved to another address decrypts to garbage, and prints the
throughput on this machine with the C path in use.
"""
import argparse
import os
import time

import numpy as np

from sevcore.core import cpu
from sevcore.core.memcrypt import AES128_XEX, AES256_XTS, PAGE_SIZE, MemoryEngine, implementation


def _rate(fn, npages, repeat=5):
    best = float("inf")
    for _ in range(repeat):
        t = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t)
    return npages / best


def main(argv=None):
    ap = argparse.ArgumentParser(prog="python -m sevcore.demo", description=__doc__.split("\n")[0])
    ap.add_argument("mib", nargs="?", type=int, default=64, help="guest memory to encrypt (MiB)")
    args = ap.parse_args(argv)
    if args.mib < 1:
        ap.error("mib must be at least 1")
    npages = args.mib * 1024 * 1024 // PAGE_SIZE
    rng = np.random.default_rng(0)
    data = np.frombuffer(rng.bytes(npages * PAGE_SIZE), np.uint8).copy()
    spas = (rng.permutation(npages).astype(np.uint64) + np.uint64(1 << 20)) << np.uint64(12)
    print(f"sevcore memory engine: {args.mib} MiB = {npages} pages at scattered SPAs")
    print(f"CPU features detected: {', '.join(sorted(cpu.detected())) or 'none'}; "
          f"engine path: {implementation()}\n")
    print(f"{'engine':<12} {'encrypt':>16} {'decrypt':>16} {'2 threads':>16}  checks")
    for mode, name, key in ((AES128_XEX, "AES128_XEX", os.urandom(16)),
                            (AES256_XTS, "AES256_XTS", os.urandom(64))):
        eng = MemoryEngine(mode, key)
        ct = np.empty_like(data)
        pt = np.empty_like(data)
        enc = _rate(lambda: eng.encrypt_pages(data, spas, out=ct), npages)
        dec = _rate(lambda: eng.decrypt_pages(ct, spas, out=pt), npages)
        two = _rate(lambda: eng.encrypt_pages(data, spas, out=ct, threads=2), npages)
        roundtrip = np.array_equal(pt, data)
        moved = bytes(eng.decrypt_page(ct[:PAGE_SIZE], int(spas[0]) + PAGE_SIZE))
        garbage = moved != data[:PAGE_SIZE].tobytes()
        print(f"{name:<12} {enc / 1e6:>9.2f} Mpage/s {dec / 1e6:>9.2f} Mpage/s "
              f"{two / 1e6:>9.2f} Mpage/s  round trip {'ok' if roundtrip else 'FAILED'}, "
              f"moved page {'garbage' if garbage else 'NOT garbage'}")
        if not (roundtrip and garbage):
            return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
