"""A dirty ring's memory and indices (csrc/dirty_ring.h): KVM's ``struct kvm_dirty_ring`` over
an array of ``struct kvm_dirty_gfn`` that the VMM maps, and the VMM's collect.

:class:`DirtyRingBuffer` is KVM's side: :meth:`~DirtyRingBuffer.push` fills the next entry
(kvm_dirty_ring_push), ``used``/``soft_full``/``full`` are kvm_dirty_ring_used and its limits, and
the reset walks the collected entries in C (``GuestPageOps.reset_ring`` in
:mod:`sevcore.core.pages`, as it write-protects pages through the NPT). :func:`collect` is the
VMM's side: take the entries KVM published, mark them collected.
"""
import numpy as np

from sevcore import _bindings as _b

#: One ``struct kvm_dirty_gfn`` (flags, slot, offset): 16 bytes.
DIRTY_GFN = np.dtype(_b.DIRTY_GFN_DTYPE)
DIRTY_GFN_SIZE = _b.DIRTY_GFN_SIZE
DIRTY = 1
RESET = 2


def entries(mem):
    """``mem`` (ring memory, a writable uint8 buffer) as a structured array of entries."""
    return np.frombuffer(mem, dtype=DIRTY_GFN)


class DirtyRingBuffer:
    """KVM's indices over ``size`` entries in ``mem`` (a writable buffer that stays alive as long
    as this object), soft-full at ``soft_limit`` used entries."""

    def __init__(self, mem, size, soft_limit):
        if size <= 0 or size & (size - 1):
            raise ValueError(f"a dirty ring's size must be a power of two, not {size}")
        if not 0 < soft_limit <= size:
            raise ValueError(f"soft_limit {soft_limit} must be in (0, {size}]")
        self.size, self.soft_limit = size, soft_limit
        self._ring, self._view = _b.dirty_ring(mem, size, soft_limit)
        self.entries = entries(mem)[:size]

    def cdata(self):
        """The C ``struct sc_dirty_ring`` (for the guest page kernel and the reset)."""
        return self._ring

    @property
    def dirty_index(self):
        return self._ring.dirty_index

    @property
    def reset_index(self):
        return self._ring.reset_index

    @property
    def used(self):
        """kvm_dirty_ring_used: entries pushed and not yet reset (u32 arithmetic)."""
        return (self._ring.dirty_index - self._ring.reset_index) & 0xffffffff

    @property
    def soft_full(self):
        return self.used >= self.soft_limit

    @property
    def full(self):
        return self.used >= self.size

    def push(self, slot, offset):
        """kvm_dirty_ring_push: slot and offset, then flags = DIRTY, then the index."""
        e = self.entries[self._ring.dirty_index & (self.size - 1)]
        e["slot"], e["offset"] = slot, offset
        e["flags"] = DIRTY
        self._ring.dirty_index = (self._ring.dirty_index + 1) & 0xffffffff

    def close(self):
        """Drop the C view of the memory (the ring's pages can then be freed)."""
        if self._view is not None:
            _b.ffi.release(self._view)
            self._view = None
            self.entries = None


def collect(mem, size, fetch_index, cap=None):
    """The VMM's collect over the ring in ``mem`` (``size`` entries) from ``fetch_index[0]`` (a
    one-element uint32 array, advanced): up to ``cap`` (default: one lap) entries whose flags are
    DIRTY, each marked RESET. Returns ``(slots, offsets)``: uint32 and uint64 arrays."""
    return _b.dirty_ring_collect(mem, size, fetch_index, size if cap is None else cap)
