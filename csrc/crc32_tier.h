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

/* Each lane of x carried over the distance kk is made for, added to next. */
TARGET static SC_ALWAYS_INLINE VEC FN(fold_step)(VEC x, VEC kk, VEC next)
{
    return V(clmul_lo)(x, kk) ^ V(clmul_hi)(x, kk) ^ next;
}

/* Fold the first `len` bytes of p (len >= 16 * L * ACC, a multiple of 16 * L) into one 128-bit
 * lane, starting from the register c: the remainder left for csrc/crc32.c's 16-byte steps and
 * final reduction. */
TARGET static __m128i FN(fold)(uint32_t c, const uint8_t *p, size_t len)
{
    const VEC far = V(bcast)(fold_k[fold_index(128 * L * ACC)]);
    const VEC near = V(bcast)(fold_k[fold_index(128 * L)]);
    const __m128i k128 = _mm_loadu_si128((const __m128i *)fold_k[fold_index(128)]);
    __m128i first[4] = {_mm_cvtsi32_si128((int)c)};
    VEC x[ACC];
    x[0] = V(load)(p) ^ V(from_lanes)(first);
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
    __m128i lane[4];
    V(store)(lane, x[0]);
    for (int i = 1; i < L; i++)
        lane[0] = fold128(lane[0], k128, lane[i]);
    return lane[0];
}

#undef CR_CAT_
#undef CR_CAT
#undef V
#undef FN
#undef TARGET
#undef VEC
#undef L
