"""KVM's SEV layer (``arch/x86/kvm/svm/sev.c``): KVM_MEMORY_ENCRYPT_OP, REG/UNREG_REGION, ASIDs,
mirror VMs and intra-host moves, over the simulated firmware (``host.psp``).

``vm.memory_encrypt_op(KVM_SEV_LAUNCH_START, policy=0, dh_uaddr=hva, dh_len=2084, ...)`` takes
the fields of the command's ``struct kvm_sev_*``; user buffers are HVAs in the VMM
(``kvm.read``/``kvm.write``). It returns a :class:`SevCmd` holding the struct as KVM wrote it
back, plus ``error`` (``kvm_sev_cmd.error``, the firmware status). ``data=None`` is a NULL data
pointer. A firmware failure raises :class:`SevError` (errno EIO, ``fw_error``, ``out``); every
other refusal raises KvmError with the kernel's errno, in the kernel's order
(``sev_mem_enc_ioctl`` and the handlers it calls).

Guest pages handed to the firmware are pinned (``sev_pin_memory``) and passed by SPA: with the
C-bit for SEND/RECEIVE_UPDATE_DATA (``| sev_me_mask``), without for the others
(``__sme_page_pa`` with host SME off). Blobs are copied into kernel buffers (a bounce area of
host frames) first, as ``psp_copy_user_blob`` does.

``send_update_data_pages``/``receive_update_data_pages`` (``vm.sev_send_update_data_pages`` ...)
are a sevcore extension: n whole-page SEND/RECEIVE_UPDATE_DATA ioctls in one call, exactly
equivalent to those ioctls in order (docs/fidelity.md), over the firmware's batched steps
(sevcore/psp/batch.py).
"""
import threading
from errno import EBADF, EBUSY, EFAULT, EINVAL, EIO, ENOMEM, ENOTTY, EPERM

import numpy as np

from sevcore import uapi as U
from sevcore.core.arrays import runs
from sevcore.errors import KvmError
from sevcore.hw.hostmem import PAGE_SHIFT, PAGE_SIZE
from sevcore.hw.vmsa import VMSA_SIZE
from sevcore.kvm.sev_es import build_vmsa
from sevcore.psp import layout as L
from sevcore.psp import snp_layout as SL
from sevcore.psp.platform import TMR_SIZE
from sevcore.psp.status import status_name

IOCTL = "KVM_MEMORY_ENCRYPT_OP"
INT_MAX = (1 << 31) - 1
ULONG_MAX = (1 << 64) - 1
#: kvm_sev_info.vmsa_features KVM can offer (sev_supported_vmsa_features): DebugSwap, and
#: Secure TSC, which the simulated part has and only an SNP guest may ask for (__sev_guest_init).
SEV_SUPPORTED_VMSA_FEATURES = U.SVM_SEV_FEAT_DEBUG_SWAP | U.SVM_SEV_FEAT_SECURE_TSC
#: Pages of the slab one command's small kernel buffers come from.
_SLAB_PAGES = 8
#: The largest kmalloc (KMALLOC_MAX_SIZE: 2^MAX_PAGE_ORDER pages, order 10 on x86-64).
KMALLOC_MAX_SIZE = PAGE_SIZE << 10

#: struct kvm_sev_* field names (pads omitted; they are never checked) and their defaults.
STRUCTS = {
    "init": dict(vmsa_features=0, flags=0, ghcb_version=0),
    "launch_start": dict(handle=0, policy=0, dh_uaddr=0, dh_len=0, session_uaddr=0,
                         session_len=0),
    "launch_update_data": dict(uaddr=0, len=0),
    "launch_secret": dict(hdr_uaddr=0, hdr_len=0, guest_uaddr=0, guest_len=0, trans_uaddr=0,
                          trans_len=0),
    "launch_measure": dict(uaddr=0, len=0),
    "guest_status": dict(handle=0, policy=0, state=0),
    "dbg": dict(src_uaddr=0, dst_uaddr=0, len=0),
    "attestation_report": dict(mnonce=bytes(16), uaddr=0, len=0),
    "send_start": dict(policy=0, pdh_cert_uaddr=0, pdh_cert_len=0, plat_certs_uaddr=0,
                       plat_certs_len=0, amd_certs_uaddr=0, amd_certs_len=0, session_uaddr=0,
                       session_len=0),
    "send_update_data": dict(hdr_uaddr=0, hdr_len=0, guest_uaddr=0, guest_len=0,
                             trans_uaddr=0, trans_len=0),
    "receive_start": dict(handle=0, policy=0, pdh_uaddr=0, pdh_len=0, session_uaddr=0,
                          session_len=0),
}
STRUCTS["receive_update_data"] = STRUCTS["send_update_data"]
#: The out-of-tree VMSA migration commands (see _OUT_OF_TREE): struct kvm_csv_send_update_vmsa /
#: kvm_csv_receive_update_vmsa of Hygon's CSV2 driver (arch/x86/kvm/svm/csv.c).
STRUCTS["update_vmsa"] = dict(vcpu_id=0, hdr_uaddr=0, hdr_len=0, trans_uaddr=0, trans_len=0)
#: The width of the fields above that are not ``*_uaddr`` (__u64) or ``*_len`` (__u32), as
#: include/uapi/linux/kvm.h declares them; mnonce is __u8[16].
FIELD_BITS = dict(vmsa_features=64, flags=32, ghcb_version=16, handle=32, policy=32, state=32,
                  vcpu_id=32)
#: Per-struct widths that differ from FIELD_BITS, and byte-array fields with their sizes; the
#: SNP structs add theirs (sevcore.kvm.sev_snp).
STRUCT_FIELD_BITS = {}
BYTE_FIELDS = dict(mnonce=16)

#: Ids a mirror VM may issue (sev_mem_enc_ioctl, is_cmd_allowed_from_mirror).
MIRROR_CMDS = (U.KVM_SEV_LAUNCH_UPDATE_VMSA, U.KVM_SEV_GUEST_STATUS, U.KVM_SEV_DBG_DECRYPT,
               U.KVM_SEV_DBG_ENCRYPT)



