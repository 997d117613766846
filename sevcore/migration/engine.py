"""The live-migration engine: pre-copy of an SEV guest from a source Host to a target Host.

:class:`Source` and :class:`Target` are the two VMMs' migration code; they talk through a
channel (in process, or TCP between two processes). Forward, the source writes the migration
stream (docs/migration-stream.md); back, the target answers with a stream of its own carrying
JSON messages (SETUP records): its certificate chain, READY when every page is in, ERROR, and
RESUMED with the guest's own check of its memory.

The order of one migration (docs/migration.md has the reasoning)::

    source                                        target
    refuse unless KVM_MIGRATION_READY
    SETUP {guest, params}                   ->    create the VM (KVM_SEV_INIT2), memory, vCPUs
                                            <-    HELLO {PDH, platform and AMD certificates}
    KVM_SEV_SEND_START (target's chain)
    SEV_SESSION {policy, source PDH, session} ->   KVM_SEV_RECEIVE_START
    ITERATION 0, every page                 ->    RECEIVE_UPDATE_DATA / helper OPEN / copy
    ITERATION k, the pages dirtied since    ->    ...
    (downtime estimate <= limit, or the iteration limit)
    ITERATION STOP: the guest is paused; the last dirty pages, shared ranges, vCPU states
    SETUP {complete}                        ->
                                            <-    READY
    KVM_SEV_SEND_FINISH (never runs again)
    END                                     ->    KVM_SEV_RECEIVE_FINISH, the guest runs
                                            <-    RESUMED {pages checked, bad}

Until SEND_FINISH any failure on either side, the target going away included, ends with
KVM_SEV_SEND_CANCEL on the source: its guest is RUNNING again with its memory unchanged.

Two kinds of time: everything is computed for real (wall time), and each modelled hardware cost
advances simulated time by :class:`sevcore.hw.costmodel.CostModel`. The source keeps the timeline:
its Host's clock, plus a network stage and a target stage in a three-stage pipeline with one
batch in flight between stages, so the slowest stage sets the pace. The guest reads its TSC from
the source clock, so it dirties pages at its rate of simulated time.
"""
import threading
import time
from dataclasses import dataclass, field

import numpy as np

from sevcore import uapi as U
from sevcore.core.arrays import runs
from sevcore.core.bitmap import Bitmap
from sevcore.hw.costmodel import CostModel, SimClock
from sevcore.hw.hostmem import PAGE_SIZE
from sevcore.migration import stream as S
from sevcore.migration.errors import PeerClosed, StreamError, StreamTruncated
from sevcore.migration.helper import PACKET_SIZE, HelperPacketError, MigrationHelper
from sevcore.migration.machine import SLOT, GuestError, Machine
from sevcore.migration.stats import IterationStats, MigrationStats
from sevcore.migration.transport import inprocess_pair
from sevcore.migration.workload import GuestConfig

PATHS = ("psp", "helper")
SEV_PACKET_HEADER = 52
#: Stream bytes of one ENCRYPTED_PAGE record: the downtime estimate's per-page size before any
#: page has been measured.
ENCRYPTED_PAGE_BYTES = 4180


class MigrationError(RuntimeError):
    """A migration did not complete. The source guest runs on, unchanged (after SEND_CANCEL if
    SEND_START had succeeded). ``stats`` holds what was measured up to the failure."""

    def __init__(self, message, stats=None):
        super().__init__(message)
        self.stats = stats


class NotMigrationReady(MigrationError):
    """The guest has not set KVM_MIGRATION_READY in MSR_KVM_MIGRATION_CONTROL."""


class TargetFailed(MigrationError):
    """The target refused the stream or failed while applying it (its message is included)."""


