"""The guest owner's check of an SEV-SNP attestation report: the ARK -> ASK -> VCEK chain, the
report's signature, its TCB and chip against the VCEK's extensions, the policy, and the
expected launch measurement (what virtee/sev's ``Verifiable`` impls and ``snpguest verify``
check; report layout: SEV-SNP Firmware ABI, AMD publication 56860, "ATTESTATION_REPORT"; VCEK
extensions: AMD's "Versioned Chip Endorsement Key (VCEK) Certificate and KDS Interface
Specification", publication 57230).

Everything here uses only the ``cryptography`` package and the report bytes (the ``attest``
extra), so the check is independent of the simulator's own signing code.
"""
from dataclasses import dataclass

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec, padding, rsa
from cryptography.hazmat.primitives.asymmetric.utils import encode_dss_signature

from sevcore import uapi as U

REPORT_SIZE = 0x4A0
SIGNED_SIZE = 0x2A0
#: Offsets of the fields checked (56860 "ATTESTATION_REPORT").
OFF = dict(version=0x00, guest_svn=0x04, policy=0x08, vmpl=0x30, signature_algo=0x34,
           current_tcb=0x38, report_data=0x50, measurement=0x90, host_data=0xC0,
           reported_tcb=0x180, chip_id=0x1A0, signature=0x2A0)
SIG_ALGO_ECDSA_P384_SHA384 = 1
#: VCEK extension OIDs (57230): the TCB's security patch levels and the hardware id.
OID_BL_SPL = "1.3.6.1.4.1.3704.1.3.1"
OID_TEE_SPL = "1.3.6.1.4.1.3704.1.3.2"
OID_SNP_SPL = "1.3.6.1.4.1.3704.1.3.3"
OID_UCODE_SPL = "1.3.6.1.4.1.3704.1.3.8"
OID_HW_ID = "1.3.6.1.4.1.3704.1.4"


class AttestationError(Exception):
    """The report, the chain or a claim in the report does not check out (``what`` says
    which)."""

    def __init__(self, what, detail):
        super().__init__(f"{what}: {detail}")
        self.what = what


@dataclass(frozen=True)
class Report:
    """The fields of a verified report a guest owner acts on."""
    version: int
    guest_svn: int
    policy: int
    vmpl: int
    reported_tcb: int
    report_data: bytes
    measurement: bytes
    host_data: bytes
    chip_id: bytes


def _u(report, name, size):
    return int.from_bytes(report[OFF[name]:OFF[name] + size], "little")


def parse_report(report):
    """The checked fields of a 1184-byte report (no signature check)."""
    report = bytes(report)
    if len(report) != REPORT_SIZE:
        raise AttestationError("report", f"{len(report)} bytes, not {REPORT_SIZE}")
    b = lambda name, n: report[OFF[name]:OFF[name] + n]  # noqa: E731
    return Report(version=_u(report, "version", 4), guest_svn=_u(report, "guest_svn", 4),
                  policy=_u(report, "policy", 8), vmpl=_u(report, "vmpl", 4),
                  reported_tcb=_u(report, "reported_tcb", 8), report_data=b("report_data", 64),
                  measurement=b("measurement", 48), host_data=b("host_data", 32),
                  chip_id=b("chip_id", 64))


def _cert(c):
    return c if isinstance(c, x509.Certificate) else (
        x509.load_pem_x509_certificate(c) if bytes(c).lstrip().startswith(b"-----")
        else x509.load_der_x509_certificate(bytes(c)))


def _verify_pss(issuer, cert, what):
    key = issuer.public_key()
    if not isinstance(key, rsa.RSAPublicKey):
        raise AttestationError(what, "issuer key is not RSA")
    try:
        key.verify(cert.signature, cert.tbs_certificate_bytes,
                   padding.PSS(mgf=padding.MGF1(hashes.SHA384()), salt_length=48),
                   hashes.SHA384())
    except InvalidSignature:
        raise AttestationError(what, "RSA-PSS SHA-384 signature does not verify") from None


def verify_chain(ark, ask, vcek):
    """ARK self-signed, ASK signed by the ARK, VCEK signed by the ASK (RSA-PSS, SHA-384, salt
    48: the KDS's certificates); returns the three certificates."""
    ark, ask, vcek = _cert(ark), _cert(ask), _cert(vcek)
    _verify_pss(ark, ark, "ARK")
    _verify_pss(ark, ask, "ASK")
    _verify_pss(ask, vcek, "VCEK")
    return ark, ask, vcek


