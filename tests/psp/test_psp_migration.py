"""Migration between two hosts through their PSPs (AMD SEV API #55766, "Guest Management API",
SEND_START to RECEIVE_FINISH; AMD-ASPFW sev_mcmd_send_*/receive_*): target authentication by
policy, packets, refusals, the SENT and SEND_CANCEL transitions, SEV-ES VMSAs."""
import os

import pytest

from sevcore.vmm import owner
from sevcore import uapi as U
from sevcore.psp import PspError
from sevcore.psp import amd_root
from sevcore.psp import crypto as X
from sevcore.psp import layout as L
from sevcore.psp.api import Packet

from support.psp import (ES_ASID, SEV_ASID, Launched, _Rng, blob, migration_pair, pages, raw,
                         ready, snapshot)

OK = U.SEV_RET_SUCCESS
SEV, DOMAIN = U.SEV_POLICY_MASK_SEV, U.SEV_POLICY_MASK_DOMAIN


def move_pages(src, dst, handle, npages):
    """SEND_UPDATE_DATA each page on the source, RECEIVE_UPDATE_DATA it on the target."""
    where = pages(dst, npages)
    for i in range(npages):
        pkt = src.psp.send_update_data(src.handle, src.spa + 4096 * i, 4096)
        assert pkt.ciphertext != src.data[4096 * i:4096 * (i + 1)]
        dst.psp.receive_update_data(handle, pkt, where + 4096 * i)
    return where


@pytest.mark.parametrize("policy", [0, SEV, DOMAIN, SEV | DOMAIN], ids=["none", "SEV", "DOMAIN",
                                                                        "SEV+DOMAIN"])
def test_pages_move_intact(policy):
    """Pages sent by one host's PSP arrive intact under the target guest's key; the target runs
    after RECEIVE_FINISH and the source is SENT after SEND_FINISH."""
    src_host, dst_host = ready(seed=41), ready(seed=42)
    if policy & DOMAIN:                       # one owner's OCA for both platforms
        key, oca = owner.new_oca(_Rng(b"oca"))
        for h in (src_host, dst_host):
            h.psp.pek_cert_import(owner.sign_pek_csr(h.psp.pek_csr(), key), oca)
    src = Launched(src_host, policy=policy, npages=3, finish=True)
    chain = dst_host.psp.export_cert_chain()
    start = src.psp.send_start(src.handle, chain.pdh, chain.plat_certs, chain.amd_certs)
    assert start.policy == policy
    handle = dst_host.psp.receive_start(policy, src.psp.pdh_cert_export().pdh_cert,
                                        start.session)
    dst_host.psp.activate(handle, SEV_ASID + 7)
    where = move_pages(src, dst_host, handle, 3)
    assert dst_host.umc.read(where, 3 * 4096, SEV_ASID + 7) == src.data
    src.psp.send_finish(src.handle)
    dst_host.psp.receive_finish(handle)
    assert dst_host.psp.guest_status(handle).state == U.SEV_GUEST_STATE_RUNNING
    assert src.psp.guest_status(src.handle).state == U.SEV_GUEST_STATE_SENT


def send_start_status(src, **fields):
    base = dict(handle=src.handle, session_address=pages(src.host, 1), session_len=128)
    base.update(fields)
    return raw(src.host, U.SEV_CMD_SEND_START, L.sev_data_send_start, **base)


def test_sev_policy_authenticates_the_whole_chain():
    """With the SEV bit the target's PDH, PEK, CEK, the ASK and the ARK are checked: each broken
    link fails with the firmware's status and the guest stays RUNNING."""
    dst = ready(seed=44)
    chain = dst.psp.export_cert_chain()
    other = ready(seed=45).psp.export_cert_chain()
    src = Launched(ready(seed=43), policy=SEV, finish=True)
    host = src.host

    def f(pdh=chain.pdh, plat=chain.plat_certs, amd=chain.amd_certs, **kw):
        base = dict(pdh_cert_address=blob(host, pdh), pdh_cert_len=len(pdh),
                    plat_certs_address=blob(host, plat), plat_certs_len=len(plat),
                    amd_certs_address=blob(host, amd), amd_certs_len=len(amd))
        base.update(kw)
        return base

    bad_ask = bytearray(chain.ask)
    bad_ask[200] ^= 1
    foreign_ark = amd_root.ask_cert() + amd_root.ask_cert()     # an ARK we do not trust
    unsigned_cek = chain.pek + chain.oca + dst.psp.pdh_cert_export().cek_cert
    cases = [(f(plat=b""), U.SEV_RET_INVALID_LEN),
             (f(amd=chain.amd_certs[:-1]), U.SEV_RET_INVALID_LEN),
             (f(amd=bytes(bad_ask) + chain.ark), U.SEV_RET_BAD_SIGNATURE),
             (f(amd=foreign_ark), U.SEV_RET_BAD_SIGNATURE),
             (f(plat=unsigned_cek), U.SEV_RET_INVALID_CERTIFICATE),
             (f(plat=other.plat_certs), U.SEV_RET_BAD_SIGNATURE),     # PDH not by that PEK
             (f(pdh=other.pdh), U.SEV_RET_BAD_SIGNATURE)]
    before = snapshot(host)
    for fields, want in cases:
        assert send_start_status(src, **fields)[0] == want, fields
    assert snapshot(host) == before
    src.psp.fused_ark_hash = bytes(48)          # a part of another family trusts another ARK
    assert send_start_status(src, **f())[0] == U.SEV_RET_INVALID_CERTIFICATE
    src.psp.fused_ark_hash = amd_root.ARK_PUBKEY_HASH
    assert send_start_status(src, **f())[0] == OK


