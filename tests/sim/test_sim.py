"""Migrations and launches as SimPy processes (sevcore.sim): the same times as the default
driver when nothing is shared, real contention on a shared PSP and link, observation and
cancellation from other processes, and the evacuation study."""
import math

import pytest
import simpy
from hypothesis import given, settings
from hypothesis import strategies as st

import sevcore
import sevcore.sim as sim
from sevcore.migration.driver import Demand
from sevcore.migration.engine import MigrationError, MigrationParams, migrate
from sevcore.migration.machine import Machine
from sevcore.migration.workload import GuestConfig
from sevcore.sim.evacuate import Plan, evacuate

from support.migration import SMALL, assert_runs_on, guest_state, launched

PARAMS = {"psp": MigrationParams(path="psp", timeout_s=30),
          "helper": MigrationParams(path="helper", timeout_s=30)}


def helper_cfg(path):
    """The guest configuration for ``path``: a migration helper on the helper path."""
    return {"helper_vcpus": 1} if path == "helper" else {}


@pytest.mark.parametrize("path", ["psp", "helper"])
def test_one_uncontended_migration_takes_the_default_drivers_time(path):
    """Alone on its PSPs and link, a SimPy migration takes the default driver's simulated
    times within 1 %, and the moved guest checks out."""
    m, dst = launched(**helper_cfg(path))
    ref = migrate(m, dst, PARAMS[path]).stats
    m, dst = launched(**helper_cfg(path))
    env = simpy.Environment()
    proc = env.process(sim.migrate(env, m, dst, PARAMS[path]))
    env.run()
    got = proc.value.stats
    assert got.status == "completed" and got.bad_pages == 0 and got.verified_pages > 0
    for field in ("total_ns", "downtime_ns", "setup_ns"):
        assert math.isclose(getattr(got, field), getattr(ref, field), rel_tol=0.01), field
    assert got.total_ns == pytest.approx(env.now * 1e9)


def run_two(shared, path="psp"):
    """Two guests of one source Host migrating at once: on one set of PSPs and one link if
    ``shared``, else each on its own. Returns (the two Migrations, the shared Psps)."""
    env = simpy.Environment()
    src = sevcore.Kvm()
    cfg = GuestConfig(**SMALL, **helper_cfg(path))
    machines = [Machine.launch(src, cfg) for _ in range(2)]
    psps, link = sim.Psps(env), sim.Link(env, 1.25e9)
    migs = []
    for i, m in enumerate(machines):
        kw = dict(psp=psps, link=link) if shared else {}
        migs.append(sim.Migration(env, m, sevcore.Kvm(), PARAMS[path], name=f"g{i}", **kw))
        migs[-1].start()
    env.run()
    return migs, psps[src.host]


def test_two_migrations_on_one_psp_take_longer_and_never_overlap_on_it():
    """Sharing the source PSP, each of two migrations takes longer than alone (its guest
    dirtying on while it waits); the PSP's recorded holds never overlap, and the two
    migrations' batches alternate on it."""
    alone, _ = run_two(shared=False)
    shared, psp = run_two(shared=True)
    for a, s in zip(alone, shared):
        assert s.stats.bad_pages == 0 and a.stats.bad_pages == 0
        assert s.stats.total_ns > max(x.stats.total_ns for x in alone)
        assert s.stats.guest_pages_written > a.stats.guest_pages_written
    trace = sorted(psp.trace)
    assert all(prev[1] <= nxt[0] for prev, nxt in zip(trace, trace[1:]))
    owners = [t[2] for t in trace]
    switches = sum(a != b for a, b in zip(owners, owners[1:]))
    assert set(owners) == {"g0", "g1"} and switches >= 10
    assert psp.queue_s > 0


def test_cancel_from_another_process_ends_in_send_cancel_with_the_source_intact():
    """A user process cancels a migration mid pre-copy: SEND_CANCEL, the source guest runs
    on (and later migrates intact), the target keeps nothing, and no batch of the cancelled
    migration is on the PSP afterwards."""
    m, dst = launched()
    env = simpy.Environment()
    psps = sim.Psps(env)
    mig = sim.Migration(env, m, dst, PARAMS["psp"], psp=psps, name="victim")
    seen = []

    def operator():
        while mig.query()["sev"].get("private-pages", 0) < 100:
            seen.append(mig.status)
            yield env.timeout(0.01)
        seen.append(mig.query())
        mig.cancel()
    proc = mig.start()
    env.process(operator())
    env.run()
    r = proc.value
    cancelled_at = mig.ended_s
    assert r.target is None and r.stats.status == "cancelled" == mig.status
    assert r.stats.psp_commands.get("SEND_CANCEL") == 1
    assert seen[0] == "active" and seen[-1]["status"] == "active"
    assert seen[-1]["ram"]["transferred"] > 0
    assert all(t[1] <= cancelled_at for t in psps[m.host].trace)
    assert dst.host.umc.keyed_asids() == []
    assert_runs_on(m)
    again = migrate(m, sevcore.Kvm(), PARAMS["psp"]).stats
    assert again.status == "completed" and again.bad_pages == 0


