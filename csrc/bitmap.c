/*
 * Bitmap kernels in the Linux dirty-log layout (see bitmap.h).
 *
 * Four builds of the hot loops live in this one file and are picked at run time through
 * SC_HAS(): AVX-512 and AVX2 ones, written once in csrc/bitmap_tier.h (VPOPCNTQ or a nibble-table
 * count for counting, 8-word zero tests to skip empty stretches), a scalar one with
 * POPCNT/TZCNT/BLSR, and a portable one that needs nothing beyond x86-64 (or any C11 target).
 * The build has no -march flag, so the fast paths carry target attributes and the shared loop
 * bodies are always_inline so each caller compiles them for its own ISA.
 */
#include "bitmap.h"

#include <errno.h>
#include <string.h>

#include "sevcore.h"

#if defined(__x86_64__)
#include <immintrin.h>
#define SC_BITMAP_X86 1
#define TARGET_AVX512 \
    __attribute__((target("avx512f,avx512bw,avx512vl,avx512vpopcntdq,popcnt,bmi")))
#define TARGET_AVX2 __attribute__((target("avx2,popcnt,bmi")))
#define TARGET_SCALAR __attribute__((target("popcnt,bmi")))
#elif defined(__aarch64__)
#include <arm_neon.h>
#define SC_BITMAP_ARM 1
#endif

#define ALWAYS_INLINE static inline __attribute__((always_inline))
#define SC_BM_INLINE inline __attribute__((always_inline)) /* after `static` and a target */
#define ALL_ONES (~(uint64_t)0)

/* The bits of start's word at or above start (BITMAP_FIRST_WORD_MASK, include/linux/bitmap.h). */
ALWAYS_INLINE uint64_t first_word_mask(uint64_t start)
{
    return ALL_ONES << (start % 64);
}

/* The bits of the word holding bit end - 1 that lie below end; all ones when end is a multiple
 * of 64 (BITMAP_LAST_WORD_MASK). Only meaningful for end > 0. */
ALWAYS_INLINE uint64_t last_word_mask(uint64_t end)
{
    return ALL_ONES >> ((0 - end) % 64);
}

/* Bit count without the POPCNT instruction (the classic SWAR reduction); __builtin_popcountll
 * would become a table-driven libgcc call on a baseline build. */
ALWAYS_INLINE uint64_t popcount_swar(uint64_t x)
{
    x = x - ((x >> 1) & 0x5555555555555555ULL);
    x = (x & 0x3333333333333333ULL) + ((x >> 2) & 0x3333333333333333ULL);
    x = (x + (x >> 4)) & 0x0f0f0f0f0f0f0f0fULL;
    return (x * 0x0101010101010101ULL) >> 56;
}

ALWAYS_INLINE int bad_map(const void *map, uint64_t nbits)
{
    return map == NULL || nbits > SC_BITMAP_MAX_NBITS;
}

/* ---------------------------------------------------------------------------------------------
 * count, count_runs, read_pass: whole-array reductions. Only the interior full words go through
 * the dispatched loop; the (at most two) partial edge words are masked here once.
 */

static uint64_t count_words_portable(const uint64_t *w, uint64_t n)
{
    uint64_t c = 0;
    for (uint64_t i = 0; i < n; i++)
        c += popcount_swar(w[i]);
    return c;
}

/* The run starts of word w given the word before it: set bits whose lower neighbour is clear. */
ALWAYS_INLINE uint64_t run_starts(uint64_t w, uint64_t prev)
{
    return w & ~((w << 1) | (prev >> 63));
}

static uint64_t count_run_starts_portable(const uint64_t *w, uint64_t n, uint64_t prev)
{
    uint64_t c = 0;
    for (uint64_t i = 0; i < n; i++) {
        c += popcount_swar(run_starts(w[i], prev));
        prev = w[i];
    }
    return c;
}

static uint64_t read_pass_portable(const uint64_t *w, uint64_t n)
{
    uint64_t x = 0;
    for (uint64_t i = 0; i < n; i++)
        x ^= w[i];
    return x;
}

