/*
 * SEV transport-packet crypto (see sevpkt.h): SHA-256 (FIPS 180-4), HMAC-SHA256 (RFC 2104) and
 * AES-128-CTR (SP 800-38A, the whole 16-byte block as a big-endian counter, as OpenSSL's
 * EVP_aes_128_ctr), each with a portable path and CPU paths chosen per call (csrc/cpu.c):
 * SHA-NI for SHA-256, and for AES one path per tier (csrc/tiers.h), written once in
 * csrc/ctr_tier.h. All paths are checked against each other and against
 * sevcore/_reference/sevpkt.py by the tests.
 */
#include <errno.h>
#include <string.h>

#include "aes.h"
#include "sevpkt.h"

#define HDR SC_SEVPKT_HDR_SIZE
#define AAD SC_SEVPKT_AAD_SIZE
#define MACLEN SC_SEVPKT_MAC_SIZE

static void wipe(void *p, size_t n)
{
    /* Key schedules are key material: do not leave them on the stack. */
    volatile uint8_t *v = p;
    while (n--)
        *v++ = 0;
}

/* ---------------------------------------------------------------------------------------------
 * SHA-256 compression, FIPS 180-4 section 6.2.
 */

static const uint32_t H0[8] = {0x6a09e667, 0xbb67ae85, 0x3c6ef372, 0xa54ff53a,
                               0x510e527f, 0x9b05688c, 0x1f83d9ab, 0x5be0cd19};

static const uint32_t K256[64] __attribute__((aligned(16))) = {
    0x428a2f98, 0x71374491, 0xb5c0fbcf, 0xe9b5dba5, 0x3956c25b, 0x59f111f1, 0x923f82a4,
    0xab1c5ed5, 0xd807aa98, 0x12835b01, 0x243185be, 0x550c7dc3, 0x72be5d74, 0x80deb1fe,
    0x9bdc06a7, 0xc19bf174, 0xe49b69c1, 0xefbe4786, 0x0fc19dc6, 0x240ca1cc, 0x2de92c6f,
    0x4a7484aa, 0x5cb0a9dc, 0x76f988da, 0x983e5152, 0xa831c66d, 0xb00327c8, 0xbf597fc7,
    0xc6e00bf3, 0xd5a79147, 0x06ca6351, 0x14292967, 0x27b70a85, 0x2e1b2138, 0x4d2c6dfc,
    0x53380d13, 0x650a7354, 0x766a0abb, 0x81c2c92e, 0x92722c85, 0xa2bfe8a1, 0xa81a664b,
    0xc24b8b70, 0xc76c51a3, 0xd192e819, 0xd6990624, 0xf40e3585, 0x106aa070, 0x19a4c116,
    0x1e376c08, 0x2748774c, 0x34b0bcb5, 0x391c0cb3, 0x4ed8aa4a, 0x5b9cca4f, 0x682e6ff3,
    0x748f82ee, 0x78a5636f, 0x84c87814, 0x8cc70208, 0x90befffa, 0xa4506ceb, 0xbef9a3f7,
    0xc67178f2};

static inline uint32_t ror32(uint32_t x, int n) { return (x >> n) | (x << (32 - n)); }

static void sha_blocks_portable(uint32_t h[8], const uint8_t *p, size_t nblocks)
{
    for (; nblocks; nblocks--, p += 64) {
        uint32_t w[64];
        for (int i = 0; i < 16; i++)
            w[i] = sc_load_be32(p + 4 * i);
        for (int i = 16; i < 64; i++) {
            uint32_t s0 = ror32(w[i - 15], 7) ^ ror32(w[i - 15], 18) ^ (w[i - 15] >> 3);
            uint32_t s1 = ror32(w[i - 2], 17) ^ ror32(w[i - 2], 19) ^ (w[i - 2] >> 10);
            w[i] = w[i - 16] + s0 + w[i - 7] + s1;
        }
        uint32_t a = h[0], b = h[1], c = h[2], d = h[3], e = h[4], f = h[5], g = h[6], hh = h[7];
        for (int i = 0; i < 64; i++) {
            uint32_t t1 = hh + (ror32(e, 6) ^ ror32(e, 11) ^ ror32(e, 25)) + ((e & f) ^ (~e & g)) +
                          K256[i] + w[i];
            uint32_t t2 = (ror32(a, 2) ^ ror32(a, 13) ^ ror32(a, 22)) + ((a & b) ^ (a & c) ^ (b & c));
            hh = g, g = f, f = e, e = d + t1, d = c, c = b, b = a, a = t1 + t2;
        }
        h[0] += a, h[1] += b, h[2] += c, h[3] += d, h[4] += e, h[5] += f, h[6] += g, h[7] += hh;
    }
}

