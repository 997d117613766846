"""The SEV memory encryption engine (sevcore.core.memcrypt) against known answers, OpenSSL and the
slow reference in sevcore._reference.memcrypt, on every implementation path."""
import pathlib
import re

import numpy as np
import pytest
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes
from hypothesis import given, settings
from hypothesis import strategies as st

from sevcore._reference import memcrypt as ref
from sevcore.core.memcrypt import (AES128_XEX, AES256_XTS, PAGE_SIZE, MemoryEngine,
                                   default_tweak_table)

from support.cpu_paths import MEMCRYPT

DATA = pathlib.Path(__file__).resolve().parent.parent / "data"

pytestmark = pytest.mark.cpu_paths(MEMCRYPT)      # cpu_path: avx512, avx2, aesni, portable


def openssl_xts(key, data, spas, encrypt=True):
    out = bytearray()
    for i, spa in enumerate(spas):
        c = Cipher(algorithms.AES(key), modes.XTS((int(spa) >> 12).to_bytes(16, "little")))
        ctx = c.encryptor() if encrypt else c.decryptor()
        out += ctx.update(bytes(data[i * PAGE_SIZE:(i + 1) * PAGE_SIZE]))
    return bytes(out)


def page_aligned(max_pfn=(1 << 52) - 1):
    return st.integers(0, max_pfn).map(lambda pfn: pfn << 12)


# --- known answers ------------------------------------------------------------------------------

def test_xex_with_zero_table_is_aes128_fips197(cpu_path):
    """With an all-zero tweak table XEX is plain AES-128: FIPS-197 appendix C.1."""
    eng = MemoryEngine(AES128_XEX, bytes(range(16)), np.zeros(64, np.uint32))
    pt = bytes.fromhex("00112233445566778899aabbccddeeff") * 256
    ct = eng.encrypt_pages(pt, [0x1234000])
    assert bytes(ct[:16]).hex() == "69c4e0d86a7b0430d8cdb78070b4c55a"
    assert bytes(ct) == bytes(ct[:16]) * 256
    assert bytes(eng.decrypt_pages(ct, [0x1234000])) == pt


def test_xts_ieee1619_vector_10(cpu_path):
    """The first 512 bytes of a page at SPA 0xff << 12 encrypt as IEEE 1619 vector 10."""
    fields = dict(re.findall(r"^(\w+) = (\w+)$", (DATA / "xts_aes256_ieee1619.txt").read_text(),
                             re.M))
    key, ptx, ctx = (bytes.fromhex(fields[k]) for k in ("KEY", "PTX", "CTX"))
    spa = int(fields["DUSN"], 16) << 12
    page = ptx + bytes(PAGE_SIZE - len(ptx))
    eng = MemoryEngine(AES256_XTS, key)
    ct = eng.encrypt_pages(page, [spa])
    assert bytes(ct[:len(ctx)]) == ctx
    assert bytes(eng.decrypt_pages(ct, [spa])[:len(ptx)]) == ptx


def test_xex_tweak_is_table_entry_repeated_four_times(cpu_path):
    """A block whose SPA has one bit i set is masked by t[i] as 4 little-endian bytes x 4."""
    key = bytes(range(16, 32))
    table = np.zeros(64, np.uint32)
    table[13] = 0x82253838
    eng = MemoryEngine(AES128_XEX, key, table)
    zero = MemoryEngine(AES128_XEX, key, np.zeros(64, np.uint32))
    pt = bytes(range(256)) * 16
    mask = (0x82253838).to_bytes(4, "little") * 4
    ct_masked = bytes(eng.encrypt_pages(pt, [1 << 13]))
    # C = AES(P ^ T) ^ T, so unmasking and encrypting P ^ T with no tweak must agree.
    pt_x = bytes(a ^ b for a, b in zip(pt, mask * 256))
    ct_plain = bytes(zero.encrypt_pages(pt_x, [0]))
    assert ct_masked == bytes(a ^ b for a, b in zip(ct_plain, mask * 256))


# --- differential: C vs reference and OpenSSL ------------------------------------------------------

@settings(max_examples=25)
@given(key=st.binary(min_size=16, max_size=16),
       table=st.lists(st.integers(0, 2**32 - 1), min_size=64, max_size=64),
       spas=st.lists(page_aligned(), min_size=1, max_size=4),
       seed=st.integers(0, 2**32 - 1))
