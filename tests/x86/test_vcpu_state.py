"""The vCPU's architectural state: KVM_GET/SET_SREGS(2) (kvm_arch_vcpu_ioctl_set_sregs,
__set_sregs_common, kvm_is_valid_sregs; svm_set_segment/svm_get_segment, svm_set_cr0/cr4/efer),
KVM_GET/SET_FPU, KVM_GET/SET_MSRS (msr_io), the RESET/INIT state (kvm_vcpu_reset, init_vmcb),
hypercalls by mode and CPL (kvm_emulate_hypercall), KVM_RUN with no guest program, and the
SEV-ES VMSA built from the state (sev_es_sync_vmsa) against sev-snp-measure's QEMU VMSA."""
import ctypes
import struct
from errno import E2BIG, EINVAL

import pytest
from hypothesis import given, settings, strategies as st

import sevcore
from sevcore.errors import NotModelled
from sevcore.hw import vmsa as V
from sevcore.kvm.sev_es import build_vmsa
from sevcore.uapi import *
from sevcore.vmm.kvm_util import (vm_mem_add, vm_sev_create_with_one_vcpu, vm_sev_launch,
                                  vm_vcpu_add)

from support import raises_errno
from support.qemu import qemu_reset

U64 = (1 << 64) - 1
U32 = (1 << 32) - 1


@pytest.fixture
def kvm():
    return sevcore.Kvm()


def new_vcpu(kvm, type=KVM_X86_DEFAULT_VM, npages=16):
    vm = kvm.create_vm(type)
    vm_mem_add(vm, 0, 0, npages)
    return vm, vm.create_vcpu(0)


def state(vcpu):
    return (bytes(vcpu.get_sregs()), dict(vcpu.get_regs()), vcpu.x86.snapshot(),
            dict(vcpu.msrs.values))


def vmsa_u64(vmsa, off):
    return struct.unpack_from("<Q", vmsa, off)[0]


# -- layout ------------------------------------------------------------------------------------

def test_struct_layouts():
    """kvm_sregs, kvm_sregs2, kvm_segment, kvm_dtable and kvm_fpu have the kernel's sizes and
    field offsets (arch/x86/include/uapi/asm/kvm.h)."""
    assert [ctypes.sizeof(t) for t in (kvm_segment, kvm_dtable, kvm_sregs, kvm_sregs2,
                                       kvm_fpu)] == [24, 16, 312, 320, 416]
    assert (kvm_sregs.ldt.offset, kvm_sregs.gdt.offset, kvm_sregs.cr0.offset,
            kvm_sregs.apic_base.offset, kvm_sregs.interrupt_bitmap.offset) == (168, 192, 224,
                                                                             272, 280)
    assert (kvm_sregs2.flags.offset, kvm_sregs2.pdptrs.offset) == (280, 288)
    assert (kvm_segment.selector.offset, kvm_segment.type.offset,
            kvm_segment.unusable.offset) == (12, 14, 22)
    assert (kvm_fpu.fcw.offset, kvm_fpu.last_ip.offset, kvm_fpu.xmm.offset,
            kvm_fpu.mxcsr.offset) == (128, 136, 152, 408)


# -- RESET, INIT and the selftest library's 64-bit mode ---------------------------------------

def test_reset_state(kvm):
    """A new vCPU is in the x86 reset state of kvm_vcpu_reset/init_vmcb as KVM_GET_SREGS reports
    it: CS 0xf000 at 0xffff0000, RIP 0xfff0, RDX 0x600, CR0 ET|CD|NW, real mode at CPL 0."""
    _, vcpu = new_vcpu(kvm)
    s = vcpu.get_sregs()
    assert (s.cs.selector, s.cs.base, s.cs.limit, s.cs.type, s.cs.s, s.cs.present) == \
        (0xf000, 0xffff0000, 0xffff, 0xa, 1, 1)
    for seg in (s.ds, s.es, s.fs, s.gs):
        assert (seg.selector, seg.base, seg.limit, seg.type) == (0, 0, 0xffff, 3)  # accessed
    assert s.ss.type == 2 and s.tr.type == 3 and s.ldt.type == 2 and s.ldt.s == 0
    assert (s.gdt.limit, s.idt.limit, s.gdt.base, s.idt.base) == (0xffff, 0xffff, 0, 0)
    assert (s.cr0, s.cr2, s.cr3, s.cr4, s.cr8, s.efer) == (0x60000010, 0, 0, 0, 0, 0)
    assert s.apic_base == 0xfee00900 and not any(s.interrupt_bitmap)
    regs = vcpu.get_regs()
    assert (regs["rip"], regs["rflags"], regs["rdx"], regs["rax"]) == (0xfff0, 2, 0x600, 0)
    assert vcpu.x86.cpl == 0 and not vcpu.x86.is_64_bit_mode()


