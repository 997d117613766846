/*
 * The reverse map table (RMP) of an SEV-SNP host: one entry per 4 KiB frame of host memory
 * saying who owns it (AMD64 APM vol. 2 15.36.3 "Reverse Map Table"; the kernel's view is
 * struct rmpentry in arch/x86/virt/svm/sev.c). The hardware checks it on every access; the
 * hypervisor changes it with RMPUPDATE, the guest with PVALIDATE and RMPADJUST, the firmware
 * directly.
 *
 * The table is sparse: a real RMP is one flat array sized with host memory, but an entry that is
 * all zero (a hypervisor-owned, unassigned frame) costs nothing here. Leaves cover 2 MiB of
 * frames (512 entries of 8 + 2 bytes) and are allocated on the first non-zero entry and freed
 * when their last entry returns to zero, under a fixed top level of one pointer per 1 GiB, so a
 * host of 1 TiB costs 8 KiB until frames are assigned and about 10 bytes per frame in use.
 *
 * An entry (struct sc_rmp_entry) keeps what the kernel's struct rmpentry names: assigned, page
 * size, immutable, validated, VMSA, ASID and GPA, plus the VMPL1..3 permission masks RMPADJUST
 * sets (VMPL0 always has every permission). A 2 MiB page is an entry of page size 1 at a
 * 2 MiB-aligned frame, as the hardware keeps it; the 511 entries under it stay as they were.
 */
#ifndef SEVCORE_RMP_H
#define SEVCORE_RMP_H

#include "sevcore.h"

/* cdef:begin */
enum {
    /* RMPUPDATE's status in RAX (APM vol. 3 "RMPUPDATE"; arch/x86/include/asm/sev.h). */
    SC_RMPUPDATE_FAIL_INPUT = 1,
    SC_RMPUPDATE_FAIL_PERMISSION = 2,
    SC_RMPUPDATE_FAIL_INUSE = 3,
    SC_RMPUPDATE_FAIL_OVERLAP = 4,
    /* PSMASH's status in RAX (APM vol. 3 "PSMASH"; arch/x86/include/asm/sev.h names INUSE). */
    SC_PSMASH_FAIL_INPUT = 1,
    SC_PSMASH_FAIL_INUSE = 3,
    SC_PSMASH_FAIL_BADADDR = 7,
    /* PVALIDATE's status in RAX (APM vol. 3 "PVALIDATE"). */
    SC_PVALIDATE_FAIL_INPUT = 1,
    SC_PVALIDATE_FAIL_SIZEMISMATCH = 6,
    /* What the RMP check turns into a nested page fault (#NPF with the RMP bit) rather than a
     * status: the calls return -EFAULT and say why in struct sc_err (SC_ERR_RMP_NPF_*). */
    SC_RMP_ENTRIES_PER_LEAF = 512,
};

struct sc_rmp;

struct sc_rmp_entry {
    uint8_t assigned;
    uint8_t pagesize;      /* 0: 4 KiB, 1: 2 MiB */
    uint8_t immutable;
    uint8_t validated;
    uint8_t vmsa;
    uint16_t asid;
    uint64_t gpa;          /* page aligned */
    uint16_t vmpl_perms;   /* VMPL1 bits 0-3, VMPL2 bits 4-7, VMPL3 bits 8-11 */
};

/* A table for frames [0, nframes); NULL when out of memory or nframes is 0 or past 2^40. */
struct sc_rmp *sc_rmp_create(uint64_t nframes);
void sc_rmp_destroy(struct sc_rmp *rmp);

/* The entry of frame pfn: 0, or -EINVAL (pfn out of range, err: SC_ERR_RMP_PFN). */
int sc_rmp_read(const struct sc_rmp *rmp, uint64_t pfn, struct sc_rmp_entry *out,
                struct sc_err *err);

/* RMPUPDATE of frame pfn to the state in st (assigned, pagesize, immutable, asid, gpa; the new
 * entry is never validated and its VMPL1..3 permissions are cleared). Returns 0, an
 * SC_RMPUPDATE_FAIL_* status (the entry unchanged), or -EINVAL for a pfn past the table. */
int sc_rmp_update(struct sc_rmp *rmp, uint64_t pfn, const struct sc_rmp_entry *st,
                  struct sc_err *err);

