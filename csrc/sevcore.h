/*
 * sevcore native core: common definitions, ABI version and CPU feature dispatch.
 *
 * Every exported function carries the sc_ prefix and returns 0 (or a count) on success and a
 * negative errno on failure. The block between the cdef markers is also the cffi cdef
 * (csrc/build_native.py), so it must stay within the C subset cffi parses.
 *
 * A kernel that checks many things before it writes anything also says which check refused the
 * call: it takes a `struct sc_err *` and, on failure, writes the reason (SC_ERR_*), the offending
 * item of a batch and the values involved. sevcore/_bindings.py turns (errno, reason) into the
 * exception and its message with one table, so no check is restated in Python to explain a
 * refusal.
 */
#ifndef SEVCORE_H
#define SEVCORE_H

#include <stddef.h>
#include <stdint.h>

/* cdef:begin */
enum {
    /* Bumped whenever a signature or struct in any csrc header changes; sevcore/_bindings.py
     * refuses to load a module whose value differs from the one it was written for. */
    SC_ABI_VERSION = 13,

    /* CPU features the kernels dispatch on (a bit mask). Each is reported only when the OS
     * also saves the register state it needs (XCR0, read with xgetbv: Intel SDM vol. 1 13.3,
     * AMD APM vol. 2 11.5.2). */
    SC_CPU_AESNI = 1,      /* AES-NI + PCLMULQDQ + SSE4.1 (also the CRC-32 folding path) */
    SC_CPU_AVX512 = 2,     /* AVX-512 F/BW/VL/DQ + AVX2, with opmask and zmm state saved */
    SC_CPU_VAES = 4,       /* VAES + VPCLMULQDQ + AES-NI with ymm state saved: on ymm
                            * registers with SC_CPU_AVX2, on zmm with SC_CPU_AVX512 */
    SC_CPU_POPCNT = 8,     /* POPCNT + BMI1 (tzcnt) */
    SC_CPU_VPOPCNTDQ = 16, /* AVX512_VPOPCNTDQ (requires SC_CPU_AVX512) */
    SC_CPU_SHANI = 32,     /* SHA extensions + SSSE3 + SSE4.1 */
    SC_CPU_AVX2 = 64,      /* AVX + AVX2 with xmm and ymm state saved (XCR0 bits 1-2) */
    SC_CPU_NEON = 128,     /* AArch64 Advanced SIMD (HWCAP_ASIMD) */
    SC_CPU_ARMCE = 256,    /* AArch64 AESE/AESD/AESMC/AESIMC and PMULL (HWCAP_AES, _PMULL) */

    /* Tiers: the instruction sets a kernel's paths are written for, fastest last. A kernel
     * runs its path of the highest tier whose features (sc_cpu_tier_needs) are active and
     * reports it through its *_impl() call. SHA-256 (SHA-NI) and the scalar POPCNT scans are
     * extras beside the tiers: they run with whatever tier is active. */
    SC_TIER_PORTABLE = 0,  /* plain C, every target */
    SC_TIER_AESNI = 1,     /* x86-64: AES-NI and PCLMULQDQ on xmm */
    SC_TIER_AVX2 = 2,      /* x86-64: AVX2, VAES and VPCLMULQDQ on ymm */
    SC_TIER_AVX512 = 3,    /* x86-64: AVX-512, VAES and VPCLMULQDQ on zmm */
    SC_TIER_NEON = 4,      /* AArch64: Advanced SIMD */
    SC_TIER_ARMCE = 5,     /* AArch64: the ARMv8 Cryptographic Extension's AES and PMULL */
};

/* Why a call was refused (struct sc_err.reason). Each reason comes with one errno, named here;
 * what the other fields of struct sc_err hold for it follows the colon. */
enum {
    SC_ERR_NONE = 0,                /* the errno says it all (-ENOMEM ...) */
    SC_ERR_NULL = 1,                /* EINVAL: a pointer the call needs is NULL */
    SC_ERR_MISALIGNED = 2,          /* EINVAL: a uint64_t array is not 8-byte aligned */

