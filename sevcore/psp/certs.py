"""SEV and AMD certificates: formats, signing, and the firmware's validation rules.

**SEV certificate** (2084 = 0x824 bytes; AMD-ASPFW ``sev_cert.h``, sev-tool ``sevcert.cpp``)::

    0x000 version u32 (1)      0x004 api_major u8   0x005 api_minor u8   0x006 reserved[2]
    0x008 pubkey: usage u32, algo u32, key[1028]        (EC: curve u32, qx[72], qy[72];
                                                         RSA: modulus_size_bits u32, pub_exp[512],
                                                         modulus[512])
    0x414 sig1: usage u32, algo u32, sig[512]           (ECDSA: r[72], s[72]; RSA: s[512])
    0x61C sig2: usage u32, algo u32, sig[512]

Every number is little-endian, EC coordinates and signature values included. A signature covers
the body, bytes 0x000-0x413, hashed with SHA-256 or SHA-384 as its algorithm says.

**AMD certificate** (ARK, ASK; ``amd_cert.h``): a 64-byte fixed part (version u32, key_id[16],
certifying_id[16], key_usage u32, reserved[16], pubexp_size_bits u32, modulus_size_bits u32),
then the public exponent and the modulus (little-endian, each as wide as its size field says),
then an RSA-PSS signature (SHA-384, MGF1-SHA-384, little-endian) over everything before it.

The ``validate*`` functions return the firmware's status code (0 for success) with its check order
(``sev_cert_validate``: signature first, then body, then which key may sign which usage;
``amd_cert_validate``); they never raise on bad input.
"""
import hashlib
import struct

from Crypto.Hash import SHA256, SHA384
from Crypto.PublicKey import ECC, RSA
from Crypto.Signature import DSS, pss

from sevcore import uapi as U

CERT_SIZE = 0x824
BODY_SIZE = 0x414
PUBKEY_SIZE = BODY_SIZE - 8          # sev_cert_pubkey_t: usage, algo, key union
SIG1, SIG2 = 0x414, 0x61C
CHAIN_SIZE = 3 * CERT_SIZE           # PEK || OCA || CEK

USAGE_ARK = 0x0000
USAGE_ASK = 0x0013
USAGE_INVALID = 0x1000
USAGE_OCA = 0x1001
USAGE_PEK = 0x1002
USAGE_PDH = 0x1003
USAGE_CEK = 0x1004
_USAGES = {USAGE_ARK, USAGE_ASK, USAGE_OCA, USAGE_PEK, USAGE_PDH, USAGE_CEK}

ALGO_INVALID = 0x000
ALGO_RSA_SHA256 = 0x001
ALGO_ECDSA_SHA256 = 0x002
ALGO_ECDH_SHA256 = 0x003
ALGO_RSA_SHA384 = 0x101
ALGO_ECDSA_SHA384 = 0x102
ALGO_ECDH_SHA384 = 0x103
_RSA = {ALGO_RSA_SHA256, ALGO_RSA_SHA384}
_EC = {ALGO_ECDSA_SHA256, ALGO_ECDH_SHA256, ALGO_ECDSA_SHA384, ALGO_ECDH_SHA384}
_SHA384 = {ALGO_RSA_SHA384, ALGO_ECDSA_SHA384, ALGO_ECDH_SHA384}

CURVE_P384 = 2
EC_COORD = 72
RSA_BYTES = 512
PSS_SALT = 48                        # what the simulated AMD and CEK signers use

OK = U.SEV_RET_SUCCESS
BAD_CERT = U.SEV_RET_INVALID_CERTIFICATE
BAD_SIG = U.SEV_RET_BAD_SIGNATURE

_U32 = struct.Struct("<I")


def _u32(buf, off):
    return _U32.unpack_from(buf, off)[0]


def hash_for(algo):
    return SHA384 if algo in _SHA384 else SHA256


# -- SEV certificates: building and signing ----------------------------------------------------------

def ec_pubkey(usage, algo, point):
    """A sev_cert_pubkey_t (1036 bytes) holding a P-384 point."""
    key = bytearray(PUBKEY_SIZE)
    struct.pack_into("<III", key, 0, usage, algo, CURVE_P384)
    key[12:12 + 48] = int(point.x).to_bytes(48, "little")
    key[12 + EC_COORD:12 + EC_COORD + 48] = int(point.y).to_bytes(48, "little")
    return bytes(key)


