"""A vCPU's segment, descriptor-table and control-register state, as KVM on SVM holds it.

KVM keeps part of it in ``vcpu->arch`` (CR0, CR2, CR3, CR4, CR8 and EFER as user space set them)
and part in the VMCB save area (segments in attribute form, the CPL, and the CR0/CR4/EFER the CPU
runs with, which ``svm_set_cr0``/``svm_set_cr4``/``svm_set_efer`` derive). :class:`X86State` is
both, so ``KVM_GET_SREGS`` reads what the kernel reads and the SEV-ES VMSA copies what
``sev_es_sync_vmsa`` copies (its ``memcpy`` of ``svm->vmcb->save``).

:class:`SregsVcpu` (a mixin of ``Vcpu``) has the ioctls: ``KVM_GET/SET_SREGS``,
``KVM_GET/SET_SREGS2``, ``KVM_GET/SET_FPU`` and ``KVM_GET/SET_MSRS``. Every check is made before
anything is written, so a refused call changes nothing.
"""
import struct
from errno import E2BIG, EINVAL

from sevcore.core.arrays import U64_MAX
from sevcore import uapi as U
from sevcore.errors import KvmError
from sevcore.kvm import fpu


#: Segment registers in VMCB save-area order (struct vmcb_save_area), with the kvm_sregs field
#: each one is exchanged through (gdtr/idtr go through struct kvm_dtable).
VMCB_SEGMENTS = ("es", "cs", "ss", "ds", "fs", "gs", "gdtr", "ldtr", "idtr", "tr")
_SREGS_SEGMENT = {"cs": "cs", "ds": "ds", "es": "es", "fs": "fs", "gs": "gs", "ss": "ss",
                  "tr": "tr", "ldt": "ldtr"}

# VMCB segment attribute bits (arch/x86/include/asm/svm.h, SVM_SELECTOR_*_SHIFT).
SVM_SELECTOR_TYPE_MASK = 0xf
SVM_SELECTOR_S_SHIFT = 4
SVM_SELECTOR_DPL_SHIFT = 5
SVM_SELECTOR_P_SHIFT = 7
SVM_SELECTOR_AVL_SHIFT = 8
SVM_SELECTOR_L_SHIFT = 9
SVM_SELECTOR_DB_SHIFT = 10
SVM_SELECTOR_G_SHIFT = 11
#: init_seg / init_sys_seg / init_vmcb: a present read/write data segment, an execute/read code
#: segment, an LDT and a 16-bit busy TSS.
_DATA_ATTRIB = 0x92
_CODE_ATTRIB = 0x9a
_LDT_ATTRIB = 0x82
_TSS_ATTRIB = 0x83

#: CR4 bits KVM knows (CR4_RESERVED_BITS is their complement, arch/x86/include/asm/kvm_host.h).
_CR4_KNOWN = (U.X86_CR4_VME | U.X86_CR4_PVI | U.X86_CR4_TSD | U.X86_CR4_DE | U.X86_CR4_PSE |
              U.X86_CR4_PAE | U.X86_CR4_MCE | U.X86_CR4_PGE | U.X86_CR4_PCE | U.X86_CR4_OSFXSR |
              U.X86_CR4_OSXMMEXCPT | U.X86_CR4_UMIP | U.X86_CR4_LA57 | U.X86_CR4_VMXE |
              U.X86_CR4_FSGSBASE | U.X86_CR4_PCIDE | U.X86_CR4_OSXSAVE | U.X86_CR4_SMEP |
              U.X86_CR4_SMAP | U.X86_CR4_PKE)
#: __cr4_reserved_bits (arch/x86/kvm/x86.h): the CR4 bit each CPUID feature allows,
#: as (bit, leaf, subleaf, register index, feature bit).
_CR4_FEATURES = (
    (U.X86_CR4_OSXSAVE, 1, 0, 2, 26), (U.X86_CR4_SMEP, 7, 0, 1, 7), (U.X86_CR4_SMAP, 7, 0, 1, 20),
    (U.X86_CR4_FSGSBASE, 7, 0, 1, 0), (U.X86_CR4_PKE, 7, 0, 2, 3), (U.X86_CR4_LA57, 7, 0, 2, 16),
    (U.X86_CR4_UMIP, 7, 0, 2, 2), (U.X86_CR4_VMXE, 1, 0, 2, 5), (U.X86_CR4_PCIDE, 1, 0, 2, 17))
