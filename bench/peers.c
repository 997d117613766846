/*
 * Peers and hardware limits for bench/, built by bench/peers.py into a shared library and called
 * through ctypes, so that each is timed call by call, interleaved with sevcore's own calls:
 *
 *   sc_bench_aes_rounds   the AES-unit limit: 12 independent chains of AESENC on xmm, ymm or
 *                         zmm registers (AES-NI, VAES), one round key, `iters` rounds per chain
 *   sc_bench_evp_xts      OpenSSL's EVP aes-128-xts / aes-256-xts over n 4 KiB pages, each its
 *                         own data unit with tweak = SPA >> 12, as the engine computes them
 *
 * Not part of the package. Build: cc -O2 -shared -fPIC peers.c -o peers.so -lcrypto
 */
#include <stddef.h>
#include <stdint.h>
#include <string.h>

#include <openssl/evp.h>

#if defined(__x86_64__)
#include <immintrin.h>

#define CHAINS 10

/* CHAINS independent chains of AESENC, so that throughput rather than latency bounds the loop
 * (the method of Agner Fog's instruction tables: 4-cycle latency, up to 2 per cycle on Zen 3 and
 * Zen 4, hence at least 8 chains). The loop body is one asm statement, so the compiler can
 * neither drop nor spill the chains. chain spells one chain's instruction: the legacy
 * two-operand AESENC on xmm (AES-NI without AVX: LEGACY), VEX/EVEX VAESENC on ymm and zmm (VEX);
 * reg is the register constraint ("x", or "v" for zmm's 32 registers). */
#define LEGACY(i) "aesenc %10, %" #i "\n\t"
#define VEX(i) "vaesenc %10, %" #i ", %" #i "\n\t"
#define AES_ROUNDS(name, T, isa, set1, chain, reg)                                              \
    __attribute__((target(isa))) static void name(uint64_t iters, T *out)                      \
    {                                                                                           \
        T k = set1(0x01020304), b0 = set1(0), b1 = set1(1), b2 = set1(2), b3 = set1(3),         \
          b4 = set1(4), b5 = set1(5), b6 = set1(6), b7 = set1(7), b8 = set1(8), b9 = set1(9);   \
        for (uint64_t n = 0; n < iters; n++)                                                    \
            __asm__(chain(0) chain(1) chain(2) chain(3) chain(4) chain(5) chain(6) chain(7)     \
                        chain(8) chain(9)                                                       \
                    : "+" reg(b0), "+" reg(b1), "+" reg(b2), "+" reg(b3), "+" reg(b4),          \
                      "+" reg(b5), "+" reg(b6), "+" reg(b7), "+" reg(b8), "+" reg(b9)           \
                    : reg(k));                                                                  \
        *out = b0 ^ b1 ^ b2 ^ b3 ^ b4 ^ b5 ^ b6 ^ b7 ^ b8 ^ b9;                                 \
    }

AES_ROUNDS(rounds_xmm, __m128i, "aes,sse2", _mm_set1_epi32, LEGACY, "x")
AES_ROUNDS(rounds_ymm, __m256i, "avx2,vaes", _mm256_set1_epi32, VEX, "x")
AES_ROUNDS(rounds_zmm, __m512i, "avx512f,vaes", _mm512_set1_epi32, VEX, "v")
#endif

/* Block-rounds done: iters * CHAINS * blocks per register, or 0 for a width this build lacks.
 * The caller times the call; width is 128, 256 or 512. */
uint64_t sc_bench_aes_rounds(int width, uint64_t iters, uint64_t *sink)
{
#if defined(__x86_64__)
    uint64_t out[8] __attribute__((aligned(64)));
    switch (width) {
    case 128: rounds_xmm(iters, (__m128i *)out); break;
    case 256: rounds_ymm(iters, (__m256i *)out); break;
    case 512: rounds_zmm(iters, (__m512i *)out); break;
    default: return 0;
    }
    *sink = out[0];
    return iters * CHAINS * (uint64_t)width / 128;
#endif
    return 0;
}

/* n pages of src to dst through EVP aes-<bits>-xts (key: 2 * bits / 8 bytes), page i with the
 * 16-byte little-endian tweak spas[i] >> 12. 0, or -1 on an OpenSSL error. */
int sc_bench_evp_xts(int bits, int enc, const uint8_t *key, const uint8_t *src, uint8_t *dst,
                     const uint64_t *spas, size_t n)
{
    EVP_CIPHER_CTX *ctx = EVP_CIPHER_CTX_new();
    const EVP_CIPHER *c = bits == 128 ? EVP_aes_128_xts() : EVP_aes_256_xts();
    int ok = ctx && EVP_CipherInit_ex(ctx, c, NULL, key, NULL, enc);
    for (size_t i = 0; ok && i < n; i++) {
        uint8_t iv[16] = {0};
        uint64_t pfn = spas[i] >> 12;
        int len;
        memcpy(iv, &pfn, 8); /* x86 and AArch64 Linux are little-endian */
        ok = EVP_CipherInit_ex(ctx, NULL, NULL, NULL, iv, enc) &&
             EVP_CipherUpdate(ctx, dst + 4096 * i, &len, src + 4096 * i, 4096);
    }
    EVP_CIPHER_CTX_free(ctx);
    return ok ? 0 : -1;
}
