"""Post-copy end to end: the guest runs on the target under KVM Userfault while its owed pages
follow on demand or pushed, on both paths, in process and over TCP; a failure after the switch
reports the guest lost."""
import threading

import pytest

from sevcore.hw.costmodel import CostModel
from sevcore.migration import stream as S
from sevcore.migration.engine import MigrationParams, migrate, resume
from sevcore.migration.errors import GuestLost, PostcopyPaused, StreamError
from sevcore.migration.postcopy import pack_gfns, unpack_gfns
from sevcore.migration.remote import send_to, serve
from sevcore.migration.stats import QEMU_POSTCOPY_KEYS, QEMU_POSTCOPY_RAM_KEYS
from sevcore.uapi import SEV_GUEST_STATE_SEND_UPDATE, SEV_GUEST_STATE_SENT

import sevcore
from support.migration import Proxy, guest_state, launched, rewrite

MEM = dict(mem_size=4 << 20, shared_size=64 << 10)


def pc(path="psp", after=0, **kw):
    return MigrationParams(path=path, postcopy=True, postcopy_after=after, batch_pages=64,
                           timeout_s=30, **kw)


def _guest(path, **cfg):
    return launched(**{**MEM, "workload": "random", "dirty_pages_per_s": 2_000,
                       "helper_vcpus": 1 if path == "helper" else 0, **cfg})


@pytest.mark.parametrize("path", ["psp", "helper"])
@pytest.mark.parametrize("after", [0, 1])
def test_postcopy_moves_the_guest_intact(path, after):
    """After 0 or 1 pre-copy passes the guest runs on the target, faults on owed pages, gets
    each page exactly once (on demand or pushed) and finds all its memory intact."""
    m, dst = _guest(path, dirty_pages_per_s=2_000 if after == 0 else 50_000)
    r = migrate(m, dst, pc(path, after, cost=CostModel(downtime_limit_ms=0.5)))
    st = r.stats
    assert st.status == "completed" and st.bad_pages == 0 and st.verified_pages > 0
    assert st.postcopy and st.pages_owed > 0
    assert st.pages_on_demand + st.pages_pushed == st.pages_owed
    assert st.postcopy_requests >= st.pages_on_demand > 0
    assert sum(st.vcpu_faults) == st.postcopy_requests
    assert st.vcpu_blocktime_ns[0] > 0 and st.blocktime_ns == st.vcpu_blocktime_ns[0]
    q = st.query_migrate()
    assert set(QEMU_POSTCOPY_RAM_KEYS) <= set(q["ram"]) and set(QEMU_POSTCOPY_KEYS) <= set(q)
    assert q["ram"]["postcopy-bytes"] > st.pages_owed * 4096
    assert q["sev"]["postcopy"]["pages-on-demand"] == st.pages_on_demand
    assert guest_state(m) == SEV_GUEST_STATE_SENT
    cmds = st.psp_commands
    assert cmds["SEND_FINISH"] == cmds["RECEIVE_FINISH"] == 1
    if path == "psp":
        assert cmds["SEND_UPDATE_DATA"] == cmds["RECEIVE_UPDATE_DATA"] == st.private_pages
    r.target.host.clock.advance(1e6, "test")
    r.target.tick()


def test_source_context_stays_sending_until_the_last_page():
    """While pages are owed the source's firmware context is in SUPDATE (SEND_UPDATE_DATA on
    demand); SEND_FINISH comes after the last page."""
    m, dst = _guest("psp")
    states = []

    def watch(ev):
        if ev["phase"] == "postcopy":
            states.append(guest_state(m))
    st = migrate(m, dst, pc(), progress=watch).stats
    assert states and set(states) == {SEV_GUEST_STATE_SEND_UPDATE}
    assert st.status == "completed" and guest_state(m) == SEV_GUEST_STATE_SENT


