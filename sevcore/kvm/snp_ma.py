"""KVM's side of SNP migration through a migration agent: out of tree.

Upstream KVM has none of this: ``SNP_POLICY_MASK_VALID`` (arch/x86/kvm/svm/sev.c) leaves out
MIGRATE_MA, ``snp_launch_start`` never sets MA_EN, and no ioctl issues SNP_PAGE_SWAP_OUT/IN.
These functions are what such a KVM would do, each on the VM whose fd would receive the call,
with KVM's own buffers and the firmware commands of 56860 (sevcore.psp.snp_ma); they raise
what the kernel would (``KvmError`` with the errno, ``SevError`` with the firmware status):

- :func:`snp_launch_start_ma`: KVM_SEV_SNP_LAUNCH_START naming the agent's VM (the kernel finds
  its guest context from the fd, as KVM_CAP_VM_COPY_ENC_CONTEXT_FROM finds its source);
- :func:`snp_page_swap_out` / :func:`snp_page_swap_in`: one guest_memfd page (or a vCPU's VMSA)
  out to the VMM as ciphertext and metadata entry, and back into a guest's guest_memfd;
- :func:`snp_incoming_context`: an SNP VM's context made by SNP_GCTX_CREATE alone, for the
  target's agent to import; :func:`snp_activate_incoming` binds the ASID once it is RUNNING;
- :func:`snp_context_exported`: the source VM lets go of a context its agent exported;
- :func:`snp_enable_gmem_dirty_log`: KVM_MEM_LOG_DIRTY_PAGES on the VM's guest_memfd slots, so
  the VMM can pre-copy while the guest runs (upstream refuses it: check_memory_region_flags).
"""
from errno import EINVAL

import numpy as np

from sevcore import uapi as U
from sevcore.errors import KvmError
from sevcore.hw.hostmem import PAGE_SHIFT, PAGE_SIZE
from sevcore.kvm import sev as S
from sevcore.kvm import sev_snp as SNP
from sevcore.psp import snp_layout as SL
from sevcore.psp import snp_ma as MA

IOCTL = S.IOCTL
_CAP = "KVM_ENABLE_CAP"


class _MaCmd(S._Cmd):
    """KVM_SEV_SNP_LAUNCH_START with the agent's fields in the firmware's buffer."""

    def __init__(self, vm, ma_gctx):
        super().__init__(vm, S.SevCmd(U.KVM_SEV_SNP_LAUNCH_START, {}),
                         vm.host.kvm_sev.sev_fd())
        self.ma_gctx = ma_gctx

    def fw(self, cmd, layout, fd=None, check=True, **fields):
        if cmd == U.SEV_CMD_SNP_LAUNCH_START:
            fields.update(ma_en=1, ma_gctx_paddr=self.ma_gctx,
                          policy=fields["policy"] | U.SNP_POLICY_MASK_MIGRATE_MA)
        return super().fw(cmd, layout, fd, check, **fields)


def _cmd(vm):
    return S._Cmd(vm, S.SevCmd(0, {}), vm.host.kvm_sev.sev_fd())


def _run(c, fn, *args):
    try:
        return fn(c, *args)
    finally:
        c.buf.free()


def snp_launch_start_ma(vm, policy, ma_vm, gosvw=bytes(16)):
    """KVM_SEV_SNP_LAUNCH_START of ``vm`` bound to the migration agent running in ``ma_vm``
    (out of tree): ``policy`` must have MIGRATE_MA (EINVAL), the agent must be an SNP VM past
    its launch start (EINVAL); then snp_launch_start's checks and commands with MA_EN = 1 and
    the agent's context. The firmware's refusals (POLICY_FAILURE for an agent bound to an agent,
    INVALID_GUEST) are SevError."""
    if not policy & U.SNP_POLICY_MASK_MIGRATE_MA:
        raise KvmError(EINVAL, IOCTL, "a migration agent needs MIGRATE_MA in the policy")
    if not SNP.sev_snp_guest(ma_vm) or ma_vm.sev.snp_context is None:
        raise KvmError(EINVAL, IOCTL, "the migration agent is no launched SNP VM")
    c = _MaCmd(vm, ma_vm.sev.snp_context)
    params = dict(SNP.SNP_STRUCTS["snp_launch_start"], gosvw=bytes(gosvw),
                  policy=policy & ~U.SNP_POLICY_MASK_MIGRATE_MA)
    _run(c, SNP._snp_launch_start, params)
    vm.sev.policy = policy


def _alloc_page(host):
    """alloc_page: a kernel page for one command; its SPA."""
    return int(host.mem.alloc(1)[0]) << PAGE_SHIFT