def test_vm_vcpu_add_puts_the_vcpu_in_64_bit_mode(kvm):
    """vm_vcpu_add sets the state vcpu_init_sregs sets: CR0 PE|NE|PG, CR4 PAE|OSFXSR|OSXSAVE,
    EFER LME|LMA|NX, a 64-bit code segment; the vCPU is in 64-bit mode at CPL 0."""
    vm = kvm.create_vm(KVM_X86_DEFAULT_VM)
    vcpu = vm_vcpu_add(vm, 0)
    s = vcpu.get_sregs()
    assert s.cr0 == X86_CR0_PE | X86_CR0_NE | X86_CR0_PG
    assert s.cr4 == X86_CR4_PAE | X86_CR4_OSFXSR | X86_CR4_OSXSAVE
    assert s.efer == EFER_LME | EFER_LMA | EFER_NX
    assert (s.cs.selector, s.cs.l, s.cs.g, s.cs.limit) == (8, 1, 1, 0xffffffff)
    assert s.ldt.unusable == 1 and s.ldt.present == 0
    assert vcpu.x86.is_64_bit_mode() and vcpu.x86.cpl == 0


def test_init_after_shutdown_resets_the_state(kvm):
    """A shutdown INITs a plain vCPU (kvm_vcpu_reset with init_event): back in real mode with
    the reset segments, EFER 0, CR0 ET, and RDX the CPUID signature; the APIC base stays."""
    def guest(g):
        yield g.shutdown()
    vm = kvm.create_vm(KVM_X86_DEFAULT_VM)
    vm_mem_add(vm, 0, 0, 16)
    vcpu = vm_vcpu_add(vm, 0)
    vcpu.set_guest_code(guest)
    assert vcpu.run().exit_reason == KVM_EXIT_SHUTDOWN
    s = vcpu.get_sregs()
    assert (s.cs.selector, s.cs.base, s.cs.l, s.efer, s.cr0, s.cr4) == \
        (0xf000, 0xffff0000, 0, 0, X86_CR0_ET, 0)
    assert vcpu.get_regs()["rdx"] == vcpu.cpuid_entry(1)["eax"] != 0x600
    assert s.apic_base == 0xfee00900 and not vcpu.x86.is_long_mode()


# -- KVM_SET_SREGS: checks -----------------------------------------------------------------------

def long_mode(s):
    s.cr0 = X86_CR0_PE | X86_CR0_PG
    s.cr4 = X86_CR4_PAE
    s.efer = EFER_LME | EFER_LMA
    s.cs.l = 1
    return s


INVALID = [
    ("LME and PG without PAE", lambda s: (long_mode(s), setattr(s, "cr4", 0))),
    ("LME and PG without LMA", lambda s: (long_mode(s), setattr(s, "efer", EFER_LME))),
    ("CR3 above MAXPHYADDR", lambda s: (long_mode(s), setattr(s, "cr3", 1 << 48))),
    ("LMA without paging", lambda s: setattr(s, "efer", EFER_LMA)),
    ("CS.L outside long mode", lambda s: setattr(s.cs, "l", 1)),
    ("CR0 upper half", lambda s: setattr(s, "cr0", 1 << 32 | X86_CR0_ET)),
    ("CR0.NW without CD", lambda s: setattr(s, "cr0", X86_CR0_NW | X86_CR0_ET)),
    ("CR0.PG without PE", lambda s: setattr(s, "cr0", X86_CR0_PG)),
    ("CR4.SMXE", lambda s: setattr(s, "cr4", X86_CR4_SMXE)),
    ("CR4.SMEP without the CPUID bit", lambda s: setattr(s, "cr4", X86_CR4_SMEP)),
    ("APIC base reserved bit", lambda s: setattr(s, "apic_base", 0xfee00900 | 1 << 9)),
    ("x2APIC without the CPUID bit", lambda s: setattr(s, "apic_base", 0xfee00d00)),
    ("APIC base above MAXPHYADDR", lambda s: setattr(s, "apic_base", 1 << 50 | 0x900)),
]


@pytest.mark.parametrize("why,change", INVALID, ids=[w for w, _ in INVALID])
def test_set_sregs_refuses_invalid_state(kvm, why, change):
    """kvm_is_valid_sregs, kvm_is_valid_cr0/cr4 and kvm_apic_set_base refusals are EINVAL from
    KVM_SET_SREGS and KVM_SET_SREGS2, and change nothing."""
    _, vcpu = new_vcpu(kvm)
    before = state(vcpu)
    s = vcpu.get_sregs()
    change(s)
    with raises_errno(EINVAL, "KVM_SET_SREGS"):
        vcpu.set_sregs(s)
    s2 = kvm_sregs2.from_buffer_copy(bytes(s)[:280] + bytes(40))
    with raises_errno(EINVAL, "KVM_SET_SREGS2"):
        vcpu.set_sregs2(s2)
    assert state(vcpu) == before


