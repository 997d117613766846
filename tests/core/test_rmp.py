"""The RMP (csrc/rmp.c through sevcore.hw.rmp.Rmp) against known cases of RMPUPDATE, PVALIDATE
and RMPADJUST and against the dict-backed twin (sevcore/_reference/rmp.py)."""
import errno

import numpy as np
import pytest
from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, rule

from sevcore import uapi as U
from sevcore._reference.rmp import Rmp as RefRmp
from sevcore.hw.rmp import Rmp, RmpEntry, RmpFault

from support import raises_errno

N = 4096                               # frames: 8 leaves of 2 MiB


@pytest.fixture
def rmp():
    return Rmp(N)


def test_a_new_table_is_all_hypervisor_pages_and_costs_only_its_top(rmp):
    """Every entry of a new table is zero and no leaf is allocated."""
    assert rmp.entry(0) == RmpEntry(0, 0, 0, 0, 0, 0, 0, 0)
    assert rmp.entry(N - 1) == RmpEntry(0, 0, 0, 0, 0, 0, 0, 0)
    assert rmp.stats()["leaves"] == 0 and rmp.assigned == 0


def test_rmpupdate_assigns_and_clears_validated_and_permissions(rmp):
    """RMPUPDATE writes the entry it is given, never validated and with no VMPL permissions."""
    assert rmp.rmp_make_private(5, 0x7000, 9) == 0
    assert rmp.pvalidate(5, gpa=0x7000, asid=9, validate=True) == (0, 0)
    assert rmp.rmpadjust(5, gpa=0x7000, asid=9, target_vmpl=2, perms=0x3) == 0
    assert rmp.entry(5) == RmpEntry(1, 0, 0, 1, 0, 9, 0x7000, 0x30)
    assert rmp.rmp_make_private(5, 0x8000, 9) == 0
    assert rmp.entry(5) == RmpEntry(1, 0, 0, 0, 0, 9, 0x8000, 0)


def test_rmpupdate_fail_input_cases(rmp):
    """Misaligned SPA or GPA, an unaligned or overhanging 2 MiB page and an unassigned entry with
    an owner are FAIL_INPUT and change nothing."""
    assert rmp.rmpupdate(0x1001, assigned=1, asid=1) == U.RMPUPDATE_FAIL_INPUT
    assert rmp.rmpupdate(0x1000, assigned=1, asid=1, gpa=0x10) == U.RMPUPDATE_FAIL_INPUT
    assert rmp.rmpupdate(0x1000, assigned=1, asid=1, pagesize=1) == U.RMPUPDATE_FAIL_INPUT
    assert rmp.rmpupdate((N - 512) << 12, assigned=1, asid=1, pagesize=1, gpa=0x1000) == \
        U.RMPUPDATE_FAIL_INPUT
    assert rmp.rmpupdate(0x1000, assigned=0, asid=3) == U.RMPUPDATE_FAIL_INPUT
    assert rmp.rmpupdate(0x1000, assigned=1, asid=1 << 16) == U.RMPUPDATE_FAIL_INPUT
    assert rmp.stats()["leaves"] == 0


def test_immutable_entries_refuse_rmpupdate(rmp):
    """An immutable (firmware or Pre-Guest) entry is FAIL_PERMISSION until the firmware unlocks
    it."""
    assert rmp.rmp_make_private(7, 0, 0, immutable=True) == 0
    assert rmp.rmp_make_shared(7) == U.RMPUPDATE_FAIL_PERMISSION
    rmp.fw_set(7, RmpEntry(0, 0, 0, 0, 0, 0, 0, 0))
    assert rmp.rmp_make_shared(7) == 0


