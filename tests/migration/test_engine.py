"""The live-migration engine end to end: two Hosts in one process, PSP path, with injected
faults. Every failure must end with SEND_CANCEL and a source guest that runs on, unchanged."""
import pytest

from sevcore.hw.costmodel import CostModel
from sevcore.migration import stream as S
from sevcore.migration.engine import (MigrationError, MigrationParams, NotMigrationReady,
                                      TargetFailed, migrate)
from sevcore.migration.machine import Machine
from sevcore.migration.stats import QEMU_RAM_KEYS
from sevcore.migration.workload import GuestConfig
from sevcore.uapi import (KVM_EXIT_FAIL_ENTRY, SEV_GUEST_STATE_RUNNING, SEV_GUEST_STATE_SENT,
                          SEV_POLICY_MASK_NOSEND)

import sevcore
from support.migration import (SMALL, Proxy, assert_runs_on, flip, guest_state, launched,
                               memory_snapshot, rewrite, swapped)

FAST = MigrationParams(max_iterations=4, timeout_s=20)


def test_idle_guest_moves_intact_and_source_never_runs_again():
    """An idle guest converges at once; the target guest finds every page as it left it."""
    m, dst = launched(workload="idle")
    r = migrate(m, dst, FAST)
    st = r.stats
    assert st.status == "completed" and st.converged and len(st.iterations) == 2
    assert st.bad_pages == 0 and st.verified_pages == m.config.layout.npages - 9
    assert st.private_pages + st.shared_pages + st.zero_pages >= m.npages
    assert guest_state(m) == SEV_GUEST_STATE_SENT
    assert m.vcpus[0].run().exit_reason == KVM_EXIT_FAIL_ENTRY
    assert guest_state(r.target) == SEV_GUEST_STATE_RUNNING
    r.target.host.clock.advance(1e6, "test")
    r.target.tick()
    q = st.query_migrate()
    assert tuple(q["ram"]) == QEMU_RAM_KEYS
    assert q["ram"]["total"] == m.config.mem_size and q["ram"]["remaining"] == 0
    assert q["ram"]["transferred"] == st.stream["transferred"] > m.config.mem_size
    assert q["sev"]["psp-commands"]["SEND_UPDATE_DATA"] == st.private_pages


def test_dirtying_guest_resends_and_stays_intact():
    """Pages the guest dirties during pre-copy are sent again; the moved guest is intact."""
    m, dst = launched(workload="random", dirty_pages_per_s=200)
    r = migrate(m, dst, FAST)
    st = r.stats
    assert st.guest_pages_written > 0 and st.dirty_sync_count >= 2
    assert st.private_pages > m.npages - m.config.shared_pages - 9
    assert st.bad_pages == 0


@pytest.mark.parametrize("ring", [4096, 1 << 16])
def test_dirty_ring_migration_resends_and_stays_intact(ring):
    """With the source's vCPUs logging to dirty rings (KVM_CAP_DIRTY_LOG_RING_ACQ_REL) the passes
    resend what the rings collected, KVM_EXIT_DIRTY_RING_FULL of a small ring is reaped on the
    way, and the moved guest is intact."""
    kvm = sevcore.Kvm()
    m = Machine.launch(kvm, GuestConfig(**SMALL, workload="random", dirty_pages_per_s=5000),
                       dirty_ring_size=ring)
    r = migrate(m, sevcore.Kvm(), FAST)
    st = r.stats
    assert st.status == "completed" and st.bad_pages == 0 and st.verified_pages > 0
    assert st.guest_pages_written > 0 and st.dirty_sync_count >= 2
    assert sum(it.pages for it in st.iterations[1:]) > 0
    assert (m.ring_full_exits > 0) == (ring == 4096)


def test_high_dirty_rate_hits_the_iteration_limit_and_still_completes():
    """Above the PSP's page rate pre-copy cannot converge: after the iteration limit the
    stop-and-copy runs anyway, over the downtime limit, and the guest is intact."""
    m, dst = launched(workload="random", dirty_pages_per_s=20_000)
    r = migrate(m, dst, MigrationParams(max_iterations=3, cost=CostModel(downtime_limit_ms=50)))
    st = r.stats
    assert not st.converged and len(st.iterations) == 4 and st.iterations[-1].stop
    assert st.downtime_ns > 50e6
    assert st.bad_pages == 0


