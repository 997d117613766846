/*
 * The memory engine's vector paths (XEX-128 and XTS-256 over a batch of pages), written once and
 * included by memcrypt.c once per x86 tier, with
 *
 *   TIER   aesni, avx2 or avx512: the vocabulary of csrc/aes.h (sc_TIER_*, SC_TARGET_TIER)
 *   WAYS   registers in flight (each holds sc_TIER_lanes blocks)
 *
 * defined. It defines run_TIER. Not a header of its own: no include guard.
 *
 * WAYS registers of independent blocks hide the AES round latency (4 cycles on Zen 3 and Zen 4,
 * two rounds issued per cycle: Agner Fog's instruction tables; 8 ways measured best on an AMD
 * EPYC Zen 4). Round keys come from sc_TIER_key (csrc/tiers.h): resident on zmm, loaded round
 * by round on the 16-register tiers.
 */
#define MT_CAT_(a, b) a##_##b
#define MT_CAT(a, b) MT_CAT_(a, b)
#define V(op) MT_CAT(MT_CAT(sc, TIER), op)
#define FN(name) MT_CAT(name, TIER)
#define TARGET MT_CAT(SC_TARGET, TIER)
#define VEC V(v)
#define L V(lanes)

/* `WAYS` registers of blocks from src, each XORed with its tweak t[i], through the cipher
 * (keys[0..nr], encryption or decryption schedule), XORed with the tweak again, to dst. The
 * final XOR is folded into the last round key, as the last round ends with AddRoundKey (FIPS-197
 * 5.1.4, 5.3.4): enclast(b, k ^ t) = enclast(b, k) ^ t.
 *
 * With 16 registers the tweaks are read from t twice, at the start and for the last round, not
 * kept: eight tweaks held through the rounds beside eight blocks and a key made the compiler
 * spill blocks between rounds (the aesni XTS path ran at 55 % of its speed). The empty asm,
 * which may have written t, makes the second read a load the compiler cannot merge with the
 * first. On zmm there are registers for both. */
TARGET static SC_ALWAYS_INLINE void FN(blocks)(const uint8_t (*keys)[16], const VEC *kr,
                                               const int nr, const int enc, const uint8_t *src,
                                               uint8_t *dst, const VEC *t)
{
    _Static_assert(BLOCKS_PER_PAGE % (L * WAYS) == 0, "a page is whole groups");
    VEC b[WAYS];
    VEC k = V(key)(keys, kr, 0);
#pragma GCC unroll 16
    for (int i = 0; i < WAYS; i++)
        b[i] = V(load)(src + 16 * L * i) ^ t[i] ^ k;
    if (V(regs) < 32)
        __asm__ volatile("" : : "r"(t) : "memory");
#pragma GCC unroll 14
    for (int r = 1; r < nr; r++) {
        k = V(key)(keys, kr, r);
#pragma GCC unroll 16
        for (int i = 0; i < WAYS; i++)
            b[i] = enc ? V(enc)(b[i], k) : V(dec)(b[i], k);
    }
    k = V(key)(keys, kr, nr);
#pragma GCC unroll 16
    for (int i = 0; i < WAYS; i++)
        V(store)(dst + 16 * L * i, enc ? V(enclast)(b[i], k ^ t[i]) : V(declast)(b[i], k ^ t[i]));
}

TARGET static SC_ALWAYS_INLINE void FN(xex_body)(const sc_memcrypt *e, const int enc,
                                                 const uint8_t *src, uint8_t *dst,
                                                 const uint64_t *spas, uint64_t spa0, size_t n)
{
    enum { NR = 10 }; /* XEX is AES-128 */
    const uint8_t(*keys)[16] = enc ? e->ek : e->dk;
    VEC t[WAYS], kr[NR + 1];
    V(keys)(keys, NR, kr);
    for (size_t p = 0; p < n; p++) {
        uint64_t spa = spas ? spas[p] : spa0 + (uint64_t)p * PAGE;
        V(u32) zero = {0};
        VEC tp = (VEC)(zero + xex_page_tweak(e, spa));
        const uint8_t *s = src + p * PAGE;
        uint8_t *d = dst + p * PAGE;
        for (int j = 0; j < BLOCKS_PER_PAGE; j += L * WAYS) {
#pragma GCC unroll 16
            for (int i = 0; i < WAYS; i++)
                t[i] = V(load)(e->inpage16[j + L * i]) ^ tp;
            FN(blocks)(keys, kr, NR, enc, s + 16 * j, d + 16 * j, t);
        }
    }
}


