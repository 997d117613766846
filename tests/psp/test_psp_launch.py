"""Launching a guest with the guest owner's tools: session, measurement, secret, attestation,
SEV-ES VMSAs, and every LAUNCH_* check (AMD-ASPFW sev_mcmd_launch_*, sev-tool's flow)."""
import hashlib
import os

import pytest
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.utils import encode_dss_signature

from sevcore.vmm import owner
from sevcore import uapi as U
from sevcore.psp import PspError
from sevcore.psp import certs as C
from sevcore.psp import crypto as X
from sevcore.psp import layout as L

from support.psp import ES_ASID, SEV_ASID, Launched, _Rng, blob, pages, raw, ready, snapshot

OK = U.SEV_RET_SUCCESS
ES = U.SEV_POLICY_MASK_ES


def test_full_launch_with_sev_tool_files(tmp_path):
    """The sev-tool flow end to end: cert chain check, launch blob, measurement check, packaged
    secret injected and read back decrypted through the memory controller with the guest's key,
    attestation report validated."""
    host = ready()
    psp = host.psp
    folder = str(tmp_path)
    owner.write_cert_chain(folder, psp.export_cert_chain())
    owner.validate_cert_chain(folder)
    policy = U.SEV_POLICY_MASK_NOKS
    rng = _Rng(b"flow")
    session = owner.generate_launch_blob(folder, policy, rng)
    for name in ("godh.cert", "launch_blob.bin", "tmp_tk.bin"):
        assert os.path.getsize(tmp_path / name) == {"godh.cert": 2084, "launch_blob.bin": 128,
                                                    "tmp_tk.bin": 32}[name]
    handle = psp.launch_start(policy, (tmp_path / "godh.cert").read_bytes(),
                              (tmp_path / "launch_blob.bin").read_bytes())
    psp.activate(handle, SEV_ASID)
    firmware_image = rng(3 * 4096 + 512)
    spa = pages(host, 4)
    host.mem.write(spa, firmware_image)
    psp.launch_update_data(handle, spa, len(firmware_image))
    assert host.mem.read(spa, 64) != firmware_image[:64]            # encrypted in place
    m = psp.launch_measure(handle)
    st = psp.platform_status()
    digest = owner.launch_digest(firmware_image)
    calc = owner.calc_measurement_files(folder, st.api_major, st.api_minor, st.build, policy,
                                        digest, m.mnonce)
    assert calc == m.measurement
    assert (tmp_path / "calc_measurement_out.txt").read_text() == calc.hex()
    secret = b"disk passphrase!" * 4
    (tmp_path / "secret.txt").write_bytes(secret)
    header, ct = owner.package_secret_files(folder, rng)
    assert (tmp_path / "packaged_secret_header.bin").read_bytes() == header
    target = spa + 3 * 4096 + 1024
    psp.launch_secret(handle, header, ct, target)
    assert host.umc.read(target, len(secret), SEV_ASID) == secret
    assert host.mem.read(target, len(secret)) != secret
    psp.launch_finish(handle)
    report = psp.attestation_report(handle, b"\x11" * 16)
    (tmp_path / "attestation_report.bin").write_bytes(report.raw)
    assert owner.validate_attestation(folder)
    assert report.launch_digest == digest and report.policy == policy
    assert session.tik == (tmp_path / "tmp_tk.bin").read_bytes()[16:]


def test_attestation_report_verifies_with_cryptography():
    """The report's PEK signature (ECDSA P-384 over bytes 0..0x33, SHA-256) passes OpenSSL."""
    host = ready()
    g = Launched(host, finish=True)
    rep = host.psp.attestation_report(g.handle, b"\x22" * 16).raw
    assert (rep[0x34:0x38], rep[0x38:0x3C]) == (X.le32(C.USAGE_PEK), X.le32(C.ALGO_ECDSA_SHA256))
    pek = host.psp.pdh_cert_export().pek_cert
    point = C.ec_point_of(C.pubkey_of(pek)).pointQ
    pub = ec.EllipticCurvePublicNumbers(int(point.x), int(point.y), ec.SECP384R1()).public_key()
    r = int.from_bytes(rep[0x40:0x40 + 72], "little")
    s = int.from_bytes(rep[0x40 + 72:0x40 + 144], "little")
    pub.verify(encode_dss_signature(r, s), rep[:0x34], ec.ECDSA(hashes.SHA256()))
    bad = bytearray(rep)
    bad[0x31] ^= 1                                     # the policy
    assert not owner.verify_attestation_report(bytes(bad), pek)


