/*
 * The RMP: see rmp.h for what an entry holds and how the table is laid out.
 *
 * The checks follow AMD64 APM vol. 3 (RMPUPDATE, PVALIDATE, RMPADJUST) and vol. 2 15.36
 * (the RMP check on accesses). Where the manual leaves a choice open, the comment at the check
 * says which one is made; docs/snp.md lists them.
 */
#include "rmp.h"

#include <errno.h>
#include <stdlib.h>
#include <string.h>

#define LEAF_SHIFT 9                       /* 512 entries: one 2 MiB page */
#define LEAF_N (1u << LEAF_SHIFT)
#define MID_SHIFT 9                        /* 512 leaves: 1 GiB */
#define MID_N (1u << MID_SHIFT)
#define TOP_SHIFT (LEAF_SHIFT + MID_SHIFT)
#define MAX_FRAMES (1ull << 40)
#define MAX_ASID 0xFFFFu
#define GPA_MASK 0x000FFFFFFFFFF000ull     /* 52-bit, page aligned */

/* lo word of an entry */
#define E_ASSIGNED (1ull << 0)
#define E_PAGESIZE (1ull << 1)
#define E_IMMUTABLE (1ull << 2)
#define E_VALIDATED (1ull << 3)
#define E_VMSA (1ull << 4)
#define E_ASID_SHIFT 8
#define E_GFN_SHIFT 24

struct leaf {
    uint64_t lo[LEAF_N];
    uint16_t perms[LEAF_N];
    uint32_t used;                         /* entries with lo != 0 */
};

struct mid {
    struct leaf *leaf[MID_N];
    uint32_t used;                         /* leaves allocated */
};

struct sc_rmp {
    uint64_t nframes;
    uint64_t ntop;
    uint64_t assigned;
    uint64_t nleaves;
    uint64_t nmids;
    struct mid **top;
};

static inline uint64_t asid_of(uint64_t lo) { return (lo >> E_ASID_SHIFT) & MAX_ASID; }
static inline uint64_t gpa_of(uint64_t lo) { return (lo >> E_GFN_SHIFT) << 12; }

struct sc_rmp *sc_rmp_create(uint64_t nframes)
{
    if (nframes == 0 || nframes > MAX_FRAMES)
        return NULL;
    struct sc_rmp *rmp = calloc(1, sizeof(*rmp));
    if (!rmp)
        return NULL;
    rmp->nframes = nframes;
    rmp->ntop = (nframes + (1ull << TOP_SHIFT) - 1) >> TOP_SHIFT;
    rmp->top = calloc(rmp->ntop, sizeof(*rmp->top));
    if (!rmp->top) {
        free(rmp);
        return NULL;
    }
    return rmp;
}

void sc_rmp_destroy(struct sc_rmp *rmp)
{
    if (!rmp)
        return;
    for (uint64_t t = 0; t < rmp->ntop; t++) {
        struct mid *m = rmp->top[t];
        if (!m)
            continue;
        for (unsigned i = 0; i < MID_N; i++)
            free(m->leaf[i]);
        free(m);
    }
    free(rmp->top);
    free(rmp);
}

static inline struct leaf *leaf_of(const struct sc_rmp *rmp, uint64_t pfn)
{
    const struct mid *m = rmp->top[pfn >> TOP_SHIFT];
    return m ? m->leaf[(pfn >> LEAF_SHIFT) & (MID_N - 1)] : NULL;
}

static inline uint64_t lo_of(const struct sc_rmp *rmp, uint64_t pfn)
{
    const struct leaf *l = leaf_of(rmp, pfn);
    return l ? l->lo[pfn & (LEAF_N - 1)] : 0;
}

/* The entry that governs frame pfn: its own when assigned, else the 2 MiB entry over it when
 * that one is assigned, else its own (unassigned). *head gets the pfn of the entry returned. */
