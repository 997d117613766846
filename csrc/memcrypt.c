/*
 * SEV memory encryption engine: AES-128-XEX with an SPA tweak table, and XTS-AES-256 with one
 * 4 KiB data unit per page. Three implementations of each, chosen per call from the active CPU
 * features (csrc/cpu.c) on top of the shared AES of csrc/aes.h: portable T-table AES, AES-NI on
 * xmm registers, and VAES on zmm registers (four blocks per instruction). All three are checked
 * against each other and against sevcore/_reference/memcrypt.py by the tests.
 */
#include <errno.h>
#include <stdlib.h>
#include <string.h>

#include "aes.h"
#include "memcrypt.h"

#define PAGE 4096
#define BLOCKS_PER_PAGE (PAGE / 16)

struct sc_memcrypt {
    /* SIMD-loaded members first, 64-byte aligned (the struct comes from aligned_alloc). */
    uint8_t inpage16[BLOCKS_PER_PAGE][16]; /* XEX: T(16 * j) for block j of a page, x4 expanded */
    uint8_t ek[15][16];                    /* AES-NI encryption round keys (data key) */
    uint8_t dk[15][16];                    /* AES-NI decryption round keys (aesimc applied) */
    uint8_t tk[15][16];                    /* XTS tweak key, encryption round keys */
    uint32_t rk_enc[60], rk_dec[60], rk_tweak[60]; /* the same schedules as big-endian words */
    uint32_t page_lut[7][256];             /* XEX: contribution of SPA bits 12..63, per byte */
    uint32_t tweak_table[SC_MEM_TWEAK_ENTRIES];
    int mode;
    int rounds;
};

/* ---------------------------------------------------------------------------------------------
 * Tweaks.
 *
 * XEX: T is linear in the address, so T(page + 16 j) = T(page) ^ T(16 j). The in-page part is a
 * 256-entry table built once per engine; the page part is seven byte-indexed lookups.
 * XTS: T_0 = AES_K2(page number), T_{j+1} = T_j * x in GF(2^128) with the IEEE 1619
 * little-endian convention (reduction polynomial x^128 + x^7 + x^2 + x + 1, i.e. 0x87).
 */

static inline uint32_t xex_page_tweak(const sc_memcrypt *e, uint64_t spa)
{
    uint64_t hi = spa >> 12;
    uint32_t t = 0;
    for (int k = 0; k < 7; k++, hi >>= 8)
        t ^= e->page_lut[k][hi & 255];
    return t;
}

static void xex_tables(sc_memcrypt *e)
{
    for (int j = 0; j < BLOCKS_PER_PAGE; j++) {
        uint32_t t = 0;
        for (int b = 0; b < 8; b++)
            if (j & (1 << b))
                t ^= e->tweak_table[4 + b];
        for (int r = 0; r < 4; r++)
            memcpy(&e->inpage16[j][4 * r], &t, 4); /* x86 is little-endian: le32(t) x 4 */
    }
    for (int k = 0; k < 7; k++) {
        for (int v = 0; v < 256; v++) {
            uint32_t t = 0;
            for (int b = 0; b < 8; b++) {
                int bit = 12 + 8 * k + b;
                if ((v & (1 << b)) && bit < SC_MEM_TWEAK_ENTRIES)
                    t ^= e->tweak_table[bit];
            }
            e->page_lut[k][v] = t;
        }
    }
}

static inline void gf128_mul_x(uint64_t *lo, uint64_t *hi)
{
    uint64_t carry = *hi >> 63;
    *hi = (*hi << 1) | (*lo >> 63);
    *lo = (*lo << 1) ^ (carry * 0x87);
}

static inline void load_le128(const uint8_t *p, uint64_t *lo, uint64_t *hi)
{
    memcpy(lo, p, 8);
    memcpy(hi, p + 8, 8);
}

/* ---------------------------------------------------------------------------------------------
 * Portable paths.
 */

