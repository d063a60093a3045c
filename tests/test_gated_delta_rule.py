"""Tests of myllm_kernels/gated_delta_rule.py: outputs, final state and the gradients of every input against autograd
through the PyTorch chunked form, linear_attention.gated_delta_rule_chunked, run in float64 on the same values (that
form is tested against the token-by-token recurrence in tests/test_linear_attention.py); and gradcheck of the kernels'
own float64 backward.

Without a GPU the kernels run in Triton's CPU interpreter (conftest.py sets TRITON_INTERPRET before myllm_kernels is
imported). The interpreter computes bf16 arithmetic wrongly, but the kernels only load bf16 and cast it to fp32 at once,
which it gets right, and cast results back to bf16 on the way out, which it truncates (every bf16 output here equals
the fp32 result truncated; a GPU rounds to nearest). So bf16 inputs are tested here too, beside fp32, fp16 and fp64,
with room for truncation, and bf16 with the GPU's TF32 products is checked by bench/gated_delta_rule.py. Shapes are
tiny: the interpreter runs programs one by one, and the triangular solve's C - 1 steps one by one inside each.
"""

import pytest
import torch

from linear_attention import gated_delta_rule_chunked, l2_normalize
from myllm_kernels import chunk_gated_delta_rule  # TRITON_INTERPRET is set by conftest.py when there is no GPU

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
# Largest error allowed, relative to the largest entry of the float64 result (at least 1). fp16 and bf16 inputs are
# computed in fp32 like the others; their tolerances are for o and the gradients, stored back in fp16 (11-bit
# mantissas) or bf16 (8 bits, truncated by the interpreter: errors up to 2^-7 = 7.8e-3).
TOLERANCE = {"forward": {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 1.6e-2},
             "backward": {torch.float32: 1e-4, torch.float16: 2e-3, torch.bfloat16: 2e-2}}

# (B, H, T, d_k, d_v, chunk_size, dtype, layout, decay). The interpreter's d_v tiles are 16 wide, so d_v = 32 spans
# two; d_v = 24 ends mid-tile (masked columns). "strong" decays (log a down to -20) take g below -150 within a
# chunk of 16: exp(g_i - g_j) above the diagonal would overflow if it were computed before its mask.
CASES = {
    "T64_multiple_of_chunk16": (2, 2, 64, 16, 16, 16, torch.float32, "bhtd", "mild"),
    "T70_partial_chunk32_bthd": (1, 2, 70, 32, 32, 32, torch.float32, "bthd", "mild"),
    "T10_below_chunk32": (2, 2, 10, 16, 32, 32, torch.float32, "bhtd", "mild"),
    "T37_d_v24_chunk16": (1, 2, 37, 16, 24, 16, torch.float32, "bhtd", "mild"),
    "T37_strong_decay_chunk16": (1, 2, 37, 32, 16, 16, torch.float32, "bthd", "strong"),
    "T40_fp16_inputs_chunk16": (1, 2, 40, 16, 16, 16, torch.float16, "bhtd", "mild"),
    "T40_bf16_inputs_chunk16_bthd": (1, 2, 40, 16, 16, 16, torch.bfloat16, "bthd", "mild"),
    "T70_default_chunk64": (1, 2, 70, 16, 16, 64, torch.float32, "bhtd", "mild"),
}


def random_inputs(B, H, T, d_k, d_v, dtype, layout, decay, seed=0):
    """q, k (unit keys, as the model's), v, log_a, beta, state, as leaves; q, k, v stored in the memory order `layout`
    names ("bthd" is how model.py's heads arrive: a transposed view)."""
    gen = torch.Generator().manual_seed(seed)

    def heads(d, unit=False):
        x = torch.randn(B, T, H, d, generator=gen)  # drawn in one order for both layouts
        x = (l2_normalize(x) if unit else x).to(DEVICE, dtype).transpose(1, 2)  # (B, H, T, d), a view
        return x if layout == "bthd" else x.contiguous()

    q, k, v = heads(d_k), heads(d_k, unit=True), heads(d_v)
    scale = 20.0 if decay == "strong" else 0.5
    log_a = (-torch.rand(B, H, T, generator=gen) * scale).to(DEVICE, dtype)
    beta = torch.rand(B, H, T, generator=gen).to(DEVICE, dtype)
    state = (torch.randn(B, H, d_k, d_v, generator=gen) * 0.1).to(DEVICE, dtype)
    return [x.requires_grad_() for x in (q, k, v, log_a, beta, state)]


def float64_copies(tensors):
    return [x.detach().double().requires_grad_() for x in tensors]


def assert_close_to(actual, expected, tolerance, what):
    err = (actual.double() - expected).abs().max().item()
    scale = max(expected.abs().max().item(), 1.0)
    assert err <= tolerance * scale, f"{what}: max error {err:.3g} vs largest entry {scale:.3g}"


def with_and_without_state():
    return pytest.mark.parametrize("with_state", [False, True], ids=["zero_state", "initial_state"])