static inline uint64_t governing(const struct sc_rmp *rmp, uint64_t pfn, uint64_t *head)
{
    const struct leaf *l = leaf_of(rmp, pfn);
    *head = pfn;
    if (!l)
        return 0;
    uint64_t lo = l->lo[pfn & (LEAF_N - 1)];
    if (lo & E_ASSIGNED)
        return lo;
    uint64_t big = l->lo[0];
    if ((big & (E_ASSIGNED | E_PAGESIZE)) == (E_ASSIGNED | E_PAGESIZE)) {
        *head = pfn & ~(uint64_t)(LEAF_N - 1);
        return big;
    }
    return lo;
}

/* Store an entry, allocating or freeing its leaf (and mid) as it becomes used or empty.
 * Returns -ENOMEM only when a leaf is needed and cannot be had (nothing changed then). */
static int store(struct sc_rmp *rmp, uint64_t pfn, uint64_t lo, uint16_t perms)
{
    uint64_t t = pfn >> TOP_SHIFT;
    unsigned mi = (pfn >> LEAF_SHIFT) & (MID_N - 1), li = pfn & (LEAF_N - 1);
    struct mid *m = rmp->top[t];
    struct leaf *l = m ? m->leaf[mi] : NULL;
    if (!l) {
        if (lo == 0 && perms == 0)
            return 0;
        if (!m) {
            m = calloc(1, sizeof(*m));
            if (!m)
                return -ENOMEM;
            rmp->top[t] = m;
            rmp->nmids++;
        }
        l = calloc(1, sizeof(*l));
        if (!l) {
            if (m->used == 0) {
                free(m);
                rmp->top[t] = NULL;
                rmp->nmids--;
            }
            return -ENOMEM;
        }
        m->leaf[mi] = l;
        m->used++;
        rmp->nleaves++;
    }
    uint64_t old = l->lo[li];
    rmp->assigned += (lo & E_ASSIGNED) - (old & E_ASSIGNED);
    l->used += (lo != 0) - (old != 0);
    l->lo[li] = lo;
    l->perms[li] = lo ? perms : 0;
    if (l->used == 0) {
        free(l);
        m->leaf[mi] = NULL;
        rmp->nleaves--;
        if (--m->used == 0) {
            free(m);
            rmp->top[t] = NULL;
            rmp->nmids--;
        }
    }
    return 0;
}

/* -EINVAL (SC_ERR_RMP_PFN, the index) for the first of pfns[] past the table, else 0: batches
 * check every frame before they change anything. */
/* A batch's arguments: the table, the list (NULL only when empty) and every pfn in range. */
static int check_pfns(const struct sc_rmp *rmp, const uint64_t *pfns, size_t n,
                      struct sc_err *err)
{
    if (!rmp || (n && !pfns))
        return sc_refuse(err, EINVAL, SC_ERR_NULL, 0, 0, 0, 0);
    for (size_t i = 0; i < n; i++)
        if (pfns[i] >= rmp->nframes)
            return sc_refuse(err, EINVAL, SC_ERR_RMP_PFN, i, pfns[i], rmp->nframes, 0);
    return 0;
}

static void to_entry(uint64_t lo, uint16_t perms, struct sc_rmp_entry *out)
{
    out->assigned = !!(lo & E_ASSIGNED);
    out->pagesize = !!(lo & E_PAGESIZE);
    out->immutable = !!(lo & E_IMMUTABLE);
    out->validated = !!(lo & E_VALIDATED);
    out->vmsa = !!(lo & E_VMSA);
    out->asid = (uint16_t)asid_of(lo);
    out->gpa = gpa_of(lo);
    out->vmpl_perms = perms;
}

int sc_rmp_read(const struct sc_rmp *rmp, uint64_t pfn, struct sc_rmp_entry *out,
                struct sc_err *err)
{
    if (!rmp || !out)
        return sc_refuse(err, EINVAL, SC_ERR_NULL, 0, 0, 0, 0);
    if (pfn >= rmp->nframes)
        return sc_refuse(err, EINVAL, SC_ERR_RMP_PFN, 0, pfn, rmp->nframes, 0);
    const struct leaf *l = leaf_of(rmp, pfn);
    unsigned li = pfn & (LEAF_N - 1);
    to_entry(l ? l->lo[li] : 0, l ? l->perms[li] : 0, out);
    return 0;
}

