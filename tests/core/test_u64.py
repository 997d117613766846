"""sevcore.core.arrays.u64, the one converter of u64 arguments, and its callers: a negative,
out-of-range or non-integer value is a ValueError naming the item, never a wrapped value."""
import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from sevcore.core.arrays import U64_MAX, NotAnInteger, u64
from sevcore.core.memcrypt import AES128_XEX, MemoryEngine
from sevcore.core.npt import GFN_LIMIT, NPT_WRITABLE, Npt
from sevcore.core.pages import GUEST_OP_FILL, GuestPageOps


def by_loop(values, what):
    """The rule item by item: the message u64 must give for the first bad item, or None."""
    for i, v in enumerate(values):
        if not isinstance(v, int) or isinstance(v, bool):
            return f"{what}[{i}] = {v!r} is not an integer"
        if not 0 <= v <= U64_MAX:
            return f"{what}[{i}] = {v} is not a u64"
    return None


@given(st.lists(st.one_of(st.integers(-2**66, 2**66), st.integers(0, 2**64 - 1),
                          st.integers(-3, 3)), max_size=20))
def test_lists_follow_the_rule_item_by_item(values):
    """A list converts to the same uint64 values, or raises ValueError naming its first bad item
    as the item-by-item rule does."""
    expected = by_loop(values, "gfns")
    if expected is None:
        got = u64(values, "gfns")
        assert got.dtype == np.uint64 and got.tolist() == values
    else:
        with pytest.raises(ValueError) as info:
            u64(values, "gfns")
        assert str(info.value) == expected


@given(st.lists(st.integers(-2**63, 2**63 - 1), min_size=1, max_size=20))
def test_signed_arrays_follow_the_rule(values):
    """An int64 array converts without a copy, or names its first negative item."""
    arr = np.array(values, np.int64)
    expected = by_loop(values, "spas")
    if expected is None:
        got = u64(arr, "spas")
        assert np.shares_memory(got, arr) and got.tolist() == values
    else:
        with pytest.raises(ValueError, match=expected.replace("[", r"\[").replace("]", r"\]")):
            u64(arr, "spas")


@pytest.mark.parametrize("values, message", [
    (-1, "gpa = -1 is not a u64"),
    (2**64, "gpa = 18446744073709551616 is not a u64"),
    (np.int64(-5), "gpa = -5 is not a u64"),
    ([0, 1, 2, -1], r"gpa\[3\] = -1 is not a u64"),
    (np.array([[0, 1], [2, -7]], np.int32), r"gpa\[3\] = -7 is not a u64"),
    (np.array([5, -1], np.int8), r"gpa\[1\] = -1 is not a u64"),
    ([2**63, -1], r"gpa\[1\] = -1 is not a u64"),
    ([1, 2**64 + 1], r"gpa\[1\] = 18446744073709551617 is not a u64"),
])
def test_negative_or_too_large_values_name_the_item(values, message):
    """A negative or over-64-bit value, alone or as an item, is a ValueError naming it."""
    with pytest.raises(ValueError, match=message) as info:
        u64(values, "gpa")
    assert not isinstance(info.value, TypeError)


@pytest.mark.parametrize("values, message", [
    (1.0, "gpa = 1.0 is not an integer"),
    ("4096", "gpa = '4096' is not an integer"),
    (True, "gpa = True is not an integer"),
    (None, "gpa = None is not an integer"),
    ([1, 2.5], r"gpa\[1\] = 2.5 is not an integer"),
    (np.array([1.0, 2.0]), r"gpa\[0\] = 1.0 is not an integer"),
    (np.array([True]), r"gpa\[0\] = True is not an integer"),
    (np.array([1, "a"], dtype=object), r"gpa\[1\] = 'a' is not an integer"),
])
def test_non_integers_are_value_errors_and_type_errors(values, message):
    """A value that is no integer at all is a ValueError naming it, and also a TypeError (what
    these were before the one rule)."""
    with pytest.raises(NotAnInteger, match=message) as info:
        u64(values, "gpa")
    assert isinstance(info.value, ValueError) and isinstance(info.value, TypeError)


def test_uint64_input_is_not_copied_and_shapes_are_kept():
    """A C-contiguous uint64 array comes back as it is; other arrays keep their shape and come
    back C-contiguous; an int stays an int; empty inputs of any dtype are empty uint64."""
    a = np.arange(6, dtype=np.uint64)
    assert u64(a, "a") is a
    b = a.reshape(2, 3)[:, ::2]
    got = u64(b, "b")
    assert got.flags.c_contiguous and got.tolist() == b.tolist()
    assert u64(np.array([[1, 2]], ">u8"), "c").dtype == np.dtype(np.uint64)
    assert u64(np.arange(4, dtype=np.uint16).reshape(2, 2), "d").shape == (2, 2)
    assert u64(7, "e") == 7 and type(u64(np.uint64(7), "e")) is int
    assert u64([], "f").tolist() == [] and u64(np.array([], float), "f").dtype == np.uint64
    assert u64((g for g in [3, 4]), "g").tolist() == [3, 4]
    assert u64(range(3), "h").tolist() == [0, 1, 2]


