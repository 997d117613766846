/*
 * CRC-32 (zlib's): a slicing-by-8 table path and a carry-less folding path per tier (PCLMULQDQ
 * on xmm, VPCLMULQDQ on ymm and zmm, PMULL on AArch64: csrc/crc32_tier.h), chosen at run time.
 * See crc32.h for the definition and the source of the folding method.
 */
#include "crc32.h"

#include <errno.h>
#include <string.h>

#include "tiers.h"

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

#ifdef SC_VEC
/* The folding constants: fold_k[i] carries a 128-bit lane forward by 128 << i bits. A lane's
 * low qword is multiplied by x^(D+32) mod P and its high qword by x^(D-32) mod P, each
 * bit-reflected and shifted left by one (the paper's k1..k4; D = 512 gives its 0x154442bd4 and
 * 0x1c6e41596). Computed at load time from P, so every tier's distance has its pair. */
static uint8_t fold_k[5][16] __attribute__((aligned(16)));

static int fold_index(int bits) { return __builtin_ctz((unsigned)bits / 128); }

/* x^n mod P, P = x^32 + 0x04C11DB7 (not reflected). */
static uint32_t xn_mod_p(int n)
{
    uint64_t r = 1;
    for (int i = 0; i < n; i++) {
        r <<= 1;
        if (r >> 32)
            r ^= 0x104C11DB7ULL;
    }
    return (uint32_t)r;
}

static uint64_t reflected_k(int n)
{
    uint32_t v = xn_mod_p(n), r = 0;
    for (int i = 0; i < 32; i++)
        r |= ((v >> i) & 1u) << (31 - i);
    return (uint64_t)r << 1;
}

__attribute__((constructor)) static void fold_consts(void)
{
    for (int i = 0; i < 5; i++) {
        uint64_t k[2] = {reflected_k((128 << i) + 32), reflected_k((128 << i) - 32)};
        memcpy(fold_k[i], k, 16);
    }
}

#ifdef SC_X86
/* One lane carried 128 bits forward, onto next. */
SC_TARGET_aesni static inline __m128i fold128(__m128i x, __m128i kk, __m128i next)
{
    __m128i lo = _mm_clmulepi64_si128(x, kk, 0x00), hi = _mm_clmulepi64_si128(x, kk, 0x11);
    return _mm_xor_si128(_mm_xor_si128(hi, lo), next);
}
#endif

#define ACC 4
#define TEMPLATE "crc32_tier.h"
#include "each_tier.h"
#undef TEMPLATE

#ifdef SC_X86
/* The CRC register after the folded lane `lane` and the len bytes at p (a multiple of 16): the
 * 16-byte blocks, then the paper's reduction of the last lane: 128 to 64 bits with x^64 mod P
 * (reflected, shifted: 0x163cd6124), and Barrett's to 32 with P and floor(x^64 / P) (reflected,
 * shifted: 0x1db710641, 0x1f7011641). */
SC_TARGET_aesni static uint32_t crc_reduce(const uint8_t lane[16], const uint8_t *p, size_t len)
{
    const __m128i k3k4 = _mm_loadu_si128((const __m128i *)fold_k[0]);
    const __m128i k5 = _mm_set_epi64x(0, 0x163cd6124);
    const __m128i poly = _mm_set_epi64x(0x1f7011641, 0x1db710641);
    const __m128i low32 = _mm_setr_epi32(~0, 0, ~0, 0);
    __m128i x1 = _mm_loadu_si128((const __m128i *)lane);
    for (; len >= 16; p += 16, len -= 16)
        x1 = fold128(x1, k3k4, _mm_loadu_si128((const __m128i *)p));
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
#else
/* The same from the folded lane on AArch64, whose fold has consumed every 16-byte block: the lane
 * is a 128-bit polynomial with the message's remainder, and the table CRC of its 16 bytes from a
 * zero register computes lane * x^32 mod P, what the reduction above does with multiplies. */
static uint32_t crc_reduce(const uint8_t lane[16], const uint8_t *p, size_t len)
{
    (void)p, (void)len;
    return crc_portable(0, lane, 16);
}
#endif

typedef void (*fold_fn)(uint32_t c, const uint8_t *p, size_t len, uint8_t lane[16]);

/* [tier]: the fold and its register's width in 16-byte lanes. */
static const struct {
    fold_fn fold;
    size_t lanes;
} folds[] = {
#ifdef SC_X86
    [SC_TIER_AESNI] = {fold_aesni, sc_aesni_lanes},
    [SC_TIER_AVX2] = {fold_avx2, sc_avx2_lanes},
    [SC_TIER_AVX512] = {fold_avx512, sc_avx512_lanes},
#else
    [SC_TIER_ARMCE] = {fold_armce, sc_armce_lanes},
#endif
};

/* The register after chunk bytes (chunk >= 64, a multiple of 16): the widest fold one step of
 * which fits takes the whole registers, crc_reduce the rest. */
static uint32_t crc_vector(int tier, uint32_t c, const uint8_t *p, size_t chunk)
{
#ifdef SC_X86
    while (tier > SC_TIER_AESNI && chunk < 16 * folds[tier].lanes * ACC)
        tier--;
#endif
    size_t wide = chunk - chunk % (16 * folds[tier].lanes);
    uint8_t lane[16];
    folds[tier].fold(c, p, wide, lane);
    return crc_reduce(lane, p + wide, chunk - wide);
}
#undef ACC
#endif

int sc_crc32_impl(void)
{
#ifdef SC_X86
    /* VPCLMULQDQ comes with SC_CPU_VAES (csrc/sevcore.h). */
    if (SC_HAS(SC_CPU_AVX512 | SC_CPU_VAES))
        return SC_TIER_AVX512;
    if (SC_HAS(SC_CPU_AVX2 | SC_CPU_VAES))
        return SC_TIER_AVX2;
    if (SC_HAS(SC_CPU_AESNI))
        return SC_TIER_AESNI;
#elif defined(SC_ARM)
    if (SC_HAS(SC_CPU_NEON | SC_CPU_ARMCE))
        return SC_TIER_ARMCE;
#endif
    return SC_TIER_PORTABLE;
}

int64_t sc_crc32(uint32_t crc, const uint8_t *buf, size_t len)
{
    if (len && !buf)
        return -EINVAL;
    uint32_t c = ~crc;
#ifdef SC_VEC
    int tier = sc_crc32_impl();
    if (len >= 64 && tier != SC_TIER_PORTABLE) {
        size_t chunk = len & ~(size_t)15;
        c = crc_vector(tier, c, buf, chunk);
        buf += chunk;
        len -= chunk;
    }
#endif
    return (int64_t)(uint32_t)~crc_portable(c, buf, len);
}
