"""Port of tools/testing/selftests/kvm/x86/sev_migrate_tests.c."""
import threading
from errno import EBADF, EINVAL, EIO

import pytest

import sevcore
from sevcore.vmm.kvm_util import (kvm_vm_free, sev_es_vm_init, sev_vm_init,
                                  sev_vm_launch, vm_mem_add)
from sevcore.uapi import *

from support import raises_errno

NR_VCPUS = 4
NR_VMS = 3


@pytest.fixture
def kvm():
    return sevcore.Kvm()


def sev_vm_create(kvm, es):
    vm = kvm.create_vm(KVM_X86_DEFAULT_VM)
    (sev_es_vm_init if es else sev_vm_init)(vm)
    vm_mem_add(vm, 0, 0, 4)
    for i in range(NR_VCPUS):
        vm.create_vcpu(i)
    sev_vm_launch(vm, SEV_POLICY_ES if es else 0)
    return vm


def aux_vm_create(kvm, with_vcpus):
    vm = kvm.create_vm(KVM_X86_DEFAULT_VM)
    if with_vcpus:
        for i in range(NR_VCPUS):
            vm.create_vcpu(i)
    return vm


def move(dst, src):
    return dst.enable_cap(KVM_CAP_VM_MOVE_ENC_CONTEXT_FROM, getattr(src, "fd", src))


def copy(dst, src):
    return dst.enable_cap(KVM_CAP_VM_COPY_ENC_CONTEXT_FROM, getattr(src, "fd", src))


@pytest.mark.parametrize("es", [False, True])
def test_sev_migrate_from(kvm, es):
    """A context moves along a chain of VMs; the dead source answers EIO."""
    src = sev_vm_create(kvm, es)
    dst = [aux_vm_create(kvm, True) for _ in range(NR_VMS)]
    move(dst[0], src)
    for i in range(1, NR_VMS):
        move(dst[i], dst[i - 1])
    with raises_errno(EIO):
        move(src, dst[-1])
    with raises_errno(EIO):
        src.memory_encrypt_op(KVM_SEV_GUEST_STATUS)
    with raises_errno(EIO):
        src.vcpus[0].run()
    g = kvm.host.psp.guest(dst[-1].sev.handle)
    assert g is not None and g.state == SEV_GUEST_STATE_LAUNCH_UPDATE
    for vm in [src] + dst:
        vm.close()


def test_sev_migrate_from_moves_only_the_kernels_fields(kvm):
    """sev_migrate_from moves the handle but not sev->fd, so GUEST_STATUS on the destination
    goes through the destination's own (unset) fd and fails with EBADF."""
    src = sev_vm_create(kvm, False)
    dst = aux_vm_create(kvm, True)
    move(dst, src)
    assert dst.sev_guest and dst.sev.handle and dst.sev.fd == 0
    with raises_errno(EBADF):
        dst.memory_encrypt_op(KVM_SEV_GUEST_STATUS)
    kvm_vm_free(dst)
    kvm_vm_free(src)


def test_sev_migrate_from_leaves_need_init(kvm):
    """A move into a fresh KVM_X86_SEV_VM leaves its need_init set, so KVM_RUN still fails
    with EINVAL (svm_vcpu_pre_run), as sev_vm_move_enc_context_from never clears it."""
    src = kvm.create_vm(KVM_X86_SEV_VM)
    sev_vm_init(src)
    vm_mem_add(src, 0, 0, 4)
    src.create_vcpu(0)
    sev_vm_launch(src, 0)
    dst = kvm.create_vm(KVM_X86_SEV_VM)
    vm_mem_add(dst, 0, 0, 4)
    vcpu = dst.create_vcpu(0)
    move(dst, src)
    with raises_errno(EINVAL):
        vcpu.run()
    kvm_vm_free(dst)
    kvm_vm_free(src)


