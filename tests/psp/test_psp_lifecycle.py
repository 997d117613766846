"""Random command sequences against a small model of the guest state machine and ASID binding
(hypothesis RuleBasedStateMachine), and run-to-run determinism."""
from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import Bundle, RuleBasedStateMachine, invariant, precondition, rule

from sevcore import uapi as U
from sevcore.psp import PspError

from support.psp import Launched, ready

LU, LS, RN, SU, SN = (U.SEV_GUEST_STATE_LAUNCH_UPDATE, U.SEV_GUEST_STATE_LAUNCH_SECRET,
                      U.SEV_GUEST_STATE_RUNNING, U.SEV_GUEST_STATE_SEND_UPDATE,
                      U.SEV_GUEST_STATE_SENT)
OK = U.SEV_RET_SUCCESS
PEER_PDH = ready(seed=100).psp.pdh_cert_export().pdh_cert
STEPS = {"launch_measure": (LU, LS), "launch_finish": (LS, RN), "send_cancel": (SU, RN),
         "send_finish": (SU, SN)}


def status_of(fn, *args):
    try:
        fn(*args)
    except PspError as e:
        return e.fw_error
    return OK


class GuestLifecycle(RuleBasedStateMachine):
    """The firmware agrees with a model: handle -> [state, bound]."""

    handles = Bundle("handles")

    def __init__(self):
        super().__init__()
        self.host = ready(seed=101)
        self.psp = self.host.psp
        self.model = {}
        self.next_asid = self.psp.min_sev_asid

    def expect(self, h):
        """The platform and handle checks every guest command starts with."""
        if not self.model:
            return U.SEV_RET_INVALID_PLATFORM_STATE
        if h not in self.model:
            return U.SEV_RET_INVALID_GUEST
        return None

    @rule(target=handles)
    def launch_start(self):
        h = self.psp.launch_start(0)
        self.model[h] = [LU, False]
        return h

    @precondition(lambda self: self.next_asid <= self.psp.max_sev_asid)
    @rule(h=handles)
    def activate(self, h):
        want = self.expect(h)
        if want is None:
            state, bound = self.model[h]
            want = U.SEV_RET_ACTIVE if bound else (
                U.SEV_RET_INVALID_GUEST_STATE if state == SN else OK)
        assert status_of(self.psp.activate, h, self.next_asid) == want
        if want == OK:
            self.model[h][1] = True
            self.next_asid += 1

    @rule(h=handles)
    def deactivate(self, h):
        want = self.expect(h)
        if want is None:
            want = OK if self.model[h][1] else U.SEV_RET_INACTIVE
        assert status_of(self.psp.deactivate, h) == want
        if want == OK:
            self.model[h][1] = False

    @rule(h=handles)
    def decommission(self, h):
        want = self.expect(h)
        if want is None:
            want = U.SEV_RET_ACTIVE if self.model[h][1] else OK
        assert status_of(self.psp.decommission, h) == want
        if want == OK:
            del self.model[h]

    @rule(h=handles, step=st.sampled_from(sorted(STEPS)))
    def transition(self, h, step):
        want = self.expect(h)
        before, after = STEPS[step]
        if want is None:
            want = OK if self.model[h][0] == before else U.SEV_RET_INVALID_GUEST_STATE
        assert status_of(getattr(self.psp, step), h) == want
        if want == OK:
            self.model[h][0] = after

    @rule(h=handles)
    def send_start(self, h):
        want = self.expect(h)
        if want is None:
            want = OK if self.model[h][0] == RN else U.SEV_RET_INVALID_GUEST_STATE
        assert status_of(self.psp.send_start, h, PEER_PDH) == want
        if want == OK:
            self.model[h][0] = SU

    @invariant()
    def firmware_agrees(self):
        want = U.SEV_STATE_WORKING if self.model else U.SEV_STATE_INIT
        assert self.psp.platform_status().state == want
        assert self.psp.platform_status().guest_count == len(self.model)
        for h, (state, bound) in self.model.items():
            g = self.psp.guest_status(h)
            assert g.state == state and (g.asid != 0) == bound


TestGuestLifecycle = GuestLifecycle.TestCase
TestGuestLifecycle.settings = settings(max_examples=40, stateful_step_count=30, deadline=None)


def test_same_seed_same_bytes():
    """Two hosts with one seed produce byte-identical certificates, sessions and packets;
    another seed does not."""
    def run(seed):
        src = Launched(ready(seed=seed), finish=True)
        start = src.psp.send_start(src.handle, PEER_PDH)
        pkt = src.psp.send_update_data(src.handle, src.spa, 4096)
        return src.psp.pdh_cert_export(), start.session, pkt, src.host.mem.read(src.spa, 8192)
    assert run(5) == run(5)
    assert run(5)[0] != run(6)[0]
