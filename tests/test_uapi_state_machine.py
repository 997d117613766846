"""A hypothesis state machine over the KVM uAPI of a SW_PROTECTED VM: attributes, guest_memfd
fallocate, guest accesses through KVM_RUN and VMM accesses through HVAs, against a small
reference model.

Invariants: the host never reaches a guest_memfd page through any HVA; a refused call changes
nothing; a guest read returns the last value written to that page through the same kind of
access (zero after a punch-hole or on a fresh page).
"""
import numpy as np
from hypothesis import settings, strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, rule

import sevcore
from sevcore.uapi import *

from kvmutil import Guest

BASE_GPA = 1 << 32
NPAGES = 48
GMEM_OFFSET_PAGES = 8          # the slot starts 8 pages into its guest_memfd
page = st.integers(0, NPAGES - 1)
value = st.integers(1, (1 << 64) - 1)


class UapiMachine(RuleBasedStateMachine):
    def __init__(self):
        super().__init__()
        self.kvm = sevcore.Kvm()
        self.vm = self.kvm.create_vm(KVM_X86_SW_PROTECTED_VM)
        self.gmem = self.vm.create_guest_memfd((NPAGES + 2 * GMEM_OFFSET_PAGES) * PAGE_SIZE)
        self.hva = self.kvm.mmap(NPAGES * PAGE_SIZE)
        self.vm.set_user_memory_region2(10, KVM_MEM_GUEST_MEMFD, BASE_GPA, NPAGES * PAGE_SIZE,
                                        self.hva, GMEM_OFFSET_PAGES * PAGE_SIZE, self.gmem)
        self.guest = Guest(self.vm).do
        # The model.
        self.private = [False] * NPAGES
        self.shared_val = [0] * NPAGES
        self.gmem_val = {}              # gmem page index -> value; absent = 0

    # -- helpers -------------------------------------------------------------------------------

    def snapshot(self):
        return (list(self.vm.private), [a.tolist() for a in self.gmem.page_cache.items()],
                self.kvm.read(self.hva, NPAGES * PAGE_SIZE))

    # -- rules -------------------------------------------------------------------------------------

    @rule(p=page, v=value)
    def guest_write(self, p, v):
        self.guest(lambda g: g.write(BASE_GPA + p * PAGE_SIZE, v.to_bytes(8, "little")))
        if self.private[p]:
            self.gmem_val[p + GMEM_OFFSET_PAGES] = v
        else:
            self.shared_val[p] = v

    @rule(p=page)
    def guest_read(self, p):
        got = int.from_bytes(self.guest(lambda g: g.read(BASE_GPA + p * PAGE_SIZE, 8)), "little")
        want = self.gmem_val.get(p + GMEM_OFFSET_PAGES, 0) if self.private[p] \
            else self.shared_val[p]
        assert got == want, (p, self.private[p], got, want)

    @rule(p=page, v=value)
    def vmm_write(self, p, v):
        self.kvm.write(self.hva + p * PAGE_SIZE, v.to_bytes(8, "little"))
        self.shared_val[p] = v

    @rule(p=page)
    def vmm_read(self, p):
        got = int.from_bytes(self.kvm.read(self.hva + p * PAGE_SIZE, 8), "little")
        assert got == self.shared_val[p]

    @rule(start=page, n=st.integers(1, 8), private=st.booleans())
    def set_attributes(self, start, n, private):
        n = min(n, NPAGES - start)
        self.vm.set_memory_attributes(BASE_GPA + start * PAGE_SIZE, n * PAGE_SIZE,
                                      KVM_MEMORY_ATTRIBUTE_PRIVATE if private else 0)
        for i in range(start, start + n):
            self.private[i] = private

    @rule(start=st.integers(0, NPAGES + 2 * GMEM_OFFSET_PAGES - 1), n=st.integers(1, 8),
          punch=st.booleans())
    def fallocate(self, start, n, punch):
        total = NPAGES + 2 * GMEM_OFFSET_PAGES
        if not punch:
            n = min(n, total - start)
        self.gmem.fallocate(FALLOC_FL_KEEP_SIZE | (FALLOC_FL_PUNCH_HOLE if punch else 0),
                            start * PAGE_SIZE, n * PAGE_SIZE)
        if punch:
            for i in range(start, start + n):
                self.gmem_val.pop(i, None)

    @rule(data=st.data())
    def refused_call(self, data):
        """Calls the kernel refuses raise OSError and change nothing."""
        calls = [
            lambda: self.vm.set_memory_attributes(BASE_GPA + 1, PAGE_SIZE, 0),
            lambda: self.vm.set_memory_attributes(BASE_GPA, PAGE_SIZE, 1 << 4),
            lambda: self.vm.set_memory_attributes(BASE_GPA, PAGE_SIZE, 0, flags=1),
            lambda: self.gmem.fallocate(FALLOC_FL_PUNCH_HOLE, 0, PAGE_SIZE),
            lambda: self.gmem.fallocate(FALLOC_FL_KEEP_SIZE, 1, PAGE_SIZE),
            lambda: self.gmem.fallocate(FALLOC_FL_KEEP_SIZE, 0, (NPAGES + 17) * PAGE_SIZE),
            lambda: self.vm.set_user_memory_region2(10, 0, BASE_GPA, PAGE_SIZE, self.hva),
            lambda: self.vm.set_user_memory_region2(11, KVM_MEM_GUEST_MEMFD, BASE_GPA + (1 << 30),
                                                    PAGE_SIZE, self.hva,
                                                    GMEM_OFFSET_PAGES * PAGE_SIZE, self.gmem),
        ]
        call = data.draw(st.sampled_from(calls))
        before = self.snapshot()
        try:
            call()
        except OSError:
            pass
        else:
            raise AssertionError("the call should have been refused")
        assert self.snapshot() == before

    # -- invariants ----------------------------------------------------------------------------

    @invariant()
    def host_never_maps_gmem(self):
        gmem_pfns = set(self.gmem.page_cache.items()[1].tolist())
        _, anon_pfns, _ = self.kvm._pt.items(0, 1 << 36)
        assert gmem_pfns.isdisjoint(set(np.asarray(anon_pfns).tolist()))

    @invariant()
    def npt_private_entries_come_from_gmem(self):
        gfns, pfns, flags = self.vm.npt.items(0, 1 << 36)
        gmem_pfns = set(self.gmem.page_cache.items()[1].tolist())
        for gfn, pfn, f in zip(np.asarray(gfns).tolist(), np.asarray(pfns).tolist(),
                               np.asarray(flags).tolist()):
            p = gfn - (BASE_GPA >> 12)
            assert bool(f & sevcore.core.npt.NPT_PRIVATE) == self.private[p]
            assert (pfn in gmem_pfns) == self.private[p]


UapiMachine.TestCase.settings = settings(max_examples=60, stateful_step_count=40, deadline=None)
TestUapi = UapiMachine.TestCase
