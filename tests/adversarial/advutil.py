"""Helpers of the adversarial suite: hostile values, the errno contract every call must keep,
snapshots of what a refused call must leave alone, and the isolation invariants (what the NPT
of a VM may point at, what the VMM may see).

A call is made through :func:`attempt`: it either succeeds or raises OSError with a real errno,
ValueError or TypeError; anything else escapes as a test failure.
"""
import collections
import errno
import gc
import hashlib
import inspect
import weakref

import numpy as np
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st

import sevcore
from sevcore.core.npt import NPT_PRIVATE
from sevcore.hw.hostmem import PAGE_SHIFT, PAGE_SIZE
from sevcore.uapi import (GUEST_MEMFD_FLAG_INIT_SHARED, GUEST_MEMFD_FLAG_MMAP, KVM_EXIT_IO,
                          KVM_EXIT_MMIO)

P = PAGE_SIZE
U64 = (1 << 64) - 1

#: The default run: derandomized, so every run replays the same sequences (each machine sets
#: its number of examples, within the suite's minute of the default run).
DEFAULT = settings(derandomize=True, deadline=None, max_examples=100, stateful_step_count=60,
                   suppress_health_check=[HealthCheck.too_slow,
                                          HealthCheck.filter_too_much])
#: The slow run (``pytest -m slow tests/adversarial``): random sequences, many more of them.
SLOW = settings(deadline=None, max_examples=1000, stateful_step_count=60,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much])

#: Examples and steps each machine ran in this session (printed at the end of the run).
STATS = collections.defaultdict(collections.Counter)


class Counted:
    """Mixin of the machines: counts examples and steps into :data:`STATS`."""

    def count_step(self):
        STATS[type(self).__name__]["steps"] += 1

    def tally(self, what, out):
        """Count ``what`` by how it ended: ok, or the errno / exception type it was refused
        with."""
        how = "ok" if out.ok else (out.exc.errno and errno.errorcode[out.exc.errno]
                                   if isinstance(out.exc, OSError) else type(out.exc).__name__)
        STATS[type(self).__name__][f"{what}: {how}"] += 1

    def teardown(self):
        STATS[type(self).__name__]["examples"] += 1


#: Frames of each simulated machine: 64 GiB, reserved lazily, so that huge sizes meet a host's
#: limits while the thousands of hosts a run makes (some kept by hypothesis with a failing
#: example's traceback) stay within the process's 128 TiB of address space.
HOST_MEMORY = 64 << 30
#: The machines the suite has made and not yet lost.
_HOSTS = weakref.WeakSet()


def new_host(seed):
    """A simulated machine of :data:`HOST_MEMORY`. Hosts sit in reference cycles (host ->
    kvm -> vm -> host): the ones earlier examples left are collected every 32."""
    if len(_HOSTS) >= 32:
        gc.collect()
    host = sevcore.Host(seed=seed, memory_size=HOST_MEMORY)
    _HOSTS.add(host)
    return host


#: Integers at the edges of every field width the uAPI has, and just past them.
EDGES = (0, 1, -1, 2, 15, 16, 4095, 4096, 4097, 8191, 8192, (1 << 31) - 1, 1 << 31,
         (1 << 32) - 1, 1 << 32, (1 << 32) + 4096, 1 << 36, (1 << 36) - 4096, 1 << 47, 1 << 48,
         0x7ffffffff000, 0x7fffffffffff, 0x800000000000, (1 << 63) - 4096, (1 << 63) - 1,
         1 << 63, U64 - 4095, U64 - 4096 + 1, U64 - 1, U64, 1 << 64, (1 << 64) + 4096, 1 << 65,
         -4096, -(1 << 63), -(1 << 64))

#: Values of the wrong type for an integer field.
NON_INTS = (None, 1.5, "4096", b"\0", [4096], True, float("nan"))


