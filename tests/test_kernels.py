"""Tests of kernels/flash_attention.py: output and gradients against float64 math attention
(kernels/attention_reference.py, tested in tests/test_attention_reference.py).

Without a GPU the kernels run in Triton's CPU interpreter. conftest.py sets TRITON_INTERPRET before kernels is
imported (@triton.jit reads it when a kernel is defined) and stay set (Triton reads it again at launch).
The interpreter computes bf16 wrongly (triton-lang/triton#11584), so bf16 is checked on a GPU by
bench/attention.py; here fp32 and fp16. Shapes are tiny: the interpreter runs programs one by one.
"""

import pytest
import torch

from kernels import flash_attention  # TRITON_INTERPRET is set by conftest.py when there is no GPU
from kernels.attention_reference import reference_attention, tiled_attention
from kernels.flash_attention import _forward, launch_tiles

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
# Largest error allowed, relative to the largest entry of the float64 result (at least 1: with one visible
# key dq and dk are exactly 0, and the kernel's are rounding noise). fp16 rounds the probabilities and dS to
# 11-bit mantissas before their matmuls (as every flash attention does); fp32 keeps fp32 throughout.
TOLERANCE = {torch.float32: 2e-5, torch.float16: 5e-3}


def random_qkv(B, n_head, n_kv_head, T, d_qk, d_v, dtype, layout, seed=0):
    """Random q, k, v of shape (B, heads, T, d), stored in the memory order `layout` names: "bhtd" is
    contiguous, "bthd" is how model.py passes them (a transposed view), "bhdt" has a strided last dim."""
    gen = torch.Generator().manual_seed(seed)

    def make(heads, d):
        sizes = dict(b=B, h=heads, t=T, d=d)
        x = torch.randn([sizes[c] for c in layout], generator=gen).to(device=DEVICE, dtype=dtype)
        return x.permute([layout.index(c) for c in "bhtd"]).requires_grad_()

    return make(n_head, d_qk), make(n_kv_head, d_qk), make(n_kv_head, d_v)


def assert_close_to(actual, expected, dtype, what):
    err = (actual.double() - expected).abs().max().item()
    scale = max(expected.abs().max().item(), 1.0)
    assert err <= TOLERANCE[dtype] * scale, f"{what}: max error {err:.3g} vs largest entry {scale:.3g}"


# (B, n_head, n_kv_head, T, d_qk, d_v, causal, window_size, softmax_scale, dtype, layout).
# The interpreter's tiles are 32 queries by 16 keys (16 by 32 in the dK/dV kernel), so T = 37, 50, 70 end
# mid-block and T = 64 ends on block boundaries.
CASES = {
    "mha_causal_T37": (2, 2, 2, 37, 16, 16, True, None, None, torch.float32, "bhtd"),
    "gqa2_full_T50": (1, 4, 2, 50, 32, 32, False, None, None, torch.float32, "bthd"),
    "gqa4_causal_d24_fp16": (1, 4, 1, 33, 24, 24, True, None, None, torch.float16, "bthd"),
    "gqa8_mla_48_32": (1, 8, 1, 20, 48, 32, True, None, None, torch.float32, "bhtd"),
    "T1": (2, 2, 1, 1, 16, 16, True, None, None, torch.float32, "bhtd"),
    "causal_T64_on_block_edges_scale1": (1, 2, 1, 64, 16, 16, True, None, 1.0, torch.float32, "bthd"),
    "full_mla_fp16_strided_last_dim": (1, 2, 2, 45, 48, 32, False, None, None, torch.float16, "bhdt"),
    "window5_smaller_than_blocks_d40": (1, 2, 1, 70, 40, 40, True, 5, None, torch.float32, "bthd"),
    "window20_gqa2_fp16": (1, 4, 2, 64, 32, 32, True, 20, None, torch.float16, "bhtd"),
    "window40_spans_blocks_T100": (1, 2, 1, 100, 16, 16, True, 40, None, torch.float32, "bthd"),
    "window1_sees_itself": (1, 2, 2, 17, 16, 16, True, 1, None, torch.float32, "bhtd"),
    "d256": (1, 2, 1, 20, 256, 256, True, None, None, torch.float32, "bhtd"),
}


@pytest.mark.parametrize("case", CASES.values(), ids=CASES.keys())
def test_output_and_gradients_match_float64_reference(case):
    B, n_head, n_kv_head, T, d_qk, d_v, causal, window_size, softmax_scale, dtype, layout = case
    q, k, v = random_qkv(B, n_head, n_kv_head, T, d_qk, d_v, dtype, layout)
    out = flash_attention(q, k, v, causal=causal, softmax_scale=softmax_scale, window_size=window_size)
    dout = torch.randn(out.shape, generator=torch.Generator().manual_seed(1)).to(device=DEVICE, dtype=dtype)
    out.backward(dout)

    q64, k64, v64 = (x.detach().double().requires_grad_() for x in (q, k, v))
    expected = reference_attention(q64, k64, v64, causal, softmax_scale, window_size)
    expected.backward(dout.double())
    assert out.shape == (B, n_head, T, d_v) and out.dtype == dtype
    for name, actual, exact in (("out", out, expected), ("dq", q.grad, q64.grad), ("dk", k.grad, k64.grad),
                                ("dv", v.grad, v64.grad)):
        assert_close_to(actual, exact, dtype, name)


def test_forward_matches_tiled_attention_with_the_same_tiles():
    # tiled_attention is the forward's algorithm in plain PyTorch: given the kernel's tiles it visits the same key
    # blocks, so the output and the log-sum-exp saved for the backward agree to fp32 rounding.
    q, k, v = (x.detach() for x in random_qkv(1, 4, 2, 70, 32, 24, torch.float32, "bhtd"))
    tiles = launch_tiles(32, 24, q.dtype, q.device)[0]
    out, lse = _forward(q, k, v, True, 0.2, 20, tiles)
    expected_out, expected_lse = tiled_attention(q, k, v, True, 0.2, 20, tiles.block_m, tiles.block_n)
    torch.testing.assert_close(out, expected_out, rtol=0, atol=2e-5)
    torch.testing.assert_close(lse, expected_lse, rtol=0, atol=2e-5)


def test_backward_is_bit_reproducible():
    # GQA ratio 4: four query heads add into each dK/dV tile, a sum that atomics would make order-dependent
    # on a GPU. (The interpreter runs programs serially; here it catches outputs read before being written.)
    q, k, v = random_qkv(1, 4, 1, 40, 32, 32, torch.float32, "bthd")
    grads = []
    for _ in range(2):
        out = flash_attention(q, k, v, causal=True)
        grads.append(torch.autograd.grad(out, (q, k, v), torch.ones_like(out)))
    for first, second in zip(*grads):
        assert torch.equal(first, second)


@pytest.mark.parametrize("shapes, kwargs, message", [
    (((1, 2, 8, 16), (1, 2, 9, 16), (1, 2, 9, 16)), {}, "k must be"),
    (((1, 3, 8, 16), (1, 2, 8, 16), (1, 2, 8, 16)), {}, "multiple of n_kv_head"),
    (((1, 2, 8, 320), (1, 2, 8, 320), (1, 2, 8, 16)), {}, "up to 256"),
    (((1, 2, 8, 16), (1, 2, 8, 16), (1, 2, 8, 16)), {"causal": False, "window_size": 4}, "causal=True"),
])
def test_rejects_unsupported_arguments_with_a_clear_error(shapes, kwargs, message):
    q, k, v = (torch.zeros(shape, device=DEVICE) for shape in shapes)
    with pytest.raises(ValueError, match=message):
        flash_attention(q, k, v, **kwargs)