#ifdef SC_BITMAP_X86
TARGET_SCALAR static uint64_t count_words_scalar(const uint64_t *w, uint64_t n)
{
    /* Four chains: POPCNT has 1/cycle throughput but a 3-cycle dependent add-chain otherwise. */
    uint64_t c0 = 0, c1 = 0, c2 = 0, c3 = 0, i = 0;
    for (; i + 4 <= n; i += 4) {
        c0 += (uint64_t)__builtin_popcountll(w[i]);
        c1 += (uint64_t)__builtin_popcountll(w[i + 1]);
        c2 += (uint64_t)__builtin_popcountll(w[i + 2]);
        c3 += (uint64_t)__builtin_popcountll(w[i + 3]);
    }
    for (; i < n; i++)
        c0 += (uint64_t)__builtin_popcountll(w[i]);
    return c0 + c1 + c2 + c3;
}

TARGET_SCALAR static uint64_t count_run_starts_scalar(const uint64_t *w, uint64_t n,
                                                      uint64_t prev)
{
    uint64_t c = 0;
    for (uint64_t i = 0; i < n; i++) {
        c += (uint64_t)__builtin_popcountll(run_starts(w[i], prev));
        prev = w[i];
    }
    return c;
}

/* The vector tiers' primitives (csrc/bitmap_tier.h). */
typedef uint64_t bm_avx2_v __attribute__((vector_size(32)));
typedef uint64_t bm_avx512_v __attribute__((vector_size(64)));
#define BM_TARGET_avx2 TARGET_AVX2
#define BM_TARGET_avx512 TARGET_AVX512

/* The bit count of each word of v[0..n) (n <= 4), summed word by word. On zmm, VPOPCNTQ. On
 * ymm, which has no such instruction, the nibble-table count of Mula, Kurz and Lemire ("Faster
 * Population Counts Using AVX2 Instructions", The Computer Journal 61(1), 2018): VPSHUFB looks
 * up the count of each nibble; the byte counts of the n registers (at most 32 each) are added
 * before one VPSADBW sums the bytes of each word. */
TARGET_AVX512 static SC_BM_INLINE bm_avx512_v bm_avx512_popcnt(const bm_avx512_v *v, const int n)
{
    bm_avx512_v c = (bm_avx512_v)_mm512_popcnt_epi64((__m512i)v[0]);
    for (int k = 1; k < n; k++)
        c += (bm_avx512_v)_mm512_popcnt_epi64((__m512i)v[k]);
    return c;
}

TARGET_AVX2 static SC_BM_INLINE bm_avx2_v bm_avx2_popcnt(const bm_avx2_v *v, const int n)
{
    const __m256i lut = _mm256_setr_epi8(0, 1, 1, 2, 1, 2, 2, 3, 1, 2, 2, 3, 2, 3, 3, 4, 0, 1, 1, 2,
                                         1, 2, 2, 3, 1, 2, 2, 3, 2, 3, 3, 4);
    const __m256i nibble = _mm256_set1_epi8(0x0f);
    __m256i c = _mm256_setzero_si256();
    for (int k = 0; k < n; k++) {
        __m256i lo = _mm256_and_si256((__m256i)v[k], nibble);
        __m256i hi = _mm256_and_si256(_mm256_srli_epi16((__m256i)v[k], 4), nibble);
        c = _mm256_add_epi8(c, _mm256_add_epi8(_mm256_shuffle_epi8(lut, lo),
                                               _mm256_shuffle_epi8(lut, hi)));
    }
    return (bm_avx2_v)_mm256_sad_epu8(c, _mm256_setzero_si256());
}

/* Which words of the 64-byte line at p are non-zero: one zmm test, or two ymm compares. */
TARGET_AVX512 static SC_BM_INLINE unsigned bm_avx512_nonzero8(const uint64_t *p)
{
    __m512i v = _mm512_load_si512(p);
    return _mm512_test_epi64_mask(v, v);
}

TARGET_AVX2 static SC_BM_INLINE unsigned bm_avx2_nonzero8(const uint64_t *p)
{
    const __m256i zero = _mm256_setzero_si256();
    __m256i a = _mm256_cmpeq_epi64(_mm256_load_si256((const __m256i *)p), zero);
    __m256i b = _mm256_cmpeq_epi64(_mm256_load_si256((const __m256i *)p + 1), zero);
    unsigned z = (unsigned)_mm256_movemask_pd(_mm256_castsi256_pd(a)) |
                 (unsigned)_mm256_movemask_pd(_mm256_castsi256_pd(b)) << 4;
    return ~z & 0xffu;
}

