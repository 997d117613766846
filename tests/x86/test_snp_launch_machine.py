"""A Hypothesis state machine over KVM_SEV_SNP_LAUNCH_UPDATE: memory attributes, guest_memfd
hole punches and LAUNCH_UPDATE calls of every page type (and refused ones) in any order, against
a model that follows snp_launch_update / kvm_gmem_populate page by page and replays the launch
digest with sev-snp-measure's GCTX. Invariants after every step: the firmware's digest is the
model's, each populated page's frame is the guest's (validated, at its GPA) and every other
frame of the file is the hypervisor's, and a refused call changes nothing."""
import os
from errno import EINVAL, EIO

import pytest
from hypothesis import settings, strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, rule

import sevcore
from sevcore.kvm.sev import SevError
from sevcore.uapi import *
from sevcore.vmm.kvm_util import vm_mem_add

gctx = pytest.importorskip("sevsnpmeasure.gctx")

NPAGES = 24
POLICY = SNP_POLICY_MASK_RSVD_MBO | SNP_POLICY_MASK_SMT
TYPES = (KVM_SEV_SNP_PAGE_TYPE_NORMAL, KVM_SEV_SNP_PAGE_TYPE_ZERO,
         KVM_SEV_SNP_PAGE_TYPE_UNMEASURED, KVM_SEV_SNP_PAGE_TYPE_SECRETS,
         KVM_SEV_SNP_PAGE_TYPE_CPUID)
page = st.integers(0, NPAGES - 1)
count = st.integers(0, 8)


class SnpLaunchMachine(RuleBasedStateMachine):
    @initialize()
    def launch_start(self):
        self.kvm = sevcore.Kvm()
        self.vm = self.kvm.create_vm(KVM_X86_SNP_VM)
        self.vm.memory_encrypt_op(KVM_SEV_INIT2)
        self.hva = vm_mem_add(self.vm, 0, 0, NPAGES, KVM_MEM_GUEST_MEMFD)
        self.source = os.urandom(NPAGES << 12)
        self.kvm.write(self.hva, self.source)
        self.zeros = self.kvm.mmap(NPAGES << 12)        # a valid (empty) CPUID table source
        self.vm.memory_encrypt_op(KVM_SEV_SNP_LAUNCH_START, policy=POLICY)
        self.file = self.vm.gfn_to_memslot(0).gmem_file
        self.private = set()
        self.populated = set()
        self.digest = gctx.GCTX()

    def ld(self):
        return self.vm.host.psp.snp_guest(self.vm.sev.snp_context).ld

    @rule(first=page, n=count, private=st.booleans())
    def set_attributes(self, first, n, private):
        n = min(n, NPAGES - first)
        if not n:
            return
        self.vm.set_memory_attributes(first << 12, n << 12,
                                      KVM_MEMORY_ATTRIBUTE_PRIVATE if private else 0)
        pages = set(range(first, first + n))
        self.private = self.private | pages if private else self.private - pages

    @rule(first=page, n=count)
    def punch_hole(self, first, n):
        if not n:
            return
        self.file.fallocate(FALLOC_FL_KEEP_SIZE | FALLOC_FL_PUNCH_HOLE, first << 12, n << 12)
        self.populated -= set(range(first, first + n))

    @rule(first=page, n=count, type=st.sampled_from(TYPES))
    def launch_update(self, first, n, type):
        src = self.zeros if type == KVM_SEV_SNP_PAGE_TYPE_CPUID else self.hva
        uaddr = src + (first << 12)
        done = 0
        for g in range(first, min(first + n, NPAGES)):       # kvm_gmem_populate's loop
            if g not in self.private or g in self.populated:
                break
            done += 1
        before = self.ld()
        if n and not done:
            with pytest.raises(OSError) as e:
                self.vm.memory_encrypt_op(KVM_SEV_SNP_LAUNCH_UPDATE, gfn_start=first,
                                          uaddr=uaddr, len=n << 12, type=type)
            assert e.value.errno == EIO and not isinstance(e.value, SevError)
            assert self.ld() == before
            return
        out = self.vm.memory_encrypt_op(KVM_SEV_SNP_LAUNCH_UPDATE, gfn_start=first,
                                        uaddr=uaddr, len=n << 12, type=type)
        assert (out.gfn_start, out.len) == (first + done, (n - done) << 12)
        assert out.uaddr == (uaddr if type == KVM_SEV_SNP_PAGE_TYPE_ZERO
                             else uaddr + (done << 12))
        for g in range(first, first + done):
            gpa = g << 12
            if type == KVM_SEV_SNP_PAGE_TYPE_NORMAL:
                self.digest.update_normal_pages(gpa, self.source[gpa:gpa + 4096])
            elif type == KVM_SEV_SNP_PAGE_TYPE_ZERO:
                self.digest.update_zero_pages(gpa, 4096)
            elif type == KVM_SEV_SNP_PAGE_TYPE_UNMEASURED:
                self.digest.update_unmeasured_pages(gpa, 4096)
            elif type == KVM_SEV_SNP_PAGE_TYPE_SECRETS:
                self.digest.update_secrets_page(gpa)
            else:
                self.digest.update_cpuid_page(gpa)
            self.populated.add(g)

    @rule(first=page, bad=st.sampled_from(["flags", "type", "len", "slot"]))
    def refused_update(self, first, bad):
        fields = dict(gfn_start=first, uaddr=self.hva, len=4096,
                      type=KVM_SEV_SNP_PAGE_TYPE_NORMAL)
        fields.update({"flags": dict(flags=1), "type": dict(type=2), "len": dict(len=100),
                       "slot": dict(gfn_start=NPAGES + 5)}[bad])
        before = self.ld()
        with pytest.raises(OSError) as e:
            self.vm.memory_encrypt_op(KVM_SEV_SNP_LAUNCH_UPDATE, **fields)
        assert e.value.errno == EINVAL and self.ld() == before

    @invariant()
    def digest_and_rmp_follow_the_model(self):
        if not hasattr(self, "vm"):
            return
        assert self.ld() == self.digest.ld()
        rmp = self.vm.host.rmp
        index, pfns = self.file.page_cache.items()
        for i, pfn in zip(index.tolist(), pfns.tolist()):
            e = rmp.entry(pfn)
            if i in self.populated:
                assert e.assigned and e.validated and e.gpa == i << 12
                assert e.asid == self.vm.sev.asid
            else:
                assert not e.assigned, f"page {i} is assigned but was never populated"


SnpLaunchMachine.TestCase.settings = settings(max_examples=25, stateful_step_count=25,
                                              deadline=None)
TestSnpLaunch = SnpLaunchMachine.TestCase