def test_fail_inuse_between_2m_and_4k_entries(rmp):
    """A 2 MiB assignment over an assigned 4 KiB entry, and a 4 KiB update inside an assigned
    2 MiB page, are FAIL_INUSE."""
    assert rmp.rmp_make_private(512 + 3, 0x3000, 2) == 0
    assert rmp.rmp_make_private(512, 0x200000, 2, pagesize=1) == U.RMPUPDATE_FAIL_INUSE
    assert rmp.rmp_make_shared(512 + 3) == 0
    assert rmp.rmp_make_private(512, 0x200000, 2, pagesize=1) == 0
    assert rmp.rmp_make_private(512 + 3, 0x3000, 2) == U.RMPUPDATE_FAIL_INUSE
    assert rmp.entry(512 + 3) == RmpEntry(0, 0, 0, 0, 0, 0, 0, 0)


def test_pvalidate_reports_double_validation_in_cf(rmp):
    """Validating a validated page (or rescinding an unvalidated one) succeeds with rFLAGS.CF set
    and changes nothing."""
    rmp.rmp_make_private(9, 0x9000, 4)
    assert rmp.pvalidate(9, gpa=0x9000, asid=4, validate=False) == (0, 1)
    assert rmp.pvalidate(9, gpa=0x9000, asid=4, validate=True) == (0, 0)
    assert rmp.pvalidate(9, gpa=0x9000, asid=4, validate=True) == (0, 1)
    assert rmp.entry(9).validated == 1


def test_pvalidate_size_mismatch_and_faults(rmp):
    """A 2 MiB PVALIDATE of a 4 KiB entry is FAIL_SIZEMISMATCH; a 4 KiB one inside a 2 MiB
    entry, another guest's page, another GPA or a locked page are RMP faults."""
    rmp.rmp_make_private(1024, 0x400000, 4)
    assert rmp.pvalidate(1024, gpa=0x400000, asid=4, validate=True, pagesize=1) == \
        (U.PVALIDATE_FAIL_SIZEMISMATCH, 0)
    assert rmp.pvalidate(1024, gpa=0x400010, asid=4, validate=True) == \
        (U.PVALIDATE_FAIL_INPUT, 0)
    rmp.rmp_make_private(1536, 0x600000, 4, pagesize=1)
    with pytest.raises(RmpFault):
        rmp.pvalidate(1537, gpa=0x601000, asid=4, validate=True)
    assert rmp.pvalidate(1536, gpa=0x600000, asid=4, validate=True, pagesize=1) == (0, 0)
    with raises_errno(errno.EFAULT, "PVALIDATE"):
        rmp.pvalidate(1024, gpa=0x400000, asid=5, validate=True)
    with raises_errno(errno.EFAULT, "PVALIDATE"):
        rmp.pvalidate(1024, gpa=0x500000, asid=4, validate=True)
    rmp.rmp_make_private(1025, 0x401000, 4, immutable=True)
    with raises_errno(errno.EFAULT, "PVALIDATE"):
        rmp.pvalidate(1025, gpa=0x401000, asid=4, validate=True)


def test_host_writes_are_checked_against_owners(rmp):
    """The host may write only frames no one owns; a guest only frames assigned to it, including
    those under its 2 MiB pages."""
    rmp.rmp_make_private(20, 0x1000, 3)
    rmp.rmp_make_private(512, 0x200000, 3, pagesize=1)
    assert rmp.first_denied([19, 21, 20], 0) == 2
    assert rmp.first_denied([600], 0) == 0
    assert rmp.first_denied([20, 600, 21], 3) == 2
    with raises_errno(errno.EFAULT, "host write"):
        rmp.check_write([19, 600], 0, "host write")
    assert rmp.next_assigned(0, N) == 20
    assert rmp.next_assigned(21, N - 21) == 512
    assert rmp.next_assigned(1024, 100) == 1124


def test_batches_refuse_a_frame_past_the_table_before_changing_anything(rmp):
    """make_private_pages with one pfn past the table is ValueError and assigns nothing."""
    with pytest.raises(ValueError, match="outside the RMP"):
        rmp.make_private_pages([1, 2, N], [1, 2, 3], 5)
    assert rmp.assigned == 0