#define bm_avx2_words word_indices_bmi
#define bm_avx512_words word_indices_bmi
#define BM_PART 1
#define TIER avx2
#include "bitmap_tier.h"
#undef TIER
#define TIER avx512
#include "bitmap_tier.h"
#undef TIER
#undef BM_PART
#elif defined(SC_BITMAP_ARM)
/* The neon tier (Advanced SIMD, part of every AArch64 CPU): CNT counts the bits of each byte and
 * pairwise widening adds (UADDLP) sum them per word; a line is tested for zero words with one
 * maximum across four ORed registers (UMAXV) before its words are looked at one by one. */
typedef uint64_t bm_neon_v __attribute__((vector_size(16)));
#define BM_TARGET_neon
#define bm_neon_words word_indices_portable

static SC_BM_INLINE bm_neon_v bm_neon_popcnt(const bm_neon_v *v, const int n)
{
    uint8x16_t c = vdupq_n_u8(0);
    for (int k = 0; k < n; k++)
        c = vaddq_u8(c, vcntq_u8(vreinterpretq_u8_u64((uint64x2_t)v[k])));
    return (bm_neon_v)vpaddlq_u32(vpaddlq_u16(vpaddlq_u8(c)));
}

static SC_BM_INLINE unsigned bm_neon_nonzero8(const uint64_t *p)
{
    uint64x2_t any = vorrq_u64(vorrq_u64(vld1q_u64(p), vld1q_u64(p + 2)),
                               vorrq_u64(vld1q_u64(p + 4), vld1q_u64(p + 6)));
    if (vmaxvq_u32(vreinterpretq_u32_u64(any)) == 0)
        return 0;
    unsigned nz = 0;
    for (int k = 0; k < 8; k++)
        nz |= (unsigned)(p[k] != 0) << k;
    return nz;
}

#define BM_PART 1
#define TIER neon
#include "bitmap_tier.h"
#undef TIER
#undef BM_PART
#endif

/* VPOPCNTQ on zmm where the CPU has it (an AVX-512 CPU without it counts on ymm). */
static uint64_t count_words(const uint64_t *w, uint64_t n)
{
#ifdef SC_BITMAP_X86
    if (SC_HAS(SC_CPU_AVX512 | SC_CPU_VPOPCNTDQ | SC_CPU_POPCNT))
        return count_words_avx512(w, n);
    if (SC_HAS(SC_CPU_AVX2 | SC_CPU_POPCNT))
        return count_words_avx2(w, n);
    if (SC_HAS(SC_CPU_POPCNT))
        return count_words_scalar(w, n);
#elif defined(SC_BITMAP_ARM)
    if (SC_HAS(SC_CPU_NEON))
        return count_words_neon(w, n);
#endif
    return count_words_portable(w, n);
}

static uint64_t count_run_starts(const uint64_t *w, uint64_t n, uint64_t prev)
{
#ifdef SC_BITMAP_X86
    if (SC_HAS(SC_CPU_AVX512 | SC_CPU_VPOPCNTDQ | SC_CPU_POPCNT))
        return count_run_starts_avx512(w, n, prev);
    if (SC_HAS(SC_CPU_AVX2 | SC_CPU_POPCNT))
        return count_run_starts_avx2(w, n, prev);
    if (SC_HAS(SC_CPU_POPCNT))
        return count_run_starts_scalar(w, n, prev);
#elif defined(SC_BITMAP_ARM)
    if (SC_HAS(SC_CPU_NEON))
        return count_run_starts_neon(w, n, prev);
#endif
    return count_run_starts_portable(w, n, prev);
}

int64_t sc_bitmap_count(const uint64_t *map, uint64_t nbits, uint64_t start, uint64_t end)
{
    if (bad_map(map, nbits))
        return -EINVAL;
    if (start > end || end > nbits)
        return -ERANGE;
    if (start == end)
        return 0;
    uint64_t fw = start / 64, lw = (end - 1) / 64;
    if (fw == lw)
        return (int64_t)popcount_swar(map[fw] & first_word_mask(start) & last_word_mask(end));
    return (int64_t)(popcount_swar(map[fw] & first_word_mask(start)) +
                     count_words(map + fw + 1, lw - fw - 1) +
                     popcount_swar(map[lw] & last_word_mask(end)));
}

