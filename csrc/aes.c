/*
 * AES (FIPS-197) tables, key schedules and the implementation choice shared by memcrypt.c and
 * sevpkt.c; the block functions themselves are inline in aes.h.
 */
#include "aes.h"

uint8_t sc_aes_sbox[256], sc_aes_inv_sbox[256];
uint32_t sc_aes_te[4][256], sc_aes_td[4][256];

static inline uint32_t ror32(uint32_t x, int n) { return (x >> n) | (x << (32 - n)); }
static inline uint8_t rol8(uint8_t x, int n) { return (uint8_t)((x << n) | (x >> (8 - n))); }
static inline uint8_t xtime(uint8_t x) { return (uint8_t)((x << 1) ^ ((x >> 7) * 0x1b)); }

static uint8_t gmul(uint8_t a, uint8_t b)
{
    uint8_t p = 0;
    while (b) {
        if (b & 1)
            p ^= a;
        a = xtime(a);
        b >>= 1;
    }
    return p;
}

__attribute__((constructor)) static void aes_tables_init(void)
{
    /* Walk the multiplicative group with generator 3: p runs over 3^k and q over 3^-k, so q is
     * the inverse of p; the S-box is the affine map of the inverse (FIPS-197 5.1.1). */
    uint8_t p = 1, q = 1;
    do {
        p = (uint8_t)(p ^ xtime(p));
        q ^= (uint8_t)(q << 1);
        q ^= (uint8_t)(q << 2);
        q ^= (uint8_t)(q << 4);
        if (q & 0x80)
            q ^= 0x09;
        sc_aes_sbox[p] =
            (uint8_t)(q ^ rol8(q, 1) ^ rol8(q, 2) ^ rol8(q, 3) ^ rol8(q, 4) ^ 0x63);
    } while (p != 1);
    sc_aes_sbox[0] = 0x63;
    for (int i = 0; i < 256; i++)
        sc_aes_inv_sbox[sc_aes_sbox[i]] = (uint8_t)i;
    for (int i = 0; i < 256; i++) {
        uint8_t s = sc_aes_sbox[i], v = sc_aes_inv_sbox[i];
        uint32_t te = ((uint32_t)gmul(s, 2) << 24) | ((uint32_t)s << 16) | ((uint32_t)s << 8) |
                      gmul(s, 3);
        uint32_t td = ((uint32_t)gmul(v, 14) << 24) | ((uint32_t)gmul(v, 9) << 16) |
                      ((uint32_t)gmul(v, 13) << 8) | gmul(v, 11);
        for (int r = 0; r < 4; r++) {
            sc_aes_te[r][i] = r ? ror32(te, 8 * r) : te;
            sc_aes_td[r][i] = r ? ror32(td, 8 * r) : td;
        }
    }
}

static inline uint32_t sub_word(uint32_t w)
{
    const uint8_t *sb = sc_aes_sbox;
    return ((uint32_t)sb[w >> 24] << 24) | ((uint32_t)sb[(w >> 16) & 255] << 16) |
           ((uint32_t)sb[(w >> 8) & 255] << 8) | sb[w & 255];
}

int sc_aes_expand(const uint8_t *key, int nk, uint32_t *w)
{
    int nr = nk + 6, total = 4 * (nr + 1);
    uint32_t rcon = 1;
    for (int i = 0; i < nk; i++)
        w[i] = sc_load_be32(key + 4 * i);
    for (int i = nk; i < total; i++) {
        uint32_t t = w[i - 1];
        if (i % nk == 0) {
            t = sub_word(ror32(t, 24)) ^ (rcon << 24);
            rcon = xtime((uint8_t)rcon);
        } else if (nk > 6 && i % nk == 4) {
            t = sub_word(t);
        }
        w[i] = w[i - nk] ^ t;
    }
    return nr;
}

void sc_aes_dec_schedule(const uint32_t *w, int nr, uint32_t *dk)
{
    const uint32_t(*td)[256] = sc_aes_td;
    const uint8_t *sb = sc_aes_sbox;
    for (int r = 0; r <= nr; r++) {
        for (int c = 0; c < 4; c++) {
            uint32_t k = w[4 * (nr - r) + c];
            if (r > 0 && r < nr)
                k = td[0][sb[k >> 24]] ^ td[1][sb[(k >> 16) & 255]] ^ td[2][sb[(k >> 8) & 255]] ^
                    td[3][sb[k & 255]];
            dk[4 * r + c] = k;
        }
    }
}

void sc_aes_serialise(const uint32_t *w, int nr, uint8_t out[15][16])
{
    for (int i = 0; i < 4 * (nr + 1); i++)
        sc_store_be32(&out[i / 4][4 * (i % 4)], w[i]);
}

int sc_aes_impl(void)
{
#ifdef SC_X86
    if (SC_HAS(SC_CPU_VAES | SC_CPU_AVX512 | SC_CPU_AESNI))
        return SC_TIER_AVX512;
    if (SC_HAS(SC_CPU_VAES | SC_CPU_AVX2 | SC_CPU_AESNI))
        return SC_TIER_AVX2;
    if (SC_HAS(SC_CPU_AESNI))
        return SC_TIER_AESNI;
#elif defined(SC_ARM)
    if (SC_HAS(SC_CPU_NEON | SC_CPU_ARMCE))
        return SC_TIER_ARMCE;
#endif
    return SC_TIER_PORTABLE;
}
