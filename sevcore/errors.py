"""Errors raised by the simulated kernel and firmware.

A failing ioctl raises ``OSError`` (or a subclass) whose ``errno`` is the kernel's and whose
message names the ioctl, e.g. ``[Errno 22] Invalid argument: 'KVM_SET_USER_MEMORY_REGION2'``.
"""
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