#: CR8_RESERVED_BITS: only the TPR's four bits.
CR8_RESERVED_BITS = ~0xf
#: kvm_apic_set_base: bits below the base other than BSP (8), x2APIC (10) and enable (11).
_APIC_BASE_LOW_RESERVED = 0x2ff
X2APIC_ENABLE = 1 << 10
XAPIC_ENABLE = 1 << 11
#: The PAE PDPTE bits that are reserved whatever MAXPHYADDR is (reset_guest_rsvds_bits_mask).
_PDPTE_RESERVED = 0x1e6

#: MSRs an SEV-ES guest's VMSA holds without interception (direct_access_msrs with
#: ``always``, sev_es_init_vmcb): once the state is protected KVM cannot reach them
#: (sev_es_prevent_msr_access), so KVM_GET/SET_MSRS stops there.
_VMSA_ONLY_MSRS = frozenset((U.MSR_STAR, U.MSR_LSTAR, U.MSR_CSTAR, U.MSR_SYSCALL_MASK,
                             U.MSR_KERNEL_GS_BASE, U.MSR_FS_BASE, U.MSR_GS_BASE))


class VmcbSeg:
    """struct vmcb_seg: one segment register as the VMCB (and the VMSA) stores it."""

    __slots__ = ("selector", "attrib", "limit", "base")

    def __init__(self, selector=0, attrib=0, limit=0xffff, base=0):
        self.selector, self.attrib, self.limit, self.base = selector, attrib, limit, base

    def pack(self):
        return struct.pack("<HHIQ", self.selector, self.attrib, self.limit, self.base)

    def __eq__(self, other):
        return isinstance(other, VmcbSeg) and self.pack() == other.pack()

    def __repr__(self):
        return (f"VmcbSeg(selector={self.selector:#x}, attrib={self.attrib:#x}, "
                f"limit={self.limit:#x}, base={self.base:#x})")


def segment_to_vmcb(var):
    """svm_set_segment: a ``kvm_segment`` in VMCB attribute form (P only when present and
    usable)."""
    attrib = var.type & SVM_SELECTOR_TYPE_MASK
    attrib |= (var.s & 1) << SVM_SELECTOR_S_SHIFT
    attrib |= (var.dpl & 3) << SVM_SELECTOR_DPL_SHIFT
    attrib |= int(bool(var.present & 1) and not var.unusable) << SVM_SELECTOR_P_SHIFT
    attrib |= (var.avl & 1) << SVM_SELECTOR_AVL_SHIFT
    attrib |= (var.l & 1) << SVM_SELECTOR_L_SHIFT
    attrib |= (var.db & 1) << SVM_SELECTOR_DB_SHIFT
    attrib |= (var.g & 1) << SVM_SELECTOR_G_SHIFT
    return VmcbSeg(var.selector, attrib, var.limit, var.base)


def vmcb_to_segment(s, name, cpl):
    """svm_get_segment: the ``kvm_segment`` KVM reports for VMCB segment ``name``: G from the
    limit, unusable = not present, TR always busy, DS/ES/FS/GS accessed when usable, SS.DB
    cleared when unusable and SS.DPL = the CPL."""
    var = U.kvm_segment(base=s.base, limit=s.limit, selector=s.selector,
                        type=s.attrib & SVM_SELECTOR_TYPE_MASK)
    var.s = s.attrib >> SVM_SELECTOR_S_SHIFT & 1
    var.dpl = s.attrib >> SVM_SELECTOR_DPL_SHIFT & 3
    var.present = s.attrib >> SVM_SELECTOR_P_SHIFT & 1
    var.avl = s.attrib >> SVM_SELECTOR_AVL_SHIFT & 1
    var.l = s.attrib >> SVM_SELECTOR_L_SHIFT & 1
    var.db = s.attrib >> SVM_SELECTOR_DB_SHIFT & 1
    var.g = int(s.limit > 0xfffff)
    var.unusable = int(not var.present)
    if name == "tr":
        var.type |= 0x2
    elif name in ("ds", "es", "fs", "gs"):
        if not var.unusable:
            var.type |= 0x1
    elif name == "ss":
        if var.unusable:
            var.db = 0
        var.dpl = cpl
    return var