def test_make_private_pages_stops_at_the_first_refusal(rmp):
    """A batch stops at the page RMPUPDATE refuses and reports how many it did."""
    rmp.rmp_make_private(12, 0, 0, immutable=True)
    assert rmp.make_private_pages([10, 11, 12, 13], [1, 2, 3, 4], 6) == \
        (U.RMPUPDATE_FAIL_PERMISSION, 2)
    assert rmp.entry(11).asid == 6 and rmp.entry(13).assigned == 0


def test_leaves_are_freed_when_their_last_entry_returns_to_zero(rmp):
    """Memory follows the frames in use: a leaf goes when its last entry is cleared."""
    for pfn in (0, 1, 700):
        rmp.rmp_make_private(pfn, pfn << 12, 1)
    assert rmp.stats()["leaves"] == 2
    for pfn in (0, 1, 700):
        rmp.rmp_make_shared(pfn)
    assert rmp.stats()["leaves"] == 0 and rmp.assigned == 0


def test_memory_per_assigned_frame_is_under_20_bytes():
    """A densely assigned gigabyte costs under 20 bytes of table per frame."""
    big = Rmp(1 << 20)
    pfns = np.arange(1 << 18, dtype=np.uint64)
    assert big.make_private_pages(pfns, pfns, 1) == (0, 1 << 18)
    assert big.stats()["bytes"] / big.assigned < 20


def test_range_batches_refuse_a_frame_past_the_table_before_changing_anything(rmp):
    """make_shared_pages, pvalidate_pages, adjust_pages and assigned_mask with one pfn past the
    table are ValueError and change no entry."""
    rmp.rmp_make_private(1, 0x1000, 5)
    before = rmp.entry(1)
    pfns, gpas = np.array([1, N], np.uint64), np.array([0x1000, 0x2000], np.uint64)
    for call in (lambda: rmp.make_shared_pages(pfns), lambda: rmp.assigned_mask(pfns),
                 lambda: rmp.pvalidate_pages(pfns, gpas, asid=5, validate=True),
                 lambda: rmp.adjust_pages(pfns, gpas, asid=5, target_vmpl=1, perms=1)):
        with pytest.raises(ValueError, match="outside the RMP"):
            call()
    assert rmp.entry(1) == before


def test_pvalidate_pages_stops_at_cf_and_names_the_faulting_page(rmp):
    """A range PVALIDATE stops at the first page already validated (CF) and, for an RMP
    fault, raises RmpFault with the page's index after changing the pages before it."""
    pfns = np.arange(40, 44, dtype=np.uint64)
    gpas = np.arange(4, dtype=np.uint64) << np.uint64(12)
    assert rmp.make_private_pages(pfns, np.arange(4, dtype=np.uint64), 3) == (0, 4)
    assert rmp.pvalidate(42, gpa=0x2000, asid=3, validate=True) == (0, 0)
    assert rmp.pvalidate_pages(pfns, gpas, asid=3, validate=True) == (0, 1, 2)
    assert [rmp.entry(p).validated for p in range(40, 44)] == [1, 1, 1, 0]
    rmp.rmp_make_shared(43)
    with pytest.raises(RmpFault) as info:
        rmp.pvalidate_pages(pfns, gpas, asid=3, validate=False)
    assert info.value.index == 3 and info.value.pfn == 43
    assert [rmp.entry(p).validated for p in range(40, 43)] == [0, 0, 0]


