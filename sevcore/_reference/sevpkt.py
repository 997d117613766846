"""Slow, obviously correct twin of the C transport-packet crypto (test oracle).

Written straight from AMD-ASPFW's formula (sev_channel_hmac) with hashlib/hmac for SHA-256 and
HMAC-SHA256 and pycryptodome's AES-CTR (the whole 16-byte IV as the initial counter block);
nothing here is shared with csrc/sevpkt.c.
"""
import hashlib
import hmac
import struct

from Crypto.Cipher import AES

HDR_SIZE = 52
MAX_LEN = 0x5000
CTX_SECRET = 0x01
CTX_DATA = 0x02


def sha256(data):
    return hashlib.sha256(bytes(data)).digest()


def hmac_sha256(key, data):
    return hmac.new(bytes(key), bytes(data), hashlib.sha256).digest()


def aes128_ctr(key, iv, data):
    """AES-128-CTR with ``iv`` as the initial counter block, incremented modulo 2**128."""
    return AES.new(bytes(key), AES.MODE_CTR, initial_value=bytes(iv), nonce=b"").encrypt(
        bytes(data))


def aad(ctx, flags, iv, guest_len, trans_len=None):
    """ctx || LE32(flags) || IV || LE32(guest_len) || LE32(trans_len), 29 bytes."""
    if trans_len is None:
        trans_len = guest_len
    return struct.pack("<BI16sII", ctx, flags, bytes(iv), guest_len, trans_len)


def packet_mac(tik, ctx, flags, iv, ct, measure=None, guest_len=None, trans_len=None):
    """HMAC-SHA256(TIK, AAD || CT [|| MEASURE]); the AAD lengths default to len(ct)."""
    ct = bytes(ct)
    a = aad(ctx, flags, iv, len(ct) if guest_len is None else guest_len,
            len(ct) if trans_len is None else trans_len)
    return hmac_sha256(tik, a + ct + (bytes(measure) if measure is not None else b""))


def seal(tek, tik, pt, ivs, ctx=CTX_DATA, measure=None):
    """Headers and ciphertext of len(ivs) // 16 packets of equal length cut from ``pt``."""
    pt, ivs = bytes(pt), bytes(ivs)
    n = len(ivs) // 16
    size = len(pt) // n
    hdrs, cts = bytearray(), bytearray()
    for i in range(n):
        iv = ivs[16 * i:16 * (i + 1)]
        ct = aes128_ctr(tek, iv, pt[i * size:(i + 1) * size])
        hdrs += struct.pack("<I", 0) + iv + packet_mac(tik, ctx, 0, iv, ct, measure)
        cts += ct
    return bytes(hdrs), bytes(cts)


class BadPacket(Exception):
    """The reference's refusal: ``reason`` is 'mac' or 'flags', ``index`` the packet."""

    def __init__(self, reason, index):
        super().__init__(f"packet {index}: bad {reason}")
        self.reason, self.index = reason, index


def open_packets(tek, tik, hdrs, ct, ctx=CTX_DATA, measure=None):
    """Plaintext of the packets, or BadPacket for the first one whose MAC, then COMPRESSED flag,
    fail."""
    hdrs, ct = bytes(hdrs), bytes(ct)
    n = len(hdrs) // HDR_SIZE
    size = len(ct) // n
    for i in range(n):
        h = hdrs[HDR_SIZE * i:HDR_SIZE * (i + 1)]
        flags, iv, mac = struct.unpack("<I", h[:4])[0], h[4:20], h[20:]
        want = packet_mac(tik, ctx, flags, iv, ct[i * size:(i + 1) * size], measure)
        if not hmac.compare_digest(want, mac):
            raise BadPacket("mac", i)
        if flags & 1:                         # COMPRESSED
            raise BadPacket("flags", i)
    return b"".join(aes128_ctr(tek, hdrs[HDR_SIZE * i + 4:HDR_SIZE * i + 20],
                               ct[i * size:(i + 1) * size]) for i in range(n))
