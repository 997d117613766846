"""A guest's memory accesses in KVM_RUN: single accesses through the NPT and the fault path,
MMIO exits, and bulk operations over many pages in the C page kernel (sevcore.core.pages)."""
import threading

import numpy as np

from sevcore import uapi as U
from sevcore.core import pages as gm
from sevcore.hw.hostmem import PAGE_SHIFT, PAGE_SIZE
from sevcore.hw.rmp import RmpFault
from sevcore.kvm.guest import PageNotValidated
from sevcore.kvm.kvm_run import EXIT, THROW
from sevcore.kvm.mmu import MmioAccess, decode_gpa, entry_serves, faultin_pages, translate
from sevcore.core.npt import NPT_DIRTY_LOG

#: Locked read-modify-writes of every simulated CPU: the cache line's exclusive ownership.
_LOCKED_RMW = threading.Lock()

_BULK_OPS = {"read": gm.GUEST_OP_READ, "write": gm.GUEST_OP_WRITE, "fill": gm.GUEST_OP_FILL,
             "pattern": gm.GUEST_OP_PATTERN, "check": gm.GUEST_OP_CHECK,
             "stamp": gm.GUEST_OP_STAMP, "digest": gm.GUEST_OP_DIGEST}


def access_state(size, data):
    """The progress of one access that survives exits: bytes done, and the read buffer."""
    return {"pos": 0, "buf": bytearray(size) if data is None else None}


