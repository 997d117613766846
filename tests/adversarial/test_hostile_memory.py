"""A hostile VMM against KVM's memory uAPI: memslots, memory attributes, guest_memfd, dirty logs,
capabilities, vCPUs and guest programs, with hostile values in every field (2^64 edges,
negatives, unaligned values, huge sizes, closed and foreign fds, addresses in SIGBUS mappings and
unmapped HVAs), and fds closed in any order.

After every step: only OSError (a real errno), ValueError or TypeError escaped; a refused call
changed nothing observable; no marker the guest wrote to a private page is readable by the VMM;
no NPT entry of any VM points at a host frame the VM does not own.
"""
from errno import EBADF, EEXIST, EFAULT, EINTR, EINVAL, EIO, ENOENT

import pytest
from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import (RuleBasedStateMachine, initialize, invariant, rule,
                                 run_state_machine_as_test)

from sevcore.hw.hostmem import PAGE_SHIFT
from sevcore.kvm.guest_memfd import MAP_PRIVATE, MAP_SHARED
from sevcore.uapi import *

from advutil import (DEFAULT, NON_INTS, P, SLOW, U64, Counted,
                     assert_markers_hidden, assert_npt_owned, attempt, diff, draw_fields,
                     hostile_int, mostly, new_host, run_guest, world_state)

#: Guest physical addresses the slots are put at (page-aligned, some of them far apart).
GPAS = (0, 16 * P, 64 * P, 1 << 32, (1 << 32) + 8 * P, (1 << 36) - 4 * P)
SIZES = (P, 2 * P, 4 * P, 8 * P, 16 * P)
SLOTS = (0, 1, 2, 3, 1 << 16, (1 << 16) | 1)
FLAGS = (0, KVM_MEM_LOG_DIRTY_PAGES, KVM_MEM_READONLY, KVM_MEM_GUEST_MEMFD,
         KVM_MEM_GUEST_MEMFD | KVM_MEM_LOG_DIRTY_PAGES, KVM_MEM_READONLY | KVM_MEM_LOG_DIRTY_PAGES)
GMEM_FLAGS = (0, GUEST_MEMFD_FLAG_MMAP, GUEST_MEMFD_FLAG_MMAP | GUEST_MEMFD_FLAG_INIT_SHARED)
CAPS = (KVM_CAP_EXIT_HYPERCALL, KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2, KVM_CAP_X86_USER_SPACE_MSR,
        KVM_CAP_X86_DISABLE_EXITS, KVM_CAP_VM_COPY_ENC_CONTEXT_FROM,
        KVM_CAP_VM_MOVE_ENC_CONTEXT_FROM, KVM_CAP_ENFORCE_PV_FEATURE_CPUID,
        KVM_CAP_GUEST_MEMFD, 0)
#: The magic that starts every private marker; nothing else the suite writes contains it.
MARK = b"\xa5PRIVATE"

pick = st.integers(0, 1 << 16)           # an index into one of the machine's lists


