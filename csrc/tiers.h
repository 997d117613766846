/*
 * The x86-64 tiers of the C core (csrc/sevcore.h SC_TIER_*) as one vector vocabulary per tier,
 * so that a kernel is written once and compiled per tier. Internal: not part of the cffi cdef.
 */
#ifndef SEVCORE_TIERS_H
#define SEVCORE_TIERS_H

#include <stdint.h>

#include "sevcore.h"

#define SC_ALWAYS_INLINE inline __attribute__((always_inline))

#if defined(__x86_64__)
#include <immintrin.h>
#define SC_X86 1

/* ---------------------------------------------------------------------------------------------
 * The x86 tiers' vector vocabulary. A kernel that runs AES or carry-less multiplies on many
 * blocks is written once, as a template included per tier (csrc/each_tier.h: csrc/memcrypt_tier.h,
 * csrc/ctr_tier.h, csrc/crc32_tier.h), in terms of sc_<tier>_<op> and SC_TARGET_<tier>:
 *
 *   aesni   xmm, one block per register: AES-NI and PCLMULQDQ (Westmere and later, every AMD
 *           core since Bulldozer);
 *   avx2    ymm, two blocks per register: VEX-encoded VAES and VPCLMULQDQ (Zen 3, Ice Lake and
 *           Alder Lake client cores);
 *   avx512  zmm, four blocks per register: EVEX-encoded VAES and VPCLMULQDQ (Zen 4, Ice Lake
 *           server and later).
 *
 * The AES instructions work on each 128-bit lane independently (Intel SDM vol. 2, VAESENC:
 * "the 128-bit lanes are processed in parallel"), as do PCLMULQDQ's and the byte shifts, so the
 * same code serves every width. XOR, shifts and adds are GCC vector-extension operators on the
 * sc_<tier>_u64 view. The helpers are always inlined so that, called with constant round and
 * way counts, every round unrolls.
 */

typedef unsigned long long sc_aesni_u64 __attribute__((vector_size(16)));
typedef unsigned long long sc_avx2_u64 __attribute__((vector_size(32)));
typedef unsigned long long sc_avx512_u64 __attribute__((vector_size(64)));

#define SC_TARGET_aesni __attribute__((target("aes,pclmul,sse4.1,ssse3")))
#define SC_TARGET_avx2 __attribute__((target("avx2,aes,pclmul,vaes,vpclmulqdq")))
#define SC_TARGET_avx512                                                                          \
    __attribute__((target("avx512f,avx512bw,avx512vl,avx512dq,avx2,vaes,vpclmulqdq,aes,pclmul")))

/* One AES round instruction, on every lane: sc_<t>_enc(b, k) and so on. */
#define SC_VEC_ROUND(t, V, op, insn)                                                             \
    SC_TARGET_##t static SC_ALWAYS_INLINE V sc_##t##_##op(V b, V k) { return insn(b, k); }

/* The operations whose intrinsics differ between widths only by prefix and suffix (pre is
 * _mm/_mm256/_mm512; aes the suffix of the AES, carry-less multiply and byte-shift intrinsics;
 * si that of whole-register loads and stores), and those written once with vector operators. */