def test_sev_policy_checks_the_receivers_api_version():
    """With the SEV bit, a policy needing a newer API than the target's PEK is POLICY_FAILURE."""
    dst = ready(seed=47)
    chain = dst.psp.export_cert_chain()
    host = ready(seed=46)
    policy = SEV | (2 << 16)                    # API 2.0; no session, so LAUNCH_START allows it
    h = host.psp.launch_start(policy)
    host.psp.activate(h, SEV_ASID)
    host.psp.launch_measure(h)
    host.psp.launch_finish(h)
    with pytest.raises(PspError) as exc:
        host.psp.send_start(h, chain.pdh, chain.plat_certs, chain.amd_certs)
    assert exc.value.fw_error == U.SEV_RET_POLICY_FAILURE


def test_domain_policy_needs_the_same_oca():
    """With the DOMAIN bit the target's OCA must be this platform's (else POLICY_FAILURE)."""
    src, dst = Launched(ready(seed=48), policy=DOMAIN, finish=True), ready(seed=49)
    chain = dst.psp.export_cert_chain()
    with pytest.raises(PspError) as exc:
        src.psp.send_start(src.handle, chain.pdh, chain.plat_certs)
    assert exc.value.fw_error == U.SEV_RET_POLICY_FAILURE
    with pytest.raises(PspError) as exc:
        src.psp.send_start(src.handle, chain.pdh)             # no chain at all
    assert exc.value.fw_error == U.SEV_RET_INVALID_LEN


def test_policy_zero_authenticates_nothing_but_the_pdh_shape():
    """Without SEV or DOMAIN only the PDH's length and shape are checked; no certs needed."""
    src = Launched(ready(seed=50), finish=True)
    pdh = ready(seed=51).psp.pdh_cert_export().pdh_cert
    assert send_start_status(src, pdh_cert_address=blob(src.host, pdh), pdh_cert_len=2084)[0] == OK


def test_nosend_refused_and_session_length_query():
    """NOSEND is POLICY_FAILURE; session_len != 128 is the length query (after the handle)."""
    src = Launched(ready(seed=52), policy=U.SEV_POLICY_MASK_NOSEND, finish=True)
    pdh = blob(src.host, ready(seed=53).psp.pdh_cert_export().pdh_cert)
    before = snapshot(src.host)
    st, f = send_start_status(src, pdh_cert_address=pdh, pdh_cert_len=2084, session_len=0)
    assert (st, f["session_len"]) == (U.SEV_RET_INVALID_LEN, 128)
    st, f = send_start_status(src, handle=9, session_len=0)
    assert (st, f["session_len"]) == (U.SEV_RET_INVALID_GUEST, 0)
    assert send_start_status(src, pdh_cert_address=pdh, pdh_cert_len=2084)[0] == \
        U.SEV_RET_POLICY_FAILURE
    assert snapshot(src.host) == before


def test_send_finish_is_final_and_send_cancel_resumes():
    """After SEND_FINISH the guest can never be activated again; SEND_CANCEL returns to RUNNING
    and a new SEND_START may follow."""
    src, dst, handle, _ = migration_pair()
    psp = src.psp
    psp.send_cancel(src.handle)
    assert psp.guest_status(src.handle).state == U.SEV_GUEST_STATE_RUNNING
    pdh = dst.psp.pdh_cert_export().pdh_cert
    psp.send_start(src.handle, pdh)
    psp.send_finish(src.handle)
    psp.deactivate(src.handle)
    assert raw(src.host, U.SEV_CMD_ACTIVATE, L.sev_data_activate, handle=src.handle,
               asid=SEV_ASID + 3)[0] == U.SEV_RET_INVALID_GUEST_STATE
    assert raw(src.host, U.SEV_CMD_SEND_START, L.sev_data_send_start, handle=src.handle,
               session_len=128)[0] == U.SEV_RET_INVALID_GUEST_STATE
    del handle