    /* csrc/memcrypt.h */
    SC_ERR_MEM_MODE = 10,           /* EINVAL: value = the mode */
    SC_ERR_MEM_KEY_SIZE = 11,       /* EINVAL: value = key bytes, limit = what the mode takes */
    SC_ERR_MEM_XEX_TABLE = 12,      /* EINVAL: XEX without a tweak table */
    SC_ERR_MEM_XTS_TABLE = 13,      /* EINVAL: XTS with a tweak table */
    SC_ERR_MEM_XTS_HALVES = 14,     /* EINVAL: XTS key halves equal */
    SC_ERR_MEM_PARTIAL_PAGE = 15,   /* EINVAL: value = src bytes, limit = the page size */
    SC_ERR_MEM_OUT_SIZE = 16,       /* EINVAL: value = dst bytes, limit = src bytes */
    SC_ERR_MEM_OVERLAP = 17,        /* EINVAL: dst overlaps src without being it */
    SC_ERR_MEM_SPA_COUNT = 18,      /* EINVAL: value = SPAs given, limit = pages */
    SC_ERR_MEM_SPA_UNALIGNED = 19,  /* EINVAL: index = page, value = its SPA */
    SC_ERR_MEM_RUN_UNALIGNED = 20,  /* EINVAL: value = the run's first SPA */
    SC_ERR_MEM_RUN_END = 21,        /* EINVAL: value = first SPA, count = pages */

    /* csrc/guest.h */
    SC_ERR_GUEST_OP = 30,           /* EINVAL: value = the op */
    SC_ERR_GUEST_COUNT = 31,        /* EINVAL: value = n, limit = pages in the guest space */
    SC_ERR_GUEST_BUF_SIZE = 32,     /* EINVAL: value = buf bytes, limit = bytes the op needs,
                                     * count = n */
    SC_ERR_GUEST_BUF_OVERLAP = 33,  /* EINVAL: buf overlaps the frames or the gfns */
    SC_ERR_GUEST_OUT_SIZE = 34,     /* EINVAL: value = out words, limit = words the op needs,
                                     * count = n */
    SC_ERR_GUEST_OUT_OVERLAP = 35,  /* EINVAL: out overlaps the frames or the gfns */
    SC_ERR_GUEST_GFN = 36,          /* EINVAL: index = page, value = its gfn, limit = 2^36 */
    SC_ERR_GUEST_RUN = 37,          /* EINVAL: value = gfn0, count = n, limit = 2^36 */
    SC_ERR_GUEST_SLOT = 38,         /* EINVAL: index = slot, value = base_gfn, count = npages,
                                     * limit = 2^36 */
    SC_ERR_GUEST_SLOT_ORDER = 39,   /* EINVAL: index = slot, value = base_gfn, count = npages,
                                     * limit = the end of the slot before it */
    SC_ERR_GUEST_UNLOGGED = 40,     /* EINVAL: index = page, value = its gfn */
    SC_ERR_GUEST_FRAME = 41,        /* EFAULT: index = page, value = its pfn, limit = frames */
    SC_ERR_RING_SIZE = 42,          /* EINVAL: value = a dirty ring's entries, not a power of 2 */

    /* csrc/sevpkt.h */
    SC_ERR_PKT_LEN = 50,            /* EINVAL: value = packet length, limit = SC_SEVPKT_MAX_LEN */
    SC_ERR_PKT_COUNT = 51,          /* EINVAL: value = packets, limit = the most size_t holds */
    SC_ERR_PKT_STRIDE = 52,         /* EINVAL: value = a row stride, limit = the row's length */
    SC_ERR_PKT_CT_OVERLAP = 53,     /* EINVAL: plaintext and ciphertext overlap, not in place */
    SC_ERR_PKT_HDRS_OVERLAP = 54,   /* EINVAL: headers out overlap an input or the ciphertext */
    SC_ERR_PKT_IVS_OVERLAP = 55,    /* EINVAL: ciphertext out overlaps the IVs */
    SC_ERR_PKT_PT_OVERLAP = 56,     /* EINVAL: plaintext out overlaps the headers */
    SC_ERR_PKT_MAC = 57,            /* EBADMSG: index = packet */
    SC_ERR_PKT_COMPRESSED = 58,     /* EOPNOTSUPP: index = packet, value = its flags */
    SC_ERR_CTR_OVERLAP = 59,        /* EINVAL: dst overlaps src without being it */