class SevError(KvmError):
    """A firmware command behind KVM_MEMORY_ENCRYPT_OP failed: errno EIO, as KVM returns;
    ``fw_error`` is the SEV_RET_* status (``kvm_sev_cmd.error``), ``out`` the struct as KVM
    wrote it back (length queries fill in lengths)."""

    def __init__(self, fw_error, out=None, err=EIO, ioctl=IOCTL):
        self.fw_error = fw_error
        self.fw_error_name = status_name(fw_error)
        self.out = out
        super().__init__(err, ioctl, f"firmware status {fw_error:#x} {self.fw_error_name}")


class SevCmd:
    """The command's struct after KVM_MEMORY_ENCRYPT_OP, plus ``id`` and ``error``."""

    def __init__(self, id, fields, error=0):
        self.id = id
        self.error = error
        self.__dict__.update(fields)

    def __repr__(self):
        return f"SevCmd({self.__dict__!r})"


class SevDev:
    """An open /dev/sev (the PSP driver's misc device); only its identity matters to KVM."""

    def __init__(self, host):
        self.host = host
        self.fd = host.install_fd(self)

    def close(self):
        self.host.release_fd(self.fd)


def open_sev_dev(host):
    """open("/dev/sev"): a SevDev fd number."""
    return SevDev(host).fd


class SevInfo:
    """struct kvm_sev_info."""

    def __init__(self):
        self.active = self.es_active = self.snp_active = False
        self.asid = self.handle = self.fd = self.policy = 0
        self.vmsa_features = self.ghcb_version = 0
        self.pages_locked = 0
        self.regions = []                  # [(addr, size, pfns)]
        self.enc_context_owner = None
        self.mirror_vms = []
        self.migration_in_progress = False
        self.snp_context = None            # the SNP guest context page (an SPA)
        self.guest_req_buf = self.guest_resp_buf = None   # SNP guest-request bounce pages


class Asids:
    """The SEV ASID space of one host (sev_asid_bitmap, sev_reclaim_asid_bitmap)."""

    def __init__(self, psp):
        self.psp = psp
        self.max_sev_asid = psp.max_sev_asid
        self.min_sev_asid = psp.min_sev_asid
        self.used = set()
        self.reclaim = set()
        self.flushes = 0

    @property
    def es_enabled(self):
        return self.min_sev_asid > 1

    def range(self, es):
        return (1, self.min_sev_asid - 1) if es else (self.min_sev_asid, self.max_sev_asid)

    def new(self, es, ioctl):
        """sev_asid_new: lowest free ASID of the range, recycling once (WBINVD + DF_FLUSH)."""
        lo, hi = self.range(es)
        if lo > hi:
            raise KvmError(ENOTTY, ioctl, "empty ASID range")
        for attempt in (0, 1):
            asid = next((a for a in range(lo, hi + 1) if a not in self.used), None)
            if asid is not None:
                self.used.add(asid)
                return asid
            if attempt or not self._recycle():
                break
        raise KvmError(EBUSY, ioctl, "no free ASID")

    def _recycle(self):
        """__sev_recycle_asids: flush and make the reclaimed ASIDs free again."""
        if not self.reclaim:
            return False
        self.psp.wbinvd()
        self.psp.df_flush()
        self.flushes += 1
        self.used -= self.reclaim
        self.reclaim.clear()
        return True

    def free(self, asid):
        """sev_asid_free: reusable only after the next recycle."""
        self.reclaim.add(asid)


class KvmSev:
    """kvm_amd's SEV state of one host (``host.kvm_sev``): the ASID space, the pool of pages
    kernel buffers come from, and the /dev/sev fd the selftests pass with every command."""

    def __init__(self, host):
        self.host = host
        self._asids = None
        self._slabs = []                   # free slabs of _SLAB_PAGES contiguous frames
        self._lock = threading.Lock()
        self._sev_fd = None
        #: Out of tree, off by default (upstream KVM has no such ioctls: EINVAL): accept
        #: KVM_SEV_SEND_UPDATE_VMSA / KVM_SEV_RECEIVE_UPDATE_VMSA as the CSV2 driver defines
        #: them, so an SEV-ES guest's VMSAs can move through the firmware.
        self.out_of_tree_vmsa_migration = False

    @property
    def asids(self):
        """The ASID space of ``host.psp`` (made again if the Host's PSP was replaced)."""
        if self._asids is None or self._asids.psp is not self.host.psp:
            self._asids = Asids(self.host.psp)
        return self._asids

    def take_slab(self):
        """The SPA of a free slab for one command's small buffers (a new one if none is free)."""
        with self._lock:
            if self._slabs:
                return self._slabs.pop()
        return self.host.mem.alloc_contiguous(_SLAB_PAGES)

    def give_slab(self, spa):
        with self._lock:
            self._slabs.append(spa)

    def sev_fd(self):
        """The selftests pass ``open_sev_dev_path_or_exit()`` with every command."""
        if self._sev_fd is None or not isinstance(self.host.fget(self._sev_fd), SevDev):
            self._sev_fd = open_sev_dev(self.host)
        return self._sev_fd


class KernelBuffers:
    """The kernel memory one KVM_MEMORY_ENCRYPT_OP allocates (kzalloc, kmalloc, alloc_page),
    in host frames the firmware can address: small buffers from a slab, larger ones in frames
    of their own. Everything goes back when the command ends (:meth:`free`); a request the
    kernel's allocator could never meet (beyond KMALLOC_MAX_SIZE) is ENOMEM."""

    def __init__(self, host):
        self.host = host
        self.base = None                   # the slab, taken at the first small buffer
        self.off = 0
        self._large = []                   # pfn arrays of buffers outside the slab

    def reserve(self, size):
        """kzalloc(size): the SPA of ``size`` zeroed bytes, 16-byte aligned."""
        if size > KMALLOC_MAX_SIZE:
            raise KvmError(ENOMEM, IOCTL, f"kzalloc of {size} bytes")
        need = max((size + 15) & ~15, 16)
        if self.off + need <= _SLAB_PAGES * PAGE_SIZE:
            if self.base is None:
                self.base = self.host.kvm_sev.take_slab()
            spa = self.base + self.off
            self.off += need
            self.host.mem.frames[spa:spa + need] = 0
            return spa
        npages = (size + PAGE_SIZE - 1) >> PAGE_SHIFT
        spa = self.host.mem.alloc_contiguous(npages)
        self._large.append(np.arange(spa >> PAGE_SHIFT, (spa >> PAGE_SHIFT) + npages,
                                     dtype=np.uint64))
        return spa

    def page(self):
        """alloc_page: a page-aligned page."""
        self.off = (self.off + PAGE_SIZE - 1) & ~(PAGE_SIZE - 1)
        return self.reserve(PAGE_SIZE)

    def put(self, data):
        spa = self.reserve(len(data))
        self.host.umc.write(spa, bytes(data), 0)
        return spa

    def get(self, spa, size):
        return self.host.umc.read(spa, size, 0)

    def mark(self):
        """Where the slab stands, for :meth:`release` (a request buffer reused in a loop)."""
        return self.off

    def release(self, mark):
        """kfree of the slab buffers reserved since ``mark``."""
        self.off = mark

    def free(self):
        """Give every buffer back (the end of the command)."""
        if self._large:
            self.host.mem.free(np.concatenate(self._large))
            self._large = []
        if self.base is not None:
            self.host.kvm_sev.give_slab(self.base)
            self.base = None


