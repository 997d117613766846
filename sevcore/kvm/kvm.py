"""/dev/kvm: the VMM's handle on KVM (``KVM_CHECK_EXTENSION``, ``KVM_CREATE_VM``).

A :class:`Kvm` belongs to a Host (``host.kvm``) and is also its VMM process's address space
(:class:`sevcore.kvm.mm.Mm`): ``kvm.mmap(length)`` returns host virtual addresses (HVAs).
"""
from errno import EFAULT, EINVAL, ENXIO

from sevcore import uapi as U
from sevcore.errors import KvmError
from sevcore.kvm.caps import check_extension
from sevcore.kvm.fpu import SUPPORTED_XCR0
from sevcore.kvm.mm import Mm
from sevcore.kvm.sev import SEV_SUPPORTED_VMSA_FEATURES
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

    # -- /dev/kvm device attributes (arch/x86/kvm/x86.c) ------------------------------------------

    def _dev_get_attr(self, ioctl, group, attr):
        """__kvm_x86_dev_get_attr: group 0 is KVM's own (KVM_X86_XCOMP_GUEST_SUPP), any other
        goes to the vendor, sev_dev_get_attr (arch/x86/kvm/svm/sev.c): KVM_X86_GRP_SEV with
        KVM_X86_SEV_VMSA_FEATURES; ENXIO for everything else."""
        for name, v, bits in (("group", group, 32), ("attr", attr, 64)):
            if not isinstance(v, int) or not 0 <= v < 1 << bits:
                raise TypeError(f"kvm_device_attr.{name} must be a u{bits}, got {v!r}")
        if group == U.KVM_X86_GRP_SYSTEM and attr == U.KVM_X86_XCOMP_GUEST_SUPP:
            return SUPPORTED_XCR0
        if group == U.KVM_X86_GRP_SEV and attr == U.KVM_X86_SEV_VMSA_FEATURES:
            return SEV_SUPPORTED_VMSA_FEATURES
        raise KvmError(ENXIO, ioctl, f"no attribute {attr} in group {group}")

    def has_device_attr(self, group, attr, flags=0, addr=0):
        """Mirrors ``KVM_HAS_DEVICE_ATTR`` on /dev/kvm (kvm_x86_dev_has_attr): 0 if the attribute
        exists; raises ENXIO otherwise."""
        self._dev_get_attr("KVM_HAS_DEVICE_ATTR", group, attr)
        return 0

    def get_device_attr(self, group, attr, addr, flags=0):
        """Mirrors ``KVM_GET_DEVICE_ATTR`` on /dev/kvm (kvm_x86_dev_get_attr): the attribute's
        u64 is written to the VMM's memory at ``addr``; raises ENXIO for an unknown attribute,
        then EFAULT where ``addr`` cannot be written (put_user)."""
        ioctl = "KVM_GET_DEVICE_ATTR"
        val = self._dev_get_attr(ioctl, group, attr)
        try:
            self.copy_to_user(addr, val.to_bytes(8, "little"))
        except OSError:
            raise KvmError(EFAULT, ioctl, f"cannot write the value at {addr:#x}") from None
        return 0
