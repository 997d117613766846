/*
 * The SEV memory encryption engine: every 16-byte block of guest memory is encrypted under the
 * key of its ASID as a function of its system physical address (SPA).
 *
 *   SC_MEM_AES128_XEX  the SEV/SEV-ES engine as reverse-engineered by Wilke et al., "SEVurity"
 *                      (IEEE S&P 2020): C = AES-128_K(P ^ T(p)) ^ T(p), where T(p) is the XOR over
 *                      the set bits i >= 4 of the block's SPA p of t[i] repeated four times
 *                      (section III of the paper).
 *   SC_MEM_AES256_XTS  IEEE 1619 XTS-AES-256, one 4096-byte data unit per page, tweak = SPA >> 12
 *                      as a 16-byte little-endian number; byte-identical to OpenSSL aes-256-xts.
 *
 * Pages are processed in batches (one call per many pages) so that the per-call cost from Python
 * disappears; src may equal dst (in place), but must not otherwise overlap it.
 */
#ifndef SEVCORE_MEMCRYPT_H
#define SEVCORE_MEMCRYPT_H

#include "sevcore.h"

/* cdef:begin */
enum {
    SC_MEM_AES128_XEX = 1,
    SC_MEM_AES256_XTS = 2,
    SC_MEM_PAGE_SIZE = 4096,
    SC_MEM_TWEAK_ENTRIES = 64,
};

typedef struct sc_memcrypt sc_memcrypt;

/* key_len: 16 for XEX, 64 (data key || tweak key) for XTS. tweak_table: 64 entries for XEX
 * (entries 0-3 are unused: a 16-byte block is the unit), NULL for XTS. -EINVAL with the reason
 * in *err (SC_ERR_MEM_MODE, _KEY_SIZE, _XEX_TABLE, _XTS_TABLE, _XTS_HALVES), -ENOMEM. */
int sc_memcrypt_new(int mode, const uint8_t *key, size_t key_len, const uint32_t *tweak_table,
                    sc_memcrypt **out, struct sc_err *err);
void sc_memcrypt_free(sc_memcrypt *eng);

/* Encrypt (encrypt != 0) or decrypt the pages of src into dst; both are size bytes, a whole
 * number of pages. Page i lives at spas[i] (sc_memcrypt_pages) or at spa + i * 4096
 * (sc_memcrypt_run, a contiguous run of host frames). Every argument is checked before any byte
 * is written, in this order, and a refusal is -EINVAL with the first failed check in *err: src
 * not whole pages (SC_ERR_MEM_PARTIAL_PAGE), dst of another size (_OUT_SIZE), src and dst
 * partially overlapping (_OVERLAP; src == dst, in place, is fine), a count mismatch
 * (_SPA_COUNT), the first unaligned SPA (_SPA_UNALIGNED, with its index), an unaligned run
 * (_RUN_UNALIGNED) or one past the 64-bit address space (_RUN_END). */
int sc_memcrypt_pages(const sc_memcrypt *eng, int encrypt, const uint8_t *src, size_t src_size,
                      uint8_t *dst, size_t dst_size, const uint64_t *spas, size_t nspas,
                      struct sc_err *err);
/* The argument checks of sc_memcrypt_pages alone, so that a batch split over threads is
 * refused as a whole before any slice is written. */
int sc_memcrypt_check_pages(const sc_memcrypt *eng, const uint8_t *src, size_t src_size,
                            const uint8_t *dst, size_t dst_size, const uint64_t *spas,
                            size_t nspas, struct sc_err *err);
int sc_memcrypt_run(const sc_memcrypt *eng, int encrypt, const uint8_t *src, size_t src_size,
                    uint8_t *dst, size_t dst_size, uint64_t spa, struct sc_err *err);

/* The tier (SC_TIER_*, csrc/sevcore.h) a call takes with the active CPU features. */
int sc_memcrypt_impl(void);
/* cdef:end */

/* For other C kernels (guest-memory access paths): one page, no argument checks. */
void sc_memcrypt_page(const sc_memcrypt *eng, int encrypt, const uint8_t *src, uint8_t *dst,
                      uint64_t spa);

#endif
