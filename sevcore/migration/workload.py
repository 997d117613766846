"""The guest the migration engine moves: a program that touches its memory, tells the VMM which
pages it shares, dirties pages at a rate of simulated time, and checks its memory after a move.

Everything the program needs to continue lives in guest memory, as it must for a migrated guest:
nothing is carried in the generator across a move. The target starts the same program (the
guest's code is part of its image) and it finds its place from memory.

Guest memory (one memslot at GPA 0, gfns):

==========================  ===========================================================
gfn 0                       header (private): magic, seed, ticks so far
1 .. 1 + JOURNAL_PAGES      journal (private): pages dirtied at each tick, u32 per tick
next ``nr_vcpus``           SEV-ES with a helper: each vCPU's save area (private)
next ``nr_vcpus`` (SEV-ES)  one GHCB per vCPU (shared), reported with the shared pages; with a
                            helper, one more per helper vCPU, and the save request page
next ``shared_pages``       shared pages (bounce buffers), reported with MAP_GPA_RANGE
the rest up to ``reserved``  data pages (private), all written at boot
top ``reserved`` pages      the migration helper's pages, if it has one (``helper_vcpus``)
==========================  ===========================================================

Each tick the program reads the TSC (the Host's simulated clock), works out how many page writes
``dirty_pages_per_s`` allows for the time since the last tick, picks them from its working set
with a generator seeded by ``(seed, tick)``, rewrites each with its ``(gfn, tick)`` pattern and
appends the count to the journal. Replaying the journal tells which tick wrote each page last,
so after a migration the program checks every page against the pattern it must hold, with no
per-page bookkeeping in memory. With ``nr_vcpus`` > 1 every vCPU writes its share of a tick's
pages (vCPU ``i`` every ``nr_vcpus``-th from ``i``); vCPU 0 commits the tick once all have.

An SEV-ES guest (``vm_type`` KVM_X86_SEV_ES_VM, policy with SEV_POLICY_ES) runs the same program
under :func:`sevcore.kvm.ghcb.ghcb_program`: its TSC reads, MAP_GPA_RANGE, MIGRATION_CONTROL
write and ucalls each raise #VC and go to the hypervisor through the vCPU's GHCB page. With a
migration helper its registers cannot travel by the host (their VMSA is encrypted, and the helper
path does not use SEND_UPDATE_VMSA), so at the stop each vCPU saves its own state into its private
save area when the VMM asks through the shared save request page (:func:`_save_if_asked`), and on
the target each vCPU restores it before anything else (:func:`_restore`).
"""
import struct
from dataclasses import asdict, dataclass

import numpy as np

from sevcore import uapi as U
from sevcore.hw.hostmem import DEFAULT_SIZE, PAGE_SHIFT, PAGE_SIZE
from sevcore.kvm.fpu import xsave_span
from sevcore.migration.helper import (HELPER_SHARE, STATE_GENERATION_OFFSET, HelperLayout,
                                      helper_boot)

MAGIC = b"SEVWKLD1"
JOURNAL_PAGES = 8
JOURNAL_TICKS = JOURNAL_PAGES * PAGE_SIZE // 4
_HEADER = struct.Struct("<8sQQ")         # magic, seed, ticks
#: In the header page after _HEADER: the tick every vCPU is writing its share of, and its pages.
_PENDING = struct.Struct("<QQ")
PENDING_OFFSET = 64
#: A vCPU's save area (SEV-ES with a helper): magic, vCPU id, the request it answered, the tick it
#: stopped at, its GHCB MSR; its XSAVE image (x87/SSE/AVX, loaded from the VMSA) at SAVE_XSAVE.
SAVE_MAGIC = b"SCVSAVE1"
_SAVE = struct.Struct("<8sIIQQQ")        # magic, vcpu_id, restored, request, tick, GHCB MSR
SAVE_XSAVE = 64
#: Where a restoring vCPU XSAVEs its own state to compare (the second half of its save area).
SAVE_COMPARE = 2048
#: In the header page: the save request vCPU 0 answered last (0: none), so that every vCPU of
#: a moved guest knows its save area must hold that request's state.
SAVED_OFFSET = 128
#: XSAVE's requested-feature bitmap: x87, SSE, AVX (the simulated CPU's XCR0 bits).
SAVE_RFBM = U.XFEATURE_MASK_FP | U.XFEATURE_MASK_SSE | U.XFEATURE_MASK_YMM
WORKLOADS = ("idle", "random", "hotset")
#: The guest types the workload runs, by the name ``sevcore migrate --type`` takes.
VM_TYPES = {"sev": U.KVM_X86_SEV_VM, "sev-es": U.KVM_X86_SEV_ES_VM}
#: The largest guest: half of a default simulated host's memory, so the guest, the kernel's
#: buffers and the VMM's other mappings fit its frames and the VMM's address space.
MAX_GUEST_MEM = DEFAULT_SIZE // 2


