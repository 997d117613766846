"""The source VMM's side of a migration: setup against the target's chain, pre-copy with dirty
logging, stop-and-copy, the hand-over, and SEND_CANCEL on any failure (docs/migration.md)."""
import time
from errno import EINVAL

import numpy as np

from sevcore import uapi as U
from sevcore.migration import driver as D
from sevcore.core.arrays import runs
from sevcore.hw.hostmem import PAGE_SIZE
from sevcore.migration import stream as S
from sevcore.migration.end import _dirty_gfns, _End, _message, target_failed
from sevcore.migration.errors import (
    GuestLost,
    PostcopyPaused,
    MigrationError,
    NotMigrationReady,
    PeerClosed,
    StreamError,
    StreamTruncated,
    TargetFailed,
)
from sevcore.migration.helper import (HELPER_SHARE, PACKET_SIZE, HelperPacketError,
                                      MigrationHelper)
from sevcore.migration.machine import SLOT, GuestError, owner_secrets
from sevcore.psp import certs as C
from sevcore.psp.api import CertChain
from sevcore.vmm import owner
from sevcore.migration.params import MigrationParams
from sevcore.migration.postcopy import CUT, PostcopySource
from sevcore.migration.stats import IterationStats, MigrationStats

#: Stream bytes of one ENCRYPTED_PAGE record: the downtime estimate's per-page size before any
#: page has been measured.
ENCRYPTED_PAGE_BYTES = 4180
SEV_PACKET_HEADER = 52


