/*
 * The vector tiers of the C core (csrc/sevcore.h SC_TIER_*) as one vector vocabulary per tier,
 * so that a kernel is written once, as a template included per tier (csrc/each_tier.h:
 * csrc/memcrypt_tier.h, csrc/ctr_tier.h, csrc/crc32_tier.h), and compiled per tier. Internal: not
 * part of the cffi cdef.
 *
 * Every tier provides, as sc_<tier>_<op> (and SC_TARGET_<tier>, SC_LANES_<tier>):
 *
 *   v, u64, u32         the register type and its 64- and 32-bit GCC vector-extension views
 *                       (XOR, shifts and adds are written as operators on them)
 *   lanes, regs         16-byte blocks per register; vector registers the ISA has
 *   load, store, bcast  whole registers; one 16-byte block into every lane
 *   keys, key           round keys, resident in registers or loaded where used (keys())
 *   key_shift           the index of the key an `enc` step takes, relative to its round
 *   enc, dec            one middle AES round, each lane; enclast, declast: the last one
 *   shuffle8            a byte shuffle within each lane (PSHUFB / TBL)
 *   clmul_lo, clmul_hi  carry-less products of the lanes' low (high) qwords
 *   from_lanes, from_u32  a register from 16-byte blocks / a u32 in the low lane
 *
 * x86 and Arm group AES's steps differently (x86 AESENC: SubBytes, ShiftRows, MixColumns, then
 * the round key; Arm AESE: the round key first, then SubBytes and ShiftRows, MixColumns apart in
 * AESMC), so a template runs round r as enc(b, key(r - key_shift)) for r = 1 .. nr - 1, after a
 * whitening with key 0 where key_shift is 0, and ends with enclast(b, key(nr - 1), key(nr) ^ x),
 * which folds a final XOR x into the last AddRoundKey (FIPS-197 5.1.4). Both compute FIPS-197's
 * cipher; the decryption runs the equivalent inverse cipher (5.3.5) the same way.
 */
#ifndef SEVCORE_TIERS_H
#define SEVCORE_TIERS_H

#include <stdint.h>

#include "sevcore.h"

#define SC_ALWAYS_INLINE inline __attribute__((always_inline))

#if defined(__x86_64__)
#include <immintrin.h>
#define SC_X86 1
#define SC_VEC 1 /* this architecture has vector tiers */

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

