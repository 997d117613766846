"""KVM_CHECK_EXTENSION: what /dev/kvm and a VM fd report (kvm_vm_ioctl_check_extension_generic,
kvm_vm_ioctl_check_extension in arch/x86/kvm/x86.c)."""
from sevcore import uapi as U
from sevcore.kvm.dirty_ring import KVM_DIRTY_RING_MAX_BYTES


#: kvm_get_allowed_disable_exits without mitigate_smt_rsb and without MWAIT passthrough.
KVM_ALLOWED_DISABLE_EXITS = (U.KVM_X86_DISABLE_EXITS_PAUSE | U.KVM_X86_DISABLE_EXITS_HLT
                             | U.KVM_X86_DISABLE_EXITS_CSTATE)


def _gmem_flags(vm):
    flags = U.GUEST_MEMFD_FLAG_MMAP
    if vm is None or not vm.has_private_mem:
        flags |= U.GUEST_MEMFD_FLAG_INIT_SHARED
    return flags


def check_extension(host, vm, cap):
    """KVM_CHECK_EXTENSION on /dev/kvm (vm None) or on a VM fd."""
    private = vm is not None and vm.has_private_mem
    table = {
        U.KVM_CAP_USER_MEMORY: 1,
        U.KVM_CAP_USER_MEMORY2: 1,
        U.KVM_CAP_NR_MEMSLOTS: U.KVM_USER_MEM_SLOTS,
        U.KVM_CAP_NR_VCPUS: 2,
        U.KVM_CAP_MAX_VCPUS: 4096,
        U.KVM_CAP_MAX_VCPU_ID: 4096,
        U.KVM_CAP_CHECK_EXTENSION_VM: 1,
        U.KVM_CAP_ENABLE_CAP_VM: 1,
        U.KVM_CAP_VM_TYPES: host.supported_vm_types,
        U.KVM_CAP_READONLY_MEM: 1 if vm is None else int(not vm.has_protected_state),
        U.KVM_CAP_MULTI_ADDRESS_SPACE: (U.KVM_ADDRESS_SPACE_NUM if vm is None
                                        else vm.nr_memslot_as_ids),
        U.KVM_CAP_X86_SMM: 1 if vm is None else int(vm.type not in (
            U.KVM_X86_SEV_ES_VM, U.KVM_X86_SNP_VM, U.KVM_X86_TDX_VM)),
        U.KVM_CAP_SYNC_REGS: 0 if vm is not None and vm.has_protected_state else 0x7,
        U.KVM_CAP_GUEST_MEMFD: 1,
        U.KVM_CAP_GUEST_MEMFD_FLAGS: _gmem_flags(vm),
        U.KVM_CAP_MEMORY_ATTRIBUTES: (U.KVM_MEMORY_ATTRIBUTE_PRIVATE
                                      if vm is None or private else 0),
        U.KVM_CAP_MEMORY_FAULT_INFO: 1,
        U.KVM_CAP_PRE_FAULT_MEMORY: 1,
        U.KVM_CAP_EXIT_HYPERCALL: U.KVM_EXIT_HYPERCALL_VALID_MASK,
        U.KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2: U.KVM_DIRTY_LOG_MANUAL_CAPS,
        U.KVM_CAP_X86_USER_SPACE_MSR: 1,
        U.KVM_CAP_X86_MSR_FILTER: 1,
        U.KVM_CAP_ENFORCE_PV_FEATURE_CPUID: 1,
        U.KVM_CAP_X86_DISABLE_EXITS: KVM_ALLOWED_DISABLE_EXITS,
        U.KVM_CAP_VM_COPY_ENC_CONTEXT_FROM: 1,
        U.KVM_CAP_VM_MOVE_ENC_CONTEXT_FROM: 1,
        U.KVM_CAP_XCRS: 1,
        # x86 has both ring flavours (HAVE_KVM_DIRTY_RING_TSO and _ACQ_REL) and not the
        # ring-with-bitmap (NEED_KVM_DIRTY_RING_WITH_BITMAP is arm64's).
        U.KVM_CAP_DIRTY_LOG_RING: KVM_DIRTY_RING_MAX_BYTES,
        U.KVM_CAP_DIRTY_LOG_RING_ACQ_REL: KVM_DIRTY_RING_MAX_BYTES,
        U.KVM_CAP_DIRTY_LOG_RING_WITH_BITMAP: 0,
    }
    return table.get(cap, 0)
