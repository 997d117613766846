"""When a migration's work happens in simulated time: the one interface between the engine and
whatever keeps time (docs/embedding.md).

The engine (``source``, ``target``) does all its work for real: the firmware commands, the
helper's sealing, the stream. For each step it also says what that work costs, as a
:data:`Work` (a tuple of :class:`Demand`), and hands it to a :class:`Driver`, which decides
*when* the step happens and returns once it has, in simulated time. The engine asks five things:

=====================  =====================================================================
``start()``            the migration begins (after its checks); the driver sets its clocks up
``local(work)``        work on the source Host, in program order (SEND_START, a dirty-log sync)
``batch(src, n, dst)`` one batch through the pipeline: ``src`` work on the source, ``n`` bytes
                       on the link, ``dst`` work on the target
``drain()``            wait until the target has applied everything sent
``remote(work)``       work on the target once everything sent has arrived (RECEIVE_FINISH)
=====================  =====================================================================

and reads ``now_ns()`` (the source's simulated time, which is also its guest's TSC) and
``spent()`` (where the source's time went). :class:`ClockDriver` is the default: the source
Host's own clock plus :class:`sevcore.migration.timeline.Timeline`, the numbers sevcore has
always given. ``sevcore.sim`` is a driver on SimPy, where PSPs, links and vCPUs are shared.
"""
from typing import NamedTuple

from sevcore.hw.hostmem import PAGE_SIZE
from sevcore.migration.helper import PACKET_SIZE
from sevcore.migration.timeline import Timeline

#: What each kind of demand occupies: the Host's PSP (one command at a time per PSP), the
#: guest's helper vCPUs, or the VMM's own thread on a host core.
RESOURCE = {"psp": "psp", "psp_ring": "psp", "helper": "vcpu", "exit": "vcpu", "copy": "cpu",
            "dirty_sync": "cpu"}


class Demand(NamedTuple):
    """One modelled cost, named by ``kind`` (a key of :data:`RESOURCE`): ``n`` commands, pages,
    exits or bytes; ``nbytes`` per command (``psp``) or in all (``psp_ring``); ``vcpus``
    sharing helper pages."""
    kind: str
    n: int
    nbytes: int = 0
    vcpus: int = 1

    @property
    def resource(self):
        """What the demand occupies: ``psp``, ``vcpu`` or ``cpu``."""
        return RESOURCE[self.kind]

    def charge(self, cost, clock):
        """Advance ``clock`` by what ``cost`` (a CostModel) says this demand takes; returns the
        nanoseconds. Raises ValueError for a count the cost model refuses."""
        k = self.kind
        if k == "psp":
            return cost.psp_commands(clock, self.n, self.nbytes)
        if k == "psp_ring":
            return cost.psp_batch(clock, self.n, self.nbytes)
        if k == "helper":
            return cost.helper_seal(clock, self.n, self.vcpus)
        if k == "exit":
            return cost.exit_roundtrip(clock, self.n)
        if k == "copy":
            return cost.host_copy(clock, self.n)
        if k == "dirty_sync":
            return cost.dirty_sync(clock, self.n)
        raise ValueError(f"unknown demand kind {k!r}")

    def ns(self, cost):
        """The nanoseconds this demand takes, on no clock."""
        return self.charge(cost, _NOWHERE)

    @property
    def category(self):
        """The clock category the cost model charges it to."""
        return {"psp_ring": "psp", "dirty_sync": "dirty_sync"}.get(self.kind, self.kind)


class _Nowhere:
    """A clock that keeps nothing: what a demand would take, without taking it."""
    @staticmethod
    def advance(ns, category):
        return float(ns)


_NOWHERE = _Nowhere()

# -- the work of one step (a tuple of demands) ---------------------------------------------------


def psp_command(nbytes=0):
    """One mailbox command (SEND_START, RECEIVE_START, SEND_FINISH, RECEIVE_FINISH)."""
    return (Demand("psp", 1, nbytes),)


def psp_pages(npages, ring_buffer):
    """SEND_UPDATE_DATA or RECEIVE_UPDATE_DATA of ``npages`` whole pages on one PSP: one mailbox
    command per page, or ring-buffer batches."""
    if ring_buffer:
        return (Demand("psp_ring", npages, npages * PAGE_SIZE),)
    return (Demand("psp", npages, PAGE_SIZE),)


