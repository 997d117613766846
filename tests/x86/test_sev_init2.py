"""Port of tools/testing/selftests/kvm/x86/sev_init2_tests.c, plus the legacy
INIT rules (sev_guest_init in arch/x86/kvm/svm/sev.c)."""
from errno import EBUSY, EFAULT, EINVAL, EIO, ENXIO

import pytest

import sevcore
from sevcore.kvm.sev import SEV_SUPPORTED_VMSA_FEATURES, SevError
from sevcore.vmm.kvm_util import kvm_device_attr_get
from sevcore.uapi import *

from support import raises_errno


@pytest.fixture
def kvm():
    return sevcore.Kvm()


def init2(kvm, type, **fields):
    vm = kvm.create_vm(type)
    return vm, vm.memory_encrypt_op(KVM_SEV_INIT2, **fields)


def init2_fails(kvm, type, err, **fields):
    """INIT2 on a new VM of ``type`` fails with ``err`` and leaves the VM without SEV."""
    vm = kvm.create_vm(type)
    with raises_errno(err):
        vm.memory_encrypt_op(KVM_SEV_INIT2, **fields)
    assert not vm.sev_guest


@pytest.mark.parametrize("type", [KVM_X86_SEV_VM, KVM_X86_SEV_ES_VM, KVM_X86_SNP_VM])
def test_init2_ok(kvm, type):
    """INIT2 with a zeroed struct succeeds and clears need_init; SNP defaults to GHCB 2."""
    vm, out = init2(kvm, type)
    assert out.error == SEV_RET_SUCCESS and vm.sev_guest and not vm.sev_need_init
    assert vm.sev.ghcb_version == (0 if type == KVM_X86_SEV_VM else 2)


@pytest.mark.parametrize("type", [KVM_X86_DEFAULT_VM, KVM_X86_SW_PROTECTED_VM])
def test_init2_needs_sev_type(kvm, type):
    """INIT2 on a VM type without need_init is EINVAL."""
    init2_fails(kvm, type, EINVAL)


@pytest.mark.parametrize("type", [KVM_X86_SEV_VM, KVM_X86_SEV_ES_VM, KVM_X86_SNP_VM])
def test_init2_flags(kvm, type):
    """Every flags bit is EINVAL."""
    for i in range(32):
        init2_fails(kvm, type, EINVAL, flags=1 << i)


def test_dev_attr_sev_vmsa_features(kvm):
    """KVM_HAS/GET_DEVICE_ATTR on /dev/kvm answer KVM_X86_GRP_SEV/KVM_X86_SEV_VMSA_FEATURES with
    the features INIT2 accepts and KVM_X86_GRP_SYSTEM/XCOMP_GUEST_SUPP with the supported XCR0,
    and fail with ENXIO for any other group or attribute (kvm_x86_dev_get_attr,
    sev_dev_get_attr), with EFAULT where the value cannot be written."""
    assert kvm.has_device_attr(KVM_X86_GRP_SEV, KVM_X86_SEV_VMSA_FEATURES) == 0
    supported = kvm_device_attr_get(kvm, KVM_X86_GRP_SEV, KVM_X86_SEV_VMSA_FEATURES)
    assert supported == SVM_SEV_FEAT_DEBUG_SWAP | SVM_SEV_FEAT_SECURE_TSC
    assert kvm_device_attr_get(kvm, KVM_X86_GRP_SYSTEM, KVM_X86_XCOMP_GUEST_SUPP) == \
        XFEATURE_MASK_FP | XFEATURE_MASK_SSE | XFEATURE_MASK_YMM
    for group, attr in ((KVM_X86_GRP_SEV, 1), (KVM_X86_GRP_SEV, 1 << 63), (2, 0),
                        (KVM_X86_GRP_SYSTEM, 1), ((1 << 32) - 1, 0)):
        with raises_errno(ENXIO, "KVM_HAS_DEVICE_ATTR"):
            kvm.has_device_attr(group, attr)
        with raises_errno(ENXIO, "KVM_GET_DEVICE_ATTR"):
            kvm.get_device_attr(group, attr, kvm.mmap(PAGE_SIZE))
    with raises_errno(EFAULT, "KVM_GET_DEVICE_ATTR"):
        kvm.get_device_attr(KVM_X86_GRP_SEV, KVM_X86_SEV_VMSA_FEATURES, 0x1000)
    for i in range(64):                # the selftest's check: unsupported bits are EINVAL
        if not 1 << i & supported:
            init2_fails(kvm, KVM_X86_SEV_ES_VM, EINVAL, vmsa_features=1 << i)