#ifdef SC_X86
/* SHA-NI keeps the state as two registers, ABEF and CDGH; sha256rnds2 does two rounds. One
 * message's rounds form a single dependency chain, so throughput comes from hashing two
 * messages at once: `lanes` (1 or 2) independent chains interleaved instruction by instruction.
 * The SHA instructions have no VEX form, so a third lane would not fit the 16 xmm registers. */

#define SHA_TARGET __attribute__((target("sha,sse4.1,ssse3")))

SHA_TARGET static SC_ALWAYS_INLINE void sha_ni_blocks(uint32_t (*h)[8], const uint8_t *const *p,
                                                      const int lanes, size_t nblocks)
{
    const __m128i bswap = _mm_set_epi64x(0x0c0d0e0f08090a0bULL, 0x0405060700010203ULL);
    __m128i abef[2], cdgh[2], save0[2], save1[2], w[2][4];
#pragma GCC unroll 2
    for (int l = 0; l < lanes; l++) {
        __m128i dcba = _mm_shuffle_epi32(_mm_loadu_si128((const __m128i *)h[l]), 0xB1);
        __m128i efgh = _mm_shuffle_epi32(_mm_loadu_si128((const __m128i *)(h[l] + 4)), 0x1B);
        abef[l] = _mm_alignr_epi8(dcba, efgh, 8);
        cdgh[l] = _mm_blend_epi16(efgh, dcba, 0xF0);
    }
    for (size_t blk = 0; blk < nblocks; blk++) {
#pragma GCC unroll 2
        for (int l = 0; l < lanes; l++)
            save0[l] = abef[l], save1[l] = cdgh[l];
        /* Quad-round q uses W[4q..4q+3] (w[q & 3]); the schedule for quad q+1 is finished
         * (sha256msg2) during quad q, and started (sha256msg1) three quads ahead. */
#pragma GCC unroll 16
        for (int q = 0; q < 16; q++) {
            __m128i m[2], kq = _mm_load_si128((const __m128i *)&K256[4 * q]);
#pragma GCC unroll 2
            for (int l = 0; l < lanes; l++) {
                if (q < 4)
                    w[l][q] = _mm_shuffle_epi8(
                        _mm_loadu_si128((const __m128i *)(p[l] + 64 * blk + 16 * q)), bswap);
                m[l] = _mm_add_epi32(w[l][q & 3], kq);
                cdgh[l] = _mm_sha256rnds2_epu32(cdgh[l], abef[l], m[l]);
            }
#pragma GCC unroll 2
            for (int l = 0; l < lanes; l++) {
                if (q >= 3 && q <= 14) {
                    __m128i t = _mm_alignr_epi8(w[l][q & 3], w[l][(q - 1) & 3], 4);
                    w[l][(q + 1) & 3] = _mm_sha256msg2_epu32(
                        _mm_add_epi32(w[l][(q + 1) & 3], t), w[l][q & 3]);
                }
                abef[l] = _mm_sha256rnds2_epu32(abef[l], cdgh[l], _mm_shuffle_epi32(m[l], 0x0E));
                if (q >= 1 && q <= 12)
                    w[l][(q - 1) & 3] = _mm_sha256msg1_epu32(w[l][(q - 1) & 3], w[l][q & 3]);
            }
        }
#pragma GCC unroll 2
        for (int l = 0; l < lanes; l++) {
            abef[l] = _mm_add_epi32(abef[l], save0[l]);
            cdgh[l] = _mm_add_epi32(cdgh[l], save1[l]);
        }
    }
#pragma GCC unroll 2
    for (int l = 0; l < lanes; l++) {
        __m128i feba = _mm_shuffle_epi32(abef[l], 0x1B), dchg = _mm_shuffle_epi32(cdgh[l], 0xB1);
        _mm_storeu_si128((__m128i *)h[l], _mm_blend_epi16(feba, dchg, 0xF0));
        _mm_storeu_si128((__m128i *)(h[l] + 4), _mm_alignr_epi8(dchg, feba, 8));
    }
}