def test_ring_buffer_charging_is_cheaper():
    """Charging PSP pages as ring-buffer batches gives a shorter simulated time."""
    times = []
    for ring in (False, True):
        m, dst = launched(workload="idle")
        times.append(migrate(m, dst, MigrationParams(ring_buffer=ring)).stats.total_ns)
    assert times[1] < times[0]


def test_guest_not_migration_ready_is_refused():
    """Without KVM_MIGRATION_READY the source refuses before SEND_START; nothing runs on the
    target."""
    kvm = sevcore.Kvm()
    m = Machine(kvm, GuestConfig(**SMALL))
    m._launch()
    dst = sevcore.Kvm()
    with pytest.raises(NotMigrationReady) as e:
        migrate(m, dst, FAST)
    assert "KVM_MIGRATION_READY" in str(e.value) and e.value.stats.status == "failed"
    assert guest_state(m) == SEV_GUEST_STATE_RUNNING
    assert "SEND_START" not in e.value.stats.psp_commands


def test_nosend_policy_is_refused_by_the_firmware():
    """A NOSEND guest: SEND_START fails with POLICY_FAILURE; the guest runs on."""
    m, dst = launched(workload="idle", policy=SEV_POLICY_MASK_NOSEND)
    before = memory_snapshot(m)
    with pytest.raises(MigrationError) as e:
        migrate(m, dst, FAST)
    assert "POLICY_FAILURE" in str(e.value)
    assert_runs_on(m, before)


def _through(transform):
    proxy = Proxy(transform)
    return proxy, (proxy.source_end, proxy.target_end)


def test_flipped_bit_in_a_packet_is_refused_by_the_target_psp():
    """A flipped ciphertext bit (CRCs recomputed on the wire) fails RECEIVE_UPDATE_DATA with
    BAD_MEASUREMENT; the source cancels and runs on unchanged."""
    m, dst = launched(workload="idle")
    before = memory_snapshot(m)
    seen = []

    def tamper(i, rec, w):
        if isinstance(rec, S.EncryptedPage) and len(seen) == 5:
            rec = S.EncryptedPage(rec.gfn, rec.hdr, flip(rec.trans, 1000))
        if isinstance(rec, S.EncryptedPage):
            seen.append(rec.gfn)
        rewrite(w, rec)
    _, pair = _through(tamper)
    with pytest.raises(TargetFailed) as e:
        migrate(m, dst, FAST, channel_pair=pair)
    assert "BAD_MEASUREMENT" in str(e.value)
    assert e.value.stats.status == "failed" and e.value.stats.send_cancel
    q = e.value.stats.query_migrate()
    assert "BAD_MEASUREMENT" in q["error-desc"] and q["ram"]["transferred"] > 0
    assert q["source-guest"]["resumed"] and q["source-guest"]["check"]["bad"] == 0
    assert e.value.stats.psp_commands.get("SEND_CANCEL") == 1
    assert_runs_on(m, before)
    assert dst.host.umc.keyed_asids() == []     # the target destroyed its guest (vCPUs too)


def test_flipped_bit_on_the_wire_fails_the_stream_crc():
    """A flipped bit not re-framed is a checksum error on the target; the source cancels."""
    m, dst = launched(workload="idle")
    before = memory_snapshot(m)
    from sevcore.migration.transport import inprocess_pair
    a, b = inprocess_pair(timeout=20)
    sent = [0]
    orig = a.send

    def send(data):
        data = bytearray(data)
        if sent[0] < 200_000 <= sent[0] + len(data):
            data[200_000 - sent[0]] ^= 4
        sent[0] += len(data)
        orig(data)
    a.send = send
    with pytest.raises(MigrationError) as e:
        migrate(m, dst, FAST, channel_pair=(a, b))
    assert "ChecksumMismatch" in str(e.value)
    assert_runs_on(m, before)


def test_truncated_stream_is_refused_and_source_cancels():
    """The stream cut mid-copy: the target refuses it (nothing runs there), the source cancels."""
    m, dst = launched(workload="idle")
    before = memory_snapshot(m)

    def cut(i, rec, w):
        if i == 40:
            raise ConnectionResetError("cut")
        rewrite(w, rec)
    proxy, pair = _through(cut)
    with pytest.raises(MigrationError):
        migrate(m, dst, FAST, channel_pair=pair)
    assert_runs_on(m, before)


