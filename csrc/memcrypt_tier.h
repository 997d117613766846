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

/* `ways` registers of blocks from src, each XORed with its tweak t[i], through the cipher
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
                                               uint8_t *dst, const VEC *t, const int ways)
{
    /* Key 0 whitens here where the ISA's rounds add their key last (key_shift 0). */
    VEC b[16];
    VEC k = V(key)(keys, kr, 0), white = V(key_shift) ? (VEC)(k ^ k) : k;
#pragma GCC unroll 16
    for (int i = 0; i < ways; i++)
        b[i] = V(load)(src + 16 * L * i) ^ t[i] ^ white;
    if (V(regs) < 32)
        __asm__ volatile("" : : "r"(t) : "memory");
#pragma GCC unroll 14
    for (int r = 1; r < nr; r++) {
        k = V(key)(keys, kr, r - V(key_shift));
#pragma GCC unroll 16
        for (int i = 0; i < ways; i++)
            b[i] = enc ? V(enc)(b[i], k) : V(dec)(b[i], k);
    }
    VEC kpen = V(key)(keys, kr, nr - 1);
    k = V(key)(keys, kr, nr);
#pragma GCC unroll 16
    for (int i = 0; i < ways; i++)
        V(store)(dst + 16 * L * i, enc ? V(enclast)(b[i], kpen, k ^ t[i])
                                       : V(declast)(b[i], kpen, k ^ t[i]));
}

TARGET static SC_ALWAYS_INLINE void FN(xex_body)(const sc_memcrypt *e, const int enc,
                                                 const uint8_t *src, uint8_t *dst,
                                                 const uint64_t *spas, uint64_t spa0, size_t n)
{
    enum { NR = 10 }; /* XEX is AES-128 */
    _Static_assert(BLOCKS_PER_PAGE % (L * WAYS) == 0, "a page is whole groups");
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
            FN(blocks)(keys, kr, NR, enc, s + 16 * j, d + 16 * j, t, WAYS);
        }
    }
}


/* XTS on xmm (L == 1): the blocks of up to CHUNK pages as one stream, in groups of STREAM_WAYS = 12
 * that may straddle pages (src and dst are contiguous). With 8 blocks in flight a group's rounds
 * exactly fill the AES units' latency (14 rounds of 4 cycles, two issued per cycle), so any
 * stall shows; 12 leave slack and still fit the 16 xmm registers with a round key (16 spilled).
 * On an AMD EPYC Zen 4 this ran at 1.74-1.77 M pages/s against 1.66-1.68 for 8 per page.
 *
 * The tweaks are computed in the general-purpose registers, one group ahead, into tw: the
 * multiply by x is a shift, a shift-double and a conditional XOR of 0x87 on the integer ALUs,
 * which AES-bound code leaves idle, where the vector multiply (sc_TIER_mul_xk) costs seven vector
 * instructions per block, one a PCLMULQDQ competing with AESENC for the same pipes (14 % slower
 * on Zen 4). A group is read long after it was stored, so store forwarding is not involved. Each
 * page's T0 is computed up front for the chunk: CHUNK independent 14-round chains. */
struct FN(stream) {
    uint64_t lo, hi;                /* the tweak of the next block */
    int page, block;                /* and where that block is */
    const uint8_t (*t0)[16];        /* each page's T0 */
};

static SC_ALWAYS_INLINE void FN(stream_tweaks)(uint64_t (*tw)[2], int count,
                                               struct FN(stream) *st)
{
    uint64_t lo = st->lo, hi = st->hi;
    for (int i = 0; i < count; i++) {
        tw[i][0] = lo, tw[i][1] = hi;
        if (++st->block == BLOCKS_PER_PAGE) {
            st->block = 0;
            st->page++;
            memcpy(&lo, st->t0[st->page], 8);
            memcpy(&hi, st->t0[st->page] + 8, 8);
        } else {
            uint64_t carry = (uint64_t)((int64_t)hi >> 63) & 0x87;
            hi = hi << 1 | lo >> 63;
            lo = lo << 1 ^ carry;
        }
    }
    st->lo = lo, st->hi = hi;
}

