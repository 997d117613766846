"""KVM's SEV-SNP commands (``arch/x86/kvm/svm/sev.c``): ``KVM_SEV_SNP_LAUNCH_START``,
``KVM_SEV_SNP_LAUNCH_UPDATE`` (through :func:`sevcore.kvm.guest_memfd.kvm_gmem_populate` and
``sev_gmem_post_populate``) and ``KVM_SEV_SNP_LAUNCH_FINISH`` (``snp_launch_update_vmsa`` first),
the guest context's end (``snp_decommission_context``), and guest_memfd's SNP hooks
(``sev_gmem_prepare``, ``sev_gmem_invalidate``).

The handlers take the fields of ``struct kvm_sev_snp_launch_*`` and run the kernel's checks in
its order; every firmware command goes through the mailbox with the buffer KVM builds. RMP
changes KVM makes itself (``rmp_make_private``, ``rmp_make_shared``) are RMPUPDATEs on
``host.rmp``.
"""
from errno import EBADF, EEXIST, EFAULT, EINVAL, EIO, ENOTTY

import numpy as np

from sevcore import uapi as U
from sevcore.errors import KvmError
from sevcore.hw.hostmem import PAGE_SHIFT, PAGE_SIZE
from sevcore.kvm import sev as S
from sevcore.kvm.guest_memfd import kvm_gmem_populate
from sevcore.kvm.sev_es import build_vmsa
from sevcore.psp import snp_layout as SL
from sevcore.psp.status import PspError

IOCTL = S.IOCTL

#: struct kvm_sev_snp_launch_* field names (pads omitted) and their defaults.
SNP_STRUCTS = {
    "snp_launch_start": dict(policy=0, gosvw=bytes(16), flags=0),
    "snp_launch_update": dict(gfn_start=0, uaddr=0, len=0, type=0, flags=0),
    "snp_launch_finish": dict(id_block_uaddr=0, id_auth_uaddr=0, id_block_en=0, auth_key_en=0,
                              vcek_disabled=0, host_data=bytes(32), flags=0),
}
#: The widths of their fields where sev.FIELD_BITS would say otherwise (include/uapi/linux/kvm.h).
SNP_FIELD_BITS = {
    "snp_launch_start": dict(policy=64, flags=16),
    "snp_launch_update": dict(gfn_start=64, len=64, type=8, flags=16),
    "snp_launch_finish": dict(id_block_en=8, auth_key_en=8, vcek_disabled=8, flags=16),
}
#: The page types KVM_SEV_SNP_LAUNCH_UPDATE accepts from user space (no VMSA).
#: The page types LAUNCH_UPDATE batches (sev_snp._populate_run): the firmware refuses none of
#: them page by page (a CPUID page it may correct, a SECRETS page it writes).
BATCH_TYPES = (U.KVM_SEV_SNP_PAGE_TYPE_NORMAL, U.KVM_SEV_SNP_PAGE_TYPE_ZERO,
               U.KVM_SEV_SNP_PAGE_TYPE_UNMEASURED)
LAUNCH_UPDATE_TYPES = (U.KVM_SEV_SNP_PAGE_TYPE_NORMAL, U.KVM_SEV_SNP_PAGE_TYPE_ZERO,
                       U.KVM_SEV_SNP_PAGE_TYPE_UNMEASURED, U.KVM_SEV_SNP_PAGE_TYPE_SECRETS,
                       U.KVM_SEV_SNP_PAGE_TYPE_CPUID)


def sev_snp_guest(vm):
    return vm.sev.active and vm.sev.snp_active


# -- RMP updates KVM makes (arch/x86/virt/svm/sev.c) ------------------------------------------------

def rmp_make_private(host, pfn, gpa, asid, immutable):
    """rmp_make_private at 4 KiB: the frame assigned to ``asid`` at ``gpa``."""
    return host.rmp.rmp_make_private(pfn, gpa, asid, immutable=immutable)


def rmp_make_shared(host, pfn):
    """rmp_make_shared at 4 KiB: the frame back to the hypervisor."""
    return host.rmp.rmp_make_shared(pfn)


def rmp_assigned(host, pfn):
    """snp_lookup_rmpentry: whether the frame is assigned to a guest or the firmware."""
    return bool(host.rmp.entry(pfn).assigned)


# -- the commands --------------------------------------------------------------------------------------