def test_a_flipped_bit_is_refused_with_nothing_written():
    """RECEIVE_UPDATE_DATA checks the MAC first: any flipped bit of ciphertext, IV, MAC or flags
    is BAD_MEASUREMENT (compression UNSUPPORTED) and the target page keeps its bytes."""
    src, dst, handle, _ = migration_pair()
    pkt = src.psp.send_update_data(src.handle, src.spa, 4096)
    where = pages(dst, 1)
    dst.mem.write(where, b"\x5a" * 4096)
    before = snapshot(dst, (where, 4096))
    ct_bit = bytearray(pkt.ciphertext)
    ct_bit[777] ^= 0x10
    for i, h in [(4, pkt.header), (20, pkt.header), (51, pkt.header)]:
        bad = bytearray(h)
        bad[i] ^= 1
        with pytest.raises(PspError) as exc:
            dst.psp.receive_update_data(handle, Packet(bytes(bad), pkt.ciphertext), where)
        assert exc.value.fw_error == U.SEV_RET_BAD_MEASUREMENT
    with pytest.raises(PspError) as exc:
        dst.psp.receive_update_data(handle, Packet(pkt.header, bytes(ct_bit)), where)
    assert exc.value.fw_error == U.SEV_RET_BAD_MEASUREMENT
    flags = bytearray(pkt.header)
    flags[0] |= 2                                      # an unknown flag is MAC'd
    with pytest.raises(PspError) as exc:
        dst.psp.receive_update_data(handle, Packet(bytes(flags), pkt.ciphertext), where)
    assert exc.value.fw_error == U.SEV_RET_BAD_MEASUREMENT
    flags[0] |= 1
    with pytest.raises(PspError) as exc:
        dst.psp.receive_update_data(handle, Packet(bytes(flags), pkt.ciphertext), where)
    assert exc.value.fw_error == U.SEV_RET_UNSUPPORTED
    assert snapshot(dst, (where, 4096)) == before
    dst.psp.receive_update_data(handle, pkt, where)
    assert dst.umc.read(where, 4096, SEV_ASID) == src.data[:4096]


def test_packets_are_not_bound_to_an_address_or_order():
    """The packet format authenticates origin only: a packet replays at any address, twice."""
    src, dst, handle, _ = migration_pair()
    pkt = src.psp.send_update_data(src.handle, src.spa + 4096, 4096)
    where = pages(dst, 2)
    dst.psp.receive_update_data(handle, pkt, where + 4096)
    dst.psp.receive_update_data(handle, pkt, where)
    assert dst.umc.read(where, 4096, SEV_ASID) == src.data[4096:] == \
        dst.umc.read(where + 4096, 4096, SEV_ASID)


def test_send_update_checks_and_length_query():
    """SEND_UPDATE_DATA: hdr_len < 52 is answered with 52 before the handle is checked; lengths,
    alignment and range are refused with nothing written; partial pages and 16-byte
    granularity work."""
    src, _, _, _ = migration_pair()
    host = src.host
    buf = pages(host, 8)

    def f(**kw):
        base = dict(handle=src.handle, hdr_address=buf, hdr_len=52, guest_address=src.spa,
                    guest_len=4096, trans_address=buf + 4096, trans_len=4096)
        base.update(kw)
        return base

    st, out = raw(host, U.SEV_CMD_SEND_UPDATE_DATA, L.sev_data_send_update_data,
                  **f(handle=77, hdr_len=0))
    assert (st, out["hdr_len"]) == (U.SEV_RET_INVALID_LEN, 52)
    cases = [(f(handle=77), U.SEV_RET_INVALID_GUEST),
             (f(guest_len=0), U.SEV_RET_INVALID_LEN),
             (f(guest_len=0x5010, trans_len=0x5010), U.SEV_RET_INVALID_LEN),
             (f(guest_len=40, trans_len=40), U.SEV_RET_INVALID_LEN),
             (f(trans_len=4080), U.SEV_RET_INVALID_LEN),
             (f(guest_address=src.spa + 8), U.SEV_RET_INVALID_ADDRESS),
             (f(trans_address=host.mem.size - 16), U.SEV_RET_INVALID_ADDRESS)]
    before = snapshot(host, (buf, 8 * 4096))
    for fields, want in cases:
        assert raw(host, U.SEV_CMD_SEND_UPDATE_DATA, L.sev_data_send_update_data,
                   **fields)[0] == want, fields
    assert snapshot(host, (buf, 8 * 4096)) == before
    pkt = src.psp.send_update_data(src.handle, src.spa + 48, 160)
    g = src.psp.guest(src.handle)
    assert X.aes128_ctr(g.tek, pkt.header[4:20], pkt.ciphertext) == src.data[48:208]


