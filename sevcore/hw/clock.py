"""Simulated time of one Host (``host.clock``), advanced only by modelled costs
(sevcore.hw.costmodel says how far each operation advances it)."""
import math


class SimClock:
    """Simulated time of one Host, in nanoseconds, advanced only by modelled costs.

    ``now_ns`` never goes backwards; ``spent`` holds the nanoseconds charged per category
    (``psp``, ``exit``, ``helper``, ``network``, ``dirty_sync``, ``copy``, ``wait`` ...).
    """

    __slots__ = ("now_ns", "spent")

    def __init__(self, now_ns=0.0):
        if not now_ns >= 0:
            raise ValueError(f"a clock starts at a time >= 0, not {now_ns!r}")
        self.now_ns = float(now_ns)
        self.spent = {}

    def advance(self, ns, category):
        """Move the clock ``ns`` forward, charged to ``category``; returns ``ns``.

        Raises ValueError for a negative or non-finite ``ns`` (time only moves forward).
        """
        ns = float(ns)
        if not (ns >= 0 and math.isfinite(ns)):
            raise ValueError(f"cannot advance a clock by {ns!r} ns ({category})")
        self.now_ns += ns
        self.spent[category] = self.spent.get(category, 0.0) + ns
        return ns

    def advance_to(self, t_ns, category="wait"):
        """Wait until ``t_ns`` (for example for the other Host's clock); a time in the past is a
        no-op. Returns the nanoseconds waited."""
        return self.advance(max(0.0, float(t_ns) - self.now_ns), category)

    def __repr__(self):
        return f"SimClock(now_ns={self.now_ns:.0f}, spent={self.spent})"
