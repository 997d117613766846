"""Constants of the Linux KVM user-space API, under their exact kernel names.

Values are those of ``include/uapi/linux/kvm.h``, ``arch/x86/include/uapi/asm/kvm.h``,
``include/uapi/linux/kvm_para.h`` and ``arch/x86/include/uapi/asm/kvm_para.h`` (read from QEMU's
copy of the headers, synced from about v6.18), so that ``grep`` finds the same name in the kernel,
in a VMM and here. ``from sevcore.uapi import *`` exports every upper-case name, and the
register-state structs (``kvm_sregs``, ``kvm_segment``, ...) as ctypes structures with the
kernel's layout.
"""
import ctypes as _ctypes

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
KVM_CAP_XCRS = 56
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
KVM_EXIT_AP_RESET_HOLD = 32
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
#: KVM Userfault, an out-of-tree series (J. Houghton, "KVM: Introduce KVM Userfault", kvm@ 2025):
#: a slot flag whose ``userfault_bitmap`` (in kvm_userspace_memory_region2) makes a vCPU's
#: access to a marked gfn exit with KVM_EXIT_MEMORY_FAULT and this exit flag.
KVM_MEM_USERFAULT = 1 << 3
KVM_MEMORY_EXIT_FLAG_USERFAULT = 1 << 4
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

# fallocate(2) modes (include/uapi/linux/falloc.h); FALLOC_FL_MODE_MASK is the kernel's own
# (include/linux/falloc.h): at most one of these modes, plus KEEP_SIZE.
FALLOC_FL_ALLOCATE_RANGE = 0x00
FALLOC_FL_KEEP_SIZE = 0x01
FALLOC_FL_PUNCH_HOLE = 0x02
FALLOC_FL_NO_HIDE_STALE = 0x04
FALLOC_FL_COLLAPSE_RANGE = 0x08
FALLOC_FL_ZERO_RANGE = 0x10
FALLOC_FL_INSERT_RANGE = 0x20
FALLOC_FL_UNSHARE_RANGE = 0x40
FALLOC_FL_WRITE_ZEROES = 0x80
FALLOC_FL_MODE_MASK = (FALLOC_FL_ALLOCATE_RANGE | FALLOC_FL_PUNCH_HOLE | FALLOC_FL_COLLAPSE_RANGE
                       | FALLOC_FL_ZERO_RANGE | FALLOC_FL_INSERT_RANGE | FALLOC_FL_UNSHARE_RANGE
                       | FALLOC_FL_WRITE_ZEROES)
#: MAX_LFS_FILESIZE on 64-bit: the s_maxbytes of guest_memfd's pseudo filesystem
#: (pseudo_fs_fill_super, fs/libfs.c), LLONG_MAX.
MAX_LFS_FILESIZE = (1 << 63) - 1

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
UD_VECTOR = 6
GP_VECTOR = 13
X86_TRAP_VC = 29

# --- vCPU register and XSAVE state (arch/x86/include/uapi/asm/kvm.h, asm/fpu/types.h) -------------

KVM_MAX_XCRS = 16
INVALID_PAGE = (1 << 64) - 1          # ~(hpa_t)0 (arch/x86/include/asm/kvm_host.h)
KVM_CPUID_FLAG_SIGNIFCANT_INDEX = 1 << 0
XCR_XFEATURE_ENABLED_MASK = 0
XFEATURE_MASK_FP = 1 << 0
XFEATURE_MASK_SSE = 1 << 1
XFEATURE_MASK_YMM = 1 << 2
#: struct kvm_xsave: __u32 region[1024].
KVM_XSAVE_SIZE = 4096

# --- architectural MSRs the simulated KVM emulates (arch/x86/include/asm/msr-index.h) -------------------------

MSR_IA32_TSC = 0x10
MSR_IA32_APICBASE = 0x1b
MSR_IA32_FLUSH_CMD = 0x10b
MSR_IA32_MISC_ENABLE = 0x1a0
MSR_IA32_POWER_CTL = 0x1fc
MSR_IA32_CR_PAT = 0x277
MSR_IA32_XSS = 0xda0
MSR_EFER = 0xc0000080
#: EFER bits (arch/x86/include/asm/msr-index.h).
EFER_SCE = 1 << 0
EFER_LME = 1 << 8
EFER_LMA = 1 << 10
EFER_NX = 1 << 11
EFER_SVME = 1 << 12
MSR_STAR = 0xc0000081
MSR_LSTAR = 0xc0000082
MSR_CSTAR = 0xc0000083
MSR_SYSCALL_MASK = 0xc0000084
MSR_FS_BASE = 0xc0000100
MSR_GS_BASE = 0xc0000101
MSR_KERNEL_GS_BASE = 0xc0000102
MSR_TSC_AUX = 0xc0000103
L1D_FLUSH = 1 << 0

# --- SEV MSRs (msr-index.h) and the GHCB MSR protocol (arch/x86/include/asm/sev-common.h) ---------

