"""Memory encryption engine throughput against its peers, same run.

The batched engine runs once per tier the CPU has (avx512, avx2, aesni: ``cpu.restricted``), the
tier and the AES-unit limit of its register width in each result's extra_info (bench/report.py
prints the share of the limit). Peers: the `openssl speed` command line (system OpenSSL,
4096-byte data units, CPU time), OpenSSL's EVP XTS called from C per page with the engine's
tweaks (bench/peers.c), OpenSSL through `cryptography` (one Cipher per page, as Python code would
do it, and one bulk data unit, i.e. OpenSSL 4's own VAES rate), pycryptodome AES-128-ECB (raw
AES with no tweak), and the pure-Python reference.

Targets (issue: cpu tiers), on the CPU at hand: avx2 (and avx512) XTS >= 1.5x `openssl speed
-evp aes-256-xts -bytes 4096` and >= 60 % of the AES-256 limit, XEX >= 1.5x `aes-128-xts` and
>= 60 % of the AES-128 limit; aesni >= 1.05x OpenSSL on both. Earlier (issue: foundation): two
threads >= 1.7x one, one-page call overhead <= 1 us above the C time.
"""
import re
import shutil
import subprocess
import time

import numpy as np
import pytest
from Crypto.Cipher import AES
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes

import peers
from benchutil import aes_limit, on_tier, per_item, tier_params
from sevcore import _bindings as _b
from sevcore._reference import memcrypt as ref
from sevcore.core.memcrypt import AES128_XEX, AES256_XTS, PAGE_SIZE, MemoryEngine

HOT = 1024          # 4 MiB: stays in L2/L3
DRAM = 16384        # 64 MiB: streams from DRAM
KEY16 = bytes(range(16))
KEY64 = bytes(range(64, 128))


def pages(rng, n):
    data = np.frombuffer(rng.bytes(n * PAGE_SIZE), np.uint8).copy()
    spas = (rng.permutation(n).astype(np.uint64) + np.uint64(1 << 20)) << np.uint64(12)
    return data, spas


def openssl_page(key, page, spa):
    return Cipher(algorithms.AES(key), modes.XTS((int(spa) >> 12).to_bytes(16, "little"))
                  ).encryptor().update(page)


# --- batched engine, hot --------------------------------------------------------------------------

@pytest.mark.parametrize("tier", tier_params())
@pytest.mark.benchmark(group="xex-128 4 MiB batch")
def test_sevcore_xex_batch(benchmark, rng, tier, aes_limits):
    data, spas = pages(rng, HOT)
    out = np.empty_like(data)
    eng = MemoryEngine(AES128_XEX, KEY16)
    per_item(benchmark, HOT, "pages")
    aes_limit(benchmark, aes_limits, tier, 10)
    with on_tier(benchmark, tier):
        benchmark(eng.encrypt_pages, data, spas, out)
    assert out[:PAGE_SIZE * 2].tobytes() == ref.xex_encrypt_pages(
        KEY16, eng.tweak_table, data[:PAGE_SIZE * 2].tobytes(), spas[:2])


@pytest.mark.benchmark(group="xex-128 4 MiB batch")
def test_pycryptodome_aes128_ecb_bulk(benchmark, rng):
    data, _ = pages(rng, HOT)
    src, out = data.tobytes(), bytearray(HOT * PAGE_SIZE)
    cipher = AES.new(KEY16, AES.MODE_ECB)
    per_item(benchmark, HOT, "pages")
    benchmark(cipher.encrypt, src, output=out)
    assert bytes(out[:16]) == AES.new(KEY16, AES.MODE_ECB).encrypt(src[:16])


@pytest.mark.benchmark(group="xex-128 4 MiB batch")
def test_reference_xex_16_pages(benchmark, rng):
    data, spas = pages(rng, 16)
    table = MemoryEngine(AES128_XEX, KEY16).tweak_table
    per_item(benchmark, 16, "pages")
    res = benchmark.pedantic(ref.xex_encrypt_pages, (KEY16, table, data.tobytes(), spas),
                             rounds=3, iterations=1)
    assert res == bytes(MemoryEngine(AES128_XEX, KEY16, table).encrypt_pages(data, spas))


