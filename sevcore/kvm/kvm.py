"""/dev/kvm: the VMM's handle on KVM (``KVM_CHECK_EXTENSION``, ``KVM_CREATE_VM``).

A :class:`Kvm` belongs to a Host (``host.kvm``) and is also its VMM process's address space
(:class:`sevcore.kvm.mm.Mm`): ``kvm.mmap(length)`` returns host virtual addresses (HVAs).
"""
from errno import EINVAL

from sevcore import uapi as U
from sevcore.errors import KvmError
from sevcore.kvm.caps import check_extension
from sevcore.kvm.mm import Mm
from sevcore.kvm.vm import Vm

ALL_VM_TYPES = (U.KVM_X86_DEFAULT_VM, U.KVM_X86_SW_PROTECTED_VM, U.KVM_X86_SEV_VM,
                U.KVM_X86_SEV_ES_VM, U.KVM_X86_SNP_VM, U.KVM_X86_TDX_VM)


class Kvm(Mm):
    """The VMM's /dev/kvm fd, opened by a VMM process whose address space it also is."""

    def __init__(self, host):
        super().__init__(host)
        self.fd = host.install_fd(self)
        #: The VMM process's RLIMIT_MEMLOCK in bytes (None: unlimited) and CAP_IPC_LOCK, which
        #: bound SEV's page pinning (sev_pin_memory). The selftests run as root.
        self.rlimit_memlock = None
        self.cap_ipc_lock = True

    # -- /dev/kvm ioctls ------------------------------------------------------------------------------

    def check_extension(self, cap):
        """Mirrors ``KVM_CHECK_EXTENSION`` on /dev/kvm."""
        return check_extension(self.host, None, cap)

    def create_vm(self, type=U.KVM_X86_DEFAULT_VM):
        """Mirrors ``KVM_CREATE_VM``; raises EINVAL for an unsupported type."""
        if not isinstance(type, int) or type < 0 or type >= 32 or \
                not self.host.supported_vm_types & (1 << type):
            raise KvmError(EINVAL, "KVM_CREATE_VM", f"VM type {type} not supported")
        return Vm(self, type)