SHA_TARGET static void sha_ni_x1(uint32_t (*h)[8], const uint8_t *const *p, size_t nblocks)
{
    sha_ni_blocks(h, p, 1, nblocks);
}

SHA_TARGET static void sha_ni_x2(uint32_t (*h)[8], const uint8_t *const *p, size_t nblocks)
{
    sha_ni_blocks(h, p, 2, nblocks);
}
#endif

int sc_sha256_impl(void)
{
#ifdef SC_X86
    if (SC_HAS(SC_CPU_SHANI))
        return SC_SHA256_IMPL_SHANI;
#endif
    return SC_SHA256_IMPL_PORTABLE;
}

/* ---------------------------------------------------------------------------------------------
 * SHA-256 streams in lock step: one or two messages of equal length, fed the same number of
 * bytes at every step, so that they share one buffer fill level and the two-lane compression.
 */

struct sha_lanes {
    uint32_t h[2][8];
    uint8_t buf[2][64];
    uint64_t bytes; /* fed so far, per lane */
    unsigned fill;  /* bytes waiting in buf */
    int lanes;
    int impl;
};

static void lanes_compress(struct sha_lanes *s, const uint8_t *p0, const uint8_t *p1,
                           size_t nblocks)
{
    const uint8_t *p[2] = {p0, p1};
#ifdef SC_X86
    if (s->impl == SC_SHA256_IMPL_SHANI) {
        (s->lanes == 2 ? sha_ni_x2 : sha_ni_x1)(s->h, p, nblocks);
        return;
    }
#endif
    for (int l = 0; l < s->lanes; l++)
        sha_blocks_portable(s->h[l], p[l], nblocks);
}

/* Start every lane from state h after `bytes` bytes (0 and H0 for a plain hash). */
static void lanes_init(struct sha_lanes *s, int lanes, int impl, const uint32_t h[8],
                       uint64_t bytes)
{
    s->lanes = lanes;
    s->impl = impl;
    s->bytes = bytes;
    s->fill = 0;
    for (int l = 0; l < lanes; l++)
        memcpy(s->h[l], h, 32);
}

/* Feed len bytes to each lane (p1 is ignored with one lane, and may be NULL). */
static void lanes_update(struct sha_lanes *s, const uint8_t *p0, const uint8_t *p1, size_t len)
{
    const uint8_t *p[2] = {p0, p1};
    size_t off = 0;
    s->bytes += len;
    if (s->fill) {
        off = 64 - s->fill < len ? 64 - s->fill : len;
        for (int l = 0; l < s->lanes; l++)
            memcpy(s->buf[l] + s->fill, p[l], off);
        s->fill += (unsigned)off;
        if (s->fill < 64)
            return;
        lanes_compress(s, s->buf[0], s->buf[1], 1);
        s->fill = 0;
    }
    size_t whole = (len - off) / 64;
    if (whole) {
        /* Whole blocks straight from the caller's memory, whatever their alignment. */
        lanes_compress(s, p[0] + off, s->lanes == 2 ? p[1] + off : NULL, whole);
        off += 64 * whole;
    }
    s->fill = (unsigned)(len - off);
    for (int l = 0; l < s->lanes && s->fill; l++)
        memcpy(s->buf[l], p[l] + off, s->fill);
}