MSR_AMD64_SEV_ES_GHCB = 0xc0010130
MSR_AMD64_SEV = 0xc0010131
MSR_AMD64_SEV_ENABLED_BIT = 0
MSR_AMD64_SEV_ES_ENABLED_BIT = 1
MSR_AMD64_SEV_SNP_ENABLED_BIT = 2
MSR_AMD64_SEV_ENABLED = 1 << MSR_AMD64_SEV_ENABLED_BIT
MSR_AMD64_SEV_ES_ENABLED = 1 << MSR_AMD64_SEV_ES_ENABLED_BIT
MSR_AMD64_SEV_SNP_ENABLED = 1 << MSR_AMD64_SEV_SNP_ENABLED_BIT

GHCB_MSR_INFO_POS = 0
GHCB_DATA_LOW = 12
GHCB_MSR_INFO_MASK = (1 << GHCB_DATA_LOW) - 1
GHCB_MSR_SEV_INFO_RESP = 0x001
GHCB_MSR_SEV_INFO_REQ = 0x002
GHCB_MSR_CPUID_REQ = 0x004
GHCB_MSR_CPUID_RESP = 0x005
GHCB_MSR_CPUID_FUNC_POS = 32
GHCB_MSR_CPUID_FUNC_MASK = 0xffffffff
GHCB_MSR_CPUID_VALUE_POS = 32
GHCB_MSR_CPUID_VALUE_MASK = 0xffffffff
GHCB_MSR_CPUID_REG_POS = 30
GHCB_MSR_CPUID_REG_MASK = 0x3
GHCB_CPUID_REQ_EAX = 0
GHCB_CPUID_REQ_EBX = 1
GHCB_CPUID_REQ_ECX = 2
GHCB_CPUID_REQ_EDX = 3
GHCB_MSR_AP_RESET_HOLD_REQ = 0x006
GHCB_MSR_AP_RESET_HOLD_RESP = 0x007
GHCB_MSR_AP_RESET_HOLD_RESULT_POS = 12
GHCB_MSR_AP_RESET_HOLD_RESULT_MASK = (1 << 52) - 1
GHCB_MSR_PREF_GPA_REQ = 0x010
GHCB_MSR_PREF_GPA_RESP = 0x011
GHCB_MSR_REG_GPA_REQ = 0x012
GHCB_MSR_REG_GPA_RESP = 0x013
GHCB_MSR_PSC_REQ = 0x014
GHCB_MSR_PSC_RESP = 0x015
GHCB_MSR_HV_FT_REQ = 0x080
GHCB_MSR_HV_FT_RESP = 0x081
GHCB_MSR_HV_FT_POS = 12
GHCB_MSR_HV_FT_MASK = (1 << 52) - 1
GHCB_HV_FT_SNP = 1 << 0
GHCB_HV_FT_SNP_AP_CREATION = 1 << 1
GHCB_MSR_TERM_REQ = 0x100
GHCB_MSR_TERM_REASON_SET_POS = 12
GHCB_MSR_TERM_REASON_SET_MASK = 0xf
GHCB_MSR_TERM_REASON_POS = 16
GHCB_MSR_TERM_REASON_MASK = 0xff
GHCB_VERSION_MIN = 1


def GHCB_MSR_SEV_INFO(max, min, cbit):
    """The SEV_INFO response: GHCBData[63:48] max, [47:32] min protocol, [31:24] C-bit."""
    return ((max & 0xffff) << 48) | ((min & 0xffff) << 32) | ((cbit & 0xff) << 24) | \
        GHCB_MSR_SEV_INFO_RESP


def GHCB_CPUID_REQ(fn, reg):
    return GHCB_MSR_CPUID_REQ | ((reg & 0x3) << 30) | (fn << 32)


def GHCB_SEV_TERM_REASON(reason_set, reason_val):
    return ((reason_set & 0xf) << 12) | ((reason_val & 0xff) << 16)


# SVM exit codes a #VC reports (arch/x86/include/uapi/asm/svm.h).
SVM_EXIT_CPUID = 0x072
SVM_EXIT_IOIO = 0x07b
SVM_EXIT_MSR = 0x07c
SVM_EXIT_VMMCALL = 0x081
SVM_EXIT_NPF = 0x400

# --- AMD SEV firmware (include/uapi/linux/psp-sev.h, include/linux/psp-sev.h) ------------------------

