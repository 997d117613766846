"""KVM_MEMORY_ENCRYPT_OP's copies of user memory fault as the kernel's copy_from_user and
copy_to_user do: a user address whose page the VMM cannot touch (a private guest_memfd page, or
one past the end of the file, which SIGBUS a user access) is EFAULT from the ioctl, and the
command changes nothing."""
from errno import EFAULT, EIO, ENOMEM

import pytest

import sevcore
from sevcore.kvm.sev import SevError
from sevcore.uapi import *
from sevcore.vmm.kvm_util import (addr_gpa2hva, sev_vm_launch, vm_sev_create_with_one_vcpu,
                                  vm_sev_launch)

from support.errors import raises_errno

P = 4096


def sigbus_hvas(kvm):
    """Two VMM addresses that SIGBUS on access: a private page of a guest_memfd mapping, and a
    page of a shared guest_memfd mapping past the end of its file."""
    other = kvm.create_vm(KVM_X86_SW_PROTECTED_VM)
    private = other.create_guest_memfd(P, GUEST_MEMFD_FLAG_MMAP).mmap(P)
    shared_vm = kvm.create_vm(KVM_X86_DEFAULT_VM)
    gmem = shared_vm.create_guest_memfd(P, GUEST_MEMFD_FLAG_MMAP | GUEST_MEMFD_FLAG_INIT_SHARED)
    past_end = gmem.mmap(2 * P) + P
    return private, past_end


def launched(kvm, finish=True):
    vm, _ = vm_sev_create_with_one_vcpu(kvm, KVM_X86_SEV_VM)
    (vm_sev_launch if finish else sev_vm_launch)(vm, 0)
    return vm


def status(vm):
    return vm.memory_encrypt_op(KVM_SEV_GUEST_STATUS).state


@pytest.mark.parametrize("which", [0, 1], ids=["private", "past-end"])
def test_launch_start_blobs_from_a_sigbus_mapping_are_efault(which):
    """LAUNCH_START copies the owner's DH certificate and session in: EFAULT, and no context."""
    kvm = sevcore.Kvm()
    bad = sigbus_hvas(kvm)[which]
    vm, _ = vm_sev_create_with_one_vcpu(kvm, KVM_X86_SEV_VM)
    for fields in (dict(dh_uaddr=bad, dh_len=2084), dict(session_uaddr=bad, session_len=128)):
        with raises_errno(EFAULT, "KVM_MEMORY_ENCRYPT_OP"):
            vm.memory_encrypt_op(KVM_SEV_LAUNCH_START, policy=0, **fields)
        assert vm.sev.handle == 0
    vm.memory_encrypt_op(KVM_SEV_LAUNCH_START, policy=0)       # and the VM can still launch


@pytest.mark.parametrize("which", [0, 1], ids=["private", "past-end"])
def test_launch_measure_into_a_sigbus_mapping_is_efault(which):
    """LAUNCH_MEASURE's copy out faults: EFAULT. sev_launch_measure copies the measurement out
    after the firmware command, so the guest is in LAUNCH_SECRET, as the kernel leaves it."""
    kvm = sevcore.Kvm()
    bad = sigbus_hvas(kvm)[which]
    vm = launched(kvm, finish=False)
    with raises_errno(EFAULT, "KVM_MEMORY_ENCRYPT_OP"):
        vm.memory_encrypt_op(KVM_SEV_LAUNCH_MEASURE, uaddr=bad, len=256)
    assert status(vm) == SEV_GUEST_STATE_LAUNCH_SECRET


@pytest.mark.parametrize("which", [0, 1], ids=["private", "past-end"])
@pytest.mark.parametrize("cmd", [KVM_SEV_DBG_DECRYPT, KVM_SEV_DBG_ENCRYPT])
def test_dbg_with_a_sigbus_user_buffer_is_enomem(which, cmd):
    """DBG_DECRYPT's destination and DBG_ENCRYPT's source in a SIGBUS mapping: sev_dbg_crypt pins
    both pages first, and sev_pin_memory fails with ENOMEM; the guest's memory is unchanged."""
    kvm = sevcore.Kvm()
    bad = sigbus_hvas(kvm)[which]
    vm = launched(kvm)
    data = addr_gpa2hva(vm, 0x4000)
    before = kvm.read(data, 2 * P)
    args = dict(src_uaddr=data, dst_uaddr=bad + 16, len=16) if cmd == KVM_SEV_DBG_DECRYPT \
        else dict(src_uaddr=bad + 16, dst_uaddr=data + 16, len=16)
    with raises_errno(ENOMEM, "KVM_MEMORY_ENCRYPT_OP"):
        vm.memory_encrypt_op(cmd, **args)
    assert kvm.read(data, 2 * P) == before


@pytest.mark.parametrize("which", [0, 1], ids=["private", "past-end"])
def test_attestation_report_into_a_sigbus_mapping_is_efault(which):
    """GET_ATTESTATION_REPORT's copy out faults: EFAULT."""
    kvm = sevcore.Kvm()
    bad = sigbus_hvas(kvm)[which]
    vm = launched(kvm)
    with raises_errno(EFAULT, "KVM_MEMORY_ENCRYPT_OP"):
        vm.memory_encrypt_op(KVM_SEV_GET_ATTESTATION_REPORT, uaddr=bad, len=P)