def test_interrupting_the_process_cancels_too():
    """``process.interrupt()`` from any process is the same cancel: its value says cancelled
    and the source guest is RUNNING."""
    m, dst = launched(**helper_cfg("helper"))
    env = simpy.Environment()
    proc = env.process(sim.migrate(env, m, dst, PARAMS["helper"]))

    def stop():
        yield env.timeout(0.005)
        proc.interrupt()
    env.process(stop())
    env.run()
    assert proc.value.stats.status == "cancelled"
    from sevcore.uapi import SEV_GUEST_STATE_RUNNING
    assert guest_state(m) == SEV_GUEST_STATE_RUNNING


def test_launches_queue_on_the_hosts_psp():
    """Two launches on one Host take turns on its PSP, command by command (LAUNCH_START,
    LAUNCH_UPDATE_DATA of the boot image, LAUNCH_MEASURE, LAUNCH_FINISH), never at once."""
    env = simpy.Environment()
    kvm, psps = sevcore.Kvm(), sim.Psps(env)
    cfg = GuestConfig(**SMALL)
    procs = [env.process(sim.launch(env, kvm, cfg, psp=psps, name=f"l{i}")) for i in range(2)]
    env.run()
    cost = MigrationParams().cost
    one = sum(cost.psp_command_latency_ns + n * 1e9 / cost.psp_bytes_per_s
              for _, n in sim.process.LAUNCH_COMMANDS)
    assert env.now == pytest.approx(2 * one / 1e9)
    trace = psps[kvm.host].trace
    assert [t[2] for t in trace] == ["l0", "l1"] * 4
    assert all(a[1] <= b[0] for a, b in zip(trace, trace[1:]))
    assert all(p.value.tracker.migration_ready for p in procs)


def test_link_shares_fairly_with_caps_and_latency():
    """Two transfers share a link equally; a capped one gives the rest to the other; the
    latency comes after the last byte."""
    env = simpy.Environment()
    link = sim.Link(env, 1e6, latency_s=0.5)
    done = {}

    def send(name, nbytes, cap=math.inf):
        yield from link.send(nbytes, cap)
        done[name] = env.now
    env.process(send("a", 1e6))
    env.process(send("b", 1e6))
    env.process(send("capped", 0.25e6, cap=0.125e6))
    env.run()
    # a and b get 0.4375 MB/s each while the capped one runs (2 s), then 0.5 MB/s each.
    t = 2 + (1e6 - 2 * 0.4375e6) / 0.5e6
    assert done["capped"] == pytest.approx(2.5)
    assert done["a"] == pytest.approx(t + 0.5) and done["b"] == pytest.approx(t + 0.5)
    assert link.stats()["bytes"] == pytest.approx(2.25e6)


@settings(max_examples=40, deadline=None)
@given(st.lists(st.tuples(st.floats(0, 5), st.integers(1, 10**6)), min_size=1, max_size=8))
def test_link_is_work_conserving_and_carries_every_byte(transfers):
    """Transfers arriving at any times finish when a work-conserving link would finish them
    all, and every byte is carried."""
    env = simpy.Environment()
    link = sim.Link(env, 1e6)

    def send(at, nbytes):
        yield env.timeout(at)
        yield from link.send(nbytes)
    for at, n in transfers:
        env.process(send(at, n))
    env.run()
    free = 0.0                                  # when a single FIFO queue would be done
    for at, n in sorted(transfers):
        free = max(free, at) + n / 1e6
    assert env.now == pytest.approx(free, rel=1e-9, abs=1e-9)
    assert link.stats()["bytes"] == pytest.approx(sum(n for _, n in transfers))


def test_psp_slices_interleave_two_batches_command_by_command():
    """With ``slice_commands=1`` two page batches alternate command by command, and the PSP
    is busy exactly the sum of their times."""
    env = simpy.Environment()
    psp = sim.Psp(env, slice_commands=1)
    for owner in ("x", "y"):
        env.process(psp.hold(3e9, owner, 3))
    env.run()
    assert [t[2] for t in psp.trace] == ["x", "y"] * 3
    assert env.now == pytest.approx(6.0) and psp.busy_s == pytest.approx(6.0)


