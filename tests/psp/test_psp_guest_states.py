"""Guest state machine, legal-command matrix and ASID binding (AMD SEV API #55766,
"Guest Management API"; AMD-ASPFW sev_guest.c state_tbl_sev and the sev_mcmd.c handlers)."""
import pytest

from sevcore.vmm import owner
from sevcore import uapi as U
from sevcore.psp import crypto as X
from sevcore.psp import layout as L
from sevcore.psp.guests import GUEST_COUNT_MAX

from support.psp import SEV_ASID, Launched, blob, pages, raw, ready, snapshot

OK = U.SEV_RET_SUCCESS
BADG = U.SEV_RET_INVALID_GUEST_STATE
LU, LS, RN, SU, RU, SN = (U.SEV_GUEST_STATE_LAUNCH_UPDATE, U.SEV_GUEST_STATE_LAUNCH_SECRET,
                          U.SEV_GUEST_STATE_RUNNING, U.SEV_GUEST_STATE_SEND_UPDATE,
                          U.SEV_GUEST_STATE_RECEIVE_UPDATE, U.SEV_GUEST_STATE_SENT)
STATES = [LU, LS, RN, SU, RU, SN]
NAMES = ["LUPDATE", "LSECRET", "RUNNING", "SUPDATE", "RUPDATE", "SENT"]


class Guest:
    """A guest brought to ``state`` on ``self.host``, with everything needed to issue any command
    with otherwise valid arguments."""

    def __init__(self, state):
        self.peer = ready(seed=31)                     # the other end of a migration
        if state == RU:
            src = Launched(ready(seed=32), finish=True)
            self.host = ready(seed=33)
            start = src.psp.send_start(src.handle, self.host.psp.pdh_cert_export().pdh_cert)
            self.handle = self.host.psp.receive_start(start.policy,
                                                      src.psp.pdh_cert_export().pdh_cert,
                                                      start.session)
            self.host.psp.activate(self.handle, SEV_ASID)
            self.packet = src.psp.send_update_data(src.handle, src.spa, 4096)
            self.tik = None
        else:
            g = Launched(ready(seed=34), measure=state != LU, finish=state in (RN, SU, SN))
            self.host, self.handle, self.tik, self.tek = g.host, g.handle, g.session.tik, \
                g.session.tek
            self.measure = g.measure
            if state in (SU, SN):
                self.host.psp.send_start(self.handle, self.peer.psp.pdh_cert_export().pdh_cert)
            if state == SN:
                self.host.psp.send_finish(self.handle)
        assert self.host.psp.guest_status(self.handle).state == state
        self.state = state
        self.buf = pages(self.host, 8)

    def issue(self, cmd):
        h, host, buf = self.handle, self.host, self.buf
        transport = dict(handle=h, hdr_address=buf, hdr_len=52, guest_address=buf + 4096,
                         guest_len=4096, trans_address=buf + 8192, trans_len=4096)
        if cmd in (U.SEV_CMD_LAUNCH_UPDATE_DATA, U.SEV_CMD_LAUNCH_UPDATE_VMSA):
            return raw(host, cmd, L.sev_data_launch_update_data, handle=h, address=buf + 4096,
                       len=4096)[0]
        if cmd == U.SEV_CMD_LAUNCH_MEASURE:
            return raw(host, cmd, L.sev_data_launch_measure, handle=h, address=buf, len=48)[0]
        if cmd == U.SEV_CMD_LAUNCH_UPDATE_SECRET:
            if self.tik is not None and self.measure is not None:
                hdr, ct = owner.package_secret(self.tek, self.tik, bytes(4096),
                                               self.measure.measurement, lambda n: b"i" * n)
                host.mem.write(buf, hdr)
                host.mem.write(buf + 8192, ct)
            return raw(host, cmd, L.sev_data_launch_secret, **transport)[0]
        if cmd == U.SEV_CMD_ATTESTATION_REPORT:
            return raw(host, cmd, L.sev_data_attestation_report, handle=h, address=buf,
                       len=0xD0)[0]
        if cmd == U.SEV_CMD_SEND_START:
            pdh = blob(host, self.peer.psp.pdh_cert_export().pdh_cert)
            return raw(host, cmd, L.sev_data_send_start, handle=h, pdh_cert_address=pdh,
                       pdh_cert_len=2084, session_address=buf, session_len=128)[0]
        if cmd in (U.SEV_CMD_SEND_UPDATE_DATA, U.SEV_CMD_SEND_UPDATE_VMSA):
            return raw(host, cmd, L.sev_data_send_update_data, **transport)[0]
        if cmd in (U.SEV_CMD_RECEIVE_UPDATE_DATA, U.SEV_CMD_RECEIVE_UPDATE_VMSA):
            if self.state == RU:
                host.mem.write(buf, self.packet.header)
                host.mem.write(buf + 8192, self.packet.ciphertext)
            return raw(host, cmd, L.sev_data_receive_update_data, **transport)[0]
        if cmd in (U.SEV_CMD_DBG_DECRYPT, U.SEV_CMD_DBG_ENCRYPT):
            return raw(host, cmd, L.sev_data_dbg, handle=h, src_addr=buf, dst_addr=buf + 4096,
                       len=4096)[0]
        if cmd == U.SEV_CMD_GUEST_STATUS:
            return raw(host, cmd, L.sev_data_guest_status, handle=h)[0]
        if cmd == U.SEV_CMD_ACTIVATE:               # on the unbound guest, a clean ASID
            host.psp.deactivate(h)
            return raw(host, cmd, L.sev_data_activate, handle=h, asid=SEV_ASID + 1)[0]
        return raw(host, cmd, L.sev_data_launch_finish, handle=h)[0]


