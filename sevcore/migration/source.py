"""The source VMM's side of a migration: setup against the target's chain, pre-copy with dirty
logging, stop-and-copy, the hand-over, and SEND_CANCEL on any failure (docs/migration.md)."""
import time
from errno import EINVAL

import numpy as np

from sevcore import uapi as U
from sevcore.core.arrays import runs
from sevcore.hw.hostmem import PAGE_SIZE
from sevcore.migration import stream as S
from sevcore.migration.end import _dirty_gfns, _End, _message
from sevcore.migration.errors import (
    MigrationError,
    NotMigrationReady,
    PeerClosed,
    StreamError,
    StreamTruncated,
    TargetFailed,
)
from sevcore.migration.helper import PACKET_SIZE, HelperPacketError, MigrationHelper
from sevcore.migration.machine import SLOT, GuestError
from sevcore.migration.params import MigrationParams
from sevcore.migration.stats import IterationStats, MigrationStats
from sevcore.migration.timeline import (
    Timeline,
    charge_helper_pages,
    charge_psp_pages,
    charge_shared_pages,
)

#: Stream bytes of one ENCRYPTED_PAGE record: the downtime estimate's per-page size before any
#: page has been measured.
ENCRYPTED_PAGE_BYTES = 4180
SEV_PACKET_HEADER = 52


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
            if self.m.config.es and self.params.path == "helper":
                raise MigrationError("the helper path does not move SEV-ES guests yet: the "
                                     "target's mirror vCPUs would need VMSAs during "
                                     "RECEIVE_UPDATE (docs/migration.md)")
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
        if m.config.es:
            self._probe_send_update_vmsa()
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

    def _probe_send_update_vmsa(self):
        """An SEV-ES guest's VMSAs can move only if KVM has KVM_SEV_SEND_UPDATE_VMSA: upstream
        KVM has not (EINVAL for the id); out-of-tree KVM answers the length query."""
        try:
            self.vm.memory_encrypt_op(U.KVM_SEV_SEND_UPDATE_VMSA, vcpu_id=0)
        except OSError as e:
            if e.errno == EINVAL:
                raise MigrationError("KVM has no KVM_SEV_SEND_UPDATE_VMSA (upstream KVM cannot "
                                     "move an SEV-ES guest's VMSA; the out-of-tree ioctls are "
                                     "host.kvm_sev.out_of_tree_vmsa_migration, "
                                     "--out-of-tree-vmsa)") from e

    def _send_vmsas(self):
        """KVM_SEV_SEND_UPDATE_VMSA of every vCPU, stopped: a ``vmsa`` SETUP record each with
        the firmware's header and packet; the target opens them with RECEIVE_UPDATE_VMSA."""
        m, kvm = self.m, self.kvm
        hdr, trans = kvm.mmap(PAGE_SIZE), kvm.mmap(PAGE_SIZE)
        n = len(m.vcpus)

        def write(w):
            for vcpu in m.vcpus:
                self.vm.memory_encrypt_op(U.KVM_SEV_SEND_UPDATE_VMSA, vcpu_id=vcpu.vcpu_id,
                                          hdr_uaddr=hdr, hdr_len=SEV_PACKET_HEADER,
                                          trans_uaddr=trans, trans_len=PAGE_SIZE)
                w.setup({"kind": "vmsa", "vcpu_id": vcpu.vcpu_id,
                         "hdr": kvm.read(hdr, SEV_PACKET_HEADER).hex(),
                         "trans": kvm.read(trans, PAGE_SIZE).hex()})
        nbytes = self._written(write)
        self.tl.batch(lambda c: charge_psp_pages(self.cost, c, n, False), nbytes,
                      lambda c: charge_psp_pages(self.cost, c, n, False))
        self.stats.count_psp("SEND_UPDATE_VMSA", n)
        self.stats.count_psp("RECEIVE_UPDATE_VMSA", n)

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
        if m.config.es:
            self._send_vmsas()
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