def _gmem_page(vm, gfn):
    """(guest_memfd file, page index) of a gfn in a guest_memfd slot (EINVAL otherwise)."""
    slot = vm.gfn_to_memslot(gfn) if gfn <= vm.max_gfn else None
    if slot is None or not slot.flags & U.KVM_MEM_GUEST_MEMFD:
        raise KvmError(EINVAL, IOCTL, f"gfn {gfn:#x} is not in a guest_memfd slot")
    return slot.gmem_file, slot.gmem_pgoff + gfn - slot.base_gfn


def _need_context(vm):
    if not SNP.sev_snp_guest(vm) or vm.sev.snp_context is None:
        raise KvmError(EINVAL, IOCTL, "not an SNP guest with a context")


def snp_page_swap_out(vm, gfn=None, vcpu=None, root=False):
    """SNP_PAGE_SWAP_OUT of the guest page at ``gfn`` (or of ``vcpu``'s VMSA) into a kernel
    page (out of tree): returns ``(ciphertext, metadata entry)`` as bytes for the VMM; with
    ``root`` the entry stays in the guest's context (ROOT_MDATA_EN) and the second value is
    None. The guest page is no longer validated: the guest must not run it again."""
    _need_context(vm)
    host = vm.host
    if vcpu is not None:
        if vcpu.vmsa_spa is None:
            raise KvmError(EINVAL, IOCTL, f"vCPU {vcpu.vcpu_id} has no VMSA")
        spa, page_type = vcpu.vmsa_spa, MA.SWAP_VMSA
    else:
        file, index = _gmem_page(vm, gfn)
        pfn = file.page_cache.lookup(index)
        if pfn is None:
            raise KvmError(EINVAL, IOCTL, f"gfn {gfn:#x} has no page")
        spa, page_type = int(pfn) << PAGE_SHIFT, MA.SWAP_DATA
    c = _cmd(vm)

    def go(c):
        dst = _alloc_page(host)
        md = 0 if root else SNP.snp_alloc_firmware_page(host)
        try:
            c.fw(U.SEV_CMD_SNP_PAGE_SWAP_OUT, MA.sev_data_snp_page_swap_out,
                 gctx_paddr=vm.sev.snp_context, src_paddr=spa | 1 << host.c_bit,
                 dst_paddr=dst, mdata_paddr=md, page_type=page_type, root_mdata_en=int(root))
            entry = None if root else host.umc.read(md, MA.snp_mdata_entry.size, 0)
            return host.umc.read(dst, PAGE_SIZE, 0), entry
        finally:
            host.mem.free(np.array([dst >> PAGE_SHIFT], np.uint64))
            if md:
                SNP.snp_free_firmware_page(host, md)
    return _run(c, go)


def snp_page_swap_in(vm, ciphertext, entry=None, gfn=None, vcpu=None):
    """SNP_PAGE_SWAP_IN (out of tree) of a page the VMM received: into the guest_memfd page of
    ``gfn`` (made the guest's at its gfn, locked, as kvm_gmem_populate makes it, and marked
    prepared), or into a new VMSA page for ``vcpu`` (its state is then protected). ``entry``:
    the metadata entry, or None for the one in the guest's context (ROOT_MDATA_EN); a VMSA
    page the vCPU had goes back to the hypervisor. A refusal puts the new page back to the
    hypervisor and raises SevError."""
    _need_context(vm)
    host, sev = vm.host, vm.sev
    if vcpu is not None:
        (pfn,) = host.mem.alloc(1)
        pfn, gpa, page_type, file = int(pfn), U.INITIAL_VMSA_GPA, MA.SWAP_VMSA, None
    else:
        file, index = _gmem_page(vm, gfn)
        pfn = int(file.pages(np.array([index], np.uint64))[0])
        gpa, page_type = gfn << PAGE_SHIFT, MA.SWAP_DATA
    if SNP.rmp_make_private(host, pfn, gpa, sev.asid, True):
        raise KvmError(EINVAL, IOCTL, f"RMPUPDATE of the page for {gpa:#x} failed")
    c = _cmd(vm)

    def go(c):
        src = _alloc_page(host)
        host.umc.write(src, bytes(ciphertext), 0)
        md = 0
        if entry is not None:             # filled, then given to the firmware
            md = SNP.snp_alloc_firmware_page(host)
            host.mem.write(md, bytes(entry))
        try:
            return c.fw(U.SEV_CMD_SNP_PAGE_SWAP_IN, MA.sev_data_snp_page_swap_in,
                        check=False, gctx_paddr=sev.snp_context, src_paddr=src,
                        dst_paddr=pfn << PAGE_SHIFT | 1 << host.c_bit, mdata_paddr=md,
                        page_type=page_type, root_mdata_en=int(entry is None))[0]
        finally:
            host.mem.free(np.array([src >> PAGE_SHIFT], np.uint64))
            if md:
                SNP.snp_free_firmware_page(host, md)
    status = _run(c, go)
    if status:
        SNP.rmp_make_shared(host, pfn)
        if file is None:
            host.mem.free(np.array([pfn], np.uint64))
        raise S.SevError(status, c.out)
    if file is None:                      # the VMSA page it replaces: sev_free_vcpu's steps
        old, vcpu.vmsa_spa = vcpu.vmsa_spa, pfn << PAGE_SHIFT
        if old is not None:
            if SNP.rmp_assigned(host, old >> PAGE_SHIFT):
                SNP.rmp_make_shared(host, old >> PAGE_SHIFT)
            host.mem.free(np.array([old >> PAGE_SHIFT], np.uint64))
        vcpu.guest_state_protected = True
        vcpu.fpu_confidential = True
    else:
        file.prepared.add(index, index + 1)