def test_psp_path_accepts_a_replayed_packet_and_the_guest_finds_it():
    """The firmware binds a packet to the TEK/TIK only, so an old packet replayed in place of a
    newer one for the same page is accepted and only the guest's own check finds the stale page."""
    m, dst = launched(workload="hotset", hot_fraction=0.02, dirty_pages_per_s=400)
    first = {}

    def replay(i, rec, w):
        if isinstance(rec, S.EncryptedPage):
            if rec.gfn not in first:
                first[rec.gfn] = rec
            else:
                rec = first[rec.gfn]          # the iteration-0 packet instead of the new one
        rewrite(w, rec)
    _, pair = _through(replay)
    r = migrate(m, dst, FAST, channel_pair=pair)
    assert r.stats.status == "completed"
    assert r.stats.bad_pages > 0


def test_psp_path_accepts_swapped_packets_and_the_guest_finds_them():
    """Two packets exchanged between gfns are accepted by RECEIVE_UPDATE_DATA (the packet does
    not name its page); the guest's check finds both pages wrong."""
    m, dst = launched(workload="idle")
    held = []

    def swap(i, rec, w):
        if isinstance(rec, S.EncryptedPage) and rec.gfn in (100, 101):
            held.append(rec)
            if len(held) == 2:
                for r in swapped(*held):
                    rewrite(w, r)
            return
        rewrite(w, rec)
    _, pair = _through(swap)
    r = migrate(m, dst, FAST, channel_pair=pair)
    assert r.stats.bad_pages == 2


def test_cost_model_overrides_change_simulated_time_only():
    """A faster PSP shortens simulated time; the bytes moved stay the same."""
    out = []
    for rate in (8e6, 80e6):
        m, dst = launched(workload="idle")
        st = migrate(m, dst, MigrationParams(cost=CostModel(psp_bytes_per_s=rate))).stats
        out.append((st.total_ns, st.stream["normal"]))
    assert out[1][0] < out[0][0] and out[1][1] == out[0][1]


# -- the migration-helper path -----------------------------------------------------------------

HELPER = MigrationParams(path="helper", max_iterations=4, timeout_s=20)


def test_helper_path_moves_the_guest_and_is_much_faster():
    """The helper path moves a dirtying guest intact, with PSP commands only for setup, the
    helper's own pages and the hand-over, in far less simulated time than the PSP path."""
    m, dst = launched(workload="random", dirty_pages_per_s=2500, helper_vcpus=1)
    st = migrate(m, dst, HELPER).stats
    assert st.status == "completed" and st.converged and st.bad_pages == 0
    assert st.helper_packets >= m.config.layout.end_gfn - m.config.shared_pages
    assert st.psp_commands["SEND_UPDATE_DATA"] == 4          # key and state, twice
    assert st.helper_requests > 0 and st.time_spent["helper"] > 0
    m2, dst2 = launched(workload="random", dirty_pages_per_s=2500)
    psp = migrate(m2, dst2, FAST).stats
    assert psp.total_ns > 10 * st.total_ns


@pytest.mark.parametrize("vcpus", [2, 3])
def test_helper_vcpus_in_parallel_move_a_dirtying_guest_intact(vcpus):
    """Helper vCPUs sealing and opening at once (a thread each) move a dirtying guest with
    every page checked on the target, each vCPU numbering its pages in its own lane."""
    m, dst = launched(workload="random", dirty_pages_per_s=2500, helper_vcpus=vcpus)
    st = migrate(m, dst, HELPER).stats
    assert st.status == "completed" and st.bad_pages == 0 and st.verified_pages > 0
    assert st.helper_packets >= m.config.layout.end_gfn - m.config.shared_pages


