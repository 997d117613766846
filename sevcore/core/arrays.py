"""Argument conversion shared by the batched calls (KVM's page batches, the firmware's, the
migration stream's batch records): lists of u64 values and buffers of n equal rows."""
import numpy as np

U64_MAX = (1 << 64) - 1


def u64_array(values, what):
    """``values`` (a sequence of ints or an integer array) as a flat uint64 array; TypeError
    for anything else, ValueError for a value outside [0, 2**64)."""
    arr = np.asarray(values)
    if arr.size == 0 and arr.ndim == 1:
        return np.empty(0, np.uint64)
    if not isinstance(values, np.ndarray) and arr.dtype.kind in "fO":
        # Python ints above 2**63 next to others make numpy choose float64 or object.
        items = arr.reshape(-1).tolist() if arr.dtype == object else list(values)
        if any(not isinstance(v, int) or isinstance(v, bool) for v in items):
            raise TypeError(f"{what} must be ints")
        if any(not 0 <= v <= U64_MAX for v in items):
            raise ValueError(f"{what} must be u64 values")
        arr = np.array(items, dtype=np.uint64).reshape(arr.shape)
    if arr.dtype.kind not in "iu" or arr.ndim != 1:
        raise TypeError(f"{what} must be a sequence of ints, not {arr.dtype} of shape "
                        f"{arr.shape}")
    if arr.dtype.kind == "i" and arr.size and arr.min() < 0:
        raise ValueError(f"{what} must be u64 values")
    return arr.astype(np.uint64, copy=False)


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
