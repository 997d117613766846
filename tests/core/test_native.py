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


def cpuinfo_flags():
    """The flags Linux reports for the first CPU (it clears those whose state the OS does not
    save), or None off Linux/x86."""
    try:
        for line in pathlib.Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("flags"):
                return set(line.partition(":")[2].split())
    except OSError:
        pass
    return None


def test_detection_agrees_with_the_kernel_cpu_flags():
    """Each x86 feature is detected exactly when Linux reports the flags it stands for."""
    flags = cpuinfo_flags()
    if flags is None:
        pytest.skip("no x86 flags line in /proc/cpuinfo")
    want = {
        "aesni": {"aes", "pclmulqdq", "sse4_1"} <= flags,
        "avx2": {"avx", "avx2"} <= flags,
        "avx512": {"avx2", "avx512f", "avx512dq", "avx512bw", "avx512vl"} <= flags,
        "vaes": {"vaes", "vpclmulqdq", "aes", "pclmulqdq", "sse4_1", "avx2"} <= flags,
        "popcnt": {"popcnt", "bmi1"} <= flags,
        "shani": {"sha_ni", "ssse3", "sse4_1"} <= flags,
    }
    want["vpopcntdq"] = want["avx512"] and "avx512_vpopcntdq" in flags
    assert {name for name, on in want.items() if on} == cpu.detected()


def test_tiers_are_the_ones_whose_features_are_detected():
    """tiers() lists, fastest first, every tier whose features the CPU has, ending with
    portable; tier() is the fastest whose features are active."""
    have = cpu.tiers()
    assert have[-1] == "portable" and have == [t for t in cpu.TIERS if t in have]
    for t in cpu.TIERS:
        assert (t in have) == (cpu.tier_needs(t) <= cpu.detected())
    assert cpu.tier() == next(t for t in cpu.TIERS if cpu.tier_needs(t) <= cpu.active())
    with cpu.restricted(cpu.detected()):
        assert cpu.tier() == have[0]


@pytest.mark.parametrize("tier", ["avx512", "avx2", "aesni", "portable"])
def test_forcing_a_tier_runs_every_kernel_at_or_below_it(tier):
    """cpu.restricted(tier) makes tier() that tier and no kernel reports a faster one; the
    extras (POPCNT, SHA-NI) stay where the CPU has them."""
    if tier not in cpu.tiers():
        pytest.skip(f"{tier}: CPU lacks {', '.join(sorted(cpu.tier_needs(tier) - cpu.detected()))}")
    rank = {t: i for i, t in enumerate(reversed(cpu.TIERS))}
    with cpu.restricted(tier) as active:
        assert cpu.tier() == tier
        assert active >= cpu.tier_needs(tier) and active >= cpu.detected() & cpu.EXTRAS
        for kernel, path in cpu.kernels().items():
            if path in rank:
                assert rank[path] <= rank[tier], (kernel, path)


def test_a_tier_the_cpu_lacks_is_refused_naming_the_features():
    """Forcing a tier on a CPU without its features is a ValueError naming them, and an unknown
    tier name is one too; neither changes the active set."""
    with pytest.raises(ValueError, match="tier avx2 needs avx2, vaes"):
        cpu.tier_features("avx2", {"aesni", "popcnt"})
    assert cpu.tier_features("aesni", {"aesni", "avx2", "shani"}) == {"aesni", "shani"}
    before = cpu.active()
    with pytest.raises(ValueError, match="unknown tier"):
        with cpu.restricted("sse9"):
            pass
    assert cpu.active() == before


@pytest.mark.parametrize("module", ["sevcore.core.cpu", "sevcore.cpu"])
def test_python_m_cpu_prints_the_cpu_tiers_and_kernels(module):
    """``python -m sevcore.core.cpu`` (and the old ``sevcore.cpu``) prints the CPU, its tiers
    and the path of every kernel."""
    res = subprocess.run([sys.executable, "-m", module], capture_output=True, text=True,
                         check=True)
    out = res.stdout
    assert out.startswith("CPU:") and f"tiers:    {', '.join(cpu.tiers())}" in out
    with cpu.restricted(cpu.detected()):           # a fresh process: nothing restricted
        kernels = cpu.kernels()
    for kernel, path in kernels.items():
        assert f"  {kernel:<20} {path}" in out


def test_python_m_cpu_with_a_forced_tier():
    """``--tier portable`` reports every tiered kernel on its portable path (SHA-NI and POPCNT,
    the extras, stay)."""
    res = subprocess.run([sys.executable, "-m", "sevcore.core.cpu", "--tier", "portable"],
                         capture_output=True, text=True, check=True)
    assert "active:   portable" in res.stdout
    paths = dict(line.split() for line in res.stdout.split("kernels:\n")[1].splitlines())
    assert set(paths) == set(cpu.kernels())
    assert all(path in ("portable", "shani", "popcnt") for path in paths.values())


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