static void xex_page_portable(const sc_memcrypt *e, int enc, const uint8_t *src, uint8_t *dst,
                              uint64_t spa)
{
    uint32_t tp = xex_page_tweak(e, spa);
    uint8_t tw[16], blk[16];
    for (int r = 0; r < 4; r++)
        memcpy(tw + 4 * r, &tp, 4);
    for (int j = 0; j < BLOCKS_PER_PAGE; j++) {
        for (int b = 0; b < 16; b++)
            blk[b] = src[16 * j + b] ^ e->inpage16[j][b] ^ tw[b];
        if (enc)
            sc_aes_encrypt_block(e->rk_enc, e->rounds, blk, blk);
        else
            sc_aes_decrypt_block(e->rk_dec, e->rounds, blk, blk);
        for (int b = 0; b < 16; b++)
            dst[16 * j + b] = blk[b] ^ e->inpage16[j][b] ^ tw[b];
    }
}

static void xts_page_portable(const sc_memcrypt *e, int enc, const uint8_t *src, uint8_t *dst,
                              uint64_t spa)
{
    uint8_t t[16] = {0}, blk[16];
    uint64_t pfn = spa >> 12, lo, hi;
    memcpy(t, &pfn, 8);
    sc_aes_encrypt_block(e->rk_tweak, e->rounds, t, t);
    load_le128(t, &lo, &hi);
    for (int j = 0; j < BLOCKS_PER_PAGE; j++) {
        memcpy(t, &lo, 8);
        memcpy(t + 8, &hi, 8);
        for (int b = 0; b < 16; b++)
            blk[b] = src[16 * j + b] ^ t[b];
        if (enc)
            sc_aes_encrypt_block(e->rk_enc, e->rounds, blk, blk);
        else
            sc_aes_decrypt_block(e->rk_dec, e->rounds, blk, blk);
        for (int b = 0; b < 16; b++)
            dst[16 * j + b] = blk[b] ^ t[b];
        gf128_mul_x(&lo, &hi);
    }
}

#ifdef SC_X86
/* ---------------------------------------------------------------------------------------------
 * AES-NI on xmm: eight independent blocks in flight hide the four-cycle aesenc latency.
 */

#define NI_TARGET SC_NI_TARGET
#define NI_WAYS 8

/* Multiply a 128-bit tweak by x^k (1 <= k <= 56), IEEE 1619 little-endian convention: each
 * qword shifts, the low qword's top bits carry into the high qword, and the high qword's top k
 * bits fold back through a carry-less multiply by 0x87 (the product fits the low qword). */
NI_TARGET static inline __m128i ni_mul_xk(__m128i t, const int k)
{
    __m128i sr = _mm_srli_epi64(t, 64 - k);
    __m128i carry = _mm_slli_si128(sr, 8);
    __m128i top = _mm_srli_si128(sr, 8);
    __m128i red = _mm_clmulepi64_si128(top, _mm_set_epi64x(0, 0x87), 0x00);
    return _mm_xor_si128(_mm_xor_si128(_mm_slli_epi64(t, k), carry), red);
}

NI_TARGET static inline __m128i ni_mul_x(__m128i t) { return ni_mul_xk(t, 1); }

/* Always inlined with constant nr and enc so that the rounds unroll (see vz_blocks). */
NI_TARGET static SC_ALWAYS_INLINE void
ni_blocks(const __m128i *k, const int nr, const int enc, const uint8_t *src, uint8_t *dst,
          const __m128i *t)
{
    __m128i b[NI_WAYS];
#pragma GCC unroll 8
    for (int i = 0; i < NI_WAYS; i++)
        b[i] = _mm_xor_si128(_mm_xor_si128(_mm_loadu_si128((const __m128i *)src + i), t[i]),
                             k[0]);
    sc_ni_rounds(b, k, nr, enc, NI_WAYS);
#pragma GCC unroll 8
    for (int i = 0; i < NI_WAYS; i++)
        _mm_storeu_si128((__m128i *)dst + i, _mm_xor_si128(b[i], t[i]));
}

NI_TARGET static SC_ALWAYS_INLINE void
xex_page_aesni_body(const sc_memcrypt *e, const int enc, const uint8_t *src, uint8_t *dst,
                    uint64_t spa)
{
    enum { NR = 10 }; /* XEX is AES-128 */
    __m128i k[NR + 1], t[NI_WAYS];
    const uint8_t(*keys)[16] = enc ? e->ek : e->dk;
    sc_ni_load_keys(keys, NR, k);
    __m128i tp = _mm_set1_epi32((int)xex_page_tweak(e, spa));
    for (int j = 0; j < BLOCKS_PER_PAGE; j += NI_WAYS) {
#pragma GCC unroll 8
        for (int i = 0; i < NI_WAYS; i++)
            t[i] = _mm_xor_si128(_mm_load_si128((const __m128i *)e->inpage16[j + i]), tp);
        ni_blocks(k, NR, enc, src + 16 * j, dst + 16 * j, t);
    }
}

