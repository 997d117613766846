"""A slow, obviously correct twin of :class:`sevcore.core.pages.GuestPageOps` (the test oracle for
csrc/guest.c).

Page by page: ``Npt.lookup``, the fault checks, numpy copies of the frames,
``MemoryEngine.encrypt_page`` / ``decrypt_page`` for encrypted accesses, and a Python set of dirty
gfns per slot. The PATTERN content and the XXH3-64 DIGEST are written here from their definitions
with Python ints; nothing is shared with the C kernel. Same return values, same errors (ValueError
where C says EINVAL, ``OSError(EFAULT)``), and like C it checks every page it will complete before
it writes any.
"""
import errno
import operator

import numpy as np

from sevcore.core.npt import NPT_DIRTY_LOG, NPT_PRIVATE, NPT_WRITABLE

PAGE_SIZE = 4096
GFN_LIMIT = 1 << 36
READ, WRITE, FILL, PATTERN, CHECK, STAMP, DIGEST = range(1, 8)
WRITES = {WRITE, FILL, PATTERN, STAMP}
NO_MISMATCH = 2**64 - 1
M64 = 2**64 - 1

# --- PATTERN: splitmix64 ----------------------------------------------------------------------

GOLDEN = 0x9E3779B97F4A7C15


def mix64(z):
    """The splitmix64 output function (Vigna's splitmix64.c)."""
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & M64
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & M64
    return z ^ (z >> 31)


def splitmix64(state, count):
    """The first ``count`` outputs of splitmix64 from ``state``."""
    out = []
    for _ in range(count):
        state = (state + GOLDEN) & M64
        out.append(mix64(state))
    return out