def test_post_copy_downtime_is_below_pre_copy_at_a_rate_that_does_not_converge():
    """Where pre-copy cannot converge, its stop-and-copy is long; post-copy's downtime is the
    device state only, and both guests arrive intact."""
    cost = CostModel(downtime_limit_ms=20)
    m, dst = _guest("psp", dirty_pages_per_s=20_000)
    pre = migrate(m, dst, MigrationParams(max_iterations=2, cost=cost, timeout_s=30)).stats
    m, dst = _guest("psp", dirty_pages_per_s=20_000)
    post = migrate(m, dst, pc(after=1, cost=cost)).stats
    assert not pre.converged and pre.bad_pages == post.bad_pages == 0
    assert post.downtime_ns < pre.downtime_ns / 10


def test_network_latency_is_charged_to_each_request():
    """A longer network latency makes each demand fetch, and so the vCPU's stopped time, longer
    by at least the page's trip back (the request's trip overlaps the step in flight)."""
    times = []
    for latency in (0.0, 5e6):
        m, dst = _guest("helper")
        st = migrate(m, dst, pc("helper", cost=CostModel(network_latency_ns=latency))).stats
        assert st.pages_on_demand > 0 and st.bad_pages == 0
        times.append((st.vcpu_blocktime_ns[0], st.pages_on_demand))
    assert times[1][0] - times[0][0] >= 5e6 * min(times[0][1], times[1][1])


def test_postcopy_over_tcp():
    """Pure post-copy between a TCP target and source: requests go back on the same connection
    and the moved guest is intact."""
    m, _ = _guest("helper")
    box = {}
    ready = threading.Event()

    def target():
        def listening(addr):
            box["port"] = addr[1]
            ready.set()
        box["t"] = serve(0, sevcore.Kvm(), timeout_s=30, on_listening=listening)
    th = threading.Thread(target=target, daemon=True)
    th.start()
    assert ready.wait(30)
    src = send_to("127.0.0.1", box["port"], m, pc("helper"))
    th.join(30)
    st = src.stats
    assert st.status == "completed" and st.postcopy_requests > 0 and st.bad_pages == 0
    assert box["t"].result["bad"] == 0


def _cut_at_step(n):
    """A Proxy that cuts the stream to the target at post-copy step ``n``."""
    steps = []

    def cut(i, rec, w):
        if isinstance(rec, S.Setup) and rec.params.get("kind") == "pc_step":
            steps.append(rec)
            if len(steps) == n:
                raise ConnectionError("cable pulled")
        rewrite(w, rec)
    return Proxy(cut)


@pytest.mark.parametrize("path", ["psp", "helper"])
def test_cut_pauses_both_sides_and_resume_finishes_clean(path):
    """The stream cut once the guest runs on the target: both sides pause (no SEND_CANCEL, the
    guest kept), and a new connection finishes the copy with the guest's check clean."""
    m, dst = _guest(path)
    proxy = _cut_at_step(4)
    with pytest.raises(PostcopyPaused) as e:
        migrate(m, dst, pc(path), channel_pair=(proxy.source_end, proxy.target_end))
    st = e.value.stats
    assert st.status == "postcopy-paused" and not st.send_cancel
    assert e.value.target.paused and guest_state(m) == SEV_GUEST_STATE_SEND_UPDATE
    r = resume(e.value)
    st = r.stats
    assert st.status == "completed" and st.postcopy_resumes == 1 and st.bad_pages == 0
    assert st.verified_pages > 0 and guest_state(m) == SEV_GUEST_STATE_SENT
    assert st.pages_on_demand + st.pages_pushed == st.pages_owed + st.pages_resent


def test_source_gone_for_good_is_the_guest_lost():
    """A paused target whose source never comes back reports the guest lost and destroys
    its VM; a second cut during the resume pauses again rather than failing."""
    m, dst = _guest("psp")
    proxy = _cut_at_step(3)
    with pytest.raises(PostcopyPaused) as e:
        migrate(m, dst, pc(), channel_pair=(proxy.source_end, proxy.target_end))
    again = _cut_at_step(2)
    with pytest.raises(PostcopyPaused):
        resume(e.value, channel_pair=(again.source_end, again.target_end))
    lost = e.value.target.give_up()
    assert isinstance(lost, GuestLost) and "lost" in str(lost)
    assert dst.host.umc.keyed_asids() == []
    assert e.value.source.stats.status == "postcopy-paused"


