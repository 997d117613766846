"""Constants of the Linux KVM user-space API, under their exact kernel names.

Values are those of ``include/uapi/linux/kvm.h``, ``arch/x86/include/uapi/asm/kvm.h``,
``include/uapi/linux/kvm_para.h`` and ``arch/x86/include/uapi/asm/kvm_para.h`` (read from QEMU's
copy of the headers, synced from about v6.18), so that ``grep`` finds the same name in the kernel,
in a VMM and here. ``from sevcore.uapi import *`` exports every upper-case name.
"""

PAGE_SHIFT = 12
PAGE_SIZE = 1 << PAGE_SHIFT
KVM_API_VERSION = 12
KVMIO = 0xAE

# --- ioctl numbers (asm-generic/ioctl.h encoding) ----------------------------------------------

_IOC_NONE, _IOC_WRITE, _IOC_READ = 0, 1, 2


def _IOC(direction, nr, size):
    return (direction << 30) | (size << 16) | (KVMIO << 8) | nr


def _IO(nr):
    return _IOC(_IOC_NONE, nr, 0)


def _IOW(nr, size):
    return _IOC(_IOC_WRITE, nr, size)


def _IOR(nr, size):
    return _IOC(_IOC_READ, nr, size)


def _IOWR(nr, size):
    return _IOC(_IOC_READ | _IOC_WRITE, nr, size)


KVM_GET_API_VERSION = _IO(0x00)
KVM_CREATE_VM = _IO(0x01)
KVM_CHECK_EXTENSION = _IO(0x03)
KVM_GET_VCPU_MMAP_SIZE = _IO(0x04)
KVM_CREATE_VCPU = _IO(0x41)
KVM_GET_DIRTY_LOG = _IOW(0x42, 16)                      # struct kvm_dirty_log
KVM_SET_USER_MEMORY_REGION = _IOW(0x46, 32)             # struct kvm_userspace_memory_region
KVM_SET_USER_MEMORY_REGION2 = _IOW(0x49, 160)           # struct kvm_userspace_memory_region2
KVM_RUN = _IO(0x80)
KVM_ENABLE_CAP = _IOW(0xa3, 104)                        # struct kvm_enable_cap
KVM_MEMORY_ENCRYPT_OP = _IOWR(0xba, 8)                  # unsigned long (a struct kvm_sev_cmd *)
KVM_MEMORY_ENCRYPT_REG_REGION = _IOR(0xbb, 16)          # struct kvm_enc_region
KVM_MEMORY_ENCRYPT_UNREG_REGION = _IOR(0xbc, 16)
KVM_CLEAR_DIRTY_LOG = _IOWR(0xc0, 24)                   # struct kvm_clear_dirty_log
KVM_X86_SET_MSR_FILTER = _IOW(0xc6, 392)                # struct kvm_msr_filter
KVM_SET_MEMORY_ATTRIBUTES = _IOW(0xd2, 32)              # struct kvm_memory_attributes
KVM_CREATE_GUEST_MEMFD = _IOWR(0xd4, 64)                # struct kvm_create_guest_memfd

# --- VM types (arch/x86/include/uapi/asm/kvm.h) -------------------------------------------------

KVM_X86_DEFAULT_VM = 0
KVM_X86_SW_PROTECTED_VM = 1
KVM_X86_SEV_VM = 2
KVM_X86_SEV_ES_VM = 3
KVM_X86_SNP_VM = 4
KVM_X86_TDX_VM = 5

# --- capabilities ---------------------------------------------------------------------------------

