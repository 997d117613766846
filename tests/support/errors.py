"""``raises_errno``: the one way a test expects a refused call."""
import contextlib
import errno

import pytest


def _name(err):
    return errno.errorcode.get(err, str(err))


@contextlib.contextmanager
def raises_errno(err, name=None):
    """Expect the enclosed code to raise ``OSError`` (or a subclass) with ``errno == err``; with
    ``name``, the error must also name that ioctl or firmware command (its ``filename``, as in
    ``OSError(EINVAL, "Invalid argument", "KVM_CREATE_VCPU")``). Yields pytest's ExceptionInfo.

    >>> with raises_errno(errno.EEXIST, "KVM_CREATE_VCPU"):
    ...     vm.create_vcpu(0)
    """
    with pytest.raises(OSError) as info:
        yield info
    got = info.value.errno
    assert got == err, f"errno {_name(got)}, expected {_name(err)}: {info.value!r}"
    if name is not None:
        assert info.value.filename == name, f"expected an error naming {name}: {info.value!r}"