def sev_guest(vm):
    return vm.sev.active


def is_mirror(vm):
    return vm.sev.enc_context_owner is not None


# -- the dispatcher ------------------------------------------------------------------------------------

def memory_encrypt_op(vm, id, data, sev_fd, fields):
    """sev_mem_enc_ioctl."""
    vm._enter(IOCTL)
    if id is None:
        return 0                                   # NULL argp: QEMU's probe
    if not isinstance(id, int) or not 0 <= id < 1 << 32:
        raise TypeError(f"id must be a u32, not {id!r}")
    _command_allowed(vm, id)
    entry = _HANDLERS.get(id)
    if entry is None and vm.host.kvm_sev.out_of_tree_vmsa_migration:
        entry = _OUT_OF_TREE.get(id)
    if id == U.KVM_SEV_ES_INIT and not vm.host.kvm_sev.asids.es_enabled:
        raise KvmError(ENOTTY, IOCTL, "SEV-ES is disabled")
    if entry is None:
        raise KvmError(EINVAL, IOCTL, f"unknown or unimplemented command {id}")
    handler, struct = entry
    params = None
    if struct is not None and data is not None:
        unknown = set(fields) - set(STRUCTS[struct])
        if unknown:
            raise TypeError(f"kvm_sev_{struct} has no field(s) {sorted(unknown)}")
        params = dict(STRUCTS[struct], **_checked_fields(struct, fields))
    elif fields:
        raise TypeError("fields given with a NULL data pointer or for a command without data")
    out = SevCmd(id, params or {})
    cmd = _Cmd(vm, out, sev_fd if sev_fd is not None else vm.host.kvm_sev.sev_fd())
    try:
        handler(cmd, params)
    except SevError as e:
        e.out = out
        raise
    finally:
        cmd.buf.free()
    return out


def _checked_fields(struct, fields):
    """The struct fields given, as ints: TypeError for a value that is no integer, ValueError
    for one its __u16/__u32/__u64 cannot hold, before the command runs (the kernel's
    copy_from_user of the struct cannot express either)."""
    out = {}
    widths = STRUCT_FIELD_BITS.get(struct, {})
    for name, v in fields.items():
        if name == "mnonce":
            out[name] = v
            continue
        if name in BYTE_FIELDS:
            if not isinstance(v, (bytes, bytearray)) or len(v) != BYTE_FIELDS[name]:
                raise TypeError(f"kvm_sev_{struct}.{name} must be {BYTE_FIELDS[name]} bytes")
            out[name] = bytes(v)
            continue
        bits = widths.get(name) or (64 if name.endswith("uaddr") else 32 if name.endswith("len")
                                    else FIELD_BITS[name])
        if not isinstance(v, (int, np.integer)) or isinstance(v, (bool, np.bool_)):
            raise TypeError(f"kvm_sev_{struct}.{name} must be an int, not {type(v).__name__}")
        if not 0 <= v < 1 << bits:
            raise ValueError(f"kvm_sev_{struct}.{name} = {v} does not fit __u{bits}")
        out[name] = int(v)
    return out


def _command_allowed(vm, id):
    """sev_mem_enc_ioctl's refusals before it looks up the command: mirror VMs, SNP guests."""
    if is_mirror(vm) and id not in MIRROR_CMDS:
        raise KvmError(EINVAL, IOCTL, f"command {id} not allowed on a mirror VM")
    if vm.sev.snp_active and id < U.KVM_SEV_SNP_LAUNCH_START:
        raise KvmError(EPERM, IOCTL, f"command {id} not allowed on an SNP guest")


class _Cmd:
    """One KVM_MEMORY_ENCRYPT_OP in flight: the VM, the written-back struct, argp->sev_fd."""

    def __init__(self, vm, out, sev_fd):
        self.vm, self.out, self.sev_fd = vm, out, sev_fd
        self.host = vm.host
        self.kvm = vm.kvm
        self.sev = vm.sev
        self.buf = KernelBuffers(vm.host)

    def fail(self, err, why):
        raise KvmError(err, IOCTL, why)

    def need_sev(self, es=False):
        if not (self.sev.es_active if es else self.sev.active):
            self.fail(ENOTTY, "not an SEV-ES guest" if es else "not an SEV guest")

    def fw(self, cmd, layout, fd=None, check=True, **fields):
        """sev_issue_cmd / sev_issue_cmd_external_user: the command through ``fd`` (sev->fd
        by default; ``fd=False``: the kernel's own call, sev_do_cmd). Returns (status, the buffer
        as the firmware left it)."""
        fd = self.sev.fd if fd is None else fd
        exc = _sev_fd_error(self.host, fd) if fd is not False else None
        if exc is not None:
            raise exc
        mark = self.buf.mark()
        spa = self.buf.reserve(layout.size) if layout is not None else 0
        if layout is not None:
            self.host.umc.write(spa, layout.pack(**fields), 0)
        status = self.host.psp.command(cmd, spa)
        f = layout.view(bytearray(self.buf.get(spa, layout.size))) if layout else None
        self.buf.release(mark)             # the request is on the stack (or kfree'd) after it
        self.out.error = status
        if status and check:
            raise SevError(status, self.out)
        return status, f

    def copy_in(self, uaddr, size):
        """copy_from_user: EFAULT where the user buffer faults (SIGBUS mappings included)."""
        try:
            return self.kvm.copy_from_user(uaddr, size)
        except OSError:
            self.fail(EFAULT, f"cannot read user memory at {uaddr:#x}")

    def copy_out(self, uaddr, data):
        """copy_to_user: EFAULT where the user buffer faults."""
        try:
            self.kvm.copy_to_user(uaddr, data)
        except OSError:
            self.fail(EFAULT, f"cannot write user memory at {uaddr:#x}")

    def blob(self, uaddr, size):
        """psp_copy_user_blob into a kernel buffer: its SPA."""
        if not uaddr or not size:
            self.fail(EINVAL, "blob address or length is 0")
        _blob_size(size)
        return self.buf.put(self.copy_in(uaddr, size))

    def writeback(self, params, **changed):
        params.update(changed)
        self.out.__dict__.update(params)

    def pin(self, uaddr, ulen, write):
        return pin_memory(self.vm, uaddr, ulen, write, IOCTL)

    def unpin(self, pfns):
        self.sev.pages_locked -= len(pfns)