def test_receive_checks_change_nothing():
    """RECEIVE_START and RECEIVE_UPDATE_DATA refusals: lengths, a changed policy, a short
    header, unequal lengths."""
    src, dst, handle, start = migration_pair()
    src_pdh = src.psp.pdh_cert_export().pdh_cert
    before = snapshot(dst)
    for fields, want in [(dict(policy=1), U.SEV_RET_BAD_MEASUREMENT),
                         (dict(session_len=0), U.SEV_RET_INVALID_LEN),
                         (dict(pdh_cert_len=100), U.SEV_RET_INVALID_LEN)]:
        base = dict(policy=0, pdh_cert_address=blob(dst, src_pdh), pdh_cert_len=2084,
                    session_address=blob(dst, start.session), session_len=128)
        base.update(fields)
        assert raw(dst, U.SEV_CMD_RECEIVE_START, L.sev_data_receive_start, **base)[0] == want
    assert snapshot(dst) == before
    pkt = src.psp.send_update_data(src.handle, src.spa, 4096)
    where = pages(dst, 1)
    for fields, want in [(dict(hdr_len=51), U.SEV_RET_INVALID_LEN),
                         (dict(trans_len=4080), U.SEV_RET_INVALID_LEN),
                         (dict(guest_address=where + 4), U.SEV_RET_INVALID_ADDRESS)]:
        base = dict(handle=handle, hdr_address=blob(dst, pkt.header), hdr_len=52,
                    guest_address=where, guest_len=4096,
                    trans_address=blob(dst, pkt.ciphertext), trans_len=4096)
        base.update(fields)
        assert raw(dst, U.SEV_CMD_RECEIVE_UPDATE_DATA, L.sev_data_receive_update_data,
                   **base)[0] == want
    assert snapshot(dst, (where, 4096))[:5] == before[:5]


def test_sev_es_vmsa_migrates_with_its_checksum():
    """SEND_UPDATE_VMSA checks the VMSA's TMR checksum (a VMSA changed behind the firmware's back
    is INVALID_PARAM); RECEIVE_UPDATE_VMSA gives the target its own checksum block, and only to
    a packet whose MAC holds."""
    es = U.SEV_POLICY_MASK_ES
    src_host, dst_host = ready(seed=61, es=True), ready(seed=62, es=True)
    h = src_host.psp.launch_start(es)
    src_host.psp.activate(h, ES_ASID)
    vmsa_spa = pages(src_host, 1)
    vmsa = os.urandom(4096)
    src_host.mem.write(vmsa_spa, vmsa)
    src_host.psp.launch_update_vmsa(h, vmsa_spa)
    src_host.psp.launch_measure(h)
    src_host.psp.launch_finish(h)
    start = src_host.psp.send_start(h, dst_host.psp.pdh_cert_export().pdh_cert)
    dh = dst_host.psp.receive_start(start.policy, src_host.psp.pdh_cert_export().pdh_cert,
                                    start.session)
    dst_host.psp.activate(dh, ES_ASID)
    pkt = src_host.psp.send_update_vmsa(h, vmsa_spa)
    where = pages(dst_host, 1)
    bad = bytearray(pkt.header)
    bad[30] ^= 1
    with pytest.raises(PspError) as exc:
        dst_host.psp.receive_update_vmsa(dh, Packet(bytes(bad), pkt.ciphertext), where)
    assert exc.value.fw_error == U.SEV_RET_BAD_MEASUREMENT
    assert not dst_host.psp.guest(dh).vmsa_blocks and dst_host.mem.read(where, 4096) == bytes(4096)
    dst_host.psp.receive_update_vmsa(dh, pkt, where)
    got = dst_host.umc.read(where, 4096, ES_ASID)
    assert got[:0x388] == vmsa[:0x380] + bytes(8) and got[0x390:] == vmsa[0x390:]
    assert int.from_bytes(got[0x388:0x390], "little") in dst_host.psp.guest(dh).vmsa_blocks
    src_host.umc.write(vmsa_spa + 0x100, b"\x01", ES_ASID)             # rewritten behind it
    with pytest.raises(PspError) as exc:
        src_host.psp.send_update_vmsa(h, vmsa_spa)
    assert exc.value.fw_error == U.SEV_RET_INVALID_PARAM
