"""A VMM's guest: the VM, its vCPUs, its memory and the shared-pages tracker, on one Host.

:meth:`Machine.launch` is the source's side: create an SEV (or SEV-ES) VM, launch it as a guest
owner would (a session for the platform's PDH, LAUNCH_UPDATE_DATA of the boot image, for SEV-ES
LAUNCH_UPDATE_VMSA, LAUNCH_MEASURE checked against the owner's own computation, LAUNCH_FINISH)
and boot the workload until it declares itself migration-ready. :meth:`Machine.incoming` is the
target's: the same VM, memory and vCPUs, not launched: RECEIVE_START will give it its context.
"""
import json
import os
from dataclasses import dataclass
from errno import EFAULT

import numpy as np

from sevcore.core.arrays import sorted_unique

from sevcore.vmm import owner
from sevcore import uapi as U
from sevcore.hw.hostmem import PAGE_SHIFT, PAGE_SIZE
from sevcore.migration.helper import GEN_SHIFT, KEY_SIZE, LANE_SHIFT, MigrationHelper, key_page, state_page
from sevcore.migration.workload import JOURNAL_PAGES, workload_main, workload_vcpu
from sevcore.errors import KvmError
from sevcore.kvm.ghcb import ghcb_program
from sevcore.kvm.sev_es import build_vmsa
from sevcore.kvm.vcpu import GuestAssertionError
from sevcore.vmm.dirty_ring import DirtyRings
from sevcore.vmm.kvm_util import vm_vcpu_add
from sevcore.vmm.shared_pages import SharedPagesTracker

SLOT = 0
#: The boot image LAUNCH_UPDATE_DATA measures and encrypts: the header and the journal.
BOOT_IMAGE_SIZE = (1 + JOURNAL_PAGES) * PAGE_SIZE


def owner_secrets(session, measure, key, layout, opens=0, seals=0):
    """The guest owner's LAUNCH_SECRET packets for an SEV-ES guest's helper, bound to the
    launch's ``measure`` (the 48 bytes of LAUNCH_MEASURE): ``[(gfn, header, ciphertext)]`` for
    the key page (transport ``key``) and the state page. Both helpers of a migration get the
    same key this way, the target's before its first OPEN; the state page makes the target's
    helper open only what generation ``opens`` (the source's) or later sealed, and seal in its
    own generation ``seals`` (helper.GEN_SHIFT), so that no (gfn, seq) is sealed twice under
    the key, whatever the host dropped, and no earlier migration's packets open; a target
    (``seals`` > 0) also learns its generation, so that its vCPUs require the state saved for
    it (workload._restore)."""
    return [(gfn, *owner.package_secret(session.tek, session.tik, page, bytes(measure)[:32]))
            for gfn, page in ((layout.key_gfn, key_page(key)),
                              (layout.state_gfn, state_page(opens << GEN_SHIFT,
                                                            seals << GEN_SHIFT, seals)))]


@dataclass
class GuestOwner:
    """What the guest's owner keeps (sevcore runs the owner in the VMM's process, as it does
    the launch): ``digest``, the launch digest it expects of the guest (and of a target launched
    alike), ``key``, the transport key it gave an SEV-ES guest's helper (None otherwise), and
    the helper generations it has given out (the first launch's is 0). It stays with the guest
    wherever it runs; a target in another process has none."""
    digest: bytes
    key: bytes = None
    generations: int = 1

    def new_generation(self):
        """A helper generation no launch of this guest has had."""
        if self.generations >> (LANE_SHIFT - GEN_SHIFT):
            raise ValueError("the guest owner has no helper generation left")
        self.generations += 1
        return self.generations - 1


class GuestError(RuntimeError):
    """The guest stopped in a way the VMM did not expect (an abort, an unexpected exit)."""


class LaunchError(RuntimeError):
    """The launch measurement did not match the guest owner's computation."""


