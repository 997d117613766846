"""A slow, obviously correct twin of :class:`sevcore.hw.rmp.Rmp` (csrc/rmp.c): a dict pfn ->
entry tuple, the rules of RMPUPDATE, PVALIDATE and RMPADJUST written out one by one.

Same methods and results as the C-backed table; an RMP fault is ``RmpFaultRef`` (OSError
EFAULT) carrying the frame, where the real one raises ``RmpFault``.
"""
import errno

from sevcore import uapi as U

SMALL = 512                    # 4 KiB entries under one 2 MiB entry
ZERO = (0, 0, 0, 0, 0, 0, 0, 0)   # assigned, pagesize, immutable, validated, vmsa, asid, gpa, perms


class RmpFaultRef(OSError):
    def __init__(self, what, pfn):
        self.pfn = pfn
        super().__init__(errno.EFAULT, f"RMP fault on frame {pfn:#x}", what)


class Rmp:
    def __init__(self, nframes):
        self.nframes = nframes
        self.e = {}

    def _pfn(self, pfn):
        if not 0 <= pfn < self.nframes:
            raise ValueError(f"pfn {pfn:#x} out of range")

    def entry(self, pfn):
        self._pfn(pfn)
        return self.e.get(pfn, ZERO)

    def _put(self, pfn, ent):
        if ent == ZERO:
            self.e.pop(pfn, None)
        else:
            self.e[pfn] = ent

    @property
    def assigned(self):
        return sum(1 for v in self.e.values() if v[0])

    def _governing(self, pfn):
        """(head pfn, entry) that decides who owns frame pfn."""
        own = self.entry(pfn)
        if own[0]:
            return pfn, own
        head = pfn - pfn % SMALL
        big = self.entry(head)
        if big[0] and big[1]:
            return head, big
        return pfn, own

    def rmpupdate(self, spa, *, assigned=0, pagesize=0, immutable=0, asid=0, gpa=0):
        if spa % 4096:
            return U.RMPUPDATE_FAIL_INPUT
        pfn = spa // 4096
        self._pfn(pfn)
        if asid >= 1 << 16 or not 0 <= gpa < 1 << 52 or pagesize not in (0, 1) or gpa % 4096:
            return U.RMPUPDATE_FAIL_INPUT
        if pagesize and (pfn % SMALL or gpa % (1 << 21) or pfn + SMALL > self.nframes):
            return U.RMPUPDATE_FAIL_INPUT
        if not assigned and (asid or gpa or immutable):
            return U.RMPUPDATE_FAIL_INPUT
        if self.entry(pfn)[2]:
            return U.RMPUPDATE_FAIL_PERMISSION
        if not pagesize:
            head = pfn - pfn % SMALL
            if head != pfn and self.entry(head)[0] and self.entry(head)[1]:
                return U.RMPUPDATE_FAIL_INUSE
        elif assigned:
            for p in range(pfn + 1, pfn + SMALL):
                e = self.entry(p)
                if e[2]:
                    return U.RMPUPDATE_FAIL_PERMISSION
                if e[0]:
                    return U.RMPUPDATE_FAIL_INUSE
        if assigned:
            new = (1, int(pagesize), int(bool(immutable)), 0, 0, asid, gpa, 0)
        else:
            new = (0, int(pagesize), 0, 0, 0, 0, 0, 0)
        self._put(pfn, new)
        return 0

    def psmash(self, spa):
        if spa % (SMALL * 4096):
            return U.PSMASH_FAIL_INPUT
        pfn = spa // 4096
        head = self.entry(pfn)
        if not head[1]:
            return U.PSMASH_FAIL_BADADDR
        for i in range(SMALL):
            if head[0]:
                self._put(pfn + i, (1, 0) + head[2:6] + (head[6] + i * 4096, head[7]))
            else:
                self._put(pfn + i, ZERO)
        return 0

    def rmp_make_private(self, pfn, gpa, asid, *, immutable=False, pagesize=0):
        return self.rmpupdate(pfn * 4096, assigned=1, pagesize=pagesize, immutable=immutable,
                              asid=asid, gpa=gpa)

    def rmp_make_shared(self, pfn, *, pagesize=0):
        return self.rmpupdate(pfn * 4096, pagesize=pagesize)

    def make_private_pages(self, pfns, gfns, asid, *, immutable=False):
        for p in pfns:
            self._pfn(int(p))
        for i, (p, g) in enumerate(zip(pfns, gfns)):
            st = self.rmp_make_private(int(p), int(g) * 4096, asid, immutable=immutable) \
                if int(g) < 1 << 40 else U.RMPUPDATE_FAIL_INPUT
            if st:
                return st, i
        return 0, len(pfns)

    def make_shared_pages(self, pfns):
        for p in pfns:
            self._pfn(int(p))
        for i, p in enumerate(pfns):
            st = self.rmp_make_shared(int(p))
            if st:
                return st, i
        return 0, len(pfns)

    def assigned_mask(self, pfns):
        return [bool(self.entry(int(p))[0]) for p in pfns]

    def pvalidate_pages(self, pfns, gpas, *, asid, validate):
        for p in pfns:
            self._pfn(int(p))
        for i, (p, g) in enumerate(zip(pfns, gpas)):
            status, cf = self.pvalidate(int(p), gpa=int(g), asid=asid, validate=validate)
            if status or cf:
                return status, cf, i
        return 0, 0, len(pfns)

    def adjust_pages(self, pfns, gpas, *, asid, target_vmpl, perms):
        for p in pfns:
            self._pfn(int(p))
        for i, (p, g) in enumerate(zip(pfns, gpas)):
            status = self.rmpadjust(int(p), gpa=int(g), asid=asid, target_vmpl=target_vmpl,
                                    perms=perms, keep_vmsa=True)
            if status:
                return status, i
        return 0, len(pfns)

    def preguest_prefix(self, pfns, asid):
        for p in pfns:
            self._pfn(int(p))
        for i, p in enumerate(pfns):
            e = self.entry(int(p))
            if not (e[0] and e[2] and not e[3] and not e[1] and e[5] == asid):
                return i
        return len(pfns)

    def fw_validate(self, pfns, asid, *, vmsa=False):
        for p in pfns:
            e = self.entry(int(p))
            if not (e[0] and e[5] == asid):
                raise ValueError(f"frame {int(p):#x} not assigned to ASID {asid}")
        for p in pfns:
            e = self.entry(int(p))
            self._put(int(p), (e[0], e[1], 0, 1, 1 if vmsa else e[4], e[5], e[6], e[7]))

    def _guest_check(self, what, pfn, e, gpa, asid):
        if not e[0] or e[5] != asid or e[2] or e[6] != gpa:
            raise RmpFaultRef(what, pfn)

    def pvalidate(self, pfn, *, gpa, asid, validate, pagesize=0):
        self._pfn(pfn)
        if pagesize not in (0, 1) or gpa % 4096:
            return U.PVALIDATE_FAIL_INPUT, 0
        if pagesize and (pfn % SMALL or gpa % (1 << 21)):
            return U.PVALIDATE_FAIL_INPUT, 0
        head, e = self._governing(pfn)
        if not pagesize and e[0] and e[1]:
            raise RmpFaultRef("PVALIDATE", pfn)
        self._guest_check("PVALIDATE", pfn, e, gpa if head == pfn else gpa - gpa % (1 << 21),
                          asid)
        if pagesize and not e[1]:
            return U.PVALIDATE_FAIL_SIZEMISMATCH, 0
        if e[3] == int(bool(validate)):
            return 0, 1
        self._put(head, e[:3] + (int(bool(validate)),) + e[4:])
        return 0, 0

    def rmpadjust(self, pfn, *, gpa, asid, target_vmpl, perms, vmsa=False, keep_vmsa=False):
        self._pfn(pfn)
        if not 1 <= target_vmpl <= 3 or not 0 <= perms <= 0xF or gpa % 4096:
            return U.PVALIDATE_FAIL_INPUT
        e = self.entry(pfn)
        self._guest_check("RMPADJUST", pfn, e, gpa, asid)
        shift = 4 * (target_vmpl - 1)
        bit = e[4] if keep_vmsa else int(bool(vmsa))
        self._put(pfn, e[:4] + (bit,) + e[5:7] + ((e[7] & ~(0xF << shift)) | perms << shift,))
        return 0

    def first_denied(self, pfns, asid):
        for p in pfns:
            self._pfn(int(p))
        for i, p in enumerate(pfns):
            _, e = self._governing(int(p))
            mine = e[0] and e[5] == asid
            if (e[0] if asid == 0 else not mine):
                return i
        return len(pfns)

    def validated(self, pfn, asid):
        if not 0 <= pfn < self.nframes:
            return False
        _, e = self._governing(pfn)
        return bool(e[0] and e[3] and e[5] == asid)

    def next_assigned(self, pfn, npages):
        end = min(pfn + npages, self.nframes)
        for p in range(pfn, end):
            if self._governing(p)[1][0]:
                return p
        return end