@dataclass(frozen=True)
class MigrationParams:
    """How to migrate. ``path``: ``psp`` (every private page through SEND/RECEIVE_UPDATE_DATA)
    or ``helper`` (an in-guest migration helper in a mirror VM). ``ring_buffer``: charge PSP
    page commands as ring-buffer batches instead of one mailbox command each (QEMU's series
    issues one KVM_SEV_SEND_UPDATE_DATA per page). ``max_iterations``: pre-copy passes before
    stop-and-copy is forced (then ``converged`` is False). ``batch_pages``: pages per batch.
    ``guest_runs``: times the guest runs per pass (at least once)."""
    path: str = "psp"
    cost: CostModel = field(default_factory=CostModel)
    max_iterations: int = 30
    ring_buffer: bool = False
    batch_pages: int = 256
    guest_runs: int = 64
    timeout_s: float = 60.0

    def __post_init__(self):
        if self.path not in PATHS:
            raise ValueError(f"path must be one of {PATHS}, not {self.path!r}")
        if self.max_iterations < 1 or self.batch_pages < 1 or self.guest_runs < 1:
            raise ValueError("max_iterations, batch_pages and guest_runs must be >= 1")

    def to_dict(self):
        return {"path": self.path, "max_iterations": self.max_iterations,
                "ring_buffer": self.ring_buffer, "batch_pages": self.batch_pages,
                "guest_runs": self.guest_runs,
                "cost": {name: value for name, value, _, _ in self.cost.describe()}}

    @classmethod
    def from_dict(cls, d):
        return cls(path=d["path"], cost=CostModel.from_overrides(d["cost"]),
                   max_iterations=d["max_iterations"], ring_buffer=d["ring_buffer"],
                   batch_pages=d["batch_pages"], guest_runs=d["guest_runs"])


# -- costs common to both ends ---------------------------------------------------------------------

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


def _message(reader, what):
    """The next back-channel message (a SETUP record's JSON), checking its kind."""
    rec = reader.read()
    if not isinstance(rec, S.Setup):
        raise StreamError(f"expected a {what} message from the peer, got "
                          f"{type(rec).__name__ if rec else 'the end of the stream'}")
    kind = rec.params.get("kind")
    if kind == "error":
        raise TargetFailed(f"target: {rec.params.get('message', 'unknown error')}")
    if kind != what:
        raise StreamError(f"expected a {what} message from the peer, got {kind!r}")
    return rec.params


def _dirty_gfns(vm, npages):
    """KVM_GET_DIRTY_LOG of the guest's slot, as sorted gfns (the log is cleared)."""
    return Bitmap.from_words(vm.get_dirty_log(SLOT), npages).set_indices()


# -- both ends ---------------------------------------------------------------------------------------

class _End:
    """What the source and the target tear down alike: the migration helper and the channel."""
    helper = None

    def _close_helper(self):
        if self.helper is not None:
            self.helper.close()
            self.helper = None

    def _close(self):
        """Close the helper and the channel (telling the peer we are gone)."""
        self._close_helper()
        try:
            self.channel.close()
        except OSError:
            pass


# -- the source ------------------------------------------------------------------------------------

