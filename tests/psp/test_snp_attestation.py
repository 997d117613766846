"""SEV-SNP attestation: guest messages under the VMPCKs (sequence numbers, replay refused), the
signed 1184-byte report, derived keys, and the ARK -> ASK -> VCEK chain checked by tools that are
not sevcore (``openssl verify`` and the ``cryptography`` package)."""
import errno
import shutil
import subprocess
import sys

import pytest
from cryptography import x509
from hypothesis import given, settings
from hypothesis import strategies as st
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec, padding
from cryptography.hazmat.primitives.asymmetric.utils import encode_dss_signature

from sevcore import uapi as U
from sevcore.psp import amd_root
from sevcore.psp import attest as A
from sevcore.psp import snp_layout as S
from sevcore.psp import x509 as X

from support import raises_errno
from support.snp import POLICY, guest_request, new_guest, report, snp_host, vmpck


@pytest.fixture(scope="module")
def running():
    """A host with one running SNP guest; its guest context."""
    host = snp_host(seed=21)
    gctx = new_guest(host)
    host.psp.snp_launch_finish(gctx, host_data=b"H" * 32)
    return host, gctx


def _pss():
    return padding.PSS(mgf=padding.MGF1(hashes.SHA384()), salt_length=48)


def _ext(cert, oid):
    return cert.extensions.get_extension_for_oid(x509.ObjectIdentifier(oid)).value.value


def test_chain_verifies_with_cryptography(running):
    """The ARK signs itself and the ASK, the ASK signs the VCEK, each RSASSA-PSS/SHA-384, and the
    VCEK is an ECDSA P-384 key carrying the chip's TCB and hardware id."""
    host, _ = running
    ark = x509.load_der_x509_certificate(amd_root.ark_x509())
    ask = x509.load_der_x509_certificate(amd_root.ask_x509())
    vcek = x509.load_der_x509_certificate(host.psp.snp_vcek_cert())
    for child, parent in ((ark, ark), (ask, ark), (vcek, ask)):
        parent.public_key().verify(child.signature, child.tbs_certificate_bytes, _pss(),
                                   hashes.SHA384())
        child.verify_directly_issued_by(parent)
    assert isinstance(vcek.public_key().curve, ec.SECP384R1)
    assert ask.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
    tcb = A.tcb_parts(host.psp.snp_tcb)
    for oid, part in (("1.3.6.1.4.1.3704.1.3.1", "boot_loader"), ("1.3.6.1.4.1.3704.1.3.2", "tee"),
                      ("1.3.6.1.4.1.3704.1.3.3", "snp"), ("1.3.6.1.4.1.3704.1.3.8", "microcode")):
        assert _ext(vcek, oid) == X.integer(tcb[part])
    assert _ext(vcek, "1.3.6.1.4.1.3704.1.4") == host.psp.snp_chip_id()
    assert b"Genoa" in _ext(vcek, "1.3.6.1.4.1.3704.1.2")


@pytest.mark.skipif(shutil.which("openssl") is None, reason="no openssl command")
def test_chain_verifies_with_openssl(running, tmp_path):
    """``openssl verify`` accepts the VCEK through the ASK up to the ARK, and refuses it without
    the ASK."""
    host, _ = running
    (tmp_path / "ark.pem").write_text(X.pem(amd_root.ark_x509()))
    (tmp_path / "ask.pem").write_text(X.pem(amd_root.ask_x509()))
    (tmp_path / "vcek.pem").write_text(X.pem(host.psp.snp_vcek_cert()))
    ok = subprocess.run(["openssl", "verify", "-CAfile", "ark.pem", "-untrusted", "ask.pem",
                         "vcek.pem"], cwd=tmp_path, capture_output=True, text=True)
    assert ok.returncode == 0 and "vcek.pem: OK" in ok.stdout, ok.stderr
    bad = subprocess.run(["openssl", "verify", "-CAfile", "ark.pem", "vcek.pem"], cwd=tmp_path,
                         capture_output=True, text=True)
    assert bad.returncode != 0


def test_report_signature_verifies_with_the_vcek_certificate(running):
    """The report's R and S (little-endian, 72 bytes each) are an ECDSA P-384/SHA-384 signature of
    its first 0x2A0 bytes by the key in the VCEK certificate."""
    host, gctx = running
    rep = report(host, gctx, user_data=b"n" * 64, seqno=1)
    assert len(rep) == 1184
    r = int.from_bytes(rep[0x2A0:0x2A0 + 72], "little")
    s = int.from_bytes(rep[0x2A0 + 72:0x2A0 + 144], "little")
    key = x509.load_der_x509_certificate(host.psp.snp_vcek_cert()).public_key()
    key.verify(encode_dss_signature(r, s), rep[:0x2A0], ec.ECDSA(hashes.SHA384()))
    forged = bytes([rep[0] ^ 1]) + rep[1:0x2A0]
    with pytest.raises(InvalidSignature):
        key.verify(encode_dss_signature(r, s), forged, ec.ECDSA(hashes.SHA384()))


