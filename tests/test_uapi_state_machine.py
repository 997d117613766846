"""Hypothesis state machines over the KVM uAPI.

``UapiMachine``: a SW_PROTECTED VM's attributes, guest_memfd fallocate, guest accesses through
KVM_RUN and VMM accesses through HVAs, against a small reference model. Invariants: the host
never reaches a guest_memfd page through any HVA; a refused call changes nothing; a guest read
returns the last value written to that page through the same kind of access (zero after a
punch-hole or on a fresh page).

``OwnershipMachine``: everything that frees a frame or takes it from a gfn, on a
SW_PROTECTED or DEFAULT VM with a guest_memfd of each flag set it supports (MMAP included):
punch-hole, close, VMM mappings of the file, munmap, memslot delete, re-create, move and flag
changes, attribute conversions, with guest and VMM accesses in between and fresh VMM pages
holding a secret. Invariants: no NPT entry maps a gfn to a frame other than what backs it now
(``support.kvm.stray_npt_entries``), and no guest read ever returns the secret.

``SregsMachine``: KVM_SET_SREGS of valid and invalid CR0/CR4/EFER/CR3/APIC-base combinations,
KVM_SET_MSRS of EFER, INIT, and hypercalls in the mode the state gives, against an independent
statement of kvm_is_valid_sregs; see the class docstring for its invariants.

``DirtyRingMachine``: KVM_CAP_DIRTY_LOG_RING's protocol (pushes, the VMM's collect, resets,
soft-full exits, logging toggled) against a model of the ring and of guest memory.

The machines check the NPT ownership invariant after every step.
"""
from errno import EBADF, EFAULT, EINVAL, EIO, ENXIO

import numpy as np
import pytest
from hypothesis import event, settings, strategies as st
from hypothesis.stateful import (RuleBasedStateMachine, initialize, invariant, precondition,
                                 rule)

import sevcore
from sevcore.core.dirty_ring import collect as ring_collect
from sevcore.errors import SigBus
from sevcore.uapi import *

from support.kvm import Guest, interpreter, stray_npt_entries

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
    def npt_maps_only_what_the_vm_owns(self):
        assert stray_npt_entries(self.vm) == []

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


P = PAGE_SIZE
G0 = BASE_GPA >> PAGE_SHIFT
GMEM_PAGES = 24
GMEM_SLOT, GMEM_SLOT_PGOFF = 10, 4       # slot 10: guest_memfd pages 4..11 at gfn G0
PLAIN_SLOT, FILE_PGOFF = 11, 8           # slot 11: anonymous memory or file pages 8..15
SLOT_PAGES = 8
PLAIN_BASES = (16, 32)                   # slot 11's two places, in pages from G0
SPAN = 48                                # guest accesses reach G0..G0+47: slots and holes
#: Rules that end what the others build (delete, munmap) act on one draw in RARE (closing the
#: file, on one in two), so that most runs get to fault pages in before they go.
RARE = 4
rare = st.integers(0, RARE - 1)
#: Guest pages (from G0): mostly in the memslots' places, sometimes anywhere.
guest_page = st.one_of(st.integers(0, SLOT_PAGES - 1),
                       *(st.integers(b, b + SLOT_PAGES - 1) for b in PLAIN_BASES),
                       st.integers(0, SPAN - 1))
SECRET = b"VMM secret page!"
#: (VM type, guest_memfd flags): each supported flag set of a VM with and without private memory.
OWNERSHIP_CASES = {
    "sw_protected": (KVM_X86_SW_PROTECTED_VM, 0),
    "sw_protected_mmap": (KVM_X86_SW_PROTECTED_VM, GUEST_MEMFD_FLAG_MMAP),
    "default": (KVM_X86_DEFAULT_VM, 0),
    "default_mmap": (KVM_X86_DEFAULT_VM, GUEST_MEMFD_FLAG_MMAP),
    "default_mmap_shared": (KVM_X86_DEFAULT_VM,
                            GUEST_MEMFD_FLAG_MMAP | GUEST_MEMFD_FLAG_INIT_SHARED),
}


