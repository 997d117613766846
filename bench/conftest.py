"""pytest-benchmark suites. Run: pytest bench --benchmark-enable --benchmark-json=out.json, then
python bench/report.py out.json for rates and the ratios against each group's peers. Without
--benchmark-enable (pyproject disables benchmarking by default) each body runs once, which still
checks every result."""
import numpy as np
import pytest


@pytest.fixture
def rng():
    return np.random.default_rng(1121)
