"""Our own GPU kernels, in Triton. flash_attention: see kernels/flash_attention.py.

kernels/attention_reference.py holds the same attention in plain PyTorch (the float64 reference the kernels are
tested against, and the forward's algorithm block by block, to read first). It is imported from there, not
exported here: it is for reading and testing, and a model has no use for it.
"""

from kernels.flash_attention import available, flash_attention

__all__ = ["available", "flash_attention"]