def row(ok_states, other=BADG, special=None):
    out = {s: (OK if s in ok_states else other) for s in STATES}
    out.update(special or {})
    return out


ALL = set(STATES)
ACTIVE = U.SEV_RET_ACTIVE
UNSUP = U.SEV_RET_UNSUPPORTED
MATRIX = {
    U.SEV_CMD_LAUNCH_UPDATE_DATA: row({LU}),
    U.SEV_CMD_LAUNCH_UPDATE_VMSA: row(set(), special={LU: UNSUP}),      # not an SEV-ES guest
    U.SEV_CMD_LAUNCH_MEASURE: row({LU}),
    U.SEV_CMD_LAUNCH_UPDATE_SECRET: row({LS}),
    U.SEV_CMD_LAUNCH_FINISH: row({LS}),
    U.SEV_CMD_ATTESTATION_REPORT: row({LS, RN, SU, SN}),
    U.SEV_CMD_SEND_START: row({RN}),
    U.SEV_CMD_SEND_UPDATE_DATA: row({SU}),
    U.SEV_CMD_SEND_UPDATE_VMSA: row(set(), special={SU: UNSUP}),
    U.SEV_CMD_SEND_FINISH: row({SU}),
    U.SEV_CMD_SEND_CANCEL: row({SU}),
    U.SEV_CMD_RECEIVE_UPDATE_DATA: row({RU}),
    U.SEV_CMD_RECEIVE_UPDATE_VMSA: row(set(), special={RU: UNSUP}),
    U.SEV_CMD_RECEIVE_FINISH: row({RU}),
    U.SEV_CMD_ACTIVATE: row(ALL - {SN}),
    U.SEV_CMD_DEACTIVATE: row(ALL),
    U.SEV_CMD_DECOMMISSION: row(set(), ACTIVE),                   # still bound
    U.SEV_CMD_GUEST_STATUS: row(ALL),
    U.SEV_CMD_DBG_DECRYPT: row(ALL),
    U.SEV_CMD_DBG_ENCRYPT: row(ALL),
}
NEXT = {(LU, U.SEV_CMD_LAUNCH_MEASURE): LS, (LS, U.SEV_CMD_LAUNCH_FINISH): RN,
        (RN, U.SEV_CMD_SEND_START): SU, (SU, U.SEV_CMD_SEND_FINISH): SN,
        (SU, U.SEV_CMD_SEND_CANCEL): RN, (RU, U.SEV_CMD_RECEIVE_FINISH): RN}


@pytest.fixture(scope="module", params=STATES, ids=NAMES)
def state(request):
    return request.param


@pytest.mark.parametrize("cmd", sorted(MATRIX), ids=lambda c: f"{c:#x}")
def test_guest_command_matrix(state, cmd):
    """Every guest command in every guest state: the status, and the state after it."""
    g = Guest(state)
    assert g.issue(cmd) == MATRIX[cmd][state]
    after = g.host.psp.guest_status(g.handle).state
    assert after == NEXT.get((state, cmd), state)


def test_decommission_after_deactivate_in_every_state(state):
    """DECOMMISSION of an unbound guest works in every state and frees the handle."""
    g = Guest(state)
    g.host.psp.deactivate(g.handle)
    g.host.psp.decommission(g.handle)
    assert g.host.psp.guest_status(g.handle).state == U.SEV_GUEST_STATE_UNINITIALIZED


def test_activate_checks_in_firmware_order():
    """ACTIVATE: ASID range, owner, already bound, SENT, DF_FLUSH, SEV/ES range; failures change
    nothing."""
    host = ready()
    psp = host.psp
    a = Launched(host, asid=200)
    h = psp.launch_start(0)
    es_only = 50                                      # below min_sev_asid: SEV-ES range
    cases = [(dict(handle=h, asid=0), U.SEV_RET_INVALID_ASID),
             (dict(handle=h, asid=psp.max_sev_asid + 1), U.SEV_RET_INVALID_ASID),
             (dict(handle=99, asid=201), U.SEV_RET_INVALID_GUEST),
             (dict(handle=h, asid=200), U.SEV_RET_ASID_OWNED),
             (dict(handle=a.handle, asid=201), U.SEV_RET_ACTIVE),
             (dict(handle=h, asid=es_only), U.SEV_RET_INVALID_ASID)]
    before = snapshot(host)
    for fields, want in cases:
        assert raw(host, U.SEV_CMD_ACTIVATE, L.sev_data_activate, **fields)[0] == want, fields
    assert snapshot(host) == before
    psp.activate(h, 201)
    st = psp.guest_status(h)
    assert (st.asid, st.state) == (201, LU)


