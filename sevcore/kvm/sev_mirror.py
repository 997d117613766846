"""Sharing and moving an SEV context between VMs (arch/x86/kvm/svm/sev.c): mirror VMs
(``KVM_CAP_VM_COPY_ENC_CONTEXT_FROM``, ``sev_vm_copy_enc_context_from``), intra-host moves
(``KVM_CAP_VM_MOVE_ENC_CONTEXT_FROM``, ``sev_vm_move_enc_context_from``), and the SEV part of a
VM's destruction (``sev_vm_destroy``)."""
import threading
from errno import EBADF, EBUSY, EINVAL

from sevcore import uapi as U
from sevcore.errors import KvmError
from sevcore.kvm.sev import KernelBuffers, is_mirror, sev_guest
from sevcore.kvm.sev_snp import snp_decommission_context, snp_free_vmsas, snp_guest_req_cleanup
from sevcore.psp import layout as L

#: Taken by a move or a mirror on both VMs, as ``sev_lock_two_vms`` takes the VMs'
#: migration_in_progress flags.
_migration_lock = threading.Lock()


def _source(dst, ioctl, fd_or_vm):
    src = dst.host.fget(fd_or_vm)
    if type(src) is not type(dst):
        raise KvmError(EBADF, ioctl, "source is not a KVM VM fd")
    return src


def _lock_two(dst, src, ioctl):
    """sev_lock_two_vms."""
    if dst is src:
        raise KvmError(EINVAL, ioctl, "source and destination are the same VM")
    with _migration_lock:
        if dst.sev.migration_in_progress:
            raise KvmError(EBUSY, ioctl, "destination is migrating")
        if src.sev.migration_in_progress:
            raise KvmError(EBUSY, ioctl, "source is migrating")
        dst.sev.migration_in_progress = src.sev.migration_in_progress = True


def _unlock_two(dst, src):
    with _migration_lock:
        dst.sev.migration_in_progress = src.sev.migration_in_progress = False


def copy_enc_context_from(dst, ioctl, fd_or_vm):
    """sev_vm_copy_enc_context_from: ``dst`` becomes a mirror sharing the source's ASID."""
    src = _source(dst, ioctl, fd_or_vm)
    _lock_two(dst, src, ioctl)
    try:
        if sev_guest(dst) or not sev_guest(src) or is_mirror(src) or dst.vcpus or \
                src.sev.snp_active:
            raise KvmError(EINVAL, ioctl, "destination is SEV or has vCPUs, or the source is "
                                          "not SEV, is a mirror or is SNP")
        src._get()
        s, d = src.sev, dst.sev
        s.mirror_vms.append(dst)
        d.enc_context_owner = src
        d.active, d.asid, d.fd, d.es_active, d.handle = True, s.asid, s.fd, s.es_active, s.handle
        d.regions, d.mirror_vms = [], []
        dst.sev_need_init = False
    finally:
        _unlock_two(dst, src)
    return 0


def move_enc_context_from(dst, ioctl, fd_or_vm):
    """sev_vm_move_enc_context_from: the whole context moves, the source VM dies."""
    src = _source(dst, ioctl, fd_or_vm)
    _lock_two(dst, src, ioctl)
    try:
        if dst.type != src.type or sev_guest(dst) or not sev_guest(src) or src.sev.snp_active:
            raise KvmError(EINVAL, ioctl, "VM types differ, destination is SEV, source is not "
                                          "or is SNP")
        s, d = src.sev, dst.sev
        if s.es_active:
            if len(src.vcpus) != len(dst.vcpus):
                raise KvmError(EINVAL, ioctl, "SEV-ES needs the same number of vCPUs")
            if not all(v.guest_state_protected for v in src.vcpus):
                raise KvmError(EINVAL, ioctl, "a source vCPU's VMSA is not encrypted")
        # sev_migrate_from moves exactly these; the destination keeps its own fd, policy and
        # ghcb_version (commands through its sev->fd then fail as the kernel's do), and SNP
        # follows vmsa_features (sev_snp_guest reads SVM_SEV_FEAT_SNP_ACTIVE there).
        for k in ("asid", "handle", "pages_locked", "enc_context_owner", "es_active",
                  "vmsa_features", "regions"):
            setattr(d, k, getattr(s, k))
        d.active = True
        d.snp_active = bool(d.vmsa_features & U.SVM_SEV_FEAT_SNP_ACTIVE)
        d.mirror_vms, s.mirror_vms = s.mirror_vms, []
        for m in d.mirror_vms:
            dst._get()
            m.sev.enc_context_owner = dst
            src._put()
        owner = d.enc_context_owner
        if owner is not None:
            owner.sev.mirror_vms[owner.sev.mirror_vms.index(src)] = dst
        s.asid = s.handle = s.pages_locked = 0
        s.active = s.es_active = s.snp_active = False
        s.enc_context_owner = None
        s.regions = []
        if d.es_active:
            # The VMSA and the GHCB MSR move; the destination's FPU state is not made
            # confidential (sev_migrate_from sets only guest_state_protected).
            for dv, sv in zip(dst.vcpus, src.vcpus):
                dv.vmsa_spa, dv.guest_state_protected, dv.ghcb_gpa = sv.vmsa_spa, True, \
                    sv.ghcb_gpa
                sv.vmsa_spa, sv.guest_state_protected, sv.ghcb_gpa = None, False, \
                    U.INVALID_PAGE
        # sev_vm_move_enc_context_from leaves need_init alone: a destination of an INIT2 type
        # still refuses KVM_RUN (svm_vcpu_pre_run) after the move.
        src.dead = True
    finally:
        _unlock_two(dst, src)
    return 0


def vm_destroy(vm):
    """sev_vm_destroy."""
    sev = vm.sev
    if not sev.active:
        return
    owner = sev.enc_context_owner
    if owner is not None:
        owner.sev.mirror_vms.remove(vm)
        sev.active = False
        owner._put()
        return
    sev.regions.clear()
    if sev.snp_active:
        snp_guest_req_cleanup(vm)
        # Decommissioning unbinds the ASID; if it fails the kernel leaks the ASID.
        if snp_decommission_context(vm):
            sev.active = False
            return
        snp_free_vmsas(vm)
        vm.host.kvm_sev.asids.free(sev.asid)
        sev.active = False
        return
    psp, c_buf = vm.host.psp, KernelBuffers(vm.host)
    if sev.handle:
        try:
            psp.command(U.SEV_CMD_DEACTIVATE,
                        c_buf.put(L.sev_data_deactivate.pack(handle=sev.handle)))
            psp.command(U.SEV_CMD_DECOMMISSION,
                        c_buf.put(L.sev_data_decommission.pack(handle=sev.handle)))
        finally:
            c_buf.free()
    vm.host.kvm_sev.asids.free(sev.asid)
    sev.active = False