# Firmware status codes (enum sev_ret_code). INAVLID_CONFIG is the kernel's own spelling.
SEV_RET_NO_FW_CALL = -1
SEV_RET_SUCCESS = 0x00
SEV_RET_INVALID_PLATFORM_STATE = 0x01
SEV_RET_INVALID_GUEST_STATE = 0x02
SEV_RET_INAVLID_CONFIG = 0x03
SEV_RET_INVALID_CONFIG = SEV_RET_INAVLID_CONFIG
SEV_RET_INVALID_LEN = 0x04
SEV_RET_ALREADY_OWNED = 0x05
SEV_RET_INVALID_CERTIFICATE = 0x06
SEV_RET_POLICY_FAILURE = 0x07
SEV_RET_INACTIVE = 0x08
SEV_RET_INVALID_ADDRESS = 0x09
SEV_RET_BAD_SIGNATURE = 0x0A
SEV_RET_BAD_MEASUREMENT = 0x0B
SEV_RET_ASID_OWNED = 0x0C
SEV_RET_INVALID_ASID = 0x0D
SEV_RET_WBINVD_REQUIRED = 0x0E
SEV_RET_DFFLUSH_REQUIRED = 0x0F
SEV_RET_INVALID_GUEST = 0x10
SEV_RET_INVALID_COMMAND = 0x11
SEV_RET_ACTIVE = 0x12
SEV_RET_HWSEV_RET_PLATFORM = 0x13
SEV_RET_HWSEV_RET_UNSAFE = 0x14
SEV_RET_UNSUPPORTED = 0x15
SEV_RET_INVALID_PARAM = 0x16
SEV_RET_RESOURCE_LIMIT = 0x17
SEV_RET_SECURE_DATA_INVALID = 0x18
SEV_RET_INVALID_PAGE_SIZE = 0x19
SEV_RET_INVALID_PAGE_STATE = 0x1A
SEV_RET_INVALID_MDATA_ENTRY = 0x1B
SEV_RET_INVALID_PAGE_OWNER = 0x1C
SEV_RET_AEAD_OFLOW = 0x1D
SEV_RET_EXIT_RING_BUFFER = 0x1F
SEV_RET_RMP_INIT_REQUIRED = 0x20
SEV_RET_BAD_SVN = 0x21
SEV_RET_BAD_VERSION = 0x22
SEV_RET_SHUTDOWN_REQUIRED = 0x23
SEV_RET_UPDATE_FAILED = 0x24
SEV_RET_RESTORE_REQUIRED = 0x25
SEV_RET_RMP_INITIALIZATION_FAILED = 0x26
SEV_RET_INVALID_KEY = 0x27

# Command ids (enum sev_cmd). NOP, RING_BUFFER, COPY, ACTIVATE_EX and SWAP_OUT/IN are firmware
# commands the kernel does not name (AMD-ASPFW sev_mcmd.h); they carry the firmware's names.
SEV_CMD_INIT = 0x001
SEV_CMD_SHUTDOWN = 0x002
SEV_CMD_FACTORY_RESET = 0x003
SEV_CMD_PLATFORM_STATUS = 0x004
SEV_CMD_PEK_GEN = 0x005
SEV_CMD_PEK_CSR = 0x006
SEV_CMD_PEK_CERT_IMPORT = 0x007
SEV_CMD_PDH_CERT_EXPORT = 0x008
SEV_CMD_PDH_GEN = 0x009
SEV_CMD_DF_FLUSH = 0x00A
SEV_CMD_DOWNLOAD_FIRMWARE = 0x00B
SEV_CMD_GET_ID = 0x00C
SEV_CMD_INIT_EX = 0x00D
SEV_CMD_NOP = 0x00E
SEV_CMD_RING_BUFFER = 0x00F
SEV_CMD_DECOMMISSION = 0x020
SEV_CMD_ACTIVATE = 0x021
SEV_CMD_DEACTIVATE = 0x022
SEV_CMD_GUEST_STATUS = 0x023
SEV_CMD_COPY = 0x024
SEV_CMD_ACTIVATE_EX = 0x025
SEV_CMD_LAUNCH_START = 0x030
SEV_CMD_LAUNCH_UPDATE_DATA = 0x031
SEV_CMD_LAUNCH_UPDATE_VMSA = 0x032
SEV_CMD_LAUNCH_MEASURE = 0x033
SEV_CMD_LAUNCH_UPDATE_SECRET = 0x034
SEV_CMD_LAUNCH_FINISH = 0x035
SEV_CMD_ATTESTATION_REPORT = 0x036
SEV_CMD_SEND_START = 0x040
SEV_CMD_SEND_UPDATE_DATA = 0x041
SEV_CMD_SEND_UPDATE_VMSA = 0x042
SEV_CMD_SEND_FINISH = 0x043
SEV_CMD_SEND_CANCEL = 0x044
SEV_CMD_RECEIVE_START = 0x050
SEV_CMD_RECEIVE_UPDATE_DATA = 0x051
SEV_CMD_RECEIVE_UPDATE_VMSA = 0x052
SEV_CMD_RECEIVE_FINISH = 0x053
SEV_CMD_DBG_DECRYPT = 0x060
SEV_CMD_DBG_ENCRYPT = 0x061
SEV_CMD_SWAP_OUT = 0x070
SEV_CMD_SWAP_IN = 0x071

# Platform states (enum sev_state) and guest states (the KVM selftests' sev.h names the first
# four; SEND_UPDATE, RECEIVE_UPDATE and SENT follow the firmware's sev_guest_state_t).
SEV_STATE_UNINIT = 0x0
SEV_STATE_INIT = 0x1
SEV_STATE_WORKING = 0x2
SEV_GUEST_STATE_UNINITIALIZED = 0
SEV_GUEST_STATE_LAUNCH_UPDATE = 1
SEV_GUEST_STATE_LAUNCH_SECRET = 2
SEV_GUEST_STATE_RUNNING = 3
SEV_GUEST_STATE_SEND_UPDATE = 4
SEV_GUEST_STATE_RECEIVE_UPDATE = 5
SEV_GUEST_STATE_SENT = 6

