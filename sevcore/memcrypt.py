"""``sevcore.memcrypt`` is now :mod:`sevcore.core.memcrypt`; this name keeps working for this release."""
import sys

from sevcore._compat import moved

sys.modules[__name__] = moved(__name__, "sevcore.core.memcrypt")