def hostile_int(*good, wrong_types=True):
    """An integer field: one of ``good`` (values that make the call reach deep), an edge, any
    integer, or (``wrong_types``) a value that is not an int at all."""
    options = [st.sampled_from(EDGES), st.integers(-(1 << 66), 1 << 66)]
    if good:
        options = [st.sampled_from(good)] * 6 + options
    if wrong_types:
        options.append(st.sampled_from(NON_INTS))
    return st.one_of(*options)


def mostly(value, *others):
    """``value`` three times in four (or more), else one of ``others`` (hypothesis favours the
    first element of a sampled_from, so the common case goes first)."""
    return st.sampled_from((value,) * max(3, len(others) * 3) + others)


def draw_fields(data, **good):
    """Values for the fields ``good`` (name -> plausible values: a tuple or a strategy): all
    plausible, or one of them hostile, or every one hostile or not at random."""
    names = list(good)
    mode = data.draw(st.sampled_from(["good", "one", "one", "one", "any"]), label="hostility")
    bad = data.draw(st.sampled_from(names), label="hostile field") if mode == "one" else None
    out = {}
    for n in names:
        g = good[n] if isinstance(good[n], st.SearchStrategy) else st.sampled_from(good[n])
        hostile = n == bad or (mode == "any" and data.draw(st.booleans(), label=f"{n} hostile"))
        out[n] = data.draw(hostile_int() if hostile else g, label=n)
    return out


# -- the errno contract -------------------------------------------------------------------------------

class Outcome:
    """What a call did: ``ok`` and its ``value``, or the exception ``exc`` it was refused with."""

    __slots__ = ("ok", "value", "exc")

    def __init__(self, ok, value=None, exc=None):
        self.ok, self.value, self.exc = ok, value, exc

    @property
    def errno(self):
        return getattr(self.exc, "errno", None)

    def __repr__(self):
        return f"Outcome(ok={self.ok}, exc={self.exc!r})"


def attempt(fn, *args, **kwargs):
    """Call ``fn`` as a hostile VMM would. Only OSError with a real errno, ValueError and
    TypeError may escape sevcore; they are returned as a refused Outcome. Any other exception
    (SigBus, MemoryError, KeyError, an AssertionError from inside sevcore, IndexError,
    OverflowError, RecursionError ...) propagates and fails the test."""
    try:
        return Outcome(True, fn(*args, **kwargs))
    except OSError as e:
        assert e.errno in errno.errorcode, f"{e!r} escaped without a real errno"
        return Outcome(False, exc=e.with_traceback(None))
    except (ValueError, TypeError) as e:
        return Outcome(False, exc=e.with_traceback(None))


# -- what the VMM can reach ---------------------------------------------------------------------------

def vmm_mappings(kvm):
    """The VMM's mappings as ``(start, end, kind, file, pgoff)``."""
    return [(m.start, m.end, m.kind, m.file, m.pgoff) for m in kvm._maps]


def gmem_pages(f):
    """``{file page index: pfn}`` of a guest_memfd (its page map is a dict, or a PageCache
    where guest_memfd keeps its pages in the C radix)."""
    cache = getattr(f, "page_cache", None)
    if cache is not None:
        index, pfns = cache.items()
        return dict(zip(index.tolist(), pfns.tolist()))
    return dict(f.pages)


def gmem_released(f):
    """Whether the file is gone (its last reference dropped), not merely its fd closed."""
    return getattr(f, "released", f.closed)


def vmm_frame(kvm, hva):
    """The host frame behind ``hva`` in the VMM, looked up without faulting anything in: None
    if the page is unmapped, untouched, or one the VMM cannot map (SIGBUS)."""
    m = kvm._mapping(hva)
    if m is None:
        return None
    if m.kind == "anon":
        hit = kvm._pt.lookup(hva >> PAGE_SHIFT)
        return None if hit is None else hit[0]
    f = m.file
    if gmem_released(f) or not f.flags & GUEST_MEMFD_FLAG_INIT_SHARED:
        return None
    return gmem_pages(f).get(m.pgoff + ((hva - m.start) >> PAGE_SHIFT))


