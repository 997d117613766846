"""Just enough DER to issue X.509 v3 certificates (ITU-T X.690, RFC 5280): the ARK, ASK and VCEK
certificates of the simulated AMD root, shaped as AMD's Key Distribution Service issues them
(AMD publication 57230, "Versioned Chip Endorsement Key (VCEK) Certificate and KDS Interface
Specification": RSASSA-PSS with SHA-384 for the ARK and ASK, ECDSA P-384 VCEK keys, the VCEK's
TCB and hardware-id extensions). Signing uses pycryptodome, so the firmware needs no X.509
library; ``openssl verify`` and the ``cryptography`` package read the results (tests).
"""
import base64
import datetime

from Crypto.Hash import SHA384
from Crypto.Signature import pss

# -- DER primitives ----------------------------------------------------------------------------


def tlv(tag, content):
    n = len(content)
    if n < 0x80:
        head = bytes([n])
    else:
        raw = n.to_bytes((n.bit_length() + 7) // 8, "big")
        head = bytes([0x80 | len(raw)]) + raw
    return bytes([tag]) + head + content


def integer(v):
    raw = v.to_bytes(max(1, (v.bit_length() + 8) // 8), "big", signed=True)
    return tlv(0x02, raw)


def oid(dotted):
    parts = [int(p) for p in dotted.split(".")]
    out = bytearray([40 * parts[0] + parts[1]])
    for p in parts[2:]:
        chunk = [p & 0x7F]
        p >>= 7
        while p:
            chunk.append(0x80 | (p & 0x7F))
            p >>= 7
        out += bytes(reversed(chunk))
    return tlv(0x06, bytes(out))


def seq(*items):
    return tlv(0x30, b"".join(items))


def set_(*items):
    return tlv(0x31, b"".join(items))


def octets(b):
    return tlv(0x04, bytes(b))


def bits(b):
    return tlv(0x03, b"\0" + bytes(b))


def utf8(s):
    return tlv(0x0C, s.encode())


def printable(s):
    return tlv(0x13, s.encode())


def ia5(s):
    return tlv(0x16, s.encode())


def explicit(n, content):
    return tlv(0xA0 | n, content)


NULL = b"\x05\x00"
TRUE = b"\x01\x01\xff"


def time(dt):
    """UTCTime through 2049, GeneralizedTime after (RFC 5280 4.1.2.5)."""
    if dt.year < 2050:
        return tlv(0x17, dt.strftime("%y%m%d%H%M%SZ").encode())
    return tlv(0x18, dt.strftime("%Y%m%d%H%M%SZ").encode())


# -- the pieces of a certificate -----------------------------------------------------------------

OID_RSA = "1.2.840.113549.1.1.1"
OID_RSASSA_PSS = "1.2.840.113549.1.1.10"
OID_MGF1 = "1.2.840.113549.1.1.8"
OID_SHA384 = "2.16.840.1.101.3.4.2.2"
OID_EC_PUBLIC_KEY = "1.2.840.10045.2.1"
OID_SECP384R1 = "1.3.132.0.34"
OID_BASIC_CONSTRAINTS = "2.5.29.19"
OID_KEY_USAGE = "2.5.29.15"
OID_SUBJECT_KEY_ID = "2.5.29.14"
_ATTR = {"C": "2.5.4.6", "ST": "2.5.4.8", "L": "2.5.4.7", "O": "2.5.4.10", "OU": "2.5.4.11",
         "CN": "2.5.4.3"}

#: RSASSA-PSS with SHA-384, MGF1-SHA-384 and a 48-byte salt (RFC 4055 3.1), AMD's ARK/ASK
#: signature algorithm.
RSA_PSS_SHA384 = seq(oid(OID_RSASSA_PSS), seq(
    explicit(0, seq(oid(OID_SHA384), NULL)),
    explicit(1, seq(oid(OID_MGF1), seq(oid(OID_SHA384), NULL))),
    explicit(2, integer(48))))


def name(pairs):
    """A distinguished name from (attribute, value) pairs in order (C as PrintableString)."""
    rdns = []
    for attr, value in pairs:
        enc = printable(value) if attr == "C" else utf8(value)
        rdns.append(set_(seq(oid(_ATTR[attr]), enc)))
    return seq(*rdns)


def rsa_spki(n, e):
    return seq(seq(oid(OID_RSA), NULL), bits(seq(integer(n), integer(e))))


def ec_spki(x, y):
    """A P-384 public key (uncompressed point)."""
    return seq(seq(oid(OID_EC_PUBLIC_KEY), oid(OID_SECP384R1)),
               bits(b"\x04" + x.to_bytes(48, "big") + y.to_bytes(48, "big")))


def extension(dotted, value, critical=False):
    return seq(oid(dotted), *([TRUE] if critical else []), octets(value))


def ca_extensions(ski):
    """basicConstraints CA:TRUE and keyUsage keyCertSign|cRLSign, both critical, and the key id."""
    return [extension(OID_BASIC_CONSTRAINTS, seq(TRUE), critical=True),
            extension(OID_KEY_USAGE, tlv(0x03, b"\x01\x06"), critical=True),
            extension(OID_SUBJECT_KEY_ID, octets(ski))]


def tbs(serial, issuer, subject, not_before, not_after, spki, extensions):
    return seq(explicit(0, integer(2)), integer(serial), RSA_PSS_SHA384, issuer,
               seq(time(not_before), time(not_after)), subject, spki,
               explicit(3, seq(*extensions)))


def sign_rsa_pss(tbs_der, rsa_key, salt):
    """The certificate: ``tbs_der`` signed RSASSA-PSS/SHA-384 by ``rsa_key`` (pycryptodome) with
    the 48-byte ``salt`` (given, so a certificate can be reissued byte for byte)."""
    sig = pss.new(rsa_key, salt_bytes=48, rand_func=lambda n: salt[:n]).sign(SHA384.new(tbs_der))
    return seq(tbs_der, RSA_PSS_SHA384, bits(sig))


def utc(y, m, d):
    return datetime.datetime(y, m, d, tzinfo=datetime.timezone.utc)


def pem(der):
    b64 = base64.b64encode(der).decode()
    body = "\n".join(b64[i:i + 64] for i in range(0, len(b64), 64))
    return f"-----BEGIN CERTIFICATE-----\n{body}\n-----END CERTIFICATE-----\n"
