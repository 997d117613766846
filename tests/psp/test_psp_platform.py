"""Platform state machine and platform commands (AMD SEV API #55766, "Platform Management API";
AMD-ASPFW sev_mcmd.c, sev_plat.c): every platform command in every platform state, INIT's
checks, persistence, DF_FLUSH's WBINVD rule, the dispatcher."""
import pytest

import sevcore
from sevcore import uapi as U
from sevcore.kvm.sev import SevError
from sevcore.psp import PspError
from sevcore.psp import certs as C
from sevcore.psp import layout as L
from sevcore.vmm.owner import CertChainError

from support.psp import Launched, pages, raw, ready, snapshot

OK = U.SEV_RET_SUCCESS
BADP = U.SEV_RET_INVALID_PLATFORM_STATE


def in_state(state):
    """A Host whose firmware is UNINIT, INIT or WORKING (one launched guest)."""
    if state == U.SEV_STATE_UNINIT:
        return sevcore.Host(seed=3)
    host = ready(seed=3)
    if state == U.SEV_STATE_WORKING:
        Launched(host)
    return host


def issue(host, cmd):
    """Issue ``cmd`` with arguments that are valid whenever the state allows the command."""
    buf = pages(host, 4)
    if cmd == U.SEV_CMD_INIT:
        return raw(host, cmd, L.sev_data_init)[0]
    if cmd == U.SEV_CMD_INIT_EX:
        return raw(host, cmd, L.sev_data_init_ex, length=0x24)[0]
    if cmd == U.SEV_CMD_PEK_CSR:
        return raw(host, cmd, L.sev_data_pek_csr, address=buf, len=C.CERT_SIZE)[0]
    if cmd == U.SEV_CMD_PDH_CERT_EXPORT:
        return raw(host, cmd, L.sev_data_pdh_cert_export, pdh_cert_address=buf,
                   pdh_cert_len=C.CERT_SIZE, cert_chain_address=buf + C.CERT_SIZE,
                   cert_chain_len=C.CHAIN_SIZE)[0]
    if cmd == U.SEV_CMD_PEK_CERT_IMPORT:
        from sevcore.vmm import owner
        key, oca = owner.new_oca(lambda n: b"\x07" * n)
        if host.psp.state == U.SEV_STATE_UNINIT:
            pek = bytes(C.CERT_SIZE)
        else:
            pek = owner.sign_pek_csr(host.psp.pek_csr(), key)
        host.mem.write(buf, pek + oca)
        return raw(host, cmd, L.sev_data_pek_cert_import, pek_cert_address=buf,
                   pek_cert_len=C.CERT_SIZE, oca_cert_address=buf + C.CERT_SIZE,
                   oca_cert_len=C.CERT_SIZE)[0]
    if cmd == U.SEV_CMD_GET_ID:
        return raw(host, cmd, L.sev_data_get_id, address=buf, len=64)[0]
    if cmd == U.SEV_CMD_PLATFORM_STATUS:
        return raw(host, cmd, L.sev_user_data_status)[0]
    if cmd == U.SEV_CMD_DOWNLOAD_FIRMWARE:
        return raw(host, cmd, L.sev_data_download_firmware, address=buf, len=4096)[0]
    if cmd == U.SEV_CMD_RING_BUFFER:
        status = raw(host, cmd, L.sev_data_ring_buffer, low_priority_cmd_ptr=buf,
                     low_priority_status_ptr=buf + 4096, low_priority_queue_size=1)[0]
        if status == OK:
            assert host.psp.command(U.SEV_CMD_NOP) == U.SEV_RET_EXIT_RING_BUFFER
        return status
    if cmd == U.SEV_CMD_LAUNCH_START:
        return raw(host, cmd, L.sev_data_launch_start)[0]
    return raw(host, cmd)[0]