@pytest.mark.parametrize("path, parallel", [("helper", None), ("psp", 1)])
def test_every_guest_of_an_evacuation_passes_its_own_check(path, parallel):
    """Each guest of an evacuation runs on a target with every page checked and none bad;
    one at a time, each starts when the one before ran on its target."""
    cfg = GuestConfig(**SMALL, dirty_pages_per_s=200)
    plan = Plan(3, cfg, PARAMS[path], 1.25e9, targets=2, parallel=parallel)
    rep = evacuate(plan, sevcore.Kvm)
    ev, guests = rep["evacuation"], rep["guests"]
    assert ev["all_ok"] and len(guests) == 3
    for g in guests:
        q = g["query-migrate"]
        assert q["status"] == "completed" and q["sev"]["bad-pages"] == 0
        assert q["sev"]["verified-pages"] > 0
    assert [g["target"] for g in guests] == [0, 1, 0]
    assert ev["evacuation_s"] == pytest.approx(max(g["end_s"] for g in guests))
    assert ev["worst_downtime_ms"] == max(g["query-migrate"]["downtime"] for g in guests)
    if parallel == 1:
        for a, b in zip(guests, guests[1:]):
            assert b["start_s"] == pytest.approx(a["end_s"], abs=1e-9)
        assert ev["hosts"]["source"]["psp_queue_s"] == pytest.approx(0.0, abs=1e-9)
        assert ev["bottleneck"].startswith("source PSP")
    else:
        assert all(g["start_s"] == 0 for g in guests)
        assert ev["bottleneck"].startswith("per-migration limits")


def test_a_slow_link_is_the_evacuations_bottleneck():
    """Helper-path guests on a link whose fair share is below their max-bandwidth wait for
    the link: it is named the bottleneck, and it carried what was sent (all but the few
    control records the cost model charges no bytes for)."""
    cfg = GuestConfig(**SMALL, dirty_pages_per_s=200)
    rep = evacuate(Plan(2, cfg, PARAMS["helper"], 50e6), sevcore.Kvm)
    ev = rep["evacuation"]
    assert ev["all_ok"] and ev["bottleneck"].startswith("link")
    sent = sum(g["query-migrate"]["ram"]["transferred"] for g in rep["guests"])
    assert 0.99 * sent <= ev["link"]["bytes"] <= sent


def test_past_send_finish_a_cancel_is_refused_and_the_migration_completes():
    """Once SEND_FINISH is issued, ``cancel()`` returns False and even an interrupt of the
    process is ignored: the guest runs on the target."""
    m, dst = launched(**helper_cfg("helper"))
    env = simpy.Environment()
    mig = sim.Migration(env, m, dst, PARAMS["helper"])
    proc = mig.start()
    tried = []

    def late_operator():
        while not mig.driver.handed_over:
            yield env.timeout(1e-5)
        tried.append(mig.cancel())
        proc.interrupt()
    env.process(late_operator())
    env.run()
    assert tried == [False]
    r = proc.value
    assert r.stats.status == "completed" and r.stats.bad_pages == 0 and r.target is not None
    assert "SEND_CANCEL" not in r.stats.psp_commands


def test_work_the_cost_model_refuses_fails_the_migration_cleanly():
    """A demand the cost model refuses (a negative count) fails the engine's request in its
    own thread: the source cancels and runs on, and the process raises MigrationError."""
    m, dst = launched()
    env = simpy.Environment()
    mig = sim.Migration(env, m, dst, PARAMS["psp"])
    original = mig.driver.local
    mig.driver.local = lambda work: original(work + (Demand("copy", -1),))   # SEND_START's
    proc = mig.start()
    with pytest.raises(MigrationError, match="nbytes must be an int >= 0"):
        env.run()
    assert not proc.is_alive and mig.status == "failed" and mig.stats.send_cancel
    assert mig.stats.psp_commands.get("SEND_CANCEL") == 1
    assert_runs_on(m)


def test_postcopy_runs_on_simpy_and_charges_its_requests():
    """Post-copy through the SimPy driver: the guest runs on the target, asks for pages, and
    checks out; the source's waits for requests are charged in the environment."""
    m, dst = launched(workload="random", dirty_pages_per_s=4_000, mem_size=8 << 20,
                      **helper_cfg("helper"))
    env = simpy.Environment()
    params = MigrationParams(path="helper", postcopy=True, postcopy_after=0, batch_pages=64,
                             timeout_s=30)
    proc = env.process(sim.migrate(env, m, dst, params))
    env.run()
    st = proc.value.stats
    assert st.status == "completed" and st.bad_pages == 0 and st.verified_pages > 0
    assert st.postcopy_requests > 0 and st.pages_on_demand > 0
    assert st.time_spent.get("latency", 0) > 0 and st.total_ns == pytest.approx(env.now * 1e9)
