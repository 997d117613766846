/*
 * CRC-32 (zlib's): a slicing-by-8 table path and a PCLMULQDQ folding path, chosen at run time.
 * See crc32.h for the definition and the source of the folding method.
 */
#include "crc32.h"

#include <errno.h>
#include <string.h>

#if defined(__x86_64__)
#include <immintrin.h>
#define HAVE_CLMUL 1
#endif

#define POLY 0xEDB88320u /* 0x04C11DB7 bit-reflected */

static uint32_t table[8][256];

__attribute__((constructor)) static void crc_tables(void)
{
    for (uint32_t n = 0; n < 256; n++) {
        uint32_t c = n;
        for (int k = 0; k < 8; k++)
            c = c & 1 ? POLY ^ (c >> 1) : c >> 1;
        table[0][n] = c;
    }
    for (uint32_t n = 0; n < 256; n++)
        for (int k = 1; k < 8; k++)
            table[k][n] = table[0][table[k - 1][n] & 0xff] ^ (table[k - 1][n] >> 8);
}

/* c is the running register (already inverted), as everywhere below. */
static uint32_t crc_portable(uint32_t c, const uint8_t *p, size_t len)
{
#if defined(__BYTE_ORDER__) && __BYTE_ORDER__ == __ORDER_LITTLE_ENDIAN__
    while (len >= 8) {
        uint64_t w;
        memcpy(&w, p, 8);
        w ^= c;
        c = table[7][w & 0xff] ^ table[6][(w >> 8) & 0xff] ^ table[5][(w >> 16) & 0xff] ^
            table[4][(w >> 24) & 0xff] ^ table[3][(w >> 32) & 0xff] ^
            table[2][(w >> 40) & 0xff] ^ table[1][(w >> 48) & 0xff] ^ table[0][w >> 56];
        p += 8;
        len -= 8;
    }
#endif
    while (len--)
        c = table[0][(c ^ *p++) & 0xff] ^ (c >> 8);
    return c;
}

#ifdef HAVE_CLMUL
#define CLMUL_TARGET __attribute__((target("pclmul,sse4.1")))

/* Carry a 128-bit lane forward over the distance kk is made for (512 bits: k1k2, 128: k3k4):
 * each 64-bit half is multiplied by its constant, and the products are added to the 16 bytes
 * found there. */
CLMUL_TARGET static inline __m128i fold(__m128i x, __m128i kk, __m128i next)
{
    __m128i lo = _mm_clmulepi64_si128(x, kk, 0x00), hi = _mm_clmulepi64_si128(x, kk, 0x11);
    return _mm_xor_si128(_mm_xor_si128(hi, lo), next);
}

static inline __m128i load(const uint8_t *p) { return _mm_loadu_si128((const __m128i *)p); }

/* Fold len bytes (len >= 64, a multiple of 16) into the register c. The constants are those of
 * the paper's appendix for the reflected polynomial: x^(4*128+32) and x^(4*128-32) mod P for
 * folding four lanes, x^(128+32) and x^(128-32) for one, x^64 for 64 to 32 bits, and Barrett's
 * P and floor(x^64 / P), each bit-reflected and shifted left by one. */
CLMUL_TARGET static uint32_t crc_clmul(uint32_t c, const uint8_t *p, size_t len)
{
    const __m128i k1k2 = _mm_set_epi64x(0x1c6e41596, 0x154442bd4);
    const __m128i k3k4 = _mm_set_epi64x(0x0ccaa009e, 0x1751997d0);
    const __m128i k5 = _mm_set_epi64x(0, 0x163cd6124);
    const __m128i poly = _mm_set_epi64x(0x1f7011641, 0x1db710641);
    const __m128i low32 = _mm_setr_epi32(~0, 0, ~0, 0);

    __m128i x1 = _mm_xor_si128(load(p), _mm_cvtsi32_si128((int)c));
    __m128i x2 = load(p + 0x10), x3 = load(p + 0x20), x4 = load(p + 0x30);
    for (p += 64, len -= 64; len >= 64; p += 64, len -= 64) {
        x1 = fold(x1, k1k2, load(p));
        x2 = fold(x2, k1k2, load(p + 0x10));
        x3 = fold(x3, k1k2, load(p + 0x20));
        x4 = fold(x4, k1k2, load(p + 0x30));
    }
    /* Four lanes into one, then the remaining 16-byte blocks. */
    x1 = fold(fold(fold(x1, k3k4, x2), k3k4, x3), k3k4, x4);
    for (; len >= 16; p += 16, len -= 16)
        x1 = fold(x1, k3k4, load(p));
    /* 128 -> 64 bits. */
    __m128i t = _mm_clmulepi64_si128(x1, k3k4, 0x10);
    x1 = _mm_xor_si128(_mm_srli_si128(x1, 8), t);
    t = _mm_srli_si128(x1, 4);
    x1 = _mm_clmulepi64_si128(_mm_and_si128(x1, low32), k5, 0x00);
    x1 = _mm_xor_si128(x1, t);
    /* Barrett reduction to 32 bits. */
    t = _mm_clmulepi64_si128(_mm_and_si128(x1, low32), poly, 0x10);
    t = _mm_clmulepi64_si128(_mm_and_si128(t, low32), poly, 0x00);
    x1 = _mm_xor_si128(x1, t);
    return (uint32_t)_mm_extract_epi32(x1, 1);
}
#endif

int sc_crc32_impl(void)
{
#ifdef HAVE_CLMUL
    if (SC_HAS(SC_CPU_AESNI))
        return SC_TIER_AESNI;
#endif
    return SC_TIER_PORTABLE;
}

int64_t sc_crc32(uint32_t crc, const uint8_t *buf, size_t len)
{
    if (len && !buf)
        return -EINVAL;
    uint32_t c = ~crc;
#ifdef HAVE_CLMUL
    if (len >= 64 && sc_crc32_impl() == SC_TIER_AESNI) {
        size_t chunk = len & ~(size_t)15;
        c = crc_clmul(c, buf, chunk);
        buf += chunk;
        len -= chunk;
    }
#endif
    return (int64_t)(uint32_t)~crc_portable(c, buf, len);
}