def test_xex_matches_reference(key, table, spas, seed):
    """XEX agrees with the reference on random keys, tables, SPAs and data, on every path."""
    data = np.random.default_rng(seed).bytes(PAGE_SIZE * len(spas))
    want = ref.xex_encrypt_pages(key, table, data, spas)
    plain = ref.xex_decrypt_pages(key, table, data, spas)     # the data read as ciphertext
    for name in MEMCRYPT.each():
        eng = MemoryEngine(AES128_XEX, key, table)
        assert bytes(eng.encrypt_pages(data, spas)) == want, name
        assert bytes(eng.decrypt_pages(want, spas)) == data, name
        assert bytes(eng.decrypt_pages(data, spas)) == plain, name


@settings(max_examples=25)
@given(key=st.binary(min_size=64, max_size=64).filter(lambda k: k[:32] != k[32:]),
       spas=st.lists(page_aligned(), min_size=1, max_size=4),
       seed=st.integers(0, 2**32 - 1))
def test_xts_matches_reference_and_openssl(key, spas, seed):
    """XTS agrees with the reference and with OpenSSL's aes-256-xts, on every path."""
    data = np.random.default_rng(seed).bytes(PAGE_SIZE * len(spas))
    want = openssl_xts(key, data, spas)
    assert ref.xts_encrypt_pages(key, data, spas) == want
    plain = ref.xts_decrypt_pages(key, data, spas)            # the data read as ciphertext
    for name in MEMCRYPT.each():
        eng = MemoryEngine(AES256_XTS, key)
        assert bytes(eng.encrypt_pages(data, spas)) == want, name
        assert bytes(eng.decrypt_pages(want, spas)) == data, name
        assert bytes(eng.decrypt_pages(data, spas)) == plain, name


@pytest.mark.parametrize("mode,key_len", [(AES128_XEX, 16), (AES256_XTS, 64)])
def test_long_batch_matches_one_page_calls(cpu_path, mode, key_len, rng):
    """A batch of many pages equals the same pages encrypted one call at a time."""
    key = rng.bytes(key_len)
    n = 67
    data = rng.bytes(n * PAGE_SIZE)
    spas = rng.integers(0, 1 << 40, n, dtype=np.uint64) << np.uint64(12)
    eng = MemoryEngine(mode, key)
    batch = bytes(eng.encrypt_pages(data, spas))
    single = b"".join(bytes(eng.encrypt_page(data[i * PAGE_SIZE:(i + 1) * PAGE_SIZE], int(s)))
                      for i, s in enumerate(spas))
    assert batch == single


@pytest.mark.parametrize("mode,key_len", [(AES128_XEX, 16), (AES256_XTS, 64)])
def test_run_equals_pages_at_consecutive_spas(cpu_path, mode, key_len, rng):
    """encrypt_run(data, spa) equals encrypt_pages with SPAs spa, spa + 4096, ..."""
    eng = MemoryEngine(mode, rng.bytes(key_len))
    data = rng.bytes(5 * PAGE_SIZE)
    spa = 0x7ffff000
    spas = [spa + i * PAGE_SIZE for i in range(5)]
    assert bytes(eng.encrypt_run(data, spa)) == bytes(eng.encrypt_pages(data, spas))
    assert bytes(eng.decrypt_run(data, spa)) == bytes(eng.decrypt_pages(data, spas))


@pytest.mark.parametrize("mode,key_len", [(AES128_XEX, 16), (AES256_XTS, 64)])
def test_in_place_and_numpy_buffers(cpu_path, mode, key_len, rng):
    """out=data works in place, and numpy arrays and memoryviews are accepted without copies."""
    eng = MemoryEngine(mode, rng.bytes(key_len))
    data = np.frombuffer(rng.bytes(3 * PAGE_SIZE), np.uint8).copy()
    plain = data.copy()
    spas = np.array([0, 0x5000, 0x100000000], np.uint64)
    want = bytes(eng.encrypt_pages(plain, spas))
    assert eng.encrypt_pages(data, spas, out=data) is data
    assert data.tobytes() == want
    eng.decrypt_pages(memoryview(data), spas, out=data)
    assert np.array_equal(data, plain)