@pytest.mark.parametrize("tier", tier_params())
@pytest.mark.benchmark(group="xts-256 4 MiB batch")
def test_sevcore_xts_batch(benchmark, rng, tier, aes_limits):
    data, spas = pages(rng, HOT)
    out = np.empty_like(data)
    eng = MemoryEngine(AES256_XTS, KEY64)
    per_item(benchmark, HOT, "pages")
    aes_limit(benchmark, aes_limits, tier, 14)
    with on_tier(benchmark, tier):
        benchmark(eng.encrypt_pages, data, spas, out)
    for i in (0, HOT - 1):
        page = data[i * PAGE_SIZE:(i + 1) * PAGE_SIZE].tobytes()
        assert out[i * PAGE_SIZE:(i + 1) * PAGE_SIZE].tobytes() == openssl_page(KEY64, page, spas[i])


@pytest.mark.parametrize("tier", tier_params())
@pytest.mark.benchmark(group="xts-256 4 MiB batch")
def test_sevcore_xts_batch_decrypt(benchmark, rng, tier, aes_limits):
    data, spas = pages(rng, HOT)
    eng = MemoryEngine(AES256_XTS, KEY64)
    ct = eng.encrypt_pages(data, spas)
    out = np.empty_like(data)
    per_item(benchmark, HOT, "pages")
    aes_limit(benchmark, aes_limits, tier, 14)
    with on_tier(benchmark, tier):
        benchmark(eng.decrypt_pages, ct, spas, out)
    assert np.array_equal(out, data)


@pytest.mark.benchmark(group="xts-256 4 MiB batch")
def test_cryptography_xts_one_cipher_per_page(benchmark, rng):
    n = 256
    data, spas = pages(rng, n)
    raw = data.tobytes()

    def run():
        return [openssl_page(KEY64, raw[i * PAGE_SIZE:(i + 1) * PAGE_SIZE], spas[i])
                for i in range(n)]
    per_item(benchmark, n, "pages")
    res = benchmark(run)
    assert res[0] == bytes(MemoryEngine(AES256_XTS, KEY64).encrypt_page(raw[:PAGE_SIZE],
                                                                        int(spas[0])))


@pytest.mark.benchmark(group="xts-256 4 MiB batch")
def test_cryptography_xts_bulk_one_data_unit(benchmark, rng):
    """OpenSSL's own VAES XTS rate: the whole 4 MiB as one data unit (no per-page tweak)."""
    data, _ = pages(rng, HOT)
    out = bytearray(HOT * PAGE_SIZE)

    def run():
        Cipher(algorithms.AES(KEY64), modes.XTS(bytes(16))).encryptor().update_into(data, out)
    per_item(benchmark, HOT, "pages")
    benchmark(run)
    assert bytes(out[:PAGE_SIZE]) == openssl_page(KEY64, data[:PAGE_SIZE].tobytes(), 0)


def openssl_speed(benchmark, cipher):
    """`openssl speed -evp <cipher> -bytes 4096` (system OpenSSL), three runs of a second; the
    rate is the median run's. CPU time, not -elapsed: on a shared machine a process waiting for
    a CPU should not count against OpenSSL (sevcore's rounds are each timed on their own)."""
    exe = shutil.which("openssl")
    if exe is None:
        pytest.skip("no openssl command line on this machine")
    rates = []

    def run():
        out = subprocess.run([exe, "speed", "-mr", "-seconds", "1", "-bytes", "4096", "-evp",
                              cipher], capture_output=True, text=True, check=True).stdout
        rates.append(float(re.search(r"\+F:\d+:[^:]+:([\d.]+)", out).group(1)))
    benchmark.pedantic(run, rounds=3, iterations=1)
    version = subprocess.run([exe, "version"], capture_output=True, text=True).stdout.strip()
    benchmark.extra_info["openssl_speed_pages_per_s"] = float(np.median(rates)) / PAGE_SIZE
    benchmark.extra_info["openssl"] = version
    assert min(rates) > 0