def _sev_fd_error(host, fd):
    """sev_issue_cmd_external_user's refusal of an fd that is not /dev/sev (EBADF), or None."""
    if isinstance(host.fget(fd), SevDev):
        return None
    return KvmError(EBADF, IOCTL, "sev_fd is not /dev/sev")


def _blob_size(size):
    if size > U.SEV_FW_BLOB_MAX_SIZE:
        raise KvmError(EINVAL, IOCTL, f"blob of {size} bytes > SEV_FW_BLOB_MAX_SIZE")


# -- pinning ---------------------------------------------------------------------------------------------

def pin_memory(vm, uaddr, ulen, write, ioctl):
    """sev_pin_memory: the pfns of ``[uaddr, uaddr + ulen)``, counted in pages_locked."""
    sev = vm.sev
    _pin_range(uaddr, ulen, ioctl)
    first, last = uaddr >> PAGE_SHIFT, (uaddr + ulen - 1) >> PAGE_SHIFT
    npages = last - first + 1
    locked = _lock_limit(vm, npages, ioctl)
    kvm = vm.kvm
    # pin_user_pages_fast stops at the first page outside the VMM's mappings and the pin
    # fails: the pages up to that one are faulted in, and no further page is looked at.
    pages = np.arange(first, first + min(npages, kvm.mapped_pages(first, npages) + 1),
                      dtype=np.uint64)
    try:
        # One anonymous mapping (the usual guest RAM): fault in every page in one batch; else
        # hva_to_pfns, which resolves them as a page-by-page loop would, in batches.
        pfns = kvm.anon_pfns(pages)
        if pfns is None:
            pfns, exc = kvm.hva_to_pfns(pages << np.uint64(PAGE_SHIFT), write)
            if exc is not None:
                raise exc
    except Exception:
        raise KvmError(ENOMEM, ioctl, "could not pin every page") from None
    pfns = pfns.tolist()
    sev.pages_locked = locked
    return pfns


def _pin_range(uaddr, ulen, ioctl):
    """sev_pin_memory's first check: an empty or wrapping range is EINVAL."""
    if ulen == 0 or _wraps(uaddr, ulen) or uaddr < 0 or ulen < 0:
        raise KvmError(EINVAL, ioctl, "empty or wrapping range")


def _lock_limit(vm, npages, ioctl):
    """sev_pin_memory's limits on pinning ``npages`` more: the new pages_locked."""
    if npages > INT_MAX:
        raise KvmError(EINVAL, ioctl, "too many pages")
    locked = vm.sev.pages_locked + npages
    if locked > vm.host.mem.nframes:
        raise KvmError(EINVAL, ioctl, "more pages than RAM")
    kvm = vm.kvm
    limit = getattr(kvm, "rlimit_memlock", None)
    if limit is not None and locked > limit >> PAGE_SHIFT and not getattr(kvm, "cap_ipc_lock",
                                                                           False):
        raise KvmError(ENOMEM, ioctl, "RLIMIT_MEMLOCK exceeded")
    return locked


def _wraps(addr, size):
    """``addr + size < addr`` in 64-bit arithmetic: a range that ends exactly at 2^64 wraps
    too (sev_pin_memory, sev_dbg_crypt)."""
    return addr + size > ULONG_MAX


def reg_region(vm, addr, size):
    """KVM_MEMORY_ENCRYPT_REG_REGION (sev_mem_enc_register_region)."""
    ioctl = "KVM_MEMORY_ENCRYPT_REG_REGION"
    vm._enter(ioctl)
    if not sev_guest(vm):
        raise KvmError(ENOTTY, ioctl, "not an SEV guest")
    if is_mirror(vm):
        raise KvmError(EINVAL, ioctl, "mirror VM")
    if addr > ULONG_MAX or size > ULONG_MAX:
        raise KvmError(EINVAL, ioctl, "addr or size above ULONG_MAX")
    pfns = pin_memory(vm, addr, size, True, ioctl)
    vm.sev.regions.append((addr, size, pfns))
    return 0


def unreg_region(vm, addr, size):
    """KVM_MEMORY_ENCRYPT_UNREG_REGION (sev_mem_enc_unregister_region)."""
    ioctl = "KVM_MEMORY_ENCRYPT_UNREG_REGION"
    vm._enter(ioctl)
    if is_mirror(vm):
        raise KvmError(EINVAL, ioctl, "mirror VM")
    if not sev_guest(vm):
        raise KvmError(ENOTTY, ioctl, "not an SEV guest")
    for i, (a, s, pfns) in enumerate(vm.sev.regions):
        if (a, s) == (addr, size):
            del vm.sev.regions[i]
            vm.sev.pages_locked -= len(pfns)
            return 0
    raise KvmError(EINVAL, ioctl, "no region with that addr and size")


# -- initialisation -----------------------------------------------------------------------------------