/* FIPS 180-4 5.1.1 padding: 0x80, zeros, the message length in bits as a big-endian u64. */
static void lanes_final(struct sha_lanes *s, uint8_t (*out)[32])
{
    uint64_t bits = s->bytes * 8;
    for (int l = 0; l < s->lanes; l++) {
        s->buf[l][s->fill] = 0x80;
        memset(s->buf[l] + s->fill + 1, 0, 63 - s->fill);
    }
    if (s->fill >= 56) {
        lanes_compress(s, s->buf[0], s->buf[1], 1);
        for (int l = 0; l < s->lanes; l++)
            memset(s->buf[l], 0, 56);
    }
    for (int l = 0; l < s->lanes; l++) {
        sc_store_be32(s->buf[l] + 56, (uint32_t)(bits >> 32));
        sc_store_be32(s->buf[l] + 60, (uint32_t)bits);
    }
    lanes_compress(s, s->buf[0], s->buf[1], 1);
    for (int l = 0; l < s->lanes; l++)
        for (int i = 0; i < 8; i++)
            sc_store_be32(out[l] + 4 * i, s->h[l][i]);
}

/* ---------------------------------------------------------------------------------------------
 * HMAC-SHA256 (RFC 2104) with the key's two pad blocks compressed once.
 */

struct hmac_key {
    uint32_t inner[8], outer[8]; /* states after (K ^ ipad) and (K ^ opad) */
    int impl;
};

static void hmac_key_init(struct hmac_key *k, const uint8_t *key, size_t len)
{
    uint8_t block[64] = {0}, pad[64];
    struct sha_lanes s;
    k->impl = sc_sha256_impl();
    if (len > 64) {
        uint8_t d[1][32];
        lanes_init(&s, 1, k->impl, H0, 0);
        lanes_update(&s, key, NULL, len);
        lanes_final(&s, d);
        memcpy(block, d[0], 32);
        wipe(d, sizeof(d));
    } else if (len) {
        memcpy(block, key, len);
    }
    for (int pass = 0; pass < 2; pass++) {
        for (int i = 0; i < 64; i++)
            pad[i] = block[i] ^ (pass ? 0x5c : 0x36);
        lanes_init(&s, 1, k->impl, H0, 0);
        lanes_compress(&s, pad, NULL, 1);
        memcpy(pass ? k->outer : k->inner, s.h[0], 32);
    }
    wipe(block, sizeof(block));
    wipe(pad, sizeof(pad));
    wipe(&s, sizeof(s));
}

/* Start the inner hash of one or two messages. */
static void hmac_begin(const struct hmac_key *k, struct sha_lanes *s, int lanes)
{
    lanes_init(s, lanes, k->impl, k->inner, 64);
}

static void hmac_end(const struct hmac_key *k, struct sha_lanes *s, uint8_t (*mac)[32])
{
    uint8_t inner[2][32];
    int lanes = s->lanes;
    lanes_final(s, inner);
    lanes_init(s, lanes, k->impl, k->outer, 64);
    lanes_update(s, inner[0], inner[1], 32);
    lanes_final(s, mac);
}

/* ---------------------------------------------------------------------------------------------
 * AES-128-CTR. The counter is held as two host-order halves of the 128-bit big-endian block;
 * every path advances it with a full 128-bit carry, so it wraps from 2^128 - 1 to 0 as OpenSSL's
 * does.
 */

struct ctr_key {
    uint8_t ek[15][16]; /* round keys as blocks, for the vector tiers */
    uint32_t rk[60];    /* the same as big-endian words, for the portable path */
    int impl;
};

static void ctr_key_init(struct ctr_key *k, const uint8_t key[16])
{
    int nr = sc_aes_expand(key, 4, k->rk);
    sc_aes_serialise(k->rk, nr, k->ek);
    k->impl = sc_aes_impl();
}

static inline uint64_t load_be64(const uint8_t *p)
{
    return ((uint64_t)sc_load_be32(p) << 32) | sc_load_be32(p + 4);
}

