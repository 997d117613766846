/*
 * SHA-384 of MB_LANES 4 KiB pages at once, one page per 64-bit lane of a GCC vector (the
 * multi-buffer form of FIPS 180-4 6.4: every lane runs the same rounds on its own message, so
 * the pages of a launch are hashed side by side). Included by csrc/snp_ld.c once per width with
 * MB_LANES, MB_NAME and MB_TARGET defined (one lane is the single-message compression function);
 * internal, not part of the cffi cdef.
 */
typedef uint64_t MB_V(MB_NAME) __attribute__((vector_size(8 * MB_LANES)));

#define VROR(x, n) (((x) >> (n)) | ((x) << (64 - (n))))
#define VROUND(a, b, c, d, e, f, g, h, t)                                                    \
    do {                                                                                     \
        MB_V(MB_NAME) t1 = h + (VROR(e, 14) ^ VROR(e, 18) ^ VROR(e, 41))                     \
            + ((e & f) ^ (~e & g)) + K[t] + w[(t) & 15];                                     \
        d += t1;                                                                             \
        h = t1 + (VROR(a, 28) ^ VROR(a, 34) ^ VROR(a, 39)) + ((a & b) ^ (a & c) ^ (b & c));  \
    } while (0)
#define VSCHED(t)                                                                            \
    do {                                                                                     \
        MB_V(MB_NAME) x = w[((t) - 15) & 15], y = w[((t) - 2) & 15];                         \
        w[(t) & 15] += (VROR(x, 1) ^ VROR(x, 8) ^ (x >> 7)) + w[((t) - 7) & 15]              \
            + (VROR(y, 19) ^ VROR(y, 61) ^ (y >> 6));                                        \
    } while (0)

MB_TARGET static void MB_FN(MB_NAME)(MB_V(MB_NAME) s[8], MB_V(MB_NAME) w[16])
{
    MB_V(MB_NAME) a = s[0], b = s[1], c = s[2], d = s[3], e = s[4], f = s[5], g = s[6],
                  h = s[7];
    for (int t = 0; t < 80; t += 8) {
        if (t >= 16)
            for (int i = 0; i < 8; i++)
                VSCHED(t + i);
        VROUND(a, b, c, d, e, f, g, h, t);
        VROUND(h, a, b, c, d, e, f, g, t + 1);
        VROUND(g, h, a, b, c, d, e, f, t + 2);
        VROUND(f, g, h, a, b, c, d, e, t + 3);
        VROUND(e, f, g, h, a, b, c, d, t + 4);
        VROUND(d, e, f, g, h, a, b, c, t + 5);
        VROUND(c, d, e, f, g, h, a, b, t + 6);
        VROUND(b, c, d, e, f, g, h, a, t + 7);
    }
    s[0] += a; s[1] += b; s[2] += c; s[3] += d; s[4] += e; s[5] += f; s[6] += g; s[7] += h;
}

#if MB_LANES > 1
/* SHA-384 of the MB_LANES pages pages[i] into out + 48 * i. */
MB_TARGET static void MB_PAGES(MB_NAME)(const uint8_t *const *pages, uint8_t *out)
{
    MB_V(MB_NAME) s[8], w[16];
    for (int k = 0; k < 8; k++)
        for (int l = 0; l < MB_LANES; l++)
            s[k][l] = IV384[k];
    for (int blk = 0; blk < 4096 / 128; blk++) {
        for (int t = 0; t < 16; t++)
            for (int l = 0; l < MB_LANES; l++)
                w[t][l] = load_be(pages[l] + 128 * blk + 8 * t);
        MB_FN(MB_NAME)(s, w);
    }
    /* The padding block is the same for every 4 KiB message: 0x80, zeros, 32768 bits. */
    for (int t = 0; t < 16; t++)
        for (int l = 0; l < MB_LANES; l++)
            w[t][l] = t == 0 ? 0x8000000000000000ull : t == 15 ? 4096ull * 8 : 0;
    MB_FN(MB_NAME)(s, w);
    for (int l = 0; l < MB_LANES; l++) {
        uint64_t h[8];
        for (int k = 0; k < 8; k++)
            h[k] = s[k][l];
        digest_out(h, out + 48 * l);
    }
}
#endif

#undef VROR
#undef VROUND
#undef VSCHED
