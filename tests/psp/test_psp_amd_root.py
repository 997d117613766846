"""The simulated AMD root (ARK, ASK) and the certificate formats, checked with an independent
verifier (pyca/cryptography) where it can be."""
import os
import subprocess
import sys

import pytest
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec, padding, rsa
from cryptography.hazmat.primitives.asymmetric.utils import encode_dss_signature

from sevcore import uapi as U
from sevcore.psp import amd_root
from sevcore.psp import certs as C
from sevcore.psp.crypto import p384_key

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def rsa_public(amd):
    return rsa.RSAPublicNumbers(int.from_bytes(amd.pubexp, "little"),
                                int.from_bytes(amd.modulus, "little")).public_key()


def pss_verify(pub, sig_le, message):
    pub.verify(sig_le[::-1], message,
               padding.PSS(mgf=padding.MGF1(hashes.SHA384()), salt_length=padding.PSS.AUTO),
               hashes.SHA384())


def test_root_certificates_have_amd_layout():
    """ARK and ASK are 4096-bit AMD certificates of 1600 bytes; ASK || ARK is 3200 bytes."""
    ark, ask = C.AmdCert(amd_root.ARK_CERT), C.AmdCert(amd_root.ASK_CERT)
    assert len(amd_root.ARK_CERT) == len(amd_root.ASK_CERT) == 1600 == ark.size
    assert (ark.key_usage, ask.key_usage) == (C.USAGE_ARK, C.USAGE_ASK)
    assert ark.certifying_id == ark.key_id == ask.certifying_id != ask.key_id
    assert ark.modulus_bits == ark.pubexp_bits == 4096
    assert len(amd_root.ask_ark()) == 3200 and C.amd_chain_length_is_valid(3200)


def test_root_chain_validates_in_firmware_rules():
    """The ARK is self-signed and the ASK signed by it, as amd_cert_validate checks them."""
    ark, ask = C.AmdCert(amd_root.ARK_CERT), C.AmdCert(amd_root.ASK_CERT)
    assert C.amd_validate(ark, ark, C.USAGE_ARK) == U.SEV_RET_SUCCESS
    assert C.amd_validate(ask, ark, C.USAGE_ASK) == U.SEV_RET_SUCCESS
    assert C.amd_validate(ask, ask, C.USAGE_ASK) == U.SEV_RET_BAD_SIGNATURE
    assert C.amd_validate(ark, ark, C.USAGE_ASK) == U.SEV_RET_INVALID_CERTIFICATE


def test_root_signatures_verify_with_cryptography():
    """OpenSSL (through cryptography) accepts the ARK's and ASK's RSA-PSS/SHA-384 signatures."""
    ark, ask = C.AmdCert(amd_root.ARK_CERT), C.AmdCert(amd_root.ASK_CERT)
    pss_verify(rsa_public(ark), ark.signature, ark.signed_part())
    pss_verify(rsa_public(ark), ask.signature, ask.signed_part())
    with pytest.raises(InvalidSignature):
        pss_verify(rsa_public(ask), ask.signature, ask.signed_part())


def test_ask_private_key_matches_and_signs_ceks():
    """sign_cek adds an ASK signature that the firmware rules and OpenSSL both accept."""
    key = p384_key(123456789)
    cek = C.new_cert(C.ec_pubkey(C.USAGE_CEK, C.ALGO_ECDSA_SHA256, key.pointQ), 1, 55)
    signed = amd_root.sign_cek(bytes(cek))
    ask = C.AmdCert(amd_root.ASK_CERT)
    assert C.validate(signed, ask.sev_pubkey()) == U.SEV_RET_SUCCESS
    usage, algo, value = C.sig_slot(signed, 1)
    assert (usage, algo) == (C.USAGE_ASK, C.ALGO_RSA_SHA384)
    pss_verify(rsa_public(ask), value, bytes(signed[:C.BODY_SIZE]))