def test_set_sregs_cr4_bits_follow_cpuid(kvm):
    """Each CR4 bit KVM_SET_SREGS accepts is one KVM knows and the CPUID offers; OSXSAVE goes
    with CPUID.1:ECX.XSAVE (as set_sregs_test walks the bits)."""
    _, vcpu = new_vcpu(kvm)
    accepted = 0
    for bit in range(64):
        s = vcpu.get_sregs()
        s.cr4 = 1 << bit
        try:
            vcpu.set_sregs(s)
            accepted |= 1 << bit
        except OSError:
            pass
    assert accepted == (X86_CR4_VME | X86_CR4_PVI | X86_CR4_TSD | X86_CR4_DE | X86_CR4_PSE |
                        X86_CR4_PAE | X86_CR4_MCE | X86_CR4_PGE | X86_CR4_PCE | X86_CR4_OSFXSR |
                        X86_CR4_OSXMMEXCPT | X86_CR4_OSXSAVE)
    cpuid = vcpu.get_cpuid2()
    for e in cpuid:
        if e["function"] == 1:
            e["ecx"] &= ~(1 << 26)
    vcpu.set_cpuid2(cpuid)
    s = vcpu.get_sregs()
    s.cr4 = X86_CR4_OSXSAVE
    with raises_errno(EINVAL):
        vcpu.set_sregs(s)


def test_sev_c_bit_is_legal_in_cr3(kvm):
    """An SEV guest's CR3 may carry the C-bit (svm_vcpu_after_set_cpuid clears it from the
    reserved GPA bits); a plain guest's may not."""
    for type, ok in ((KVM_X86_SEV_VM, True), (KVM_X86_DEFAULT_VM, False)):
        vm = kvm.create_vm(type)
        if type == KVM_X86_SEV_VM:
            vm.memory_encrypt_op(KVM_SEV_INIT2)
        vcpu = vm_vcpu_add(vm, 0)
        s = vcpu.get_sregs()
        s.cr3 = 1 << kvm.host.c_bit | 0x1000
        if ok:
            vcpu.set_sregs(s)
            assert vcpu.get_sregs().cr3 == s.cr3
        else:
            with raises_errno(EINVAL):
                vcpu.set_sregs(s)


@settings(max_examples=150, deadline=None)
@given(raw=st.binary(min_size=312, max_size=312), sregs2=st.booleans(), tame=st.booleans())
def test_set_sregs_of_any_bytes(raw, sregs2, tame):
    """Any 312 bytes as a kvm_sregs (or kvm_sregs2 with the PDPTR flag cleared; half of them
    with CR0/CR4/EFER/CS.L/APIC base made valid) are either refused with EINVAL and change
    nothing, or taken, after which GET -> SET changes nothing and the VMCB keeps EFER.SVME and
    CR4.MCE."""
    if tame:
        s = kvm_sregs.from_buffer_copy(raw)
        s.cr0 &= ~(X86_CR0_PG | X86_CR0_NW | 0xffffffff00000000)
        s.cr4 &= X86_CR4_PAE | X86_CR4_OSFXSR | X86_CR4_PGE | X86_CR4_VME
        s.efer &= EFER_SCE | EFER_NX
        s.cs.l, s.apic_base = 0, 0xfee00900
        raw = bytes(s)
    vm = sevcore.Host(memory_size=64 << 20).kvm.create_vm(KVM_X86_DEFAULT_VM)
    vcpu = vm.create_vcpu(0)
    before = state(vcpu)
    if sregs2:
        s = kvm_sregs2.from_buffer_copy(raw[:280] + bytes(40))
        call, get = vcpu.set_sregs2, vcpu.get_sregs2
    else:
        s = kvm_sregs.from_buffer_copy(raw)
        call, get = vcpu.set_sregs, vcpu.get_sregs
    try:
        call(s)
    except OSError as e:
        assert e.errno == EINVAL
        assert state(vcpu) == before
        return
    after = bytes(get())
    call(get())
    assert bytes(get()) == after
    assert vcpu.x86.vmcb_efer & EFER_SVME and vcpu.x86.vmcb_cr4 & X86_CR4_MCE


def test_set_sregs_takes_a_kvm_sregs(kvm):
    """A value that is not a struct kvm_sregs is a TypeError before anything changes."""
    _, vcpu = new_vcpu(kvm)
    with pytest.raises(TypeError):
        vcpu.set_sregs(bytes(312))
    with pytest.raises(TypeError):
        vcpu.set_sregs2(vcpu.get_sregs())


# -- KVM_SET_SREGS: what KVM and SVM make of it ----------------------------------------------------

