"""CRC-32 (sevcore.core.checksum, csrc/crc32.c) against zlib.crc32, the reference, on every C
path: every length around each folding path's block sizes, any alignment, continued values."""
import zlib

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from sevcore.core import checksum

from support.cpu_paths import CHECKSUM

pytestmark = pytest.mark.cpu_paths(CHECKSUM)      # cpu_path: avx512, avx2, aesni, portable


def test_check_value(cpu_path):
    """The catalogue check value of CRC-32/ISO-HDLC: crc32("123456789") == 0xCBF43926."""
    assert checksum.crc32(b"123456789") == 0xCBF43926
    assert checksum.crc32(b"") == 0 and checksum.crc32(b"", 0x1234) == 0x1234


def test_every_length_and_alignment_near_the_block_sizes(cpu_path):
    """Lengths 0..600 (one to two steps of the widest fold, 256 bytes) and around 4 KiB, at
    several offsets in a 16-byte block, with a running value: the same as zlib."""
    data = np.random.default_rng(3).bytes(4300)
    mv = memoryview(data)
    for n in [*range(601), 4095, 4096, 4097, 4164, 4172]:
        for off in (0, 1, 7, 15):
            for value in (0, 0xDEADBEEF):
                assert checksum.crc32(mv[off:off + n], value) == zlib.crc32(mv[off:off + n],
                                                                            value), (n, off)


@given(st.binary(max_size=3000), st.integers(0, 0xFFFFFFFF), st.integers(0, 3000))
def test_matches_zlib_and_chains(data, value, cut):
    """Any bytes, any running value, any split into two calls: zlib's answer."""
    cut = min(cut, len(data))
    for _ in CHECKSUM.each():
        assert checksum.crc32(data, value) == zlib.crc32(data, value)
        assert checksum.crc32(data[cut:], checksum.crc32(data[:cut], value)) == \
            zlib.crc32(data, value)


def test_buffers_and_refusals(cpu_path):
    """numpy arrays and memoryviews are read in place; a value outside u32 is ValueError, a
    non-buffer TypeError."""
    arr = np.arange(10000, dtype=np.uint8)
    assert checksum.crc32(arr) == zlib.crc32(arr.tobytes())
    with pytest.raises(ValueError):
        checksum.crc32(b"x", 1 << 32)
    with pytest.raises(TypeError):
        checksum.crc32(12)
