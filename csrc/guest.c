/*
 * Bulk guest-memory access through the nested page table (see guest.h).
 *
 * A call is two passes over the pages. The first reads the NPT entries, finds the page the call
 * stops at and checks every page before it (frame inside host memory, dirty-log slot present), so
 * that a refused call writes nothing. The second does the work. Both walk the table through an
 * sc_npt_cursor, one table walk per 512 sequential gfns; the first pass costs a few nanoseconds a
 * page against the hundreds the page's 4 KiB of work takes.
 *
 * The per-page kernels (fill, pattern, compare, digest) are plain loops written for the compiler
 * to vectorise: the build has no -march flag, so the portable build runs them on SSE2, and AVX2
 * and AVX-512 builds of the same loops (target attributes, always_inline bodies, as in bitmap.c)
 * are picked at run time (the avx2 build needs AVX2 only: Haswell and later, Zen 1 and later).
 * On the project's Zen 4 machines AVX-512 makes DIGEST 1.65x faster from DRAM (XXH3's
 * 32x32->64 multiplies, eight lanes per instruction) and the other loops 1.2-2x faster on pages
 * in cache; from DRAM those are store- or load-bound on every path.
 *
 * A call that writes more than SC_GUEST_STREAM_PAGES pages with plaintext stores them with
 * non-temporal stores (SSE2 movntdq, baseline on x86-64): they skip the read-for-ownership of
 * every destination line, and on those machines a 1 GiB FILL and READ ran 1.5-2x faster that
 * way (best of 9: 21 vs 43 ms, 59 vs 88 ms). Smaller calls keep plain stores, which leave the
 * pages in cache for the access that likely follows. Pages written through a logged entry also
 * keep plain stores: their dirty bit must be published after the data, and an sfence per page
 * would cost what streaming saves. The last streaming store of a call is fenced before it
 * returns.
 */
#include "guest.h"

#include <errno.h>
#include <string.h>

#include "bitmap.h"
#include "sevcore.h"

#if !defined(__BYTE_ORDER__) || __BYTE_ORDER__ != __ORDER_LITTLE_ENDIAN__
#error "guest pages are defined as little-endian words (the x86 memory layout)"
#endif

#if defined(__x86_64__)
#include <emmintrin.h>
#define SC_GUEST_X86 1
#define TARGET_AVX512 __attribute__((target("avx512f,avx512bw,avx512vl,avx512dq")))
#define TARGET_AVX2 __attribute__((target("avx2")))
#endif

/* 16 MiB: half the L3 of the machines the numbers above come from. A call writing less than that
 * leaves its pages in cache. */
#define SC_GUEST_STREAM_PAGES 4096

#define ALWAYS_INLINE static inline __attribute__((always_inline))
#define PAGE SC_GUEST_PAGE_SIZE
#define WORDS (PAGE / 8)
#define GFN_LIMIT ((uint64_t)1 << SC_NPT_GFN_BITS)

/* Words through memcpy: frames and buf carry no alignment promise, and the compiler turns these
 * into plain (vector) loads and stores. */
ALWAYS_INLINE uint64_t ld64(const uint8_t *p)
{
    uint64_t v;
    memcpy(&v, p, 8);
    return v;
}

ALWAYS_INLINE void st64(uint8_t *p, uint64_t v) { memcpy(p, &v, 8); }

/* ---------------------------------------------------------------------------------------------
 * PATTERN: splitmix64 (Steele, Lea and Flood, "Fast splittable pseudorandom number generators",
 * OOPSLA 2014; the constants of Vigna's splitmix64.c). One finalizer per page, then a table XOR
 * per word, so a page costs what a copy from L1 costs.
 */

#define GOLDEN 0x9e3779b97f4a7c15ULL

static inline uint64_t mix64(uint64_t z)
{
    z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ULL;
    z = (z ^ (z >> 27)) * 0x94d049bb133111ebULL;
    return z ^ (z >> 31);
}