def _snp_launch_start(c, params):
    """snp_launch_start: ENOTTY outside SNP, EFAULT for a NULL struct, EINVAL for a second
    context, flags, a policy bit KVM does not know or RSVD_MBO clear; then SNP_GCTX_CREATE
    (a failure is ENOTTY, as snp_context_create's NULL), SNP_LAUNCH_START and SNP_ACTIVATE,
    decommissioning the context if either fails."""
    vm, sev = c.vm, c.sev
    if not sev_snp_guest(vm):
        c.fail(ENOTTY, "not an SNP guest")
    if params is None:
        c.fail(EFAULT, "NULL data")
    if sev.snp_context is not None:
        c.fail(EINVAL, "the SNP context exists")
    if params["flags"]:
        c.fail(EINVAL, "flags must be 0")
    policy = params["policy"]
    if policy & ~U.SNP_POLICY_MASK_VALID:
        c.fail(EINVAL, f"policy {policy:#x} has bits outside {U.SNP_POLICY_MASK_VALID:#x}")
    if not policy & U.SNP_POLICY_MASK_RSVD_MBO:
        c.fail(EINVAL, "policy bit 17 (reserved, must be one) is clear")
    sev.policy = policy
    gctx = _snp_context_create(c)
    if gctx is None:
        c.fail(ENOTTY, "SNP_GCTX_CREATE failed")
    sev.snp_context = gctx
    status, _ = c.fw(U.SEV_CMD_SNP_LAUNCH_START, SL.sev_data_snp_launch_start, fd=c.sev_fd,
                     check=False, gctx_paddr=gctx, policy=policy, gosvw=params["gosvw"])
    if not status:
        sev.fd = c.sev_fd
        status, _ = c.fw(U.SEV_CMD_SNP_ACTIVATE, SL.sev_data_snp_activate, check=False,
                         gctx_paddr=gctx, asid=sev.asid)
    if status:
        snp_decommission_context(vm)
        raise S.SevError(status, c.out)


def snp_alloc_firmware_page(host):
    """snp_alloc_firmware_page: a zeroed page made the firmware's in the RMP (assigned,
    ASID 0, immutable: rmp_mark_pages_firmware); its SPA."""
    (pfn,) = host.mem.alloc(1)
    pfn = int(pfn)
    host.mem.frames[pfn << PAGE_SHIFT:(pfn + 1) << PAGE_SHIFT] = 0
    if rmp_make_private(host, pfn, 0, 0, True):
        host.mem.free([pfn])
        return None
    return pfn << PAGE_SHIFT


def snp_free_firmware_page(host, spa):
    """snp_free_firmware_page: reclaimed, made the hypervisor's again, freed; leaked (as the
    kernel leaks it) if the firmware will not give it back."""
    pfn = spa >> PAGE_SHIFT
    if not _reclaim_firmware_page(host, pfn):
        host.mem.free([pfn])


def _snp_context_create(c):
    """snp_context_create: a firmware page made a guest context; None when the firmware
    refuses (``kvm_sev_cmd.error`` holds its status)."""
    spa = snp_alloc_firmware_page(c.host)
    if spa is None:
        return None
    status, _ = c.fw(U.SEV_CMD_SNP_GCTX_CREATE, SL.sev_data_snp_addr, fd=c.sev_fd, check=False,
                     address=spa)
    if status:
        snp_free_firmware_page(c.host, spa)
        return None
    return spa


def _snp_guest_init2(c, params):
    """sev_guest_init2, and for an SNP guest snp_guest_req_init: KVM's bounce pages for guest
    requests, the response page the firmware's."""
    _INIT2(c, params)
    sev = c.sev
    if sev.snp_active:
        (pfn,) = c.host.mem.alloc(1)
        sev.guest_req_buf = int(pfn) << PAGE_SHIFT
        sev.guest_resp_buf = snp_alloc_firmware_page(c.host)


def snp_guest_req_cleanup(vm):
    """snp_guest_req_cleanup: the two bounce pages go back."""
    sev, host = vm.sev, vm.host
    if sev.guest_resp_buf is not None:
        snp_free_firmware_page(host, sev.guest_resp_buf)
    if sev.guest_req_buf is not None:
        host.mem.free([sev.guest_req_buf >> PAGE_SHIFT])
    sev.guest_req_buf = sev.guest_resp_buf = None


