"""How to migrate: the path, the cost model and the engine's limits."""
from dataclasses import dataclass, field

from sevcore.hw.costmodel import CostModel

PATHS = ("psp", "helper")


@dataclass(frozen=True)
class MigrationParams:
    """How to migrate. ``path``: ``psp`` (every private page through SEND/RECEIVE_UPDATE_DATA)
    or ``helper`` (an in-guest migration helper in a mirror VM). ``ring_buffer``: charge PSP
    page commands as ring-buffer batches instead of one mailbox command each (QEMU's series
    issues one KVM_SEV_SEND_UPDATE_DATA per page). ``max_iterations``: pre-copy passes before
    stop-and-copy is forced (then ``converged`` is False). ``batch_pages``: pages per batch.
    ``guest_runs``: times the guest runs per pass (at least once). ``postcopy``: after
    ``postcopy_after`` pre-copy passes (0: none) the guest moves to the target and runs there
    while the pages it still owes follow, on demand or pushed (sevcore.migration.postcopy)."""
    path: str = "psp"
    cost: CostModel = field(default_factory=CostModel)
    max_iterations: int = 30
    ring_buffer: bool = False
    batch_pages: int = 256
    guest_runs: int = 64
    timeout_s: float = 60.0
    postcopy: bool = False
    postcopy_after: int = 1

    def __post_init__(self):
        if self.path not in PATHS:
            raise ValueError(f"path must be one of {PATHS}, not {self.path!r}")
        if self.max_iterations < 1 or self.batch_pages < 1 or self.guest_runs < 1:
            raise ValueError("max_iterations, batch_pages and guest_runs must be >= 1")
        if isinstance(self.postcopy_after, bool) or not isinstance(self.postcopy_after, int) \
                or self.postcopy_after < 0:
            raise ValueError(f"postcopy_after must be an int >= 0, not {self.postcopy_after!r}")

    def to_dict(self):
        return {"path": self.path, "max_iterations": self.max_iterations,
                "ring_buffer": self.ring_buffer, "batch_pages": self.batch_pages,
                "guest_runs": self.guest_runs, "postcopy": self.postcopy,
                "postcopy_after": self.postcopy_after,
                "cost": {name: value for name, value, _, _ in self.cost.describe()}}

    @classmethod
    def from_dict(cls, d):
        return cls(path=d["path"], cost=CostModel.from_overrides(d["cost"]),
                   max_iterations=d["max_iterations"], ring_buffer=d["ring_buffer"],
                   batch_pages=d["batch_pages"], guest_runs=d["guest_runs"],
                   postcopy=d.get("postcopy", False), postcopy_after=d.get("postcopy_after", 1))
