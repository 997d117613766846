"""The SNP launch digest chain and SHA-384 (csrc/snp_ld.c) against hashlib and the twin
(sevcore/_reference/snp_ld.py)."""
import hashlib

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from sevcore import _bindings as B
from sevcore._reference.snp_ld import sha384_pages as ref_pages
from sevcore._reference.snp_ld import snp_ld_extend as ref_extend
from sevcore.core import cpu


@pytest.mark.parametrize("n", [0, 1, 111, 112, 113, 127, 128, 129, 239, 240, 256, 4096, 5000])
def test_sha384_matches_hashlib_across_block_boundaries(n):
    """SHA-384 of messages around the 128-byte block and padding boundaries equals hashlib's."""
    msg = bytes((i * 7 + n) & 0xFF for i in range(n))
    assert B.sha384(msg) == hashlib.sha384(msg).digest()


@settings(max_examples=60, deadline=None)
@given(ld=st.binary(min_size=48, max_size=48), n=st.integers(0, 9), zero=st.booleans(),
       seed=st.binary(min_size=1, max_size=8))
def test_ld_extend_matches_the_twin(ld, n, zero, seed):
    """The C chain equals one hashlib SHA-384 per PAGE_INFO, with and without contents."""
    stream = hashlib.shake_256(seed).digest(64 * n)
    contents = None if zero else stream[:48 * n]
    tails = stream[48 * n:] + bytes(16 * n - len(stream[48 * n:]))
    assert B.snp_ld_extend(ld, contents, tails) == ref_extend(ld, contents, tails)


def test_ld_extend_refuses_partial_pages_and_a_short_digest():
    """Tails not a multiple of 16 bytes, contents not 48 per page, or a digest not 48 bytes are
    ValueError."""
    with pytest.raises(ValueError, match="whole pages"):
        B.snp_ld_extend(bytes(48), None, bytes(17))
    with pytest.raises(ValueError, match="whole pages"):
        B.snp_ld_extend(bytes(48), bytes(47), bytes(16))
    with pytest.raises(ValueError, match="48 bytes"):
        B.snp_ld_extend(bytes(47), None, bytes(16))


@pytest.mark.parametrize("tier", ["avx512", "avx2", "portable"])
@pytest.mark.parametrize("n", [0, 1, 7, 8, 9, 21])
def test_sha384_pages_matches_the_twin_on_every_tier(tier, n):
    """SHA-384 of n pages in any order, side by side in vector lanes (and the rest one by
    one), equals hashlib's page by page on each tier the CPU has."""
    if tier not in cpu.tiers():
        pytest.skip(f"{tier}: not on this CPU")
    frames = np.frombuffer(hashlib.shake_256(bytes([n])).digest(4096 * 32), np.uint8)
    pfns = np.array([(i * 11 + 3) % 32 for i in range(n)], np.uint64)
    with cpu.restricted(tier):
        got = B.sha384_pages(frames, pfns)
    assert got == ref_pages(frames, pfns)


def test_sha384_pages_refuses_a_frame_past_the_buffer():
    """A pfn past the frames is ValueError naming it."""
    with pytest.raises(ValueError, match=r"pfns\[1\] = 0x2 is outside the host frames"):
        B.sha384_pages(bytes(8192), np.array([0, 2], np.uint64))
