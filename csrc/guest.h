/*
 * Bulk guest-memory access: a simulated guest touching many of its pages in one call, through its
 * nested page table (csrc/npt.h) into host physical memory, as the CPU does once KVM has
 * installed the mappings.
 *
 * The call is the fast path only. It walks the pages in order and stops in front of the first one
 * whose access would fault on real hardware (an NPT violation: KVM's kvm_tdp_page_fault() and
 * kvm_mmu_page_fault() in arch/x86/kvm/mmu/mmu.c), returning how many pages it completed. The
 * Python model resolves the fault (installs NPT entries, possibly for a batch of pages) and calls
 * again from that page. A page faults when
 *
 *   - its entry is not present,
 *   - its SC_NPT_PRIVATE bit differs from the access's kind (a private access through a shared
 *     mapping or the reverse: KVM's kvm_mem_is_private() check turning into a
 *     KVM_EXIT_MEMORY_FAULT), or
 *   - the op writes and the entry is not SC_NPT_WRITABLE, or
 *   - the access is private, ctx->rmp is set (an SEV-SNP guest) and the RMP entry of the page's
 *     frame is not assigned to ctx->rmp_asid and validated: the RMP check of the nested walk
 *     (AMD64 APM vol. 2 15.36.10), which the model turns into #VC PAGE_NOT_VALIDATED in the
 *     guest (or the #NPF of a frame the guest does not own).
 *
 * A write through an entry with SC_NPT_DIRTY_LOG sets the gfn's bit in the dirty bitmap of the
 * memslot that holds it, atomically and after the page's data is stored, as
 * mark_page_dirty_in_slot() (virt/kvm/kvm_main.c) does after kvm_write_guest_page(): a harvester
 * that takes the bit and then copies the page sees the new data.
 *
 * With a dirty ring in the context (ctx->ring, KVM_CAP_DIRTY_LOG_RING) such a write instead pushes
 * the page to the ring (kvm_dirty_ring_push, with the slot's id and the page's offset in it) and
 * clears SC_NPT_DIRTY_LOG from its entry, as KVM's fault on the write-protected page makes the
 * SPTE writable: later writes push nothing until KVM_RESET_DIRTY_RINGS protects it again. The
 * call then stops in front of the page whose push would bring the ring to its soft limit; the
 * model pushes that one itself and leaves KVM_RUN with KVM_EXIT_DIRTY_RING_FULL
 * (kvm_dirty_ring_check_request), the page unwritten until the guest runs again.
 *
 * An SEV guest's encrypted (C-bit) access goes through the memory engine (csrc/memcrypt.h) at the
 * page's SPA: reads decrypt, writes encrypt, so the frames hold ciphertext and the ops see
 * plaintext. Without an engine the frames hold the plaintext.
 *
 * Every argument is checked before any byte is written, and so is every page the call would
 * complete: the NPT entries up to the stopping page are read once in a first pass (the table does
 * not change during the call: sevcore/core/pages.py holds the Npt's lock), so a refused call has
 * written nothing.
 *
 *   -EINVAL  ctx, npt or frames missing (SC_ERR_NULL); an unknown op (SC_ERR_GUEST_OP); more
 *            pages than the guest space (_COUNT); buf or out missing or too small for the op
 *            (_BUF_SIZE, _OUT_SIZE); buf or out overlapping frames or gfns (_BUF_OVERLAP,
 *            _OUT_OVERLAP); a uint64_t pointer that is not 8-byte aligned (SC_ERR_MISALIGNED); a
 *            gfn out of range (_GFN: the first of gfns[0..n) at or past 2^36, with its index;
 *            _RUN: gfn0 + n past 2^36); a slot empty or past 2^36 (_SLOT) or not after the one
 *            before it (_SLOT_ORDER), or without a bitmap (SC_ERR_NULL), with the slot's index;
 *            a page to be written through an SC_NPT_DIRTY_LOG entry whose gfn lies in no slot,
 *            its dirty bit would be lost (_UNLOGGED, with the page's index); a slot without a
 *            bitmap when there is no ring (SC_ERR_NULL); a ring whose size is not a power of
 *            two (SC_ERR_RING_SIZE).
 *   -EFAULT  a page to be accessed maps a pfn whose frame lies outside frames_size
 *            (SC_ERR_GUEST_FRAME, with the page's index). The NPT is installed by the model, so
 *            this is a model bug; the call refuses it rather than touching memory it was not
 *            given.
 *
 * The reason goes to *err (csrc/sevcore.h), which may be NULL.
 */
#ifndef SEVCORE_GUEST_H
#define SEVCORE_GUEST_H

#include <stddef.h>
#include <stdint.h>

#include "dirty_ring.h"
#include "memcrypt.h"
#include "npt.h"
#include "rmp.h"