def find_cpuid_entry(entries, function, index=0):
    """kvm_find_cpuid_entry_index over ``entries``: the index counts only for leaves flagged
    KVM_CPUID_FLAG_SIGNIFCANT_INDEX."""
    for e in entries:
        if e["function"] == function and (
                not e["flags"] & U.KVM_CPUID_FLAG_SIGNIFCANT_INDEX or e["index"] == index):
            return e
    return None


def _cpuid_bit(entries, leaf, subleaf, reg, bit):
    e = find_cpuid_entry(entries, leaf, subleaf)
    return e is not None and bool((e["eax"], e["ebx"], e["ecx"], e["edx"])[reg] >> bit & 1)


def cr4_reserved_bits(entries):
    """__cr4_reserved_bits for the CPUID ``entries`` (the host's for cr4_reserved_bits, the
    guest's for cr4_guest_rsvd_bits)."""
    reserved = ~_CR4_KNOWN & U64_MAX
    for bit, leaf, subleaf, reg, feature in _CR4_FEATURES:
        if not _cpuid_bit(entries, leaf, subleaf, reg, feature):
            reserved |= bit
    return reserved


class X86State:
    """``vcpu->arch``'s control registers and EFER, and the VMCB save area's segments, CPL,
    CR0/CR4/EFER, DR7 and DR6; ``interrupt`` is the injected external interrupt (or None)."""

    def __init__(self):
        self.reset(init_event=False)

    def reset(self, init_event):
        """kvm_vcpu_reset and init_vmcb: CS 0xf000 at base 0xffff0000, the other data segments
        at 0, GDT/IDT limit 0xffff, CR0 ET|CD|NW (CD/NW kept from before on INIT, and cleared
        in the VMCB by the CD_NW_CLEARED quirk), CR4 0 (MCE in the VMCB, from the host's CR4),
        EFER 0 (SVME in the VMCB), DR6 DR6_ACTIVE_LOW, DR7 DR7_FIXED_1."""
        old_cr0 = self.cr0 if init_event else U.X86_CR0_CD | U.X86_CR0_NW
        self.seg = {name: VmcbSeg(0, _DATA_ATTRIB) for name in ("es", "ss", "ds", "fs", "gs")}
        self.seg["cs"] = VmcbSeg(0xf000, _CODE_ATTRIB, 0xffff, 0xffff0000)
        self.seg["gdtr"] = VmcbSeg()
        self.seg["idtr"] = VmcbSeg()
        self.seg["ldtr"] = VmcbSeg(0, _LDT_ATTRIB)
        self.seg["tr"] = VmcbSeg(0, _TSS_ATTRIB)
        self.cpl = 0
        self.cr2 = self.cr3 = self.cr8 = 0
        self.cr0 = self.cr4 = self.efer = 0
        self.vmcb_cr0 = self.vmcb_cr4 = 0
        self.vmcb_efer = U.EFER_SVME
        self.set_efer(0)
        self.set_cr0(U.X86_CR0_ET | (old_cr0 & (U.X86_CR0_CD | U.X86_CR0_NW)))
        self.set_cr4(0)
        self.dr6 = U.DR6_ACTIVE_LOW
        self.dr7 = U.DR7_FIXED_1
        self.interrupt = None
        self.pdptrs = [0, 0, 0, 0]

    # -- the vendor callbacks (arch/x86/kvm/svm/svm.c) ------------------------------------------

    def set_efer(self, efer):
        """svm_set_efer (NPT): vcpu->arch.efer as given; the VMCB's with SVME."""
        self.efer = efer
        self.vmcb_efer = efer | U.EFER_SVME

    def set_cr0(self, cr0):
        """svm_set_cr0: entering or leaving paging with EFER.LME sets or clears LMA (and LMA/LME
        in the VMCB); the VMCB's CR0 has CD and NW cleared (KVM_X86_QUIRK_CD_NW_CLEARED)."""
        if self.efer & U.EFER_LME:
            paging = bool(self.cr0 & U.X86_CR0_PG)
            if not paging and cr0 & U.X86_CR0_PG:
                self.efer |= U.EFER_LMA
                self.vmcb_efer |= U.EFER_LMA | U.EFER_LME
            if paging and not cr0 & U.X86_CR0_PG:
                self.efer &= ~U.EFER_LMA
                self.vmcb_efer &= ~(U.EFER_LMA | U.EFER_LME)
        self.cr0 = cr0
        self.vmcb_cr0 = cr0 & ~(U.X86_CR0_CD | U.X86_CR0_NW)

    def set_cr4(self, cr4):
        """svm_set_cr4 (NPT): the VMCB's CR4 also has the host's CR4.MCE, which Linux sets."""
        self.cr4 = cr4
        self.vmcb_cr4 = cr4 | U.X86_CR4_MCE

    def set_segment(self, name, var):
        """svm_set_segment; loading SS sets the CPL to SS.DPL."""
        self.seg[name] = segment_to_vmcb(var)
        if name == "ss":
            self.cpl = var.dpl & 3

    # -- the vCPU's mode ---------------------------------------------------------------------------

    def is_long_mode(self):
        """is_long_mode: EFER.LMA."""
        return bool(self.efer & U.EFER_LMA)

    def is_64_bit_mode(self):
        """is_64_bit_mode: long mode with CS.L (else compatibility, protected or real mode)."""
        return self.is_long_mode() and bool(self.seg["cs"].attrib >> SVM_SELECTOR_L_SHIFT & 1)

    def is_pae_paging(self):
        """is_pae_paging: CR0.PG and CR4.PAE outside long mode."""
        return bool(self.cr0 & U.X86_CR0_PG and self.cr4 & U.X86_CR4_PAE) and \
            not self.is_long_mode()

    def fetch_gpa(self, rip):
        """The address of the instruction at ``rip`` while paging is off: CS.base + RIP, in 32
        bits (without paging there is no long mode); None with paging on, where the guest's page
        tables would translate it."""
        if self.cr0 & U.X86_CR0_PG:
            return None
        return (self.seg["cs"].base + rip) & 0xffffffff

    def snapshot(self):
        """Everything, for tests that check a refused call changed nothing."""
        return ({k: v.pack() for k, v in self.seg.items()}, self.cpl, self.cr0, self.cr2,
                self.cr3, self.cr4, self.cr8, self.efer, self.vmcb_cr0, self.vmcb_cr4,
                self.vmcb_efer, self.dr6, self.dr7, self.interrupt, tuple(self.pdptrs))


