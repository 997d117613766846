/*
 * SEV memory encryption engine: AES-128-XEX with an SPA tweak table, and XTS-AES-256 with one
 * 4 KiB data unit per page. A portable T-table path and one vector path per tier (x86-64: AES-NI
 * on xmm, VAES on ymm, VAES on zmm; AArch64: the Cryptographic Extension: csrc/tiers.h), written
 * once in csrc/memcrypt_tier.h; the tier is chosen per call from the active CPU features
 * (csrc/cpu.c). All are checked against each other and against sevcore/_reference/memcrypt.py by
 * the tests, and the AArch64 path by tests/kat/kat.c under qemu-aarch64.
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
    uint8_t ek[15][16];                    /* encryption round keys as blocks (data key) */
    uint8_t dk[15][16];                    /* decryption round keys (aesimc applied) */
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

#ifdef SC_VEC
/* ---------------------------------------------------------------------------------------------
 * The vector paths, one template (csrc/memcrypt_tier.h) per tier. Eight registers in flight:
 * with four-cycle rounds issued two per cycle that is what keeps both AES units busy, and with
 * the zmm tier's 32 registers its 15 round keys could stay resident too.
 */
#define WAYS 8
#define TEMPLATE "memcrypt_tier.h"
#include "each_tier.h"
#undef TEMPLATE
#undef WAYS

typedef void (*run_fn)(const sc_memcrypt *e, int enc, const uint8_t *src, uint8_t *dst,
                       const uint64_t *spas, uint64_t spa0, size_t n);

static const run_fn runs[] = {
#ifdef SC_X86
    [SC_TIER_AESNI] = run_aesni,
    [SC_TIER_AVX2] = run_avx2,
    [SC_TIER_AVX512] = run_avx512,
#else
    [SC_TIER_ARMCE] = run_armce,
#endif
};
#endif /* SC_VEC */

/* ---------------------------------------------------------------------------------------------
 * Dispatch and the exported API.
 */

int sc_memcrypt_impl(void) { return sc_aes_impl(); }

/* Pages [0, n) of src to dst, page p at spas[p] (or spa0 + p * 4096), on the active tier. */
static void crypt_run(const sc_memcrypt *e, int enc, const uint8_t *src, uint8_t *dst,
                      const uint64_t *spas, uint64_t spa0, size_t n)
{
    int xts = e->mode == SC_MEM_AES256_XTS;
#ifdef SC_VEC
    int tier = sc_memcrypt_impl();
    if (tier != SC_TIER_PORTABLE) {
        runs[tier](e, enc, src, dst, spas, spa0, n);
        return;
    }
#endif
    for (size_t p = 0; p < n; p++)
        (xts ? xts_page_portable : xex_page_portable)(e, enc, src + p * PAGE, dst + p * PAGE,
                                                      spas ? spas[p] : spa0 + (uint64_t)p * PAGE);
}

void sc_memcrypt_page(const sc_memcrypt *e, int enc, const uint8_t *src, uint8_t *dst,
                      uint64_t spa)
{
    crypt_run(e, enc, src, dst, NULL, spa, 1);
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
    /* Zero pages stop here: the vector XTS paths compute the first tweak ahead of their page
     * loop, so they must never see an empty list. */
    if (rc || !n)
        return rc;
    crypt_run(e, enc, src, dst, spas, spa0, n);
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
