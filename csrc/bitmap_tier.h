/*
 * The bitmap kernels' vector paths, written once and included by bitmap.c once per vector tier
 * (avx2, avx512) with TIER defined and, in front of it, the tier's primitives:
 *
 *   bm_TIER_v             a GCC vector of uint64_t words (W = its size / 8)
 *   BM_TARGET_TIER        the tier's target attribute
 *   bm_TIER_popcnt(v, n)  the bit counts of the words of v[0..n), n <= 4, summed word by word
 *   bm_TIER_nonzero8(p)   which of the 8 words of the 64-byte line at p are non-zero, as bits
 *   bm_TIER_words         the word_fn that writes a word's bit indices (bitmap.c)
 *
 * BM_PART selects the part: 1 the whole-array reductions (count_words_TIER, count_run_starts_TIER,
 * read_pass_TIER), 2 the scans (scan_TIER), which need the scan machinery defined before them.
 * Not a header of its own: no include guard.
 */
#define BT_CAT_(a, b) a##_##b
#define BT_CAT(a, b) BT_CAT_(a, b)
#define V(op) BT_CAT(BT_CAT(bm, TIER), op)
#define FN(name) BT_CAT(name, TIER)
#define TARGET BT_CAT(BM_TARGET, TIER)
#define VEC V(v)
#define W (sizeof(VEC) / 8)
#define BM_WORDS V(words)

#if BM_PART == 1
/* Unaligned W words; memcpy compiles to one vector load. */
TARGET static SC_BM_INLINE VEC FN(load)(const uint64_t *p)
{
    VEC v;
    memcpy(&v, p, sizeof(v));
    return v;
}

TARGET static SC_BM_INLINE uint64_t FN(hsum)(VEC v)
{
    uint64_t s = 0;
    for (unsigned k = 0; k < W; k++)
        s += v[k];
    return s;
}

/* Four registers per step, so that the loop is bound by loads and keeps up with DRAM: their bit
 * counts added (count) or the words XORed into four accumulators. Returns the sum (or XOR), and
 * in *done the words it took. */
TARGET static SC_BM_INLINE VEC FN(reduce)(const uint64_t *w, uint64_t n, uint64_t *done,
                                          const int count)
{
    VEC a[4] = {{0}}, v[4];
    uint64_t i = 0;
    for (; i + 4 * W <= n; i += 4 * W) {
#pragma GCC unroll 4
        for (int k = 0; k < 4; k++) {
            v[k] = FN(load)(w + i + k * W);
            if (!count)
                a[k] ^= v[k];
        }
        if (count)
            a[0] += V(popcnt)(v, 4);
    }
    *done = i;
    return count ? a[0] : a[0] ^ a[1] ^ a[2] ^ a[3];
}

TARGET static uint64_t FN(count_words)(const uint64_t *w, uint64_t n)
{
    uint64_t i;
    VEC a = FN(reduce)(w, n, &i, 1);
    for (; i + W <= n; i += W) {
        VEC v = FN(load)(w + i);
        a += V(popcnt)(&v, 1);
    }
    uint64_t c = FN(hsum)(a);
    for (; i < n; i++)
        c += (uint64_t)__builtin_popcountll(w[i]);
    return c;
}

/* The same reduction over run starts; each word's predecessor comes from a load shifted by one
 * word. */
TARGET static uint64_t FN(count_run_starts)(const uint64_t *w, uint64_t n, uint64_t prev)
{
    if (n == 0)
        return 0;
    uint64_t c = (uint64_t)__builtin_popcountll(run_starts(w[0], prev));
    VEC acc = {0};
    uint64_t i = 1;
    for (; i + W <= n; i += W) {
        VEC v = FN(load)(w + i), p = FN(load)(w + i - 1);
        VEC starts = v & ~((v << 1) | (p >> 63));
        acc += V(popcnt)(&starts, 1);
    }
    c += FN(hsum)(acc);
    for (; i < n; i++)
        c += (uint64_t)__builtin_popcountll(run_starts(w[i], w[i - 1]));
    return c;
}

TARGET static uint64_t FN(read_pass)(const uint64_t *w, uint64_t n)
{
    uint64_t i, r = 0;
    VEC x = FN(reduce)(w, n, &i, 0);
    for (unsigned k = 0; k < W; k++)
        r ^= x[k];
    for (; i < n; i++)
        r ^= w[i];
    return r;
}
#endif

#if BM_PART == 2
/* Align to a cache line, then visit only the non-zero words of each line. */
TARGET static SC_BM_INLINE int FN(scan_blocks)(struct scan *s, uint64_t *wip, uint64_t lw,
                                               const int take)
{
    uint64_t wi = *wip;
    int ok = 1;
    for (; wi < lw && ((uintptr_t)(s->map + wi) & 63); wi++)
        if (peek_word(s, wi, take) && !(ok = visit_word(s, wi, ALL_ONES, take, BM_WORDS)))
            goto out;
    for (; wi + 8 <= lw; wi += 8) {
        unsigned nz = V(nonzero8)(s->map + wi);
        while (nz) {
            uint64_t k = wi + (uint64_t)__builtin_ctz(nz);
            nz &= nz - 1;
            if (!(ok = visit_word(s, k, ALL_ONES, take, BM_WORDS)))
                goto out;
        }
    }
out:
    *wip = wi;
    return ok;
}

TARGET static int FN(iter_blocks)(struct scan *s, uint64_t *wip, uint64_t lw)
{
    return FN(scan_blocks)(s, wip, lw, 0);
}

TARGET static int FN(harvest_blocks)(struct scan *s, uint64_t *wip, uint64_t lw)
{
    return FN(scan_blocks)(s, wip, lw, 1);
}

TARGET static int64_t FN(scan)(struct scan *s, uint64_t *pos, uint64_t end, int take)
{
    return take ? scan_body(s, pos, end, 1, FN(harvest_blocks), BM_WORDS)
                : scan_body(s, pos, end, 0, FN(iter_blocks), BM_WORDS);
}
#endif

#undef BT_CAT_
#undef BT_CAT
#undef V
#undef FN
#undef TARGET
#undef VEC
#undef W
#undef BM_WORDS