def test_segments_round_trip_as_svm_reports_them(kvm):
    """svm_set_segment/svm_get_segment: G follows the limit, an unusable segment reads back not
    present (and SS.DB 0), TR reads busy, data segments accessed, SS.DPL is the CPL; AVL, L, DB
    and the base survive."""
    _, vcpu = new_vcpu(kvm)
    s = vcpu.get_sregs()
    s.ds = kvm_segment(base=0x1234, limit=0xfffff, selector=0x10, type=2, s=1, present=1,
                       avl=1, g=1)
    s.es = kvm_segment(limit=0x100000, type=2, s=1, present=1)
    s.fs = kvm_segment(type=2, s=1, present=1, unusable=1)
    s.ss = kvm_segment(type=3, s=1, present=1, unusable=1, db=1, dpl=2)
    s.tr = kvm_segment(type=9, present=1, limit=0x67)
    s.ldt = kvm_segment(type=0x12, present=1)
    vcpu.set_sregs(s)
    g = vcpu.get_sregs()
    assert (g.ds.base, g.ds.selector, g.ds.type, g.ds.avl, g.ds.g) == (0x1234, 0x10, 3, 1, 0)
    assert g.es.g == 1
    assert (g.fs.present, g.fs.unusable, g.fs.type) == (0, 1, 2)
    assert (g.ss.present, g.ss.db, g.ss.dpl) == (0, 0, 2) and vcpu.x86.cpl == 2
    assert g.tr.type == 0xb and g.ldt.type == 2


def test_svm_forces_efer_svme_cr4_mce_and_clears_cd_nw(kvm):
    """KVM_GET_SREGS returns CR0/CR4/EFER as set, while the VMCB (and so the VMSA) has
    EFER.SVME, CR4.MCE and CR0 without CD/NW (svm_set_efer, svm_set_cr4, svm_set_cr0)."""
    _, vcpu = new_vcpu(kvm, KVM_X86_SEV_ES_VM)
    s = vcpu.get_sregs()
    s.cr0 = X86_CR0_PE | X86_CR0_CD | X86_CR0_NW | X86_CR0_ET
    s.cr4 = X86_CR4_OSFXSR
    s.efer = EFER_SCE
    vcpu.set_sregs(s)
    g = vcpu.get_sregs()
    assert (g.cr0, g.cr4, g.efer) == (s.cr0, s.cr4, s.efer)
    vmsa = build_vmsa(vcpu, 0)
    assert vmsa_u64(vmsa, V.CR0) == X86_CR0_PE | X86_CR0_ET
    assert vmsa_u64(vmsa, V.CR4) == X86_CR4_OSFXSR | X86_CR4_MCE
    assert vmsa_u64(vmsa, V.EFER) == EFER_SCE | EFER_SVME


def test_leaving_paging_clears_lma(kvm):
    """svm_set_cr0: clearing CR0.PG with EFER.LME clears EFER.LMA, and the VMCB drops LMA and
    LME; CR8 with reserved bits is ignored (kvm_set_cr8 refuses it)."""
    vm = kvm.create_vm(KVM_X86_SEV_ES_VM)
    vcpu = vm_vcpu_add(vm, 0)
    s = vcpu.get_sregs()
    s.cr0 = X86_CR0_PE
    s.efer = EFER_LME
    s.cs.l = 0
    s.cr8 = 5
    vcpu.set_sregs(s)
    assert vcpu.get_sregs().efer == EFER_LME and vcpu.get_sregs().cr8 == 5
    assert vmsa_u64(build_vmsa(vcpu, 0), V.EFER) == EFER_SVME
    s.cr8 = 0x10
    vcpu.set_sregs(s)
    assert vcpu.get_sregs().cr8 == 5


def test_interrupt_bitmap(kvm):
    """The lowest vector set in interrupt_bitmap is queued and reported back alone; KVM_RUN
    injects it."""
    vm, vcpu = new_vcpu(kvm)
    s = vcpu.get_sregs()
    s.interrupt_bitmap[1] = 1 << 3 | 1 << 9        # vectors 67 and 73
    vcpu.set_sregs(s)
    assert list(vcpu.get_sregs().interrupt_bitmap) == [0, 1 << 3, 0, 0]

    def guest(g):
        yield g.done()
    vcpu.set_guest_code(guest)
    vcpu.run()
    assert not any(vcpu.get_sregs().interrupt_bitmap)


