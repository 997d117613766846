/*
 * SEV transport packets: the crypto of LAUNCH_SECRET, SEND_UPDATE_DATA and RECEIVE_UPDATE_DATA
 * ([FW] AMD-ASPFW sev_mcmd.c launch_secret/send_update/receive_update, sev_channel.c,
 * ccp_direct_cipher.c). Every packet is encrypted with AES-128-CTR under the session TEK and
 * authenticated encrypt-then-MAC with HMAC-SHA256 under the TIK:
 *
 *   CT     = AES-128-CTR(TEK, IV, PT)       IV = the whole 16-byte initial counter block,
 *                                           incremented as a 128-bit big-endian integer
 *   AAD    = ctx || LE32(flags) || IV || LE32(len) || LE32(len)            (29 bytes)
 *   MAC    = HMAC-SHA256(TIK, AAD || CT [|| MEASURE])
 *   header = LE32(flags) || IV || MAC                                      (52 bytes)
 *
 * ctx is 0x02 for SEND/RECEIVE_UPDATE_* and 0x01 for LAUNCH_SECRET, whose MAC input ends with the
 * 32-byte launch MEASURE (API >= 0.17). The firmware never produces flags other than 0 and refuses
 * only COMPRESSED (bit 0), so sealing writes 0 and opening refuses COMPRESSED; other flag bits
 * are covered by the MAC and otherwise ignored, as the firmware ignores them.
 *
 * The batched calls take n packets of one length (the TEK and TIK are the same for a whole
 * session): the HMAC key's inner and outer states are computed once per call, and two packets
 * are hashed at a time, interleaved, on SHA-NI (its rounds are latency bound). Nothing is
 * allocated.
 */
#ifndef SEVCORE_SEVPKT_H
#define SEVCORE_SEVPKT_H

#include "sevcore.h"

/* cdef:begin */
enum {
    SC_SHA256_SIZE = 32,
    SC_SEVPKT_HDR_SIZE = 52,
    SC_SEVPKT_IV_SIZE = 16,
    SC_SEVPKT_MAC_SIZE = 32,
    SC_SEVPKT_AAD_SIZE = 29,
    SC_SEVPKT_MEASURE_SIZE = 32,
    /* The firmware's limit on guest_len/trans_len ([FW] SEV_SCRATCH_BUF_LEN = 0x5000). */
    SC_SEVPKT_MAX_LEN = 20480,
    /* MAC context bytes ([FW] SEV_CHANNEL_CTX_*); VMSA is defined but unused by the firmware. */
    SC_SEVPKT_CTX_SECRET = 1,
    SC_SEVPKT_CTX_DATA = 2,
    SC_SEVPKT_CTX_VMSA = 3,

    /* Which implementation the SHA-256 calls take with the current CPU features. */
    SC_SHA256_IMPL_PORTABLE = 0,
    SC_SHA256_IMPL_SHANI = 1,
};

/* One-shot primitives. msg/src may be NULL when their length is 0. */
int sc_sha256(const uint8_t *msg, size_t len, uint8_t digest[32]);
/* Keys longer than 64 bytes are hashed first (RFC 2104). */
int sc_hmac_sha256(const uint8_t *key, size_t key_len, const uint8_t *msg, size_t len,
                   uint8_t mac[32]);
/* Any length; dst == src (in place) is fine, a partial overlap is -EINVAL (SC_ERR_CTR_OVERLAP in
 * *err, which may be NULL). */
int sc_aes128_ctr(const uint8_t key[16], const uint8_t iv[16], const uint8_t *src, size_t len,
                  uint8_t *dst, struct sc_err *err);

/* The firmware's rule for one packet's length: a non-zero multiple of 16, at most
 * SC_SEVPKT_MAX_LEN. 0, or -EINVAL with SC_ERR_PKT_LEN in *err. The batched calls apply it
 * first; it is exported so that a caller who must size buffers from the length can apply the
 * same rule first too. */
int sc_sevpkt_check_len(size_t len_per_pkt, struct sc_err *err);

/* Seal n packets of len_per_pkt bytes: packet i is pt[i * len ...], its IV ivs[16 * i ...], and
 * it is written as hdrs[52 * i ...] and ct[i * len ...]. measure is NULL or 32 bytes appended to
 * every MAC input. -EINVAL, before any byte is written, with the reason in *err (which may be
 * NULL): a NULL key or buffer (SC_ERR_NULL), a length that is 0, not a multiple of 16 or above
 * SC_SEVPKT_MAX_LEN (SC_ERR_PKT_LEN), sizes that overflow (_COUNT, _STRIDE), or output buffers
 * overlapping inputs (_CT_OVERLAP, _HDRS_OVERLAP, _IVS_OVERLAP; ct == pt, in place, is fine).
 * n == 0 checks the length and does nothing. */
int sc_sevpkt_seal(const uint8_t tek[16], const uint8_t tik[16], uint8_t ctx,
                   const uint8_t *measure, const uint8_t *pt, size_t len_per_pkt, size_t n,
                   const uint8_t *ivs, uint8_t *hdrs, uint8_t *ct, struct sc_err *err);

/* Open n packets sealed as above. Every packet is judged, in order, before anything is written:
 * its MAC (recomputed over ctx, the header's flags and IV, and len_per_pkt as both AAD lengths;
 * compared in constant time), then its flags. The first packet that fails makes the call return
 * -EBADMSG (MAC mismatch; the firmware's BAD_MEASUREMENT; SC_ERR_PKT_MAC) or -EOPNOTSUPP
 * (COMPRESSED set; the firmware's UNSUPPORTED; SC_ERR_PKT_COMPRESSED with the flags as value),
 * with its index in *err and pt untouched. Otherwise every packet is decrypted into pt (pt == ct
 * is fine). Argument errors as sc_sevpkt_seal, and pt overlapping the headers
 * (SC_ERR_PKT_PT_OVERLAP). */
int sc_sevpkt_open(const uint8_t tek[16], const uint8_t tik[16], uint8_t ctx,
                   const uint8_t *measure, const uint8_t *hdrs, const uint8_t *ct,
                   size_t len_per_pkt, size_t n, uint8_t *pt, struct sc_err *err);

/* The same with strided rows: packet i's header is at hdrs + i * hdr_stride and its ciphertext
 * at ct + i * ct_stride (strides at least 52 and len_per_pkt), as in a migration stream's batch
 * record, where headers and ciphertext interleave; the plaintext stays contiguous. Outputs must
 * not share a byte with inputs or each other (checked exactly for rows of one stride); in place
 * (ct == pt) needs ct_stride == len_per_pkt. Otherwise as above. */
int sc_sevpkt_seal_rows(const uint8_t tek[16], const uint8_t tik[16], uint8_t ctx,
                        const uint8_t *measure, const uint8_t *pt, size_t len_per_pkt, size_t n,
                        const uint8_t *ivs, uint8_t *hdrs, size_t hdr_stride, uint8_t *ct,
                        size_t ct_stride, struct sc_err *err);
int sc_sevpkt_open_rows(const uint8_t tek[16], const uint8_t tik[16], uint8_t ctx,
                        const uint8_t *measure, const uint8_t *hdrs, size_t hdr_stride,
                        const uint8_t *ct, size_t ct_stride, size_t len_per_pkt, size_t n,
                        uint8_t *pt, struct sc_err *err);

int sc_sha256_impl(void);
/* The tier (SC_TIER_*) of the AES-128-CTR path. */
int sc_aes128_ctr_impl(void);
/* cdef:end */

#endif
