"""KVM_SEV_SNP_LAUNCH_UPDATE of whole guest RAM against the work it has to do, same run.

LAUNCH_UPDATE of NORMAL pages copies each source page into its guest_memfd frame, assigns the
frame in the RMP, and the firmware measures it (SHA-384 of the page, then SHA-384 of the
PAGE_INFO chaining the digest) and encrypts it in place with the guest's key. The peer does the
irreducible part with nothing around it: hashlib SHA-384 of every page, a memcpy of the pages
(numpy) and the memory engine's encryption of them in place (``umc.encrypt_in_place``).
Target: within 1.3x of the peer. Sizes: 16 MiB and 256 MiB (the target's size).

A report request end to end (the guest's crypto, KVM's bounce pages, the firmware's report and
signature) has an absolute target: under 2 ms each.
"""
import hashlib

import numpy as np
import pytest

import sevcore
from benchutil import per_item
from sevcore.uapi import (GHCB_MSR_TERM_REQ, KVM_EXIT_SYSTEM_EVENT, KVM_MEM_GUEST_MEMFD,
                          KVM_SEV_INIT2, KVM_SEV_SNP_LAUNCH_FINISH, KVM_SEV_SNP_LAUNCH_START,
                          KVM_SEV_SNP_LAUNCH_UPDATE, KVM_SEV_SNP_PAGE_TYPE_NORMAL,
                          KVM_SEV_SNP_PAGE_TYPE_SECRETS, KVM_X86_SNP_VM, MSR_AMD64_SEV_ES_GHCB,
                          SNP_POLICY_MASK_RSVD_MBO, SNP_POLICY_MASK_SMT)
from sevcore.vmm.kvm_util import (snp_guest_msg_init, snp_launch_update_data, vm_mem_add,
                                  vm_mem_set_private, vm_vcpu_add)

PAGE = 4096
SIZES = [4096, 65536]            # pages: 16 MiB, 256 MiB
POLICY = SNP_POLICY_MASK_RSVD_MBO | SNP_POLICY_MASK_SMT


class Launch:
    """An SNP VM of ``npages`` after LAUNCH_START, its source image written at the slot's HVA."""

    def __init__(self, npages, data):
        self.kvm = sevcore.Kvm()
        self.vm = self.kvm.create_vm(KVM_X86_SNP_VM)
        self.vm.memory_encrypt_op(KVM_SEV_INIT2)
        self.hva = vm_mem_add(self.vm, 0, 0, npages, KVM_MEM_GUEST_MEMFD)
        vm_mem_set_private(self.vm, 0, npages * PAGE)
        self.kvm.write(self.hva, data)
        self.vm.memory_encrypt_op(KVM_SEV_SNP_LAUNCH_START, policy=POLICY)
        self.npages = npages

    def update(self):
        return self.vm.memory_encrypt_op(KVM_SEV_SNP_LAUNCH_UPDATE, gfn_start=0, uaddr=self.hva,
                                         len=self.npages * PAGE,
                                         type=KVM_SEV_SNP_PAGE_TYPE_NORMAL)


@pytest.fixture(scope="module", params=SIZES, ids=lambda n: f"{n * PAGE >> 20}MiB")
def image(request):
    n = request.param
    return n, np.random.default_rng(3).bytes(n * PAGE)


def test_launch_update(benchmark, image):
    """KVM_SEV_SNP_LAUNCH_UPDATE of every page of a fresh VM in one ioctl."""
    n, data = image
    launches = []

    def setup():
        launches.append(Launch(n, data))
        return (launches[-1],), {}
    per_item(benchmark, n, "pages")
    out = benchmark.pedantic(Launch.update, setup=setup, rounds=3)
    assert out.len == 0 and out.gfn_start == n
    last = launches[-1]
    f = last.vm.gfn_to_memslot(0).gmem_file
    assert len(f.prepared) == n and last.vm.host.rmp.entry(f.page_cache.lookup(0)).validated


def test_peer_sha384_memcpy_engine(benchmark, image):
    """Peer: SHA-384 of each page (hashlib), a memcpy of the pages, the engine's encryption of
    them in place."""
    n, data = image
    host = sevcore.Host(seed=4)
    host.umc.install_key(1, bytes(range(host.umc.key_len)))
    spa = host.mem.alloc_contiguous(n)
    src = np.frombuffer(data, np.uint8)
    frames = host.mem.frames

    def raw():
        view = memoryview(data)
        for i in range(n):
            hashlib.sha384(view[i * PAGE:(i + 1) * PAGE]).digest()
        np.copyto(frames[spa:spa + n * PAGE], src)
        host.umc.encrypt_in_place(spa, n * PAGE, 1)
    per_item(benchmark, n, "pages")
    benchmark.pedantic(raw, rounds=3)
    assert frames[spa:spa + PAGE].tobytes() != data[:PAGE]


# -- a report request end to end (target: under 2 ms) -------------------------------------------------

REPORTS = 20


def guest_reports(g, n, out):
    """``n`` report requests (g.snp_get_report: VMPCK0 seal, VMGEXIT, firmware, signature,
    open), then TERM_REQ."""
    for i in range(n):
        out.append((yield g.snp_get_report(i.to_bytes(64, "little"))))
    yield g.wrmsr(MSR_AMD64_SEV_ES_GHCB, GHCB_MSR_TERM_REQ)
    yield g.vmgexit()


def reporting_guest(n, out):
    kvm = sevcore.Kvm()
    vm = kvm.create_vm(KVM_X86_SNP_VM)
    vm.memory_encrypt_op(KVM_SEV_INIT2)
    hva = vm_mem_add(vm, 0, 0, 16, KVM_MEM_GUEST_MEMFD)
    vcpu = vm_vcpu_add(vm, 0)
    vcpu.set_guest_code(guest_reports, n, out)
    vm.memory_encrypt_op(KVM_SEV_SNP_LAUNCH_START, policy=POLICY)
    vm_mem_set_private(vm, 0, 8 * PAGE)
    snp_launch_update_data(vm, 0, hva, 6 * PAGE, KVM_SEV_SNP_PAGE_TYPE_NORMAL)
    snp_launch_update_data(vm, 6 * PAGE, hva + 6 * PAGE, PAGE, KVM_SEV_SNP_PAGE_TYPE_SECRETS)
    vm.memory_encrypt_op(KVM_SEV_SNP_LAUNCH_FINISH)
    snp_guest_msg_init(vm, 6 * PAGE, 8 * PAGE, 9 * PAGE)
    return vcpu


def test_report_request(benchmark):
    """REPORTS report requests by a guest in one KVM_RUN (guest crypto, KVM's bounce pages,
    the firmware's report and its ECDSA P-384 signature)."""
    out = []

    def setup():
        out.clear()
        return (reporting_guest(REPORTS, out),), {}
    per_item(benchmark, REPORTS, "reports")
    run = benchmark.pedantic(lambda vcpu: vcpu.run(), setup=setup, rounds=5)
    assert run.exit_reason == KVM_EXIT_SYSTEM_EVENT and len(out) == REPORTS
    assert out[-1][0x50:0x90] == (REPORTS - 1).to_bytes(64, "little")
