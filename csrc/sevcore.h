/*
 * sevcore native core: common definitions, ABI version and CPU feature dispatch.
 *
 * Every exported function carries the sc_ prefix and returns 0 (or a count) on success and a
 * negative errno on failure. The block between the cdef markers is also the cffi cdef
 * (csrc/build_native.py), so it must stay within the C subset cffi parses.
 */
#ifndef SEVCORE_H
#define SEVCORE_H

#include <stddef.h>
#include <stdint.h>

/* cdef:begin */
enum {
    /* Bumped whenever a signature or struct in any csrc header changes; sevcore/_bindings.py
     * refuses to load a module whose value differs from the one it was written for. */
    SC_ABI_VERSION = 8,

    /* CPU features the kernels dispatch on (a bit mask). */
    SC_CPU_AESNI = 1,      /* AES-NI + PCLMULQDQ + SSE4.1 (also the CRC-32 folding path) */
    SC_CPU_AVX512 = 2,     /* AVX-512 F/BW/VL/DQ with OS-enabled zmm state */
    SC_CPU_VAES = 4,       /* VAES + VPCLMULQDQ on zmm (requires SC_CPU_AVX512) */
    SC_CPU_POPCNT = 8,     /* POPCNT + BMI1 (tzcnt) */
    SC_CPU_VPOPCNTDQ = 16, /* AVX512_VPOPCNTDQ (requires SC_CPU_AVX512) */
    SC_CPU_SHANI = 32,     /* SHA extensions + SSSE3 + SSE4.1 */
};

int sc_abi_version(void);
/* What the CPU and OS support. */
uint32_t sc_cpu_detected(void);
/* What the kernels use: detected & mask. sc_cpu_restrict(0) forces every portable path. */
uint32_t sc_cpu_active(void);
uint32_t sc_cpu_restrict(uint32_t mask);
/* cdef:end */

/* Internal: the active feature set, read by every dispatching kernel. */
extern uint32_t sc_cpu_features_active;

#define SC_HAS(f) ((sc_cpu_features_active & (f)) == (f))

/* Internal: do the byte ranges [a, a + alen) and [b, b + blen) share a byte? An empty range
 * shares none. The kernels refuse outputs that partially overlap their inputs with it. Compared
 * as integers: relational operators on pointers into different objects are undefined (C11
 * 6.5.8p5). */
static inline int sc_overlaps(const void *a, size_t alen, const void *b, size_t blen)
{
    uintptr_t x = (uintptr_t)a, y = (uintptr_t)b;
    return alen && blen && x < y + blen && y < x + alen;
}

#endif
