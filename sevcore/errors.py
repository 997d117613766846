"""Errors raised by the simulated kernel and firmware.

A failing ioctl raises ``OSError`` (or a subclass) whose ``errno`` is the kernel's and whose
message names the ioctl, e.g. ``[Errno 22] Invalid argument: 'KVM_SET_USER_MEMORY_REGION2'``.
"""
import errno
import os


class KvmError(OSError):
    """An ioctl on a simulated KVM fd failed with ``errno``; ``ioctl`` names it. ``index`` is
    None, or for a batched call the position of the ioctl that failed."""

    index = None

    def __init__(self, err, ioctl, detail=None):
        msg = os.strerror(err) if detail is None else f"{os.strerror(err)} ({detail})"
        super().__init__(err, msg, ioctl)
        self.ioctl = ioctl


class SigBus(Exception):
    """The host touched a mapping that the kernel would answer with SIGBUS (for example a
    guest_memfd page that is private, or an offset past the end of the file)."""

    def __init__(self, hva, reason):
        super().__init__(f"SIGBUS at hva {hva:#x}: {reason}")
        self.hva = hva
        self.reason = reason


class NotModelled(NotImplementedError):
    """The kernel would handle this, but the simulator does not model it (the message says
    what); raised from the call that reached it, so a test never sees an invented result."""


class PacketError(OSError):
    """A transport packet was refused; ``index`` is its position in the batch, ``errno`` the C
    code (sevcore.core.sevpkt)."""

    def __init__(self, err, index, detail):
        super().__init__(err, f"packet {index}: {detail}")
        self.index = index


class PacketAuthError(PacketError):
    """A packet's MAC does not match (errno EBADMSG; the firmware answers BAD_MEASUREMENT)."""

    def __init__(self, index):
        super().__init__(errno.EBADMSG, index, "MAC mismatch (RECEIVE_UPDATE_DATA/LAUNCH_SECRET "
                                               "would fail with SEV_RET_BAD_MEASUREMENT)")


class PacketFlagsError(PacketError):
    """A packet's header has COMPRESSED set (errno EOPNOTSUPP; the firmware's UNSUPPORTED)."""

    def __init__(self, index, flags):
        super().__init__(errno.EOPNOTSUPP, index, f"header flags {flags:#x} ask for COMPRESSED, "
                                                  "which the firmware refuses")
        self.flags = flags