def test_attestation_against_a_pek_without_a_p384_key_is_false():
    """A PEK certificate that holds no P-384 point, or is cut short, verifies no report."""
    host = ready()
    g = Launched(host, finish=True)
    rep = host.psp.attestation_report(g.handle, b"\x22" * 16).raw
    pek = host.psp.pdh_cert_export().pek_cert
    assert owner.verify_attestation_report(rep, pek)
    not_on_curve = bytearray(pek)
    not_on_curve[8 + 12] ^= 1                          # qx
    for bad in (bytes(not_on_curve), pek[:12], b""):
        assert owner.verify_attestation_report(rep, bad) is False


@pytest.mark.parametrize("operation, name, size", [
    ("generate_launch_blob", "pdh.cert", 2084),
    ("LaunchSession.read", "tmp_tk.bin", 32),
    ("LaunchSession.read", "godh.cert", 2084),
    ("LaunchSession.read", "launch_blob.bin", 128),
    ("calc_measurement_files", "tmp_tk.bin", 32),
    ("package_secret_files", "pek.cert", 2084),
    ("package_secret_files", "calc_measurement_out.bin", 32),
    ("validate_attestation", "pek.cert", 2084),
])
def test_sev_tool_file_too_short_is_value_error(tmp_path, operation, name, size):
    """A file shorter than sev-tool reads is ValueError naming it; a longer one is read as
    sev-tool reads it, its first bytes only."""
    host = ready()
    folder = str(tmp_path)
    owner.write_cert_chain(folder, host.psp.export_cert_chain())
    rng = _Rng(b"short files")
    owner.generate_launch_blob(folder, 0, rng)
    owner.calc_measurement_files(folder, 1, 55, 25, 0, bytes(32), bytes(16))
    (tmp_path / "secret.txt").write_bytes(b"disk passphrase!")
    (tmp_path / "attestation_report.bin").write_bytes(bytes(0xD0))
    calls = {"generate_launch_blob": lambda: owner.generate_launch_blob(folder, 0, rng),
             "LaunchSession.read": lambda: owner.LaunchSession.read(folder, 0),
             "calc_measurement_files": lambda: owner.calc_measurement_files(
                 folder, 1, 55, 25, 0, bytes(32), bytes(16)),
             "package_secret_files": lambda: owner.package_secret_files(folder, rng),
             "validate_attestation": lambda: owner.validate_attestation(folder)}
    path = tmp_path / name
    full = path.read_bytes()
    assert len(full) == size
    path.write_bytes(full + b"tail")
    calls[operation]()
    path.write_bytes(full[:size - 1])
    with pytest.raises(ValueError, match=f"{name} holds {size - 1} bytes"):
        calls[operation]()


def test_measurement_mismatch_is_detected():
    """verify_measurement refuses a wrong digest, policy, firmware version or TIK."""
    host = ready()
    g = Launched(host, measure=True)
    digest = hashlib.sha256(g.data).digest()
    args = (g.session.tik, g.measure.raw, digest, 1, 55, 25, 0)
    assert owner.verify_measurement(*args)
    for i, bad in [(2, hashlib.sha256(b"x").digest()), (6, 1), (4, 54), (0, bytes(16))]:
        wrong = list(args)
        wrong[i] = bad
        assert not owner.verify_measurement(*wrong)


def test_launch_start_refuses_bad_sessions_and_changes_nothing():
    """LAUNCH_START: lengths, a foreign or malformed DH certificate, a wrong wrap or policy MAC, a
    too-new API, reserved policy bits, ES on a non-ES platform -- each with its status, and
    nothing allocated."""
    host = ready()
    pdh = host.psp.pdh_cert_export().pdh_cert
    good = owner.create_launch_session(pdh, 0, _Rng(b"ls"))

    def session_for(policy):
        return owner.create_launch_session(pdh, policy, _Rng(b"ls2"))

    def fields(sess, policy=0, dh=None, **kw):
        base = dict(policy=policy, dh_cert_address=blob(host, dh or sess.godh_cert),
                    dh_cert_len=2084, session_address=blob(host, sess.session), session_len=128)
        base.update(kw)
        return base

    wrong_usage = bytearray(good.godh_cert)
    wrong_usage[8:12] = X.le32(C.USAGE_PEK)
    off_curve = bytearray(good.godh_cert)
    off_curve[0x14] ^= 1
    bad_wrap = bytearray(good.session)
    bad_wrap[20] ^= 1
    bad_pmac = bytearray(good.session)
    bad_pmac[100] ^= 1
    new_api = 0x00FF0000 | (0 << 24)                   # API 255.0 > 1.55
    other = owner.create_launch_session(ready(seed=12).psp.pdh_cert_export().pdh_cert, 0,
                                        _Rng(b"x"))
    cases = [
        (fields(good, session_len=127), U.SEV_RET_INVALID_LEN),
        (fields(good, dh_cert_len=2083), U.SEV_RET_INVALID_LEN),
        (fields(good, dh=bytes(wrong_usage)), U.SEV_RET_INVALID_CERTIFICATE),
        (fields(good, dh=bytes(off_curve)), U.SEV_RET_INVALID_CERTIFICATE),
        (fields(good, session_address=blob(host, bytes(bad_wrap))), U.SEV_RET_BAD_MEASUREMENT),
        (fields(good, session_address=blob(host, bytes(bad_pmac))), U.SEV_RET_BAD_MEASUREMENT),
        (fields(good, policy=1), U.SEV_RET_BAD_MEASUREMENT),           # host changed the policy
        (fields(other), U.SEV_RET_BAD_MEASUREMENT),                    # made for another PDH
        (fields(session_for(new_api), policy=new_api), U.SEV_RET_POLICY_FAILURE),
        (fields(session_for(1 << 6), policy=1 << 6), U.SEV_RET_POLICY_FAILURE),
        (fields(session_for(ES), policy=ES), U.SEV_RET_UNSUPPORTED),
        (fields(good, session_address=host.mem.size), U.SEV_RET_INVALID_ADDRESS),
    ]
    before = snapshot(host)
    for f, want in cases:
        assert raw(host, U.SEV_CMD_LAUNCH_START, L.sev_data_launch_start, **f)[0] == want, f
    assert snapshot(host) == before
    st, out = raw(host, U.SEV_CMD_LAUNCH_START, L.sev_data_launch_start, **fields(good))
    assert (st, out["handle"]) == (OK, 1)


