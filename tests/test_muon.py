"""muon.py: Newton-Schulz is the scalar polynomial applied to the singular values (checked against the SVD in
float64), lands them in its band, and the pieces the engines assemble (momentum, scale, owners) are those of
torch.optim.Muon. The distributed steps are tested against torch's Muon in tests/test_parallel.py."""

import pytest
import torch

from muon import NS_COEFFICIENTS, NS_STEPS, assign_owners, nesterov_momentum, newton_schulz, update_scale


def spread_matrix(rows, cols, smallest, seed=0):
    """A random (rows, cols) matrix whose singular values run geometrically from 1 down to smallest."""
    g = torch.Generator().manual_seed(seed)
    k = min(rows, cols)
    u, _ = torch.linalg.qr(torch.randn(rows, k, generator=g, dtype=torch.float64))
    v, _ = torch.linalg.qr(torch.randn(cols, k, generator=g, dtype=torch.float64))
    s = torch.logspace(0, torch.log10(torch.tensor(smallest)).item(), k, dtype=torch.float64)
    return u @ torch.diag(s) @ v.T


def scalar_iteration(s):
    a, b, c = NS_COEFFICIENTS
    for _ in range(NS_STEPS):
        s = a * s + b * s**3 + c * s**5
    return s


@pytest.mark.parametrize("shape", [(24, 40), (40, 24), (32, 32)])
def test_newton_schulz_is_the_polynomial_of_the_singular_values(shape):
    m = 3.0 * spread_matrix(*shape, smallest=1e-3)
    u, s, vh = torch.linalg.svd(m, full_matrices=False)
    expected = u @ torch.diag(scalar_iteration(s / m.norm())) @ vh  # the iteration acts on s / ||m||_F alone
    torch.testing.assert_close(newton_schulz(m), expected, rtol=0, atol=1e-10)


def test_newton_schulz_puts_singular_values_in_its_band():
    # Every singular value of at least 0.002 of the Frobenius norm ends in [0.68, 1.21]; far smaller ones stay small
    # (the iteration is odd, so a direction the momentum lacks is never invented).
    m = spread_matrix(48, 96, smallest=1e-2, seed=1).float()
    s_in = torch.linalg.svdvals(m.double()) / m.double().norm()
    s_out = torch.linalg.svdvals(newton_schulz(m).double())
    assert s_in.min() > 0.002 and 0.68 <= s_out.min() and s_out.max() <= 1.21
    rank_one = torch.outer(torch.randn(8), torch.randn(5))  # one nonzero singular value: it goes to ~1, the rest stay 0
    s_rank_one = torch.linalg.svdvals(newton_schulz(rank_one))
    assert 0.68 <= s_rank_one[0] <= 1.21 and s_rank_one[1:].max() < 1e-4


def test_the_update_has_adamw_rms_and_the_momentum_is_torch_muons():
    # Moonlight's scale: an orthogonal (A, B) matrix has RMS 1 / sqrt(max(A, B)), times 0.2 sqrt(max(A, B)) = 0.2.
    q, _ = torch.linalg.qr(torch.randn(64, 16, dtype=torch.float64))
    assert update_scale(q.shape) * q.pow(2).mean().sqrt() == pytest.approx(0.2, rel=1e-12)
    # The momentum and look-ahead of torch.optim.Muon: an average of the gradients, and a step past it.
    grads = [torch.randn(6, 4) for _ in range(3)]
    buf, reference = torch.zeros(6, 4), torch.zeros(6, 4)
    for g in grads:
        look_ahead = nesterov_momentum(g, buf, 0.9)
        reference = 0.9 * reference + 0.1 * g
        torch.testing.assert_close(buf, reference)
        torch.testing.assert_close(look_ahead, 0.1 * g + 0.9 * reference)


def test_owners_balance_the_work_and_agree_everywhere():
    numels = [4096, 1024, 1024, 1024, 1024, 512, 256]
    owners = assign_owners(numels, 2)
    load = [sum(n for n, o in zip(numels, owners) if o == r) for r in range(2)]
    assert owners == assign_owners(list(numels), 2) and sorted(load) == [4352, 4608]
    assert assign_owners(numels, 1) == [0] * len(numels)
