"""Our own GPU kernels, in Triton. flash_attention: see myllm_kernels/flash_attention.py.

myllm_kernels/attention_reference.py holds the same attention in plain PyTorch (the float64 reference the kernels are
tested against, and the forward's algorithm block by block, to read first). It is imported from there, not
exported here: it is for reading and testing, and a model has no use for it.

Why not plain `kernels/`: the scripts run from the repository root, which is first on the import path, and
transformers (from 5.25) imports Hugging Face's own `kernels` package; a folder of that name here shadowed it
and broke every export. A name with the project's prefix cannot collide with a package of the ecosystem.
"""

from myllm_kernels.flash_attention import available, flash_attention
from myllm_kernels.gated_delta_rule import chunk_gated_delta_rule

__all__ = ["available", "flash_attention", "chunk_gated_delta_rule"]
