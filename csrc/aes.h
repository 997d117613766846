/*
 * AES (FIPS-197) shared by the C kernels that need it: the memory encryption engine
 * (memcrypt.c: XEX-128, XTS-256) and the transport-packet crypto (sevpkt.c: AES-128-CTR).
 * Internal: not part of the cffi cdef.
 *
 * Three implementations of the block rounds, chosen by the callers from the active CPU features
 * (csrc/cpu.c): a portable T-table AES, AES-NI on xmm registers, and VAES on zmm registers
 * (four blocks per instruction). The SIMD round helpers are always inlined so that, called with
 * constant round and way counts, every round unrolls and the round keys stay in registers.
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

/* Which block implementation the active CPU features select (values of SC_MEM_IMPL_*). */
enum { SC_AES_PORTABLE = 0, SC_AES_AESNI = 1, SC_AES_VAES = 2 };
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

static inline void sc_aes_encrypt_block(const uint32_t *rk, int nr, const uint8_t *in, uint8_t *out)
{
    const uint32_t(*te)[256] = sc_aes_te;
    const uint8_t *sb = sc_aes_sbox;
    uint32_t s0 = sc_load_be32(in) ^ rk[0], s1 = sc_load_be32(in + 4) ^ rk[1];
    uint32_t s2 = sc_load_be32(in + 8) ^ rk[2], s3 = sc_load_be32(in + 12) ^ rk[3];
    for (int r = 1; r < nr; r++) {
        const uint32_t *k = rk + 4 * r;
        uint32_t t0 = te[0][s0 >> 24] ^ te[1][(s1 >> 16) & 255] ^ te[2][(s2 >> 8) & 255] ^
                      te[3][s3 & 255] ^ k[0];
        uint32_t t1 = te[0][s1 >> 24] ^ te[1][(s2 >> 16) & 255] ^ te[2][(s3 >> 8) & 255] ^
                      te[3][s0 & 255] ^ k[1];
        uint32_t t2 = te[0][s2 >> 24] ^ te[1][(s3 >> 16) & 255] ^ te[2][(s0 >> 8) & 255] ^
                      te[3][s1 & 255] ^ k[2];
        uint32_t t3 = te[0][s3 >> 24] ^ te[1][(s0 >> 16) & 255] ^ te[2][(s1 >> 8) & 255] ^
                      te[3][s2 & 255] ^ k[3];
        s0 = t0, s1 = t1, s2 = t2, s3 = t3;
    }
    const uint32_t *k = rk + 4 * nr;
#define SC_AES_LAST(a, b, c, d)                                                                   \
    (((uint32_t)sb[(a) >> 24] << 24) | ((uint32_t)sb[((b) >> 16) & 255] << 16) |                  \
     ((uint32_t)sb[((c) >> 8) & 255] << 8) | sb[(d) & 255])
    sc_store_be32(out, SC_AES_LAST(s0, s1, s2, s3) ^ k[0]);
    sc_store_be32(out + 4, SC_AES_LAST(s1, s2, s3, s0) ^ k[1]);
    sc_store_be32(out + 8, SC_AES_LAST(s2, s3, s0, s1) ^ k[2]);
    sc_store_be32(out + 12, SC_AES_LAST(s3, s0, s1, s2) ^ k[3]);
#undef SC_AES_LAST
}

static inline void sc_aes_decrypt_block(const uint32_t *dk, int nr, const uint8_t *in, uint8_t *out)
{
    const uint32_t(*td)[256] = sc_aes_td;
    const uint8_t *ib = sc_aes_inv_sbox;
    uint32_t s0 = sc_load_be32(in) ^ dk[0], s1 = sc_load_be32(in + 4) ^ dk[1];
    uint32_t s2 = sc_load_be32(in + 8) ^ dk[2], s3 = sc_load_be32(in + 12) ^ dk[3];
    for (int r = 1; r < nr; r++) {
        const uint32_t *k = dk + 4 * r;
        uint32_t t0 = td[0][s0 >> 24] ^ td[1][(s3 >> 16) & 255] ^ td[2][(s2 >> 8) & 255] ^
                      td[3][s1 & 255] ^ k[0];
        uint32_t t1 = td[0][s1 >> 24] ^ td[1][(s0 >> 16) & 255] ^ td[2][(s3 >> 8) & 255] ^
                      td[3][s2 & 255] ^ k[1];
        uint32_t t2 = td[0][s2 >> 24] ^ td[1][(s1 >> 16) & 255] ^ td[2][(s0 >> 8) & 255] ^
                      td[3][s3 & 255] ^ k[2];
        uint32_t t3 = td[0][s3 >> 24] ^ td[1][(s2 >> 16) & 255] ^ td[2][(s1 >> 8) & 255] ^
                      td[3][s0 & 255] ^ k[3];
        s0 = t0, s1 = t1, s2 = t2, s3 = t3;
    }
    const uint32_t *k = dk + 4 * nr;
#define SC_AES_LAST(a, b, c, d)                                                                   \
    (((uint32_t)ib[(a) >> 24] << 24) | ((uint32_t)ib[((b) >> 16) & 255] << 16) |                  \
     ((uint32_t)ib[((c) >> 8) & 255] << 8) | ib[(d) & 255])
    sc_store_be32(out, SC_AES_LAST(s0, s3, s2, s1) ^ k[0]);
    sc_store_be32(out + 4, SC_AES_LAST(s1, s0, s3, s2) ^ k[1]);
    sc_store_be32(out + 8, SC_AES_LAST(s2, s1, s0, s3) ^ k[2]);
    sc_store_be32(out + 12, SC_AES_LAST(s3, s2, s1, s0) ^ k[3]);
#undef SC_AES_LAST
}