static inline void ctr_advance(uint64_t *hi, uint64_t *lo, uint64_t blocks)
{
    *lo += blocks;
    *hi += *lo < blocks;
}

static inline void ctr_block(uint64_t hi, uint64_t lo, uint8_t out[16])
{
    sc_store_be32(out, (uint32_t)(hi >> 32));
    sc_store_be32(out + 4, (uint32_t)hi);
    sc_store_be32(out + 8, (uint32_t)(lo >> 32));
    sc_store_be32(out + 12, (uint32_t)lo);
}

static void ctr_portable(const struct ctr_key *k, uint64_t hi, uint64_t lo, const uint8_t *src,
                         uint8_t *dst, size_t len)
{
    uint8_t ks[16];
    for (size_t off = 0; off < len; off += 16) {
        ctr_block(hi, lo, ks);
        sc_aes_encrypt_block(k->rk, 10, ks, ks);
        size_t n = len - off < 16 ? len - off : 16;
        for (size_t i = 0; i < n; i++)
            dst[off + i] = src[off + i] ^ ks[i];
        ctr_advance(&hi, &lo, 1);
    }
}

#ifdef SC_VEC
/* The vector paths, one template (csrc/ctr_tier.h) per tier, eight registers in flight as in
 * csrc/memcrypt.c. */
#define WAYS 8
#define TEMPLATE "ctr_tier.h"
#include "each_tier.h"
#undef TEMPLATE
#undef WAYS
#endif

static void ctr_crypt(const struct ctr_key *k, const uint8_t iv[16], const uint8_t *src,
                      uint8_t *dst, size_t len)
{
    uint64_t hi = load_be64(iv), lo = load_be64(iv + 8);
#ifdef SC_X86
    switch (k->impl) {
    case SC_TIER_AVX512: ctr_avx512(k, hi, lo, src, dst, len); return;
    case SC_TIER_AVX2: ctr_avx2(k, hi, lo, src, dst, len); return;
    case SC_TIER_AESNI: ctr_aesni(k, hi, lo, src, dst, len); return;
    }
#elif defined(SC_ARM)
    if (k->impl == SC_TIER_ARMCE) {
        ctr_armce(k, hi, lo, src, dst, len);
        return;
    }
#endif
    ctr_portable(k, hi, lo, src, dst, len);
}

int sc_aes128_ctr_impl(void) { return sc_aes_impl(); }

/* ---------------------------------------------------------------------------------------------
 * Packets.
 */

static inline void put_le32(uint8_t *p, uint32_t v)
{
    p[0] = (uint8_t)v;
    p[1] = (uint8_t)(v >> 8);
    p[2] = (uint8_t)(v >> 16);
    p[3] = (uint8_t)(v >> 24);
}

static inline uint32_t load_le32(const uint8_t *p)
{
    return p[0] | ((uint32_t)p[1] << 8) | ((uint32_t)p[2] << 16) | ((uint32_t)p[3] << 24);
}

/* sev_packet_header_t.flags bit 0; the only flag the firmware knows, and refuses. */
#define PKT_FLAG_COMPRESSED 1u

/* [FW] send_receive_update_aad_t: context byte, flags, IV, uncompressed and transport sizes (the
 * firmware's size_t is 4 bytes on the PSP). */
static void make_aad(uint8_t aad[AAD], uint8_t ctx, uint32_t flags, const uint8_t iv[16],
                     size_t len)
{
    aad[0] = ctx;
    put_le32(aad + 1, flags);
    memcpy(aad + 5, iv, 16);
    put_le32(aad + 21, (uint32_t)len);
    put_le32(aad + 25, (uint32_t)len);
}