class OwnershipMachine(RuleBasedStateMachine):
    """Frames freed or moved under a VM with live guest mappings; see the module docstring.
    ``CASE`` is the VM type and the guest_memfd's flags (one subclass per OWNERSHIP_CASES)."""

    CASE = OWNERSHIP_CASES["sw_protected_mmap"]

    @initialize(fmap=st.booleans(), in_file=rare)
    def setup(self, fmap, in_file):
        """The VM, its guest_memfd, perhaps a VMM mapping of the file, both memslots (slot 11
        mostly in that mapping), and the guest's first write to every page of both."""
        vm_type, self.flags = self.CASE
        # A small host: finished examples' hosts wait for the cyclic GC, each holding an
        # address-space reservation of its memory size.
        self.kvm = sevcore.Host(memory_size=64 << 20).kvm
        self.vm = self.kvm.create_vm(vm_type)
        self.gmem = self.vm.create_guest_memfd(GMEM_PAGES * P, self.flags)
        self.fmap = None                 # the VMM's mapping of the whole file, if any
        self.vcpu, self.box, self.next_vcpu = None, [], 0
        if fmap and self.flags & GUEST_MEMFD_FLAG_MMAP:
            self.mmap_gmem()
        self.add_gmem_slot()
        self.add_plain_slot(bool(in_file))
        for base in (0, PLAIN_BASES[0]):       # every rule then meets mapped pages
            self.guest_stamp_slot(base, 1)

    # -- helpers -------------------------------------------------------------------------------

    def guest(self, op):
        """Run ``op(g)`` on a vCPU; None if KVM_RUN failed (a memory fault) or exited for
        another reason (MMIO, no memslots), after which a fresh vCPU takes the next access."""
        if self.vcpu is None:
            self.vcpu = self.vm.create_vcpu(self.next_vcpu)
            self.next_vcpu += 1
            self.box = []
            self.vcpu.set_guest_code(interpreter, self.box)
        self.box.append(op)
        try:
            run = self.vcpu.run()
        except OSError as e:
            assert e.errno in (EFAULT, EIO), e
            self.vcpu = None
            return None
        if run.exit_reason != KVM_EXIT_IO:
            self.vcpu = None
            return None
        cmd, (result,) = self.vcpu.get_ucall()
        assert cmd == "sync"
        return result

    def slot(self, id):
        return self.vm.memslots.get((0, id))

    def vmm(self, fn, *args):
        """A VMM access; unmapped HVAs (EFAULT) and private file pages (SIGBUS) are expected."""
        try:
            return fn(*args)
        except OSError as e:
            assert e.errno == EFAULT, e
        except SigBus:
            pass
        return None

    # -- rules ---------------------------------------------------------------------------------

    @rule(page=guest_page, value=st.integers(1, 1 << 63))
    def guest_write(self, page, value):
        self.guest(lambda g: g.write(BASE_GPA + page * P, value.to_bytes(8, "little")))

    @rule(page=guest_page)
    def guest_read(self, page):
        got = self.guest(lambda g: g.read(BASE_GPA + page * P, len(SECRET)))
        assert got != SECRET, f"the guest read a VMM page at gfn G0+{page}"

    @rule(base=st.sampled_from((0,) + PLAIN_BASES), value=st.integers(1, 1 << 63))
    def guest_stamp_slot(self, base, value):
        """One bulk write of a memslot's place: the batched fault path maps all its pages (a
        bulk operation cannot exit for MMIO, so only where a memslot is)."""
        s = self.vm.gfn_to_memslot(G0 + base)
        if s is not None and s.base_gfn == G0 + base:
            self.guest(lambda g: g.stamp(BASE_GPA + base * P, SLOT_PAGES, value))

    @rule(base=st.sampled_from((0,) + PLAIN_BASES))
    def guest_read_slot(self, base):
        got = self.guest(lambda g: g.read(BASE_GPA + base * P, SLOT_PAGES * P))
        for i in range(SLOT_PAGES if got is not None else 0):
            assert got[i * P:i * P + len(SECRET)] != SECRET, \
                f"the guest read a VMM page at gfn G0+{base + i}"

    @precondition(lambda self: self.vm.has_private_mem)
    @rule(start=st.integers(0, SPAN - 1), n=st.integers(1, 8), private=st.booleans())
    def set_attributes(self, start, n, private):
        n = min(n, SPAN - start)
        self.vm.set_memory_attributes(BASE_GPA + start * P, n * P,
                                      KVM_MEMORY_ATTRIBUTE_PRIVATE if private else 0)

    @rule(start=st.one_of(st.integers(GMEM_SLOT_PGOFF, FILE_PGOFF + SLOT_PAGES - 1),
                          st.integers(0, GMEM_PAGES - 1)), n=st.integers(1, 8),
          punch=st.booleans())
    def fallocate(self, start, n, punch):
        if not punch:
            n = min(n, GMEM_PAGES - start)
        mode = FALLOC_FL_KEEP_SIZE | (FALLOC_FL_PUNCH_HOLE if punch else 0)
        try:
            self.gmem.fallocate(mode, start * P, n * P)
        except OSError as e:
            assert e.errno == EBADF and self.gmem.closed

    @precondition(lambda self: not self.gmem.closed)
    @rule(draw=st.booleans())
    def close_gmem(self, draw):
        if draw:
            self.gmem.close()

    @precondition(lambda self: self.flags & GUEST_MEMFD_FLAG_MMAP and self.fmap is None
                  and not self.gmem.closed)
    @rule()
    def mmap_gmem(self):
        self.fmap = self.gmem.mmap(GMEM_PAGES * P)

    @precondition(lambda self: self.fmap is not None)
    @rule(page=st.integers(0, GMEM_PAGES - 1), n=st.integers(1, GMEM_PAGES), draw=rare)
    def munmap_gmem(self, page, n, draw):
        if not draw:
            self.kvm.munmap(self.fmap + page * P, min(n, GMEM_PAGES - page) * P)

    @precondition(lambda self: self.slot(GMEM_SLOT) is not None)
    @rule(draw=rare)
    def delete_gmem_slot(self, draw):
        if not draw:
            self.vm.set_user_memory_region2(GMEM_SLOT, KVM_MEM_GUEST_MEMFD, BASE_GPA, 0, 0)

    def gmem_only(self):
        return bool(self.flags & GUEST_MEMFD_FLAG_MMAP)

    @precondition(lambda self: self.slot(GMEM_SLOT) is None)
    @rule()
    def add_gmem_slot(self):
        hva = self.kvm.mmap(SLOT_PAGES * P)
        if self.gmem_only():             # VMM memory no access to the slot may reach
            for i in range(SLOT_PAGES):
                self.kvm.write(hva + i * P, SECRET)
        try:
            self.vm.set_user_memory_region2(GMEM_SLOT, KVM_MEM_GUEST_MEMFD, BASE_GPA,
                                            SLOT_PAGES * P, hva, GMEM_SLOT_PGOFF * P, self.gmem)
        except OSError as e:
            assert e.errno == EBADF and self.gmem.closed

    @precondition(lambda self: self.slot(PLAIN_SLOT) is not None)
    @rule(draw=rare)
    def delete_plain_slot(self, draw):
        if not draw:
            self.vm.set_user_memory_region2(PLAIN_SLOT, 0, 0, 0, 0)

    @precondition(lambda self: self.slot(PLAIN_SLOT) is None)
    @rule(in_file=st.booleans())
    def add_plain_slot(self, in_file):
        in_file = in_file and self.fmap is not None
        hva = self.fmap + FILE_PGOFF * P if in_file else self.kvm.mmap(SLOT_PAGES * P)
        self.vm.set_user_memory_region2(PLAIN_SLOT, 0, BASE_GPA + PLAIN_BASES[0] * P,
                                        SLOT_PAGES * P, hva)

    @precondition(lambda self: self.slot(PLAIN_SLOT) is not None)
    @rule(log_dirty=st.booleans())
    def move_plain_slot(self, log_dirty):
        s = self.slot(PLAIN_SLOT)
        base = PLAIN_BASES[1] if s.base_gfn == G0 + PLAIN_BASES[0] else PLAIN_BASES[0]
        self.vm.set_user_memory_region2(PLAIN_SLOT, 0, BASE_GPA + base * P, SLOT_PAGES * P,
                                        s.userspace_addr)
        if log_dirty:                    # then a flags-only change of the moved slot
            self.vm.set_user_memory_region2(PLAIN_SLOT, KVM_MEM_LOG_DIRTY_PAGES,
                                            BASE_GPA + base * P, SLOT_PAGES * P,
                                            s.userspace_addr)

    @rule(id=st.sampled_from([GMEM_SLOT, PLAIN_SLOT]), page=st.integers(0, SLOT_PAGES - 1),
          n=st.integers(1, SLOT_PAGES), draw=rare)
    def munmap_slot_memory(self, id, page, n, draw):
        s = self.slot(id)
        if s is not None and not draw:
            self.kvm.munmap(s.userspace_addr + page * P, min(n, SLOT_PAGES - page) * P)

    @rule(id=st.sampled_from([GMEM_SLOT, PLAIN_SLOT]), page=st.integers(0, SLOT_PAGES - 1),
          write=st.booleans(), value=st.integers(1, 1 << 63))
    def vmm_access(self, id, page, write, value):
        s = self.slot(id)
        if s is None:
            return
        hva = s.userspace_addr + page * P
        if write:
            data = SECRET if id == GMEM_SLOT and self.gmem_only() else value.to_bytes(8, "little")
            self.vmm(self.kvm.write, hva, data)
        else:
            self.vmm(self.kvm.read, hva, 8)

    @rule()
    def vmm_secret(self):
        """The VMM takes a fresh page and puts a secret in it: a frame freed before this is the
        one it gets, and a guest still mapping that frame would read the secret."""
        self.kvm.write(self.kvm.mmap(P), SECRET)

    # -- invariants ----------------------------------------------------------------------------

    @invariant()
    def npt_maps_only_what_the_vm_owns(self):
        assert stray_npt_entries(self.vm) == []


