"""The memory controller: per-ASID keys in front of host memory, as the PSP and guests use it."""
import numpy as np
import pytest

import sevcore
from sevcore.core.memcrypt import AES256_XTS
from sevcore.hw.umc import MemoryController

P = 4096
KEY_A, KEY_B = bytes(range(16)), bytes(range(16, 32))


@pytest.fixture
def host():
    host = sevcore.Host(seed=7)
    host.umc = MemoryController(host)
    return host


def pages(host, n):
    return int(host.mem.alloc(n)[0]) << 12


def test_asid_zero_is_the_raw_frames(host):
    """ASID 0 (the host, SME off) reads and writes the frames as they are."""
    spa = pages(host, 1)
    host.umc.write(spa + 5, b"hello", 0)
    assert host.mem.read(spa + 5, 5) == b"hello" == host.umc.read(spa + 5, 5, 0)
    assert host.umc.engine(0) is None


def test_round_trip_and_ciphertext_in_frames(host):
    """Data written with a guest key reads back under that key, and the frames hold ciphertext."""
    spa = pages(host, 2)
    host.umc.install_key(3, KEY_A)
    data = np.random.default_rng(1).bytes(2 * P)
    host.umc.write(spa, data, 3)
    assert host.umc.read(spa, 2 * P, 3) == data
    assert host.mem.read(spa, 2 * P) != data


def test_partial_write_changes_only_written_blocks(host):
    """A write of a few bytes changes only the 16-byte blocks it touches."""
    spa = pages(host, 1)
    host.umc.install_key(3, KEY_A)
    host.umc.write(spa, bytes(range(256)) * 16, 3)
    before = host.mem.read(spa, P)
    host.umc.write(spa + 100, b"xyz", 3)
    after = host.mem.read(spa, P)
    changed = {i // 16 for i in range(P) if before[i] != after[i]}
    assert changed == {100 // 16}
    assert host.umc.read(spa + 96, 16, 3) == bytes(range(96, 100)) + b"xyz" + bytes(range(103, 112))


def test_other_asid_and_other_spa_read_garbage(host):
    """A page written under one ASID reads as garbage under another, or moved to another SPA."""
    spa = pages(host, 2)
    umc = host.umc
    umc.install_key(3, KEY_A)
    umc.install_key(4, KEY_B)
    plain = b"A" * P
    umc.write(spa, plain, 3)
    assert umc.read(spa, P, 4) != plain
    host.mem.write(spa + P, host.mem.read(spa, P))          # the host moves the ciphertext
    moved = umc.read(spa + P, P, 3)
    assert moved != plain
    bits = np.unpackbits(np.frombuffer(moved, np.uint8) ^ np.frombuffer(plain, np.uint8)).mean()
    assert 0.4 < bits < 0.6


@pytest.mark.parametrize("order", [(5, 1, 7, 2), (3, 4, 5, 6), (6, 2, 6, 1)],
                         ids=["scattered", "one run", "repeated"])
def test_page_batches_match_single_accesses(host, order):
    """read_pages/write_pages at scattered SPAs, a run of frames or a repeated page equal
    page-by-page reads and writes in order (a repeated page keeps the later data)."""
    base = pages(host, 8)
    spas = [base + P * i for i in order]
    host.umc.install_key(9, KEY_B)
    data = np.random.default_rng(2).bytes(4 * P)
    host.umc.write_pages(spas, data, 9)
    for i, spa in enumerate(spas):
        if spa not in spas[i + 1:]:
            assert host.umc.read(spa, P, 9) == data[P * i:P * (i + 1)]
    out = bytearray(4 * P)
    assert host.umc.read_pages(spas, 9, out=out) is out
    assert bytes(out) == b"".join(host.umc.read(s, P, 9) for s in spas)
    assert bytes(host.umc.read_pages(spas, 0)) == b"".join(host.mem.read(s, P) for s in spas)
    plain = bytearray(data)
    host.umc.write_pages(spas, plain, 9, in_place=True)
    assert bytes(host.umc.read_pages(spas[-1:], 9)) == data[3 * P:]


def test_encrypt_in_place_observes_plaintext(host):
    """encrypt_in_place hands every plaintext byte to the observer, then leaves ciphertext."""
    spa = pages(host, 4)
    host.umc.install_key(3, KEY_A)
    data = np.random.default_rng(3).bytes(4 * P)
    host.mem.write(spa, data)
    seen = []
    host.umc.encrypt_in_place(spa + 32, 3 * P + 16, 3, lambda c: seen.append(bytes(c)))
    assert b"".join(seen) == data[32:32 + 3 * P + 16]
    assert host.umc.read(spa + 32, 3 * P + 16, 3) == data[32:32 + 3 * P + 16]
    assert host.mem.read(spa, 32) == data[:32]                # outside the range: untouched
    assert host.mem.read(spa + 3 * P + 48, P - 48) == data[3 * P + 48:]


def test_missing_key_and_bad_arguments(host):
    """An ASID without a key raises KeyError; bad ASIDs and ranges raise before any access."""
    spa = pages(host, 1)
    with pytest.raises(KeyError):
        host.umc.read(spa, 16, 5)
    for bad in (-1, 1 << 32):
        with pytest.raises(ValueError):
            host.umc.install_key(bad, KEY_A)
    with pytest.raises(ValueError):
        host.umc.install_key(0, KEY_A)
    with pytest.raises(TypeError):
        host.umc.install_key(True, KEY_A)
    with pytest.raises(ValueError):
        host.umc.read(host.mem.size - 8, 16, 0)
    host.umc.install_key(5, KEY_A)
    host.umc.remove_key(5)
    assert not host.umc.has_key(5)


def test_xts_mode():
    """An AES256_XTS controller takes 64-byte keys and keeps the same semantics."""
    host = sevcore.Host(seed=1)
    umc = MemoryController(host, AES256_XTS)
    umc.install_key(1, bytes(range(64)))
    spa = pages(host, 1)
    umc.write(spa + 48, b"x" * 40, 1)
    assert umc.read(spa + 48, 40, 1) == b"x" * 40
    with pytest.raises(ValueError):
        umc.install_key(2, KEY_A)
