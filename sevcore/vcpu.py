"""A vCPU fd: ``KVM_RUN`` over a guest program, with the exits KVM gives user space.

``vcpu.run()`` resumes the guest program (:mod:`sevcore.guest`) and performs its operations as
KVM would: memory accesses through the NPT and the fault path (:mod:`sevcore.mmu`), hypercalls
(``____kvm_emulate_hypercall``), RDMSR/WRMSR (in-kernel emulation, the MSR filter, user-space
exits), and ucalls (``KVM_EXIT_IO``). It returns when the kernel would return to user space,
with the exit described in ``vcpu.kvm_run``; it raises ``OSError(EFAULT/EIO/...)`` where
``KVM_RUN`` fails, leaving ``KVM_EXIT_MEMORY_FAULT`` in ``kvm_run`` for memory faults
(``spec/kvm-uapi.md`` section 5.4). What user space writes into ``kvm_run`` before the next
``run()`` (``hypercall.ret``, ``msr.data``/``msr.error``, ``mmio.data``) completes the exit.
"""
from errno import EBADF, EINTR, EINVAL, EIO

import numpy as np

from sevcore import uapi as U
from sevcore.errors import KvmError
from sevcore.guest import (UCALL_ABORT, UCALL_DONE, Guest, GuestException, Op)
from sevcore.hostmem import PAGE_SHIFT, PAGE_SIZE
from sevcore.mmu import MemoryFault, MmioAccess, decode_gpa, faultin_pages, translate
from sevcore.msr import (MSR_OK, MSR_RET_FILTERED, MSR_TYPE_R, MSR_TYPE_W, PV_HC_FEATURE,
                         MsrState, msr_exit_reason)
from sevcore.npt import NPT_DIRTY_LOG

U64 = (1 << 64) - 1
#: VMCB exit code of a failed VMRUN (SVM_EXIT_ERR, -1), KVM's fail_entry reason.
SVM_EXIT_ERR = (1 << 64) - 1
#: The port the selftests' ucalls use (UCALL_PIO_PORT).
UCALL_PIO_PORT = 0x1000

#: PV features KVM_GET_SUPPORTED_CPUID reports in KVM_CPUID_FEATURES.eax (arch/x86/kvm/cpuid.c);
#: HC_MAP_GPA_RANGE and MIGRATION_CONTROL are set by user space only.
KVM_SUPPORTED_PV_FEATURES = sum(1 << b for b in (
    U.KVM_FEATURE_CLOCKSOURCE, U.KVM_FEATURE_NOP_IO_DELAY, U.KVM_FEATURE_CLOCKSOURCE2,
    U.KVM_FEATURE_ASYNC_PF, U.KVM_FEATURE_PV_EOI, U.KVM_FEATURE_CLOCKSOURCE_STABLE_BIT,
    U.KVM_FEATURE_PV_UNHALT, U.KVM_FEATURE_PV_TLB_FLUSH, U.KVM_FEATURE_ASYNC_PF_VMEXIT,
    U.KVM_FEATURE_PV_SEND_IPI, U.KVM_FEATURE_POLL_CONTROL, U.KVM_FEATURE_PV_SCHED_YIELD,
    U.KVM_FEATURE_ASYNC_PF_INT, U.KVM_FEATURE_MSI_EXT_DEST_ID, U.KVM_FEATURE_STEAL_TIME))


# -- struct kvm_run ------------------------------------------------------------------------------

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


class KvmRun:
    """struct kvm_run: the shared page KVM_RUN reports exits in. ``ucall`` is the decoded
    selftest ucall of a ``KVM_EXIT_IO`` exit: ``(cmd, values)``."""

    __slots__ = ("exit_reason", "immediate_exit", "hypercall", "memory_fault", "msr", "mmio",
                 "io", "internal", "ucall", "fail_entry_reason")

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

    def __repr__(self):
        return f"<kvm_run exit_reason={self.exit_reason}>"


class GuestAssertionError(AssertionError):
    """A guest program's assertion, reported through UCALL_ABORT."""


