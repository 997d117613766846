"""The guest owner's tools: launch sessions, measurement checks, secrets, attestation, cert chains.

What AMD's sev-tool (``src/commands.cpp``) and virtee/sev do on the guest owner's side, working on
the same files as sev-tool (``src/commands.h``):

======================================  =========================================================
``pdh.cert pek.cert oca.cert cek.cert``  the platform's certificates (``export_cert_chain``)
``ask.cert ark.cert``                    AMD's ASK and ARK
``godh.cert``                            the guest owner's DH certificate (usage PDH, ECDH)
``launch_blob.bin``                      the 128-byte session for LAUNCH_START
``tmp_tk.bin``                           TEK || TIK (32 bytes), kept by the guest owner
``calc_measurement_out.bin/.txt``        the expected measurement (raw / hex)
``secret.txt``                           the secret to inject
``packaged_secret.bin``, ``..._header.bin``  LAUNCH_SECRET's ciphertext and 52-byte header
``attestation_report.bin``               an ATTESTATION report to check
======================================  =========================================================

A file of a fixed size is read as sev-tool reads it: its first bytes, and one that is shorter is
ValueError naming it; whatever the files hold, the readers return or raise ValueError
(CertChainError is one), nothing else (``tests/fuzz/fuzz_owner.py``).

>>> chain = host.psp.export_cert_chain()
>>> verify_cert_chain(chain)                                  # raises CertChainError
>>> s = create_launch_session(chain.pdh, policy=0)
>>> handle = host.psp.launch_start(0, s.godh_cert, s.session)
>>> ...
>>> m = host.psp.launch_measure(handle)
>>> verify_measurement(s.tik, m.raw, digest, 1, 55, 25, policy=0)
>>> header, ct = package_secret(s.tek, s.tik, b"disk key", m.measurement)
"""
import hashlib
import hmac
import os
from dataclasses import dataclass

from sevcore import uapi as U
from sevcore.psp import amd_root
from sevcore.psp import certs as C
from sevcore.psp import crypto as X
from sevcore.psp.api import CertChain
from sevcore.psp.status import status_name

PDH_FILENAME = "pdh.cert"
PEK_FILENAME = "pek.cert"
OCA_FILENAME = "oca.cert"
CEK_FILENAME = "cek.cert"
ASK_FILENAME = "ask.cert"
ARK_FILENAME = "ark.cert"
LAUNCH_BLOB_FILENAME = "launch_blob.bin"
GUEST_OWNER_DH_FILENAME = "godh.cert"
GUEST_TK_FILENAME = "tmp_tk.bin"
CALC_MEASUREMENT_FILENAME = "calc_measurement_out.bin"
CALC_MEASUREMENT_READABLE_FILENAME = "calc_measurement_out.txt"
SECRET_FILENAME = "secret.txt"
PACKAGED_SECRET_FILENAME = "packaged_secret.bin"
PACKAGED_SECRET_HEADER_FILENAME = "packaged_secret_header.bin"
ATTESTATION_REPORT_FILENAME = "attestation_report.bin"

_CERT_FILES = (PDH_FILENAME, PEK_FILENAME, OCA_FILENAME, CEK_FILENAME, ASK_FILENAME,
               ARK_FILENAME)


class CertChainError(ValueError):
    """A certificate chain failed to verify: ``which`` cert, and the SEV_RET_* status the
    firmware would give, ``fw_error`` (as on PspError and SevError)."""

    def __init__(self, which, fw_error):
        super().__init__(f"{which} certificate: {status_name(fw_error)}")
        self.which = which
        self.fw_error = fw_error

    @property
    def status(self):
        """The former name of :attr:`fw_error`, read-only, kept for this release."""
        return self.fw_error


@dataclass(frozen=True)
class LaunchSession:
    """What ``generate_launch_blob`` produces: the GODH certificate and session for
    LAUNCH_START, and the TEK/TIK the guest owner keeps."""
    policy: int
    godh_cert: bytes
    session: bytes
    tek: bytes
    tik: bytes

    def write(self, folder):
        """Write godh.cert, launch_blob.bin and tmp_tk.bin into ``folder``."""
        _write(folder, GUEST_OWNER_DH_FILENAME, self.godh_cert)
        _write(folder, LAUNCH_BLOB_FILENAME, self.session)
        _write(folder, GUEST_TK_FILENAME, self.tek + self.tik)

    @classmethod
    def read(cls, folder, policy):
        """The session ``write`` left in ``folder``; ValueError for a file too short."""
        tk = _read(folder, GUEST_TK_FILENAME, 32)
        return cls(policy, _read(folder, GUEST_OWNER_DH_FILENAME, C.CERT_SIZE),
                   _read(folder, LAUNCH_BLOB_FILENAME, X.SESSION_SIZE), tk[:16], tk[16:32])