def rsa_pubkey(usage, algo, n, e, bits):
    """A sev_cert_pubkey_t holding an RSA key (modulus_size_bits, pub_exp[512], modulus[512])."""
    key = bytearray(PUBKEY_SIZE)
    struct.pack_into("<III", key, 0, usage, algo, bits)
    key[12:12 + RSA_BYTES] = e.to_bytes(RSA_BYTES, "little")
    key[12 + RSA_BYTES:12 + 2 * RSA_BYTES] = n.to_bytes(RSA_BYTES, "little")
    return bytes(key)


def new_cert(pubkey, api_major=0, api_minor=0):
    """An unsigned certificate for ``pubkey`` (``sev_cert_init`` + ``sev_cert_set_pubkey``)."""
    cert = bytearray(CERT_SIZE)
    struct.pack_into("<IBB", cert, 0, 1, api_major, api_minor)
    cert[8:BODY_SIZE] = pubkey
    for off in (SIG1, SIG2):
        struct.pack_into("<II", cert, off, USAGE_INVALID, ALGO_INVALID)
    return cert


def set_sig(cert, usage, algo, value):
    """Put a signature in the first unused slot (``sev_cert_set_sig``); returns the status."""
    for off in (SIG1, SIG2):
        if _u32(cert, off) == USAGE_INVALID:
            struct.pack_into("<II", cert, off, usage, algo)
            cert[off + 8:off + 8 + RSA_BYTES] = bytes(RSA_BYTES)
            cert[off + 8:off + 8 + len(value)] = value
            return OK
    return BAD_CERT


def sig_slot(cert, index):
    """(usage, algo, value) of signature 1 or 2; the value is the 512-byte union as stored."""
    off = SIG1 if index == 1 else SIG2
    return _u32(cert, off), _u32(cert, off + 4), bytes(cert[off + 8:off + 8 + RSA_BYTES])


def ecdsa_value(key, algo, message):
    """An ECDSA signature of ``message`` as the firmware stores it: r[72] || s[72], little-endian.
    The nonce is derived deterministically (RFC 6979), so runs reproduce."""
    rs = DSS.new(key, "deterministic-rfc6979").sign(hash_for(algo).new(message))
    r, s = rs[:48], rs[48:]
    return (int.from_bytes(r, "big").to_bytes(EC_COORD, "little")
            + int.from_bytes(s, "big").to_bytes(EC_COORD, "little"))


def sign_ec(cert, usage, algo, key):
    """Sign the body with an ECDSA key of ``usage``/``algo`` (``sev_cert_sign``)."""
    return set_sig(cert, usage, algo, ecdsa_value(key, algo, bytes(cert[:BODY_SIZE])))


def rsa_pss_value(key, algo, message, salt):
    """An RSA-PSS signature over ``message`` (MGF1 and digest of ``algo``), little-endian."""
    sig = pss.new(key, salt_bytes=len(salt), rand_func=lambda n: salt[:n]).sign(
        hash_for(algo).new(message))
    return sig[::-1]


def sign_rsa(cert, usage, algo, key, salt):
    return set_sig(cert, usage, algo, rsa_pss_value(key, algo, bytes(cert[:BODY_SIZE]), salt))


# -- SEV certificates: reading ------------------------------------------------------------------------

def pubkey_of(cert):
    return bytes(cert[8:BODY_SIZE])


def key_usage(pubkey):
    return _u32(pubkey, 0)


def key_algo(pubkey):
    return _u32(pubkey, 4)


def ec_point_of(pubkey):
    """The P-384 public key in a sev_cert_pubkey_t, or None if it is not a point on P-384 (or
    too short to hold one)."""
    if len(pubkey) < 12 + 2 * EC_COORD or _u32(pubkey, 8) != CURVE_P384:
        return None
    qx = int.from_bytes(pubkey[12:12 + EC_COORD], "little")
    qy = int.from_bytes(pubkey[12 + EC_COORD:12 + 2 * EC_COORD], "little")
    try:
        return ECC.construct(curve="P-384", point_x=qx, point_y=qy)
    except ValueError:
        return None


