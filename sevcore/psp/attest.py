"""SEV-SNP attestation: the chip's VCEK and its X.509 certificate, the signed attestation report,
derived keys, and the guest message protocol that carries them (AMD SEV-SNP Firmware ABI,
publication 56860, "Guest Messages"; the kernel's ``drivers/virt/coco/sev-guest/sev-guest.c``).

Guest messages: a 4 KiB page holding ``struct snp_guest_msg_hdr`` (96 bytes) and the payload,
sealed with AES-256-GCM under one of the four VMPCKs the firmware put in the guest's secrets page.
The IV is the 64-bit message sequence number, little-endian, zero-padded to 12 bytes; the
additional data are the header's 48 bytes from ``algo`` on; the 16-byte tag goes in ``authtag``
(``enc_payload``/``verify_and_dec_payload`` in sev-guest.c). The firmware accepts a request only
with the sequence number one past the last it saw for that key and answers with the next one, so
a replayed or reordered request is refused.

The VCEK is an ECDSA P-384 key the firmware derives from the chip's secret and the reported TCB
(56860 "VCEK"); AMD's Key Distribution Service certifies it with the ASK, as
:func:`vcek_certificate` does with the simulated ASK (AMD publication 57230: the TCB components
and the hardware id as extensions). :func:`verify_report` checks a report against a VCEK public
key with no firmware in the loop.
"""
import functools
import hashlib
import struct

from Crypto.Cipher import AES
from Crypto.Hash import SHA384
from Crypto.PublicKey import ECC
from Crypto.Signature import DSS

from sevcore import uapi as U
from sevcore.psp import amd_root
from sevcore.psp import snp_layout as S
from sevcore.psp import x509 as X
from sevcore.psp.crypto import P384_ORDER, kdf, scalar_from

try:  # OpenSSL signs P-384 in a fraction of pycryptodome's time; both sign RFC 6979 alike.
    from cryptography.hazmat.primitives import hashes as _c_hashes
    from cryptography.hazmat.primitives.asymmetric import ec as _c_ec
    from cryptography.hazmat.primitives.asymmetric.utils import \
        decode_dss_signature as _c_decode
    _C_ECDSA = _c_ec.ECDSA(_c_hashes.SHA384(), deterministic_signing=True)
except (ImportError, TypeError, AttributeError):        # no cryptography, or one before 43
    _C_ECDSA = None

HDR = S.snp_guest_msg_hdr
HDR_SIZE = HDR.size
PAYLOAD_MAX = U.SNP_GUEST_MSG_SIZE - HDR_SIZE
REPORT_SIZE = S.snp_attestation_report.size
SIG_ALGO_ECDSA_P384_SHA384 = 1
#: The report version the simulated firmware writes (56860 rev. 1.55: version 3 adds the
#: CPUID family, model and stepping).
REPORT_VERSION = 3
_AAD_OFF = HDR.offsets["algo"]


class GuestMsgError(ValueError):
    """A guest message that does not authenticate or is malformed."""


# -- TCB -------------------------------------------------------------------------------------------

def tcb_version(boot_loader, tee, snp, microcode):
    """The 64-bit TCB_VERSION of Genoa/Milan (``struct sev_snp_tcb_version_genoa_milan``:
    boot loader byte 0, TEE byte 1, SNP byte 6, microcode byte 7)."""
    return boot_loader | tee << 8 | snp << 48 | microcode << 56


def tcb_parts(tcb):
    return {"boot_loader": tcb & 0xFF, "tee": (tcb >> 8) & 0xFF, "snp": (tcb >> 48) & 0xFF,
            "microcode": (tcb >> 56) & 0xFF}


# -- ECDSA P-384 ---------------------------------------------------------------------------------

@functools.lru_cache(maxsize=64)
def _keys(d):
    py = ECC.construct(curve="P-384", d=d)
    c = _c_ec.derive_private_key(d, _c_ec.SECP384R1()) if _C_ECDSA is not None else None
    return py, c


def public_point(d):
    """(x, y) of the public key of scalar ``d``."""
    q = _keys(d)[0].pointQ
    return int(q.x), int(q.y)