for _name, _case in OWNERSHIP_CASES.items():
    _machine = type(f"OwnershipMachine_{_name}", (OwnershipMachine,), {"CASE": _case})
    # The shared-file case has the most ways in (VMM mappings, a memslot inside one): more runs.
    _examples = 80 if _case[1] & GUEST_MEMFD_FLAG_INIT_SHARED else 40
    _machine.TestCase.settings = settings(max_examples=_examples, stateful_step_count=40,
                                          deadline=None)
    _machine.TestCase.__doc__ = (f"No NPT entry outlives the frame it maps, and no guest read "
                                 f"returns VMM memory, on a {_name} VM and guest_memfd.")
    globals()[f"TestOwnership_{_name}"] = _machine.TestCase


# -- the vCPU's architectural state (KVM_GET/SET_SREGS) ------------------------------------------

#: CR0/CR4/EFER/CR3/APIC-base values that make valid and invalid combinations.
CR0S = [X86_CR0_ET, X86_CR0_PE | X86_CR0_ET, X86_CR0_PE | X86_CR0_PG | X86_CR0_ET,
        X86_CR0_PE | X86_CR0_NE | X86_CR0_PG, X86_CR0_CD | X86_CR0_NW | X86_CR0_ET,
        X86_CR0_NW, X86_CR0_PG, 1 << 32 | X86_CR0_PE]
