"""Bulk guest-memory ops (sevcore.core.pages) on a 1 GiB guest against numpy moving the same bytes,
against a C read pass (the DRAM floor for the read-only ops), and against the page-by-page
reference on a few pages, same run.

Run: ``pytest bench/bench_guest.py --benchmark-enable``; rates are pages/s (bench/report.py).

The guest is 262144 pages mapped in runs of 512 (one leaf table each) at shuffled 2 MiB runs of
host frames (a fixed seed), the layout a fault path allocating a huge page's worth of frames at a
time gives. Unless a name says "fresh", the host frames were touched before the timed rounds, as
numpy's 1 GiB arrays were, so the rows compare memory traffic rather than the OS's first-touch
page faults. The target (issue: guest bulk access) is a 1 GiB fill with the NPT faults the model
batches (``test_fill_faulting``) within 3x of numpy's ``fill`` of 1 GiB.
"""
import gc

import numpy as np
import pytest

from benchutil import per_item
from sevcore import _bindings as _b
from sevcore._reference import guest as ref
from sevcore.core.pages import (
    GUEST_OP_CHECK, GUEST_OP_DIGEST, GUEST_OP_FILL, GUEST_OP_PATTERN, GUEST_OP_READ, NO_MISMATCH,
    PAGE_SIZE, GuestPageOps, digest, pattern,
)
from sevcore.hw.hostmem import HostMemory
from sevcore.core.memcrypt import AES128_XEX, MemoryEngine
from sevcore.core.npt import NPT_WRITABLE, Npt

NPAGES = 1 << 18             # 1 GiB
RUN = 512
SMALL = 64                   # pages for the reference twin
FILL_WORD = 0x5A5A5A5A5A5A5A5A
SEED = 0x600D


