/*
 * Known-answer tests of the C core in C alone, with no Python: for CPUs the test machine does not
 * have, run under an emulator. CI cross-compiles this file with the core for AArch64 and runs it
 * under qemu-aarch64 (.ci/run), and runs it natively too.
 *
 *   cc -O2 -std=c11 -D_GNU_SOURCE -Icsrc tests/kat/kat.c $(ls csrc/[a-z]*.c) -o kat
 *   ./kat tests/data
 *
 * For every tier the CPU can run (portable and this architecture's vector tiers: csrc/cpu.c), with
 * the core restricted to that tier's features (and, beside a vector tier, POPCNT and SHA-NI where
 * the CPU has them), it checks
 *
 *   - XTS-AES-256: IEEE Std 1619-2007 vector 10 (tests/data/xts_aes256_ieee1619.txt), encrypt and
 *     decrypt;
 *   - XEX-AES-128: FIPS-197 appendix C.1 with an all-zero tweak table, and the tweak of a block
 *     whose SPA has one bit set being that table entry four times (SEVurity, section III);
 *   - AES-128-CTR (SP 800-38A F.5.1), SHA-256 (FIPS 180-4) and HMAC-SHA256 (RFC 4231) from
 *     tests/data/sha256_hmac_ctr_vectors.txt, and the SEV packet check values of
 *     tests/core/test_sevpkt.py (LAUNCH_SECRET and SEND_UPDATE_DATA), sealed and opened;
 *   - CRC-32: the check value of "123456789" and every length 0..600 against a bitwise CRC;
 *   - bitmaps: counts, run counts, set-bit scans and harvests against one-bit-at-a-time loops;
 *
 * and that every tier's engine, CTR and CRC output equals the portable tier's on pseudo-random
 * data (67 pages, odd lengths). Exit status 0 when all pass; each failure is printed.
 */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "bitmap.h"
#include "crc32.h"
#include "memcrypt.h"
#include "sevcore.h"
#include "sevpkt.h"

static int failures;
static const char *tier_name = "?";

#define CHECK(cond, ...)                                                                       \
    do {                                                                                       \
        if (!(cond)) {                                                                         \
            failures++;                                                                        \
            printf("FAIL [%s] %s:%d: ", tier_name, __FILE__, __LINE__);                        \
            printf(__VA_ARGS__);                                                               \
            printf("\n");                                                                      \
        }                                                                                      \
    } while (0)

/* ---------------------------------------------------------------------------------------------
 * Vector files.
 */

static size_t unhex(const char *s, uint8_t *out, size_t cap)
{
    size_t n = 0;
    while (s[0] && s[1] && n < cap && strchr("0123456789abcdefABCDEF", s[0])) {
        unsigned v;
        sscanf(s, "%2x", &v);
        out[n++] = (uint8_t)v;
        s += 2;
    }
    return n;
}

static char *slurp(const char *dir, const char *name)
{
    char path[4096];
    snprintf(path, sizeof(path), "%s/%s", dir, name);
    FILE *f = fopen(path, "rb");
    if (!f) {
        printf("cannot open %s\n", path);
        exit(2);
    }
    fseek(f, 0, SEEK_END);
    long n = ftell(f);
    fseek(f, 0, SEEK_SET);
    char *s = malloc((size_t)n + 1);
    if (!s || fread(s, 1, (size_t)n, f) != (size_t)n)
        exit(2);
    s[n] = 0;
    fclose(f);
    return s;
}

/* The hex value after "name" (as `NAME = hex` or `name=hex`) in line, into out. */
static size_t field(const char *line, const char *name, uint8_t *out, size_t cap)
{
    char pat[64];
    snprintf(pat, sizeof(pat), "%s=", name);
    const char *p = strstr(line, pat);
    if (!p) {
        snprintf(pat, sizeof(pat), "%s = ", name);
        if (!(p = strstr(line, pat)))
            return 0;
    }
    return unhex(p + strlen(pat), out, cap);
}

static long repeat_of(const char *line)
{
    const char *p = strstr(line, "repeat=");
    return p ? atol(p + 7) : 1;
}

/* ---------------------------------------------------------------------------------------------
 * Pseudo-random data: splitmix64.
 */