#define SC_LANES_aesni 1
#define SC_LANES_avx2 2
#define SC_LANES_avx512 4

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
    enum { sc_##t##_lanes = sizeof(V) / 16, sc_##t##_regs = nregs, sc_##t##_key_shift = 0 };       \
    SC_TARGET_##t static SC_ALWAYS_INLINE V sc_##t##_load(const void *p)                           \
    {                                                                                              \
        return pre##_loadu_##si((const V *)p);                                                     \
    }                                                                                              \
    SC_TARGET_##t static SC_ALWAYS_INLINE void sc_##t##_store(void *p, V v)                        \
    {                                                                                              \
        pre##_storeu_##si((V *)p, v);                                                              \
    }                                                                                              \
    SC_VEC_ROUND(t, V, enc, pre##_aesenc_##aes)                                                  \
    SC_TARGET_##t static SC_ALWAYS_INLINE V sc_##t##_enclast(V b, V kpen, V k)                     \
    {                                                                                              \
        (void)kpen;                                                                                \
        return pre##_aesenclast_##aes(b, k);                                                       \
    }                                                                                              \
    SC_VEC_ROUND(t, V, dec, pre##_aesdec_##aes)                                                  \
    SC_TARGET_##t static SC_ALWAYS_INLINE V sc_##t##_declast(V b, V kpen, V k)                     \
    {                                                                                              \
        (void)kpen;                                                                                \
        return pre##_aesdeclast_##aes(b, k);                                                       \
    }                                                                                              \
    SC_TARGET_##t static SC_ALWAYS_INLINE V sc_##t##_shuffle8(V a, V c)                            \
    {                                                                                              \
        return pre##_shuffle_epi8(a, c);                                                           \
    }                                                                                              \
    /* Carry-less products of each lane's low qwords (imm 0x00) and of its high ones (0x11). */     \
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

/* c in the low 32 bits of lane 0, zero elsewhere. */
SC_TARGET_aesni static SC_ALWAYS_INLINE __m128i sc_aesni_from_u32(uint32_t c)
{
    return _mm_cvtsi32_si128((int)c);
}
SC_TARGET_avx2 static SC_ALWAYS_INLINE __m256i sc_avx2_from_u32(uint32_t c)
{
    return _mm256_zextsi128_si256(_mm_cvtsi32_si128((int)c));
}
SC_TARGET_avx512 static SC_ALWAYS_INLINE __m512i sc_avx512_from_u32(uint32_t c)
{
    return _mm512_zextsi128_si512(_mm_cvtsi32_si128((int)c));
}

SC_VEC_OPS(aesni, __m128i, _mm, si128, si128, 16)
SC_VEC_OPS(avx2, __m256i, _mm256, epi128, si256, 16)
SC_VEC_OPS(avx512, __m512i, _mm512, epi128, si512, 32)

/* One block through the cipher with round keys k[0..nr] on xmm: the XTS tweak T0 =
 * AES_K2(data unit number), computed once per page on every x86 tier. */
SC_TARGET_aesni static SC_ALWAYS_INLINE void sc_encrypt_block(const uint8_t (*k)[16], int nr,
                                                              const uint8_t in[16],
                                                              uint8_t out[16])
{
    __m128i b = _mm_xor_si128(_mm_loadu_si128((const __m128i *)in),
                              _mm_loadu_si128((const __m128i *)k[0]));
    for (int r = 1; r < nr; r++)
        b = _mm_aesenc_si128(b, _mm_loadu_si128((const __m128i *)k[r]));
    _mm_storeu_si128((__m128i *)out,
                     _mm_aesenclast_si128(b, _mm_loadu_si128((const __m128i *)k[nr])));
}

#elif defined(__aarch64__)
#include <arm_neon.h>
#define SC_ARM 1
#define SC_VEC 1

/* ---------------------------------------------------------------------------------------------
 * AArch64's tier with the ARMv8 Cryptographic Extension (armce): one block per 128-bit register,
 * AESE/AESMC and AESD/AESIMC (Arm ARM, A64 "AESE": AddRoundKey, SubBytes, ShiftRows), PMULL
 * for carry-less products. Advanced SIMD is part of every AArch64 CPU, so the `neon` tier of the
 * bitmap kernels needs no vocabulary of its own here. Arm cores fuse an AESE with the AESMC that
 * consumes it, so enc keeps them adjacent.
 */

#define SC_LANES_armce 1
#define SC_TARGET_armce __attribute__((target("+crypto")))

typedef uint8x16_t sc_armce_v;
typedef unsigned long long sc_armce_u64 __attribute__((vector_size(16)));
typedef unsigned sc_armce_u32 __attribute__((vector_size(16)));
enum { sc_armce_lanes = 1, sc_armce_regs = 32, sc_armce_key_shift = 1 };

SC_TARGET_armce static SC_ALWAYS_INLINE uint8x16_t sc_armce_load(const void *p)
{
    return vld1q_u8((const uint8_t *)p);
}
SC_TARGET_armce static SC_ALWAYS_INLINE void sc_armce_store(void *p, uint8x16_t v)
{
    vst1q_u8((uint8_t *)p, v);
}
SC_TARGET_armce static SC_ALWAYS_INLINE uint8x16_t sc_armce_bcast(const void *p)
{
    return vld1q_u8((const uint8_t *)p);
}
SC_TARGET_armce static SC_ALWAYS_INLINE void sc_armce_keys(const uint8_t (*keys)[16], int nr,
                                                           uint8x16_t *kr)
{
    for (int r = 0; r <= nr; r++)
        kr[r] = vld1q_u8(keys[r]);
}
SC_TARGET_armce static SC_ALWAYS_INLINE uint8x16_t sc_armce_key(const uint8_t (*keys)[16],
                                                                const uint8x16_t *kr, int r)
{
    (void)keys;
    return kr[r];
}
SC_TARGET_armce static SC_ALWAYS_INLINE uint8x16_t sc_armce_enc(uint8x16_t b, uint8x16_t k)
{
    return vaesmcq_u8(vaeseq_u8(b, k));
}
SC_TARGET_armce static SC_ALWAYS_INLINE uint8x16_t sc_armce_dec(uint8x16_t b, uint8x16_t k)
{
    return vaesimcq_u8(vaesdq_u8(b, k));
}
SC_TARGET_armce static SC_ALWAYS_INLINE uint8x16_t sc_armce_enclast(uint8x16_t b, uint8x16_t kpen,
                                                                    uint8x16_t k)
{
    return veorq_u8(vaeseq_u8(b, kpen), k);
}
SC_TARGET_armce static SC_ALWAYS_INLINE uint8x16_t sc_armce_declast(uint8x16_t b, uint8x16_t kpen,
                                                                    uint8x16_t k)
{
    return veorq_u8(vaesdq_u8(b, kpen), k);
}
SC_TARGET_armce static SC_ALWAYS_INLINE uint8x16_t sc_armce_shuffle8(uint8x16_t a, uint8x16_t c)
{
    return vqtbl1q_u8(a, c);
}
SC_TARGET_armce static SC_ALWAYS_INLINE uint8x16_t sc_armce_clmul_lo(uint8x16_t a, uint8x16_t b)
{
    return vreinterpretq_u8_p128(vmull_p64(vgetq_lane_p64(vreinterpretq_p64_u8(a), 0),
                                           vgetq_lane_p64(vreinterpretq_p64_u8(b), 0)));
}
SC_TARGET_armce static SC_ALWAYS_INLINE uint8x16_t sc_armce_clmul_hi(uint8x16_t a, uint8x16_t b)
{
    return vreinterpretq_u8_p128(vmull_high_p64(vreinterpretq_p64_u8(a),
                                                vreinterpretq_p64_u8(b)));
}
SC_TARGET_armce static SC_ALWAYS_INLINE uint8x16_t sc_armce_from_lanes(const uint8x16_t *t)
{
    return t[0];
}
SC_TARGET_armce static SC_ALWAYS_INLINE uint8x16_t sc_armce_from_u32(uint32_t c)
{
    return vreinterpretq_u8_u32(vsetq_lane_u32(c, vdupq_n_u32(0), 0));
}

/* One block through the cipher with round keys k[0..nr] (the XTS tweak T0). */
SC_TARGET_armce static SC_ALWAYS_INLINE void sc_encrypt_block(const uint8_t (*k)[16], int nr,
                                                              const uint8_t in[16],
                                                              uint8_t out[16])
{
    uint8x16_t b = vld1q_u8(in);
    for (int r = 0; r < nr - 1; r++)
        b = vaesmcq_u8(vaeseq_u8(b, vld1q_u8(k[r])));
    vst1q_u8(out, veorq_u8(vaeseq_u8(b, vld1q_u8(k[nr - 1])), vld1q_u8(k[nr])));
}
#endif

#endif