CR4_BITS = [X86_CR4_PAE, X86_CR4_OSFXSR, X86_CR4_OSXSAVE, X86_CR4_PGE, X86_CR4_SMEP,
            X86_CR4_SMXE, X86_CR4_LA57]
EFERS = [0, EFER_SCE, EFER_LME, EFER_LMA, EFER_LME | EFER_LMA, EFER_LME | EFER_LMA | EFER_NX]
CR3S = [0, 0x1000, 0x1020, 1 << 47, 1 << 48]
APIC_BASES = [0xfee00900, 0xfee00800, 0xfee00000, 0xfee00d00, 0xfee00901, 1 << 50 | 0x900]
HC_HIGH = 0x1234 << 32


def sregs_valid(s):
    """An independent statement of what kvm_is_valid_sregs, kvm_is_valid_cr0/cr4 and
    kvm_apic_set_base accept for this machine's vCPU (MAXPHYADDR 48, XSAVE, no x2APIC, no
    CPUID leaf 7)."""
    if s.efer & EFER_LME and s.cr0 & X86_CR0_PG:
        if not s.cr4 & X86_CR4_PAE or not s.efer & EFER_LMA or s.cr3 >> 48:
            return False
    elif s.efer & EFER_LMA or s.cs.l:
        return False
    if s.cr4 & (X86_CR4_SMEP | X86_CR4_SMXE | X86_CR4_LA57):
        return False
    if s.cr0 >> 32 or (s.cr0 & X86_CR0_NW and not s.cr0 & X86_CR0_CD) or \
            (s.cr0 & X86_CR0_PG and not s.cr0 & X86_CR0_PE):
        return False
    return s.apic_base in (0xfee00900, 0xfee00800, 0xfee00000)


