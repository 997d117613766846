"""The default driver's pipeline (sevcore.migration.driver.ClockDriver): the source's timeline of
the three stages (source, network, target) with one batch in flight between stages, so the
slowest stage sets the pace."""
from sevcore.hw.costmodel import SimClock


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
