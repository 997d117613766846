"""Argument conversion shared by the batched calls (KVM's page batches, the firmware's, the
migration stream's batch records): u64 values, one at a time or in arrays, and buffers of n
equal rows."""
import numpy as np

U32_MAX = (1 << 32) - 1    # include/linux/limits.h
U64_MAX = (1 << 64) - 1
_U64 = np.dtype(np.uint64)


class NotAnInteger(TypeError, ValueError):
    """A value that should be a u64 is not an integer at all. A ValueError, as every value
    :func:`u64` refuses is; also a TypeError, which is what these were before it."""


def _refuse(what, index, v):
    """The error for the value ``v`` of ``what`` (at ``index``, None for a scalar)."""
    name = what if index is None else f"{what}[{index}]"
    if isinstance(v, (int, np.integer)) and not isinstance(v, (bool, np.bool_)):
        return ValueError(f"{name} = {int(v)} is not a u64")
    return NotAnInteger(f"{name} = {v!r} is not an integer")


def u64(values, what, ndim=None):
    """``values`` as unsigned 64-bit integers: an integer gives an int, anything else (a
    sequence, an integer array of any shape) a C-contiguous uint64 array of the same shape.
    ``ndim``, if given, is the number of dimensions the caller takes (0 for an int): anything
    else is a TypeError.

    The rule, for every item: it must be an integer (not a bool, float or string) in
    [0, 2**64); the first that is not raises ValueError naming ``what`` and the item, e.g.
    ``gfns[3] = -1 is not a u64`` (:class:`NotAnInteger` if it is no integer at all). A
    C-contiguous native uint64 array is returned as it is (no copy); other integer arrays are
    checked with one vectorised pass (a signed 64-bit array is then viewed, not copied).
    """
    if type(values) is int and not ndim and 0 <= values <= U64_MAX:
        return values
    got = _u64(values, what)
    if ndim is not None and (0 if type(got) is int else got.ndim) != ndim:
        raise TypeError(f"{what} must be {f'{ndim}-D integers' if ndim else 'an int'}, not "
                        f"{type(values).__name__}")
    return got


def _u64(values, what):
    if type(values) is int:
        if 0 <= values <= U64_MAX:
            return values
        raise _refuse(what, None, values)
    if isinstance(values, np.ndarray):
        if values.dtype == _U64:
            return values if values.flags.c_contiguous else np.ascontiguousarray(values)
        arr = values
    elif isinstance(values, np.integer) and not isinstance(values, np.bool_):
        return _u64(int(values), what)
    elif isinstance(values, (str, bytes, bytearray, np.generic)) or \
            not hasattr(values, "__iter__"):
        raise _refuse(what, None, values)
    else:
        arr = np.asarray(values if hasattr(values, "__len__") else list(values))
    if arr.size == 0:
        return np.empty(arr.shape, _U64)
    kind = arr.dtype.kind
    if kind == "u":
        return np.ascontiguousarray(arr, dtype=_U64)
    if kind == "i":
        flat = arr.reshape(-1)
        if flat.min() < 0:
            i = int(np.argmax(flat < 0))
            raise _refuse(what, i, flat[i])
        if arr.dtype.itemsize == 8 and arr.dtype.isnative:
            return np.ascontiguousarray(arr).view(_U64)
        return np.ascontiguousarray(arr, dtype=_U64)
    # Not an integer dtype: a Python list of ints above 2**63 next to others makes numpy choose
    # object (or float64 with a negative); judge those item by item, as integers.
    items = arr.reshape(-1).tolist() if kind == "O" or isinstance(values, np.ndarray) \
        else np.asarray(values, dtype=object).reshape(-1).tolist()
    for i, v in enumerate(items):
        if not isinstance(v, (int, np.integer)) or isinstance(v, (bool, np.bool_)) or \
                not 0 <= v <= U64_MAX:
            raise _refuse(what, i, v)
    return np.array(items, dtype=_U64).reshape(arr.shape)


def runs(values):
    """The runs of consecutive values (each one more than the one before) in the 1-D integer
    array ``values``, as a list of ``(index where the run begins, its length)`` pairs of ints;
    found with numpy, so a million values in a few runs cost a few numpy passes."""
    a = np.asarray(values)
    if a.size == 0:
        return []
    breaks = np.diff(a) != 1
    if a.dtype.kind == "u":
        breaks |= a[:-1] == np.iinfo(a.dtype).max       # the difference wrapped to 1
    starts = np.concatenate(([0], np.flatnonzero(breaks) + 1))
    return list(zip(starts.tolist(), np.diff(np.append(starts, a.size)).tolist()))


def byte_rows(buf, n, what):
    """``buf`` as ``n`` rows of one length: a 2-D uint8 array with ``n`` rows as it is (any
    strides), or any buffer of ``n * length`` bytes viewed ``(n, length)``. TypeError for
    elements that are not bytes, ValueError if the bytes do not split into ``n`` rows."""
    arr = buf if isinstance(buf, np.ndarray) else np.frombuffer(memoryview(buf).cast("B"),
                                                                 np.uint8)
    if arr.dtype != np.uint8:
        raise TypeError(f"{what} must hold bytes (uint8), not {arr.dtype}")
    if arr.ndim == 2:
        if arr.shape[0] != n:
            raise ValueError(f"{what} has {arr.shape[0]} rows, not {n}")
        return arr
    flat = arr.reshape(-1)
    if (flat.size % n if n else flat.size):
        raise ValueError(f"{what} of {flat.size} bytes does not split into {n} equal rows")
    return flat.reshape(n, flat.size // n if n else 0)


def sorted_unique(values):
    """``np.unique(values)`` of a 1-D integer array, by sorting; an array that is already
    strictly increasing (a run, or pages a fault left unmapped in order) is returned as is.
    On the 262144 pages of a 1 GiB fault batch, NumPy 2.4's ``np.unique`` (a hash table, then
    a sort) takes ~0.2 s, a sort ~10 ms."""
    if len(values) < 2 or (values[1:] > values[:-1]).all():
        return values
    s = np.sort(values)
    keep = np.empty(len(s), bool)
    keep[0] = True
    np.not_equal(s[1:], s[:-1], out=keep[1:])
    return s[keep]
