"""SEV-SNP migration through a migration agent (``--type snp --path ma``).

SNP has no PSP-only migration: 56860 chapter 7 moves a guest's *context* through its migration
agent (MA), an SNP guest of its own bound to the guest at SNP_LAUNCH_START, and its pages with
SNP_PAGE_SWAP_OUT/SWAP_IN under the context's offline encryption key, one PSP command per page
(chapter 8). sevcore keeps the firmware for what only it can do and moves the bulk of memory at
CPU speed, as the SEV helper path does:

    source Host                                              target Host
    agent A (own SNP VM)  -- its report, X25519 key -->  agent B checks it, and the reverse
    guest (MIGRATE_MA, MA = A; VMRK set by A in LAUNCH)
    vCPU 0, the guest's migration worker: its transport key from MSG_KEY_REQ with the VMRK
      seals pages [LEDGER_GFN, first_gfn) at CPU speed (migration.helper's packets)  -------->
    the VMM: SNP_PAGE_SWAP_OUT of the secrets page (its entry the context's root) and
      of each vCPU's VMSA                                                          -------->
    A: MSG_EXPORT_REQ (the guest is decommissioned); the context sealed to B       -------->
                                                     VM, vCPUs; SNP_GCTX_CREATE alone
                                                     B: MSG_IMPORT_REQ, SNP_ACTIVATE
                                                     SNP_PAGE_SWAP_IN: secrets page, VMSAs
                                                     vCPU 0: PVALIDATE, the same key from the
                                                       VMRK, OPEN the packets into guest_memfd
                                                     vCPU 1: the guest's own check

Pre-copy (:func:`precopy`, ``migrate(..., max_passes=N)``): before the stop above, the VMM
logs the guest's guest_memfd slot (out of tree: sevcore.kvm.snp_ma.snp_enable_gmem_dirty_log)
and the worker seals every page while the guest works between its requests, then the pages
KVM_GET_DIRTY_LOG reports, pass after pass, until few are left; the guest then writes its
ledger and stops, and the last pass is sealed. The target opens every pass in order.

The worker's key needs the guest's VMPCK0, which is in its secrets page: that page and the
VMSAs are what the firmware carries, the rest goes at CPU speed. docs/snp.md ("Migration
through a migration agent") has what 56860 leaves open and what sevcore chose. The agents'
own logic (their channel, their checks) is Python beside their guest program; everything that
reaches the firmware goes through their vCPU as guest messages.
"""
import hashlib
import os
import struct
from dataclasses import dataclass, field

import numpy as np
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import x25519
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.hkdf import HKDF
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat

from sevcore import uapi as U
from sevcore.core.bitmap import Bitmap
from sevcore.errors import KvmError
from sevcore.hw.costmodel import CostModel
from sevcore.hw.hostmem import PAGE_SHIFT, PAGE_SIZE
from sevcore.kvm import snp_ma as K
from sevcore.kvm.ghcb import ghcb_program
from sevcore.migration import driver
from sevcore.migration.helper import (_KEY, PACKET_SIZE, HelperBatch, HelperLayout,
                                      MigrationHelper, key_page, migration_helper, state_page)
from sevcore.psp import amd_root
from sevcore.psp import snp_layout as SL
from sevcore.psp import snp_ma as MA
from sevcore.psp.status import status_name
from sevcore.vmm import attest
from sevcore.vmm.kvm_util import (kvm_vm_free, snp_guest_msg_init, snp_launch_update_data,
                                  vm_mem_add, vm_mem_set_private, vm_vcpu_add)

#: The guest's fixed pages: its secrets page, the two shared pages of its guest-message driver,
#: the shared GHCB page of each of its two vCPUs, the ledger (the digest its own check
#: compares) and the first page of its data. An agent has the first four (one vCPU).
SECRETS_GFN, REQ_GFN, RESP_GFN, GHCB_GFN, LEDGER_GFN, DATA_GFN = 0, 1, 2, 3, 5, 6
POLICY = U.SNP_POLICY_MASK_RSVD_MBO | U.SNP_POLICY_MASK_SMT
GUEST_POLICY = POLICY | U.SNP_POLICY_MASK_MIGRATE_MA
#: MSG_KEY_REQ of the worker's transport key: from the VMRK, mixing in the policy and the launch
#: measurement (both travel with the context, so the target derives the same key).
KEY_FIELDS = 0b1001
AGENT_PAGES = 4
#: The guest's vCPUs: its migration worker, and its work.
WORKER, WORK = 0, 1
_CHANNEL_INFO = b"sevcore snp migration agent channel v1"
#: Pages the guest's work writes per round in ``sevcore migrate --type snp --path ma``'s
#: pre-copy (a round after each of the worker's requests: a quarter of a 64-page batch).
PRECOPY_DIRTY_PAGES = 16
#: A sealed page on the wire: its packet, its sequence number and its gfn (MaImage.nbytes).
WIRE_PAGE = PACKET_SIZE + 16


