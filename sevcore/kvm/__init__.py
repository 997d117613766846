"""The simulated kernel: /dev/kvm (``kvm``), the VMM address space (``mm``), VMs, vCPUs and their
exits, guest_memfd, the TDP fault path, MSRs, guest programs, and KVM's SEV layer (``sev``)."""