static uint64_t rng_state = 20261207;

static uint64_t rnd(void)
{
    uint64_t z = (rng_state += 0x9e3779b97f4a7c15ULL);
    z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ULL;
    z = (z ^ (z >> 27)) * 0x94d049bb133111ebULL;
    return z ^ (z >> 31);
}

static void fill(uint8_t *p, size_t n)
{
    for (size_t i = 0; i < n; i++)
        p[i] = (uint8_t)rnd();
}

/* ---------------------------------------------------------------------------------------------
 * Known answers.
 */

static void kat_xts(const char *data)
{
    static uint8_t key[64], ptx[512], ctx[512], dusn[8], page[4096], out[4096], back[4096];
    CHECK(field(data, "KEY", key, 64) == 64 && field(data, "PTX", ptx, 512) == 512 &&
              field(data, "CTX", ctx, 512) == 512 && field(data, "DUSN", dusn, 8) == 1,
          "xts_aes256_ieee1619.txt unreadable");
    sc_memcrypt *e;
    CHECK(sc_memcrypt_new(SC_MEM_AES256_XTS, key, 64, NULL, &e, NULL) == 0, "new XTS");
    memset(page, 0, sizeof(page));
    memcpy(page, ptx, 512);
    uint64_t spa = (uint64_t)dusn[0] << 12;
    CHECK(sc_memcrypt_run(e, 1, page, 4096, out, 4096, spa, NULL) == 0, "XTS encrypt");
    CHECK(!memcmp(out, ctx, 512), "IEEE 1619 vector 10 ciphertext");
    CHECK(sc_memcrypt_run(e, 0, out, 4096, back, 4096, spa, NULL) == 0, "XTS decrypt");
    CHECK(!memcmp(back, page, 4096), "IEEE 1619 vector 10 decrypts");
    sc_memcrypt_free(e);
}

static void kat_xex(void)
{
    static const uint8_t fips_ct[16] = {0x69, 0xc4, 0xe0, 0xd8, 0x6a, 0x7b, 0x04, 0x30,
                                        0xd8, 0xcd, 0xb7, 0x80, 0x70, 0xb4, 0xc5, 0x5a};
    uint8_t key[16], page[4096], out[4096], plain[4096], masked[4096];
    uint32_t zero[64] = {0}, table[64] = {0};
    for (int i = 0; i < 16; i++)
        key[i] = (uint8_t)i;
    for (int i = 0; i < 4096; i++)
        page[i] = (uint8_t)(0x11 * (i % 16));
    sc_memcrypt *e, *t;
    CHECK(sc_memcrypt_new(SC_MEM_AES128_XEX, key, 16, zero, &e, NULL) == 0, "new XEX");
    CHECK(sc_memcrypt_run(e, 1, page, 4096, out, 4096, 0x1234000, NULL) == 0, "XEX encrypt");
    for (int b = 0; b < 256; b++)
        CHECK(!memcmp(out + 16 * b, fips_ct, 16), "FIPS-197 C.1 in block %d", b);
    CHECK(sc_memcrypt_run(e, 0, out, 4096, plain, 4096, 0x1234000, NULL) == 0 &&
              !memcmp(plain, page, 4096),
          "XEX decrypts");
    /* C = AES(P ^ T) ^ T with T = t[13] x 4 for SPA 1 << 13. */
    table[13] = 0x82253838;
    fill(page, sizeof(page));
    CHECK(sc_memcrypt_new(SC_MEM_AES128_XEX, key, 16, table, &t, NULL) == 0, "new XEX");
    sc_memcrypt_run(t, 1, page, 4096, out, 4096, 1u << 13, NULL);
    for (int i = 0; i < 4096; i++)
        masked[i] = page[i] ^ (uint8_t)(table[13] >> (8 * (i % 4)));
    sc_memcrypt_run(e, 1, masked, 4096, plain, 4096, 0, NULL);
    for (int i = 0; i < 4096; i++)
        plain[i] ^= (uint8_t)(table[13] >> (8 * (i % 4)));
    CHECK(!memcmp(out, plain, 4096), "XEX tweak is the table entry four times");
    sc_memcrypt_free(e);
    sc_memcrypt_free(t);
}