def snp_incoming_context(vm):
    """The target's guest context (out of tree): SNP_GCTX_CREATE alone, left in the INIT state
    for the agent's MSG_IMPORT_REQ; returns its address, the GCTX_PADDR the agent names."""
    if not SNP.sev_snp_guest(vm):
        raise KvmError(EINVAL, IOCTL, "not an SNP guest")
    if vm.sev.snp_context is not None:
        raise KvmError(EINVAL, IOCTL, "the SNP context exists")
    gctx = _run(_cmd(vm), SNP._snp_context_create)
    if gctx is None:
        raise KvmError(EINVAL, IOCTL, "SNP_GCTX_CREATE failed")
    vm.sev.snp_context = gctx
    vm.sev.fd = vm.host.kvm_sev.sev_fd()
    return gctx


def snp_activate_incoming(vm):
    """After the agent's import (out of tree): SNP_GUEST_STATUS must say RUNNING (EINVAL), then
    SNP_ACTIVATE binds the VM's ASID; the policy is the imported one."""
    _need_context(vm)
    c = _cmd(vm)

    def go(c):
        page = SNP.snp_alloc_firmware_page(vm.host)
        try:
            c.fw(U.SEV_CMD_SNP_GUEST_STATUS, SL.sev_data_snp_guest_status,
                 gctx_paddr=vm.sev.snp_context, address=page)
            st = SL.snp_guest_status.unpack(vm.host.umc.read(page, SL.snp_guest_status.size, 0))
        finally:
            SNP.snp_free_firmware_page(vm.host, page)
        if st["state"] != U.SNP_GUEST_STATE_RUNNING:
            c.fail(EINVAL, "the context was not imported")
        c.fw(U.SEV_CMD_SNP_ACTIVATE, SL.sev_data_snp_activate, gctx_paddr=vm.sev.snp_context,
             asid=vm.sev.asid)
        return st["policy"]
    vm.sev.policy = _run(c, go)
    vm.pre_fault_allowed = True


def snp_context_exported(vm):
    """The source after its agent's MSG_EXPORT_REQ with IMI_EN = 0 (out of tree): the firmware
    decommissioned the context, so KVM frees the page (SNP_PAGE_RECLAIM, back to the host) and
    the VM has no context; EINVAL while the context is still a guest's."""
    _need_context(vm)
    host = vm.host
    if host.psp.snp_guest(vm.sev.snp_context) is not None:
        raise KvmError(EINVAL, IOCTL, "the context was not exported")
    SNP.snp_free_firmware_page(host, vm.sev.snp_context)
    vm.sev.snp_context = None


def snp_enable_gmem_dirty_log(vm):
    """Let ``vm``'s guest_memfd slots log dirty pages (out of tree, a KVM_ENABLE_CAP on the VM
    in spirit): afterwards KVM_SET_USER_MEMORY_REGION2 accepts KVM_MEM_LOG_DIRTY_PAGES on a
    guest_memfd slot (set at creation, or toggled on an existing slot, the only change such a
    slot then allows), and private writes through it land in its dirty bitmap like shared ones.

    Upstream refuses the flag ("Dirty logging private memory is not currently supported",
    virt/kvm/kvm_main.c, check_memory_region_flags); nothing in the hardware does: an SNP
    guest's private pages are mapped by ordinary nested page tables (AMD64 APM vol. 2, 15.25
    "Nested Paging", 15.36 "Secure Nested Paging"), so KVM can write-protect them and log the
    nested page fault of the first write as for any page; the RMP check of the access comes
    after the nested walk and does not change. EINVAL for a VM that is not KVM_X86_SNP_VM, or
    one that logs to dirty rings (the ring path is not modelled for private pages); nothing
    changes then."""
    vm._enter(_CAP)
    if vm.type != U.KVM_X86_SNP_VM:
        raise KvmError(EINVAL, _CAP, "dirty logging of guest_memfd is for SNP VMs")
    if vm.dirty_ring_size:
        raise KvmError(EINVAL, _CAP, "the VM logs to dirty rings, not bitmaps")
    vm.gmem_dirty_log = True