class GuestAccess:
    """Mixin of Vcpu: the guest's reads, writes and bulk page operations."""

    def _access(self, gpa, size, data, st=None):
        """A guest read (data None) or write of [gpa, gpa + size). Whole pages go to the C page
        kernel, partial pages (and MMIO) are handled here; progress is kept across exits so a
        retried access resumes where it stopped (in ``self._progress``, or in ``st``, a
        :func:`_access_state`, for an instruction that makes several accesses)."""
        if st is None:
            if self._progress is None:
                self._progress = access_state(size, data)
            st = self._progress
        write = data is not None
        while st["pos"] < size:
            pos = st["pos"]
            addr = gpa + pos
            off = addr & (PAGE_SIZE - 1)
            n = min(PAGE_SIZE - off, size - pos)
            if off == 0 and size - pos >= PAGE_SIZE:
                npages = (size - pos) >> PAGE_SHIFT
                span = slice(pos, pos + (npages << PAGE_SHIFT))
                buf = memoryview(data)[span] if write else memoryview(st["buf"])[span]
                done = [0]
                try:
                    self._page_kernel(gm.GUEST_OP_WRITE if write else gm.GUEST_OP_READ, addr,
                                      npages, done, buf=buf)
                except MmioAccess as e:
                    return self._mmio(st, e.gpa, data, pos + (done[0] << PAGE_SHIFT), 8)
                except PageNotValidated as e:
                    self._throw = e
                    return THROW
                finally:
                    st["pos"] = pos + (done[0] << PAGE_SHIFT)
                continue
            try:
                self._access_partial(addr, off, n, data, pos, st["buf"])
            except MmioAccess as e:
                return self._mmio(st, e.gpa + off, data, pos, min(n, 8))
            except PageNotValidated as e:
                self._throw = e
                return THROW
            st["pos"] = pos + n
        return None if write else bytes(st["buf"])

    def _cmpxchg(self, gpa, expected, new):
        """``LOCK CMPXCHG`` of the word at ``gpa`` (sevcore.kvm.guest.Guest.cmpxchg): read,
        compare and write through the NPT as one step under :data:`_LOCKED_RMW`. A locked
        access to MMIO is not modelled: the guest sees an exception."""
        def rmw():
            word = bytearray(8)
            with _LOCKED_RMW:
                self._access_partial(gpa, gpa & (PAGE_SIZE - 1), 8, None, 0, word)
                found = int.from_bytes(word, "little")
                if found == expected:
                    self._access_partial(gpa, gpa & (PAGE_SIZE - 1), 8,
                                         new.to_bytes(8, "little"), 0, None)
            return found
        return self._in_ram("locked cmpxchg", rmw)

    def _in_ram(self, what, fn):
        """``fn()``, an operation meant for RAM: reaching MMIO, or (SNP) a private page not
        validated, is an exception delivered to the guest (``what`` names the operation)."""
        try:
            return fn()
        except MmioAccess as e:
            self._throw = RuntimeError(f"{what} reached MMIO at gpa {e.gpa:#x}")
            return THROW
        except PageNotValidated as e:
            self._throw = e
            return THROW

    def _access_partial(self, addr, off, n, data, pos, buf):
        """Bytes [off, off + n) of one page, through the NPT (and the key for C-bit accesses)."""
        vm = self.vm
        write = data is not None
        real, private, encrypted = decode_gpa(vm, addr)
        gfn = real >> PAGE_SHIFT
        pfn, flags = translate(vm, gfn, private, write)
        if write and flags & NPT_DIRTY_LOG and self.dirty_ring is not None:
            # The write fault on a logged page pushes it before the store (may exit).
            self._dirty_ring_push(gfn)
        if private and vm.sev.snp_active and not vm.host.rmp.validated(int(pfn), vm.sev.asid):
            # The RMP check comes after the nested page table's (the push above).
            _rmp_refuses(vm, int(pfn), real, write)
        spa = (pfn << PAGE_SHIFT) + off
        # The memory controller patches a partial encrypted page (decrypt, patch, encrypt).
        asid = vm.sev.asid if encrypted and vm.encryption_engine() is not None else 0
        if write:
            vm.host.umc.write(spa, memoryview(data)[pos:pos + n], asid)
        else:
            buf[pos:pos + n] = vm.host.umc.read(spa, n, asid)
        if write and flags & NPT_DIRTY_LOG and self.dirty_ring is None:
            vm.mark_page_dirty(gfn)

    def _mmio(self, st, gpa, data, pos, n):
        """KVM_EXIT_MMIO for ``n`` bytes at ``gpa`` (C-bit / shared bit stripped); the read
        data user space supplies completes the access on the next KVM_RUN. KVM cannot decode an
        SEV-ES guest's instruction: the MMIO SPTE's reserved bits reflect the #NPF as #VC."""
        if self.guest_state_protected:
            return self._vc(U.SVM_EXIT_NPF, f"MMIO at gpa {gpa:#x}")
        run = self.kvm_run
        run.exit_reason = U.KVM_EXIT_MMIO
        run.mmio.phys_addr = gpa
        run.mmio.len = n
        run.mmio.is_write = int(data is not None)
        run.mmio.data = bytearray(8)
        if data is not None:
            run.mmio.data[:n] = data[pos:pos + n]

        def complete():
            if data is None:
                st["buf"][pos:pos + n] = bytes(run.mmio.data[:n])
            st["pos"] = pos + n
        self._complete = complete
        return EXIT

    def _page_kernel(self, op, first_gpa, n, done, *, gpas=None, arg=0, buf=None, out=None,
                     on_chunk=None):
        """Run the C page kernel over ``n`` pages from the page-aligned ``first_gpa`` (or the
        page-aligned list ``gpas``), from page ``done[0]`` on (``out``: CHECK's two words, or DIGEST's word per
        page), faulting in the pages it stops at in batches
        (:func:`sevcore.kvm.mmu.faultin_pages`). ``done[0]`` always holds the pages completed, also
        when MemoryFault, MmioAccess or PageNotValidated propagates (an SEV-SNP guest's private
        access stops in front of a page it has not validated). ``on_chunk(start, k)`` sees each
        kernel call's result (CHECK accumulates its ``out`` there)."""
        vm = self.vm
        write = op in gm.WRITE_OPS
        ops = vm.page_ops()
        while done[0] < n:
            start = done[0]
            first = first_gpa + (start << PAGE_SHIFT) if gpas is None else int(gpas[start])
            real, private, encrypted = decode_gpa(vm, first)
            tag = first - real             # the C-bit or shared bit, common to the access
            engine = vm.encryption_engine() if encrypted else None
            if gpas is None:
                gfns = np.arange(real >> PAGE_SHIFT, (real >> PAGE_SHIFT) + n - start,
                                 dtype=np.uint64)
            else:
                gfns = (gpas[start:] - np.uint64(tag)) >> np.uint64(PAGE_SHIFT)
            page_buf = None if buf is None else buf[start << PAGE_SHIFT:]
            # An SNP guest's private access: the RMP's validation check in the kernel's walk.
            rmp = vm.host.rmp if private and vm.sev.snp_active else None
            k = ops.run(op, gfns=gfns, private=private, engine=engine, arg=arg, buf=page_buf,
                        out=out[start:] if op == gm.GUEST_OP_DIGEST else out,
                        ring=self.dirty_ring, rmp=None if rmp is None else rmp.cdata(),
                        asid=0 if rmp is None else vm.sev.asid)
            if on_chunk is not None:
                on_chunk(start, k)
            done[0] = start + k
            if done[0] == n:
                return
            g = int(gfns[k])
            if g > vm.max_gfn:
                raise MmioAccess(g << PAGE_SHIFT)
            _, private, _ = decode_gpa(vm, (g << PAGE_SHIFT) | tag)
            ring = write and self.dirty_ring is not None
            if ring or rmp is not None:
                hit = vm.npt.lookup(g)
                if hit is not None and entry_serves(hit[1], private, write):
                    # No fault: the kernel stopped for the push that fills the ring (csrc/
                    # guest.h), for the RMP check (after the NPT's: the push first), or a page
                    # listed twice no longer logs.
                    if ring and hit[1] & NPT_DIRTY_LOG:
                        self._dirty_ring_push(g)
                        continue
                    if rmp is not None and private and \
                            not rmp.validated(int(hit[0]), vm.sev.asid):
                        _rmp_refuses(vm, int(hit[0]), g << PAGE_SHIFT, write)
                    if ring:
                        continue
            faultin_pages(vm, gfns[k:], private, write)

    def _bulk(self, kind, args):
        """A bulk operation: the C page kernel over all its pages (progress survives exits)."""
        if kind == "bulk":
            name, gpa, n, arg = args
            gpas = buf = None
        else:
            name, gpas, arg, buf = args       # gpas: page aligned (sevcore.kvm.guest._page_gpas)
            gpa, n = 0, len(gpas)
        st = self._progress
        if st is None:
            result = None                  # what the operation returns, filled across exits
            if name == "digest":
                result = np.zeros(n, np.uint64)
            elif name == "read":
                result = np.empty((n, PAGE_SIZE), np.uint8) if buf is None else buf
            elif name == "check":
                result = [0, None]         # mismatching pages, index of the first
            st = self._progress = {"done": [0], "result": result}
        result = st["result"]
        out = on_chunk = None
        if name == "digest":
            out = result
        elif name == "read":
            buf = np.frombuffer(result, np.uint8)
        elif name == "check":
            out = np.zeros(2, np.uint64)

            def on_chunk(start, k):
                if k:
                    result[0] += int(out[0])
                    if result[1] is None and int(out[1]) != gm.NO_MISMATCH:
                        result[1] = start + int(out[1])
        if self._in_ram(f"bulk {name}", lambda: self._page_kernel(
                _BULK_OPS[name], gpa, n, st["done"], gpas=gpas, arg=arg, buf=buf, out=out,
                on_chunk=on_chunk)) is THROW:
            return THROW
        return tuple(result) if name == "check" else result


def _rmp_refuses(vm, pfn, gpa, write):
    """The RMP check of an SNP guest's private access to frame ``pfn`` at ``gpa`` failed (AMD64
    APM vol. 2 15.36.10): a frame the guest owns but has not validated is #VC PAGE_NOT_VALIDATED
    in the guest (PageNotValidated); any other owner is the RMP nested page fault, which KVM
    cannot resolve for a page it mapped private (RmpFault, EFAULT, out of KVM_RUN)."""
    entry = vm.host.rmp.entry(pfn)
    if not entry.assigned:                  # a 2 MiB entry governs the frames under it
        head = vm.host.rmp.entry(pfn & ~511)
        if head.assigned and head.pagesize:
            entry = head
    if entry.assigned and entry.asid == vm.sev.asid and not entry.validated:
        raise PageNotValidated(gpa, write)
    raise RmpFault("guest access", pfn, gpa, U.X86_PF_RMP | (U.X86_PF_WRITE if write else 0),
                   entry)