def test_sregs2_pdptrs(kvm):
    """KVM_SET_SREGS2 takes PDPTRs only under PAE paging and with no other flag; without them
    KVM loads the PDPTEs at CR3 from guest memory, and KVM_GET_SREGS2 reports them with
    KVM_SREGS2_FLAGS_PDPTRS_VALID."""
    vm, vcpu = new_vcpu(kvm)
    s = kvm_sregs2.from_buffer_copy(bytes(vcpu.get_sregs2()))
    assert s.flags == 0
    s.flags = KVM_SREGS2_FLAGS_PDPTRS_VALID
    s.pdptrs[:] = [1, 2, 3, 4]
    with raises_errno(EINVAL, "KVM_SET_SREGS2"):
        vcpu.set_sregs2(s)                          # not PAE paging
    s.cr0, s.cr4 = X86_CR0_PE | X86_CR0_PG | X86_CR0_ET, X86_CR4_PAE
    s.flags = 2
    with raises_errno(EINVAL):
        vcpu.set_sregs2(s)
    s.flags = KVM_SREGS2_FLAGS_PDPTRS_VALID
    vcpu.set_sregs2(s)
    g = vcpu.get_sregs2()
    assert g.flags == KVM_SREGS2_FLAGS_PDPTRS_VALID and list(g.pdptrs) == [1, 2, 3, 4]
    ptes = [0x2001, 0x3001, 0, 0x5001]
    kvm.write(vm.memslots[(0, 0)].userspace_addr + 0x1020, struct.pack("<4Q", *ptes))
    s.flags, s.cr3 = 0, 0x1020
    vcpu.set_sregs2(s)
    assert list(vcpu.get_sregs2().pdptrs) == ptes
    s2 = vcpu.get_sregs()                           # KVM_SET_SREGS loads them too
    kvm.write(vm.memslots[(0, 0)].userspace_addr + 0x1020, struct.pack("<4Q", 0x1 | 1 << 2,
                                                                       0, 0, 0))
    vcpu.set_sregs(s2)
    assert list(vcpu.get_sregs2().pdptrs) == ptes   # a reserved bit: load_pdptrs fails


# -- protected state ---------------------------------------------------------------------------

def test_sregs_of_a_protected_vcpu(kvm):
    """Once LAUNCH_UPDATE_VMSA protected an SEV-ES-type VM's vCPU, GET/SET_SREGS(2) and
    GET/SET_FPU are EINVAL; a legacy ES_INIT vCPU reports only CR0, CR4, CR8, EFER and the APIC
    base, and SET_SREGS takes only the APIC base."""
    vm, vcpu = vm_sev_create_with_one_vcpu(kvm, KVM_X86_SEV_ES_VM)
    s = vcpu.get_sregs()
    vm_sev_launch(vm, SEV_POLICY_ES)
    for name, call in (("KVM_GET_SREGS", vcpu.get_sregs), ("KVM_GET_SREGS2", vcpu.get_sregs2),
                       ("KVM_SET_SREGS", lambda: vcpu.set_sregs(s)),
                       ("KVM_GET_FPU", vcpu.get_fpu),
                       ("KVM_SET_FPU", lambda: vcpu.set_fpu(kvm_fpu()))):
        with raises_errno(EINVAL, name):
            call()
    legacy = kvm.create_vm(KVM_X86_DEFAULT_VM)
    legacy.memory_encrypt_op(KVM_SEV_ES_INIT, data=None)
    vm_mem_add(legacy, 0, 0, 16)
    lv = vm_vcpu_add(legacy, 0)
    vm_sev_launch(legacy, SEV_POLICY_ES)
    g = lv.get_sregs()
    assert g.cs.selector == 0 and g.gdt.limit == 0 and g.efer == s.efer and g.cr0 == s.cr0
    g.cr4 = 0
    g.apic_base = 0xfee00800
    g.efer = 0
    g.cr0 = X86_CR0_ET
    assert lv.set_sregs(g) == 0
    assert lv.get_sregs().apic_base == 0xfee00800 and lv.get_sregs().efer == s.efer
    assert lv.get_fpu().fcw == 0 and lv.set_fpu(kvm_fpu()) == 0


# -- KVM_GET/SET_FPU ---------------------------------------------------------------------------

def test_fpu_round_trip(kvm):
    """KVM_SET_FPU writes the legacy FXSAVE fields KVM_GET_FPU reads (and KVM_GET_XSAVE shows),
    but not MXCSR, as the kernel copies it neither way."""
    _, vcpu = new_vcpu(kvm)
    f = kvm_fpu(fcw=0x27f, fsw=0x3800, ftwx=0x80, last_opcode=0x7ff, last_ip=0x1234,
                last_dp=0x5678, mxcsr=0x1234)
    f.fpr[7][:] = range(16)
    f.xmm[15][:] = range(100, 116)
    vcpu.set_fpu(f)
    g = vcpu.get_fpu()
    f.mxcsr = 0
    assert bytes(g) == bytes(f)
    img = bytearray(vcpu.get_xsave())
    assert struct.unpack_from("<HHH", img, 0) == (0x27f, 0x3800, 0x80)   # twd's high byte 0
    assert struct.unpack_from("<I", img, 24)[0] == 0x1f80
    assert img[160 + 15 * 16:160 + 16 * 16] == bytes(range(100, 116))
    img[5] = 0xff                                   # a u16 twd reads back as its low byte
    img[512] |= XFEATURE_MASK_FP
    vcpu.set_xsave(img)
    assert vcpu.get_fpu().ftwx == 0x80
    with pytest.raises(TypeError):
        vcpu.set_fpu(bytes(416))


