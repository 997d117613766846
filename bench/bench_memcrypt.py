"""Memory encryption engine throughput against its peers, same run.

Peers: OpenSSL through `cryptography` (one Cipher per page, as Python code would do it, and one
bulk data unit, i.e. OpenSSL's own VAES rate), pycryptodome AES-128-ECB (raw AES with no tweak),
the `openssl speed` command line (system OpenSSL, 4096-byte data units), and the pure-Python
reference. Targets (issue: foundation): XEX >= 3.5 M pages/s, XTS >= 2.5 M pages/s and >= 1.5x
`openssl speed -evp aes-256-xts -bytes 4096`, two threads >= 1.7x one, one-page call overhead
<= 1 us above the C time.
"""
import re
import shutil
import subprocess

import numpy as np
import pytest
from Crypto.Cipher import AES
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes

from benchutil import per_item
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

@pytest.mark.benchmark(group="xex-128 4 MiB batch")
def test_sevcore_xex_batch(benchmark, rng):
    data, spas = pages(rng, HOT)
    out = np.empty_like(data)
    eng = MemoryEngine(AES128_XEX, KEY16)
    per_item(benchmark, HOT, "pages")
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


@pytest.mark.benchmark(group="xts-256 4 MiB batch")
def test_sevcore_xts_batch(benchmark, rng):
    data, spas = pages(rng, HOT)
    out = np.empty_like(data)
    eng = MemoryEngine(AES256_XTS, KEY64)
    per_item(benchmark, HOT, "pages")
    benchmark(eng.encrypt_pages, data, spas, out)
    for i in (0, HOT - 1):
        page = data[i * PAGE_SIZE:(i + 1) * PAGE_SIZE].tobytes()
        assert out[i * PAGE_SIZE:(i + 1) * PAGE_SIZE].tobytes() == openssl_page(KEY64, page, spas[i])


@pytest.mark.benchmark(group="xts-256 4 MiB batch")
def test_sevcore_xts_batch_decrypt(benchmark, rng):
    data, spas = pages(rng, HOT)
    eng = MemoryEngine(AES256_XTS, KEY64)
    ct = eng.encrypt_pages(data, spas)
    out = np.empty_like(data)
    per_item(benchmark, HOT, "pages")
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


@pytest.mark.benchmark(group="xts-256 4 MiB batch")
def test_openssl_speed_cli_aes256_xts_4096(benchmark):
    """`openssl speed -evp aes-256-xts -bytes 4096` (system OpenSSL), timed by itself."""
    exe = shutil.which("openssl")
    if exe is None:
        pytest.skip("no openssl command line on this machine")

    def run():
        out = subprocess.run([exe, "speed", "-mr", "-elapsed", "-seconds", "1", "-bytes", "4096",
                              "-evp", "aes-256-xts"], capture_output=True, text=True,
                             check=True).stdout
        return float(re.search(r"\+F:\d+:[^:]+:([\d.]+)", out).group(1))
    bytes_per_s = benchmark.pedantic(run, rounds=3, iterations=1)
    benchmark.extra_info["openssl_speed_pages_per_s"] = bytes_per_s / PAGE_SIZE
    assert bytes_per_s > 0


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
