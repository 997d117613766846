"""python -m sevcore: the ``sevcore`` command (sevcore.cli)."""
import sys

from sevcore.cli import main

sys.exit(main())