def test_target_error_after_the_switch_is_the_guest_lost():
    """A target that refuses a page after the switch (not a cut) ends as GuestLost with the
    failed record: no SEND_CANCEL, the source guest not resumed."""
    m, dst = _guest("psp")
    seen = []

    def tamper(i, rec, w):
        if isinstance(rec, S.Setup) and rec.params.get("kind") == "pc_step":
            seen.append(rec)
        if isinstance(rec, S.EncryptedPage) and len(seen) == 3:
            rec = S.EncryptedPage(rec.gfn, rec.hdr, bytes(len(rec.trans)))
        rewrite(w, rec)
    proxy = Proxy(tamper)
    with pytest.raises(GuestLost) as e:
        migrate(m, dst, pc(), channel_pair=(proxy.source_end, proxy.target_end))
    q = e.value.stats.query_migrate()
    assert q["status"] == "failed" and "BAD_MEASUREMENT" in q["error-desc"]
    assert q["source-guest"]["guest-lost"] and q["source-guest"]["resumed"] is False
    assert "SEND_CANCEL" not in e.value.stats.psp_commands


def test_cut_over_tcp_resumes_on_a_new_connection(monkeypatch):
    """Over TCP with resume on both sides: the source's socket shut mid post-copy, the source
    connects again and the target's guest finishes with its check clean."""
    import socket  # only this test shuts a socket down
    from sevcore.migration import remote
    m, _ = _guest("helper")
    chans = []
    connect = remote.tcp_connect
    monkeypatch.setattr(remote, "tcp_connect",
                        lambda *a, **k: chans.append(connect(*a, **k)) or chans[-1])
    box, ready = {}, threading.Event()

    def target():
        def listening(addr):
            box["port"] = addr[1]
            ready.set()
        box["t"] = serve(0, sevcore.Kvm(), timeout_s=30, on_listening=listening, resume=True)
    th = threading.Thread(target=target, daemon=True)
    th.start()
    assert ready.wait(30)

    def cut(ev):
        if ev["phase"] == "postcopy" and ev["sent"] >= 64 and len(chans) == 1 and \
                not box.get("cut"):
            box["cut"] = True
            chans[0].sock.shutdown(socket.SHUT_RDWR)
    src = send_to("127.0.0.1", box["port"], m, pc("helper"), progress=cut, resume=True)
    th.join(30)
    st = src.stats
    assert box.get("cut") and len(chans) == 2
    assert st.status == "completed" and st.postcopy_resumes == 1 and st.bad_pages == 0
    assert box["t"].result["bad"] == 0


@pytest.mark.parametrize("text, npages", [("zz", 8), ("ff", 16), ("ff", 4), ("", 8)])
def test_bad_owed_bitmap_is_refused(text, npages):
    """A POSTCOPY bitmap that is not hex, has the wrong size or marks pages past the guest is
    a StreamError."""
    with pytest.raises(StreamError):
        unpack_gfns(text, npages)


def test_owed_bitmap_round_trips():
    """pack_gfns then unpack_gfns gives back the set."""
    mask = unpack_gfns(pack_gfns([0, 5, 63, 64, 99], 100), 100)
    assert sorted(map(int, mask.nonzero()[0])) == [0, 5, 63, 64, 99]


def test_postcopy_after_must_be_a_count():
    """postcopy_after below 0 or not an int is ValueError."""
    for bad in (-1, 1.5, True):
        with pytest.raises(ValueError):
            MigrationParams(postcopy=True, postcopy_after=bad)


