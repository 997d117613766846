"""Post-copy: the guest moves to the target after a few pre-copy passes (or none) and runs
there while the pages it still owes follow, each one on demand when the guest touches it, the
rest pushed in the background (docs/migration.md, "Post-copy").

The order, after ``postcopy_after`` pre-copy passes (QEMU's postcopy-ram, with the SEV parts
as the issue's PSP and helper paths)::

    source                                        target
    the guest stops; its last dirty sync
    ITERATION STOP, the shared pages dirtied  ->  written as in pre-copy
    shared ranges, vCPU states, POSTCOPY {owed bitmap}
                                                  KVM_MEM_USERFAULT on the guest's slot, owed
                                                  pages marked in its userfault_bitmap
    STEP 0 {at}                             ->    the guest runs (downtime ends here)
                                            <-    ACK 0 {want: the page vCPU 0 stopped on}
    STEP 1: background pages {at}           ->    RECEIVE_UPDATE_DATA / helper OPEN, bits
                                                  cleared; the guest runs on
    STEP 2: the wanted page first {at}      ->    ...
                                            <-    ACK 1, ACK 2 ...
    (nothing owed)  [helper: its state page by the PSP]
    SETUP {complete}                        ->    the last tick ends; USERFAULT off
                                            <-    READY {blocktime ...}
    KVM_SEV_SEND_FINISH, END                ->    KVM_SEV_RECEIVE_FINISH, the guest's check
                                            <-    RESUMED

Steps go in lock step with one step in flight (the source sends step k+1 before it reads ACK
k), so the target's requests reach the source in simulated-time order, as the default driver's
pipeline (sevcore.migration.driver) has one batch in flight between stages. Each STEP carries
``at``, when the driver has the target done with it; the target's clock (its guest's TSC) follows
those times, so the guest dirties and stops in the same simulated time as the pipeline. A
request made at ``at`` reaches the source one network latency later and its page comes back
after another (CostModel.network_latency_ns); the source charges both before sending it, after
the step already in flight.

The source's firmware context stays in SUPDATE until the last page (SEND_UPDATE_DATA on
demand), the target's in RECV (RECEIVE_UPDATE_DATA per page); SEND_FINISH and RECEIVE_FINISH
come after the last page. On the helper path the source helper seals on demand and the target
helper opens each page through the mirror, whose slot has no userfault bitmap, while the
guest's vCPU waits.

Once the guest has run on the target, a failure cannot give it back to the source (its copy
there is stale): it is reported as the guest lost.
"""
import numpy as np

from sevcore import uapi as U
from sevcore.hw.clock import SimClock
from sevcore.migration.end import _message
from sevcore.migration import stream as S
from sevcore.migration.errors import (ChecksumMismatch, PeerClosed, StreamError, StreamTimeout,
                                      StreamTruncated)
from sevcore.migration.machine import SLOT
from sevcore.migration.stats import IterationStats
from sevcore.migration.workload import workload_main

#: The back-channel and stream messages of post-copy (SETUP records' ``kind``).
KINDS = ("postcopy", "pc_step")

#: Steps the source may have sent and not seen acknowledged.
WINDOW = 2

#: What a broken connection raises: during post-copy both sides pause on these (QEMU's
#: postcopy-paused) instead of failing.
CUT = (PeerClosed, StreamTruncated, StreamTimeout, ChecksumMismatch, ConnectionError)


def pack_gfns(gfns, npages):
    """A set of gfns below ``npages`` as the hex of a little-endian bitmap."""
    mask = np.zeros(npages, bool)
    mask[np.asarray(gfns, np.int64)] = True
    return np.packbits(mask, bitorder="little").tobytes().hex()


