"""Our own GPU kernels, in Triton. flash_attention: see kernels/flash_attention.py."""

from kernels.flash_attention import available, flash_attention

__all__ = ["available", "flash_attention"]