def rsa_key_of(pubkey):
    """(RSA key, modulus bytes) of an RSA sev_cert_pubkey_t, or (None, 0)."""
    bits = _u32(pubkey, 8)
    nbytes = bits // 8
    if not 0 < nbytes <= RSA_BYTES:
        return None, 0
    e = int.from_bytes(pubkey[12:12 + nbytes], "little")
    n = int.from_bytes(pubkey[12 + RSA_BYTES:12 + RSA_BYTES + nbytes], "little")
    try:
        return RSA.construct((n, e), consistency_check=False), nbytes
    except ValueError:
        return None, 0


def pubkey_is_valid(pubkey):
    """``pubkey_is_valid``: a known usage, and an RSA key of at most 4096 bits or a point on
    P-384."""
    if key_usage(pubkey) not in _USAGES:
        return False
    algo = key_algo(pubkey)
    if algo in _RSA:
        return _u32(pubkey, 8) <= RSA_BYTES * 8
    if algo in _EC:
        return ec_point_of(pubkey) is not None
    return False


def _body_status(cert):
    if _u32(cert, 0) != 1 or not pubkey_is_valid(pubkey_of(cert)):
        return BAD_CERT
    return OK


def verify_signature(signer, value, message):
    """Verify one signature value made by ``signer`` (a sev_cert_pubkey_t): SUCCESS, or the
    status the firmware reports for a bad signature."""
    algo = key_algo(signer)
    h = hash_for(algo).new(message)
    if algo in _RSA:
        key, nbytes = rsa_key_of(signer)
        if key is None:
            return BAD_SIG
        try:
            pss.new(key, salt_bytes=PSS_SALT).verify(h, value[:nbytes][::-1])
        except (ValueError, TypeError):
            return BAD_SIG
        return OK
    if algo in _EC:
        key = ec_point_of(signer)
        r = int.from_bytes(value[:EC_COORD], "little")
        s = int.from_bytes(value[EC_COORD:2 * EC_COORD], "little")
        if key is None or r >= 1 << 384 or s >= 1 << 384:
            return BAD_SIG
        try:
            DSS.new(key, "fips-186-3").verify(h, r.to_bytes(48, "big") + s.to_bytes(48, "big"))
        except ValueError:
            return BAD_SIG
        return OK
    return U.SEV_RET_UNSUPPORTED


def validate_sig(cert, signer):
    """``sev_cert_validate_sig``: the status of the signature(s) ``signer`` made on ``cert``.
    A half-filled slot is BAD_SIGNATURE; no slot of the signer's usage and algorithm is
    INVALID_CERTIFICATE; otherwise the last matching slot decides."""
    if not pubkey_is_valid(signer):
        return BAD_CERT
    status = BAD_CERT
    body = bytes(cert[:BODY_SIZE])
    for index in (1, 2):
        usage, algo, value = sig_slot(cert, index)
        if (algo == ALGO_INVALID) != (usage == USAGE_INVALID):
            return BAD_SIG
        if algo != key_algo(signer) or usage != key_usage(signer):
            continue
        status = verify_signature(signer, value, body)
        if status not in (OK, BAD_SIG):
            return status
    return status


_SIGNED_BY = {USAGE_PDH: {USAGE_PEK}, USAGE_PEK: {USAGE_OCA, USAGE_CEK},
              USAGE_OCA: {USAGE_OCA}, USAGE_CEK: {USAGE_ASK}}


def validate(cert, signer):
    """``sev_cert_validate``: ``cert`` is well formed and signed by ``signer`` (a
    sev_cert_pubkey_t) of a usage allowed to sign it. Returns the firmware status."""
    if len(cert) != CERT_SIZE or not pubkey_is_valid(signer):
        return BAD_CERT
    status = validate_sig(cert, signer)
    if status != OK:
        return status
    status = _body_status(cert)
    if status != OK:
        return status
    if key_usage(signer) not in _SIGNED_BY.get(key_usage(pubkey_of(cert)), ()):
        return BAD_CERT
    return OK


def sanity_check(cert, usage, algo):
    """``sev_cert_sanity_check``: a well-formed body whose key has ``usage`` and ``algo``."""
    status = _body_status(cert)
    if status != OK:
        return status
    key = pubkey_of(cert)
    if key_usage(key) != usage or key_algo(key) != algo:
        return BAD_CERT
    return OK