int64_t sc_bitmap_count_runs(const uint64_t *map, uint64_t nbits, uint64_t start, uint64_t end)
{
    if (bad_map(map, nbits))
        return -EINVAL;
    if (start > end || end > nbits)
        return -ERANGE;
    if (start == end)
        return 0;
    /* A run is counted at its first bit: a set bit whose lower neighbour is clear or outside
     * [start, end). The edge words are masked so that bits outside the range read as clear. */
    uint64_t fw = start / 64, lw = (end - 1) / 64;
    uint64_t first = map[fw] & first_word_mask(start);
    if (fw == lw)
        return (int64_t)popcount_swar(run_starts(first & last_word_mask(end), 0));
    uint64_t c = popcount_swar(run_starts(first, 0));
    c += count_run_starts(map + fw + 1, lw - fw - 1, first);
    uint64_t prev = lw - 1 == fw ? first : map[lw - 1];
    c += popcount_swar(run_starts(map[lw] & last_word_mask(end), prev));
    return (int64_t)c;
}

int64_t sc_bitmap_read_pass(const uint64_t *words, uint64_t nwords, uint64_t *fold)
{
    if (words == NULL || fold == NULL || nwords > SC_BITMAP_MAX_NBITS / 64)
        return -EINVAL;
#ifdef SC_BITMAP_X86
    if (SC_HAS(SC_CPU_AVX512)) {
        *fold = read_pass_avx512(words, nwords);
        return 0;
    }
    if (SC_HAS(SC_CPU_AVX2)) {
        *fold = read_pass_avx2(words, nwords);
        return 0;
    }
#elif defined(SC_BITMAP_ARM)
    if (SC_HAS(SC_CPU_NEON)) {
        *fold = read_pass_neon(words, nwords);
        return 0;
    }
#endif
    *fold = read_pass_portable(words, nwords);
    return 0;
}

/* ---------------------------------------------------------------------------------------------
 * find_next_set / find_next_zero: the word-at-a-time scan of _find_next_bit() (lib/find_bit.c),
 * returning min(index, nbits) so bits past nbits in the last word are never reported. A single
 * scalar path: the loop already handles one zero word per cycle, faster than DRAM delivers them.
 */

ALWAYS_INLINE int64_t find_next(const uint64_t *map, uint64_t nbits, uint64_t start,
                                uint64_t invert)
{
    if (bad_map(map, nbits))
        return -EINVAL;
    if (start >= nbits)
        return (int64_t)nbits;
    uint64_t wi = start / 64, nw = SC_BITMAP_WORDS(nbits);
    uint64_t w = (map[wi] ^ invert) & first_word_mask(start);
    while (w == 0) {
        if (++wi == nw)
            return (int64_t)nbits;
        w = map[wi] ^ invert;
    }
    uint64_t i = wi * 64 + (uint64_t)__builtin_ctzll(w);
    return (int64_t)(i < nbits ? i : nbits);
}

int64_t sc_bitmap_find_next_set(const uint64_t *map, uint64_t nbits, uint64_t start)
{
    return find_next(map, nbits, start, 0);
}

int64_t sc_bitmap_find_next_zero(const uint64_t *map, uint64_t nbits, uint64_t start)
{
    return find_next(map, nbits, start, ALL_ONES);
}

/* ---------------------------------------------------------------------------------------------
 * set_range / clear_range: masked edge words, memset for the interior (as bitmap_set() and
 * bitmap_clear() in lib/bitmap.c do word by word).
 */

/* Set (or clear) the bits of *w under mask. */
ALWAYS_INLINE void fill_word(uint64_t *w, uint64_t mask, int set)
{
    *w = set ? *w | mask : *w & ~mask;
}

ALWAYS_INLINE int64_t fill_range(uint64_t *map, uint64_t nbits, uint64_t start, uint64_t n,
                                 int set)
{
    if (bad_map(map, nbits))
        return -EINVAL;
    if (start > nbits || n > nbits - start)
        return -ERANGE;
    if (n == 0)
        return 0;
    uint64_t end = start + n, fw = start / 64, lw = (end - 1) / 64;
    uint64_t fm = first_word_mask(start), lm = last_word_mask(end);
    if (fw == lw) {
        fill_word(map + fw, fm & lm, set);
        return 0;
    }
    fill_word(map + fw, fm, set);
    memset(map + fw + 1, set ? 0xff : 0, (lw - fw - 1) * sizeof(uint64_t));
    fill_word(map + lw, lm, set);
    return 0;
}

