"""The in-guest migration helper: the building block of the helper migration path.

A mirror VM (``KVM_CAP_VM_COPY_ENC_CONTEXT_FROM``) shares the guest's ASID, so its vCPUs read and
write the guest's private pages in plaintext through the C-bit. Those vCPUs run
:func:`migration_helper`, a guest program that re-encrypts pages under a *transport key* the
guest made at boot (:func:`helper_boot`) and keeps in a private page. The host talks to it only
through shared pages (a mailbox and a packet buffer) and sees only sealed packets:

    source guest memory --(C-bit read)--> helper: SEAL --(shared buffer)--> VMM --> stream
    stream --> VMM --(shared buffer)--> helper: OPEN --(C-bit write)--> target guest memory

>>> layout = HelperLayout.for_guest(mem_size)                 # top of guest RAM
>>> # the guest runs `yield from helper_boot(g, layout, c_bit)` once at boot
>>> src = MigrationHelper(vm, layout)
>>> batch = src.seal(gfns)                                   # HelperBatch(gfns, seqs, packets)
>>> dst = MigrationHelper(target_vm, layout)                 # after RECEIVE_START and after the
>>> dst.open(batch.gfns, batch.seqs, batch.packets)          # private_gfns() came by the PSP

A packet is ``MAC (32) || ciphertext (4096)``: AES-128-CTR then HMAC-SHA256 (the SEV packet
construction, on sevcore.core.sevpkt's batched C kernel) under subkeys derived from the transport key,
with the initial counter block made of the page's sequence number and gfn, so the MAC covers
both. A sequence number is ``lane << 56 | count``: helper vCPU ``lane`` claims a block of counts
for each request from its lane's counter in the private state page with a locked compare-and-
exchange, so numbers stay unique however many vCPUs (or mirrors) seal at once; the target
helper accepts, in each lane, only strictly increasing counts at or above that lane's counter,
which it advances by the same locked compare-and-exchange before it writes a page. A
replayed, reordered, swapped or altered packet is refused, which the PSP path cannot do:
RECEIVE_UPDATE_DATA binds a packet to nothing but the session's TEK/TIK (AMD-ASPFW
sev_mcmd_receive_update). The helper's vCPUs serve their share of a request at once, each in a
thread of the VMM (:meth:`MigrationHelper._request`).
docs/migration-helper.md has the layout, the request protocol and the threat model.
"""
import os
import struct
import threading
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass, field
from functools import partial

import numpy as np

from sevcore.core import sevpkt
from sevcore import uapi as U
from sevcore.core.arrays import runs, u64
from sevcore.hw.hostmem import PAGE_SHIFT, PAGE_SIZE
from sevcore.kvm.ghcb import ghcb_program
from sevcore.kvm.sev_es import build_vmsa
from sevcore.vmm.kvm_util import addr_gpa2hva
from sevcore.psp.crypto import kdf

#: Transport key: 32 random bytes made in the guest; the AEAD subkeys are derived from it.
KEY_SIZE = 32
MAC_SIZE = sevpkt.MAC_SIZE
#: One packet: the MAC, then the page's ciphertext.
PACKET_SIZE = MAC_SIZE + PAGE_SIZE
#: The MAC context byte of helper packets. The SEV channel uses 0x01-0x04 (AMD-ASPFW
#: sev_channel.h), so a helper MAC can never pass for a firmware one, or the reverse.
HELPER_CTX = 0x48
#: Labels of the SP 800-108 KDF (the firmware's, sevcore.psp.crypto.kdf) deriving the subkeys.
TEK_LABEL = "sevcore-helper-tek"
TIK_LABEL = "sevcore-helper-tik"

KEY_MAGIC = b"SCMHKEY1"
STATE_MAGIC = b"SCMHSTA2"
#: A sequence number is ``lane << LANE_SHIFT | count``; the lane is the sealing helper vCPU.
LANE_SHIFT = 56
MAX_LANES = 1 << (64 - LANE_SHIFT)
COUNT_MASK = (1 << LANE_SHIFT) - 1
#: A count's bits from GEN_SHIFT up are the generation of the helper that sealed it: each
#: launch of a guest by its owner (the first, and each SEV-ES target) gets a new one.
GEN_SHIFT = 40
_KEY = struct.Struct("<8s32s")           # key page: magic, transport key
_LANES = 8                               # state page: magic, then one le64 counter per lane
_FLOOR = _LANES + 8 * MAX_LANES          # then le64: the lowest count this helper seals
#: Then le64: the generation the guest owner launched this guest in (0: its first launch; a
#: target's vCPUs must find the state its source saved, GuestOwner.new_generation).
STATE_GENERATION_OFFSET = _FLOOR + 8

#: Mailbox slot of one helper vCPU (64 bytes, little-endian). The host writes the request
#: (cmd, lo, hi, req; the rest zero); the helper rewrites the slot with cmd = 0 and its result.
_SLOT = struct.Struct("<4IQQQ3I12x")     # cmd, lo, hi, 0, req | ack, index, status, reason, done
_REQ = struct.Struct("<4IQ")             # the request half
SLOT_SIZE = _SLOT.size
#: The request's page table in the mailbox, one entry per packet of the batch.
ENTRY = np.dtype([("gfn", "<u8"), ("seq", "<u8"), ("mac", "u1", MAC_SIZE)])
#: The smallest share of a request (pages per vCPU) that the helper's vCPUs serve at once in
#: their threads; smaller shares run one after another in the caller's thread. Each run has a
#: fixed cost of Python steps that threads must take turns at, so on an AMD EPYC Zen 4 (2 cores,
#: idle) 2 vCPUs at once took 2.2x the time of one for 256-page requests (128 pages each) and
#: 0.59x for 2048-page ones (bench/bench_helper_vcpus.py).
PARALLEL_MIN_PAGES = 512

