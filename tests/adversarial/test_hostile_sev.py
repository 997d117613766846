"""A hostile VMM against KVM's SEV layer: every ``KVM_SEV_*`` command id (and ids that are none)
with hostile struct fields at every launch and migration state of the guest, REG/UNREG_REGION,
the batched SEND/RECEIVE_UPDATE_DATA pages, mirror VMs and intra-host moves
(KVM_CAP_VM_COPY_ENC_CONTEXT_FROM / MOVE), guest programs writing through their key, and fds
closed in any order. A second host is the migration target: SEND_START gets its certificate
chain, and a VM there takes RECEIVE_START and the pages.

After every step: only OSError (a real errno), ValueError or TypeError escaped; a refused call
changed nothing observable (VMM memory, memslots, NPT, ``vm.sev``, KVM_SEV_GUEST_STATUS,
pages_locked), except where the kernel itself changes state before failing (see
:meth:`HostileSev.partial_effect`); the plaintext an SEV guest wrote through its key is in no
frame either VMM can read (unless the owner's policy let the host decrypt it); pages_locked
counts exactly the registered regions; no NPT entry points at a frame its VM does not own.
"""
from errno import EFAULT

import numpy as np
import pytest
from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import (RuleBasedStateMachine, initialize, invariant, rule,
                                 run_state_machine_as_test)

from sevcore.kvm.sev import STRUCTS
from sevcore.uapi import *
from sevcore.vmm.kvm_util import sev_receive_start, sev_send_start

from advutil import (DEFAULT, EDGES, NON_INTS, P, SLOW, Counted, assert_markers_hidden,
                     assert_npt_owned, attempt, diff, hostile_int, mostly, new_host, run_guest,
                     vm_state, vmm_memory_digest)

NPAGES = 16
#: Every command id KVM defines, and some it does not.
SEV_IDS = tuple(range(0, 23)) + (KVM_SEV_SNP_LAUNCH_START, KVM_SEV_SNP_LAUNCH_UPDATE,
                                 KVM_SEV_SNP_LAUNCH_FINISH, KVM_SEV_NR_MAX, 255)
#: The struct each id takes (sevcore.kvm.sev.STRUCTS), for drawing plausible field names.
ID_STRUCT = {
    KVM_SEV_INIT2: "init", KVM_SEV_LAUNCH_START: "launch_start",
    KVM_SEV_LAUNCH_UPDATE_DATA: "launch_update_data", KVM_SEV_LAUNCH_SECRET: "launch_secret",
    KVM_SEV_LAUNCH_MEASURE: "launch_measure", KVM_SEV_GUEST_STATUS: "guest_status",
    KVM_SEV_DBG_DECRYPT: "dbg", KVM_SEV_DBG_ENCRYPT: "dbg",
    KVM_SEV_GET_ATTESTATION_REPORT: "attestation_report", KVM_SEV_SEND_START: "send_start",
    KVM_SEV_SEND_UPDATE_DATA: "send_update_data", KVM_SEV_RECEIVE_START: "receive_start",
    KVM_SEV_RECEIVE_UPDATE_DATA: "receive_update_data",
}
LENGTHS = (0, 1, 15, 16, 48, 52, 128, 256, 2084, P - 1, P, P + 16, 2 * P, NPAGES * P,
           SEV_FW_BLOB_MAX_SIZE, SEV_FW_BLOB_MAX_SIZE + 1)
#: The legitimate next steps a VMM takes, in lifecycle order.
STEPS = ("init", "create_vcpu", "launch_start", "launch_update_data", "launch_update_vmsa",
         "launch_measure", "launch_finish", "send_start", "send_pages", "send_finish",
         "send_cancel", "reg_region", "receive_pages", "receive_finish")
pick = st.integers(0, 1 << 16)


def ghcb_exchange(g, value):
    """Guest code: write ``value`` to the GHCB MSR and VMGEXIT (an SEV-ES guest's one way to
    the hypervisor; elsewhere a WRMSR and a VMMCALL)."""
    yield g.wrmsr_safe(MSR_AMD64_SEV_ES_GHCB, value)
    return (yield g.vmgexit())