# Guest policy (SEV API "Guest Policy"); the selftests spell two of them SEV_POLICY_NO_DBG/_ES.
SEV_POLICY_MASK_NODBG = 1 << 0
SEV_POLICY_MASK_NOKS = 1 << 1
SEV_POLICY_MASK_ES = 1 << 2
SEV_POLICY_MASK_NOSEND = 1 << 3
SEV_POLICY_MASK_DOMAIN = 1 << 4
SEV_POLICY_MASK_SEV = 1 << 5
SEV_POLICY_MASK_API_MAJOR = 0xFF << 16
SEV_POLICY_MASK_API_MINOR = 0xFF << 24
SEV_POLICY_NO_DBG = SEV_POLICY_MASK_NODBG
SEV_POLICY_ES = SEV_POLICY_MASK_ES

SEV_INIT_FLAGS_SEV_ES = 0x01
SEV_STATUS_FLAGS_CONFIG_ES = 0x0100
SEV_FW_BLOB_MAX_SIZE = 0x4000

# --- SEV-SNP firmware (include/linux/psp-sev.h, include/uapi/linux/psp-sev.h; AMD pub. 56860) ----

SEV_CMD_SNP_INIT = 0x081
SEV_CMD_SNP_SHUTDOWN = 0x082
SEV_CMD_SNP_PLATFORM_STATUS = 0x083
SEV_CMD_SNP_DF_FLUSH = 0x084
SEV_CMD_SNP_INIT_EX = 0x085
SEV_CMD_SNP_SHUTDOWN_EX = 0x086
SEV_CMD_SNP_DECOMMISSION = 0x090
SEV_CMD_SNP_ACTIVATE = 0x091
SEV_CMD_SNP_GUEST_STATUS = 0x092
SEV_CMD_SNP_GCTX_CREATE = 0x093
SEV_CMD_SNP_GUEST_REQUEST = 0x094
SEV_CMD_SNP_ACTIVATE_EX = 0x095
SEV_CMD_SNP_LAUNCH_START = 0x0A0
SEV_CMD_SNP_LAUNCH_UPDATE = 0x0A1
SEV_CMD_SNP_LAUNCH_FINISH = 0x0A2
SEV_CMD_SNP_DBG_DECRYPT = 0x0B0
SEV_CMD_SNP_DBG_ENCRYPT = 0x0B1
SEV_CMD_SNP_PAGE_SWAP_OUT = 0x0C0
SEV_CMD_SNP_PAGE_SWAP_IN = 0x0C1
SEV_CMD_SNP_PAGE_MOVE = 0x0C2
SEV_CMD_SNP_PAGE_MD_INIT = 0x0C3
SEV_CMD_SNP_PAGE_SET_STATE = 0x0C6
SEV_CMD_SNP_PAGE_RECLAIM = 0x0C7
SEV_CMD_SNP_PAGE_UNSMASH = 0x0C8
SEV_CMD_SNP_CONFIG = 0x0C9
SEV_CMD_SNP_DOWNLOAD_FIRMWARE_EX = 0x0CA
SEV_CMD_SNP_COMMIT = 0x0CB
SEV_CMD_SNP_VLEK_LOAD = 0x0CD
SEV_CMD_SNP_FEATURE_INFO = 0x0CE

# SNP_LAUNCH_UPDATE page types (include/linux/psp-sev.h; 56860 "PAGE_TYPE" table).
SNP_PAGE_TYPE_NORMAL = 0x1
SNP_PAGE_TYPE_VMSA = 0x2
SNP_PAGE_TYPE_ZERO = 0x3
SNP_PAGE_TYPE_UNMEASURED = 0x4
SNP_PAGE_TYPE_SECRET = 0x5
SNP_PAGE_TYPE_CPUID = 0x6
SNP_PAGE_TYPE_MAX = 0x7

# Guest policy (56860 "Guest Policy"; include/linux/psp-sev.h).
SNP_POLICY_MASK_API_MINOR = 0xFF
SNP_POLICY_MASK_API_MAJOR = 0xFF << 8
SNP_POLICY_MASK_SMT = 1 << 16
SNP_POLICY_MASK_RSVD_MBO = 1 << 17
SNP_POLICY_MASK_MIGRATE_MA = 1 << 18
SNP_POLICY_MASK_DEBUG = 1 << 19
SNP_POLICY_MASK_SINGLE_SOCKET = 1 << 20
SNP_POLICY_MASK_CXL_ALLOW = 1 << 21
SNP_POLICY_MASK_MEM_AES_256_XTS = 1 << 22
SNP_POLICY_MASK_RAPL_DIS = 1 << 23
SNP_POLICY_MASK_CIPHERTEXT_HIDING_DRAM = 1 << 24
SNP_POLICY_MASK_PAGE_SWAP_DISABLE = 1 << 25
SNP_POLICY_MASK_BASE = (SNP_POLICY_MASK_API_MINOR | SNP_POLICY_MASK_API_MAJOR
                        | SNP_POLICY_MASK_SMT | SNP_POLICY_MASK_RSVD_MBO
                        | SNP_POLICY_MASK_MIGRATE_MA | SNP_POLICY_MASK_DEBUG
                        | SNP_POLICY_MASK_SINGLE_SOCKET)