NI_TARGET static void xex_page_aesni(const sc_memcrypt *e, int enc, const uint8_t *src,
                                     uint8_t *dst, uint64_t spa)
{
    if (enc)
        xex_page_aesni_body(e, 1, src, dst, spa);
    else
        xex_page_aesni_body(e, 0, src, dst, spa);
}

NI_TARGET static SC_ALWAYS_INLINE void
xts_page_aesni_body(const sc_memcrypt *e, const int enc, const uint8_t *src, uint8_t *dst,
                    uint64_t spa)
{
    enum { NR = 14 }; /* XTS here is always AES-256 */
    __m128i k[NR + 1], tk[NR + 1], t[NI_WAYS];
    const uint8_t(*keys)[16] = enc ? e->ek : e->dk;
    sc_ni_load_keys(keys, NR, k);
    sc_ni_load_keys(e->tk, NR, tk);
    __m128i cur = sc_ni_encrypt1(tk, NR, _mm_set_epi64x(0, (long long)(spa >> 12)));
    for (int j = 0; j < BLOCKS_PER_PAGE; j += NI_WAYS) {
        /* Independent multiplies from one base keep the tweak chain off the critical path. */
        t[0] = cur;
#pragma GCC unroll 8
        for (int i = 1; i < NI_WAYS; i++)
            t[i] = ni_mul_xk(cur, i);
        cur = ni_mul_xk(cur, NI_WAYS);
        ni_blocks(k, NR, enc, src + 16 * j, dst + 16 * j, t);
    }
}

NI_TARGET static void xts_page_aesni(const sc_memcrypt *e, int enc, const uint8_t *src,
                                     uint8_t *dst, uint64_t spa)
{
    if (enc)
        xts_page_aesni_body(e, 1, src, dst, spa);
    else
        xts_page_aesni_body(e, 0, src, dst, spa);
}

/* ---------------------------------------------------------------------------------------------
 * VAES on zmm: each instruction runs AES on four blocks; VZ_WAYS registers in flight.
 */

#define VZ_TARGET SC_VZ_TARGET
#define VZ_WAYS 8

/* Multiply each 128-bit lane by x^k (1 <= k <= 56): the k bits shifted out of the top fold back
 * through a carry-less multiply by 0x87, whose product (< 2^(k+8)) stays in the low qword. Every
 * tweak of a group is computed from one base, so the chain between groups is one step long. */
VZ_TARGET static inline __m512i vz_mul_xk(__m512i v, const int k)
{
    __m512i sr = _mm512_srli_epi64(v, 64 - k);
    __m512i carry = _mm512_bslli_epi128(sr, 8);
    __m512i top = _mm512_bsrli_epi128(sr, 8);
    __m512i red = _mm512_clmulepi64_epi128(top, _mm512_set1_epi64(0x87), 0x00);
    return sc_vz_xor3(_mm512_slli_epi64(v, k), carry, red);
}

/* Always inlined with constant nr and enc, so that every round unrolls and the round keys stay
 * in registers (11 or 15 keys + 8 data + 8 tweaks fit the 32 zmm registers). */
VZ_TARGET static SC_ALWAYS_INLINE void
vz_blocks(const __m512i *k, const int nr, const int enc, const uint8_t *src, uint8_t *dst,
          const __m512i *t)
{
    __m512i b[VZ_WAYS];
#pragma GCC unroll 8
    for (int i = 0; i < VZ_WAYS; i++)
        b[i] = sc_vz_xor3(_mm512_loadu_si512((const void *)(src + 64 * i)), t[i], k[0]);
    sc_vz_rounds(b, k, nr, enc, VZ_WAYS);
#pragma GCC unroll 8
    for (int i = 0; i < VZ_WAYS; i++)
        _mm512_storeu_si512((void *)(dst + 64 * i), _mm512_xor_si512(b[i], t[i]));
}

