"""The VMSA: the 4 KiB save area an SEV-ES guest's state lives in (``struct sev_es_save_area``,
arch/x86/include/asm/svm.h; AMD64 APM vol. 2, table B-4). One layout for KVM, which builds it
(``sev_es_sync_vmsa``), the firmware, which measures and checksums it, and the CPU, which loads
it on VMRUN."""

VMSA_SIZE = 4096

#: struct vmcb_seg (selector u16, attrib u16, limit u32, base u64) of each segment register, in
#: save-area order from offset 0.
SEGMENTS = {name: 16 * i for i, name in enumerate(
    ("es", "cs", "ss", "ds", "fs", "gs", "gdtr", "ldtr", "idtr", "tr"))}
SEG_SIZE = 16
CS_SELECTOR = 0x010
CS_BASE = 0x018
CPL = 0x0cb
EFER = 0x0d0
XSS = 0x140
CR4 = 0x148
CR3 = 0x150
CR0 = 0x158
DR7 = 0x160
DR6 = 0x168
#: The syscall/sysenter MSRs, CR2 and PAT, by name (u64 each).
MSRS = {"star": 0x200, "lstar": 0x208, "cstar": 0x210, "sfmask": 0x218, "kernel_gs_base": 0x220,
        "sysenter_cs": 0x228, "sysenter_esp": 0x230, "sysenter_eip": 0x238}
CR2 = 0x240
G_PAT = 0x268
#: The end of struct vmcb_save_area (spec_ctrl is its last field): what sev_es_sync_vmsa copies
#: from the VMCB before it writes the rest.
VMCB_SAVE_SIZE = 0x2e8
PKRU = 0x2e8

#: The general-purpose registers and RFLAGS/RIP, by ``struct kvm_regs`` field name.
REGS = {"rflags": 0x170, "rip": 0x178, "rsp": 0x1d8, "rax": 0x1f8, "rcx": 0x308, "rdx": 0x310,
        "rbx": 0x318, "rbp": 0x328, "rsi": 0x330, "rdi": 0x338,
        **{f"r{i}": 0x340 + 8 * (i - 8) for i in range(8, 16)}}

#: The firmware's checksum of an SEV-ES VMSA: the physical address of its block at CRC_PADDR
#: (0x380 holds 8 zero bytes), computed over the VMSA up to CRC_SIZE (the SEV firmware's
#: sev_es.h).
CRC_PADDR = 0x388
CRC_SIZE = 0xFC0

SEV_FEATURES = 0x3b0
XCR0 = 0x3e8

# The x87/SSE/AVX area.
X87_DP = 0x400
MXCSR = 0x408
X87_FTW = 0x40c
X87_FSW = 0x40e
X87_FCW = 0x410
X87_FOP = 0x412
X87_DS = 0x414
X87_CS = 0x416
X87_RIP = 0x418
FPREG_X87 = 0x420
FPREG_XMM = 0x470
FPREG_YMM = 0x570
