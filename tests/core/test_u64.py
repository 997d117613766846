"""sevcore.core.arrays.u64, the one converter of u64 arguments: a negative, out-of-range or
non-integer value is a ValueError naming the item, never a wrapped value."""
import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from sevcore.core.arrays import U64_MAX, NotAnInteger, u64


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