class WorkloadError(ValueError):
    """A guest configuration the workload cannot run."""


@dataclass(frozen=True)
class GuestConfig:
    """What a VMM needs to start the guest on either Host; travels in the SETUP record."""
    mem_size: int = 256 << 20
    nr_vcpus: int = 1
    vm_type: int = U.KVM_X86_SEV_VM
    policy: int = 0
    shared_size: int = 1 << 20
    workload: str = "random"
    dirty_pages_per_s: float = 2_500.0
    hot_fraction: float = 0.1
    seed: int = 1
    helper_vcpus: int = 0
    c_bit: int = 51

    def __post_init__(self):
        if self.mem_size % PAGE_SIZE or self.mem_size <= 0:
            raise WorkloadError(f"mem_size must be a positive multiple of 4096, not "
                                f"{self.mem_size}")
        if self.shared_size % PAGE_SIZE or self.shared_size < 0:
            raise WorkloadError(f"shared_size must be a multiple of 4096, not {self.shared_size}")
        if self.workload not in WORKLOADS:
            raise WorkloadError(f"workload must be one of {', '.join(WORKLOADS)}, not "
                                f"{self.workload!r}")
        if not self.dirty_pages_per_s >= 0:
            raise WorkloadError(f"dirty_pages_per_s must be >= 0, not {self.dirty_pages_per_s}")
        if not 0 < self.hot_fraction <= 1:
            raise WorkloadError(f"hot_fraction must be in (0, 1], not {self.hot_fraction}")
        if self.helper_vcpus < 0:
            raise WorkloadError(f"helper_vcpus must be >= 0, not {self.helper_vcpus}")
        if self.nr_vcpus < 1:
            raise WorkloadError(f"nr_vcpus must be >= 1, not {self.nr_vcpus}")
        if self.nr_vcpus > U.KVM_MAX_VCPUS:
            raise WorkloadError(f"nr_vcpus must be <= {U.KVM_MAX_VCPUS} (KVM_MAX_VCPUS), not "
                                f"{self.nr_vcpus}")
        if self.mem_size > MAX_GUEST_MEM:
            raise WorkloadError(f"mem_size must be <= {MAX_GUEST_MEM >> 30} GiB (half of a "
                                f"simulated host's {DEFAULT_SIZE >> 30} GiB), not "
                                f"{self.mem_size >> 30} GiB")
        if not 0 <= self.policy < 1 << 32:
            raise WorkloadError(f"policy must fit 32 bits (kvm_sev_launch_start.policy), not "
                                f"{self.policy:#x}")
        if self.vm_type not in VM_TYPES.values():
            raise WorkloadError(f"the workload runs SEV and SEV-ES guests "
                                f"(KVM_X86_SEV_VM, KVM_X86_SEV_ES_VM), not type {self.vm_type}")
        if self.es != bool(self.policy & U.SEV_POLICY_ES):
            raise WorkloadError(f"policy {self.policy:#x} does not match the VM type: an SEV-ES "
                                f"guest needs SEV_POLICY_ES, an SEV guest must not have it")
        if self.layout.data_pages < 1:
            raise WorkloadError(f"a {self.mem_size >> 20} MiB guest leaves no data pages after "
                                f"its header, journal, {self.shared_pages} shared and "
                                f"{self.reserved_pages} reserved pages")

    @property
    def npages(self):
        return self.mem_size >> PAGE_SHIFT

    @property
    def es(self):
        """Whether the guest is SEV-ES (its vCPUs talk to the host through GHCB pages)."""
        return self.vm_type == U.KVM_X86_SEV_ES_VM

    @property
    def shared_pages(self):
        return self.shared_size >> PAGE_SHIFT

    @property
    def helper_layout(self):
        """Where the migration helper lives (sevcore.migration.helper), or None without one."""
        if not self.helper_vcpus:
            return None
        try:
            # A packet buffer of HELPER_SHARE pages per helper vCPU, so that every request gives
            # each vCPU a share of that size (sevcore.migration.source.Source.batch), where it
            # takes at most a quarter of RAM; else HELPER_SHARE pages shared among them.
            buffer = HELPER_SHARE * self.helper_vcpus
            if 4 * buffer > self.npages:
                buffer = HELPER_SHARE
            return HelperLayout.for_guest(self.mem_size, buffer, vcpus=self.helper_vcpus)
        except ValueError as e:
            raise WorkloadError(str(e)) from None

    @property
    def reserved_pages(self):
        """Pages at the top of RAM the workload leaves to the migration helper."""
        h = self.helper_layout
        return 0 if h is None else self.npages - h.first_gfn

    @property
    def layout(self):
        return Layout(self.npages, self.shared_pages, self.reserved_pages,
                      self.nr_vcpus if self.es else 0, self.helper_vcpus if self.es else 0)

    def to_dict(self):
        return asdict(self)

    @classmethod
    def from_dict(cls, d):
        known = set(cls.__dataclass_fields__)
        unknown = set(d) - known
        if unknown:
            raise WorkloadError(f"unknown guest configuration keys: {sorted(unknown)}")
        return cls(**d)


