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
#include "tiers.h"

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