def sign(d, msg):
    """(r, s): ECDSA P-384 with SHA-384, deterministic (RFC 6979), of ``msg`` under ``d``."""
    py, c = _keys(d)
    if c is not None:
        return _c_decode(c.sign(bytes(msg), _C_ECDSA))
    sig = DSS.new(py, "deterministic-rfc6979").sign(SHA384.new(bytes(msg)))
    return int.from_bytes(sig[:48], "big"), int.from_bytes(sig[48:], "big")


def verify(point, msg, r, s):
    """True if (r, s) is a valid ECDSA P-384/SHA-384 signature of ``msg`` by ``point``."""
    if not (0 < r < P384_ORDER and 0 < s < P384_ORDER):
        return False
    try:
        key = ECC.construct(curve="P-384", point_x=point[0], point_y=point[1])
        DSS.new(key, "fips-186-3").verify(SHA384.new(bytes(msg)),
                                          r.to_bytes(48, "big") + s.to_bytes(48, "big"))
        return True
    except ValueError:
        return False


def sig_bytes(r, s):
    """56860's 512-byte ECDSA signature: R and S little-endian in 72 bytes each."""
    return S.snp_ecdsa_sig.pack(r=r.to_bytes(72, "little"), s=s.to_bytes(72, "little"))


def sig_values(raw):
    f = S.snp_ecdsa_sig.unpack(raw)
    return int.from_bytes(f["r"], "little"), int.from_bytes(f["s"], "little")


def pubkey_bytes(point):
    """56860's 1028-byte ECDSA public key: curve 2 (P-384), Qx and Qy little-endian."""
    return S.snp_ecdsa_pubkey.pack(curve=2, qx=point[0].to_bytes(72, "little"),
                                   qy=point[1].to_bytes(72, "little"))


def pubkey_point(raw):
    """(curve, (x, y)) of a 56860 public key."""
    f = S.snp_ecdsa_pubkey.unpack(raw)
    return f["curve"], (int.from_bytes(f["qx"], "little"), int.from_bytes(f["qy"], "little"))


# -- the chip's keys ---------------------------------------------------------------------------

def chip_id(cuk):
    """The 64-byte CHIP_ID of the chip with unique key ``cuk`` (the VCEK's hwID)."""
    return hashlib.sha512(b"sevcore snp chip id\0" + cuk).digest()


def vcek_scalar(cuk, tcb):
    """The VCEK private scalar: the chip secret and the TCB it reports through a KDF, so every TCB
    has its own key and a chip's key for one TCB says nothing about another (56860 "VCEK")."""
    return scalar_from(kdf(cuk, "sev-snp-vcek", struct.pack("<Q", tcb), 56))


@functools.lru_cache(maxsize=16)
def vcek_certificate(cuk, tcb, product="Genoa"):
    """The VCEK certificate (DER) AMD's KDS would issue for this chip and TCB, signed by the
    simulated ASK: the TCB components and the hardware id as the extensions of publication 57230
    (OIDs 1.3.6.1.4.1.3704.1.*)."""
    d = vcek_scalar(cuk, tcb)
    x, y = public_point(d)
    parts = tcb_parts(tcb)
    ext = [X.extension("1.3.6.1.4.1.3704.1.1", X.integer(1)),
           X.extension("1.3.6.1.4.1.3704.1.2", X.ia5(product)),
           X.extension("1.3.6.1.4.1.3704.1.3.1", X.integer(parts["boot_loader"])),
           X.extension("1.3.6.1.4.1.3704.1.3.2", X.integer(parts["tee"])),
           *[X.extension(f"1.3.6.1.4.1.3704.1.3.{i}", X.integer(0)) for i in (4, 5, 6, 7)],
           X.extension("1.3.6.1.4.1.3704.1.3.3", X.integer(parts["snp"])),
           X.extension("1.3.6.1.4.1.3704.1.3.8", X.integer(parts["microcode"])),
           X.extension("1.3.6.1.4.1.3704.1.4", chip_id(cuk))]
    serial = int.from_bytes(hashlib.sha256(chip_id(cuk) + struct.pack("<Q", tcb)).digest()[:8],
                            "big") >> 1
    tbs = X.tbs(serial, X.name(amd_root.AMD_NAME + [("CN", amd_root.ASK_NAME)]),
                X.name(amd_root.AMD_NAME + [("CN", amd_root.VCEK_NAME)]),
                X.utc(2020, 1, 1), X.utc(2049, 12, 31), X.ec_spki(x, y), ext)
    salt = hashlib.sha384(b"vcek-salt" + tbs).digest()
    return X.sign_rsa_pss(tbs, amd_root.ask_key(), salt)