int64_t sc_bitmap_set_range(uint64_t *map, uint64_t nbits, uint64_t start, uint64_t n)
{
    return fill_range(map, nbits, start, n, 1);
}

int64_t sc_bitmap_clear_range(uint64_t *map, uint64_t nbits, uint64_t start, uint64_t n)
{
    return fill_range(map, nbits, start, n, 0);
}

/* ---------------------------------------------------------------------------------------------
 * Streaming scans: iter_set, harvest, iter_runs.
 *
 * Per word they use the ctz / clear-lowest-bit loop, which beats a find_next_bit() loop by 3-5x
 * once words hold several bits (measured on an AMD EPYC Zen 4 core, 10-50 % density). The AVX-512
 * builds test eight words per load and visit only the non-zero ones, which is what pays at
 * dirty-log densities (a sparse log is mostly empty words).
 */

struct scan {
    const uint64_t *map;
    uint64_t *out;
    uint64_t cap;
    uint64_t n;      /* items written */
    uint64_t resume; /* where to restart when out filled up */
};

/* Writes the indices of the bits of w (whose bit 0 is index base) from out[0] on and returns
 * their number; may use up to 64 slots of out as scratch. */
typedef uint64_t (*word_fn)(uint64_t *out, uint64_t w, uint64_t base);

static inline uint64_t word_indices_portable(uint64_t *out, uint64_t w, uint64_t base)
{
    uint64_t n = 0;
    while (w) {
        out[n++] = base + (uint64_t)__builtin_ctzll(w);
        w &= w - 1;
    }
    return n;
}

#ifdef SC_BITMAP_X86
/* Eight TZCNT/BLSR steps per round, stored whether or not bits remain (TZCNT of zero is 64, so
 * the spare slots get harmless values that the next word overwrites): the loop then runs
 * ceil(popcount / 8) times, and at dirty-log densities its exit branch is predictable, where a
 * bit-at-a-time loop mispredicts once per word. */
TARGET_SCALAR static inline uint64_t word_indices_bmi(uint64_t *out, uint64_t w, uint64_t base)
{
    uint64_t n = (uint64_t)_mm_popcnt_u64(w);
    for (; w; out += 8) {
#pragma GCC unroll 8
        for (int k = 0; k < 8; k++) {
            out[k] = base + _tzcnt_u64(w);
            w = _blsr_u64(w);
        }
    }
    return n;
}
#endif

/* Write the bits of w (its word starting at bit base) while they fit; false once out is full,
 * with s->resume at the first bit not written. */
ALWAYS_INLINE int emit_bits(struct scan *s, uint64_t w, uint64_t base, word_fn word)
{
    uint64_t n = s->n;
    if (s->cap - n >= 64) {
        s->n = n + word(s->out + n, w, base);
        return 1;
    }
    /* Near the end of out: one bit at a time, so nothing is written past cap. */
    while (w) {
        if (n == s->cap) {
            s->n = n;
            s->resume = base + (uint64_t)__builtin_ctzll(w);
            return 0;
        }
        s->out[n++] = base + (uint64_t)__builtin_ctzll(w);
        w &= w - 1;
    }
    s->n = n;
    return 1;
}

/*
 * Take the bits of *p selected by mask if they fit in room output slots. With room >= 64 any
 * word fits, so it is a plain exchange, as kvm_get_dirty_log_protect() (virt/kvm/kvm_main.c)
 * does with xchg() on each non-zero word: a guest vCPU setting a bit at the same moment either
 * lands before the exchange (and is reported now) or after it (and stays for the next harvest).
 * Near the end of the buffer a compare-and-swap takes the word only if what it holds at that
 * instant fits, so a bit is never cleared without being written out.
 */
ALWAYS_INLINE int take_bits(uint64_t *p, uint64_t mask, uint64_t room, uint64_t *got)
{
    if (room >= 64) {
        if (mask == ALL_ONES)
            *got = __atomic_exchange_n(p, 0, __ATOMIC_ACQ_REL);
        else
            *got = __atomic_fetch_and(p, ~mask, __ATOMIC_ACQ_REL) & mask;
        return 1;
    }
    uint64_t old = __atomic_load_n(p, __ATOMIC_RELAXED);
    do {
        if ((old & mask) == 0) {
            *got = 0;
            return 1;
        }
        if (popcount_swar(old & mask) > room)
            return 0;
    } while (!__atomic_compare_exchange_n(p, &old, old & ~mask, 0, __ATOMIC_ACQ_REL,
                                          __ATOMIC_RELAXED));
    *got = old & mask;
    return 1;
}

