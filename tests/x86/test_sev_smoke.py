"""Port of tools/testing/selftests/kvm/x86/sev_smoke_test.c (spec/selftest-cases.md F, the
parts the guest model runs), with the encryption, launch-protocol and send-state checks."""
from errno import EFAULT, EINVAL, EIO, ENOMEM, ENOTTY

import pytest

import sevcore
from sevcore.kvm_util import (addr_gpa2hva, sev_vm_launch, vm_mem_add,
                              vm_sev_create_with_one_vcpu, vm_sev_launch)
from sevcore.sev import SevError
from sevcore.uapi import *

GPA = 0x3000
SECRET = b"launch-plaintext"


def guest_sev_code(g, c_bit):
    """Read the launched page and write a new secret, both through the C-bit."""
    data = yield g.read(GPA | 1 << c_bit, 16)
    yield g.sync(data)
    yield g.write(GPA | 1 << c_bit, b"written-by-guest")
    yield g.done()


def launched(type=KVM_X86_SEV_VM, policy=0):
    kvm = sevcore.Kvm()
    vm, vcpu = vm_sev_create_with_one_vcpu(kvm, type, guest_sev_code, kvm.host.c_bit)
    hva = addr_gpa2hva(vm, GPA)
    kvm.write(hva, SECRET)
    vm_sev_launch(vm, policy)
    return kvm, vm, vcpu, hva


@pytest.mark.parametrize("policy", [SEV_POLICY_NO_DBG, 0])
def test_sev(policy):
    """The guest sees plaintext through its key while the VMM's view is ciphertext."""
    kvm, vm, vcpu, hva = launched(policy=policy)
    assert kvm.read(hva, 16) != SECRET
    vcpu.run()
    assert vcpu.get_ucall() == ("sync", (SECRET,))
    vcpu.run()
    assert vcpu.get_ucall()[0] == "done"
    assert kvm.read(hva, 16) != b"written-by-guest"
    assert kvm.host.umc.read((kvm.hva_to_pfn(hva, False) << 12) + (hva & 0xfff), 16,
                             vm.sev.asid) == b"written-by-guest"


def test_ciphertext_moved_decrypts_to_garbage():
    """Ciphertext copied to another SPA, or into another SEV VM, decrypts to garbage."""
    kvm, vm, vcpu, hva = launched()
    ct = kvm.read(hva, 4096)
    other = addr_gpa2hva(vm, GPA + 0x1000)
    kvm.write(other, ct)

    def reader(g, c_bit):
        a = yield g.read(GPA + 0x1000 | 1 << c_bit, 16)
        yield g.sync(a)
    vcpu.set_guest_code(reader, kvm.host.c_bit)
    vcpu.run()
    assert vcpu.get_ucall()[1][0] != SECRET
    vm2, vcpu2 = vm_sev_create_with_one_vcpu(kvm, KVM_X86_SEV_VM, guest_sev_code,
                                             kvm.host.c_bit)
    vm_sev_launch(vm2, 0)
    kvm.write(addr_gpa2hva(vm2, GPA), ct)
    vcpu2.run()
    assert vcpu2.get_ucall()[1][0] != SECRET


def test_mirror_vcpu_sees_plaintext():
    """A mirror's vCPU over the same memory reads the owner's private data in plaintext."""
    kvm, vm, vcpu, hva = launched()
    mirror = kvm.create_vm(KVM_X86_DEFAULT_VM)
    mirror.enable_cap(KVM_CAP_VM_COPY_ENC_CONTEXT_FROM, vm.fd)
    slot = vm.memslots[(0, 0)]
    mirror.set_user_memory_region2(0, 0, 0, slot.npages << 12, slot.userspace_addr)
    v = mirror.create_vcpu(0)
    v.set_guest_code(guest_sev_code, kvm.host.c_bit)
    v.run()
    assert v.get_ucall() == ("sync", (SECRET,))


