/*
 * Include the template TEMPLATE once per vector tier of this architecture (csrc/tiers.h: aesni,
 * avx2, avx512 on x86-64; armce on AArch64), with TIER naming the tier. The template's functions
 * carry the tier in their names (run_aesni, ...).
 */
#if defined(SC_X86)
#define TIER aesni
#include TEMPLATE
#undef TIER
#define TIER avx2
#include TEMPLATE
#undef TIER
#define TIER avx512
#include TEMPLATE
#undef TIER
#elif defined(SC_ARM)
#define TIER armce
#include TEMPLATE
#undef TIER
#endif
