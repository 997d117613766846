"""``sevcore.kvm_util`` is now :mod:`sevcore.vmm.kvm_util`; this name keeps working for this release."""
import sys

from sevcore._compat import moved

sys.modules[__name__] = moved(__name__, "sevcore.vmm.kvm_util")