/* PSMASH of the 2 MiB page at frame pfn: its 2 MiB entry expanded into 512 4 KiB entries that
 * keep its state (assigned, immutable, validated, ASID, VMPL permissions), the GPA of entry i
 * the 2 MiB GPA + i pages. Returns 0, SC_PSMASH_FAIL_INPUT for a pfn not 2 MiB aligned,
 * SC_PSMASH_FAIL_BADADDR when the entry is not a 2 MiB one (nothing to expand), or -EINVAL for a
 * pfn past the table. The model has one processor, so never SC_PSMASH_FAIL_INUSE. */
int sc_rmp_psmash(struct sc_rmp *rmp, uint64_t pfn, struct sc_err *err);

/* RMPUPDATE of n 4 KiB frames to assigned, ASID asid, GPA gfns[i] << 12 (rmp_make_private for
 * each page in order). Stops at the first page RMPUPDATE refuses: returns its status and writes
 * its index to *done (the pages before it are updated), or 0 with *done = n. -EINVAL for a pfn
 * past the table (err: SC_ERR_RMP_PFN with the index), before anything changes. */
int sc_rmp_make_private_batch(struct sc_rmp *rmp, const uint64_t *pfns, const uint64_t *gfns,
                              size_t n, uint32_t asid, int immutable, size_t *done,
                              struct sc_err *err);

/* RMPUPDATE of each of the n 4 KiB frames pfns[] back to the hypervisor (rmp_make_shared for
 * each page in order). Stops at the first page RMPUPDATE refuses: returns its status and writes
 * its index to *done, or 0 with *done = n. -EINVAL for a pfn past the table (SC_ERR_RMP_PFN),
 * before anything changes. */
int sc_rmp_make_shared_batch(struct sc_rmp *rmp, const uint64_t *pfns, size_t n, size_t *done,
                             struct sc_err *err);

/* out[i] = 1 when the entry of frame pfns[i] (its own 4 KiB entry, as snp_lookup_rmpentry reads
 * it) is assigned, else 0; returns how many are. -EINVAL for a pfn past the table. */
int64_t sc_rmp_assigned_mask(const struct sc_rmp *rmp, const uint64_t *pfns, size_t n,
                             uint8_t *out, struct sc_err *err);

/* How many of the n frames pfns[] in order are in the Pre-Guest state of asid (assigned to it,
 * immutable, not validated: what rmp_make_private(..., immutable=true) leaves and
 * SNP_LAUNCH_UPDATE takes), up to the first that is not. -EINVAL for a pfn past the table. */
int64_t sc_rmp_preguest_prefix(const struct sc_rmp *rmp, const uint64_t *pfns, size_t n,
                               uint32_t asid, struct sc_err *err);

/* The GPA each of the n frames pfns[] is assigned at (0 where unassigned) into out_gpas. */
int sc_rmp_gpas(const struct sc_rmp *rmp, const uint64_t *pfns, size_t n, uint64_t *out_gpas,
                struct sc_err *err);

/* What the firmware does at the end of SNP_LAUNCH_UPDATE for n pages: validated = 1,
 * immutable = 0 (and vmsa = 1 if vmsa). Every entry must be assigned to asid (else -EINVAL,
 * SC_ERR_RMP_STATE, nothing changed). */
int sc_rmp_fw_validate_batch(struct sc_rmp *rmp, const uint64_t *pfns, size_t n, uint32_t asid,
                             int vmsa, struct sc_err *err);

/* The firmware writes the entry of frame pfn as st says (validated and vmsa included, VMPL
 * permissions cleared), bound by no lock: SNP_PAGE_RECLAIM, SNP_DECOMMISSION and the pages the
 * firmware takes for itself. 0, -EINVAL (SC_ERR_RMP_PFN), -ENOMEM. */
int sc_rmp_fw_store(struct sc_rmp *rmp, uint64_t pfn, const struct sc_rmp_entry *st,
                    struct sc_err *err);

