"""The AMD SEV firmware (PSP) of a simulated host: channel cryptography, command-buffer layouts,
certificates and the simulated AMD root of trust."""