/* RMPUPDATE's checks, in the order the status codes rank them; 0 when it may proceed. */
static int update_status(const struct sc_rmp *rmp, uint64_t pfn, const struct sc_rmp_entry *st)
{
    int big = st->pagesize != 0;
    if (st->pagesize > 1 || (st->gpa & ~GPA_MASK))
        return SC_RMPUPDATE_FAIL_INPUT;
    if (big && ((pfn & (LEAF_N - 1)) || (st->gpa & ((1ull << 21) - 1))
                || pfn + LEAF_N > rmp->nframes))
        return SC_RMPUPDATE_FAIL_INPUT;
    /* An unassigned entry belongs to the hypervisor: it has no owner, GPA or lock. */
    if (!st->assigned && (st->asid || st->gpa || st->immutable))
        return SC_RMPUPDATE_FAIL_INPUT;
    uint64_t own = lo_of(rmp, pfn);
    if (own & E_IMMUTABLE)
        return SC_RMPUPDATE_FAIL_PERMISSION;
    if (!big) {
        /* A 4 KiB entry under an assigned 2 MiB page: the 2 MiB page is in use as a whole
         * (the hypervisor smashes it first, PSMASH). */
        uint64_t head = pfn & ~(uint64_t)(LEAF_N - 1);
        if (head != pfn) {
            uint64_t h = lo_of(rmp, head);
            if ((h & (E_ASSIGNED | E_PAGESIZE)) == (E_ASSIGNED | E_PAGESIZE))
                return SC_RMPUPDATE_FAIL_INUSE;
        }
        return 0;
    }
    /* A 2 MiB entry over 4 KiB entries that are assigned or locked. */
    const struct leaf *l = leaf_of(rmp, pfn);
    if (l && st->assigned) {
        for (unsigned i = 1; i < LEAF_N; i++) {
            if (l->lo[i] & E_IMMUTABLE)
                return SC_RMPUPDATE_FAIL_PERMISSION;
            if (l->lo[i] & E_ASSIGNED)
                return SC_RMPUPDATE_FAIL_INUSE;
        }
    }
    return 0;
}

static inline uint64_t make_lo(const struct sc_rmp_entry *st)
{
    if (!st->assigned)
        return st->pagesize ? E_PAGESIZE : 0;
    return E_ASSIGNED | (st->pagesize ? E_PAGESIZE : 0) | (st->immutable ? E_IMMUTABLE : 0)
        | ((uint64_t)st->asid << E_ASID_SHIFT) | ((st->gpa >> 12) << E_GFN_SHIFT);
}

int sc_rmp_update(struct sc_rmp *rmp, uint64_t pfn, const struct sc_rmp_entry *st,
                  struct sc_err *err)
{
    if (!rmp || !st)
        return sc_refuse(err, EINVAL, SC_ERR_NULL, 0, 0, 0, 0);
    if (pfn >= rmp->nframes)
        return sc_refuse(err, EINVAL, SC_ERR_RMP_PFN, 0, pfn, rmp->nframes, 0);
    int status = update_status(rmp, pfn, st);
    if (status)
        return status;
    int rc = store(rmp, pfn, make_lo(st), 0);
    return rc < 0 ? sc_refuse(err, -rc, SC_ERR_NONE, 0, pfn, 0, 0) : 0;
}

