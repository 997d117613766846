"""The VMM's side of KVM's dirty rings: map each vCPU's ring, collect what KVM pushed, reset.

As the selftests' dirty_log_test (dirty_ring_collect_dirty_pages) and QEMU's
kvm_dirty_ring_reap (accel/kvm/kvm-all.c) do: the ring is mapped from the vCPU fd at
``KVM_DIRTY_LOG_PAGE_OFFSET``; entries are taken in ring order from the VMM's own fetch index
while their flags are DIRTY, each marked RESET, and ``KVM_RESET_DIRTY_RINGS`` then lets KVM free
them and write-protect their pages again.

>>> vm.enable_cap(KVM_CAP_DIRTY_LOG_RING_ACQ_REL, 65536)     # before any vCPU
>>> rings = DirtyRings(vm)                                    # after the vCPUs
>>> gfns = rings.harvest()                                    # collect every ring, then reset
"""
import mmap as _mmap

import numpy as np

from sevcore import uapi as U
from sevcore.core.arrays import sorted_unique
from sevcore.core.dirty_ring import DIRTY_GFN_SIZE, collect
from sevcore.hw.hostmem import PAGE_SHIFT, PAGE_SIZE

#: QEMU's usual ring: dirty-ring-size=4096 entries (docs/system/... kvm accelerator property).
DEFAULT_RING_ENTRIES = 4096


class DirtyRingReader:
    """One vCPU's ring as the VMM sees it: its mapping, and the VMM's fetch index."""

    def __init__(self, vcpu):
        vm = vcpu.vm
        self.kvm, self.vcpu = vm.kvm, vcpu
        self.size_bytes = vm.dirty_ring_size
        self.entries = self.size_bytes // DIRTY_GFN_SIZE
        self.hva = vcpu.mmap(self.size_bytes, _mmap.MAP_SHARED,
                             U.KVM_DIRTY_LOG_PAGE_OFFSET * PAGE_SIZE)
        # The VMM's pointer into its mapping: the frames behind the mapped pages.
        first = self.hva >> PAGE_SHIFT
        pfns = self.kvm.pagemap(np.arange(first, first + (self.size_bytes >> PAGE_SHIFT),
                                          dtype=np.uint64))
        if np.any(np.diff(pfns.astype(np.int64)) != 1):
            raise RuntimeError("the ring's mapping is not one run of frames")
        spa = int(pfns[0]) << PAGE_SHIFT
        self.mem = self.kvm.host.mem.frames[spa:spa + self.size_bytes]
        self.fetch_index = np.zeros(1, np.uint32)

    def collect(self):
        """The entries KVM published since the last collect, marked RESET: ``(slots,
        offsets)``."""
        return collect(self.mem, self.entries, self.fetch_index)

    def close(self):
        """munmap the ring (the mapping held the vCPU file, and so the VM)."""
        if self.hva is not None:
            self.mem = None
            self.kvm.munmap(self.hva, self.size_bytes)
            self.hva = None


class DirtyRings:
    """Every vCPU ring of ``vm``; :meth:`harvest` turns them into dirty gfns."""

    def __init__(self, vm):
        self.vm = vm
        self.readers = [DirtyRingReader(v) for v in vm.vcpus]

    def collect(self):
        """Collect every ring (no reset): the gfns, in ring order, duplicates kept."""
        parts = []
        for r in self.readers:
            slots, offsets = r.collect()
            if not len(slots):
                continue
            one = slots[0] == slots.min() == slots.max()      # the usual case: one slot
            for slot in (slots[:1] if one else sorted_unique(slots)):
                s = self.vm.memslots[(int(slot) >> 16, int(slot) & 0xffff)]
                mine = offsets if one else offsets[slots == slot]
                parts.append(mine + np.uint64(s.base_gfn))
        return np.concatenate(parts) if parts else np.zeros(0, np.uint64)

    def harvest(self):
        """Collect every ring, then ``KVM_RESET_DIRTY_RINGS``: the sorted, unique gfns."""
        gfns = self.collect()
        self.vm.reset_dirty_rings()
        return sorted_unique(gfns)

    def close(self):
        for r in self.readers:
            r.close()
