/*
 * Nested page tables as KVM's TDP MMU keeps them: a 4-level, 512-ary radix table from a guest
 * frame number (GFN, 36 bits = a 48-bit GPA) to a 64-bit leaf entry (host pfn << 12) | flags.
 *
 * The flag bits sit where the x86/AMD NPT format puts them (present, writable, accessed, dirty) or
 * in the software-available bits 9-11 (private, dirty-log), the same places KVM uses for its own
 * state in arch/x86/kvm/mmu/spte.h; pfn bits 12-51 give the 40-bit pfn of a 52-bit host address.
 * A present entry always has SC_NPT_PRESENT set, and an absent one is 0.
 *
 * Thread-safety contract. Every function that takes a `const struct sc_npt *` (the lookups,
 * sc_npt_next_mapped, sc_npt_count, sc_npt_stats and the inline helpers below) only reads, and any
 * number of them may run at once. Everything that takes a `struct sc_npt *` mutates (map, unmap,
 * zap, protect, destroy, set_limit) and needs exclusive access: no other call, reader or writer,
 * on the same table at the same time, because a mutation can free a table (and unmap its chunk)
 * under a concurrent walker. This is KVM's mmu_lock taken for write, without the RCU-protected
 * lockless walks the TDP MMU adds; sevcore/npt.py serialises all calls with one lock.
 */
#ifndef SEVCORE_NPT_H
#define SEVCORE_NPT_H

#include <stddef.h>
#include <stdint.h>

#include "sevcore.h"

/* cdef:begin */
enum {
    SC_NPT_PRESENT = 1 << 0,
    SC_NPT_WRITABLE = 1 << 1,
    SC_NPT_ACCESSED = 1 << 5,
    SC_NPT_DIRTY = 1 << 6,
    /* Backed by guest_memfd: the mapping was installed by a private fault. */
    SC_NPT_PRIVATE = 1 << 9,
    /* Write-tracked for dirty logging: a guest write through this entry must be reported. */
    SC_NPT_DIRTY_LOG = 1 << 10,
    /* On one line: csrc/build_native.py rewrites enum values to `...` a line at a time. */
    SC_NPT_FLAGS_MASK = SC_NPT_PRESENT | SC_NPT_WRITABLE | SC_NPT_ACCESSED | SC_NPT_DIRTY | SC_NPT_PRIVATE | SC_NPT_DIRTY_LOG,

    SC_NPT_PFN_SHIFT = 12,
    SC_NPT_GFN_BITS = 36,
    SC_NPT_PFN_BITS = 40,
    /* One table (512 entries of 8 bytes) and the mmap'd chunk tables are carved from. */
    SC_NPT_TABLE_BYTES = 4096,
    SC_NPT_CHUNK_BYTES = 2097152,
};

/* What sc_npt_lookup_batch writes for a gfn that is not mapped (no pfn can have this value). */
#define SC_NPT_MISS 0xffffffffffffffff

struct sc_npt;

struct sc_npt_stats {
    uint64_t present;        /* present leaf entries */
    uint64_t tables;         /* tables in use, root included */
    uint64_t table_bytes;    /* tables * SC_NPT_TABLE_BYTES */
    uint64_t reserved_bytes; /* chunks mmap'd, in use or kept spare */
    uint64_t limit_bytes;    /* cap on reserved_bytes */
};

/* A new, empty table in *out. -ENOMEM. */
int sc_npt_create(struct sc_npt **out);
void sc_npt_destroy(struct sc_npt *npt);
/* Cap the chunk memory; a map that would need more fails with -ENOMEM and changes nothing. The
 * default is the machine's physical memory. Lowering it below what is reserved frees nothing. */
int sc_npt_set_limit(struct sc_npt *npt, uint64_t limit_bytes);