/* S[j]: the (j + 1)-th splitmix64 output from state 0. */
static uint64_t splitmix_words[WORDS];

__attribute__((constructor)) static void guest_init(void)
{
    for (uint64_t j = 0; j < WORDS; j++)
        splitmix_words[j] = mix64((j + 1) * GOLDEN);
}

static inline uint64_t pattern_key(uint64_t seed, uint64_t gfn)
{
    return mix64(mix64(seed + GOLDEN) ^ gfn);
}

ALWAYS_INLINE void fill_body(uint8_t *page, uint64_t v)
{
    for (size_t j = 0; j < WORDS; j++)
        st64(page + 8 * j, v);
}

ALWAYS_INLINE void pattern_body(uint8_t *page, uint64_t key)
{
    for (size_t j = 0; j < WORDS; j++)
        st64(page + 8 * j, key ^ splitmix_words[j]);
}

/* Nonzero if the page is not the pattern with this key. No early exit: the branch-free OR is
 * faster than a test per vector, and a mismatching page is the rare case. */
ALWAYS_INLINE int differs_body(const uint8_t *page, uint64_t key)
{
    uint64_t d = 0;
    for (size_t j = 0; j < WORDS; j++)
        d |= ld64(page + 8 * j) ^ key ^ splitmix_words[j];
    return d != 0;
}

/* Streaming (non-temporal) variants of fill, pattern and copy, for a destination page that is
 * 16-byte aligned. The caller fences (sc_guest_pages returns after an sfence). */
#ifdef SC_GUEST_X86
static void fill_stream(uint8_t *page, uint64_t v)
{
    __m128i x = _mm_set1_epi64x((long long)v);
    for (size_t j = 0; j < PAGE; j += 16)
        _mm_stream_si128((__m128i *)(page + j), x);
}

static void pattern_stream(uint8_t *page, uint64_t key)
{
    __m128i k = _mm_set1_epi64x((long long)key);
    for (size_t j = 0; j < WORDS; j += 2) {
        __m128i s = _mm_loadu_si128((const __m128i *)&splitmix_words[j]);
        _mm_stream_si128((__m128i *)(page + 8 * j), _mm_xor_si128(k, s));
    }
}

static void copy_stream(uint8_t *dst, const uint8_t *src)
{
    for (size_t j = 0; j < PAGE; j += 64) {
        __m128i a = _mm_loadu_si128((const __m128i *)(src + j));
        __m128i b = _mm_loadu_si128((const __m128i *)(src + j + 16));
        __m128i c = _mm_loadu_si128((const __m128i *)(src + j + 32));
        __m128i d = _mm_loadu_si128((const __m128i *)(src + j + 48));
        _mm_stream_si128((__m128i *)(dst + j), a);
        _mm_stream_si128((__m128i *)(dst + j + 16), b);
        _mm_stream_si128((__m128i *)(dst + j + 32), c);
        _mm_stream_si128((__m128i *)(dst + j + 48), d);
    }
}
#endif

/* ---------------------------------------------------------------------------------------------
 * DIGEST: XXH3-64, seed 0, default secret, for exactly 4096 bytes: the long-input path of the
 * xxHash 0.8 reference (XXH3_hashLong_64b_internal in xxhash.h; doc/xxhash_spec.md). With the
 * 192-byte secret a block is 16 stripes of 64 bytes; 4096 bytes are three blocks, each followed
 * by a scramble, then (4095 - 3072) / 64 = 15 stripes, then the last 64 bytes as a stripe read
 * with the secret at offset 192 - 64 - 7, then the merge of the eight lanes.
 */

