"""A simulated machine: the hardware below KVM wired to the kernel above it.

``Host`` owns host physical memory (``mem``), the memory controller with its per-ASID keys
(``umc``), the SEV firmware (``psp``), simulated time (``clock``), a file-descriptor table, KVM's
per-machine SEV state (``kvm_sev``) and ``/dev/kvm`` (``kvm``). ``sevcore.Kvm()`` opens /dev/kvm
on a new Host of its own.
"""
import itertools

import numpy as np

from sevcore.core.memcrypt import default_tweak_table
from sevcore.hw.clock import SimClock
from sevcore.hw.hostmem import HostMemory
from sevcore.hw.rmp import Rmp
from sevcore.hw.umc import MemoryController
from sevcore.kvm import kvm as _kvm
from sevcore.kvm.sev import KvmSev
from sevcore.psp import Psp

ALL_VM_TYPES = _kvm.ALL_VM_TYPES


class Host:
    """One simulated machine: frames, memory-engine tweak table, memory controller (``umc``), the
    SEV-SNP reverse map table (``rmp``), SEV firmware (``psp``), simulated time (``clock``, see
    sevcore.hw.costmodel), fd table and /dev/kvm."""

    def __init__(self, seed=0, memory_size=None, vm_types=ALL_VM_TYPES, c_bit=51):
        self.seed = seed
        self.mem = HostMemory() if memory_size is None else HostMemory(memory_size)
        self.tweak_table = default_tweak_table(seed)
        self.c_bit = c_bit
        self.umc = MemoryController(self)       # per-ASID keys in front of the frames
        self.rmp = Rmp(self.mem.nframes)        # the RMP; enforced from SNP_INIT (umc.rmp)
        self.psp = Psp(self)                    # the SEV firmware; keys are made at INIT
        self.clock = SimClock()                 # simulated time, advanced by modelled costs
        self.supported_vm_types = 0
        for t in vm_types:
            if not 0 <= t < 32:
                raise ValueError(f"VM type {t} out of range")
            self.supported_vm_types |= 1 << t
        self._fds = {}
        self._next_fd = itertools.count(3)
        self.kvm_sev = KvmSev(self)             # kvm_amd's SEV state: ASIDs, /dev/sev
        self.kvm = Kvm(self)

    # -- file descriptors ---------------------------------------------------------------------------

    def install_fd(self, obj):
        """Give ``obj`` a file descriptor number, as open() would."""
        fd = next(self._next_fd)
        self._fds[fd] = obj
        return fd

    def release_fd(self, fd):
        self._fds.pop(fd, None)

    def fget(self, fd_or_file):
        """The open file behind ``fd_or_file`` (an fd number or a file object), or None (EBADF)."""
        if isinstance(fd_or_file, (int, np.integer)) and not isinstance(fd_or_file, bool):
            return self._fds.get(int(fd_or_file))
        fd = getattr(fd_or_file, "fd", None)
        if fd is not None and self._fds.get(fd) is fd_or_file:
            return fd_or_file
        return None

    def memfd_create(self, name="memfd"):
        """An ordinary memfd (not a guest_memfd): a file that KVM must refuse as guest_memfd."""
        return PlainFile(self, name)


class PlainFile:
    """Any file that is not a KVM object (a memfd, a regular file)."""

    def __init__(self, host, name):
        self.host = host
        self.name = name
        self.fd = host.install_fd(self)

    def close(self):
        self.host.release_fd(self.fd)


class Kvm(_kvm.Kvm):
    """/dev/kvm of a Host (:class:`sevcore.kvm.kvm.Kvm`); ``Kvm()`` alone opens it on a new Host."""

    def __new__(cls, host=None):
        if host is None:
            return Host().kvm
        return super().__new__(cls)

    def __init__(self, host=None):
        if host is not None:           # Kvm(): __new__ returned a Host's kvm, already set up
            super().__init__(host)