class MaError(RuntimeError):
    """A migration-agent step refused: ``what`` failed with firmware status ``status`` (in a
    message's STATUS) or for ``reason``; ``lost`` when the source guest no longer exists."""

    def __init__(self, what, status=None, reason=None, lost=False):
        why = status_name(status) if status is not None else reason
        super().__init__(f"migration agent: {what} refused: {why}")
        self.what, self.status, self.reason = what, status, reason
        #: The guest's context had been exported when this happened: the source guest is gone.
        self.lost = lost


# -- the agent ------------------------------------------------------------------------------------

def _agent_program(g, inbox, outbox):
    """The agent's guest program: each request it is handed goes to the firmware as a guest
    message (VMPCK0); the answer's payload is handed back at a ucall."""
    while True:
        msg_type, payload = inbox.pop(0)
        outbox.append((yield g.snp_guest_message(msg_type, payload)))
        yield g.sync(0)


class Agent:
    """A migration agent: an SNP VM of its own on ``kvm``'s Host (a secrets page, the two
    message pages, its GHCB and a page of code, ``image``, which its measurement names),
    launched and running :func:`_agent_program`, with an X25519 key for the channel to its
    peer made inside it. ``messages`` counts what it sent the firmware."""

    def __init__(self, kvm, image=b"sevcore migration agent"):
        vm = kvm.create_vm(U.KVM_X86_SNP_VM)
        vm.memory_encrypt_op(U.KVM_SEV_INIT2)
        hva = vm_mem_add(vm, 0, 0, AGENT_PAGES + 1, U.KVM_MEM_GUEST_MEMFD)
        self.vcpu = vm_vcpu_add(vm, 0)
        self._inbox, self._outbox = [], []
        self.vcpu.set_guest_code(ghcb_program(_agent_program, GHCB_GFN << PAGE_SHIFT),
                                 self._inbox, self._outbox)
        vm.memory_encrypt_op(U.KVM_SEV_SNP_LAUNCH_START, policy=POLICY)
        vm_mem_set_private(vm, 0, PAGE_SIZE)
        snp_launch_update_data(vm, 0, hva, PAGE_SIZE, U.KVM_SEV_SNP_PAGE_TYPE_SECRETS)
        code = AGENT_PAGES << PAGE_SHIFT          # its code: the page its measurement names
        kvm.write(hva + code, bytes(image).ljust(PAGE_SIZE, b"\0"))
        vm_mem_set_private(vm, code, PAGE_SIZE)
        snp_launch_update_data(vm, code, hva + code, PAGE_SIZE, U.KVM_SEV_SNP_PAGE_TYPE_NORMAL)
        vm.memory_encrypt_op(U.KVM_SEV_SNP_LAUNCH_FINISH)
        snp_guest_msg_init(vm, SECRETS_GFN << PAGE_SHIFT, REQ_GFN << PAGE_SHIFT,
                           RESP_GFN << PAGE_SHIFT)
        self.vm, self.host = vm, vm.host
        self.messages = 0
        self._key = x25519.X25519PrivateKey.generate()
        self._aead = None
        self._sent = self._seen = 0

    @property
    def public_key(self):
        return self._key.public_key().public_bytes(Encoding.Raw, PublicFormat.Raw)

    def message(self, msg_type, payload):
        """Send one guest message through the agent's vCPU; its response payload."""
        self._inbox.append((msg_type, bytes(payload)))
        self.vcpu.run()
        ucall = self.vcpu.get_ucall()
        if ucall is None or ucall[0] != "sync":
            raise RuntimeError(f"migration agent vCPU: unexpected exit "
                               f"{self.vcpu.kvm_run.exit_reason}")
        self.messages += 1
        return self._outbox.pop(0)

    def _status(self, what, msg_type, layout, **fields):
        status = MA.snp_msg_status_rsp.unpack(self.message(msg_type, layout.pack(**fields)))[
            "status"]
        if status:
            raise MaError(what, status)

    # -- who the peer is ------------------------------------------------------------------------

    def hello(self):
        """``(public key, report)``: the agent's attestation report binding its channel key
        (REPORT_DATA = SHA-512 of the key), for the peer agent to check."""
        user_data = hashlib.sha512(self.public_key).digest()
        rsp = SL.snp_report_resp.unpack(self.message(
            U.SNP_MSG_REPORT_REQ, SL.snp_report_req.pack(user_data=user_data, vmpl=0)))
        if rsp["status"]:
            raise MaError("MSG_REPORT_REQ", rsp["status"])
        return self.public_key, rsp["report"][:rsp["report_size"]]

    def measurement(self):
        """This agent's launch measurement (its own report's)."""
        return attest.parse_report(self.hello()[1]).measurement

    def trust(self, peer_key, peer_report, peer_vcek):
        """Accept the peer agent: its report checks out against the AMD chain and ``peer_vcek``,
        it runs this agent's image (the same measurement) and binds ``peer_key``; then the
        channel's key is X25519 + HKDF-SHA256. Each direction has its own nonces (what this
        agent sealed is refused if it comes back), and the agent's X25519 key is replaced, so
        the next pairing has a new channel key and nothing of this one opens there. Raises
        attest.AttestationError."""
        attest.verify_report(peer_report, ark=amd_root.ark_x509(), ask=amd_root.ask_x509(),
                             vcek=peer_vcek, measurement=self.measurement(),
                             report_data=hashlib.sha512(peer_key).digest())
        shared = self._key.exchange(x25519.X25519PublicKey.from_public_bytes(peer_key))
        mine, theirs = sorted((self.public_key, bytes(peer_key)))
        key = HKDF(hashes.SHA256(), 32, salt=mine + theirs, info=_CHANNEL_INFO).derive(shared)
        first = mine == self.public_key
        self._aead = AESGCM(key)
        self._sent = self._seen = 0
        self._out, self._in = (b"\0" * 4, b"\1" * 4)[::1 if first else -1]
        self._key = x25519.X25519PrivateKey.generate()

    def _seal(self, data):
        if self._aead is None:
            raise MaError("channel", reason="no peer agent trusted")
        self._sent += 1
        nonce = struct.pack("<4sQ", self._out, self._sent)
        return nonce + self._aead.encrypt(nonce, bytes(data), None)

    def _open(self, blob):
        if self._aead is None:
            raise MaError("channel", reason="no peer agent trusted")
        blob = bytes(blob)
        way, count = struct.unpack("<4sQ", blob[:12])
        if way != self._in:
            raise MaError("channel", reason="a message this agent sealed came back")
        if count <= self._seen:
            raise MaError("channel", reason=f"replayed message {count} (last {self._seen})")
        try:
            data = self._aead.decrypt(blob[:12], blob[12:], None)
        except Exception:
            raise MaError("channel", reason="the sealed context does not authenticate") \
                from None
        self._seen = count
        return data

    # -- the guest's context --------------------------------------------------------------------

    def set_vmrk(self, gctx_paddr):
        """MSG_VMRK_REQ: a fresh VM root key for the guest at ``gctx_paddr`` (in LAUNCH)."""
        self._status("MSG_VMRK_REQ", U.SNP_MSG_VMRK_REQ, MA.snp_msg_vmrk_req,
                     gctx_paddr=gctx_paddr, vmrk=os.urandom(32))

    def export(self, gctx_paddr):
        """MSG_EXPORT_REQ (IMI_EN = 0) of the guest at ``gctx_paddr``: the context, sealed to the
        trusted peer. The guest is decommissioned from here on."""
        if self._aead is None:
            raise MaError("MSG_EXPORT_REQ", reason="no peer agent trusted")
        rsp = MA.snp_msg_export_rsp.unpack(self.message(
            U.SNP_MSG_EXPORT_REQ, MA.snp_msg_export_req.pack(gctx_paddr=gctx_paddr)))
        if rsp["status"]:
            raise MaError("MSG_EXPORT_REQ", rsp["status"])
        return self._seal(rsp["gctx"])

    def import_(self, gctx_paddr, sealed):
        """The peer's sealed context opened (a replay or a changed byte is refused) and given to
        the firmware with MSG_IMPORT_REQ into the INIT context at ``gctx_paddr``."""
        gctx = self._open(sealed)
        self._status("MSG_IMPORT_REQ", U.SNP_MSG_IMPORT_REQ, MA.snp_msg_import_req,
                     gctx_paddr=gctx_paddr, in_gctx_size=MA.snp_msg_gctx.size,
                     in_gctx_version=MA.GCTX_VERSION, incoming_gctx=gctx)