static const uint8_t xxh_secret[192] = {
    0xb8, 0xfe, 0x6c, 0x39, 0x23, 0xa4, 0x4b, 0xbe, 0x7c, 0x01, 0x81, 0x2c, 0xf7, 0x21, 0xad, 0x1c,
    0xde, 0xd4, 0x6d, 0xe9, 0x83, 0x90, 0x97, 0xdb, 0x72, 0x40, 0xa4, 0xa4, 0xb7, 0xb3, 0x67, 0x1f,
    0xcb, 0x79, 0xe6, 0x4e, 0xcc, 0xc0, 0xe5, 0x78, 0x82, 0x5a, 0xd0, 0x7d, 0xcc, 0xff, 0x72, 0x21,
    0xb8, 0x08, 0x46, 0x74, 0xf7, 0x43, 0x24, 0x8e, 0xe0, 0x35, 0x90, 0xe6, 0x81, 0x3a, 0x26, 0x4c,
    0x3c, 0x28, 0x52, 0xbb, 0x91, 0xc3, 0x00, 0xcb, 0x88, 0xd0, 0x65, 0x8b, 0x1b, 0x53, 0x2e, 0xa3,
    0x71, 0x64, 0x48, 0x97, 0xa2, 0x0d, 0xf9, 0x4e, 0x38, 0x19, 0xef, 0x46, 0xa9, 0xde, 0xac, 0xd8,
    0xa8, 0xfa, 0x76, 0x3f, 0xe3, 0x9c, 0x34, 0x3f, 0xf9, 0xdc, 0xbb, 0xc7, 0xc7, 0x0b, 0x4f, 0x1d,
    0x8a, 0x51, 0xe0, 0x4b, 0xcd, 0xb4, 0x59, 0x31, 0xc8, 0x9f, 0x7e, 0xc9, 0xd9, 0x78, 0x73, 0x64,
    0xea, 0xc5, 0xac, 0x83, 0x34, 0xd3, 0xeb, 0xc3, 0xc5, 0x81, 0xa0, 0xff, 0xfa, 0x13, 0x63, 0xeb,
    0x17, 0x0d, 0xdd, 0x51, 0xb7, 0xf0, 0xda, 0x49, 0xd3, 0x16, 0x55, 0x26, 0x29, 0xd4, 0x68, 0x9e,
    0x2b, 0x16, 0xbe, 0x58, 0x7d, 0x47, 0xa1, 0xfc, 0x8f, 0xf8, 0xb8, 0xd1, 0x7a, 0xd0, 0x31, 0xce,
    0x45, 0xcb, 0x3a, 0x8f, 0x95, 0x16, 0x04, 0x28, 0xaf, 0xd7, 0xfb, 0xca, 0xbb, 0x4b, 0x40, 0x7e,
};

#define XXH_PRIME32_1 0x9E3779B1ULL
#define XXH_PRIME32_2 0x85EBCA77ULL
#define XXH_PRIME32_3 0xC2B2AE3DULL
#define XXH_PRIME64_1 0x9E3779B185EBCA87ULL
#define XXH_PRIME64_2 0xC2B2AE3D27D4EB4FULL
#define XXH_PRIME64_3 0x165667B19E3779F9ULL
#define XXH_PRIME64_4 0x85EBCA77C2B2AE63ULL
#define XXH_PRIME64_5 0x27D4EB2F165667C5ULL
#define XXH_STRIPE 64
#define XXH_BLOCK_STRIPES 16

/* XXH3_accumulate_512: lane i takes lo32(d ^ k) * hi32(d ^ k), its neighbour i ^ 1 takes d. */
ALWAYS_INLINE void xxh_stripe(uint64_t acc[8], const uint8_t *in, const uint8_t *secret)
{
    for (int i = 0; i < 8; i++) {
        uint64_t d = ld64(in + 8 * i), k = d ^ ld64(secret + 8 * i);
        acc[i ^ 1] += d;
        acc[i] += (k & 0xffffffffULL) * (k >> 32);
    }
}

/* XXH3_scrambleAcc with the last 64 bytes of the secret. */
ALWAYS_INLINE void xxh_scramble(uint64_t acc[8])
{
    for (int i = 0; i < 8; i++) {
        uint64_t a = acc[i];
        a ^= a >> 47;
        a ^= ld64(xxh_secret + sizeof(xxh_secret) - XXH_STRIPE + 8 * i);
        acc[i] = a * XXH_PRIME32_1;
    }
}