def _check_struct(value, cls):
    if not isinstance(value, cls):
        raise TypeError(f"expected struct {cls.__name__}, got {type(value).__name__}")


class SregsVcpu:
    """Mixin of Vcpu: the segment/control-register, legacy FPU and MSR ioctls."""

    # -- what the checks need from the vCPU's CPUID ------------------------------------------------

    def _maxphyaddr(self):
        """cpuid_query_maxphyaddr: CPUID 0x80000008 EAX[7:0], 36 without the leaf."""
        e = self.cpuid_entry(0x80000008)
        return e["eax"] & 0xff if e else 36

    def _reserved_gpa_bits(self):
        """vcpu->arch.reserved_gpa_bits: bits from MAXPHYADDR up, less the C-bit of an SEV
        guest (svm_vcpu_after_set_cpuid)."""
        bits = U64_MAX & ~((1 << self._maxphyaddr()) - 1)
        if self.vm.sev.active:
            e = self.cpuid_entry(0x8000001F)
            if e:
                bits &= ~(1 << (e["ebx"] & 0x3f))
        return bits

    def _is_valid_cr0(self, cr0):
        """kvm_is_valid_cr0 (svm_is_valid_cr0 allows the rest)."""
        if cr0 >> 32:
            return False
        if cr0 & U.X86_CR0_NW and not cr0 & U.X86_CR0_CD:
            return False
        return not (cr0 & U.X86_CR0_PG and not cr0 & U.X86_CR0_PE)

    def _is_valid_cr4(self, cr4):
        """kvm_is_valid_cr4: no bit reserved for the host (cr4_reserved_bits) or the guest's
        CPUID (cr4_guest_rsvd_bits)."""
        reserved = cr4_reserved_bits(self._supported_cpuid()) | cr4_reserved_bits(self.cpuid)
        return not cr4 & reserved

    def _is_valid_sregs(self, s):
        """kvm_is_valid_sregs: EFER.LME with CR0.PG needs CR4.PAE, EFER.LMA and a legal CR3;
        otherwise neither EFER.LMA nor CS.L; then CR4 and CR0."""
        if s.efer & U.EFER_LME and s.cr0 & U.X86_CR0_PG:
            if not s.cr4 & U.X86_CR4_PAE or not s.efer & U.EFER_LMA:
                return "EFER.LME and CR0.PG without CR4.PAE or EFER.LMA"
            if s.cr3 & self._reserved_gpa_bits():
                return f"CR3 {s.cr3:#x} beyond MAXPHYADDR"
        elif s.efer & U.EFER_LMA or s.cs.l:
            return "EFER.LMA or CS.L outside long mode"
        if not self._is_valid_cr4(s.cr4):
            return f"CR4 {s.cr4:#x} has reserved bits"
        if not self._is_valid_cr0(s.cr0):
            return f"CR0 {s.cr0:#x} is invalid"
        return None

    def _apic_base_refused(self, value):
        """kvm_apic_set_base for a host-initiated write: the reason it fails, or None."""
        if value == self.msrs.values[U.MSR_IA32_APICBASE]:
            return None
        x2apic = _cpuid_bit(self.cpuid, 1, 0, 2, 21)
        reserved = self._reserved_gpa_bits() | _APIC_BASE_LOW_RESERVED | \
            (0 if x2apic else X2APIC_ENABLE)
        if value & reserved:
            return f"APIC base {value:#x} has reserved bits"
        if value & X2APIC_ENABLE and not value & XAPIC_ENABLE:
            return "APIC base enables x2APIC without xAPIC"
        return None

    # -- KVM_GET/SET_SREGS(2) ----------------------------------------------------------------------

    def _get_sregs_common(self, s):
        """__get_sregs_common: segments, descriptor tables, CR2 and CR3 only while the state is
        not protected; CR0, CR4, CR8, EFER and the APIC base always."""
        x = self.x86
        if not self.guest_state_protected:
            for field, name in _SREGS_SEGMENT.items():
                setattr(s, field, vmcb_to_segment(x.seg[name], name, x.cpl))
            for field, name in (("gdt", "gdtr"), ("idt", "idtr")):
                setattr(s, field, U.kvm_dtable(base=x.seg[name].base,
                                               limit=x.seg[name].limit & 0xffff))
            s.cr2, s.cr3 = x.cr2, x.cr3
        s.cr0, s.cr4, s.cr8, s.efer = x.cr0, x.cr4, x.cr8, x.efer
        s.apic_base = self.msrs.values[U.MSR_IA32_APICBASE]
        return s

    def get_sregs(self):
        """Mirrors ``KVM_GET_SREGS``: a ``kvm_sregs`` (the injected interrupt, if any, in
        ``interrupt_bitmap``); EINVAL once the state of an SEV-ES/SNP-type VM is protected."""
        self._state_ioctl("KVM_GET_SREGS")
        s = self._get_sregs_common(U.kvm_sregs())
        if not self.guest_state_protected and self.x86.interrupt is not None:
            n = self.x86.interrupt
            s.interrupt_bitmap[n // 64] |= 1 << (n % 64)
        return s

    def get_sregs2(self):
        """Mirrors ``KVM_GET_SREGS2``: a ``kvm_sregs2``, with the PDPTRs and
        KVM_SREGS2_FLAGS_PDPTRS_VALID under PAE paging; EINVAL once the state is protected."""
        self._state_ioctl("KVM_GET_SREGS2")
        s = self._get_sregs_common(U.kvm_sregs2())
        if not self.guest_state_protected and self.x86.is_pae_paging():
            s.pdptrs[:] = self.x86.pdptrs
            s.flags |= U.KVM_SREGS2_FLAGS_PDPTRS_VALID
        return s

    def _set_sregs_common(self, ioctl, s, update_pdptrs):
        """__set_sregs_common, all checks first: kvm_is_valid_sregs and the APIC base (EINVAL);
        a protected vCPU takes the APIC base only. Then the IDT and GDT, CR2, CR3, CR8 (kept
        when it has reserved bits, as kvm_set_cr8 refuses it), EFER, CR0, CR4 through the SVM
        callbacks, the segments, and the PAE PDPTRs from guest memory."""
        why = self._is_valid_sregs(s) or self._apic_base_refused(s.apic_base)
        if why:
            raise KvmError(EINVAL, ioctl, why)
        self.msrs.values[U.MSR_IA32_APICBASE] = s.apic_base
        if self.guest_state_protected:
            return
        x = self.x86
        x.seg["idtr"] = VmcbSeg(0, 0, s.idt.limit, s.idt.base)
        x.seg["gdtr"] = VmcbSeg(0, 0, s.gdt.limit, s.gdt.base)
        x.cr2, x.cr3 = s.cr2, s.cr3
        if not s.cr8 & CR8_RESERVED_BITS:
            x.cr8 = s.cr8
        x.set_efer(s.efer)
        x.set_cr0(s.cr0)
        x.set_cr4(s.cr4)
        for field, name in _SREGS_SEGMENT.items():
            x.set_segment(name, getattr(s, field))
        if update_pdptrs and x.is_pae_paging():
            self._load_pdptrs(x.cr3)

    def _load_pdptrs(self, cr3):
        """load_pdptrs: the four PDPTEs at CR3 (32-byte aligned), through the memslot's VMM
        mapping; nothing changes if no memslot backs them or a present entry has reserved
        bits."""
        gpa = cr3 & 0xffffffe0
        s = self.vm.gfn_to_memslot(gpa >> U.PAGE_SHIFT)
        if s is None:
            return
        hva = s.userspace_addr + gpa - (s.base_gfn << U.PAGE_SHIFT)
        ptes = struct.unpack("<4Q", self.vm.kvm.read(hva, 32))
        reserved = (U64_MAX & ~((1 << self._maxphyaddr()) - 1)) | _PDPTE_RESERVED
        if any(p & 1 and p & reserved for p in ptes):
            return
        self.x86.pdptrs = list(ptes)

    def set_sregs(self, sregs):
        """Mirrors ``KVM_SET_SREGS`` with a ``kvm_sregs``; the lowest vector set in
        ``interrupt_bitmap`` becomes the injected interrupt. EINVAL for invalid CR0/CR4/EFER
        combinations or APIC base, and once the state of an SEV-ES/SNP-type VM is protected."""
        ioctl = "KVM_SET_SREGS"
        _check_struct(sregs, U.kvm_sregs)
        s = U.kvm_sregs.from_buffer_copy(sregs)
        self._state_ioctl(ioctl)
        self._set_sregs_common(ioctl, s, True)
        if self.guest_state_protected:
            return 0
        bits = sum(w << (64 * i) for i, w in enumerate(s.interrupt_bitmap))
        if bits:                          # __set_sregs: kvm_queue_interrupt(first bit)
            self.x86.interrupt = (bits & -bits).bit_length() - 1
        return 0

    def set_sregs2(self, sregs2):
        """Mirrors ``KVM_SET_SREGS2`` with a ``kvm_sregs2``: as KVM_SET_SREGS, and with
        KVM_SREGS2_FLAGS_PDPTRS_VALID the PDPTRs user space gives. EINVAL for other flags, or
        PDPTRs outside PAE paging or for a protected vCPU."""
        ioctl = "KVM_SET_SREGS2"
        _check_struct(sregs2, U.kvm_sregs2)
        s = U.kvm_sregs2.from_buffer_copy(sregs2)
        self._state_ioctl(ioctl)
        valid_pdptrs = bool(s.flags & U.KVM_SREGS2_FLAGS_PDPTRS_VALID)
        pae = bool(s.cr0 & U.X86_CR0_PG and s.cr4 & U.X86_CR4_PAE) and not s.efer & U.EFER_LMA
        if s.flags & ~U.KVM_SREGS2_FLAGS_PDPTRS_VALID:
            raise KvmError(EINVAL, ioctl, f"flags {s.flags:#x}")
        if valid_pdptrs and (not pae or self.guest_state_protected):
            raise KvmError(EINVAL, ioctl, "PDPTRs outside PAE paging")
        self._set_sregs_common(ioctl, s, not valid_pdptrs)
        if valid_pdptrs:
            self.x86.pdptrs = list(s.pdptrs)
        return 0

    # -- KVM_GET/SET_FPU ---------------------------------------------------------------------------

    def get_fpu(self):
        """Mirrors ``KVM_GET_FPU``: a ``kvm_fpu`` from the legacy FXSAVE region (MXCSR is not
        copied, as the kernel does not). Once the FPU state is confidential: EINVAL on an
        SEV-ES/SNP-type VM, zeros on a legacy one."""
        ioctl = "KVM_GET_FPU"
        self._enter(ioctl)
        out = U.kvm_fpu()
        if self.fpu_confidential:
            if self.vm.has_protected_state:
                raise KvmError(EINVAL, ioctl, "FPU state is confidential")
            return out
        img = self.fpu
        # fxregs_state's twd is a u16; kvm_fpu's ftwx takes its low byte.
        out.fcw, out.fsw, twd, out.last_opcode, out.last_ip, out.last_dp = \
            struct.unpack_from("<HHHHQQ", img, 0)
        out.ftwx = twd & 0xff
        for i in range(8):
            s = fpu.XSAVE_ST_OFFSET + 16 * i
            out.fpr[i][:] = img[s:s + 16]
        for i in range(16):
            s = fpu.XSAVE_XMM_OFFSET + 16 * i
            out.xmm[i][:] = img[s:s + 16]
        return out

    def set_fpu(self, kvm_fpu):
        """Mirrors ``KVM_SET_FPU``: the ``kvm_fpu`` fields into the legacy FXSAVE region (not
        MXCSR, not XSTATE_BV). Once the FPU state is confidential: EINVAL on an SEV-ES/SNP-type
        VM, ignored on a legacy one."""
        ioctl = "KVM_SET_FPU"
        _check_struct(kvm_fpu, U.kvm_fpu)
        f = U.kvm_fpu.from_buffer_copy(kvm_fpu)
        self._enter(ioctl)
        if self.fpu_confidential:
            if self.vm.has_protected_state:
                raise KvmError(EINVAL, ioctl, "FPU state is confidential")
            return 0
        img = self.fpu
        struct.pack_into("<HHHHQQ", img, 0, f.fcw, f.fsw, f.ftwx, f.last_opcode, f.last_ip,
                         f.last_dp)                # twd (u16) = ftwx
        img[fpu.XSAVE_ST_OFFSET:fpu.XSAVE_ST_OFFSET + 128] = bytes(f.fpr)
        img[fpu.XSAVE_XMM_OFFSET:fpu.XSAVE_XMM_OFFSET + 256] = bytes(f.xmm)
        return 0

    # -- KVM_GET/SET_MSRS --------------------------------------------------------------------------

    def _msr_io(self, ioctl, n):
        self._enter(ioctl)
        if n >= U.MAX_IO_MSRS:
            raise KvmError(E2BIG, ioctl, f"{n} MSRs (MAX_IO_MSRS is {U.MAX_IO_MSRS})")

    def _host_msr_blocked(self, index):
        return self.guest_state_protected and index in _VMSA_ONLY_MSRS

    def get_msrs(self, indices):
        """Mirrors ``KVM_GET_MSRS``: ``[(index, data)]`` for the MSRs read, stopping at the first
        one KVM does not emulate (the ioctl's return value is the list's length). E2BIG for
        MAX_IO_MSRS entries or more."""
        indices = [int(i) & 0xffffffff for i in indices]
        self._msr_io("KVM_GET_MSRS", len(indices))
        out = []
        for index in indices:               # msr_io: stop at the first failure
            if self._host_msr_blocked(index):
                break
            ret, value = self.msrs.get(index)
            if ret:
                break
            out.append((index, value))
        return out

    def set_msrs(self, entries):
        """Mirrors ``KVM_SET_MSRS`` (host-initiated writes, no MSR filter): ``entries`` are
        ``(index, data)`` pairs; returns how many were written before the first refused one.
        E2BIG for MAX_IO_MSRS entries or more."""
        entries = [(int(i) & 0xffffffff, int(d) & U64_MAX) for i, d in entries]
        self._msr_io("KVM_SET_MSRS", len(entries))
        for n, (index, data) in enumerate(entries):
            if self._host_msr_blocked(index):
                return n
            if index == U.MSR_IA32_APICBASE:
                if self._apic_base_refused(data):
                    return n
                self.msrs.values[index] = data
                continue
            if self.msrs.set(index, data, host_initiated=True):
                return n
        return len(entries)