def test_init2_features(kvm):
    """A plain SEV VM supports no VMSA feature; SEV-ES supports exactly DebugSwap; SNP also
    Secure TSC, and always has SNPActive."""
    for i in range(64):
        init2_fails(kvm, KVM_X86_SEV_VM, EINVAL, vmsa_features=1 << i)
        if 1 << i == SVM_SEV_FEAT_DEBUG_SWAP:
            vm, _ = init2(kvm, KVM_X86_SEV_ES_VM, vmsa_features=1 << i)
            assert vm.sev.vmsa_features == SVM_SEV_FEAT_DEBUG_SWAP
        else:
            init2_fails(kvm, KVM_X86_SEV_ES_VM, EINVAL, vmsa_features=1 << i)
        if 1 << i & SEV_SUPPORTED_VMSA_FEATURES:
            vm, _ = init2(kvm, KVM_X86_SNP_VM, vmsa_features=1 << i)
            assert vm.sev.vmsa_features == 1 << i | SVM_SEV_FEAT_SNP_ACTIVE
        else:
            init2_fails(kvm, KVM_X86_SNP_VM, EINVAL, vmsa_features=1 << i)
    assert SEV_SUPPORTED_VMSA_FEATURES == SVM_SEV_FEAT_DEBUG_SWAP | SVM_SEV_FEAT_SECURE_TSC


def test_init2_checks(kvm):
    """vCPUs, a bad GHCB version, a second INIT2 and a NULL struct are refused."""
    vm = kvm.create_vm(KVM_X86_SEV_VM)
    vm.create_vcpu(0)
    with raises_errno(EINVAL):
        vm.memory_encrypt_op(KVM_SEV_INIT2)
    init2_fails(kvm, KVM_X86_SEV_VM, EINVAL, ghcb_version=1)
    init2_fails(kvm, KVM_X86_SEV_ES_VM, EINVAL, ghcb_version=3)
    init2_fails(kvm, KVM_X86_SNP_VM, EINVAL, ghcb_version=1)
    init2_fails(kvm, KVM_X86_SEV_VM, EFAULT, data=None)
    vm, _ = init2(kvm, KVM_X86_SEV_VM)
    with raises_errno(EINVAL):
        vm.memory_encrypt_op(KVM_SEV_INIT2)


def test_legacy_init_rules(kvm):
    """Legacy INIT/ES_INIT work only on DEFAULT VMs, ignore data, and run once."""
    vm = kvm.create_vm(KVM_X86_SEV_VM)
    for cmd in (KVM_SEV_INIT, KVM_SEV_ES_INIT):
        with raises_errno(EINVAL):
            vm.memory_encrypt_op(cmd, data=None)
    vm = kvm.create_vm(KVM_X86_DEFAULT_VM)
    vm.memory_encrypt_op(KVM_SEV_ES_INIT, data=None)
    assert vm.sev.es_active and vm.sev.ghcb_version == 1 and vm.type == KVM_X86_DEFAULT_VM
    lo, hi = 1, kvm.host.psp.min_sev_asid - 1
    assert lo <= vm.sev.asid <= hi
    with raises_errno(EINVAL):
        vm.memory_encrypt_op(KVM_SEV_INIT, data=None)
    assert vm.memory_encrypt_op(None) == 0          # NULL argp: the probe


def test_asid_recycling():
    """Freed ASIDs are reused only after a WBINVD + DF_FLUSH recycle when the range runs out."""
    host = sevcore.Host()
    host.psp = type(host.psp)(host, max_sev_asid=4, min_sev_asid=3)
    kvm = host.kvm
    vms = [kvm.create_vm(KVM_X86_SEV_VM) for _ in range(3)]
    for vm in vms[:2]:
        vm.memory_encrypt_op(KVM_SEV_INIT2)
        vm.memory_encrypt_op(KVM_SEV_LAUNCH_START, policy=0)
    assert [vm.sev.asid for vm in vms[:2]] == [3, 4]
    with raises_errno(EBUSY):
        vms[2].memory_encrypt_op(KVM_SEV_INIT2)
    vms[0].close()
    asids = host.kvm_sev.asids
    assert asids.reclaim == {3} and asids.flushes == 0
    vms[2].memory_encrypt_op(KVM_SEV_INIT2)
    vms[2].memory_encrypt_op(KVM_SEV_LAUNCH_START, policy=0)
    assert vms[2].sev.asid == 3 and asids.flushes == 1 and not asids.reclaim


def test_init2_platform_init_failure_reclaims_the_asid(monkeypatch):
    """If the platform INIT behind INIT2 fails, the ioctl is EIO with the firmware status in
    ``error``, the VM stays uninitialised, and its ASID goes to the reclaim set
    (sev_asid_free), reusable only after the next flush."""
    host = sevcore.Host()
    kvm = host.kvm
    psp = host.psp
    real = psp.command

    def failing_init(cmd, spa=0):
        return SEV_RET_HWSEV_RET_UNSAFE if cmd == SEV_CMD_INIT else real(cmd, spa)
    monkeypatch.setattr(psp, "command", failing_init)
    vm = kvm.create_vm(KVM_X86_SEV_VM)
    with pytest.raises(SevError) as e:
        vm.memory_encrypt_op(KVM_SEV_INIT2)
    assert e.value.errno == EIO and e.value.out.error == SEV_RET_HWSEV_RET_UNSAFE
    assert vm.sev_need_init and not vm.sev.active
    asids = host.kvm_sev.asids
    lo, _ = asids.range(False)
    assert asids.reclaim == {lo} and lo in asids.used
    monkeypatch.setattr(psp, "command", real)
    vm.memory_encrypt_op(KVM_SEV_INIT2)
    assert vm.sev.asid == lo + 1
