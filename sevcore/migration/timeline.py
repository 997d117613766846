"""Simulated time of a migration: what each end's work costs on the declared cost model
(sevcore.hw.costmodel), and the source's timeline of the three-stage pipeline (source, network,
target) with one batch in flight between stages, so the slowest stage sets the pace."""
from sevcore.hw.costmodel import SimClock
from sevcore.hw.hostmem import PAGE_SIZE
from sevcore.migration.helper import PACKET_SIZE


def charge_psp_pages(cost, clock, npages, ring_buffer):
    """SEND_UPDATE_DATA or RECEIVE_UPDATE_DATA of ``npages`` whole pages on one PSP."""
    if ring_buffer:
        return cost.psp_batch(clock, npages, npages * PAGE_SIZE)
    return cost.psp_commands(clock, npages, PAGE_SIZE)


def charge_helper_pages(cost, clock, npages, vcpus, exits):
    """The helper sealing or opening ``npages`` on ``vcpus`` vCPUs in ``exits`` vCPU runs,
    plus the VMM's copy of the packets through the shared buffer."""
    return (cost.helper_seal(clock, npages, vcpus) + cost.exit_roundtrip(clock, exits)
            + cost.host_copy(clock, npages * PACKET_SIZE))


def charge_shared_pages(cost, clock, npages):
    """The VMM copying ``npages`` shared pages between guest memory and the stream."""
    return cost.host_copy(clock, npages * PAGE_SIZE)


class Timeline:
    """The source's view of simulated time: its Host's clock and the network and target stages
    of a pipeline with one batch in flight between neighbours."""

    def __init__(self, cost, src_clock):
        self.cost = cost
        self.src = src_clock
        self.net = SimClock(src_clock.now_ns)
        self.dst = SimClock(src_clock.now_ns)
        self._net_start = src_clock.now_ns
        self._dst_start = src_clock.now_ns

    def batch(self, src_work, nbytes, dst_work):
        """One batch: ``src_work(clock)`` and ``dst_work(clock)`` charge the two Hosts' work;
        ``nbytes`` go over the network between them."""
        # The source refills its buffer once the network took the previous batch.
        self.src.advance_to(self._net_start)
        src_work(self.src)
        self.net.advance_to(max(self.src.now_ns, self._dst_start))
        self._net_start = self.net.now_ns
        self.cost.network(self.net, nbytes)
        self.dst.advance_to(self.net.now_ns)
        self._dst_start = self.dst.now_ns
        dst_work(self.dst)

    def control(self, nbytes):
        """A control message source -> target (no Host work), e.g. the stream's markers."""
        self.batch(lambda c: 0, nbytes, lambda c: 0)

    def drain(self):
        """Wait (on the source clock) until the target has applied everything sent."""
        self.src.advance_to(self.dst.now_ns)
        self.net.advance_to(self.dst.now_ns)
        self._net_start = self._dst_start = self.dst.now_ns

    def target_work(self, work):
        """Work on the target after everything sent so far arrived (RECEIVE_FINISH...)."""
        self.drain()
        work(self.dst)
        self.drain()