def test_pending_activation_completes_at_launch_finish():
    """ACTIVATE before RUNNING is pending (the ASID is allocated), LAUNCH_FINISH makes it
    active; a RUNNING guest activates at once."""
    host = ready()
    g = Launched(host, asid=222, measure=True)
    guest = host.psp.guest(g.handle)
    assert guest.pending and not guest.active
    host.psp.launch_finish(g.handle)
    assert guest.active and not guest.pending
    host.psp.deactivate(g.handle)
    host.psp.activate(g.handle, 223)
    assert guest.active


def test_key_sharing_rules():
    """LAUNCH_START with a handle shares that guest's key if the policies match and it allows
    sharing; else POLICY_FAILURE (or INVALID_GUEST)."""
    host = ready()
    psp = host.psp
    a = Launched(host, asid=200)
    ks = psp.launch_start(0, handle=a.handle)
    assert psp.guest(ks).vek_seed == psp.guest(a.handle).vek_seed
    noks = psp.launch_start(U.SEV_POLICY_MASK_NOKS)
    before = snapshot(host)
    for fields, want in [(dict(handle=noks, policy=U.SEV_POLICY_MASK_NOKS),
                          U.SEV_RET_POLICY_FAILURE),
                         (dict(handle=a.handle, policy=U.SEV_POLICY_MASK_NODBG),
                          U.SEV_RET_POLICY_FAILURE),
                         (dict(handle=77, policy=0), U.SEV_RET_INVALID_GUEST)]:
        assert raw(host, U.SEV_CMD_LAUNCH_START, L.sev_data_launch_start, **fields)[0] == want
    assert snapshot(host) == before


def test_handles_are_lowest_free_and_limited():
    """Handles are the lowest free slot from 1; the 1025th guest is RESOURCE_LIMIT."""
    host = ready()
    psp = host.psp
    handles = [psp.launch_start(0) for _ in range(GUEST_COUNT_MAX)]
    assert handles == list(range(1, GUEST_COUNT_MAX + 1))
    assert raw(host, U.SEV_CMD_LAUNCH_START, L.sev_data_launch_start)[0] == \
        U.SEV_RET_RESOURCE_LIMIT
    psp.decommission(17)
    assert psp.launch_start(0) == 17


def test_guest_status_of_unknown_handle_succeeds_with_state_zero():
    """GUEST_STATUS of a free handle returns SUCCESS and state 0, leaving the other fields."""
    host = ready()
    st, f = raw(host, U.SEV_CMD_GUEST_STATUS, L.sev_data_guest_status, handle=5, policy=7,
                asid=9, state=3)
    assert (st, f["state"], f["policy"], f["asid"]) == (OK, 0, 7, 9)


def test_deactivate_and_decommission_rules():
    """DEACTIVATE of an unbound guest is INACTIVE; DECOMMISSION of a bound one is ACTIVE; the key
    leaves the memory controller at DEACTIVATE."""
    host = ready()
    g = Launched(host, asid=250)
    assert host.umc.has_key(250)
    assert raw(host, U.SEV_CMD_DECOMMISSION, L.sev_data_decommission,
               handle=g.handle)[0] == U.SEV_RET_ACTIVE
    host.psp.deactivate(g.handle)
    assert not host.umc.has_key(250)
    assert raw(host, U.SEV_CMD_DEACTIVATE, L.sev_data_deactivate,
               handle=g.handle)[0] == U.SEV_RET_INACTIVE
    for cmd in (U.SEV_CMD_LAUNCH_UPDATE_DATA, U.SEV_CMD_DBG_DECRYPT):
        layout = L.sev_data_launch_update_data if cmd != U.SEV_CMD_DBG_DECRYPT else L.sev_data_dbg
        fields = dict(handle=g.handle, address=g.spa, len=16) if cmd != U.SEV_CMD_DBG_DECRYPT \
            else dict(handle=g.handle, src_addr=g.spa, dst_addr=g.spa, len=16)
        assert raw(host, cmd, layout, **fields)[0] == U.SEV_RET_INACTIVE
    host.psp.decommission(g.handle)


def test_shutdown_forgets_guests_and_keys():
    """SHUTDOWN decommissions every guest and empties their key slots."""
    host = ready()
    Launched(host, asid=260)
    host.psp.shutdown()
    assert not host.umc.has_key(260) and not host.psp._guests
    host.psp.init()
    assert host.psp.platform_status().guest_count == 0


def test_launch_measure_has_no_asid_check():
    """LAUNCH_MEASURE works on an unbound guest (the firmware does not check the ASID)."""
    host = ready()
    h = host.psp.launch_start(0)
    m = host.psp.launch_measure(h)
    expect = X.measurement(bytes(16), 1, 55, 25, 0, X.hashlib.sha256().digest(), m.mnonce)
    assert m.measurement == expect                    # no session: the TIK is zero