class SregsMachine(RuleBasedStateMachine):
    """KVM_SET_SREGS with valid and invalid combinations, KVM_SET_MSRS of EFER and FS base,
    INIT, and hypercalls in whatever mode the state gives. Invariants: a call is refused exactly
    when the oracle says so and then changes nothing; an accepted one reads back as set;
    GET_SREGS -> SET_SREGS changes nothing (and is refused only where the oracle refuses the
    state, which a host-initiated EFER write can leave); the VMCB view keeps EFER.SVME and CR4.MCE, has no
    CR0.CD/NW, and its CPL is SS.DPL; a hypercall's operand size and exit follow the mode."""

    def __init__(self):
        super().__init__()
        self.kvm = sevcore.Host(memory_size=64 << 20).kvm
        self.vm = self.kvm.create_vm(KVM_X86_SW_PROTECTED_VM)
        self.vm.enable_cap(KVM_CAP_EXIT_HYPERCALL, 1 << KVM_HC_MAP_GPA_RANGE)
        self.vm.set_user_memory_region(0, 0, 0, 16 * P, self.kvm.mmap(16 * P))
        self.vcpu = self.vm.create_vcpu(0)
        self.box = []
        self.vcpu.set_guest_code(interpreter, self.box)

    def sregs(self):
        return bytes(self.vcpu.get_sregs())

    @rule(cr0=st.sampled_from(CR0S), cr4=st.sets(st.sampled_from(CR4_BITS)),
          efer=st.sampled_from(EFERS), cr3=st.sampled_from(CR3S), cs_l=st.integers(0, 1),
          dpl=st.integers(0, 3), apic_base=st.sampled_from(APIC_BASES),
          base=st.integers(0, (1 << 64) - 1), limit=st.integers(0, (1 << 32) - 1),
          selector=st.integers(0, 0xffff), cr8=st.integers(0, 0x1f))
    def set_sregs(self, cr0, cr4, efer, cr3, cs_l, dpl, apic_base, base, limit, selector, cr8):
        s = self.vcpu.get_sregs()
        s.cr0, s.cr4, s.efer, s.cr3, s.apic_base = cr0, sum(cr4), efer, cr3, apic_base
        s.cs.l, s.ss.dpl, s.cr8 = cs_l, dpl, cr8
        s.fs.base, s.fs.limit, s.fs.selector = base, limit, selector
        before, old_cr8 = self.sregs(), self.vcpu.get_sregs().cr8
        try:
            self.vcpu.set_sregs(s)
        except OSError as e:
            assert e.errno == EINVAL and not sregs_valid(s)
            assert self.sregs() == before
            return
        assert sregs_valid(s)
        g = self.vcpu.get_sregs()
        assert (g.cr0, g.cr3, g.cr4, g.efer, g.apic_base) == (cr0, cr3, sum(cr4), efer,
                                                               apic_base)
        assert g.cr8 == (cr8 if cr8 < 16 else old_cr8)
        assert (g.cs.l, g.ss.dpl, g.fs.base, g.fs.limit, g.fs.selector) == \
            (cs_l, dpl, base, limit, selector)
        assert g.fs.g == (limit > 0xfffff)

    @rule(lme=st.booleans(), sce=st.booleans())
    def set_msr_efer(self, lme, sce):
        """KVM_SET_MSRS of EFER: LMA stays KVM's."""
        before = self.vcpu.get_sregs().efer
        value = (EFER_LME if lme else 0) | (EFER_SCE if sce else 0) | EFER_LMA
        assert self.vcpu.set_msrs([(MSR_EFER, value)]) == 1
        assert self.vcpu.get_sregs().efer == (value & ~EFER_LMA) | (before & EFER_LMA)

    @rule()
    def init(self):
        """A shutdown INITs the vCPU back to real mode with the reset segments."""
        self.box.append(lambda g: g.shutdown())
        assert self.vcpu.run().exit_reason == KVM_EXIT_SHUTDOWN
        s = self.vcpu.get_sregs()
        assert (s.cs.selector, s.cs.base, s.efer, s.cr4) == (0xf000, 0xffff0000, 0, 0)

    @rule(map_gpa=st.booleans())
    def hypercall(self, map_gpa):
        """An unknown hypercall is -KVM_ENOSYS (-KVM_EPERM from CPL > 0) in the mode's operand
        size; MAP_GPA_RANGE with high bits exits with the mode's longmode flag and arguments
        (or not at all from CPL > 0)."""
        x = self.vcpu.x86
        wide, cpl = x.is_64_bit_mode(), x.cpl
        mask = (1 << 64) - 1 if wide else (1 << 32) - 1
        nr = KVM_HC_MAP_GPA_RANGE if map_gpa else 12345
        self.box.append(lambda g: g.hypercall(HC_HIGH | nr, HC_HIGH | 0x2000, 1, 0))
        run = self.vcpu.run()
        if cpl:
            want = -KVM_EPERM
        elif map_gpa and not wide:
            assert run.exit_reason == KVM_EXIT_HYPERCALL
            assert run.hypercall.flags == 0 and run.hypercall.args[0] == 0x2000
            run.hypercall.ret = (1 << 64) - 7
            run = self.vcpu.run()
            want = -7
        else:
            want = -KVM_ENOSYS
        assert run.exit_reason == KVM_EXIT_IO
        got = self.vcpu.get_ucall()[1][0]
        assert got == (want if wide else want & mask)

    @invariant()
    def get_then_set_changes_nothing(self):
        # A host-initiated KVM_SET_MSRS may clear EFER.LME under paging and keep LMA (set_efer
        # skips its checks for the host), a state kvm_is_valid_sregs then refuses to take back:
        # as in the kernel, SET_SREGS of what GET_SREGS gave is EINVAL there, and changes nothing.
        before, s = self.sregs(), self.vcpu.get_sregs()
        try:
            self.vcpu.set_sregs(s)
        except OSError as e:
            assert e.errno == EINVAL and not sregs_valid(s)
        else:
            assert sregs_valid(s)
        assert self.sregs() == before

    @invariant()
    def vmcb_view(self):
        x = self.vcpu.x86
        assert x.vmcb_efer & EFER_SVME and x.vmcb_cr4 & X86_CR4_MCE
        assert x.vmcb_cr0 == x.cr0 & ~(X86_CR0_CD | X86_CR0_NW)
        assert x.cpl == self.vcpu.get_sregs().ss.dpl


