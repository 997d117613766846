/*
 * The SNP launch digest (snp_ld.h): SHA-384 per FIPS 180-4 section 6.4 (the SHA-512 rounds on
 * 1024-bit blocks, the SHA-384 initial value of section 5.3.4, the first 384 bits of the state).
 */
#include "snp_ld.h"

#include <errno.h>
#include <string.h>

static const uint64_t K[80] = {
    0x428a2f98d728ae22ull, 0x7137449123ef65cdull, 0xb5c0fbcfec4d3b2full, 0xe9b5dba58189dbbcull,
    0x3956c25bf348b538ull, 0x59f111f1b605d019ull, 0x923f82a4af194f9bull, 0xab1c5ed5da6d8118ull,
    0xd807aa98a3030242ull, 0x12835b0145706fbeull, 0x243185be4ee4b28cull, 0x550c7dc3d5ffb4e2ull,
    0x72be5d74f27b896full, 0x80deb1fe3b1696b1ull, 0x9bdc06a725c71235ull, 0xc19bf174cf692694ull,
    0xe49b69c19ef14ad2ull, 0xefbe4786384f25e3ull, 0x0fc19dc68b8cd5b5ull, 0x240ca1cc77ac9c65ull,
    0x2de92c6f592b0275ull, 0x4a7484aa6ea6e483ull, 0x5cb0a9dcbd41fbd4ull, 0x76f988da831153b5ull,
    0x983e5152ee66dfabull, 0xa831c66d2db43210ull, 0xb00327c898fb213full, 0xbf597fc7beef0ee4ull,
    0xc6e00bf33da88fc2ull, 0xd5a79147930aa725ull, 0x06ca6351e003826full, 0x142929670a0e6e70ull,
    0x27b70a8546d22ffcull, 0x2e1b21385c26c926ull, 0x4d2c6dfc5ac42aedull, 0x53380d139d95b3dfull,
    0x650a73548baf63deull, 0x766a0abb3c77b2a8ull, 0x81c2c92e47edaee6ull, 0x92722c851482353bull,
    0xa2bfe8a14cf10364ull, 0xa81a664bbc423001ull, 0xc24b8b70d0f89791ull, 0xc76c51a30654be30ull,
    0xd192e819d6ef5218ull, 0xd69906245565a910ull, 0xf40e35855771202aull, 0x106aa07032bbd1b8ull,
    0x19a4c116b8d2d0c8ull, 0x1e376c085141ab53ull, 0x2748774cdf8eeb99ull, 0x34b0bcb5e19b48a8ull,
    0x391c0cb3c5c95a63ull, 0x4ed8aa4ae3418acbull, 0x5b9cca4f7763e373ull, 0x682e6ff3d6b2b8a3ull,
    0x748f82ee5defb2fcull, 0x78a5636f43172f60ull, 0x84c87814a1f0ab72ull, 0x8cc702081a6439ecull,
    0x90befffa23631e28ull, 0xa4506cebde82bde9ull, 0xbef9a3f7b2c67915ull, 0xc67178f2e372532bull,
    0xca273eceea26619cull, 0xd186b8c721c0c207ull, 0xeada7dd6cde0eb1eull, 0xf57d4f7fee6ed178ull,
    0x06f067aa72176fbaull, 0x0a637dc5a2c898a6ull, 0x113f9804bef90daeull, 0x1b710b35131c471bull,
    0x28db77f523047d84ull, 0x32caab7b40c72493ull, 0x3c9ebe0a15c9bebcull, 0x431d67c49c100d4cull,
    0x4cc5d4becb3e42b6ull, 0x597f299cfc657e2aull, 0x5fcb6fab3ad6faecull, 0x6c44198c4a475817ull,
};

static const uint64_t IV384[8] = {
    0xcbbb9d5dc1059ed8ull, 0x629a292a367cd507ull, 0x9159015a3070dd17ull, 0x152fecd8f70e5939ull,
    0x67332667ffc00b31ull, 0x8eb44a8768581511ull, 0xdb0c2e0d64f98fa7ull, 0x47b5481dbefa4fa4ull,
};

static inline uint64_t load_be(const uint8_t *p)
{
    uint64_t v;
    memcpy(&v, p, 8);
#if defined(__GNUC__) && __BYTE_ORDER__ == __ORDER_LITTLE_ENDIAN__
    return __builtin_bswap64(v);
#else
    const uint8_t *b = (const uint8_t *)&v;
    uint64_t r = 0;
    for (int i = 0; i < 8; i++)
        r = (r << 8) | b[i];
    return r;
#endif
}

static void digest_out(const uint64_t h[8], uint8_t *out)
{
    for (int i = 0; i < 6; i++)
        for (int j = 0; j < 8; j++)
            out[8 * i + j] = (uint8_t)(h[i] >> (56 - 8 * j));
}

#define MB_CAT2(a, b) a##b
#define MB_CAT(a, b) MB_CAT2(a, b)
#define MB_V(name) MB_CAT(name, _vec)
#define MB_FN(name) MB_CAT(name, _compress)
#define MB_PAGES(name) MB_CAT(name, _pages)