UN, IN, WK = U.SEV_STATE_UNINIT, U.SEV_STATE_INIT, U.SEV_STATE_WORKING
# command -> status in (UNINIT, INIT, WORKING); AMD-ASPFW's checks, not the SEV API's table.
MATRIX = {
    U.SEV_CMD_INIT: (OK, BADP, BADP),
    U.SEV_CMD_INIT_EX: (OK, BADP, BADP),
    U.SEV_CMD_SHUTDOWN: (OK, OK, OK),
    U.SEV_CMD_FACTORY_RESET: (OK, BADP, BADP),
    U.SEV_CMD_PLATFORM_STATUS: (OK, OK, OK),
    U.SEV_CMD_PEK_GEN: (BADP, OK, BADP),
    U.SEV_CMD_PEK_CSR: (BADP, OK, OK),
    U.SEV_CMD_PEK_CERT_IMPORT: (BADP, OK, BADP),
    U.SEV_CMD_PDH_CERT_EXPORT: (BADP, OK, OK),
    U.SEV_CMD_PDH_GEN: (BADP, OK, OK),
    U.SEV_CMD_DF_FLUSH: (OK, OK, OK),
    U.SEV_CMD_GET_ID: (OK, OK, OK),
    U.SEV_CMD_NOP: (OK, OK, OK),
    U.SEV_CMD_DOWNLOAD_FIRMWARE: (U.SEV_RET_BAD_SIGNATURE, BADP, BADP),
    U.SEV_CMD_RING_BUFFER: (BADP, OK, OK),
    U.SEV_CMD_LAUNCH_START: (BADP, OK, OK),
}


@pytest.mark.parametrize("cmd", sorted(MATRIX), ids=lambda c: sevcore.psp.command_name(c))
@pytest.mark.parametrize("state", [UN, IN, WK], ids=["UNINIT", "INIT", "WORKING"])
def test_platform_command_matrix(cmd, state):
    """Every platform command in every platform state returns the firmware's status."""
    host = in_state(state)
    host.psp.wbinvd()
    assert issue(host, cmd) == MATRIX[cmd][state]


@pytest.mark.parametrize("cmd", [U.SEV_CMD_ACTIVATE, U.SEV_CMD_DEACTIVATE,
                                 U.SEV_CMD_DECOMMISSION, U.SEV_CMD_LAUNCH_UPDATE_DATA,
                                 U.SEV_CMD_LAUNCH_MEASURE, U.SEV_CMD_LAUNCH_FINISH,
                                 U.SEV_CMD_LAUNCH_UPDATE_SECRET, U.SEV_CMD_ATTESTATION_REPORT,
                                 U.SEV_CMD_SEND_START, U.SEV_CMD_SEND_UPDATE_DATA,
                                 U.SEV_CMD_SEND_FINISH, U.SEV_CMD_SEND_CANCEL,
                                 U.SEV_CMD_RECEIVE_UPDATE_DATA, U.SEV_CMD_RECEIVE_FINISH,
                                 U.SEV_CMD_DBG_DECRYPT, U.SEV_CMD_DBG_ENCRYPT, U.SEV_CMD_COPY])
@pytest.mark.parametrize("state", [UN, IN], ids=["UNINIT", "INIT"])
def test_guest_commands_need_working(cmd, state):
    """Guest commands other than the two STARTs and GUEST_STATUS need a WORKING platform."""
    host = in_state(state)
    from sevcore.psp.firmware import COMMANDS
    layout = COMMANDS[cmd][1]
    assert raw(host, cmd, layout, handle=1)[0] == BADP


def test_guest_status_and_receive_start_platform_states():
    """GUEST_STATUS and RECEIVE_START need INIT or WORKING."""
    host = sevcore.Host(seed=1)
    assert raw(host, U.SEV_CMD_GUEST_STATUS, L.sev_data_guest_status, handle=1)[0] == BADP
    assert raw(host, U.SEV_CMD_RECEIVE_START, L.sev_data_receive_start)[0] == BADP