# Guest states of an SNP guest context (56860 "GSTATE": the firmware's SNP guest state field).
SNP_GUEST_STATE_INIT = 0
SNP_GUEST_STATE_LAUNCH = 1
SNP_GUEST_STATE_RUNNING = 2

# Guest messages (arch/x86/include/asm/sev.h enum msg_type, enum aead_algo; MAX_AUTHTAG_LEN,
# AUTHTAG_LEN, AAD_LEN, MSG_HDR_VER, SNP_GUEST_MSG_SIZE).
SNP_MSG_TYPE_INVALID = 0
SNP_MSG_CPUID_REQ = 1
SNP_MSG_CPUID_RSP = 2
SNP_MSG_KEY_REQ = 3
SNP_MSG_KEY_RSP = 4
SNP_MSG_REPORT_REQ = 5
SNP_MSG_REPORT_RSP = 6
SNP_MSG_EXPORT_REQ = 7
SNP_MSG_EXPORT_RSP = 8
SNP_MSG_IMPORT_REQ = 9
SNP_MSG_IMPORT_RSP = 10
SNP_MSG_ABSORB_REQ = 11
SNP_MSG_ABSORB_RSP = 12
SNP_MSG_VMRK_REQ = 13
SNP_MSG_VMRK_RSP = 14
SNP_MSG_TYPE_MAX = 15
SNP_AEAD_INVALID = 0
SNP_AEAD_AES_256_GCM = 1
MAX_AUTHTAG_LEN = 32
AUTHTAG_LEN = 16
AAD_LEN = 48
MSG_HDR_VER = 1
SNP_GUEST_MSG_SIZE = 4096
SNP_REPORT_USER_DATA_SIZE = 64
#: VMPCK0..3 (arch/x86/include/asm/sev.h VMPCK_MAX_NUM) and their length (VMPCK_KEY_LEN).
VMPCK_MAX_NUM = 4
VMPCK_KEY_LEN = 32
#: The GPA KVM gives every VMSA in the RMP (arch/x86/kvm/svm/sev.c snp_launch_update_vmsa).
INITIAL_VMSA_GPA = 0xFFFFFFFFF000

# The RMP (arch/x86/include/asm/sev.h; AMD64 APM vol. 3 RMPUPDATE, PVALIDATE, RMPADJUST).
RMP_PG_SIZE_4K = 0
RMP_PG_SIZE_2M = 1
RMPUPDATE_FAIL_INPUT = 1
RMPUPDATE_FAIL_PERMISSION = 2
RMPUPDATE_FAIL_INUSE = 3
RMPUPDATE_FAIL_OVERLAP = 4
#: PSMASH's statuses: INUSE is the kernel's name; INPUT and BADADDR (the page cannot be
#: expanded) are the APM's values.
PSMASH_FAIL_INPUT = 1
PSMASH_FAIL_INUSE = 3
PSMASH_FAIL_BADADDR = 7
PVALIDATE_FAIL_INPUT = 1
PVALIDATE_FAIL_SIZEMISMATCH = 6
#: Not an instruction status: the kernel's name for "rFLAGS.CF set" (no update was made).
PVALIDATE_FAIL_NOUPDATE = 255
RMPADJUST_VMSA_PAGE_BIT = 1 << 16
#: VMPL permission bits of an RMP entry (APM vol. 2 15.36.6 "VMPL permission masks").
VMPL_PERM_READ = 1 << 0
VMPL_PERM_WRITE = 1 << 1
VMPL_PERM_EXEC_USER = 1 << 2
VMPL_PERM_EXEC_SUPERVISOR = 1 << 3
VMPL_PERM_ALL = 0xF
#: Page-fault error code bits the RMP check adds (arch/x86/include/asm/trap_pf.h).
X86_PF_WRITE = 1 << 1
X86_PF_USER = 1 << 2
X86_PF_RMP = 1 << 31

# --- KVM's SEV layer (arch/x86/include/uapi/asm/kvm.h, arch/x86/kvm/svm/sev.c) ---------------------

KVM_MEMORY_ENCRYPT_OP = 0xc008aeba              # _IOWR(KVMIO, 0xba, unsigned long)
KVM_MEMORY_ENCRYPT_REG_REGION = 0x8010aebb      # _IOR(KVMIO, 0xbb, struct kvm_enc_region)
KVM_MEMORY_ENCRYPT_UNREG_REGION = 0x8010aebc    # _IOR(KVMIO, 0xbc, struct kvm_enc_region)

