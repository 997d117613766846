"""pytest-benchmark suites. Run: pytest bench --benchmark-enable --benchmark-json=out.json, then
python bench/report.py out.json for rates and the ratios against each group's peers. Without
--benchmark-enable (pyproject disables benchmarking by default) each body runs once, which still
checks every result."""
import numpy as np
import pytest

import peers


@pytest.fixture
def rng():
    return np.random.default_rng(1121)


@pytest.fixture(scope="session")
def aes_limits():
    """The AES-unit limit of this CPU, block-rounds per ns, by register width (128, 256, 512;
    a width the CPU lacks is left out): measured once per run with bench/peers.c."""
    limits = {w: peers.aes_block_rounds_per_ns(w, runs=15, iters=1_000_000)
              for w in (128, 256, 512)}
    return {w: v for w, v in limits.items() if v}


@pytest.fixture(autouse=True)
def _collect_garbage():
    """Free each benchmark's Hosts before the next one: a Host's frames and its VMs reference
    each other, and multi-GiB guests left to the cyclic collector add up."""
    yield
    import gc
    gc.collect()