class HostileSev(Counted, RuleBasedStateMachine):
    """A VMM that launches and migrates SEV guests and misuses every command on the way."""

    def __init__(self):
        super().__init__()
        self.host = new_host(21)
        self.kvm = self.host.kvm
        self.target = new_host(22)            # the migration target
        self.tkvm = self.target.kvm
        self.vms, self.vcpus, self.gmems = [], [], []
        self.markers = []                     # (marker, context key)
        self.declassified = set()             # context keys whose plaintext DBG_DECRYPT showed
        self.session = None                   # SEND_START's session, for RECEIVE_START
        self.packets = None                   # (pages, hdrs, trans) of the last send
        self.received = 0
        self.nmark = 0

    # -- set-up ---------------------------------------------------------------------------------

    @initialize(type=st.sampled_from([KVM_X86_SEV_VM, KVM_X86_SEV_ES_VM, KVM_X86_DEFAULT_VM]),
                nodbg=st.booleans(), es_policy=st.booleans(), depth=st.integers(0, 16))
    def setup(self, type, nodbg, es_policy, depth):
        """One guest with 16 pages of RAM; user buffers of every kind; the guest taken
        ``depth`` steps along its launch and migration, so that every state is a start."""
        self.type = type
        es = type == KVM_X86_SEV_ES_VM or (type == KVM_X86_DEFAULT_VM and es_policy)
        self.policy = (SEV_POLICY_NO_DBG if nodbg else 0) | (SEV_POLICY_ES if es else 0)
        self.legacy_es = type == KVM_X86_DEFAULT_VM and es
        vm = self.kvm.create_vm(type)
        self.ram = self.kvm.mmap(NPAGES * P)
        self.kvm.write(self.ram, bytes(range(256)) * (NPAGES * P // 256))
        vm.set_user_memory_region2(0, 0, 0, NPAGES * P, self.ram)
        self.vms.append(vm)
        self.buf = self.kvm.mmap(8 * P)
        self.kvm.write(self.buf, b"\x5a" * (8 * P))
        # SIGBUS user addresses: a private guest_memfd page, a shared one past the file's end.
        pvm = self.kvm.create_vm(KVM_X86_SW_PROTECTED_VM)
        pg = pvm.create_guest_memfd(2 * P, GUEST_MEMFD_FLAG_MMAP)
        svm = self.kvm.create_vm(KVM_X86_DEFAULT_VM)
        sg = svm.create_guest_memfd(P, GUEST_MEMFD_FLAG_MMAP | GUEST_MEMFD_FLAG_INIT_SHARED)
        self.gmems += [pg, sg]
        private, shared = pg.mmap(2 * P), sg.mmap(2 * P)
        self.addrs = [self.buf, self.buf + 8, self.buf + P - 8, self.buf + 7 * P,
                      self.ram, self.ram + P, self.ram + 3, self.ram + (NPAGES - 1) * P,
                      private, shared + P, shared, 0x10000, self.buf + 8 * P, 0,
                      self.buf + 9 * P]
        vcpu = svm.create_vcpu(0)
        # The target: a VM whose INIT2 initialised the platform (sev_platform_init), so its
        # certificate chain is ready for SEND_START.
        self.tvm = self.tkvm.create_vm(KVM_X86_SEV_ES_VM if es else KVM_X86_SEV_VM)
        self.tram = self.tkvm.mmap(NPAGES * P)
        self.tvm.set_user_memory_region2(0, 0, 0, NPAGES * P, self.tram)
        self.tvm.memory_encrypt_op(KVM_SEV_INIT2)
        self.chain = self.target.psp.export_cert_chain()
        self.certs = {}                       # the chain's blobs in the source VMM's memory
        for name in ("pdh", "plat_certs", "amd_certs"):
            blob = getattr(self.chain, name)
            self.certs[name] = (self.kvm.mmap(len(blob)), len(blob))
            self.kvm.write(self.certs[name][0], blob)
        self.tbuf = self.tkvm.mmap(8 * P)     # the target VMM's buffers: pdh, session, packet
        self.tkvm.write(self.tbuf, bytes(8 * P))
        closed = self.host.memfd_create()
        closed.close()
        self.foreign_fds = [vcpu, vcpu.fd, self.host.memfd_create().fd, closed.fd,
                            pvm, pvm.fd, self.target.kvm.create_vm(KVM_X86_SEV_VM), 10 ** 6, -1,
                            None, "3"]
        for _ in range(depth):
            getattr(self, "step_" + self.next_step(vm))(vm)

    # -- helpers ----------------------------------------------------------------------------------

    def item(self, seq, i):
        return seq[i % len(seq)] if seq else None

    def sev_vms(self):
        return [vm for vm in self.vms if vm.type in (KVM_X86_SEV_VM, KVM_X86_SEV_ES_VM,
                                                     KVM_X86_DEFAULT_VM)]

    def status(self, vm):
        out = attempt(vm.memory_encrypt_op, KVM_SEV_GUEST_STATUS)
        return (out.value.handle, out.value.policy, out.value.state) if out.ok else out.errno

    def snapshot(self):
        vms = self.vms + [self.tvm]
        return (vmm_memory_digest(self.kvm), vmm_memory_digest(self.tkvm),
                [vm_state(vm) for vm in vms], [self.status(vm) for vm in vms],
                sorted(self.host._fds))

    def refusable(self, what, fn, *args, partial=None, **kwargs):
        """A call that must succeed, or be refused with nothing changed unless ``partial``
        (the outcome -> reason the kernel changes state first) says why something may have."""
        before = self.snapshot()
        out = attempt(fn, *args, **kwargs)
        self.tally(what, out)
        if not out.ok:
            after = self.snapshot()
            why = partial(out) if partial is not None else None
            assert why or after == before, \
                f"{what} refused with {out.exc!r} changed {diff(before[2:], after[2:])}" \
                f" (VMM memory changed: {before[:2] != after[:2]})"
        return out

    def op(self, vm, id, data=True, sev_fd=None, **fields):
        """KVM_MEMORY_ENCRYPT_OP as a refusable call. What a DBG_DECRYPT shows the host (all
        of it, or the chunks before one failed) is no longer secret: the owner's policy let
        the host decrypt the guest."""
        decrypt = id == KVM_SEV_DBG_DECRYPT
        before = vmm_memory_digest(self.kvm) if decrypt else None
        out = self.refusable(f"SEV {id}", vm.memory_encrypt_op, id, data, sev_fd,
                             partial=lambda out: self.partial_effect(vm, id, fields, out),
                             **fields)
        if decrypt and (out.ok or vmm_memory_digest(self.kvm) != before):
            self.declassified.add(self.context(vm))
        return out

    def partial_effect(self, vm, id, fields, out):
        """Why the kernel may change state before it fails this command (None: it may not).

        - LAUNCH_MEASURE, SEND_START, SEND_UPDATE_DATA and GET_ATTESTATION_REPORT copy their
          results to user space after the firmware command (sev_launch_measure,
          sev_send_start, sev_send_update_data, sev_get_attestation_report): an EFAULT there
          leaves the firmware's state changed (LAUNCH_SECRET, SEND_UPDATE ...).
        - DBG_DECRYPT and DBG_ENCRYPT work a page-bounded chunk at a time (sev_dbg_crypt): a
          chunk after the first may fail with the earlier ones done.
        """
        if out.errno == EFAULT and id in (KVM_SEV_LAUNCH_MEASURE, KVM_SEV_SEND_START,
                                          KVM_SEV_SEND_UPDATE_DATA,
                                          KVM_SEV_GET_ATTESTATION_REPORT):
            return "copy_to_user after the firmware command"
        if id in (KVM_SEV_DBG_DECRYPT, KVM_SEV_DBG_ENCRYPT):
            src, dst, n = (fields.get(k, 0) for k in ("src_uaddr", "dst_uaddr", "len"))
            if all(isinstance(v, int) for v in (src, dst, n)) and \
                    n > min(P - src % P, P - dst % P):
                return "sev_dbg_crypt: a later chunk failed"
        return None

    def context(self, vm):
        """The key a marker of ``vm`` is filed under: its firmware handle (a mirror's is its
        owner's)."""
        return vm.sev.handle

    # -- the legitimate path ------------------------------------------------------------------------

    @rule(v=pick, wild=mostly(False, True), step=st.sampled_from(STEPS))
    def advance(self, v, wild, step):
        """The command a VMM issues next in a launch or a migration, with valid fields: the
        one the guest's state calls for, or (``wild``) any step of the lifecycle."""
        vm = self.item(self.sev_vms(), v)
        if vm is None:
            return
        getattr(self, "step_" + (step if wild else self.next_step(vm)))(vm)

    def next_step(self, vm):
        s = vm.sev
        if not s.active:
            return "init"
        if not vm.vcpus:
            return "create_vcpu"
        g = vm.host.psp.guest(s.handle) if s.handle else None
        if g is None:
            return "launch_start"
        if g.state == SEV_GUEST_STATE_LAUNCH_UPDATE:
            if not s.regions:
                return "reg_region"
            if self.kvm.read(self.ram, 16) == bytes(range(16)):       # still plaintext
                return "launch_update_data"
            if s.es_active and not all(v.guest_state_protected for v in vm.vcpus):
                return "launch_update_vmsa"
            return "launch_measure"
        if g.state == SEV_GUEST_STATE_LAUNCH_SECRET:
            return "launch_finish"
        if g.state == SEV_GUEST_STATE_RUNNING:
            return "send_start"
        if g.state == SEV_GUEST_STATE_SEND_UPDATE:
            if self.packets is None:
                return "send_pages"
            if not self.tvm.sev.handle or self.received < 1:
                return "receive_pages"
            return "send_finish"
        return "receive_finish"

    def step_init(self, vm):
        if vm.type == KVM_X86_DEFAULT_VM:
            self.op(vm, KVM_SEV_ES_INIT if self.legacy_es else KVM_SEV_INIT, data=None)
        else:
            self.op(vm, KVM_SEV_INIT2)

    def step_create_vcpu(self, vm):
        out = self.refusable("create_vcpu", vm.create_vcpu, len(vm.vcpus))
        if out.ok:
            self.vcpus.append(out.value)

    def step_launch_start(self, vm):
        self.op(vm, KVM_SEV_LAUNCH_START, policy=self.policy)

    def step_launch_update_data(self, vm):
        self.op(vm, KVM_SEV_LAUNCH_UPDATE_DATA, uaddr=self.ram, len=NPAGES * P)

    def step_launch_update_vmsa(self, vm):
        self.op(vm, KVM_SEV_LAUNCH_UPDATE_VMSA)

    def step_launch_measure(self, vm):
        self.op(vm, KVM_SEV_LAUNCH_MEASURE, uaddr=self.buf, len=256)

    def step_launch_finish(self, vm):
        self.op(vm, KVM_SEV_LAUNCH_FINISH)

    def step_send_start(self, vm):
        before = self.snapshot()
        out = attempt(sev_send_start, vm, self.chain)
        self.tally("send_start", out)
        if out.ok:
            self.session = (out.value, vm.sev.policy)
            pdh = self.host.psp.pdh_cert_export().pdh_cert
            self.tkvm.write(self.tbuf, pdh)
            self.tkvm.write(self.tbuf + P, out.value)
            self.pdh_len = len(pdh)
        elif out.errno != EFAULT:
            after = self.snapshot()
            # sev_send_start maps fresh user buffers for the certificates first.
            assert before[1:] == after[1:], f"SEND_START refused: {diff(before[2:], after[2:])}"

    def step_send_pages(self, vm):
        uaddrs = self.ram + P * np.arange(NPAGES, dtype=np.uint64)
        out = self.refusable("send pages", vm.sev_send_update_data_pages, uaddrs,
                             partial=lambda o: getattr(o.exc, "index", 0) and "pages before")
        if out.ok:
            self.packets = (NPAGES, *out.value)
            self.tkvm.write(self.tbuf + 2 * P, out.value[0][0].tobytes())
            self.tkvm.write(self.tbuf + 3 * P, out.value[1][0].tobytes())

    def step_send_finish(self, vm):
        self.op(vm, KVM_SEV_SEND_FINISH)

    def step_send_cancel(self, vm):
        self.op(vm, KVM_SEV_SEND_CANCEL)

    def step_reg_region(self, vm):
        self.refusable("reg_region", vm.memory_encrypt_reg_region, self.ram, NPAGES * P)

    def step_receive_pages(self, vm):
        """The target: RECEIVE_START with the last session, then the last packets."""
        if self.session is None:
            return
        if not self.tvm.sev.handle:
            session, policy = self.session
            pdh = self.host.psp.pdh_cert_export().pdh_cert
            out = attempt(sev_receive_start, self.tvm, policy, pdh, session)
            self.tally("receive_start", out)
            return
        if self.packets is not None:
            n, hdrs, trans = self.packets
            uaddrs = self.tram + P * np.arange(n, dtype=np.uint64)
            out = self.refusable("receive pages", self.tvm.sev_receive_update_data_pages,
                                 uaddrs, hdrs, trans,
                                 partial=lambda o: getattr(o.exc, "index", 0) and "pages before")
            self.received += 1

    def step_receive_finish(self, vm):
        self.op(self.tvm, KVM_SEV_RECEIVE_FINISH)

    # -- hostile commands ---------------------------------------------------------------------------

    def draw_value(self, data, name):
        """A hostile value for struct field ``name``."""
        if name.endswith("uaddr"):
            return data.draw(st.one_of(st.sampled_from(self.addrs), st.sampled_from(self.addrs),
                                       hostile_int()), label=name)
        if name.endswith("len"):
            return data.draw(hostile_int(*LENGTHS), label=name)
        if name == "mnonce":
            return data.draw(st.one_of(st.just(bytes(16)), st.binary(max_size=20),
                                       st.sampled_from(NON_INTS)), label=name)
        good = {"policy": (0, self.policy, SEV_POLICY_ES), "handle": (0, 1, 2),
                "ghcb_version": (0, 1, 2), "vmsa_features": (0, SVM_SEV_FEAT_DEBUG_SWAP)}
        return data.draw(hostile_int(*good.get(name, (0,))), label=name)

    def template(self, vm, id):
        """Fields with which command ``id`` goes through on ``vm`` in the right state (the
        buffers are the target's for the target VM), or None."""
        if vm is self.tvm:
            if id == KVM_SEV_RECEIVE_START and self.session is not None:
                return dict(policy=self.session[1], pdh_uaddr=self.tbuf, pdh_len=self.pdh_len,
                            session_uaddr=self.tbuf + P, session_len=len(self.session[0]))
            if id == KVM_SEV_RECEIVE_UPDATE_DATA:
                return dict(hdr_uaddr=self.tbuf + 2 * P, hdr_len=52, guest_uaddr=self.tram,
                            guest_len=P, trans_uaddr=self.tbuf + 3 * P, trans_len=P)
        buf, ram = self.buf, self.ram
        return {
            KVM_SEV_INIT2: dict(vmsa_features=0, flags=0, ghcb_version=0),
            KVM_SEV_LAUNCH_START: dict(policy=self.policy),
            KVM_SEV_LAUNCH_UPDATE_DATA: dict(uaddr=ram, len=NPAGES * P),
            KVM_SEV_LAUNCH_SECRET: dict(hdr_uaddr=buf, hdr_len=52, guest_uaddr=ram + P,
                                        guest_len=32, trans_uaddr=buf + P, trans_len=32),
            KVM_SEV_LAUNCH_MEASURE: dict(uaddr=buf, len=256),
            KVM_SEV_GUEST_STATUS: {},
            KVM_SEV_DBG_DECRYPT: dict(src_uaddr=ram + 16, dst_uaddr=buf, len=32),
            KVM_SEV_DBG_ENCRYPT: dict(src_uaddr=buf, dst_uaddr=ram + 16, len=32),
            KVM_SEV_GET_ATTESTATION_REPORT: dict(mnonce=bytes(16), uaddr=buf, len=P),
            KVM_SEV_SEND_START: dict(
                policy=self.policy, session_uaddr=buf, session_len=128,
                pdh_cert_uaddr=self.certs["pdh"][0], pdh_cert_len=self.certs["pdh"][1],
                plat_certs_uaddr=self.certs["plat_certs"][0],
                plat_certs_len=self.certs["plat_certs"][1],
                amd_certs_uaddr=self.certs["amd_certs"][0],
                amd_certs_len=self.certs["amd_certs"][1]),
            KVM_SEV_SEND_UPDATE_DATA: dict(hdr_uaddr=buf, hdr_len=52, guest_uaddr=ram,
                                           guest_len=P, trans_uaddr=buf + P, trans_len=P),
        }.get(id)

    def fitting_ids(self, vm):
        """The commands the guest's state is ready for."""
        if vm is self.tvm:
            return (KVM_SEV_RECEIVE_UPDATE_DATA, KVM_SEV_RECEIVE_FINISH) if vm.sev.handle \
                else (KVM_SEV_RECEIVE_START,)
        s = vm.sev
        if not s.active:
            return (KVM_SEV_INIT, KVM_SEV_ES_INIT, KVM_SEV_INIT2)
        g = vm.host.psp.guest(s.handle) if s.handle else None
        state = None if g is None else g.state
        return {
            None: (KVM_SEV_LAUNCH_START,),
            SEV_GUEST_STATE_LAUNCH_UPDATE: (KVM_SEV_LAUNCH_UPDATE_DATA, KVM_SEV_LAUNCH_UPDATE_VMSA,
                                            KVM_SEV_LAUNCH_MEASURE, KVM_SEV_DBG_ENCRYPT),
            SEV_GUEST_STATE_LAUNCH_SECRET: (KVM_SEV_LAUNCH_SECRET, KVM_SEV_LAUNCH_FINISH,
                                            KVM_SEV_GET_ATTESTATION_REPORT),
            SEV_GUEST_STATE_RUNNING: (KVM_SEV_SEND_START, KVM_SEV_DBG_DECRYPT,
                                      KVM_SEV_DBG_ENCRYPT, KVM_SEV_GET_ATTESTATION_REPORT),
            SEV_GUEST_STATE_SEND_UPDATE: (KVM_SEV_SEND_UPDATE_DATA, KVM_SEV_SEND_FINISH,
                                          KVM_SEV_SEND_CANCEL),
        }.get(state, (KVM_SEV_GUEST_STATUS,))

    @rule(v=pick, id=st.one_of(st.just("fitting"), st.sampled_from(SEV_IDS), hostile_int()),
          data=st.data(),
          null=mostly(False, True), fd=mostly(None, *range(10)), wrong_struct=mostly(False, True),
          on_target=mostly(False, True))
    def hostile_op(self, v, id, data, null, fd, wrong_struct, on_target):
        """Any command id on either host's VM, with the fields that make it go through and one
        or more of them hostile, or with any fields (sometimes another struct's), a NULL data
        pointer, or an sev_fd that is no /dev/sev."""
        vm = self.tvm if on_target else self.item(self.vms, v)
        if id == "fitting":
            id = data.draw(st.sampled_from(self.fitting_ids(vm)), label="id")
        template = self.template(vm, id) if isinstance(id, int) else None
        if template is None or wrong_struct:
            struct = ID_STRUCT.get(id) if isinstance(id, int) else None
            if struct is None or wrong_struct:
                struct = data.draw(st.sampled_from(sorted(STRUCTS)), label="struct")
            names = data.draw(st.lists(st.sampled_from(sorted(STRUCTS[struct])), unique=True),
                              label="fields")
            fields = {n: self.draw_value(data, n) for n in names}
        else:
            mode = data.draw(st.sampled_from(["good", "one", "one", "one", "any"]),
                             label="hostility")
            bad = data.draw(st.sampled_from(sorted(template)), label="hostile field") \
                if mode == "one" and template else None
            fields = {n: self.draw_value(data, n)
                      if n == bad or (mode == "any" and data.draw(st.booleans(), label=n))
                      else v for n, v in template.items()}
        sev_fd = None if fd is None else self.item(self.foreign_fds, fd)
        self.op(vm, id, data=None if null else True, sev_fd=sev_fd, **fields)

    @rule(v=pick, unreg=st.booleans(), a=pick, addr=hostile_int(), size=hostile_int(
        P, NPAGES * P, 2 * P), use_addr=st.booleans())
    def region(self, v, unreg, a, addr, size, use_addr):
        """REG/UNREG_REGION of any range: guest RAM, SIGBUS pages, holes, 2^64 edges."""
        vm = self.item(self.vms, v)
        if not use_addr:
            addr = self.item(self.addrs, a)
        fn = vm.memory_encrypt_unreg_region if unreg else vm.memory_encrypt_reg_region
        self.refusable("unreg_region" if unreg else "reg_region", fn, addr, size)

    @rule(v=pick, data=st.data(), receive=st.booleans())
    def hostile_pages(self, v, data, receive):
        """The batched SEND/RECEIVE_UPDATE_DATA with hostile address lists and packets."""
        vm = self.tvm if receive and v % 2 else self.item(self.vms, v)
        guest = [self.ram + P * i for i in range(NPAGES)]
        uaddrs = data.draw(st.one_of(
            st.lists(st.one_of(st.sampled_from(guest), st.sampled_from(self.addrs),
                               st.sampled_from(EDGES)), max_size=6),
            st.sampled_from(NON_INTS), st.just(np.array([self.ram], dtype=np.float64)),
            st.just(np.array([[self.ram]], dtype=np.uint64))), label="uaddrs")
        if not receive:
            self.refusable("hostile send pages", vm.sev_send_update_data_pages, uaddrs,
                           partial=lambda o: getattr(o.exc, "index", 0) and "pages before")
            return
        n = len(uaddrs) if isinstance(uaddrs, list) else 1
        hlen = data.draw(st.sampled_from([52, 0, 1, 51, 53, SEV_FW_BLOB_MAX_SIZE + 1]),
                         label="hdr_len")
        tlen = data.draw(st.sampled_from([P, 0, 16, P + 1, SEV_FW_BLOB_MAX_SIZE + 1]),
                         label="trans_len")
        hdrs = np.frombuffer(data.draw(st.binary(min_size=n * hlen, max_size=n * hlen),
                                       label="hdrs"), np.uint8)
        trans = np.zeros(n * tlen, np.uint8)
        if self.packets is not None and hlen == 52 and tlen == P and n <= self.packets[0]:
            trans = self.packets[2][:n].copy()       # real ciphertext, a forged header
        self.refusable("hostile receive pages", vm.sev_receive_update_data_pages, uaddrs,
                       hdrs, trans,
                       partial=lambda o: getattr(o.exc, "index", 0) and "pages before")

    # -- mirrors and moves ---------------------------------------------------------------------------

    @rule(v=pick, fd=mostly(None, *range(10)), move=st.booleans(), same_type=mostly(True, False))
    def enc_context(self, v, fd, move, same_type):
        """A new VM takes (MOVE) or shares (COPY: a mirror) another's SEV context; the source
        fd is sometimes a vCPU, a memfd, another host's VM, closed, or junk."""
        if len(self.vms) >= 8:
            return
        src = self.item(self.vms, v)
        dst_type = src.type if same_type else KVM_X86_DEFAULT_VM
        dst = self.kvm.create_vm(dst_type)
        self.vms.append(dst)
        dst.set_user_memory_region2(0, 0, 0, NPAGES * P, self.ram)
        if move:
            for i in range(len(src.vcpus)):
                self.vcpus.append(dst.create_vcpu(i))
        source = (src.fd if v % 2 else src) if fd is None else self.item(self.foreign_fds, fd)
        cap = KVM_CAP_VM_MOVE_ENC_CONTEXT_FROM if move else KVM_CAP_VM_COPY_ENC_CONTEXT_FROM
        self.refusable("move" if move else "copy", dst.enable_cap, cap, source)
        if not move:
            self.vcpus.append(dst.create_vcpu(0))

    # -- guests ------------------------------------------------------------------------------------------

    @rule(c=pick, page=st.integers(0, NPAGES + 2), cbit=st.booleans(),
          op=st.sampled_from(["write", "read", "mmio", "bulk", "ghcb", "hypercall"]),
          value=hostile_int(GHCB_MSR_SEV_INFO_REQ, GHCB_MSR_CPUID_REQ, GHCB_MSR_TERM_REQ,
                            1 << 12, wrong_types=False))
    def guest(self, c, page, cbit, op, value):
        """A vCPU's guest writes a marker through its key, reads, touches MMIO, or talks to
        the hypervisor through the GHCB MSR protocol (any value) or a hypercall."""
        vcpu = self.item(self.vcpus, c)
        if vcpu is None:
            return
        vm = vcpu.vm
        c_bit = 1 << self.host.c_bit if cbit else 0
        gpa = (page * P) | c_bit
        marker = None
        if op == "write":
            self.nmark += 1
            marker = b"\xa5SEVPLAIN" + self.nmark.to_bytes(7, "little")
            make = lambda g: g.write(gpa + 16, marker)
        elif op == "read":
            make = lambda g: g.read(gpa, 32)
        elif op == "mmio":
            make = lambda g: g.read((1 << 30) | c_bit, 8)
        elif op == "bulk":
            make = lambda g: g.read_pages([gpa & ~(P - 1)])
        elif op == "ghcb":
            if value and not value & GHCB_MSR_INFO_MASK:
                return      # a GHCB page: not simulated, sevcore says NotModelled (no result)
            make = lambda g: ghcb_exchange(g, value)
        else:
            make = lambda g: g.hypercall(KVM_HC_MAP_GPA_RANGE, gpa, 1, value)
        if marker is not None and cbit and vm.encryption_engine() is not None:
            self.markers.append((marker, self.context(vm)))
        out, _ = run_guest(vcpu, make)
        self.tally(f"guest {op}", out)

    # -- closing things ---------------------------------------------------------------------------

    @rule(i=pick, what=mostly(None, "vm", "vcpu"))
    def close(self, i, what):
        """Close a VM fd or a vCPU fd (now and then: most sequences go on to use them)."""
        if what == "vm":
            self.item(self.vms, i).close()
        elif what == "vcpu" and self.vcpus:
            self.item(self.vcpus, i).close()

    @rule(v=pick, src=pick, dst=pick, n=hostile_int(16, P, 2 * P))
    def dbg_decrypt(self, v, src, dst, n):
        """DBG_DECRYPT of guest RAM into a user buffer of any kind, allowed by the policy or
        not."""
        self.op(self.item(self.vms, v), KVM_SEV_DBG_DECRYPT,
                src_uaddr=self.ram + (src % NPAGES) * P, dst_uaddr=self.item(self.addrs, dst),
                len=n)

    # -- invariants ----------------------------------------------------------------------------------------

    @invariant()
    def counted(self):
        self.count_step()

    @invariant()
    def npt_points_only_at_owned_frames(self):
        for vm in self.vms + [self.tvm]:
            if vm.alive:
                assert_npt_owned(vm)

    @invariant()
    def guest_plaintext_stays_hidden(self):
        secret = [m for m, key in self.markers if key not in self.declassified]
        assert_markers_hidden(self.kvm, secret, "(source host)")
        assert_markers_hidden(self.tkvm, secret, "(target host)")

    @invariant()
    def pages_locked_counts_the_regions(self):
        for vm in self.vms:
            s = vm.sev
            if s.enc_context_owner is None and s.active:
                assert s.pages_locked == sum(len(p) for _, _, p in s.regions), \
                    (vm, s.pages_locked, [(a, n) for a, n, _ in s.regions])


TestHostileSev = HostileSev.TestCase
TestHostileSev.settings = settings(DEFAULT, max_examples=120)


@pytest.mark.slow
def test_hostile_sev_long():
    """The hostile-SEV machine over many random sequences (``pytest -m slow``)."""
    run_state_machine_as_test(HostileSev, settings=SLOW)