static void kat_packets(const char *vectors)
{
    static uint8_t a[8192], b[8192], c[8192], d[64], want[64];
    static char line[16384];
    for (const char *next = vectors; *next;) {
        const char *nl = strchr(next, '\n');
        size_t len = nl ? (size_t)(nl - next) : strlen(next);
        if (len >= sizeof(line))
            len = sizeof(line) - 1;
        memcpy(line, next, len);
        line[len] = 0;
        next += nl ? (size_t)(nl - next) + 1 : len;
        if (!strncmp(line, "ctr ", 4)) {
            uint8_t key[16], iv[16];
            size_t n = field(line, "pt", a, sizeof(a));
            field(line, "key", key, 16);
            field(line, "iv", iv, 16);
            field(line, "ct", b, sizeof(b));
            CHECK(sc_aes128_ctr(key, iv, a, n, c, NULL) == 0 && !memcmp(c, b, n),
                  "SP 800-38A F.5.1");
        } else if (!strncmp(line, "sha256 ", 7) || !strncmp(line, "hmac ", 5)) {
            int hmac = line[0] == 'h';
            size_t klen = hmac ? field(line, "key", c, sizeof(c)) : 0;
            size_t m = field(line, "msg", a, sizeof(a));
            long rep = repeat_of(line);
            size_t wlen = field(line, hmac ? "mac" : "md", want, sizeof(want));
            uint8_t *msg = malloc(m * (size_t)rep + 1);
            for (long r = 0; r < rep; r++)
                memcpy(msg + m * (size_t)r, a, m);
            if (hmac)
                sc_hmac_sha256(c, klen, msg, m * (size_t)rep, d);
            else
                sc_sha256(msg, m * (size_t)rep, d);
            CHECK(!memcmp(d, want, wlen), "%s vector of %zu bytes", hmac ? "HMAC" : "SHA-256",
                  m * (size_t)rep);
            free(msg);
        }
    }
    /* The packet check values of tests/core/test_sevpkt.py: TEK 00..0f, TIK 10..1f, IV 20..2f,
     * 32 zero bytes; LAUNCH_SECRET with sev-tool's example MEASURE. */
    static const char *secret_ct =
        "5be87e2e5b447c944b21c9af7756c0d84ba41c22228e38a802633ef8709fc8f7";
    static const char *secret_mac =
        "14d014da07d30bbfc46f6794e6c06545bcc760bdeb66dece1e47d95498a2e95a";
    static const char *data_mac =
        "fc67a3414b9a638a27ea1a43a24a2003ede74cfcf7fc3d761ffa11d0d590ab77";
    static const char *measure =
        "6faab2daae389bcd3405a05d6cafe33c0414f7bedd0bae19ba5f38b7fd1664ea";
    uint8_t tek[16], tik[16], iv[16], meas[32], zero[32] = {0}, hdr[52], ct[32], pt[32];
    for (int i = 0; i < 16; i++)
        tek[i] = (uint8_t)i, tik[i] = (uint8_t)(16 + i), iv[i] = (uint8_t)(32 + i);
    unhex(measure, meas, 32);
    CHECK(sc_sevpkt_seal(tek, tik, SC_SEVPKT_CTX_SECRET, meas, zero, 32, 1, iv, hdr, ct, NULL) == 0,
          "seal LAUNCH_SECRET");
    unhex(secret_ct, want, 32);
    CHECK(!memcmp(ct, want, 32), "LAUNCH_SECRET ciphertext");
    unhex(secret_mac, want, 32);
    CHECK(!memcmp(hdr + 20, want, 32) && !memcmp(hdr + 4, iv, 16), "LAUNCH_SECRET header");
    CHECK(sc_sevpkt_open(tek, tik, SC_SEVPKT_CTX_SECRET, meas, hdr, ct, 32, 1, pt, NULL) == 0 &&
              !memcmp(pt, zero, 32),
          "open LAUNCH_SECRET");
    CHECK(sc_sevpkt_seal(tek, tik, SC_SEVPKT_CTX_DATA, NULL, zero, 32, 1, iv, hdr, ct, NULL) == 0,
          "seal SEND_UPDATE_DATA");
    unhex(data_mac, want, 32);
    CHECK(!memcmp(hdr + 20, want, 32), "SEND_UPDATE_DATA MAC");
    hdr[30] ^= 1;
    CHECK(sc_sevpkt_open(tek, tik, SC_SEVPKT_CTX_DATA, NULL, hdr, ct, 32, 1, pt, NULL) < 0,
          "a flipped MAC bit is refused");
}