static inline uint64_t mul128_fold64(uint64_t a, uint64_t b)
{
    unsigned __int128 p = (unsigned __int128)a * b;
    return (uint64_t)p ^ (uint64_t)(p >> 64);
}

/* XXH3_mergeAccs (secret offset 11, start len * PRIME64_1) and XXH3_avalanche. */
static uint64_t xxh_merge(const uint64_t acc[8])
{
    uint64_t h = (uint64_t)PAGE * XXH_PRIME64_1;
    for (int i = 0; i < 4; i++)
        h += mul128_fold64(acc[2 * i] ^ ld64(xxh_secret + 11 + 16 * i),
                           acc[2 * i + 1] ^ ld64(xxh_secret + 11 + 16 * i + 8));
    h ^= h >> 37;
    h *= 0x165667919E3779F9ULL;
    return h ^ (h >> 32);
}

ALWAYS_INLINE uint64_t digest_body(const uint8_t *page)
{
    uint64_t acc[8] = {XXH_PRIME32_3, XXH_PRIME64_1, XXH_PRIME64_2, XXH_PRIME64_3,
                       XXH_PRIME64_4, XXH_PRIME32_2, XXH_PRIME64_5, XXH_PRIME32_1};
    const size_t block = XXH_STRIPE * XXH_BLOCK_STRIPES;
    for (size_t b = 0; b < (PAGE - 1) / block; b++) {
        for (size_t s = 0; s < XXH_BLOCK_STRIPES; s++)
            xxh_stripe(acc, page + b * block + s * XXH_STRIPE, xxh_secret + 8 * s);
        xxh_scramble(acc);
    }
    size_t tail = (PAGE - 1) / block * block;
    for (size_t s = 0; s < (PAGE - 1 - tail) / XXH_STRIPE; s++)
        xxh_stripe(acc, page + tail + s * XXH_STRIPE, xxh_secret + 8 * s);
    xxh_stripe(acc, page + PAGE - XXH_STRIPE, xxh_secret + sizeof(xxh_secret) - XXH_STRIPE - 7);
    return xxh_merge(acc);
}

/* ---------------------------------------------------------------------------------------------
 * The kernels, built once per instruction set.
 */

struct page_kernels {
    void (*fill)(uint8_t *page, uint64_t v);
    void (*pattern)(uint8_t *page, uint64_t key);
    int (*differs)(const uint8_t *page, uint64_t key);
    uint64_t (*digest)(const uint8_t *page);
};

#define DEFINE_KERNELS(suffix, attr)                                                            \
    attr static void fill_##suffix(uint8_t *p, uint64_t v) { fill_body(p, v); }                 \
    attr static void pattern_##suffix(uint8_t *p, uint64_t k) { pattern_body(p, k); }           \
    attr static int differs_##suffix(const uint8_t *p, uint64_t k) { return differs_body(p, k); } \
    attr static uint64_t digest_##suffix(const uint8_t *p) { return digest_body(p); }           \
    static const struct page_kernels kernels_##suffix = {fill_##suffix, pattern_##suffix,       \
                                                         differs_##suffix, digest_##suffix};

DEFINE_KERNELS(portable, )
#ifdef SC_GUEST_X86
DEFINE_KERNELS(avx2, TARGET_AVX2)
DEFINE_KERNELS(avx512, TARGET_AVX512)
#endif

int sc_guest_impl(void) { return sc_cpu_vector_tier(); }

static const struct page_kernels *kernels(void)
{
#ifdef SC_GUEST_X86
    switch (sc_guest_impl()) {
    case SC_TIER_AVX512: return &kernels_avx512;
    case SC_TIER_AVX2: return &kernels_avx2;
    }
#endif
    return &kernels_portable;
}

void sc_guest_pattern(uint64_t seed, uint64_t gfn, uint8_t *page)
{
    kernels()->pattern(page, pattern_key(seed, gfn));
}