int sc_rmp_psmash(struct sc_rmp *rmp, uint64_t pfn, struct sc_err *err)
{
    if (!rmp)
        return sc_refuse(err, EINVAL, SC_ERR_NULL, 0, 0, 0, 0);
    if (pfn >= rmp->nframes)
        return sc_refuse(err, EINVAL, SC_ERR_RMP_PFN, 0, pfn, rmp->nframes, 0);
    if (pfn & (LEAF_N - 1))
        return SC_PSMASH_FAIL_INPUT;
    struct leaf *l = leaf_of(rmp, pfn);
    if (!l || !(l->lo[0] & E_PAGESIZE))
        return SC_PSMASH_FAIL_BADADDR;
    /* The leaf holds the 2 MiB entry, so it stays allocated while its entries are rewritten:
     * store() never fails here. Sub-entries go first so the head is read unchanged. */
    uint64_t head = l->lo[0] & ~E_PAGESIZE;
    uint16_t perms = l->perms[0];
    for (unsigned i = LEAF_N - 1; i > 0; i--) {
        uint64_t lo = (head & E_ASSIGNED) ? head + ((uint64_t)i << E_GFN_SHIFT) : 0;
        store(rmp, pfn + i, lo, lo ? perms : 0);
    }
    store(rmp, pfn, head, head ? perms : 0);
    return 0;
}

int sc_rmp_make_private_batch(struct sc_rmp *rmp, const uint64_t *pfns, const uint64_t *gfns,
                              size_t n, uint32_t asid, int immutable, size_t *done,
                              struct sc_err *err)
{
    if (!rmp || !done || (n && (!pfns || !gfns)))
        return sc_refuse(err, EINVAL, SC_ERR_NULL, 0, 0, 0, 0);
    int bad = check_pfns(rmp, pfns, n, err);
    if (bad)
        return bad;
    struct sc_rmp_entry st = {.assigned = 1, .immutable = !!immutable,
                              .asid = (uint16_t)asid};
    for (size_t i = 0; i < n; i++) {
        st.gpa = gfns[i] << 12;
        int status = asid > MAX_ASID || (gfns[i] >> 40) ? SC_RMPUPDATE_FAIL_INPUT
                                                        : update_status(rmp, pfns[i], &st);
        if (!status && store(rmp, pfns[i], make_lo(&st), 0) < 0) {
            *done = i;
            return sc_refuse(err, ENOMEM, SC_ERR_NONE, i, pfns[i], 0, 0);
        }
        if (status) {
            *done = i;
            return status;
        }
    }
    *done = n;
    return 0;
}

int sc_rmp_make_shared_batch(struct sc_rmp *rmp, const uint64_t *pfns, size_t n, size_t *done,
                             struct sc_err *err)
{
    if (!done)
        return sc_refuse(err, EINVAL, SC_ERR_NULL, 0, 0, 0, 0);
    int bad = check_pfns(rmp, pfns, n, err);
    if (bad)
        return bad;
    const struct sc_rmp_entry st = {0};
    for (size_t i = 0; i < n; i++) {
        /* Back to all zero: store() frees a leaf and never allocates one for it. */
        int status = update_status(rmp, pfns[i], &st);
        if (status) {
            *done = i;
            return status;
        }
        store(rmp, pfns[i], 0, 0);
    }
    *done = n;
    return 0;
}

int64_t sc_rmp_assigned_mask(const struct sc_rmp *rmp, const uint64_t *pfns, size_t n,
                             uint8_t *out, struct sc_err *err)
{
    if (n && !out)
        return sc_refuse(err, EINVAL, SC_ERR_NULL, 0, 0, 0, 0);
    int bad = check_pfns(rmp, pfns, n, err);
    if (bad)
        return bad;
    int64_t count = 0;
    for (size_t i = 0; i < n; i++) {
        out[i] = (lo_of(rmp, pfns[i]) & E_ASSIGNED) != 0;
        count += out[i];
    }
    return count;
}

int64_t sc_rmp_preguest_prefix(const struct sc_rmp *rmp, const uint64_t *pfns, size_t n,
                               uint32_t asid, struct sc_err *err)
{
    int bad = check_pfns(rmp, pfns, n, err);
    if (bad)
        return bad;
    const uint64_t want = E_ASSIGNED | E_IMMUTABLE;
    for (size_t i = 0; i < n; i++) {
        uint64_t lo = lo_of(rmp, pfns[i]);
        if ((lo & (want | E_VALIDATED | E_PAGESIZE)) != want || asid_of(lo) != asid)
            return (int64_t)i;
    }
    return (int64_t)n;
}