static uint32_t crc_bitwise(const uint8_t *p, size_t n)
{
    uint32_t c = ~0u;
    while (n--) {
        c ^= *p++;
        for (int k = 0; k < 8; k++)
            c = c & 1 ? 0xEDB88320u ^ (c >> 1) : c >> 1;
    }
    return ~c;
}

static void kat_crc(void)
{
    static uint8_t buf[700];
    CHECK(sc_crc32(0, (const uint8_t *)"123456789", 9) == 0xCBF43926, "CRC-32 check value");
    fill(buf, sizeof(buf));
    for (size_t n = 0; n <= 600; n++)
        for (size_t off = 0; off < 16; off += 7)
            CHECK(sc_crc32(0, buf + off, n) == crc_bitwise(buf + off, n), "CRC-32 of %zu bytes",
                  n);
}

static void kat_bitmaps(void)
{
    enum { NBITS = 64 * 300 + 13 };
    static uint64_t map[NBITS / 64 + 1], out[NBITS];
    static const unsigned shifts[] = {0, 1, 4, 8}; /* density 1, 1/2, 1/16, 1/256 */
    for (size_t d = 0; d < sizeof(shifts) / sizeof(shifts[0]); d++) {
        for (size_t w = 0; w < NBITS / 64 + 1; w++) {
            uint64_t x = ~0ULL;
            for (unsigned k = 0; k < shifts[d]; k++)
                x &= rnd();
            map[w] = x;
        }
        for (uint64_t start = 0; start < 130; start += 43) {
            int64_t count = 0, runs = 0, prev = 0;
            for (uint64_t i = start; i < NBITS; i++) {
                int bit = (int)(map[i / 64] >> (i % 64) & 1);
                count += bit;
                runs += bit && !prev;
                prev = bit;
            }
            CHECK(sc_bitmap_count(map, NBITS, start, NBITS) == count, "count from %llu",
                  (unsigned long long)start);
            CHECK(sc_bitmap_count_runs(map, NBITS, start, NBITS) == runs, "runs from %llu",
                  (unsigned long long)start);
            uint64_t pos = start;
            int64_t n = sc_bitmap_iter_set(map, NBITS, &pos, NBITS, out, NBITS);
            int ok = n == count && pos == NBITS;
            for (int64_t k = 0, i = (int64_t)start; ok && k < n; k++, i++) {
                while (!(map[i / 64] >> (i % 64) & 1))
                    i++;
                ok = out[k] == (uint64_t)i;
            }
            CHECK(ok, "iter_set from %llu", (unsigned long long)start);
        }
        int64_t count = sc_bitmap_count(map, NBITS, 0, NBITS);
        uint64_t pos = 0;
        CHECK(sc_bitmap_harvest(map, NBITS, &pos, NBITS, out, NBITS) == count && pos == NBITS &&
                  sc_bitmap_count(map, NBITS, 0, NBITS) == 0,
              "harvest takes every bit");
    }
}

/* ---------------------------------------------------------------------------------------------
 * Every tier against the portable one.
 */

struct outputs {
    uint8_t xex[67 * 4096], xts[67 * 4096], xts_dec[67 * 4096], ctr[5000];
    uint32_t crc[40];
};