def test_every_vcpu_dirties_its_share_and_faults_on_its_own():
    """With three vCPUs each writes its share of every tick: pre-copy moves the guest intact,
    and in post-copy the vCPUs other than 0 fault too, each with its own stopped time."""
    m, dst = _guest("psp", nr_vcpus=3, dirty_pages_per_s=4_000)
    r = migrate(m, dst, MigrationParams(max_iterations=3, timeout_s=30))
    assert r.stats.bad_pages == 0 and r.stats.guest_pages_written > 0
    assert all(v.has_run for v in m.vcpus)
    m, dst = _guest("helper", nr_vcpus=3, dirty_pages_per_s=4_000)
    st = migrate(m, dst, pc("helper")).stats
    assert st.status == "completed" and st.bad_pages == 0
    assert len(st.vcpu_faults) == len(st.vcpu_blocktime_ns) == 3
    assert sum(st.vcpu_faults[1:]) > 0 and st.vcpu_blocktime_ns[1] + st.vcpu_blocktime_ns[2] > 0
    assert st.blocktime_ns == 0.0          # the model's vCPUs never all wait at once


def test_source_gone_for_good_over_tcp_is_the_guest_lost(monkeypatch):
    """Over TCP: the source's socket shut mid post-copy and the source never connects again;
    the target gives up after its timeout with GuestLost and destroys its VM."""
    import socket  # only this test shuts a socket down
    from sevcore.migration import remote
    m, _ = _guest("psp")
    chans = []
    connect = remote.tcp_connect
    monkeypatch.setattr(remote, "tcp_connect",
                        lambda *a, **k: chans.append(connect(*a, **k)) or chans[-1])
    box, ready = {}, threading.Event()
    dst = sevcore.Kvm()

    def target():
        def listening(addr):
            box["port"] = addr[1]
            ready.set()
        try:
            serve(0, dst, timeout_s=3, on_listening=listening, resume=True)
        except GuestLost as e:
            box["lost"] = e
    th = threading.Thread(target=target, daemon=True)
    th.start()
    assert ready.wait(30)

    def cut(ev):
        if ev["phase"] == "postcopy" and ev["sent"] >= 64 and not box.get("cut"):
            box["cut"] = True
            chans[0].sock.shutdown(socket.SHUT_RDWR)
    with pytest.raises(PostcopyPaused) as e:
        send_to("127.0.0.1", box["port"], m, pc(), progress=cut)
    th.join(30)
    assert e.value.stats.status == "postcopy-paused"
    assert "lost" in str(box["lost"]) and dst.host.umc.keyed_asids() == []


def _same(a, b):
    """Two query-migrate records alike but for their wall time."""
    a, b = a.query_migrate(), b.query_migrate()
    for q in (a, b):
        q["sev"].pop("wall-time-s")
    return a == b


@pytest.mark.parametrize("path", ["psp", "helper"])
def test_inline_migration_equals_the_overlapped_one(path):
    """With engine.set_inline the source and target take turns on one core (no populating
    thread), and a post-copy after one pass ends with the statistics of the overlapped run."""
    from sevcore.migration import engine
    runs = []
    for inline in (False, True):
        old = engine.set_inline(inline)
        try:
            m, dst = _guest(path, dirty_pages_per_s=50_000)
            runs.append(migrate(m, dst, pc(path, 1, cost=CostModel(downtime_limit_ms=0.5))))
        finally:
            engine.set_inline(old)
    assert runs[1].stats.status == "completed" and runs[1].stats.bad_pages == 0
    assert runs[1].stats.postcopy_requests > 0
    assert _same(runs[0].stats, runs[1].stats)


def test_inline_cut_pauses_and_resumes_clean():
    """An inline post-copy cut mid-way pauses both sides; resume on an inline pair finishes."""
    from sevcore.migration import engine
    old = engine.set_inline(True)
    try:
        m, dst = _guest("psp")
        proxy = _cut_at_step(4)
        with pytest.raises(PostcopyPaused) as e:
            migrate(m, dst, pc("psp"), channel_pair=(proxy.source_end, proxy.target_end))
        r = resume(e.value)
    finally:
        engine.set_inline(old)
    assert r.stats.status == "completed" and r.stats.bad_pages == 0
