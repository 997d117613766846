"""Old import paths of modules that moved into the layer packages (docs/architecture.md)."""
import importlib
import warnings

#: old module name -> where it lives now. Each old name is a module of its own that replaces
#: itself with the new module, so ``sevcore.memcrypt is sevcore.core.memcrypt``.
MOVED = {
    "bitmap": "core.bitmap", "checksum": "core.checksum", "cpu": "core.cpu",
    "memcrypt": "core.memcrypt", "npt": "core.npt", "sevpkt": "core.sevpkt",
    "costmodel": "hw.costmodel", "kvm_util": "vmm.kvm_util", "owner": "vmm.owner",
}


def moved(old, new):
    """The module ``new``, imported under its old name ``old`` with a DeprecationWarning."""
    warnings.warn(f"{old} moved to {new}; the old name goes away in the next release",
                  DeprecationWarning, stacklevel=3)
    return importlib.import_module(new)