SregsMachine.TestCase.settings = settings(max_examples=60, stateful_step_count=30, deadline=None)
TestSregs = SregsMachine.TestCase


# -- the dirty ring ---------------------------------------------------------------------------------

RING_BYTES = 4096                       # 256 entries
RING_SOFT = RING_BYTES // 16 - KVM_DIRTY_RING_RSVD_ENTRIES
RING_SLOT = 3
RING_GPA = 1 << 30
RING_PAGES = 256


class DirtyRingMachine(RuleBasedStateMachine):
    """KVM_CAP_DIRTY_LOG_RING on a DEFAULT VM: guest writes (whole-page bulk stamps in any order,
    repeats included, and sub-page writes), the VMM's collect of some entries, resets, logging
    toggled, against a model of the ring: an entry per first write of a protected page, DIRTY
    until collected, RESET until reset, then free and the page protected again; the vCPU leaves
    KVM_RUN with KVM_EXIT_DIRTY_RING_FULL, the pushing write undone, while the ring is
    soft-full."""

    def __init__(self):
        super().__init__()
        self.collect_fn = ring_collect
        self.kvm = sevcore.Kvm()
        self.vm = self.kvm.create_vm(KVM_X86_DEFAULT_VM)
        self.vm.enable_cap(KVM_CAP_DIRTY_LOG_RING_ACQ_REL, RING_BYTES)
        self.hva = self.kvm.mmap(RING_PAGES * PAGE_SIZE)
        self.vm.set_user_memory_region2(RING_SLOT, KVM_MEM_LOG_DIRTY_PAGES, RING_GPA,
                                        RING_PAGES * PAGE_SIZE, self.hva)
        self.box = []
        self.vcpu = self.vm.create_vcpu(0)
        self.vcpu.set_guest_code(ring_interpreter, self.box)
        self.ring_hva = self.vcpu.mmap(RING_BYTES, offset=KVM_DIRTY_LOG_PAGE_OFFSET * PAGE_SIZE)
        ring = self.vcpu.dirty_ring
        self.ring_mem = self.kvm.host.mem.frames[ring.spa:ring.spa + RING_BYTES]
        # The model.
        self.logging = True
        self.protected = set(range(RING_PAGES))   # pages whose next write pushes
        self.entries = []                         # every offset pushed, in order
        self.fetched = self.reset_done = 0        # entries collected / reset so far
        self.mem = [0] * RING_PAGES
        self.blocked = None                       # the rest of a write stopped by a full ring
        self.fetch = np.zeros(1, np.uint32)

    def used(self):
        return len(self.entries) - self.reset_done

    def advance(self, writes):
        """The model of KVM_RUN over ``writes`` [(page, value)]: the pages written before the
        push that fills the ring; the rest is left blocked."""
        for i, (p, v) in enumerate(writes):
            if self.logging and p in self.protected:
                self.entries.append(p)
                self.protected.discard(p)
                if self.used() >= RING_SOFT:
                    self.blocked = writes[i:]
                    event("KVM_EXIT_DIRTY_RING_FULL")
                    return KVM_EXIT_DIRTY_RING_FULL
            self.mem[p] = v
        self.blocked = None
        return KVM_EXIT_IO

    def kvm_run(self):
        run = self.vcpu.run()
        return run.exit_reason

    @precondition(lambda self: self.blocked is None)
    @rule(pages=st.lists(st.integers(0, RING_PAGES - 1), min_size=1, max_size=120),
          v=value, partial=st.booleans())
    def guest_writes(self, pages, v, partial):
        gpas = [RING_GPA + p * PAGE_SIZE for p in pages]
        if partial:                     # sub-page writes: the access path outside the C kernel
            self.box.append(lambda g: [g.write(a, v.to_bytes(8, "little")) for a in gpas])
        else:
            self.box.append(lambda g: [g.stamp_pages(np.array(gpas, np.uint64), v)])
        want = self.advance([(p, v) for p in pages])
        got = self.kvm_run()
        assert got == want, (got, want)
        if got == KVM_EXIT_IO:
            self.vcpu.get_ucall()

    @precondition(lambda self: self.blocked is None)
    @rule(first=st.integers(0, RING_PAGES - 1), v=value, partial=st.booleans())
    def guest_sweeps(self, first, v, partial):
        """Every page once, from ``first`` around: more pushes than the soft limit allows."""
        self.guest_writes([(first + k) % RING_PAGES for k in range(RING_PAGES)], v, partial)

    @precondition(lambda self: self.blocked is not None)
    @rule()
    def resume(self):
        """KVM_RUN again: still full, or the blocked write goes on."""
        if self.used() >= RING_SOFT:
            assert self.kvm_run() == KVM_EXIT_DIRTY_RING_FULL
            return
        want = self.advance(self.blocked)
        assert self.kvm_run() == want
        if want == KVM_EXIT_IO:
            self.vcpu.get_ucall()

    @rule(cap=st.integers(0, 300))
    def collect(self, cap):
        slots, offsets = self.collect_fn(self.ring_mem, RING_BYTES // 16, self.fetch, cap)
        n = min(cap, len(self.entries) - self.fetched)
        want = self.entries[self.fetched:self.fetched + n]
        assert offsets.tolist() == want and set(slots.tolist()) <= {RING_SLOT}
        self.fetched += n

    @rule()
    def reset(self):
        n = self.vm.reset_dirty_rings()
        assert n == self.fetched - self.reset_done
        for p in self.entries[self.reset_done:self.fetched]:
            if self.logging:
                self.protected.add(p)
        self.reset_done = self.fetched

    @rule(on=st.booleans())
    def set_logging(self, on):
        self.vm.set_user_memory_region2(RING_SLOT, KVM_MEM_LOG_DIRTY_PAGES if on else 0,
                                        RING_GPA, RING_PAGES * PAGE_SIZE, self.hva)
        if on != self.logging:
            self.protected = set(range(RING_PAGES)) if on else set()
        self.logging = on

    @rule()
    def bitmap_interface_is_enxio(self):
        with pytest.raises(OSError) as e:
            self.vm.get_dirty_log(RING_SLOT)
        assert e.value.errno == ENXIO

    @invariant()
    def ring_reads_as_modelled(self):
        raw = np.frombuffer(self.kvm.read(self.ring_hva, RING_BYTES),
                            dtype=[("flags", "<u4"), ("slot", "<u4"), ("offset", "<u8")])
        for k, p in enumerate(self.entries):
            flags = 0 if k < self.reset_done else KVM_DIRTY_GFN_F_RESET if k < self.fetched \
                else KVM_DIRTY_GFN_F_DIRTY
            if k >= len(self.entries) - len(raw):      # not yet overwritten by a later lap
                e = raw[k % len(raw)]
                assert (int(e["flags"]), int(e["offset"])) == (flags, p), (k, e, flags, p)
        assert self.vcpu.dirty_ring.used == self.used() <= RING_SOFT

    @invariant()
    def memory_holds_what_was_written(self):
        got = np.frombuffer(self.kvm.read(self.hva, RING_PAGES * PAGE_SIZE), np.uint64)
        assert got[::PAGE_SIZE // 8].tolist() == self.mem

    @invariant()
    def npt_maps_only_the_slot(self):
        assert stray_npt_entries(self.vm) == []


def ring_interpreter(g, box):
    """Guest program: the operations the host put in ``box`` (a list per step), then a sync."""
    while True:
        for op in box.pop()(g):
            yield op
        yield g.sync()


DirtyRingMachine.TestCase.settings = settings(max_examples=30, stateful_step_count=40,
                                              deadline=None)
TestDirtyRing = DirtyRingMachine.TestCase