def test_each_helper_vcpu_serves_a_full_share_of_every_record():
    """With room for it, two helper vCPUs get a packet buffer of two shares and the source
    sends records of two shares, each vCPU sealing one share of every request in its own lane
    (a small guest keeps one share's buffer, split between them)."""
    from sevcore.migration.helper import HELPER_SHARE
    m, dst = launched(mem_size=8 << 20, workload="random", dirty_pages_per_s=2500,
                      helper_vcpus=2)
    assert m.config.helper_layout.batch_pages == 2 * HELPER_SHARE
    r = migrate(m, dst, HELPER)
    st = r.stats
    assert st.status == "completed" and st.bad_pages == 0 and st.verified_pages > 0
    full = st.iterations[0].pages // (2 * HELPER_SHARE)
    assert full >= 2 and st.helper_requests <= sum(
        -(-it.pages // (2 * HELPER_SHARE)) for it in st.iterations)
    small, _ = launched(workload="idle", helper_vcpus=2)
    assert small.config.helper_layout.batch_pages == HELPER_SHARE


def test_a_failing_helper_vcpu_fails_the_migration_and_the_source_runs_on(monkeypatch):
    """A source helper vCPU that fails while the other serves its share fails the migration
    cleanly: the error is reported, SEND_CANCEL, and the source guest resumes and checks
    clean."""
    from sevcore.migration import helper as H
    m, dst = launched(workload="idle", helper_vcpus=2)
    before = memory_snapshot(m)
    real = H.MigrationHelper._serve_run

    def flaky(self, cmd, j, *args):
        if j == 1 and cmd == H.CMD_SEAL:
            raise OSError(5, "KVM_RUN: Input/output error (injected)")
        return real(self, cmd, j, *args)
    monkeypatch.setattr(H.MigrationHelper, "_serve_run", flaky)
    with pytest.raises(MigrationError, match="injected") as e:
        migrate(m, dst, HELPER)
    st = e.value.stats
    assert st.status == "failed" and st.send_cancel
    q = st.query_migrate()
    assert "injected" in q["error-desc"]
    assert q["source-guest"]["resumed"] and q["source-guest"]["check"]["bad"] == 0
    lay = m.config.helper_layout
    assert memory_snapshot(m)[:lay.first_gfn * 4096] == before[:lay.first_gfn * 4096]
    assert_runs_on(m)


def test_helper_path_needs_a_guest_with_a_helper():
    """A guest booted without a helper cannot use the helper path; it runs on."""
    m, dst = launched(workload="idle")
    with pytest.raises(MigrationError, match="helper_vcpus"):
        migrate(m, dst, HELPER)
    assert guest_state(m) == SEV_GUEST_STATE_RUNNING


def _helper_attack(kind):
    held = []

    def tamper(i, rec, w):
        if not isinstance(rec, S.HelperPage):
            return rewrite(w, rec)
        if kind == "flip" and rec.gfn == 50:
            rec = S.HelperPage(rec.gfn, rec.seq, flip(rec.packet, 8 * 40 + 3))
        elif kind == "replay" and rec.gfn == 60:
            rewrite(w, rec)                       # delivered, then delivered again
        elif kind == "swap" and rec.gfn in (70, 71):
            held.append(rec)
            if len(held) == 2:
                for r in swapped(*held, keep=("gfn", "seq")):
                    rewrite(w, r)
            return
        rewrite(w, rec)
    return tamper


@pytest.mark.parametrize("vcpus", [1, 2])
@pytest.mark.parametrize("kind, reason", [("flip", "auth"), ("replay", "replay"),
                                          ("swap", "auth")])
def test_helper_path_refuses_tampered_packets_and_source_cancels(kind, reason, vcpus):
    """A flipped bit, a replayed packet and two swapped packets are refused by the target's
    helper (its AEAD binds gfn and sequence number), on one helper vCPU or on one of two
    serving the batch at once; the source cancels, unchanged."""
    m, dst = launched(workload="idle", helper_vcpus=vcpus)
    before = memory_snapshot(m)
    _, pair = _through(_helper_attack(kind))
    with pytest.raises(TargetFailed) as e:
        migrate(m, dst, HELPER, channel_pair=pair)
    assert "HelperPacketError" in str(e.value) and reason in str(e.value)
    assert e.value.stats.status == "failed" and e.value.stats.send_cancel
    # The guest's own pages and the helper's key are as they were. The helper's mailbox and
    # buffer carried the requests, and its state page moved on: sequence numbers are never
    # reused.
    lay = m.config.helper_layout
    after = memory_snapshot(m)
    own, key = lay.first_gfn * 4096, slice(lay.key_gfn * 4096, lay.state_gfn * 4096)
    assert after[:own] == before[:own] and after[key] == before[key]
    assert_runs_on(m)