def test_launch_states_and_measure_query():
    """LAUNCH_MEASURE with len 0 reports 48 through EIO/INVALID_LEN and changes no state."""
    kvm = sevcore.Kvm()
    vm, _ = vm_sev_create_with_one_vcpu(kvm, KVM_X86_SEV_VM)
    sev_vm_launch(vm, 0)
    with pytest.raises(SevError) as e:
        vm.memory_encrypt_op(KVM_SEV_LAUNCH_MEASURE, len=0)
    assert e.value.fw_error == SEV_RET_INVALID_LEN and e.value.out.len == 48
    assert vm.memory_encrypt_op(KVM_SEV_GUEST_STATUS).state == SEV_GUEST_STATE_LAUNCH_UPDATE
    with pytest.raises(OSError) as e:
        vm.memory_encrypt_op(KVM_SEV_LAUNCH_MEASURE, uaddr=kvm.mmap(4096), len=0x4001)
    assert e.value.errno == EINVAL
    buf = kvm.mmap(4096)
    out = vm.memory_encrypt_op(KVM_SEV_LAUNCH_MEASURE, uaddr=buf, len=48)
    assert out.len == 48 and kvm.read(buf, 48) != bytes(48)
    vm.memory_encrypt_op(KVM_SEV_LAUNCH_FINISH)
    with pytest.raises(SevError) as e:
        vm.memory_encrypt_op(KVM_SEV_GET_ATTESTATION_REPORT, len=0)
    assert e.value.out.len == 0xD0
    out = vm.memory_encrypt_op(KVM_SEV_GET_ATTESTATION_REPORT, mnonce=b"n" * 16, uaddr=buf,
                               len=0xD0)
    assert kvm.read(buf, 16) == b"n" * 16


def _send_start(kvm, vm):
    chain = kvm.host.psp.export_cert_chain()
    a = {}
    for name, blob in (("pdh_cert", chain.pdh), ("plat_certs", chain.plat_certs),
                       ("amd_certs", chain.amd_certs)):
        a[name + "_uaddr"] = hva = kvm.mmap(len(blob))
        kvm.write(hva, blob)
        a[name + "_len"] = len(blob)
    with pytest.raises(SevError) as e:
        vm.memory_encrypt_op(KVM_SEV_SEND_START, **a)
    assert e.value.out.session_len == 128
    return vm.memory_encrypt_op(KVM_SEV_SEND_START, session_uaddr=kvm.mmap(4096),
                                session_len=128, **a)


def test_send_finish_is_final_send_cancel_is_not():
    """After SEND_CANCEL the guest runs; after SEND_FINISH no entry, no re-ACTIVATE ever."""
    kvm, vm, vcpu, hva = launched()
    _send_start(kvm, vm)
    assert vm.memory_encrypt_op(KVM_SEV_GUEST_STATUS).state == SEV_GUEST_STATE_SEND_UPDATE
    hdr, trans = kvm.mmap(4096), kvm.mmap(4096)
    out = vm.memory_encrypt_op(KVM_SEV_SEND_UPDATE_DATA, hdr_uaddr=hdr, hdr_len=52,
                               guest_uaddr=hva, guest_len=4096, trans_uaddr=trans,
                               trans_len=4096)
    assert kvm.read(trans, 16) not in (SECRET, kvm.read(hva, 16))
    vm.memory_encrypt_op(KVM_SEV_SEND_CANCEL)
    assert vm.memory_encrypt_op(KVM_SEV_GUEST_STATUS).state == SEV_GUEST_STATE_RUNNING
    vcpu.run()
    assert vcpu.get_ucall() == ("sync", (SECRET,))
    _send_start(kvm, vm)
    vm.memory_encrypt_op(KVM_SEV_SEND_FINISH)
    assert vm.memory_encrypt_op(KVM_SEV_GUEST_STATUS).state == SEV_GUEST_STATE_SENT
    run = vcpu.run()
    assert run.exit_reason == KVM_EXIT_FAIL_ENTRY
    from sevcore.psp import PspError
    kvm.host.psp.deactivate(vm.sev.handle)
    with pytest.raises(PspError) as e:
        kvm.host.psp.activate(vm.sev.handle, vm.sev.asid)
    assert e.value.status in (SEV_RET_INVALID_GUEST_STATE, SEV_RET_DFFLUSH_REQUIRED)
    assert vcpu.run().exit_reason == KVM_EXIT_FAIL_ENTRY
    assert out.hdr_len == 52