@pytest.mark.parametrize("threads", [2, 3, 8])
def test_threads_give_the_same_bytes(threads, rng):
    """Splitting a batch over worker threads gives exactly the single-thread result."""
    eng = MemoryEngine(AES256_XTS, rng.bytes(64))
    n = 50
    data = rng.bytes(n * PAGE_SIZE)
    spas = rng.integers(0, 1 << 30, n, dtype=np.uint64) << np.uint64(12)
    one = bytes(eng.encrypt_pages(data, spas))
    assert bytes(eng.encrypt_pages(data, spas, threads=threads)) == one
    assert bytes(eng.decrypt_pages(one, spas, threads=threads)) == data
    buf = bytearray(data)
    assert eng.encrypt_pages(buf, spas, out=buf, threads=threads) is buf
    assert bytes(buf) == one


# --- the properties the simulator relies on ----------------------------------------------------------

@pytest.mark.parametrize("mode,key_len", [(AES128_XEX, 16), (AES256_XTS, 64)])
def test_same_plaintext_differs_by_spa_key_and_offset(cpu_path, mode, key_len, rng):
    """Identical plaintext at two SPAs, under two keys, or at two offsets encrypts differently."""
    page = bytes(PAGE_SIZE)
    a = MemoryEngine(mode, rng.bytes(key_len))
    b = MemoryEngine(mode, rng.bytes(key_len))
    at1, at2 = bytes(a.encrypt_page(page, 0x1000)), bytes(a.encrypt_page(page, 0x2000))
    assert at1 != at2
    assert at1 != bytes(b.encrypt_page(page, 0x1000))
    blocks = {at1[i:i + 16] for i in range(0, PAGE_SIZE, 16)}
    assert len(blocks) == PAGE_SIZE // 16


@pytest.mark.parametrize("mode,key_len", [(AES128_XEX, 16), (AES256_XTS, 64)])
def test_ciphertext_moved_to_another_spa_decrypts_to_garbage(cpu_path, mode, key_len, rng):
    """A page copied to another SPA, or read under another key, does not decrypt to its plaintext."""
    eng = MemoryEngine(mode, rng.bytes(key_len))
    other = MemoryEngine(mode, rng.bytes(key_len))
    page = rng.bytes(PAGE_SIZE)
    ct = eng.encrypt_page(page, 0x40000)
    moved = bytes(eng.decrypt_page(ct, 0x41000))
    assert moved != page
    # Garbage, not a near miss: about half of all bits differ.
    diff = np.unpackbits(np.frombuffer(moved, np.uint8) ^ np.frombuffer(page, np.uint8)).sum()
    assert 0.4 < diff / (8 * PAGE_SIZE) < 0.6
    assert bytes(other.decrypt_page(ct, 0x40000)) != page
    assert bytes(eng.decrypt_page(ct, 0x40000)) == page


def test_default_tweak_table_is_seeded_and_shared_shape():
    """default_tweak_table is deterministic per seed, 64 uint32 entries, with entries 0-3 zero."""
    a, b, c = default_tweak_table(1), default_tweak_table(1), default_tweak_table(2)
    assert a.dtype == np.uint32 and a.shape == (64,)
    assert np.array_equal(a, b) and not np.array_equal(a, c)
    assert not a[:4].any() and a[4:].all()


# --- bad input: a clear error and nothing written -----------------------------------------------------

SENTINEL = b"\xa5" * (2 * PAGE_SIZE)


@pytest.mark.parametrize("kwargs,exc,match", [
    (dict(mode=AES128_XEX, key=bytes(15)), ValueError, "16-byte key"),
    (dict(mode=AES128_XEX, key=bytes(32)), ValueError, "16-byte key"),
    (dict(mode=AES256_XTS, key=bytes(32)), ValueError, "64-byte key"),
    (dict(mode=AES256_XTS, key=bytes(range(32)) * 2), ValueError, "halves must differ"),
    (dict(mode=AES256_XTS, key=bytes(range(64)), tweak_table=np.zeros(64, np.uint32)),
     ValueError, "no tweak_table"),
    (dict(mode=AES128_XEX, key=bytes(16), tweak_table=np.zeros(63, np.uint32)), ValueError,
     "64 entries"),
    (dict(mode=AES128_XEX, key=bytes(16), tweak_table=[2**32] * 64), ValueError, "32-bit"),
    (dict(mode=AES128_XEX, key=bytes(16), tweak_table=[0.5] * 64), TypeError, "integers"),
    (dict(mode=AES128_XEX, key="0123456789abcdef"), TypeError, "bytes"),
    (dict(mode=3, key=bytes(16)), ValueError, "mode"),
])
def test_bad_engine_arguments(kwargs, exc, match):
    """Wrong key lengths, XTS with equal halves or a table, and bad tables are refused."""
    with pytest.raises(exc, match=match):
        MemoryEngine(**kwargs)


