"""sevcore: a simulator of confidential-VM memory on Linux KVM (guest_memfd, SEV firmware, the SEV
memory encryption engine, live migration), with its hot paths in C."""

__version__ = "0.1.0"

from sevcore import _bindings  # noqa: F401  (fails loudly on a missing or stale C core)

from sevcore.kvm import Host, Kvm  # noqa: E402,F401

__all__ = ["Host", "Kvm", "__version__"]