@dataclass(frozen=True)
class Layout:
    """Where the workload keeps things, in gfns (see the module docstring)."""
    npages: int
    shared_pages: int
    reserved_pages: int
    vcpu_ghcbs: int = 0
    helper_ghcbs: int = 0

    header_gfn = 0
    journal_gfn = 1
    save_gfn = 1 + JOURNAL_PAGES

    @property
    def save_pages(self):
        """Private save areas, one per vCPU: an SEV-ES guest with a migration helper."""
        return self.vcpu_ghcbs if self.helper_ghcbs else 0

    @property
    def ghcb_gfn(self):
        return self.save_gfn + self.save_pages

    @property
    def ghcb_pages(self):
        return self.vcpu_ghcbs + self.helper_ghcbs

    @property
    def request_gfn(self):
        """The shared page where the VMM asks the vCPUs to save their state (with save areas)."""
        return self.ghcb_gfn + self.ghcb_pages

    @property
    def shared_gfn(self):
        return self.request_gfn + (1 if self.save_pages else 0)

    def ghcb_gpa(self, vcpu_id):
        """The GPA of vCPU ``vcpu_id``'s GHCB (shared: no C-bit)."""
        return (self.ghcb_gfn + vcpu_id) << PAGE_SHIFT

    def helper_ghcb_gpa(self, vcpu_id):
        """The GPA of migration helper vCPU ``vcpu_id``'s GHCB (shared)."""
        return (self.ghcb_gfn + self.vcpu_ghcbs + vcpu_id) << PAGE_SHIFT

    def save_gpa(self, vcpu_id):
        """The GPA of vCPU ``vcpu_id``'s save area (private: add the C-bit)."""
        return (self.save_gfn + vcpu_id) << PAGE_SHIFT

    @property
    def data_gfn(self):
        return self.shared_gfn + self.shared_pages

    @property
    def end_gfn(self):
        """First gfn the workload does not use (the reserved region starts here)."""
        return self.npages - self.reserved_pages

    @property
    def data_pages(self):
        return self.end_gfn - self.data_gfn

    def working_set(self, workload, hot_fraction):
        """The gfns a dirtying tick picks from: shared and data pages, or for ``hotset`` the
        first ``hot_fraction`` of them."""
        ws = np.arange(self.shared_gfn, self.end_gfn, dtype=np.uint64)
        if workload == "hotset":
            ws = ws[:max(1, int(len(ws) * hot_fraction))]
        return ws


