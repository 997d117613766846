"""The vCPU state QEMU gives at reset (target/i386/cpu.c ``x86_cpu_reset``), put through KVM the
way ``kvm_arch_put_registers`` (target/i386/kvm.c) does; for an SEV-ES AP, CS:IP is the reset
vector the firmware's reset block names (target/i386/sev.c ``sev_es_set_reset_vector``)."""
from sevcore.uapi import (MSR_IA32_CR_PAT, MSR_IA32_CR_PAT_DEFAULT, X86_CR0_CD, X86_CR0_ET,
                          X86_CR0_NW, XCR_XFEATURE_ENABLED_MASK, XFEATURE_MASK_FP, kvm_dtable,
                          kvm_fpu, kvm_segment, kvm_sregs)

BSP_RESET_EIP = 0xfffffff0


def qemu_reset(vcpu, signature, reset_eip=BSP_RESET_EIP):
    """Set ``vcpu`` to QEMU's reset state through KVM_SET_SREGS, KVM_SET_REGS, KVM_SET_FPU,
    KVM_SET_XCRS and KVM_SET_MSRS, RDX holding the CPUID signature, starting at ``reset_eip``
    (CS base its upper 16 bits, RIP its lower 16)."""
    s = kvm_sregs()
    data = dict(limit=0xffff, type=3, s=1, present=1)
    for name in ("ds", "es", "fs", "gs", "ss"):
        setattr(s, name, kvm_segment(**data))
    s.cs = kvm_segment(selector=0xf000, base=reset_eip & 0xffff0000, limit=0xffff, type=0xb,
                       s=1, present=1)
    s.ldt = kvm_segment(limit=0xffff, type=2, present=1)
    s.tr = kvm_segment(limit=0xffff, type=0xb, present=1)
    s.gdt = kvm_dtable(limit=0xffff)
    s.idt = kvm_dtable(limit=0xffff)
    s.cr0 = X86_CR0_CD | X86_CR0_NW | X86_CR0_ET
    s.apic_base = 0xfee00900
    vcpu.set_sregs(s)
    vcpu.set_regs(**dict.fromkeys(("rax", "rbx", "rcx", "rsi", "rdi", "rsp", "rbp"), 0),
                  rdx=signature, rip=reset_eip & 0xffff, rflags=2)
    vcpu.set_fpu(kvm_fpu(fcw=0x37f))
    vcpu.set_xcrs([(XCR_XFEATURE_ENABLED_MASK, XFEATURE_MASK_FP)])
    vcpu.set_msrs([(MSR_IA32_CR_PAT, MSR_IA32_CR_PAT_DEFAULT)])