# -- KVM_GET/SET_MSRS --------------------------------------------------------------------------

def test_msrs(kvm):
    """KVM_SET_MSRS writes host-initiated (no filter) and returns how many it wrote, stopping at
    the first MSR KVM refuses; KVM_GET_MSRS stops likewise; EFER and FS/GS base are the SREGS
    state; MAX_IO_MSRS entries are E2BIG."""
    vm = kvm.create_vm(KVM_X86_DEFAULT_VM)
    vcpu = vm_vcpu_add(vm, 0)
    vm.x86_set_msr_filter(KVM_MSR_FILTER_DEFAULT_DENY, [(KVM_MSR_FILTER_READ, 1, 0, b"\0")])
    n = vcpu.set_msrs([(MSR_LSTAR, 0xffffffff81000000), (MSR_FS_BASE, 0x7000),
                       (MSR_IA32_CR_PAT, 0x0606060606060606), (0x12345678, 1),
                       (MSR_STAR, 5)])
    assert n == 3
    assert vcpu.get_msrs([MSR_LSTAR, MSR_FS_BASE, MSR_EFER, 0x12345678, MSR_STAR]) == \
        [(MSR_LSTAR, 0xffffffff81000000), (MSR_FS_BASE, 0x7000),
         (MSR_EFER, EFER_LME | EFER_LMA | EFER_NX)]
    assert vcpu.get_sregs().fs.base == 0x7000 and vcpu.get_msrs([MSR_STAR]) == [(MSR_STAR, 0)]
    assert vcpu.set_msrs([(MSR_EFER, EFER_SCE | EFER_LME)]) == 1     # LMA is KVM's
    assert vcpu.get_sregs().efer == EFER_SCE | EFER_LME | EFER_LMA
    assert vcpu.set_msrs([(MSR_LSTAR, 1 << 63)]) == 0                 # not canonical
    with raises_errno(E2BIG, "KVM_SET_MSRS"):
        vcpu.set_msrs([(MSR_STAR, 0)] * MAX_IO_MSRS)
    with raises_errno(E2BIG, "KVM_GET_MSRS"):
        vcpu.get_msrs([MSR_STAR] * MAX_IO_MSRS)


def test_guest_cannot_toggle_lme_while_paging(kvm):
    """set_efer: a guest WRMSR that changes EFER.LME with paging on is #GP; one that keeps it
    succeeds and cannot clear LMA."""
    def guest(g):
        vec = yield g.wrmsr_safe(MSR_EFER, EFER_NX)
        ok = yield g.wrmsr_safe(MSR_EFER, EFER_LME | EFER_SCE)
        efer = yield g.rdmsr(MSR_EFER)
        yield g.sync(vec, ok, efer)
    vm = kvm.create_vm(KVM_X86_DEFAULT_VM)
    vm_mem_add(vm, 0, 0, 16)
    vcpu = vm_vcpu_add(vm, 0)
    vcpu.set_guest_code(guest)
    vcpu.run()
    assert vcpu.get_ucall() == ("sync", (GP_VECTOR, 0, EFER_LME | EFER_SCE | EFER_LMA))


# -- hypercalls by mode and CPL ----------------------------------------------------------------

def hypercall_vcpu(kvm, mode, *args):
    """A vCPU whose program makes one hypercall, in ``mode``: "64", "32" (protected mode),
    "compat" (long mode, CS.L 0) or "cpl3" (64-bit, SS.DPL 3)."""
    vm = kvm.create_vm(KVM_X86_SW_PROTECTED_VM)
    vm_mem_add(vm, 0, 0, 16)
    vm.enable_cap(KVM_CAP_EXIT_HYPERCALL, 1 << KVM_HC_MAP_GPA_RANGE)
    vcpu = vm_vcpu_add(vm, 0)
    s = vcpu.get_sregs()
    if mode == "32":
        s.efer, s.cr0, s.cr4 = 0, X86_CR0_PE | X86_CR0_ET, 0
        s.cs.l, s.cs.db = 0, 1
    elif mode == "compat":
        s.cs.l, s.cs.db = 0, 1
    elif mode == "cpl3":
        s.ss.dpl = s.cs.dpl = 3
    vcpu.set_sregs(s)

    def guest(g):
        r = yield g.hypercall(*args)
        yield g.sync(r)
    vcpu.set_guest_code(guest)
    return vcpu


