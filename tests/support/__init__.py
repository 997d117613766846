"""What the test folders share, importable as ``support`` (pyproject.toml puts ``tests`` on the
path): ``raises_errno`` for refused calls, and helpers of the firmware (``support.psp``) and
migration (``support.migration``) tests."""
from support.errors import raises_errno

__all__ = ["raises_errno"]