def vmm_reachable_frames(kvm):
    """Every host frame the VMM can read through a mapping: the anonymous pages it touched and
    the pages of shared guest_memfd files it mapped. Returns ``{hva page: pfn}``."""
    out = {}
    pages, pfns, _ = kvm._pt.items(0, 1 << 36)
    out.update(zip(pages.tolist(), pfns.tolist()))
    for start, end, kind, f, pgoff in vmm_mappings(kvm):
        if kind != "gmem" or gmem_released(f) or not f.flags & GUEST_MEMFD_FLAG_INIT_SHARED:
            continue
        held = gmem_pages(f)
        for i in range((end - start) >> PAGE_SHIFT):
            pfn = held.get(pgoff + i)
            if pfn is not None:
                out[(start >> PAGE_SHIFT) + i] = pfn
    return out


def frames_bytes(host, pfns):
    """The bytes of the frames ``pfns``, concatenated."""
    if not len(pfns):
        return b""
    idx = np.asarray(sorted(set(int(p) for p in pfns)), dtype=np.intp)
    return host.mem.frames.reshape(-1, P)[idx].tobytes()


def vmm_memory_digest(kvm):
    """A digest of what the VMM sees in its memory: each mapping, and each page that holds
    anything but zeroes (an untouched page and a zero page read alike)."""
    h = hashlib.blake2b(digest_size=16)
    for start, end, kind, f, pgoff in vmm_mappings(kvm):
        h.update(repr((start, end, kind, None if f is None else f.ino, pgoff)).encode())
    frames = kvm.host.mem.frames.reshape(-1, P)
    for page, pfn in sorted(vmm_reachable_frames(kvm).items()):
        row = frames[pfn]
        if row.any():
            h.update(page.to_bytes(8, "little"))
            h.update(row.tobytes())
    return h.hexdigest()


def assert_markers_hidden(kvm, markers, where=""):
    """No private marker (a value the guest wrote to a private page, or an SEV guest's
    plaintext) is in any frame the VMM can reach."""
    if not markers:
        return
    seen = frames_bytes(kvm.host, list(vmm_reachable_frames(kvm).values()))
    for m in markers:
        assert m not in seen, f"private marker {m!r} is readable by the VMM {where}"


# -- the NPT may point only at frames the VM owns ---------------------------------------------------------

def expected_frame(vm, gfn, private):
    """The frame the VM owns at ``gfn`` for an access of this kind: its guest_memfd page
    (private, or a slot whose guest_memfd serves shared pages too), else the VMM's page at the
    slot's userspace_addr; None if it owns none there."""
    slot = vm.gfn_to_memslot(gfn)
    if slot is None:
        return None
    f = slot.gmem_file
    gmem = f is not None and not gmem_released(f) and any(b[2] is slot for b in f.bindings)
    if private or (f is not None and f.flags & GUEST_MEMFD_FLAG_MMAP):      # gmem-only slot
        return gmem_pages(f).get(slot.gmem_pgoff + gfn - slot.base_gfn) if gmem else None
    return vmm_frame(vm.kvm, slot.userspace_addr + ((gfn - slot.base_gfn) << PAGE_SHIFT))


def npt_violations(vm):
    """The NPT entries of ``vm`` that point at a frame the VM does not own at that gfn, as
    ``(gfn, pfn, flags, expected pfn)``."""
    if vm.npt.closed:
        return []
    bad = []
    gfns, pfns, flags = vm.npt.items(0, 1 << 36)
    for gfn, pfn, fl in zip(gfns.tolist(), pfns.tolist(), flags.tolist()):
        want = expected_frame(vm, gfn, bool(fl & NPT_PRIVATE))
        if want != pfn:
            bad.append((gfn, pfn, fl, want))
    return bad


def assert_npt_owned(vm):
    bad = npt_violations(vm)
    assert not bad, f"{vm!r}: NPT entries to frames the VM does not own: {bad[:4]}"


# -- snapshots of what a refused call must not change ---------------------------------------------------

