"""
muon.py: Muon (Jordan et al. 2024, "Muon: An optimizer for hidden layers in neural networks"), the update of the
weight matrices inside the blocks when train.py runs with --optimizer=muon. Embeddings, the head, norm gains and
biases stay on AdamW; parallel.py's engines do the stepping, at every ZeRO stage and under FSDP2.

The one idea: a weight matrix is a linear map, and Muon takes a step of fixed size in the *spectral* norm. The
momentum matrix M = U S V^T is replaced by its orthogonal factor U V^T, which moves every direction M points in
by the same amount. Gradients of transformer matrices are nearly low rank: under AdamW's elementwise step their
few dominant directions take the whole update, under Muon the rarer directions get as much.

Computing U V^T by an SVD would cost too much. A matrix polynomial X <- a X + b (X X^T) X + c (X X^T)^2 X acts on
the singular values alone (it maps U S V^T to U p(S) V^T with p(s) = a s + b s^3 + c s^5), so iterating it on M
scaled to spectral norm <= 1 drives every singular value toward a fixed point of p. Keller Jordan's coefficients
(3.4445, -4.7750, 2.0315) make p steep at 0 (slope a = 3.4445) at the price of never settling on exactly 1: five
steps take every singular value of at least 0.002 times the Frobenius norm into the band [0.68, 1.21] (p iterated on
the scalars says so; the tests check the matrices), which trains as well as the exact U V^T with fewer matmuls.

Moonlight (Liu et al. 2025, "Muon is Scalable for LLM Training"): an orthogonal A x B matrix has RMS
1 / sqrt(max(A, B)), far below the RMS of an AdamW update (about 0.2 to 0.4 in their runs); multiplying the update by
0.2 sqrt(max(A, B)) matches it, and then AdamW's learning rate and (decoupled) weight decay carry over unchanged.
"""

import math

import torch

# Keller Jordan's quintic Newton-Schulz coefficients and step count (the modded-nanogpt speedrun's, and
# torch.optim.Muon's defaults).
NS_COEFFICIENTS = (3.4445, -4.7750, 2.0315)
NS_STEPS = 5
# The momentum's RMS matched to AdamW's update (Moonlight): update = RMS_MATCH * sqrt(max(A, B)) * NS(M).
RMS_MATCH = 0.2


def newton_schulz(m: torch.Tensor, steps: int = NS_STEPS, eps: float = 1e-7) -> torch.Tensor:
    """(A, B) -> (A, B): about the orthogonal factor U V^T of m = U S V^T, every singular value mapped into the
    iteration's band near 1. On a GPU in bfloat16, as the speedrun (its tensor cores; the band hides the rounding);
    on a CPU in float32 (bfloat16 matmuls are slower there), and in float64 for a float64 m (the tests)."""
    work = torch.bfloat16 if m.is_cuda else torch.promote_types(m.dtype, torch.float32)
    x = m.to(work)
    wide = x.size(0) <= x.size(1)
    if not wide:
        x = x.T  # iterate on the (min, max) orientation: X X^T is then the smaller Gram matrix
    # Frobenius norm >= spectral norm, so this puts every singular value in [0, 1], where p's iterates stay bounded.
    x = x / x.norm().clamp(min=eps)
    a, b, c = NS_COEFFICIENTS
    for _ in range(steps):
        gram = x @ x.T  # (min, min)
        x = a * x + (b * gram + c * gram @ gram) @ x
    return (x if wide else x.T).to(m.dtype)


def update_scale(shape: torch.Size) -> float:
    """Moonlight's factor: the orthogonalised update's RMS made that of an AdamW update, 0.2 sqrt(max(A, B))."""
    return RMS_MATCH * math.sqrt(max(shape[0], shape[1]))


def orthogonalised_update(momentum: torch.Tensor) -> torch.Tensor:
    """The step direction of one whole matrix (A, B) before the learning rate: scaled Newton-Schulz of its momentum."""
    return update_scale(momentum.shape) * newton_schulz(momentum)


def nesterov_momentum(grad: torch.Tensor, buf: torch.Tensor, momentum: float) -> torch.Tensor:
    """Updates the momentum buffer in place and returns the Nesterov look-ahead that is orthogonalised (the
    speedrun's and torch.optim.Muon's form: buf <- mu buf + (1 - mu) g, then (1 - mu) g + mu buf). Elementwise, so
    it runs on any slice of a matrix: ZeRO's sharded optimizer state works for Muon's momentum as for AdamW's."""
    buf.lerp_(grad, 1 - momentum)
    return grad.lerp(buf, momentum)


def assign_owners(numels: list[int], ranks: int) -> list[int]:
    """Which rank orthogonalises each matrix: the largest first, each to the rank with the least work so far
    (Newton-Schulz costs about in proportion to the elements), the same answer on every rank."""
    load, owners = [0] * ranks, [0] * len(numels)
    for i in sorted(range(len(numels)), key=lambda i: -numels[i]):
        owners[i] = min(range(ranks), key=lambda r: load[r])
        load[owners[i]] += numels[i]
    return owners