def create_launch_session(pdh_cert, policy, rng=os.urandom):
    """A fresh GODH key pair and session for the platform whose PDH certificate is
    ``pdh_cert`` (sev-tool ``generate_launch_blob``/``build_session_buffer``: nonce, then TEK and
    TIK, then the wrap IV). ``rng(n)`` supplies the random bytes."""
    pdh_point = C.ec_point_of(C.pubkey_of(pdh_cert))
    if pdh_point is None:
        raise ValueError("the PDH certificate holds no P-384 public key")
    godh = X.p384_key(X.scalar_from(rng(56)))
    cert = C.new_cert(C.ec_pubkey(C.USAGE_PDH, C.ALGO_ECDH_SHA256, godh.pointQ))
    C.sign_ec(cert, C.USAGE_PEK, C.ALGO_ECDSA_SHA256, godh)     # as sev-tool; not checked
    nonce = rng(16)
    master = X.master_secret(X.ecdh_p384(godh.d, pdh_point.pointQ), nonce)
    tek, tik = rng(16), rng(16)
    session = X.make_session(master, nonce, rng(16), tek, tik, policy)
    return LaunchSession(policy, bytes(cert), session, tek, tik)


def launch_digest(*chunks):
    """SHA-256 of everything given to LAUNCH_UPDATE_DATA/VMSA, in order."""
    h = hashlib.sha256()
    for c in chunks:
        h.update(c)
    return h.digest()


def calc_measurement(tik, api_major, api_minor, build, policy, digest, mnonce):
    """The MEASURE LAUNCH_MEASURE should return (sev-tool ``calculate_measurement``; no
    ``0x04 || api || build`` prefix before API 0.17)."""
    return X.measurement(tik, api_major, api_minor, build, policy, digest, mnonce,
                         with_prefix=(api_major, api_minor) >= (0, 17))


def verify_measurement(tik, launch_measure, digest, api_major, api_minor, build, policy):
    """True if the 48-byte LAUNCH_MEASURE output (MEASURE || MNONCE) is the launch of
    ``digest`` under ``policy`` on firmware ``api_major.api_minor`` build ``build``."""
    launch_measure = bytes(launch_measure)
    expect = calc_measurement(tik, api_major, api_minor, build, policy, digest,
                              launch_measure[32:48])
    return hmac.compare_digest(expect, launch_measure[:32])


def package_secret(tek, tik, secret, measurement, rng=os.urandom, flags=0, api=(0, 17)):
    """(header, ciphertext) for LAUNCH_SECRET (sev-tool ``package_secret``): AES-128-CTR under
    the TEK with a random IV, MAC with context 0x01 over the ciphertext and, from API 0.17 on,
    the launch MEASURE. The firmware takes only 16-byte multiples up to 20 KiB."""
    if len(secret) < 8:
        raise ValueError("SEV requires a secret of at least 8 bytes")
    iv = rng(16)
    ct = X.aes128_ctr(tek, iv, bytes(secret))
    suffix = bytes(measurement) if tuple(api) >= (0, 17) else b""
    mac = X.packet_mac(tik, X.CTX_SECRET, flags, iv, len(ct), len(ct), ct, suffix)
    return X.packet_header(flags, iv, mac), ct


def verify_attestation_report(report, pek_cert):
    """True if the 208-byte ATTESTATION report was signed by the PEK of ``pek_cert``
    (sev-tool ``validate_attestation``: ECDSA-SHA256 over bytes 0x00-0x33). A PEK without a
    P-384 key verifies nothing (sev-tool: ``compile_public_key_from_certificate`` fails)."""
    report = bytes(report)
    pek = C.ec_point_of(C.pubkey_of(pek_cert))
    if len(report) != 0xD0 or pek is None:
        return False
    signer = C.ec_pubkey(C.USAGE_PEK, C.ALGO_ECDSA_SHA256, pek.pointQ)
    return C.verify_signature(signer, report[0x40:0x40 + 144], report[:0x34]) == U.SEV_RET_SUCCESS


def verify_cert_chain(chain, ark_key_id=amd_root.ARK_KEY_ID):
    """Check ARK (self-signed, the expected root) -> ASK -> CEK -> PEK <- OCA, PEK -> PDH, as
    sev-tool ``validate_cert_chain`` does. ``chain`` is a CertChain. Raises CertChainError."""
    try:
        ark, ask = C.AmdCert(chain.ark), C.AmdCert(chain.ask)
    except ValueError:
        raise CertChainError("ARK/ASK", U.SEV_RET_INVALID_CERTIFICATE) from None
    steps = [("ARK", lambda: C.amd_validate(ark, ark, C.USAGE_ARK)
              or (U.SEV_RET_INVALID_CERTIFICATE if ark.key_id != ark_key_id else 0)),
             ("ASK", lambda: C.amd_validate(ask, ark, C.USAGE_ASK)),
             ("CEK", lambda: C.validate(chain.cek, ask.sev_pubkey())),
             ("OCA", lambda: C.validate(chain.oca, C.pubkey_of(chain.oca))),
             ("PEK", lambda: C.validate(chain.pek, C.pubkey_of(chain.cek))
              or C.validate(chain.pek, C.pubkey_of(chain.oca))),
             ("PDH", lambda: C.validate(chain.pdh, C.pubkey_of(chain.pek)))]
    for which, check in steps:
        status = check()
        if status:
            raise CertChainError(which, status)


