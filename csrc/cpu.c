/*
 * Run-time CPU feature detection. The kernels are compiled with per-function target
 * attributes, so one binary carries every tier's paths (portable; on x86-64 AES-NI on xmm, AVX2
 * with VAES on ymm, AVX-512 with VAES on zmm; on AArch64 NEON and the Cryptographic Extension);
 * which one runs is chosen here, from CPUID and XCR0 or from the kernel's AT_HWCAP, and can be
 * narrowed (tests and benchmarks force each tier through sc_cpu_restrict).
 */
#include <errno.h>

#include "sevcore.h"

#if defined(__x86_64__) || defined(__i386__)
#include <cpuid.h>

static uint64_t xgetbv0(void)
{
    uint32_t lo, hi;
    __asm__ volatile("xgetbv" : "=a"(lo), "=d"(hi) : "c"(0));
    return ((uint64_t)hi << 32) | lo;
}

/* XCR0 state components (Intel SDM vol. 1 13.1): x87 0, SSE 1, AVX (upper ymm) 2, opmask 5,
 * ZMM_Hi256 6, Hi16_ZMM 7. */
#define XCR0_YMM 0x06u
#define XCR0_ZMM 0xe6u

static uint32_t detect(void)
{
    uint32_t a, b, c, d, f = 0;
    if (!__get_cpuid(1, &a, &b, &c, &d))
        return 0;
    int aes = (c >> 25) & 1, pclmul = (c >> 1) & 1, sse41 = (c >> 19) & 1;
    int popcnt = (c >> 23) & 1, osxsave = (c >> 27) & 1, ssse3 = (c >> 9) & 1;
    int avx = (c >> 28) & 1;
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
    /* xgetbv exists only once the OS has set CR4.OSXSAVE (CPUID.1:ECX bit 27). ymm use needs
     * the OS to save SSE and AVX state (XCR0 bits 1-2); zmm use also opmask, upper-256 and
     * hi-16 zmm state (bits 5-7). A CPU may have the instructions while the OS (or a
     * hypervisor) leaves the state off: then the tier is absent. */
    uint64_t xcr0 = osxsave ? xgetbv0() : 0;
    int ymm_os = avx && (xcr0 & XCR0_YMM) == XCR0_YMM;
    int zmm_os = ymm_os && (xcr0 & XCR0_ZMM) == XCR0_ZMM;
    int avx2 = ymm_os && ((b7 >> 5) & 1);
    int avx512 = avx2 && zmm_os && ((b7 >> 16) & 1) /* F */ && ((b7 >> 17) & 1) /* DQ */ &&
                 ((b7 >> 30) & 1) /* BW */ && ((b7 >> 31) & 1) /* VL */;
    if (avx2)
        f |= SC_CPU_AVX2;
    if (avx512)
        f |= SC_CPU_AVX512;
    /* VAES and VPCLMULQDQ (CPUID.7.0:ECX bits 9 and 10) are VEX-encoded on ymm, EVEX on zmm:
     * Zen 3 and Intel's client cores without AVX-512 have them on ymm only. */
    if (avx2 && ((c7 >> 9) & 1) && ((c7 >> 10) & 1) && (f & SC_CPU_AESNI))
        f |= SC_CPU_VAES;
    if (avx512 && ((c7 >> 14) & 1))
        f |= SC_CPU_VPOPCNTDQ;
    return f;
}

#define TIERS_HERE (1u << SC_TIER_AESNI | 1u << SC_TIER_AVX2 | 1u << SC_TIER_AVX512)
#elif defined(__aarch64__)
#include <sys/auxv.h>

/* The kernel's HWCAP bits for AArch64 (arch/arm64/include/uapi/asm/hwcap.h), named here so that
 * an older libc's headers do not matter. */
#define SC_HWCAP_ASIMD (1ul << 1)
#define SC_HWCAP_AES (1ul << 3)
#define SC_HWCAP_PMULL (1ul << 4)

static uint32_t detect(void)
{
    unsigned long hw = getauxval(AT_HWCAP);
    uint32_t f = 0;
    if (hw & SC_HWCAP_ASIMD)
        f |= SC_CPU_NEON;
    if ((hw & SC_HWCAP_ASIMD) && (hw & SC_HWCAP_AES) && (hw & SC_HWCAP_PMULL))
        f |= SC_CPU_ARMCE;
    return f;
}

#define TIERS_HERE (1u << SC_TIER_NEON | 1u << SC_TIER_ARMCE)
#else
static uint32_t detect(void) { return 0; }
#define TIERS_HERE 0u
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

int64_t sc_cpu_tier_needs(int tier)
{
    static const uint32_t needs[] = {
        [SC_TIER_PORTABLE] = 0,
        [SC_TIER_AESNI] = SC_CPU_AESNI,
        [SC_TIER_AVX2] = SC_CPU_AVX2 | SC_CPU_VAES | SC_CPU_AESNI,
        [SC_TIER_AVX512] = SC_CPU_AVX512 | SC_CPU_AVX2 | SC_CPU_VAES | SC_CPU_AESNI,
        [SC_TIER_NEON] = SC_CPU_NEON,
        [SC_TIER_ARMCE] = SC_CPU_NEON | SC_CPU_ARMCE,
    };
    if (tier < 0 || tier >= (int)(sizeof(needs) / sizeof(needs[0])))
        return -EINVAL;
    if (tier != SC_TIER_PORTABLE && !(TIERS_HERE & (1u << tier)))
        return -EOPNOTSUPP;
    return needs[tier];
}

int sc_cpu_tier(void)
{
    int best = SC_TIER_PORTABLE;
    for (int t = 1; sc_cpu_tier_needs(t) != -EINVAL; t++) {
        int64_t m = sc_cpu_tier_needs(t);
        if (m >= 0 && SC_HAS((uint32_t)m))
            best = t;
    }
    return best;
}

int sc_cpu_vector_tier(void)
{
#if defined(__x86_64__)
    if (SC_HAS(SC_CPU_AVX512))
        return SC_TIER_AVX512;
    if (SC_HAS(SC_CPU_AVX2))
        return SC_TIER_AVX2;
#endif
    return SC_TIER_PORTABLE;
}
