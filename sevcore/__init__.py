"""sevcore: a simulator of confidential-VM memory on Linux KVM (guest_memfd, SEV firmware, the SEV
memory encryption engine, live migration), with its hot paths in C.

``sevcore.Host`` and ``sevcore.Kvm`` load the model on first use (PEP 562), so importing a leaf
module (``sevcore.uapi``, ``sevcore.core.bitmap``) loads only what that module needs.
docs/architecture.md maps the layers.
"""
import importlib

__version__ = "0.1.0"

__all__ = ["Host", "Kvm", "__version__"]


def __getattr__(name):
    if name in ("Host", "Kvm"):
        host = importlib.import_module("sevcore.host")
        return getattr(host, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
