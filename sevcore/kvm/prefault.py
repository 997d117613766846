"""``KVM_PRE_FAULT_MEMORY`` on a vCPU fd: map guest memory into the TDP MMU before the guest
touches it (kvm_vcpu_pre_fault_memory in virt/kvm/kvm_main.c, kvm_arch_vcpu_pre_fault_memory and
kvm_tdp_map_page in arch/x86/kvm/mmu/mmu.c).

Each step is a TDP fault of the range's first page with only PFERR_GUEST_FINAL_MASK in the error
code: a read fault, private where the gfn's attribute says so on a VM with private memory. The
model maps 4 KiB pages, so a step covers one page (kvm_arch_vcpu_pre_fault_memory returns the
bytes up to the end of the mapping's level); pages that share the first one's slot, attribute
and backing are faulted in one batch (:func:`sevcore.kvm.mmu.faultin_pages`) and then counted as
the steps they would have been. The first failing step ends the loop: with pages already mapped
the ioctl still succeeds and the leftover range is written back, without any it fails with the
step's errno.
"""
from errno import EFAULT, EINVAL, ENOENT, EOPNOTSUPP

import numpy as np

from sevcore.core.arrays import U64_MAX
from sevcore.core.npt import NPT_PRIVATE
from sevcore.errors import KvmError
from sevcore.hw.hostmem import PAGE_SHIFT, PAGE_SIZE
from sevcore.kvm.mmu import MemoryFault, MmioAccess, entry_serves, faultin_pages

IOCTL = "KVM_PRE_FAULT_MEMORY"


class KvmPreFaultMemory:
    """struct kvm_pre_fault_memory as the ioctl writes it back: the range not yet mapped."""

    __slots__ = ("gpa", "size", "flags")

    def __init__(self, gpa, size, flags):
        self.gpa, self.size, self.flags = gpa, size, flags

    def __repr__(self):
        return f"kvm_pre_fault_memory(gpa={self.gpa:#x}, size={self.size:#x}, flags={self.flags})"


def _mapped_run(vm, gfns, private):
    """How many of ``gfns`` (from the first) the NPT now maps for a read of this kind."""
    pfns, flags = vm.npt.lookup_batch(gfns, with_flags=True)
    ok = (pfns != vm.npt.MISS) & (((flags & np.uint64(NPT_PRIVATE)) != 0) == private)
    bad = np.flatnonzero(~ok)
    return len(gfns) if not len(bad) else int(bad[0])


def _step(vm, gpa, size):
    """kvm_arch_vcpu_pre_fault_memory for the range's first page, and the pages after it that
    one batched fault maps: the bytes done (> 0), or raises KvmError with the step's errno."""
    if not vm.pre_fault_allowed:
        raise KvmError(EOPNOTSUPP, IOCTL, "pre-faulting is not allowed for this VM yet")
    gfn = gpa >> PAGE_SHIFT
    # kvm_tdp_map_page: a gfn past the MMU's reach is emulated MMIO (RET_PF_EMULATE -> ENOENT).
    if gfn > vm.max_gfn:
        raise KvmError(ENOENT, IOCTL, f"gpa {gpa:#x} is beyond the TDP MMU")
    private = vm.has_private_mem and vm.mem_is_private(gfn)
    npages = min(size >> PAGE_SHIFT, vm.max_gfn + 1 - gfn)
    hit = vm.npt.lookup(gfn)
    if hit is not None and entry_serves(hit[1], private, False):
        done = 1                               # RET_PF_SPURIOUS: already mapped
    else:
        gfns = np.arange(gfn, gfn + npages, dtype=np.uint64)
        try:
            faultin_pages(vm, gfns, private, False)
        except MmioAccess:
            raise KvmError(ENOENT, IOCTL, f"gpa {gpa:#x} is not backed by a memslot") from None
        except MemoryFault as f:
            raise KvmError(f.errno or EFAULT, IOCTL, f.why) from None
        done = _mapped_run(vm, gfns, private)
    return done << PAGE_SHIFT


def pre_fault_memory(vcpu, gpa, size, flags):
    """kvm_vcpu_pre_fault_memory (see the module docstring)."""
    for name, v in (("gpa", gpa), ("size", size), ("flags", flags)):
        if not isinstance(v, int) or not 0 <= v <= U64_MAX:
            raise TypeError(f"kvm_pre_fault_memory.{name} must be a u64, got {v!r}")
    vcpu._enter(IOCTL)
    if flags:
        raise KvmError(EINVAL, IOCTL, "flags must be 0")
    # gpa + size is a u64 sum: an empty or wrapping range is refused.
    if gpa % PAGE_SIZE or size % PAGE_SIZE or (gpa + size) & U64_MAX <= gpa:
        raise KvmError(EINVAL, IOCTL, "unaligned, empty or wrapping range")
    vm = vcpu.vm
    out = KvmPreFaultMemory(gpa, size, flags)
    while out.size:
        try:
            done = _step(vm, out.gpa, out.size)
        except KvmError:
            if out.size == size:
                raise                          # nothing was mapped: the step's error
            break                              # at least one page: success, leftover written
        out.size -= done
        out.gpa += done
    return out