/* One lane: the compression function of the single-message SHA-384 below. */
#define MB_NAME mb_one
#define MB_LANES 1
#define MB_TARGET
#include "snp_ld_mb.h"
#undef MB_NAME
#undef MB_LANES
#undef MB_TARGET

static void compress(uint64_t s[8], const uint8_t block[128])
{
    mb_one_vec v[8], w[16];
    for (int k = 0; k < 8; k++)
        v[k][0] = s[k];
    for (int t = 0; t < 16; t++)
        w[t][0] = load_be(block + 8 * t);
    mb_one_compress(v, w);
    for (int k = 0; k < 8; k++)
        s[k] = v[k][0];
}

#define MB_NAME mb_portable
#define MB_LANES 2
#define MB_TARGET
#include "snp_ld_mb.h"
#undef MB_NAME
#undef MB_LANES
#undef MB_TARGET

#if defined(__x86_64__)
#define MB_NAME mb_avx2
#define MB_LANES 4
#define MB_TARGET __attribute__((target("avx2")))
#include "snp_ld_mb.h"
#undef MB_NAME
#undef MB_LANES
#undef MB_TARGET

#define MB_NAME mb_avx512
#define MB_LANES 8
#define MB_TARGET __attribute__((target("avx512f,avx512vl,avx2")))
#include "snp_ld_mb.h"
#undef MB_NAME
#undef MB_LANES
#undef MB_TARGET
#endif

int sc_sha384_pages_impl(void) { return sc_cpu_vector_tier(); }

int sc_sha384_pages(const uint8_t *frames, uint64_t nframes, const uint64_t *pfns, size_t n,
                    uint8_t *out, struct sc_err *err)
{
    if ((n && (!frames || !pfns || !out)))
        return sc_refuse(err, EINVAL, SC_ERR_NULL, 0, 0, 0, 0);
    for (size_t i = 0; i < n; i++)
        if (pfns[i] >= nframes)
            return sc_refuse(err, EINVAL, SC_ERR_NPT_PFNS, i, pfns[i], nframes, 0);
    int tier = sc_sha384_pages_impl();
    size_t lanes = tier == SC_TIER_AVX512 ? 8 : tier == SC_TIER_AVX2 ? 4 : 2;
    const uint8_t *pages[8];
    size_t i = 0;
    for (; i + lanes <= n; i += lanes) {
        for (size_t l = 0; l < lanes; l++)
            pages[l] = frames + (pfns[i + l] << 12);
#if defined(__x86_64__)
        if (tier == SC_TIER_AVX512)
            mb_avx512_pages(pages, out + 48 * i);
        else if (tier == SC_TIER_AVX2)
            mb_avx2_pages(pages, out + 48 * i);
        else
#endif
            mb_portable_pages(pages, out + 48 * i);
    }
    for (; i < n; i++)
        sc_sha384(frames + (pfns[i] << 12), 4096, out + 48 * i);
    return 0;
}

void sc_sha384(const uint8_t *msg, size_t len, uint8_t *out)
{
    uint64_t h[8];
    memcpy(h, IV384, sizeof(h));
    size_t full = len / 128;
    for (size_t i = 0; i < full; i++)
        compress(h, msg + 128 * i);
    /* The last block(s): the rest, 0x80, zeros, and the length in bits as a 128-bit number
     * (a size_t's bit count fits the low 64 bits). */
    uint8_t tail[256] = {0};
    size_t rest = len - 128 * full, nb = rest + 17 > 128 ? 2 : 1;
    if (rest)
        memcpy(tail, msg + 128 * full, rest);
    tail[rest] = 0x80;
    uint64_t bits = (uint64_t)len << 3;
    for (int j = 0; j < 8; j++)
        tail[128 * nb - 1 - j] = (uint8_t)(bits >> (8 * j));
    for (size_t i = 0; i < nb; i++)
        compress(h, tail + 128 * i);
    digest_out(h, out);
}

int sc_snp_ld_extend(uint8_t *ld, const uint8_t *contents, const uint8_t *tails, size_t n,
                     struct sc_err *err)
{
    if (!ld || (n && !tails))
        return sc_refuse(err, EINVAL, SC_ERR_NULL, 0, 0, 0, 0);
    /* PAGE_INFO is 112 bytes: with its padding (0x80, the 128-bit length 896) two blocks, whose
     * padding is the same for every page. */
    uint8_t msg[256] = {0};
    msg[112] = 0x80;
    msg[254] = 0x03;                        /* 896 = 0x380 bits */
    msg[255] = 0x80;
    for (size_t i = 0; i < n; i++) {
        memcpy(msg, ld, 48);
        if (contents)
            memcpy(msg + 48, contents + 48 * i, 48);
        memcpy(msg + 96, tails + 16 * i, 16);
        uint64_t h[8];
        memcpy(h, IV384, sizeof(h));
        compress(h, msg);
        compress(h, msg + 128);
        digest_out(h, ld);
    }
    return 0;
}