def snp_decommission_context(vm):
    """snp_decommission_context: SNP_DECOMMISSION unbinds the ASID from the context, whose
    page goes back to the host (snp_free_firmware_page reclaims it)."""
    sev = vm.sev
    if sev.snp_context is None:
        return 0
    host = vm.host
    buf = S.KernelBuffers(host)
    try:
        status = host.psp.command(U.SEV_CMD_SNP_DECOMMISSION,
                                  buf.put(SL.sev_data_snp_addr.pack(address=sev.snp_context)))
    finally:
        buf.free()
    if status:
        return status                       # the kernel WARNs and leaks the page
    snp_free_firmware_page(host, sev.snp_context)
    sev.snp_context = None
    return 0


def snp_free_vmsas(vm):
    """sev_free_vcpu for an SNP guest: each VMSA page goes back to the hypervisor."""
    for vcpu in vm.vcpus:
        if vcpu.vmsa_spa is not None and rmp_assigned(vm.host, vcpu.vmsa_spa >> PAGE_SHIFT):
            rmp_make_shared(vm.host, vcpu.vmsa_spa >> PAGE_SHIFT)


def _reclaim_firmware_page(host, pfn):
    """snp_reclaim_pages + rmp_make_shared for a page the firmware owned."""
    buf = S.KernelBuffers(host)
    try:
        status = host.psp.command(U.SEV_CMD_SNP_PAGE_RECLAIM, buf.put(
            SL.sev_data_snp_page_reclaim.pack(paddr=(pfn << PAGE_SHIFT) | 1 << host.c_bit)))
    finally:
        buf.free()
    if status:
        return status
    return rmp_make_shared(host, pfn)


class _PopulateArgs:
    """struct sev_gmem_populate_args."""

    def __init__(self, type, sev_fd):
        self.type, self.sev_fd, self.fw_error = type, sev_fd, 0
        self.why = None


def _snp_launch_update(c, params):
    """snp_launch_update: EINVAL outside SNP or before LAUNCH_START, EFAULT for a NULL struct,
    EINVAL for an unaligned len, flags or a type user space may not give, EINVAL when
    ``gfn_start`` is in no guest_memfd slot; then kvm_gmem_populate. Pages done are written
    back (gfn_start, len, and uaddr but for ZERO pages) and the call succeeds even when a later
    page failed; a failure at the first page is EIO with the firmware status, if any, in
    ``error``."""
    vm, sev = c.vm, c.sev
    if not sev_snp_guest(vm) or sev.snp_context is None:
        c.fail(EINVAL, "not an SNP guest, or no LAUNCH_START yet")
    if params is None:
        c.fail(EFAULT, "NULL data")
    p = params
    if p["len"] % PAGE_SIZE or p["flags"] or p["type"] not in LAUNCH_UPDATE_TYPES:
        c.fail(EINVAL, "len unaligned, flags set or bad page type")
    npages = p["len"] >> PAGE_SHIFT
    slot = vm.gfn_to_memslot(p["gfn_start"]) if p["gfn_start"] <= vm.max_gfn else None
    if slot is None or not slot.flags & U.KVM_MEM_GUEST_MEMFD:
        c.fail(EINVAL, f"gfn {p['gfn_start']:#x} is not in a guest_memfd slot")
    args = _PopulateArgs(p["type"], c.sev_fd)
    src = None if p["type"] == U.KVM_SEV_SNP_PAGE_TYPE_ZERO else p["uaddr"]

    def post_populate(vm, gfn, pfn, src_page, order):
        return _sev_gmem_post_populate(c, gfn, pfn, src_page, args)
    batch = _populate_run(c, p["gfn_start"], src, npages, p["type"]) \
        if p["type"] in BATCH_TYPES else 0
    rest = src if src is None else src + batch * PAGE_SIZE
    count = kvm_gmem_populate(vm, p["gfn_start"] + batch, rest, npages - batch, post_populate) \
        if batch < npages else 0
    if batch and count < 0:
        count = 0                            # kvm_gmem_populate: pages done are a success
    count += batch
    if count < 0:
        c.out.error = args.fw_error
        if args.fw_error:
            raise S.SevError(args.fw_error, c.out)
        raise KvmError(EIO, IOCTL, f"kvm_gmem_populate failed: {args.why or -count}")
    changed = dict(gfn_start=p["gfn_start"] + count, len=p["len"] - count * PAGE_SIZE)
    if p["type"] != U.KVM_SEV_SNP_PAGE_TYPE_ZERO:
        changed["uaddr"] = p["uaddr"] + count * PAGE_SIZE
    c.writeback(p, **changed)


