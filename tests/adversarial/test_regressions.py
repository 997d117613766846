"""Bugs the adversarial suite found, each as a plain test that failed before its fix (and the
one known bug fixed elsewhere, as an expected failure)."""
import tracemalloc
from errno import ENOMEM

import pytest

import sevcore
from sevcore.uapi import *
from sevcore.vmm.kvm_util import sev_vm_launch, vm_sev_create_with_one_vcpu, vm_sev_launch

from advutil import P, attempt, npt_violations, run_guest


def test_punch_hole_in_an_mmap_guest_memfd_zaps_shared_entries():
    """Punching a hole in a GUEST_MEMFD_FLAG_MMAP guest_memfd zaps the shared NPT entries it
    served (kvm_gmem_punch_hole -> kvm_gmem_invalidate_begin zaps every entry of the range on
    a non-TDX VM), so no entry is left to the freed frame."""
    kvm = sevcore.Kvm()
    vm = kvm.create_vm(KVM_X86_SW_PROTECTED_VM)
    gmem = vm.create_guest_memfd(4 * P, GUEST_MEMFD_FLAG_MMAP)
    vm.set_user_memory_region2(0, KVM_MEM_GUEST_MEMFD, 0, 4 * P, kvm.mmap(4 * P), 0, gmem)
    vcpu = vm.create_vcpu(0)
    out, _ = run_guest(vcpu, lambda g: g.write(0, b"shared"))
    assert out.ok and len(vm.npt) == 1
    gmem.fallocate(FALLOC_FL_KEEP_SIZE | FALLOC_FL_PUNCH_HOLE, 0, 4 * P)
    assert npt_violations(vm) == []


def launched_sev_vm():
    """A default-size host (1 TiB of frames) and an SEV guest in LAUNCH_UPDATE with 16 pages."""
    kvm = sevcore.Kvm()
    vm, _ = vm_sev_create_with_one_vcpu(kvm, KVM_X86_SEV_VM)
    sev_vm_launch(vm, 0)
    return vm, vm.memslots[(0, 0)].userspace_addr


@pytest.mark.parametrize("call", ["reg_region", "launch_update_data", "launch_secret"])
def test_pinning_a_huge_range_past_the_mappings_is_enomem_in_bounded_memory(call):
    """sev_pin_memory of gigabytes starting in a 16-page mapping is ENOMEM
    (pin_user_pages_fast stops at the first unmapped page), without per-page work or arrays
    for the whole range."""
    vm, hva = launched_sev_vm()
    size = (1 << 32) - P                                  # the largest __u32 length
    calls = {
        "reg_region": lambda: vm.memory_encrypt_reg_region(hva, 1 << 33),
        "launch_update_data": lambda: vm.memory_encrypt_op(KVM_SEV_LAUNCH_UPDATE_DATA,
                                                           uaddr=hva, len=size),
        "launch_secret": lambda: vm.memory_encrypt_op(
            KVM_SEV_LAUNCH_SECRET, hdr_uaddr=hva, hdr_len=52, guest_uaddr=hva, guest_len=size,
            trans_uaddr=hva, trans_len=16),
    }
    tracemalloc.start()
    try:
        out = attempt(calls[call])
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert out.errno == ENOMEM, out
    assert vm.sev.pages_locked == 16 * len(vm.sev.regions)
    assert peak < 4 << 20, f"{peak} bytes traced for a 16-page mapping"


@pytest.mark.parametrize("cmd, fields, exc", [
    (KVM_SEV_DBG_DECRYPT, dict(len=float(P)), TypeError),
    (KVM_SEV_DBG_DECRYPT, dict(len=True), TypeError),
    (KVM_SEV_DBG_ENCRYPT, dict(len=(1 << 32) + 16), ValueError),
    (KVM_SEV_DBG_ENCRYPT, dict(len=-16), ValueError),
])
def test_sev_struct_fields_are_checked_before_the_command_runs(cmd, fields, exc):
    """A kvm_sev_* field that is no int, or does not fit its __u32/__u64, is TypeError or
    ValueError before the command runs: the guest's memory and the VMM's are unchanged."""
    kvm = sevcore.Kvm()
    vm, _ = vm_sev_create_with_one_vcpu(kvm, KVM_X86_SEV_VM)
    vm_sev_launch(vm, 0)
    ram = vm.memslots[(0, 0)].userspace_addr
    buf = kvm.mmap(2 * P)
    kvm.write(buf, b"\x77" * 2 * P)
    before = kvm.read(ram, 16 * P), kvm.read(buf, 2 * P), vm.sev.pages_locked
    src, dst = (ram, buf) if cmd == KVM_SEV_DBG_DECRYPT else (buf, ram)
    with pytest.raises(exc):
        vm.memory_encrypt_op(cmd, src_uaddr=src, dst_uaddr=dst, **fields)
    assert (kvm.read(ram, 16 * P), kvm.read(buf, 2 * P), vm.sev.pages_locked) == before
