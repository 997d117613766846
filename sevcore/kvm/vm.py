"""A KVM VM fd: memory slots, memory attributes, guest_memfd files, capabilities and its NPT.

Every ioctl runs the kernel's checks in the kernel's order (``virt/kvm/``, ``arch/x86/kvm/``) and
raises :class:`sevcore.errors.KvmError` with the kernel's errno, naming the ioctl. A refused call
changes nothing.
"""
import bisect
from errno import EBADF, EEXIST, EFAULT, EINVAL, EIO, ENOENT, ENXIO

import numpy as np

from sevcore.core.arrays import U64_MAX
from sevcore import uapi as U
from sevcore.errors import KvmError
from sevcore.core.bitmap import Bitmap
from sevcore.core.pages import GuestPageOps
from sevcore.kvm.sev import SevInfo, memory_encrypt_op, reg_region, unreg_region
from sevcore.kvm.sev_mirror import copy_enc_context_from, move_enc_context_from, vm_destroy
from sevcore.kvm.sev_pages import receive_update_data_pages, send_update_data_pages
from sevcore.kvm.dirty_ring import VcpuDirtyRing, enable_dirty_log_ring, reset_dirty_rings
from sevcore.kvm.sev_snp import sev_gmem_invalidate, sev_gmem_prepare
from sevcore.kvm.guest_memfd import GuestMemfd
from sevcore.kvm.vcpu import Vcpu, default_cpuid
from sevcore.hw.hostmem import PAGE_SHIFT, PAGE_SIZE
from sevcore.kvm.caps import KVM_ALLOWED_DISABLE_EXITS, check_extension
from sevcore.kvm.mm import TASK_SIZE_MAX
from sevcore.kvm.mmu import KVM_FILTER_ALL, KVM_FILTER_PRIVATE, KVM_FILTER_SHARED
from sevcore.kvm.msr import MsrFilter
from sevcore.core.arrays import u64
from sevcore.core.npt import NPT_DIRTY_LOG, NPT_PRIVATE, Npt
from sevcore.core.ranges import RangeSet

#: The largest GFN the simulated TDP MMU maps: a 4-level table covers 48-bit guest physical
#: addresses (kvm_mmu_max_gfn with 4-level NPT).
KVM_MMU_MAX_GFN = (1 << 36) - 1


class Memslot:
    """struct kvm_memory_slot, as far as user space can observe it."""

    __slots__ = ("as_id", "id", "base_gfn", "npages", "flags", "userspace_addr", "gmem_file",
                 "gmem_pgoff", "gmem_only", "dirty_bitmap", "userfault_bitmap")

    def __init__(self, as_id, id, base_gfn, npages, flags, userspace_addr):
        self.as_id, self.id = as_id, id
        self.base_gfn, self.npages, self.flags = base_gfn, npages, flags
        self.userspace_addr = userspace_addr
        self.gmem_file = None
        self.gmem_pgoff = 0
        self.gmem_only = False         # KVM_MEMSLOT_GMEM_ONLY, set by the guest_memfd binding
        self.dirty_bitmap = None
        self.userfault_bitmap = 0      # user address of the KVM_MEM_USERFAULT bitmap

    @property
    def end_gfn(self):
        return self.base_gfn + self.npages

    def __repr__(self):
        return (f"<Memslot {self.as_id}:{self.id} gfn {self.base_gfn:#x}+{self.npages:#x} "
                f"flags {self.flags:#x}>")


