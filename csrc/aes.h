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

/* Rounds 1..nr of `ways` blocks that the caller has already whitened with k[0]; enc and ways
 * are constants where this is inlined, so the choice of instruction folds away. */
SC_NI_TARGET static SC_ALWAYS_INLINE void sc_ni_rounds(__m128i *b, const __m128i *k, const int nr,
                                                      const int enc, const int ways)
{
#pragma GCC unroll 14
    for (int r = 1; r < nr; r++)
#pragma GCC unroll 8
        for (int i = 0; i < ways; i++)
            b[i] = enc ? _mm_aesenc_si128(b[i], k[r]) : _mm_aesdec_si128(b[i], k[r]);
#pragma GCC unroll 8
    for (int i = 0; i < ways; i++)
        b[i] = enc ? _mm_aesenclast_si128(b[i], k[nr]) : _mm_aesdeclast_si128(b[i], k[nr]);
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
#pragma GCC unroll 14
    for (int r = 1; r < nr; r++)
#pragma GCC unroll 8
        for (int i = 0; i < ways; i++)
            b[i] = enc ? _mm512_aesenc_epi128(b[i], k[r]) : _mm512_aesdec_epi128(b[i], k[r]);
#pragma GCC unroll 8
    for (int i = 0; i < ways; i++)
        b[i] = enc ? _mm512_aesenclast_epi128(b[i], k[nr])
                   : _mm512_aesdeclast_epi128(b[i], k[nr]);
}
#endif /* SC_X86 */

#endif