def test_state_transitions_and_status():
    """INIT -> WORKING at the first guest, back to INIT when the last is decommissioned;
    PLATFORM_STATUS reports the version, state, guest count."""
    host = ready()
    psp = host.psp
    s = psp.platform_status()
    assert (s.api_major, s.api_minor, s.build, s.state, s.guest_count, s.owner, s.es) == \
        (1, 55, 25, U.SEV_STATE_INIT, 0, 0, False)
    a, b = Launched(host, asid=200), Launched(host, asid=201)
    assert psp.platform_status().state == U.SEV_STATE_WORKING
    assert psp.platform_status().guest_count == 2
    for g in (a, b):
        psp.deactivate(g.handle)
        psp.decommission(g.handle)
    assert psp.platform_status().state == U.SEV_STATE_INIT
    psp.shutdown()
    s = psp.platform_status()
    assert (s.state, s.flags, s.guest_count) == (U.SEV_STATE_UNINIT, 0, 0)


def test_es_config_flag(es_host):
    """INIT with SEV_INIT_FLAGS_SEV_ES sets SEV_STATUS_FLAGS_CONFIG_ES (0x100 in the kernel's
    flags)."""
    s = es_host.psp.platform_status()
    assert s.es and s.flags & U.SEV_STATUS_FLAGS_CONFIG_ES


def test_init_refuses_bad_buffers_and_changes_nothing():
    """INIT's checks: reserved bits -> INVALID_CONFIG, TMR alignment -> INVALID_ADDRESS, TMR length
    -> INVALID_LEN, TMR outside memory -> INVALID_ADDRESS; the platform stays UNINIT."""
    host = sevcore.Host(seed=4)
    tmr = 1 << 30
    cases = [(dict(flags=2), U.SEV_RET_INAVLID_CONFIG),
             (dict(flags=1 << 16), U.SEV_RET_INAVLID_CONFIG),
             (dict(reserved=1), U.SEV_RET_INAVLID_CONFIG),
             (dict(flags=1, tmr_address=tmr + 4096, tmr_len=1 << 20), U.SEV_RET_INVALID_ADDRESS),
             (dict(flags=1, tmr_address=tmr, tmr_len=1 << 21), U.SEV_RET_INVALID_LEN),
             (dict(flags=1, tmr_address=host.mem.size, tmr_len=1 << 20),
              U.SEV_RET_INVALID_ADDRESS)]
    for fields, want in cases:
        assert raw(host, U.SEV_CMD_INIT, L.sev_data_init, **fields)[0] == want, fields
        assert host.psp.state == U.SEV_STATE_UNINIT
    assert raw(host, U.SEV_CMD_INIT, L.sev_data_init, flags=1, tmr_address=tmr,
               tmr_len=1 << 20)[0] == OK


def test_init_needs_memory_encryption():
    """INIT on a part without SME on every core returns HWSEV_RET_PLATFORM."""
    host = sevcore.Host(seed=4)
    host.psp.memory_encryption_enabled = False
    assert raw(host, U.SEV_CMD_INIT, L.sev_data_init)[0] == U.SEV_RET_HWSEV_RET_PLATFORM


def test_init_ex_checks():
    """INIT_EX: length must be 0x24, the NV area 4 KiB aligned, inside memory and 32 KiB."""
    host = sevcore.Host(seed=5)
    nv = pages(host, 8)
    cases = [(dict(length=0x20, nv_address=nv, nv_len=32768), U.SEV_RET_INVALID_LEN),
             (dict(length=0x24, nv_address=nv + 16, nv_len=32768), U.SEV_RET_INVALID_ADDRESS),
             (dict(length=0x24, nv_address=nv, nv_len=4096), U.SEV_RET_INVALID_LEN),
             (dict(length=0x24, nv_address=host.mem.size - 4096, nv_len=32768),
              U.SEV_RET_INVALID_ADDRESS),
             (dict(length=0x24, flags=4), U.SEV_RET_INAVLID_CONFIG)]
    for fields, want in cases:
        assert raw(host, U.SEV_CMD_INIT_EX, L.sev_data_init_ex, **fields)[0] == want, fields
        assert host.psp.state == U.SEV_STATE_UNINIT


def test_identity_persists_in_spi_across_shutdown_until_factory_reset():
    """OCA, PEK and PDH survive SHUTDOWN/INIT; FACTORY_RESET deletes them."""
    host = ready()
    psp = host.psp
    first = psp.pdh_cert_export()
    psp.shutdown()
    psp.init()
    assert psp.pdh_cert_export() == first
    psp.shutdown()
    psp.factory_reset()
    psp.init()
    again = psp.pdh_cert_export()
    assert again.pdh_cert != first.pdh_cert and again.oca_cert != first.oca_cert
    assert again.cek_cert == first.cek_cert               # the CEK is derived from the chip