# enum sev_cmd_id
KVM_SEV_INIT = 0
KVM_SEV_ES_INIT = 1
KVM_SEV_LAUNCH_START = 2
KVM_SEV_LAUNCH_UPDATE_DATA = 3
KVM_SEV_LAUNCH_UPDATE_VMSA = 4
KVM_SEV_LAUNCH_SECRET = 5
KVM_SEV_LAUNCH_MEASURE = 6
KVM_SEV_LAUNCH_FINISH = 7
KVM_SEV_SEND_START = 8
KVM_SEV_SEND_UPDATE_DATA = 9
KVM_SEV_SEND_UPDATE_VMSA = 10
KVM_SEV_SEND_FINISH = 11
KVM_SEV_RECEIVE_START = 12
KVM_SEV_RECEIVE_UPDATE_DATA = 13
KVM_SEV_RECEIVE_UPDATE_VMSA = 14
KVM_SEV_RECEIVE_FINISH = 15
KVM_SEV_GUEST_STATUS = 16
KVM_SEV_DBG_DECRYPT = 17
KVM_SEV_DBG_ENCRYPT = 18
KVM_SEV_CERT_EXPORT = 19
KVM_SEV_GET_ATTESTATION_REPORT = 20
KVM_SEV_SEND_CANCEL = 21
KVM_SEV_INIT2 = 22
KVM_SEV_SNP_LAUNCH_START = 100
KVM_SEV_SNP_LAUNCH_UPDATE = 101
KVM_SEV_SNP_LAUNCH_FINISH = 102
KVM_SEV_NR_MAX = 103

SVM_SEV_FEAT_SNP_ACTIVE = 1 << 0
SVM_SEV_FEAT_DEBUG_SWAP = 1 << 5
SVM_SEV_FEAT_SECURE_TSC = 1 << 9
GHCB_VERSION_MAX = 2
GHCB_VERSION_DEFAULT = 2
KVM_X86_GRP_SEV = 1
KVM_X86_SEV_VMSA_FEATURES = 0

# struct kvm_sev_snp_launch_update.type
KVM_SEV_SNP_PAGE_TYPE_NORMAL = 0x1
KVM_SEV_SNP_PAGE_TYPE_ZERO = 0x3
KVM_SEV_SNP_PAGE_TYPE_UNMEASURED = 0x4
KVM_SEV_SNP_PAGE_TYPE_SECRETS = 0x5
KVM_SEV_SNP_PAGE_TYPE_CPUID = 0x6
KVM_SEV_SNP_ID_BLOCK_SIZE = 96
KVM_SEV_SNP_ID_AUTH_SIZE = 4096
KVM_SEV_SNP_FINISH_DATA_SIZE = 32
#: The policy bits KVM accepts (SNP_POLICY_MASK_VALID in arch/x86/kvm/svm/sev.c; MIGRATE_MA and
#: the newer bits are not among them).
SNP_POLICY_MASK_VALID = (SNP_POLICY_MASK_API_MINOR | SNP_POLICY_MASK_API_MAJOR | SNP_POLICY_MASK_SMT
                         | SNP_POLICY_MASK_RSVD_MBO | SNP_POLICY_MASK_DEBUG
                         | SNP_POLICY_MASK_SINGLE_SOCKET)

# The SNP part of the GHCB MSR protocol (arch/x86/include/asm/sev-common.h).
GHCB_MSR_GPA_VALUE_POS = 12
GHCB_MSR_GPA_VALUE_MASK = (1 << 52) - 1
GHCB_MSR_PREF_GPA_NONE = 0xfffffffffffff
GHCB_MSR_PSC_RESP_ERROR = (1 << 63) | GHCB_MSR_PSC_RESP
SNP_PAGE_STATE_PRIVATE = 1
SNP_PAGE_STATE_SHARED = 2


def GHCB_MSR_REG_GPA_REQ_VAL(gfn):
    return ((gfn & ((1 << 52) - 1)) << 12) | GHCB_MSR_REG_GPA_REQ


def GHCB_MSR_PSC_REQ_GFN(gfn, op):
    """GHCBData[55:52] the operation, [51:12] the gfn."""
    return ((op & 0xf) << 52) | ((gfn & ((1 << 40) - 1)) << 12) | GHCB_MSR_PSC_REQ


def GHCB_MSR_PSC_REQ_TO_GFN(msr):
    return (msr >> 12) & ((1 << 40) - 1)


def GHCB_MSR_PSC_REQ_TO_OP(msr):
    return (msr >> 52) & 0xf


def GHCB_MSR_PSC_RESP_VAL(val):
    return val >> 32


# The page-state change NAE event (arch/x86/include/asm/sev-common.h, arch/x86/kvm/svm/svm.h).
VMGEXIT_PSC_MAX_ENTRY = 253
VMGEXIT_PSC_MAX_COUNT = 253
VMGEXIT_PSC_OP_PRIVATE = 1
VMGEXIT_PSC_OP_SHARED = 2
VMGEXIT_PSC_ERROR_GENERIC = 0x100 << 32
VMGEXIT_PSC_ERROR_INVALID_HDR = (1 << 32) | 1
VMGEXIT_PSC_ERROR_INVALID_ENTRY = (1 << 32) | 2

# Linux's reason codes for GHCB_MSR_TERM_REQ (set 1).
SEV_TERM_SET_LINUX = 1
GHCB_TERM_REGISTER = 0
GHCB_TERM_PSC = 1
GHCB_TERM_PVALIDATE = 2