def pair(a, b):
    """The two agents check each other's reports and agree on their channel."""
    ka, ra = a.hello()
    kb, rb = b.hello()
    a.trust(kb, rb, b.host.psp.snp_vcek_cert())
    b.trust(ka, ra, a.host.psp.snp_vcek_cert())


# -- the guest -------------------------------------------------------------------------------------

def _transport_key(g):
    """MSG_KEY_REQ from the VM root key: the worker's 32-byte transport key."""
    body = yield g.snp_guest_message(U.SNP_MSG_KEY_REQ, SL.snp_derived_key_req.pack(
        root_key_select=1, guest_field_select=KEY_FIELDS))
    rsp = SL.snp_derived_key_resp.unpack(body)
    assert rsp["status"] == 0, f"MSG_KEY_REQ from the VMRK: status {rsp['status']:#x}"
    return rsp["derived_key"]


def ma_worker(g, layout, c_bit, restore):
    """The guest's migration worker (its vCPU 0, the helper's mailbox slot 0): on a target,
    PVALIDATE the pages the packets will fill (``restore``: [(start_gfn, end_gfn)]); then the
    transport key from the VMRK into the private key page, the private state page reset, and
    the helper's request loop."""
    c = 1 << c_bit
    for start, end in restore:
        status = yield g.pvalidate(start << PAGE_SHIFT | c, end - start)
        assert status == 0, f"PVALIDATE of gfns [{start:#x}, {end:#x}): {status}"
    key = yield from _transport_key(g)
    yield g.write(layout.key_gfn << PAGE_SHIFT | c, key_page(key))
    yield g.write(layout.state_gfn << PAGE_SHIFT | c, state_page())
    yield from migration_helper(g, layout, c_bit)