def test_report_fields(running):
    """The report carries the version, policy, VMPL, launch digest, host and report data, the
    chip id and the TCBs the VCEK was issued for."""
    host, gctx = running
    g = host.psp.snp_guest(gctx)
    rep = S.snp_attestation_report.unpack(report(host, gctx, b"d" * 64, vmpl=2, seqno=3))
    assert (rep["version"], rep["policy"], rep["vmpl"], rep["signature_algo"]) == \
        (3, POLICY, 2, 1)
    assert rep["measurement"] == g.ld and rep["report_data"] == b"d" * 64
    assert rep["host_data"] == b"H" * 32 and rep["chip_id"] == host.psp.snp_chip_id()
    assert rep["reported_tcb"] == rep["current_tcb"] == rep["launch_tcb"] == host.psp.snp_tcb
    assert (rep["current_major"], rep["current_minor"], rep["current_build"]) == (1, 55, 25)
    assert (rep["cpuid_fam_id"], rep["cpuid_mod_id"]) == (0x19, 0x11)
    assert rep["platform_info"] & 1                             # SMT enabled


def test_sequence_numbers_refuse_replays_and_change_nothing():
    """A request with a used or skipped sequence number, a changed byte or another key is
    INVALID_PARAM and uses up no sequence number; the next good one still works."""
    host = snp_host(seed=3)
    gctx = new_guest(host)
    host.psp.snp_launch_finish(gctx)
    key = vmpck(host, gctx)
    payload = S.snp_report_req.pack()
    hdr, _ = guest_request(host, gctx, key, 1, U.SNP_MSG_REPORT_REQ, payload)
    assert (hdr["msg_seqno"], hdr["msg_type"]) == (2, U.SNP_MSG_REPORT_RSP)
    g = host.psp.snp_guest(gctx)
    for seqno, k in ((1, key), (5, key), (3, vmpck(host, gctx, 1))):
        with raises_errno(errno.EIO) as info:
            guest_request(host, gctx, k, seqno, U.SNP_MSG_REPORT_REQ, payload)
        assert info.value.fw_error == U.SEV_RET_INVALID_PARAM
    page = bytearray(A.seal_msg(key, 3, U.SNP_MSG_REPORT_REQ, payload, vmpck_id=0))
    page[A.HDR_SIZE + 5] ^= 1
    req, res = host.mem.alloc_contiguous(1), host.psp.snp_alloc_firmware_page()
    host.mem.write(req, bytes(page))
    with raises_errno(errno.EIO):
        host.psp.snp_guest_request(gctx, req, res)
    assert g.msg_count == [2, 0, 0, 0]
    guest_request(host, gctx, key, 3, U.SNP_MSG_REPORT_REQ, payload)
    hdr, _ = guest_request(host, gctx, vmpck(host, gctx, 1), 1, U.SNP_MSG_REPORT_REQ,
                           S.snp_report_req.pack(vmpl=1), vmpck_id=1)
    assert hdr["msg_vmpck"] == 1 and g.msg_count == [4, 2, 0, 0]


def test_report_vmpl_below_the_key_is_refused_in_the_response(running):
    """Asking VMPCK1 for a VMPL0 report answers with status INVALID_PARAM and no report."""
    host, gctx = running
    g = host.psp.snp_guest(gctx)
    _, payload = guest_request(host, gctx, g.vmpck[1], g.msg_count[1] + 1, U.SNP_MSG_REPORT_REQ,
                               S.snp_report_req.pack(vmpl=0), vmpck_id=1)
    resp = S.snp_report_resp.unpack(payload)
    assert resp["status"] == U.SEV_RET_INVALID_PARAM and resp["report"] == bytes(1184)


def test_guest_request_needs_a_firmware_response_page_and_a_running_guest():
    """The response page must be a firmware page; a guest still launching cannot ask."""
    host = snp_host(seed=4)
    gctx = new_guest(host)
    req = host.mem.alloc_contiguous(1)
    res = host.psp.snp_alloc_firmware_page()
    with raises_errno(errno.EIO) as info:
        host.psp.snp_guest_request(gctx, req, res)
    assert info.value.fw_error == U.SEV_RET_INVALID_GUEST_STATE
    host.psp.snp_launch_finish(gctx)
    with raises_errno(errno.EIO) as info:
        host.psp.snp_guest_request(gctx, req, host.mem.alloc_contiguous(1))
    assert info.value.fw_error == U.SEV_RET_INVALID_PAGE_STATE


def _key(host, gctx, seqno, **fields):
    _, payload = guest_request(host, gctx, vmpck(host, gctx), seqno, U.SNP_MSG_KEY_REQ,
                               S.snp_derived_key_req.pack(**fields))
    return S.snp_derived_key_resp.unpack(payload)