@pytest.mark.parametrize("mode", ["64", "32", "compat"])
def test_hypercall_operand_size_follows_the_mode(kvm, mode):
    """Outside 64-bit mode the number and arguments are truncated to 32 bits, the exit's
    longmode flag is clear and the value user space returns is truncated into RAX; in 64-bit
    mode all 64 bits go through."""
    high = 0xabcd << 32
    vcpu = hypercall_vcpu(kvm, mode, high | KVM_HC_MAP_GPA_RANGE, high | 0x3000, high | 2, 0)
    run = vcpu.run()
    if mode == "64":                        # the number is not MAP_GPA_RANGE: -KVM_ENOSYS
        assert vcpu.get_ucall() == ("sync", (-KVM_ENOSYS,))
        assert vcpu.get_regs()["rax"] == -KVM_ENOSYS & U64
        return
    assert run.exit_reason == KVM_EXIT_HYPERCALL
    assert (run.hypercall.nr, run.hypercall.args[:2]) == (KVM_HC_MAP_GPA_RANGE, [0x3000, 2])
    assert run.hypercall.flags == 0 and not run.hypercall.longmode
    run.hypercall.ret = U64 - 4                     # -5 as user space writes it
    vcpu.run()
    assert vcpu.get_ucall() == ("sync", (U32 - 4,))
    assert vcpu.get_regs()["rax"] == U32 - 4


def test_hypercall_in_64_bit_mode_exits_with_longmode(kvm):
    """In 64-bit mode KVM_EXIT_HYPERCALL has the longmode flag and RAX takes all 64 bits."""
    vcpu = hypercall_vcpu(kvm, "64", KVM_HC_MAP_GPA_RANGE, 1 << 40, 1, 0)
    run = vcpu.run()
    assert run.exit_reason == KVM_EXIT_HYPERCALL and run.hypercall.args[0] == 1 << 40
    assert run.hypercall.flags == KVM_EXIT_HYPERCALL_LONG_MODE
    run.hypercall.ret = 1 << 40
    vcpu.run()
    assert vcpu.get_ucall() == ("sync", (1 << 40,))


def test_in_kernel_result_is_truncated_outside_64_bit_mode(kvm):
    """An in-kernel error (-KVM_ENOSYS) reaches a 32-bit guest as its low 32 bits."""
    vcpu = hypercall_vcpu(kvm, "32", 12345)
    vcpu.run()
    assert vcpu.get_ucall() == ("sync", (-KVM_ENOSYS & U32,))


def test_hypercall_from_cpl3_is_eperm_without_an_exit(kvm):
    """From CPL 3 even an enabled KVM_HC_MAP_GPA_RANGE returns -KVM_EPERM in the kernel, with no
    exit and before its (here invalid) arguments are looked at."""
    for args in ((KVM_HC_MAP_GPA_RANGE, 0x3000, 1, 0), (KVM_HC_MAP_GPA_RANGE, 1, 0, 0),
                 (KVM_HC_SCHED_YIELD, 0)):
        vcpu = hypercall_vcpu(kvm, "cpl3", *args)
        run = vcpu.run()
        assert run.exit_reason == KVM_EXIT_IO
        assert vcpu.get_ucall() == ("sync", (-KVM_EPERM,))


# -- KVM_RUN with no guest program -------------------------------------------------------------

def test_run_without_guest_program(kvm):
    """With no guest program and no memslot at CS.base + RIP the fetch's emulation fails:
    KVM_EXIT_INTERNAL_ERROR (KVM_INTERNAL_ERROR_EMULATION); with a memslot there, executing the
    instructions is not modelled."""
    vm = kvm.create_vm(KVM_X86_DEFAULT_VM)
    vm_mem_add(vm, 0, 0, 16)
    vcpu = vm.create_vcpu(0)
    run = vcpu.run()                               # 0xffff0000 + 0xfff0: no memslot
    assert run.exit_reason == KVM_EXIT_INTERNAL_ERROR
    assert run.internal.suberror == KVM_INTERNAL_ERROR_EMULATION
    s = vcpu.get_sregs()
    s.cs.base = 0
    vcpu.set_sregs(s)
    vcpu.set_regs(rip=0x1000)
    with pytest.raises(NotModelled):
        vcpu.run()


# -- the SEV-ES VMSA ---------------------------------------------------------------------------