def _platform_init(host):
    """sev_platform_init: SNP_INIT_EX first (the RMP initialised, then WBINVD and SNP_DF_FLUSH:
    __sev_snp_init_locked), then INIT (with SEV-ES and a TMR when ES is possible), WBINVD and
    DF_FLUSH for the first launch. Returns the firmware status."""
    psp = host.psp
    if psp.state != U.SEV_STATE_UNINIT:
        return 0
    if not psp.snp_platform_status()["state"]:
        buf = KernelBuffers(host)
        try:
            status = psp.command(U.SEV_CMD_SNP_INIT_EX,
                                 buf.put(SL.sev_data_snp_init_ex.pack(init_rmp=1)))
        finally:
            buf.free()
        if status:
            return status
        psp.wbinvd()
        status = psp.command(U.SEV_CMD_SNP_DF_FLUSH, 0)
        if status:
            return status
    fields = {}
    if host.kvm_sev.asids.es_enabled:
        base = host.mem.alloc_contiguous(2 * TMR_SIZE // PAGE_SIZE)
        tmr = (base + TMR_SIZE - 1) & ~(TMR_SIZE - 1)
        fields = dict(flags=U.SEV_INIT_FLAGS_SEV_ES, tmr_address=tmr, tmr_len=TMR_SIZE)
    buf = KernelBuffers(host)
    try:
        status = psp.command(U.SEV_CMD_INIT, buf.put(L.sev_data_init.pack(**fields)))
    finally:
        buf.free()
    if status:
        return status
    psp.wbinvd()
    return psp.command(U.SEV_CMD_DF_FLUSH, 0)


def _guest_init(c, params, vm_type):
    """__sev_guest_init."""
    vm, sev = c.vm, c.sev
    es = vm_type != U.KVM_X86_SEV_VM
    snp = vm_type == U.KVM_X86_SNP_VM
    valid = SEV_SUPPORTED_VMSA_FEATURES if es else 0
    if not snp:
        valid &= ~U.SVM_SEV_FEAT_SECURE_TSC
    if vm.vcpus:
        c.fail(EINVAL, "vCPUs already created")
    if params["flags"]:
        c.fail(EINVAL, "flags must be 0")
    if params["vmsa_features"] & ~valid:
        c.fail(EINVAL, f"vmsa_features {params['vmsa_features']:#x} not in {valid:#x}")
    ghcb = params["ghcb_version"]
    if ghcb > U.GHCB_VERSION_MAX or (not es and ghcb != 0):
        c.fail(EINVAL, f"ghcb_version {ghcb} invalid")
    if es and ghcb == 0:
        ghcb = U.GHCB_VERSION_DEFAULT
    if snp and ghcb < 2:
        c.fail(EINVAL, "SNP needs GHCB version 2")
    if sev.active:
        c.fail(EINVAL, "SEV already active")
    asids = vm.host.kvm_sev.asids
    asid = asids.new(es, IOCTL)
    status = _platform_init(vm.host)
    if status:
        asids.free(asid)                      # sev_asid_free: reusable after the next flush
        c.out.error = status
        raise SevError(status, c.out)
    sev.active, sev.es_active, sev.snp_active = True, es, snp
    sev.vmsa_features = params["vmsa_features"] | (U.SVM_SEV_FEAT_SNP_ACTIVE if snp else 0)
    sev.ghcb_version = ghcb
    sev.asid = asid
    vm.sev_need_init = False


def _cmd_init(es):
    def handler(c, params):
        if c.vm.type != U.KVM_X86_DEFAULT_VM:
            c.fail(EINVAL, "legacy INIT needs a KVM_X86_DEFAULT_VM")
        _guest_init(c, dict(STRUCTS["init"], ghcb_version=1 if es else 0),
                    U.KVM_X86_SEV_ES_VM if es else U.KVM_X86_SEV_VM)
    return handler


def _cmd_init2(c, params):
    vm = c.vm
    if not vm.sev_need_init:
        c.fail(EINVAL, "INIT2 needs a fresh SEV, SEV-ES or SNP VM")
    if vm.type not in (U.KVM_X86_SEV_VM, U.KVM_X86_SEV_ES_VM, U.KVM_X86_SNP_VM):
        c.fail(EINVAL, "not an SEV VM type")
    if params is None:
        c.fail(EFAULT, "NULL data")
    _guest_init(c, params, vm.type)


# -- launch --------------------------------------------------------------------------------------------

def _params(c, params):
    c.need_sev()
    if params is None:
        c.fail(EFAULT, "NULL data")
    return params


def _bind_asid(c, handle):
    """sev_bind_asid; on failure the new context is decommissioned."""
    status, _ = c.fw(U.SEV_CMD_ACTIVATE, L.sev_data_activate, fd=False, check=False,
                     handle=handle,
                     asid=c.sev.asid)
    if status:
        c.host.psp.command(U.SEV_CMD_DECOMMISSION,
                           c.buf.put(L.sev_data_decommission.pack(handle=handle)))
        raise SevError(status, c.out)


def _start(c, params, cmd, layout, handle, **blobs):
    """The common tail of LAUNCH_START and RECEIVE_START."""
    _, f = c.fw(cmd, layout, fd=c.sev_fd, handle=handle, policy=params["policy"], **blobs)
    _bind_asid(c, f.handle)
    c.writeback(params, handle=f.handle)
    c.sev.handle, c.sev.fd, c.sev.policy = f.handle, c.sev_fd, params["policy"]


def _cmd_launch_start(c, params):
    p = _params(c, params)
    dh = c.blob(p["dh_uaddr"], p["dh_len"]) if p["dh_uaddr"] else 0
    sess = c.blob(p["session_uaddr"], p["session_len"]) if p["session_uaddr"] else 0
    # sev_launch_start passes params.handle on: non-zero asks the firmware to share that guest's
    # key (or to refuse as the policies dictate).
    _start(c, p, U.SEV_CMD_LAUNCH_START, L.sev_data_launch_start, p["handle"], dh_cert_address=dh,
           dh_cert_len=p["dh_len"] if dh else 0, session_address=sess,
           session_len=p["session_len"] if sess else 0)


def _cmd_launch_update_data(c, params):
    p = _params(c, params)
    uaddr, size = p["uaddr"], p["len"]
    pfns = c.pin(uaddr, size, True)
    try:
        vaddr = uaddr
        # One command per run of physically contiguous pages (get_num_contig_pages).
        for i, n in runs(pfns):
            off = vaddr & (PAGE_SIZE - 1)
            length = min(n * PAGE_SIZE - off, size)
            c.fw(U.SEV_CMD_LAUNCH_UPDATE_DATA, L.sev_data_launch_update_data,
                 handle=c.sev.handle, address=(pfns[i] << PAGE_SHIFT) + off, len=length)
            size -= length
            vaddr += length
    finally:
        c.unpin(pfns)


def _cmd_launch_update_vmsa(c, params):
    c.need_sev(es=True)
    for vcpu in c.vm.vcpus:
        if getattr(vcpu, "guest_debug", 0):
            c.fail(EINVAL, f"vCPU {vcpu.vcpu_id} has guest_debug set")
        if vcpu.guest_state_protected:
            c.fail(EINVAL, f"vCPU {vcpu.vcpu_id} state is already protected")
        if vcpu.vmsa_spa is None:
            (pfn,) = c.host.mem.alloc(1)
            vcpu.vmsa_spa = int(pfn) << PAGE_SHIFT
        c.host.umc.write(vcpu.vmsa_spa, build_vmsa(vcpu, c.sev.vmsa_features), 0)
        c.fw(U.SEV_CMD_LAUNCH_UPDATE_VMSA, L.sev_data_launch_update_vmsa, handle=c.sev.handle,
             address=vcpu.vmsa_spa, len=VMSA_SIZE)
        vcpu.fpu_confidential = True          # fpstate_set_confidential
        vcpu.guest_state_protected = True


def _blob_out(c, p, cmd, layout, **extra):
    """LAUNCH_MEASURE and GET_ATTESTATION_REPORT: ``len == 0`` queries the length."""
    blob = 0
    if p["len"] and p["uaddr"]:
        if p["len"] > U.SEV_FW_BLOB_MAX_SIZE:
            c.fail(EINVAL, "len > SEV_FW_BLOB_MAX_SIZE")
        blob = c.buf.reserve(p["len"])
    fields = dict(handle=c.sev.handle, address=blob, len=p["len"] if blob else 0)
    if p["len"]:
        fields.update(extra)
    status, f = c.fw(cmd, layout, check=False, **fields)
    if p["len"]:
        if status:
            raise SevError(status, c.out)
        if blob:
            c.copy_out(p["uaddr"], c.buf.get(blob, p["len"]))
    c.writeback(p, len=f.len)
    if status:
        raise SevError(status, c.out)


def _cmd_launch_measure(c, params):
    _blob_out(c, _params(c, params), U.SEV_CMD_LAUNCH_MEASURE, L.sev_data_launch_measure)


def _cmd_attestation(c, params):
    p = _params(c, params)
    if not isinstance(p["mnonce"], (bytes, bytearray)) or len(p["mnonce"]) != 16:
        raise TypeError("mnonce must be 16 bytes")
    _blob_out(c, p, U.SEV_CMD_ATTESTATION_REPORT, L.sev_data_attestation_report,
              mnonce=bytes(p["mnonce"]))


def _cmd_launch_secret(c, params):
    p = _params(c, params)
    pfns = c.pin(p["guest_uaddr"], p["guest_len"], True)
    try:
        if any(b != a + 1 for a, b in zip(pfns, pfns[1:])):
            c.fail(EINVAL, "guest pages are not physically contiguous")
        trans = c.blob(p["trans_uaddr"], p["trans_len"])
        hdr = c.blob(p["hdr_uaddr"], p["hdr_len"])
        c.fw(U.SEV_CMD_LAUNCH_UPDATE_SECRET, L.sev_data_launch_secret, handle=c.sev.handle,
             hdr_address=hdr, hdr_len=p["hdr_len"],
             guest_address=(pfns[0] << PAGE_SHIFT) + (p["guest_uaddr"] & (PAGE_SIZE - 1)),
             guest_len=p["guest_len"], trans_address=trans, trans_len=p["trans_len"])
    finally:
        c.unpin(pfns)


def _handle_cmd(cmd, layout):
    def handler(c, params):
        c.need_sev()
        c.fw(cmd, layout, handle=c.sev.handle)
    return handler


def _cmd_guest_status(c, params):
    c.need_sev()
    _, f = c.fw(U.SEV_CMD_GUEST_STATUS, L.sev_data_guest_status, handle=c.sev.handle)
    if params is None:
        c.fail(EFAULT, "NULL data")
    c.writeback(params, handle=c.sev.handle, policy=f.policy, state=f.state)


# -- debug -----------------------------------------------------------------------------------------------

def _cmd_dbg(encrypt):
    def handler(c, params):
        """sev_dbg_crypt. Every chunk goes through a kernel bounce page: the source rounded out
        to 16 bytes for decrypt, a read-modify-write of the destination's 16-byte blocks for
        encrypt; chunks also stop at the destination's page end (see docs/fidelity.md)."""
        p = _params(c, params)
        src, dst, size = p["src_uaddr"], p["dst_uaddr"], p["len"]
        if not size or _wraps(src, size):
            c.fail(EINVAL, "len is 0 or the source wraps")
        if not dst:
            c.fail(EINVAL, "dst_uaddr is 0")
        while size:
            s_off, d_off = src & (PAGE_SIZE - 1), dst & (PAGE_SIZE - 1)
            n = min(PAGE_SIZE - s_off, PAGE_SIZE - d_off, size)
            (sp,) = c.pin(src & ~(PAGE_SIZE - 1), PAGE_SIZE, False)
            try:
                (dp,) = c.pin(dst & ~(PAGE_SIZE - 1), PAGE_SIZE, True)
            except KvmError:
                c.unpin([sp])
                raise
            try:
                c.buf.release(0)
                if encrypt:
                    _dbg_encrypt_chunk(c, src, (dp << PAGE_SHIFT) + d_off, n)
                else:
                    _dbg_decrypt_chunk(c, (sp << PAGE_SHIFT) + s_off, dst, n)
            finally:
                c.unpin([sp, dp])
            src, dst, size = src + n, dst + n, size - n
    return handler


def _dbg_fw(c, cmd, src_pa, dst_pa, size):
    c.fw(cmd, L.sev_data_dbg, handle=c.sev.handle, src_addr=src_pa, dst_addr=dst_pa, len=size)


def _dbg_decrypt_chunk(c, src_pa, dst_uaddr, n):
    off = src_pa & 15
    page = c.buf.page()
    _dbg_fw(c, U.SEV_CMD_DBG_DECRYPT, src_pa - off, page, (n + off + 15) & ~15)
    c.copy_out(dst_uaddr, c.buf.get(page + off, n))


def _dbg_encrypt_chunk(c, src_uaddr, dst_pa, n):
    data = c.copy_in(src_uaddr, n)
    off = dst_pa & 15
    length = (n + off + 15) & ~15
    page = c.buf.page()
    if off or n % 16:
        _dbg_fw(c, U.SEV_CMD_DBG_DECRYPT, dst_pa - off, page, length)
    c.host.umc.write(page + off, data, 0)
    _dbg_fw(c, U.SEV_CMD_DBG_ENCRYPT, page, dst_pa - off, length)


# -- send and receive -------------------------------------------------------------------------------

def _cmd_send_start(c, params):
    p = _params(c, params)
    if not p["session_len"]:
        _, f = c.fw(U.SEV_CMD_SEND_START, L.sev_data_send_start, check=False,
                    handle=c.sev.handle)
        c.writeback(p, session_len=f.session_len)
        if c.out.error:
            raise SevError(c.out.error, c.out)
        return
    if (not p["pdh_cert_uaddr"] or not p["pdh_cert_len"] or not p["session_uaddr"]
            or p["session_len"] > U.SEV_FW_BLOB_MAX_SIZE):
        c.fail(EINVAL, "pdh_cert or session missing or session too long")
    session = c.buf.reserve(p["session_len"])
    pdh = c.blob(p["pdh_cert_uaddr"], p["pdh_cert_len"])
    plat = c.blob(p["plat_certs_uaddr"], p["plat_certs_len"])
    amd = c.blob(p["amd_certs_uaddr"], p["amd_certs_len"])
    _, f = c.fw(U.SEV_CMD_SEND_START, L.sev_data_send_start, handle=c.sev.handle,
                pdh_cert_address=pdh, pdh_cert_len=p["pdh_cert_len"], plat_certs_address=plat,
                plat_certs_len=p["plat_certs_len"], amd_certs_address=amd,
                amd_certs_len=p["amd_certs_len"], session_address=session,
                session_len=p["session_len"])
    c.copy_out(p["session_uaddr"], c.buf.get(session, p["session_len"]))
    c.writeback(p, policy=f.policy, session_len=f.session_len)


_CROSSES = "guest range crosses a page"
_SEND_ZERO = "an address or guest_len is 0"
_RECEIVE_ZERO = "an address or length is 0"


def _update_data_params(c, params, send):
    """The prologue of sev_send_update_data and sev_receive_update_data: RECEIVE refuses a VM
    that is not SEV with EINVAL (the kernel's quirk), then ``_params`` as every command."""
    if not send and not sev_guest(c.vm):
        c.fail(EINVAL, "not an SEV guest")
    return _params(c, params)


def _update_data_checks(send, guest_uaddr, guest_len, hdr_len, trans_len, buffers=True):
    """What sev_send_update_data and sev_receive_update_data check before copying or pinning
    anything (EINVAL): every address and length non-zero (``buffers``: hdr_uaddr and
    trans_uaddr), then a guest range inside one page. SEND's lengths are non-zero by then
    (zero ones were its length query), so one test serves both."""
    if not (buffers and guest_uaddr and guest_len and hdr_len and trans_len):
        raise KvmError(EINVAL, IOCTL, _SEND_ZERO if send else _RECEIVE_ZERO)
    if guest_len > PAGE_SIZE or (guest_uaddr & (PAGE_SIZE - 1)) + guest_len > PAGE_SIZE:
        raise KvmError(EINVAL, IOCTL, _CROSSES)


def _query_lengths(c, p, cmd, layout):
    """__sev_send_update_data_query_lengths: the firmware's lengths for a handle-only command,
    written back before its status is returned."""
    _, f = c.fw(cmd, layout, check=False, handle=c.sev.handle)
    c.writeback(p, hdr_len=f.hdr_len, trans_len=f.trans_len)
    if c.out.error:
        raise SevError(c.out.error, c.out)


def _cmd_send_update_data(c, params):
    p = _update_data_params(c, params, True)
    if not p["trans_len"] or not p["hdr_len"]:
        return _query_lengths(c, p, U.SEV_CMD_SEND_UPDATE_DATA, L.sev_data_send_update_data)
    _update_data_checks(True, p["guest_uaddr"], p["guest_len"], p["hdr_len"], p["trans_len"],
                        p["hdr_uaddr"] and p["trans_uaddr"])
    (pfn,) = c.pin(p["guest_uaddr"], p["guest_len"], False)
    try:
        hdr, trans = c.buf.reserve(p["hdr_len"]), c.buf.reserve(p["trans_len"])
        gpa = (pfn << PAGE_SHIFT) + (p["guest_uaddr"] & (PAGE_SIZE - 1))
        c.fw(U.SEV_CMD_SEND_UPDATE_DATA, L.sev_data_send_update_data, handle=c.sev.handle,
             hdr_address=hdr, hdr_len=p["hdr_len"], guest_address=gpa | 1 << c.host.c_bit,
             guest_len=p["guest_len"], trans_address=trans, trans_len=p["trans_len"])
        c.copy_out(p["trans_uaddr"], c.buf.get(trans, p["trans_len"]))
        c.copy_out(p["hdr_uaddr"], c.buf.get(hdr, p["hdr_len"]))
    finally:
        c.unpin([pfn])


def _cmd_receive_start(c, params):
    p = _params(c, params)
    if not p["pdh_uaddr"] or not p["pdh_len"] or not p["session_uaddr"] or not p["session_len"]:
        c.fail(EINVAL, "pdh or session missing")
    pdh = c.blob(p["pdh_uaddr"], p["pdh_len"])
    sess = c.blob(p["session_uaddr"], p["session_len"])
    _start(c, p, U.SEV_CMD_RECEIVE_START, L.sev_data_receive_start, p["handle"],
           pdh_cert_address=pdh, pdh_cert_len=p["pdh_len"], session_address=sess,
           session_len=p["session_len"])


def _cmd_receive_update_data(c, params):
    p = _update_data_params(c, params, False)
    _update_data_checks(False, p["guest_uaddr"], p["guest_len"], p["hdr_len"], p["trans_len"],
                        p["hdr_uaddr"] and p["trans_uaddr"])
    hdr = c.blob(p["hdr_uaddr"], p["hdr_len"])
    trans = c.blob(p["trans_uaddr"], p["trans_len"])
    (pfn,) = c.pin(p["guest_uaddr"], p["guest_len"], True)
    try:
        gpa = (pfn << PAGE_SHIFT) + (p["guest_uaddr"] & (PAGE_SIZE - 1))
        c.fw(U.SEV_CMD_RECEIVE_UPDATE_DATA, L.sev_data_receive_update_data,
             handle=c.sev.handle, hdr_address=hdr, hdr_len=p["hdr_len"],
             guest_address=gpa | 1 << c.host.c_bit, guest_len=p["guest_len"],
             trans_address=trans, trans_len=p["trans_len"])
    finally:
        c.unpin([pfn])


_HANDLERS = {
    U.KVM_SEV_INIT: (_cmd_init(False), None),
    U.KVM_SEV_ES_INIT: (_cmd_init(True), None),
    U.KVM_SEV_INIT2: (_cmd_init2, "init"),
    U.KVM_SEV_LAUNCH_START: (_cmd_launch_start, "launch_start"),
    U.KVM_SEV_LAUNCH_UPDATE_DATA: (_cmd_launch_update_data, "launch_update_data"),
    U.KVM_SEV_LAUNCH_UPDATE_VMSA: (_cmd_launch_update_vmsa, None),
    U.KVM_SEV_LAUNCH_SECRET: (_cmd_launch_secret, "launch_secret"),
    U.KVM_SEV_LAUNCH_MEASURE: (_cmd_launch_measure, "launch_measure"),
    U.KVM_SEV_LAUNCH_FINISH: (_handle_cmd(U.SEV_CMD_LAUNCH_FINISH, L.sev_data_launch_finish),
                              None),
    U.KVM_SEV_GUEST_STATUS: (_cmd_guest_status, "guest_status"),
    U.KVM_SEV_DBG_DECRYPT: (_cmd_dbg(False), "dbg"),
    U.KVM_SEV_DBG_ENCRYPT: (_cmd_dbg(True), "dbg"),
    U.KVM_SEV_GET_ATTESTATION_REPORT: (_cmd_attestation, "attestation_report"),
    U.KVM_SEV_SEND_START: (_cmd_send_start, "send_start"),
    U.KVM_SEV_SEND_UPDATE_DATA: (_cmd_send_update_data, "send_update_data"),
    U.KVM_SEV_SEND_FINISH: (_handle_cmd(U.SEV_CMD_SEND_FINISH, L.sev_data_send_finish), None),
    U.KVM_SEV_SEND_CANCEL: (_handle_cmd(U.SEV_CMD_SEND_CANCEL, L.sev_data_send_cancel), None),
    U.KVM_SEV_RECEIVE_START: (_cmd_receive_start, "receive_start"),
    U.KVM_SEV_RECEIVE_UPDATE_DATA: (_cmd_receive_update_data, "receive_update_data"),
    U.KVM_SEV_RECEIVE_FINISH: (_handle_cmd(U.SEV_CMD_RECEIVE_FINISH,
                                           L.sev_data_receive_finish), None),
}


# -- out of tree: the VMSA migration commands --------------------------------------------------------

def _vmsa_vcpu(c, p):
    """kvm_get_vcpu_by_id of ``vcpu_id``: EINVAL if there is none."""
    for vcpu in c.vm.vcpus:
        if vcpu.vcpu_id == p["vcpu_id"]:
            return vcpu
    c.fail(EINVAL, f"no vCPU {p['vcpu_id']}")


def _cmd_send_update_vmsa(c, params):
    """csv_send_update_vmsa: ENOTTY outside SEV-ES; a zero hdr_len or trans_len queries both
    lengths; then the vCPU's VMSA (with the C-bit) goes out as one packet. The firmware's
    buffer is its transport layout (psp/layout.py: the upstream header's struct lacks
    reserved1)."""
    p = _params(c, params)
    c.need_sev(es=True)
    if not p["trans_len"] or not p["hdr_len"]:
        return _query_lengths(c, p, U.SEV_CMD_SEND_UPDATE_VMSA, L.sev_data_send_update_vmsa)
    if not p["trans_uaddr"] or not p["hdr_uaddr"]:
        c.fail(EINVAL, "hdr_uaddr or trans_uaddr is 0")
    vcpu = _vmsa_vcpu(c, p)
    if vcpu.vmsa_spa is None:
        c.fail(EINVAL, f"vCPU {vcpu.vcpu_id} has no VMSA")
    hdr, trans = c.buf.reserve(p["hdr_len"]), c.buf.reserve(p["trans_len"])
    c.fw(U.SEV_CMD_SEND_UPDATE_VMSA, L.sev_data_send_update_vmsa, handle=c.sev.handle,
         hdr_address=hdr, hdr_len=p["hdr_len"], guest_address=vcpu.vmsa_spa | 1 << c.host.c_bit,
         guest_len=VMSA_SIZE, trans_address=trans, trans_len=p["trans_len"])
    c.copy_out(p["trans_uaddr"], c.buf.get(trans, p["trans_len"]))
    c.copy_out(p["hdr_uaddr"], c.buf.get(hdr, p["hdr_len"]))


def _cmd_receive_update_vmsa(c, params):
    """csv_receive_update_vmsa: ENOTTY outside SEV-ES, EINVAL for a zero address or length or
    an unknown vCPU; the packet is opened into the vCPU's VMSA page (with the C-bit), after
    which its state is protected."""
    p = _params(c, params)
    c.need_sev(es=True)
    if not (p["hdr_uaddr"] and p["hdr_len"] and p["trans_uaddr"] and p["trans_len"]):
        c.fail(EINVAL, _RECEIVE_ZERO)
    vcpu = _vmsa_vcpu(c, p)
    hdr = c.blob(p["hdr_uaddr"], p["hdr_len"])
    trans = c.blob(p["trans_uaddr"], p["trans_len"])
    if vcpu.vmsa_spa is None:                # the page KVM gives every SEV-ES vCPU
        (pfn,) = c.host.mem.alloc(1)
        vcpu.vmsa_spa = int(pfn) << PAGE_SHIFT
    spa = vcpu.vmsa_spa
    c.fw(U.SEV_CMD_RECEIVE_UPDATE_VMSA, L.sev_data_receive_update_vmsa, handle=c.sev.handle,
         hdr_address=hdr, hdr_len=p["hdr_len"], guest_address=spa | 1 << c.host.c_bit,
         guest_len=VMSA_SIZE, trans_address=trans, trans_len=p["trans_len"])
    vcpu.guest_state_protected = True


#: Commands upstream KVM does not have, accepted only with
#: ``host.kvm_sev.out_of_tree_vmsa_migration`` (docs/fidelity.md, "VMSA migration").
_OUT_OF_TREE = {
    U.KVM_SEV_SEND_UPDATE_VMSA: (_cmd_send_update_vmsa, "update_vmsa"),
    U.KVM_SEV_RECEIVE_UPDATE_VMSA: (_cmd_receive_update_vmsa, "update_vmsa"),
}