/* The calls below that take a `struct sc_err *err` (which may be NULL) write the reason of an
 * -EINVAL there (csrc/sevcore.h): a gfn at or past 2^36 (SC_ERR_NPT_GFN), npages 0 or running
 * past 2^36 (_NPAGES), pfns past 2^40 (_PFN), flag bits outside SC_NPT_FLAGS_MASK (_FLAGS), and
 * the call-specific ones named with each. -ENOMEM comes with SC_ERR_NONE. */

/* Map gfn..gfn+npages-1 to pfn..pfn+npages-1 with flags (PRESENT implied), overwriting what is
 * there. All or nothing. Returns how many of the gfns were not mapped before; -EINVAL, -ENOMEM. */
int64_t sc_npt_map(struct sc_npt *npt, uint64_t gfn, uint64_t pfn, uint64_t flags,
                   uint64_t npages, struct sc_err *err);
/* Map gfns[i] to pfns[i] for i < n with flags: every pair is checked first (SC_ERR_NPT_GFNS,
 * SC_ERR_NPT_PFNS, with the index of the first out of range), then each run contiguous in both
 * is mapped as by sc_npt_map. Returns how many gfns were not mapped before; -EINVAL with nothing
 * mapped, or -ENOMEM keeping the runs before the one that failed. */
int64_t sc_npt_map_pairs(struct sc_npt *npt, const uint64_t *gfns, const uint64_t *pfns,
                         uint64_t n, uint64_t flags, struct sc_err *err);
/* Remove every entry in gfn..gfn+npages-1; returns how many there were. -EINVAL. */
int64_t sc_npt_unmap(struct sc_npt *npt, uint64_t gfn, uint64_t npages, struct sc_err *err);
/* Remove the entries in the range whose flags include all of match_flags and none of
 * exclude_flags (0, 0: all); returns the count. -EINVAL. */
int64_t sc_npt_zap_range(struct sc_npt *npt, uint64_t gfn, uint64_t npages,
                         uint64_t match_flags, uint64_t exclude_flags, struct sc_err *err);
/* entry = (entry & ~clear_flags) | set_flags for present entries in the range; returns how many
 * changed. PRESENT cannot be cleared (zap instead: SC_ERR_NPT_CLEAR_PRESENT). -EINVAL. */
int64_t sc_npt_protect_range(struct sc_npt *npt, uint64_t gfn, uint64_t npages,
                             uint64_t clear_flags, uint64_t set_flags, struct sc_err *err);

/* The entry for gfn in *out_entry (0 if absent). Returns 1 if present, 0 if not; -EINVAL. */
int sc_npt_lookup(const struct sc_npt *npt, uint64_t gfn, uint64_t *out_entry,
                  struct sc_err *err);
/* out_pfns[i] = pfn of gfns[i] or SC_NPT_MISS; out_flags[i] = its flags or 0 (out_flags may be
 * NULL). Returns the number of hits; -EINVAL if any gfn is out of range, SC_ERR_NPT_GFNS with the
 * index of the first (outputs then undefined). */
int64_t sc_npt_lookup_batch(const struct sc_npt *npt, const uint64_t *gfns, uint64_t *out_pfns,
                            uint64_t *out_flags, uint64_t n, struct sc_err *err);
/* Present entries in gfn order from start_gfn up to (not including) end_gfn, at most cap of them,
 * into out_gfns / out_entries; returns how many. Resume from the last gfn + 1. -EINVAL for a
 * bound past 2^36 (SC_ERR_NPT_BOUND). */
int64_t sc_npt_next_mapped(const struct sc_npt *npt, uint64_t start_gfn, uint64_t end_gfn,
                           uint64_t *out_gfns, uint64_t *out_entries, uint64_t cap,
                           struct sc_err *err);
int64_t sc_npt_count(const struct sc_npt *npt);
int sc_npt_stats(const struct sc_npt *npt, struct sc_npt_stats *out);
/* cdef:end */

/*
 * Everything below is for C callers only (a guest-memory access kernel walking the table without
 * a call per page). The struct layout is private to npt.c except for `root` and `gen`.
 */

#define SC_NPT_ENTRIES 512
#define SC_NPT_LEVELS 4