class Vm:
    """A VM fd. Created by :meth:`sevcore.kvm.kvm.Kvm.create_vm`."""

    def __init__(self, kvm, type):
        self.kvm = kvm
        self.host = kvm.host
        self.type = type
        # kvm_arch_init_vm, svm_vm_init, tdx_vm_init: per-type properties fixed at creation.
        self.has_private_mem = type in (U.KVM_X86_SW_PROTECTED_VM, U.KVM_X86_SNP_VM,
                                        U.KVM_X86_TDX_VM)
        self.has_protected_state = type in (U.KVM_X86_SEV_ES_VM, U.KVM_X86_SNP_VM,
                                            U.KVM_X86_TDX_VM)
        self.nr_memslot_as_ids = 1 if self.has_private_mem else U.KVM_ADDRESS_SPACE_NUM
        self.pre_fault_allowed = type != U.KVM_X86_SNP_VM
        self.sev_need_init = type in (U.KVM_X86_SEV_VM, U.KVM_X86_SEV_ES_VM, U.KVM_X86_SNP_VM)
        self.dead = False
        self.closed = False
        self.sev = SevInfo()               # struct kvm_sev_info (sevcore.kvm.sev)
        self._refs = 1                     # the VM fd itself
        self.memslots = {}                 # (as_id, id) -> Memslot
        self._as_index = [[] for _ in range(self.nr_memslot_as_ids)]   # sorted by base_gfn
        self._as_keys = [[] for _ in range(self.nr_memslot_as_ids)]    # their base_gfns
        self.private = RangeSet()          # gfns whose attributes hold KVM_MEMORY_ATTRIBUTE_PRIVATE
        self.npt = Npt()
        self.hypercall_exit_enabled = 0
        self.manual_dirty_log_protect = 0
        self.dirty_ring_size = 0           # bytes per vCPU ring (KVM_CAP_DIRTY_LOG_RING)
        #: Out of tree, off by default (upstream: EINVAL): KVM_MEM_LOG_DIRTY_PAGES accepted on a
        #: guest_memfd slot, set by sevcore.kvm.snp_ma.snp_enable_gmem_dirty_log.
        self.gmem_dirty_log = False
        self.user_space_msr_mask = 0
        self.msr_filter = None
        self.hlt_in_guest = False
        self.vcpus = []
        #: What an SNP guest's firmware tells it (the secrets page) and the shared pages its
        #: guest-message driver uses: (secrets_gpa, req_gpa, resp_gpa), set by the VMM
        #: (sevcore.vmm.kvm_util.snp_guest_msg_init); None until then.
        self.snp_guest_msg = None
        self.max_gfn = KVM_MMU_MAX_GFN
        self._page_ops = None
        self._page_ops_slots = None
        self.fd = self.host.install_fd(self)
        kvm.mmu_notifier_register(self)    # kvm_init_mmu_notifier

    def __repr__(self):
        return f"<Vm fd={self.fd} type={self.type}>"

    # -- lifetime ------------------------------------------------------------------------------------

    def _get(self):
        self._refs += 1

    def _put(self):
        self._refs -= 1
        if self._refs == 0:
            self._destroy()

    def _destroy(self):
        vm_destroy(self)
        for v in self.vcpus:               # kvm_vcpu_destroy -> kvm_dirty_ring_free
            if v.dirty_ring is not None:
                v.dirty_ring.free()
        for slot in list(self.memslots.values()):
            if slot.gmem_file is not None:
                slot.gmem_file.unbind(slot)
        self.memslots.clear()
        self.kvm.mmu_notifier_unregister(self)
        if self._page_ops is not None:
            self._page_ops.close()
            self._page_ops = None
        self.npt.close()

    @property
    def alive(self):
        """True while any reference (the VM fd, a vCPU fd, a guest_memfd, a mirror) keeps the
        VM."""
        return self._refs > 0

    def close(self):
        """Close the VM fd. The VM lives on while its vCPU fds or guest_memfd files are open."""
        if self.closed:
            return
        self.closed = True
        self.host.release_fd(self.fd)
        self._put()

    def _enter(self, ioctl):
        """The checks every VM ioctl makes first: a closed fd, a dead VM (EIO)."""
        if self.closed:
            raise KvmError(EBADF, ioctl, "VM fd is closed")
        if self.dead:
            raise KvmError(EIO, ioctl, "VM is dead")

    # -- capabilities ----------------------------------------------------------------------------------

    def check_extension(self, cap):
        """Mirrors ``KVM_CHECK_EXTENSION`` on a VM fd."""
        self._enter("KVM_CHECK_EXTENSION")
        return check_extension(self.host, self, cap)

    def enable_cap(self, cap, *args, flags=0):
        """Mirrors ``KVM_ENABLE_CAP`` on a VM fd (``args`` are ``kvm_enable_cap.args[0..3]``)."""
        ioctl = "KVM_ENABLE_CAP"
        self._enter(ioctl)
        if len(args) > 4:
            raise TypeError("kvm_enable_cap has 4 args")
        a = list(args) + [0] * (4 - len(args))
        handler = self._cap_handlers().get(cap)
        if handler is None:
            raise KvmError(EINVAL, ioctl, f"capability {cap} cannot be enabled on a VM")
        # kvm_vm_ioctl_enable_cap_generic hands the dirty ring caps on without looking at flags.
        if flags != 0 and cap not in (U.KVM_CAP_DIRTY_LOG_RING, U.KVM_CAP_DIRTY_LOG_RING_ACQ_REL):
            raise KvmError(EINVAL, ioctl, "flags must be 0")
        return handler(ioctl, a)

    def _cap_handlers(self):
        return {
            U.KVM_CAP_EXIT_HYPERCALL: self._cap_exit_hypercall,
            U.KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2: self._cap_manual_dirty_log,
            U.KVM_CAP_X86_USER_SPACE_MSR: self._cap_user_space_msr,
            U.KVM_CAP_X86_DISABLE_EXITS: self._cap_disable_exits,
            U.KVM_CAP_VM_COPY_ENC_CONTEXT_FROM: self._cap_copy_enc_context,
            U.KVM_CAP_VM_MOVE_ENC_CONTEXT_FROM: self._cap_move_enc_context,
            U.KVM_CAP_DIRTY_LOG_RING: self._cap_dirty_log_ring,
            U.KVM_CAP_DIRTY_LOG_RING_ACQ_REL: self._cap_dirty_log_ring,
            U.KVM_CAP_DIRTY_LOG_RING_WITH_BITMAP: self._cap_dirty_ring_with_bitmap,
        }

    def _cap_dirty_log_ring(self, ioctl, a):
        return enable_dirty_log_ring(self, ioctl, a[0])

    def _cap_dirty_ring_with_bitmap(self, ioctl, a):
        # x86 does not select CONFIG_NEED_KVM_DIRTY_RING_WITH_BITMAP, so
        # kvm_vm_ioctl_enable_cap_generic refuses it whatever the ring's state.
        raise KvmError(EINVAL, ioctl, "ring with bitmap is not supported on x86")

    def reset_dirty_rings(self):
        """Mirrors ``KVM_RESET_DIRTY_RINGS``: free every vCPU's collected (RESET) entries and
        write-protect their pages again; returns how many were reset. EINVAL without a ring."""
        return reset_dirty_rings(self)

    def _cap_copy_enc_context(self, ioctl, a):
        return copy_enc_context_from(self, ioctl, a[0])

    def _cap_move_enc_context(self, ioctl, a):
        return move_enc_context_from(self, ioctl, a[0])

    # -- SEV (sevcore.kvm.sev) -----------------------------------------------------------------------------

    def memory_encrypt_op(self, id, data=True, sev_fd=None, **fields):
        """Mirrors ``KVM_MEMORY_ENCRYPT_OP``: ``id`` is the ``KVM_SEV_*`` command, ``fields``
        its ``struct kvm_sev_*`` (zero when not given; ``data=None`` is a NULL pointer, ``id``
        None a NULL argp), ``sev_fd`` an fd of /dev/sev (default: one the host opens). Returns
        the struct as KVM wrote it back with ``error``; raises SevError (EIO, ``fw_error``) for a
        firmware failure, KvmError otherwise, and TypeError/ValueError before anything runs for
        a field that is no int or does not fit its __u16/__u32/__u64."""
        return memory_encrypt_op(self, id, data, sev_fd, fields)

    def memory_encrypt_reg_region(self, addr, size):
        """Mirrors ``KVM_MEMORY_ENCRYPT_REG_REGION``: pin ``[addr, addr + size)`` until
        UNREG or VM destroy. ENOTTY (not SEV), EINVAL (mirror, bad range), ENOMEM (rlimit)."""
        return reg_region(self, addr, size)

    def memory_encrypt_unreg_region(self, addr, size):
        """Mirrors ``KVM_MEMORY_ENCRYPT_UNREG_REGION``: EINVAL (mirror, no such region),
        ENOTTY (not SEV)."""
        return unreg_region(self, addr, size)

    def sev_send_update_data_pages(self, guest_uaddrs, out=None):
        """``len(guest_uaddrs)`` ``KVM_SEV_SEND_UPDATE_DATA`` ioctls of whole pages in one call
        (a sevcore extension; docs/psp.md): page ``i`` from ``guest_uaddrs[i]`` with
        ``hdr_len`` 52 and ``guest_len = trans_len = 4096``, the same checks, errnos, firmware
        statuses, IVs and bytes as those ioctls in order. Returns ``(hdrs, trans)``: ``(n, 52)``
        and ``(n, 4096)`` uint8 arrays, or the ``out`` pair (writable, contiguous, 52n and
        4096n bytes) filled. A refusal of page ``i`` raises what its ioctl raises (SevError with
        ``fw_error`` and ``out``, or KvmError) with ``index = i`` and the packets of pages
        ``0..i-1`` in ``hdrs``/``trans`` of the exception."""
        return send_update_data_pages(self, guest_uaddrs, out)

    def sev_receive_update_data_pages(self, guest_uaddrs, hdrs, trans):
        """``len(guest_uaddrs)`` ``KVM_SEV_RECEIVE_UPDATE_DATA`` ioctls of whole pages in one
        call (a sevcore extension; docs/psp.md): packet ``i`` (row ``i`` of ``hdrs``, whose
        length is ``hdr_len``, and of ``trans``, ``trans_len``) into the page at
        ``guest_uaddrs[i]`` with ``guest_len`` 4096. A refusal of page ``i`` raises what its
        ioctl raises with ``index = i``: pages ``0..i-1`` are written, page ``i`` and later
        ones are not."""
        return receive_update_data_pages(self, guest_uaddrs, hdrs, trans)

    @property
    def sev_guest(self):
        """sev_guest(kvm): INIT succeeded, or the VM is a mirror or a move destination."""
        return self.sev.active

    def _cap_exit_hypercall(self, ioctl, a):
        if a[0] & ~U.KVM_EXIT_HYPERCALL_VALID_MASK:
            raise KvmError(EINVAL, ioctl, f"hypercall mask {a[0]:#x} outside "
                                           f"{U.KVM_EXIT_HYPERCALL_VALID_MASK:#x}")
        self.hypercall_exit_enabled = a[0]
        return 0

    def _cap_manual_dirty_log(self, ioctl, a):
        allowed = (U.KVM_DIRTY_LOG_MANUAL_CAPS if a[0] & U.KVM_DIRTY_LOG_MANUAL_PROTECT_ENABLE
                   else U.KVM_DIRTY_LOG_MANUAL_PROTECT_ENABLE)
        if a[0] & ~allowed:
            raise KvmError(EINVAL, ioctl, f"dirty-log flags {a[0]:#x} not allowed")
        self.manual_dirty_log_protect = a[0]
        return 0

    def _cap_user_space_msr(self, ioctl, a):
        if a[0] & ~U.KVM_MSR_EXIT_REASON_VALID_MASK:
            raise KvmError(EINVAL, ioctl, f"MSR exit reasons {a[0]:#x} invalid")
        self.user_space_msr_mask = a[0]
        return 0

    def _cap_disable_exits(self, ioctl, a):
        if a[0] & ~KVM_ALLOWED_DISABLE_EXITS:
            raise KvmError(EINVAL, ioctl, f"exits {a[0]:#x} cannot be disabled")
        if self.vcpus:
            raise KvmError(EINVAL, ioctl, "exits can only be disabled before vCPUs exist")
        if a[0] & U.KVM_X86_DISABLE_EXITS_HLT:
            self.hlt_in_guest = True
        return 0

    def x86_set_msr_filter(self, flags, ranges=()):
        """Mirrors ``KVM_X86_SET_MSR_FILTER``: ``ranges`` are up to 16 ``(flags, nmsrs, base,
        bitmap)`` (or dicts); EINVAL for bad flags, as kvm_vm_ioctl_set_msr_filter checks.
        A filter of DEFAULT_ALLOW and no ranges removes filtering."""
        ioctl = "KVM_X86_SET_MSR_FILTER"
        self._enter(ioctl)
        f = MsrFilter.from_user(flags, ranges, ioctl)
        self.msr_filter = None if f.default_allow and not f.ranges else f
        return 0

    # -- vCPUs ---------------------------------------------------------------------------------------

    def create_vcpu(self, vcpu_id):
        """Mirrors ``KVM_CREATE_VCPU``: EINVAL for an id >= KVM_MAX_VCPU_IDS or too many vCPUs,
        EEXIST for an id in use. The vCPU starts with KVM_GET_SUPPORTED_CPUID's entries."""
        ioctl = "KVM_CREATE_VCPU"
        self._enter(ioctl)
        if not isinstance(vcpu_id, int) or not 0 <= vcpu_id < U.KVM_MAX_VCPU_IDS:
            raise KvmError(EINVAL, ioctl, f"vcpu_id {vcpu_id!r} >= KVM_MAX_VCPU_IDS")
        if len(self.vcpus) >= U.KVM_MAX_VCPUS:
            raise KvmError(EINVAL, ioctl, "KVM_MAX_VCPUS reached")
        if any(v.vcpu_id == vcpu_id for v in self.vcpus):
            raise KvmError(EEXIST, ioctl, f"vcpu_id {vcpu_id} exists")
        vcpu = Vcpu(self, vcpu_id)
        if self.dirty_ring_size:          # kvm_vm_ioctl_create_vcpu -> kvm_dirty_ring_alloc
            vcpu.dirty_ring = VcpuDirtyRing(self.host, vcpu_id, self.dirty_ring_size)
        vcpu.set_cpuid2(default_cpuid(self.host))
        self.vcpus.append(vcpu)
        self._get()                        # the vCPU fd pins the VM (kvm_get_kvm)
        return vcpu

    # -- guest memory ------------------------------------------------------------------------------------

    def page_ops(self):
        """The C page kernel bound to this VM's NPT and dirty bitmaps (sevcore.core.pages)."""
        if self._page_ops is None:
            self._page_ops = GuestPageOps(self.npt, self.host.mem.frames)
        slots = self.logging_slots()
        key = [(s.base_gfn, s.npages, id(s.dirty_bitmap), s.id) for s in slots]
        if key != self._page_ops_slots:
            self._page_ops.set_dirty_slots([
                (s.base_gfn, s.npages, None if s.dirty_bitmap is None else s.dirty_bitmap.words,
                 (s.as_id << 16) | s.id) for s in slots])
            self._page_ops_slots = key
        return self._page_ops

    def has_memslots(self):
        return bool(self.memslots)

    def encryption_engine(self):
        """The memory engine keyed for this VM's ASID, used for encrypted (C-bit) guest
        accesses; None while no SEV context is active (accesses are then plaintext). A mirror
        uses its owner's ASID, hence the same key."""
        if self.sev.active and self.sev.asid and self.host.umc.has_key(self.sev.asid):
            return self.host.umc.engine(self.sev.asid)
        return None

    def mark_page_dirty(self, gfn):
        """mark_page_dirty: set ``gfn``'s bit in its slot's dirty bitmap if the slot logs (with a
        dirty ring the writing vCPU pushes instead: ``Vcpu._dirty_ring_push``)."""
        slot = self.gfn_to_memslot(gfn)
        if slot is not None and slot.dirty_bitmap is not None:
            slot.dirty_bitmap.set(gfn - slot.base_gfn)

    def logging_slots(self):
        """The slots with dirty logging on (kvm_slot_dirty_track_enabled), sorted by base gfn."""
        return [s for s in self._as_index[0] if s.flags & U.KVM_MEM_LOG_DIRTY_PAGES]

    def _dirty_log_slot(self, ioctl, slot, first_page=0):
        """The logging slot ``(as_id << 16) | id``: EINVAL for a bad number (then, for CLEAR, an
        unaligned ``first_page``), ENOENT for a slot that does not exist or does not log."""
        if not isinstance(slot, int) or not 0 <= slot < 1 << 32:
            raise TypeError(f"slot must be a u32, got {slot!r}")
        as_id, id = slot >> 16, slot & 0xffff
        if as_id >= self.nr_memslot_as_ids or id >= U.KVM_USER_MEM_SLOTS:
            raise KvmError(EINVAL, ioctl, f"slot {as_id}:{id} out of range")
        if first_page & 63:
            raise KvmError(EINVAL, ioctl, "first_page must be a multiple of 64")
        s = self.memslots.get((as_id, id))
        if s is None or s.dirty_bitmap is None:
            raise KvmError(ENOENT, ioctl, f"slot {as_id}:{id} does not exist or is not logging")
        return s

    def _dirty_bitmap_in_use(self, ioctl):
        """kvm_use_dirty_bitmap: with a dirty ring (and no ring-with-bitmap, which x86 lacks)
        the bitmap interface answers ENXIO (kvm_vm_ioctl_get_dirty_log, _clear_dirty_log)."""
        if self.dirty_ring_size:
            raise KvmError(ENXIO, ioctl, "the VM logs to dirty rings, not bitmaps")

    def get_dirty_log(self, slot):
        """Mirrors ``KVM_GET_DIRTY_LOG``: the slot's bitmap as uint64 words (bit i = base_gfn
        + i). Without manual protect the log is cleared as it is read. ENOENT for a slot that
        does not log, EINVAL for a bad slot number."""
        ioctl = "KVM_GET_DIRTY_LOG"
        self._enter(ioctl)
        self._dirty_bitmap_in_use(ioctl)
        s = self._dirty_log_slot(ioctl, slot)
        words = s.dirty_bitmap.words[:(s.npages + 63) // 64]
        out = words.copy()
        if not self.manual_dirty_log_protect & U.KVM_DIRTY_LOG_MANUAL_PROTECT_ENABLE:
            words[:] = 0
        return out

    def clear_dirty_log(self, slot, first_page, num_pages, bitmap):
        """Mirrors ``KVM_CLEAR_DIRTY_LOG``: clear the bits set in ``bitmap`` (uint64 words, bit
        i = first_page + i) from the slot's log, with kvm_clear_dirty_log_protect's checks.
        A word that is not a u64 is a ValueError naming it."""
        ioctl = "KVM_CLEAR_DIRTY_LOG"
        self._enter(ioctl)
        self._dirty_bitmap_in_use(ioctl)
        s = self._dirty_log_slot(ioctl, slot, first_page)
        n = s.npages
        if first_page > n or num_pages > n - first_page or \
                (num_pages < n - first_page and num_pages & 63):
            raise KvmError(EINVAL, ioctl, "range outside the slot or not whole words")
        nwords = (num_pages + 63) // 64
        words = np.asarray(u64(bitmap, "bitmap")).reshape(-1)
        if len(words) < nwords:
            raise KvmError(EFAULT, ioctl, "bitmap shorter than num_pages bits")
        if nwords:
            mask = words[:nwords].copy()
            if num_pages & 63:
                mask[-1] &= np.uint64((1 << (num_pages & 63)) - 1)
            w0 = first_page >> 6
            s.dirty_bitmap.words[w0:w0 + nwords] &= ~mask
        return 0

    # -- guest_memfd -----------------------------------------------------------------------------------

    def create_guest_memfd(self, size, flags=0):
        """Mirrors ``KVM_CREATE_GUEST_MEMFD``: EINVAL for unsupported flags, then for a size that
        is not a positive multiple of the page size."""
        ioctl = "KVM_CREATE_GUEST_MEMFD"
        self._enter(ioctl)
        supported = check_extension(self.host, self, U.KVM_CAP_GUEST_MEMFD_FLAGS)
        if flags & ~supported or flags < 0:
            raise KvmError(EINVAL, ioctl, f"flags {flags:#x} not in {supported:#x}")
        if size <= 0 or size >= 1 << 63 or size % PAGE_SIZE:
            raise KvmError(EINVAL, ioctl, f"size {size} is not a positive page multiple")
        return GuestMemfd(self, size, flags)

    # -- memory slots -----------------------------------------------------------------------------------

    def set_user_memory_region(self, slot, flags, guest_phys_addr, memory_size, userspace_addr):
        """Mirrors ``KVM_SET_USER_MEMORY_REGION`` (v1: only LOG_DIRTY_PAGES and READONLY)."""
        ioctl = "KVM_SET_USER_MEMORY_REGION"
        self._enter(ioctl)
        if flags & ~(U.KVM_MEM_LOG_DIRTY_PAGES | U.KVM_MEM_READONLY):
            raise KvmError(EINVAL, ioctl, f"flags {flags:#x} invalid for the v1 ioctl")
        return self._set_memory_region(ioctl, slot, flags, guest_phys_addr, memory_size,
                                       userspace_addr, 0, None)

    def set_user_memory_region2(self, slot, flags, guest_phys_addr, memory_size, userspace_addr,
                                guest_memfd_offset=0, guest_memfd=None, userfault_bitmap=0):
        """Mirrors ``KVM_SET_USER_MEMORY_REGION2``; ``guest_memfd`` is a GuestMemfd or an fd.
        ``userfault_bitmap`` with ``KVM_MEM_USERFAULT`` (out of tree, see uapi): the user
        address of one bit per page of the slot; EINVAL for the flag without an 8-byte aligned
        bitmap. Enabling the flag zaps the slot's mappings."""
        ioctl = "KVM_SET_USER_MEMORY_REGION2"
        self._enter(ioctl)
        if flags & U.KVM_MEM_USERFAULT and (not userfault_bitmap or userfault_bitmap % 8):
            raise KvmError(EINVAL, ioctl, "KVM_MEM_USERFAULT needs an aligned userfault_bitmap")
        old = self.memslots.get((slot >> 16, slot & 0xffff))
        was = old is not None and old.flags & U.KVM_MEM_USERFAULT
        ret = self._set_memory_region(ioctl, slot, flags, guest_phys_addr, memory_size,
                                      userspace_addr, guest_memfd_offset, guest_memfd)
        new = self.memslots.get((slot >> 16, slot & 0xffff))
        if new is not None:
            new.userfault_bitmap = userfault_bitmap if flags & U.KVM_MEM_USERFAULT else 0
            if new.userfault_bitmap and not was:
                self._zap_gfns(new.base_gfn, new.npages)
        return ret

    def _set_memory_region(self, ioctl, slot, flags, gpa, size, uaddr, gmem_offset, gmem):
        def fail(err, why):
            raise KvmError(err, ioctl, why)

        for name, v, bits in (("slot", slot, 32), ("flags", flags, 32), ("guest_phys_addr", gpa, 64),
                              ("memory_size", size, 64), ("userspace_addr", uaddr, 64),
                              ("guest_memfd_offset", gmem_offset, 64)):
            if not isinstance(v, int) or not 0 <= v < 1 << bits:
                raise TypeError(f"{name} must be a u{bits}, got {v!r}")
        # kvm_vm_ioctl_set_memory_region: the slot id bound, before slots_lock.
        if slot & 0xffff >= U.KVM_USER_MEM_SLOTS:
            fail(EINVAL, f"slot id {slot & 0xffff} >= KVM_USER_MEM_SLOTS")
        # 1. check_memory_region_flags
        valid = U.KVM_MEM_LOG_DIRTY_PAGES | U.KVM_MEM_GUEST_MEMFD
        if ioctl == "KVM_SET_USER_MEMORY_REGION2":
            valid |= U.KVM_MEM_USERFAULT
        if flags & U.KVM_MEM_GUEST_MEMFD:
            # "Dirty logging private memory is not currently supported" (kvm_main.c,
            # check_memory_region_flags), unless the out-of-tree switch is on; never with
            # dirty rings (the switch refuses them; a ring enabled after it stays out too).
            if not self.gmem_dirty_log or self.dirty_ring_size:
                valid &= ~U.KVM_MEM_LOG_DIRTY_PAGES
        elif not self.has_protected_state:
            valid |= U.KVM_MEM_READONLY
        if flags & ~valid:
            fail(EINVAL, f"flags {flags:#x} not in {valid:#x}")
        as_id, id = slot >> 16, slot & 0xffff
        if size % PAGE_SIZE:
            fail(EINVAL, "memory_size not page aligned")
        if gpa % PAGE_SIZE:
            fail(EINVAL, "guest_phys_addr not page aligned")
        if uaddr % PAGE_SIZE or uaddr + size > TASK_SIZE_MAX:
            fail(EINVAL, "userspace_addr unaligned or beyond the user address space")
        if flags & U.KVM_MEM_GUEST_MEMFD and (gmem_offset % PAGE_SIZE or gmem_offset + size > U64_MAX):
            fail(EINVAL, "guest_memfd_offset unaligned or overflowing")
        if as_id >= self.nr_memslot_as_ids or id >= U.KVM_MEM_SLOTS_NUM:
            fail(EINVAL, f"address space {as_id} not available for this VM type")
        if gpa + size > U64_MAX + 1:
            fail(EINVAL, "guest_phys_addr + memory_size overflows")
        npages = size >> PAGE_SHIFT
        if id < U.KVM_USER_MEM_SLOTS and npages > U.KVM_MEM_MAX_NR_PAGES:
            fail(EINVAL, "too many pages")
        base_gfn = gpa >> PAGE_SHIFT
        old = self.memslots.get((as_id, id))
        if size == 0:
            if old is None:
                fail(EINVAL, f"slot {as_id}:{id} does not exist")
            self._delete_slot(old)
            return 0
        if old is None:
            change = "create"
        else:
            if flags & U.KVM_MEM_GUEST_MEMFD and not (
                    self.gmem_dirty_log and base_gfn == old.base_gfn
                    and flags ^ old.flags == U.KVM_MEM_LOG_DIRTY_PAGES
                    and gmem_offset == old.gmem_pgoff << PAGE_SHIFT):
                # Out of tree: only KVM_MEM_LOG_DIRTY_PAGES of a guest_memfd slot may change.
                fail(EINVAL, "a guest_memfd slot cannot be changed, only deleted")
            if (uaddr != old.userspace_addr or npages != old.npages
                    or (flags ^ old.flags) & (U.KVM_MEM_READONLY | U.KVM_MEM_GUEST_MEMFD)):
                fail(EINVAL, "only the base or LOG_DIRTY_PAGES of a slot can change")
            if base_gfn != old.base_gfn:
                change = "move"
            elif flags != old.flags:
                change = "flags"
            else:
                return 0
        if change in ("create", "move"):
            other = self._overlapping(as_id, base_gfn, base_gfn + npages, old)
            if other is not None:
                fail(EEXIST, f"overlaps slot {other.as_id}:{other.id}")
        new = Memslot(as_id, id, base_gfn, npages, flags, uaddr)
        if flags & U.KVM_MEM_GUEST_MEMFD:
            file = gmem if isinstance(gmem, GuestMemfd) and not gmem.closed else \
                self.host.fget(gmem) if gmem is not None else None
            if file is None:
                fail(EBADF, "guest_memfd is not an open file descriptor")
            if not isinstance(file, GuestMemfd):
                fail(EINVAL, "guest_memfd is not a guest_memfd")
            if file.vm is not self:
                fail(EINVAL, "guest_memfd belongs to another VM")
            if old is not None:           # out of tree: the logging flag of a gmem slot
                if file is not old.gmem_file:
                    fail(EINVAL, "a guest_memfd slot keeps its guest_memfd")
                file.unbind(old)
            err = file.bind(new, gmem_offset, npages)
            if err:
                fail(err, "guest_memfd range past the end of the file" if err == EINVAL
                     else "guest_memfd range already bound to another slot")
        if change in ("create", "move") and new.end_gfn - 1 > KVM_MMU_MAX_GFN:
            if new.gmem_file is not None:
                new.gmem_file.unbind(new)
            fail(EINVAL, "slot extends beyond the largest mappable gfn")
        if change == "create":
            self._install(new)
        elif change == "move":
            self._zap_gfns(old.base_gfn, old.npages)
            self._remove(old)
            new.dirty_bitmap = old.dirty_bitmap
            self._install(new)
        else:
            self._remove(old)
            self._install(new)
            new.dirty_bitmap = old.dirty_bitmap
        self._update_dirty_logging(new, old)
        return 0

    def _update_dirty_logging(self, new, old):
        """Allocate or drop the slot's dirty bitmap and mark its NPT entries: a write through
        an entry with NPT_DIRTY_LOG is logged (KVM write-protects instead; same observable)."""
        logging = new.flags & U.KVM_MEM_LOG_DIRTY_PAGES
        was = old is not None and old.flags & U.KVM_MEM_LOG_DIRTY_PAGES
        if logging and not was:
            # kvm_alloc_dirty_bitmap only while the bitmap is in use (kvm_use_dirty_bitmap).
            if not self.dirty_ring_size and new.dirty_bitmap is None:
                new.dirty_bitmap = Bitmap(max(new.npages, 1))
                if self.manual_dirty_log_protect & U.KVM_DIRTY_LOG_INITIALLY_SET:
                    new.dirty_bitmap.set_range(0, new.npages)
            self.npt.protect_range(new.base_gfn, new.npages, set_flags=NPT_DIRTY_LOG)
        elif not logging and was:
            new.dirty_bitmap = None
            self.npt.protect_range(new.base_gfn, new.npages, clear_flags=NPT_DIRTY_LOG)

    def _overlapping(self, as_id, start, end, ignore):
        """A slot of ``as_id`` other than ``ignore`` that intersects ``[start, end)``, or None.
        Slots of one address space are disjoint and sorted, so only neighbours can overlap."""
        index, keys = self._as_index[as_id], self._as_keys[as_id]
        i = bisect.bisect_left(keys, end)
        for j in (i - 1, i - 2):
            if 0 <= j < len(index) and index[j] is not ignore and index[j].end_gfn > start:
                return index[j]
        return None

    def _install(self, slot):
        self.memslots[(slot.as_id, slot.id)] = slot
        i = bisect.bisect_left(self._as_keys[slot.as_id], slot.base_gfn)
        self._as_index[slot.as_id].insert(i, slot)
        self._as_keys[slot.as_id].insert(i, slot.base_gfn)

    def _remove(self, slot):
        del self.memslots[(slot.as_id, slot.id)]
        index = self._as_index[slot.as_id]
        i = bisect.bisect_left(self._as_keys[slot.as_id], slot.base_gfn)
        while index[i] is not slot:
            i += 1
        del index[i]
        del self._as_keys[slot.as_id][i]

    def _delete_slot(self, slot):
        self._zap_gfns(slot.base_gfn, slot.npages)
        if slot.gmem_file is not None:
            slot.gmem_file.unbind(slot)
        self._remove(slot)

    def gfn_to_memslot(self, gfn, as_id=0):
        """The slot of address space ``as_id`` holding ``gfn``, or None."""
        index = self._as_index[as_id]
        i = bisect.bisect_right(self._as_keys[as_id], gfn) - 1
        if i >= 0 and gfn < index[i].end_gfn:
            return index[i]
        return None

    def _zap_gfns(self, gfn, npages, attr_filter=KVM_FILTER_ALL):
        """Remove stage-2 mappings of ``[gfn, gfn + npages)`` (kvm_unmap_gfn_range).

        ``attr_filter`` (KVM_FILTER_*) picks what goes only on a VM with mirrored TDP, a TDX VM,
        whose shared mappings live in the direct root and private ones in the mirror root; on
        any other VM every mapping of the range goes, whatever the filter
        (kvm_gfn_range_filter_to_root_types, arch/x86/kvm/mmu/tdp_mmu.h). A shared access to a
        gmem-only slot maps a guest_memfd frame without NPT_PRIVATE, so filtering by the flag
        there would leave it mapped after the frame is freed."""
        if self.npt.closed or npages <= 0:
            return 0
        lo = max(gfn, 0)
        hi = min(gfn + npages, KVM_MMU_MAX_GFN + 1)
        if lo >= hi:
            return 0
        match = exclude = 0
        if self.type == U.KVM_X86_TDX_VM and attr_filter != KVM_FILTER_ALL:
            if attr_filter == KVM_FILTER_PRIVATE:
                match = NPT_PRIVATE
            else:
                exclude = NPT_PRIVATE
        return self.npt.zap_range(lo, hi - lo, match_flags=match, exclude_flags=exclude)

    def mmu_notifier_invalidate_range_start(self, start, end):
        """kvm_mmu_notifier_invalidate_range_start: the VMM's HVAs [start, end) are being
        unmapped (munmap, or a file truncating pages it maps): zap the gfns of every memslot
        whose HVA range meets them (KVM_FILTER_SHARED: an HVA maps no private memory,
        __kvm_handle_hva_range). One zap per memslot."""
        for slot in self._as_index[0]:
            base = slot.userspace_addr
            lo, hi = max(start, base), min(end, base + (slot.npages << PAGE_SHIFT))
            if lo < hi:
                first = slot.base_gfn + ((lo - base) >> PAGE_SHIFT)
                last = slot.base_gfn + ((hi - base + PAGE_SIZE - 1) >> PAGE_SHIFT)
                self._zap_gfns(first, last - first, KVM_FILTER_SHARED)

    # -- memory attributes ------------------------------------------------------------------------------

    def supported_mem_attributes(self):
        return U.KVM_MEMORY_ATTRIBUTE_PRIVATE if self.has_private_mem else 0

    def set_memory_attributes(self, address, size, attributes, flags=0):
        """Mirrors ``KVM_SET_MEMORY_ATTRIBUTES``: all of ``[address, address + size)`` or nothing.

        A conversion zaps the mappings of the old kind (kvm_arch_pre_set_memory_attributes:
        every mapping of the range, but on TDX).
        """
        ioctl = "KVM_SET_MEMORY_ATTRIBUTES"
        self._enter(ioctl)
        if flags != 0:
            raise KvmError(EINVAL, ioctl, "flags must be 0")
        if attributes & ~self.supported_mem_attributes():
            raise KvmError(EINVAL, ioctl, f"attributes {attributes:#x} not supported")
        # kvm_vm_ioctl_set_mem_attributes: address + size is a u64 sum, so a range that ends
        # at 2^64 wraps to 0 and is refused like any other wrapping one.
        if size == 0 or address + size > U64_MAX or address < 0 or size < 0:
            raise KvmError(EINVAL, ioctl, "empty or wrapping range")
        if address % PAGE_SIZE or size % PAGE_SIZE:
            raise KvmError(EINVAL, ioctl, "address and size must be page aligned")
        start, end = address >> PAGE_SHIFT, (address + size) >> PAGE_SHIFT
        private = bool(attributes & U.KVM_MEMORY_ATTRIBUTE_PRIVATE)
        if (self.private.covers(start, end) if private else self.private.disjoint(start, end)):
            return 0   # no-op: no zap
        if private:
            self._zap_gfns(start, end - start, KVM_FILTER_SHARED)
            self.private.add(start, end)
        else:
            self._zap_gfns(start, end - start, KVM_FILTER_PRIVATE)
            self.private.remove(start, end)
        return 0

    # -- guest_memfd's architecture hooks (kvm_arch_gmem_prepare, kvm_arch_gmem_invalidate) ------

    @property
    def gmem_needs_prepare(self):
        """Whether guest_memfd tracks prepared pages for this VM (SNP: sev_gmem_prepare)."""
        return self.type == U.KVM_X86_SNP_VM

    def gmem_prepare(self, pfns, gfns):
        """kvm_arch_gmem_prepare for frames a fault hands the guest; 0 or -errno."""
        return sev_gmem_prepare(self, pfns, gfns)

    def gmem_invalidate(self, pfns):
        """kvm_arch_gmem_invalidate for frames guest_memfd frees."""
        if self.type == U.KVM_X86_SNP_VM:
            sev_gmem_invalidate(self.host, pfns)

    def get_memory_attributes(self, gfn):
        """kvm_get_memory_attributes (no ioctl exists: this is the simulator's view)."""
        return U.KVM_MEMORY_ATTRIBUTE_PRIVATE if gfn in self.private else 0

    def mem_is_private(self, gfn):
        return gfn in self.private
