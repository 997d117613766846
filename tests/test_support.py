"""The shared test helpers (tests/support) fail when they should: a helper that cannot fail would
let every test built on it pass."""
import errno

import pytest

from sevcore.errors import KvmError

from support import raises_errno


def refuse(err, ioctl="KVM_CREATE_VCPU"):
    raise KvmError(err, ioctl)


def test_raises_errno_passes_on_the_errno_and_name_and_yields_the_exception():
    """The expected errno and ioctl name pass, and the exception is there to inspect after."""
    with raises_errno(errno.EEXIST, "KVM_CREATE_VCPU") as info:
        refuse(errno.EEXIST)
    assert isinstance(info.value, KvmError) and info.value.ioctl == "KVM_CREATE_VCPU"
    with raises_errno(errno.EINVAL):
        raise OSError(errno.EINVAL, "Invalid argument")


@pytest.mark.parametrize("call,expect", [
    (lambda: refuse(errno.EINVAL), "errno EINVAL, expected EEXIST"),
    (lambda: refuse(errno.EEXIST, "KVM_RUN"), "naming KVM_CREATE_VCPU"),
    (lambda: refuse(errno.EEXIST, "KVM_CREATE_VCPU2"), "naming KVM_CREATE_VCPU"),
    (lambda: None, "DID NOT RAISE"),
])
def test_raises_errno_fails_on_another_errno_name_or_no_error(call, expect):
    """Another errno, another ioctl (even one the name is a prefix of), or no error at all fail
    the check with a message that says which."""
    with pytest.raises((AssertionError, pytest.fail.Exception), match=expect):
        with raises_errno(errno.EEXIST, "KVM_CREATE_VCPU"):
            call()


def test_raises_errno_lets_other_exceptions_through():
    """An exception that is not an OSError is not taken for a refusal."""
    with pytest.raises(ValueError):
        with raises_errno(errno.EINVAL):
            raise ValueError("not an errno")