def slot_state(slot):
    bm = None if slot.dirty_bitmap is None else slot.dirty_bitmap.words.tobytes()
    f = slot.gmem_file
    return (slot.as_id, slot.id, slot.base_gfn, slot.npages, slot.flags, slot.userspace_addr,
            None if f is None else f.ino, slot.gmem_pgoff, bm)


def gmem_state(f):
    frames = f.host.mem.frames.reshape(-1, P)
    h = hashlib.blake2b(digest_size=16)
    for i, pfn in sorted(gmem_pages(f).items()):
        h.update(i.to_bytes(8, "little"))
        h.update(pfn.to_bytes(8, "little"))
        h.update(frames[pfn].tobytes())
    return (f.closed, f.fd, [(s, e, id(b)) for s, e, b in f.bindings], h.hexdigest())


def sev_state(vm):
    s = vm.sev
    g = vm.host.psp.guest(s.handle) if s.handle else None
    return (s.active, s.es_active, s.snp_active, s.asid, s.handle, s.fd, s.policy,
            s.vmsa_features, s.ghcb_version, s.pages_locked,
            [(a, n, len(p)) for a, n, p in s.regions],
            None if s.enc_context_owner is None else id(s.enc_context_owner),
            [id(m) for m in s.mirror_vms], s.migration_in_progress,
            None if g is None else (g.state, g.asid))


def vm_state(vm):
    """Everything user space can observe of a VM without running it."""
    gfns, pfns, flags = ((np.empty(0),) * 3 if vm.npt.closed else vm.npt.items(0, 1 << 36))
    return (vm.closed, vm.dead, vm._refs, vm.sev_need_init,
            [slot_state(s) for _, s in sorted(vm.memslots.items())], list(iter(vm.private)),
            vm.hypercall_exit_enabled, vm.manual_dirty_log_protect, vm.user_space_msr_mask,
            vm.hlt_in_guest, [(v.vcpu_id, v.closed, v.guest_state_protected) for v in vm.vcpus],
            gfns.tobytes(), pfns.tobytes(), flags.tobytes(), sev_state(vm))


def world_state(kvm, vms, gmems):
    """A snapshot of everything a refused call must leave as it was."""
    return (vmm_memory_digest(kvm), [vm_state(vm) for vm in vms],
            [gmem_state(f) for f in gmems], sorted(kvm.host._fds))


def diff(before, after):
    """A short description of what changed between two snapshots (for assertion messages)."""
    if before == after:
        return "nothing"
    names = ("VMM memory", "VMs", "guest_memfds", "fd table")
    out = []
    for name, b, a in zip(names, before, after):
        if b != a:
            if isinstance(b, list) and len(b) == len(a):
                idx = [i for i, (x, y) in enumerate(zip(b, a)) if x != y]
                out.append(f"{name} {idx}: {[(b[i], a[i]) for i in idx][:1]}")
            else:
                out.append(f"{name}: {b!r:.200} -> {a!r:.200}")
    return "; ".join(out)


# -- guest programs ---------------------------------------------------------------------------------------

def one_op(g, make):
    """Guest program: the operation ``make(g)`` builds (or the guest code it returns), then
    GUEST_SYNC with its result."""
    op = make(g)
    result = (yield from op) if inspect.isgenerator(op) else (yield op)
    yield g.sync(result)


def run_guest(vcpu, make, mmio_reads=8):
    """Load ``make`` as the vCPU's program and run it to its sync: ``(Outcome of the last
    KVM_RUN, result)``. MMIO exits are completed with zeroes (at most ``mmio_reads`` times)."""
    out = attempt(vcpu.set_guest_code, one_op, make)
    if not out.ok:
        return out, None
    for _ in range(mmio_reads):
        out = attempt(vcpu.run)
        if not out.ok:
            return out, None
        run = out.value
        if run.exit_reason == KVM_EXIT_MMIO:         # complete it (zeroes) and resume
            continue
        if run.exit_reason == KVM_EXIT_IO and run.ucall is not None:
            cmd, values = run.ucall
            return out, (values[0] if cmd == "sync" and values else None)
        return out, None
    return out, None