@with_and_without_state()
@pytest.mark.parametrize("case", CASES.values(), ids=CASES.keys())
def test_forward_matches_the_pytorch_chunked_form(case, with_state):
    B, H, T, d_k, d_v, chunk, dtype, layout, decay = case
    q, k, v, log_a, beta, state = (x.detach() for x in random_inputs(B, H, T, d_k, d_v, dtype, layout, decay))
    state = state if with_state else None
    o, final = chunk_gated_delta_rule(q, k, v, log_a, beta, state, chunk_size=chunk)
    expected_o, expected_final = gated_delta_rule_chunked(
        *(x.double() for x in (q, k, v, log_a, beta)), None if state is None else state.double(), chunk_size=chunk)
    assert o.shape == (B, H, T, d_v) and o.dtype == dtype
    assert final.shape == (B, H, d_k, d_v) and final.dtype == torch.float32
    assert_close_to(o, expected_o, TOLERANCE["forward"][dtype], "o")
    assert_close_to(final, expected_final, TOLERANCE["forward"][dtype], "final state")


def gradients(rule, inputs, with_state, upstream, d_o, d_final, **options):
    """Gradients of <o, d_o> + <final state, d_final> (either term dropped by upstream) for each input, None for the
    state when it is not passed."""
    q, k, v, log_a, beta, state = inputs
    o, final = rule(q, k, v, log_a, beta, state if with_state else None, **options)
    loss = (o * d_o.to(o.dtype)).sum() if upstream in ("both", "o") else 0
    loss = loss + (final * d_final.to(final.dtype)).sum() if upstream in ("both", "state") else loss
    wrt = inputs if with_state else inputs[:5]
    # Without o in the loss q has no gradient in the reference's graph: zeros, as ours gives.
    return list(torch.autograd.grad(loss, wrt, allow_unused=True, materialize_grads=True)) + (
        [] if with_state else [None])


NAMES = ("dq", "dk", "dv", "dlog_a", "dbeta", "dstate")


@with_and_without_state()
@pytest.mark.parametrize("case", CASES.values(), ids=CASES.keys())
def test_gradients_match_autograd_through_the_pytorch_form(case, with_state):
    B, H, T, d_k, d_v, chunk, dtype, layout, decay = case
    inputs = random_inputs(B, H, T, d_k, d_v, dtype, layout, decay)
    gen = torch.Generator().manual_seed(1)
    d_o, d_final = torch.randn(B, H, T, d_v, generator=gen), torch.randn(B, H, d_k, d_v, generator=gen)
    ours = gradients(chunk_gated_delta_rule, inputs, with_state, "both", d_o.to(DEVICE), d_final.to(DEVICE),
                     chunk_size=chunk)
    exact = gradients(gated_delta_rule_chunked, float64_copies(inputs), with_state, "both", d_o.double(),
                      d_final.double(), chunk_size=chunk)
    for name, actual, expected, x in zip(NAMES, ours, exact, inputs):
        if expected is None:
            assert actual is None
            continue
        assert actual.shape == x.shape and actual.dtype == x.dtype, name
        assert_close_to(actual, expected, TOLERANCE["backward"][dtype], name)


@pytest.mark.parametrize("upstream", ["o", "state"])
def test_gradients_when_only_one_output_is_used(upstream):
    # The unused output's gradient reaches the backward as zeros: the other alone must still give every gradient.
    inputs = random_inputs(1, 2, 45, 16, 32, torch.float32, "bhtd", "mild", seed=2)
    gen = torch.Generator().manual_seed(3)
    d_o, d_final = torch.randn(1, 2, 45, 32, generator=gen), torch.randn(1, 2, 16, 32, generator=gen)
    ours = gradients(chunk_gated_delta_rule, inputs, True, upstream, d_o, d_final, chunk_size=16)
    exact = gradients(gated_delta_rule_chunked, float64_copies(inputs), True, upstream, d_o.double(),
                      d_final.double(), chunk_size=16)
    for name, actual, expected in zip(NAMES, ours, exact):
        assert_close_to(actual, expected, TOLERANCE["backward"][torch.float32], name)


def test_gradcheck_in_float64():
    # The kernels' own backward against finite differences of their own forward (fp64 throughout, fp64 tl.dot), on
    # the tiniest shape with a partial second chunk and an initial state.
    inputs = float64_copies(random_inputs(1, 1, 20, 16, 16, torch.float32, "bhtd", "mild", seed=4))
    assert torch.autograd.gradcheck(lambda *x: chunk_gated_delta_rule(*x, chunk_size=16), inputs, fast_mode=True)


@pytest.mark.parametrize("change, message", [
    (dict(chunk_size=24), "chunk_size must be one of"),
    (dict(k=torch.zeros(1, 2, 9, 16)), "q, k must be"),
    (dict(beta=torch.zeros(1, 2, 9)), "log_a and beta must be"),
    (dict(state=torch.zeros(1, 2, 16, 8)), "state must be"),
    (dict(q=torch.zeros(1, 2, 8, 320), k=torch.zeros(1, 2, 8, 320)), "head dims at most 256"),
])
def test_rejects_unsupported_arguments_with_a_clear_error(change, message):
    args = dict(q=torch.zeros(1, 2, 8, 16), k=torch.zeros(1, 2, 8, 16), v=torch.zeros(1, 2, 8, 16),
                log_a=torch.zeros(1, 2, 8), beta=torch.zeros(1, 2, 8), state=None, chunk_size=16)
    args.update(change)
    args = {name: x.to(DEVICE) if isinstance(x, torch.Tensor) else x for name, x in args.items()}
    with pytest.raises(ValueError, match=message):
        chunk_gated_delta_rule(**args)