uint64_t sc_guest_digest(const uint8_t *page) { return kernels()->digest(page); }

/* ---------------------------------------------------------------------------------------------
 * Argument checks, the first pass, the second.
 */

static int op_writes(int op)
{
    return op == SC_GUEST_OP_WRITE || op == SC_GUEST_OP_FILL || op == SC_GUEST_OP_PATTERN ||
           op == SC_GUEST_OP_STAMP;
}

static int misaligned(const void *p) { return ((uintptr_t)p & 7) != 0; }

static int check_slots(const struct sc_guest_slot *slots, size_t nslots,
                       const struct sc_dirty_ring *ring, struct sc_err *err)
{
    if (nslots && !slots)
        return sc_refuse(err, EINVAL, SC_ERR_NULL, 0, 0, 0, 0);
    if (ring && (!ring->gfns || !ring->size || (ring->size & (ring->size - 1))))
        return sc_refuse(err, EINVAL, ring->gfns ? SC_ERR_RING_SIZE : SC_ERR_NULL, 0,
                         ring->size, 0, 0);
    for (size_t k = 0; k < nslots; k++) {
        const struct sc_guest_slot *s = &slots[k];
        /* With a ring the bitmap is optional (kvm_use_dirty_bitmap). */
        if (!s->dirty_bitmap && !ring)
            return sc_refuse(err, EINVAL, SC_ERR_NULL, k, 0, 0, 0);
        if (misaligned(s->dirty_bitmap))
            return sc_refuse(err, EINVAL, SC_ERR_MISALIGNED, k, 0, 0, 0);
        if (s->npages == 0 || s->base_gfn >= GFN_LIMIT || s->npages > GFN_LIMIT - s->base_gfn)
            return sc_refuse(err, EINVAL, SC_ERR_GUEST_SLOT, k, s->base_gfn, GFN_LIMIT,
                             s->npages);
        /* find_slot() binary-searches them, as search_memslots() does. */
        if (k && s->base_gfn < slots[k - 1].base_gfn + slots[k - 1].npages)
            return sc_refuse(err, EINVAL, SC_ERR_GUEST_SLOT_ORDER, k, s->base_gfn,
                             slots[k - 1].base_gfn + slots[k - 1].npages, s->npages);
    }
    return 0;
}

