/*
 * KVM's per-vCPU dirty ring (virt/kvm/dirty_ring.c, include/uapi/linux/kvm.h): an array of
 * struct kvm_dirty_gfn in memory the VMM maps from the vCPU fd, filled by KVM and emptied by the
 * VMM through the flags of each entry.
 *
 *   KVM       push: slot and offset, then flags = DIRTY (kvm_dirty_ring_push)
 *   the VMM   collect: an entry whose flags are DIRTY (load-acquire) is read, then flags = RESET
 *             (store-release), in ring order from its own fetch index (the selftests'
 *             dirty_ring_collect_dirty_pages; QEMU's kvm_dirty_ring_reap_one)
 *   KVM       reset (KVM_RESET_DIRTY_RINGS): from reset_index, every entry whose flags have RESET
 *             is made free (flags = 0, store-release) and its page write-protected again, runs of
 *             entries of one slot within 64 pages coalesced into one mask (kvm_dirty_ring_reset,
 *             kvm_reset_dirty_gfn); csrc/guest.h declares it beside the push of the guest page
 *             kernel, as it walks the NPT
 *
 * The indices are u32 and wrap; an entry's place is index & (size - 1), size a power of two.
 * The ring's memory is the VMM's too, so nothing in an entry is trusted: a slot or offset the VMM
 * wrote is checked against the memslots before it is used (kvm_reset_dirty_gfn).
 *
 * -EINVAL: a NULL pointer (SC_ERR_NULL), a size that is not a power of two (SC_ERR_RING_SIZE,
 * value = the size).
 */
#ifndef SEVCORE_DIRTY_RING_H
#define SEVCORE_DIRTY_RING_H

#include <stddef.h>
#include <stdint.h>

#include "sevcore.h"

/* cdef:begin */
enum {
    SC_DIRTY_GFN_F_DIRTY = 1,
    SC_DIRTY_GFN_F_RESET = 2,
};

/* struct kvm_dirty_gfn: 16 bytes, the UAPI layout. slot is (as_id << 16) | id, offset the gfn's
 * page in that memslot. */
struct sc_dirty_gfn {
    uint32_t flags;
    uint32_t slot;
    uint64_t offset;
};

/* struct kvm_dirty_ring: KVM's side of one vCPU's ring (its indices are KVM's, not shared). */
struct sc_dirty_ring {
    struct sc_dirty_gfn *gfns;  /* size entries, in the memory the VMM maps */
    uint32_t size;              /* entries, a power of two */
    uint32_t soft_limit;        /* size - the reserved entries: used >= this is soft-full */
    uint32_t dirty_index;       /* next entry KVM fills */
    uint32_t reset_index;       /* next entry KVM frees */
};

/* The VMM's collect: from gfns[*fetch_index & (size - 1)] on, up to cap entries whose flags are
 * exactly DIRTY, each copied to slots[i] / offsets[i] and marked RESET, *fetch_index advanced
 * past them. Returns how many; -EINVAL. */
int64_t sc_dirty_ring_collect(struct sc_dirty_gfn *gfns, uint32_t size, uint32_t *fetch_index,
                              uint32_t *slots, uint64_t *offsets, uint64_t cap,
                              struct sc_err *err);
/* cdef:end */

/* kvm_dirty_ring_push, for KVM's own callers in C (the guest page kernel). */
static inline void sc_dirty_ring_push(struct sc_dirty_ring *r, uint32_t slot, uint64_t offset)
{
    struct sc_dirty_gfn *e = &r->gfns[r->dirty_index & (r->size - 1)];
    e->slot = slot;
    e->offset = offset;
    /* The entry's contents before its flag (smp_wmb in the kernel). */
    __atomic_store_n(&e->flags, (uint32_t)SC_DIRTY_GFN_F_DIRTY, __ATOMIC_RELEASE);
    r->dirty_index++;
}

#endif