_BULK_OPS = {"read": 1, "write": 2, "fill": 3, "pattern": 4, "check": 5, "stamp": 6, "digest": 7}
_EXIT = object()      # an operation stopped the run loop with an exit prepared
_THROW = object()     # an operation ends by raising an exception in the guest


def _s64(v):
    v &= U64
    return v - (1 << 64) if v >> 63 else v


def default_cpuid(host):
    """The entries KVM_GET_SUPPORTED_CPUID gives a simulated AMD host: the basic and extended
    leaves a guest program looks at, Fn8000_001F (SEV, with the C-bit position), and KVM's
    paravirtual leaves 0x40000000/0x40000001."""
    def e(function, eax=0, ebx=0, ecx=0, edx=0, index=0, flags=0):
        return {"function": function, "index": index, "flags": flags,
                "eax": eax, "ebx": ebx, "ecx": ecx, "edx": edx}
    auth = int.from_bytes(b"Auth", "little"), int.from_bytes(b"enti", "little"), \
        int.from_bytes(b"cAMD", "little")
    kvm_sig = [int.from_bytes(b"KVMKVMKVM\0\0\0"[i:i + 4], "little") for i in (0, 4, 8)]
    return [
        e(0x0, 0x10, auth[0], auth[2], auth[1]),
        e(0x1, 0x00a10f11, 0, 1 << 31, 0x178bfbff),
        e(0x80000000, 0x80000021, auth[0], auth[2], auth[1]),
        e(0x80000001, 0, 0, 1 << 2, 1 << 29 | 1 << 20),
        e(0x80000008, 0x3030, 0, 0, 0),
        # Fn8000_001F: SME, SEV, SEV-ES in EAX; EBX[5:0] = C-bit position.
        e(0x8000001F, 1 << 0 | 1 << 1 | 1 << 3, host.c_bit, 509, 0),
        e(U.KVM_CPUID_SIGNATURE, U.KVM_CPUID_FEATURES, *kvm_sig),
        e(U.KVM_CPUID_FEATURES, KVM_SUPPORTED_PV_FEATURES),
    ]


