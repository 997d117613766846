"""``sevcore.cpu`` is now :mod:`sevcore.core.cpu`; this name keeps working for this release,
and so does ``python -m sevcore.cpu`` (the report of ``python -m sevcore.core.cpu``)."""
import sys

if __name__ == "__main__":
    from sevcore.core.cpu import main  # run as a script: print the report, replace nothing

    sys.exit(main())

from sevcore._compat import moved  # noqa: E402  (after the script case, which needs no shim)

sys.modules[__name__] = moved(__name__, "sevcore.core.cpu")