def test_psmash_splits_a_2m_entry_keeping_its_state(rmp):
    """PSMASH turns a validated 2 MiB entry into 512 validated 4 KiB entries at consecutive
    GPAs, after which a 4 KiB PVALIDATE inside it works; a 4 KiB entry or an unaligned SPA is
    refused and changes nothing."""
    assert rmp.rmp_make_private(1024, 0x400000, 6, pagesize=1) == 0
    assert rmp.pvalidate(1024, gpa=0x400000, asid=6, validate=True, pagesize=1) == (0, 0)
    assert rmp.rmpadjust(1024, gpa=0x400000, asid=6, target_vmpl=1, perms=0x3) == 0
    with pytest.raises(RmpFault):
        rmp.pvalidate(1030, gpa=0x406000, asid=6, validate=False)
    assert rmp.psmash((1024 + 1) << 12) == U.PSMASH_FAIL_INPUT
    assert rmp.psmash(512 << 12) == U.PSMASH_FAIL_BADADDR
    assert rmp.assigned == 1
    assert rmp.psmash(1024 << 12) == 0
    assert rmp.assigned == 512
    assert rmp.entry(1024) == RmpEntry(1, 0, 0, 1, 0, 6, 0x400000, 0x3)
    assert rmp.entry(1535) == RmpEntry(1, 0, 0, 1, 0, 6, 0x400000 + (511 << 12), 0x3)
    assert rmp.pvalidate(1030, gpa=0x406000, asid=6, validate=False) == (0, 0)
    assert rmp.psmash(1024 << 12) == U.PSMASH_FAIL_BADADDR


def test_make_shared_pages_stops_at_a_locked_frame(rmp):
    """make_shared_pages returns the first refusal and how many frames it gave back."""
    rmp.make_private_pages([5, 6, 7], [5, 6, 7], 2)
    rmp.rmp_make_private(8, 0, 0, immutable=True)
    assert rmp.make_shared_pages([5, 6, 8, 7]) == (U.RMPUPDATE_FAIL_PERMISSION, 2)
    assert rmp.assigned_mask([5, 6, 7, 8]).tolist() == [False, False, True, True]


PFNS = st.one_of(st.sampled_from([0, 1, 511, 512, 513, 1023, 1024, 1535, 1536, 2047, N - 1]),
                 st.integers(0, N - 1))
ASIDS = st.integers(0, 3)
GPAS = st.sampled_from([0, 0x1000, 0x200000, 0x201000, 0x400000])


def _same(call_c, call_ref):
    """Run one operation on both tables; results, or the kind of exception, must agree."""
    try:
        want = ("ok", call_ref())
    except OSError as e:
        want = ("err", e.errno)
    except ValueError:
        want = ("value",)
    try:
        got = ("ok", call_c())
    except OSError as e:
        got = ("err", e.errno)
    except ValueError:
        got = ("value",)
    if got[0] == "ok" and isinstance(got[1], tuple) and want[0] == "ok":
        got = ("ok", tuple(got[1]))
    assert got == want