static int check_args(const struct sc_guest_ctx *ctx, int op, const uint64_t *gfns, uint64_t gfn0,
                      uint64_t n, const uint8_t *buf, size_t buf_size, const uint64_t *out,
                      size_t out_len, struct sc_err *err)
{
    if (!ctx || !ctx->npt || !ctx->frames)
        return sc_refuse(err, EINVAL, SC_ERR_NULL, 0, 0, 0, 0);
    if (op < SC_GUEST_OP_READ || op > SC_GUEST_OP_DIGEST)
        return sc_refuse(err, EINVAL, SC_ERR_GUEST_OP, 0, (uint64_t)(int64_t)op, 0, 0);
    /* No call can name more pages than the guest space has; this also keeps n * 4096 and
     * n * 8 far from overflowing. */
    if (n > GFN_LIMIT)
        return sc_refuse(err, EINVAL, SC_ERR_GUEST_COUNT, 0, n, GFN_LIMIT, 0);
    size_t gfns_bytes = gfns ? (size_t)n * 8 : 0;
    if (op == SC_GUEST_OP_READ || op == SC_GUEST_OP_WRITE) {
        size_t bytes = (size_t)n * PAGE;
        if ((bytes && !buf) || buf_size < bytes)
            return sc_refuse(err, EINVAL, SC_ERR_GUEST_BUF_SIZE, 0, buf ? buf_size : 0, bytes,
                             n);
        if (sc_overlaps(buf, bytes, ctx->frames, ctx->frames_size) ||
            sc_overlaps(buf, bytes, gfns, gfns_bytes))
            return sc_refuse(err, EINVAL, SC_ERR_GUEST_BUF_OVERLAP, 0, 0, 0, 0);
    }
    if (op == SC_GUEST_OP_CHECK || op == SC_GUEST_OP_DIGEST) {
        size_t words = op == SC_GUEST_OP_CHECK ? 2 : (size_t)n;
        if ((words && !out) || out_len < words)
            return sc_refuse(err, EINVAL, SC_ERR_GUEST_OUT_SIZE, 0, out ? out_len : 0, words,
                             n);
        if (misaligned(out))
            return sc_refuse(err, EINVAL, SC_ERR_MISALIGNED, 0, 0, 0, 0);
        if (sc_overlaps(out, words * 8, ctx->frames, ctx->frames_size) ||
            sc_overlaps(out, words * 8, gfns, gfns_bytes))
            return sc_refuse(err, EINVAL, SC_ERR_GUEST_OUT_OVERLAP, 0, 0, 0, 0);
    }
    if (gfns) {
        if (misaligned(gfns))
            return sc_refuse(err, EINVAL, SC_ERR_MISALIGNED, 0, 0, 0, 0);
        /* One OR over the list on the way in; which page it was is looked for once it failed. */
        uint64_t any = 0;
        for (uint64_t i = 0; i < n; i++)
            any |= gfns[i];
        if (any >= GFN_LIMIT) {
            uint64_t i = 0;
            while (gfns[i] < GFN_LIMIT)
                i++;
            return sc_refuse(err, EINVAL, SC_ERR_GUEST_GFN, i, gfns[i], GFN_LIMIT, 0);
        }
    } else if (gfn0 > GFN_LIMIT || n > GFN_LIMIT - gfn0) {
        return sc_refuse(err, EINVAL, SC_ERR_GUEST_RUN, 0, gfn0, GFN_LIMIT, n);
    }
    return check_slots(ctx->slots, ctx->nslots, ctx->ring, err);
}

/* The slot holding gfn, or NULL: the hinted slot (the last one used) first, else a binary search
 * for the last slot starting at or below gfn, as search_memslots() does (include/linux/
 * kvm_host.h). */
static const struct sc_guest_slot *find_slot(const struct sc_guest_ctx *ctx, uint64_t gfn,
                                             size_t *hint)
{
    const struct sc_guest_slot *s = ctx->slots;
    if (*hint < ctx->nslots && gfn - s[*hint].base_gfn < s[*hint].npages)
        return &s[*hint];
    size_t lo = 0, hi = ctx->nslots;
    while (lo < hi) {
        size_t mid = lo + (hi - lo) / 2;
        if (s[mid].base_gfn <= gfn)
            lo = mid + 1;
        else
            hi = mid;
    }
    if (lo == 0 || gfn - s[lo - 1].base_gfn >= s[lo - 1].npages)
        return NULL;
    *hint = lo - 1;
    return &s[lo - 1];
}

ALWAYS_INLINE uint64_t gfn_at(const uint64_t *gfns, uint64_t gfn0, uint64_t i)
{
    return gfns ? gfns[i] : gfn0 + i;
}