#: Pages of a migration's request that each helper vCPU serves (a migration guest's packet
#: buffer holds this many per vCPU, and the source's stream records as many per vCPU, so that
#: N vCPUs seal a record N times the size of one vCPU's in the time of one share).
HELPER_SHARE = 256

CMD_NONE, CMD_SEAL, CMD_OPEN = 0, 1, 2
STATUS_OK, STATUS_REFUSED = 0, 1
#: Why the helper refused a packet: the reason codes of the mailbox and their meaning.
REASONS = {
    1: ("replay", "sequence number not above the last one accepted (a replayed or reordered "
                  "packet)"),
    2: ("auth", "MAC mismatch: not the helper's seal of this page under this (gfn, seq) and "
                "transport key (altered, swapped or under another key)"),
    3: ("range", "gfn outside the guest's RAM below the helper's pages"),
    4: ("key", "the helper's key page holds no transport key"),
    5: ("state", "the helper's state page is not initialised"),
    6: ("request", "malformed mailbox request"),
}
_CODE = {name: code for code, (name, _) in REASONS.items()}


# -- where the helper lives ----------------------------------------------------------------------------

@dataclass(frozen=True)
class HelperLayout:
    """The helper's pages at the top of guest RAM ``[0, mem_size)``, from the bottom up:

    - ``mailbox_pages`` shared pages at ``mailbox_gfn``: one 64-byte slot per helper vCPU, then
      from the page ``entries_gfn`` the request table (:data:`ENTRY`, 48 bytes per packet,
      ``batch_pages`` entries);
    - ``batch_pages`` shared pages at ``buffer_gfn``: packet ``i``'s ciphertext in page ``i``;
    - the private key page ``key_gfn`` and the private state page ``state_gfn`` (the last page:
      a magic, then the next count of each of the :data:`MAX_LANES` lanes).

    The shared pages are transient (the engine does not migrate them); the private ones travel
    by the PSP path (:meth:`private_gfns`). The guest's own pages are ``[0, first_gfn)``.
    """
    mem_size: int
    batch_pages: int = 256
    vcpus: int = 1
    mailbox_gfn: int = field(init=False)
    mailbox_pages: int = field(init=False)
    entries_gfn: int = field(init=False)
    buffer_gfn: int = field(init=False)
    key_gfn: int = field(init=False)
    state_gfn: int = field(init=False)

    def __post_init__(self):
        for name in ("mem_size", "batch_pages", "vcpus"):
            v = getattr(self, name)
            if not isinstance(v, int) or isinstance(v, bool) or v <= 0:
                raise ValueError(f"{name} must be a positive int, got {v!r}")
        if self.vcpus > MAX_LANES:
            raise ValueError(f"vcpus must be at most {MAX_LANES} (one sequence lane each), got "
                             f"{self.vcpus}")
        if self.mem_size % PAGE_SIZE:
            raise ValueError(f"mem_size {self.mem_size:#x} is not a multiple of 4096")
        end = self.mem_size >> PAGE_SHIFT
        # The table starts on a page of its own, so a whole batch's table is whole pages.
        slot_pages = -(-self.vcpus * SLOT_SIZE // PAGE_SIZE)
        mailbox_pages = slot_pages + -(-self.batch_pages * ENTRY.itemsize // PAGE_SIZE)
        first = end - 2 - self.batch_pages - mailbox_pages
        if first < 1:
            raise ValueError(f"a guest of {end} pages has no room for the helper's "
                             f"{end - first} pages")
        set_ = object.__setattr__
        set_(self, "mailbox_gfn", first)
        set_(self, "mailbox_pages", mailbox_pages)
        set_(self, "entries_gfn", first + slot_pages)
        set_(self, "buffer_gfn", first + mailbox_pages)
        set_(self, "key_gfn", end - 2)
        set_(self, "state_gfn", end - 1)

    @classmethod
    def for_guest(cls, mem_size, batch_pages=256, vcpus=1):
        """The layout for a guest of ``mem_size`` bytes of RAM from gpa 0, with a packet buffer
        of ``batch_pages`` pages and mailbox slots for ``vcpus`` helper vCPUs."""
        return cls(mem_size, batch_pages, vcpus)

    @property
    def first_gfn(self):
        """The helper's lowest page: the guest's own pages are below it."""
        return self.mailbox_gfn

    @property
    def end_gfn(self):
        return self.mem_size >> PAGE_SHIFT

    def private_gfns(self):
        """The helper's private pages (key, state), which the PSP path carries: before the first
        OPEN on the target, and again after the last one (docs/migration-helper.md). The helper
        writes the state page through the mirror, whose slots keep no dirty log, so the
        guest's dirty log never shows it: send it regardless."""
        return np.array([self.key_gfn, self.state_gfn], np.uint64)

    def shared_ranges(self):
        """The helper's shared pages as ``[(start_gfn, end_gfn)]``: mailbox and packet buffer,
        reported shared at boot and never migrated."""
        return [(self.mailbox_gfn, self.key_gfn)]

    def slot_gpa(self, vcpu):
        return (self.mailbox_gfn << PAGE_SHIFT) + vcpu * SLOT_SIZE

    def entry_gpa(self, i):
        return (self.entries_gfn << PAGE_SHIFT) + i * ENTRY.itemsize

    def buffer_gpas(self, lo, hi):
        """The gpas of buffer pages ``[lo, hi)`` (a uint64 array)."""
        return (np.arange(lo, hi, dtype=np.uint64) + np.uint64(self.buffer_gfn)) << \
            np.uint64(PAGE_SHIFT)


# -- guest side -----------------------------------------------------------------------------------------

def helper_boot(g, layout, c_bit, key_from_owner=False):
    """Guest sub-program (``yield from`` it at boot): make the transport key from the guest's
    randomness and store it in the private key page (C-bit), initialise the private state page,
    and report the mailbox and packet buffer shared with ``KVM_HC_MAP_GPA_RANGE``.
    ``key_from_owner``: the guest owner put the key page in with LAUNCH_SECRET
    (:func:`key_page`); the guest checks it is there and keeps it."""
    c = 1 << c_bit
    key_gpa = layout.key_gfn << PAGE_SHIFT | c
    if key_from_owner:
        magic, _ = _KEY.unpack((yield g.read(key_gpa, _KEY.size)))
        assert magic == KEY_MAGIC, "the guest owner's LAUNCH_SECRET left no transport key"
    else:
        yield g.write(key_gpa, key_page(os.urandom(KEY_SIZE)))
    yield g.write(layout.state_gfn << PAGE_SHIFT | c, state_page())
    for start, end in layout.shared_ranges():
        ret = yield g.hypercall(U.KVM_HC_MAP_GPA_RANGE, start << PAGE_SHIFT, end - start,
                                U.KVM_MAP_GPA_RANGE_DECRYPTED | U.KVM_MAP_GPA_RANGE_PAGE_SZ_4K)
        assert ret == 0, f"MAP_GPA_RANGE of the helper's shared pages returned {ret}"


def key_page(key):
    """The key page holding transport key ``key``, as the guest writes it or its owner injects
    it with LAUNCH_SECRET."""
    return _KEY.pack(KEY_MAGIC, bytes(key)).ljust(PAGE_SIZE, b"\0")


def state_page(start=0, floor=0, generation=0):
    """A fresh state page: the magic, every lane's counter at ``start`` (the lowest count it
    opens), ``floor``, the lowest count it seals, and the launch's ``generation``. The guest
    owner sets them for an SEV-ES target it launches (``machine.owner_secrets``): it opens only
    what the current source's generation sealed, seals above every count an earlier helper
    used, and its vCPUs refuse to run on without the state the source saved."""
    page = bytearray(STATE_MAGIC.ljust(PAGE_SIZE, b"\0"))
    page[_LANES:_FLOOR] = np.full(MAX_LANES, start, "<u8").tobytes()
    page[_FLOOR:_FLOOR + 8] = floor.to_bytes(8, "little")
    page[STATE_GENERATION_OFFSET:STATE_GENERATION_OFFSET + 8] = generation.to_bytes(8, "little")
    return bytes(page)


def migration_helper(g, layout, c_bit):
    """The helper's guest program, one per mirror vCPU: forever, read this vCPU's mailbox slot,
    serve the request, write the result into the slot and exit with a ucall (``g.sync``)."""
    c = 1 << c_bit
    slot = layout.slot_gpa(g.vcpu_id)
    assert g.vcpu_id < layout.vcpus, f"no mailbox slot for helper vCPU {g.vcpu_id}"
    keys = {}
    # The helper's working memory: one batch of pages, reused by every request.
    scratch = np.empty((layout.batch_pages, PAGE_SIZE), np.uint8)
    while True:
        cmd, lo, hi, _, req = _REQ.unpack((yield g.read(slot, _REQ.size)))
        status, index, reason, done = yield from _serve(g, layout, c, keys, scratch, cmd, lo,
                                                        hi)
        yield g.write(slot, _SLOT.pack(CMD_NONE, lo, hi, 0, req, req, index, status, reason,
                                       done))
        yield g.sync(req)


def _serve(g, layout, c, keys, scratch, cmd, lo, hi):
    """One request over packets [lo, hi): ``(status, index, reason, pages done)``."""
    if cmd not in (CMD_SEAL, CMD_OPEN) or not lo <= hi <= layout.batch_pages:
        return _refused(lo, "request", 0)
    n = hi - lo
    ent = np.frombuffer(bytearray((yield g.read(layout.entry_gpa(lo), n * ENTRY.itemsize))),
                        ENTRY)
    gfns = ent["gfn"]
    magic, key = _KEY.unpack_from((yield g.read(layout.key_gfn << PAGE_SHIFT | c, _KEY.size)))
    if magic != KEY_MAGIC:
        return _refused(lo, "key", 0)
    state_gpa = layout.state_gfn << PAGE_SHIFT | c
    state = yield g.read(state_gpa, _FLOOR + 8)
    if state[:_LANES] != STATE_MAGIC:
        return _refused(lo, "state", 0)
    # Each lane's next count as read now; a claim succeeds only if it is still so.
    counts = np.frombuffer(state, "<u8", count=MAX_LANES, offset=_LANES).tolist()
    floor = int.from_bytes(state[_FLOOR:_FLOOR + 8], "little")
    if key not in keys:
        keys.clear()
        keys[key] = kdf(key, TEK_LABEL, b"", 16), kdf(key, TIK_LABEL, b"", 16)
    tek, tik = keys[key]
    out_of_range = np.flatnonzero(gfns >= np.uint64(layout.first_gfn))
    bad = int(out_of_range[0]) if len(out_of_range) else n
    if cmd == CMD_SEAL:
        if bad < n:
            return _refused(lo + bad, "range", 0)
        if n == 0:
            return STATUS_OK, 0, 0, 0
        lane = g.vcpu_id
        # Claim the numbers before sealing: whatever happens next, none is used twice.
        first = yield from _claim_block(g, state_gpa, lane, counts[lane], n, floor)
        if first is None:
            return _refused(lo, "state", 0)
        seqs = np.arange(first, first + n, dtype=np.uint64) | np.uint64(lane << LANE_SHIFT)
        pages = yield g.read_pages(gfns << np.uint64(PAGE_SHIFT) | np.uint64(c), scratch[:n])
        with long_c_call():
            hdrs, _ = sevpkt.seal(tek, tik, pages, packet_ivs(gfns, seqs), HELPER_CTX,
                                  out=(None, pages))
        ent["seq"] = seqs
        ent["mac"] = np.frombuffer(hdrs, np.uint8).reshape(n, sevpkt.HDR_SIZE)[:, -MAC_SIZE:]
        yield g.write(layout.entry_gpa(lo), ent)
        yield g.write_pages(layout.buffer_gpas(lo, hi), pages)
        return STATUS_OK, 0, 0, n
    seqs = ent["seq"]
    lanes = (seqs >> np.uint64(LANE_SHIFT)).astype(np.intp)
    cnts = seqs & np.uint64(COUNT_MASK)
    replay = _first_stale(lanes, cnts, counts)
    m, reason = (bad, "range") if bad <= replay else (replay, "replay")
    if m:
        pages = yield g.read_pages(layout.buffer_gpas(lo, lo + m), scratch[:m])
        hdrs = np.zeros((m, sevpkt.HDR_SIZE), np.uint8)
        hdrs[:, 4:4 + sevpkt.IV_SIZE] = packet_ivs(gfns[:m], seqs[:m]).reshape(m, -1)
        hdrs[:, -MAC_SIZE:] = ent["mac"][:m]
        try:
            with long_c_call():
                sevpkt.open(tek, tik, hdrs, pages, HELPER_CTX, out=pages)
        except sevpkt.PacketAuthError as e:
            m, reason = e.index, "auth"
            if m:
                sevpkt.open(tek, tik, hdrs[:m], pages[:m], HELPER_CTX, out=pages[:m])
    if m:
        # Advance each lane's counter past its packets before any is written, lane by lane in
        # the order they first appear: a counter another vCPU moved since it was read means
        # the same numbers are being opened twice, and the packets from that lane's first on
        # are refused. (Counts claimed by an earlier lane past that point are spent.)
        lanes_m = lanes[:m]
        one = lanes_m[0] == lanes_m[-1] and (lanes_m == lanes_m[0]).all()
        for at in [0] if one else np.sort(np.unique(lanes_m, return_index=True)[1]).tolist():
            lane = int(lanes_m[at])
            last = int(cnts[m - 1]) if one else int(cnts[:m][lanes_m == lane][-1])
            if (yield g.cmpxchg(_lane_gpa(state_gpa, lane), counts[lane], last + 1)) != \
                    counts[lane]:
                m, reason = at, "replay"
                break
    if m:
        yield g.write_pages(gfns[:m] << np.uint64(PAGE_SHIFT) | np.uint64(c), pages[:m])
    if m < n:
        return _refused(lo + m, reason, m)
    return STATUS_OK, 0, 0, n


#: Per VMM thread: the turn lock of the helper whose vCPU it runs, while it runs one.
_turns = threading.local()


@contextmanager
def long_c_call():
    """Around a long call into C (GIL released) by a thread running a helper vCPU: hand the
    helper's turn to its other vCPU threads meanwhile. Those wait on the turn, not on the GIL,
    so the many short C calls of a vCPU's Python steps (each releases the GIL too) do not
    pass the interpreter back and forth between the threads; only the long ones overlap.
    Elsewhere (no turn held, or already inside one) it does nothing. This is the simulator's
    scheduling of its threads, not an operation of the guest."""
    turn = getattr(_turns, "turn", None)
    if turn is None or getattr(_turns, "out", False):
        yield
        return
    _turns.out = True
    turn.release()
    try:
        yield
    finally:
        turn.acquire()
        _turns.out = False


def _lane_gpa(state_gpa, lane):
    return state_gpa + _LANES + 8 * lane


def _claim_block(g, state_gpa, lane, count, n, floor=0):
    """Claim ``n`` consecutive counts of ``lane`` from its counter or ``floor``, whichever is
    higher (``lock cmpxchg`` until the counter read is the one replaced); returns the first,
    or None when the lane has no room left."""
    while True:
        first = max(count, floor)
        if first + n > COUNT_MASK + 1:
            return None
        found = yield g.cmpxchg(_lane_gpa(state_gpa, lane), count, first + n)
        if found == count:
            return first
        count = found


def _first_stale(lanes, cnts, counts):
    """The index of the first packet whose count is not above the one before it in its lane
    (or below its lane's counter for the lane's first packet), or ``len(lanes)``."""
    n = len(lanes)
    if n == 0:
        return 0
    if lanes[0] == lanes[-1] and (lanes == lanes[0]).all():
        # One lane (one sealing vCPU): the counts must rise from the lane's counter on.
        fresh = np.empty(n, bool)
        fresh[0] = cnts[0] >= counts[lanes[0]]
        np.greater(cnts[1:], cnts[:-1], out=fresh[1:])
        stale = np.flatnonzero(~fresh)
        return int(stale[0]) if len(stale) else n
    order = np.argsort(lanes, kind="stable")
    sl, sc = lanes[order], cnts[order]
    fresh = np.empty(n, bool)
    head = np.ones(n, bool)
    head[1:] = sl[1:] != sl[:-1]
    fresh[head] = sc[head] >= np.array(counts, np.uint64)[sl[head]]
    fresh[~head] = sc[1:][~head[1:]] > sc[:-1][~head[1:]]
    stale = order[~fresh]
    return int(stale.min()) if len(stale) else n


def _refused(index, reason, done):
    return STATUS_REFUSED, index, _CODE[reason], done


def packet_ivs(gfns, seqs):
    """The AES-CTR initial counter blocks of packets (gfn, seq): ``BE64(seq) || BE64(gfn << 8)``,
    ``16 * n`` bytes. The MAC covers the IV, so it binds both; the low byte leaves room for a
    page's 256 counter increments, so distinct (gfn, seq) pairs never share keystream."""
    ivs = np.empty((len(gfns), 2), ">u8")
    ivs[:, 0] = seqs
    ivs[:, 1] = np.asarray(gfns, np.uint64) << np.uint64(8)
    return ivs.view(np.uint8).reshape(-1)


# -- host side --------------------------------------------------------------------------------------------

class HelperPacketError(Exception):
    """The helper refused packet ``index`` of a request (and every packet after it) for
    ``reason``, one of the names in :data:`REASONS`: "replay", "auth", "range", "key", "state"
    or "request". On OPEN the packets before ``index`` were written; at and after it, nothing,
    on one helper vCPU. With several, each stops at its own first refusal and ``index`` is the
    first refused in the caller's order: other lanes' packets after it may have been written."""

    def __init__(self, op, index, reason, gfn=None):
        what = REASONS[_CODE[reason]][1]
        where = f" (gfn {gfn:#x})" if gfn is not None else ""
        super().__init__(f"migration helper refused {op} at packet {index}{where}: {reason}: "
                         f"{what}")
        self.op, self.index, self.reason, self.gfn = op, index, reason, gfn


@dataclass(frozen=True)
class HelperBatch:
    """Sealed pages: ``packets[i]`` (``PACKET_SIZE`` bytes) is page ``gfns[i]`` with sequence
    number ``seqs[i]``, as the stream's HELPER_PAGE record carries them."""
    gfns: np.ndarray
    seqs: np.ndarray
    packets: np.ndarray

    def __len__(self):
        return len(self.gfns)


@dataclass
class HelperCounters:
    """What the cost model charges: ``requests`` (mailbox batches, each split among the
    vCPUs), ``exits`` (vCPU runs: one entry and one exit each), and pages sealed and opened by
    each helper vCPU (the longest of them is the batch's critical path)."""
    requests: int = 0
    exits: int = 0
    sealed: list = field(default_factory=list)
    opened: list = field(default_factory=list)


class MigrationHelper:
    """The VMM's side of the helper of one SEV guest ``vm``: a mirror VM over the same memory
    running :func:`migration_helper` on ``nr_vcpus`` vCPUs. The guest must have run
    :func:`helper_boot` with ``layout`` (on a target, its private pages come by the PSP), and
    ``vm`` must have its SEV context (after LAUNCH_START or RECEIVE_START): the mirror copies
    the handle and ASID when it is created.

    The VMM reads and writes only the helper's shared pages, through its own mapping of them.
    An SEV-ES guest's helper (``ghcb_gpas``: one shared GHCB gpa per helper vCPU) must be made
    while the guest is in LAUNCH_UPDATE, its VMSAs launched and measured with the guest's
    (:meth:`launch_update_vmsa`): no other command gives a mirror vCPU a VMSA. Its vCPUs speak
    the GHCB page protocol at version 1 (``ghcb_program``: the mirror's KVM offers none).

    Raises ValueError for a layout or VM the helper cannot serve, OSError from the ioctls."""

    def __init__(self, vm, layout, nr_vcpus=1, ghcb_gpas=None):
        if not isinstance(layout, HelperLayout):
            raise TypeError("layout must be a HelperLayout")
        if not isinstance(nr_vcpus, int) or not 1 <= nr_vcpus <= layout.vcpus:
            raise ValueError(f"nr_vcpus must be in [1, {layout.vcpus}] (the layout's mailbox "
                             f"slots), got {nr_vcpus!r}")
        if not vm.sev.active or vm.sev.snp_active:
            raise ValueError("the migration helper serves SEV and SEV-ES guests (not SNP, not "
                             "plain VMs)")
        if vm.sev.es_active != (ghcb_gpas is not None) or \
                (ghcb_gpas is not None and len(ghcb_gpas) != nr_vcpus):
            raise ValueError("an SEV-ES guest's helper needs one GHCB gpa per vCPU, an SEV "
                             "guest's none")
        slots = sorted((s for s in vm.memslots.values() if s.as_id == 0),
                       key=lambda s: s.base_gfn)
        if any(s.flags & U.KVM_MEM_GUEST_MEMFD for s in slots):
            raise ValueError("the migration helper needs guest memory in VMM mappings, not "
                             "guest_memfd")
        self._mirror = mirror = vm.kvm.create_vm(U.KVM_X86_DEFAULT_VM)
        try:
            mirror.enable_cap(U.KVM_CAP_VM_COPY_ENC_CONTEXT_FROM, vm.fd)
            for s in slots:
                mirror.set_user_memory_region2(s.id, s.flags & U.KVM_MEM_READONLY,
                                               s.base_gfn << PAGE_SHIFT, s.npages << PAGE_SHIFT,
                                               s.userspace_addr)
            vcpus = [mirror.create_vcpu(i) for i in range(nr_vcpus)]
            for j, v in enumerate(vcpus):
                fn = migration_helper if ghcb_gpas is None else \
                    ghcb_program(migration_helper, ghcb_gpas[j], version=1)
                v.set_guest_code(fn, layout, vm.host.c_bit)
            self._serve_with(vm, layout, vcpus)
            if nr_vcpus > 1:
                mirror.page_ops().around_c = long_c_call
        except BaseException:
            self.close()
            raise

    def _serve_with(self, vm, layout, vcpus):
        """The VMM's state for ``vcpus``, which run :func:`migration_helper` on ``layout``'s
        mailbox (a mirror's vCPUs; an SNP guest's own worker vCPU, ``migration.ma``)."""
        n = len(vcpus)
        self.vm, self.layout, self.nr_vcpus, self._vcpus = vm, layout, n, vcpus
        self.counters = HelperCounters(sealed=[0] * n, opened=[0] * n)
        self._req = 0
        self._turn = threading.Lock() if n > 1 else None
        #: Shares of a request below this many pages per vCPU run one after another.
        self.parallel_min_pages = PARALLEL_MIN_PAGES
        self._shared = _SharedPages(vm, layout)
        # One VMM thread per helper vCPU after the first (which runs in the caller's).
        self._pool = ThreadPoolExecutor(n - 1, "sevcore-helper-vcpu") if n > 1 else None

    def launch_update_vmsa(self):
        """KVM_SEV_LAUNCH_UPDATE_VMSA on the mirror of an SEV-ES guest in LAUNCH_UPDATE: its
        vCPUs' VMSAs encrypted into the guest's measurement. Returns them as measured (as
        ``sev_es_sync_vmsa`` builds them), for the owner's expected digest."""
        vmsas = [build_vmsa(v, self._mirror.sev.vmsa_features) for v in self._vcpus]
        self._mirror.memory_encrypt_op(U.KVM_SEV_LAUNCH_UPDATE_VMSA)
        return vmsas

    def close(self):
        """Destroy the mirror VM (its vCPUs first); the guest is untouched."""
        mirror, self._mirror = getattr(self, "_mirror", None), None
        if mirror is None:
            return
        pool, self._pool = getattr(self, "_pool", None), None
        if pool is not None:
            pool.shutdown()
        for v in getattr(self, "_vcpus", []):
            v.close()
        mirror.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    # -- requests ------------------------------------------------------------------------------------

    def seal(self, gfns, packets=None, seqs=None):
        """Have the helper seal the private pages ``gfns`` (any number; batches of
        ``layout.batch_pages``). Returns a :class:`HelperBatch` whose ``packets`` and ``seqs``
        are the arrays given, if given: a writable ``(n, PACKET_SIZE)`` uint8 array (rows may
        be strided) and a writable ``(n,)`` integer array of 8-byte items, either byte order,
        such as the columns of a stream record the packets go straight into. Raises
        HelperPacketError ("range", "key", "state") naming the first page refused."""
        gfns = u64(gfns, "gfns", ndim=1)
        n = len(gfns)
        if packets is None:
            packets = np.empty((n, PACKET_SIZE), np.uint8)
        elif not isinstance(packets, np.ndarray) or packets.dtype != np.uint8 or \
                packets.shape != (n, PACKET_SIZE) or not packets.flags.writeable:
            raise ValueError(f"packets must be a writable ({n}, {PACKET_SIZE}) uint8 array")
        if seqs is None:
            seqs = np.empty(n, np.uint64)
        elif not isinstance(seqs, np.ndarray) or seqs.dtype.kind != "u" or \
                seqs.dtype.itemsize != 8 or seqs.shape != (n,) or not seqs.flags.writeable:
            raise ValueError(f"seqs must be a writable ({n},) uint64 array")
        out = HelperBatch(gfns.copy(), seqs, packets)
        for s in range(0, n, self.layout.batch_pages):
            k = min(n - s, self.layout.batch_pages)
            per = -(-k // self.nr_vcpus)
            self._request(CMD_SEAL, s, [(min(j * per, k), min((j + 1) * per, k))
                                        for j in range(self.nr_vcpus)], gfns,
                          before=partial(self._seal_rows_in, gfns, s),
                          after=partial(self._seal_rows_out, out, s))
        return out

    def _seal_rows_in(self, gfns, s, lo, hi):
        """The request table's rows [lo, hi) for a SEAL of ``gfns[s + lo:s + hi]``."""
        ent = np.zeros(hi - lo, ENTRY)
        ent["gfn"] = gfns[s + lo:s + hi]
        self._shared.write(self.layout.entry_gpa(lo), ent.view(np.uint8))

    def _seal_rows_out(self, out, s, lo, hi):
        """Rows [lo, hi) of a served SEAL (numbers, MACs, ciphertext) into ``out``."""
        lay, shared = self.layout, self._shared
        ent = shared.read(lay.entry_gpa(lo), (hi - lo) * ENTRY.itemsize).view(ENTRY)
        out.seqs[s + lo:s + hi] = ent["seq"]
        out.packets[s + lo:s + hi, :MAC_SIZE] = ent["mac"]
        with long_c_call():
            for i, pages in shared.pages(lay.buffer_gfn + lo, hi - lo):
                out.packets[s + lo + i:s + lo + i + len(pages), MAC_SIZE:] = pages

    def open(self, gfns, seqs, packets):
        """Have the helper open ``packets`` (``(n, PACKET_SIZE)`` uint8) of pages ``gfns`` with
        sequence numbers ``seqs`` and write them into the guest's private pages. Raises
        HelperPacketError ("replay", "auth", "range", "key", "state") naming the first packet
        refused: the packets before it are written, it and the rest are not (the rest of its
        lane's, with several vCPUs: :class:`HelperPacketError`)."""
        gfns, seqs = u64(gfns, "gfns", ndim=1), u64(seqs, "seqs", ndim=1)
        packets = np.asarray(packets)
        n = len(gfns)
        if len(seqs) != n or packets.dtype != np.uint8 or packets.shape != (n, PACKET_SIZE):
            raise ValueError(f"{n} gfns need {n} seqs and a ({n}, {PACKET_SIZE}) uint8 packet "
                             f"array, got {len(seqs)} and {packets.shape} {packets.dtype}")
        nv = self.nr_vcpus
        for s in range(0, n, self.layout.batch_pages):
            e = min(n, s + self.layout.batch_pages)
            # Each lane's packets to one vCPU (lane mod vCPUs), in stream order: its counter
            # then has one writer, and the check of its order sees all of them.
            owner = ((seqs[s:e] >> np.uint64(LANE_SHIFT)) % np.uint64(nv)).astype(np.intp)
            order = None
            if np.any(owner[1:] < owner[:-1]):
                order = np.argsort(owner, kind="stable")
            ends = np.cumsum(np.bincount(owner, minlength=nv)).tolist()
            self._request(CMD_OPEN, s, list(zip([0] + ends[:-1], ends)), gfns, order,
                          before=partial(self._open_rows_in, gfns, seqs, packets, s, order))

    def _open_rows_in(self, gfns, seqs, packets, s, order, lo, hi):
        """The request table's rows [lo, hi) and their ciphertext in the packet buffer, for an
        OPEN of the caller's packets ``s + order[lo:hi]`` (``order`` None: ``s + lo:s + hi``)."""
        lay = self.layout
        rows = slice(s + lo, s + hi) if order is None else order[lo:hi] + s
        ent = np.empty(hi - lo, ENTRY)
        ent["gfn"], ent["seq"], ent["mac"] = gfns[rows], seqs[rows], packets[rows, :MAC_SIZE]
        self._shared.write(lay.entry_gpa(lo), ent.view(np.uint8))
        with long_c_call():
            for i, pages in self._shared.pages(lay.buffer_gfn + lo, hi - lo):
                part = slice(s + lo + i, s + lo + i + len(pages)) if order is None else \
                    rows[i:i + len(pages)]
                pages[...] = packets[part, MAC_SIZE:]

    def _request(self, cmd, s, runs, gfns, order=None, before=None, after=None):
        """One mailbox request: vCPU ``j`` serves rows ``runs[j] = (lo, hi)`` of the request
        table, packet ``s + order[row]`` of the caller's arrays (``order`` None: ``s + row``).
        The vCPUs run at once, vCPU 0 in this thread and the others in the helper's threads
        (when every share is at least ``parallel_min_pages``; else one after another here),
        each thread also filling its rows first (``before(lo, hi)``) and taking its results
        after (``after(lo, hi)``, if served); page kernels, crypto and copies run with the GIL
        released. When every vCPU is back, the refusal of the packet first in the caller's
        order is raised (any other failure of a vCPU before it)."""
        op = "SEAL" if cmd == CMD_SEAL else "OPEN"
        c = self.counters
        c.requests += 1
        jobs = []
        for j, (lo, hi) in enumerate(runs):
            if hi > lo:
                self._req += 1
                jobs.append((j, lo, hi, self._req))
        if self._pool is not None and min(hi - lo for _, lo, hi, _ in jobs) >= \
                self.parallel_min_pages:
            futures = [self._pool.submit(self._serve_run, cmd, *job, before, after)
                       for job in jobs[1:]]
            outcomes = [_outcome(self._serve_run, cmd, *jobs[0], before, after)]
            outcomes += [_outcome(f.result) for f in futures]
        else:
            outcomes = [_outcome(self._serve_run, cmd, *job, before, after) for job in jobs]
        failure = refusal = None
        for (j, lo, hi, _), (result, exc) in zip(jobs, outcomes):
            if exc is not None:
                failure = failure or exc
                continue
            index, status, reason, done = result
            c.exits += 1
            (c.sealed if cmd == CMD_SEAL else c.opened)[j] += done
            if status == STATUS_OK:
                continue
            if reason not in REASONS:
                failure = failure or RuntimeError(f"migration helper vCPU {j}: unknown reason "
                                                  f"{reason}")
                continue
            # The slot names the refused row of the table (``lo`` for a refused request).
            at = s + (index if order is None else int(order[index])) if lo <= index < hi \
                else None
            if refusal is None or (at is not None and (refusal[0] is None or at < refusal[0])):
                refusal = (at, REASONS[reason][0], s + index if at is None else at)
        if failure is not None:
            raise failure
        if refusal is not None:
            at, reason, index = refusal
            raise HelperPacketError(op, index, reason, None if at is None else int(gfns[at]))

    def _serve_run(self, cmd, j, lo, hi, req, before, after):
        """Helper vCPU ``j`` serves rows [lo, hi) as request ``req``: the rows filled, KVM_RUN
        to its ucall, the rows taken if served. Returns its slot's ``(index, status, reason,
        done)``."""
        turn = self._turn
        if turn is None:
            return self._serve_locked(cmd, j, lo, hi, req, before, after)
        turn.acquire()
        _turns.turn = turn
        try:
            return self._serve_locked(cmd, j, lo, hi, req, before, after)
        finally:
            _turns.turn = None
            turn.release()

    def _serve_locked(self, cmd, j, lo, hi, req, before, after):
        if before is not None:
            before(lo, hi)
        slot = self.layout.slot_gpa(j)
        self._shared.write(slot, _SLOT.pack(cmd, lo, hi, 0, req, 0, 0, 0, 0, 0))
        vcpu = self._vcpus[j]
        vcpu.run()
        ucall = vcpu.get_ucall()
        if ucall is None or ucall[0] != "sync":
            raise RuntimeError(f"migration helper vCPU {j}: unexpected exit "
                               f"{vcpu.kvm_run.exit_reason} ({ucall})")
        _, _, _, _, _, ack, index, status, reason, done = _SLOT.unpack(
            self._shared.read(slot, SLOT_SIZE))
        if ack != req:
            raise RuntimeError(f"migration helper vCPU {j} did not answer request {req}")
        if status == STATUS_OK and after is not None:
            after(lo, hi)
        return index, status, reason, done


def _outcome(fn, *args):
    """``(result, None)`` or ``(None, exception)`` of ``fn(*args)``."""
    try:
        return fn(*args), None
    except Exception as e:  # noqa: BLE001 - raised again by the caller, after the others
        return None, e


class _SharedPages:
    """The VMM's own mapping of the helper's shared pages (mailbox and packet buffer), by gpa:
    the frames behind their HVAs in the VMM's anonymous memory, found once, in runs of
    contiguous frames, so that an access is a slice copy per run."""

    def __init__(self, vm, layout):
        start, end = layout.shared_ranges()[0]
        hva = addr_gpa2hva(vm, start << PAGE_SHIFT)
        if addr_gpa2hva(vm, (end - 1) << PAGE_SHIFT) != hva + ((end - 1 - start) << PAGE_SHIFT):
            raise ValueError("the helper's shared pages must lie in one memslot")
        pfns = vm.kvm.anon_pfns(np.arange(hva >> PAGE_SHIFT, (hva >> PAGE_SHIFT) + end - start,
                                          dtype=np.uint64))
        if pfns is None:
            raise ValueError("the helper's shared pages must be anonymous VMM memory")
        self.gpa, self.pfns, self._host = start << PAGE_SHIFT, pfns, vm.host
        #: (first byte, end byte, first frame) of each run, in bytes from ``gpa``
        self._runs = [(a << PAGE_SHIFT, (a + n) << PAGE_SHIFT, int(pfns[a]))
                      for a, n in runs(pfns)]

    def _spans(self, gpa, size):
        """``(offset, frames view)`` pieces of the bytes ``[gpa, gpa + size)``."""
        frames = self._host.mem.frames
        off = gpa - self.gpa
        for a, b, pfn in self._runs:
            lo, hi = max(off, a), min(off + size, b)
            if lo < hi:
                spa = (pfn << PAGE_SHIFT) + lo - a
                yield lo - off, frames[spa:spa + hi - lo]

    def read(self, gpa, size):
        out = np.empty(size, np.uint8)
        for pos, view in self._spans(gpa, size):
            out[pos:pos + len(view)] = view
        return out

    def write(self, gpa, data):
        data = np.frombuffer(data, np.uint8)
        for pos, view in self._spans(gpa, len(data)):
            view[...] = data[pos:pos + len(view)]

    def pages(self, gfn, npages):
        """``(index, (k, 4096) frames view)`` pieces of the pages ``[gfn, gfn + npages)``."""
        for pos, view in self._spans(gfn << PAGE_SHIFT, npages << PAGE_SHIFT):
            yield pos >> PAGE_SHIFT, view.reshape(-1, PAGE_SIZE)


__all__ = ["ENTRY", "HELPER_CTX", "KEY_SIZE", "PACKET_SIZE", "REASONS", "HelperBatch",
           "HelperCounters", "HelperLayout", "HelperPacketError", "MigrationHelper",
           "helper_boot", "key_page", "migration_helper", "packet_ivs", "state_page"]