static void outputs(struct outputs *o)
{
    static uint8_t src[67 * 4096], key[64];
    static uint64_t spas[67];
    static uint32_t table[64];
    rng_state = 7;
    fill(src, sizeof(src));
    fill(key, sizeof(key));
    for (int i = 0; i < 64; i++)
        table[i] = (uint32_t)rnd();
    for (int i = 0; i < 67; i++)
        spas[i] = (rnd() & ((1ULL << 40) - 1)) << 12;
    sc_memcrypt *x, *t;
    sc_memcrypt_new(SC_MEM_AES128_XEX, key, 16, table, &x, NULL);
    sc_memcrypt_new(SC_MEM_AES256_XTS, key, 64, NULL, &t, NULL);
    sc_memcrypt_pages(x, 1, src, sizeof(src), o->xex, sizeof(src), spas, 67, NULL);
    sc_memcrypt_pages(t, 1, src, sizeof(src), o->xts, sizeof(src), spas, 67, NULL);
    sc_memcrypt_pages(t, 0, src, sizeof(src), o->xts_dec, sizeof(src), spas, 67, NULL);
    sc_memcrypt_free(x);
    sc_memcrypt_free(t);
    uint8_t iv[16];
    memset(iv, 0xff, 16);
    iv[15] = 0xf0; /* the counter wraps at 2^128 after 16 blocks */
    sc_aes128_ctr(key, iv, src, sizeof(o->ctr) - 3, o->ctr, NULL);
    for (int i = 0; i < 40; i++)
        o->crc[i] = (uint32_t)sc_crc32(0, src + i, 64 * (size_t)i + (size_t)i % 16);
}

int main(int argc, char **argv)
{
    const char *data = argc > 1 ? argv[1] : "tests/data";
    char *xts = slurp(data, "xts_aes256_ieee1619.txt");
    char *vectors = slurp(data, "sha256_hmac_ctr_vectors.txt");
    static const struct {
        int tier;
        const char *name;
    } tiers[] = {{SC_TIER_PORTABLE, "portable"}, {SC_TIER_AESNI, "aesni"},
                 {SC_TIER_AVX2, "avx2"},         {SC_TIER_AVX512, "avx512"},
                 {SC_TIER_NEON, "neon"},         {SC_TIER_ARMCE, "armce"}};
    static struct outputs want, got;
    uint32_t detected = sc_cpu_detected();
    int ran = 0;
    for (size_t i = 0; i < sizeof(tiers) / sizeof(tiers[0]); i++) {
        int64_t needs = sc_cpu_tier_needs(tiers[i].tier);
        tier_name = tiers[i].name;
        if (needs < 0)
            continue; /* another architecture's tier */
        if ((detected & (uint32_t)needs) != (uint32_t)needs) {
            printf("skip %s: the CPU lacks features %#x\n", tiers[i].name,
                   (unsigned)needs & ~detected);
            continue;
        }
        /* The extras that run beside a tier (POPCNT, SHA-NI; VPOPCNTQ with AVX-512) stay, as
         * sevcore.core.cpu.tier_features keeps them; the portable tier runs without any. */
        uint32_t extras = SC_CPU_POPCNT | SC_CPU_SHANI |
                          (needs & SC_CPU_AVX512 ? SC_CPU_VPOPCNTDQ : 0);
        sc_cpu_restrict((uint32_t)needs | (tiers[i].tier == SC_TIER_PORTABLE ? 0 : extras));
        CHECK(sc_cpu_tier() == tiers[i].tier, "the core runs this tier");
        int before = failures;
        kat_xts(xts);
        kat_xex();
        kat_packets(vectors);
        kat_crc();
        kat_bitmaps();
        outputs(tiers[i].tier == SC_TIER_PORTABLE ? &want : &got);
        if (tiers[i].tier != SC_TIER_PORTABLE) {
            CHECK(!memcmp(want.xex, got.xex, sizeof(want.xex)), "XEX equals portable");
            CHECK(!memcmp(want.xts, got.xts, sizeof(want.xts)), "XTS equals portable");
            CHECK(!memcmp(want.xts_dec, got.xts_dec, sizeof(want.xts)),
                  "XTS decrypt equals portable");
            CHECK(!memcmp(want.ctr, got.ctr, sizeof(want.ctr)), "CTR equals portable");
            CHECK(!memcmp(want.crc, got.crc, sizeof(want.crc)), "CRC-32 equals portable");
        }
        printf("%s %s (memcrypt %d, crc32 %d, bitmap %d)\n",
               failures == before ? "ok  " : "FAIL", tiers[i].name, sc_memcrypt_impl(),
               sc_crc32_impl(), sc_bitmap_impl());
        ran++;
    }
    sc_cpu_restrict(~0u);
    free(xts);
    free(vectors);
    printf("%d tiers, %d failures\n", ran, failures);
    return failures ? 1 : 0;
}
