"""The machine below KVM: host frames (``hostmem``), the memory controller with its per-ASID
keys (``umc``), simulated time (``clock``) and the declared cost of each modelled operation
(``costmodel``)."""