def test_sev_cert_ecdsa_signature_verifies_with_cryptography():
    """A firmware-style ECDSA-SHA256 signature (r, s little-endian in 72 bytes) is standard."""
    key = p384_key(987654321)
    cert = C.new_cert(C.ec_pubkey(C.USAGE_OCA, C.ALGO_ECDSA_SHA256, key.pointQ))
    assert C.sign_ec(cert, C.USAGE_OCA, C.ALGO_ECDSA_SHA256, key) == U.SEV_RET_SUCCESS
    _, _, value = C.sig_slot(cert, 1)
    r, s = int.from_bytes(value[:72], "little"), int.from_bytes(value[72:144], "little")
    pub = ec.EllipticCurvePublicNumbers(int(key.pointQ.x), int(key.pointQ.y),
                                        ec.SECP384R1()).public_key()
    pub.verify(encode_dss_signature(r, s), bytes(cert[:C.BODY_SIZE]), ec.ECDSA(hashes.SHA256()))
    qx = int.from_bytes(cert[0x14:0x14 + 72], "little")
    assert qx == int(key.pointQ.x)


def test_validate_rules():
    """sev_cert_validate: signature first, then body, then which usage may sign which."""
    oca_key, pek_key = p384_key(11), p384_key(22)
    oca = C.new_cert(C.ec_pubkey(C.USAGE_OCA, C.ALGO_ECDSA_SHA256, oca_key.pointQ))
    C.sign_ec(oca, C.USAGE_OCA, C.ALGO_ECDSA_SHA256, oca_key)
    pek = C.new_cert(C.ec_pubkey(C.USAGE_PEK, C.ALGO_ECDSA_SHA256, pek_key.pointQ))
    C.sign_ec(pek, C.USAGE_OCA, C.ALGO_ECDSA_SHA256, oca_key)
    ok, bad_sig, bad_cert = (U.SEV_RET_SUCCESS, U.SEV_RET_BAD_SIGNATURE,
                             U.SEV_RET_INVALID_CERTIFICATE)
    assert C.validate(oca, C.pubkey_of(oca)) == ok
    assert C.validate(pek, C.pubkey_of(oca)) == ok
    assert C.validate(pek, C.pubkey_of(pek)) == bad_cert       # no signature of a PEK key
    tampered = bytearray(pek)
    tampered[0x20] ^= 1                                        # the key changes: off the curve
    assert C.validate(tampered, C.pubkey_of(oca)) == bad_sig
    half = bytearray(pek)
    half[C.SIG2:C.SIG2 + 4] = C.USAGE_OCA.to_bytes(4, "little")   # usage without algo
    assert C.validate(half, C.pubkey_of(oca)) == bad_sig
    version = bytearray(oca)
    version[0] = 2
    assert C.validate(version, C.pubkey_of(oca)) == bad_sig         # slot 1 no longer verifies
    C.sign_ec(version, C.USAGE_OCA, C.ALGO_ECDSA_SHA256, oca_key)   # into the free slot
    # The last slot of the signer's usage decides (slot 2 verifies); then the body is refused.
    assert C.validate(version, C.pubkey_of(oca)) == bad_cert
    assert C.sanity_check(pek, C.USAGE_PEK, C.ALGO_ECDSA_SHA256) == ok
    assert C.sanity_check(pek, C.USAGE_PDH, C.ALGO_ECDH_SHA256) == bad_cert
    full = bytearray(pek)
    C.sign_ec(full, C.USAGE_OCA, C.ALGO_ECDSA_SHA256, oca_key)
    assert C.sign_ec(full, C.USAGE_OCA, C.ALGO_ECDSA_SHA256, oca_key) == bad_cert


@pytest.mark.slow
def test_generator_reproduces_shipped_root(tmp_path):
    """tools/gen_amd_root.py regenerates sevcore/psp/_amd_root_data.py byte for byte."""
    out = tmp_path / "root.py"
    subprocess.run([sys.executable, os.path.join(ROOT, "tools", "gen_amd_root.py"), "--out",
                    str(out)], check=True)
    shipped = os.path.join(ROOT, "sevcore", "psp", "_amd_root_data.py")
    assert out.read_bytes() == open(shipped, "rb").read()