# -- the vCPU's architectural state (arch/x86/include/uapi/asm/kvm.h) ------------------------------

#: Control-register bits (arch/x86/include/uapi/asm/processor-flags.h).
X86_CR0_PE = 1 << 0
X86_CR0_MP = 1 << 1
X86_CR0_EM = 1 << 2
X86_CR0_TS = 1 << 3
X86_CR0_ET = 1 << 4
X86_CR0_NE = 1 << 5
X86_CR0_WP = 1 << 16
X86_CR0_AM = 1 << 18
X86_CR0_NW = 1 << 29
X86_CR0_CD = 1 << 30
X86_CR0_PG = 1 << 31
X86_CR4_VME = 1 << 0
X86_CR4_PVI = 1 << 1
X86_CR4_TSD = 1 << 2
X86_CR4_DE = 1 << 3
X86_CR4_PSE = 1 << 4
X86_CR4_PAE = 1 << 5
X86_CR4_MCE = 1 << 6
X86_CR4_PGE = 1 << 7
X86_CR4_PCE = 1 << 8
X86_CR4_OSFXSR = 1 << 9
X86_CR4_OSXMMEXCPT = 1 << 10
X86_CR4_UMIP = 1 << 11
X86_CR4_LA57 = 1 << 12
X86_CR4_VMXE = 1 << 13
X86_CR4_SMXE = 1 << 14
X86_CR4_FSGSBASE = 1 << 16
X86_CR4_PCIDE = 1 << 17
X86_CR4_OSXSAVE = 1 << 18
X86_CR4_SMEP = 1 << 20
X86_CR4_SMAP = 1 << 21
X86_CR4_PKE = 1 << 22
X86_EFLAGS_FIXED = 1 << 1
#: DR6/DR7 after RESET (arch/x86/include/asm/kvm_host.h: DR6_ACTIVE_LOW, DR7_FIXED_1).
DR6_ACTIVE_LOW = 0xffff0ff0
DR7_FIXED_1 = 0x400
MSR_IA32_CR_PAT_DEFAULT = 0x0007040600070406
KVM_NR_INTERRUPTS = 256
KVM_SREGS2_FLAGS_PDPTRS_VALID = 1
#: msr_io: more entries than this in KVM_GET/SET_MSRS is E2BIG (arch/x86/kvm/x86.c).
MAX_IO_MSRS = 256


class kvm_segment(_ctypes.Structure):
    """struct kvm_segment."""
    _fields_ = [("base", _ctypes.c_uint64), ("limit", _ctypes.c_uint32),
                ("selector", _ctypes.c_uint16), ("type", _ctypes.c_uint8),
                ("present", _ctypes.c_uint8), ("dpl", _ctypes.c_uint8), ("db", _ctypes.c_uint8),
                ("s", _ctypes.c_uint8), ("l", _ctypes.c_uint8), ("g", _ctypes.c_uint8),
                ("avl", _ctypes.c_uint8), ("unusable", _ctypes.c_uint8),
                ("padding", _ctypes.c_uint8)]


class kvm_dtable(_ctypes.Structure):
    """struct kvm_dtable."""
    _fields_ = [("base", _ctypes.c_uint64), ("limit", _ctypes.c_uint16),
                ("padding", _ctypes.c_uint16 * 3)]


_SREGS_COMMON = [(name, kvm_segment) for name in ("cs", "ds", "es", "fs", "gs", "ss", "tr",
                                                  "ldt")] + \
    [("gdt", kvm_dtable), ("idt", kvm_dtable)] + \
    [(name, _ctypes.c_uint64) for name in ("cr0", "cr2", "cr3", "cr4", "cr8", "efer",
                                           "apic_base")]


