"""The declared cost model: every charge against hand-computed values, ring-buffer amortisation,
overrides and their errors, and the simulated clock."""
import dataclasses

import pytest

from sevcore import Host
from sevcore.hw.costmodel import CostModel, CostModelError, SimClock

PAGE = 4096


@pytest.fixture
def cost():
    return CostModel()


@pytest.fixture
def clock():
    return SimClock()


def test_every_parameter_has_a_default_and_a_source():
    """Each parameter has a default, a unit and a doc that cites a source or says ASSUMPTION."""
    for name, value, unit, doc in CostModel().describe():
        assert value is not None and unit, name
        assert len(doc) > 40, name
        assert ("ASSUMPTION" in doc or "Source" in doc or "QEMU" in doc
                or "AMD-ASPFW" in doc), name


def test_documented_defaults():
    """The defaults with public sources have their published values."""
    c = CostModel()
    assert c.psp_bytes_per_s == 8e6
    assert c.psp_ring_entries == 256
    assert c.max_bandwidth == 128 * 1024 * 1024
    assert c.downtime_limit_ms == 300.0


def test_psp_command_hand_computed(cost, clock):
    """One page through the mailbox costs 50 us latency + 4096 B / 8 MB/s = 562 us."""
    assert cost.psp_command(clock, PAGE) == pytest.approx(50_000 + 512_000)
    assert cost.psp_command(clock) == pytest.approx(50_000)
    assert clock.now_ns == pytest.approx(612_000)
    assert clock.spent == {"psp": pytest.approx(612_000)}


def test_psp_batch_amortises_latency(cost, clock):
    """256 pages in one ring pay the latency once; 257 pay it twice; bytes cost the same."""
    one = cost.psp_batch(clock, 256, 256 * PAGE)
    assert one == pytest.approx(50_000 + 256 * 5_000 + 256 * 512_000)
    two = cost.psp_batch(clock, 257, 257 * PAGE)
    assert two == pytest.approx(2 * 50_000 + 257 * 5_000 + 257 * 512_000)
    singles = sum(cost.psp_command(SimClock(), PAGE) for _ in range(256))
    assert singles - one == pytest.approx(255 * 50_000 - 256 * 5_000)


def test_psp_batch_of_zero_is_free(cost, clock):
    """An empty batch costs nothing and cannot carry bytes."""
    assert cost.psp_batch(clock, 0) == 0
    with pytest.raises(ValueError):
        cost.psp_batch(clock, 0, PAGE)


def test_exit_roundtrip(cost, clock):
    """Three exits cost three round trips of 2 us, charged to 'exit'."""
    assert cost.exit_roundtrip(clock, 3) == pytest.approx(6_000)
    assert clock.spent == {"exit": pytest.approx(6_000)}


def test_helper_seal_splits_whole_pages(cost, clock):
    """1000 pages on 3 vCPUs take ceil(1000/3) = 334 page-times at 625 k pages/s each."""
    page_ns = 1e9 / 625_000
    assert cost.helper_seal(clock, 1000, vcpus=3) == pytest.approx(334 * page_ns)
    assert cost.helper_seal(clock, 1000) == pytest.approx(1000 * page_ns)
    assert cost.helper_open(clock, 2, vcpus=8) == pytest.approx(page_ns)
    with pytest.raises(ValueError):
        cost.helper_seal(clock, 1, vcpus=0)


def test_network_is_capped_by_max_bandwidth(cost, clock):
    """With QEMU's default cap, 128 MiB takes one second; with the cap raised, the link rules."""
    assert cost.network(clock, 128 << 20) == pytest.approx(1e9)
    fast = cost.replace(max_bandwidth=1e12)
    assert fast.network(clock, 1_250_000_000) == pytest.approx(1e9)