@pytest.mark.benchmark(group="xts-256 4 MiB batch")
def test_openssl_speed_cli_aes256_xts_4096(benchmark):
    """`openssl speed -evp aes-256-xts -bytes 4096` (system OpenSSL)."""
    openssl_speed(benchmark, "aes-256-xts")


@pytest.mark.benchmark(group="xex-128 4 MiB batch")
def test_openssl_speed_cli_aes128_xts_4096(benchmark):
    """`openssl speed -evp aes-128-xts -bytes 4096`: XEX's peer, the same AES-128 rounds plus a
    tweak per data unit."""
    openssl_speed(benchmark, "aes-128-xts")


@pytest.mark.parametrize("bits", [128, 256])
def test_openssl_evp_xts_per_page(benchmark, rng, bits):
    """OpenSSL EVP aes-<bits>-xts from C (bench/peers.c), each page its own data unit with the
    engine's tweak: the same work as the XTS batch, timed the same way."""
    if peers.library() is None:
        pytest.skip(peers.why())
    benchmark.group = "xts-256 4 MiB batch" if bits == 256 else "xex-128 4 MiB batch"
    data, spas = pages(rng, HOT)
    out = np.empty_like(data)
    key = KEY64 if bits == 256 else KEY64[:32]
    per_item(benchmark, HOT, "pages")
    benchmark(peers.evp_xts, bits, True, key, data, out, spas)
    if bits == 256:
        assert np.array_equal(out, MemoryEngine(AES256_XTS, KEY64).encrypt_pages(data, spas))


@pytest.mark.parametrize("tier", tier_params())
@pytest.mark.parametrize("bits", [128, 256])
def test_sevcore_vs_openssl_evp_interleaved(benchmark, rng, bits, tier, aes_limits):
    """The engine's batch (XEX for 128 bits, XTS-256 for 256) and OpenSSL's EVP XTS of the same
    pages, call after call, so that both see the same moments of a shared machine: the medians of
    the two series give the ratio (extra_info), the timed call is the pair."""
    if peers.library() is None:
        pytest.skip(peers.why())
    benchmark.group = f"{'xex-128' if bits == 128 else 'xts-256'} vs OpenSSL EVP, interleaved"
    data, spas = pages(rng, HOT)
    out, theirs = np.empty_like(data), np.empty_like(data)
    eng = MemoryEngine(AES128_XEX, KEY16) if bits == 128 else MemoryEngine(AES256_XTS, KEY64)
    key = KEY64[:32] if bits == 128 else KEY64
    ours_t, evp_t = [], []

    def pair():
        t = time.perf_counter()
        eng.encrypt_pages(data, spas, out)
        ours_t.append(time.perf_counter() - t)
        t = time.perf_counter()
        peers.evp_xts(bits, True, key, data, theirs, spas)
        evp_t.append(time.perf_counter() - t)
    per_item(benchmark, 2 * HOT, "pages")
    aes_limit(benchmark, aes_limits, tier, 10 if bits == 128 else 14)
    with on_tier(benchmark, tier):
        benchmark.pedantic(pair, rounds=200, warmup_rounds=5)
    info = benchmark.extra_info
    info["sevcore_pages_per_s"] = HOT / float(np.median(ours_t))
    info["openssl_evp_pages_per_s"] = HOT / float(np.median(evp_t))
    info["ratio_median"] = float(np.median(evp_t) / np.median(ours_t))
    info["ratio_best"] = float(min(evp_t) / min(ours_t))
    if "limit_pages_per_s" in info:
        info["share_of_limit_median"] = info["sevcore_pages_per_s"] / info["limit_pages_per_s"]
    if bits == 256:
        assert np.array_equal(out, theirs)


