"""Which CPU features the C core detected, which it uses, and a switch to force the portable paths.

>>> from sevcore import cpu
>>> cpu.detected()                      # e.g. {'aesni', 'avx512', 'vaes', 'popcnt', ...}
>>> with cpu.restricted(set()):         # every kernel takes its portable C path
...     ...
"""
import contextlib
import threading

from sevcore import _bindings as _b

FEATURES = tuple(_b.CPU_FEATURES)
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


def restrict(names):
    """Use only ``names`` (intersected with what is detected); returns the active set."""
    return _names(_b.cpu_restrict(_mask(names)))


@contextlib.contextmanager
def restricted(names):
    """Context manager: run the enclosed code with only ``names`` active (``set()``: portable)."""
    with _lock:
        before = _b.cpu_active()
        try:
            yield restrict(names)
        finally:
            _b.cpu_restrict(before)
