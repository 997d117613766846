"""Bulk guest-memory access: a guest touching many pages per C call through its nested page table.

The C kernel (csrc/guest.h) is the fast path of a guest access: it walks the pages in order and
stops in front of the first one that would fault (not present, the other kind of mapping than the
access, or read-only for a write), returning how many it completed. The model resolves that fault
and calls again from there:

>>> ops = GuestPageOps(vm.npt, host.mem.frames)
>>> done = 0
>>> while done < npages:
...     done += ops.run(GUEST_OP_FILL, gfn0=gfn + done, n=npages - done, arg=0x5a5a5a5a5a5a5a5a)
...     if done < npages:
...         fault_in(gfn + done)                   # the model's NPT fault path (maps a batch)

An encrypted access (``engine=``, an SEV guest's C-bit access) decrypts on reads and encrypts on
writes at each page's SPA, so the frames hold ciphertext. Writes through NPT_DIRTY_LOG entries set
the gfn's bit in the dirty bitmap of its slot (:meth:`GuestPageOps.set_dirty_slots`).
"""
from sevcore import _bindings as _b
from sevcore.core.arrays import u64

GUEST_OP_READ = _b.GUEST_OPS["READ"]
GUEST_OP_WRITE = _b.GUEST_OPS["WRITE"]
GUEST_OP_FILL = _b.GUEST_OPS["FILL"]
GUEST_OP_PATTERN = _b.GUEST_OPS["PATTERN"]
GUEST_OP_CHECK = _b.GUEST_OPS["CHECK"]
GUEST_OP_STAMP = _b.GUEST_OPS["STAMP"]
GUEST_OP_DIGEST = _b.GUEST_OPS["DIGEST"]
#: The ops that store into guest pages (and so need writable entries and mark pages dirty).
WRITE_OPS = frozenset({GUEST_OP_WRITE, GUEST_OP_FILL, GUEST_OP_PATTERN, GUEST_OP_STAMP})
PAGE_SIZE = _b.GUEST_PAGE_SIZE
#: What CHECK reports in ``out[1]`` when every page matched.
NO_MISMATCH = 2**64 - 1


def pattern(seed, gfn):
    """The 4096 bytes GUEST_OP_PATTERN writes to ``gfn`` with ``arg=seed`` (csrc/guest.h)."""
    return _b.guest_pattern(seed, gfn)


def digest(page):
    """What GUEST_OP_DIGEST reports for a page holding ``page`` (4096 bytes): its XXH3-64."""
    return _b.guest_digest(page)


def implementation():
    """Which C path the page loops take with the active CPU features: 'avx512', 'avx2' or
    'portable'."""
    return _b.guest_impl()