def test_ndim_is_what_the_caller_takes():
    """``ndim`` refuses an int where a sequence is wanted and the reverse, with TypeError."""
    assert u64([1, 2], "gfns", ndim=1).tolist() == [1, 2]
    assert u64(3, "gpa", ndim=0) == 3
    with pytest.raises(TypeError, match="gfns must be 1-D integers, not int"):
        u64(3, "gfns", ndim=1)
    with pytest.raises(TypeError, match="gpa must be an int, not list"):
        u64([3], "gpa", ndim=0)
    with pytest.raises(TypeError, match="m must be 2-D integers, not list"):
        u64([1], "m", ndim=2)


# --- every caller: a negative item is named, not wrapped ----------------------------------------

def test_npt_batches_name_a_negative_gfn_instead_of_wrapping_it():
    """Npt.lookup_batch and map_runs refuse a negative gfn of a signed array by its index (they
    used to view it as a u64 >= 2**63 and report the batch out of range)."""
    with Npt() as npt:
        npt.map(0, 5, NPT_WRITABLE, npages=4)
        for gfns in ([0, 1, -1], np.array([0, 1, -1], np.int64), np.array([0, 1, -1], np.int8)):
            with pytest.raises(ValueError, match=r"gfns\[2\] = -1 is not a u64"):
                npt.lookup_batch(gfns)
            with pytest.raises(ValueError, match=r"gfns\[2\] = -1 is not a u64"):
                npt.map_runs(gfns, [9, 10, 11], NPT_WRITABLE)
        with pytest.raises(ValueError, match=r"pfns\[0\] = -9 is not a u64"):
            npt.map_runs([7], [-9], NPT_WRITABLE)
        assert npt.lookup_batch(np.array([0, 3], np.int64)).tolist() == [5, 8]
        assert len(npt) == 4


def test_npt_scalars_name_the_argument():
    """A negative or non-integer scalar of an Npt call is named by its argument."""
    with Npt() as npt:
        for call, message in [(lambda: npt.map(-1, 0, 0), "gfn = -1 is not a u64"),
                              (lambda: npt.map(0, -2, 0), "pfn = -2 is not a u64"),
                              (lambda: npt.map(0, 0, -1), "flags = -1 is not a u64"),
                              (lambda: npt.map(0, 0, 0, -5), "npages = -5 is not a u64"),
                              (lambda: npt.unmap(2**64), "gfn = 18446744073709551616 is not"),
                              (lambda: npt.lookup(-3), "gfn = -3 is not a u64"),
                              (lambda: npt.items(-1), "start_gfn = -1 is not a u64"),
                              (lambda: Npt(limit_bytes=-1), "limit_bytes = -1 is not a u64")]:
            with pytest.raises(ValueError, match=message):
                call()
        with pytest.raises(TypeError, match="gfn = 1.0 is not an integer"):
            npt.map(1.0, 0, 0)


def test_memcrypt_names_a_negative_spa():
    """encrypt_pages names a negative SPA of a list or a signed array; encrypt_run a negative
    run SPA."""
    eng = MemoryEngine(AES128_XEX, bytes(16))
    for spas in ([0, -4096], np.array([0, -4096], np.int64)):
        with pytest.raises(ValueError, match=r"spas\[1\] = -4096 is not a u64"):
            eng.encrypt_pages(bytes(8192), spas)
    with pytest.raises(ValueError, match="spa = -4096 is not a u64"):
        eng.encrypt_run(bytes(4096), -4096)


def test_guest_page_ops_name_a_negative_gfn():
    """GuestPageOps.run names a negative gfn of its list by index, and a negative gfn0 or arg."""
    frames = bytearray(4 * 4096)
    with Npt() as npt:
        npt.map(0x10, 0, NPT_WRITABLE, npages=4)
        ops = GuestPageOps(npt, frames)
        with pytest.raises(ValueError, match=r"gfns\[1\] = -1 is not a u64"):
            ops.run(GUEST_OP_FILL, np.array([0x10, -1], np.int64))
        with pytest.raises(ValueError, match="arg = -1 is not a u64"):
            ops.run(GUEST_OP_FILL, gfn0=0x10, n=1, arg=-1)
        with pytest.raises(ValueError, match=rf"gfns\[1\] = {GFN_LIMIT:#x} must be in"):
            ops.run(GUEST_OP_FILL, [0x10, GFN_LIMIT])
        assert frames == bytearray(4 * 4096)
        ops.close()