def _populate_run(c, gfn_start, src, npages, type):
    """kvm_gmem_populate and sev_gmem_post_populate for the longest run of pages from
    ``gfn_start`` that meets every precondition (one guest_memfd binding, not prepared,
    private, frames not assigned, source mapped), in chunks of POPULATE_CHUNK pages: one copy,
    one RMP update, one pass of the firmware (``snp_launch_update_pages``, the same commands in
    order) each, while a thread faults in the fresh frames ahead. Returns the
    pages done; the caller takes the rest, and any failure, page by page, so the result is that
    of the kernel's loop (docs/snp-kvm.md). Only for page types the firmware takes as they
    come (BATCH_TYPES)."""
    vm, host = c.vm, c.host
    slot = vm.gfn_to_memslot(gfn_start) if gfn_start <= vm.max_gfn else None
    file = None if slot is None else slot.gmem_file
    if file is None or npages < 2 or S._sev_fd_error(host, c.sev_fd) is not None:
        return 0
    first = slot.gmem_pgoff + gfn_start - slot.base_gfn
    n = min(npages, slot.end_gfn - gfn_start)
    bound = [e for s, e, b in file.bindings if b is slot and s <= first < e]
    if not bound:
        return 0
    n = min(n, bound[0] - first)
    index = np.arange(first, first + n, dtype=np.uint64)
    gfns = index - np.uint64(slot.gmem_pgoff) + np.uint64(slot.base_gfn)
    n = _prefix(n, ~file.prepared.contains_array(index) & vm.private.contains_array(gfns))
    if src is not None:
        if src & (PAGE_SIZE - 1):
            return 0
        n = min(n, c.kvm.mapped_pages(src >> PAGE_SHIFT, n))
    if n < 2:
        return 0
    index, gfns = index[:n], gfns[:n]
    pfns = file.pages(index)
    n = host.rmp.first_denied(pfns, 0)       # the first frame already assigned
    if n < 2:
        return 0
    index, gfns, pfns = index[:n], gfns[:n], pfns[:n]
    done = 0
    # The frames are fresh: a background thread faults them in ahead of the chunk being copied
    # (HostMemory.populating), as the kernel's allocator would have them zeroed already.
    with host.mem.populating(pfns):
        while done < n:
            end = min(n, done + POPULATE_CHUNK)
            at = None if src is None else src + done * PAGE_SIZE
            k = _populate_chunk(c, at, pfns[done:end], gfns[done:end], type)
            done += k
            if done < end:
                break
    c.out.error = 0
    if done:
        file.prepared.add(int(index[0]), int(index[0]) + done)
    return done


#: Pages _populate_run copies, assigns and hands the firmware at a time.
POPULATE_CHUNK = 2048


def _populate_chunk(c, src, pfns, gfns, type):
    """One chunk of _populate_run: the source pages at ``src`` (None: none) copied into
    ``pfns``, assigned to the guest at ``gfns``, measured and encrypted by the firmware.
    Returns the pages done; a failure leaves the page it hit, and those after it, unassigned."""
    host, sev = c.host, c.sev
    if src is not None and not _copy_pages(c, src, pfns):
        return 0
    status, done = host.rmp.make_private_pages(pfns, gfns, sev.asid, immutable=True)
    if status:
        host.rmp.make_shared_pages(pfns[:done])
        return 0
    try:
        host.psp.snp_launch_update_pages(sev.snp_context, (pfns << np.uint64(PAGE_SHIFT))
                                         | np.uint64(1 << host.c_bit), type)
        return len(pfns)
    except PspError as e:
        host.rmp.make_shared_pages(pfns[e.index + 1:])
        _reclaim_firmware_page(host, int(pfns[e.index]))
        return e.index


def _copy_pages(c, src, pfns):
    """copy_from_user of the source pages into the frames ``pfns`` (none is assigned: the host
    writes them in plaintext). From one anonymous VMM mapping the frames are copied run by run
    with no intermediate buffer; otherwise through copy_from_user. False if the source cannot
    be read."""
    host = c.host
    frames = host.mem.frames
    pages = np.arange(src >> PAGE_SHIFT, (src >> PAGE_SHIFT) + len(pfns), dtype=np.uint64)
    spfns = c.kvm.anon_pfns(pages)
    if spfns is None:
        try:
            data = c.kvm.copy_from_user(src, len(pfns) * PAGE_SIZE)
        except OSError:
            return False
        host.umc.write_pages(pfns << np.uint64(PAGE_SHIFT), data, 0)
        return True
    s, d = spfns.astype(np.int64), pfns.astype(np.int64)
    breaks = np.flatnonzero((np.diff(s) != 1) | (np.diff(d) != 1)) + 1
    for lo, hi in zip([0, *breaks.tolist()], [*breaks.tolist(), len(d)]):
        a, b = int(s[lo]) << PAGE_SHIFT, int(d[lo]) << PAGE_SHIFT
        size = (hi - lo) << PAGE_SHIFT
        frames[b:b + size] = frames[a:a + size]
    return True


