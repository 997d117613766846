"""The simulated AMD root of trust, shared by every simulated host.

One ARK (self-signed) and one ASK (signed by the ARK), RSA-4096 with RSA-PSS/SHA-384 signatures
in AMD's certificate format, generated once by ``tools/gen_amd_root.py`` and shipped as
``_amd_root_data.py``. ``ask_ark()`` is the ``ask_ark.cert`` blob AMD publishes (ASK then ARK)
and SEND_START takes as ``amd_certs``. ``sign_cek`` plays AMD's Key Distribution Service: it signs
a chip's CEK certificate with the ASK.

A real PSP trusts the ARK whose key id and public-key hash are fused into the part
(``amd_cert_validate_ark``); a simulated PSP trusts ``ARK_KEY_ID`` and ``ARK_PUBKEY_HASH``.
"""
import functools
import hashlib

from Crypto.PublicKey import RSA

from sevcore.psp import _amd_root_data as _data
from sevcore.psp import _amd_x509_data as _x509
from sevcore.psp.certs import ALGO_RSA_SHA384, USAGE_ASK, AmdCert, sign_rsa

#: The names of AMD's Genoa certificates (AMD publication 57230): issuer and subject attributes
#: before the common name, and the common names of the ARK, ASK and VCEK.
AMD_NAME = [("OU", "Engineering"), ("C", "US"), ("L", "Santa Clara"), ("ST", "CA"),
            ("O", "Advanced Micro Devices")]
ARK_NAME = "ARK-Genoa"
ASK_NAME = "SEV-Genoa"
VCEK_NAME = "SEV-VCEK"

ARK_CERT = _data.ARK_CERT
ASK_CERT = _data.ASK_CERT
_ARK = AmdCert(ARK_CERT)
ARK_KEY_ID = _ARK.key_id
ARK_PUBKEY_HASH = _ARK.pubkey_hash()


def ark_cert():
    return ARK_CERT


def ask_cert():
    return ASK_CERT


def ark_x509():
    """The ARK as an X.509 certificate (DER), self-signed RSASSA-PSS/SHA-384, as AMD's KDS
    publishes it for SEV-SNP (``/vcek/v1/Genoa/cert_chain``); same key as :func:`ark_cert`."""
    return _x509.ARK_X509


def ask_x509():
    """The ASK as an X.509 certificate (DER), signed by the ARK."""
    return _x509.ASK_X509


def ask_ark():
    """ASK || ARK, the layout of AMD's ``ask_ark_<family>.cert`` and of SEND_START's amd_certs."""
    return ASK_CERT + ARK_CERT


@functools.lru_cache(maxsize=None)
def ask_key():
    """The simulated ASK's RSA-4096 private key: it plays AMD's KDS, which signs CEKs and
    VCEKs."""
    return _ask_key()


@functools.lru_cache(maxsize=None)
def _ask_key():
    n = _data.ASK_P * _data.ASK_Q
    phi = (_data.ASK_P - 1) * (_data.ASK_Q - 1)
    d = pow(_data.ASK_E, -1, phi)
    return RSA.construct((n, _data.ASK_E, d, _data.ASK_P, _data.ASK_Q), consistency_check=False)


def sign_cek(cek_cert):
    """The CEK certificate with the ASK's signature added (what AMD's KDS returns for a chip)."""
    cert = bytearray(cek_cert)
    salt = hashlib.sha384(b"cek-salt" + bytes(cert[:0x414])).digest()
    sign_rsa(cert, USAGE_ASK, ALGO_RSA_SHA384, _ask_key(), salt)
    return bytes(cert)