/* One 4 KiB table: leaf entries at level 0, pointers to the next level down above it. An absent
 * child is never NULL but points at a shared, read-only, all-absent table of the level below, so
 * a walk is four unconditional loads and a miss falls out as a 0 leaf entry. */
union sc_npt_table {
    uint64_t spte[SC_NPT_ENTRIES];
    union sc_npt_table *child[SC_NPT_ENTRIES];
};

struct sc_npt_list {
    struct sc_npt_list *next, *prev;
};

struct sc_npt {
    union sc_npt_table *root; /* the read-only empty level-3 table while nothing is mapped */
    uint64_t gen;             /* changes on every mutation: sc_npt_cursor goes stale on it */
    /* Private to npt.c. */
    uint64_t npresent;
    uint64_t ntables;
    uint64_t nchunks;
    uint64_t free_tables;
    uint64_t idle_chunks;
    uint64_t max_chunks;
    struct sc_npt_list chunks;  /* every chunk */
    struct sc_npt_list partial; /* chunks with at least one free table */
};

static inline int sc_npt_entry_present(uint64_t entry) { return (int)(entry & SC_NPT_PRESENT); }
static inline uint64_t sc_npt_entry_pfn(uint64_t entry) { return entry >> SC_NPT_PFN_SHIFT; }
static inline uint64_t sc_npt_entry_flags(uint64_t entry)
{
    return entry & ((1u << SC_NPT_PFN_SHIFT) - 1);
}

/* The 512 leaf entries covering gfn (gfn & ~511 .. gfn | 511); the read-only empty table if none
 * is mapped there. Bits of gfn above SC_NPT_GFN_BITS are ignored: the caller range-checks. */
static inline const uint64_t *sc_npt_leaf_table(const struct sc_npt *npt, uint64_t gfn)
{
    const union sc_npt_table *t = npt->root;
    t = t->child[(gfn >> 27) & 511];
    t = t->child[(gfn >> 18) & 511];
    t = t->child[(gfn >> 9) & 511];
    return t->spte;
}

/* The leaf entry for gfn, 0 if it is not mapped or gfn is out of range. */
static inline uint64_t sc_npt_lookup_entry(const struct sc_npt *npt, uint64_t gfn)
{
    if (gfn >> SC_NPT_GFN_BITS)
        return 0;
    return sc_npt_leaf_table(npt, gfn)[gfn & 511];
}

/* A one-leaf-table cache for runs of nearby gfns: a sequential walk does one table walk per 512
 * gfns instead of one per gfn. Private to one reader; a mutation of the table (seen through
 * npt->gen) invalidates it, so it is safe to keep across calls that may fault pages in. */
struct sc_npt_cursor {
    uint64_t span; /* gfn >> 9 of the cached leaf table, or UINT64_MAX */
    uint64_t gen;
    const uint64_t *leaf;
};

static inline void sc_npt_cursor_init(struct sc_npt_cursor *c)
{
    c->span = UINT64_MAX;
    c->gen = 0;
    c->leaf = NULL;
}

/* The leaf table covering gfn (high bits ignored, as in sc_npt_leaf_table), walked only when gfn
 * leaves the cached 512-gfn span or the table has changed. */
static inline const uint64_t *sc_npt_cursor_leaf(const struct sc_npt *npt,
                                                 struct sc_npt_cursor *c, uint64_t gfn)
{
    if ((gfn >> 9) != c->span || c->gen != npt->gen) {
        c->leaf = sc_npt_leaf_table(npt, gfn);
        c->span = gfn >> 9;
        c->gen = npt->gen;
    }
    return c->leaf;
}

/* sc_npt_lookup_entry through the cursor. */
static inline uint64_t sc_npt_cursor_lookup(const struct sc_npt *npt, struct sc_npt_cursor *c,
                                            uint64_t gfn)
{
    if (gfn >> SC_NPT_GFN_BITS)
        return 0;
    return sc_npt_cursor_leaf(npt, c, gfn)[gfn & 511];
}

#endif