def _prefix(n, ok):
    """How many leading entries of the bool array ``ok`` hold (at most ``n``)."""
    bad = np.flatnonzero(~ok)
    return min(n, int(bad[0]) if len(bad) else n)


def _sev_gmem_post_populate(c, gfn, pfn, src, args):
    """sev_gmem_post_populate for one 4 KiB page: the frame must not be assigned yet (EEXIST);
    the source page is copied into it (EFAULT if it cannot be read), it is assigned to the
    guest (immutable) and SNP_LAUNCH_UPDATE measures and encrypts it. A firmware failure
    reclaims the frame, and a CPUID page the firmware refused with INVALID_PARAM (it wrote
    the values it expects) is copied back to ``src``. Returns 0 or -errno."""
    host = c.host
    if args.type != U.KVM_SEV_SNP_PAGE_TYPE_ZERO and src is None:
        return -EINVAL
    if rmp_assigned(host, pfn):
        args.why = f"gfn {gfn:#x}: its frame is already assigned in the RMP"
        return -EEXIST
    spa = pfn << PAGE_SHIFT
    if src is not None:
        try:
            data = c.kvm.copy_from_user(src, PAGE_SIZE)
        except OSError:
            args.why = f"cannot read the source page at {src:#x}"
            return -EFAULT
        host.umc.write(spa, data, 0)
    rc = rmp_make_private(host, pfn, gfn << PAGE_SHIFT, c.sev.asid, True)
    if rc:
        args.why = f"RMPUPDATE of pfn {pfn:#x} failed ({rc})"
        return -EIO
    if S._sev_fd_error(host, args.sev_fd) is not None:      # __sev_issue_cmd: -EBADF
        _reclaim_firmware_page(host, pfn)
        args.why = "sev_fd is not /dev/sev"
        return -EBADF
    status, _ = c.fw(U.SEV_CMD_SNP_LAUNCH_UPDATE, SL.sev_data_snp_launch_update, fd=args.sev_fd,
                     check=False, gctx_paddr=c.sev.snp_context, address=spa | 1 << host.c_bit,
                     page_size=U.RMP_PG_SIZE_4K, page_type=args.type)
    if not status:
        return 0
    args.fw_error = status
    if not _reclaim_firmware_page(host, pfn) and \
            args.type == U.KVM_SEV_SNP_PAGE_TYPE_CPUID and status == U.SEV_RET_INVALID_PARAM:
        try:
            c.kvm.copy_to_user(src, host.umc.read(spa, PAGE_SIZE, 0))
        except OSError:
            pass                             # pr_debug only
    return -EIO


def _snp_launch_update_vmsa(c):
    """snp_launch_update_vmsa: each vCPU's VMSA (sev_es_sync_vmsa) assigned to the guest at
    INITIAL_VMSA_GPA and measured as a VMSA page; the state is protected from then on."""
    host, sev = c.host, c.sev
    for vcpu in c.vm.vcpus:
        if vcpu.guest_state_protected:
            continue
        if vcpu.vmsa_spa is None:
            (pfn,) = host.mem.alloc(1)
            vcpu.vmsa_spa = int(pfn) << PAGE_SHIFT
        host.umc.write(vcpu.vmsa_spa, build_vmsa(vcpu, sev.vmsa_features), 0)
        pfn = vcpu.vmsa_spa >> PAGE_SHIFT
        if rmp_make_private(host, pfn, U.INITIAL_VMSA_GPA, sev.asid, True):
            c.fail(EIO, f"RMPUPDATE of vCPU {vcpu.vcpu_id}'s VMSA failed")
        status, _ = c.fw(U.SEV_CMD_SNP_LAUNCH_UPDATE, SL.sev_data_snp_launch_update,
                         fd=c.sev_fd, check=False, gctx_paddr=sev.snp_context,
                         address=vcpu.vmsa_spa | 1 << host.c_bit,
                         page_size=U.RMP_PG_SIZE_4K, page_type=U.SNP_PAGE_TYPE_VMSA)
        if status:
            _reclaim_firmware_page(host, pfn)
            raise S.SevError(status, c.out)
        vcpu.fpu_confidential = True
        vcpu.guest_state_protected = True