def test_identity_persists_in_the_init_ex_nv_area():
    """INIT_EX keeps the identity in the NV area: sealed (not plaintext), read back after
    SHUTDOWN; a corrupted area is SECURE_DATA_INVALID and erased, and the retry succeeds."""
    host = sevcore.Host(seed=6)
    psp = host.psp
    nv = pages(host, 8)
    host.mem.write(nv, b"\xff" * 32768)
    psp.init_ex(nv_address=nv)
    first = psp.pdh_cert_export()
    stored = host.mem.read(nv, 32768)
    assert first.pdh_cert[:64] not in stored
    psp.shutdown()
    psp.init_ex(nv_address=nv)
    assert psp.pdh_cert_export() == first
    psp.shutdown()
    host.mem.write(nv + 100, b"\x00")
    with pytest.raises(PspError) as exc:
        psp.init_ex(nv_address=nv)
    assert exc.value.fw_error == U.SEV_RET_SECURE_DATA_INVALID
    assert host.mem.read(nv, 32768) == b"\xff" * 32768
    psp.init_ex(nv_address=nv)
    assert psp.pdh_cert_export().pdh_cert != first.pdh_cert


def test_pek_gen_and_pdh_gen():
    """PEK_GEN renews OCA, PEK and PDH; PDH_GEN renews only the PDH, signed by the same PEK."""
    host = ready()
    psp = host.psp
    a = psp.pdh_cert_export()
    psp.pdh_gen()
    b = psp.pdh_cert_export()
    assert b.pdh_cert != a.pdh_cert and b.cert_chain == a.cert_chain
    assert C.validate(b.pdh_cert, C.pubkey_of(b.pek_cert)) == OK
    psp.pek_gen()
    c = psp.pdh_cert_export()
    assert c.pek_cert != a.pek_cert and c.oca_cert != a.oca_cert
    assert C.validate(c.pek_cert, C.pubkey_of(c.oca_cert)) == OK


def test_df_flush_requires_wbinvd_after_deactivating_a_used_asid():
    """After DEACTIVATE of an ASID that ran, ACTIVATE needs DF_FLUSH, which needs WBINVD first;
    an ASID that was only pending comes back clean at once."""
    host = ready()
    psp = host.psp
    g = Launched(host, asid=300, finish=True)          # ran: the ASID is in use
    psp.deactivate(g.handle)
    assert raw(host, U.SEV_CMD_ACTIVATE, L.sev_data_activate, handle=g.handle,
               asid=300)[0] == U.SEV_RET_DFFLUSH_REQUIRED
    assert psp.command(U.SEV_CMD_DF_FLUSH) == U.SEV_RET_WBINVD_REQUIRED
    psp.wbinvd()
    assert psp.command(U.SEV_CMD_DF_FLUSH) == OK
    psp.activate(g.handle, 300)
    pending = Launched(host, asid=301)                 # never ran
    psp.deactivate(pending.handle)
    psp.activate(pending.handle, 301)


def test_fresh_init_needs_wbinvd_and_df_flush_before_activate():
    """After INIT every ASID is dirty: ACTIVATE says DFFLUSH_REQUIRED until WBINVD + DF_FLUSH."""
    host = sevcore.Host(seed=8)
    host.psp.init()
    handle = host.psp.launch_start(0)
    assert raw(host, U.SEV_CMD_ACTIVATE, L.sev_data_activate, handle=handle,
               asid=200)[0] == U.SEV_RET_DFFLUSH_REQUIRED
    assert host.psp.command(U.SEV_CMD_DF_FLUSH) == U.SEV_RET_WBINVD_REQUIRED
    host.psp.wbinvd()
    host.psp.df_flush()
    host.psp.activate(handle, 200)


