/*
 * Dirty-log style bitmaps: kernels over arrays of uint64_t words.
 *
 * Layout is the one KVM_GET_DIRTY_LOG / KVM_CLEAR_DIRTY_LOG hand to user space on a 64-bit
 * little-endian host: bit i lives in bit (i % 64) of word i / 64 (include/linux/bitops.h
 * BIT_WORD/BIT_MASK with BITS_PER_LONG = 64). A bitmap of nbits bits occupies
 * SC_BITMAP_WORDS(nbits) words; the bits of the last word at or beyond nbits do not belong to
 * the bitmap: no kernel reports them, counts them or changes them.
 *
 * Every exported function returns a count (>= 0) on success or a negative errno: -EINVAL for a
 * NULL pointer, a zero capacity or nbits > SC_BITMAP_MAX_NBITS, -ERANGE for a position outside
 * the bitmap or a range with start > end. The caller owns the word arrays and guarantees they
 * hold SC_BITMAP_WORDS(nbits) words; sevcore/_bindings.py checks that before calling.
 *
 * Ranges are half open, [start, end). The streaming kernels (iter_set, iter_runs, harvest)
 * take the scan position through *pos, advance it, and return how many items they wrote; a
 * caller loops until *pos == end, so a 2^28-bit bitmap can be walked with a small buffer.
 * Slots of out past the returned count may be overwritten (the fast paths store eight indices
 * per step and keep only those that are bits); they never write past cap.
 */
#ifndef SEVCORE_BITMAP_H
#define SEVCORE_BITMAP_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

/* cdef:begin */
enum {
    /* What sc_bitmap_impl reports for the scalar POPCNT/TZCNT/BLSR path, which runs beside the
     * tiers (SC_TIER_*) on a CPU with POPCNT but no vector path. */
    SC_BITMAP_IMPL_POPCNT = 16,
};

/* 2^40 bits: one bit per 4 KiB page of the 52-bit physical address space x86-64 allows, i.e.
 * the largest guest any dirty log could describe. Also keeps every count within int64_t. */
#define SC_BITMAP_MAX_NBITS 0x10000000000ULL

/* Number of set bits in [start, end). */
int64_t sc_bitmap_count(const uint64_t *map, uint64_t nbits, uint64_t start, uint64_t end);

/* Number of maximal runs of set bits in [start, end) (a run cut by start or end counts). */
int64_t sc_bitmap_count_runs(const uint64_t *map, uint64_t nbits, uint64_t start,
                             uint64_t end);

/* First set (zero) bit at or after start, or nbits when there is none (also when start >= nbits),
 * as find_next_bit() / find_next_zero_bit() in include/linux/find.h. */
int64_t sc_bitmap_find_next_set(const uint64_t *map, uint64_t nbits, uint64_t start);
int64_t sc_bitmap_find_next_zero(const uint64_t *map, uint64_t nbits, uint64_t start);

/* Set / clear the n bits [start, start + n); not atomic, like bitmap_set()/bitmap_clear(). */
int64_t sc_bitmap_set_range(uint64_t *map, uint64_t nbits, uint64_t start, uint64_t n);
int64_t sc_bitmap_clear_range(uint64_t *map, uint64_t nbits, uint64_t start, uint64_t n);

/* Write the indices of the set bits in [*pos, end), ascending, to out[0..cap). Returns how many
 * were written; *pos becomes the next index not yet reported (end when the range is done). */
int64_t sc_bitmap_iter_set(const uint64_t *map, uint64_t nbits, uint64_t *pos, uint64_t end,
                           uint64_t *out, uint64_t cap);

/* Write the maximal runs of set bits in [*pos, end) as (starts[k], lengths[k]), k < cap. A run
 * is only written whole; *pos becomes the start of the first run not written (or end). */
int64_t sc_bitmap_iter_runs(const uint64_t *map, uint64_t nbits, uint64_t *pos, uint64_t end,
                            uint64_t *starts, uint64_t *lengths, uint64_t cap);

/* Take and clear: atomically exchange each non-zero word of [*pos, end) with zero and write the
 * indices of the bits it held to out[0..cap). A word is only taken when all of its bits fit in
 * what is left of out, so no bit is ever lost; *pos becomes the first bit not taken. cap >= 64
 * always makes progress; -ENOSPC (and no change) when not even the first non-empty word fits. */
int64_t sc_bitmap_harvest(uint64_t *map, uint64_t nbits, uint64_t *pos, uint64_t end,
                          uint64_t *out, uint64_t cap);

/* dst = a & b, a | b, a & ~b over nbits bits. dst may be a or b itself but must not otherwise
 * overlap them (-EINVAL); dst's bits beyond nbits are kept. */
int64_t sc_bitmap_and(uint64_t *dst, const uint64_t *a, const uint64_t *b, uint64_t nbits);
int64_t sc_bitmap_or(uint64_t *dst, const uint64_t *a, const uint64_t *b, uint64_t nbits);
int64_t sc_bitmap_andnot(uint64_t *dst, const uint64_t *a, const uint64_t *b, uint64_t nbits);

/* 1 if the first nbits bits of a and b are equal, else 0. */
int64_t sc_bitmap_equal(const uint64_t *a, const uint64_t *b, uint64_t nbits);

/* Read every word once and XOR them into *fold: the cost of one streaming pass over the array,
 * which the benchmarks use as the memory-bandwidth floor any full-bitmap kernel sits on. */
int64_t sc_bitmap_read_pass(const uint64_t *words, uint64_t nwords, uint64_t *fold);

/* The path the scans (iter_set, harvest) and counts take with the active CPU features: a tier
 * (SC_TIER_*) or SC_BITMAP_IMPL_POPCNT. */
int sc_bitmap_impl(void);
/* cdef:end */

/*
 * The inline single-bit helper other C kernels use (not part of the cffi cdef). No bounds
 * check: the caller has validated i < nbits.
 */
#define SC_BITMAP_WORDS(nbits) (((uint64_t)(nbits) + 63) / 64)

/*
 * Atomic, for a bitmap that another thread harvests concurrently: KVM marks a page dirty with
 * the atomic set_bit_le() (mark_page_dirty_in_slot() in virt/kvm/kvm_main.c) precisely because
 * the dirty-log reader exchanges words under it. Relaxed ordering is enough for the bit itself;
 * a caller that publishes data with the bit orders that itself.
 */
static inline void sc_bitmap_set_bit_atomic(uint64_t *map, uint64_t i)
{
    __atomic_fetch_or(&map[i / 64], (uint64_t)1 << (i % 64), __ATOMIC_RELAXED);
}

#endif
