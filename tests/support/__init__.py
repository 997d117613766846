"""What the test folders share, importable as ``support`` (pyproject.toml puts ``tests`` on the
path): helpers of the firmware (``support.psp``) and migration (``support.migration``) tests."""