def test_launch_without_session_has_zero_keys_and_no_policy_check():
    """No DH certificate: TEK = TIK = 0 and the policy is not validated."""
    host = ready()
    reserved_policy = 1 << 9
    h = host.psp.launch_start(reserved_policy)
    g = host.psp.guest(h)
    assert g.tek == g.tik == bytes(16) and g.policy == reserved_policy


def test_launch_update_data_checks_and_measures_in_call_order():
    """LAUNCH_UPDATE_DATA's checks (alignment, length, range) change nothing; the digest covers
    every byte of every call in order, whatever the chunking."""
    host = ready()
    g = Launched(host, npages=1)
    spa = pages(host, 3)
    data = os.urandom(3 * 4096)
    host.mem.write(spa, data)
    cases = [(dict(address=spa + 8, len=32), U.SEV_RET_INVALID_ADDRESS),
             (dict(address=spa, len=40), U.SEV_RET_INVALID_LEN),
             (dict(address=spa, len=0), U.SEV_RET_INVALID_LEN),
             (dict(address=host.mem.size - 4096, len=8192), U.SEV_RET_INVALID_ADDRESS),
             (dict(handle=0, address=spa, len=16), U.SEV_RET_INVALID_GUEST)]
    before = snapshot(host, (spa, len(data)))
    for f, want in cases:
        f.setdefault("handle", g.handle)
        assert raw(host, U.SEV_CMD_LAUNCH_UPDATE_DATA, L.sev_data_launch_update_data,
                   **f)[0] == want, f
    assert snapshot(host, (spa, len(data))) == before
    host.psp.launch_update_data(g.handle, spa + 16, 4096)           # crosses a page
    host.psp.launch_update_data(g.handle, spa + 4112, 8192 - 16)
    m = host.psp.launch_measure(g.handle)
    digest = owner.launch_digest(g.data, data[16:])
    assert owner.verify_measurement(g.session.tik, m.raw, digest, 1, 55, 25, 0)
    assert host.umc.read(spa + 16, len(data) - 16, SEV_ASID) == data[16:]
    assert host.mem.read(spa, 16) == data[:16]                       # outside: untouched


def test_launch_measure_length_query():
    """LAUNCH_MEASURE with len < 48 returns INVALID_LEN and len = 48, and stays in LUPDATE."""
    host = ready()
    g = Launched(host)
    out = pages(host, 1)
    st, f = raw(host, U.SEV_CMD_LAUNCH_MEASURE, L.sev_data_launch_measure, handle=g.handle,
                address=out, len=0)
    assert (st, f["len"]) == (U.SEV_RET_INVALID_LEN, 48)
    assert host.psp.guest_status(g.handle).state == U.SEV_GUEST_STATE_LAUNCH_UPDATE
    st, f = raw(host, U.SEV_CMD_LAUNCH_MEASURE, L.sev_data_launch_measure, handle=g.handle,
                address=out, len=64)
    assert (st, f["len"]) == (OK, 64)                 # not rewritten on success


