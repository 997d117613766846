"""The SEV firmware's channel cryptography, shared by the firmware and the guest owner's tools.

Everything here follows the firmware source and the tools that interoperate with it: the NIST SP
800-108 KDF of AMD-ASPFW ``nist_kdf.c`` (counter and length little-endian, label without its NUL),
the session blob of ``sev_channel.c`` (``create_session``/``establish_channel``), the launch
measurement of ``sev_guest.c`` (``sev_guest_measure``) and the packet MAC of
``sev_channel_hmac``/``aesctr_hmac256_*``. AES-128-CTR is the standard mode with the 16-byte IV as
the initial counter block, incremented as a 128-bit big-endian number (OpenSSL
``EVP_aes_128_ctr``, which interoperates with the firmware); it runs on the C kernel of
``sevcore.core.sevpkt``, the same one that seals and opens the transport packets.
"""
import hashlib
import hmac
import struct

from Crypto.Cipher import AES
from Crypto.PublicKey import ECC

from sevcore.core import sevpkt

#: Channel context bytes ([FW] sev_channel.h).
CTX_SECRET = 0x01
CTX_DATA = 0x02
CTX_VMSA = 0x03
CTX_MEASURE = 0x04

SESSION_SIZE = 128
HEADER_SIZE = 52
MEASURE_SIZE = 48
COMPRESSED = 1 << 0          # packet header flags bit 0

_LE32 = struct.Struct("<I")
P384_ORDER = int("ffffffffffffffffffffffffffffffffffffffffffffffffc7634d81f4372ddf"
                 "581a0db248b0a77aecec196accc52973", 16)


def le32(v):
    return _LE32.pack(v & 0xFFFFFFFF)


def kdf(key_in, label, context, size):
    """NIST SP 800-108 counter-mode KDF with HMAC-SHA256 ([FW] ``kdf_derive``)."""
    if isinstance(label, str):
        label = label.encode()
    bits = le32(8 * size)
    out = b""
    i = 1
    while len(out) < size:
        out += hmac.new(key_in, le32(i) + label + b"\0" + context + bits, hashlib.sha256).digest()
        i += 1
    return out[:size]


def hmac256(key, *parts):
    h = hmac.new(key, digestmod=hashlib.sha256)
    for p in parts:
        h.update(p)
    return h.digest()


def aes128_ctr(key, iv, data):
    """AES-128-CTR with ``iv`` as the whole initial counter block (``sevpkt.aes128_ctr``)."""
    return bytes(sevpkt.aes128_ctr(key, iv, data))


# -- key agreement -----------------------------------------------------------------------------

def ecdh_p384(private_d, peer_point):
    """The shared secret ``Z``: the x coordinate of ``d * peer`` as 48 big-endian bytes (what
    OpenSSL's ECDH returns and the firmware reverses its CCP output into)."""
    shared = peer_point * private_d
    if shared.is_point_at_infinity():
        raise ValueError("ECDH result is the point at infinity")
    return int(shared.x).to_bytes(48, "big")


def scalar_from(material):
    """A P-384 private scalar in [1, n-1] from at least 56 bytes of key material."""
    return int.from_bytes(material, "big") % (P384_ORDER - 1) + 1


def p384_key(d):
    return ECC.construct(curve="P-384", d=d)


# -- session (the 128-byte blob of LAUNCH_START, SEND_START and RECEIVE_START) ------------------

def master_secret(z, nonce):
    return kdf(z, "sev-master-secret", nonce, 16)


def kek_kik(master):
    return kdf(master, "sev-kek", b"", 16), kdf(master, "sev-kik", b"", 16)


def make_session(master, nonce, wrap_iv, tek, tik, policy):
    """The session blob: nonce, TEK||TIK wrapped under the KEK, the KIK's MAC of the wrapped keys,
    and the TIK's MAC of the policy (``create_session``)."""
    kek, kik = kek_kik(master)
    wrap_tk = aes128_ctr(kek, wrap_iv, tek + tik)
    return (nonce + wrap_tk + wrap_iv + hmac256(kik, wrap_tk)
            + hmac256(tik, le32(policy)))