/* cdef:begin */
enum {
    /* Copy each page's plaintext to buf (page i at buf + i * 4096). */
    SC_GUEST_OP_READ = 1,
    /* Copy buf into the pages. */
    SC_GUEST_OP_WRITE = 2,
    /* Every 8-byte little-endian word of each page = arg. */
    SC_GUEST_OP_FILL = 3,
    /* Each page = sc_guest_pattern(arg, its gfn). */
    SC_GUEST_OP_PATTERN = 4,
    /* Compare each page with sc_guest_pattern(arg, its gfn): out[0] = number of pages that differ,
     * out[1] = index of the first (UINT64_MAX if none). Does not stop on a mismatch. */
    SC_GUEST_OP_CHECK = 5,
    /* Store arg (little-endian) in the first 8 bytes of each page and leave the rest: a partial
     * write, which dirties the page without rewriting it. */
    SC_GUEST_OP_STAMP = 6,
    /* out[i] = sc_guest_digest() of page i's plaintext. */
    SC_GUEST_OP_DIGEST = 7,

    SC_GUEST_PAGE_SIZE = 4096,
};

/* A memslot with dirty logging on: bit i of dirty_bitmap (the KVM_GET_DIRTY_LOG layout, csrc/
 * bitmap.h) is gfn base_gfn + i; id is the slot as a dirty ring names it, (as_id << 16) | id.
 * With a ring and no bitmap (KVM_CAP_DIRTY_LOG_RING), dirty_bitmap is NULL. */
struct sc_guest_slot {
    uint64_t base_gfn;
    uint64_t npages;
    uint64_t *dirty_bitmap;
    uint32_t id;
};

struct sc_guest_ctx {
    const struct sc_npt *npt;
    uint8_t *frames;                    /* host physical memory: SPA 0 at frames[0] */
    uint64_t frames_size;               /* bytes; frame pfn exists iff (pfn + 1) * 4096 <= this */
    const sc_memcrypt *eng;             /* the access is encrypted with this key; NULL: plaintext */
    int private_access;                 /* nonzero: a private access (served by PRIVATE entries) */
    const struct sc_guest_slot *slots;  /* sorted by base_gfn and disjoint; NULL when nslots = 0 */
    size_t nslots;
    struct sc_dirty_ring *ring;         /* the running vCPU's ring; NULL: dirty bits to bitmaps */
    const struct sc_rmp *rmp;           /* an SNP guest's private access: the RMP to check */
    uint32_t rmp_asid;                  /* ... with the guest's ASID (see above) */
};

/* Perform op on n pages: gfns[i] if gfns is not NULL, else gfn0 + i. Returns the number of pages
 * completed: n, or the index of the first page that faults (see above). buf (READ, WRITE) must
 * hold n * 4096 bytes, out n words (DIGEST) or 2 (CHECK); others ignore them. -EINVAL, -EFAULT,
 * with the reason in *err. */
int64_t sc_guest_pages(const struct sc_guest_ctx *ctx, int op, const uint64_t *gfns,
                       uint64_t gfn0, uint64_t n, uint64_t arg, uint8_t *buf, size_t buf_size,
                       uint64_t *out, size_t out_len, struct sc_err *err);

/* The PATTERN content of the page at gfn for seed (4096 bytes), so the host can compute what the
 * guest wrote. Word j (little-endian) is K ^ S[j], where S[j] = splitmix64's (j + 1)-th output from
 * state 0 and K = mix(mix(seed + G) ^ gfn), mix the splitmix64 finalizer and G its increment
 * 0x9e3779b97f4a7c15. Two gfns never share a pattern under one seed (mix is a bijection), and
 * their pages differ in every word. */
void sc_guest_pattern(uint64_t seed, uint64_t gfn, uint8_t *page);

/* The DIGEST of a 4096-byte page: XXH3-64 with seed 0 and the default secret (xxHash 0.8
 * specification, XXH3_64bits()), so any xxHash library computes the same value. */
uint64_t sc_guest_digest(const uint8_t *page);

/* KVM_RESET_DIRTY_RINGS for one ring (kvm_dirty_ring_reset): free every collected (RESET) entry
 * from ring->reset_index on and write-protect its page again, SC_NPT_DIRTY_LOG set on the present
 * entries of each coalesced (slot, offset, 64-page mask), for the slots of slots[] (the logging
 * memslots) whose id matches and whose pages the mask stays inside (kvm_reset_dirty_gfn skips
 * the others). Returns the entries freed; -EINVAL (NULL, SC_ERR_RING_SIZE, or a refusal of
 * sc_npt_protect_range). */
int64_t sc_dirty_ring_reset(struct sc_dirty_ring *ring, struct sc_npt *npt,
                            const struct sc_guest_slot *slots, size_t nslots, struct sc_err *err);

/* The tier (SC_TIER_*) the FILL/PATTERN/CHECK/DIGEST loops take with the active CPU features. */
int sc_guest_impl(void);
/* cdef:end */

#endif