@pytest.mark.parametrize("which", [0, 1], ids=["private", "past-end"])
def test_send_start_blobs_in_a_sigbus_mapping_are_efault(which):
    """SEND_START's certificates in, and its session out, through a SIGBUS mapping: EFAULT, with
    the guest RUNNING when a certificate faults and in SEND_UPDATE when the session does (it is
    copied out after the firmware command, as sev_send_start does)."""
    kvm = sevcore.Kvm()
    bad = sigbus_hvas(kvm)[which]
    vm = launched(kvm)
    target = sevcore.Kvm()
    target.host.psp.init()
    chain = target.host.psp.export_cert_chain()
    fields = {}
    for name, blob in (("pdh_cert", chain.pdh), ("plat_certs", chain.plat_certs),
                       ("amd_certs", chain.amd_certs)):
        hva = kvm.mmap(max(P, len(blob)))
        kvm.write(hva, blob)
        fields[name + "_uaddr"], fields[name + "_len"] = hva, len(blob)
    for name in ("pdh_cert", "plat_certs", "amd_certs", "session"):
        f = dict(fields, session_uaddr=kvm.mmap(P), session_len=128)
        f[name + "_uaddr"] = bad
        with raises_errno(EFAULT, "KVM_MEMORY_ENCRYPT_OP"):
            vm.memory_encrypt_op(KVM_SEV_SEND_START, **f)
        assert status(vm) == (SEV_GUEST_STATE_SEND_UPDATE if name == "session"
                              else SEV_GUEST_STATE_RUNNING)


# -- kernel buffers: allocated per call, as kzalloc does ---------------------------------------------

def _send_ready():
    """A guest in SEND_UPDATE and a good page to send, header and packet buffers."""
    kvm = sevcore.Kvm()
    vm = launched(kvm)
    target = sevcore.Kvm()
    target.host.psp.init()
    from sevcore.vmm.kvm_util import sev_send_start
    sev_send_start(vm, target.host.psp.export_cert_chain())
    return kvm, vm, addr_gpa2hva(vm, 0x4000), kvm.mmap(64 << 20), kvm.mmap(64 << 20)


@pytest.mark.parametrize("field", ["hdr_len", "trans_len"])
def test_send_update_data_with_a_huge_length_is_enomem(field):
    """A header or packet length beyond what kzalloc can give (KMALLOC_MAX_SIZE) is ENOMEM after
    the page is pinned (sev_send_update_data), and nothing stays pinned."""
    kvm, vm, page, hdr, trans = _send_ready()
    locked = vm.sev.pages_locked
    f = dict(hdr_uaddr=hdr, hdr_len=52, guest_uaddr=page, guest_len=P, trans_uaddr=trans,
             trans_len=P)
    f[field] = 1 << 30
    with raises_errno(ENOMEM, "KVM_MEMORY_ENCRYPT_OP"):
        vm.memory_encrypt_op(KVM_SEV_SEND_UPDATE_DATA, **f)
    assert vm.sev.pages_locked == locked
    assert status(vm) == SEV_GUEST_STATE_SEND_UPDATE
    vm.memory_encrypt_op(KVM_SEV_SEND_UPDATE_DATA, **dict(f, **{field: 52 if field == "hdr_len"
                                                               else P}))


def test_send_update_data_with_a_large_length_reaches_the_firmware():
    """A large but allocatable header length goes to the firmware, which judges it (EIO with its
    status), and later commands still find kernel buffers."""
    kvm, vm, page, hdr, trans = _send_ready()
    f = dict(hdr_uaddr=hdr, hdr_len=52, guest_uaddr=page, guest_len=P, trans_uaddr=trans,
             trans_len=P)
    for _ in range(3):
        try:
            vm.memory_encrypt_op(KVM_SEV_SEND_UPDATE_DATA, **dict(f, hdr_len=4 << 20))
        except SevError as e:
            assert e.errno == EIO and e.fw_error
    vm.memory_encrypt_op(KVM_SEV_SEND_UPDATE_DATA, **f)


def test_launch_update_data_over_thousands_of_discontiguous_runs():
    """LAUNCH_UPDATE_DATA over a region whose frames form 5,000 runs issues 5,000 firmware
    commands through one reused request (sev_launch_update_data) and succeeds."""
    kvm = sevcore.Kvm()
    vm, _ = vm_sev_create_with_one_vcpu(kvm, KVM_X86_SEV_VM)
    vm.memory_encrypt_op(KVM_SEV_LAUNCH_START, policy=0)
    n = 5000
    a, b = kvm.mmap(n * P), kvm.mmap(n * P)
    for i in range(n):                 # interleaved first touches: a's frames are every other
        kvm.write(a + i * P, bytes([i & 0xff]))
        kvm.write(b + i * P, b"x")
    vm.memory_encrypt_op(KVM_SEV_LAUNCH_UPDATE_DATA, uaddr=a, len=n * P)
    assert kvm.read(a, 1) != b"\0" or kvm.read(a + P, 1) != b"\1"     # encrypted in place