# -- AMD certificates (ARK, ASK) -------------------------------------------------------------------

AMD_FIXED = struct.Struct("<I16s16sI16sII")      # 64 bytes
AMD_CERT_VERSION = 1
AMD_KEY_BITS = (2048, 4096)
AMD_CERT_MAX = AMD_FIXED.size + 3 * 4096 // 8


class AmdCert:
    """A parsed AMD certificate (``amd_cert_init``)."""

    def __init__(self, buf, limit=AMD_CERT_MAX):
        if len(buf) < AMD_FIXED.size:
            raise ValueError(f"an AMD certificate of {len(buf)} bytes has no fixed part "
                             f"({AMD_FIXED.size} bytes)")
        (self.version, self.key_id, self.certifying_id, self.key_usage, _,
         self.pubexp_bits, self.modulus_bits) = AMD_FIXED.unpack_from(buf)
        eb, mb = self.pubexp_bits // 8, self.modulus_bits // 8
        if (eb >= limit or mb >= limit or AMD_FIXED.size + eb + 2 * mb > limit
                or AMD_FIXED.size + eb + 2 * mb > len(buf)):
            raise ValueError("AMD certificate sizes out of range")
        off = AMD_FIXED.size
        self.fixed = bytes(buf[:off])
        self.pubexp = bytes(buf[off:off + eb])
        self.modulus = bytes(buf[off + eb:off + eb + mb])
        self.signature = bytes(buf[off + eb + mb:off + eb + 2 * mb])
        self.size = off + eb + 2 * mb

    def signed_part(self):
        return self.fixed + self.pubexp + self.modulus

    def rsa(self):
        return RSA.construct((int.from_bytes(self.modulus, "little"),
                              int.from_bytes(self.pubexp, "little")), consistency_check=False)

    def pubkey_hash(self):
        """SHA-384 of the fixed part, exponent and modulus (``amd_cert_public_key_hash``)."""
        return hashlib.sha384(self.signed_part()).digest()

    def sev_pubkey(self):
        """The ASK as a sev_cert_pubkey_t (``amd_cert_export_pubkey``: algo RSA_SHA384)."""
        key = bytearray(PUBKEY_SIZE)
        struct.pack_into("<III", key, 0, self.key_usage, ALGO_RSA_SHA384, self.modulus_bits)
        key[12:12 + len(self.pubexp)] = self.pubexp
        key[12 + RSA_BYTES:12 + RSA_BYTES + len(self.modulus)] = self.modulus
        return bytes(key)


def amd_cert_build(key_id, certifying_id, usage, n, e, bits, signer, salt):
    """An AMD certificate for the RSA key (n, e), signed by ``signer`` (an RSA private key)."""
    nbytes = bits // 8
    body = (AMD_FIXED.pack(AMD_CERT_VERSION, key_id, certifying_id, usage, bytes(16), bits, bits)
            + e.to_bytes(nbytes, "little") + n.to_bytes(nbytes, "little"))
    sig = pss.new(signer, salt_bytes=len(salt), rand_func=lambda k: salt[:k]).sign(
        SHA384.new(body))
    return body + sig[::-1]


def amd_validate(cert, parent, usage):
    """``amd_cert_validate``: signature (by ``parent``) first, then version and key sizes, then
    usage and certifying id. Returns the firmware status."""
    if cert.modulus_bits not in AMD_KEY_BITS or cert.pubexp_bits not in AMD_KEY_BITS:
        return BAD_CERT
    try:
        pss.new(parent.rsa(), salt_bytes=PSS_SALT).verify(
            SHA384.new(cert.signed_part()), cert.signature[:len(parent.modulus)][::-1])
    except (ValueError, TypeError):
        return BAD_SIG
    if cert.version != AMD_CERT_VERSION:
        return BAD_CERT
    if cert.key_usage != usage or cert.certifying_id != parent.key_id:
        return BAD_CERT
    return OK


def amd_chain_length_is_valid(length):
    """``amd_cert_chain_length_is_valid``: one of the four ASK||ARK sizes (2K/4K keys)."""
    sizes = (256, 512)
    return any(length == 2 * AMD_FIXED.size + 2 * a + 4 * r for a in sizes for r in sizes)