def tick_gfns(seed, tick, n, working_set):
    """The ``n`` gfns (with repeats) that tick ``tick`` writes: a pure function of its inputs."""
    rng = np.random.default_rng((seed, tick))
    return working_set[rng.integers(0, len(working_set), n)]


def last_writer(cfg, counts):
    """For every gfn, the tick that wrote it last (0: boot), replaying the journal ``counts``
    (pages written at ticks 1, 2, ...)."""
    lay = cfg.layout
    ws = lay.working_set(cfg.workload, cfg.hot_fraction)
    gen = np.zeros(lay.npages, np.uint32)
    for tick, n in enumerate(counts, start=1):
        if n:
            gen[tick_gfns(cfg.seed, tick, int(n), ws)] = tick
    return gen


def _split(gfns, lay, c):
    """``[(gpas, index)]`` for the private pages of ``gfns`` (with the C-bit) and the shared
    ones (without): one bulk operation takes pages of one kind. ``index`` maps back to
    positions in ``gfns``."""
    gfns = np.asarray(gfns, np.uint64)
    shared = (gfns >= lay.shared_gfn) & (gfns < lay.data_gfn)
    out = []
    for sel, tag in ((~shared, c), (shared, 0)):
        index = np.flatnonzero(sel)
        if len(index):
            out.append(((gfns[index] << np.uint64(PAGE_SHIFT)) | np.uint64(tag), index))
    return out


def workload_main(g, cfg_dict, check=True):
    """vCPU 0: boot (or find its place after a move, checking every page unless ``check`` is
    False: a post-copy target checks once the last page is in), then dirty pages tick by tick.

    Ucalls: ``("ready",)`` once booted and migration-ready; ``("resumed", checked, bad,
    first_bad_gfn)`` after a move, having checked every page; ``("tick", tick, n)`` after
    each tick, ``n`` pages written (0 for a tick with nothing to do). With more vCPUs, vCPU 0
    writes every ``nr_vcpus``-th page of a tick and waits at ``("shares", tick)`` while the VMM
    runs the others (:func:`workload_vcpu`) through theirs; then it commits the tick."""
    cfg = GuestConfig.from_dict(cfg_dict)
    lay = cfg.layout
    c = 1 << cfg.c_bit
    head = yield g.read(c, _HEADER.size)
    magic, seed, ticks = _HEADER.unpack(head)
    if magic != MAGIC:
        yield from _boot(g, cfg, lay, c)
        ticks = 0
    else:
        yield from _restore(g, cfg, c, 0, ticks)
        if check:
            yield from _check_after_move(g, cfg, lay, c, ticks)
    ws = lay.working_set(cfg.workload, cfg.hot_fraction)
    rate = 0.0 if cfg.workload == "idle" else cfg.dirty_pages_per_s
    last = yield g.rdmsr(U.MSR_IA32_TSC)
    carry = 0.0
    while True:
        yield from _save_if_asked(g, lay, c, 0)
        now = yield g.rdmsr(U.MSR_IA32_TSC)
        carry += rate * max(0, now - last) / 1e9
        last = now
        n = min(int(carry), 1 << 24)
        carry -= n
        if n == 0 or ticks >= JOURNAL_TICKS:
            yield g.sync("tick", ticks, 0)
            continue
        ticks += 1
        nv = cfg.nr_vcpus
        if nv > 1:
            yield g.write(PENDING_OFFSET | c, _PENDING.pack(ticks, n))
        for gpas, _ in _split(tick_gfns(cfg.seed, ticks, n, ws)[0::nv], lay, c):
            yield g.write_pattern_pages(gpas, ticks)
        if nv > 1:
            yield g.sync("shares", ticks)          # every vCPU writes its share first
        # The journal entry, then the header: a tick counts only once its entry is written.
        yield g.write((lay.journal_gfn << PAGE_SHIFT) + 4 * (ticks - 1) | c,
                      struct.pack("<I", n))
        yield g.write(c, _HEADER.pack(MAGIC, cfg.seed, ticks))
        yield g.sync("tick", ticks, n)


