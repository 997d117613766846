"""Fixtures for the firmware tests; tests marked slow run only when ``-m`` selects them."""
import pytest

from support.psp import ready


def pytest_collection_modifyitems(config, items):
    if "slow" in (config.getoption("-m") or ""):
        return
    skip = pytest.mark.skip(reason="slow: run with -m slow")
    for item in items:
        if "slow" in item.keywords and "tests/psp/" in item.nodeid:
            item.add_marker(skip)

@pytest.fixture
def host():
    return ready()


@pytest.fixture
def es_host():
    return ready(es=True)