#define SC_VEC_OPS(t, V, pre, aes, si, nregs)                                                      \
    typedef V sc_##t##_v;                                                                          \
    typedef unsigned sc_##t##_u32 __attribute__((vector_size(sizeof(V))));                         \
    enum { sc_##t##_lanes = sizeof(V) / 16, sc_##t##_regs = nregs };                               \
    SC_TARGET_##t static SC_ALWAYS_INLINE V sc_##t##_load(const void *p)                           \
    {                                                                                              \
        return pre##_loadu_##si((const V *)p);                                                     \
    }                                                                                              \
    SC_TARGET_##t static SC_ALWAYS_INLINE void sc_##t##_store(void *p, V v)                        \
    {                                                                                              \
        pre##_storeu_##si((V *)p, v);                                                              \
    }                                                                                              \
    SC_VEC_ROUND(t, V, enc, pre##_aesenc_##aes)                                                  \
    SC_VEC_ROUND(t, V, enclast, pre##_aesenclast_##aes)                                          \
    SC_VEC_ROUND(t, V, dec, pre##_aesdec_##aes)                                                  \
    SC_VEC_ROUND(t, V, declast, pre##_aesdeclast_##aes)                                          \
    SC_TARGET_##t static SC_ALWAYS_INLINE V sc_##t##_shuffle8(V a, V c)                            \
    {                                                                                              \
        return pre##_shuffle_epi8(a, c);                                                           \
    }                                                                                              \
    /* Carry-less products of each lane's low qwords (imm 0x00) and of its high qwords (0x11). */   \
    SC_TARGET_##t static SC_ALWAYS_INLINE V sc_##t##_clmul_lo(V a, V b)                          \
    {                                                                                            \
        return pre##_clmulepi64_##aes(a, b, 0x00);                                               \
    }                                                                                            \
    SC_TARGET_##t static SC_ALWAYS_INLINE V sc_##t##_clmul_hi(V a, V b)                          \
    {                                                                                            \
        return pre##_clmulepi64_##aes(a, b, 0x11);                                               \
    }                                                                                            \
    /* Round keys: with 32 registers (zmm) the schedule is loaded into kr[0..nr] once per call     \
     * and stays in registers; with 16, key(r) loads round r's key where it is used, so that 15    \
     * AES-256 keys do not compete with the data and tweaks of eight ways for the registers,       \
     * and one load feeds every way. */                                                            \
    SC_TARGET_##t static SC_ALWAYS_INLINE void sc_##t##_keys(const uint8_t (*keys)[16], int nr,    \
                                                            V *kr)                                 \
    {                                                                                              \
        if (nregs >= 32)                                                                           \
            for (int r = 0; r <= nr; r++)                                                          \
                kr[r] = sc_##t##_bcast(keys[r]);                                                   \
    }                                                                                              \
    SC_TARGET_##t static SC_ALWAYS_INLINE V sc_##t##_key(const uint8_t (*keys)[16], const V *kr,   \
                                                         int r)                                    \
    {                                                                                              \
        return nregs >= 32 ? kr[r] : sc_##t##_bcast(keys[r]);                                      \
    }                                                                                              \
    /* Each 128-bit lane times x^k in GF(2^128), IEEE 1619's little-endian convention              \
     * (1 <= k <= 56): the qwords shift, the low qword's top k bits carry into the high one,       \
     * and the high qword's top k bits fold back through a carry-less multiply by 0x87 (x^128 =    \
     * x^7 + x^2 + x + 1), whose product (< 2^(k+8)) stays in the low qword. */                    \
    SC_TARGET_##t static SC_ALWAYS_INLINE V sc_##t##_mul_xk(V v, const int k)                      \
    {                                                                                              \
        sc_##t##_u64 u = (sc_##t##_u64)v, zero = {0};                                              \
        V sr = (V)(u >> (64 - k));                                                                 \
        V red = sc_##t##_clmul_lo(pre##_bsrli_##aes(sr, 8), (V)(zero + 0x87));          \
        return (V)(u << k) ^ pre##_bslli_##aes(sr, 8) ^ red;                                       \
    }

/* A 16-byte block (a round key, a counter pattern) in every lane. */
SC_TARGET_aesni static SC_ALWAYS_INLINE __m128i sc_aesni_bcast(const void *p)
{
    return _mm_loadu_si128((const __m128i *)p);
}
SC_TARGET_avx2 static SC_ALWAYS_INLINE __m256i sc_avx2_bcast(const void *p)
{
    return _mm256_broadcastsi128_si256(_mm_loadu_si128((const __m128i *)p));
}
SC_TARGET_avx512 static SC_ALWAYS_INLINE __m512i sc_avx512_bcast(const void *p)
{
    return _mm512_broadcast_i32x4(_mm_loadu_si128((const __m128i *)p));
}

/* A register from its 128-bit lanes t[0..lanes), in registers: a wide load of narrower stores
 * just made cannot be forwarded from the store queue (the store-to-load forwarding rules of the
 * Intel and AMD optimization manuals), a stall that cost the XTS page loop 8 % on Zen 4. */
SC_TARGET_aesni static SC_ALWAYS_INLINE __m128i sc_aesni_from_lanes(const __m128i *t)
{
    return t[0];
}
SC_TARGET_avx2 static SC_ALWAYS_INLINE __m256i sc_avx2_from_lanes(const __m128i *t)
{
    return _mm256_set_m128i(t[1], t[0]);
}
SC_TARGET_avx512 static SC_ALWAYS_INLINE __m512i sc_avx512_from_lanes(const __m128i *t)
{
    __m512i v = _mm512_castsi128_si512(t[0]);
    v = _mm512_inserti32x4(v, t[1], 1);
    v = _mm512_inserti32x4(v, t[2], 2);
    return _mm512_inserti32x4(v, t[3], 3);
}

SC_VEC_OPS(aesni, __m128i, _mm, si128, si128, 16)
SC_VEC_OPS(avx2, __m256i, _mm256, epi128, si256, 16)
SC_VEC_OPS(avx512, __m512i, _mm512, epi128, si512, 32)
#endif /* SC_X86 */

#endif