/* The MACs of `lanes` packets (1 or 2) of len bytes each. */
static void packet_macs(const struct hmac_key *k, int lanes, uint8_t (*aad)[AAD],
                        const uint8_t *ct0, const uint8_t *ct1, size_t len,
                        const uint8_t *measure, uint8_t (*mac)[32])
{
    struct sha_lanes s;
    hmac_begin(k, &s, lanes);
    lanes_update(&s, aad[0], aad[1], AAD);
    lanes_update(&s, ct0, ct1, len);
    if (measure)
        lanes_update(&s, measure, measure, SC_SEVPKT_MEASURE_SIZE);
    hmac_end(k, &s, mac);
}

static int differ(const uint8_t *a, const uint8_t *b, size_t n)
{
    /* Constant time: no early exit on the first differing byte. */
    uint8_t d = 0;
    for (size_t i = 0; i < n; i++)
        d |= a[i] ^ b[i];
    return d != 0;
}

/* Do n rows of alen bytes every astride bytes from a and n rows of blen bytes every bstride
 * from b share a byte? Exact for equal strides (a migration stream's record interleaves
 * headers and ciphertext at one stride: each lies in the other's gap), else by the extents. */
static int rows_overlap(const void *a, size_t astride, size_t alen, const void *b,
                        size_t bstride, size_t blen, size_t n)
{
    if (!n || !sc_overlaps(a, (n - 1) * astride + alen, b, (n - 1) * bstride + blen))
        return 0;
    if (n == 1)
        return 1;
    if (astride != bstride)
        return 1;
    uintptr_t pa = (uintptr_t)a, pb = (uintptr_t)b;
    size_t d = pb >= pa ? (pb - pa) % astride : (astride - (pa - pb) % astride) % astride;
    return !(alen <= d && d + blen <= astride);
}

int sc_sevpkt_check_len(size_t len, struct sc_err *err)
{
    /* The firmware's own limits on guest_len/trans_len: a non-zero multiple of 16 (the AES block),
     * at most its scratch buffer ([FW] SEV_SCRATCH_BUF_LEN). */
    if (!len || len % 16 || len > SC_SEVPKT_MAX_LEN)
        return sc_refuse(err, EINVAL, SC_ERR_PKT_LEN, 0, len, SC_SEVPKT_MAX_LEN, 0);
    return 0;
}

/* The checks both directions share. Rows of headers and ciphertext may be strided (a stride
 * at least the row's length, and no overflow); the plaintext is contiguous. */
static int check_batch(const uint8_t *tek, const uint8_t *tik, size_t len, size_t n,
                       const uint8_t *hdrs, size_t hdr_stride, const uint8_t *ct,
                       size_t ct_stride, const uint8_t *pt, struct sc_err *err)
{
    if (!tek || !tik)
        return sc_refuse(err, EINVAL, SC_ERR_NULL, 0, 0, 0, 0);
    int rc = sc_sevpkt_check_len(len, err);
    if (rc || !n)
        return rc;
    if (n > SIZE_MAX / SC_SEVPKT_MAX_LEN)
        return sc_refuse(err, EINVAL, SC_ERR_PKT_COUNT, 0, n, SIZE_MAX / SC_SEVPKT_MAX_LEN, 0);
    if (!hdrs || !ct || !pt)
        return sc_refuse(err, EINVAL, SC_ERR_NULL, 0, 0, 0, 0);
    if (hdr_stride < HDR || n - 1 > (SIZE_MAX - HDR) / hdr_stride)
        return sc_refuse(err, EINVAL, SC_ERR_PKT_STRIDE, 0, hdr_stride, HDR, n);
    if (ct_stride < len || n - 1 > (SIZE_MAX - len) / ct_stride)
        return sc_refuse(err, EINVAL, SC_ERR_PKT_STRIDE, 0, ct_stride, len, n);
    /* In place is fine (CTR reads each block before writing it); any other overlap is not. */
    if (pt == ct ? ct_stride != len : rows_overlap(pt, len, len, ct, ct_stride, len, n))
        return sc_refuse(err, EINVAL, SC_ERR_PKT_CT_OVERLAP, 0, 0, 0, 0);
    return 0;
}

