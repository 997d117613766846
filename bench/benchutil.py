"""Helpers shared by the benchmark modules."""


def per_item(benchmark, items, unit):
    """Record how many items one timed call handles, for the rates bench/report.py prints."""
    benchmark.extra_info["items"] = items
    benchmark.extra_info["unit"] = unit