def test_vmsa_layout_matches_sev_snp_measure():
    """Every field offset of sevcore's VMSA layout is the one sev-snp-measure's ctypes
    SevEsSaveArea gives (struct sev_es_save_area)."""
    ssm = pytest.importorskip("sevsnpmeasure.vmsa")
    area = ssm.SevEsSaveArea
    assert ctypes.sizeof(area) == V.VMSA_SIZE
    for name, off in V.SEGMENTS.items():
        assert getattr(area, name).offset == off
    for name in ("cpl", "efer", "xss", "cr4", "cr3", "cr0", "dr7", "dr6", "cr2", "g_pat",
                 "pkru", "sev_features", "xcr0", "x87_dp", "mxcsr", "x87_ftw", "x87_fsw",
                 "x87_fcw", "x87_fop", "x87_ds", "x87_cs", "x87_rip", "fpreg_x87", "fpreg_xmm",
                 "fpreg_ymm"):
        assert getattr(area, name).offset == getattr(V, name.upper()), name
    for name, off in {**V.REGS, **V.MSRS}.items():
        assert getattr(area, name).offset == off, name


@pytest.mark.parametrize("cpu", ["EPYC-Milan", "EPYC-Genoa"])
def test_qemu_reset_vmsa_matches_sev_snp_measure(cpu):
    """A QEMU-style reset state set through KVM_SET_SREGS/REGS/FPU/XCRS/MSRS gives, through
    LAUNCH_UPDATE_VMSA's sev_es_sync_vmsa, the very bytes sev-snp-measure builds for QEMU's
    boot vCPU; the encrypted page decrypts to them too, but for the firmware's checksum."""
    ssm = pytest.importorskip("sevsnpmeasure.vmsa")
    from sevsnpmeasure.vcpu_types import CPU_SIGS
    from sevsnpmeasure.vmm_types import VMMType
    sig = CPU_SIGS[cpu]
    expected = bytes(ssm.VMSA.build_save_area(ssm.VMSA.BSP_EIP, 0, sig, VMMType.QEMU))
    kvm = sevcore.Kvm()
    vm = kvm.create_vm(KVM_X86_SEV_ES_VM)
    vm.memory_encrypt_op(KVM_SEV_INIT2)
    vm_mem_add(vm, 0, 0, 16)
    vcpu = vm.create_vcpu(0)
    qemu_reset(vcpu, sig)
    built = build_vmsa(vcpu, vm.sev.vmsa_features)
    diff = [hex(i) for i in range(V.VMSA_SIZE) if built[i] != expected[i]]
    assert diff == []
    vm_sev_launch(vm, SEV_POLICY_ES)
    page = kvm.host.umc.read(vcpu.vmsa_spa, V.VMSA_SIZE, vm.sev.asid)
    crc = slice(V.CRC_PADDR, V.CRC_PADDR + 8)
    assert page[:crc.start] + page[crc.stop:] == expected[:crc.start] + expected[crc.stop:]


def test_vmsa_carries_the_long_mode_state(kvm):
    """The VMSA of a vCPU in the selftest library's 64-bit mode has its segments in VMCB
    attribute form, CPL 0, EFER with SVME, CR0/CR3/CR4, RFLAGS, the syscall MSRs and PAT."""
    vm = kvm.create_vm(KVM_X86_SEV_ES_VM)
    vm.memory_encrypt_op(KVM_SEV_INIT2)
    vcpu = vm_vcpu_add(vm, 0)
    s = vcpu.get_sregs()
    s.cr3 = 0x5000
    s.ss.dpl = 0
    vcpu.set_sregs(s)
    vcpu.set_regs(rflags=0x202)
    vcpu.set_msrs([(MSR_LSTAR, 0xffffffff81000000), (MSR_KERNEL_GS_BASE, 0x1000),
                   (MSR_GS_BASE, 0x2000)])
    vmsa = build_vmsa(vcpu, 0)
    sel, attrib, limit, base = struct.unpack_from("<HHIQ", vmsa, V.SEGMENTS["cs"])
    assert (sel, attrib, limit, base) == (8, 0xa9b, 0xffffffff, 0)        # G | L | P | S | 0xb
    assert struct.unpack_from("<HHIQ", vmsa, V.SEGMENTS["gs"]) == (0x10, 0xc93, 0xffffffff,
                                                                     0x2000)
    assert vmsa[V.CPL] == 0
    assert vmsa_u64(vmsa, V.EFER) == EFER_LME | EFER_LMA | EFER_NX | EFER_SVME
    assert vmsa_u64(vmsa, V.CR3) == 0x5000 and vmsa_u64(vmsa, V.CR0) == s.cr0
    assert vmsa_u64(vmsa, V.CR4) == s.cr4 | X86_CR4_MCE
    assert vmsa_u64(vmsa, V.REGS["rflags"]) == 0x202
    assert vmsa_u64(vmsa, V.MSRS["lstar"]) == 0xffffffff81000000
    assert vmsa_u64(vmsa, V.MSRS["kernel_gs_base"]) == 0x1000
    assert vmsa_u64(vmsa, V.G_PAT) == MSR_IA32_CR_PAT_DEFAULT
    assert vmsa_u64(vmsa, V.DR6) == DR6_ACTIVE_LOW and vmsa_u64(vmsa, V.DR7) == DR7_FIXED_1