/* Pass one: the number of pages before the first that faults, after checking each of them. */
static int64_t first_fault(const struct sc_guest_ctx *ctx, int op, const uint64_t *gfns,
                           uint64_t gfn0, uint64_t n, struct sc_err *err)
{
    int writes = op_writes(op);
    uint64_t need = SC_NPT_PRESENT | (writes ? SC_NPT_WRITABLE : 0);
    uint64_t priv = ctx->private_access ? SC_NPT_PRIVATE : 0;
    /* Shared accesses, and guests without SNP, skip the RMP check: one test per page. */
    const struct sc_rmp *rmp = ctx->private_access ? ctx->rmp : NULL;
    uint64_t nframes = ctx->frames_size / PAGE;
    struct sc_npt_cursor cur;
    sc_npt_cursor_init(&cur);
    size_t hint = 0;
    /* With a ring: the pushes the ring takes before the one that makes it soft-full. */
    uint64_t room = 0, pushes = 0;
    if (ctx->ring) {
        uint32_t used = ctx->ring->dirty_index - ctx->ring->reset_index;
        room = used < ctx->ring->soft_limit ? ctx->ring->soft_limit - used - 1 : 0;
    }
    for (uint64_t i = 0; i < n; i++) {
        uint64_t gfn = gfn_at(gfns, gfn0, i);
        uint64_t entry = sc_npt_cursor_lookup(ctx->npt, &cur, gfn);
        if ((entry & need) != need || (entry & SC_NPT_PRIVATE) != priv)
            return (int64_t)i;
        if (sc_npt_entry_pfn(entry) >= nframes)
            return sc_refuse(err, EFAULT, SC_ERR_GUEST_FRAME, i, sc_npt_entry_pfn(entry), nframes,
                             0);
        if (rmp && !sc_rmp_validated(rmp, sc_npt_entry_pfn(entry), ctx->rmp_asid))
            return (int64_t)i;
        if (writes && (entry & SC_NPT_DIRTY_LOG)) {
            /* Its dirty bit would have nowhere to go (mark_page_dirty_in_slot() needs the slot). */
            if (!find_slot(ctx, gfn, &hint))
                return sc_refuse(err, EINVAL, SC_ERR_GUEST_UNLOGGED, i, gfn, 0, 0);
            /* The push that fills the ring to its soft limit is the caller's (guest.h). A gfn
             * listed twice counts twice here and pushes once: the call may stop early. */
            if (ctx->ring && pushes++ == room)
                return (int64_t)i;
        }
    }
    return (int64_t)n;
}