/*
 * iter_set and harvest are one scan that differs only in what it does with a word: iter_set
 * reads it, harvest takes it (take_bits). `take` is a constant wherever the helpers below are
 * inlined, so each scan compiles to its own loop with no test of it at run time.
 */

/* A word's zero test. The harvest reads with relaxed loads, racing benignly with concurrent
 * setters exactly as KVM's own "if (!dirty_bitmap[i]) continue;" does: a word seen as zero
 * keeps its new bits for the next harvest. */
ALWAYS_INLINE uint64_t peek_word(const struct scan *s, uint64_t wi, const int take)
{
    return take ? __atomic_load_n(s->map + wi, __ATOMIC_RELAXED) : s->map[wi];
}

/* Report (and with take, clear) the bits of word wi under mask; false once out is full, with
 * s->resume at the first bit not reported. A word is taken whole or not at all, so a harvest
 * resumes at the word's first bit in the mask. */
ALWAYS_INLINE int visit_word(struct scan *s, uint64_t wi, uint64_t mask, const int take,
                             word_fn word)
{
    if (!take)
        return emit_bits(s, s->map[wi] & mask, wi * 64, word);
    uint64_t got;
    if (!take_bits((uint64_t *)s->map + wi, mask, s->cap - s->n, &got)) {
        s->resume = wi * 64 + (uint64_t)__builtin_ctzll(mask);
        return 0;
    }
    emit_bits(s, got, wi * 64, word); /* cannot fill up: take_bits checked the room */
    return 1;
}

/* The interior-word stage of a scan: advances *wi towards lw over whole words; false when out
 * filled up. NULL in the scalar builds, which do all words in the plain loop. */
typedef int (*block_fn)(struct scan *s, uint64_t *wi, uint64_t lw);

ALWAYS_INLINE int64_t scan_body(struct scan *s, uint64_t *pos, uint64_t end, const int take,
                                block_fn blocks, word_fn word)
{
    uint64_t start = *pos, fw = start / 64, lw = (end - 1) / 64;
    uint64_t fm = first_word_mask(start);
    if (fw == lw)
        fm &= last_word_mask(end);
    if (!visit_word(s, fw, fm, take, word))
        goto full;
    if (fw == lw)
        goto done;
    uint64_t wi = fw + 1;
    if (blocks && !blocks(s, &wi, lw))
        goto full;
    for (; wi < lw; wi++)
        if (peek_word(s, wi, take) && !visit_word(s, wi, ALL_ONES, take, word))
            goto full;
    if (!visit_word(s, lw, last_word_mask(end), take, word))
        goto full;
done:
    *pos = end;
    return (int64_t)s->n;
full:
    /* Only a harvest can stop with nothing written: reading stops at cap >= 1 items, taking
     * stops before the first word that does not fit. */
    if (s->n == 0)
        return -ENOSPC; /* nothing taken; *pos untouched */
    *pos = s->resume;
    return (int64_t)s->n;
}

/* One function per ISA, each holding both scans, each scan with its constant `take`. */
static int64_t scan_portable(struct scan *s, uint64_t *pos, uint64_t end, int take)
{
    return take ? scan_body(s, pos, end, 1, NULL, word_indices_portable)
                : scan_body(s, pos, end, 0, NULL, word_indices_portable);
}

#ifdef SC_BITMAP_X86
TARGET_SCALAR static int64_t scan_scalar(struct scan *s, uint64_t *pos, uint64_t end, int take)
{
    return take ? scan_body(s, pos, end, 1, NULL, word_indices_bmi)
                : scan_body(s, pos, end, 0, NULL, word_indices_bmi);
}

#define BM_PART 2
#define TIER avx2
#include "bitmap_tier.h"
#undef TIER
#define TIER avx512
#include "bitmap_tier.h"
#undef TIER
#undef BM_PART
#elif defined(SC_BITMAP_ARM)
#define BM_PART 2
#define TIER neon
#include "bitmap_tier.h"
#undef TIER
#undef BM_PART
#endif