def test_derived_keys_depend_on_what_is_selected():
    """MSG_KEY_REQ gives the same key for the same request, another for other fields, and
    refuses an SVN or TCB above the guest's and the VMRK this firmware lacks."""
    host = snp_host(seed=8)
    gctx = new_guest(host)
    host.psp.snp_launch_finish(gctx)
    a = _key(host, gctx, 1, guest_field_select=0b1001)
    b = _key(host, gctx, 3, guest_field_select=0b1001)
    c = _key(host, gctx, 5, guest_field_select=0b0001)
    d = _key(host, gctx, 7, guest_field_select=0b1001, vmpl=1)
    assert a["status"] == 0 and a["derived_key"] == b["derived_key"] != bytes(32)
    assert len({a["derived_key"], c["derived_key"], d["derived_key"]}) == 3
    for seqno, bad in ((9, dict(guest_svn=1)), (11, dict(tcb_version=host.psp.snp_tcb + 1)),
                       (13, dict(root_key_select=1 << 3)), (15, dict(guest_field_select=1 << 6))):
        assert _key(host, gctx, seqno, **bad)["status"] == U.SEV_RET_INVALID_PARAM


def test_every_host_chains_to_the_one_root():
    """Two hosts have different chips and VCEKs, both certified under the same ARK and ASK."""
    ask = x509.load_der_x509_certificate(amd_root.ask_x509())
    certs = [x509.load_der_x509_certificate(snp_host(seed=s).psp.snp_vcek_cert()) for s in (1, 2)]
    for c in certs:
        c.verify_directly_issued_by(ask)
    assert certs[0].public_key().public_numbers() != certs[1].public_key().public_numbers()


def test_reports_are_signed_by_the_vcek_of_the_reported_tcb(running):
    """Another TCB gives another VCEK: a report verifies only with the key of its own TCB."""
    host, gctx = running
    rep = report(host, gctx, seqno=host.psp.snp_guest(gctx).msg_count[0] + 1)
    assert A.verify_report(rep, host.psp.snp_vcek_point())
    other = A.public_point(A.vcek_scalar(host.psp._chip_unique_key(), host.psp.snp_tcb + 1))
    assert not A.verify_report(rep, other)


@pytest.mark.slow
def test_x509_generator_reproduces_shipped_root(tmp_path):
    """tools/gen_amd_x509.py writes the ARK and ASK certificates sevcore ships, byte for byte."""
    out = tmp_path / "data.py"
    subprocess.run([sys.executable, "tools/gen_amd_x509.py", "--out", str(out)], check=True,
                   cwd=__file__.rsplit("/tests/", 1)[0])
    ns = {}
    exec(out.read_text(), ns)
    assert (ns["ARK_X509"], ns["ASK_X509"]) == (amd_root.ark_x509(), amd_root.ask_x509())


@pytest.fixture(scope="module")
def hostile():
    """A running guest, a hypervisor request page and a firmware response page."""
    host = snp_host(seed=31, memory_size=1 << 30)
    gctx = new_guest(host)
    host.psp.snp_launch_finish(gctx)
    req, res = host.mem.alloc_contiguous(1), host.psp.snp_alloc_firmware_page()
    buf = host.mem.alloc_contiguous(1)
    host.mem.write(buf, S.sev_data_snp_guest_request.pack(gctx_paddr=gctx, req_paddr=req,
                                                          res_paddr=res))
    return host, gctx, req, buf


@settings(max_examples=60, deadline=None)
@given(hdr=st.fixed_dictionaries({
    "msg_seqno": st.sampled_from([0, 1, 2, 1 << 63]), "algo": st.integers(0, 3),
    "hdr_version": st.integers(0, 2), "hdr_sz": st.sampled_from([0, 0x60, 0x61, 0xFFFF]),
    "msg_type": st.integers(0, 20), "msg_version": st.integers(0, 2),
    "msg_sz": st.sampled_from([0, 0x60, 4000, 4001, 0xFFFF]), "msg_vmpck": st.integers(0, 255)}),
    body=st.binary(max_size=64))
def test_any_request_page_gets_a_status_and_changes_nothing(hostile, hdr, body):
    """A request page of arbitrary header fields and bytes, sealed under no VMPCK, is answered
    with INVALID_PARAM (never an exception) and moves no sequence number."""
    host, gctx, req, buf = hostile
    g = host.psp.snp_guest(gctx)
    before = list(g.msg_count)
    host.mem.write(req, (S.snp_guest_msg_hdr.pack(**hdr) + body).ljust(4096, b"\0"))
    assert host.psp.command(U.SEV_CMD_SNP_GUEST_REQUEST, buf) == U.SEV_RET_INVALID_PARAM
    assert g.msg_count == before
