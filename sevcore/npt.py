"""``sevcore.npt`` is now :mod:`sevcore.core.npt`; this name keeps working for this release."""
import sys

from sevcore._compat import moved

sys.modules[__name__] = moved(__name__, "sevcore.core.npt")