def unpack_gfns(text, npages):
    """The inverse of :func:`pack_gfns`: a boolean mask of ``npages``; StreamError if the
    bitmap does not have ``npages`` bits or sets bits past them."""
    try:
        raw = np.frombuffer(bytes.fromhex(text), np.uint8)
    except (TypeError, ValueError):
        raise StreamError("the post-copy bitmap is not hex") from None
    if len(raw) != -(-npages // 8):
        raise StreamError(f"the post-copy bitmap has {len(raw) * 8} bits for {npages} pages")
    bits = np.unpackbits(raw, bitorder="little").astype(bool)
    if bits[npages:].any():
        raise StreamError("the post-copy bitmap marks pages past the guest's memory")
    return bits[:npages]


class PostcopySource:
    """The source's side of post-copy, driving a :class:`sevcore.migration.source.Source`
    after its setup."""

    def __init__(self, src):
        self.s = src
        self.owed = None             # bool per guest page: not yet sent since the switch
        self.order = None            # the owed gfns in push order
        self.cursor = 0
        self.unacked, self.wants, self.step = [], [], 0
        self.streams = []            # the stream statistics of connections before a resume

    def run(self):
        s, st = self.s, self.s.stats
        st.postcopy, st.postcopy_after = True, s.params.postcopy_after
        if s.params.postcopy_after:
            s._precopy(s.params.postcopy_after)
            if st.converged:                     # as QEMU: no need to switch
                s._stop_and_copy()
                return
        self._switch()
        self._push()
        self._finish()

    # -- the switch -------------------------------------------------------------------------

    def _switch(self):
        s, m, st = self.s, self.s.m, self.s.stats
        self.stop_ns = s._stop()
        if st.iterations:
            dirty = np.union1d(s._final_dirty, s._sync())
        else:                                    # pure post-copy: every page is owed
            s._shared_mask = s._shared_now()
            dirty = s._all_gfns()
        k = len(st.iterations)
        it = IterationStats(k, self.stop_ns, pages=len(dirty), stop=True)
        st.iterations.append(it)
        bytes0 = s.writer.stats.transferred
        s.writer.iteration(k, len(dirty), stop=True)
        shared = s._shared_mask[dirty]
        shared_bytes = 0
        if shared.any():
            shared_bytes = s._written(lambda w: s._send_shared(dirty[shared], it))
        self.order = dirty[~shared]
        first = s._save_gfns()
        if len(first):
            # SEV-ES by the helper: the vCPUs' saved state goes before the guest runs, as the
            # VMSAs do on the PSP path: no vCPU resumes and then waits for its own registers.
            s._send_private(first)
            it.private_pages += len(first)
            st.private_pages += len(first)
            self.order = np.setdiff1d(self.order, first)
        self.owed = np.zeros(m.npages, bool)
        self.owed[self.order.astype(np.int64)] = True
        self.switch_owed = self.order
        st.pages_owed = len(self.order)
        s._send_device_state()
        s.writer.setup({"kind": "postcopy", "npages": m.npages,
                        "owed": pack_gfns(self.order, m.npages)})
        s.writer.flush()
        s.drv.control(s.writer.stats.transferred - bytes0 - shared_bytes)
        s.drv.drain()
        s.postcopy_live = True                   # from here the guest runs on the target
        at = s.drv.target_now_ns()
        st.downtime_ns = at - self.stop_ns
        st.postcopy_start_ns = at - s.t0
        it.end_ns = s.drv.now_ns()
        it.bytes = s.writer.stats.transferred - bytes0
        self._bytes0 = s.writer.stats.transferred
        self._marker(0)
        self.unacked, self.step = [0], 1

    def resume(self):
        """On the Source's new channel: a new stream, RESUME, and the pages the target's
        RESUME_ACK says it still lacks (those lost in flight are owed again); the page its
        vCPU waits for goes first. Then the push goes on."""
        s, st = self.s, self.s.stats
        st.postcopy_bytes += s.writer.stats.transferred - self._bytes0
        self.streams.append(s.writer.stats.qemu())
        s.writer = S.StreamWriter(s.channel, s.stream_flags, batch_pages=s.record_pages)
        s.reader = S.StreamReader(s.channel)
        s.writer.setup({"kind": "resume"})
        s.writer.flush()
        ack = _message(s.reader, "resume_ack")
        self._bytes0 = 0
        owed = unpack_gfns(ack.get("owed", ""), s.m.npages)
        if (owed & ~(self.owed | self._sent_mask())).any():
            raise StreamError("post-copy resume: the target lacks pages that were never owed")
        st.pages_resent += int((owed & ~self.owed).sum())
        self.owed = owed
        self.order = np.flatnonzero(owed).astype(np.uint64)
        self.cursor = 0
        st.postcopy_resumes += 1
        self.unacked = []
        self.wants = [(int(g), float(ack["at"])) for g in ack.get("want", [])]
        self._push()
        self._finish()

    def _sent_mask(self):
        """The pages owed at the switch (a resume may owe only those again)."""
        mask = np.zeros(len(self.owed), bool)
        mask[self.switch_owed.astype(np.int64)] = True
        return mask

    def _marker(self, step):
        s = self.s
        s.writer.setup({"kind": "pc_step", "step": step, "at": s.drv.target_now_ns()})
        s.writer.flush()

    # -- pages ------------------------------------------------------------------------------

    def _push(self):
        s, st = self.s, self.s.stats
        unacked, wants = self.unacked, self.wants
        while True:
            gfns, asked_at = self._next(wants)
            if gfns is None and not unacked:
                break
            if gfns is not None:
                self._send_step(gfns, asked_at)
                self._marker(self.step)
                unacked.append(self.step)
                self.step += 1
                if s.progress:
                    s.progress({"phase": "postcopy", "iteration": len(st.iterations),
                                "pages": len(self.order),
                                "sent": st.pages_pushed + st.pages_on_demand,
                                "sim_ms": (s.drv.now_ns() - s.t0) / 1e6})
            if len(unacked) >= WINDOW or gfns is None:
                ack = _message(s.reader, "pc_ack")
                if ack.get("step") != unacked[0]:
                    raise StreamError(f"post-copy: ACK of step {ack.get('step')}, expected "
                                      f"{unacked[0]}")
                unacked.pop(0)
                for gfn in ack["want"]:
                    st.postcopy_requests += 1
                    wants.append((int(gfn), float(ack["at"])))

    def _next(self, wants):
        """The next step's pages: those asked for that are still owed (and when the first ask
        was made), else the next background batch; ``(None, None)`` when nothing is owed."""
        if wants:
            asked = np.unique(np.array([g for g, _ in wants], np.uint64))
            at = min(a for _, a in wants)
            wants.clear()
            if int(asked.max()) >= len(self.owed):
                raise StreamError("post-copy: the target asked for a page outside the guest")
            asked = asked[self.owed[asked.astype(np.int64)]]
            if len(asked):
                return asked, at
        bp = self.s.batch
        out = []
        n = 0
        while n < bp and self.cursor < len(self.order):
            chunk = self.order[self.cursor:self.cursor + bp - n]
            self.cursor += len(chunk)
            chunk = chunk[self.owed[chunk.astype(np.int64)]]
            out.append(chunk)
            n += len(chunk)
        if n == 0:
            return None, None
        return np.concatenate(out), None

    def _send_step(self, gfns, asked_at):
        s, st = self.s, self.s.stats
        if asked_at is not None:
            # The request reaches the source one latency after the target asked; the page's
            # trip back is charged before it leaves (the same arrival time).
            latency = s.cost.network_latency_ns
            s.drv.wait_until(asked_at + latency)
            s.drv.wait_until(s.drv.now_ns() + latency, "latency")
            st.pages_on_demand += len(gfns)
        else:
            st.pages_pushed += len(gfns)
        s._send_private(gfns)
        st.private_pages += len(gfns)
        self.owed[gfns.astype(np.int64)] = False

    # -- the end ----------------------------------------------------------------------------

    def _finish(self):
        s, st = self.s, self.s.stats
        if s.helper is not None and not s.es_helper:
            s._send_psp(s.layout.private_gfns())    # the helper's state, after the last packet
        st.postcopy_bytes += s.writer.stats.transferred - self._bytes0
        stop_downtime = st.downtime_ns
        ready = s._hand_over(self.stop_ns)
        s.postcopy_live = False
        st.downtime_ns = stop_downtime
        for old in self.streams:                 # the connections before a resume count too
            for k, v in old.items():
                if isinstance(v, (int, float)) and isinstance(st.stream.get(k), (int, float)):
                    st.stream[k] += v
        pc = ready.get("postcopy", {})
        st.vcpu_blocktime_ns = [float(t) for t in pc.get("vcpu_blocktime_ns", [])]
        st.vcpu_faults = [int(n) for n in pc.get("vcpu_faults", [])]
        st.blocktime_ns = float(pc.get("blocktime_ns", 0.0))
        st.guest_pages_written += int(pc.get("pages_written", 0))
        if st.total_ns:
            st.dirty_pages_rate = st.guest_pages_written / (st.total_ns / 1e9)


class PostcopyTarget:
    """The target's side of post-copy for a :class:`sevcore.migration.target.Target`, from
    the POSTCOPY record on: the userfault bitmap, the guest's runs between steps, the
    requests and the blocktime."""

    def __init__(self, t, params):
        self.t = t
        m = self.m = t.m
        npages = int(params.get("npages", -1))
        if npages != m.npages:
            raise StreamError(f"post-copy for {npages} pages, the guest has {m.npages}")
        missing = [v.vcpu_id for v in m.vcpus if m.config.es and not v.guest_state_protected]
        if missing:
            raise StreamError(f"post-copy would run SEV-ES vCPU(s) {missing} with no VMSA")
        self.owed = unpack_gfns(params.get("owed", ""), npages)
        if m.config.es and self.owed[m.config.layout.save_gfn:m.config.layout.ghcb_gfn].any():
            raise StreamError("post-copy would run SEV-ES vCPUs whose saved state is owed")
        self.words = np.packbits(self.owed, bitorder="little")
        self.words = np.concatenate([self.words, np.zeros(-len(self.words) % 8, np.uint8)])
        self.bitmap = m.kvm.mmap(max(len(self.words), 8))
        m.kvm.write(self.bitmap, self.words.tobytes())
        m.vm.set_user_memory_region2(SLOT, U.KVM_MEM_USERFAULT, 0, m.config.mem_size, m.hva,
                                     userfault_bitmap=self.bitmap)
        if getattr(t, "es_helper", False):
            m.release_vcpus()            # the save request came over with the shared pages
        # The guest runs on: no check until the last page is in.
        m.set_program(m.vcpus[0], workload_main, m.config.to_dict(), False)
        self.own_clock = t.clock
        self.guest_clock = m.host.clock
        # The target's own charges go to a scratch clock: the source's driver holds the
        # pipeline, and the STEP times drive the Host's clock (the guest's TSC).
        t.clock = SimClock(t.clock.now_ns)
        self.spent0 = dict(self.own_clock.spent)
        self.base = self.at0 = None
        self.blocked = None          # (vcpu_id, gfn, at) of the vCPU stopped on a fault
        nv = len(m.vcpus)
        self.blocktime = [0.0] * nv
        self.faults = [0] * nv
        self.pages_written = 0
        self.at = 0.0
        self.done = False            # every page in: a cut now cannot pause

    def received(self, gfns):
        """Pages that arrived: clear their bits (KVM reads the bitmap at each fault)."""
        g = np.asarray(gfns, np.int64)
        g = g[self.owed[g]]
        if not len(g):
            return
        self.owed[g] = False
        lo, hi = int(g.min()) >> 3, (int(g.max()) >> 3) + 1
        self.words[lo:hi] = np.packbits(self.owed[lo * 8:hi * 8], bitorder="little")
        self.m.kvm.write(self.bitmap + lo, self.words[lo:hi].tobytes())

    def step(self, params):
        """A STEP marker: the Host's clock to its time, the guest runs, the ACK goes back."""
        at = float(params["at"])
        if self.base is None:
            self.base, self.at0 = self.guest_clock.now_ns, at
            self.t.guest_ran = True
        self.at = at
        self.guest_clock.advance_to(self.base + at - self.at0)
        want = self._run_guest()
        self.t._reply("pc_ack", step=params["step"], want=want, at=at)

    def _run_guest(self):
        """The guest runs one tick (every vCPU its share) unless a vCPU waits for a page; the
        page a vCPU stops on, if any."""
        if self.blocked is not None:
            vcpu, gfn, since = self.blocked
            if self.owed[gfn]:
                return []
            self.blocktime[vcpu] += self.at - since
            self.blocked = None
        n, fault = self.m.tick_or_userfault()
        if fault is None:
            self.pages_written += n
            return []
        vcpu, gfn = fault
        if not self.owed[gfn]:
            raise StreamError(f"post-copy: userfault on gfn {gfn:#x}, which has arrived")
        self.blocked = (vcpu, gfn, self.at)
        self.faults[vcpu] += 1
        return [gfn]

    def complete(self):
        """Every page is in: the tick in progress ends, USERFAULT goes off, the Host's clock
        takes the target's own charges back. Returns the report for READY."""
        if self.owed.any():
            raise StreamError(f"post-copy complete with {int(self.owed.sum())} pages missing")
        self.done = True
        if self.blocked is not None:
            vcpu, _, since = self.blocked
            self.blocktime[vcpu] += self.at - since
            self.blocked = None
            n, fault = self.m.tick_or_userfault()
            if fault is not None:
                raise StreamError(f"post-copy: userfault on gfn {fault[1]:#x} after the last "
                                  f"page")
            self.pages_written += n
        m = self.m
        m.vm.set_user_memory_region2(SLOT, 0, 0, m.config.mem_size, m.hva)
        spent = dict(self.spent0)
        for k, v in self.t.clock.spent.items():
            spent[k] = spent.get(k, 0.0) + v
        self.t.clock = self.own_clock
        # QEMU's postcopy-blocktime is the time every vCPU waited on a fault at once. The model
        # runs a guest's vCPUs one after another, so one waits at a time: with one vCPU that is
        # its stopped time, with more it never happens.
        total = self.blocktime[0] if len(self.blocktime) == 1 else 0.0
        return spent, {"vcpu_blocktime_ns": self.blocktime, "vcpu_faults": self.faults,
                       "blocktime_ns": total, "pages_written": self.pages_written}


__all__ = ["KINDS", "PostcopySource", "PostcopyTarget", "pack_gfns", "unpack_gfns"]
