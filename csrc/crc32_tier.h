/*
 * CRC-32 folding (Gopal et al., see csrc/crc32.h) written once and included by crc32.c once per
 * x86 tier (csrc/each_tier.h), with TIER (aesni, avx2, avx512: csrc/tiers.h) and ACC (registers
 * folded in parallel) defined. It defines fold_TIER. Not a header of its own: no include guard.
 *
 * ACC registers of sc_TIER_lanes 128-bit lanes each fold 16 * lanes * ACC bytes per step: every
 * lane is carried forward over that distance D = 128 * lanes * ACC bits with one multiply by
 * x^(D+32) and one by x^(D-32) mod P (fold_consts()). The xmm tier's four registers are the
 * paper's own loop (D = 512); ymm and zmm run two and four times as far per step.
 */
#define CR_CAT_(a, b) a##_##b
#define CR_CAT(a, b) CR_CAT_(a, b)
#define V(op) CR_CAT(CR_CAT(sc, TIER), op)
#define FN(name) CR_CAT(name, TIER)
#define TARGET CR_CAT(SC_TARGET, TIER)
#define VEC V(v)
#define L V(lanes)
#define MT_LANES CR_CAT(SC_LANES, TIER)

/* Each lane of x carried over the distance kk is made for, added to next. */
TARGET static SC_ALWAYS_INLINE VEC FN(fold_step)(VEC x, VEC kk, VEC next)
{
    return V(clmul_lo)(x, kk) ^ V(clmul_hi)(x, kk) ^ next;
}

/* Fold the first `len` bytes of p (len >= 16 * L * ACC, a multiple of 16 * L) into one 128-bit
 * lane, starting from the register c, and store it to `out`: what remains for crc32.c's
 * 16-byte steps and final reduction. */
TARGET static void FN(fold)(uint32_t c, const uint8_t *p, size_t len, uint8_t out[16])
{
    const VEC far = V(bcast)(fold_k[fold_index(128 * L * ACC)]);
    const VEC near = V(bcast)(fold_k[fold_index(128 * L)]);
    VEC x[ACC];
    x[0] = V(load)(p) ^ V(from_u32)(c);
#pragma GCC unroll 8
    for (int i = 1; i < ACC; i++)
        x[i] = V(load)(p + 16 * L * i);
    for (p += 16 * L * ACC, len -= 16 * L * ACC; len >= 16 * L * ACC;
         p += 16 * L * ACC, len -= 16 * L * ACC) {
#pragma GCC unroll 8
        for (int i = 0; i < ACC; i++)
            x[i] = FN(fold_step)(x[i], far, V(load)(p + 16 * L * i));
    }
    /* The registers into one, then the whole registers left. */
#pragma GCC unroll 8
    for (int i = 1; i < ACC; i++)
        x[0] = FN(fold_step)(x[0], near, x[i]);
    for (; len >= 16 * L; p += 16 * L, len -= 16 * L)
        x[0] = FN(fold_step)(x[0], near, V(load)(p));
    /* The lanes into one, each carried 128 bits into the next. */
    uint8_t lanes[16 * L];
    V(store)(lanes, x[0]);
#if MT_LANES > 1
    const __m128i k128 = _mm_loadu_si128((const __m128i *)fold_k[fold_index(128)]);
    __m128i acc = _mm_loadu_si128((const __m128i *)lanes);
    for (int i = 1; i < L; i++)
        acc = fold128(acc, k128, _mm_loadu_si128((const __m128i *)(lanes + 16 * i)));
    _mm_storeu_si128((__m128i *)out, acc);
#else
    memcpy(out, lanes, 16);
#endif
}

#undef CR_CAT_
#undef CR_CAT
#undef V
#undef FN
#undef TARGET
#undef VEC
#undef L
#undef MT_LANES