#ifdef SC_X86
/* ---------------------------------------------------------------------------------------------
 * AES-NI on xmm. Callers keep several independent blocks in flight to hide the four-cycle
 * aesenc latency.
 */

#define SC_NI_TARGET __attribute__((target("aes,sse4.1,pclmul")))
#define SC_ALWAYS_INLINE inline __attribute__((always_inline))

SC_NI_TARGET static inline __m128i sc_ni_encrypt1(const __m128i *k, int nr, __m128i b)
{
    b = _mm_xor_si128(b, k[0]);
    for (int r = 1; r < nr; r++)
        b = _mm_aesenc_si128(b, k[r]);
    return _mm_aesenclast_si128(b, k[nr]);
}

SC_NI_TARGET static inline void sc_ni_load_keys(const uint8_t (*keys)[16], int nr, __m128i *k)
{
    for (int r = 0; r <= nr; r++)
        k[r] = _mm_loadu_si128((const __m128i *)keys[r]);
}

/* Rounds 1..nr of `ways` blocks that the caller has already whitened with k[0]. */
SC_NI_TARGET static SC_ALWAYS_INLINE void sc_ni_rounds(__m128i *b, const __m128i *k, const int nr,
                                                      const int enc, const int ways)
{
    if (enc) {
#pragma GCC unroll 14
        for (int r = 1; r < nr; r++)
#pragma GCC unroll 8
            for (int i = 0; i < ways; i++)
                b[i] = _mm_aesenc_si128(b[i], k[r]);
#pragma GCC unroll 8
        for (int i = 0; i < ways; i++)
            b[i] = _mm_aesenclast_si128(b[i], k[nr]);
    } else {
#pragma GCC unroll 14
        for (int r = 1; r < nr; r++)
#pragma GCC unroll 8
            for (int i = 0; i < ways; i++)
                b[i] = _mm_aesdec_si128(b[i], k[r]);
#pragma GCC unroll 8
        for (int i = 0; i < ways; i++)
            b[i] = _mm_aesdeclast_si128(b[i], k[nr]);
    }
}

/* ---------------------------------------------------------------------------------------------
 * VAES on zmm: each instruction runs AES on four blocks.
 */

#define SC_VZ_TARGET                                                                               \
    __attribute__((target("avx512f,avx512bw,avx512vl,avx512dq,vaes,vpclmulqdq,aes,pclmul")))

SC_VZ_TARGET static inline __m512i sc_vz_xor3(__m512i a, __m512i b, __m512i c)
{
    return _mm512_ternarylogic_epi64(a, b, c, 0x96);
}

SC_VZ_TARGET static inline void sc_vz_load_keys(const uint8_t (*keys)[16], int nr, __m512i *k)
{
    for (int r = 0; r <= nr; r++)
        k[r] = _mm512_broadcast_i32x4(_mm_loadu_si128((const __m128i *)keys[r]));
}

/* Rounds 1..nr of `ways` registers (4 blocks each) already whitened with k[0]. */
SC_VZ_TARGET static SC_ALWAYS_INLINE void sc_vz_rounds(__m512i *b, const __m512i *k, const int nr,
                                                      const int enc, const int ways)
{
    if (enc) {
#pragma GCC unroll 14
        for (int r = 1; r < nr; r++)
#pragma GCC unroll 8
            for (int i = 0; i < ways; i++)
                b[i] = _mm512_aesenc_epi128(b[i], k[r]);
#pragma GCC unroll 8
        for (int i = 0; i < ways; i++)
            b[i] = _mm512_aesenclast_epi128(b[i], k[nr]);
    } else {
#pragma GCC unroll 14
        for (int r = 1; r < nr; r++)
#pragma GCC unroll 8
            for (int i = 0; i < ways; i++)
                b[i] = _mm512_aesdec_epi128(b[i], k[r]);
#pragma GCC unroll 8
        for (int i = 0; i < ways; i++)
            b[i] = _mm512_aesdeclast_epi128(b[i], k[nr]);
    }
}
#endif /* SC_X86 */

#endif