def test_not_sev_and_fd_errors():
    """Commands before INIT are ENOTTY (RECEIVE_UPDATE_DATA: EINVAL); before LAUNCH_START
    the saved fd is not /dev/sev (EBADF); a NULL struct is EFAULT."""
    kvm = sevcore.Kvm()
    vm = kvm.create_vm(KVM_X86_SEV_VM)
    for cmd in (KVM_SEV_LAUNCH_START, KVM_SEV_LAUNCH_FINISH, KVM_SEV_GUEST_STATUS,
                KVM_SEV_DBG_DECRYPT, KVM_SEV_SEND_START, KVM_SEV_LAUNCH_UPDATE_VMSA):
        with pytest.raises(OSError) as e:
            vm.memory_encrypt_op(cmd)
        assert e.value.errno == ENOTTY, cmd
    with pytest.raises(OSError) as e:
        vm.memory_encrypt_op(KVM_SEV_RECEIVE_UPDATE_DATA)
    assert e.value.errno == EINVAL
    for cmd in (KVM_SEV_SEND_UPDATE_VMSA, KVM_SEV_RECEIVE_UPDATE_VMSA, KVM_SEV_CERT_EXPORT, 23):
        with pytest.raises(OSError) as e:
            vm.memory_encrypt_op(cmd)
        assert e.value.errno == EINVAL
    vm.memory_encrypt_op(KVM_SEV_INIT2)
    with pytest.raises(OSError) as e:
        vm.memory_encrypt_op(KVM_SEV_LAUNCH_FINISH)
    assert e.value.errno == 9                       # EBADF
    with pytest.raises(OSError) as e:
        vm.memory_encrypt_op(KVM_SEV_LAUNCH_START, data=None)
    assert e.value.errno == EFAULT
    with pytest.raises(OSError) as e:
        vm.memory_encrypt_op(KVM_SEV_LAUNCH_START, sev_fd=kvm.host.memfd_create().fd)
    assert e.value.errno == 9 and vm.sev.handle == 0
    with pytest.raises(OSError) as e:
        vm.memory_encrypt_op(KVM_SEV_LAUNCH_START, dh_uaddr=kvm.mmap(4096), dh_len=0x4001)
    assert e.value.errno == EINVAL and vm.sev.handle == 0
    assert vm.create_vcpu(0).run().exit_reason == KVM_EXIT_FAIL_ENTRY   # no key bound yet


def test_regions():
    """REG/UNREG_REGION pin and unpin exactly, refuse bad ranges, and honour RLIMIT_MEMLOCK."""
    kvm = sevcore.Kvm()
    vm = kvm.create_vm(KVM_X86_SEV_VM)
    hva = kvm.mmap(16 * 4096)
    with pytest.raises(OSError) as e:
        vm.memory_encrypt_reg_region(hva, 4096)
    assert e.value.errno == ENOTTY
    vm.memory_encrypt_op(KVM_SEV_INIT2)
    vm.memory_encrypt_reg_region(hva + 1, 4096)       # two pages
    vm.memory_encrypt_reg_region(hva + 1, 4096)       # duplicates pin again
    assert vm.sev.pages_locked == 4
    kvm.rlimit_memlock, kvm.cap_ipc_lock = 8 * 4096, False
    table = [((hva, 0), EINVAL), ((hva, 1 << 64), EINVAL), (((1 << 64) - 4096, 8192), EINVAL),
             (((1 << 64) - 4096, 4096), EINVAL),         # ends at 2^64: uaddr + ulen wraps
             ((hva, 5 * 4096), ENOMEM), ((0x1000, 4096), ENOMEM)]
    for (addr, size), err in table:
        with pytest.raises(OSError) as e:
            vm.memory_encrypt_reg_region(addr, size)
        assert e.value.errno == err, (addr, size)
    assert vm.sev.pages_locked == 4 and len(vm.sev.regions) == 2
    with pytest.raises(OSError) as e:
        vm.memory_encrypt_unreg_region(hva, 4096)
    assert e.value.errno == EINVAL
    vm.memory_encrypt_unreg_region(hva + 1, 4096)
    vm.memory_encrypt_unreg_region(hva + 1, 4096)
    assert vm.sev.pages_locked == 0 and not vm.sev.regions


def test_launch_update_vmsa_once():
    """LAUNCH_UPDATE_VMSA protects every vCPU once; a second call and a non-ES VM are refused."""
    kvm = sevcore.Kvm()
    vm = kvm.create_vm(KVM_X86_SEV_ES_VM)
    vm.memory_encrypt_op(KVM_SEV_INIT2)
    vm_mem_add(vm, 0, 0, 1)
    vcpus = [vm.create_vcpu(i) for i in range(2)]
    vm.memory_encrypt_op(KVM_SEV_LAUNCH_START, policy=SEV_POLICY_ES)
    vm.memory_encrypt_op(KVM_SEV_LAUNCH_UPDATE_VMSA)
    assert all(v.guest_state_protected for v in vcpus)
    vmsa = kvm.host.mem.frames[vcpus[0].vmsa_spa:vcpus[0].vmsa_spa + 4096].tobytes()
    assert vmsa[0x160:0x168] != (0x400).to_bytes(8, "little")     # encrypted
    with pytest.raises(OSError) as e:
        vm.memory_encrypt_op(KVM_SEV_LAUNCH_UPDATE_VMSA)
    assert e.value.errno == EINVAL
    sev = kvm.create_vm(KVM_X86_SEV_VM)
    sev.memory_encrypt_op(KVM_SEV_INIT2)
    with pytest.raises(OSError) as e:
        sev.memory_encrypt_op(KVM_SEV_LAUNCH_UPDATE_VMSA)
    assert e.value.errno == ENOTTY