class HostileMemory(Counted, RuleBasedStateMachine):
    """A VMM that creates VMs, memory, guest_memfds and vCPUs and then misuses all of them."""

    def __init__(self):
        super().__init__()
        self.host = new_host(7)
        self.kvm = self.host.kvm
        self.foreign = new_host(8).kvm   # another machine: its fds mean nothing here
        self.vms, self.vcpus, self.gmems, self.maps = [], [], [], []
        self.markers = []
        self.fds = []                         # fd-shaped things that are not what KVM wants
        self.nmark = 0

    # -- set-up ---------------------------------------------------------------------------------

    @initialize(type=st.sampled_from([KVM_X86_DEFAULT_VM, KVM_X86_SW_PROTECTED_VM]),
                gmem_flags=st.sampled_from(GMEM_FLAGS), log=mostly(True, False))
    def setup(self, type, gmem_flags, log):
        """A working VM first (a slot of VMM memory, logging or not, a guest_memfd slot, a slot
        over a VMM mapping of a shared guest_memfd, a vCPU), so that the hostile calls reach
        deep."""
        vm = self.kvm.create_vm(type)
        self.vms.append(vm)
        hva = self.kvm.mmap(32 * P)
        self.maps.append((hva, 32 * P, "anon"))
        vm.set_user_memory_region2(0, KVM_MEM_LOG_DIRTY_PAGES if log else 0, 0, 16 * P, hva)
        if gmem_flags & ~vm.check_extension(KVM_CAP_GUEST_MEMFD_FLAGS):
            gmem_flags = GUEST_MEMFD_FLAG_MMAP
        g = vm.create_guest_memfd(32 * P, gmem_flags)
        self.gmems.append(g)
        vm.set_user_memory_region2(1, KVM_MEM_GUEST_MEMFD, 1 << 32, 16 * P, hva + 16 * P, 0, g)
        self.vcpus.append(vm.create_vcpu(0))
        # SIGBUS addresses: a private guest_memfd page (on a SW_PROTECTED VM), a shared
        # guest_memfd mapping read past the end of its file.
        pvm = self.kvm.create_vm(KVM_X86_SW_PROTECTED_VM)
        pg = pvm.create_guest_memfd(4 * P, GUEST_MEMFD_FLAG_MMAP)
        self.vms.append(pvm)
        self.gmems.append(pg)
        self.maps.append((pg.mmap(4 * P), 4 * P, "sigbus"))
        svm = self.kvm.create_vm(KVM_X86_DEFAULT_VM)
        sg = svm.create_guest_memfd(2 * P, GUEST_MEMFD_FLAG_MMAP | GUEST_MEMFD_FLAG_INIT_SHARED)
        self.vms.append(svm)
        self.gmems.append(sg)
        smap = sg.mmap(4 * P)
        self.maps.append((smap, 2 * P, "gmem-shared"))
        self.maps.append((smap + 2 * P, 2 * P, "sigbus"))
        vm.set_user_memory_region2(2, 0, 64 * P, 2 * P, smap)
        self.maps.append((0x10000, P, "unmapped"))
        self.maps.append((0x7ffffffff000 - P, P, "unmapped"))
        # Foreign fds: a VM and a guest_memfd of another host, a memfd, a closed one, a vCPU
        # fd, numbers no file has.
        fvm = self.foreign.create_vm(KVM_X86_SW_PROTECTED_VM)
        closed = self.host.memfd_create()
        closed.close()
        self.fds += [fvm, fvm.create_guest_memfd(4 * P), fvm.fd, self.host.memfd_create(),
                     self.host.memfd_create().fd, closed, closed.fd, self.vcpus[0],
                     self.vcpus[0].fd, 10 ** 6, -1]

    # -- helpers ----------------------------------------------------------------------------------

    def item(self, seq, i):
        return seq[i % len(seq)] if seq else None

    def snapshot(self):
        return world_state(self.kvm, self.vms, self.gmems)

    def refusable(self, fn, *args, **kwargs):
        """A call that must succeed or be refused with nothing changed."""
        before = self.snapshot()
        out = attempt(fn, *args, **kwargs)
        self.tally(getattr(fn, "__name__", "call"), out)
        if not out.ok:
            after = self.snapshot()
            assert after == before, f"refused {out.exc!r} changed {diff(before, after)}"
        return out

    def hva(self, i, page):
        """A user address: mostly inside a mapping (of any kind), sometimes off its end."""
        start, length, _ = self.item(self.maps, i)
        return start + (page * P) % (length + P)

    def fd_like(self, i):
        """Something passed where KVM wants an fd: one of ours, a foreign one, or junk."""
        pool = self.gmems + self.vms + self.fds
        return self.item(pool, i)

    def vm(self, v):
        """Mostly a VM whose fd is open; now and then any, closed ones included."""
        live = [vm for vm in self.vms if not vm.closed]
        return self.item(live, v >> 2) if live and v & 3 != 3 else self.item(self.vms, v >> 2)

    # -- VMM memory -----------------------------------------------------------------------------------

    @rule(npages=st.integers(1, 32))
    def mmap(self, npages):
        self.maps.append((self.kvm.mmap(npages * P), npages * P, "anon"))

    @rule(i=pick, page=st.integers(0, 40), npages=st.integers(1, 40))
    def munmap(self, i, page, npages):
        """The VMM unmaps memory that may back a memslot."""
        start, length, kind = self.item(self.maps, i)
        if kind == "unmapped":
            return
        self.unmap(start + page * P, npages * P)

    def unmap(self, hva, size):
        """munmap of any range: an NPT entry through it is zapped first."""
        out = attempt(self.kvm.munmap, hva, size)
        assert out.ok, out

    @rule(v=pick, s=pick, page=st.integers(0, 16), npages=st.integers(1, 8))
    def munmap_slot_memory(self, v, s, page, npages):
        """The VMM unmaps part of a memslot's memory while the guest may map it."""
        vm = self.vm(v)
        slots = sorted(vm.memslots.values(), key=lambda x: (x.as_id, x.id))
        if not slots:
            return
        slot = self.item(slots, s)
        self.unmap(slot.userspace_addr + (page % slot.npages) * P, npages * P)

    @rule(i=pick, page=st.integers(0, 40), value=st.binary(min_size=1, max_size=64))
    def vmm_write(self, i, page, value):
        """The VMM writes its own memory (never private markers)."""
        start, length, kind = self.item(self.maps, i)
        if kind not in ("anon", "gmem-shared") or MARK in value:
            return
        hva = start + (page * P) % length
        if self.kvm._mapping(hva) is None or self.kvm._mapping(hva + len(value) - 1) is None:
            return                        # unmapped since: the VMM itself would fault
        self.kvm.write(hva, value)

    @rule(g=pick, data=st.data())
    def gmem_mmap(self, g, data):
        """mmap of a guest_memfd: any length, flags and offset."""
        f = self.item(self.gmems, g)
        a = draw_fields(data, length=(P, 2 * P, 4 * P), flags=(MAP_SHARED, MAP_PRIVATE),
                        offset=(0, P))
        length, flags, offset = a["length"], a["flags"], a["offset"]
        if isinstance(length, int) and length > 1 << 40:
            return                        # the simulated VMM's address space is 1 TiB of HVAs
        out = self.refusable(f.mmap, length, flags, offset)
        if out.ok:
            # Pages inside the file are shared if the file is; those past its end SIGBUS.
            inside = max(0, min(length, f.size - offset))
            if f.flags & GUEST_MEMFD_FLAG_INIT_SHARED and inside:
                self.maps.append((out.value, inside, "gmem-shared"))
            if length > inside or not f.flags & GUEST_MEMFD_FLAG_INIT_SHARED:
                self.maps.append((out.value, length, "sigbus"))

    # -- VMs, vCPUs, fds ----------------------------------------------------------------------------

    @rule(type=st.one_of(st.sampled_from([KVM_X86_DEFAULT_VM, KVM_X86_SW_PROTECTED_VM]),
                         hostile_int()))
    def create_vm(self, type):
        if len(self.vms) >= 8:
            return
        out = attempt(self.kvm.create_vm, type)
        if out.ok:
            self.vms.append(out.value)

    @rule(v=pick, vcpu_id=st.one_of(st.sampled_from([0, 1, 2, KVM_MAX_VCPU_IDS - 1,
                                                     KVM_MAX_VCPU_IDS]), hostile_int()))
    def create_vcpu(self, v, vcpu_id):
        vm = self.vm(v)
        out = self.refusable(vm.create_vcpu, vcpu_id)
        if out.ok:
            self.vcpus.append(out.value)

    @rule(i=pick, what=mostly(None, "vcpu", "vm", "gmem", "gmem"))
    def close(self, i, what):
        """Close a vCPU fd, a VM fd or a guest_memfd fd, in any order (now and then: most
        sequences go on to use them)."""
        if what == "vcpu" and self.vcpus:
            self.item(self.vcpus, i).close()
        elif what == "vm":
            self.item(self.vms, i).close()
        elif what == "gmem":
            self.close_gmem(self.item(self.gmems, i))

    def close_gmem(self, f):
        """Close a guest_memfd fd (bound to slots, mapped by the VMM, or neither)."""
        f.close()

    @rule(v=pick, data=st.data(), nargs=st.integers(0, 5), fd=pick, on_vcpu=st.booleans())
    def enable_cap(self, v, data, nargs, fd, on_vcpu):
        """Every capability with hostile arguments; the enc-context ones with foreign fds."""
        target = self.item(self.vcpus, v) if on_vcpu and self.vcpus else self.vm(v)
        a = draw_fields(data, cap=CAPS, flags=(0,), **{f"arg{i}": (0, 1, 2, 3, 1 << 12)
                                                       for i in range(nargs)})
        cap, flags, args = a["cap"], a["flags"], [a[f"arg{i}"] for i in range(nargs)]
        if cap in (KVM_CAP_VM_COPY_ENC_CONTEXT_FROM, KVM_CAP_VM_MOVE_ENC_CONTEXT_FROM) and args:
            args[0] = self.fd_like(fd)
        out = self.refusable(target.enable_cap, cap, *args, flags=flags)
        if cap in (KVM_CAP_VM_COPY_ENC_CONTEXT_FROM, KVM_CAP_VM_MOVE_ENC_CONTEXT_FROM):
            assert not out.ok, "no VM here has an SEV context to copy or move"

    # -- memslots --------------------------------------------------------------------------------------

    @rule(v=pick, v2=st.booleans(), data=st.data(), m=pick, page=st.integers(0, 40), g=pick,
          own_gmem=mostly(True, False))
    def set_memory_region(self, v, v2, data, m, page, g, own_gmem):
        """Create, move, re-flag and delete slots; the userspace_addr is in any kind of
        mapping (anonymous, guest_memfd, SIGBUS) or none, the guest_memfd mostly the VM's."""
        vm = self.vm(v)
        a = draw_fields(data, slot=SLOTS, flags=FLAGS, gpa=GPAS, size=SIZES + (0,),
                        uaddr=(self.hva(m, page),), offset=(0, P, 16 * P, 28 * P))
        slot, flags, gpa, size, uaddr, offset = (a[k] for k in ("slot", "flags", "gpa", "size",
                                                                "uaddr", "offset"))
        if v2:
            mine = [f for f in self.gmems if f.vm is vm and not f.closed]
            gmem = self.item(mine, g) if mine and own_gmem else self.fd_like(g)
            self.refusable(vm.set_user_memory_region2, slot, flags, gpa, size, uaddr, offset,
                           gmem)
        else:
            if isinstance(flags, int) and flags & KVM_MEM_GUEST_MEMFD and own_gmem:
                flags &= ~KVM_MEM_GUEST_MEMFD
            self.refusable(vm.set_user_memory_region, slot, flags, gpa, size, uaddr)

    @rule(v=pick, data=st.data())
    def set_memory_attributes(self, v, data):
        """Private or shared, over slots, holes and 2^64 edges."""
        vm = self.vm(v)
        a = draw_fields(data, address=GPAS, size=SIZES,
                        attributes=(0, KVM_MEMORY_ATTRIBUTE_PRIVATE), flags=(0,))
        self.refusable(vm.set_memory_attributes, **a)

    # -- guest_memfd -----------------------------------------------------------------------------------

    @rule(v=pick, data=st.data())
    def create_guest_memfd(self, v, data):
        """KVM_CREATE_GUEST_MEMFD of any size and flags."""
        vm = self.vm(v)
        out = self.refusable(vm.create_guest_memfd,
                             **draw_fields(data, size=(P, 4 * P, 32 * P), flags=GMEM_FLAGS))
        if out.ok:
            self.gmems.append(out.value)

    @rule(g=pick, data=st.data())
    def fallocate(self, g, data):
        """Allocate or punch any range of a guest_memfd."""
        f = self.item(self.gmems, g)
        a = draw_fields(data, mode=(FALLOC_FL_KEEP_SIZE,
                                    FALLOC_FL_KEEP_SIZE | FALLOC_FL_PUNCH_HOLE),
                        offset=(0, P, 8 * P, 30 * P), length=(P, 4 * P, 16 * P))
        mode, offset, length = a["mode"], a["offset"], a["length"]
        if (isinstance(length, int) and isinstance(mode, int) and not mode & FALLOC_FL_PUNCH_HOLE
                and length > 1 << 20 and f.size > 1 << 20):
            return      # allocating gigabytes of frames is the host's OOM, not a uAPI check
        self.refusable(f.fallocate, mode, offset, length)

    # -- dirty logs ---------------------------------------------------------------------------------

    def logging_slots(self, vm):
        """The slot numbers and sizes of ``vm``'s logging slots (plausible dirty-log values)."""
        slots = [(s.as_id << 16 | s.id, s.npages) for s in vm.memslots.values()
                 if s.dirty_bitmap is not None]
        return [n for n, _ in slots] or [0], [p for _, p in slots] or [16]

    @rule(v=pick, data=st.data())
    def get_dirty_log(self, v, data):
        """KVM_GET_DIRTY_LOG of any slot number."""
        vm = self.vm(v)
        slots, _ = self.logging_slots(vm)
        self.refusable(vm.get_dirty_log, **draw_fields(data, slot=SLOTS + tuple(slots) * 3))

    @rule(v=pick, data=st.data(), bitmap=st.one_of(
        st.lists(mostly(1, 0, U64), min_size=1, max_size=2).map(tuple),
        st.lists(st.one_of(st.sampled_from([0, 1, U64]), hostile_int(wrong_types=False)),
                 min_size=1, max_size=2),
        st.lists(st.one_of(st.sampled_from([0, 1]), hostile_int()), max_size=3),
        st.sampled_from(NON_INTS)))
    def clear_dirty_log(self, v, data, bitmap):
        """KVM_CLEAR_DIRTY_LOG of any range, with bitmap words of any value and type."""
        vm = self.vm(v)
        slots, sizes = self.logging_slots(vm)
        a = draw_fields(data, slot=tuple(slots) * 3 + SLOTS, first_page=(0, 64),
                        num_pages=tuple(sizes) * 3 + (1, 4, 16, 64))
        slot, first_page, num_pages = a["slot"], a["first_page"], a["num_pages"]
        self.refusable(vm.clear_dirty_log, slot, first_page, num_pages, bitmap)

    # -- guests -------------------------------------------------------------------------------------------

    def guest_gpa(self, vm, i, page):
        """A guest physical address: in a slot (private or shared as its attribute says),
        or where nothing is (MMIO), or past the guest physical address space."""
        slots = sorted(vm.memslots.values(), key=lambda s: (s.as_id, s.id))
        far = [0xfee00000, 1 << 40, (1 << 48) - P, 1 << 48, U64 - P + 1]
        if slots and i % 4:
            s = self.item(slots, i)
            return (s.base_gfn << PAGE_SHIFT) + (page % (s.npages + 1)) * P
        return self.item(far, i)

    @rule(c=pick, i=pick, page=st.integers(0, 20), op=st.sampled_from(
        ["read", "write", "cross", "fill", "read_pages", "write_pages", "hypercall"]))
    def guest_access(self, c, i, page, op):
        """The vCPU's guest touches mapped, unmapped, private, shared and MMIO addresses."""
        if not self.vcpus:
            return
        vcpu = self.item(self.vcpus, c)
        vm = vcpu.vm
        gpa = self.guest_gpa(vm, i, page)
        private = vm.type == KVM_X86_SW_PROTECTED_VM and vm.mem_is_private(gpa >> PAGE_SHIFT)
        marker = None
        if op == "write":
            self.nmark += 1
            marker = MARK + self.nmark.to_bytes(8, "little")
            data = marker if private else bytes(16)
            make = lambda g: g.write(gpa, data)
        elif op == "read":
            make = lambda g: g.read(gpa, 64)
        elif op == "cross":
            make = lambda g: g.write(gpa + P - 8 if gpa <= U64 - P else gpa, b"\x11" * 16)
        elif op == "fill":
            make = lambda g: g.fill(gpa, 2, 0x1234)
        elif op == "read_pages":
            make = lambda g: g.read_pages([gpa, gpa + 2 * P if gpa < U64 - 2 * P else gpa])
        elif op == "write_pages":
            make = lambda g: g.write_pages([gpa], bytes(P))
        else:
            make = lambda g: g.hypercall(KVM_HC_MAP_GPA_RANGE, gpa, 1, 0)
        out, _ = run_guest(vcpu, make)
        self.tally(f"guest {op}", out)
        if marker is not None and private:
            self.markers.append(marker)
        if not out.ok:
            assert out.errno in (EFAULT, EIO, EBADF, EINVAL, EINTR, ENOENT) or \
                isinstance(out.exc, (ValueError, TypeError)), out

    @rule(c=pick, data=st.data(), which=st.sampled_from(
        ["set_regs", "set_cpuid2", "set_xcrs", "set_xsave", "msr_filter"]),
        op=st.sampled_from(["rdmsr", "wrmsr", "cpuid", "xsave"]))
    def vcpu_state(self, c, data, which, op):
        """A vCPU's register, CPUID, XCR and XSAVE ioctls and the VM's MSR filter with hostile
        contents, then a guest instruction that reads them."""
        if not self.vcpus:
            return
        vcpu = self.item(self.vcpus, c)
        anything = st.one_of(hostile_int(0, 1, 0xd, 0x40000001),
                             st.sampled_from([None, [], {}, b"", "x", (1, 2, 3)]))
        if which == "set_regs":
            regs = data.draw(st.dictionaries(st.sampled_from(["rax", "rip", "rsp", "rflags"]),
                                             hostile_int(0, 2, 0xfff0)), label="regs")
            self.refusable(vcpu.set_regs, **regs)
        elif which == "set_cpuid2":
            entry = st.dictionaries(st.sampled_from(["function", "index", "flags", "eax",
                                                     "ebx", "ecx", "edx"]), anything)
            entries = data.draw(st.one_of(st.lists(entry, max_size=3), anything),
                                label="entries")
            self.refusable(vcpu.set_cpuid2, entries)
        elif which == "set_xcrs":
            xcrs = data.draw(st.one_of(st.lists(st.tuples(hostile_int(0), hostile_int(1, 3, 7)),
                                                max_size=3), anything), label="xcrs")
            self.refusable(vcpu.set_xcrs, xcrs, data.draw(hostile_int(0), label="flags"))
        elif which == "set_xsave":
            size = data.draw(mostly(4096, 0, 4095, 4097), label="size")
            region = data.draw(st.binary(min_size=size, max_size=size), label="region")
            self.refusable(vcpu.set_xsave, region)
        else:
            rng = st.one_of(st.tuples(anything, anything, anything, anything),
                            st.dictionaries(st.sampled_from(["flags", "nmsrs", "base", "bitmap"]),
                                            anything), anything)
            self.refusable(vcpu.vm.x86_set_msr_filter, data.draw(hostile_int(0, 1), label="f"),
                           data.draw(st.one_of(st.lists(rng, max_size=3), anything), label="r"))
        index = data.draw(hostile_int(0x10, 0xc0000080, 0x4b564d00, 0x1b, 0xd), label="index")
        value = data.draw(hostile_int(0, 1, U64), label="value")
        make = {"rdmsr": lambda g: g.rdmsr_safe(index),
                "wrmsr": lambda g: g.wrmsr_safe(index, value),
                "cpuid": lambda g: g.cpuid(index, value),
                "xsave": lambda g: g.xsave(value, index)}[op]
        out, _ = run_guest(vcpu, make)
        self.tally(f"guest {op}", out)

    @rule(c=pick, write=st.booleans())
    def guest_touch_all(self, c, write):
        """The vCPU's guest reads or writes every page of every slot (through its attribute:
        private or shared), so that the NPT maps as much as it can before the next hostile
        call frees or moves something."""
        if not self.vcpus:
            return
        vcpu = self.item(self.vcpus, c)
        for slot in sorted(vcpu.vm.memslots.values(), key=lambda x: (x.as_id, x.id)):
            if slot.as_id:
                continue
            gpas = [(slot.base_gfn + i) << PAGE_SHIFT for i in range(slot.npages)]
            make = (lambda g: g.write_pages(gpas, bytes(len(gpas) * P))) if write else \
                (lambda g: g.read_pages(gpas))
            out, _ = run_guest(vcpu, make)
            self.tally("guest touch all", out)

    # -- foreign fds ------------------------------------------------------------------------------------

    @rule(v=pick, g=pick, slot=st.sampled_from(SLOTS))
    def gmem_of_another_vm(self, v, g, slot):
        """A guest_memfd slot whose file is another VM's, another host's, not a guest_memfd, or
        closed: EINVAL or EBADF, and nothing changes."""
        vm = self.vm(v)
        f = self.fd_like(g)
        if getattr(f, "vm", None) is vm:
            return
        hva = self.maps[0][0]
        out = self.refusable(vm.set_user_memory_region2, slot, KVM_MEM_GUEST_MEMFD, 1 << 40, P,
                             hva, 0, f)
        if not vm.closed and not vm.dead:
            assert out.errno in (EBADF, EINVAL, EEXIST), out

    # -- invariants ----------------------------------------------------------------------------------------

    @invariant()
    def counted(self):
        self.count_step()

    @invariant()
    def npt_points_only_at_owned_frames(self):
        for vm in self.vms:
            if vm.alive:
                assert_npt_owned(vm)

    @invariant()
    def private_markers_stay_hidden(self):
        assert_markers_hidden(self.kvm, self.markers)


TestHostileMemory = HostileMemory.TestCase
TestHostileMemory.settings = settings(DEFAULT, max_examples=200)


@pytest.mark.slow
def test_hostile_memory_long():
    """The hostile-memory machine over many random sequences (``pytest -m slow``)."""
    run_state_machine_as_test(HostileMemory, settings=SLOW)
