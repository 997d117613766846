"""KVM's dirty ring (virt/kvm/dirty_ring.c, the dirty-ring parts of virt/kvm/kvm_main.c).

``KVM_CAP_DIRTY_LOG_RING`` (or ``_ACQ_REL``) gives every vCPU a ring of ``struct kvm_dirty_gfn``
in place of the memslots' dirty bitmaps. A guest write to a page of a logging memslot pushes the
page to the writing vCPU's ring (once: the page stays writable until user space resets it); the
VMM maps the ring from the vCPU fd at ``KVM_DIRTY_LOG_PAGE_OFFSET``, collects the DIRTY entries
and marks them RESET, and ``KVM_RESET_DIRTY_RINGS`` frees them and write-protects their pages
again. A vCPU whose ring reaches its soft limit leaves ``KVM_RUN`` with
``KVM_EXIT_DIRTY_RING_FULL`` and does not run again until it is below it.

The ring's pages are host frames (kvm_dirty_ring_alloc's vzalloc); the C core pushes from the
guest page kernel and runs the reset (csrc/dirty_ring.h, csrc/guest.h).
"""
import mmap as _mmap
from errno import E2BIG, EINVAL

import numpy as np

from sevcore import uapi as U
from sevcore.core.dirty_ring import DIRTY_GFN_SIZE, DirtyRingBuffer
from sevcore.core.npt import NPT_DIRTY_LOG, Npt
from sevcore.errors import KvmError, NotModelled, SigBus
from sevcore.hw.hostmem import PAGE_SHIFT, PAGE_SIZE

#: What KVM_CHECK_EXTENSION reports for KVM_CAP_DIRTY_LOG_RING(_ACQ_REL) on x86: the largest
#: ring in bytes (kvm_vm_ioctl_check_extension_generic).
KVM_DIRTY_RING_MAX_BYTES = U.KVM_DIRTY_RING_MAX_ENTRIES * DIRTY_GFN_SIZE
#: kvm_dirty_ring_get_rsvd_entries: KVM_DIRTY_RING_RSVD_ENTRIES + kvm_cpu_dirty_log_size(), which
#: is 0 on AMD (no PML).
RSVD_ENTRIES = U.KVM_DIRTY_RING_RSVD_ENTRIES
#: The vCPU fd's pages KVM serves besides the ring (kvm_vcpu_fault): kvm_run, PIO data, the
#: coalesced MMIO ring.
_RUN_PAGES = (0, 1, 2)


class DirtyRingFull(Exception):
    """A push brought the running vCPU's ring to its soft limit: KVM_RUN returns with
    KVM_EXIT_DIRTY_RING_FULL before the access that pushed is retried."""


def enable_dirty_log_ring(vm, ioctl, size):
    """kvm_vm_ioctl_enable_dirty_log_ring: ``size`` is the ring's bytes per vCPU, taken as a
    u32 (the function's parameter; the upper half of args[0] is dropped)."""
    size &= 0xffffffff
    if not size or size & (size - 1):
        raise KvmError(EINVAL, ioctl, f"ring size {size} is not a power of two")
    if size < RSVD_ENTRIES * DIRTY_GFN_SIZE or size < PAGE_SIZE:
        raise KvmError(EINVAL, ioctl, f"ring size {size} holds fewer than the reserved entries "
                                      f"or a page")
    if size > KVM_DIRTY_RING_MAX_BYTES:
        raise KvmError(E2BIG, ioctl, f"ring size {size} > {KVM_DIRTY_RING_MAX_BYTES}")
    if vm.dirty_ring_size:
        raise KvmError(EINVAL, ioctl, "the dirty ring size can be set once")
    if vm.vcpus:
        raise KvmError(EINVAL, ioctl, "vCPUs already exist")
    vm.dirty_ring_size = size
    return 0


