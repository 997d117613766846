"""Statistics of one migration, named as QEMU's ``query-migrate`` names them.

Times are simulated milliseconds (the cost model's), except ``wall-time``; byte counts come from
the stream writer (``StreamStats``), so they are what went on the wire.
"""
from dataclasses import dataclass, field

NS_PER_MS = 1e6

#: query-migrate's "ram" keys this module fills, in QEMU's order.
QEMU_RAM_KEYS = ("transferred", "remaining", "total", "duplicate", "normal", "normal-bytes",
                 "dirty-pages-rate", "mbps", "dirty-sync-count", "pages-per-second",
                 "precopy-bytes", "downtime-bytes")
#: What post-copy adds to query-migrate: ``ram``'s two counters (qapi/migration.json,
#: MigrationStats) and the destination's blocktime (migration/postcopy-ram.c,
#: fill_destination_postcopy_migration_info: the time every vCPU was stopped at once, and each
#: vCPU's stopped time, in ms).
QEMU_POSTCOPY_RAM_KEYS = ("postcopy-requests", "postcopy-bytes")
QEMU_POSTCOPY_KEYS = ("postcopy-blocktime", "postcopy-vcpu-blocktime")


@dataclass
class IterationStats:
    """One pass over the dirty pages (iteration 0 sends everything)."""
    iteration: int
    start_ns: float
    end_ns: float = 0.0
    pages: int = 0
    private_pages: int = 0
    shared_pages: int = 0
    bytes: int = 0
    dirty_after: int = 0            # pages dirty when the pass ended
    expected_downtime_ms: float = 0.0
    stop: bool = False

    def to_dict(self):
        return dict(self.__dict__)


