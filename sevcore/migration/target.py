"""The target VMM's side of a migration: it creates the guest from the SETUP record, receives
its pages by either path, and resumes it after RECEIVE_FINISH (docs/migration.md)."""
import contextlib

import numpy as np

from sevcore import uapi as U
from sevcore.hw.hostmem import PAGE_SIZE
from sevcore.migration import driver as D
from sevcore.migration import stream as S
from sevcore.migration.end import _End, _row
from sevcore.migration.errors import GuestLost, PostcopyPaused, StreamError
from sevcore.migration.helper import PACKET_SIZE, MigrationHelper
from sevcore.migration.machine import Machine
from sevcore.migration.params import MigrationParams
from sevcore.migration.postcopy import CUT, PostcopyTarget, pack_gfns
from sevcore.migration.workload import GuestConfig
from sevcore.vmm.kvm_util import kvm_vm_free


class Target(_End):
    """The target VMM: builds the incoming guest on ``kvm``'s Host from the stream on
    ``channel``. :meth:`run` returns the running :class:`Machine`. Its own work is charged to
    ``clock`` (default: its Host's clock); the source's driver keeps the migration's timeline."""

    def __init__(self, kvm, channel, clock=None):
        self.kvm, self.channel = kvm, channel
        self.clock = kvm.host.clock if clock is None else clock
        self.m = None
        self.result = None
        self._pending = []
        self.postcopy = None         # PostcopyTarget once the guest runs here with pages owed
        self.paused = False          # post-copy waits for the source on a new connection
        self.guest_ran = False       # the guest has run here (post-copy, or after the finish)
        self.populate = True         # fault the incoming frames in from another thread

    def run(self):
        """Receive, apply, finish and resume; raises on any failure after telling the source
        (ERROR) and destroying the incoming VM; a cut during post-copy raises PostcopyPaused
        with the guest kept (call :meth:`resume` or :meth:`give_up`)."""
        return self._guarded(self._receive)

    def resume(self, channel):
        """Continue a paused post-copy on a new ``channel``: answer the source's RESUME with
        the pages still owed and the one vCPU 0 waits for, then receive on. Returns and raises
        as :meth:`run`; ValueError if nothing is paused."""
        if not self.paused:
            raise ValueError("nothing to resume: no post-copy is paused")
        self.channel, self.paused = channel, False
        return self._guarded(self._resume)

    def give_up(self):
        """The source is not coming back: the guest, which lacks pages, is lost; the VM is
        destroyed. Returns the GuestLost to report."""
        e = GuestLost("the guest is lost: post-copy paused and the source never came back")
        self.paused = False
        self._teardown()                    # the channel is already gone: nobody to tell
        return e

    def _guarded(self, body):
        self.reader = S.StreamReader(self.channel, reuse=True)    # each record is used at once
        self.writer = S.StreamWriter(self.channel)
        try:
            body()
        except BaseException as e:
            if self.postcopy is not None and not self.postcopy.done and isinstance(e, CUT):
                self.paused = True
                self._pending = []          # not applied: still owed, the source resends
                try:
                    self.channel.close()
                except OSError:
                    pass
                raise PostcopyPaused(f"post-copy paused, nothing lost: {type(e).__name__}: "
                                     f"{e}") from e
            self._fail(e)
            raise
        return self.m

    def _resume(self):
        rec = self.reader.read()
        if not isinstance(rec, S.Setup) or rec.params.get("kind") != "resume":
            raise StreamError("a resumed stream must start with RESUME")
        pc = self.postcopy
        self._reply("resume_ack", owed=pack_gfns(np.flatnonzero(pc.owed), self.m.npages),
                    want=[] if pc.blocked is None else [pc.blocked[1]], at=pc.at)
        self._receive_records()
        self._finish()

    def _fail(self, e):
        try:
            # Whether the guest ran here: until it has, the source may still take it back.
            self.writer.setup({"kind": "error", "message": f"{type(e).__name__}: {e}",
                               "ran": self.guest_ran})
            self.writer.flush()
        except (StreamError, OSError):
            pass
        self._teardown()

    def _teardown(self):
        if self.m is not None and self.m.helper is not None:
            # An SEV-ES guest's helper, launched with it (kept with the guest once it runs,
            # made before this side took it): its mirror holds the guest's VM, so it goes too.
            self.helper, self.m.helper = self.m.helper, None
        self._close()                       # the helper's mirror goes before its owner VM
        if self.m is not None:
            kvm_vm_free(self.m.vm)          # its vCPU fds too: each one pins the VM

    def _charge(self, work):
        D.charge(self.cost, self.clock, work)

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
        helper = bool(self.reader.flags & S.FLAG_HELPER)
        if helper and cfg.helper_layout is None:
            raise StreamError("a helper-path stream for a guest without a helper")
        #: SEV-ES by the helper: the guest owner launches this side (docs/migration.md).
        self.es_helper = helper and cfg.es
        self.m = m = (Machine.launched_target if self.es_helper else Machine.incoming)(kvm, cfg)
        chain = kvm.host.psp.export_cert_chain()
        self._reply("hello", pdh=chain.pdh.hex(), plat_certs=chain.plat_certs.hex(),
                    amd_certs=chain.amd_certs.hex())
        if self.es_helper:
            self._launch()
        else:
            rec = self.reader.read()
            if not isinstance(rec, S.SevSession):
                raise StreamError(f"expected SEV_SESSION, got {type(rec).__name__}")
            self._receive_start(rec)
            if helper:
                self.helper = MigrationHelper(m.vm, cfg.helper_layout, cfg.helper_vcpus)
        # The host OS's page faults on the incoming guest's frames (pinned, never written) are
        # taken by another thread ahead of the stores (HostMemory.populating); the model is
        # unchanged.
        with kvm.host.mem.populating(m.frames()) if self.populate else contextlib.nullcontext():
            self._receive_records()
        self._finish()

    def _launch(self):
        """The guest owner's launch of this side with the source's image and VMSAs (the
        guest's and its helper's, the mirror made here): LAUNCH_START .. LAUNCH_MEASURE, the
        measurement back to the owner, then its LAUNCH_SECRET packets (the helper's key and
        state pages) and LAUNCH_FINISH."""
        m = self.m
        rec = self._setup_record("launch")
        try:
            policy = int(rec["policy"])
            godh, session = bytes.fromhex(rec["godh_cert"]), bytes.fromhex(rec["session"])
        except (KeyError, TypeError, ValueError) as e:
            raise StreamError(f"malformed launch record: {e}") from None
        if policy != m.config.policy:
            raise StreamError(f"a launch under policy {policy:#x} for a guest of policy "
                              f"{m.config.policy:#x}")
        measure = m.launch_measure(policy, godh, session)
        self.helper = m.helper
        for _ in range(4 + len(m.config.helper_layout.private_gfns())):
            self._charge(D.psp_command())
        st = self.kvm.host.psp.platform_status()
        self._reply("measured", measure=measure.hex(), api_major=st.api_major,
                    api_minor=st.api_minor, build=st.build)
        wanted = [int(g) for g in m.config.helper_layout.private_gfns()]
        for gfn in wanted:
            rec = self._setup_record("secret")
            try:
                got, hdr, trans = int(rec["gfn"]), bytes.fromhex(rec["hdr"]), \
                    bytes.fromhex(rec["trans"])
            except (KeyError, TypeError, ValueError) as e:
                raise StreamError(f"malformed secret record: {e}") from None
            if got != gfn or len(trans) != PAGE_SIZE:
                raise StreamError(f"a LAUNCH_SECRET for gfn {got:#x} ({len(trans)} bytes), not "
                                  f"the helper's page {gfn:#x}")
            m.launch_secret(gfn, hdr, trans)
            self._charge(D.psp_command())
        m.vm.memory_encrypt_op(U.KVM_SEV_LAUNCH_FINISH)
        self._charge(D.psp_command())

    def _setup_record(self, kind):
        rec = self.reader.read()
        if not isinstance(rec, S.Setup) or rec.params.get("kind") != kind:
            raise StreamError(f"expected the owner's {kind} record, got "
                              f"{type(rec).__name__ if rec else 'the end of the stream'}")
        return rec.params

    def _finish(self):
        m = self.m
        if getattr(self, "es_helper", False):
            # Launched, not received: nothing to finish. The helper stays with the guest (its
            # mirror's VMSAs cannot be launched again); the vCPUs' save request, which came
            # over with the shared pages, is withdrawn before they run.
            self.helper = None
            m.release_vcpus()
        else:
            m.vm.memory_encrypt_op(U.KVM_SEV_RECEIVE_FINISH)
            self._charge(D.psp_command())
            self._close_helper()
        self.guest_ran = True
        # After post-copy the guest has been running: it checks its memory now, every page in.
        checked, bad, first_bad = m.self_check() if self.postcopy else m.run_until("resumed")
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
            elif isinstance(rec, S.Setup) and rec.params.get("kind") == "vmsa":
                self._receive_vmsa(rec.params)
            elif isinstance(rec, S.Setup) and rec.params.get("kind") == "shared_ranges":
                for s, e in rec.params["ranges"]:
                    m.tracker.shared.add(int(s), int(e))
            elif isinstance(rec, S.Setup) and rec.params.get("kind") == "postcopy":
                if self.postcopy is not None:
                    raise StreamError("a second POSTCOPY record")
                self.postcopy = PostcopyTarget(self, rec.params)
            elif isinstance(rec, S.Setup) and rec.params.get("kind") == "pc_step":
                if self.postcopy is None:
                    raise StreamError("a post-copy STEP before POSTCOPY")
                self.postcopy.step(rec.params)
            elif isinstance(rec, S.Setup) and rec.params.get("kind") == "complete":
                missing = [v.vcpu_id for v in m.vcpus
                           if m.config.es and not v.guest_state_protected]
                if missing:
                    raise StreamError(f"no VMSA came for SEV-ES vCPU(s) {missing}")
                if self.postcopy is not None:
                    spent, report = self.postcopy.complete()
                    self._reply("ready", time_spent=spent, postcopy=report)
                else:
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
        if self.postcopy is not None:
            self.postcopy.received(gfns)
        self._charge(D.helper_pages(len(gfns), self.m.config.helper_vcpus,
                                    self.helper.counters.exits - exits0))

    def _receive_start(self, rec):
        kvm, vm = self.kvm, self.m.vm
        pdh, sess = kvm.mmap(max(PAGE_SIZE, len(rec.pdh))), kvm.mmap(PAGE_SIZE)
        kvm.write(pdh, rec.pdh)
        kvm.write(sess, rec.session)
        vm.memory_encrypt_op(U.KVM_SEV_RECEIVE_START, policy=rec.policy, pdh_uaddr=pdh,
                             pdh_len=len(rec.pdh), session_uaddr=sess,
                             session_len=len(rec.session))
        self._charge(D.psp_command())

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
        if self.postcopy is not None:
            self.postcopy.received(gfns)
        self._charge(D.psp_pages(len(gfns), self.params.ring_buffer))

    def _receive_vmsa(self, rec):
        """KVM_SEV_RECEIVE_UPDATE_VMSA of one vCPU's packet (out-of-tree KVM)."""
        if not self.m.config.es:
            raise StreamError("a VMSA record for a guest that is not SEV-ES")
        try:
            vcpu_id = int(rec["vcpu_id"])
            hdr, trans = bytes.fromhex(rec["hdr"]), bytes.fromhex(rec["trans"])
        except (KeyError, TypeError, ValueError) as e:
            raise StreamError(f"malformed VMSA record: {e}") from None
        kvm = self.kvm
        hva = kvm.mmap(PAGE_SIZE + max(PAGE_SIZE, len(trans)))
        kvm.write(hva, hdr)
        kvm.write(hva + PAGE_SIZE, trans)
        self.m.vm.memory_encrypt_op(U.KVM_SEV_RECEIVE_UPDATE_VMSA, vcpu_id=vcpu_id,
                                    hdr_uaddr=hva, hdr_len=len(hdr), trans_uaddr=hva + PAGE_SIZE,
                                    trans_len=len(trans))
        kvm.munmap(hva, PAGE_SIZE + max(PAGE_SIZE, len(trans)))
        self._charge(D.psp_pages(1, False))

    def _receive_shared(self, gfns, data):
        gfns = self._check_gfns(gfns)
        self.kvm.write_pages(self.m.gfn_hvas(gfns), data)
        self._charge(D.shared_pages(len(gfns)))

    def _receive_zero(self, rec):
        gfns = self._check_gfns(np.arange(rec.gfn, rec.gfn + rec.npages, dtype=np.uint64))
        self.kvm.write_pages(self.m.gfn_hvas(gfns), np.zeros(len(gfns) * PAGE_SIZE, np.uint8))
        self._charge(D.shared_pages(len(gfns)))
