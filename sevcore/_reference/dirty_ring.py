"""Slow, obviously correct twins of the dirty ring's C loops (csrc/dirty_ring.h): the oracle for
:func:`sevcore.core.dirty_ring.collect` and ``GuestPageOps.reset_ring``.

A ring is a list of ``[flags, slot, offset]`` entries; the reset records the gfns it
write-protects in a set instead of an NPT.
"""
DIRTY, RESET = 1, 2
U32 = 0xffffffff
U64 = (1 << 64) - 1


def collect(entries, fetch_index, cap):
    """The VMM's collect from ``fetch_index``: ``(slots, offsets, new fetch_index)``, the
    collected entries' flags set to RESET; at most ``cap`` entries and one lap."""
    size = len(entries)
    slots, offsets = [], []
    while len(slots) < min(cap, size):
        e = entries[fetch_index % size]
        if e[0] != DIRTY:
            break
        slots.append(e[1])
        offsets.append(e[2])
        e[0] = RESET
        fetch_index = (fetch_index + 1) & U32
    return slots, offsets, fetch_index


def reset(entries, reset_index, slots, protected):
    """kvm_dirty_ring_reset: every RESET entry from ``reset_index`` on is freed (flags 0);
    consecutive entries of one slot are batched as KVM batches them (a batch covers 64 pages
    from its lowest offset; a later entry joins it forwards, or backwards if no page falls off
    the top; offsets compare modulo 2^64), and each batch's pages are added to ``protected`` if
    the batch lies inside the slot ``slots`` (``{id: (base_gfn, npages)}``) names. Returns
    ``(count, new reset_index)``."""
    size = len(entries)
    count = 0
    batch = None                          # [slot, first offset, offsets relative to it]
    while True:
        e = entries[reset_index % size]
        if not e[0] & RESET:
            break
        slot, offset = e[1], e[2]
        e[0] = 0
        reset_index = (reset_index + 1) & U32
        count += 1
        if batch is not None and slot == batch[0]:
            delta = ((offset - batch[1] + (1 << 63)) & U64) - (1 << 63)
            if 0 <= delta < 64:
                batch[2].add(delta)
                continue
            if -64 < delta < 0 and max(batch[2]) - delta < 64:
                batch[1] = offset
                batch[2] = {r - delta for r in batch[2]} | {0}
                continue
        _protect(batch, slots, protected)
        batch = [slot, offset, {0}]
    _protect(batch, slots, protected)
    return count, reset_index


def _protect(batch, slots, protected):
    """kvm_reset_dirty_gfn for one batch."""
    if batch is None or batch[0] not in slots:
        return
    base, npages = slots[batch[0]]
    first = batch[1]
    if first >= npages or first + max(batch[2]) >= npages:
        return
    protected.update(base + first + r for r in batch[2])