class Vcpu:
    """A vCPU fd. Created by :meth:`sevcore.vm.Vm.create_vcpu`."""

    def __init__(self, vm, vcpu_id):
        self.vm = vm
        self.vcpu_id = vcpu_id
        self.kvm_run = KvmRun()
        self.cpuid = []
        self._pv_features = 0
        self.pv_enforce = False
        self.msrs = MsrState(self)
        self.has_run = False
        self.closed = False
        self._code = None
        self._gen = None
        self._op = None          # the operation being executed (kept across exits)
        self._progress = None    # per-operation state that survives an exit
        self._send = None        # what the guest receives next
        self._throw = None       # or an exception to raise in it
        self._complete = None    # complete_userspace_io callback
        self._finished = False
        #: SEV-ES: the VMSA page (an SPA) and whether LAUNCH_UPDATE_VMSA encrypted it.
        self.vmsa_spa = None
        self.guest_state_protected = False
        self.guest_debug = 0
        self.fd = vm.host.install_fd(self)

    def __repr__(self):
        return f"<Vcpu {self.vcpu_id} of {self.vm!r}>"

    def close(self):
        """Close the vCPU fd (the VM keeps the vCPU, as KVM does, until it is destroyed)."""
        if not self.closed:
            self.closed = True
            self.vm.host.release_fd(self.fd)

    def _enter(self, ioctl):
        if self.closed:
            raise KvmError(EBADF, ioctl, "vCPU fd is closed")
        if self.vm.dead:
            raise KvmError(EIO, ioctl, "VM is dead")

    # -- CPUID and capabilities ----------------------------------------------------------------------

    def set_cpuid2(self, entries):
        """Mirrors ``KVM_SET_CPUID2``: EINVAL for a CPUID that differs from the current one after
        the vCPU has run. KVM clears KVM_FEATURE_PV_UNHALT when HLT exits are disabled."""
        ioctl = "KVM_SET_CPUID2"
        self._enter(ioctl)
        new = [dict(e) for e in entries]
        for e in new:
            for k in ("function", "index", "flags", "eax", "ebx", "ecx", "edx"):
                e.setdefault(k, 0)
                if not isinstance(e[k], int) or not 0 <= e[k] < 1 << 32:
                    raise KvmError(EINVAL, ioctl, f"cpuid entry field {k} is not a u32")
        if self.vm.hlt_in_guest:           # kvm_update_cpuid_runtime
            for e in new:
                if e["function"] == U.KVM_CPUID_FEATURES:
                    e["eax"] &= ~(1 << U.KVM_FEATURE_PV_UNHALT)
        if self.has_run and new != self.cpuid:
            raise KvmError(EINVAL, ioctl, "CPUID cannot change after KVM_RUN")
        self.cpuid = new
        leaf = self.cpuid_entry(U.KVM_CPUID_FEATURES)
        self._pv_features = leaf["eax"] if leaf else 0
        return 0

    def get_cpuid2(self):
        """Mirrors ``KVM_GET_CPUID2``: a copy of the entries."""
        self._enter("KVM_GET_CPUID2")
        return [dict(e) for e in self.cpuid]

    def cpuid_entry(self, function, index=0):
        for e in self.cpuid:
            if e["function"] == function and e["index"] == index:
                return e
        return None

    def guest_pv_has(self, feature):
        """guest_pv_has: without KVM_CAP_ENFORCE_PV_FEATURE_CPUID every PV feature is allowed."""
        return not self.pv_enforce or bool(self._pv_features >> feature & 1)

    def enable_cap(self, cap, *args, flags=0):
        """Mirrors ``KVM_ENABLE_CAP`` on a vCPU fd (KVM_CAP_ENFORCE_PV_FEATURE_CPUID)."""
        ioctl = "KVM_ENABLE_CAP"
        self._enter(ioctl)
        a = list(args) + [0] * (4 - len(args))
        if flags != 0:
            raise KvmError(EINVAL, ioctl, "flags must be 0")
        if cap == U.KVM_CAP_ENFORCE_PV_FEATURE_CPUID:
            self.pv_enforce = bool(a[0])
            return 0
        raise KvmError(EINVAL, ioctl, f"capability {cap} cannot be enabled on a vCPU")

    # -- the guest -------------------------------------------------------------------------------------

    def set_guest_code(self, fn, *args):
        """Load a guest program: ``fn(g, *args)`` is a generator function (sevcore.guest)."""
        self._code = (fn, args)
        self._gen = None
        self._op = self._progress = self._complete = self._throw = self._send = None
        self._finished = False

    def get_ucall(self):
        """The ucall of the last exit, ``(cmd, values)``, or None if it was not a ucall; raises
        GuestAssertionError for UCALL_ABORT (REPORT_GUEST_ASSERT)."""
        run = self.kvm_run
        if run.exit_reason != U.KVM_EXIT_IO or run.ucall is None:
            return None
        if run.ucall[0] == UCALL_ABORT:
            raise GuestAssertionError(run.ucall[1][0])
        return run.ucall

    # -- KVM_RUN -----------------------------------------------------------------------------------------

    def run(self):
        """Mirrors ``KVM_RUN``: run the guest until an exit to user space; returns ``kvm_run``.

        Raises EINVAL for an SEV VM that was never initialised, EIO for a dead VM, EINTR for
        ``immediate_exit``, and EFAULT/EIO/... with ``KVM_EXIT_MEMORY_FAULT`` for memory faults."""
        ioctl = "KVM_RUN"
        self._enter(ioctl)
        vm = self.vm
        if vm.sev_need_init:
            raise KvmError(EINVAL, ioctl, "SEV VM has not been initialised (KVM_SEV_INIT2)")
        if vm.sev.active and self._sev_entry_fails():
            # VMRUN of a guest whose firmware context was SENT (SEND_FINISH) or has no key:
            # the entry fails (SVM_EXIT_ERR) and KVM reports KVM_EXIT_FAIL_ENTRY.
            run = self.kvm_run
            run.exit_reason = U.KVM_EXIT_FAIL_ENTRY
            run.fail_entry_reason = SVM_EXIT_ERR
            return run
        if self._code is None:
            raise ValueError("no guest program: call vcpu.set_guest_code(fn, ...) first")
        run = self.kvm_run
        self.has_run = True
        if self._complete is not None:
            complete, self._complete = self._complete, None
            complete()
        if run.immediate_exit:
            run.exit_reason = U.KVM_EXIT_INTR
            raise KvmError(EINTR, ioctl, "immediate_exit")
        if not vm.has_memslots():
            # Nothing to fetch instructions from: emulation of the first fetch fails.
            run.exit_reason = U.KVM_EXIT_INTERNAL_ERROR
            run.internal.suberror = U.KVM_INTERNAL_ERROR_EMULATION
            run.internal.ndata = 0
            return run
        run.ucall = None
        while True:
            if self._op is None:
                op = self._next_op()
                if op is _EXIT:
                    return run
                self._op, self._progress = op, None
            try:
                result = self._execute(self._op)
            except MemoryFault as f:
                run.exit_reason = U.KVM_EXIT_MEMORY_FAULT
                run.memory_fault.flags = f.flags
                run.memory_fault.gpa = f.gpa
                run.memory_fault.size = PAGE_SIZE
                raise KvmError(f.errno, ioctl, f.why) from None
            if result is _EXIT:
                return run
            self._op = None
            if result is not _THROW:
                self._send = result

    def _sev_entry_fails(self):
        vm = self.vm
        psp = vm.host.psp
        g = psp.guest(vm.sev.handle)
        return g is None or g.state == U.SEV_GUEST_STATE_SENT or \
            not vm.host.umc.has_key(vm.sev.asid)

    def _next_op(self):
        """Resume the generator with the last result; a ucall exit when it ends or raises."""
        run = self.kvm_run
        if self._finished:
            run.exit_reason = U.KVM_EXIT_HLT
            return _EXIT
        if self._gen is None:
            fn, args = self._code
            self._gen = fn(Guest(self), *args)
            if not hasattr(self._gen, "send"):
                self._finished = True
                raise TypeError("guest code must be a generator function")
        try:
            if self._throw is not None:
                exc, self._throw = self._throw, None
                op = self._gen.throw(exc)
            elif self._send is None:
                op = next(self._gen)
            else:
                send, self._send = self._send, None
                op = self._gen.send(send)
        except StopIteration:
            self._finished = True
            return self._ucall_exit(UCALL_DONE, ())
        except Exception as e:             # a guest assert or any guest error: UCALL_ABORT
            self._finished = True
            msg = str(e) or type(e).__name__
            return self._ucall_exit(UCALL_ABORT, (f"{type(e).__name__}: {msg}",))
        if not isinstance(op, Op):
            self._finished = True
            return self._ucall_exit(UCALL_ABORT, (f"guest yielded {op!r}, not a g.* operation",))
        return op

    def _ucall_exit(self, cmd, values):
        run = self.kvm_run
        run.exit_reason = U.KVM_EXIT_IO
        run.io.direction, run.io.size, run.io.port, run.io.count = U.KVM_EXIT_IO_OUT, 4, \
            UCALL_PIO_PORT, 1
        run.ucall = (cmd, tuple(values))
        if cmd == UCALL_DONE:
            self._finished = True
        return _EXIT

    def _execute(self, op):
        kind, args = op
        if kind == "read":
            return self._access(args[0], args[1], None)
        if kind == "write":
            return self._access(args[0], len(args[1]), args[1])
        if kind in ("bulk", "bulk_list"):
            return self._bulk(kind, args)
        if kind == "hypercall":
            return self._hypercall(*args)
        if kind == "rdmsr":
            return self._rdmsr(*args)
        if kind == "wrmsr":
            return self._wrmsr(*args)
        if kind == "ucall":
            self._op = None          # the OUT completes before user space sees the exit
            return self._ucall_exit(*args)
        raise ValueError(f"unknown guest operation {kind!r}")

    # -- memory ---------------------------------------------------------------------------------------

    def _access(self, gpa, size, data):
        """A guest read (data None) or write of [gpa, gpa + size). Whole pages go to the C page
        kernel, partial pages (and MMIO) are handled here; progress is kept across exits so a
        retried access resumes where it stopped."""
        from sevcore import guestmem as gm
        if self._progress is None:
            self._progress = {"pos": 0, "buf": bytearray(size) if data is None else None}
        st = self._progress
        write = data is not None
        while st["pos"] < size:
            pos = st["pos"]
            addr = gpa + pos
            off = addr & (PAGE_SIZE - 1)
            n = min(PAGE_SIZE - off, size - pos)
            if off == 0 and size - pos >= PAGE_SIZE:
                npages = (size - pos) >> PAGE_SHIFT
                span = slice(pos, pos + (npages << PAGE_SHIFT))
                buf = memoryview(data)[span] if write else memoryview(st["buf"])[span]
                done = [0]
                try:
                    self._page_kernel(gm.GUEST_OP_WRITE if write else gm.GUEST_OP_READ, addr,
                                      npages, done, buf=buf)
                except MmioAccess as e:
                    return self._mmio(st, e.gpa, data, pos + (done[0] << PAGE_SHIFT), 8)
                finally:
                    st["pos"] = pos + (done[0] << PAGE_SHIFT)
                continue
            try:
                self._access_partial(addr, off, n, data, pos, st["buf"])
            except MmioAccess as e:
                return self._mmio(st, e.gpa + off, data, pos, min(n, 8))
            st["pos"] = pos + n
        return None if write else bytes(st["buf"])

    def _access_partial(self, addr, off, n, data, pos, buf):
        """Bytes [off, off + n) of one page, through the NPT (and the key for C-bit accesses)."""
        vm = self.vm
        write = data is not None
        real, private, encrypted = decode_gpa(vm, addr)
        gfn = real >> PAGE_SHIFT
        pfn, flags = translate(vm, gfn, private, write)
        frames = vm.host.mem.frames
        base = pfn << PAGE_SHIFT
        engine = vm.encryption_engine() if encrypted else None
        if engine is None:
            if write:
                frames[base + off:base + off + n] = np.frombuffer(data, np.uint8, n, pos)
            else:
                buf[pos:pos + n] = frames[base + off:base + off + n].tobytes()
        else:
            page = engine.decrypt_page(frames[base:base + PAGE_SIZE], base)
            if write:
                page = bytearray(page)
                page[off:off + n] = data[pos:pos + n]
                engine.encrypt_page(bytes(page), base, out=frames[base:base + PAGE_SIZE])
            else:
                buf[pos:pos + n] = bytes(page[off:off + n])
        if write and flags & NPT_DIRTY_LOG:
            vm.mark_page_dirty(gfn)

    def _mmio(self, st, gpa, data, pos, n):
        """KVM_EXIT_MMIO for ``n`` bytes at ``gpa`` (C-bit / shared bit stripped); the read
        data user space supplies completes the access on the next KVM_RUN."""
        run = self.kvm_run
        run.exit_reason = U.KVM_EXIT_MMIO
        run.mmio.phys_addr = gpa
        run.mmio.len = n
        run.mmio.is_write = int(data is not None)
        run.mmio.data = bytearray(8)
        if data is not None:
            run.mmio.data[:n] = data[pos:pos + n]

        def complete():
            if data is None:
                st["buf"][pos:pos + n] = bytes(run.mmio.data[:n])
            st["pos"] = pos + n
        self._complete = complete
        return _EXIT

    def _page_kernel(self, op, first_gpa, n, done, *, gpas=None, arg=0, buf=None, out=None,
                     on_chunk=None):
        """Run the C page kernel over ``n`` pages from ``first_gpa`` (or the page-aligned list
        ``gpas``), from page ``done[0]`` on (``out``: CHECK's two words, or DIGEST's word per
        page), faulting in the pages it stops at in batches
        (:func:`sevcore.mmu.faultin_pages`). ``done[0]`` always holds the pages completed, also
        when MemoryFault or MmioAccess propagates. ``on_chunk(start, k)`` sees each kernel
        call's result (CHECK accumulates its ``out`` there)."""
        from sevcore import guestmem as gm
        vm = self.vm
        write = op in gm.WRITE_OPS
        ops = vm.page_ops()
        while done[0] < n:
            start = done[0]
            first = first_gpa + (start << PAGE_SHIFT) if gpas is None else int(gpas[start])
            if first & (PAGE_SIZE - 1):
                raise ValueError(f"bulk access: gpa {first:#x} is not page aligned")
            real, private, encrypted = decode_gpa(vm, first)
            tag = first - real             # the C-bit or shared bit, common to the access
            engine = vm.encryption_engine() if encrypted else None
            if gpas is None:
                gfns = np.arange(real >> PAGE_SHIFT, (real >> PAGE_SHIFT) + n - start,
                                 dtype=np.uint64)
            else:
                gfns = (gpas[start:] - np.uint64(tag)) >> np.uint64(PAGE_SHIFT)
            page_buf = None if buf is None else buf[start << PAGE_SHIFT:]
            k = ops.run(op, gfns=gfns, private=private, engine=engine, arg=arg, buf=page_buf,
                        out=out[start:] if op == gm.GUEST_OP_DIGEST else out)
            if on_chunk is not None:
                on_chunk(start, k)
            done[0] = start + k
            if done[0] == n:
                return
            g = int(gfns[k])
            if g > vm.max_gfn:
                raise MmioAccess(g << PAGE_SHIFT)
            _, private, _ = decode_gpa(vm, (g << PAGE_SHIFT) | tag)
            faultin_pages(vm, gfns[k:], private, write)

    def _bulk(self, kind, args):
        """A bulk operation: the C page kernel over all its pages (progress survives exits)."""
        from sevcore import guestmem as gm
        if kind == "bulk":
            name, gpa, n, arg = args
            gpas = buf = None
        else:
            name, gpas, arg, buf = args
            gpa, gpas = 0, np.asarray(gpas, dtype=np.uint64).reshape(-1)
            n = len(gpas)
        st = self._progress
        if st is None:
            result = None                  # what DIGEST and READ return, filled across exits
            if name == "digest":
                result = np.zeros(n, np.uint64)
            elif name == "read":
                result = np.empty((n, PAGE_SIZE), np.uint8) if buf is None else buf
            st = self._progress = {"done": [0], "check": [0, None], "result": result}
        out = st["result"] if name == "digest" else np.zeros(2, np.uint64) \
            if name == "check" else None
        if name == "read":
            buf = np.frombuffer(st["result"], np.uint8)

        def on_chunk(start, k):
            if name == "check" and k:
                st["check"][0] += int(out[0])
                if st["check"][1] is None and int(out[1]) != gm.NO_MISMATCH:
                    st["check"][1] = start + int(out[1])
        try:
            self._page_kernel(_BULK_OPS[name], gpa, n, st["done"], gpas=gpas, arg=arg, buf=buf,
                              out=out, on_chunk=on_chunk)
        except MmioAccess as e:
            # Bulk operations are for RAM; the guest sees the failure as an exception.
            self._throw = RuntimeError(f"bulk {name} reached MMIO at gpa {e.gpa:#x}")
            return _THROW
        if name == "check":
            return st["check"][0], st["check"][1]
        return st["result"]

    # -- hypercalls ---------------------------------------------------------------------------------

    def _hypercall(self, nr, a0, a1, a2, a3):
        """____kvm_emulate_hypercall (64-bit mode, CPL 0)."""
        vm = self.vm
        if nr in PV_HC_FEATURE and not self.guest_pv_has(PV_HC_FEATURE[nr]):
            return -U.KVM_ENOSYS
        if nr == U.KVM_HC_MAP_GPA_RANGE:
            if not vm.hypercall_exit_enabled & (1 << U.KVM_HC_MAP_GPA_RANGE):
                return -U.KVM_ENOSYS
            gfn = a0 >> PAGE_SHIFT
            if a0 & (PAGE_SIZE - 1) or a1 == 0 or (gfn + a1) & U64 <= gfn:
                return -U.KVM_EINVAL
            run = self.kvm_run
            run.exit_reason = U.KVM_EXIT_HYPERCALL
            hc = run.hypercall
            hc.nr = nr
            hc.args[0], hc.args[1], hc.args[2] = a0, a1, a2
            hc.ret = 0
            hc.flags = U.KVM_EXIT_HYPERCALL_LONG_MODE

            def complete():        # complete_hypercall_exit
                self._op = None
                self._send = _s64(run.hypercall.ret)
            self._complete = complete
            return _EXIT
        if nr in (U.KVM_HC_KICK_CPU, U.KVM_HC_SCHED_YIELD, U.KVM_HC_VAPIC_POLL_IRQ):
            return 0
        if nr == U.KVM_HC_SEND_IPI:
            # kvm_pv_send_ipi: bitmap a0 (low) / a1 (high) of APIC ids from a2; returns the
            # number of vCPUs the IPI reached.
            ids = {v.vcpu_id for v in vm.vcpus}
            bits = a0 | (a1 << 64)
            return sum(1 for i in range(128) if bits >> i & 1 and (a2 + i) in ids)
        if nr == U.KVM_HC_CLOCK_PAIRING:
            return -U.KVM_EOPNOTSUPP      # no stable TSC-based kvmclock is simulated
        return -U.KVM_ENOSYS

    # -- MSRs ---------------------------------------------------------------------------------------

    def _msr_allowed(self, index, type):
        f = self.vm.msr_filter
        return f is None or f.allowed(index, type)

    def _msr_user_exit(self, exit_reason, index, data, ret):
        """kvm_msr_user_space: exit if user space asked for this reason, else None."""
        reason = msr_exit_reason(ret)
        if not self.vm.user_space_msr_mask & reason:
            return None
        run = self.kvm_run
        run.exit_reason = exit_reason
        run.msr.error = 0
        run.msr.reason = reason
        run.msr.index = index
        run.msr.data = data
        return run

    def _rdmsr(self, index, safe):
        ret = MSR_RET_FILTERED if not self._msr_allowed(index, MSR_TYPE_R) else None
        value = 0
        if ret is None:
            ret, value = self.msrs.get(index)
        if ret == MSR_OK:
            return (0, value) if safe else value
        run = self._msr_user_exit(U.KVM_EXIT_X86_RDMSR, index, 0, ret)
        if run is None:
            return self._deliver_gp(safe, (U.GP_VECTOR, 0), f"RDMSR {index:#x}")

        def complete():
            self._op = None
            if run.msr.error:
                self._complete_with(self._deliver_gp(safe, (U.GP_VECTOR, 0), f"RDMSR {index:#x}"))
            else:
                v = run.msr.data & U64
                self._send = (0, v) if safe else v
        self._complete = complete
        return _EXIT

    def _wrmsr(self, index, value, safe):
        ret = MSR_RET_FILTERED if not self._msr_allowed(index, MSR_TYPE_W) else None
        if ret is None:
            ret = self.msrs.set(index, value)
        if ret == MSR_OK:
            return 0 if safe else None
        run = self._msr_user_exit(U.KVM_EXIT_X86_WRMSR, index, value, ret)
        if run is None:
            return self._deliver_gp(safe, U.GP_VECTOR, f"WRMSR {index:#x}")

        def complete():
            self._op = None
            if run.msr.error:
                self._complete_with(self._deliver_gp(safe, U.GP_VECTOR, f"WRMSR {index:#x}"))
            else:
                self._send = 0 if safe else None
        self._complete = complete
        return _EXIT

    def _deliver_gp(self, safe, safe_result, what):
        """#GP for the current instruction: the *_safe forms return the vector, the others
        raise GuestException in the guest."""
        if safe:
            return safe_result
        self._throw = GuestException(U.GP_VECTOR, what)
        return _THROW

    def _complete_with(self, result):
        """Finish the pending instruction from a completion callback with ``result``."""
        if result is not _THROW:
            self._send = result