@dataclass
class MigrationStats:
    """Everything a migration reports; :meth:`query_migrate` gives QEMU's layout."""
    path: str
    status: str = "setup"            # setup, active, completed, failed, postcopy-paused
    error: str = ""
    guest_pages: int = 0
    setup_ns: float = 0.0
    total_ns: float = 0.0
    downtime_ns: float = 0.0
    converged: bool = False
    iterations: list = field(default_factory=list)
    stream: dict = field(default_factory=dict)        # StreamStats.qemu() of the writer
    remaining: int = 0
    dirty_sync_count: int = 0
    dirty_pages_rate: float = 0.0
    private_pages: int = 0
    shared_pages: int = 0
    zero_pages: int = 0
    psp_commands: dict = field(default_factory=dict)  # command name -> count, both Hosts
    helper_packets: int = 0
    helper_requests: int = 0
    guest_ticks: int = 0
    guest_pages_written: int = 0
    verified_pages: int = 0
    bad_pages: int = -1              # -1: the target's check did not report
    time_spent: dict = field(default_factory=dict)    # source clock categories, ns
    target_time_spent: dict = field(default_factory=dict)
    wall_s: float = 0.0
    cost_model: dict = field(default_factory=dict)
    send_cancel: bool = False        # the source ran KVM_SEV_SEND_CANCEL after a failure
    #: After a failure: whether the source guest runs again, and its own memory check
    #: (``{"checked", "bad", "first_bad"}``, or ``{"error": ...}`` if it could not run).
    source_resumed: bool = None
    guest_lost: bool = False         # post-copy failed after the guest ran on the target
    source_check: dict = None
    postcopy: bool = False
    postcopy_after: int = 0          # pre-copy passes before the switch to post-copy
    postcopy_start_ns: float = 0.0   # when the target's guest started running
    postcopy_requests: int = 0       # pages the target asked for on the return channel
    postcopy_bytes: int = 0          # stream bytes sent after the switch
    pages_on_demand: int = 0         # owed pages sent because the target asked
    pages_pushed: int = 0            # owed pages sent by the background push
    pages_owed: int = 0              # pages still owed when the target's guest started
    pages_resent: int = 0            # pages sent again after a resume (lost in flight)
    postcopy_resumes: int = 0        # connections after a postcopy-paused
    vcpu_blocktime_ns: list = field(default_factory=list)   # per vCPU, stopped on a fault
    blocktime_ns: float = 0.0        # every vCPU stopped at once
    vcpu_faults: list = field(default_factory=list)         # per vCPU, faults on owed pages

    def count_psp(self, name, n=1):
        self.psp_commands[name] = self.psp_commands.get(name, 0) + n

    def query_migrate(self):
        """The statistics in QEMU's ``query-migrate`` shape (times in ms, ``ram`` in bytes and
        pages), plus sevcore's own under ``sev``."""
        s = self.stream
        transferred = s.get("transferred", 0)
        total_ms = self.total_ns / NS_PER_MS
        secs = self.total_ns / 1e9
        ram = {
            "transferred": transferred,
            "remaining": self.remaining * 4096,
            "total": self.guest_pages * 4096,
            "duplicate": s.get("duplicate", 0),
            "normal": s.get("normal", 0),
            "normal-bytes": s.get("normal-bytes", 0),
            "dirty-pages-rate": round(self.dirty_pages_rate),
            "mbps": transferred * 8 / 1e6 / secs if secs else 0.0,
            "dirty-sync-count": self.dirty_sync_count,
            "pages-per-second": s.get("normal", 0) / secs if secs else 0.0,
            "precopy-bytes": s.get("precopy-bytes", 0),
            "downtime-bytes": s.get("downtime-bytes", 0),
        }
        pc = {}
        if self.postcopy:
            ram["postcopy-requests"] = self.postcopy_requests
            ram["postcopy-bytes"] = self.postcopy_bytes
            pc = {"postcopy-blocktime": round(self.blocktime_ns / NS_PER_MS, 3),
                  "postcopy-vcpu-blocktime": [round(t / NS_PER_MS, 3)
                                              for t in self.vcpu_blocktime_ns]}
        failed = {}
        if self.status == "failed":
            failed = {"error-desc": self.error, "source-guest": {
                "resumed": self.source_resumed, "send-cancel": self.send_cancel,
                "guest-lost": self.guest_lost,
                "check": self.source_check}}
        return {
            "status": self.status,
            **failed,
            "total-time": round(total_ms, 3),
            "setup-time": round(self.setup_ns / NS_PER_MS, 3),
            "downtime": round(self.downtime_ns / NS_PER_MS, 3),
            "ram": ram,
            **pc,
            "sev": {
                "path": self.path,
                "converged": self.converged,
                "iterations": len(self.iterations),
                "private-pages": self.private_pages,
                "shared-pages": self.shared_pages,
                "zero-pages": self.zero_pages,
                "psp-commands": dict(sorted(self.psp_commands.items())),
                "helper-packets": self.helper_packets,
                "helper-requests": self.helper_requests,
                "guest-ticks": self.guest_ticks,
                "guest-pages-written": self.guest_pages_written,
                "verified-pages": self.verified_pages,
                "bad-pages": self.bad_pages,
                "time-spent-ms": {k: round(v / NS_PER_MS, 3)
                                  for k, v in sorted(self.time_spent.items())},
                "target-time-spent-ms": {k: round(v / NS_PER_MS, 3)
                                         for k, v in sorted(self.target_time_spent.items())},
                "wall-time-s": round(self.wall_s, 3),
                **({"error": self.error} if self.error else {}),
                **({"postcopy": self._postcopy_view()} if self.postcopy else {}),
            },
        }

    def _postcopy_view(self):
        """The guest's side of post-copy: when it ran again, the pages it waited for against
        those pushed, and each vCPU's faults and stopped time."""
        return {"after-passes": self.postcopy_after,
                "start-ms": round(self.postcopy_start_ns / NS_PER_MS, 3),
                "pages-owed": self.pages_owed, "pages-on-demand": self.pages_on_demand,
                "pages-pushed": self.pages_pushed, "pages-resent": self.pages_resent,
                "resumes": self.postcopy_resumes, "vcpu-faults": list(self.vcpu_faults),
                "vcpu-stopped-ms": [round(t / NS_PER_MS, 3) for t in self.vcpu_blocktime_ns]}

    def to_dict(self):
        """Everything, JSON-ready: QEMU's view plus the per-iteration record and the model."""
        d = self.query_migrate()
        d["iterations"] = [it.to_dict() for it in self.iterations]
        d["cost-model"] = self.cost_model
        return d