def test_dispatcher():
    """Unknown command ids are INVALID_COMMAND; a buffer outside memory is INVALID_ADDRESS;
    the C-bit of a buffer address is ignored."""
    host = ready()
    for cmd in (0x000, 0x010, 0x026, 0x0FF, 0x087, 0x7FF):
        assert host.psp.command(cmd, 0) == U.SEV_RET_INVALID_COMMAND
    assert host.psp.command(U.SEV_CMD_PLATFORM_STATUS, host.mem.size - 4) == \
        U.SEV_RET_INVALID_ADDRESS
    spa = pages(host, 1)
    assert host.psp.command(U.SEV_CMD_PLATFORM_STATUS, spa | (1 << host.c_bit)) == OK
    assert host.mem.read(spa, 2) == bytes([1, 55])


def test_length_queries_write_back_the_required_length():
    """PEK_CSR, PDH_CERT_EXPORT and GET_ID answer a short buffer with INVALID_LEN and the lengths
    they need, and write nothing else."""
    host = ready()
    spa = pages(host, 4)
    before = snapshot(host, (spa, 4 * 4096))
    st, f = raw(host, U.SEV_CMD_PEK_CSR, L.sev_data_pek_csr, address=spa, len=100)
    assert (st, f["len"]) == (U.SEV_RET_INVALID_LEN, C.CERT_SIZE)
    st, f = raw(host, U.SEV_CMD_PDH_CERT_EXPORT, L.sev_data_pdh_cert_export,
                pdh_cert_address=spa, pdh_cert_len=C.CERT_SIZE, cert_chain_address=spa,
                cert_chain_len=10)
    assert (st, f["pdh_cert_len"], f["cert_chain_len"]) == (U.SEV_RET_INVALID_LEN, 2084, 6252)
    st, f = raw(host, U.SEV_CMD_GET_ID, L.sev_data_get_id, address=spa, len=63)
    assert (st, f["len"]) == (U.SEV_RET_INVALID_LEN, 64)
    assert snapshot(host, (spa, 4 * 4096)) == before


def test_get_id_is_the_chips_secp256k1_id():
    """GET_ID returns 64 bytes (one socket), stable per chip and different between chips."""
    a, b = ready(seed=1), ready(seed=2)
    ida = a.psp.get_id()
    assert len(ida) == 64 and ida == a.psp.get_id() != b.psp.get_id()
    from sevcore.psp.crypto import _K1_P
    x, y = int.from_bytes(ida[:32], "big"), int.from_bytes(ida[32:], "big")
    assert (y * y - x * x * x - 7) % _K1_P == 0


def test_typed_errors_name_command_and_status():
    """A failing typed call raises PspError with EIO, the command and the status name."""
    host = sevcore.Host(seed=1)
    with pytest.raises(PspError) as exc:
        host.psp.pek_gen()
    e = exc.value
    assert e.errno == 5 and e.fw_error == BADP
    assert e.command == "SEV_CMD_PEK_GEN" and "SEV_RET_INVALID_PLATFORM_STATE" in str(e)


def test_firmware_status_has_one_name_and_the_old_one_still_reads():
    """PspError, SevError and CertChainError carry the firmware status as ``fw_error`` (and
    ``fw_error_name``); PspError's and CertChainError's former ``status`` (and ``status_name``)
    still read it, and cannot be set."""
    e = PspError(U.SEV_CMD_PEK_GEN, BADP)
    s = SevError(BADP)
    c = CertChainError("PEK", U.SEV_RET_BAD_SIGNATURE)
    assert e.fw_error == s.fw_error == BADP
    assert e.fw_error_name == s.fw_error_name == "SEV_RET_INVALID_PLATFORM_STATE"
    assert (e.status, e.status_name) == (e.fw_error, e.fw_error_name)
    assert c.fw_error == c.status == U.SEV_RET_BAD_SIGNATURE
    for obj in (e, c):
        with pytest.raises(AttributeError):
            obj.status = 0


def test_host_creation_is_cheap():
    """Host() makes no keys: the firmware starts UNINIT with no identity."""
    host = sevcore.Host(seed=99)
    assert host.psp.state == U.SEV_STATE_UNINIT
    assert host.psp._identity is None and host.psp._cek is None and host.psp._drbg is None
