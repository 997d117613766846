/*
 * AES-128-CTR's vector paths, written once and included by sevpkt.c once per x86 tier with TIER
 * (aesni, avx2, avx512: the vocabulary of csrc/aes.h) and WAYS (registers in flight) defined. It
 * defines ctr_TIER. Not a header of its own: no include guard.
 */
#define CT_CAT_(a, b) a##_##b
#define CT_CAT(a, b) CT_CAT_(a, b)
#define V(op) CT_CAT(CT_CAT(sc, TIER), op)
#define U V(u64)
#define VEC V(v)
#define L V(lanes)
#define FN(name) CT_CAT(name, TIER)
#define TARGET CT_CAT(SC_TARGET, TIER)

/* The keystream for the counter registers c[0..ways) (qwords hi, lo per lane, host order)
 * XORed with src into dst, ways * L blocks. The XOR with src is folded into the last round key
 * (FIPS-197 5.1.4: the last round ends with AddRoundKey). */
TARGET static SC_ALWAYS_INLINE void FN(ctr_blocks)(const uint8_t (*keys)[16], const VEC *kr,
                                                   const U *c, const int ways,
                                                   const uint8_t *src, uint8_t *dst)
{
    enum { NR = 10 };
    /* Each qword byte-reversed: the lane (hi, lo) becomes the 16 bytes BE(hi) || BE(lo). */
    static const uint8_t rev[16] = {7, 6, 5, 4, 3, 2, 1, 0, 15, 14, 13, 12, 11, 10, 9, 8};
    const VEC swap = V(bcast)(rev);
    /* Key 0 whitens here where the ISA's rounds add their key last (key_shift 0). */
    VEC b[WAYS], k = V(key)(keys, kr, 0), white = V(key_shift) ? (VEC)(k ^ k) : k;
#pragma GCC unroll 16
    for (int i = 0; i < ways; i++)
        b[i] = V(shuffle8)((VEC)c[i], swap) ^ white;
#pragma GCC unroll 10
    for (int r = 1; r < NR; r++) {
        k = V(key)(keys, kr, r - V(key_shift));
#pragma GCC unroll 16
        for (int i = 0; i < ways; i++)
            b[i] = V(enc)(b[i], k);
    }
    VEC kpen = V(key)(keys, kr, NR - 1);
    k = V(key)(keys, kr, NR);
#pragma GCC unroll 16
    for (int i = 0; i < ways; i++)
        V(store)(dst + 16 * L * i, V(enclast)(b[i], kpen, k ^ V(load)(src + 16 * L * i)));
}

/* The counter registers for the ways * L blocks from (hi, lo): lane j of register i holds the
 * counter plus L * i + j. Vector adds to the low qword when no carry reaches hi inside the
 * group (all but one group in 2^64 / (ways * L)), else one block at a time. */
TARGET static SC_ALWAYS_INLINE void FN(ctr_counters)(uint64_t hi, uint64_t lo, U *c,
                                                        const int ways)
{
    if (lo <= UINT64_MAX - (uint64_t)(ways * L - 1)) {
        U zero = {0}, base = zero + hi, step = zero;
#pragma GCC unroll 4
        for (int j = 0; j < L; j++) {
            base[2 * j + 1] = lo + (uint64_t)j;
            step[2 * j + 1] = L;
        }
#pragma GCC unroll 16
        for (int i = 0; i < ways; i++)
            c[i] = base + step * (uint64_t)i;
        return;
    }
    uint64_t q[2 * L * WAYS];
    for (int i = 0; i < ways * L; i++) {
        q[2 * i] = hi, q[2 * i + 1] = lo;
        ctr_advance(&hi, &lo, 1);
    }
    for (int i = 0; i < ways; i++)
        c[i] = (U)V(load)(q + 2 * L * i);
}

TARGET static void FN(ctr)(const struct ctr_key *key, uint64_t hi, uint64_t lo,
                              const uint8_t *src, uint8_t *dst, size_t len)
{
    U c[WAYS];
    VEC kr[11];
    V(keys)(key->ek, 10, kr);
    size_t off = 0;
    for (; len - off >= 16 * L * WAYS; off += 16 * L * WAYS) {
        FN(ctr_counters)(hi, lo, c, WAYS);
        ctr_advance(&hi, &lo, L * WAYS);
        FN(ctr_blocks)(key->ek, kr, c, WAYS, src + off, dst + off);
    }
    /* The rest one register at a time; a final partial register goes through a buffer. */
    for (; off < len; off += 16 * L) {
        FN(ctr_counters)(hi, lo, c, 1);
        ctr_advance(&hi, &lo, L);
        if (len - off >= 16 * L) {
            FN(ctr_blocks)(key->ek, kr, c, 1, src + off, dst + off);
        } else {
            uint8_t buf[16 * L];
            memcpy(buf, src + off, len - off);
            FN(ctr_blocks)(key->ek, kr, c, 1, buf, buf);
            memcpy(dst + off, buf, len - off);
        }
    }
}

#undef CT_CAT_
#undef CT_CAT
#undef V
#undef U
#undef VEC
#undef L
#undef FN
#undef TARGET