KVM_CAP_USER_MEMORY = 3
KVM_CAP_NR_VCPUS = 9
KVM_CAP_NR_MEMSLOTS = 10
KVM_CAP_MAX_VCPUS = 66
KVM_CAP_SYNC_REGS = 74
KVM_CAP_READONLY_MEM = 81
KVM_CAP_ENABLE_CAP_VM = 98
KVM_CAP_CHECK_EXTENSION_VM = 105
KVM_CAP_X86_SMM = 117
KVM_CAP_MULTI_ADDRESS_SPACE = 118
KVM_CAP_MAX_VCPU_ID = 128
KVM_CAP_X86_DISABLE_EXITS = 143
KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2 = 168
KVM_CAP_X86_USER_SPACE_MSR = 188
KVM_CAP_X86_MSR_FILTER = 189
KVM_CAP_ENFORCE_PV_FEATURE_CPUID = 190
KVM_CAP_DIRTY_LOG_RING = 192
KVM_CAP_VM_COPY_ENC_CONTEXT_FROM = 197
KVM_CAP_EXIT_HYPERCALL = 201
KVM_CAP_VM_MOVE_ENC_CONTEXT_FROM = 206
KVM_CAP_DIRTY_LOG_RING_ACQ_REL = 223
KVM_CAP_DIRTY_LOG_RING_WITH_BITMAP = 225
KVM_CAP_USER_MEMORY2 = 231
KVM_CAP_MEMORY_FAULT_INFO = 232
KVM_CAP_MEMORY_ATTRIBUTES = 233
KVM_CAP_GUEST_MEMFD = 234
KVM_CAP_VM_TYPES = 235
KVM_CAP_PRE_FAULT_MEMORY = 236
KVM_CAP_GUEST_MEMFD_FLAGS = 244

# --- exit reasons ---------------------------------------------------------------------------------

KVM_EXIT_UNKNOWN = 0
KVM_EXIT_EXCEPTION = 1
KVM_EXIT_IO = 2
KVM_EXIT_HYPERCALL = 3
KVM_EXIT_DEBUG = 4
KVM_EXIT_HLT = 5
KVM_EXIT_MMIO = 6
KVM_EXIT_SHUTDOWN = 8
KVM_EXIT_FAIL_ENTRY = 9
KVM_EXIT_INTR = 10
KVM_EXIT_INTERNAL_ERROR = 17
KVM_EXIT_SYSTEM_EVENT = 24
KVM_EXIT_X86_RDMSR = 29
KVM_EXIT_X86_WRMSR = 30
KVM_EXIT_DIRTY_RING_FULL = 31
KVM_EXIT_MEMORY_FAULT = 39
KVM_EXIT_TDX = 40

KVM_INTERNAL_ERROR_EMULATION = 1
KVM_INTERNAL_ERROR_SIMUL_EX = 2
KVM_INTERNAL_ERROR_DELIVERY_EV = 3
KVM_INTERNAL_ERROR_UNEXPECTED_EXIT_REASON = 4

KVM_SYSTEM_EVENT_SHUTDOWN = 1
KVM_SYSTEM_EVENT_RESET = 2
KVM_SYSTEM_EVENT_CRASH = 3
KVM_SYSTEM_EVENT_SEV_TERM = 6

# --- memory slots ---------------------------------------------------------------------------------

KVM_MEM_LOG_DIRTY_PAGES = 1 << 0
KVM_MEM_READONLY = 1 << 1
KVM_MEM_GUEST_MEMFD = 1 << 2
KVM_MEMSLOT_INVALID = 1 << 16          # kernel-internal (include/linux/kvm_host.h)
KVM_MEMSLOT_GMEM_ONLY = 1 << 17        # kernel-internal

KVM_MEM_SLOTS_NUM = 32767              # SHRT_MAX
KVM_INTERNAL_MEM_SLOTS = 3             # x86: APIC access page, identity map, TSS
KVM_USER_MEM_SLOTS = KVM_MEM_SLOTS_NUM - KVM_INTERNAL_MEM_SLOTS
KVM_MEM_MAX_NR_PAGES = (1 << 31) - 1
KVM_ADDRESS_SPACE_NUM = 2              # KVM_MAX_NR_ADDRESS_SPACES with CONFIG_KVM_SMM

# --- guest_memfd and memory attributes --------------------------------------------------------------

