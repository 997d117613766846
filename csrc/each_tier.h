/*
 * Include the template TEMPLATE once per x86 tier (csrc/aes.h: aesni, avx2, avx512), with TIER
 * naming the tier. The template's functions carry the tier in their names (run_aesni, ...).
 */
#define TIER aesni
#include TEMPLATE
#undef TIER
#define TIER avx2
#include TEMPLATE
#undef TIER
#define TIER avx512
#include TEMPLATE
#undef TIER