int sc_rmp_gpas(const struct sc_rmp *rmp, const uint64_t *pfns, size_t n, uint64_t *out_gpas,
                struct sc_err *err)
{
    if (!rmp || (n && (!pfns || !out_gpas)))
        return sc_refuse(err, EINVAL, SC_ERR_NULL, 0, 0, 0, 0);
    int bad = check_pfns(rmp, pfns, n, err);
    if (bad)
        return bad;
    for (size_t i = 0; i < n; i++) {
        uint64_t lo = lo_of(rmp, pfns[i]);
        out_gpas[i] = (lo & E_ASSIGNED) ? gpa_of(lo) : 0;
    }
    return 0;
}

int sc_rmp_fw_validate_batch(struct sc_rmp *rmp, const uint64_t *pfns, size_t n, uint32_t asid,
                             int vmsa, struct sc_err *err)
{
    if (!rmp || (n && !pfns))
        return sc_refuse(err, EINVAL, SC_ERR_NULL, 0, 0, 0, 0);
    for (size_t i = 0; i < n; i++) {
        if (pfns[i] >= rmp->nframes)
            return sc_refuse(err, EINVAL, SC_ERR_RMP_PFN, i, pfns[i], rmp->nframes, 0);
        uint64_t lo = lo_of(rmp, pfns[i]);
        if (!(lo & E_ASSIGNED) || asid_of(lo) != asid)
            return sc_refuse(err, EINVAL, SC_ERR_RMP_STATE, i, pfns[i], asid, 0);
    }
    for (size_t i = 0; i < n; i++) {
        struct leaf *l = leaf_of(rmp, pfns[i]);
        uint64_t *lo = &l->lo[pfns[i] & (LEAF_N - 1)];
        *lo = (*lo & ~E_IMMUTABLE) | E_VALIDATED | (vmsa ? E_VMSA : 0);
    }
    return 0;
}

int sc_rmp_fw_store(struct sc_rmp *rmp, uint64_t pfn, const struct sc_rmp_entry *st,
                    struct sc_err *err)
{
    if (!rmp || !st)
        return sc_refuse(err, EINVAL, SC_ERR_NULL, 0, 0, 0, 0);
    if (pfn >= rmp->nframes)
        return sc_refuse(err, EINVAL, SC_ERR_RMP_PFN, 0, pfn, rmp->nframes, 0);
    uint64_t lo = make_lo(st);
    if (st->assigned)
        lo |= (st->validated ? E_VALIDATED : 0) | (st->vmsa ? E_VMSA : 0);
    int rc = store(rmp, pfn, lo, 0);
    return rc < 0 ? sc_refuse(err, -rc, SC_ERR_NONE, 0, pfn, 0, 0) : 0;
}

/* The RMP check of a guest instruction on its own page: -EFAULT (an #NPF) unless the
 * governing entry is assigned to asid, unlocked and at gpa. */
static int guest_check(const struct sc_rmp *rmp, uint64_t pfn, uint64_t lo, uint64_t gpa,
                       uint32_t asid, struct sc_err *err)
{
    if (!(lo & E_ASSIGNED) || asid_of(lo) != asid || (lo & E_IMMUTABLE))
        return sc_refuse(err, EFAULT, SC_ERR_RMP_NPF_OWNER, 0, pfn, asid,
                         (lo & E_ASSIGNED) ? asid_of(lo) : 0);
    if (gpa_of(lo) != gpa)
        return sc_refuse(err, EFAULT, SC_ERR_RMP_NPF_GPA, 0, gpa, gpa_of(lo), 0);
    return 0;
}