def split_session(session):
    """(nonce, wrap_tk, wrap_iv, wrap_mac, policy_mac) of a 128-byte session blob."""
    s = bytes(session)
    return s[0:16], s[16:48], s[48:64], s[64:96], s[96:128]


def open_session(master, session):
    """(tek, tik) from a session blob, or None when its wrap MAC is wrong (``establish_channel``:
    the MAC is checked before anything is decrypted)."""
    _, wrap_tk, wrap_iv, wrap_mac, _ = split_session(session)
    kek, kik = kek_kik(master)
    if not hmac.compare_digest(hmac256(kik, wrap_tk), wrap_mac):
        return None
    keys = aes128_ctr(kek, wrap_iv, wrap_tk)
    return keys[:16], keys[16:]


def policy_mac_ok(tik, policy, mac):
    return hmac.compare_digest(hmac256(tik, le32(policy)), bytes(mac))


# -- measurement and packets --------------------------------------------------------------------

def measurement(tik, api_major, api_minor, build, policy, digest, mnonce, with_prefix=True):
    """LAUNCH_MEASURE's HMAC. API < 0.17 has no ``0x04 || major || minor || build`` prefix."""
    prefix = bytes([CTX_MEASURE, api_major, api_minor, build]) if with_prefix else b""
    return hmac256(tik, prefix, le32(policy), digest, mnonce)


def packet_mac(tik, ctx, flags, iv, guest_len, trans_len, ciphertext, suffix=b""):
    """The MAC of a packet header: ``HMAC(TIK, ctx || flags || iv || len || len || ct [|| M])``
    (``sev_channel_hmac``; the firmware's ``size_t`` lengths are 4 bytes on the PSP)."""
    return hmac256(tik, bytes([ctx]), le32(flags), iv, le32(guest_len), le32(trans_len),
                   ciphertext, suffix)


def packet_header(flags, iv, mac):
    return le32(flags) + bytes(iv) + bytes(mac)


# -- deterministic randomness -------------------------------------------------------------------

class Drbg:
    """The simulated TRNG of one PSP: an AES-256-CTR keystream keyed from a seed, so that a run is
    reproducible. Draws happen in the order the firmware makes them."""

    def __init__(self, seed, label=b"sevcore psp trng"):
        key = hashlib.sha256(label + b"\0" + seed_bytes(seed)).digest()
        self._aes = AES.new(key, AES.MODE_CTR, nonce=b"\0" * 8)

    def __call__(self, n):
        return self._aes.encrypt(b"\0" * n)


def seed_bytes(seed):
    """A stable byte form of a Host seed (an int, bytes or str)."""
    if isinstance(seed, (bytes, bytearray)):
        return bytes(seed)
    if isinstance(seed, int):
        return seed.to_bytes((seed.bit_length() + 8) // 8 or 1, "little", signed=True)
    return repr(seed).encode()


# -- secp256k1 (GET_ID only: the ID is the chip-unique key's public point on this curve) ---------

_K1_P = 2**256 - 2**32 - 977
_K1_G = (0x79BE667EF9DCBBAC55A06295CE870B07029BFCDB2DCE28D959F2815B16F81798,
         0x483ADA7726A3C4655DA4FBFC0E1108A8FD17B448A68554199C47D08FFB10D4B8)


def _k1_add(a, b):
    if a is None:
        return b
    if b is None:
        return a
    if a[0] == b[0] and (a[1] + b[1]) % _K1_P == 0:
        return None
    if a == b:
        lam = 3 * a[0] * a[0] * pow(2 * a[1], -1, _K1_P)
    else:
        lam = (b[1] - a[1]) * pow(b[0] - a[0], -1, _K1_P)
    x = (lam * lam - a[0] - b[0]) % _K1_P
    return x, (lam * (a[0] - x) - a[1]) % _K1_P


def secp256k1_public(d):
    """``d * G`` on secp256k1 as (x, y) ([FW] ``sev_get_id``)."""
    result, addend = None, _K1_G
    while d:
        if d & 1:
            result = _k1_add(result, addend)
        addend = _k1_add(addend, addend)
        d >>= 1
    return result