VZ_TARGET static SC_ALWAYS_INLINE void
xex_run_vaes_body(const sc_memcrypt *e, const int enc, const uint8_t *src, uint8_t *dst,
                  const uint64_t *spas, uint64_t spa0, size_t n)
{
    enum { NR = 10 }; /* XEX is AES-128 */
    __m512i k[NR + 1], t[VZ_WAYS];
    sc_vz_load_keys(enc ? e->ek : e->dk, NR, k);
    for (size_t p = 0; p < n; p++) {
        uint64_t spa = spas ? spas[p] : spa0 + (uint64_t)p * PAGE;
        __m512i tp = _mm512_set1_epi32((int)xex_page_tweak(e, spa));
        const uint8_t *s = src + p * PAGE;
        uint8_t *d = dst + p * PAGE;
        for (int j = 0; j < BLOCKS_PER_PAGE; j += 4 * VZ_WAYS) {
#pragma GCC unroll 8
            for (int i = 0; i < VZ_WAYS; i++)
                t[i] = _mm512_xor_si512(_mm512_load_si512((const void *)e->inpage16[j + 4 * i]),
                                        tp);
            vz_blocks(k, NR, enc, s + 16 * j, d + 16 * j, t);
        }
    }
}

VZ_TARGET static void xex_run_vaes(const sc_memcrypt *e, int enc, const uint8_t *src,
                                   uint8_t *dst, const uint64_t *spas, uint64_t spa0, size_t n)
{
    if (enc)
        xex_run_vaes_body(e, 1, src, dst, spas, spa0, n);
    else
        xex_run_vaes_body(e, 0, src, dst, spas, spa0, n);
}

VZ_TARGET static SC_ALWAYS_INLINE void
xts_run_vaes_body(const sc_memcrypt *e, const int enc, const uint8_t *src, uint8_t *dst,
                  const uint64_t *spas, uint64_t spa0, size_t n)
{
    enum { NR = 14 }; /* XTS here is always AES-256 */
    __m512i k[NR + 1], t[VZ_WAYS];
    __m128i tk[NR + 1];
    sc_vz_load_keys(enc ? e->ek : e->dk, NR, k);
    sc_ni_load_keys(e->tk, NR, tk);
    /* T0 of the next page is computed one page ahead: its 14 dependent rounds then overlap the
     * current page's work instead of stalling the start of the next. */
    __m128i t0_next =
        sc_ni_encrypt1(tk, NR, _mm_set_epi64x(0, (long long)((spas ? spas[0] : spa0) >> 12)));
    for (size_t p = 0; p < n; p++) {
        __m128i t0 = t0_next;
        if (p + 1 < n) {
            uint64_t next = spas ? spas[p + 1] : spa0 + (uint64_t)(p + 1) * PAGE;
            t0_next = sc_ni_encrypt1(tk, NR, _mm_set_epi64x(0, (long long)(next >> 12)));
        }
        __m128i t1 = ni_mul_x(t0), t2 = ni_mul_x(t1), t3 = ni_mul_x(t2);
        __m512i cur = _mm512_inserti32x4(_mm512_castsi128_si512(t0), t1, 1);
        cur = _mm512_inserti32x4(cur, t2, 2);
        cur = _mm512_inserti32x4(cur, t3, 3);
        const uint8_t *s = src + p * PAGE;
        uint8_t *d = dst + p * PAGE;
        for (int j = 0; j < BLOCKS_PER_PAGE; j += 4 * VZ_WAYS) {
            t[0] = cur;
#pragma GCC unroll 8
            for (int i = 1; i < VZ_WAYS; i++)
                t[i] = vz_mul_xk(cur, 4 * i);
            cur = vz_mul_xk(cur, 4 * VZ_WAYS);
            vz_blocks(k, NR, enc, s + 16 * j, d + 16 * j, t);
        }
    }
}

VZ_TARGET static void xts_run_vaes(const sc_memcrypt *e, int enc, const uint8_t *src,
                                   uint8_t *dst, const uint64_t *spas, uint64_t spa0, size_t n)
{
    if (enc)
        xts_run_vaes_body(e, 1, src, dst, spas, spa0, n);
    else
        xts_run_vaes_body(e, 0, src, dst, spas, spa0, n);
}
#endif /* SC_X86 */

/* ---------------------------------------------------------------------------------------------
 * Dispatch and the exported API.
 */

int sc_memcrypt_impl(void) { return sc_aes_impl(); }