_S = splitmix64(0, PAGE_SIZE // 8)


def pattern(seed, gfn):
    """Word j = K ^ S[j]: S the splitmix64 stream from state 0, K = mix(first output of
    splitmix64 from ``seed``, xor ``gfn``)."""
    key = mix64(splitmix64(seed, 1)[0] ^ gfn)
    return b"".join((key ^ s).to_bytes(8, "little") for s in _S)


# --- DIGEST: XXH3-64, seed 0 (xxHash doc/xxhash_spec.md, "XXH3 algorithm", inputs > 240 bytes) ---

SECRET = bytes.fromhex(
    "b8fe6c3923a44bbe7c01812cf721ad1cded46de9839097db7240a4a4b7b3671f"
    "cb79e64eccc0e578825ad07dccff7221b8084674f743248ee03590e6813a264c"
    "3c2852bb91c300cb88d0658b1b532ea371644897a20df94e3819ef46a9deacd8"
    "a8fa763fe39c343ff9dcbbc7c70b4f1d8a51e04bcdb45931c89f7ec9d9787364"
    "eac5ac8334d3ebc3c581a0fffa1363eb170ddd51b7f0da49d316552629d4689e"
    "2b16be587d47a1fc8ff8b8d17ad031ce45cb3a8f95160428afd7fbcabb4b407e")
PRIME32_1, PRIME32_2, PRIME32_3 = 0x9E3779B1, 0x85EBCA77, 0xC2B2AE3D
PRIME64 = [0x9E3779B185EBCA87, 0xC2B2AE3D27D4EB4F, 0x165667B19E3779F9, 0x85EBCA77C2B2AE63,
           0x27D4EB2F165667C5]
STRIPE = 64


def _u64(data, offset):
    return int.from_bytes(data[offset:offset + 8], "little")


def _accumulate_512(acc, data, offset, secret_offset):
    for i in range(8):
        value = _u64(data, offset + 8 * i)
        key = value ^ _u64(SECRET, secret_offset + 8 * i)
        acc[i ^ 1] = (acc[i ^ 1] + value) & M64
        acc[i] = (acc[i] + (key & 0xFFFFFFFF) * (key >> 32)) & M64


def _scramble(acc):
    for i in range(8):
        a = acc[i] ^ (acc[i] >> 47) ^ _u64(SECRET, len(SECRET) - STRIPE + 8 * i)
        acc[i] = (a * PRIME32_1) & M64


def xxh3_64(data):
    """XXH3_64bits(data) for len(data) > 240 (the long-input path)."""
    data = bytes(data)
    assert len(data) > 240
    acc = [PRIME32_3, PRIME64[0], PRIME64[1], PRIME64[2], PRIME64[3], PRIME32_2, PRIME64[4],
           PRIME32_1]
    stripes_per_block = (len(SECRET) - STRIPE) // 8
    block = STRIPE * stripes_per_block
    nblocks = (len(data) - 1) // block
    for b in range(nblocks):
        for s in range(stripes_per_block):
            _accumulate_512(acc, data, b * block + s * STRIPE, 8 * s)
        _scramble(acc)
    for s in range((len(data) - 1 - nblocks * block) // STRIPE):
        _accumulate_512(acc, data, nblocks * block + s * STRIPE, 8 * s)
    _accumulate_512(acc, data, len(data) - STRIPE, len(SECRET) - STRIPE - 7)
    h = (len(data) * PRIME64[0]) & M64
    for i in range(4):
        p = (acc[2 * i] ^ _u64(SECRET, 11 + 16 * i)) * (acc[2 * i + 1] ^ _u64(SECRET, 19 + 16 * i))
        h = (h + ((p & M64) ^ (p >> 64))) & M64
    h ^= h >> 37
    h = (h * 0x165667919E3779F9) & M64
    return h ^ (h >> 32)


# --- the page ops -------------------------------------------------------------------------------


class GuestPageOps:
    """Same constructor and methods as sevcore.core.pages.GuestPageOps; the dirty bits it sets are
    in :attr:`dirty` (one set of gfns per slot) instead of the slots' words."""

    def __init__(self, npt, frames):
        self.npt = npt
        self.frames = np.frombuffer(frames, np.uint8) if not isinstance(frames, np.ndarray) \
            else frames
        self.slots = []
        self.dirty = []

    def set_dirty_slots(self, slots):
        """Slots as (base_gfn, npages, words); the bits already set in words start the sets."""
        self.slots = [(int(base), int(npages)) for base, npages, _ in slots]
        self.dirty = []
        for base, npages, words in slots:
            bits = np.unpackbits(np.asarray(words, np.uint64).view(np.uint8), bitorder="little")
            self.dirty.append({base + int(i) for i in np.flatnonzero(bits[:npages])})

    def _slot(self, gfn):
        for k, (base, npages) in enumerate(self.slots):
            if base <= gfn < base + npages:
                return k
        return None

    def _check(self, op, gfns, buf, out):
        if op not in range(READ, DIGEST + 1):
            raise ValueError(f"unknown op {op}")
        n = len(gfns)
        if op in (READ, WRITE) and (buf is None or memoryview(buf).nbytes < n * PAGE_SIZE):
            raise ValueError("buf too small")
        if op in (CHECK, DIGEST) and (out is None or len(out) < (2 if op == CHECK else n)):
            raise ValueError("out too small")
        if any(not 0 <= g < GFN_LIMIT for g in gfns):
            raise ValueError("gfn out of range")
        ends = [(base, base + npages) for base, npages in self.slots]
        if any(npages < 1 or base + npages > GFN_LIMIT for base, npages in self.slots) or any(
                b1 < e0 for (_, e0), (b1, _) in zip(ends, ends[1:])):
            raise ValueError("bad dirty slots")

    def run(self, op, gfns=None, gfn0=0, n=None, *, private=False, engine=None, arg=0, buf=None,
            out=None, rmp=None, asid=0):
        """``rmp``: an RMP with ``validated(pfn, asid)`` (sevcore._reference.rmp.Rmp) checked on
        a private access."""
        if gfns is not None:
            gfns = [operator.index(g) for g in gfns][:n]
        else:
            gfns = list(range(gfn0, gfn0 + n))
        self._check(op, gfns, buf, out)

        # Pass one: where the call stops, and every page before it checked.
        stop = len(gfns)
        for i, gfn in enumerate(gfns):
            entry = self.npt.lookup(gfn)
            if entry is None:
                stop = i
                break
            pfn, flags = entry
            if bool(flags & NPT_PRIVATE) != bool(private) or (
                    op in WRITES and not flags & NPT_WRITABLE):
                stop = i
                break
            if (pfn + 1) * PAGE_SIZE > self.frames.size:
                raise OSError(errno.EFAULT, "frame outside host memory")
            if private and rmp is not None and not rmp.validated(pfn, asid):
                stop = i
                break
            if op in WRITES and flags & NPT_DIRTY_LOG and self._slot(gfn) is None:
                raise ValueError("write through a dirty-logged entry outside every slot")

        # Pass two.
        mismatches, first = 0, NO_MISMATCH
        for i, gfn in enumerate(gfns[:stop]):
            pfn, flags = self.npt.lookup(gfn)
            spa = pfn * PAGE_SIZE
            frame = self.frames[spa:spa + PAGE_SIZE]
            plain = bytes(frame) if engine is None else bytes(engine.decrypt_page(frame, spa))
            new = None
            if op == READ:
                memoryview(buf).cast("B")[i * PAGE_SIZE:(i + 1) * PAGE_SIZE] = plain
            elif op == WRITE:
                new = bytes(memoryview(buf).cast("B")[i * PAGE_SIZE:(i + 1) * PAGE_SIZE])
            elif op == FILL:
                new = arg.to_bytes(8, "little") * (PAGE_SIZE // 8)
            elif op == PATTERN:
                new = pattern(arg, gfn)
            elif op == CHECK:
                if plain != pattern(arg, gfn):
                    if mismatches == 0:
                        first = i
                    mismatches += 1
            elif op == STAMP:
                new = arg.to_bytes(8, "little") + plain[8:]
            elif op == DIGEST:
                out[i] = xxh3_64(plain)
            if new is not None:
                stored = new if engine is None else bytes(engine.encrypt_page(new, spa))
                frame[:] = np.frombuffer(stored, np.uint8)
                if flags & NPT_DIRTY_LOG:
                    self.dirty[self._slot(gfn)].add(gfn)
        if op == CHECK:
            out[0], out[1] = mismatches, first
        return stop