/* PVALIDATE by a guest of ASID asid of the page at gpa backed by frame pfn (2 MiB: pfn and gpa
 * 2 MiB aligned). Returns 0 or an SC_PVALIDATE_FAIL_* status; *cf is rFLAGS.CF: 1 when the
 * validated bit already had the requested value (nothing changed). -EFAULT when the check makes
 * it a nested page fault (err: SC_ERR_RMP_NPF_*): not assigned to asid, another GPA, or a 4 KiB
 * PVALIDATE inside a 2 MiB entry. -EINVAL for a pfn past the table. */
int sc_rmp_pvalidate(struct sc_rmp *rmp, uint64_t pfn, uint64_t gpa, uint32_t asid,
                     int pagesize, int validate, int *cf, struct sc_err *err);

/* PVALIDATE (4 KiB) by a guest of ASID asid of its n pages at gpas[i] backed by frames pfns[i],
 * in order, as a guest's loop over the range runs it: stops at the first page whose status is
 * not 0 or whose rFLAGS.CF is 1. Returns that status (0 otherwise), *cf its CF, *done its index
 * (n when every page changed). -EFAULT (the #NPF of sc_rmp_pvalidate, err.index = *done = the
 * page) with the pages before it changed; -EINVAL for a pfn past the table, nothing changed. */
int sc_rmp_pvalidate_batch(struct sc_rmp *rmp, const uint64_t *pfns, const uint64_t *gpas,
                           size_t n, uint32_t asid, int validate, size_t *done, int *cf,
                           struct sc_err *err);

/* RMPADJUST by VMPL0 of ASID asid: set the permission mask of target_vmpl (1..3) on the 4 KiB
 * page at frame pfn, and its VMSA bit to vmsa (RDX bit 16: only VMPL0 may change it, which is
 * why a guest names VMPL1 as the target). 0, SC_PVALIDATE_FAIL_INPUT for a bad VMPL or mask, or
 * -EFAULT as for PVALIDATE. */
int sc_rmp_adjust(struct sc_rmp *rmp, uint64_t pfn, uint64_t gpa, uint32_t asid,
                  int target_vmpl, uint8_t perms, int vmsa, struct sc_err *err);

/* RMPADJUST of target_vmpl's mask to perms on each of the n pages gpas[i] at frames pfns[i], in
 * order, each page's VMSA bit left as it is (what the firmware does for the VMPL permissions
 * SNP_LAUNCH_UPDATE is given, VMSA pages included). Stops at
 * the first refusal: its status (*done its index), or 0 with *done = n; -EFAULT as for
 * sc_rmp_adjust (err.index = *done), -EINVAL for a pfn past the table, nothing changed. */
int sc_rmp_adjust_batch(struct sc_rmp *rmp, const uint64_t *pfns, const uint64_t *gpas, size_t n,
                        uint32_t asid, int target_vmpl, uint8_t perms, size_t *done,
                        struct sc_err *err);

/* The first of n frames pfns[i] an access of ASID asid may not write, or n if every one may:
 * ASID 0 (the host) may write a frame no guest owns; a guest may write only frames assigned to
 * it. -EINVAL for a pfn past the table (SC_ERR_RMP_PFN). A 2 MiB entry covers its 512 frames. */
int64_t sc_rmp_first_denied(const struct sc_rmp *rmp, const uint64_t *pfns, size_t n,
                            uint32_t asid, struct sc_err *err);

/* The validation check of a guest's private access (AMD64 APM vol. 2 15.36.10): 1 when the
 * entry governing frame pfn (a 2 MiB entry covers its 512 frames) is assigned to asid and
 * validated, else 0 (also for a pfn past the table). What the check of a failing access is
 * (#VC PAGE_NOT_VALIDATED, or the #NPF of another owner) is the caller's to tell. */
int sc_rmp_validated(const struct sc_rmp *rmp, uint64_t pfn, uint32_t asid);

/* The first frame in [pfn, pfn + n) that is assigned (to anyone), or pfn + n. */
uint64_t sc_rmp_next_assigned(const struct sc_rmp *rmp, uint64_t pfn, uint64_t n);

/* Assigned entries (4 KiB or 2 MiB heads), leaves allocated and bytes the table holds. */
void sc_rmp_stats(const struct sc_rmp *rmp, uint64_t *assigned, uint64_t *leaves,
                  uint64_t *bytes);
/* cdef:end */

#endif