void sc_memcrypt_page(const sc_memcrypt *e, int enc, const uint8_t *src, uint8_t *dst,
                      uint64_t spa)
{
    int impl = sc_memcrypt_impl();
    int xts = e->mode == SC_MEM_AES256_XTS;
#ifdef SC_X86
    if (impl == SC_TIER_AVX512) {
        (xts ? xts_run_vaes : xex_run_vaes)(e, enc, src, dst, NULL, spa, 1);
        return;
    }
    if (impl == SC_TIER_AESNI) {
        (xts ? xts_page_aesni : xex_page_aesni)(e, enc, src, dst, spa);
        return;
    }
#endif
    (void)impl;
    (xts ? xts_page_portable : xex_page_portable)(e, enc, src, dst, spa);
}

/* Every argument check of a batch, before any byte is written; the first that fails is the one
 * reported (csrc/memcrypt.h lists them in order). spas != NULL or nspas != 0: the per-page form;
 * otherwise a run from spa0. */
static int crypt_check(const sc_memcrypt *e, const uint8_t *src, size_t src_size,
                       const uint8_t *dst, size_t dst_size, const uint64_t *spas, size_t nspas,
                       uint64_t spa0, struct sc_err *err)
{
    size_t n = src_size / PAGE;
    if (!e)
        return sc_refuse(err, EINVAL, SC_ERR_NULL, 0, 0, 0, 0);
    if (src_size % PAGE)
        return sc_refuse(err, EINVAL, SC_ERR_MEM_PARTIAL_PAGE, 0, src_size, PAGE, 0);
    if (dst_size != src_size)
        return sc_refuse(err, EINVAL, SC_ERR_MEM_OUT_SIZE, 0, dst_size, src_size, 0);
    if (n && (!src || !dst))
        return sc_refuse(err, EINVAL, SC_ERR_NULL, 0, 0, 0, 0);
    /* Partial overlap would read blocks already overwritten; in place (src == dst) is fine. */
    if (src != dst && sc_overlaps(src, src_size, dst, dst_size))
        return sc_refuse(err, EINVAL, SC_ERR_MEM_OVERLAP, 0, 0, 0, 0);
    if (spas || nspas) {
        if (nspas != n)
            return sc_refuse(err, EINVAL, SC_ERR_MEM_SPA_COUNT, 0, nspas, n, 0);
        if (!spas)
            return sc_refuse(err, EINVAL, SC_ERR_NULL, 0, 0, 0, 0);
        /* One OR over the list on the way in; which page it was is looked for once it failed. */
        uint64_t bad = 0;
        for (size_t p = 0; p < n; p++)
            bad |= spas[p];
        if (bad & (PAGE - 1)) {
            size_t p = 0;
            while (!(spas[p] & (PAGE - 1)))
                p++;
            return sc_refuse(err, EINVAL, SC_ERR_MEM_SPA_UNALIGNED, p, spas[p], PAGE, 0);
        }
    } else if (spa0 & (PAGE - 1)) {
        return sc_refuse(err, EINVAL, SC_ERR_MEM_RUN_UNALIGNED, 0, spa0, PAGE, 0);
    } else if (n > (UINT64_C(1) << 52) - (spa0 >> 12)) {
        /* A run must end inside the 64-bit physical address space. */
        return sc_refuse(err, EINVAL, SC_ERR_MEM_RUN_END, 0, spa0, 0, n);
    }
    return 0;
}

static int crypt_pages(const sc_memcrypt *e, int enc, const uint8_t *src, size_t src_size,
                       uint8_t *dst, size_t dst_size, const uint64_t *spas, size_t nspas,
                       uint64_t spa0, struct sc_err *err)
{
    size_t n = src_size / PAGE;
    int rc = crypt_check(e, src, src_size, dst, dst_size, spas, nspas, spa0, err);
    /* Zero pages stop here: the VAES XTS path computes the first tweak ahead of its page loop,
     * so it must never see an empty list. */
    if (rc || !n)
        return rc;
    int impl = sc_memcrypt_impl();
    int xts = e->mode == SC_MEM_AES256_XTS;
#ifdef SC_X86
    if (impl == SC_TIER_AVX512) {
        (xts ? xts_run_vaes : xex_run_vaes)(e, enc, src, dst, spas, spa0, n);
        return 0;
    }
#endif
    (void)impl;
    for (size_t p = 0; p < n; p++)
        sc_memcrypt_page(e, enc, src + p * PAGE, dst + p * PAGE,
                         spas ? spas[p] : spa0 + (uint64_t)p * PAGE);
    return 0;
}