class Machine:
    """One guest on one Host, driven as a VMM drives it."""

    def __init__(self, kvm, config, dirty_ring_size=0):
        if config.c_bit != kvm.host.c_bit:
            raise ValueError(f"the guest was configured for C-bit {config.c_bit}, this Host "
                             f"uses {kvm.host.c_bit}")
        self.kvm, self.host, self.config = kvm, kvm.host, config
        self.vm = vm = kvm.create_vm(config.vm_type)
        vm.memory_encrypt_op(U.KVM_SEV_INIT2)
        self.hva = kvm.mmap(config.mem_size)
        vm.set_user_memory_region2(SLOT, 0, 0, config.mem_size, self.hva)
        if dirty_ring_size:                # the VMM's choice, before any vCPU (as QEMU's)
            vm.enable_cap(U.KVM_CAP_DIRTY_LOG_RING_ACQ_REL, dirty_ring_size)
        self.vcpus = [vm_vcpu_add(vm, i) for i in range(config.nr_vcpus)]      # 64-bit mode
        #: The vCPUs' dirty rings, and the gfns collected from them since the last sync.
        self.rings = DirtyRings(vm) if dirty_ring_size else None
        self._ring_gfns = []
        self.ring_full_exits = 0
        self.tracker = SharedPagesTracker(vm)
        self.tracker.setup(self.vcpus)
        for v in self.vcpus:
            # vCPU 0 runs the ticks; each other vCPU writes its share of every tick.
            if v.vcpu_id == 0:
                self.set_program(v, workload_main, config.to_dict())
            else:
                self.set_program(v, workload_vcpu, config.to_dict(), v.vcpu_id)
        self.helper = None           # an SEV-ES guest's helper, launched with it
        self.owner = None            # GuestOwner, for a guest this process launched
        self.generation = 0          # its helper's generation (GuestOwner.new_generation)
        self._shares = []            # vCPUs that still owe their share of the current tick
        self.running = None          # the vCPU in KVM_RUN (the one a failure came from)
        self.ticks = 0
        self.pages_written = 0
        self.resumed = None

    @property
    def npages(self):
        return self.config.npages

    def gfn_hvas(self, gfns):
        """The VMM addresses of guest pages ``gfns`` (a uint64 array)."""
        return np.uint64(self.hva) + (np.asarray(gfns, np.uint64) << np.uint64(PAGE_SHIFT))

    # -- the source ----------------------------------------------------------------------------------

    @classmethod
    def launch(cls, kvm, config, dirty_ring_size=0):
        """Create, launch (with a guest-owner session and a checked measurement) and boot;
        ``dirty_ring_size``: bytes of each vCPU's dirty ring (0: the VM logs to bitmaps)."""
        m = cls(kvm, config, dirty_ring_size)
        m._launch()
        m.run_until("ready")
        if not m.tracker.migration_ready:
            raise GuestError("the guest booted without setting KVM_MIGRATION_READY")
        return m

    def _launch(self):
        """The guest owner's launch on this Host: a session for its PDH, the boot image (and
        for SEV-ES the VMSAs, with a helper its mirror's too) measured and checked; with an
        SEV-ES helper, the owner's transport key put in by LAUNCH_SECRET."""
        policy = self.config.policy
        self.session = session = owner.create_launch_session(
            self.host.psp.export_cert_chain().pdh, policy)
        measure = self.launch_measure(policy, session.godh_cert, session.session)
        self.owner = GuestOwner(owner.launch_digest(*self._measured),
                                os.urandom(KEY_SIZE) if self.es_helper else None)
        st = self.host.psp.platform_status()
        if not owner.verify_measurement(session.tik, measure, self.owner.digest,
                                        st.api_major, st.api_minor, st.build, policy):
            raise LaunchError("LAUNCH_MEASURE does not match the guest owner's measurement")
        if self.es_helper:
            for gfn, hdr, trans in owner_secrets(session, measure, self.owner.key,
                                                 self.config.helper_layout):
                self.launch_secret(gfn, hdr, trans)
        self.vm.memory_encrypt_op(U.KVM_SEV_LAUNCH_FINISH)

    @property
    def es_helper(self):
        """An SEV-ES guest with a migration helper: the helper's mirror is launched with it."""
        return self.config.es and self.config.helper_vcpus > 0

    def launch_measure(self, policy, godh_cert, session):
        """LAUNCH_START with the owner's ``godh_cert`` and ``session``, the memory pinned,
        LAUNCH_UPDATE_DATA of the boot image, for SEV-ES LAUNCH_UPDATE_VMSA (with a helper,
        its mirror made now and its VMSAs launched too), LAUNCH_MEASURE: returns the 48 bytes
        MEASURE || MNONCE. ``self._measured`` keeps what was measured."""
        kvm, vm = self.kvm, self.vm
        dh, blob = self._put(godh_cert), self._put(session)
        vm.memory_encrypt_op(U.KVM_SEV_LAUNCH_START, policy=policy, dh_uaddr=dh,
                             dh_len=len(godh_cert), session_uaddr=blob, session_len=len(session))
        vm.memory_encrypt_reg_region(self.hva, self.config.mem_size)
        image = BOOT_IMAGE_SIZE
        plaintext = kvm.read(self.hva, image)
        vm.memory_encrypt_op(U.KVM_SEV_LAUNCH_UPDATE_DATA, uaddr=self.hva, len=image)
        self._measured = measured = [plaintext]
        if self.config.es:
            if self.es_helper:
                # The mirror shares the handle and ASID from LAUNCH_START on; its vCPUs get
                # VMSAs only now, in the guest's measurement (sev_launch_update_vmsa on the
                # mirror: the mirror series' "attested VMSA").
                cfg, lay = self.config, self.config.layout
                self.helper = MigrationHelper(
                    vm, cfg.helper_layout, cfg.helper_vcpus,
                    ghcb_gpas=[lay.helper_ghcb_gpa(j) for j in range(cfg.helper_vcpus)])
            # The VMSAs as sev_es_sync_vmsa builds them, each measured after the data.
            measured += [build_vmsa(v, vm.sev.vmsa_features) for v in self.vcpus]
            vm.memory_encrypt_op(U.KVM_SEV_LAUNCH_UPDATE_VMSA)
            if self.helper is not None:
                measured += self.helper.launch_update_vmsa()
        out = kvm.mmap(PAGE_SIZE)
        vm.memory_encrypt_op(U.KVM_SEV_LAUNCH_MEASURE, uaddr=out, len=48)
        return kvm.read(out, 48)

    def launch_secret(self, gfn, hdr, trans):
        """KVM_SEV_LAUNCH_SECRET of the owner's packet into guest page ``gfn``."""
        hva = self.hva + (int(gfn) << PAGE_SHIFT)
        self.vm.memory_encrypt_op(U.KVM_SEV_LAUNCH_SECRET, hdr_uaddr=self._put(hdr),
                                  hdr_len=len(hdr), guest_uaddr=hva, guest_len=len(trans),
                                  trans_uaddr=self._put(trans), trans_len=len(trans))

    def _put(self, data):
        hva = self.kvm.mmap(max(PAGE_SIZE, len(data)))
        self.kvm.write(hva, data)
        return hva

    # -- the target ------------------------------------------------------------------------------------

    @classmethod
    def launched_target(cls, kvm, config):
        """The target's VM for an SEV-ES guest with a helper: memory, vCPUs and tracker, to be
        launched (:meth:`launch_measure`, :meth:`launch_secret`, LAUNCH_FINISH) by the guest
        owner with the source's image and VMSAs, not received."""
        return cls(kvm, config)

    @classmethod
    def incoming(cls, kvm, config):
        """The target's VM for ``config``: memory, vCPUs and tracker, waiting for RECEIVE_START."""
        m = cls(kvm, config)
        vm = m.vm
        vm.memory_encrypt_reg_region(m.hva, config.mem_size)
        return m

    def frames(self):
        """The host frames behind guest RAM, in gfn order (the region is pinned: all exist)."""
        first = self.hva >> PAGE_SHIFT
        return self.kvm.anon_pfns(np.arange(first, first + self.npages, dtype=np.uint64))

    # -- running ---------------------------------------------------------------------------------------

    def run_until(self, *names):
        """Run vCPU 0 until the workload reports one of ``names``; returns the ucall's values.
        MAP_GPA_RANGE and MIGRATION_CONTROL exits go to the tracker on the way."""
        vcpu = self.vcpus[0]
        while True:
            self._run_shares()
            self.running = vcpu
            run = vcpu.run()
            if self.tracker.handle_exit(vcpu):
                continue
            if run.exit_reason == U.KVM_EXIT_DIRTY_RING_FULL and self.rings is not None:
                self._ring_gfns.append(self.rings.harvest())   # reap, reset, run on
                self.ring_full_exits += 1
                continue
            if run.exit_reason != U.KVM_EXIT_IO:
                raise GuestError(f"unexpected exit {run.exit_reason} from vCPU 0")
            try:
                kind, values = vcpu.get_ucall()
            except GuestAssertionError as e:             # UCALL_ABORT
                raise GuestError(f"guest abort: {e}") from None
            if kind == "sync" and values and values[0] in names:
                return values[1:]
            if kind == "sync" and values and values[0] == "shares":
                self._shares = list(self.vcpus[1:])
            if kind == "done":
                raise GuestError("the workload ended")

    def _run_shares(self):
        """Run each vCPU that owes its share of the tick vCPU 0 started, to its ``share``
        ucall (a failure leaves it owing, to be run again)."""
        while self._shares:
            self._run_to(self._shares[0], "share")
            self._shares.pop(0)

    def set_program(self, vcpu, fn, *args):
        """Give ``vcpu`` the guest program ``fn(g, *args)``; an SEV-ES guest runs it under its
        #VC handler, with the vCPU's own GHCB page."""
        if self.config.es:
            fn = ghcb_program(fn, self.config.layout.ghcb_gpa(vcpu.vcpu_id))
        vcpu.set_guest_code(fn, *args)

    def self_check(self):
        """Have the guest check its own memory now, as it does after a move: its program starts
        again from its entry point (it keeps nothing outside memory, so this changes nothing),
        finds its header and replays its journal. Returns ``(checked, bad, first_bad_gfn)``;
        raises GuestError if the guest cannot run (a SENT context fails VMRUN)."""
        self.set_program(self.vcpus[0], workload_main, self.config.to_dict())
        return self.run_until("resumed")

    def save_vcpus(self):
        """SEV-ES with a helper, between ticks: ask every vCPU to save its state (a fresh
        request in the shared request page), run each until it reports ``saved``; they stay
        parked until :meth:`release_vcpus`."""
        req = int.from_bytes(os.urandom(8), "little") | 1
        self._write_request(req)
        # vCPU 0 last: it notes the request in the header once every other vCPU has saved (one
        # that starts afresh meanwhile restores only what an earlier request saved).
        for vcpu in reversed(self.vcpus):
            self._run_to(vcpu, "saved")

    def release_vcpus(self):
        """Withdraw the save request: parked vCPUs run on (the source after a failed
        migration; the target before its guest first runs, the page having come over)."""
        self._write_request(0)

    def _write_request(self, req):
        gfn = self.config.layout.request_gfn
        self.kvm.write(self.hva + (gfn << PAGE_SHIFT), req.to_bytes(8, "little"))

    def _run_to(self, vcpu, name):
        """Run ``vcpu`` until its ucall ``(name, ...)``."""
        while True:
            self.running = vcpu
            run = vcpu.run()
            if self.tracker.handle_exit(vcpu):
                continue
            try:
                ucall = vcpu.get_ucall()
            except GuestAssertionError as e:
                raise GuestError(f"guest abort on vCPU {vcpu.vcpu_id}: {e}") from None
            if run.exit_reason != U.KVM_EXIT_IO or ucall is None or ucall[0] != "sync":
                raise GuestError(f"unexpected exit {run.exit_reason} ({ucall}) from vCPU "
                                 f"{vcpu.vcpu_id}")
            if not ucall[1] or ucall[1][0] != name:
                raise GuestError(f"vCPU {vcpu.vcpu_id} reported {ucall[1]}, not {name}")
            return ucall[1][1:]

    def tick_or_userfault(self):
        """One tick, or the page vCPU 0 stopped on: ``(pages written, None)`` or ``(None,
        (vcpu_id, gfn))`` when a vCPU's KVM_RUN exits with a KVM Userfault (its operation is
        retried by the next call). Other failures raise as :meth:`tick`."""
        try:
            return self.tick(), None
        except KvmError as e:
            run = self.running.kvm_run
            if e.errno != EFAULT or run.exit_reason != U.KVM_EXIT_MEMORY_FAULT or \
                    not run.memory_fault.flags & U.KVM_MEMORY_EXIT_FLAG_USERFAULT:
                raise
            return None, (self.running.vcpu_id, run.memory_fault.gpa >> PAGE_SHIFT)

    def tick(self):
        """Let the guest run one tick at the Host's current simulated time; returns the pages
        it wrote."""
        ticks, n = self.run_until("tick")
        self.ticks = ticks
        self.pages_written += n
        return n

    def dirty_ring_gfns(self):
        """A ring sync: every ring collected and reset; the sorted gfns dirtied since the last
        one (those reaped at KVM_EXIT_DIRTY_RING_FULL included)."""
        self._ring_gfns.append(self.rings.harvest())
        gfns = sorted_unique(np.concatenate(self._ring_gfns))
        self._ring_gfns = []
        return gfns

    # -- vCPU state --------------------------------------------------------------------------------------

    def vcpu_state(self, vcpu):
        """The vCPU's architectural state the model holds, as bytes: CPUID, the MSRs KVM
        emulates (the TSC as its current value), the VMM's migration-control MSR, and
        KVM_GET_REGS / KVM_GET_SREGS."""
        msrs = {str(k): v for k, v in vcpu.msrs.values.items() if k != U.MSR_IA32_TSC}
        tsc = vcpu.msrs.get(U.MSR_IA32_TSC)[1]
        state = {"vcpu_id": vcpu.vcpu_id, "cpuid": vcpu.get_cpuid2(), "msrs": msrs,
                 "tsc": tsc, "migration_control": self.tracker.migration_control}
        if not vcpu.guest_state_protected:
            # An SEV-ES vCPU's registers are in its encrypted VMSA, which moves by itself
            # (SEND/RECEIVE_UPDATE_VMSA); KVM_GET_REGS/SREGS refuse it (EINVAL).
            state.update(regs=vcpu.get_regs(), sregs=bytes(vcpu.get_sregs()).hex())
        return json.dumps(state, sort_keys=True).encode()

    def load_vcpu_state(self, vcpu_id, data):
        """Install state from :meth:`vcpu_state` (KVM_SET_CPUID2, KVM_SET_SREGS, KVM_SET_REGS,
        KVM_SET_MSRS); ValueError for state that does not fit this VM."""
        try:
            st = json.loads(bytes(data))
            if st["vcpu_id"] != vcpu_id or not 0 <= vcpu_id < len(self.vcpus):
                raise ValueError(f"state for vCPU {st['vcpu_id']} sent as vCPU {vcpu_id}")
            vcpu = self.vcpus[vcpu_id]
            msrs = {int(k): int(v) for k, v in st["msrs"].items()}
            unknown = set(msrs) - set(vcpu.msrs.values)
            if unknown:
                raise ValueError(f"vCPU state names MSRs this vCPU lacks: {sorted(unknown)}")
            vcpu.set_cpuid2(st["cpuid"])
            if "sregs" in st:
                vcpu.set_sregs(U.kvm_sregs.from_buffer_copy(bytes.fromhex(st["sregs"])))
                vcpu.set_regs(**st["regs"])
        except (KeyError, TypeError, json.JSONDecodeError) as e:
            raise ValueError(f"malformed vCPU state: {e}") from None
        vcpu.msrs.values.update(msrs)
        vcpu.msrs.set(U.MSR_IA32_TSC, int(st["tsc"]))
        self.tracker.migration_control = int(st["migration_control"])