TARGET static SC_ALWAYS_INLINE void FN(xts_stream)(const sc_memcrypt *e, const int enc,
                                                   const uint8_t *src, uint8_t *dst,
                                                   const uint64_t *spas, uint64_t spa0, size_t n)
{
    enum { NR = 14, STREAM_WAYS = 12, CHUNK = 32 };
    const uint8_t(*keys)[16] = enc ? e->ek : e->dk;
    VEC kr[NR + 1];
    _Alignas(64) uint64_t tw[2][STREAM_WAYS][2];
    _Alignas(16) uint8_t t0[CHUNK + 1][16] = {{0}}; /* t0[m]: read past the last page, unused */
    V(keys)(keys, NR, kr);
    for (size_t c = 0; c < n; c += CHUNK) {
        size_t m = n - c < CHUNK ? n - c : CHUNK;
        for (size_t i = 0; i < m; i++) {
            uint64_t spa = spas ? spas[c + i] : spa0 + (uint64_t)(c + i) * PAGE;
            uint64_t unit[2] = {spa >> 12, 0}; /* little-endian on x86 and AArch64 Linux */
            sc_encrypt_block(e->tk, NR, (const uint8_t *)unit, t0[i]);
        }
        memset(t0[m], 0, 16);
        struct FN(stream) st = {0, 0, 0, 0, (const uint8_t(*)[16])t0};
        memcpy(&st.lo, t0[0], 8);
        memcpy(&st.hi, t0[0] + 8, 8);
        const uint8_t *s = src + c * PAGE;
        uint8_t *d = dst + c * PAGE;
        /* m * 256 blocks: groups of 12, then 0, 4 or 8. While the group after the next is
         * whole too, the next group's tweaks are made with a constant count, so that their loop
         * unrolls; the last whole group and the rest follow. */
        size_t total = m * BLOCKS_PER_PAGE, b = 0;
        int g = 0;
        FN(stream_tweaks)(tw[0], STREAM_WAYS, &st);
        for (; b + 2 * STREAM_WAYS <= total; b += STREAM_WAYS, g ^= 1) {
            FN(stream_tweaks)(tw[g ^ 1], STREAM_WAYS, &st);
            FN(blocks)(keys, kr, NR, enc, s + 16 * b, d + 16 * b, (const VEC *)tw[g],
                       STREAM_WAYS);
        }
        int rest = (int)(total - b - STREAM_WAYS);
        if (rest)
            FN(stream_tweaks)(tw[g ^ 1], rest, &st);
        FN(blocks)(keys, kr, NR, enc, s + 16 * b, d + 16 * b, (const VEC *)tw[g], STREAM_WAYS);
        b += STREAM_WAYS;
        if (rest == 8)
            FN(blocks)(keys, kr, NR, enc, s + 16 * b, d + 16 * b, (const VEC *)tw[g ^ 1], 8);
        else if (rest == 4)
            FN(blocks)(keys, kr, NR, enc, s + 16 * b, d + 16 * b, (const VEC *)tw[g ^ 1], 4);
    }
}

/* XTS: block j of a page has tweak T0 * x^j (IEEE 1619 5.3.1), T0 = AES_K2(page number). On xmm,
 * xts_stream; on ymm and zmm, page by page: T0 of the next page is computed one page ahead, so
 * that its 14 dependent rounds overlap this page's work instead of stalling the start of the
 * next, and every tweak of a group is the group's base times a small power of x, so the chain
 * from group to group is one multiply long. */
TARGET static SC_ALWAYS_INLINE void FN(xts_body)(const sc_memcrypt *e, const int enc,
                                                 const uint8_t *src, uint8_t *dst,
                                                 const uint64_t *spas, uint64_t spa0, size_t n)
{
    enum { NR = 14, GROUP = L * WAYS }; /* XTS here is always AES-256 */
    _Static_assert(GROUP <= 56, "sc_*_mul_xk multiplies by x^k for k <= 56 only");
    _Static_assert(BLOCKS_PER_PAGE % GROUP == 0, "a page is whole groups");
#if MT_CAT(SC_LANES, TIER) == 1
    FN(xts_stream)(e, enc, src, dst, spas, spa0, n);
#else
    const uint8_t(*keys)[16] = enc ? e->ek : e->dk;
    VEC t[WAYS], kr[NR + 1];
    __m128i lane[4];
    V(keys)(keys, NR, kr);
    __m128i t0_next = sc_aesni_encrypt1(
        e->tk, NR, _mm_set_epi64x(0, (long long)((spas ? spas[0] : spa0) >> 12)));
    for (size_t p = 0; p < n; p++) {
        lane[0] = t0_next;
        if (p + 1 < n) {
            uint64_t next = spas ? spas[p + 1] : spa0 + (uint64_t)(p + 1) * PAGE;
            t0_next = sc_aesni_encrypt1(e->tk, NR, _mm_set_epi64x(0, (long long)(next >> 12)));
        }
        for (int i = 1; i < L; i++)
            lane[i] = sc_aesni_mul_xk(lane[i - 1], 1);
        VEC cur = V(from_lanes)(lane);
        const uint8_t *s = src + p * PAGE;
        uint8_t *d = dst + p * PAGE;
        for (int j = 0; j < BLOCKS_PER_PAGE; j += GROUP) {
            t[0] = cur;
#pragma GCC unroll 16
            for (int i = 1; i < WAYS; i++)
                t[i] = V(mul_xk)(cur, L * i);
            cur = V(mul_xk)(cur, GROUP);
            FN(blocks)(keys, kr, NR, enc, s + 16 * j, d + 16 * j, t, WAYS);
        }
    }
#endif
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