/* PVALIDATE of a frame in the table (the checks of sc_rmp_pvalidate after its arguments'). */
static int pvalidate_at(struct sc_rmp *rmp, uint64_t pfn, uint64_t gpa, uint32_t asid,
                        int pagesize, int validate, int *cf, struct sc_err *err)
{
    *cf = 0;
    if (pagesize < 0 || pagesize > 1 || (gpa & 0xFFF))
        return SC_PVALIDATE_FAIL_INPUT;
    if (pagesize && ((pfn & (LEAF_N - 1)) || (gpa & ((1ull << 21) - 1))))
        return SC_PVALIDATE_FAIL_INPUT;
    uint64_t head;
    uint64_t lo = governing(rmp, pfn, &head);
    if (!pagesize && (lo & E_PAGESIZE) && (lo & E_ASSIGNED))
        /* A 4 KiB PVALIDATE of a page the RMP holds as 2 MiB: the hypervisor must smash it
         * (APM vol. 2 15.36.10: an #NPF with the page-size-mismatch bit). */
        return sc_refuse(err, EFAULT, SC_ERR_RMP_NPF_SIZE, 0, pfn, 0, 0);
    int rc = guest_check(rmp, pfn, lo, head == pfn ? gpa : gpa & ~((1ull << 21) - 1), asid,
                         err);
    if (rc)
        return rc;
    if (pagesize && !(lo & E_PAGESIZE))
        return SC_PVALIDATE_FAIL_SIZEMISMATCH;
    if (!!(lo & E_VALIDATED) == !!validate) {
        *cf = 1;                           /* rFLAGS.CF: no update was made */
        return 0;
    }
    struct leaf *l = leaf_of(rmp, head);
    uint64_t *e = &l->lo[head & (LEAF_N - 1)];
    *e = validate ? (*e | E_VALIDATED) : (*e & ~E_VALIDATED);
    return 0;
}

int sc_rmp_pvalidate(struct sc_rmp *rmp, uint64_t pfn, uint64_t gpa, uint32_t asid,
                     int pagesize, int validate, int *cf, struct sc_err *err)
{
    if (!rmp || !cf)
        return sc_refuse(err, EINVAL, SC_ERR_NULL, 0, 0, 0, 0);
    if (pfn >= rmp->nframes)
        return sc_refuse(err, EINVAL, SC_ERR_RMP_PFN, 0, pfn, rmp->nframes, 0);
    return pvalidate_at(rmp, pfn, gpa, asid, pagesize, validate, cf, err);
}

int sc_rmp_pvalidate_batch(struct sc_rmp *rmp, const uint64_t *pfns, const uint64_t *gpas,
                           size_t n, uint32_t asid, int validate, size_t *done, int *cf,
                           struct sc_err *err)
{
    if (!done || !cf || (n && !gpas))
        return sc_refuse(err, EINVAL, SC_ERR_NULL, 0, 0, 0, 0);
    int bad = check_pfns(rmp, pfns, n, err);
    if (bad)
        return bad;
    *cf = 0;
    for (size_t i = 0; i < n; i++) {
        int rc = pvalidate_at(rmp, pfns[i], gpas[i], asid, 0, validate, cf, err);
        if (rc || *cf) {
            *done = i;
            if (rc < 0 && err)
                err->index = i;
            return rc;
        }
    }
    *done = n;
    return 0;
}

/* RMPADJUST of a frame in the table (sc_rmp_adjust after its arguments' checks); vmsa < 0
 * leaves the VMSA bit as it is. */
static int adjust_at(struct sc_rmp *rmp, uint64_t pfn, uint64_t gpa, uint32_t asid,
                     int target_vmpl, uint8_t perms, int vmsa, struct sc_err *err)
{
    if (target_vmpl < 1 || target_vmpl > 3 || perms > 0xF || (gpa & 0xFFF))
        return SC_PVALIDATE_FAIL_INPUT;
    uint64_t lo = lo_of(rmp, pfn);
    int rc = guest_check(rmp, pfn, lo, gpa, asid, err);
    if (rc)
        return rc;
    struct leaf *l = leaf_of(rmp, pfn);
    unsigned li = pfn & (LEAF_N - 1), shift = 4 * (unsigned)(target_vmpl - 1);
    l->perms[li] = (uint16_t)((l->perms[li] & ~(0xFu << shift)) | ((unsigned)perms << shift));
    if (vmsa >= 0)
        l->lo[li] = vmsa ? (l->lo[li] | E_VMSA) : (l->lo[li] & ~E_VMSA);
    return 0;
}

