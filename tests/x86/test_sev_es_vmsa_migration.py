"""KVM_SEV_SEND_UPDATE_VMSA / KVM_SEV_RECEIVE_UPDATE_VMSA: not in upstream KVM (EINVAL), and
out of tree (host.kvm_sev.out_of_tree_vmsa_migration) as the CSV2 driver defines them
(csv_send_update_vmsa / csv_receive_update_vmsa) over the firmware's SEND_UPDATE_VMSA and
RECEIVE_UPDATE_VMSA (AMD SEV API, pub. 55766)."""
from errno import EINVAL, ENOTTY

import pytest

import sevcore
from sevcore.hw.hostmem import PAGE_SIZE
from sevcore.kvm.sev import SevError
from sevcore.uapi import *
from sevcore.vmm.kvm_util import sev_receive_start, sev_send_start, vm_mem_add, vm_sev_launch

from support import raises_errno


def guest_idle(g):
    while True:
        yield g.vmgexit()


class EsPair:
    """An SEV-ES guest launched (its VMSA measured) on one host and in SEND_UPDATE, and a
    target SEV-ES VM with one vCPU in RECEIVE_UPDATE on another; both hosts accept the
    out-of-tree commands unless ``enable`` is False."""

    def __init__(self, enable=True, vm_type=KVM_X86_SEV_ES_VM, policy=SEV_POLICY_ES):
        self.src, self.dst = sevcore.Host(seed=5).kvm, sevcore.Host(seed=6).kvm
        for kvm in (self.src, self.dst):
            kvm.host.kvm_sev.out_of_tree_vmsa_migration = enable
            kvm.hdr, kvm.trans = kvm.mmap(PAGE_SIZE), kvm.mmap(2 * PAGE_SIZE)
        self.vm = self.src.create_vm(vm_type)
        self.vm.memory_encrypt_op(KVM_SEV_INIT2)
        vm_mem_add(self.vm, 0, 0, 8)
        self.vcpu = self.vm.create_vcpu(0)
        self.vcpu.set_regs(rax=0x1234, rip=0x5000)
        self.vcpu.set_guest_code(guest_idle)
        vm_sev_launch(self.vm, policy)
        self.tvm = self.dst.create_vm(vm_type)
        self.tvm.memory_encrypt_op(KVM_SEV_INIT2)
        vm_mem_add(self.tvm, 0, 0, 8)
        self.tvcpu = self.tvm.create_vcpu(0)
        session = sev_send_start(self.vm, self.dst.host.psp.export_cert_chain())
        sev_receive_start(self.tvm, policy, self.src.host.psp.pdh_cert_export().pdh_cert,
                          session)

    def send(self, vcpu_id=0, **over):
        f = dict(vcpu_id=vcpu_id, hdr_uaddr=self.src.hdr, hdr_len=52, trans_uaddr=self.src.trans,
                 trans_len=PAGE_SIZE)
        f.update(over)
        self.vm.memory_encrypt_op(KVM_SEV_SEND_UPDATE_VMSA, **f)
        return self.src.read(self.src.hdr, 52), self.src.read(self.src.trans, PAGE_SIZE)

    def receive(self, hdr, trans, vcpu_id=0, **over):
        self.dst.write(self.dst.hdr, hdr)
        self.dst.write(self.dst.trans, trans)
        f = dict(vcpu_id=vcpu_id, hdr_uaddr=self.dst.hdr, hdr_len=52,
                 trans_uaddr=self.dst.trans, trans_len=PAGE_SIZE)
        f.update(over)
        return self.tvm.memory_encrypt_op(KVM_SEV_RECEIVE_UPDATE_VMSA, **f)

    def vmsa(self, kvm, vm, vcpu):
        return kvm.host.umc.read(vcpu.vmsa_spa, PAGE_SIZE, vm.sev.asid)


@pytest.mark.parametrize("cmd", [KVM_SEV_SEND_UPDATE_VMSA, KVM_SEV_RECEIVE_UPDATE_VMSA])
def test_upstream_kvm_has_no_vmsa_migration_ioctls(cmd):
    """Without the out-of-tree option both ids are unknown to sev_mem_enc_ioctl: EINVAL."""
    pair = EsPair(enable=False)
    with raises_errno(EINVAL, "KVM_MEMORY_ENCRYPT_OP"):
        pair.vm.memory_encrypt_op(cmd, vcpu_id=0)


def test_vmsa_moves_through_the_firmware():
    """SEND_UPDATE_VMSA seals vCPU 0's VMSA; RECEIVE_UPDATE_VMSA opens it into the target vCPU's
    VMSA under the target's key, which then holds the same state and is protected."""
    pair = EsPair()
    hdr, trans = pair.send()
    assert pair.src.read(pair.src.trans, 16) != pair.vmsa(pair.src, pair.vm, pair.vcpu)[:16]
    assert not pair.tvcpu.guest_state_protected
    pair.receive(hdr, trans)
    assert pair.tvcpu.guest_state_protected
    assert pair.vmsa(pair.dst, pair.tvm, pair.tvcpu) == pair.vmsa(pair.src, pair.vm, pair.vcpu)


def test_length_query():
    """A zero hdr_len or trans_len asks the firmware for the lengths: it answers INVALID_LEN
    with the 52-byte header (and a transport length of the guest_len asked for, 0), which KVM
    writes back before failing (EIO), as for SEND_UPDATE_DATA."""
    pair = EsPair()
    with pytest.raises(SevError) as e:
        pair.vm.memory_encrypt_op(KVM_SEV_SEND_UPDATE_VMSA, vcpu_id=0)
    assert e.value.fw_error == SEV_RET_INVALID_LEN
    assert (e.value.out.hdr_len, e.value.out.trans_len) == (52, 0)


def test_refusals_change_nothing():
    """ENOTTY for an SEV (not ES) guest, EINVAL for an unknown vCPU or a zero address, and a
    packet whose MAC fails is a firmware error: the target vCPU stays unprotected."""
    sev = EsPair(vm_type=KVM_X86_SEV_VM, policy=0)
    with raises_errno(ENOTTY, "KVM_MEMORY_ENCRYPT_OP"):
        sev.send()
    pair = EsPair()
    with raises_errno(EINVAL, "KVM_MEMORY_ENCRYPT_OP"):
        pair.send(vcpu_id=3)
    with raises_errno(EINVAL, "KVM_MEMORY_ENCRYPT_OP"):
        pair.send(trans_uaddr=0)
    hdr, trans = pair.send()
    with raises_errno(EINVAL, "KVM_MEMORY_ENCRYPT_OP"):
        pair.receive(hdr, trans, vcpu_id=3)
    with raises_errno(EINVAL, "KVM_MEMORY_ENCRYPT_OP"):
        pair.receive(hdr, trans, hdr_uaddr=0)
    bad = bytes([trans[0] ^ 1]) + trans[1:]
    with pytest.raises(SevError):
        pair.receive(hdr, bad)
    assert not pair.tvcpu.guest_state_protected
    pair.receive(hdr, trans)
    assert pair.tvcpu.guest_state_protected
