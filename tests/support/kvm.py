"""Test helpers over the KVM model: a guest driven one access at a time, and the check that no
NPT entry of a VM points at a frame the VM does not own."""
import numpy as np

from sevcore.core.npt import NPT_PRIVATE, Npt
from sevcore.uapi import KVM_EXIT_IO, PAGE_SHIFT


def interpreter(g, box):
    """Guest program: performs the operation the host put in ``box``, reports the result."""
    while True:
        op = box.pop()
        result = yield op(g)
        yield g.sync(result)


class Guest:
    """``vcpu`` (default: a new vCPU 0 of ``vm``) running :func:`interpreter`: each call is one
    KVM_RUN to the ucall."""

    def __init__(self, vm, vcpu=None):
        self.box = []
        self.vcpu = vm.create_vcpu(0) if vcpu is None else vcpu
        self.vcpu.set_guest_code(interpreter, self.box)

    def do(self, op):
        """Run ``op(g)`` in the guest; its result, or what KVM_RUN raises."""
        self.box.append(op)
        run = self.vcpu.run()
        assert run.exit_reason == KVM_EXIT_IO, run.exit_reason
        cmd, (result,) = self.vcpu.get_ucall()
        assert cmd == "sync"
        return result

    def read(self, gpa, n):
        return self.do(lambda g: g.read(gpa, n))

    def write(self, gpa, data):
        return self.do(lambda g: g.write(gpa, data))


def stray_npt_entries(vm):
    """The entries ``(gfn, pfn, flags)`` of ``vm``'s NPT that map a gfn to any frame but the one
    backing that kind of access now: for a private entry, or any entry of a gmem-only memslot,
    the gfn's page of the memslot's bound guest_memfd; for a shared one, the page at the
    memslot's HVA (``kvm.pagemap``: VMM anonymous memory or a guest_memfd mapping). An entry
    outside every memslot is stray too. One batch per memslot, so it can run after every step
    of a test."""
    if vm.npt.closed:
        return []
    gfns, pfns, flags = vm.npt.items()
    ok = np.zeros(len(gfns), bool)
    for slot in vm.memslots.values():
        if slot.as_id != 0:
            continue
        lo, hi = np.searchsorted(gfns, [slot.base_gfn, slot.end_gfn])
        if lo == hi:
            continue
        offsets = gfns[lo:hi] - np.uint64(slot.base_gfn)
        from_gmem = (flags[lo:hi] & np.uint64(NPT_PRIVATE) != 0) | slot.gmem_only
        want = np.full(hi - lo, Npt.MISS, np.uint64)
        if slot.gmem_file is not None:
            want[:] = slot.gmem_file.page_cache.lookup_batch(offsets + np.uint64(slot.gmem_pgoff))
        want[~from_gmem] = vm.kvm.pagemap(np.uint64(slot.userspace_addr >> PAGE_SHIFT)
                                          + offsets[~from_gmem])
        ok[lo:hi] = (want == pfns[lo:hi]) & (want != Npt.MISS)
    bad = ~ok
    return list(zip(gfns[bad].tolist(), pfns[bad].tolist(), flags[bad].tolist()))
