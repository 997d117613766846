"""``sevcore.costmodel`` is now :mod:`sevcore.hw.costmodel`; this name keeps working for this release."""
import sys

from sevcore._compat import moved

sys.modules[__name__] = moved(__name__, "sevcore.hw.costmodel")
