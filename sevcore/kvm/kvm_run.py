"""struct kvm_run: the page KVM_RUN reports an exit in (include/uapi/linux/kvm.h), as
``vcpu.kvm_run``; and what a guest operation's handler hands back to the KVM_RUN loop."""
from sevcore import uapi as U

#: A handler's result other than a value for the guest: the loop returns to user space with the
#: exit the handler prepared (EXIT), or raises the pending exception in the guest (THROW).
#: NOT_HW: an MSR access the hardware does not answer by itself (KVM's emulation takes it).
EXIT = object()
THROW = object()
NOT_HW = object()


class _Struct:
    __slots__ = ()

    def __repr__(self):
        fields = ", ".join(f"{k}={getattr(self, k)!r}" for k in self.__slots__)
        return f"{type(self).__name__}({fields})"


class Hypercall(_Struct):
    __slots__ = ("nr", "args", "ret", "flags")

    def __init__(self):
        self.nr, self.args, self.ret, self.flags = 0, [0] * 6, 0, 0

    @property
    def longmode(self):
        return self.flags & U.KVM_EXIT_HYPERCALL_LONG_MODE


class MemoryFaultInfo(_Struct):
    __slots__ = ("flags", "gpa", "size")

    def __init__(self):
        self.flags, self.gpa, self.size = 0, 0, 0


class MsrExit(_Struct):
    __slots__ = ("error", "reason", "index", "data")

    def __init__(self):
        self.error, self.reason, self.index, self.data = 0, 0, 0, 0


class MmioExit(_Struct):
    __slots__ = ("phys_addr", "data", "len", "is_write")

    def __init__(self):
        self.phys_addr, self.data, self.len, self.is_write = 0, bytearray(8), 0, 0


class IoExit(_Struct):
    __slots__ = ("direction", "size", "port", "count")

    def __init__(self):
        self.direction, self.size, self.port, self.count = 0, 0, 0, 0


class InternalError(_Struct):
    __slots__ = ("suberror", "ndata", "data")

    def __init__(self):
        self.suberror, self.ndata, self.data = 0, 0, []


class SystemEvent(_Struct):
    __slots__ = ("type", "ndata", "data")

    def __init__(self):
        self.type, self.ndata, self.data = 0, 0, [0] * 16


class KvmRun:
    """struct kvm_run: the shared page KVM_RUN reports exits in. ``ucall`` is the decoded
    selftest ucall of a ``KVM_EXIT_IO`` exit: ``(cmd, values)``."""

    __slots__ = ("exit_reason", "immediate_exit", "hypercall", "memory_fault", "msr", "mmio",
                 "io", "internal", "ucall", "fail_entry_reason", "system_event")

    def __init__(self):
        self.exit_reason = U.KVM_EXIT_UNKNOWN
        self.immediate_exit = 0
        self.hypercall = Hypercall()
        self.memory_fault = MemoryFaultInfo()
        self.msr = MsrExit()
        self.mmio = MmioExit()
        self.io = IoExit()
        self.internal = InternalError()
        self.ucall = None
        self.fail_entry_reason = 0
        self.system_event = SystemEvent()

    def __repr__(self):
        return f"<kvm_run exit_reason={self.exit_reason}>"