def _snp_launch_finish(c, params):
    """snp_launch_finish: ENOTTY outside SNP, EINVAL before LAUNCH_START, EFAULT for a NULL
    struct, EINVAL for flags; then every VMSA, the ID block and ID auth copied in when
    ``id_block_en`` (KVM_SEV_SNP_ID_BLOCK_SIZE and KVM_SEV_SNP_ID_AUTH_SIZE bytes), and
    SNP_LAUNCH_FINISH with the host data. Success allows pre-faulting memory."""
    vm, sev = c.vm, c.sev
    if not sev_snp_guest(vm):
        c.fail(ENOTTY, "not an SNP guest")
    if sev.snp_context is None:
        c.fail(EINVAL, "no LAUNCH_START yet")
    if params is None:
        c.fail(EFAULT, "NULL data")
    p = params
    if p["flags"]:
        c.fail(EINVAL, "flags must be 0")
    _snp_launch_update_vmsa(c)
    fields = dict(gctx_paddr=sev.snp_context, vcek_disabled=p["vcek_disabled"] & 1,
                  host_data=p["host_data"])
    if p["id_block_en"]:
        fields.update(id_block_en=1, id_block_paddr=c.blob(p["id_block_uaddr"],
                                                               U.KVM_SEV_SNP_ID_BLOCK_SIZE))
        fields["id_auth_paddr"] = c.blob(p["id_auth_uaddr"], U.KVM_SEV_SNP_ID_AUTH_SIZE)
        fields["auth_key_en"] = 1 if p["auth_key_en"] else 0
    c.fw(U.SEV_CMD_SNP_LAUNCH_FINISH, SL.sev_data_snp_launch_finish, **fields)
    vm.pre_fault_allowed = True


# -- guest_memfd's SNP hooks -------------------------------------------------------------------------

def sev_gmem_prepare(vm, pfns, gfns):
    """sev_gmem_prepare for frames a private fault hands the guest: each frame not yet
    assigned becomes the guest's (not immutable, not validated) at its gfn. 0 or -EINVAL."""
    if not sev_snp_guest(vm):
        return 0
    rmp = vm.host.rmp
    pfns = np.asarray(pfns, np.uint64)
    free = ~rmp.assigned_mask(pfns)
    if free.any():
        status, _ = rmp.make_private_pages(pfns[free], np.asarray(gfns, np.uint64)[free],
                                           vm.sev.asid)
        if status:
            return -EINVAL
    return 0


def sev_gmem_invalidate(host, pfns):
    """sev_gmem_invalidate for frames guest_memfd frees: each assigned frame goes back to the
    hypervisor (rmp_make_shared)."""
    rmp = host.rmp
    pfns = np.asarray(pfns, np.uint64)
    if not len(pfns):
        return
    lo, hi = int(pfns.min()), int(pfns.max()) + 1
    if rmp.next_assigned(lo, hi - lo) == hi:
        return                              # nothing assigned: the common case
    rmp.make_shared_pages(pfns[rmp.assigned_mask(pfns)])


HANDLERS = {
    U.KVM_SEV_SNP_LAUNCH_START: (_snp_launch_start, "snp_launch_start"),
    U.KVM_SEV_SNP_LAUNCH_UPDATE: (_snp_launch_update, "snp_launch_update"),
    U.KVM_SEV_SNP_LAUNCH_FINISH: (_snp_launch_finish, "snp_launch_finish"),
}

# KVM_MEMORY_ENCRYPT_OP's tables (sev.py) take the SNP commands: sev_mem_enc_ioctl's cases.
S.STRUCTS.update(SNP_STRUCTS)
S.STRUCT_FIELD_BITS.update(SNP_FIELD_BITS)
S.BYTE_FIELDS.update(gosvw=16, host_data=U.KVM_SEV_SNP_FINISH_DATA_SIZE)
_INIT2 = S._HANDLERS[U.KVM_SEV_INIT2][0]
S._HANDLERS.update(HANDLERS)
S._HANDLERS[U.KVM_SEV_INIT2] = (_snp_guest_init2, "init")