int sc_bitmap_impl(void)
{
#ifdef SC_BITMAP_X86
    if (SC_HAS(SC_CPU_AVX512 | SC_CPU_POPCNT))
        return SC_TIER_AVX512;
    if (SC_HAS(SC_CPU_AVX2 | SC_CPU_POPCNT))
        return SC_TIER_AVX2;
    if (SC_HAS(SC_CPU_POPCNT))
        return SC_BITMAP_IMPL_POPCNT;
#elif defined(SC_BITMAP_ARM)
    if (SC_HAS(SC_CPU_NEON))
        return SC_TIER_NEON;
#endif
    return SC_TIER_PORTABLE;
}

/* The argument checks and the dispatch of both scans. */
static int64_t scan(const uint64_t *map, uint64_t nbits, uint64_t *pos, uint64_t end,
                    uint64_t *out, uint64_t cap, int take)
{
    if (bad_map(map, nbits) || pos == NULL || out == NULL || cap == 0)
        return -EINVAL;
    if (*pos > end || end > nbits)
        return -ERANGE;
    if (*pos == end)
        return 0;
    struct scan s = {map, out, cap, 0, 0};
#ifdef SC_BITMAP_X86
    if (SC_HAS(SC_CPU_AVX512 | SC_CPU_POPCNT))
        return scan_avx512(&s, pos, end, take);
    if (SC_HAS(SC_CPU_AVX2 | SC_CPU_POPCNT))
        return scan_avx2(&s, pos, end, take);
    if (SC_HAS(SC_CPU_POPCNT))
        return scan_scalar(&s, pos, end, take);
#elif defined(SC_BITMAP_ARM)
    if (SC_HAS(SC_CPU_NEON))
        return scan_neon(&s, pos, end, take);
#endif
    return scan_portable(&s, pos, end, take);
}

int64_t sc_bitmap_iter_set(const uint64_t *map, uint64_t nbits, uint64_t *pos, uint64_t end,
                           uint64_t *out, uint64_t cap)
{
    return scan(map, nbits, pos, end, out, cap, 0);
}

int64_t sc_bitmap_harvest(uint64_t *map, uint64_t nbits, uint64_t *pos, uint64_t end,
                          uint64_t *out, uint64_t cap)
{
    return scan(map, nbits, pos, end, out, cap, 1);
}

/*
 * iter_runs: per word, the run starts are set bits whose lower neighbour is clear and the run
 * ends set bits whose upper neighbour is clear (the neighbour across a word boundary comes from
 * the adjacent word). Inside a word starts and ends alternate, so pairing them in bit order
 * yields whole runs; a start without an end in its word opens a run that a later word closes.
 * Because the last word is masked at end, every run is closed by the time the scan ends.
 */
ALWAYS_INLINE int64_t iter_runs_body(const uint64_t *map, uint64_t *pos, uint64_t end,
                                     uint64_t *starts, uint64_t *lengths, uint64_t cap)
{
    uint64_t start = *pos, fw = start / 64, lw = (end - 1) / 64, lm = last_word_mask(end);
    uint64_t n = 0, open = 0, open_start = 0;
    for (uint64_t wi = fw; wi <= lw; wi++) {
        uint64_t w = map[wi];
        if (wi == fw)
            w &= first_word_mask(start);
        if (wi == lw)
            w &= lm;
        if (!open && w == 0)
            continue;
        /* Bit 0 of the next word is inside [start, end) whenever that word is: lw holds end-1. */
        uint64_t next = wi < lw ? map[wi + 1] & 1 : 0;
        uint64_t st = w & ~((w << 1) | open);
        uint64_t en = w & ~((w >> 1) | (next << 63));
        uint64_t base = wi * 64;
        if (open && en) {
            if (n == cap)
                goto full;
            starts[n] = open_start;
            lengths[n++] = base + (uint64_t)__builtin_ctzll(en) + 1 - open_start;
            en &= en - 1;
            open = 0;
        }
        while (st) {
            uint64_t b = base + (uint64_t)__builtin_ctzll(st);
            st &= st - 1;
            if (!en) {
                open = 1;
                open_start = b;
                break;
            }
            if (n == cap) {
                open_start = b;
                goto full;
            }
            starts[n] = b;
            lengths[n++] = base + (uint64_t)__builtin_ctzll(en) + 1 - b;
            en &= en - 1;
        }
    }
    *pos = end;
    return (int64_t)n;
full:
    *pos = open_start;
    return (int64_t)n;
}

