"""The x86 TDP MMU's fault path for a simulated VM (arch/x86/kvm/mmu/mmu.c).

A guest access is decoded into a gfn and an ``is_private`` bit as KVM does for the VM type
(``kvm_mmu_page_fault``), then looked up in the VM's NPT. A miss (or an entry of the wrong kind,
or a write through a read-only entry) takes :func:`faultin`, which follows
``kvm_mmu_faultin_pfn`` step by step: the attribute mismatch check, the no-slot
case, guest_memfd for private (and gmem-only) slots, the slot's HVA for shared ones. Failures are
reported the way KVM reports them: :class:`MemoryFault` carries the errno ``KVM_RUN`` fails with
and the ``memory_fault`` exit KVM prepared; :class:`MmioAccess` means the access is emulated as
MMIO and exits to user space.

:func:`faultin_pages` is the batched form the page kernel's callers use: it resolves the first
page exactly as :func:`faultin` does and then, for the other pages of the access that share its
slot, its attribute and its backing, allocates and maps all missing ones at once.
"""
from errno import EFAULT

import numpy as np

from sevcore import uapi as U
from sevcore.errors import SigBus
from sevcore.hw.hostmem import PAGE_SHIFT
from sevcore.core.arrays import sorted_unique
from sevcore.core.npt import NPT_DIRTY_LOG, NPT_PRIVATE, NPT_WRITABLE, Npt

MISS = Npt.MISS

#: enum kvm_gfn_range_filter (include/linux/kvm_host.h): the kind of mapping an invalidation is
#: about. It selects roots only on a VM with mirrored TDP (:meth:`sevcore.kvm.vm.Vm._zap_gfns`).
KVM_FILTER_SHARED = 1 << 0
KVM_FILTER_PRIVATE = 1 << 1
KVM_FILTER_ALL = KVM_FILTER_SHARED | KVM_FILTER_PRIVATE

#: The GPA bit that marks a TDX access shared (GPAW 48: bit 47).
TDX_SHARED_BIT = 47


class MemoryFault(Exception):
    """KVM_RUN fails with ``errno`` after kvm_prepare_memory_fault_exit(gpa, 4096, private)."""

    def __init__(self, errno, gpa, private, why, userfault=False):
        super().__init__(why)
        self.errno, self.gpa, self.private, self.why = errno, gpa, private, why
        self.userfault = userfault

    @property
    def flags(self):
        return (U.KVM_MEMORY_EXIT_FLAG_PRIVATE if self.private else 0) | \
            (U.KVM_MEMORY_EXIT_FLAG_USERFAULT if self.userfault else 0)


class MmioAccess(Exception):
    """The access hits no memory (no slot, or a write to a read-only slot): emulated MMIO."""

    def __init__(self, gpa):
        super().__init__(f"MMIO at gpa {gpa:#x}")
        self.gpa = gpa


def decode_gpa(vm, gpa):
    """The guest physical address an access reaches and how: ``(gpa, is_private, encrypted)``.

    SEV/SEV-ES (also a DEFAULT VM after the legacy KVM_SEV_INIT): the C-bit selects the guest's key, never a private fault. SNP: the C-bit makes
    the access private (and encrypted). TDX: a clear shared bit makes it private. SW_PROTECTED:
    private follows the gfn's attribute. DEFAULT: shared, plaintext.
    """
    t = vm.type
    if t in (U.KVM_X86_SEV_VM, U.KVM_X86_SEV_ES_VM, U.KVM_X86_SNP_VM) or vm.sev.active:
        c = 1 << vm.host.c_bit
        enc = bool(gpa & c)
        gpa &= ~c
        return gpa, enc and t == U.KVM_X86_SNP_VM, enc
    if t == U.KVM_X86_TDX_VM:
        s = 1 << TDX_SHARED_BIT
        private = not gpa & s
        return gpa & ~s, private, False
    if t == U.KVM_X86_SW_PROTECTED_VM:
        return gpa, vm.mem_is_private(gpa >> PAGE_SHIFT), False
    return gpa, False, False


def entry_serves(flags, private, write):
    """Whether a present NPT entry with ``flags`` serves this access without a fault."""
    return bool(flags & NPT_PRIVATE) == private and (not write or flags & NPT_WRITABLE)