class VcpuDirtyRing(DirtyRingBuffer):
    """struct kvm_dirty_ring of one vCPU, in host frames of its own (kvm_dirty_ring_alloc)."""

    def __init__(self, host, index, size_bytes):
        self.host, self.index = host, index
        self.npages = size_bytes >> PAGE_SHIFT
        self.spa = host.mem.alloc_contiguous(self.npages)
        super().__init__(host.mem.frames[self.spa:self.spa + size_bytes],
                         size_bytes // DIRTY_GFN_SIZE,
                         size_bytes // DIRTY_GFN_SIZE - RSVD_ENTRIES)

    def free(self):
        """kvm_dirty_ring_free: the frames go back to the host."""
        if self.spa is not None:
            self.close()
            pfn = self.spa >> PAGE_SHIFT
            self.host.mem.free(np.arange(pfn, pfn + self.npages, dtype=np.uint64))
            self.spa = None


def reset_dirty_rings(vm):
    """kvm_vm_ioctl_reset_dirty_pages: every vCPU's collected entries freed and their pages
    write-protected again; returns how many entries were reset."""
    ioctl = "KVM_RESET_DIRTY_RINGS"
    vm._enter(ioctl)
    if not vm.dirty_ring_size:
        raise KvmError(EINVAL, ioctl, "no dirty ring is enabled")
    ops = vm.page_ops()
    return sum(ops.reset_ring(v.dirty_ring) for v in vm.vcpus)


def _in_ring(vm, pgoff):
    """kvm_page_in_dirty_ring."""
    return U.KVM_DIRTY_LOG_PAGE_OFFSET <= pgoff < \
        U.KVM_DIRTY_LOG_PAGE_OFFSET + (vm.dirty_ring_size >> PAGE_SHIFT)


class DirtyRingVcpu:
    """Mixin of Vcpu: its dirty ring, the vCPU fd's mmap, and the push of a logged write."""

    #: The vCPU's ring (a :class:`VcpuDirtyRing`) when the VM has KVM_CAP_DIRTY_LOG_RING.
    dirty_ring = None

    def mmap(self, length, flags=_mmap.MAP_SHARED, offset=0, prot=_mmap.PROT_READ |
             _mmap.PROT_WRITE):
        """Map the vCPU fd into the VMM (kvm_vcpu_mmap); returns the HVA. A mapping that
        reaches the dirty ring must be MAP_SHARED and not PROT_EXEC (EINVAL). Its ring pages
        read and write the ring (kvm_vcpu_fault); the kvm_run, PIO and coalesced-MMIO pages are
        not modelled as memory (``vcpu.kvm_run`` is the kvm_run), and any other page is
        SIGBUS."""
        if offset % PAGE_SIZE or not isinstance(length, int) or length <= 0:
            raise OSError(EINVAL, "mmap: unaligned offset or bad length")
        pgoff = offset >> PAGE_SHIFT
        last = pgoff + ((length + PAGE_SIZE - 1) >> PAGE_SHIFT) - 1
        if (_in_ring(self.vm, pgoff) or _in_ring(self.vm, last)) and \
                (prot & _mmap.PROT_EXEC or not flags & _mmap.MAP_SHARED):
            raise OSError(EINVAL, "mmap: the dirty ring must be mapped shared and not executable")
        return self.vm.kvm.map_file(length, self, pgoff)

    def host_fault(self, index, hva):
        """kvm_vcpu_fault for page ``index`` of the vCPU fd: the frame behind it."""
        if self.dirty_ring is not None and _in_ring(self.vm, index):
            return (self.dirty_ring.spa >> PAGE_SHIFT) + index - U.KVM_DIRTY_LOG_PAGE_OFFSET
        if index in _RUN_PAGES:
            raise NotModelled(f"page {index} of a vCPU fd (kvm_run, PIO data or coalesced MMIO) "
                              f"is not modelled as memory: use vcpu.kvm_run")
        raise SigBus(hva, f"no page at offset {index} of a vCPU fd")

    def resident_pfns(self, index):
        """The frames a mapping of this vCPU fd has at pages ``index`` (uint64): the ring's."""
        index = np.asarray(index, dtype=np.uint64)
        out = np.full(len(index), Npt.MISS, np.uint64)
        r = self.dirty_ring
        if r is not None:
            rel = index - np.uint64(U.KVM_DIRTY_LOG_PAGE_OFFSET)
            inside = (index >= np.uint64(U.KVM_DIRTY_LOG_PAGE_OFFSET)) & \
                (rel < np.uint64(r.npages))
            out[inside] = rel[inside] + np.uint64(r.spa >> PAGE_SHIFT)
        return out

    def get_file(self):
        """A mapping of the vCPU fd holds its file, and the file holds the VM."""
        self.vm._get()

    def fput(self):
        self.vm._put()

    def _dirty_ring_push(self, gfn):
        """mark_page_dirty_in_slot with this vCPU running: ``gfn`` (in a logging slot) goes to
        its ring and its NPT entry stops logging until the next reset; raises DirtyRingFull if
        the ring is now soft-full (kvm_dirty_ring_push's request)."""
        vm = self.vm
        slot = vm.gfn_to_memslot(gfn)
        self.dirty_ring.push((slot.as_id << 16) | slot.id, gfn - slot.base_gfn)
        vm.npt.protect_range(gfn, 1, clear_flags=NPT_DIRTY_LOG)
        if self.dirty_ring.soft_full:
            raise DirtyRingFull()