static int64_t iter_runs_portable(const uint64_t *map, uint64_t *pos, uint64_t end,
                                  uint64_t *starts, uint64_t *lengths, uint64_t cap)
{
    return iter_runs_body(map, pos, end, starts, lengths, cap);
}

#ifdef SC_BITMAP_X86
TARGET_SCALAR static int64_t iter_runs_scalar(const uint64_t *map, uint64_t *pos, uint64_t end,
                                              uint64_t *starts, uint64_t *lengths, uint64_t cap)
{
    return iter_runs_body(map, pos, end, starts, lengths, cap);
}
#endif

int64_t sc_bitmap_iter_runs(const uint64_t *map, uint64_t nbits, uint64_t *pos, uint64_t end,
                            uint64_t *starts, uint64_t *lengths, uint64_t cap)
{
    if (bad_map(map, nbits) || pos == NULL || starts == NULL || lengths == NULL || cap == 0)
        return -EINVAL;
    if (*pos > end || end > nbits)
        return -ERANGE;
    if (*pos == end)
        return 0;
#ifdef SC_BITMAP_X86
    if (SC_HAS(SC_CPU_POPCNT))
        return iter_runs_scalar(map, pos, end, starts, lengths, cap);
#endif
    return iter_runs_portable(map, pos, end, starts, lengths, cap);
}

/* ---------------------------------------------------------------------------------------------
 * Word-wise combinations and equality. These are load/store bound; the compiler's baseline
 * vectorisation already saturates memory, so there is one path.
 */

/* dst may be exactly a source (each word is read before it is written) but a shifted overlap
 * would read words already overwritten. */
static int bad_alias(const uint64_t *dst, const uint64_t *src, uint64_t nw)
{
    size_t len = (size_t)(nw * sizeof(uint64_t));
    return dst != src && sc_overlaps(dst, len, src, len);
}

enum wordop { OP_AND, OP_OR, OP_ANDNOT };

/* One word of the result; op is a constant wherever this is inlined, so the switch folds away. */
ALWAYS_INLINE uint64_t combine(enum wordop op, uint64_t a, uint64_t b)
{
    switch (op) {
    case OP_AND:
        return a & b;
    case OP_OR:
        return a | b;
    default:
        return a & ~b;
    }
}

ALWAYS_INLINE int64_t wordop(uint64_t *dst, const uint64_t *a, const uint64_t *b,
                             uint64_t nbits, enum wordop op)
{
    if (dst == NULL || bad_map(a, nbits) || b == NULL)
        return -EINVAL;
    uint64_t nw = SC_BITMAP_WORDS(nbits), full = nbits / 64;
    if (bad_alias(dst, a, nw) || bad_alias(dst, b, nw))
        return -EINVAL;
    for (uint64_t i = 0; i < full; i++)
        dst[i] = combine(op, a[i], b[i]);
    if (full < nw) {
        uint64_t m = last_word_mask(nbits);
        dst[full] = (dst[full] & ~m) | (combine(op, a[full], b[full]) & m);
    }
    return 0;
}

int64_t sc_bitmap_and(uint64_t *dst, const uint64_t *a, const uint64_t *b, uint64_t nbits)
{
    return wordop(dst, a, b, nbits, OP_AND);
}

int64_t sc_bitmap_or(uint64_t *dst, const uint64_t *a, const uint64_t *b, uint64_t nbits)
{
    return wordop(dst, a, b, nbits, OP_OR);
}

int64_t sc_bitmap_andnot(uint64_t *dst, const uint64_t *a, const uint64_t *b, uint64_t nbits)
{
    return wordop(dst, a, b, nbits, OP_ANDNOT);
}

int64_t sc_bitmap_equal(const uint64_t *a, const uint64_t *b, uint64_t nbits)
{
    if (bad_map(a, nbits) || b == NULL)
        return -EINVAL;
    uint64_t full = nbits / 64;
    if (memcmp(a, b, full * sizeof(uint64_t)) != 0)
        return 0;
    if (nbits % 64 && ((a[full] ^ b[full]) & last_word_mask(nbits)))
        return 0;
    return 1;
}