def test_dirty_sync_copy_and_dirty_rate(cost, clock):
    """A 1 TiB harvest costs 3.46 ms, 12.5 GB of copy one second, and 2 s dirty 5000 pages."""
    assert cost.dirty_sync(clock, 1 << 40) == pytest.approx(3_460_000)
    assert cost.host_copy(clock, 12_500_000_000) == pytest.approx(1e9)
    assert cost.pages_dirtied(2e9) == pytest.approx(5000)
    assert set(clock.spent) == {"dirty_sync", "copy"}


def test_charges_refuse_bad_counts(cost, clock):
    """Negative, fractional or boolean counts are ValueError and leave the clock alone."""
    for bad in (-1, 1.5, True):
        with pytest.raises(ValueError):
            cost.psp_command(clock, bad)
        with pytest.raises(ValueError):
            cost.network(clock, bad)
    assert clock.now_ns == 0 and clock.spent == {}


def test_clock_is_monotonic():
    """The clock only moves forward; advance_to a past time waits zero."""
    c = SimClock()
    c.advance(10, "a")
    for bad in (-1, float("nan"), float("inf")):
        with pytest.raises(ValueError):
            c.advance(bad, "a")
    assert c.advance_to(5) == 0 and c.now_ns == 10
    assert c.advance_to(25) == 15 and c.now_ns == 25
    assert c.spent == {"a": 10, "wait": 15}


def test_overrides_from_cli_strings_and_dict():
    """key=value strings and mappings override parameters with type conversion."""
    c = CostModel.from_overrides(["helper_vcpus=4", "psp_bytes_per_s = 16e6",
                                  "link_bytes_per_s=3_125_000_000"])
    assert c.helper_vcpus == 4 and isinstance(c.helper_vcpus, int)
    assert c.psp_bytes_per_s == 16e6 and c.link_bytes_per_s == 3.125e9
    d = CostModel.from_overrides({"downtime_limit_ms": 50}, base=c)
    assert d.downtime_limit_ms == 50.0 and d.helper_vcpus == 4
    assert CostModel().helper_vcpus == 1


@pytest.mark.parametrize("item, message", [
    ("psp_latency=1", "unknown cost-model parameter 'psp_latency'"),
    ("helper_vcpu=2", "did you mean helper_vcpus"),
    ("helper_vcpus", "not of the form key=value"),
    ("helper_vcpus=two", "helper_vcpus: expected a number"),
    ("helper_vcpus=1.5", "whole number"),
    ("helper_vcpus=0", "must be >= 1"),
    ("psp_bytes_per_s=0", "must be > 0"),
    ("exit_roundtrip_ns=-1", "must be >= 0"),
    ("link_bytes_per_s=inf", "must be finite"),
])
def test_override_errors(item, message):
    """Unknown keys, malformed items and bad values are CostModelError naming the key."""
    with pytest.raises(CostModelError, match=message):
        CostModel.from_overrides([item])


def test_model_is_immutable_and_validates_on_construction():
    """Parameters cannot be assigned in place, and the constructor checks values too."""
    with pytest.raises(dataclasses.FrozenInstanceError):
        CostModel().helper_vcpus = 2
    with pytest.raises(CostModelError):
        CostModel(helper_vcpus=0)
    with pytest.raises(CostModelError):
        CostModel().replace(psp_bytes_per_s="fast")


def test_host_has_its_own_clock():
    """Every Host starts with its own simulated clock at zero."""
    a, b = Host(), Host(seed=1)
    assert a.clock.now_ns == 0 and a.clock is not b.clock
    CostModel().exit_roundtrip(a.clock)
    assert b.clock.now_ns == 0 and a.clock.now_ns == 2_000


def test_psp_commands_equals_that_many_single_commands(cost, clock):
    """psp_commands(n, b) charges exactly n psp_command(b) charges, in one step."""
    singles = SimClock()
    for _ in range(7):
        cost.psp_command(singles, PAGE)
    assert cost.psp_commands(clock, 7, PAGE) == pytest.approx(singles.now_ns)
    assert clock.spent == pytest.approx(singles.spent)
    with pytest.raises(ValueError):
        cost.psp_commands(clock, -1, PAGE)
