"""Slow, obviously correct twins of the C memory engine (test oracles).

Written straight from the definitions, with pycryptodome's AES-ECB as the block cipher and numpy
for the XORs; nothing here is shared with csrc/memcrypt.c.
"""
import numpy as np
from Crypto.Cipher import AES

PAGE_SIZE = 4096
BLOCKS = PAGE_SIZE // 16


def xex_tweaks(table, spa):
    """T(p) for the 256 blocks of the page at ``spa``: XOR of t[i] over set bits i >= 4 of p."""
    addrs = np.uint64(spa) + np.arange(BLOCKS, dtype=np.uint64) * np.uint64(16)
    t = np.zeros(BLOCKS, dtype=np.uint32)
    for i in range(4, 64):
        bit = (addrs >> np.uint64(i)) & np.uint64(1)
        t ^= np.where(bit == 1, np.uint32(table[i]), np.uint32(0))
    # Each 16-byte tweak is the 4-byte little-endian value repeated four times.
    return np.repeat(t.astype("<u4"), 4).tobytes()


def xts_tweaks(key2, spa):
    """IEEE 1619 tweaks of the page at ``spa``: T0 = AES_K2(spa >> 12), T(j+1) = T(j) * x."""
    t = int.from_bytes(AES.new(key2, AES.MODE_ECB).encrypt((spa >> 12).to_bytes(16, "little")),
                       "little")
    out = bytearray()
    for _ in range(BLOCKS):
        out += t.to_bytes(16, "little")
        t <<= 1
        if t >> 128:
            t = (t & ((1 << 128) - 1)) ^ 0x87
    return bytes(out)


def _xor(a, b):
    return (np.frombuffer(a, np.uint8) ^ np.frombuffer(b, np.uint8)).tobytes()


def _crypt(mode, key, table, data, spas, encrypt):
    data = bytes(data)
    assert len(data) == PAGE_SIZE * len(spas)
    if mode == "xex":
        cipher, tweak = AES.new(key, AES.MODE_ECB), (lambda s: xex_tweaks(table, s))
    else:
        cipher, tweak = AES.new(key[:32], AES.MODE_ECB), (lambda s: xts_tweaks(key[32:], s))
    fn = cipher.encrypt if encrypt else cipher.decrypt
    out = bytearray()
    for i, spa in enumerate(spas):
        spa = int(spa)
        assert spa % PAGE_SIZE == 0
        t = tweak(spa)
        out += _xor(fn(_xor(data[i * PAGE_SIZE:(i + 1) * PAGE_SIZE], t)), t)
    return bytes(out)


def xex_encrypt_pages(key, table, data, spas):
    return _crypt("xex", key, table, data, spas, True)


def xex_decrypt_pages(key, table, data, spas):
    return _crypt("xex", key, table, data, spas, False)


def xts_encrypt_pages(key, data, spas):
    return _crypt("xts", key, None, data, spas, True)


def xts_decrypt_pages(key, data, spas):
    return _crypt("xts", key, None, data, spas, False)
