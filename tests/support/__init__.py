"""What the test folders share, importable as ``support`` (pyproject.toml puts ``tests`` on the
path): ``raises_errno`` for refused calls, the C core's implementation paths and the
``cpu_path`` fixture (``support.cpu_paths``, registered in tests/conftest.py), and helpers of
the firmware (``support.psp``) and migration (``support.migration``) tests."""
from support.errors import raises_errno

__all__ = ["raises_errno"]