GUEST_MEMFD_FLAG_MMAP = 1 << 0
GUEST_MEMFD_FLAG_INIT_SHARED = 1 << 1
KVM_MEMORY_ATTRIBUTE_PRIVATE = 1 << 3
KVM_MEMORY_EXIT_FLAG_PRIVATE = 1 << 3

# fallocate(2) modes (linux/falloc.h)
FALLOC_FL_KEEP_SIZE = 0x01
FALLOC_FL_PUNCH_HOLE = 0x02

# --- dirty logging --------------------------------------------------------------------------------------

KVM_DIRTY_LOG_MANUAL_PROTECT_ENABLE = 1 << 0
KVM_DIRTY_LOG_INITIALLY_SET = 1 << 1
KVM_DIRTY_LOG_MANUAL_CAPS = KVM_DIRTY_LOG_MANUAL_PROTECT_ENABLE | KVM_DIRTY_LOG_INITIALLY_SET

# --- hypercalls (include/uapi/linux/kvm_para.h) ----------------------------------------------------------

KVM_ENOSYS = 1000
KVM_EFAULT = 14
KVM_EINVAL = 22
KVM_E2BIG = 7
KVM_EPERM = 1
KVM_EOPNOTSUPP = 95

KVM_HC_VAPIC_POLL_IRQ = 1
KVM_HC_MMU_OP = 2
KVM_HC_FEATURES = 3
KVM_HC_PPC_MAP_MAGIC_PAGE = 4
KVM_HC_KICK_CPU = 5
KVM_HC_CLOCK_PAIRING = 9
KVM_HC_SEND_IPI = 10
KVM_HC_SCHED_YIELD = 11
KVM_HC_MAP_GPA_RANGE = 12

KVM_EXIT_HYPERCALL_LONG_MODE = 1 << 0
KVM_EXIT_HYPERCALL_VALID_MASK = 1 << KVM_HC_MAP_GPA_RANGE

KVM_MAP_GPA_RANGE_PAGE_SZ_4K = 0
KVM_MAP_GPA_RANGE_PAGE_SZ_2M = 1 << 0
KVM_MAP_GPA_RANGE_PAGE_SZ_1G = 1 << 1


def KVM_MAP_GPA_RANGE_ENC_STAT(n):
    return n << 4


KVM_MAP_GPA_RANGE_ENCRYPTED = KVM_MAP_GPA_RANGE_ENC_STAT(1)
KVM_MAP_GPA_RANGE_DECRYPTED = KVM_MAP_GPA_RANGE_ENC_STAT(0)

# --- paravirt CPUID and MSRs (arch/x86/include/uapi/asm/kvm_para.h) ---------------------------------------

KVM_CPUID_SIGNATURE = 0x40000000
KVM_CPUID_FEATURES = 0x40000001

KVM_FEATURE_CLOCKSOURCE = 0
KVM_FEATURE_NOP_IO_DELAY = 1
KVM_FEATURE_MMU_OP = 2
KVM_FEATURE_CLOCKSOURCE2 = 3
KVM_FEATURE_ASYNC_PF = 4
KVM_FEATURE_STEAL_TIME = 5
KVM_FEATURE_PV_EOI = 6
KVM_FEATURE_PV_UNHALT = 7
KVM_FEATURE_PV_TLB_FLUSH = 9
KVM_FEATURE_ASYNC_PF_VMEXIT = 10
KVM_FEATURE_PV_SEND_IPI = 11
KVM_FEATURE_POLL_CONTROL = 12
KVM_FEATURE_PV_SCHED_YIELD = 13
KVM_FEATURE_ASYNC_PF_INT = 14
KVM_FEATURE_MSI_EXT_DEST_ID = 15
KVM_FEATURE_HC_MAP_GPA_RANGE = 16
KVM_FEATURE_MIGRATION_CONTROL = 17
KVM_FEATURE_CLOCKSOURCE_STABLE_BIT = 24