def faultin(vm, gfn, private, write):
    """kvm_mmu_faultin_pfn for one page: the ``(pfn, npt_flags)`` to install.

    Raises MemoryFault (EFAULT, EIO ...) or MmioAccess exactly where KVM would."""
    gpa = gfn << PAGE_SHIFT
    # 2. Attribute mismatch, before the memslot is looked at.
    if private != vm.mem_is_private(gfn):
        raise MemoryFault(EFAULT, gpa, private,
                          "private access to a shared gfn" if private
                          else "shared access to a private gfn")
    slot = vm.gfn_to_memslot(gfn) if gfn <= vm.max_gfn else None
    # 3. No slot: private accesses may not be emulated as MMIO.
    if slot is None:
        if private:
            raise MemoryFault(EFAULT, gpa, True, "private access with no memslot")
        raise MmioAccess(gpa)
    # 4. KVM Userfault (out of tree, sevcore.uapi.KVM_MEM_USERFAULT): a marked gfn exits.
    if slot.userfault_bitmap and userfault_pending(vm, slot, np.array([gfn], np.uint64))[0]:
        raise MemoryFault(EFAULT, gpa, private, "userfault: the page is not here yet",
                          userfault=True)
    flags = 0 if slot.flags & U.KVM_MEM_READONLY else NPT_WRITABLE
    if slot.flags & U.KVM_MEM_LOG_DIRTY_PAGES:     # kvm_slot_dirty_track_enabled: bitmap or ring
        flags |= NPT_DIRTY_LOG
    # 5. Private or gmem-only: guest_memfd.
    if private or slot.gmem_only:
        if not slot.flags & U.KVM_MEM_GUEST_MEMFD:
            raise MemoryFault(EFAULT, gpa, private, "private access to a slot without gmem")
        file = slot.gmem_file
        if file is None:
            raise MemoryFault(EFAULT, gpa, private, "the slot's guest_memfd was released")
        err, pfn = file.get_pfn(slot, gfn)
        if err:
            raise MemoryFault(err, gpa, private, "kvm_gmem_get_pfn failed")
        return pfn, flags | (NPT_PRIVATE if private else 0)
    # 6. Shared: the slot's HVA, through the VMM's page tables.
    if write and slot.flags & U.KVM_MEM_READONLY:
        raise MmioAccess(gpa)
    hva = slot.userspace_addr + ((gfn - slot.base_gfn) << PAGE_SHIFT)
    try:
        pfn = vm.kvm.hva_to_pfn(hva, write=write)
    except (OSError, SigBus) as e:
        raise MemoryFault(EFAULT, gpa, False, f"hva {hva:#x} cannot be faulted in: {e}") from None
    return pfn, flags


def userfault_pending(vm, slot, gfns):
    """Which of ``gfns`` (in ``slot``) have their bit set in the slot's userfault bitmap, read
    from user memory as KVM reads it on each fault."""
    off = gfns - np.uint64(slot.base_gfn)
    lo = int(off.min()) >> 6
    raw = vm.kvm.read(slot.userfault_bitmap + 8 * lo, 8 * ((int(off.max()) >> 6) - lo + 1))
    # The little-endian words as one bit per page, then a gather: NumPy's elementwise uint64
    # shifts (and // and % by 64) were most of this function's time on the fault batches of a
    # 1 GiB post-copy (bench/bench_postcopy.py). Offsets are far below 2**63: a view indexes.
    bits = np.unpackbits(np.frombuffer(raw, np.uint8), bitorder="little")
    idx = off.view(np.int64)
    if lo:
        idx -= lo << 6             # ``off`` is the subtraction's own result: nobody else holds it
    return bits[idx] != 0


def _first_pending(vm, slot, gfns, keep):
    """The index in ``gfns`` of the first page with ``keep`` set whose userfault bit is set
    (``len(gfns)`` if none), looked for in windows that double from 64 pages."""
    lo, w = 0, 64
    while lo < len(gfns):
        hi = min(len(gfns), lo + w)
        sel = np.flatnonzero(keep[lo:hi])
        if len(sel):
            hit = np.flatnonzero(userfault_pending(vm, slot, gfns[lo:hi][sel]))
            if len(hit):
                return lo + int(sel[hit[0]])
        lo, w = hi, w * 2
    return len(gfns)


def translate(vm, gfn, private, write):
    """The host pfn and NPT flags serving an access to ``gfn``, faulting it in if needed."""
    hit = vm.npt.lookup(gfn) if gfn <= vm.max_gfn else None
    if hit is not None and entry_serves(hit[1], private, write):
        return hit
    pfn, flags = faultin(vm, gfn, private, write)
    vm.npt.map(gfn, pfn, flags)
    return pfn, flags


def faultin_pages(vm, gfns, private, write):
    """Fault in ``gfns[0]`` (raising as :func:`faultin`), then, in one batch, every later gfn of
    ``gfns`` that shares its slot, its attribute and its backing and is not yet mapped for this
    access. ``gfns`` is a uint64 array: a run (``np.arange``) or any list of pages."""
    g0 = int(gfns[0])
    pfn, flags = faultin(vm, g0, private, write)
    vm.npt.map(g0, pfn, flags)
    slot = vm.gfn_to_memslot(g0)
    rest = gfns[1:]
    keep = (rest >= np.uint64(slot.base_gfn)) & (rest < np.uint64(slot.end_gfn))
    if vm.has_private_mem:
        keep &= vm.private.contains_array(rest) == private
    if slot.userfault_bitmap and keep.any():
        # The access stops at the first page still marked (its exit is the next fault), so
        # only the pages before it are mapped now: each fault then costs what the kernel
        # gets through, not a scan of everything after it (a post-copy target's guest faults
        # once per page fetched).
        stop = _first_pending(vm, slot, rest, keep)
        rest, keep = rest[:stop], keep[:stop]
    rest = rest[keep]
    if len(rest) == 0:
        return
    pfns, eflags = vm.npt.lookup_batch(rest, with_flags=True)
    need = pfns == MISS
    need |= (eflags & NPT_PRIVATE != 0) != private
    if write:
        need |= eflags & NPT_WRITABLE == 0
    todo = sorted_unique(rest[need])
    if len(todo) == 0:
        return
    offsets = todo - np.uint64(slot.base_gfn)
    if private or slot.gmem_only:
        new = slot.gmem_file.get_pfns(slot, offsets)
    else:
        new = vm.kvm.anon_pfns((slot.userspace_addr >> PAGE_SHIFT) + offsets)
        if new is None:
            return             # not one anonymous mapping: each page takes faultin itself
    vm.npt.map_runs(todo, new, flags)