@pytest.mark.parametrize("data,spas,match", [
    (bytes(PAGE_SIZE * 2 - 1), [0, 0x1000], "whole number"),
    (bytes(PAGE_SIZE * 2), [0x1000], "1 SPAs for 2 pages"),
    (bytes(PAGE_SIZE * 2), [0x1000, 0x2010], r"spas\[1\] = 0x2010 is not page aligned"),
    (bytes(PAGE_SIZE * 2), [0x1000, -4096], r"spas\[1\] = -4096 is not a u64"),
    (bytes(PAGE_SIZE * 2), np.array([0x1000, -4096]), r"spas\[1\] = -4096 is not a u64"),
    (bytes(PAGE_SIZE * 2), [0x1000, 2**64], r"spas\[1\] = 18446744073709551616 is not a u64"),
])
@pytest.mark.parametrize("threads", [1, 2])
def test_bad_batches_are_refused_before_any_write(cpu_path, data, spas, match, threads):
    """A bad buffer, count or SPA raises ValueError and leaves out untouched."""
    eng = MemoryEngine(AES128_XEX, bytes(16))
    out = bytearray(SENTINEL[:len(data)])
    with pytest.raises(ValueError, match=match):
        eng.encrypt_pages(data, spas, out=out, threads=threads)
    assert out == SENTINEL[:len(data)]


def test_float_spas_and_bad_buffers_are_type_errors():
    """Float SPAs, a non-buffer and a read-only out raise TypeError."""
    eng = MemoryEngine(AES128_XEX, bytes(16))
    with pytest.raises(TypeError, match=r"spas\[0\] = 4096.0 is not an integer"):
        eng.encrypt_pages(bytes(PAGE_SIZE), [4096.0])
    with pytest.raises(TypeError):
        eng.encrypt_pages("x" * PAGE_SIZE, [0])
    with pytest.raises(TypeError):
        eng.encrypt_pages(bytes(PAGE_SIZE), [0], out=bytes(PAGE_SIZE))


def test_partial_overlap_is_refused_and_in_place_allowed():
    """out overlapping data at an offset is refused with nothing written; out is data works."""
    eng = MemoryEngine(AES256_XTS, bytes(range(64)))
    buf = bytearray(SENTINEL + SENTINEL[:PAGE_SIZE])
    view = memoryview(buf)
    for threads in (1, 2):
        with pytest.raises(ValueError, match="overlaps"):
            eng.encrypt_pages(view[:2 * PAGE_SIZE], [0, 4096], out=view[PAGE_SIZE:],
                              threads=threads)
        assert buf == SENTINEL + SENTINEL[:PAGE_SIZE]
    eng.encrypt_pages(view[:2 * PAGE_SIZE], [0, 4096], out=view[:2 * PAGE_SIZE])
    assert buf[:2 * PAGE_SIZE] != SENTINEL


@pytest.mark.parametrize("spa,exc,match", [
    (0x1010, ValueError, "not page aligned"),
    (-4096, ValueError, "spa = -4096 is not a u64"),
    (2**64, ValueError, "spa = 18446744073709551616 is not a u64"),
    (2**64 - 4096, ValueError, "past the address space"),
    ("4096", TypeError, "spa"),
])
def test_bad_run_spa_is_refused_before_any_write(spa, exc, match):
    """An unaligned, negative, oversized or overflowing run SPA is refused with nothing written."""
    eng = MemoryEngine(AES128_XEX, bytes(16))
    out = bytearray(SENTINEL)
    with pytest.raises(exc, match=match):
        eng.encrypt_run(bytes(2 * PAGE_SIZE), spa, out=out)
    assert out == SENTINEL


def test_closed_engine_refuses_work():
    """A closed engine (key schedule wiped) raises instead of touching memory."""
    eng = MemoryEngine(AES128_XEX, bytes(16))
    eng.close()
    with pytest.raises(ValueError, match="closed"):
        eng.encrypt_page(bytes(PAGE_SIZE), 0)
    with pytest.raises(ValueError, match="closed"):
        eng.encrypt_pages(bytes(PAGE_SIZE), [0])
    eng.close()  # idempotent


def test_empty_batch_is_a_no_op():
    """Zero pages and zero SPAs is valid and returns an empty buffer."""
    eng = MemoryEngine(AES128_XEX, bytes(16))
    assert eng.encrypt_pages(b"", []) == bytearray()
    assert eng.encrypt_run(b"", 0) == bytearray()