def _boot(g, cfg, lay, c):
    """Write every page, report the shared ones, zero the journal and declare readiness."""
    yield g.fill(lay.journal_gfn << PAGE_SHIFT | c, JOURNAL_PAGES, 0)
    if lay.data_pages:
        yield g.write_pattern(lay.data_gfn << PAGE_SHIFT | c, lay.data_pages, 0)
    if lay.data_gfn > lay.ghcb_gfn:
        # The GHCBs (and the save request page) are shared too (an SEV-ES kernel decrypts them
        # before it uses them).
        ret = yield g.hypercall(U.KVM_HC_MAP_GPA_RANGE, lay.ghcb_gfn << PAGE_SHIFT,
                                lay.data_gfn - lay.ghcb_gfn, U.KVM_MAP_GPA_RANGE_DECRYPTED)
        assert ret == 0, f"MAP_GPA_RANGE of the shared pages returned {ret}"
    if lay.shared_pages:
        yield g.write_pattern(lay.shared_gfn << PAGE_SHIFT, lay.shared_pages, 0)
    if cfg.helper_vcpus:
        # An SEV-ES guest's transport key came from its owner (LAUNCH_SECRET): the target's
        # helper is launched with the same one, not sent it by the PSP.
        yield from helper_boot(g, cfg.helper_layout, cfg.c_bit, key_from_owner=cfg.es)
    yield g.write(c, _HEADER.pack(MAGIC, cfg.seed, 0))
    yield g.wrmsr(U.MSR_KVM_MIGRATION_CONTROL, U.KVM_MIGRATION_READY)
    yield g.sync("ready")


def _check_after_move(g, cfg, lay, c, ticks):
    """Replay the journal and check every page holds the pattern of the tick that wrote it."""
    raw = b""
    if ticks:
        raw = yield g.read(lay.journal_gfn << PAGE_SHIFT | c, 4 * ticks)
    gen = last_writer(cfg, np.frombuffer(raw, "<u4"))
    gfns = np.arange(lay.shared_gfn, lay.end_gfn, dtype=np.uint64)
    gen = gen[lay.shared_gfn:lay.end_gfn]
    bad, first_bad, checked = 0, None, 0
    for tick in np.unique(gen):
        which = gfns[gen == tick]
        for gpas, index in _split(which, lay, c):
            nbad, first = yield g.check_pattern_pages(gpas, int(tick))
            checked += len(gpas)
            bad += nbad
            if first is not None and (first_bad is None or int(which[index[first]]) < first_bad):
                first_bad = int(which[index[first]])
    yield g.sync("resumed", checked, bad, first_bad)


def workload_vcpu(g, cfg_dict, index):
    """vCPU ``index`` >= 1: each time it runs, write its share (every ``nr_vcpus``-th page from
    its index) of the tick vCPU 0 started, then ``("share", tick)``. It keeps nothing between
    runs but what the header says, so it starts again as it is after a move."""
    cfg = GuestConfig.from_dict(cfg_dict)
    lay, c = cfg.layout, 1 << cfg.c_bit
    ws = lay.working_set(cfg.workload, cfg.hot_fraction)
    if lay.save_pages:
        _, _, ticks = _HEADER.unpack((yield g.read(c, _HEADER.size)))
        yield from _restore(g, cfg, c, index, ticks)
    while True:
        yield from _save_if_asked(g, lay, c, index)
        tick, n = _PENDING.unpack((yield g.read(PENDING_OFFSET | c, _PENDING.size)))
        for gpas, _ in _split(tick_gfns(cfg.seed, tick, n, ws)[index::cfg.nr_vcpus], lay, c):
            yield g.write_pattern_pages(gpas, tick)
        yield g.sync("share", tick)


