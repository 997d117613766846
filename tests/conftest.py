import os

import numpy as np
import pytest
from hypothesis import HealthCheck, settings

from support import cpu_paths

settings.register_profile("default", deadline=None)
# The sanitizer build runs every C kernel ~3-10x slower; fewer examples keep CI within budget.
settings.register_profile("sanitizer", deadline=None, max_examples=40,
                          suppress_health_check=[HealthCheck.too_slow])
settings.register_profile("thorough", deadline=None, max_examples=2000)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "default"))


cpu_path = cpu_paths.cpu_path      # the fixture, for every test folder


def pytest_generate_tests(metafunc):
    cpu_paths.generate_tests(metafunc)


def pytest_collection_modifyitems(config, items):
    """Tests marked slow run only when ``-m`` selects them."""
    if "slow" in (config.getoption("-m") or ""):
        return
    skip = pytest.mark.skip(reason="slow: run with -m slow")
    for item in items:
        if "slow" in item.keywords:
            item.add_marker(skip)


def pytest_configure(config):
    """SEVCORE_TEST_TIER=<tier> runs the whole suite with the C core forced to that tier (CI runs
    it once with `portable`, the path every CPU has); a kernel's cpu_path tests still visit each
    path the CPU has."""
    tier = os.environ.get("SEVCORE_TEST_TIER")
    if tier:
        from sevcore.core import cpu  # only when the variable asks for it

        cpu.restrict(set() if tier == "portable" else tier)


def pytest_report_header(config):
    from sevcore.core import cpu

    return (f"sevcore C core: detected {sorted(cpu.detected())}, active {sorted(cpu.active())}, "
            f"tier {cpu.tier()}")


@pytest.fixture
def rng():
    """A numpy Generator with a fixed seed: tests are reproducible run to run."""
    return np.random.default_rng(20261121)
