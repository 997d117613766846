"""RangeSet (sevcore.core.ranges) against a plain Python set."""
from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, rule

from sevcore.core.ranges import RangeSet

span = st.tuples(st.integers(0, 200), st.integers(0, 40)).map(lambda t: (t[0], t[0] + t[1]))


class RangeSetMachine(RuleBasedStateMachine):
    """Random adds and removes keep RangeSet equal to a set, with sorted disjoint ranges."""

    def __init__(self):
        super().__init__()
        self.rs = RangeSet()
        self.ref = set()

    @rule(r=span)
    def add(self, r):
        self.rs.add(*r)
        self.ref |= set(range(*r))

    @rule(r=span)
    def remove(self, r):
        self.rs.remove(*r)
        self.ref -= set(range(*r))

    @rule(r=span)
    def queries(self, r):
        s, e = r
        assert self.rs.covers(s, e) == (set(range(s, e)) <= self.ref)
        assert self.rs.disjoint(s, e) == (not set(range(s, e)) & self.ref)
        got = set()
        for a, b in self.rs.intersect(s, e):
            got |= set(range(a, b))
        assert got == set(range(s, e)) & self.ref

    @invariant()
    def same_members(self):
        members = set()
        prev_end = -1
        for s, e in self.rs:
            assert s < e and s > prev_end      # disjoint and never merely adjacent
            prev_end = e
            members |= set(range(s, e))
        assert members == self.ref and len(self.rs) == len(self.ref)
        for x in (0, 7, 100, 239):
            assert (x in self.rs) == (x in self.ref)


TestRangeSet = RangeSetMachine.TestCase
TestRangeSet.settings = settings(max_examples=200, stateful_step_count=30, deadline=None)


def test_a_set_of_2_52_integers_compares_and_prints_by_its_ranges():
    """Equality and repr of a RangeSet go by its ranges, not by its length in integers (which
    list() would preallocate: a MemoryError for a VM's whole guest physical space)."""
    a, b = RangeSet([(0, 1 << 52)]), RangeSet([(0, 1 << 52)])
    assert a == b and a != RangeSet([(0, 1 << 51)])
    assert repr(a) == f"RangeSet([(0, {1 << 52})])"
