/*
 * The SEV-SNP launch digest: the SHA-384 chain over PAGE_INFO structures that SNP_LAUNCH_UPDATE
 * extends once per page (AMD publication 56860, 8.17 "PAGE_INFO"). Each page replaces the digest
 * LD with SHA-384(PAGE_INFO), where PAGE_INFO (0x70 bytes) is LD, the page's CONTENTS (the
 * SHA-384 of the page for NORMAL and VMSA pages, zero for the other types) and a 16-byte tail:
 * LENGTH, PAGE_TYPE, IMI_PAGE, VMPL3..1 permissions, a reserved byte and the GPA.
 *
 * SHA-384 is FIPS 180-4's (SHA-512 with its own initial value, truncated to 48 bytes), written
 * here for the one short message the chain hashes per page; the page contents are hashed by the
 * caller.
 */
#ifndef SEVCORE_SNP_LD_H
#define SEVCORE_SNP_LD_H

#include "sevcore.h"

/* cdef:begin */
enum {
    SC_SNP_LD_SIZE = 48,            /* a SHA-384 digest */
    SC_SNP_PAGE_INFO_TAIL = 16,     /* PAGE_INFO after DIGEST_CUR and CONTENTS */
};

/* SHA-384 of len bytes at msg into out[48]. */
void sc_sha384(const uint8_t *msg, size_t len, uint8_t *out);

/* SHA-384 of the n 4 KiB frames pfns[i] of the nframes at frames, into out + 48 i: several
 * pages side by side, one per vector lane (8 on the avx512 tier, 4 on avx2, 2 portable). 0, or
 * -EINVAL (SC_ERR_NULL; SC_ERR_NPT_PFNS for a pfn past nframes), out unchanged. */
int sc_sha384_pages(const uint8_t *frames, uint64_t nframes, const uint64_t *pfns, size_t n,
                    uint8_t *out, struct sc_err *err);
/* The tier sc_sha384_pages runs on (SC_TIER_*). */
int sc_sha384_pages_impl(void);

/* Extend the launch digest ld[48] in place by n pages: for page i, ld = SHA-384(ld ||
 * contents[48 i .. 48 i + 48] || tails[16 i .. 16 i + 16]); contents NULL means 48 zero bytes for
 * every page (ZERO, UNMEASURED, SECRETS and CPUID pages). 0, or -EINVAL (SC_ERR_NULL) for a
 * NULL ld or tails with n > 0, ld unchanged. */
int sc_snp_ld_extend(uint8_t *ld, const uint8_t *contents, const uint8_t *tails, size_t n,
                     struct sc_err *err);
/* cdef:end */

#endif
