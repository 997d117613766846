/*
 * AES (FIPS-197) shared by the C kernels that need it: the memory encryption engine
 * (memcrypt.c: XEX-128, XTS-256) and the transport-packet crypto (sevpkt.c: AES-128-CTR).
 * Internal: not part of the cffi cdef.
 *
 * The block rounds come in a portable T-table AES and, on x86-64, one vector vocabulary per tier
 * (AES-NI on xmm, VAES on ymm and on zmm) that the callers' templates are written in; which runs
 * is chosen from the active CPU features (csrc/cpu.c).
 *
 * The portable AES is table-based and therefore not constant-time. That is acceptable here: the
 * simulator models hardware and firmware, it does not protect real secrets.
 */
#ifndef SEVCORE_AES_H
#define SEVCORE_AES_H

#include <stdint.h>

#include "sevcore.h"

#if defined(__x86_64__)
#include <immintrin.h>
#define SC_X86 1
#endif

/* The tier (SC_TIER_*) whose block implementation the active CPU features select. */
int sc_aes_impl(void);

/* ---------------------------------------------------------------------------------------------
 * Portable AES. The S-box and the round tables are computed at load time (aes.c) from the field
 * arithmetic rather than typed in, so there is no table to get wrong.
 */

extern uint8_t sc_aes_sbox[256], sc_aes_inv_sbox[256];
extern uint32_t sc_aes_te[4][256], sc_aes_td[4][256];

static inline uint32_t sc_load_be32(const uint8_t *p)
{
    return ((uint32_t)p[0] << 24) | ((uint32_t)p[1] << 16) | ((uint32_t)p[2] << 8) | p[3];
}

static inline void sc_store_be32(uint8_t *p, uint32_t v)
{
    p[0] = (uint8_t)(v >> 24);
    p[1] = (uint8_t)(v >> 16);
    p[2] = (uint8_t)(v >> 8);
    p[3] = (uint8_t)v;
}

/* FIPS-197 5.2 key expansion into big-endian words; nk = 4 or 8. Returns the number of rounds. */
int sc_aes_expand(const uint8_t *key, int nk, uint32_t *w);
/* The equivalent inverse cipher's schedule (FIPS-197 5.3.5): reversed, with InvMixColumns applied
 * to the middle round keys. Serialised, it is exactly what AES-NI's aesdec expects. */
void sc_aes_dec_schedule(const uint32_t *w, int nr, uint32_t *dk);
/* Round keys as the 16-byte blocks the AES-NI and VAES paths load. */
void sc_aes_serialise(const uint32_t *w, int nr, uint8_t out[15][16]);

/* One block through the T-table cipher (enc) or the equivalent inverse cipher (FIPS-197 5.3.5,
 * with a schedule from sc_aes_dec_schedule). The two differ only in their tables and in the
 * direction ShiftRows takes: column c reads rows from columns c, c+d, c+2, c+3d with d = 1
 * forwards and d = 3 (that is, -1) backwards. Inlined with a constant enc, every index folds. */
static inline __attribute__((always_inline)) void sc_aes_block(const uint32_t *rk, int nr,
                                                               const int enc, const uint8_t *in,
                                                               uint8_t *out)
{
    const uint32_t(*t)[256] = enc ? sc_aes_te : sc_aes_td;
    const uint8_t *sb = enc ? sc_aes_sbox : sc_aes_inv_sbox;
    const int d = enc ? 1 : 3;
    uint32_t s[4], u[4];
#pragma GCC unroll 4
    for (int c = 0; c < 4; c++)
        s[c] = sc_load_be32(in + 4 * c) ^ rk[c];
    for (int r = 1; r < nr; r++) {
#pragma GCC unroll 4
        for (int c = 0; c < 4; c++)
            u[c] = t[0][s[c] >> 24] ^ t[1][(s[(c + d) & 3] >> 16) & 255] ^
                   t[2][(s[(c + 2) & 3] >> 8) & 255] ^ t[3][s[(c + 3 * d) & 3] & 255] ^
                   rk[4 * r + c];
#pragma GCC unroll 4
        for (int c = 0; c < 4; c++)
            s[c] = u[c];
    }
#pragma GCC unroll 4
    for (int c = 0; c < 4; c++)
        sc_store_be32(out + 4 * c,
                      (((uint32_t)sb[s[c] >> 24] << 24) |
                       ((uint32_t)sb[(s[(c + d) & 3] >> 16) & 255] << 16) |
                       ((uint32_t)sb[(s[(c + 2) & 3] >> 8) & 255] << 8) |
                       sb[s[(c + 3 * d) & 3] & 255]) ^
                          rk[4 * nr + c]);
}

static inline void sc_aes_encrypt_block(const uint32_t *rk, int nr, const uint8_t *in, uint8_t *out)
{
    sc_aes_block(rk, nr, 1, in, out);
}

static inline void sc_aes_decrypt_block(const uint32_t *dk, int nr, const uint8_t *in, uint8_t *out)
{
    sc_aes_block(dk, nr, 0, in, out);
}

#define SC_ALWAYS_INLINE inline __attribute__((always_inline))

#ifdef SC_X86
/* ---------------------------------------------------------------------------------------------
 * The x86 tiers' vector vocabulary. A kernel that runs AES on many blocks is written once, as a
 * template included per tier (csrc/memcrypt_tier.h, csrc/ctr_tier.h), in terms of
 * sc_<tier>_<op> and SC_TARGET_<tier>:
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
        V red = pre##_clmulepi64_##aes(pre##_bsrli_##aes(sr, 8), (V)(zero + 0x87), 0x00);          \
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

/* A register from its 128-bit lanes t[0..lanes), in registers: a store and a wider reload
 * would miss store-to-load forwarding (AMD's Software Optimization Guide for family 19h,
 * 2.11.4), a stall that cost the XTS page loop 8 % on Zen 4. */
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

/* One xmm AES encryption of a single block with round keys k[0..nr] (16-byte blocks): the XTS
 * tweak T0 = AES_K2(data unit number), computed once per page on every tier. */
SC_TARGET_aesni static SC_ALWAYS_INLINE __m128i sc_aesni_encrypt1(const uint8_t (*k)[16], int nr,
                                                                 __m128i b)
{
    b = _mm_xor_si128(b, _mm_loadu_si128((const __m128i *)k[0]));
    for (int r = 1; r < nr; r++)
        b = _mm_aesenc_si128(b, _mm_loadu_si128((const __m128i *)k[r]));
    return _mm_aesenclast_si128(b, _mm_loadu_si128((const __m128i *)k[nr]));
}
#endif /* SC_X86 */

#endif
