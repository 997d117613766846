"""Transport-packet crypto (SEND/RECEIVE_UPDATE_DATA) throughput against its peers, same run.

Peers: hashlib's HMAC-SHA256 over the same pages (one `hmac.new(...).digest()` per page, which
is only the MAC half of a packet), hashlib SHA-256 in bulk over the whole batch (OpenSSL's own
SHA-NI rate, no per-page cost), and the pure-Python reference (pycryptodome AES-CTR + hmac per
page, what Python code would do). Target (issue: transport packets): seal and open each
>= 250 k pages/s on one core, and within 1.5x of hashlib's per-page HMAC-SHA256. Seal and open
run on each tier the CPU has; targets (issue: cpu tiers): >= 2x hashlib HMAC-SHA256 per page on
avx2, >= 1.5x on aesni, for 1024 pages.
"""
import hashlib
import hmac

import numpy as np
import pytest

from benchutil import on_tier, per_item, tier_params
from sevcore.core import sevpkt
from sevcore._reference import sevpkt as ref

PAGE = 4096
HOT = 1024          # 4 MiB: stays in L2/L3
DRAM = 16384        # 64 MiB: streams from DRAM
TEK, TIK = bytes(range(16)), bytes(range(16, 32))
SIZES = [pytest.param(HOT, id="1024-pages"), pytest.param(DRAM, id="16384-pages")]


def packets(rng, n):
    pt = np.frombuffer(rng.bytes(n * PAGE), np.uint8).copy()
    ivs = np.frombuffer(rng.bytes(16 * n), np.uint8).copy()
    return pt, ivs


def group(benchmark, n):
    benchmark.group = f"sev packets, {n} pages of 4 KiB"


def check_pages(pt, ivs, hdrs, ct, n):
    """The first and last packets are the reference's."""
    for i in (0, n - 1):
        h, c = ref.seal(TEK, TIK, pt[i * PAGE:(i + 1) * PAGE].tobytes(), ivs[16 * i:16 * i + 16])
        assert bytes(hdrs[52 * i:52 * (i + 1)]) == h
        assert bytes(ct[i * PAGE:(i + 1) * PAGE]) == c


@pytest.mark.parametrize("tier", tier_params())
@pytest.mark.parametrize("n", SIZES)
def test_sevcore_seal(benchmark, rng, n, tier):
    group(benchmark, n)
    pt, ivs = packets(rng, n)
    hdrs, ct = np.empty(52 * n, np.uint8), np.empty_like(pt)
    per_item(benchmark, n, "pages")
    with on_tier(benchmark, tier):
        benchmark.pedantic(sevpkt.seal, (TEK, TIK, pt, ivs), {"out": (hdrs, ct)},
                           rounds=15 if n == HOT else 5, iterations=1, warmup_rounds=1)
    check_pages(pt, ivs, hdrs, ct, n)


@pytest.mark.parametrize("tier", tier_params())
@pytest.mark.parametrize("n", SIZES)
def test_sevcore_open(benchmark, rng, n, tier):
    group(benchmark, n)
    pt, ivs = packets(rng, n)
    hdrs, ct = sevpkt.seal(TEK, TIK, pt, ivs)
    out = np.empty_like(pt)
    per_item(benchmark, n, "pages")
    with on_tier(benchmark, tier):
        benchmark.pedantic(sevpkt.open, (TEK, TIK, hdrs, ct), {"out": out},
                           rounds=15 if n == HOT else 5, iterations=1, warmup_rounds=1)
    assert np.array_equal(out, pt)


@pytest.mark.parametrize("n", SIZES)
def test_hashlib_hmac_per_page(benchmark, rng, n):
    """hashlib/hmac: one HMAC-SHA256 per page over the same bytes (the MAC alone, no AES)."""
    group(benchmark, n)
    pt, _ = packets(rng, n)
    pages = [memoryview(pt)[i * PAGE:(i + 1) * PAGE] for i in range(n)]

    def run():
        return [hmac.new(TIK, p, hashlib.sha256).digest() for p in pages]
    per_item(benchmark, n, "pages")
    macs = benchmark.pedantic(run, rounds=15 if n == HOT else 5, iterations=1, warmup_rounds=1)
    assert macs[-1] == sevpkt.hmac_sha256(TIK, pages[-1])


@pytest.mark.parametrize("n", SIZES)
def test_hashlib_sha256_bulk(benchmark, rng, n):
    """hashlib SHA-256 over the whole batch at once: OpenSSL's raw SHA rate, no per-page cost."""
    group(benchmark, n)
    pt, _ = packets(rng, n)
    per_item(benchmark, n, "pages")
    digest = benchmark.pedantic(lambda: hashlib.sha256(pt).digest(),
                                rounds=15 if n == HOT else 5, iterations=1, warmup_rounds=1)
    assert digest == sevpkt.sha256(pt)


@pytest.mark.parametrize("direction", ["seal", "open"])
def test_reference_per_page(benchmark, rng, direction):
    """The reference: pycryptodome AES-128-CTR and hmac, one packet at a time (256 pages)."""
    n = 256
    benchmark.group = f"sev packets, {HOT} pages of 4 KiB"
    pt, ivs = packets(rng, n)
    raw, rivs = pt.tobytes(), ivs.tobytes()
    hdrs, ct = ref.seal(TEK, TIK, raw, rivs)
    if direction == "seal":
        args = (TEK, TIK, raw, rivs)
        fn = ref.seal
    else:
        args = (TEK, TIK, hdrs, ct)
        fn = ref.open_packets
    per_item(benchmark, n, "pages")
    res = benchmark.pedantic(fn, args, rounds=5, iterations=1)
    assert res == ((hdrs, ct) if direction == "seal" else raw)


# --- one packet per call: what a per-command PSP model pays --------------------------------------

@pytest.mark.benchmark(group="one 4 KiB packet per call")
def test_sevcore_seal_one_page(benchmark, rng):
    pt, ivs = packets(rng, 1)
    hdr, ct = bytearray(52), bytearray(PAGE)
    per_item(benchmark, 1, "pages")
    benchmark(sevpkt.seal, TEK, TIK, pt, ivs, out=(hdr, ct))
    check_pages(pt, ivs, hdr, ct, 1)


@pytest.mark.benchmark(group="one 4 KiB packet per call")
def test_sevcore_open_one_page(benchmark, rng):
    pt, ivs = packets(rng, 1)
    hdr, ct = sevpkt.seal(TEK, TIK, pt, ivs)
    out = bytearray(PAGE)
    per_item(benchmark, 1, "pages")
    benchmark(sevpkt.open, TEK, TIK, hdr, ct, out=out)
    assert out == pt.tobytes()


@pytest.mark.benchmark(group="one 4 KiB packet per call")
def test_hashlib_hmac_one_page(benchmark, rng):
    pt, _ = packets(rng, 1)
    per_item(benchmark, 1, "pages")
    mac = benchmark(lambda: hmac.new(TIK, pt, hashlib.sha256).digest())
    assert mac == sevpkt.hmac_sha256(TIK, pt)