/* The tweaks of one group, L * WAYS blocks, kept two groups at a time in tw[2]: with one block per
 * register (the aesni tier) they are computed in the general-purpose registers, one group ahead,
 * from (lo, hi), the next block's tweak. Multiplying by x there is a shift, a shift-double and a
 * conditional XOR of 0x87 on the integer ALUs, which AES-bound code leaves idle; the vector
 * multiply (sc_TIER_mul_xk) costs seven vector instructions per block, one of them a PCLMULQDQ
 * that competes with AESENC for the same pipes, and measured 14 % slower on an AMD EPYC Zen 4.
 * The group is loaded long after it was stored, so store forwarding is not involved. With two
 * or four blocks per register the vector multiply amortises and stays (the integer way measured
 * 15-30 % slower there). */
static SC_ALWAYS_INLINE void FN(gpr_tweaks)(uint64_t (*tw)[2], int count, uint64_t *lo,
                                            uint64_t *hi)
{
    for (int i = 0; i < count; i++) {
        tw[i][0] = *lo, tw[i][1] = *hi;
        uint64_t carry = (uint64_t)((int64_t)*hi >> 63) & 0x87;
        *hi = *hi << 1 | *lo >> 63;
        *lo = *lo << 1 ^ carry;
    }
}

/* XTS: block j of a page has tweak T0 * x^j (IEEE 1619 5.3.1), T0 = AES_K2(page number). T0 of
 * the next page is computed one page ahead, so that its 14 dependent rounds overlap this page's
 * work instead of stalling the start of the next. With the vector multiply, every tweak of a
 * group is the group's base times a small power of x, so the chain from group to group is one
 * multiply long. */
TARGET static SC_ALWAYS_INLINE void FN(xts_body)(const sc_memcrypt *e, const int enc,
                                                 const uint8_t *src, uint8_t *dst,
                                                 const uint64_t *spas, uint64_t spa0, size_t n)
{
    enum { NR = 14, GROUP = L * WAYS }; /* XTS here is always AES-256 */
    _Static_assert(GROUP <= 56, "sc_*_mul_xk multiplies by x^k for k <= 56 only");
    const uint8_t(*keys)[16] = enc ? e->ek : e->dk;
    VEC t[WAYS], kr[NR + 1];
    __m128i lane[4];
    _Alignas(64) uint64_t tw[2][GROUP][2];
    V(keys)(keys, NR, kr);
    __m128i t0_next = sc_aesni_encrypt1(
        e->tk, NR, _mm_set_epi64x(0, (long long)((spas ? spas[0] : spa0) >> 12)));
    for (size_t p = 0; p < n; p++) {
        lane[0] = t0_next;
        if (p + 1 < n) {
            uint64_t next = spas ? spas[p + 1] : spa0 + (uint64_t)(p + 1) * PAGE;
            t0_next = sc_aesni_encrypt1(e->tk, NR, _mm_set_epi64x(0, (long long)(next >> 12)));
        }
        const uint8_t *s = src + p * PAGE;
        uint8_t *d = dst + p * PAGE;
        if (L == 1) {
            uint64_t lo = (uint64_t)_mm_cvtsi128_si64(lane[0]);
            uint64_t hi = (uint64_t)_mm_extract_epi64(lane[0], 1);
            FN(gpr_tweaks)(tw[0], GROUP, &lo, &hi);
            for (int j = 0, g = 0; j < BLOCKS_PER_PAGE; j += GROUP, g ^= 1) {
                if (j + GROUP < BLOCKS_PER_PAGE)
                    FN(gpr_tweaks)(tw[g ^ 1], GROUP, &lo, &hi);
                FN(blocks)(keys, kr, NR, enc, s + 16 * j, d + 16 * j, (const VEC *)tw[g]);
            }
            continue;
        }
        for (int i = 1; i < L; i++)
            lane[i] = sc_aesni_mul_xk(lane[i - 1], 1);
        VEC cur = V(from_lanes)(lane);
        for (int j = 0; j < BLOCKS_PER_PAGE; j += GROUP) {
            t[0] = cur;
#pragma GCC unroll 16
            for (int i = 1; i < WAYS; i++)
                t[i] = V(mul_xk)(cur, L * i);
            cur = V(mul_xk)(cur, GROUP);
            FN(blocks)(keys, kr, NR, enc, s + 16 * j, d + 16 * j, t);
        }
    }
}

/* The four bodies, each compiled with its mode and direction constant. */
TARGET static void FN(run)(const sc_memcrypt *e, int enc, const uint8_t *src, uint8_t *dst,
                           const uint64_t *spas, uint64_t spa0, size_t n)
{
    if (e->mode == SC_MEM_AES256_XTS)
        enc ? FN(xts_body)(e, 1, src, dst, spas, spa0, n)
            : FN(xts_body)(e, 0, src, dst, spas, spa0, n);
    else
        enc ? FN(xex_body)(e, 1, src, dst, spas, spa0, n)
            : FN(xex_body)(e, 0, src, dst, spas, spa0, n);
}

#undef MT_CAT_
#undef MT_CAT
#undef V
#undef FN
#undef TARGET
#undef VEC
#undef L
