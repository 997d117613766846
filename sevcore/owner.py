"""``sevcore.owner`` is now :mod:`sevcore.vmm.owner`; this name keeps working for this release."""
import sys

from sevcore._compat import moved

sys.modules[__name__] = moved(__name__, "sevcore.vmm.owner")