def _save_if_asked(g, lay, c, vcpu_id):
    """SEV-ES with a helper: if the VMM asks (a nonzero request in the shared request page),
    save this vCPU's state into its private save area once per request (the tick it stopped at,
    its GHCB MSR, XSAVE of its x87/SSE/AVX registers), vCPU 0 also noting the request in the
    header, and stay parked (ucall ``("saved", vcpu_id)`` at each run) until the request is
    withdrawn. The helper seals the save area like any page the guest wrote."""
    if not lay.save_pages:
        return
    req = yield from _request(g, lay)
    if not req:
        return
    gpa = lay.save_gpa(vcpu_id) | c
    magic, _, _, done, _, _ = _SAVE.unpack((yield g.read(gpa, _SAVE.size)))
    if magic != SAVE_MAGIC or done != req:
        _, _, ticks = _HEADER.unpack((yield g.read(c, _HEADER.size)))
        ghcb = yield g.rdmsr(U.MSR_AMD64_SEV_ES_GHCB)
        yield from _xsave_clean(g, gpa + SAVE_XSAVE)
        yield g.write(gpa, _SAVE.pack(SAVE_MAGIC, vcpu_id, 0, req, ticks, ghcb))
        if vcpu_id == 0:
            yield g.write(SAVED_OFFSET | c, struct.pack("<Q", req))
    while req:
        yield g.sync("saved", vcpu_id)
        req = yield from _request(g, lay)


def _xsave_clean(g, gpa):
    """XSAVE into a zeroed area (XSAVE leaves the bytes it does not write), so two saves of the
    same state are the same bytes."""
    yield g.write(gpa, bytes(xsave_span(SAVE_RFBM)))
    yield g.xsave(gpa, SAVE_RFBM)


def _request(g, lay):
    raw = yield g.read(lay.request_gfn << PAGE_SHIFT, 8)
    return int.from_bytes(raw, "little")


def _restore(g, cfg, c, vcpu_id, ticks):
    """SEV-ES with a helper, on entry to a guest whose header is set up: if vCPU 0 answered a
    save request (the header says which), this vCPU's save area must hold that request's state
    from the tick the header holds; restore it. Its GHCB MSR is written back (WRMSR of
    MSR_AMD64_SEV_ES_GHCB, which the CPU takes without #VC). XRSTOR is not modelled: the
    vCPU XSAVEs the state its VMSA gave it and requires it to equal the saved image (the
    workload never changes its x87/SSE/AVX registers, so it must). Any mismatch aborts: the
    guest does not run on with state that is not its own. The area is then marked restored in
    this launch's generation (the owner's, in the helper's state page): the vCPU restores it
    once. A migration target (generation > 0) also requires a save request and an area no
    earlier launch restored: saved state the host dropped, header and all, is not run past."""
    lay = cfg.layout
    if not lay.save_pages:
        return
    state = cfg.helper_layout.state_gfn << PAGE_SHIFT | c
    gen = int.from_bytes((yield g.read(state + STATE_GENERATION_OFFSET, 8)), "little")
    req, = struct.unpack("<Q", (yield g.read(SAVED_OFFSET | c, 8)))
    assert req or not gen, \
        f"vCPU {vcpu_id}: launched as a migration target, but no saved state came"
    if not req:
        return
    gpa = lay.save_gpa(vcpu_id) | c
    raw = yield g.read(gpa, SAVE_XSAVE + xsave_span(SAVE_RFBM))
    magic, saved_id, restored, done, tick, ghcb = _SAVE.unpack_from(raw)
    assert magic == SAVE_MAGIC and saved_id == vcpu_id and done == req, \
        f"vCPU {vcpu_id}: no state saved for request {req:#x} in its save area"
    if restored == gen + 1:
        return
    assert not restored, f"vCPU {vcpu_id}: its save area was restored before (an earlier move)"
    assert tick == ticks, f"vCPU {vcpu_id}: state saved at tick {tick}, memory is at {ticks}"
    yield from _xsave_clean(g, gpa + SAVE_COMPARE)
    now = yield g.read(gpa + SAVE_COMPARE, xsave_span(SAVE_RFBM))
    assert bytes(now) == bytes(raw[SAVE_XSAVE:]), \
        f"vCPU {vcpu_id}: its x87/SSE/AVX state is not the saved one"
    yield g.wrmsr(U.MSR_AMD64_SEV_ES_GHCB, ghcb)
    yield g.write(gpa, _SAVE.pack(SAVE_MAGIC, vcpu_id, gen + 1, req, tick, ghcb))