def new_oca(rng=os.urandom):
    """(OCA private key, self-signed OCA certificate), as sev-tool ``create_oca_cert``."""
    key = X.p384_key(X.scalar_from(rng(56)))
    cert = C.new_cert(C.ec_pubkey(C.USAGE_OCA, C.ALGO_ECDSA_SHA256, key.pointQ))
    C.sign_ec(cert, C.USAGE_OCA, C.ALGO_ECDSA_SHA256, key)
    return key, bytes(cert)


def sign_pek_csr(csr, oca_key):
    """The PEK CSR signed by the owner's OCA (sev-tool ``sign_pek_csr``), for
    PEK_CERT_IMPORT; the firmware adds the CEK signature itself."""
    cert = bytearray(csr)
    C.sign_ec(cert, C.USAGE_OCA, C.ALGO_ECDSA_SHA256, oca_key)
    return bytes(cert)


# -- sev-tool's files ----------------------------------------------------------------------------

def _write(folder, name, data):
    with open(os.path.join(folder, name), "wb") as f:
        f.write(bytes(data))


def _read(folder, name, size=None):
    """The bytes of file ``name``; with ``size``, its first ``size`` bytes, and ValueError if it
    is shorter: sev-tool's ``read_file(name, buf, size) != size`` check (``src/utilities.cpp``
    ``sev::read_file``, its callers in ``src/commands.cpp``)."""
    with open(os.path.join(folder, name), "rb") as f:
        data = f.read() if size is None else f.read(size)
    if size is not None and len(data) < size:
        raise ValueError(f"{name} holds {len(data)} bytes, not the {size} sev-tool reads")
    return data


def write_cert_chain(folder, chain):
    """pdh.cert, pek.cert, oca.cert, cek.cert, ask.cert, ark.cert (``export_cert_chain``)."""
    for name, data in zip(_CERT_FILES, (chain.pdh, chain.pek, chain.oca, chain.cek, chain.ask,
                                        chain.ark)):
        _write(folder, name, data)


def read_cert_chain(folder):
    return CertChain(*(_read(folder, name) for name in _CERT_FILES))


def validate_cert_chain(folder):
    """sev-tool ``validate_cert_chain`` on the six certificate files. Raises CertChainError."""
    verify_cert_chain(read_cert_chain(folder))


def generate_launch_blob(folder, policy, rng=os.urandom):
    """sev-tool ``generate_launch_blob``: read pdh.cert, write godh.cert, launch_blob.bin and
    tmp_tk.bin. Returns the LaunchSession."""
    session = create_launch_session(_read(folder, PDH_FILENAME, C.CERT_SIZE), policy, rng)
    session.write(folder)
    return session


def calc_measurement_files(folder, api_major, api_minor, build, policy, digest, mnonce):
    """sev-tool ``calc_measurement`` with the TIK of tmp_tk.bin: writes
    calc_measurement_out.bin (32 bytes) and calc_measurement_out.txt (hex). Returns it."""
    tik = _read(folder, GUEST_TK_FILENAME, 32)[16:32]
    m = calc_measurement(tik, api_major, api_minor, build, policy, digest, mnonce)
    _write(folder, CALC_MEASUREMENT_FILENAME, m)
    _write(folder, CALC_MEASUREMENT_READABLE_FILENAME, m.hex().encode())
    return m


def package_secret_files(folder, rng=os.urandom):
    """sev-tool ``package_secret``: secret.txt, pek.cert (for the API version), tmp_tk.bin and
    calc_measurement_out.bin in; packaged_secret.bin and packaged_secret_header.bin out."""
    tk = _read(folder, GUEST_TK_FILENAME, 32)
    pek = _read(folder, PEK_FILENAME, C.CERT_SIZE)
    header, ct = package_secret(tk[:16], tk[16:32], _read(folder, SECRET_FILENAME),
                                _read(folder, CALC_MEASUREMENT_FILENAME, 32), rng,
                                api=(pek[4], pek[5]))
    _write(folder, PACKAGED_SECRET_FILENAME, ct)
    _write(folder, PACKAGED_SECRET_HEADER_FILENAME, header)
    return header, ct


def validate_attestation(folder):
    """sev-tool ``validate_attestation``: attestation_report.bin against pek.cert."""
    return verify_attestation_report(_read(folder, ATTESTATION_REPORT_FILENAME),
                                     _read(folder, PEK_FILENAME, C.CERT_SIZE))
