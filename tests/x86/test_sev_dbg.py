"""Port of tools/testing/selftests/kvm/x86/sev_dbg_test.c."""
import random
from errno import EINVAL, EIO

import pytest

import sevcore
from sevcore.vmm.kvm_util import (addr_gpa2hva, sev_decrypt_memory, sev_encrypt_memory,
                              vm_sev_create_with_one_vcpu, vm_sev_launch)
from sevcore.kvm.sev import SevError
from sevcore.uapi import *

from support import raises_errno

P = 4096
SIZES = [P, 1, P - 1, P + 1, 2 * P - 1] + [v for x in (8, 15, 16, 17, 32, 33)
                                           for v in (x, P - x, P + x, 2 * P - x)]


def setup(type, policy):
    kvm = sevcore.Kvm()
    vm, _ = vm_sev_create_with_one_vcpu(kvm, type)
    data = addr_gpa2hva(vm, 0x4000)
    kvm.fill(data, 0xaa, 2 * P)
    vm_sev_launch(vm, policy)
    return kvm, vm, data


@pytest.mark.parametrize("type,policy", [(KVM_X86_SEV_VM, 0), (KVM_X86_SEV_ES_VM, SEV_POLICY_ES)])
def test_sev_dbg(type, policy):
    """DBG round trips at every size and offset, unaligned and page-crossing, byte exact."""
    kvm, vm, data = setup(type, policy)
    src, dst = kvm.mmap(2 * P), kvm.mmap(2 * P)
    assert kvm.read(data, 2 * P) != b"\xaa" * 2 * P          # encrypted in place
    sev_decrypt_memory(vm, dst, data, 2 * P)
    assert kvm.read(dst, 2 * P) == b"\xaa" * 2 * P
    kvm.fill(src, 0x55, 2 * P)
    sev_encrypt_memory(vm, data, src, 2 * P)
    sev_decrypt_memory(vm, dst, data, 2 * P)
    assert kvm.read(dst, 2 * P) == b"\x55" * 2 * P
    rnd = random.Random(7)
    xs = (1, 8, 15, 16, 23)
    p = P - 24
    offsets = [(0, 0)] + [(i, j) for a in xs for b in xs
                          for i, j in ((a, b), (a, p + b), (p + a, b), (p + a, p + b))]
    for nr in SIZES:
        for i, j in offsets[::3]:
            if i + nr > 2 * P or j + nr > 2 * P:
                continue
            pat = rnd.randrange(256)
            kvm.fill(src + i, pat, nr)
            sev_encrypt_memory(vm, data + j, src + i, nr)
            sev_decrypt_memory(vm, dst + i, data + j, nr)
            assert kvm.read(dst + i, nr) == bytes([pat]) * nr, (nr, i, j)
            assert kvm.read(src, 2 * P) == kvm.read(dst, 2 * P), (nr, i, j)


def test_sev_dbg_nodbg_refused():
    """With NODBG the firmware refuses: EIO, POLICY_FAILURE, and the buffer is untouched."""
    kvm, vm, data = setup(KVM_X86_SEV_VM, SEV_POLICY_NO_DBG)
    dst = kvm.mmap(P)
    with pytest.raises(SevError) as e:
        sev_decrypt_memory(vm, dst, data, 16)
    assert e.value.errno == EIO and e.value.fw_error == SEV_RET_POLICY_FAILURE
    assert e.value.out.error == SEV_RET_POLICY_FAILURE
    assert "SEV_RET_POLICY_FAILURE" in str(e.value)
    assert kvm.read(dst, P) == bytes(P)


@pytest.mark.parametrize("fields", [
    dict(len=0), dict(src_uaddr=(1 << 64) - 8, len=16), dict(src_uaddr=(1 << 64) - 16, len=16),
    dict(dst_uaddr=0, len=16)])
def test_sev_dbg_bad_arguments(fields):
    """Zero length, a wrapping source (one ending exactly at 2^64 included) and a NULL
    destination are EINVAL; memory is unchanged."""
    kvm, vm, data = setup(KVM_X86_SEV_VM, 0)
    before, locked = kvm.read(data, 2 * P), vm.sev.pages_locked
    args = dict(src_uaddr=data, dst_uaddr=kvm.mmap(P), len=16)
    args.update(fields)
    for cmd in (KVM_SEV_DBG_DECRYPT, KVM_SEV_DBG_ENCRYPT):
        with raises_errno(EINVAL):
            vm.memory_encrypt_op(cmd, **args)
    assert kvm.read(data, 2 * P) == before and vm.sev.pages_locked == locked