class kvm_sregs(_ctypes.Structure):
    """struct kvm_sregs (312 bytes)."""
    _fields_ = _SREGS_COMMON + [
        ("interrupt_bitmap", _ctypes.c_uint64 * ((KVM_NR_INTERRUPTS + 63) // 64))]


class kvm_sregs2(_ctypes.Structure):
    """struct kvm_sregs2 (320 bytes)."""
    _fields_ = _SREGS_COMMON + [("flags", _ctypes.c_uint64), ("pdptrs", _ctypes.c_uint64 * 4)]


class kvm_fpu(_ctypes.Structure):
    """struct kvm_fpu (416 bytes)."""
    _fields_ = [("fpr", (_ctypes.c_uint8 * 16) * 8), ("fcw", _ctypes.c_uint16),
                ("fsw", _ctypes.c_uint16), ("ftwx", _ctypes.c_uint8), ("pad1", _ctypes.c_uint8),
                ("last_opcode", _ctypes.c_uint16), ("last_ip", _ctypes.c_uint64),
                ("last_dp", _ctypes.c_uint64), ("xmm", (_ctypes.c_uint8 * 16) * 16),
                ("mxcsr", _ctypes.c_uint32), ("pad2", _ctypes.c_uint32)]

# --- The GHCB page protocol (arch/x86/include/uapi/asm/svm.h, arch/x86/include/asm/svm.h and
# sev-common.h) ----------------------------------------------------------------------------------

SVM_EXIT_READ_DR7 = 0x027
SVM_EXIT_WRITE_DR7 = 0x037
SVM_EXIT_RDTSC = 0x06e
SVM_EXIT_RDPMC = 0x06f
SVM_EXIT_INVD = 0x076
SVM_EXIT_RDTSCP = 0x087
SVM_EXIT_WBINVD = 0x089
SVM_EXIT_MONITOR = 0x08a
SVM_EXIT_MWAIT = 0x08b
SVM_EXIT_VMGEXIT = 0x403
#: The #VC error code of a private access to a page the guest has not validated (AMD64 APM
#: vol. 2 15.36.10 "PAGE_NOT_VALIDATED"); the kernel has no name for it.
SVM_EXIT_PAGE_NOT_VALIDATED = 0x404
SVM_VMGEXIT_MMIO_READ = 0x80000001
SVM_VMGEXIT_MMIO_WRITE = 0x80000002
SVM_VMGEXIT_NMI_COMPLETE = 0x80000003
SVM_VMGEXIT_AP_HLT_LOOP = 0x80000004
SVM_VMGEXIT_AP_JUMP_TABLE = 0x80000005
SVM_VMGEXIT_PSC = 0x80000010
SVM_VMGEXIT_GUEST_REQUEST = 0x80000011
SVM_VMGEXIT_EXT_GUEST_REQUEST = 0x80000012
SVM_VMGEXIT_AP_CREATION = 0x80000013
SVM_VMGEXIT_AP_CREATE_ON_INIT = 0
SVM_VMGEXIT_AP_CREATE = 1
SVM_VMGEXIT_AP_DESTROY = 2
SVM_VMGEXIT_HV_FEATURES = 0x8000fffd
SVM_VMGEXIT_TERM_REQUEST = 0x8000fffe
SVM_VMGEXIT_UNSUPPORTED_EVENT = 0x8000ffff

SVM_IOIO_TYPE_MASK = 1
SVM_IOIO_STR_MASK = 1 << 2
SVM_IOIO_REP_MASK = 1 << 3
SVM_IOIO_SIZE_SHIFT = 4
SVM_IOIO_SIZE_MASK = 7 << SVM_IOIO_SIZE_SHIFT

SVM_EVTINJ_VEC_MASK = 0xff
SVM_EVTINJ_TYPE_MASK = 7 << 8
SVM_EVTINJ_TYPE_EXEPT = 3 << 8
SVM_EVTINJ_VALID = 1 << 31
SVM_EVTINJ_VALID_ERR = 1 << 11

GHCB_SHARED_BUF_SIZE = 2032
GHCB_DEFAULT_USAGE = 0
#: SW_EXITINFO1[31:0] of a VMGEXIT's response (sev-common.h).
GHCB_HV_RESP_NO_ACTION = 0
GHCB_HV_RESP_ISSUE_EXCEPTION = 1
GHCB_HV_RESP_MALFORMED_INPUT = 2
#: SW_EXITINFO2 of a MALFORMED_INPUT response.
GHCB_ERR_NOT_REGISTERED = 1
GHCB_ERR_INVALID_USAGE = 2
GHCB_ERR_INVALID_SCRATCH_AREA = 3
GHCB_ERR_MISSING_INPUT = 4
GHCB_ERR_INVALID_INPUT = 5
GHCB_ERR_INVALID_EVENT = 6
SEV_TERM_SET_GEN = 0
GHCB_SEV_ES_GEN_REQ = 0
GHCB_SEV_ES_PROT_UNSUPPORTED = 1

# --- /dev/kvm device attributes, the dirty ring, pre-faulting --------------------------------------

KVM_GET_DEVICE_ATTR = _IOW(0xe2, 24)                    # struct kvm_device_attr
KVM_HAS_DEVICE_ATTR = _IOW(0xe3, 24)
KVM_X86_GRP_SYSTEM = 0
KVM_X86_XCOMP_GUEST_SUPP = 0
KVM_RESET_DIRTY_RINGS = _IO(0xc7)
KVM_PRE_FAULT_MEMORY = _IOWR(0xd5, 64)                  # struct kvm_pre_fault_memory
#: The vCPU fd's page offset of the dirty ring (arch/x86/include/uapi/asm/kvm.h).
KVM_DIRTY_LOG_PAGE_OFFSET = 64
KVM_DIRTY_GFN_F_DIRTY = 1 << 0
KVM_DIRTY_GFN_F_RESET = 1 << 1
KVM_DIRTY_GFN_F_MASK = 0x3
#: Not UAPI, but what user space must assume (include/linux/kvm_dirty_ring.h, virt/kvm/
#: kvm_main.c): entries kept free for the soft limit, and the largest ring.
KVM_DIRTY_RING_RSVD_ENTRIES = 64
KVM_DIRTY_RING_MAX_ENTRIES = 65536

__all__ = [name for name in dir() if name[:1].isupper() and not name.startswith("_")]
__all__ += ["kvm_segment", "kvm_dtable", "kvm_sregs", "kvm_sregs2", "kvm_fpu"]
