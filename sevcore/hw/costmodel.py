"""The declared cost model: simulated time for every modelled hardware cost.

Everything sevcore does is computed for real and can be timed in wall time by ``bench/``. Apart
from that, each Host has a ``SimClock`` (``host.clock``) of simulated nanoseconds, and a
``CostModel`` says how far each modelled hardware operation advances it: a PSP command, a batch of
ring-buffer commands, an exit to user space and back, the migration helper sealing pages in the
guest, bytes on the network, a dirty-log sync, a host memory copy. Each charge adds to one
category of the clock, so a migration can report where its simulated time went.

>>> from sevcore.hw.clock import SimClock
>>> from sevcore.hw.costmodel import CostModel
>>> cost, clock = CostModel(), SimClock()
>>> cost.psp_command(clock, 4096)        # one SEND_UPDATE_DATA of a page: latency + bytes
562000.0
>>> clock.spent
{'psp': 562000.0}
>>> CostModel.from_overrides(["helper_vcpus=4", "link_bytes_per_s=3.125e9"]).helper_vcpus
4

Every parameter has a default whose source is in its ``doc`` (``CostModel.describe()`` lists
them); where no public figure exists the doc says it is an assumption. docs/costmodel.md has the
same table and the reasoning behind it.
"""
import dataclasses
import difflib
import math
from dataclasses import dataclass, field

from sevcore.hw.clock import SimClock  # noqa: F401  (re-exported: the clock the model charges)

PAGE_SIZE = 4096
NS_PER_S = 1e9


def _param(default, doc, *, unit, minimum=0, integer=False, positive=False):
    return field(default=default, metadata={"doc": doc, "unit": unit, "min": minimum,
                                            "integer": integer, "positive": positive})


class CostModelError(ValueError):
    """An override names an unknown parameter or gives it a value it cannot take."""