class GuestPageOps:
    """Page ops of one guest: its Npt, and the host memory its entries point into. Calls from
    several threads (the vCPUs of one VM) run at once: each takes the table's lock for read
    (for write only if it may change entries) and its own copy of the C context, and C runs
    with the GIL released."""

    def __init__(self, npt, frames):
        """``npt``: the guest's :class:`sevcore.core.npt.Npt`; ``frames``: host physical memory as a
        writable buffer (``host.mem.frames``), SPA 0 at its first byte."""
        self._npt = npt
        self._frames = frames
        self._ctx, self._frames_view = _b.guest_ctx(frames)
        self._slots = ([], None, [])   # (triples as given, C array, C views of the bitmaps)
        #: None, or a function returning a context manager that :meth:`run` enters around its
        #: hold of the table's lock and the C call: what the calling thread lets other threads
        #: do meanwhile (sevcore.migration.helper hands its vCPU threads' turn over there).
        self.around_c = None

    def close(self):
        """Drop the views of ``frames`` and of the slot bitmaps, so their memory can be unmapped."""
        with self._npt.lock:
            if self._frames_view is not None:
                _b.ffi.release(self._frames_view)
                self._frames_view = self._frames = None
                self._ctx.nslots = 0
                self._slots = ([], None, [])

    def set_dirty_slots(self, slots):
        """The memslots with dirty logging on, as ``(base_gfn, npages, words)`` with ``words`` a
        uint64 numpy array of at least ``ceil(npages / 64)`` words in the KVM_GET_DIRTY_LOG
        layout, or ``(base_gfn, npages, words, id)`` with the slot's dirty-ring id
        ``(as_id << 16) | id`` and ``words`` None where only a ring logs it. They must be sorted
        by ``base_gfn`` and disjoint (checked by every :meth:`run`). The arrays are kept
        referenced until the next call."""
        triples = [(int(s[0]), int(s[1]), s[2], *map(int, s[3:])) for s in slots]
        arr, views = _b.guest_slots(triples)
        with self._npt.lock:
            self._ctx.slots = arr if triples else _b.ffi.NULL
            self._ctx.nslots = len(triples)
            self._slots = (triples, arr, views)

    def reset_ring(self, ring):
        """KVM_RESET_DIRTY_RINGS for ``ring`` (a :class:`sevcore.core.dirty_ring.DirtyRingBuffer`):
        free its collected entries and write-protect their pages again in this NPT, for the
        slots of :meth:`set_dirty_slots`. Returns the entries freed."""
        with self._npt.lock:
            _, arr, _ = self._slots
            return _b.dirty_ring_reset(ring.cdata(), self._npt.cdata(),
                                       arr if arr is not None else _b.ffi.NULL,
                                       self._ctx.nslots)

    def run(self, op, gfns=None, gfn0=0, n=None, *, private=False, engine=None, arg=0, buf=None,
            out=None, ring=None, rmp=None, asid=0):
        """Perform ``op`` on the pages ``gfns`` (integers) or, if None, ``n`` pages from ``gfn0``;
        returns how many pages were completed (``n``, or the index of the first page that
        faults, or in ring mode the page whose push would make ``ring`` soft-full: see
        csrc/guest.h). ``ring``: the running vCPU's
        :class:`sevcore.core.dirty_ring.DirtyRingBuffer`, which logged writes then push to.
        ``buf`` holds ``n * 4096`` bytes for READ (writable) and WRITE; ``out`` is a uint64
        array of ``n`` words for DIGEST, of 2 for CHECK (mismatching pages, index of the first or
        :data:`NO_MISMATCH`). ``private``: the access is private (served by NPT_PRIVATE entries
        only); ``engine``: a :class:`sevcore.core.memcrypt.MemoryEngine` for an encrypted access.
        ``rmp``: an SEV-SNP host's RMP (its ``cdata()``) for a private access of the guest of
        ``asid``, which then also stops in front of a page the RMP check refuses (not assigned
        to ``asid`` and validated).

        Raises ValueError, having written nothing, for bad arguments (also for a write through an
        NPT_DIRTY_LOG entry outside every dirty slot), and ``OSError(EFAULT)`` if an entry to be
        used maps a frame outside ``frames``; the message names the argument, page or slot C
        refused.
        """
        if gfns is not None:
            gfns = u64(gfns, "gfns")
            if type(gfns) is int:
                raise TypeError("gfns must be a sequence of gfns, not one int")
            gfns = gfns.reshape(-1)
            if n is not None:
                if not 0 <= n <= gfns.size:
                    raise ValueError(f"n = {n} pages, but gfns holds {gfns.size}")
                gfns = gfns[:n]
            n = gfns.size
        elif n is None:
            raise ValueError("give gfns, or gfn0 and n")
        eng = _b.ffi.NULL if engine is None else engine.cdata()
        # Only a logged write with a ring changes entries (it clears NPT_DIRTY_LOG in place:
        # csrc/guest.h); every other call reads the table and may run beside others.
        lock = self._npt.lock if ring is not None and op in WRITE_OPS else \
            self._npt.lock.shared()
        if self.around_c is None:
            return self._call(lock, op, gfns, gfn0, n, eng, private, ring, rmp, asid, arg, buf,
                              out)
        with self.around_c():
            return self._call(lock, op, gfns, gfn0, n, eng, private, ring, rmp, asid, arg, buf,
                              out)

    def _call(self, lock, op, gfns, gfn0, n, eng, private, ring, rmp, asid, arg, buf, out):
        with lock:
            if self._frames_view is None:
                raise ValueError("operation on a closed GuestPageOps")
            # The call's own copy of the context: concurrent calls differ in these fields.
            ctx = _b.ffi.new("struct sc_guest_ctx *", self._ctx[0])
            ctx.npt = self._npt.cdata()
            ctx.eng = eng
            ctx.private_access = 1 if private else 0
            ctx.ring = _b.ffi.NULL if ring is None else ring.cdata()
            if rmp is not None:
                ctx.rmp = rmp
                ctx.rmp_asid = asid
            try:
                return _b.guest_pages(ctx, op, gfns, gfn0, n, arg, buf, out)
            except (OverflowError, TypeError):
                # cffi refused a scalar that is no u64 (or op no int): name it.
                for value, name in ((gfn0, "gfn0"), (n, "n"), (arg, "arg")):
                    u64(value, name)
                raise