# -- reports ---------------------------------------------------------------------------------------

def sign_report(body, d):
    """The 1184-byte report: ``body`` (its first 0x2A0 bytes) and the signature by ``d``."""
    signed = bytes(body[:S.REPORT_SIGNED_SIZE])
    r, s = sign(d, signed)
    return signed + sig_bytes(r, s)[:REPORT_SIZE - S.REPORT_SIGNED_SIZE]


def verify_report(report, point):
    """True if ``report``'s signature (ECDSA P-384/SHA-384 over bytes [0, 0x2A0)) is by
    ``point``."""
    r, s = sig_values(bytes(report[S.REPORT_SIGNED_SIZE:]).ljust(512, b"\0"))
    return verify(point, report[:S.REPORT_SIGNED_SIZE], r, s)


# -- guest messages ------------------------------------------------------------------------------

def _iv(seqno):
    return struct.pack("<Q", seqno) + bytes(4)


def seal_msg(vmpck, seqno, msg_type, payload, *, vmpck_id, msg_version=1):
    """The 4 KiB message page carrying ``payload`` sealed under ``vmpck`` as message
    ``seqno`` (what ``enc_payload`` builds in the guest and the firmware for its answer)."""
    if len(payload) > PAYLOAD_MAX:
        raise ValueError(f"payload of {len(payload)} bytes exceeds {PAYLOAD_MAX}")
    hdr = bytearray(HDR.pack(msg_seqno=seqno, algo=U.SNP_AEAD_AES_256_GCM,
                             hdr_version=U.MSG_HDR_VER, hdr_sz=HDR_SIZE, msg_type=msg_type,
                             msg_version=msg_version, msg_sz=len(payload), msg_vmpck=vmpck_id))
    c = AES.new(vmpck, AES.MODE_GCM, nonce=_iv(seqno), mac_len=U.AUTHTAG_LEN)
    c.update(bytes(hdr[_AAD_OFF:_AAD_OFF + U.AAD_LEN]))
    ct, tag = c.encrypt_and_digest(bytes(payload))
    hdr[:U.AUTHTAG_LEN] = tag
    return (bytes(hdr) + ct).ljust(U.SNP_GUEST_MSG_SIZE, b"\0")


def msg_header(page):
    """The header fields of a message page (a dict)."""
    return HDR.unpack(bytes(page[:HDR_SIZE]))


def open_msg(vmpck, page):
    """(header dict, payload) of a message page sealed under ``vmpck``; GuestMsgError if the
    header is malformed or the tag does not authenticate."""
    page = bytes(page)
    h = HDR.unpack(page[:HDR_SIZE])
    if (h["algo"] != U.SNP_AEAD_AES_256_GCM or h["hdr_version"] != U.MSG_HDR_VER
            or h["hdr_sz"] != HDR_SIZE or h["msg_sz"] > PAYLOAD_MAX):
        raise GuestMsgError("malformed message header")
    c = AES.new(vmpck, AES.MODE_GCM, nonce=_iv(h["msg_seqno"]), mac_len=U.AUTHTAG_LEN)
    c.update(page[_AAD_OFF:_AAD_OFF + U.AAD_LEN])
    try:
        payload = c.decrypt_and_verify(page[HDR_SIZE:HDR_SIZE + h["msg_sz"]],
                                       page[:U.AUTHTAG_LEN])
    except ValueError:
        raise GuestMsgError("message does not authenticate") from None
    return h, payload
