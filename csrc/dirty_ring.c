/*
 * The dirty ring's collect (the VMM's side) and reset (KVM's), csrc/dirty_ring.h. Both are loops
 * over many entries: a migration harvests every page the guest dirtied since the last pass, so
 * they are here rather than an entry at a time in Python.
 */
#include "dirty_ring.h"

#include <errno.h>
#include <limits.h>

#include "guest.h"
#include "npt.h"

static int bad_size(uint32_t size) { return !size || (size & (size - 1)); }

int64_t sc_dirty_ring_collect(struct sc_dirty_gfn *gfns, uint32_t size, uint32_t *fetch_index,
                              uint32_t *slots, uint64_t *offsets, uint64_t cap,
                              struct sc_err *err)
{
    if (!gfns || !fetch_index || (cap && (!slots || !offsets)))
        return sc_refuse(err, EINVAL, SC_ERR_NULL, 0, 0, 0, 0);
    if (bad_size(size))
        return sc_refuse(err, EINVAL, SC_ERR_RING_SIZE, 0, size, 0, 0);
    uint32_t idx = *fetch_index;
    uint64_t n = 0;
    /* At most one lap: past it the entries are the ones just collected. */
    while (n < cap && n < size) {
        struct sc_dirty_gfn *e = &gfns[idx & (size - 1)];
        /* dirty_gfn_is_dirtied: the flags, then (acquire) the entry they publish. */
        if (__atomic_load_n(&e->flags, __ATOMIC_ACQUIRE) != SC_DIRTY_GFN_F_DIRTY)
            break;
        slots[n] = e->slot;
        offsets[n] = e->offset;
        /* dirty_gfn_set_collected: read before handing the entry back. */
        __atomic_store_n(&e->flags, (uint32_t)SC_DIRTY_GFN_F_RESET, __ATOMIC_RELEASE);
        idx++;
        n++;
    }
    *fetch_index = idx;
    return (int64_t)n;
}

/* The index of the highest set bit of a nonzero mask (__fls). */
static unsigned fls64(uint64_t mask) { return 63u - (unsigned)__builtin_clzll(mask); }

/* kvm_reset_dirty_gfn: write-protect the pages of mask (bit i: offset + i) in the slot named
 * `slot`, if it is one of slots[] and the mask stays inside it; anything else the VMM may have
 * written into the entries is ignored, as KVM ignores it. */
static int reset_gfns(struct sc_npt *npt, const struct sc_guest_slot *slots, size_t nslots,
                      uint32_t slot, uint64_t offset, uint64_t mask, struct sc_err *err)
{
    const struct sc_guest_slot *s = NULL;
    for (size_t k = 0; k < nslots; k++)
        if (slots[k].id == slot) {
            s = &slots[k];
            break;
        }
    /* KVM tests offset + __fls(mask) >= npages, a sum that can wrap for an offset the VMM
     * forged; here the wrapped case is skipped too, so nothing outside the slot is touched. */
    if (!s || offset >= s->npages || fls64(mask) >= s->npages - offset)
        return 0;
    /* kvm_arch_mmu_enable_log_dirty_pt_masked, one run of set bits at a time. */
    while (mask) {
        unsigned lo = (unsigned)__builtin_ctzll(mask);
        uint64_t rest = ~mask >> lo;
        unsigned len = rest ? (unsigned)__builtin_ctzll(rest) : 64u - lo;
        int64_t rc = sc_npt_protect_range(npt, s->base_gfn + offset + lo, len, 0,
                                          SC_NPT_DIRTY_LOG, err);
        if (rc < 0)
            return (int)rc;
        mask = len + lo >= 64 ? 0 : mask & (~(uint64_t)0 << (lo + len));
    }
    return 0;
}

int64_t sc_dirty_ring_reset(struct sc_dirty_ring *ring, struct sc_npt *npt,
                            const struct sc_guest_slot *slots, size_t nslots, struct sc_err *err)
{
    if (!ring || !ring->gfns || !npt || (nslots && !slots))
        return sc_refuse(err, EINVAL, SC_ERR_NULL, 0, 0, 0, 0);
    if (bad_size(ring->size))
        return sc_refuse(err, EINVAL, SC_ERR_RING_SIZE, 0, ring->size, 0, 0);
    uint32_t cur_slot = 0;
    uint64_t cur_offset = 0, mask = 0;
    int64_t count = 0;
    while (count < INT_MAX) {
        struct sc_dirty_gfn *e = &ring->gfns[ring->reset_index & (ring->size - 1)];
        if (!(__atomic_load_n(&e->flags, __ATOMIC_ACQUIRE) & SC_DIRTY_GFN_F_RESET))
            break;
        uint32_t next_slot = e->slot;
        uint64_t next_offset = e->offset;
        /* kvm_dirty_gfn_set_invalid: the entry is free again. */
        __atomic_store_n(&e->flags, 0u, __ATOMIC_RELEASE);
        ring->reset_index++;
        count++;
        if (mask) {
            /* Coalesce a guest scanning pages of one slot: forwards within 64 pages, or
             * backwards while the mask does not lose bits off the top. */
            if (next_slot == cur_slot) {
                int64_t delta = (int64_t)(next_offset - cur_offset);
                if (delta >= 0 && delta < 64) {
                    mask |= (uint64_t)1 << delta;
                    continue;
                }
                if (delta > -64 && delta < 0 && (mask << -delta >> -delta) == mask) {
                    cur_offset = next_offset;
                    mask = (mask << -delta) | 1;
                    continue;
                }
            }
            int rc = reset_gfns(npt, slots, nslots, cur_slot, cur_offset, mask, err);
            if (rc)
                return rc;
        }
        cur_slot = next_slot;
        cur_offset = next_offset;
        mask = 1;
    }
    if (mask) {
        int rc = reset_gfns(npt, slots, nslots, cur_slot, cur_offset, mask, err);
        if (rc)
            return rc;
    }
    return count;
}
