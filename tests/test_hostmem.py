"""Host physical memory (sevcore.hw.hostmem): lazily backed frames, zeroed allocation, release."""
import errno

import pytest

from sevcore.hw.hostmem import FIRST_PFN, PAGE_SIZE, HostMemory

from support import raises_errno


def test_frames_are_zero_and_distinct():
    """Allocated frames start zeroed, are distinct, and never include the reserved low 1 MiB."""
    mem = HostMemory(1 << 30)
    pfns = mem.alloc(8)
    assert len(set(pfns.tolist())) == 8 and int(pfns.min()) >= FIRST_PFN
    for p in pfns:
        assert not mem.frame(p).any()
    assert mem.allocated == 8


def test_freed_frames_come_back_zeroed():
    """A freed frame is reused, and reads as zero again when handed out."""
    mem = HostMemory(1 << 30)
    (p,) = mem.alloc(1)
    mem.write(int(p) * PAGE_SIZE, b"\xaa" * PAGE_SIZE)
    assert mem.read(int(p) * PAGE_SIZE, 4) == b"\xaa" * 4
    mem.free([p])
    assert mem.allocated == 0
    (q,) = mem.alloc(1)
    assert q == p and not mem.frame(q).any()


def test_exhaustion_is_enomem_and_changes_nothing():
    """Asking for more frames than exist raises ENOMEM and allocates nothing."""
    mem = HostMemory(FIRST_PFN * PAGE_SIZE + 4 * PAGE_SIZE)
    with raises_errno(errno.ENOMEM):
        mem.alloc(5)
    assert mem.allocated == 0
    assert len(mem.alloc(4)) == 4


def test_bad_arguments():
    """Bad sizes, counts, frees and ranges raise ValueError."""
    with pytest.raises(ValueError):
        HostMemory(4096)
    mem = HostMemory(1 << 30)
    with pytest.raises(ValueError):
        mem.alloc(-1)
    with pytest.raises(ValueError):
        mem.free([FIRST_PFN])          # never allocated
    with pytest.raises(ValueError):
        mem.read((1 << 30) - 2, 4)


def _rss_bytes():
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * PAGE_SIZE


def test_a_large_host_costs_only_what_is_touched():
    """Reserving 1 TiB of host memory costs nothing; touching 64 MiB costs about 64 MiB."""
    before = _rss_bytes()
    mem = HostMemory(1 << 40)
    assert _rss_bytes() - before < (8 << 20)
    pfns = mem.alloc(16384)
    mem.frames[int(pfns[0]) * PAGE_SIZE:(int(pfns[-1]) + 1) * PAGE_SIZE] = 1
    grown = _rss_bytes() - before
    assert (60 << 20) < grown < (80 << 20)
    mem.free(pfns)
    assert _rss_bytes() - before < (16 << 20)     # MADV_DONTNEED gave the frames back


def _resident_pages(mem, first, n):
    """How many of the frames [first, first + n) are resident (mincore)."""
    import ctypes
    libc = ctypes.CDLL(None, use_errno=True)
    vec = (ctypes.c_ubyte * n)()
    base = ctypes.addressof(ctypes.c_char.from_buffer(mem._mm)) + (first << 12)
    assert libc.mincore(ctypes.c_void_p(base), ctypes.c_size_t(n << 12), vec) == 0
    return sum(v & 1 for v in vec)


def test_populating_faults_frames_in_without_changing_them():
    """populating(pfns) makes the given frames resident from another thread; their contents,
    the allocator and the frames not given are unchanged."""
    import time
    mem = HostMemory(1 << 30)
    pfns = mem.alloc(3000)
    mem.frame(pfns[5])[:4] = [1, 2, 3, 4]
    other = mem.alloc(500)
    before = (mem.allocated, mem._next)
    with mem.populating(pfns[:2048]) as m:
        deadline = time.monotonic() + 10
        while m._populater.populated < 2048 and m._populater.error is None \
                and time.monotonic() < deadline:
            time.sleep(0.01)
        pop = m._populater
    if pop.error is not None:                       # a kernel without MADV_POPULATE_WRITE
        assert pop.error.errno == errno.EINVAL
        return
    assert pop.populated == 2048 and mem._populater is None
    assert _resident_pages(mem, int(pfns[0]), 2048) == 2048
    assert _resident_pages(mem, int(other[0]), 500) == 0
    assert bytes(mem.frame(pfns[5])[:5]) == bytes([1, 2, 3, 4, 0])
    assert not mem.frame(pfns[2047]).any() and (mem.allocated, mem._next) == before


def test_populating_refuses_frames_never_allocated_and_nests_as_a_no_op():
    """Populating a frame never allocated is a ValueError; populating inside populating keeps
    the outer populater and ends with none."""
    mem = HostMemory(1 << 30)
    pfns = mem.alloc(10)
    with pytest.raises(ValueError, match="never allocated"):
        with mem.populating([int(pfns[-1]) + 1]):
            pass
    with mem.populating(pfns) as m:
        outer = m._populater
        with mem.populating(pfns):
            assert mem._populater is outer
    assert mem._populater is None