int sc_memcrypt_pages(const sc_memcrypt *e, int enc, const uint8_t *src, size_t src_size,
                      uint8_t *dst, size_t dst_size, const uint64_t *spas, size_t nspas,
                      struct sc_err *err)
{
    return crypt_pages(e, enc, src, src_size, dst, dst_size, spas, nspas, 0, err);
}

int sc_memcrypt_check_pages(const sc_memcrypt *e, const uint8_t *src, size_t src_size,
                            const uint8_t *dst, size_t dst_size, const uint64_t *spas,
                            size_t nspas, struct sc_err *err)
{
    return crypt_check(e, src, src_size, dst, dst_size, spas, nspas, 0, err);
}

int sc_memcrypt_run(const sc_memcrypt *e, int enc, const uint8_t *src, size_t src_size,
                    uint8_t *dst, size_t dst_size, uint64_t spa, struct sc_err *err)
{
    return crypt_pages(e, enc, src, src_size, dst, dst_size, NULL, 0, spa, err);
}

int sc_memcrypt_new(int mode, const uint8_t *key, size_t key_len, const uint32_t *tweak_table,
                    sc_memcrypt **out, struct sc_err *err)
{
    if (!out || !key)
        return sc_refuse(err, EINVAL, SC_ERR_NULL, 0, 0, 0, 0);
    if (mode != SC_MEM_AES128_XEX && mode != SC_MEM_AES256_XTS)
        return sc_refuse(err, EINVAL, SC_ERR_MEM_MODE, 0, (uint64_t)(int64_t)mode, 0, 0);
    size_t need = mode == SC_MEM_AES128_XEX ? 16 : 64;
    if (key_len != need)
        return sc_refuse(err, EINVAL, SC_ERR_MEM_KEY_SIZE, 0, key_len, need, 0);
    if (mode == SC_MEM_AES128_XEX && !tweak_table)
        return sc_refuse(err, EINVAL, SC_ERR_MEM_XEX_TABLE, 0, 0, 0, 0);
    /* XTS's tweak is AES_K2(spa >> 12) (IEEE 1619 section 5.1): there is no table to take. */
    if (mode == SC_MEM_AES256_XTS && tweak_table)
        return sc_refuse(err, EINVAL, SC_ERR_MEM_XTS_TABLE, 0, 0, 0, 0);
    /* Equal halves make XTS degenerate; OpenSSL refuses them too ("xts duplicated keys",
     * crypto/evp/e_aes.c aes_xts_init_key). */
    if (mode == SC_MEM_AES256_XTS && !memcmp(key, key + 32, 32))
        return sc_refuse(err, EINVAL, SC_ERR_MEM_XTS_HALVES, 0, 0, 0, 0);
    sc_memcrypt *e = aligned_alloc(64, (sizeof(*e) + 63) & ~(size_t)63);
    if (!e)
        return sc_refuse(err, ENOMEM, SC_ERR_NONE, 0, 0, 0, 0);
    memset(e, 0, sizeof(*e));
    e->mode = mode;
    if (mode == SC_MEM_AES128_XEX) {
        e->rounds = sc_aes_expand(key, 4, e->rk_enc);
        memcpy(e->tweak_table, tweak_table, sizeof(e->tweak_table));
        xex_tables(e);
    } else {
        e->rounds = sc_aes_expand(key, 8, e->rk_enc);
        sc_aes_expand(key + 32, 8, e->rk_tweak);
        sc_aes_serialise(e->rk_tweak, e->rounds, e->tk);
    }
    sc_aes_dec_schedule(e->rk_enc, e->rounds, e->rk_dec);
    sc_aes_serialise(e->rk_enc, e->rounds, e->ek);
    sc_aes_serialise(e->rk_dec, e->rounds, e->dk);
    *out = e;
    return 0;
}

void sc_memcrypt_free(sc_memcrypt *e)
{
    if (e) {
        /* Round keys are key material: do not leave them in freed memory. */
        volatile uint8_t *p = (volatile uint8_t *)e;
        for (size_t i = 0; i < sizeof(*e); i++)
            p[i] = 0;
        free(e);
    }
}
