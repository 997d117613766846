/*
 * Run-time CPU feature detection. The kernels are compiled with per-function target
 * attributes, so one binary carries the portable, AES-NI and VAES/AVX-512 paths; which one
 * runs is chosen here, and can be narrowed (tests force the portable path with mask 0).
 */
#include "sevcore.h"

#if defined(__x86_64__) || defined(__i386__)
#include <cpuid.h>

static uint64_t xgetbv0(void)
{
    uint32_t lo, hi;
    __asm__ volatile("xgetbv" : "=a"(lo), "=d"(hi) : "c"(0));
    return ((uint64_t)hi << 32) | lo;
}

static uint32_t detect(void)
{
    uint32_t a, b, c, d, f = 0;
    if (!__get_cpuid(1, &a, &b, &c, &d))
        return 0;
    int aes = (c >> 25) & 1, pclmul = (c >> 1) & 1, sse41 = (c >> 19) & 1;
    int popcnt = (c >> 23) & 1, osxsave = (c >> 27) & 1, ssse3 = (c >> 9) & 1;
    if (aes && pclmul && sse41)
        f |= SC_CPU_AESNI;
    uint32_t b7 = 0, c7 = 0, d7 = 0;
    if (__get_cpuid_max(0, 0) >= 7) {
        __cpuid_count(7, 0, a, b7, c7, d7);
    }
    int bmi1 = (b7 >> 3) & 1;
    if (popcnt && bmi1)
        f |= SC_CPU_POPCNT;
    /* The SHA-NI kernels also shuffle with SSSE3 and blend with SSE4.1. */
    if (((b7 >> 29) & 1) && ssse3 && sse41)
        f |= SC_CPU_SHANI;
    /* zmm use needs the OS to save opmask, upper-256 and hi-16 zmm state (XCR0 bits 5-7)
     * besides SSE and AVX state (bits 1-2). */
    int zmm_os = osxsave && ((xgetbv0() & 0xe6) == 0xe6);
    int avx512 = zmm_os && ((b7 >> 16) & 1) /* F */ && ((b7 >> 17) & 1) /* DQ */ &&
                 ((b7 >> 30) & 1) /* BW */ && ((b7 >> 31) & 1) /* VL */;
    if (avx512) {
        f |= SC_CPU_AVX512;
        if (((c7 >> 9) & 1) && ((c7 >> 10) & 1) && (f & SC_CPU_AESNI))
            f |= SC_CPU_VAES;
        if ((c7 >> 14) & 1)
            f |= SC_CPU_VPOPCNTDQ;
    }
    return f;
}
#else
static uint32_t detect(void) { return 0; }
#endif

static uint32_t sc_cpu_features_detected;
uint32_t sc_cpu_features_active;

__attribute__((constructor)) static void sc_cpu_init(void)
{
    sc_cpu_features_detected = detect();
    sc_cpu_features_active = sc_cpu_features_detected;
}

int sc_abi_version(void) { return SC_ABI_VERSION; }
uint32_t sc_cpu_detected(void) { return sc_cpu_features_detected; }
uint32_t sc_cpu_active(void) { return sc_cpu_features_active; }

uint32_t sc_cpu_restrict(uint32_t mask)
{
    sc_cpu_features_active = sc_cpu_features_detected & mask;
    return sc_cpu_features_active;
}