def _data_gpas(layout, c):
    return (np.arange(DATA_GFN, layout.first_gfn, dtype=np.uint64) << np.uint64(PAGE_SHIFT)) \
        | np.uint64(c)


#: The orders the VMM gives the guest's work, one per KVM_RUN (:func:`ma_workload`).
ROUND, LEDGER = 0, 1


def ma_workload(g, layout, c_bit, seed, orders, dirty_pages=None, written=None):
    """The guest's work (vCPU 1), one order of ``orders`` per KVM_RUN, GUEST_SYNC with the
    order after each, so the VMM can run migration passes in between: ROUND writes
    ``dirty_pages`` of its data pages (a quarter by default) with fresh bytes, LEDGER the
    SHA-256 of all its data into the ledger page, its last step before it stops. ``written``
    (a list) gets each round's gfns."""
    c = 1 << c_bit
    rng = np.random.default_rng(seed)
    gpas = _data_gpas(layout, c)
    n = max(1, len(gpas) // 4 if dirty_pages is None else min(dirty_pages, len(gpas)))
    while True:
        order = orders.pop(0)
        if order == LEDGER:
            digest = hashlib.sha256((yield g.read_pages(gpas))).digest()
            yield g.write(LEDGER_GFN << PAGE_SHIFT | c, digest)
        else:
            pick = np.sort(rng.choice(len(gpas), size=n, replace=False))
            pages = rng.integers(0, 256, (len(pick), PAGE_SIZE), np.uint8)
            yield g.write_pages(gpas[pick], pages)
            if written is not None:
                written.append(pick.astype(np.uint64) + np.uint64(DATA_GFN))
        yield g.sync(order)


def ma_check(g, layout, c_bit, out):
    """The guest's own check on the target (vCPU 1): its data against the ledger, a report (its
    VMPCK0 and message count moved) and the transport key again (its VMRK moved)."""
    c = 1 << c_bit
    ledger = yield g.read(LEDGER_GFN << PAGE_SHIFT | c, 32)
    digest = hashlib.sha256((yield g.read_pages(_data_gpas(layout, c)))).digest()
    report = yield g.snp_get_report(hashlib.sha512(digest).digest())
    key = yield from _transport_key(g)
    _, kept = _KEY.unpack_from((yield g.read(layout.key_gfn << PAGE_SHIFT | c, _KEY.size)))
    out.update(data_ok=bytes(ledger) == digest, report=report, key_ok=key == kept)
    yield g.sync(0)


class SnpMaGuest:
    """An SNP guest that can migrate through an agent: RAM ``[0, mem_size)`` in guest_memfd,
    vCPU 0 for its migration worker, vCPU 1 for its work and its checks, the worker's pages at
    the top (:class:`HelperLayout`)."""

    def __init__(self, kvm, mem_size, batch_pages=64):
        self.layout = HelperLayout.for_guest(mem_size, batch_pages)
        if self.layout.first_gfn <= DATA_GFN:
            raise ValueError(f"a guest of {mem_size} bytes has no room for data pages")
        self.kvm, self.mem_size = kvm, mem_size
        self.vm = vm = kvm.create_vm(U.KVM_X86_SNP_VM)
        vm.memory_encrypt_op(U.KVM_SEV_INIT2)
        self.hva = vm_mem_add(vm, 0, 0, mem_size >> PAGE_SHIFT, U.KVM_MEM_GUEST_MEMFD)
        self.vcpus = [vm_vcpu_add(vm, i) for i in range(2)]
        #: True between :meth:`start_work` and :meth:`write_ledger`.
        self.working = False

    def _set_code(self, i, fn, *args):
        """vCPU ``i`` runs ``fn`` as the guest's kernel runs code: #VC through its GHCB."""
        self.vcpus[i].set_guest_code(ghcb_program(fn, (GHCB_GFN + i) << PAGE_SHIFT), *args)

    def private_ranges(self):
        """[(start_gfn, end_gfn)] of private memory: the secrets page, ledger and data, the
        worker's key and state pages."""
        lay = self.layout
        return [(SECRETS_GFN, SECRETS_GFN + 1), (LEDGER_GFN, lay.first_gfn),
                (lay.key_gfn, lay.end_gfn)]

    def sealed_gfns(self):
        """The pages the worker carries: the ledger and the data."""
        return np.arange(LEDGER_GFN, self.layout.first_gfn, dtype=np.uint64)

    def _private(self):
        for start, end in self.private_ranges():
            vm_mem_set_private(self.vm, start << PAGE_SHIFT, (end - start) << PAGE_SHIFT)

    def _msg_init(self):
        snp_guest_msg_init(self.vm, SECRETS_GFN << PAGE_SHIFT, REQ_GFN << PAGE_SHIFT,
                           RESP_GFN << PAGE_SHIFT)

    @classmethod
    def launch(cls, kvm, mem_size, agent, seed=0, policy=GUEST_POLICY, batch_pages=64):
        """Launch the guest bound to ``agent`` (KVM out of tree: sevcore.kvm.snp_ma), whose
        MSG_VMRK_REQ gives it a VM root key while it is in LAUNCH; its data pages are measured
        with ``seed``'s bytes."""
        self = cls(kvm, mem_size, batch_pages)
        vm, lay, hva = self.vm, self.layout, self.hva
        rng = np.random.default_rng(seed)
        data = rng.integers(0, 256, (lay.first_gfn - LEDGER_GFN) << PAGE_SHIFT, np.uint8)
        kvm.write(hva + (LEDGER_GFN << PAGE_SHIFT), data.tobytes())
        K.snp_launch_start_ma(vm, policy, agent.vm)
        agent.set_vmrk(vm.sev.snp_context)
        self._private()
        snp_launch_update_data(vm, 0, hva, PAGE_SIZE, U.KVM_SEV_SNP_PAGE_TYPE_SECRETS)
        snp_launch_update_data(vm, LEDGER_GFN << PAGE_SHIFT, hva + (LEDGER_GFN << PAGE_SHIFT),
                               len(data), U.KVM_SEV_SNP_PAGE_TYPE_NORMAL)
        snp_launch_update_data(vm, lay.key_gfn << PAGE_SHIFT, hva + (lay.key_gfn << PAGE_SHIFT),
                               2 * PAGE_SIZE, U.KVM_SEV_SNP_PAGE_TYPE_ZERO)
        self._set_code(WORKER, ma_worker, lay, vm.host.c_bit, [])
        vm.memory_encrypt_op(U.KVM_SEV_SNP_LAUNCH_FINISH)
        self._msg_init()
        return self

    def start_work(self, seed=1, dirty_pages=None):
        """Give vCPU 1 the guest's work (:func:`ma_workload`); :meth:`work` runs its rounds,
        :meth:`write_ledger` its last step. ``written`` lists each round's gfns."""
        self._orders, self.written = [], []
        self._set_code(WORK, ma_workload, self.layout, self.vm.host.c_bit, seed, self._orders,
                       dirty_pages, self.written)
        self.working = True

    def work(self, rounds=1):
        """``rounds`` rounds of the guest's work, one KVM_RUN of vCPU 1 each."""
        for _ in range(rounds):
            self._orders.append(ROUND)
            _run_to_sync(self.vcpus[WORK])

    def write_ledger(self):
        """The guest's last step before it stops: the digest of its data into its ledger."""
        self._orders.append(LEDGER)
        _run_to_sync(self.vcpus[WORK])
        self.working = False

    def run_workload(self, rounds=2, seed=1, dirty_pages=None):
        """Run the guest's work on vCPU 1, ``rounds`` rounds, until it has written its
        ledger."""
        self.start_work(seed, dirty_pages)
        self.work(rounds)
        self.write_ledger()

    def check(self):
        """The guest's own check (vCPU 1): ``{data_ok, report, key_ok}``."""
        out = {}
        self._set_code(WORK, ma_check, self.layout, self.vm.host.c_bit, out)
        _run_to_sync(self.vcpus[WORK])
        return out


def _run_to_sync(vcpu):
    vcpu.run()
    ucall = vcpu.get_ucall()
    if ucall is None or ucall[0] != "sync":
        raise RuntimeError(f"vCPU {vcpu.vcpu_id}: unexpected exit {vcpu.kvm_run.exit_reason}")


class Worker(MigrationHelper):
    """The VMM's side of the guest's migration worker: the helper's requests (seal, open)
    served by the guest's own vCPU 0 through the worker's shared pages, not by a mirror VM
    (SNP has none)."""

    def __init__(self, guest):
        self._mirror = None
        self._serve_with(guest.vm, guest.layout, [guest.vcpus[WORKER]])


# -- the migration --------------------------------------------------------------------------------

@dataclass
class MaStats:
    """What one migration moved: pages at CPU speed, pages through the firmware, agent
    messages, bytes on the wire; with a cost model, ``downtime_ns`` for what happens while the
    guest is stopped (the last pass, the swaps, export, import, activate, the target's opens)
    and ``total_ns`` for everything (the passes while the guest works too), as QEMU's
    query-migrate ``downtime`` and ``total-time``. ``passes``: one dict per pass (``pages``,
    ``bytes``, modelled ``ns``, ``dirty-after``: the dirty log's pages at its end, ``stop``:
    the guest was stopped), the last one stopped; ``converged``: the dirty set fell under
    the limit before the passes ran out."""
    pages_sealed: int = 0
    pages_swapped: int = 0
    agent_messages: int = 0
    bytes_sent: int = 0
    downtime_ns: float = None
    total_ns: float = None
    passes: list = field(default_factory=list)
    converged: bool = True


def modelled_ns(cost, npages, nbytes, batch_pages, swapped=3, opened=None):
    """The cost model's time for the stopped part of one migration: the last ``npages``
    sealed pages and ``nbytes`` on the wire, step after step: the source's worker seals (one
    vCPU, an exit per batch), its PSP swaps out ``swapped`` pages and answers MSG_EXPORT_REQ;
    the link; the target's PSP runs SNP_GCTX_CREATE, MSG_IMPORT_REQ, SNP_ACTIVATE and the
    swap-ins; its worker opens ``opened`` pages (all that came, every pass's: its key comes
    with the context; ``npages`` by default). The agents' handshake comes before the guest
    stops and is not counted."""
    opened = npages if opened is None else opened
    source = _sealing(npages, batch_pages) + (driver.Demand("psp", swapped, PAGE_SIZE),
                                              driver.Demand("psp", 1))
    target = (driver.Demand("psp", 3), driver.Demand("psp", swapped, PAGE_SIZE)) + \
        _sealing(opened, batch_pages)
    return sum(d.ns(cost) for d in source + target) + _link_ns(cost, nbytes)


def _sealing(npages, batch_pages):
    """The worker sealing (or opening) ``npages``: one vCPU, an exit per batch."""
    return driver.helper_pages(npages, 1, -(-npages // batch_pages) if npages else 0)


def _link_ns(cost, nbytes):
    return nbytes * 1e9 / cost.network_bytes_per_s + cost.network_latency_ns


def pass_ns(cost, npages, nbytes, batch_pages, guest_size):
    """The cost model's time for one pass while the guest works: the dirty log's
    KVM_GET_DIRTY_LOG, the worker sealing ``npages``, ``nbytes`` over the link."""
    work = driver.dirty_sync(guest_size) + _sealing(npages, batch_pages)
    return sum(d.ns(cost) for d in work) + _link_ns(cost, nbytes)


@dataclass
class MaImage:
    """Everything that leaves the source: the sealed pages, the swapped-out pages (secrets page
    with its entry in the context; VMSAs with theirs) and the context sealed between agents."""
    gfns: np.ndarray
    seqs: np.ndarray
    packets: np.ndarray
    secrets: bytes
    vmsas: list
    context: bytes

    def nbytes(self):
        return (self.packets.nbytes + self.seqs.nbytes + self.gfns.nbytes + len(self.secrets)
                + sum(len(ct) + len(e) for ct, e in self.vmsas) + len(self.context))


def send(guest, agent, passes=None):
    """The source's half: the worker seals the guest's pages (or ``passes``, the
    HelperBatches :func:`precopy` sealed while it worked), the VMM swaps out its secrets page
    (the context's root entry) and VMSAs, the agent exports the context for its peer. The guest
    does not run again here. Raises MaError (the agent's refusals), KvmError (a refused
    swap-out) or HelperPacketError; on MaError or KvmError the swapped pages are back in and
    the guest runs on."""
    if passes is None:
        passes = [Worker(guest).seal(guest.sealed_gfns())]
    vm = guest.vm
    secrets, _ = K.snp_page_swap_out(vm, gfn=SECRETS_GFN, root=True)
    vmsas = []
    try:
        for v in guest.vcpus:
            vmsas.append(K.snp_page_swap_out(vm, vcpu=v))
        context = agent.export(vm.sev.snp_context)
    except (MaError, KvmError):           # (SevError is a KvmError)
        resume(guest, secrets, vmsas)     # what left comes back; the guest runs on
        raise
    K.snp_context_exported(vm)
    sealed = joined(passes)              # in the order they were sealed: seqs rise
    return MaImage(sealed.gfns, sealed.seqs, sealed.packets, secrets, vmsas, context)


def _log_dirty(vm, on):
    """KVM_SET_USER_MEMORY_REGION2 of the guest's guest_memfd slot with
    KVM_MEM_LOG_DIRTY_PAGES set (``on``) or cleared; its other fields as they are."""
    slot = vm.gfn_to_memslot(DATA_GFN)
    flags = slot.flags | U.KVM_MEM_LOG_DIRTY_PAGES if on else \
        slot.flags & ~U.KVM_MEM_LOG_DIRTY_PAGES
    vm.set_user_memory_region2(slot.id, flags, slot.base_gfn << PAGE_SHIFT,
                               slot.npages << PAGE_SHIFT, slot.userspace_addr,
                               slot.gmem_pgoff << PAGE_SHIFT, slot.gmem_file)


def dirty_gfns(guest):
    """KVM_GET_DIRTY_LOG of the guest's slot (which clears it): the dirtied gfns the worker
    carries, [LEDGER_GFN, first_gfn), sorted."""
    vm = guest.vm
    slot = vm.gfn_to_memslot(DATA_GFN)
    gfns = Bitmap.from_words(vm.get_dirty_log(slot.id), slot.npages).set_indices() \
        + np.uint64(slot.base_gfn)
    return gfns[(gfns >= LEDGER_GFN) & (gfns < guest.layout.first_gfn)]


def _seal_working(guest, worker, gfns, work_every):
    """One pass while the guest works: a round of its work after every ``work_every`` batches
    the worker seals. Returns the pass's HelperBatch and how many rounds the guest did."""
    step = guest.layout.batch_pages * work_every
    out, rounds = [], 0
    for i in range(0, len(gfns), step):
        out.append(worker.seal(gfns[i:i + step]))
        if guest.working:
            guest.work()
            rounds += 1
    return joined(out), rounds


def joined(batches):
    """HelperBatches one after the other, as one."""
    if len(batches) == 1:
        return batches[0]
    return HelperBatch(*(np.concatenate([getattr(b, f) for b in batches])
                         for f in ("gfns", "seqs", "packets")))


def _helper_ns(cost, npages, batch_pages):
    """The cost model's time for the worker to seal (or open) ``npages`` pages."""
    return sum(d.ns(cost) for d in _sealing(npages, batch_pages))


def _stop_ns(cost, npages, batch_pages, sent):
    """What stopping now would cost, as the downtime will: sealing and sending the ``npages``
    left, and the target opening them with the ``sent`` pages of the passes before (it can
    open none before the import, so every pass's pages are opened in the downtime)."""
    return (_helper_ns(cost, npages, batch_pages) + _link_ns(cost, npages * WIRE_PAGE)
            + _helper_ns(cost, sent + npages, batch_pages))


def precopy(guest, max_passes, cost=None, stop_pages=None, work_every=1, on_pass=None):
    """Pre-copy (out of tree: sevcore.kvm.snp_ma.snp_enable_gmem_dirty_log): the VMM logs
    the guest's guest_memfd slot; the worker seals every page the worker carries while the
    guest works between its requests (:func:`_seal_working`), then, pass after pass, the pages
    KVM_GET_DIRTY_LOG reports, until the dirty set is at most ``stop_pages`` (by default:
    until the cost model's time for the stop, sealing and sending the set and the target
    opening every pass's pages, is within its ``downtime_limit_ms``, as the main engine
    decides), nothing is dirty, the target's opens of what was sent are already past the
    limit (more passes cannot help), or ``max_passes - 1`` passes ran; then the guest writes its
    ledger and stops, and the last dirty pages are sealed. Returns ``(HelperBatches in order,
    [pass dicts], converged)``; the logging is off again, whatever happens. ``on_pass`` is
    called with each pass's HelperBatch while the guest still works (ma_remote sends it)."""
    cost = CostModel() if cost is None else cost
    lay, vm = guest.layout, guest.vm
    K.snp_enable_gmem_dirty_log(vm)
    _log_dirty(vm, True)
    out, passes, converged = [], [], False
    try:
        worker = Worker(guest)
        gfns = guest.sealed_gfns()
        while len(passes) < max_passes - 1:
            batch, rounds = _seal_working(guest, worker, gfns, work_every)
            gfns = dirty_gfns(guest)
            out.append(batch)
            if on_pass is not None:
                on_pass(batch)
            passes.append({"pass": len(passes), "pages": len(batch),
                           "bytes": len(batch) * WIRE_PAGE, "dirty-after": len(gfns),
                           "guest-rounds": rounds, "stop": False})
            n, sent = len(gfns), sum(p["pages"] for p in passes)
            if stop_pages is not None:
                if n <= stop_pages:
                    converged = True
                    break
                continue
            limit = cost.downtime_limit_ms * 1e6
            if _stop_ns(cost, n, lay.batch_pages, sent) <= limit:
                converged = True
                break
            if not n or _helper_ns(cost, sent, lay.batch_pages) > limit:
                break       # nothing left to pass over, or the opens alone are past the limit
        if guest.working:
            guest.write_ledger()          # its last step; it is stopped from here on
        gfns = np.union1d(gfns, dirty_gfns(guest))
    finally:
        _log_dirty(vm, False)
    batch = worker.seal(gfns)
    out.append(batch)
    passes.append({"pass": len(passes), "pages": len(batch), "bytes": len(batch) * WIRE_PAGE,
                   "dirty-after": 0, "guest-rounds": 0, "stop": True})
    return out, passes, converged


def resume(guest, secrets, vmsas):
    """The source guest back after a refused export or swap-out: its swapped-out pages (the
    VMSAs of the first ``len(vmsas)`` vCPUs) swapped in again (same context, same offline
    key), so it runs on where it was."""
    vm = guest.vm
    K.snp_page_swap_in(vm, secrets, gfn=SECRETS_GFN)
    for v, (ct, entry) in zip(guest.vcpus, vmsas):
        K.snp_page_swap_in(vm, ct, entry, vcpu=v)


def receive(kvm, mem_size, agent, image, batch_pages=64):
    """The target's half: the VM and its empty context, the agent's import, SNP_ACTIVATE, the
    secrets page and VMSAs swapped in, the private memory pre-faulted (KVM_PRE_FAULT_MEMORY:
    guest_memfd pages assigned to the guest, not validated), then the worker (PVALIDATE, its
    key from the VMRK) opens the packets into them. Returns the :class:`SnpMaGuest`; on a
    refusal (raised) the new VM is freed."""
    guest = SnpMaGuest(kvm, mem_size, batch_pages)
    try:
        _receive(guest, agent, image)
    except BaseException:
        _free(guest.vm)
        raise
    return guest


def _free(vm):
    """A refused image leaves no VM, context or ASID: the guest_memfd fds (each holds the VM),
    then kvm_vm_free."""
    for slot in list(vm.memslots.values()):
        if slot.gmem_file is not None:
            slot.gmem_file.close()
    kvm_vm_free(vm)


def _receive(guest, agent, image):
    vm = guest.vm
    agent.import_(K.snp_incoming_context(vm), image.context)
    K.snp_activate_incoming(vm)
    guest._private()
    K.snp_page_swap_in(vm, image.secrets, gfn=SECRETS_GFN)
    for v, (ct, entry) in zip(guest.vcpus, image.vmsas):
        K.snp_page_swap_in(vm, ct, entry, vcpu=v)
    guest._msg_init()
    lay = guest.layout
    restore = [(LEDGER_GFN, lay.first_gfn), (lay.key_gfn, lay.end_gfn)]
    for start, end in restore:        # guest_memfd and the RMP filled in batches, not per fault
        guest.vcpus[WORKER].pre_fault_memory(start << PAGE_SHIFT, (end - start) << PAGE_SHIFT)
    guest._set_code(WORKER, ma_worker, lay, vm.host.c_bit, restore)
    Worker(guest).open(image.gfns, image.seqs, image.packets)


def migrate(guest, src_agent, dst_kvm, dst_agent, cost=None, max_passes=1, stop_pages=None,
            work_every=1):
    """Migrate ``guest`` in process from its agent's Host to ``dst_kvm``'s, whose agent is
    ``dst_agent``: the agents check each other, then :func:`send` and :func:`receive`.
    ``max_passes`` 1 is stop-and-copy (the guest stopped throughout); more is :func:`precopy`
    with up to ``max_passes - 1`` passes while the guest works (``stop_pages``,
    ``work_every`` as there). Returns ``(target guest, MaStats)``; with ``cost`` (a
    CostModel) its modelled downtime and total time. ValueError for ``max_passes`` < 1."""
    if max_passes < 1:
        raise ValueError(f"max_passes must be at least 1, not {max_passes}")
    before = src_agent.messages + dst_agent.messages
    pair(src_agent, dst_agent)
    batches, passes, converged = None, None, True
    if max_passes > 1:
        batches, passes, converged = precopy(guest, max_passes, cost, stop_pages, work_every)
    image = send(guest, src_agent, batches)
    target = receive(dst_kvm, guest.mem_size, dst_agent, image, guest.layout.batch_pages)
    if passes is None:
        passes = [{"pass": 0, "pages": len(image.gfns), "bytes": len(image.gfns) * WIRE_PAGE,
                   "dirty-after": 0, "guest-rounds": 0, "stop": True}]
    stats = MaStats(pages_sealed=len(image.gfns), pages_swapped=1 + len(image.vmsas),
                    agent_messages=src_agent.messages + dst_agent.messages - before,
                    bytes_sent=image.nbytes(), passes=passes, converged=converged)
    if cost is not None:
        stats.downtime_ns, stats.total_ns = model_times(
            cost, passes, guest, stats.bytes_sent - sum(p["bytes"] for p in passes),
            stats.pages_swapped)
    return target, stats


def model_times(cost, passes, guest, fixed_bytes, swapped):
    """``(downtime_ns, total_ns)`` of a migration of ``guest`` in ``passes`` (the last one
    stopped; each pass dict gets its ``ns``): :func:`pass_ns` for each pass while the guest
    worked, :func:`modelled_ns` for the stop, whose wire also carries ``fixed_bytes`` (the
    swapped pages and the context) and whose target opens every pass's pages; after passes
    while the guest worked, the stop also reads the dirty log a last time (as the main
    engine's stop-and-copy does, sevcore.migration.source)."""
    bp = guest.layout.batch_pages
    live = [pass_ns(cost, p["pages"], p["bytes"], bp, guest.mem_size) for p in passes[:-1]]
    last = passes[-1]
    down = modelled_ns(cost, last["pages"], last["bytes"] + fixed_bytes, bp, swapped,
                       sum(p["pages"] for p in passes))
    if live:
        down += sum(d.ns(cost) for d in driver.dirty_sync(guest.mem_size))
    for p, ns in zip(passes, live + [down]):
        p["ns"] = ns
    return down, sum(live) + down