@dataclass(frozen=True)
class CostModel:
    """The parameters of simulated time, with their sources. Immutable: use ``replace``,
    ``from_overrides`` for changed copies. Raises CostModelError for a value out of range."""

    psp_command_latency_ns: float = _param(
        50_000.0,
        "Fixed cost of one PSP mailbox command (doorbell, firmware dispatch, completion "
        "interrupt, the driver's wake-up), on top of its per-byte cost. ASSUMPTION: no per-command "
        "latency is published (none was found; docs/sources.md); OpenAnolis bug 8572 "
        "only says the x86-PSP communication is 'time-consuming', which motivated ring-buffer mode.",
        unit="ns")
    psp_bytes_per_s: float = _param(
        8e6,
        "PSP data rate of a guest-data command. Source: ~8 MB/s for LAUNCH_UPDATE_DATA, the only "
        "published PSP bulk rate (enarx-keepldr PR #252; PR #248: +32 MiB cost ~4 s). "
        "ASSUMPTION: SEND_UPDATE_DATA and RECEIVE_UPDATE_DATA (AES-CTR + HMAC instead "
        "of the launch's software SHA-256) run at the same rate.",
        unit="B/s", positive=True)
    psp_ring_entries: int = _param(
        256,
        "Commands per ring-buffer queue: one 4 KiB page of 16-byte entries (AMD-ASPFW "
        "sev_ring_buffer.h; sevcore.psp.ring.ENTRIES). A batch pays the mailbox latency once per "
        "queue-full.",
        unit="commands", minimum=1, integer=True)
    psp_ring_entry_ns: float = _param(
        5_000.0,
        "Firmware cost of taking one entry from a ring-buffer queue (read the entry, dispatch, "
        "write its status). ASSUMPTION: no figure is published; chosen well below the mailbox "
        "latency, as the point of ring-buffer mode is that it is cheaper.",
        unit="ns")
    exit_roundtrip_ns: float = _param(
        2_000.0,
        "One exit to user space and back (KVM_EXIT_HYPERCALL, KVM_EXIT_X86_WRMSR ...). Source for "
        "the kernel part: a KVM_RUN ioctl from entry to exit measured at ~2,528 TSC cycles on SVM "
        "(~1 us; M. Roth, 'KVM: SVM: use vmsave/vmload for saving/restoring additional host "
        "state', LKML 2020-12, lkml.iu.edu/hypermail/linux/kernel/2012.2/00527.html). "
        "ASSUMPTION: another ~1 us for the VMM's handling and the guest side.",
        unit="ns")
    helper_aead_bytes_per_s: float = _param(
        625_000.0 * PAGE_SIZE,
        "Rate at which one helper vCPU seals (or opens) pages in the guest. ASSUMPTION: the "
        "helper uses the SEV packet crypto (AES-128-CTR + HMAC-SHA256) at the rate sevcore.core.sevpkt "
        "measured on one core of the project's machine: 615-645 k pages/s (README performance "
        "table), i.e. 625 k pages/s = 2.56 GB/s.",
        unit="B/s", positive=True)
    helper_vcpus: int = _param(
        1,
        "Helper vCPUs sealing pages in parallel (page-granular split). ASSUMPTION: one, as in the "
        "OVMF migration-handler RFCs (one auxiliary vCPU in a mirror VM).",
        unit="vCPUs", minimum=1, integer=True)
    link_bytes_per_s: float = _param(
        1.25e9,
        "Network link between the hosts. ASSUMPTION: 10 Gbit/s Ethernet.",
        unit="B/s", positive=True)
    max_bandwidth: float = _param(
        float(128 << 20),
        "QEMU's migration max-bandwidth default: MAX_THROTTLE = 128 MiB/s (QEMU "
        "migration/options.c). The stream goes at min(link, max_bandwidth).",
        unit="B/s", positive=True)
    downtime_limit_ms: float = _param(
        300.0,
        "QEMU's downtime-limit default: DEFAULT_MIGRATE_SET_DOWNTIME = 300 ms (QEMU "
        "migration/options.c). Used by the engine to decide when to stop and copy.",
        unit="ms")
    dirty_pages_per_s: float = _param(
        2_500.0,
        "Pages the running guest dirties per second of simulated time. ASSUMPTION: a lightly "
        "loaded guest, 10 MB/s; a workload parameter, meant to be overridden.",
        unit="pages/s")
    dirty_sync_ns_per_gib: float = _param(
        3_460_000.0 / 1024,
        "Harvest-and-clear of the dirty bitmap (KVM_GET_DIRTY_LOG) per GiB of guest. Source: C "
        "AVX-512 harvest-and-clear of a 32 MiB bitmap (a 1 TiB guest) at 0.1% density: 3.46 ms "
        "on an AMD EPYC Zen 4 core (bench/bench_bitmap.py, harvest 0.1%), scaled linearly.",
        unit="ns/GiB")
    host_copy_bytes_per_s: float = _param(
        12.5e9,
        "Host memory copy (the VMM reading shared pages through its HVA into the stream). Source: "
        "glibc memcpy of 256 MiB, 12.5 GB/s copied, measured on an AMD EPYC Zen 4 core (DDR5).",
        unit="B/s", positive=True)

    network_latency_ns: float = _param(
        15_000.0,
        "One-way network latency between the hosts, charged to a post-copy page request (out "
        "and back). Source: the KVM Userfault series' cover letter (J. Houghton, kvm@vger, "
        "2024-25) cites ~30 us network latency for a PAGE_SIZE demand fetch in post-copy at "
        "scale: half of it each way.",
        unit="ns")

    def __post_init__(self):
        for f in dataclasses.fields(self):
            object.__setattr__(self, f.name, _check(f, getattr(self, f.name)))

    # -- overrides ----------------------------------------------------------------------------------

    @classmethod
    def parameters(cls):
        """Names of all parameters, in declaration order."""
        return [f.name for f in dataclasses.fields(cls)]

    def replace(self, **changes):
        """A copy with ``changes`` applied; raises CostModelError for unknown names or bad values."""
        return self.from_overrides(changes, base=self)

    @classmethod
    def from_overrides(cls, overrides=(), base=None):
        """A model from ``base`` (default: the defaults) with ``overrides`` applied: a mapping, or
        CLI-style ``"key=value"`` strings. Values may be numbers or numeric strings ("8e6",
        "128_000"). Raises CostModelError naming the key for an unknown key (with the nearest
        known names), a malformed item, or a value that is not a number or is out of range."""
        base = cls() if base is None else base
        items = overrides.items() if hasattr(overrides, "items") else map(_split, overrides)
        fields = {f.name: f for f in dataclasses.fields(cls)}
        changes = {}
        for key, value in items:
            if key not in fields:
                near = difflib.get_close_matches(key, fields, n=3)
                hint = f"; did you mean {', '.join(near)}?" if near else ""
                raise CostModelError(f"unknown cost-model parameter {key!r}{hint}")
            changes[key] = _check(fields[key], value)
        return dataclasses.replace(base, **changes)

    def describe(self):
        """Rows of ``(name, value, unit, doc)`` for every parameter, for reports and docs."""
        return [(f.name, getattr(self, f.name), f.metadata["unit"], f.metadata["doc"])
                for f in dataclasses.fields(self)]

    # -- derived rates ------------------------------------------------------------------------------

    @property
    def network_bytes_per_s(self):
        """The rate the stream gets: the link, capped by QEMU's max-bandwidth."""
        return min(self.link_bytes_per_s, self.max_bandwidth)

    # -- charges: each advances ``clock`` and returns the nanoseconds charged ---------------------------

    def psp_command(self, clock, nbytes=0):
        """One mailbox command moving ``nbytes`` of guest data: latency + nbytes at the PSP rate.
        The PSP runs one command at a time, so charges never overlap on a clock."""
        _count(nbytes, "nbytes")
        return clock.advance(self.psp_command_latency_ns + nbytes * NS_PER_S / self.psp_bytes_per_s,
                             "psp")

    def psp_commands(self, clock, ncommands, nbytes_each=0):
        """``ncommands`` mailbox commands one after another, each moving ``nbytes_each``: the
        same as that many :meth:`psp_command` charges, in one step."""
        _count(ncommands, "ncommands")
        _count(nbytes_each, "nbytes_each")
        return clock.advance(ncommands * (self.psp_command_latency_ns
                                          + nbytes_each * NS_PER_S / self.psp_bytes_per_s),
                             "psp")

    def psp_batch(self, clock, ncommands, nbytes=0):
        """``ncommands`` commands through ring-buffer mode moving ``nbytes`` in all: the mailbox
        latency once per queue of ``psp_ring_entries``, ``psp_ring_entry_ns`` per command, and the
        bytes at the PSP rate. Zero commands cost nothing."""
        _count(ncommands, "ncommands")
        _count(nbytes, "nbytes")
        if ncommands == 0:
            if nbytes:
                raise ValueError("a batch of 0 commands cannot move data")
            return clock.advance(0.0, "psp")
        queues = -(-ncommands // self.psp_ring_entries)
        return clock.advance(queues * self.psp_command_latency_ns
                             + ncommands * self.psp_ring_entry_ns
                             + nbytes * NS_PER_S / self.psp_bytes_per_s, "psp")

    def exit_roundtrip(self, clock, n=1):
        """``n`` exits to user space and back (hypercall or MSR exits)."""
        _count(n, "n")
        return clock.advance(n * self.exit_roundtrip_ns, "exit")

    def helper_seal(self, clock, npages, vcpus=None):
        """The helper sealing ``npages`` pages on ``vcpus`` vCPUs (default ``helper_vcpus``): pages
        are split whole among the vCPUs, so the time is ceil(npages / vcpus) pages at the
        per-vCPU rate."""
        return clock.advance(self._helper_ns(npages, vcpus), "helper")

    def helper_open(self, clock, npages, vcpus=None):
        """The target's helper opening ``npages`` pages; same rate as sealing."""
        return clock.advance(self._helper_ns(npages, vcpus), "helper")

    def _helper_ns(self, npages, vcpus):
        _count(npages, "npages")
        vcpus = self.helper_vcpus if vcpus is None else vcpus
        if isinstance(vcpus, bool) or not isinstance(vcpus, int) or vcpus < 1:
            raise ValueError(f"vcpus must be an int >= 1, not {vcpus!r}")
        return -(-npages // vcpus) * PAGE_SIZE * NS_PER_S / self.helper_aead_bytes_per_s

    def network(self, clock, nbytes):
        """``nbytes`` on the wire at min(link, max_bandwidth)."""
        _count(nbytes, "nbytes")
        return clock.advance(nbytes * NS_PER_S / self.network_bytes_per_s, "network")

    def dirty_sync(self, clock, guest_size):
        """One dirty-log harvest over a guest of ``guest_size`` bytes."""
        _count(guest_size, "guest_size")
        return clock.advance(guest_size / (1 << 30) * self.dirty_sync_ns_per_gib, "dirty_sync")

    def host_copy(self, clock, nbytes):
        """The host copying ``nbytes`` (shared pages into the stream buffer)."""
        _count(nbytes, "nbytes")
        return clock.advance(nbytes * NS_PER_S / self.host_copy_bytes_per_s, "copy")

    def pages_dirtied(self, interval_ns):
        """Pages the guest dirties in ``interval_ns`` of simulated time (a real number: the
        engine decides how to round)."""
        if not interval_ns >= 0:
            raise ValueError(f"interval_ns must be >= 0, not {interval_ns!r}")
        return self.dirty_pages_per_s * interval_ns / NS_PER_S


def _split(item):
    if not isinstance(item, str) or "=" not in item:
        raise CostModelError(f"cost-model override {item!r} is not of the form key=value")
    key, _, value = item.partition("=")
    return key.strip(), value.strip()


def _check(f, value):
    """Parse and range-check one parameter value against its field's metadata."""
    md, name = f.metadata, f.name
    if isinstance(value, bool):
        raise CostModelError(f"{name}: expected a number, got {value!r}")
    if isinstance(value, str):
        try:
            value = float(value.replace("_", ""))
        except ValueError:
            raise CostModelError(f"{name}: expected a number, got {value!r}") from None
    if not isinstance(value, (int, float)):
        raise CostModelError(f"{name}: expected a number, got {type(value).__name__} {value!r}")
    if not math.isfinite(value):
        raise CostModelError(f"{name}: must be finite, got {value!r}")
    if md["integer"]:
        if value != int(value):
            raise CostModelError(f"{name}: must be a whole number of {md['unit']}, got {value!r}")
        value = int(value)
    else:
        value = float(value)
    if md["positive"] and value <= 0:
        raise CostModelError(f"{name}: must be > 0 {md['unit']}, got {value!r}")
    if value < md["min"]:
        raise CostModelError(f"{name}: must be >= {md['min']} {md['unit']}, got {value!r}")
    return value


def _count(n, what):
    if isinstance(n, bool) or not isinstance(n, int) or n < 0:
        raise ValueError(f"{what} must be an int >= 0, not {n!r}")
