"""Which CPU features and tiers the C core detected, which path each kernel takes, and a switch
to force a tier.

A *tier* is the instruction set a kernel's fast path is written for. On x86-64, fastest first:
``avx512`` (VAES and VPCLMULQDQ on zmm: Zen 4, Ice Lake and later servers), ``avx2`` (VAES and
VPCLMULQDQ on ymm: Zen 3, Alder Lake and other client cores without AVX-512), ``aesni`` (AES-NI
and PCLMULQDQ on xmm: Zen 1/2, Haswell to Skylake) and ``portable`` (plain C, every CPU). On
AArch64: ``armce`` (the ARMv8 Cryptographic Extension's AES and PMULL: Graviton, Neoverse, Apple
and most Cortex-A cores), ``neon`` (Advanced SIMD, every AArch64 CPU) and ``portable``. Each
kernel runs its path of the best tier the active features allow; SHA-NI and POPCNT are extras
that run beside whichever tier is active.

>>> from sevcore.core import cpu
>>> cpu.tiers()                         # e.g. ['avx512', 'avx2', 'aesni', 'portable']
>>> cpu.kernels()                       # e.g. {'memcrypt': 'avx512', ..., 'sha256': 'shani'}
>>> with cpu.restricted("avx2"):        # every kernel takes its avx2 (or lower) path
...     ...
>>> with cpu.restricted(set()):         # every kernel takes its portable C path
...     ...

``python -m sevcore.core.cpu`` prints the CPU, its tiers and each kernel's path.
"""
import contextlib
import os
import platform
import sys
import threading

from sevcore import _bindings as _b

FEATURES = tuple(_b.CPU_FEATURES)
#: The tiers of this architecture, fastest first (``portable`` last).
TIERS = tuple(name for name in _b.TIERS if _b.cpu_tier_needs(name) is not None)
#: Features that run beside any tier: forcing a tier keeps them where the CPU has them.
EXTRAS = frozenset({"popcnt", "shani"})
_lock = threading.Lock()


def _names(mask):
    return {name for name, bit in _b.CPU_FEATURES.items() if mask & bit}


def _mask(names):
    unknown = set(names) - set(_b.CPU_FEATURES)
    if unknown:
        raise ValueError(f"unknown CPU feature(s) {sorted(unknown)}; known: {list(FEATURES)}")
    mask = 0
    for name in names:
        mask |= _b.CPU_FEATURES[name]
    return mask


def detected():
    """The features the CPU and OS support."""
    return _names(_b.cpu_detected())


def active():
    """The features the C kernels currently use."""
    return _names(_b.cpu_active())


def tier_needs(tier):
    """The features ``tier`` needs."""
    if tier not in TIERS:
        raise ValueError(f"unknown tier {tier!r}; this architecture has {list(TIERS)}")
    return _names(_b.cpu_tier_needs(tier))


def tier_features(tier, detected_features=None):
    """The features the core is restricted to when ``tier`` is forced: those it needs, and the
    extras (and, with ``avx512``, VPOPCNTQ) the CPU has. ValueError if the CPU lacks a feature
    the tier needs."""
    have = detected() if detected_features is None else set(detected_features)
    needs = tier_needs(tier)
    lacks = needs - have
    if lacks:
        raise ValueError(f"tier {tier} needs {', '.join(sorted(lacks))}, which this CPU lacks")
    extras = EXTRAS | ({"vpopcntdq"} if "avx512" in needs else set())
    return needs | (extras & have)


def tiers():
    """The tiers this CPU (and OS) can run, fastest first; always ends with ``portable``."""
    have = detected()
    return [t for t in TIERS if tier_needs(t) <= have]


def tier():
    """The fastest tier the active features allow."""
    return _b.cpu_tier()


def kernels():
    """Each C kernel and the path it takes with the active features: a tier name, or for
    SHA-256 'shani' / 'portable' and for the bitmap scans possibly 'popcnt' (scalar)."""
    return {
        "memcrypt": _b.memcrypt_impl(),
        "sevpkt.aes128_ctr": _b.aes128_ctr_impl(),
        "sevpkt.sha256": _b.sha256_impl(),
        "checksum.crc32": _b.crc32_impl(),
        "pages": _b.guest_impl(),
        "bitmap": _b.bitmap_impl(),
        "snp_ld.sha384_pages": _b.sha384_pages_impl(),
    }


def _features_of(what):
    """A tier name, or a set of feature names."""
    if isinstance(what, str):
        return tier_features(what)
    return set(what)


def restrict(what):
    """Use only the tier ``what`` (a name: its features and the extras the CPU has), or only the
    features ``what`` (a set, intersected with what is detected). Returns the active set."""
    return _names(_b.cpu_restrict(_mask(_features_of(what))))


@contextlib.contextmanager
def restricted(what):
    """Context manager: run the enclosed code on the tier ``what`` (``"avx2"``) or with only the
    features ``what`` active (``set()``: every portable path). A tier the CPU cannot run is a
    ValueError before anything changes."""
    features = _features_of(what)
    with _lock:
        before = _b.cpu_active()
        try:
            yield restrict(features)
        finally:
            _b.cpu_restrict(before)


def cpu_model():
    """The CPU as /proc/cpuinfo names it, with its family and model (x86) or implementer and
    part (Arm), and the number of CPUs this process may run on."""
    info = {}
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if not line.strip():
                    break                       # the first CPU is enough
                key, _, value = line.partition(":")
                info[key.strip()] = value.strip()
    except OSError:
        pass
    name = info.get("model name") or info.get("Hardware") or platform.processor() or "unknown"
    if "cpu family" in info:
        detail = f"{info.get('vendor_id', '?')} family {info['cpu family']} model " \
                 f"{info.get('model', '?')}"
    elif "CPU implementer" in info:
        detail = f"implementer {info['CPU implementer']} part {info.get('CPU part', '?')}"
    else:
        detail = ""
    try:
        ncpu = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        ncpu = os.cpu_count()
    arch = platform.machine()
    return f"{name} ({', '.join(x for x in (arch, detail, f'{ncpu} CPUs') if x)})"


def report():
    """The lines ``python -m sevcore.core.cpu`` prints: CPU, features, tiers, kernel paths."""
    have = tiers()
    lines = [f"CPU:      {cpu_model()}",
             f"features: {' '.join(sorted(detected())) or '(none)'}",
             f"tiers:    {', '.join(have)}"
             + (f"  (not on this CPU: {', '.join(t for t in TIERS if t not in have)})"
                if len(have) < len(TIERS) else ""),
             f"active:   {tier()}" + ("" if active() == detected()
                                      else f" (restricted to {' '.join(sorted(active()))})"),
             "kernels:"]
    for name, path in kernels().items():
        lines.append(f"  {name:<20} {path}")
    return lines


def main(argv=None):
    """Print the report; ``--tier NAME`` prints it with that tier forced."""
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["--tier"] and len(argv) == 2:
        with restricted(argv[1]):
            print("\n".join(report()))
    elif not argv:
        print("\n".join(report()))
    else:
        print(f"usage: python -m sevcore.core.cpu [--tier {{{','.join(TIERS)}}}]",
              file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
