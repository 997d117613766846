"""The shared test helpers (tests/support) fail when they should: a helper that cannot fail would
let every test built on it pass."""
import errno

import pytest

from sevcore.core import cpu
from sevcore.errors import KvmError

from support import raises_errno
from support.cpu_paths import BITMAP, CHECKSUM, MEMCRYPT, PAGES, SEVPKT, Kernel, Path

KERNELS = [MEMCRYPT, SEVPKT, CHECKSUM, PAGES, BITMAP]


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


@pytest.mark.parametrize("kernel", KERNELS, ids=lambda k: k.name)
def test_every_path_is_collected_and_the_ones_a_cpu_lacks_skip_with_the_reason(kernel):
    """On a CPU with no optional feature every path is still a parameter: the portable one runs,
    the others skip naming the features they lack."""
    params = kernel.params(detected=set())
    assert [p.id for p in params] == [p.name for p in kernel.paths]
    *fast, portable = params
    assert portable.id == "portable" and not portable.marks and kernel.runnable(set()) == [
        "portable"]
    for param, path in zip(fast, kernel.paths):
        mark, = param.marks
        assert mark.name == "skip"
        assert mark.kwargs["reason"] == f"{path.name}: CPU lacks {', '.join(sorted(path.needs))}"


def test_memcrypt_reasons_name_only_the_missing_features():
    """A CPU with AES-NI and AVX2 but no VAES runs aesni and skips avx512 naming what it
    lacks."""
    params = {p.id: p for p in MEMCRYPT.params(detected={"aesni", "avx2", "popcnt"})}
    assert not params["aesni"].marks and not params["portable"].marks
    assert params["avx512"].marks[0].kwargs["reason"] == "avx512: CPU lacks avx512, vaes"


def test_bitmap_avx512_path_uses_what_the_cpu_has():
    """The bitmap's avx512 path needs AVX-512 and POPCNT and adds VPOPCNTQ where present."""
    avx512 = BITMAP.by_name["avx512"]
    assert avx512.features({"avx512", "popcnt", "aesni"}) == {"avx512", "popcnt"}
    assert avx512.features({"avx512", "vpopcntdq", "popcnt"}) == {"avx512", "vpopcntdq", "popcnt"}
    assert BITMAP.missing(avx512, {"popcnt", "vpopcntdq"}) == ["avx512"]


@pytest.mark.parametrize("kernel", KERNELS, ids=lambda k: k.name)
def test_each_restricts_the_core_to_every_runnable_path_and_restores_it(kernel):
    """``each`` visits the runnable paths in order, each with the core restricted to its features,
    and leaves the active features as they were."""
    before = cpu.active()
    seen = []
    for name in kernel.each():
        assert cpu.active() == kernel.by_name[name].features()
        seen.append(name)
    assert seen == kernel.runnable() and seen[-1] == "portable"
    assert cpu.active() == before


def test_restricted_fails_when_the_kernel_reports_another_path():
    """A path whose kernel reports another implementation fails the check."""
    liar = Kernel("liar", lambda: "aesni", [Path("portable", set())])
    with pytest.raises(AssertionError):
        with liar.restricted("portable"):
            pass