/* Pass two over pages [0, n), all checked by pass one. */
static void run_pages(const struct sc_guest_ctx *ctx, int op, const uint64_t *gfns, uint64_t gfn0,
                      uint64_t n, uint64_t arg, uint8_t *buf, uint64_t *out)
{
    const struct page_kernels *k = kernels();
    const sc_memcrypt *eng = ctx->eng;
    int writes = op_writes(op);
    struct sc_npt_cursor cur;
    sc_npt_cursor_init(&cur);
    size_t hint = 0;
    uint64_t mismatches = 0, first = UINT64_MAX;
    _Alignas(64) uint8_t plain[PAGE];
    /* READ streams into buf, the writes into the frames. */
    int stream = !eng && n > SC_GUEST_STREAM_PAGES &&
                 (op == SC_GUEST_OP_READ || op == SC_GUEST_OP_WRITE || op == SC_GUEST_OP_FILL ||
                  op == SC_GUEST_OP_PATTERN);

    if (eng && op == SC_GUEST_OP_FILL)
        k->fill(plain, arg);
    for (uint64_t i = 0; i < n; i++) {
        uint64_t gfn = gfn_at(gfns, gfn0, i);
        uint64_t entry = sc_npt_cursor_lookup(ctx->npt, &cur, gfn);
        uint64_t spa = sc_npt_entry_pfn(entry) * PAGE;
        uint8_t *frame = ctx->frames + spa;
        uint8_t *bufp = op == SC_GUEST_OP_READ || op == SC_GUEST_OP_WRITE ? buf + i * PAGE : NULL;
        int bad = 0;
        if (!eng) {
#ifdef SC_GUEST_X86
            uint8_t *dst = op == SC_GUEST_OP_READ ? bufp : frame;
            if (stream && !(writes && (entry & SC_NPT_DIRTY_LOG)) && !((uintptr_t)dst & 15)) {
                /* A streamed page is done: it sets no dirty bit and is never compared. */
                switch (op) {
                case SC_GUEST_OP_READ: copy_stream(bufp, frame); continue;
                case SC_GUEST_OP_WRITE: copy_stream(frame, bufp); continue;
                case SC_GUEST_OP_FILL: fill_stream(frame, arg); continue;
                case SC_GUEST_OP_PATTERN: pattern_stream(frame, pattern_key(arg, gfn)); continue;
                }
            }
#endif
            switch (op) {
            case SC_GUEST_OP_READ: memcpy(bufp, frame, PAGE); break;
            case SC_GUEST_OP_WRITE: memcpy(frame, bufp, PAGE); break;
            case SC_GUEST_OP_FILL: k->fill(frame, arg); break;
            case SC_GUEST_OP_PATTERN: k->pattern(frame, pattern_key(arg, gfn)); break;
            case SC_GUEST_OP_CHECK: bad = k->differs(frame, pattern_key(arg, gfn)); break;
            case SC_GUEST_OP_STAMP: st64(frame, arg); break;
            case SC_GUEST_OP_DIGEST: out[i] = k->digest(frame); break;
            }
        } else {
            switch (op) {
            case SC_GUEST_OP_READ: sc_memcrypt_page(eng, 0, frame, bufp, spa); break;
            case SC_GUEST_OP_WRITE: sc_memcrypt_page(eng, 1, bufp, frame, spa); break;
            case SC_GUEST_OP_FILL: sc_memcrypt_page(eng, 1, plain, frame, spa); break;
            case SC_GUEST_OP_PATTERN:
                k->pattern(plain, pattern_key(arg, gfn));
                sc_memcrypt_page(eng, 1, plain, frame, spa);
                break;
            case SC_GUEST_OP_CHECK:
                sc_memcrypt_page(eng, 0, frame, plain, spa);
                bad = k->differs(plain, pattern_key(arg, gfn));
                break;
            case SC_GUEST_OP_STAMP:
                sc_memcrypt_page(eng, 0, frame, plain, spa);
                st64(plain, arg);
                sc_memcrypt_page(eng, 1, plain, frame, spa);
                break;
            case SC_GUEST_OP_DIGEST:
                sc_memcrypt_page(eng, 0, frame, plain, spa);
                out[i] = k->digest(plain);
                break;
            }
        }
        if (bad && mismatches++ == 0)
            first = i;
        if (writes && (entry & SC_NPT_DIRTY_LOG)) {
            const struct sc_guest_slot *slot = find_slot(ctx, gfn, &hint);
            /* The page's stores before the bit (guest.h). */
            __atomic_thread_fence(__ATOMIC_RELEASE);
            if (ctx->ring) {
                /* mark_page_dirty_in_slot with a running vCPU: its ring, and the SPTE becomes
                 * writable (the table's owner holds its lock for the call: csrc/guest.h). */
                sc_dirty_ring_push(ctx->ring, slot->id, gfn - slot->base_gfn);
                /* The entry's flag in place: the table's shape is unchanged, so no walk (nor
                 * any cursor) goes stale; a present entry is never in the shared empty table. */
                uint64_t *leaf = (uint64_t *)sc_npt_cursor_leaf(ctx->npt, &cur, gfn);
                leaf[gfn & 511] &= ~(uint64_t)SC_NPT_DIRTY_LOG;
            } else {
                sc_bitmap_set_bit_atomic(slot->dirty_bitmap, gfn - slot->base_gfn);
            }
        }
    }
    if (op == SC_GUEST_OP_CHECK) {
        out[0] = mismatches;
        out[1] = first;
    }
#ifdef SC_GUEST_X86
    if (stream)
        _mm_sfence();
#else
    (void)stream;
#endif
}

int64_t sc_guest_pages(const struct sc_guest_ctx *ctx, int op, const uint64_t *gfns,
                       uint64_t gfn0, uint64_t n, uint64_t arg, uint8_t *buf, size_t buf_size,
                       uint64_t *out, size_t out_len, struct sc_err *err)
{
    int rc = check_args(ctx, op, gfns, gfn0, n, buf, buf_size, out, out_len, err);
    if (rc)
        return rc;
    int64_t done = first_fault(ctx, op, gfns, gfn0, n, err);
    if (done < 0)
        return done;
    run_pages(ctx, op, gfns, gfn0, (uint64_t)done, arg, buf, out);
    return done;
}
