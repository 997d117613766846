"""A VMM's guest: the VM, its vCPUs, its memory and the shared-pages tracker, on one Host.

:meth:`Machine.launch` is the source's side: create an SEV (or SEV-ES) VM, launch it as a guest
owner would (a session for the platform's PDH, LAUNCH_UPDATE_DATA of the boot image, for SEV-ES
LAUNCH_UPDATE_VMSA, LAUNCH_MEASURE checked against the owner's own computation, LAUNCH_FINISH)
and boot the workload until it declares itself migration-ready. :meth:`Machine.incoming` is the
target's: the same VM, memory and vCPUs, not launched: RECEIVE_START will give it its context.
"""
import json

import numpy as np

from sevcore.vmm import owner
from sevcore import uapi as U
from sevcore.hw.hostmem import PAGE_SHIFT, PAGE_SIZE
from sevcore.migration.workload import JOURNAL_PAGES, idle_vcpu, workload_main
from sevcore.kvm.ghcb import ghcb_program
from sevcore.kvm.sev_es import build_vmsa
from sevcore.kvm.vcpu import GuestAssertionError
from sevcore.vmm.kvm_util import vm_vcpu_add
from sevcore.vmm.shared_pages import SharedPagesTracker

SLOT = 0


class GuestError(RuntimeError):
    """The guest stopped in a way the VMM did not expect (an abort, an unexpected exit)."""


class LaunchError(RuntimeError):
    """The launch measurement did not match the guest owner's computation."""


class Machine:
    """One guest on one Host, driven as a VMM drives it."""

    def __init__(self, kvm, config):
        if config.c_bit != kvm.host.c_bit:
            raise ValueError(f"the guest was configured for C-bit {config.c_bit}, this Host "
                             f"uses {kvm.host.c_bit}")
        self.kvm, self.host, self.config = kvm, kvm.host, config
        self.vm = vm = kvm.create_vm(config.vm_type)
        vm.memory_encrypt_op(U.KVM_SEV_INIT2)
        self.hva = kvm.mmap(config.mem_size)
        vm.set_user_memory_region2(SLOT, 0, 0, config.mem_size, self.hva)
        self.vcpus = [vm_vcpu_add(vm, i) for i in range(config.nr_vcpus)]      # 64-bit mode
        self.tracker = SharedPagesTracker(vm)
        self.tracker.setup(self.vcpus)
        for v in self.vcpus:
            fn = workload_main if v.vcpu_id == 0 else idle_vcpu
            if config.es:
                fn = ghcb_program(fn, config.layout.ghcb_gpa(v.vcpu_id))
            v.set_guest_code(fn, *((config.to_dict(),) if v.vcpu_id == 0 else ()))
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
    def launch(cls, kvm, config):
        """Create, launch (with a guest-owner session and a checked measurement) and boot."""
        m = cls(kvm, config)
        m._launch()
        m.run_until("ready")
        if not m.tracker.migration_ready:
            raise GuestError("the guest booted without setting KVM_MIGRATION_READY")
        return m

    def _launch(self):
        kvm, vm, policy = self.kvm, self.vm, self.config.policy
        chain = self.host.psp.export_cert_chain()
        self.session = session = owner.create_launch_session(chain.pdh, policy)
        dh, blob = self._put(session.godh_cert), self._put(session.session)
        vm.memory_encrypt_op(U.KVM_SEV_LAUNCH_START, policy=policy, dh_uaddr=dh,
                             dh_len=len(session.godh_cert), session_uaddr=blob,
                             session_len=len(session.session))
        vm.memory_encrypt_reg_region(self.hva, self.config.mem_size)
        image = (1 + JOURNAL_PAGES) * PAGE_SIZE         # header and journal: the boot image
        plaintext = kvm.read(self.hva, image)
        vm.memory_encrypt_op(U.KVM_SEV_LAUNCH_UPDATE_DATA, uaddr=self.hva, len=image)
        measured = [plaintext]
        if self.config.es:
            # The VMSAs as sev_es_sync_vmsa builds them, each measured after the data.
            measured += [build_vmsa(v, vm.sev.vmsa_features) for v in self.vcpus]
            vm.memory_encrypt_op(U.KVM_SEV_LAUNCH_UPDATE_VMSA)
        out = kvm.mmap(PAGE_SIZE)
        vm.memory_encrypt_op(U.KVM_SEV_LAUNCH_MEASURE, uaddr=out, len=48)
        st = self.host.psp.platform_status()
        if not owner.verify_measurement(session.tik, kvm.read(out, 48),
                                        owner.launch_digest(*measured), st.api_major,
                                        st.api_minor, st.build, policy):
            raise LaunchError("LAUNCH_MEASURE does not match the guest owner's measurement")
        vm.memory_encrypt_op(U.KVM_SEV_LAUNCH_FINISH)

    def _put(self, data):
        hva = self.kvm.mmap(max(PAGE_SIZE, len(data)))
        self.kvm.write(hva, data)
        return hva

    # -- the target ------------------------------------------------------------------------------------

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
            run = vcpu.run()
            if self.tracker.handle_exit(vcpu):
                continue
            if run.exit_reason != U.KVM_EXIT_IO:
                raise GuestError(f"unexpected exit {run.exit_reason} from vCPU 0")
            try:
                kind, values = vcpu.get_ucall()
            except GuestAssertionError as e:             # UCALL_ABORT
                raise GuestError(f"guest abort: {e}") from None
            if kind == "sync" and values and values[0] in names:
                return values[1:]
            if kind == "done":
                raise GuestError("the workload ended")

    def tick(self):
        """Let the guest run one tick at the Host's current simulated time; returns the pages
        it wrote."""
        ticks, n = self.run_until("tick")
        self.ticks = ticks
        self.pages_written += n
        return n

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
