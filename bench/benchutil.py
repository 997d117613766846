"""Helpers shared by the benchmark modules."""
import contextlib

import pytest

from sevcore.core import cpu

#: The x86 tiers a sevcore benchmark runs on, fastest first (sevcore.core.cpu).
VECTOR_TIERS = [t for t in cpu.TIERS if t != "portable"]


def per_item(benchmark, items, unit):
    """Record how many items one timed call handles, for the rates bench/report.py prints."""
    benchmark.extra_info["items"] = items
    benchmark.extra_info["unit"] = unit


def tier_params(tiers=VECTOR_TIERS):
    """One ``pytest.param`` per tier; one this CPU cannot run is skipped, naming what it lacks."""
    have = cpu.tiers()
    out = []
    for t in tiers:
        lacks = sorted(cpu.tier_needs(t) - cpu.detected())
        marks = [] if t in have else [pytest.mark.skip(reason=f"{t}: CPU lacks {', '.join(lacks)}")]
        out.append(pytest.param(t, id=t, marks=marks))
    return out


@contextlib.contextmanager
def on_tier(benchmark, tier):
    """Run the enclosed benchmark with the C core forced to ``tier``, and record the tier, the
    path each kernel took and the CPU in the benchmark's extra_info."""
    with cpu.restricted(tier):
        benchmark.extra_info["tier"] = tier
        benchmark.extra_info["kernels"] = cpu.kernels()
        benchmark.extra_info["cpu"] = cpu.cpu_model()
        yield


def aes_limit(benchmark, limits, tier, rounds):
    """Record the AES-unit limit of ``tier``'s register width (bench/peers.py) as pages/s of a
    cipher with ``rounds`` rounds, beside the result."""
    width = {"avx512": 512, "avx2": 256, "aesni": 128}[tier]
    per_ns = limits.get(width)
    if per_ns:
        benchmark.extra_info["limit_pages_per_s"] = per_ns * 1e9 / rounds / 256
        benchmark.extra_info["limit_block_rounds_per_ns"] = per_ns
