"""Fixtures for the firmware tests."""
import pytest

from support.psp import ready


@pytest.fixture
def host():
    return ready()


@pytest.fixture
def es_host():
    return ready(es=True)
