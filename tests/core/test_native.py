"""The compiled core as a whole: ABI check at import, CPU feature detection and restriction."""
import pathlib
import subprocess
import sys

import pytest

import sevcore
from sevcore import _bindings
from sevcore.core import cpu

from support import raises_errno


def test_abi_version_matches():
    """The loaded module reports the ABI version the Python package was written for."""
    assert _bindings.lib.sc_abi_version() == _bindings.ABI_VERSION == _bindings.lib.SC_ABI_VERSION


def test_stale_module_is_refused_with_a_clear_message():
    """If the package expects another ABI version, importing its bindings fails and says why."""
    src = pathlib.Path(_bindings.__file__).read_text()
    patched = src.replace(f"ABI_VERSION = {_bindings.ABI_VERSION}\n", "ABI_VERSION = 999\n", 1)
    assert patched != src
    code = ("import sevcore._native\n"
            f"exec(compile({patched!r}, 'sevcore/_bindings.py', 'exec'), {{'__name__': 'x'}})\n")
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         cwd=pathlib.Path(sevcore.__file__).parent.parent)
    assert res.returncode != 0
    assert "ImportError" in res.stderr and "stale" in res.stderr and "999" in res.stderr


def test_restriction_narrows_and_restores():
    """cpu.restricted(set()) forces the portable paths and restores the previous set after."""
    before = cpu.active()
    with cpu.restricted(set()) as active:
        assert active == set() and cpu.active() == set()
    assert cpu.active() == before
    assert cpu.active() <= cpu.detected()


def test_restriction_cannot_add_undetected_features():
    """Asking for every feature yields only what the CPU has."""
    with cpu.restricted(set(cpu.FEATURES)) as active:
        assert active == cpu.detected()


def test_unknown_feature_name_is_refused():
    """An unknown feature name raises ValueError and changes nothing."""
    before = cpu.active()
    with pytest.raises(ValueError, match="unknown CPU feature"):
        cpu.restrict({"avx1024"})
    assert cpu.active() == before


def test_populate_write_contract():
    """sc_populate_write: 0 for an empty range, -EINVAL for an unaligned one, and the bytes of a
    populated range unchanged."""
    import errno
    import mmap

    import numpy as np
    from sevcore import _bindings as b
    mm = mmap.mmap(-1, 1 << 20, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    a = np.frombuffer(mm, np.uint8)
    a[4096:4100] = 9
    assert b.populate_write(a, 0, 0) == 0
    with raises_errno(errno.EINVAL):
        b.populate_write(a, 1, 4096)
    with pytest.raises(ValueError):
        b.populate_write(a, 0, 2 << 20)
    try:
        b.populate_write(a, 0, 1 << 20)
    except OSError as e:                       # a kernel before 5.14
        assert e.errno == errno.EINVAL
    assert a[4096:4100].tolist() == [9] * 4 and not a[:4096].any()