MSR_KVM_WALL_CLOCK = 0x11
MSR_KVM_SYSTEM_TIME = 0x12
MSR_KVM_WALL_CLOCK_NEW = 0x4b564d00
MSR_KVM_SYSTEM_TIME_NEW = 0x4b564d01
MSR_KVM_ASYNC_PF_EN = 0x4b564d02
MSR_KVM_STEAL_TIME = 0x4b564d03
MSR_KVM_PV_EOI_EN = 0x4b564d04
MSR_KVM_POLL_CONTROL = 0x4b564d05
MSR_KVM_ASYNC_PF_INT = 0x4b564d06
MSR_KVM_ASYNC_PF_ACK = 0x4b564d07
MSR_KVM_MIGRATION_CONTROL = 0x4b564d08
KVM_MIGRATION_READY = 1 << 0

# --- user-space MSR exits and filters (linux/kvm.h, asm/kvm.h) ---------------------------------------------

KVM_MSR_EXIT_REASON_INVAL = 1 << 0
KVM_MSR_EXIT_REASON_UNKNOWN = 1 << 1
KVM_MSR_EXIT_REASON_FILTER = 1 << 2
KVM_MSR_EXIT_REASON_VALID_MASK = (KVM_MSR_EXIT_REASON_INVAL | KVM_MSR_EXIT_REASON_UNKNOWN
                                  | KVM_MSR_EXIT_REASON_FILTER)

KVM_MSR_FILTER_MAX_RANGES = 16
KVM_MSR_FILTER_READ = 1 << 0
KVM_MSR_FILTER_WRITE = 1 << 1
KVM_MSR_FILTER_RANGE_VALID_MASK = KVM_MSR_FILTER_READ | KVM_MSR_FILTER_WRITE
KVM_MSR_FILTER_DEFAULT_ALLOW = 0 << 0
KVM_MSR_FILTER_DEFAULT_DENY = 1 << 0
KVM_MSR_FILTER_VALID_MASK = KVM_MSR_FILTER_DEFAULT_DENY
KVM_MSR_FILTER_MAX_BITMAP_SIZE = 0x600

# --- vCPUs, exits and exits control ---------------------------------------------------------------------------

KVM_MAX_VCPUS = 4096
KVM_MAX_VCPU_IDS = 4096
KVM_EXIT_IO_IN = 0
KVM_EXIT_IO_OUT = 1
KVM_X86_DISABLE_EXITS_MWAIT = 1 << 0
KVM_X86_DISABLE_EXITS_HLT = 1 << 1
KVM_X86_DISABLE_EXITS_PAUSE = 1 << 2
KVM_X86_DISABLE_EXITS_CSTATE = 1 << 3
KVM_X86_DISABLE_VALID_EXITS = (KVM_X86_DISABLE_EXITS_MWAIT | KVM_X86_DISABLE_EXITS_HLT
                               | KVM_X86_DISABLE_EXITS_PAUSE | KVM_X86_DISABLE_EXITS_CSTATE)
#: Exception vectors a guest sees (arch/x86/include/asm/trapnr.h).
GP_VECTOR = 13

# --- architectural MSRs the simulated KVM emulates (arch/x86/include/asm/msr-index.h) -------------------------

MSR_IA32_TSC = 0x10
MSR_IA32_APICBASE = 0x1b
MSR_IA32_FLUSH_CMD = 0x10b
MSR_IA32_MISC_ENABLE = 0x1a0
MSR_IA32_POWER_CTL = 0x1fc
MSR_IA32_CR_PAT = 0x277
MSR_IA32_XSS = 0xda0
MSR_EFER = 0xc0000080
MSR_STAR = 0xc0000081
MSR_LSTAR = 0xc0000082
MSR_CSTAR = 0xc0000083
MSR_SYSCALL_MASK = 0xc0000084
MSR_FS_BASE = 0xc0000100
MSR_GS_BASE = 0xc0000101
MSR_KERNEL_GS_BASE = 0xc0000102
MSR_TSC_AUX = 0xc0000103
L1D_FLUSH = 1 << 0

__all__ = [name for name in dir() if name[:1].isupper() and not name.startswith("_")]