class Guest:
    """A 1 GiB guest on a 2 GiB host: the host, the run layout, and a fully mapped Npt."""

    def __init__(self, seed=2024, touch=True):
        self.mem = HostMemory(size=2 << 30)
        pfns = self.mem.alloc(NPAGES)
        self.first_spa = int(pfns[0]) * PAGE_SIZE
        if touch:
            self.host_view().fill(0)
        order = np.random.default_rng(seed).permutation(NPAGES // RUN).astype(np.uint64)
        #: host pfn of the first page of each 512-gfn run
        self.run_pfn = pfns[0] + order * np.uint64(RUN)
        self.npt = Npt()
        self.ops = GuestPageOps(self.npt, self.mem.frames)

    def host_view(self):
        """The guest's frames as one contiguous 1 GiB array (they are allocated in one block)."""
        return self.mem.frames[self.first_spa:self.first_spa + NPAGES * PAGE_SIZE]

    def map_run(self, npt, run, npages=RUN, offset=0):
        npt.map(run * RUN + offset, int(self.run_pfn[run]) + offset, NPT_WRITABLE, npages=npages)

    def map_all(self):
        for run in range(NPAGES // RUN):
            self.map_run(self.npt, run)
        return self

    def page(self, gfn):
        spa = (int(self.run_pfn[gfn // RUN]) + gfn % RUN) * PAGE_SIZE
        return self.mem.frames[spa:spa + PAGE_SIZE]

    def close(self):
        self.ops.close()
        self.npt.close()
        gc.collect()  # views of the frames held by finished benchmark closures
        self.mem.close()


@pytest.fixture(scope="module")
def guest():
    g = Guest().map_all()
    yield g
    g.close()


@pytest.fixture(scope="module")
def gib():
    """A touched 1 GiB numpy array and a second one, for numpy's fill and copy."""
    a = np.zeros(NPAGES * PAGE_SIZE, np.uint8)
    b = np.ones(NPAGES * PAGE_SIZE, np.uint8)
    yield a, b


def timed(benchmark, fn, rounds=5, setup=None, pages=NPAGES):
    per_item(benchmark, pages, "pages")
    if setup is None:
        return benchmark.pedantic(fn, rounds=rounds, iterations=1, warmup_rounds=1)
    return benchmark.pedantic(fn, setup=setup, rounds=rounds, iterations=1)


def numpy_pattern(seed, gfns):
    """The PATTERN pages of ``gfns`` with numpy (what Python would write without the kernel)."""
    words = np.array(ref.splitmix64(0, PAGE_SIZE // 8), np.uint64)
    key0 = ref.splitmix64(seed, 1)[0]
    z = np.asarray(gfns, np.uint64) ^ np.uint64(key0)
    z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
    z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
    z ^= z >> np.uint64(31)
    return z[:, None] ^ words[None, :]


def small_guest():
    """SMALL mapped pages on a small host, for the reference twin."""
    frames = np.zeros(SMALL * PAGE_SIZE, np.uint8)
    npt = Npt()
    npt.map(0, 0, NPT_WRITABLE, npages=SMALL)
    return npt, frames, ref.GuestPageOps(npt, frames)


# --- FILL -----------------------------------------------------------------------------------------

def test_fill_mapped(benchmark, guest):
    benchmark.group = "fill 1 GiB"
    done = timed(benchmark, lambda: guest.ops.run(GUEST_OP_FILL, gfn0=0, n=NPAGES, arg=FILL_WORD))
    assert done == NPAGES
    assert (guest.host_view().view(np.uint64) == np.uint64(FILL_WORD)).all()


@pytest.mark.parametrize("batch", [512, 16])
def test_fill_faulting(benchmark, guest, batch):
    """From an empty NPT: the kernel stops at each unmapped page, the model maps ``batch`` pages
    there (one Npt.map of frames it holds), the kernel resumes."""
    benchmark.group = "fill 1 GiB"
    tables = []

    def release():
        while tables:
            for obj in tables.pop():
                obj.close()

    def setup():
        release()
        npt = Npt()
        ops = GuestPageOps(npt, guest.mem.frames)
        tables.append((ops, npt))
        return (npt, ops), {}

    def fill(npt, ops):
        done, faults = 0, 0
        while True:
            done += ops.run(GUEST_OP_FILL, gfn0=done, n=NPAGES - done, arg=FILL_WORD + 1)
            if done == NPAGES:
                return faults
            guest.map_run(npt, done // RUN, batch, done % RUN)
            faults += 1

    faults = timed(benchmark, fill, setup=setup)
    assert faults == NPAGES // batch
    assert (guest.host_view().view(np.uint64) == np.uint64(FILL_WORD + 1)).all()
    release()


def test_fill_fresh_frames(benchmark):
    """Host frames never touched: every page costs the OS a first-touch fault (4 KiB pages)."""
    benchmark.group = "fill 1 GiB"
    hosts = []

    def setup():
        while hosts:
            hosts.pop().close()
        hosts.append(Guest(touch=False).map_all())
        return (hosts[-1].ops,), {}

    done = timed(benchmark, lambda ops: ops.run(GUEST_OP_FILL, gfn0=0, n=NPAGES, arg=FILL_WORD),
                 rounds=3, setup=setup)
    assert done == NPAGES and hosts[-1].page(NPAGES - 1)[:8].view(np.uint64)[0] == FILL_WORD
    hosts.pop().close()


def test_fill_numpy(benchmark, gib):
    benchmark.group = "fill 1 GiB"
    a = gib[0].view(np.uint64)
    timed(benchmark, lambda: a.fill(FILL_WORD))
    assert a[-1] == FILL_WORD


def test_fill_numpy_fresh(benchmark):
    """numpy's own fresh 1 GiB array (numpy asks for transparent huge pages on large arrays)."""
    benchmark.group = "fill 1 GiB"
    arrays = []

    def setup():
        arrays.clear()
        arrays.append(np.empty(NPAGES * PAGE_SIZE // 8, np.uint64))
        return (arrays[-1],), {}

    timed(benchmark, lambda a: a.fill(FILL_WORD), rounds=3, setup=setup)
    assert arrays[-1][-1] == FILL_WORD


def test_fill_reference(benchmark):
    benchmark.group = "fill 1 GiB"
    npt, frames, twin = small_guest()
    assert timed(benchmark, lambda: twin.run(GUEST_OP_FILL, gfn0=0, n=SMALL, arg=FILL_WORD),
                 pages=SMALL) == SMALL
    assert (frames.view(np.uint64) == np.uint64(FILL_WORD)).all()
    npt.close()


# --- PATTERN and CHECK ----------------------------------------------------------------------------

def test_pattern_mapped(benchmark, guest):
    benchmark.group = "pattern 1 GiB"
    assert timed(benchmark, lambda: guest.ops.run(GUEST_OP_PATTERN, gfn0=0, n=NPAGES,
                                                   arg=SEED)) == NPAGES
    for gfn in (0, 12345, NPAGES - 1):
        assert guest.page(gfn).tobytes() == pattern(SEED, gfn)


def test_pattern_numpy(benchmark, gib):
    """numpy computing the same pages into a contiguous array, 64 MiB at a time."""
    benchmark.group = "pattern 1 GiB"
    out = gib[0].view(np.uint64).reshape(NPAGES, PAGE_SIZE // 8)
    step = 1 << 14

    def fill():
        for lo in range(0, NPAGES, step):
            out[lo:lo + step] = numpy_pattern(SEED, np.arange(lo, lo + step, dtype=np.uint64))

    timed(benchmark, fill, rounds=3)
    assert out[NPAGES - 1].tobytes() == pattern(SEED, NPAGES - 1)


def test_pattern_reference(benchmark):
    benchmark.group = "pattern 1 GiB"
    npt, frames, twin = small_guest()
    timed(benchmark, lambda: twin.run(GUEST_OP_PATTERN, gfn0=0, n=SMALL, arg=SEED), pages=SMALL)
    assert frames[-PAGE_SIZE:].tobytes() == pattern(SEED, SMALL - 1)
    npt.close()


def test_check_mapped(benchmark, guest):
    benchmark.group = "check 1 GiB"
    assert guest.ops.run(GUEST_OP_PATTERN, gfn0=0, n=NPAGES, arg=SEED) == NPAGES
    out = np.zeros(2, np.uint64)
    timed(benchmark, lambda: guest.ops.run(GUEST_OP_CHECK, gfn0=0, n=NPAGES, arg=SEED, out=out))
    assert out.tolist() == [0, NO_MISMATCH]


def test_check_numpy_array_equal(benchmark, gib):
    """numpy comparing 1 GiB with a stored copy of the expected bytes (reads 2 GiB)."""
    benchmark.group = "check 1 GiB"
    a, b = gib
    np.copyto(b, a)
    assert timed(benchmark, lambda: np.array_equal(a, b))


def test_check_reference(benchmark):
    benchmark.group = "check 1 GiB"
    npt, frames, twin = small_guest()
    twin.run(GUEST_OP_PATTERN, gfn0=0, n=SMALL, arg=SEED)
    out = [0, 0]
    timed(benchmark, lambda: twin.run(GUEST_OP_CHECK, gfn0=0, n=SMALL, arg=SEED, out=out),
          pages=SMALL)
    assert out == [0, NO_MISMATCH]
    npt.close()


# --- DIGEST and READ ------------------------------------------------------------------------------

def test_digest_mapped(benchmark, guest):
    benchmark.group = "digest 1 GiB"
    out = np.zeros(NPAGES, np.uint64)
    timed(benchmark, lambda: guest.ops.run(GUEST_OP_DIGEST, gfn0=0, n=NPAGES, out=out))
    for gfn in (0, 777, NPAGES - 1):
        assert out[gfn] == digest(guest.page(gfn))


def test_digest_read_pass_anchor(benchmark, guest):
    """One C streaming read of the same 1 GiB (sc_bitmap_read_pass): the DRAM floor."""
    benchmark.group = "digest 1 GiB"
    words = guest.host_view().view(np.uint64)
    timed(benchmark, lambda: _b.bitmap_read_pass(words))


def test_digest_reference(benchmark):
    benchmark.group = "digest 1 GiB"
    npt, frames, twin = small_guest()
    frames[:] = np.random.default_rng(5).integers(0, 256, frames.size, dtype=np.uint8)
    out = [0] * SMALL
    timed(benchmark, lambda: twin.run(GUEST_OP_DIGEST, gfn0=0, n=SMALL, out=out), rounds=3,
          pages=SMALL)
    assert out[3] == digest(frames[3 * PAGE_SIZE:4 * PAGE_SIZE])
    npt.close()


def test_read_mapped(benchmark, guest, gib):
    benchmark.group = "read 1 GiB"
    buf = gib[1]
    assert timed(benchmark, lambda: guest.ops.run(GUEST_OP_READ, gfn0=0, n=NPAGES,
                                                   buf=buf)) == NPAGES
    gfn = NPAGES - 3
    assert buf[gfn * PAGE_SIZE:(gfn + 1) * PAGE_SIZE].tobytes() == guest.page(gfn).tobytes()


def test_read_numpy_copyto(benchmark, gib):
    benchmark.group = "read 1 GiB"
    a, b = gib
    timed(benchmark, lambda: np.copyto(b, a))
    assert b[-1] == a[-1]


def test_read_reference(benchmark):
    benchmark.group = "read 1 GiB"
    npt, frames, twin = small_guest()
    buf = bytearray(SMALL * PAGE_SIZE)
    timed(benchmark, lambda: twin.run(GUEST_OP_READ, gfn0=0, n=SMALL, buf=buf), pages=SMALL)
    assert buf == frames.tobytes()
    npt.close()


# --- encrypted, and one page per call -------------------------------------------------------------

ENC_PAGES = 1 << 14          # 64 MiB


def test_pattern_encrypted(benchmark, guest):
    """PATTERN through the AES128_XEX engine: build each page, encrypt it into its frame."""
    benchmark.group = "pattern 64 MiB, AES128_XEX"
    eng = MemoryEngine(AES128_XEX, bytes(range(16)))
    assert timed(benchmark, lambda: guest.ops.run(GUEST_OP_PATTERN, gfn0=0, n=ENC_PAGES, arg=SEED,
                                                   engine=eng), pages=ENC_PAGES) == ENC_PAGES
    spa = (int(guest.run_pfn[0]) + 5) * PAGE_SIZE
    assert bytes(eng.decrypt_page(guest.page(5), spa)) == pattern(SEED, 5)


def test_pattern_encrypted_engine_anchor(benchmark, guest):
    """The engine alone encrypting 64 MiB in place in one batch (the AES floor)."""
    benchmark.group = "pattern 64 MiB, AES128_XEX"
    eng = MemoryEngine(AES128_XEX, bytes(range(16)))
    data = guest.host_view()[:ENC_PAGES * PAGE_SIZE]
    spa = guest.first_spa
    timed(benchmark, lambda: eng.encrypt_run(data, spa, out=data), pages=ENC_PAGES)


def test_one_page_per_call(benchmark, guest):
    """The cost of a one-page call: what the model pays per access it cannot batch."""
    benchmark.group = "fill one page"
    gfns = np.random.default_rng(3).integers(0, NPAGES, 1000).tolist()
    ops = guest.ops

    def fill():
        for gfn in gfns:
            ops.run(GUEST_OP_FILL, gfn0=gfn, n=1, arg=7)

    timed(benchmark, fill, rounds=20, pages=len(gfns))
    assert guest.page(gfns[0])[:8].view(np.uint64)[0] == 7


def test_one_page_numpy_slice_fill(benchmark, guest):
    """numpy filling the same 1000 pages through per-page slices of the frames (no NPT walk)."""
    benchmark.group = "fill one page"
    rng = np.random.default_rng(3)
    spas = [(int(guest.run_pfn[g // RUN]) + g % RUN) * PAGE_SIZE
            for g in rng.integers(0, NPAGES, 1000).tolist()]
    frames = guest.mem.frames

    def fill():
        for spa in spas:
            frames[spa:spa + PAGE_SIZE].view(np.uint64).fill(7)

    timed(benchmark, fill, rounds=20, pages=len(spas))