@pytest.mark.parametrize("width", [128, 256, 512], ids=["xmm", "ymm", "zmm"])
@pytest.mark.benchmark(group="AES-unit limit")
def test_aes_unit_limit(benchmark, width, aes_limits):
    """Independent AESENC chains on xmm, ymm or zmm registers (bench/peers.c): the rate no AES
    code on this register width can beat, as AES-128 pages/s (AES-256 in extra_info)."""
    if width not in aes_limits:
        pytest.skip(f"no AES on {width}-bit registers here ({peers.why()})"
                    if peers.library() is None else f"CPU has no AES on {width}-bit registers")
    per_ns = aes_limits[width]
    benchmark.extra_info["block_rounds_per_ns"] = per_ns
    benchmark.extra_info["aes256_pages_per_s"] = per_ns * 1e9 / 14 / 256
    iters = 1_000_000
    per_item(benchmark, iters * 10 * width // 128 / (10 * 256), "AES-128 pages")
    benchmark.pedantic(peers.aes_block_rounds_per_ns, (width, 1, iters), rounds=5)


# --- DRAM-sized, one and two threads ------------------------------------------------------------------

def encrypt_in_place(benchmark, eng, data, spas, threads, **pedantic):
    """Time encrypt_pages of ``data`` in place on ``threads`` workers, round after round; then
    check its first and last pages against as many one-page calls."""
    first, last = data[:PAGE_SIZE].tobytes(), data[-PAGE_SIZE:].tobytes()
    calls = 0

    def run():
        nonlocal calls
        calls += 1
        eng.encrypt_pages(data, spas, data, threads=threads)
    benchmark.pedantic(run, iterations=1, **pedantic)
    for _ in range(calls):
        first = eng.encrypt_page(first, int(spas[0]))
        last = eng.encrypt_page(last, int(spas[-1]))
    assert data[:PAGE_SIZE].tobytes() == first and data[-PAGE_SIZE:].tobytes() == last


@pytest.mark.parametrize("threads", [1, 2])
@pytest.mark.parametrize("mode,key", [(AES256_XTS, KEY64), (AES128_XEX, KEY16)],
                         ids=["xts-256", "xex-128"])
def test_sevcore_dram_threads(benchmark, rng, mode, key, threads):
    benchmark.group = f"{'xts-256' if mode == AES256_XTS else 'xex-128'} 64 MiB in place, threads"
    data, spas = pages(rng, DRAM)
    eng = MemoryEngine(mode, key)
    per_item(benchmark, DRAM, "pages")
    encrypt_in_place(benchmark, eng, data, spas, threads, rounds=7, warmup_rounds=1)


@pytest.mark.parametrize("threads", [1, 2])
@pytest.mark.benchmark(group="xex-128 8 MiB in place (cache-resident), threads")
def test_sevcore_xex_cached_threads(benchmark, rng, threads):
    data, spas = pages(rng, 2048)
    eng = MemoryEngine(AES128_XEX, KEY16)
    per_item(benchmark, 2048, "pages")
    encrypt_in_place(benchmark, eng, data, spas, threads, rounds=50, warmup_rounds=2)


# --- one page per call: Python overhead above the C time ---------------------------------------------

@pytest.mark.benchmark(group="one page per call (xex-128)")
def test_sevcore_one_page_call(benchmark):
    eng = MemoryEngine(AES128_XEX, KEY16)
    page, out = bytearray(PAGE_SIZE), bytearray(PAGE_SIZE)
    per_item(benchmark, 1, "pages")
    benchmark(eng.encrypt_page, page, 0x1000, out)
    assert out != page


@pytest.mark.benchmark(group="one page per call (xex-128)")
def test_raw_c_one_page_call(benchmark):
    """The C call alone with pointers prepared in advance: the floor for a one-page call."""
    eng = MemoryEngine(AES128_XEX, KEY16)
    page, out = bytearray(PAGE_SIZE), bytearray(PAGE_SIZE)
    src, dst = _b.buffer_ptr(page, "page"), _b.buffer_ptr(out, "out", True)
    fn, handle = _b.lib.sc_memcrypt_run, eng._eng
    per_item(benchmark, 1, "pages")
    benchmark(fn, handle, 1, src, PAGE_SIZE, dst, PAGE_SIZE, 0x1000, _b.ffi.NULL)
    assert bytes(out) == bytes(eng.encrypt_page(page, 0x1000))