def helper_pages(npages, vcpus, exits):
    """The helper sealing or opening ``npages`` on ``vcpus`` vCPUs in ``exits`` vCPU runs,
    plus the VMM's copy of the packets through the shared buffer."""
    return (Demand("helper", npages, vcpus=vcpus), Demand("exit", exits),
            Demand("copy", npages * PACKET_SIZE))


def shared_pages(npages):
    """The VMM copying ``npages`` shared pages between guest memory and the stream."""
    return (Demand("copy", npages * PAGE_SIZE),)


def dirty_sync(guest_size):
    """One harvest-and-clear of the dirty log of a guest of ``guest_size`` bytes."""
    return (Demand("dirty_sync", guest_size),)


NOTHING = ()


def charge(cost, clock, work):
    """Charge every demand of ``work`` to ``clock``, in order; returns the nanoseconds."""
    return sum(d.charge(cost, clock) for d in work)


def work_ns(cost, work):
    """The nanoseconds ``work`` takes when nothing else competes for its resources."""
    return sum(d.ns(cost) for d in work)


# -- drivers ---------------------------------------------------------------------------------


class Driver:
    """What the migration engine asks of simulated time (the module's table). Each call returns
    when the work is done in simulated time; a driver for another simulator implements all
    of them (docs/embedding.md)."""

    def bind(self, source):
        """The Source this driver serves (an observer may read its ``stats``); nothing by
        default."""

    def start(self):
        """The migration begins: set up the stages' clocks."""
        raise NotImplementedError

    def now_ns(self):
        """The source's simulated time, in ns."""
        raise NotImplementedError

    def local(self, work):
        """``work`` on the source Host, now."""
        raise NotImplementedError

    def batch(self, src, nbytes, dst):
        """One batch: ``src`` work on the source, ``nbytes`` on the link, ``dst`` on the
        target."""
        raise NotImplementedError

    def control(self, nbytes):
        """A control message source -> target (no Host work)."""
        self.batch(NOTHING, nbytes, NOTHING)

    def drain(self):
        """Wait until the target has applied everything sent."""
        raise NotImplementedError

    def remote(self, work):
        """``work`` on the target after everything sent so far arrived."""
        raise NotImplementedError

    def spent(self):
        """Simulated ns of the source's time per category (``psp``, ``network``, ``wait``...)."""
        raise NotImplementedError

    def target_now_ns(self):
        """When the target will have applied everything sent so far (no one waits for it)."""
        raise NotImplementedError

    def wait_until(self, t_ns, category="wait"):
        """The source waits until ``t_ns`` (a post-copy request that has not arrived yet);
        a time in the past is a no-op."""
        raise NotImplementedError


class ClockDriver(Driver):
    """The default: the source Host's clock and a three-stage pipeline (source, network,
    target) with one batch in flight between stages, so the slowest stage sets the pace."""

    def __init__(self, cost, clock):
        self.cost, self.clock = cost, clock
        self.tl = None

    def start(self):
        """The pipeline's network and target stages start at the source's time."""
        self.tl = Timeline(self.cost, self.clock)

    def now_ns(self):
        """The source Host's clock."""
        return self.clock.now_ns

    def local(self, work):
        """Charged to the source Host's clock."""
        charge(self.cost, self.clock, work)

    def batch(self, src, nbytes, dst):
        """Through the Timeline's pipeline."""
        cost = self.cost
        self.tl.batch(lambda c: charge(cost, c, src), nbytes, lambda c: charge(cost, c, dst))

    def drain(self):
        """The source waits for the target stage."""
        self.tl.drain()

    def remote(self, work):
        """On the target stage, between two drains."""
        self.tl.target_work(lambda c: charge(self.cost, c, work))

    def spent(self):
        """The source Host's clock categories."""
        return dict(self.clock.spent)

    def target_now_ns(self):
        """The Timeline's target stage."""
        return self.tl.dst.now_ns

    def wait_until(self, t_ns, category="wait"):
        """On the source Host's clock."""
        self.clock.advance_to(t_ns, category)