    /* csrc/npt.h */
    SC_ERR_NPT_GFN = 70,            /* EINVAL: value = gfn, limit = 2^36 */
    SC_ERR_NPT_NPAGES = 71,         /* EINVAL: value = npages, limit = 2^36 - gfn */
    SC_ERR_NPT_PFN = 72,            /* EINVAL: value = pfn, count = npages, limit = 2^40 */
    SC_ERR_NPT_FLAGS = 73,          /* EINVAL: value = flags, limit = SC_NPT_FLAGS_MASK */
    SC_ERR_NPT_CLEAR_PRESENT = 74,  /* EINVAL: protect_range asked to clear SC_NPT_PRESENT */
    SC_ERR_NPT_GFNS = 75,           /* EINVAL: index = item, value = its gfn, limit = 2^36 */
    SC_ERR_NPT_BOUND = 76,          /* EINVAL: value = a start or end gfn, limit = 2^36 */
    SC_ERR_NPT_PFNS = 77,           /* EINVAL: index = item, value = its pfn, limit = 2^40 */

    /* csrc/rmp.h */
    SC_ERR_RMP_PFN = 90,            /* EINVAL: index = item, value = its pfn, limit = frames */
    SC_ERR_RMP_STATE = 91,          /* EINVAL: index = item, value = its pfn, limit = the ASID
                                     * it should be assigned to */
    SC_ERR_RMP_NPF_OWNER = 92,      /* EFAULT: value = pfn, limit = the accessing ASID, count =
                                     * the owner's ASID (0: not assigned) */
    SC_ERR_RMP_NPF_GPA = 93,        /* EFAULT: value = the GPA used, limit = the entry's GPA */
    SC_ERR_RMP_NPF_SIZE = 94,       /* EFAULT: value = pfn: a 4 KiB access inside a 2 MiB entry */
};

/* What a refused call writes through its `struct sc_err *err` (which may be NULL). Written on
 * every failure of a call that takes one, never on success. */
struct sc_err {
    int32_t reason;  /* SC_ERR_* */
    uint64_t index;  /* the offending item of a batch: page, packet, slot */
    uint64_t value;  /* the value refused: an SPA, a gfn, a size, flags */
    uint64_t limit;  /* what it was held against: a size, a count, a bound */
    uint64_t count;  /* the length that goes with value: the pages of a run */
};

int sc_abi_version(void);
/* What the CPU and OS support. */
uint32_t sc_cpu_detected(void);
/* What the kernels use: detected & mask. sc_cpu_restrict(0) forces every portable path. */
uint32_t sc_cpu_active(void);
uint32_t sc_cpu_restrict(uint32_t mask);
/* The features tier needs (SC_CPU_*), or -EOPNOTSUPP for a tier of another architecture,
 * -EINVAL for no tier at all. */
int64_t sc_cpu_tier_needs(int tier);
/* The highest tier the active features allow. */
int sc_cpu_tier(void);
/* cdef:end */

/* Internal: the active feature set, read by every dispatching kernel. */
extern uint32_t sc_cpu_features_active;

#define SC_HAS(f) ((sc_cpu_features_active & (f)) == (f))

/* Internal: the widest vector tier the active features allow for a kernel that needs no AES
 * unit (SC_TIER_AVX512, SC_TIER_AVX2 or SC_TIER_PORTABLE; always portable off x86-64). */
int sc_cpu_vector_tier(void);

/* Internal: refuse a call with -errnum, saying why in *err if the caller gave one. */
static inline int sc_refuse(struct sc_err *err, int errnum, int reason, uint64_t index,
                            uint64_t value, uint64_t limit, uint64_t count)
{
    if (err) {
        err->reason = reason;
        err->index = index;
        err->value = value;
        err->limit = limit;
        err->count = count;
    }
    return -errnum;
}

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