int sc_sevpkt_seal_rows(const uint8_t tek[16], const uint8_t tik[16], uint8_t ctx,
                        const uint8_t *measure, const uint8_t *pt, size_t len, size_t n,
                        const uint8_t *ivs, uint8_t *hdrs, size_t hdr_stride, uint8_t *ct,
                        size_t ct_stride, struct sc_err *err)
{
    int rc = check_batch(tek, tik, len, n, hdrs, hdr_stride, ct, ct_stride, pt, err);
    if (rc || !n)
        return rc;
    if (!ivs)
        return sc_refuse(err, EINVAL, SC_ERR_NULL, 0, 0, 0, 0);
    if (rows_overlap(hdrs, hdr_stride, HDR, pt, len, len, n) ||
        rows_overlap(hdrs, hdr_stride, HDR, ct, ct_stride, len, n) ||
        rows_overlap(hdrs, hdr_stride, HDR, ivs, 16, 16, n))
        return sc_refuse(err, EINVAL, SC_ERR_PKT_HDRS_OVERLAP, 0, 0, 0, 0);
    if (rows_overlap(ct, ct_stride, len, ivs, 16, 16, n))
        return sc_refuse(err, EINVAL, SC_ERR_PKT_IVS_OVERLAP, 0, 0, 0, 0);
    struct ctr_key ck;
    struct hmac_key hk;
    uint8_t meas[SC_SEVPKT_MEASURE_SIZE], aad[2][AAD], mac[2][32];
    ctr_key_init(&ck, tek);
    hmac_key_init(&hk, tik, 16);
    if (measure)
        memcpy(meas, measure, sizeof(meas));
    /* Two packets at a time: encrypt both (each page stays in L1), then MAC both in one
     * interleaved pass over their ciphertext. */
    for (size_t i = 0; i < n; i += 2) {
        int lanes = n - i >= 2 ? 2 : 1;
        for (int l = 0; l < lanes; l++) {
            const uint8_t *iv = ivs + 16 * (i + l);
            ctr_crypt(&ck, iv, pt + (i + l) * len, ct + (i + l) * ct_stride, len);
            make_aad(aad[l], ctx, 0, iv, len);
        }
        packet_macs(&hk, lanes, aad, ct + i * ct_stride, ct + (i + lanes - 1) * ct_stride, len,
                    measure ? meas : NULL, mac);
        for (int l = 0; l < lanes; l++) {
            uint8_t *h = hdrs + hdr_stride * (i + l);
            put_le32(h, 0);
            memcpy(h + 4, aad[l] + 5, 16);
            memcpy(h + 20, mac[l], MACLEN);
        }
    }
    wipe(&ck, sizeof(ck));
    wipe(&hk, sizeof(hk));
    return 0;
}

int sc_sevpkt_seal(const uint8_t tek[16], const uint8_t tik[16], uint8_t ctx,
                   const uint8_t *measure, const uint8_t *pt, size_t len, size_t n,
                   const uint8_t *ivs, uint8_t *hdrs, uint8_t *ct, struct sc_err *err)
{
    return sc_sevpkt_seal_rows(tek, tik, ctx, measure, pt, len, n, ivs, hdrs, HDR, ct, len, err);
}

