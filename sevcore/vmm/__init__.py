"""User space above KVM: the selftest library (``kvm_util``), the VMM's shared-pages tracker
(``shared_pages``) and the guest owner's tools (``owner``)."""


def __getattr__(name):
    # sevcore.vmm was one module (the tracker) before it became this package.
    if name == "SharedPagesTracker":
        from sevcore.vmm.shared_pages import SharedPagesTracker  # lazy: PEP 562 re-export
        return SharedPagesTracker
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