def test_sev_migrate_locking(kvm):
    """Concurrent moves among three VMs terminate, whatever each returns."""
    vms = [sev_vm_create(kvm, False) for _ in range(NR_VMS)]

    def worker(i):
        for j in range(200):
            try:
                move(vms[i], vms[j % NR_VMS])
            except OSError as e:
                assert e.errno in (EINVAL, EIO, 16)
    threads = [threading.Thread(target=worker, args=(i,)) for i in range(NR_VMS)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for vm in vms:
        vm.close()


def test_sev_migrate_parameters(kvm):
    """MOVE refuses a non-SEV source, an SEV destination and an ES vCPU mismatch."""
    vm_no_vcpu = aux_vm_create(kvm, False)
    vm_no_sev = aux_vm_create(kvm, True)
    with raises_errno(EINVAL):
        move(vm_no_vcpu, vm_no_sev)
    sev_vm = sev_vm_create(kvm, False)
    sev_es_vm = sev_vm_create(kvm, True)
    sev_es_vm_no_vmsa = kvm.create_vm(KVM_X86_DEFAULT_VM)
    sev_es_vm_init(sev_es_vm_no_vmsa)
    sev_es_vm_no_vmsa.create_vcpu(1)
    for dst, src, err in [(sev_vm, sev_es_vm, EINVAL), (sev_es_vm, sev_vm, EINVAL),
                          (vm_no_vcpu, sev_es_vm, EINVAL), (vm_no_vcpu, sev_es_vm_no_vmsa, EINVAL),
                          (vm_no_vcpu, 12345, EBADF), (vm_no_vcpu, kvm.host.memfd_create(), EBADF)]:
        with raises_errno(err):
            move(dst, src)
    assert not vm_no_vcpu.sev_guest and sev_vm.sev_guest and not sev_vm.dead


def verify_mirror_allowed_cmds(vm):
    for cmd in range(KVM_SEV_NR_MAX):
        if cmd in (KVM_SEV_LAUNCH_UPDATE_VMSA, KVM_SEV_GUEST_STATUS, KVM_SEV_DBG_DECRYPT,
                   KVM_SEV_DBG_ENCRYPT):
            continue
        with raises_errno(EINVAL):
            vm.memory_encrypt_op(cmd, None)
    with raises_errno(EINVAL):
        vm.memory_encrypt_reg_region(0x7f0000000000, 4096)
    with raises_errno(EINVAL):
        vm.memory_encrypt_unreg_region(0x7f0000000000, 4096)


@pytest.mark.parametrize("es", [False, True])
def test_sev_mirror(kvm, es):
    """A mirror gets vCPUs, may issue only VMSA, STATUS and DBG, and reports the source."""
    src = sev_vm_create(kvm, es)
    dst = aux_vm_create(kvm, False)
    copy(dst, src)
    for i in range(NR_VCPUS):
        dst.create_vcpu(i)
    if es:
        dst.memory_encrypt_op(KVM_SEV_LAUNCH_UPDATE_VMSA)
        assert all(v.guest_state_protected for v in dst.vcpus)
    verify_mirror_allowed_cmds(dst)
    st = dst.memory_encrypt_op(KVM_SEV_GUEST_STATUS)
    assert st.handle == src.sev.handle and st.state == SEV_GUEST_STATE_LAUNCH_UPDATE


def test_sev_mirror_parameters(kvm):
    """COPY refuses the same VM, a non-SEV source, a destination with vCPUs or already SEV."""
    sev_vm = sev_vm_create(kvm, False)
    vm_with_vcpu = aux_vm_create(kvm, True)
    vm_no_vcpu = aux_vm_create(kvm, False)
    for dst, src in [(sev_vm, sev_vm), (vm_no_vcpu, vm_with_vcpu), (vm_with_vcpu, sev_vm)]:
        with raises_errno(EINVAL):
            copy(dst, src)
    sev_es_vm = sev_vm_create(kvm, True)
    for dst, src in [(sev_vm, sev_es_vm), (sev_es_vm, sev_vm)]:
        with raises_errno(EINVAL):
            copy(dst, src)
    mirror = aux_vm_create(kvm, False)
    copy(mirror, sev_vm)
    with raises_errno(EINVAL):
        copy(aux_vm_create(kvm, False), mirror)                  # a mirror of a mirror
    with raises_errno(EINVAL):
        mirror.enable_cap(KVM_CAP_VM_COPY_ENC_CONTEXT_FROM, sev_vm.fd, flags=1)


def _move_copy(kvm, order):
    sev_vm = sev_vm_create(kvm, False)
    dst, dst2, dst3 = (aux_vm_create(kvm, True) for _ in range(3))
    mirror, dst_mirror, dst2_mirror, dst3_mirror = (aux_vm_create(kvm, False) for _ in range(4))
    vms = dict(sev_vm=sev_vm, dst=dst, dst2=dst2, dst3=dst3, mirror=mirror,
               dst_mirror=dst_mirror, dst2_mirror=dst2_mirror, dst3_mirror=dst3_mirror)
    copy(mirror, sev_vm)
    move(dst_mirror, mirror)
    move(dst, sev_vm)
    move(dst2, dst)
    move(dst2_mirror, dst_mirror)
    move(dst3_mirror, dst2_mirror)
    move(dst3, dst2)
    assert dst3_mirror.sev.enc_context_owner is dst3
    assert dst3.sev.mirror_vms == [dst3_mirror]
    asids = kvm.host.kvm_sev.asids
    asid = dst3.sev.asid
    for name in order:
        kvm_vm_free(vms[name])
    assert asid in asids.reclaim and all(not vm.alive for vm in vms.values())


def test_sev_move_copy(kvm):
    """Mirrors follow their owner through moves; VMs free in any order."""
    _move_copy(kvm, ["dst", "sev_vm", "dst2", "dst3", "mirror", "dst_mirror", "dst2_mirror",
                     "dst3_mirror"])
    _move_copy(kvm, ["mirror", "dst_mirror", "dst2_mirror", "dst3_mirror", "dst", "sev_vm",
                     "dst2", "dst3"])


def test_source_lives_while_mirror_exists(kvm):
    """Closing the owner's fd leaves its context alive until the last mirror goes."""
    sev_vm = sev_vm_create(kvm, False)
    mirror = aux_vm_create(kvm, False)
    copy(mirror, sev_vm)
    asid = sev_vm.sev.asid
    kvm_vm_free(sev_vm)
    assert sev_vm.alive and kvm.host.umc.has_key(asid)
    mirror.memory_encrypt_op(KVM_SEV_GUEST_STATUS)
    kvm_vm_free(mirror)
    assert not sev_vm.alive and not kvm.host.umc.has_key(asid)
    assert asid in kvm.host.kvm_sev.asids.reclaim