int sc_sevpkt_open_rows(const uint8_t tek[16], const uint8_t tik[16], uint8_t ctx,
                        const uint8_t *measure, const uint8_t *hdrs, size_t hdr_stride,
                        const uint8_t *ct, size_t ct_stride, size_t len, size_t n, uint8_t *pt,
                        struct sc_err *err)
{
    int rc = check_batch(tek, tik, len, n, hdrs, hdr_stride, ct, ct_stride, pt, err);
    if (rc || !n)
        return rc;
    if (rows_overlap(pt, len, len, hdrs, hdr_stride, HDR, n))
        return sc_refuse(err, EINVAL, SC_ERR_PKT_PT_OVERLAP, 0, 0, 0, 0);
    struct hmac_key hk;
    uint8_t meas[SC_SEVPKT_MEASURE_SIZE], aad[2][AAD], mac[2][32];
    hmac_key_init(&hk, tik, 16);
    if (measure)
        memcpy(meas, measure, sizeof(meas));
    /* Pass 1: every packet authenticated (MAC, then flags) before a byte of pt is written. */
    for (size_t i = 0; i < n && !rc; i += 2) {
        int lanes = n - i >= 2 ? 2 : 1;
        for (int l = 0; l < lanes; l++) {
            const uint8_t *h = hdrs + hdr_stride * (i + l);
            make_aad(aad[l], ctx, load_le32(h), h + 4, len);
        }
        packet_macs(&hk, lanes, aad, ct + i * ct_stride, ct + (i + lanes - 1) * ct_stride, len,
                    measure ? meas : NULL, mac);
        for (int l = 0; l < lanes && !rc; l++) {
            const uint8_t *h = hdrs + hdr_stride * (i + l);
            if (differ(mac[l], h + 20, MACLEN))
                rc = sc_refuse(err, EBADMSG, SC_ERR_PKT_MAC, i + l, 0, 0, 0);
            else if (load_le32(h) & PKT_FLAG_COMPRESSED)
                rc = sc_refuse(err, EOPNOTSUPP, SC_ERR_PKT_COMPRESSED, i + l, load_le32(h), 0, 0);
        }
    }
    wipe(&hk, sizeof(hk));
    if (rc)
        return rc;
    /* Pass 2: decrypt. */
    struct ctr_key ck;
    ctr_key_init(&ck, tek);
    for (size_t i = 0; i < n; i++)
        ctr_crypt(&ck, hdrs + hdr_stride * i + 4, ct + i * ct_stride, pt + i * len, len);
    wipe(&ck, sizeof(ck));
    return 0;
}

int sc_sevpkt_open(const uint8_t tek[16], const uint8_t tik[16], uint8_t ctx,
                   const uint8_t *measure, const uint8_t *hdrs, const uint8_t *ct, size_t len,
                   size_t n, uint8_t *pt, struct sc_err *err)
{
    return sc_sevpkt_open_rows(tek, tik, ctx, measure, hdrs, HDR, ct, len, len, n, pt, err);
}

/* ---------------------------------------------------------------------------------------------
 * One-shot primitives.
 */

int sc_sha256(const uint8_t *msg, size_t len, uint8_t digest[32])
{
    if (!digest || (len && !msg))
        return -EINVAL;
    struct sha_lanes s;
    lanes_init(&s, 1, sc_sha256_impl(), H0, 0);
    lanes_update(&s, msg, NULL, len);
    lanes_final(&s, (uint8_t(*)[32])digest);
    return 0;
}

int sc_hmac_sha256(const uint8_t *key, size_t key_len, const uint8_t *msg, size_t len,
                   uint8_t mac[32])
{
    if (!mac || (key_len && !key) || (len && !msg))
        return -EINVAL;
    struct hmac_key k;
    struct sha_lanes s;
    hmac_key_init(&k, key, key_len);
    hmac_begin(&k, &s, 1);
    lanes_update(&s, msg, NULL, len);
    hmac_end(&k, &s, (uint8_t(*)[32])mac);
    wipe(&k, sizeof(k));
    return 0;
}

int sc_aes128_ctr(const uint8_t key[16], const uint8_t iv[16], const uint8_t *src, size_t len,
                  uint8_t *dst, struct sc_err *err)
{
    if (!key || !iv || (len && (!src || !dst)))
        return sc_refuse(err, EINVAL, SC_ERR_NULL, 0, 0, 0, 0);
    /* CTR reads each block before writing it, so in place works; a shifted overlap would read
     * blocks already written. */
    if (src != dst && sc_overlaps(src, len, dst, len))
        return sc_refuse(err, EINVAL, SC_ERR_CTR_OVERLAP, 0, 0, 0, 0);
    struct ctr_key k;
    ctr_key_init(&k, key);
    ctr_crypt(&k, iv, src, dst, len);
    wipe(&k, sizeof(k));
    return 0;
}