int sc_rmp_adjust(struct sc_rmp *rmp, uint64_t pfn, uint64_t gpa, uint32_t asid,
                  int target_vmpl, uint8_t perms, int vmsa, struct sc_err *err)
{
    if (!rmp)
        return sc_refuse(err, EINVAL, SC_ERR_NULL, 0, 0, 0, 0);
    if (pfn >= rmp->nframes)
        return sc_refuse(err, EINVAL, SC_ERR_RMP_PFN, 0, pfn, rmp->nframes, 0);
    return adjust_at(rmp, pfn, gpa, asid, target_vmpl, perms, !!vmsa, err);
}

int sc_rmp_adjust_batch(struct sc_rmp *rmp, const uint64_t *pfns, const uint64_t *gpas, size_t n,
                        uint32_t asid, int target_vmpl, uint8_t perms, size_t *done,
                        struct sc_err *err)
{
    if (!done || (n && !gpas))
        return sc_refuse(err, EINVAL, SC_ERR_NULL, 0, 0, 0, 0);
    int bad = check_pfns(rmp, pfns, n, err);
    if (bad)
        return bad;
    for (size_t i = 0; i < n; i++) {
        int rc = adjust_at(rmp, pfns[i], gpas[i], asid, target_vmpl, perms, -1, err);
        if (rc) {
            *done = i;
            if (rc < 0 && err)
                err->index = i;
            return rc;
        }
    }
    *done = n;
    return 0;
}

int64_t sc_rmp_first_denied(const struct sc_rmp *rmp, const uint64_t *pfns, size_t n,
                            uint32_t asid, struct sc_err *err)
{
    int bad = check_pfns(rmp, pfns, n, err);
    if (bad)
        return bad;
    for (size_t i = 0; i < n; i++) {
        uint64_t head;
        uint64_t lo = governing(rmp, pfns[i], &head);
        int mine = (lo & E_ASSIGNED) && asid_of(lo) == asid;
        if (asid == 0 ? (lo & E_ASSIGNED) != 0 : !mine)
            return (int64_t)i;
    }
    return (int64_t)n;
}

int sc_rmp_validated(const struct sc_rmp *rmp, uint64_t pfn, uint32_t asid)
{
    if (pfn >= rmp->nframes)
        return 0;
    uint64_t head;
    uint64_t lo = governing(rmp, pfn, &head);
    return (lo & (E_ASSIGNED | E_VALIDATED)) == (E_ASSIGNED | E_VALIDATED) &&
           asid_of(lo) == asid;
}

uint64_t sc_rmp_next_assigned(const struct sc_rmp *rmp, uint64_t pfn, uint64_t n)
{
    uint64_t end = pfn + n;
    if (end > rmp->nframes || end < pfn)
        end = rmp->nframes;
    while (pfn < end) {
        const struct mid *m = rmp->top[pfn >> TOP_SHIFT];
        if (!m) {
            pfn = ((pfn >> TOP_SHIFT) + 1) << TOP_SHIFT;
            continue;
        }
        const struct leaf *l = m->leaf[(pfn >> LEAF_SHIFT) & (MID_N - 1)];
        uint64_t leaf_end = ((pfn >> LEAF_SHIFT) + 1) << LEAF_SHIFT;
        if (!l) {
            pfn = leaf_end;
            continue;
        }
        uint64_t big = l->lo[0];
        if ((big & (E_ASSIGNED | E_PAGESIZE)) == (E_ASSIGNED | E_PAGESIZE))
            return pfn;
        for (; pfn < leaf_end && pfn < end; pfn++)
            if (l->lo[pfn & (LEAF_N - 1)] & E_ASSIGNED)
                return pfn;
    }
    return end;
}

void sc_rmp_stats(const struct sc_rmp *rmp, uint64_t *assigned, uint64_t *leaves,
                  uint64_t *bytes)
{
    *assigned = rmp->assigned;
    *leaves = rmp->nleaves;
    *bytes = sizeof(*rmp) + rmp->ntop * sizeof(*rmp->top) + rmp->nmids * sizeof(struct mid)
        + rmp->nleaves * sizeof(struct leaf);
}