def test_launch_secret_refusals_write_nothing():
    """LAUNCH_SECRET: address, lengths, state, a bad MAC (also one bound to another launch),
    compression -- each refused with its status and no byte of guest memory written."""
    host = ready()
    g = Launched(host, measure=True)
    tek, tik, measure = g.session.tek, g.session.tik, g.measure.measurement
    rng = _Rng(b"sec")
    hdr, ct = owner.package_secret(tek, tik, bytes(range(32)), measure, rng)
    target = g.spa + 256

    def f(h=hdr, c=ct, **kw):
        base = dict(handle=g.handle, hdr_address=blob(host, h), hdr_len=52,
                    guest_address=target, guest_len=len(c), trans_address=blob(host, c),
                    trans_len=len(c))
        base.update(kw)
        return base

    wrong_measure = owner.package_secret(tek, tik, bytes(range(32)), bytes(32), rng)
    flipped = bytearray(ct)
    flipped[3] ^= 1
    compressed = X.packet_header(1, hdr[4:20],
                                 X.packet_mac(tik, X.CTX_SECRET, 1, hdr[4:20], 32, 32, ct,
                                              measure))
    cases = [(f(guest_address=target + 8), U.SEV_RET_INVALID_ADDRESS),
             (f(hdr_len=51), U.SEV_RET_INVALID_LEN),
             (f(guest_len=24, trans_len=24), U.SEV_RET_INVALID_LEN),
             (f(guest_len=32, trans_len=48), U.SEV_RET_INVALID_LEN),
             (f(guest_len=0x5010, trans_len=0x5010), U.SEV_RET_INVALID_LEN),
             (f(c=bytes(flipped)), U.SEV_RET_BAD_MEASUREMENT),
             (f(*wrong_measure), U.SEV_RET_BAD_MEASUREMENT),
             (f(h=compressed), U.SEV_RET_UNSUPPORTED)]
    before = snapshot(host, (g.spa, 2 * 4096))
    for fields, want in cases:
        assert raw(host, U.SEV_CMD_LAUNCH_UPDATE_SECRET, L.sev_data_launch_secret,
                   **fields)[0] == want, fields
    assert snapshot(host, (g.spa, 2 * 4096)) == before
    host.psp.launch_secret(g.handle, hdr, ct, target)
    host.psp.launch_secret(g.handle, hdr, ct, target + 4096)        # may repeat
    assert host.umc.read(target, 32, SEV_ASID) == bytes(range(32))
    host.psp.launch_finish(g.handle)
    with pytest.raises(PspError) as exc:                              # TIK gone at FINISH
        host.psp.launch_secret(g.handle, hdr, ct, target)
    assert exc.value.fw_error == U.SEV_RET_INVALID_GUEST_STATE


def test_sev_es_launch_measures_vmsa_before_the_checksum_is_written(es_host):
    """SEV-ES: the ES policy needs an SEV-ES ASID, LAUNCH_UPDATE_VMSA measures the VMSA as given,
    writes the TMR checksum address into it (0x388) and encrypts it."""
    host, psp = es_host, es_host.psp
    pdh = psp.pdh_cert_export().pdh_cert
    s = owner.create_launch_session(pdh, ES, _Rng(b"es"))
    h = psp.launch_start(ES, s.godh_cert, s.session)
    assert raw(host, U.SEV_CMD_ACTIVATE, L.sev_data_activate, handle=h,
               asid=SEV_ASID)[0] == U.SEV_RET_INVALID_ASID
    psp.activate(h, ES_ASID)
    spa = pages(host, 2)
    vmsa = os.urandom(4096)
    host.mem.write(spa, vmsa)
    assert raw(host, U.SEV_CMD_LAUNCH_UPDATE_VMSA, L.sev_data_launch_update_vmsa, handle=h,
               address=spa, len=4080)[0] == U.SEV_RET_INVALID_LEN
    psp.launch_update_vmsa(h, spa)
    inside = host.umc.read(spa, 4096, ES_ASID)
    crc = int.from_bytes(inside[0x388:0x390], "little")
    assert inside[:0x380] == vmsa[:0x380] and inside[0x390:] == vmsa[0x390:]
    assert inside[0x380:0x388] == bytes(8) and crc in psp.guest(h).vmsa_blocks
    m = psp.launch_measure(h)
    assert owner.verify_measurement(s.tik, m.raw, hashlib.sha256(vmsa).digest(), 1, 55, 25, ES)


def test_sev_es_checksum_blocks_are_freed_at_decommission(es_host):
    """Each VMSA takes a checksum block in the TMR; DECOMMISSION gives them back."""
    psp = es_host.psp
    h = psp.launch_start(ES)
    psp.activate(h, ES_ASID)
    spa = pages(es_host, 3)
    for i in range(3):
        psp.launch_update_vmsa(h, spa + 4096 * i)
    blocks = psp.guest(h).vmsa_blocks
    assert len(set(blocks)) == 3 and set(blocks) <= set(psp._tmr_crc)
    psp.deactivate(h)
    psp.decommission(h)
    assert not psp._tmr_crc
