"""The engine's time interface (sevcore.migration.driver): the default driver charges exactly
what the cost model's calls of the engine before the split charged, in the same order."""
from hypothesis import given, settings
from hypothesis import strategies as st

from sevcore.hw.costmodel import CostModel, SimClock
from sevcore.migration import driver as D
from sevcore.migration.helper import PACKET_SIZE
from sevcore.migration.timeline import Timeline

PAGE = 4096
COST = CostModel(dirty_pages_per_s=1e4, psp_ring_entries=16)

#: One step of a migration as (name, arguments): what the engine asks for.
steps = st.one_of(
    st.tuples(st.just("psp"), st.integers(0, 600), st.booleans()),
    st.tuples(st.just("helper"), st.integers(0, 600), st.integers(1, 8), st.integers(0, 40)),
    st.tuples(st.just("shared"), st.integers(0, 600)),
    st.tuples(st.just("local"), st.integers(0, 1 << 32)),
    st.tuples(st.just("control"), st.integers(0, 1 << 20)),
    st.tuples(st.just("drain")),
    st.tuples(st.just("remote")),
)


def by_hand(cost, step):
    """The step's charge as the cost model's own calls (what the engine made before the
    driver): ``(work on one clock, bytes on the link)``."""
    kind = step[0]
    if kind == "psp":
        n, ring = step[1:]
        if ring:
            return (lambda c: cost.psp_batch(c, n, n * PAGE)), n * 4180
        return (lambda c: cost.psp_commands(c, n, PAGE)), n * 4180
    if kind == "helper":
        n, vcpus, exits = step[1:]
        return (lambda c: cost.helper_seal(c, n, vcpus) + cost.exit_roundtrip(c, exits)
                + cost.host_copy(c, n * PACKET_SIZE)), n * PACKET_SIZE
    n = step[1]
    return (lambda c: cost.host_copy(c, n * PAGE)), n * PAGE


def work_of(step):
    """The same step as the driver's Work."""
    kind = step[0]
    if kind == "psp":
        return D.psp_pages(*step[1:])
    if kind == "helper":
        return D.helper_pages(*step[1:])
    return D.shared_pages(step[1])


@settings(max_examples=60, deadline=None)
@given(st.lists(steps, max_size=30), st.floats(0, 1e9))
def test_clock_driver_charges_what_the_cost_model_calls_charged(seq, t0):
    """Any sequence of steps leaves the default driver's clocks bit for bit where the direct
    cost-model calls on a Timeline leave them."""
    old_clock, new_clock = SimClock(t0), SimClock(t0)
    tl = Timeline(COST, old_clock)
    drv = D.ClockDriver(COST, new_clock)
    drv.start()
    for step in seq:
        kind = step[0]
        if kind == "local":
            COST.dirty_sync(old_clock, step[1])
            COST.psp_command(old_clock, 0)
            drv.local(D.dirty_sync(step[1]))
            drv.local(D.psp_command())
        elif kind == "control":
            tl.batch(lambda c: 0, step[1], lambda c: 0)    # a message, no Host work
            drv.control(step[1])
        elif kind == "drain":
            tl.drain()
            drv.drain()
        elif kind == "remote":
            tl.target_work(lambda c: COST.psp_command(c, 0))
            drv.remote(D.psp_command())
        else:
            work, nbytes = by_hand(COST, step)
            tl.batch(work, nbytes, work)
            drv.batch(work_of(step), nbytes, work_of(step))
        assert drv.now_ns() == old_clock.now_ns
    assert drv.spent() == old_clock.spent
    assert (drv.tl.net.now_ns, drv.tl.dst.now_ns) == (tl.net.now_ns, tl.dst.now_ns)


@given(steps.filter(lambda s: s[0] in ("psp", "helper", "shared")))
def test_a_demand_takes_on_no_clock_what_it_charges_to_one(step):
    """``work_ns`` of a step is what charging it to a fresh clock advances that clock by."""
    clock = SimClock()
    D.charge(COST, clock, work_of(step))
    assert D.work_ns(COST, work_of(step)) == clock.now_ns
    assert set(clock.spent) == {d.category for d in work_of(step)}