class Source(_End):
    """The source VMM's migration of ``machine`` over ``channel``."""

    def __init__(self, machine, channel, params=MigrationParams(), progress=None):
        self.m, self.channel, self.params = machine, channel, params
        self.cost = params.cost
        self.progress = progress
        self.vm, self.kvm = machine.vm, machine.kvm
        self.stats = MigrationStats(params.path, guest_pages=machine.npages,
                                    cost_model=params.to_dict()["cost"])
        self.samples = []            # (simulated ns, pages still to send, iteration)
        self.layout = machine.config.helper_layout
        self._sent_start = False
        self._logging = False

    # -- driver ----------------------------------------------------------------------------------

    def run(self):
        """Migrate; returns MigrationStats (status ``completed``). Raises MigrationError (with
        ``.stats``) after cancelling, with the source guest running and unchanged."""
        wall0 = time.perf_counter()
        st = self.stats
        self.t0 = self.m.host.clock.now_ns
        try:
            if self.params.path == "helper" and self.layout is None:
                raise MigrationError("the helper path needs a guest booted with a migration "
                                     "helper (GuestConfig.helper_vcpus >= 1)")
            if not self.m.tracker.migration_ready:
                raise NotMigrationReady("the guest has not set KVM_MIGRATION_READY in "
                                        "MSR_KVM_MIGRATION_CONTROL: refusing to migrate")
            self._setup()
            self._precopy()
            self._stop_and_copy()
            st.status = "completed"
        except BaseException as e:
            if isinstance(e, (PeerClosed, StreamTruncated)):
                e = self._target_error() or e       # the target's reason, if it gave one
            st.status = "failed"
            st.error = f"{type(e).__name__}: {e}"
            self._abort()
            if isinstance(e, MigrationError):
                e.stats = st
                raise e
            if isinstance(e, (StreamError, OSError, GuestError, ValueError,
                              HelperPacketError)):
                raise MigrationError(f"migration failed: {st.error}", st) from e
            raise
        finally:
            st.wall_s = time.perf_counter() - wall0
            st.time_spent = dict(self.m.host.clock.spent)
            st.guest_ticks = self.m.ticks
        self._resumed()
        return st

    def _target_error(self):
        """After the target closed: the TargetFailed its ERROR message describes, if it sent
        one before closing (reading stops at the end of its stream)."""
        reader = getattr(self, "reader", None)
        try:
            while reader is not None and (rec := reader.read()) is not None:
                if isinstance(rec, S.Setup) and rec.params.get("kind") == "error":
                    return TargetFailed(f"target: {rec.params.get('message', '')}")
        except (StreamError, OSError, ValueError):
            pass
        return None

    def _abort(self):
        """Undo what the source did: SEND_CANCEL (the guest is RUNNING again), logging off, the
        channel closed so that the target stops too."""
        if self._sent_start:
            try:
                self.vm.memory_encrypt_op(U.KVM_SEV_SEND_CANCEL)
                self.stats.count_psp("SEND_CANCEL")
                self.stats.status = "cancelled"
            except OSError:
                pass
            self._sent_start = False
        if self._logging:
            self._set_logging(False)
        self._close()

    def _set_logging(self, on):
        m = self.m
        self.vm.set_user_memory_region2(SLOT, U.KVM_MEM_LOG_DIRTY_PAGES if on else 0, 0,
                                        m.config.mem_size, m.hva)
        self._logging = on

    # -- setup ------------------------------------------------------------------------------------------

    def _setup(self):
        m, p = self.m, self.params
        self.writer = S.StreamWriter(self.channel, S.FLAG_ENCRYPTED |
                                     (S.FLAG_HELPER if p.path == "helper" else 0))
        self.reader = S.StreamReader(self.channel)
        self.tl = Timeline(self.cost, m.host.clock)
        self.writer.setup({"kind": "migrate", "guest": m.config.to_dict(),
                           "params": p.to_dict()})
        self.writer.flush()
        hello = _message(self.reader, "hello")
        self.tl.control(self.writer.stats.transferred)
        pdh, plat, amd = (bytes.fromhex(hello[k]) for k in ("pdh", "plat_certs", "amd_certs"))
        out = self._send_start(pdh, plat, amd)
        self._sent_start = True
        src_pdh = m.host.psp.export_cert_chain().pdh
        self.writer.sev_session(out.policy, src_pdh, self._session)
        self.tl.batch(lambda c: 0, S.FRAME_OVERHEAD + 12 + len(src_pdh) + len(self._session),
                      lambda c: self.cost.psp_command(c, 0))       # RECEIVE_START
        self.stats.count_psp("RECEIVE_START")
        if p.path == "helper":
            self.helper = MigrationHelper(self.vm, self.layout, m.config.helper_vcpus)
            self._send_psp(self.layout.private_gfns())     # the key, before any packet
        self._set_logging(True)
        self.stats.setup_ns = self.m.host.clock.now_ns - self.t0

    def _send_start(self, pdh, plat, amd):
        kvm = self.kvm
        args = {}
        for name, blob in (("pdh_cert", pdh), ("plat_certs", plat), ("amd_certs", amd)):
            hva = kvm.mmap(max(PAGE_SIZE, len(blob)))
            kvm.write(hva, blob)
            args[name + "_uaddr"], args[name + "_len"] = hva, len(blob)
        session = kvm.mmap(PAGE_SIZE)
        out = self.vm.memory_encrypt_op(U.KVM_SEV_SEND_START, session_uaddr=session,
                                        session_len=128, **args)
        self.cost.psp_command(self.m.host.clock, 0)
        self.stats.count_psp("SEND_START")
        self._session = kvm.read(session, out.session_len)
        return out

    # -- pre-copy ---------------------------------------------------------------------------------------

    @property
    def _end_gfn(self):
        """Pages the passes cover: all but the helper's (its shared pages are transient, its
        private ones go by the PSP at the start and the end)."""
        return self.m.npages if self.layout is None else self.layout.first_gfn

    def _all_gfns(self):
        return np.arange(self._end_gfn, dtype=np.uint64)

    def _precopy(self):
        p, st = self.params, self.stats
        dirty = self._all_gfns()
        self._shared_mask = self._shared_now()
        k = 0
        while True:
            self._send_pass(k, dirty, stop=False)
            dirty = self._sync()
            it = st.iterations[-1]
            it.dirty_after = len(dirty)
            secs = (it.end_ns - it.start_ns) / 1e9
            bandwidth = it.bytes / secs if secs > 0 else float("inf")
            per_page = it.bytes / it.pages if it.pages else ENCRYPTED_PAGE_BYTES
            expected_ns = len(dirty) * per_page / bandwidth * 1e9 if len(dirty) else 0.0
            it.expected_downtime_ms = expected_ns / 1e6
            if expected_ns <= p.cost.downtime_limit_ms * 1e6:
                st.converged = True
                break
            k += 1
            if k >= p.max_iterations:
                break
        self._final_dirty = dirty

    def _shared_now(self):
        return self.m.tracker.shared.contains_array(np.arange(self.m.npages))

    def _sync(self):
        """A dirty-log sync: the dirtied gfns, plus pages whose shared/private state changed."""
        m = self.m
        self.cost.dirty_sync(m.host.clock, m.config.mem_size)
        self.stats.dirty_sync_count += 1
        dirty = _dirty_gfns(self.vm, m.npages)
        dirty = dirty[dirty < self._end_gfn]
        now = self._shared_now()
        changed = np.flatnonzero(now[:self._end_gfn] != self._shared_mask[:self._end_gfn])
        changed = changed.astype(np.uint64)
        self._shared_mask = now
        if len(changed):
            dirty = np.union1d(dirty, changed)
        return dirty

    def _send_pass(self, k, gfns, stop):
        p, st, m = self.params, self.stats, self.m
        it = IterationStats(k, m.host.clock.now_ns, pages=len(gfns), stop=stop)
        st.iterations.append(it)
        bytes0 = self.writer.stats.transferred
        self.writer.iteration(k, len(gfns), stop=stop)
        self.tl.control(S.FRAME_OVERHEAD + 16)
        nb = -(-len(gfns) // p.batch_pages)
        every = max(1, -(-nb // p.guest_runs))
        for b in range(nb):
            batch = gfns[b * p.batch_pages:(b + 1) * p.batch_pages]
            self._send_batch(batch, it)
            self.samples.append((m.host.clock.now_ns - self.t0,
                                 max(0, len(gfns) - (b + 1) * p.batch_pages), k))
            if not stop and (b + 1) % every == 0:
                self._guest_tick()
            if self.progress:
                self.progress({"phase": "stop" if stop else "precopy", "iteration": k,
                               "pages": len(gfns), "sent": min(len(gfns),
                                                               (b + 1) * p.batch_pages),
                               "sim_ms": (m.host.clock.now_ns - self.t0) / 1e6})
        if not stop and (nb == 0 or nb % every):
            self._guest_tick()              # the guest runs at least once per pass, at its end
        self.writer.flush()
        if stop:
            self.tl.drain()
        it.end_ns = m.host.clock.now_ns
        it.bytes = self.writer.stats.transferred - bytes0

    def _guest_tick(self):
        self.stats.guest_pages_written += self.m.tick()

    def _send_batch(self, gfns, it):
        shared = self._shared_mask[gfns]
        private = gfns[~shared]
        if len(private):
            self._send_private(private)
            it.private_pages += len(private)
            self.stats.private_pages += len(private)
        if shared.any():
            self._send_shared(gfns[shared], it)

    def _send_private(self, gfns):
        if self.helper is not None:
            self._send_helper(gfns)
        else:
            self._send_psp(gfns)

    def _send_helper(self, gfns):
        """The helper path: the helper seals the pages in the guest, straight into the
        HELPER_PAGES records' packet columns."""
        n, h = len(gfns), self.helper
        exits0 = h.counters.exits

        def fill(lo, k, seqs, packets):
            h.seal(gfns[lo:lo + k], packets=packets, seqs=seqs)
        nbytes = self._written(lambda w: w.helper_batch_fill(gfns, fill, PACKET_SIZE))
        exits = h.counters.exits - exits0
        self.stats.helper_requests = h.counters.requests
        vcpus = self.m.config.helper_vcpus
        self.tl.batch(lambda c: charge_helper_pages(self.cost, c, n, vcpus, exits), nbytes,
                      lambda c: charge_helper_pages(self.cost, c, n, vcpus, exits))
        self.stats.helper_packets += n

    def _send_psp(self, gfns):
        """The PSP path: KVM_SEV_SEND_UPDATE_DATA of each page (the batched form, the same as
        one ioctl per page), its packets written straight into the ENCRYPTED_PAGES records'
        columns, QEMU's bytes per page."""
        n, hvas = len(gfns), self.m.gfn_hvas(gfns)

        def fill(lo, k, hdrs, trans):
            self.vm.sev_send_update_data_pages(hvas[lo:lo + k], out=(hdrs, trans))
        nbytes = self._written(lambda w: w.encrypted_batch_fill(gfns, fill, SEV_PACKET_HEADER,
                                                                   PAGE_SIZE))
        ring = self.params.ring_buffer
        self.tl.batch(lambda c: charge_psp_pages(self.cost, c, n, ring), nbytes,
                      lambda c: charge_psp_pages(self.cost, c, n, ring))
        self.stats.count_psp("SEND_UPDATE_DATA", n)
        self.stats.count_psp("RECEIVE_UPDATE_DATA", n)

    def _written(self, write):
        """Run ``write(writer)``; the stream bytes it produced."""
        before = self.writer.stats.transferred
        write(self.writer)
        return self.writer.stats.transferred - before

    def _send_shared(self, gfns, it):
        """Shared pages in plaintext from the VMM's mapping; runs of zero pages as
        ZERO_PAGES (QEMU's duplicate pages)."""
        data = self.kvm.read_pages(self.m.gfn_hvas(gfns))
        zero = ~data.any(axis=1)
        n, nz = len(gfns), int(zero.sum())

        def write(w):
            if nz:
                zg = gfns[zero]
                for i, k in runs(zg):
                    w.zero_pages(int(zg[i]), k)
            if nz < n:
                w.shared_batch(gfns[~zero], data[~zero])
        nbytes = self._written(write)
        self.tl.batch(lambda c: charge_shared_pages(self.cost, c, n), nbytes,
                      lambda c: charge_shared_pages(self.cost, c, n))
        it.shared_pages += n
        self.stats.shared_pages += n - nz
        self.stats.zero_pages += nz

    # -- stop and copy ----------------------------------------------------------------------------------

    def _stop_and_copy(self):
        m, st = self.m, self.stats
        self._guest_tick()                      # the guest runs up to the moment it stops
        stop_ns = m.host.clock.now_ns
        dirty = np.union1d(self._final_dirty, self._sync())
        self._send_pass(len(st.iterations), dirty, stop=True)
        if self.helper is not None:
            self._send_psp(self.layout.private_gfns())     # the state, after the last packet
            self.tl.drain()
        self.writer.setup({"kind": "shared_ranges",
                           "ranges": [list(r) for r in m.tracker.shared_ranges(0, m.npages)]})
        for vcpu in m.vcpus:
            self.writer.vcpu_state(vcpu.vcpu_id, m.vcpu_state(vcpu))
        self.writer.setup({"kind": "complete"})
        self.writer.flush()
        self.tl.control(0)
        ready = _message(self.reader, "ready")
        self.tl.drain()
        self.vm.memory_encrypt_op(U.KVM_SEV_SEND_FINISH)
        self._sent_start = False
        self.cost.psp_command(m.host.clock, 0)
        st.count_psp("SEND_FINISH")
        self._set_logging(False)
        self._close_helper()
        self.writer.end()
        self.tl.target_work(lambda c: self.cost.psp_command(c, 0))      # RECEIVE_FINISH
        st.count_psp("RECEIVE_FINISH")
        end_ns = m.host.clock.now_ns
        st.downtime_ns = end_ns - stop_ns
        st.total_ns = end_ns - self.t0
        st.remaining = 0
        st.stream = self.writer.stats.qemu()
        st.target_time_spent = dict(ready.get("time_spent", {}))
        if st.guest_pages_written and st.total_ns:
            st.dirty_pages_rate = st.guest_pages_written / (st.total_ns / 1e9)

    def _resumed(self):
        """The target's report of its guest's own memory check (best effort: the migration has
        completed whatever this says)."""
        try:
            r = _message(self.reader, "resumed")
        except (StreamError, MigrationError, OSError):
            return
        self.stats.verified_pages = int(r["checked"])
        self.stats.bad_pages = int(r["bad"])


# -- the target ------------------------------------------------------------------------------------

class Target(_End):
    """The target VMM: builds the incoming guest on ``kvm``'s Host from the stream on
    ``channel``. :meth:`run` returns the running :class:`Machine`."""

    def __init__(self, kvm, channel):
        self.kvm, self.channel = kvm, channel
        self.m = None
        self.result = None
        self._pending = []

    def run(self):
        """Receive, apply, finish and resume; raises on any failure after telling the source
        (ERROR) and destroying the incoming VM."""
        self.reader = S.StreamReader(self.channel, reuse=True)    # each record is used at once
        self.writer = S.StreamWriter(self.channel)
        try:
            self._receive()
        except BaseException as e:
            self._fail(e)
            raise
        return self.m

    def _fail(self, e):
        try:
            self.writer.setup({"kind": "error", "message": f"{type(e).__name__}: {e}"})
            self.writer.flush()
        except (StreamError, OSError):
            pass
        self._close()                       # the helper's mirror goes before its owner VM
        if self.m is not None:
            self.m.vm.close()

    def _reply(self, kind, **fields):
        self.writer.setup({"kind": kind, **fields})
        self.writer.flush()

    def _receive(self):
        kvm = self.kvm
        rec = self.reader.read()
        if not isinstance(rec, S.Setup) or rec.params.get("kind") != "migrate":
            raise StreamError("the stream does not start with the migration's SETUP")
        cfg = GuestConfig.from_dict(rec.params["guest"])
        self.params = MigrationParams.from_dict(rec.params["params"])
        self.cost = self.params.cost
        self.clock = kvm.host.clock
        self.m = m = Machine.incoming(kvm, cfg)
        chain = kvm.host.psp.export_cert_chain()
        self._reply("hello", pdh=chain.pdh.hex(), plat_certs=chain.plat_certs.hex(),
                    amd_certs=chain.amd_certs.hex())
        rec = self.reader.read()
        if not isinstance(rec, S.SevSession):
            raise StreamError(f"expected SEV_SESSION, got {type(rec).__name__}")
        self._receive_start(rec)
        if self.reader.flags & S.FLAG_HELPER:
            if cfg.helper_layout is None:
                raise StreamError("a helper-path stream for a guest without a helper")
            self.helper = MigrationHelper(m.vm, cfg.helper_layout, cfg.helper_vcpus)
        # The host OS's page faults on the incoming guest's frames (pinned, never written) are
        # taken by another thread ahead of the stores (HostMemory.populating); the model is
        # unchanged.
        with kvm.host.mem.populating(m.frames()):
            self._receive_records()
        m.vm.memory_encrypt_op(U.KVM_SEV_RECEIVE_FINISH)
        self.cost.psp_command(self.clock, 0)
        self._close_helper()
        checked, bad, first_bad = m.run_until("resumed")
        self.result = {"checked": checked, "bad": bad, "first_bad": first_bad}
        self._reply("resumed", **self.result)

    def _receive_records(self):
        """The records after RECEIVE_START, up to END: pages, vCPU state, the shared ranges."""
        m = self.m
        ready = False
        for rec in self.reader:
            if isinstance(rec, S.HelperPage):
                self._pending.append(rec)
                if len(self._pending) >= self.params.batch_pages:
                    self._open_pending()
                continue
            self._open_pending()
            if isinstance(rec, S.HelperPages):
                self._open(rec.gfns, rec.seqs, rec.packets)
            elif isinstance(rec, S.EncryptedPages):
                self._receive_encrypted(rec.gfns, rec.hdrs, rec.trans)
            elif isinstance(rec, S.EncryptedPage):
                self._receive_encrypted([rec.gfn], _row(rec.hdr), _row(rec.trans))
            elif isinstance(rec, S.SharedPages):
                self._receive_shared(rec.gfns, rec.data)
            elif isinstance(rec, S.SharedPage):
                self._receive_shared([rec.gfn], _row(rec.data))
            elif isinstance(rec, S.ZeroPages):
                self._receive_zero(rec)
            elif isinstance(rec, S.Iteration):
                pass
            elif isinstance(rec, S.VcpuState):
                m.load_vcpu_state(rec.vcpu_id, rec.data)
            elif isinstance(rec, S.Setup) and rec.params.get("kind") == "shared_ranges":
                for s, e in rec.params["ranges"]:
                    m.tracker.shared.add(int(s), int(e))
            elif isinstance(rec, S.Setup) and rec.params.get("kind") == "complete":
                self._reply("ready", time_spent=dict(self.clock.spent))
                ready = True
            elif isinstance(rec, S.End):
                break
            else:
                raise StreamError(f"unexpected {type(rec).__name__} record")
        if not ready:
            raise StreamError("END before the source declared the copy complete")

    def _open_pending(self):
        """Hand the buffered single HELPER_PAGE records to the target's helper at once."""
        recs, self._pending = self._pending, []
        if recs:
            if any(len(r.packet) != PACKET_SIZE for r in recs):
                raise StreamError(f"a helper packet is not {PACKET_SIZE} bytes")
            self._open([r.gfn for r in recs], [r.seq for r in recs],
                       np.stack([_row(r.packet)[0] for r in recs]))

    def _open(self, gfns, seqs, packets):
        """The target's helper opens the packets into the guest's private pages."""
        if self.helper is None:
            raise StreamError("helper packets in a stream without the helper flag")
        gfns = self._check_gfns(gfns)
        if packets.shape[1] != PACKET_SIZE:
            raise StreamError(f"helper packets of {packets.shape[1]} bytes, not {PACKET_SIZE}")
        exits0 = self.helper.counters.exits
        self.helper.open(gfns, np.asarray(seqs, np.uint64), packets)
        charge_helper_pages(self.cost, self.clock, len(gfns), self.m.config.helper_vcpus,
                            self.helper.counters.exits - exits0)

    def _receive_start(self, rec):
        kvm, vm = self.kvm, self.m.vm
        pdh, sess = kvm.mmap(max(PAGE_SIZE, len(rec.pdh))), kvm.mmap(PAGE_SIZE)
        kvm.write(pdh, rec.pdh)
        kvm.write(sess, rec.session)
        vm.memory_encrypt_op(U.KVM_SEV_RECEIVE_START, policy=rec.policy, pdh_uaddr=pdh,
                             pdh_len=len(rec.pdh), session_uaddr=sess,
                             session_len=len(rec.session))
        self.cost.psp_command(self.clock, 0)

    def _check_gfns(self, gfns):
        """The gfns as a uint64 array; StreamError for a page outside the guest's memory."""
        gfns = np.asarray(gfns, np.uint64)
        if len(gfns) and int(gfns.max()) >= self.m.npages:
            raise StreamError(f"page gfn {int(gfns.max()):#x} is outside the guest's "
                              f"{self.m.npages} pages")
        return gfns

    def _receive_encrypted(self, gfns, hdrs, trans):
        """KVM_SEV_RECEIVE_UPDATE_DATA of each packet (the batched form)."""
        gfns = self._check_gfns(gfns)
        self.m.vm.sev_receive_update_data_pages(self.m.gfn_hvas(gfns), hdrs, trans)
        charge_psp_pages(self.cost, self.clock, len(gfns), self.params.ring_buffer)

    def _receive_shared(self, gfns, data):
        gfns = self._check_gfns(gfns)
        self.kvm.write_pages(self.m.gfn_hvas(gfns), data)
        charge_shared_pages(self.cost, self.clock, len(gfns))

    def _receive_zero(self, rec):
        gfns = self._check_gfns(np.arange(rec.gfn, rec.gfn + rec.npages, dtype=np.uint64))
        self.kvm.write_pages(self.m.gfn_hvas(gfns), np.zeros(len(gfns) * PAGE_SIZE, np.uint8))
        charge_shared_pages(self.cost, self.clock, len(gfns))


def _row(data):
    """One record's bytes as a 1-row uint8 array, the shape the batched calls take."""
    return np.frombuffer(data, np.uint8).reshape(1, -1)


# -- in one process --------------------------------------------------------------------------------

@dataclass
class MigrationResult:
    """What :func:`migrate` returns: the statistics, the target's running Machine, and the
    pages-remaining samples ``(simulated ns, pages, iteration)`` for plots."""
    stats: MigrationStats
    target: Machine
    samples: list


def migrate(machine, target_kvm, params=MigrationParams(), progress=None, channel_pair=None):
    """Migrate ``machine`` to a new guest on ``target_kvm``'s Host, in this process (the target
    runs in a thread). Returns MigrationResult; raises MigrationError after cancelling."""
    a, b = channel_pair or inprocess_pair(timeout=params.timeout_s)
    target = Target(target_kvm, b)
    failure = []

    def run_target():
        try:
            target.run()
        except BaseException as e:            # reported to the source through the channel
            failure.append(e)
    th = threading.Thread(target=run_target, name="sevcore-migration-target", daemon=True)
    th.start()
    src = Source(machine, a, params, progress)
    try:
        stats = src.run()
    finally:
        th.join(params.timeout_s)
    if failure:
        raise MigrationError(f"target failed after the hand-over: {failure[0]}", stats)
    return MigrationResult(stats, target.m, src.samples)