class Source(_End):
    """The source VMM's migration of ``machine`` over ``channel``."""

    def __init__(self, machine, channel, params=MigrationParams(), progress=None, driver=None):
        self.m, self.channel, self.params = machine, channel, params
        self.cost = params.cost
        self.drv = driver or D.ClockDriver(params.cost, machine.host.clock)
        self.progress = progress
        self.vm, self.kvm = machine.vm, machine.kvm
        self.stats = MigrationStats(params.path, guest_pages=machine.npages,
                                    cost_model=params.to_dict()["cost"])
        self.samples = []            # (simulated ns, pages still to send, iteration)
        self.layout = machine.config.helper_layout
        self._sent_start = False
        self._touched = False        # SEND_START ran: the guest's context was involved
        self.postcopy_live = False   # the guest runs on the target, pages still owed
        self._logging = False
        self._parked = False         # SEV-ES helper path: the vCPUs saved their state, wait
        self.handed_over = False
        #: SEV-ES by the helper: the target is launched by the guest owner, not received.
        self.es_helper = params.path == "helper" and machine.config.es
        self.target_generation = 0   # the owner's helper generation for that target
        self.drv.bind(self)

    # -- driver ----------------------------------------------------------------------------------

    def run(self):
        """Migrate; returns MigrationStats (status ``completed``). Raises MigrationError (with
        ``.stats``) after cancelling, with the source guest running and unchanged; after the
        post-copy switch, PostcopyPaused (call :meth:`resume`) or GuestLost."""
        self.t0 = self.drv.now_ns()

        def body():
            if self.m.config.es and self.params.path == "helper" and self.m.helper is None:
                raise MigrationError("the helper path moves an SEV-ES guest only with the "
                                     "helper launched with it (GuestConfig.helper_vcpus >= 1)")
            if self.params.path == "helper" and self.layout is None:
                raise MigrationError("the helper path needs a guest booted with a migration "
                                     "helper (GuestConfig.helper_vcpus >= 1)")
            if not self.m.tracker.migration_ready:
                raise NotMigrationReady("the guest has not set KVM_MIGRATION_READY in "
                                        "MSR_KVM_MIGRATION_CONTROL: refusing to migrate")
            self._setup()
            if self.params.postcopy:
                self.pc = PostcopySource(self)
                self.pc.run()
            else:
                self._precopy()
                self._stop_and_copy()
        return self._guarded(body, time.perf_counter())

    def resume(self, channel):
        """Continue a paused post-copy on a new ``channel`` (QEMU's ``migrate -r``): the
        target says which pages it still lacks and those follow. Returns and raises as
        :meth:`run`; ValueError if the migration is not paused."""
        if self.stats.status != "postcopy-paused":
            raise ValueError(f"nothing to resume: the migration is {self.stats.status}")
        self.channel = channel
        return self._guarded(self.pc.resume, time.perf_counter() - self.stats.wall_s)

    def _guarded(self, body, wall0):
        """Run ``body``; on failure pause (a cut during post-copy), report the guest lost
        (anything else after the switch) or cancel (before it)."""
        st = self.stats
        try:
            body()
            st.status = "completed"
        except BaseException as e:
            if isinstance(e, (PeerClosed, StreamTruncated)):
                e = self._target_error() or e       # the target's reason, if it gave one
            st.error = f"{type(e).__name__}: {e}"
            if self.postcopy_live and isinstance(e, TargetFailed) and e.guest_ran is False:
                # The target refused what came at the switch (an SEV-ES vCPU's VMSA or saved
                # state) before its guest ever ran, and destroyed it: the guest is still here.
                self.postcopy_live = False
            if self.postcopy_live and isinstance(e, CUT):
                st.status = "postcopy-paused"
                self._close_channel()
                raise PostcopyPaused(f"post-copy paused, nothing lost: {st.error}", st) from e
            st.status = "failed"
            lost = self.postcopy_live
            self._abort()
            self._check_source()
            if lost:
                st.guest_lost = True
                raise GuestLost(f"the guest is lost: post-copy failed after it ran on the "
                                f"target: {st.error}", st) from e
            if isinstance(e, MigrationError):
                e.stats = st
                raise e
            if isinstance(e, (StreamError, OSError, GuestError, ValueError,
                              HelperPacketError)):
                raise MigrationError(f"migration failed: {st.error}", st) from e
            raise
        finally:
            st.wall_s = time.perf_counter() - wall0
            if st.status != "completed":                # the statistics so far
                st.total_ns = self.drv.now_ns() - self.t0
                if getattr(self, "writer", None) is not None:
                    st.stream = self.writer.stats.qemu()
            st.time_spent = self.drv.spent()
            st.guest_ticks = self.m.ticks
        self._resumed()
        return st

    def _close_channel(self):
        try:
            self.channel.close()
        except OSError:
            pass

    def _target_error(self):
        """After the target closed: the TargetFailed its ERROR message describes, if it sent
        one before closing (reading stops at the end of its stream)."""
        reader = getattr(self, "reader", None)
        try:
            while reader is not None and (rec := reader.read()) is not None:
                if isinstance(rec, S.Setup) and rec.params.get("kind") == "error":
                    return target_failed(rec.params)
        except (StreamError, OSError, ValueError):
            pass
        return None

    def _abort(self):
        """Undo what the source did: SEND_CANCEL (the guest is RUNNING again), logging off, the
        channel closed so that the target stops too."""
        if self._sent_start and not self.postcopy_live:
            try:
                self.vm.memory_encrypt_op(U.KVM_SEV_SEND_CANCEL)
                self.stats.count_psp("SEND_CANCEL")
                self.stats.send_cancel = True
            except OSError:
                pass
            self._sent_start = False
        if self._logging:
            self._set_logging(False)
        if self._parked:
            self.m.release_vcpus()
            self._parked = False
        self._close()

    def _close_helper(self):
        """The helper's mirror goes with the migration, but an SEV-ES guest's was launched with
        it and cannot be made again: it stays with the guest unless the guest left."""
        if self.es_helper and not self.handed_over:
            self.helper = None
            return
        super()._close_helper()
        if self.es_helper:
            self.m.helper = None

    def _check_source(self):
        """After a failure: does the source guest run again, and does its own memory check
        pass? A guest that never reached SEND_START was never stopped: it is not disturbed."""
        st = self.stats
        if self.postcopy_live:
            # The guest ran on the target: its copy here is stale, and running it would fork
            # the guest. What the target holds is incomplete: the guest is lost.
            st.source_resumed = False
            st.source_check = {"error": "post-copy had started: the guest ran on the target, "
                                        "which lacks pages this side can no longer send"}
            return
        if not self._touched:
            st.source_resumed = True
            return
        try:
            checked, bad, first_bad = self.m.self_check()
        except (GuestError, OSError) as e:
            st.source_resumed = False
            st.source_check = {"error": f"{type(e).__name__}: {e}"}
            return
        st.source_resumed = True
        st.source_check = {"checked": int(checked), "bad": int(bad), "first_bad": first_bad}

    def _set_logging(self, on):
        m = self.m
        self.vm.set_user_memory_region2(SLOT, U.KVM_MEM_LOG_DIRTY_PAGES if on else 0, 0,
                                        m.config.mem_size, m.hva)
        self._logging = on

    # -- setup ------------------------------------------------------------------------------------------

    def _setup(self):
        m, p = self.m, self.params
        self.stream_flags = S.FLAG_ENCRYPTED | (S.FLAG_HELPER if p.path == "helper" else 0)
        self.writer = S.StreamWriter(self.channel, self.stream_flags,
                                     batch_pages=self.record_pages)
        self.reader = S.StreamReader(self.channel)
        self.drv.start()
        self.writer.setup({"kind": "migrate", "guest": m.config.to_dict(),
                           "params": p.to_dict()})
        self.writer.flush()
        hello = _message(self.reader, "hello")
        self.drv.control(self.writer.stats.transferred)
        pdh, plat, amd = (bytes.fromhex(hello[k]) for k in ("pdh", "plat_certs", "amd_certs"))
        if self.es_helper:
            self._launch_target(pdh, plat, amd)
            self.helper = m.helper
            self._set_logging(True)
            self.stats.setup_ns = self.drv.now_ns() - self.t0
            return
        out = self._send_start(pdh, plat, amd)
        if m.config.es:
            self._probe_send_update_vmsa()
        src_pdh = m.host.psp.export_cert_chain().pdh
        self.writer.sev_session(out.policy, src_pdh, self._session)
        self.drv.batch(D.NOTHING, S.FRAME_OVERHEAD + 12 + len(src_pdh) + len(self._session),
                       D.psp_command())                            # RECEIVE_START
        self.stats.count_psp("RECEIVE_START")
        if p.path == "helper":
            self.helper = MigrationHelper(self.vm, self.layout, m.config.helper_vcpus)
            self._send_psp(self.layout.private_gfns())     # the key, before any packet
        self._set_logging(True)
        self.stats.setup_ns = self.drv.now_ns() - self.t0

    def _launch_target(self, pdh, plat, amd):
        """SEV-ES by the helper: the guest owner launches the target with the source's image
        and VMSAs (the guest's and its helper's). The owner checks the target's certificate
        chain (sev-tool ``validate_cert_chain``, which SEND_START does in the firmware on the
        PSP path), sends a launch session for its PDH, checks the target's LAUNCH_MEASURE
        against the digest it expects, and only then sends the LAUNCH_SECRET packets that give
        the target's helper the transport key. No SEND_START: the source's context stays
        RUNNING."""
        m, st = self.m, self.stats
        if m.owner is None or m.owner.key is None:
            raise MigrationError("the guest's owner is not in this process: no one can "
                                 "launch the target or give it the transport key")
        cs = C.CERT_SIZE
        try:
            owner.verify_cert_chain(CertChain(pdh, plat[:cs], plat[cs:2 * cs], plat[2 * cs:],
                                              amd[:len(amd) // 2], amd[len(amd) // 2:]))
        except owner.CertChainError as e:
            raise MigrationError(f"the guest owner refuses the target's certificate chain: "
                                 f"{e}") from None
        session = owner.create_launch_session(pdh, m.config.policy)
        self._touched = True            # a failure from here on runs the source's own check
        nbytes = self._written(lambda w: w.setup({
            "kind": "launch", "policy": m.config.policy, "godh_cert": session.godh_cert.hex(),
            "session": session.session.hex()}))
        self.writer.flush()
        launch = [D.psp_command()] * (4 + len(m.config.helper_layout.private_gfns()))
        self.drv.batch(D.NOTHING, nbytes, sum(launch, ()))   # LAUNCH_START .. LAUNCH_MEASURE
        self.drv.drain()                # the owner waits for the target's measurement
        measured = _message(self.reader, "measured")
        self.drv.control(0)
        try:
            measure = bytes.fromhex(measured["measure"])
            ok = owner.verify_measurement(session.tik, measure, m.owner.digest,
                                          int(measured["api_major"]),
                                          int(measured["api_minor"]), int(measured["build"]),
                                          m.config.policy)
        except (KeyError, TypeError, ValueError) as e:
            raise MigrationError(f"malformed measured message: {e}") from None
        if not ok:
            raise MigrationError("the target's LAUNCH_MEASURE is not the guest's launch: the "
                                 "guest owner sends it no transport key")
        self.target_generation = m.owner.new_generation()
        secrets = owner_secrets(session, measure, m.owner.key, self.layout, m.generation,
                                self.target_generation)
        nbytes = self._written(lambda w: [w.setup({
            "kind": "secret", "gfn": int(gfn), "hdr": hdr.hex(), "trans": trans.hex()})
            for gfn, hdr, trans in secrets])
        self.writer.flush()
        self.drv.batch(D.NOTHING, nbytes, sum([D.psp_command()] * (len(secrets) + 1), ()))
        for name, n in (("LAUNCH_START", 1), ("LAUNCH_UPDATE_DATA", 1),
                        ("LAUNCH_UPDATE_VMSA", 2), ("LAUNCH_MEASURE", 1),
                        ("LAUNCH_SECRET", len(secrets)), ("LAUNCH_FINISH", 1)):
            st.count_psp(name, n)

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
        self._sent_start = self._touched = True     # from here on a failure cancels
        self.drv.local(D.psp_command())
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
        self.drv.batch(D.psp_pages(n, False), nbytes, D.psp_pages(n, False))
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

    def _precopy(self, limit=None):
        """Pre-copy passes until the downtime estimate fits, or ``limit`` passes (the
        iteration limit by default)."""
        p, st = self.params, self.stats
        limit = p.max_iterations if limit is None else limit
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
            if k >= limit:
                break
        self._final_dirty = dirty

    def _shared_now(self):
        return self.m.tracker.shared.contains_array(np.arange(self.m.npages))

    def _sync(self):
        """A dirty-log sync: the dirtied gfns, plus pages whose shared/private state changed."""
        m = self.m
        self.stats.dirty_sync_count += 1
        if m.rings is not None:
            # The dirty ring (KVM_CAP_DIRTY_LOG_RING): collect and reset every vCPU's ring. The
            # cost model has no figure for it; bench/bench_dirty_ring.py measures it.
            dirty = m.dirty_ring_gfns()
        else:
            self.drv.local(D.dirty_sync(m.config.mem_size))
            dirty = _dirty_gfns(self.vm, m.npages)
        dirty = dirty[dirty < self._end_gfn]
        now = self._shared_now()
        changed = np.flatnonzero(now[:self._end_gfn] != self._shared_mask[:self._end_gfn])
        changed = changed.astype(np.uint64)
        self._shared_mask = now
        if len(changed):
            dirty = np.union1d(dirty, changed)
        return dirty

    @property
    def batch(self):
        """Pages per batch of a pass: ``batch_pages``, on the helper path times the helper
        vCPUs the guest's packet buffer has HELPER_SHARE pages for (all of them unless the
        guest is small), so that a request gives each vCPU a share of HELPER_SHARE pages and
        they serve one batch as the cost model charges, ceil(n / vCPUs) pages' time."""
        p, lay = self.params, self.m.config.helper_layout
        if p.path != "helper" or lay is None:
            return p.batch_pages
        return p.batch_pages * max(1, lay.batch_pages // HELPER_SHARE)

    @property
    def record_pages(self):
        """The stream writer's pages per record: on the helper path one helper request, the
        guest's whole packet buffer (HELPER_SHARE pages per helper vCPU); the stream's default
        otherwise."""
        lay = self.m.config.helper_layout
        return lay.batch_pages if self.params.path == "helper" and lay else S.BATCH_PAGES

    def _send_pass(self, k, gfns, stop):
        p, st = self.params, self.stats
        bp = self.batch
        it = IterationStats(k, self.drv.now_ns(), pages=len(gfns), stop=stop)
        st.iterations.append(it)
        bytes0 = self.writer.stats.transferred
        self.writer.iteration(k, len(gfns), stop=stop)
        self.drv.control(S.FRAME_OVERHEAD + 16)
        nb = -(-len(gfns) // bp)
        every = max(1, -(-nb // p.guest_runs))
        for b in range(nb):
            batch = gfns[b * bp:(b + 1) * bp]
            self._send_batch(batch, it)
            self.samples.append((self.drv.now_ns() - self.t0,
                                 max(0, len(gfns) - (b + 1) * bp), k))
            if not stop and (b + 1) % every == 0:
                self._guest_tick()
            if self.progress:
                self.progress({"phase": "stop" if stop else "precopy", "iteration": k,
                               "pages": len(gfns), "sent": min(len(gfns),
                                                               (b + 1) * bp),
                               "sim_ms": (self.drv.now_ns() - self.t0) / 1e6})
        if not stop and (nb == 0 or nb % every):
            self._guest_tick()              # the guest runs at least once per pass, at its end
        self.writer.flush()
        if stop:
            self.drv.drain()
        it.end_ns = self.drv.now_ns()
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
        work = D.helper_pages(n, vcpus, exits)
        self.drv.batch(work, nbytes, work)
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
        work = D.psp_pages(n, self.params.ring_buffer)
        self.drv.batch(work, nbytes, work)
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
        work = D.shared_pages(n)
        self.drv.batch(work, nbytes, work)
        it.shared_pages += n
        self.stats.shared_pages += n - nz
        self.stats.zero_pages += nz

    # -- stop and copy ----------------------------------------------------------------------------------

    def _stop(self):
        """Stop the guest (it runs up to this moment; SEV-ES by the helper: its vCPUs save
        their state) and return the simulated time it stopped at."""
        self._guest_tick()
        stop_ns = self.drv.now_ns()
        self._save_vcpus()
        return stop_ns

    def _stop_and_copy(self):
        st = self.stats
        stop_ns = self._stop()
        dirty = np.union1d(self._final_dirty, self._sync())
        self._send_pass(len(st.iterations), dirty, stop=True)
        if self.helper is not None and not self.es_helper:
            self._send_psp(self.layout.private_gfns())     # the state, after the last packet
            self.drv.drain()
        self._send_device_state()
        self._hand_over(stop_ns)

    def _save_vcpus(self):
        """SEV-ES by the helper, the guest stopped: each vCPU saves its state into its save
        area (private pages the helper seals like any other; the VMSAs do not move)."""
        if self.es_helper:
            self._parked = True
            self.m.save_vcpus()

    def _save_gfns(self):
        """The vCPUs' save areas (SEV-ES by the helper; else none)."""
        lay = self.m.config.layout
        n = lay.save_pages if self.es_helper else 0
        return np.arange(lay.save_gfn, lay.save_gfn + n, dtype=np.uint64)

    def _send_device_state(self):
        """What the target needs before its guest runs: the shared ranges and the vCPUs."""
        m = self.m
        self.writer.setup({"kind": "shared_ranges",
                           "ranges": [list(r) for r in m.tracker.shared_ranges(0, m.npages)]})
        for vcpu in m.vcpus:
            self.writer.vcpu_state(vcpu.vcpu_id, m.vcpu_state(vcpu))
        if m.config.es and not self.es_helper:
            self._send_vmsas()

    def _hand_over(self, stop_ns):
        """The copy is complete: READY, SEND_FINISH, END, RECEIVE_FINISH; the statistics.
        Returns the target's READY message."""
        st = self.stats
        self.writer.setup({"kind": "complete"})
        self.writer.flush()
        self.drv.control(0)
        ready = _message(self.reader, "ready")
        self.drv.drain()
        if self.es_helper:
            # No SEND_FINISH: the context was never sent. The guest has left: its vCPUs stay
            # parked, and the VMM never runs them again.
            self.handed_over = True
        else:
            self.vm.memory_encrypt_op(U.KVM_SEV_SEND_FINISH)
            self._sent_start = False
            self.handed_over = True         # the source guest never runs again: no cancel now
            self.drv.local(D.psp_command())
            st.count_psp("SEND_FINISH")
        self._set_logging(False)
        self._close_helper()
        self.writer.end()
        if not self.es_helper:
            self.drv.remote(D.psp_command())                            # RECEIVE_FINISH
            st.count_psp("RECEIVE_FINISH")
        end_ns = self.drv.now_ns()
        st.downtime_ns = end_ns - stop_ns
        st.total_ns = end_ns - self.t0
        st.remaining = 0
        st.stream = self.writer.stats.qemu()
        st.target_time_spent = dict(ready.get("time_spent", {}))
        if st.guest_pages_written and st.total_ns:
            st.dirty_pages_rate = st.guest_pages_written / (st.total_ns / 1e9)
        return ready

    def _resumed(self):
        """The target's report of its guest's own memory check (best effort: the migration has
        completed whatever this says)."""
        try:
            r = _message(self.reader, "resumed")
        except (StreamError, MigrationError, OSError):
            return
        self.stats.verified_pages = int(r["checked"])
        self.stats.bad_pages = int(r["bad"])