def _ext_int(cert, oid):
    ext = cert.extensions.get_extension_for_oid(x509.ObjectIdentifier(oid)).value.value
    # DER INTEGER (tag 2) of a small value.
    if ext[0] != 2:
        raise AttestationError("VCEK", f"extension {oid} is not an INTEGER")
    return int.from_bytes(ext[2:2 + ext[1]], "big")


def _ext_bytes(cert, oid):
    raw = cert.extensions.get_extension_for_oid(x509.ObjectIdentifier(oid)).value.value
    if raw[:1] == b"\x04":                     # an OCTET STRING wrapper
        n = raw[1]
        return raw[2:2 + n] if n < 0x80 else raw[2 + (n & 0x7f):]
    return raw


def vcek_tcb(vcek):
    """The TCB_VERSION the VCEK was issued for: boot loader, TEE, SNP and microcode SPLs in
    bytes 0, 1, 6 and 7 (56860 "TCB_VERSION")."""
    return (_ext_int(vcek, OID_BL_SPL) | _ext_int(vcek, OID_TEE_SPL) << 8
            | _ext_int(vcek, OID_SNP_SPL) << 48 | _ext_int(vcek, OID_UCODE_SPL) << 56)


def verify_report_signature(report, vcek):
    """The report's ECDSA P-384 SHA-384 signature over bytes [0, 0x2A0) under the VCEK's key
    (R and S little-endian in 72-byte fields)."""
    report = bytes(report)
    if _u(report, "signature_algo", 4) != SIG_ALGO_ECDSA_P384_SHA384:
        raise AttestationError("signature", "algorithm is not ECDSA P-384 with SHA-384")
    sig = report[OFF["signature"]:]
    r = int.from_bytes(sig[:72], "little")
    s = int.from_bytes(sig[72:144], "little")
    key = _cert(vcek).public_key()
    if not isinstance(key, ec.EllipticCurvePublicKey) or key.curve.name != "secp384r1":
        raise AttestationError("VCEK", "key is not ECDSA P-384")
    try:
        key.verify(encode_dss_signature(r, s), report[:SIGNED_SIZE], ec.ECDSA(hashes.SHA384()))
    except InvalidSignature:
        raise AttestationError("signature", "does not verify under the VCEK") from None


def verify_report(report, *, ark, ask, vcek, measurement=None, report_data=None,
                  host_data=None, vmpl=None, policy_forbidden=U.SNP_POLICY_MASK_DEBUG,
                  min_guest_svn=0):
    """Check a report as a guest owner: the chain, the signature, the reported TCB and chip id
    against the VCEK's extensions, then each claim asked for (the launch ``measurement``,
    ``report_data``, ``host_data``, ``vmpl``), that the policy has the must-be-one bit and none
    of ``policy_forbidden`` (debugging, by default), and the guest SVN. Returns the
    :class:`Report`; raises :class:`AttestationError` naming the first check that failed."""
    _, _, vcek = verify_chain(ark, ask, vcek)
    verify_report_signature(report, vcek)
    rep = parse_report(report)
    if rep.reported_tcb != vcek_tcb(vcek):
        raise AttestationError("TCB", f"reported {rep.reported_tcb:#x}, VCEK issued for "
                                      f"{vcek_tcb(vcek):#x}")
    hw_id = _ext_bytes(vcek, OID_HW_ID)
    if rep.chip_id != hw_id:
        raise AttestationError("chip", "chip id differs from the VCEK's hardware id")
    checks = (("measurement", measurement, rep.measurement),
              ("report_data", report_data, rep.report_data),
              ("host_data", host_data, rep.host_data), ("vmpl", vmpl, rep.vmpl))
    for what, want, got in checks:
        if want is not None and want != got:
            raise AttestationError(what, f"{got!r} is not the expected {want!r}")
    if not rep.policy & U.SNP_POLICY_MASK_RSVD_MBO or rep.policy & policy_forbidden:
        raise AttestationError("policy", f"{rep.policy:#x} not acceptable")
    if rep.guest_svn < min_guest_svn:
        raise AttestationError("guest_svn", f"{rep.guest_svn} < {min_guest_svn}")
    return rep