class RmpMachine(RuleBasedStateMachine):
    """The C table and the twin agree on every entry after any sequence of instructions."""

    def __init__(self):
        super().__init__()
        self.c, self.r = Rmp(N), RefRmp(N)

    @rule(pfn=PFNS, assigned=st.booleans(), pagesize=st.integers(0, 1),
          immutable=st.booleans(), asid=ASIDS, gpa=GPAS)
    def rmpupdate(self, pfn, assigned, pagesize, immutable, asid, gpa):
        kw = dict(assigned=assigned, pagesize=pagesize, immutable=immutable, asid=asid, gpa=gpa)
        _same(lambda: self.c.rmpupdate(pfn << 12, **kw), lambda: self.r.rmpupdate(pfn << 12, **kw))

    @rule(pfns=st.lists(PFNS, max_size=6), asid=ASIDS, immutable=st.booleans())
    def make_private_pages(self, pfns, asid, immutable):
        gfns = [p + 7 for p in pfns]
        _same(lambda: self.c.make_private_pages(np.array(pfns, np.uint64),
                                                np.array(gfns, np.uint64), asid,
                                                immutable=immutable),
              lambda: self.r.make_private_pages(pfns, gfns, asid, immutable=immutable))

    @rule(pfn=PFNS, gpa=GPAS, asid=ASIDS, validate=st.booleans(), pagesize=st.integers(0, 1))
    def pvalidate(self, pfn, gpa, asid, validate, pagesize):
        kw = dict(gpa=gpa, asid=asid, validate=validate, pagesize=pagesize)
        _same(lambda: self.c.pvalidate(pfn, **kw), lambda: self.r.pvalidate(pfn, **kw))

    @rule(pfn=PFNS, gpa=GPAS, asid=ASIDS, vmpl=st.integers(0, 4), perms=st.integers(0, 16),
          vmsa=st.booleans())
    def rmpadjust(self, pfn, gpa, asid, vmpl, perms, vmsa):
        kw = dict(gpa=gpa, asid=asid, target_vmpl=vmpl, perms=perms, vmsa=vmsa)
        _same(lambda: self.c.rmpadjust(pfn, **kw), lambda: self.r.rmpadjust(pfn, **kw))

    @rule(pfn=PFNS)
    def psmash(self, pfn):
        _same(lambda: self.c.psmash(pfn << 12), lambda: self.r.psmash(pfn << 12))

    @rule(pfns=st.lists(PFNS, max_size=6))
    def make_shared_pages(self, pfns):
        _same(lambda: self.c.make_shared_pages(np.array(pfns, np.uint64)),
              lambda: self.r.make_shared_pages(pfns))

    @rule(pfns=st.lists(PFNS, max_size=6), gpa=GPAS, asid=ASIDS, validate=st.booleans())
    def pvalidate_pages(self, pfns, gpa, asid, validate):
        gpas = [gpa + (i << 12) for i in range(len(pfns))]
        kw = dict(asid=asid, validate=validate)
        _same(lambda: self.c.pvalidate_pages(np.array(pfns, np.uint64),
                                             np.array(gpas, np.uint64), **kw),
              lambda: self.r.pvalidate_pages(pfns, gpas, **kw))

    @rule(pfns=st.lists(PFNS, max_size=6), gpa=GPAS, asid=ASIDS, vmpl=st.integers(0, 4),
          perms=st.integers(0, 16))
    def adjust_pages(self, pfns, gpa, asid, vmpl, perms):
        gpas = [gpa + (i << 12) for i in range(len(pfns))]
        kw = dict(asid=asid, target_vmpl=vmpl, perms=perms)
        _same(lambda: self.c.adjust_pages(np.array(pfns, np.uint64), np.array(gpas, np.uint64),
                                          **kw),
              lambda: self.r.adjust_pages(pfns, gpas, **kw))

    @rule(pfns=st.lists(PFNS, max_size=4), asid=ASIDS, vmsa=st.booleans())
    def fw_validate(self, pfns, asid, vmsa):
        _same(lambda: self.c.fw_validate(np.array(pfns, np.uint64), asid, vmsa=vmsa),
              lambda: self.r.fw_validate(pfns, asid, vmsa=vmsa))

    @rule(pfns=st.lists(PFNS, max_size=6), asid=ASIDS)
    def queries(self, pfns, asid):
        arr = np.array(pfns, np.uint64)
        assert self.c.first_denied(arr, asid) == self.r.first_denied(pfns, asid)
        assert self.c.preguest_prefix(arr, asid) == self.r.preguest_prefix(pfns, asid)
        assert self.c.assigned_mask(arr).tolist() == self.r.assigned_mask(pfns)
        start = pfns[0] if pfns else 0
        assert self.c.next_assigned(start, 700) == self.r.next_assigned(start, 700)
        for pfn in pfns:
            assert self.c.validated(pfn, asid) == self.r.validated(pfn, asid)

    @invariant()
    def entries_agree(self):
        for pfn in set(self.r.e) | {0, 512, 1024}:
            assert tuple(self.c.entry(pfn)) == self.r.entry(pfn)
        assert self.c.assigned == self.r.assigned


TestRmpMachine = RmpMachine.TestCase
TestRmpMachine.settings = settings(max_examples=150, stateful_step_count=30, deadline=None)
