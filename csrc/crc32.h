/*
 * CRC-32 as zlib computes it (ISO-HDLC: the bit-reflected polynomial 0x04C11DB7, register
 * preset to ~0 and inverted at the end), for the migration stream's frame checksums.
 *
 * zlib's table code runs at about 1 byte per cycle; folding with carry-less multiplies (Gopal
 * et al., "Fast CRC Computation for Generic Polynomials Using PCLMULQDQ Instruction", Intel,
 * 2009) keeps four 128-bit lanes in flight and runs several times faster, so a 4 KiB page costs
 * a fraction of what copying it does. The portable path is slicing-by-8 over the same table.
 */
#ifndef SEVCORE_CRC32_H
#define SEVCORE_CRC32_H

#include "sevcore.h"

/* cdef:begin */
/* zlib's crc32(crc, buf, len): the CRC of buf continued from crc (0 for a fresh one), in
 * [0, 2**32), or -EINVAL for a NULL buf with len > 0. */
int64_t sc_crc32(uint32_t crc, const uint8_t *buf, size_t len);
/* The tier (SC_TIER_*) a call takes with the active CPU features. */
int sc_crc32_impl(void);
/* cdef:end */

#endif
