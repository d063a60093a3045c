"""Tests of myllm_kernels/attention_reference.py: tiled_attention, the flash forward's algorithm block by block, computes
reference_attention's function; and reference_attention itself is PyTorch's scaled_dot_product_attention, so the
float64 oracle that tests/test_kernels.py trusts is checked against an implementation that is not ours. Both with
and without packed documents (doc_ids), whose mask SDPA gets as an explicit boolean matrix. With attention sinks,
which SDPA has no way to express, the oracle is checked against transformers' gpt-oss eager attention instead.
"""

import math
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F

from myllm_kernels.attention_reference import reference_attention, tiled_attention

# (B, n_head, n_kv_head, T, d_qk, d_v, causal, window_size, softmax_scale, block_m, block_n): T ends mid-block
# unless the name says otherwise, and block_m != block_n exercises the key-range arithmetic both ways round.
CASES = {
    "mha_causal_T37": (2, 2, 2, 37, 16, 16, True, None, None, 16, 8),
    "gqa2_full_T50": (1, 4, 2, 50, 32, 32, False, None, None, 16, 32),
    "gqa4_causal_dqk48_dv32": (1, 4, 1, 45, 48, 32, True, None, None, 8, 16),
    "full_dqk24_dv40_scale1": (2, 2, 1, 30, 24, 40, False, None, 1.0, 32, 16),
    "causal_T64_on_block_edges_scale0.3": (1, 2, 1, 64, 16, 16, True, None, 0.3, 32, 16),
    "window1_sees_itself": (1, 2, 2, 17, 16, 16, True, 1, None, 8, 4),
    "window5_smaller_than_blocks": (1, 2, 1, 70, 16, 16, True, 5, None, 32, 16),
    "window40_spans_blocks_gqa2": (1, 4, 2, 100, 16, 8, True, 40, None, 16, 16),
    "window_longer_than_T": (1, 2, 2, 20, 16, 16, True, 50, None, 8, 8),
    "window3_one_key_per_block": (1, 2, 1, 19, 16, 16, True, 3, None, 5, 1),
    "T1": (2, 2, 1, 1, 16, 16, True, None, None, 32, 16),
}
# Packed documents, as CASES plus each batch row's document lengths: documents shorter than a block and spanning
# blocks, starting on block edges and inside blocks, rows laid out differently, and a row that is one document.
DOC_CASES = {
    "docs_causal_T70": (2, 2, 2, 70, 16, 16, True, None, None, 16, 8, [[3, 20, 1, 40, 6], [45, 25]]),
    "docs_full_gqa2_T50": (2, 4, 2, 50, 32, 16, False, None, None, 16, 32, [[10, 33, 7], [50]]),
    "docs_on_block_edges_T64": (1, 2, 1, 64, 16, 16, True, None, 0.3, 16, 16, [[16, 16, 32]]),
    "docs_window9_gqa4": (2, 4, 1, 60, 16, 8, True, 9, None, 8, 16, [[30, 3, 27], [1, 1, 58]]),
    "docs_of_one_token_full": (1, 2, 2, 12, 16, 16, False, None, None, 4, 8, [[1] * 12]),
}


def random_qkv(B, n_head, n_kv_head, T, d_qk, d_v, dtype):
    gen = torch.Generator().manual_seed(0)
    return (torch.randn(B, n_head, T, d_qk, generator=gen, dtype=dtype),
            torch.randn(B, n_kv_head, T, d_qk, generator=gen, dtype=dtype),
            torch.randn(B, n_kv_head, T, d_v, generator=gen, dtype=dtype))


def packed_doc_ids(doc_lengths):
    """doc_ids (B, T) of rows that pack documents of the given lengths one after another: 0, 0, 0, 1, 1, 2, ..."""
    return torch.tensor([[doc for doc, n in enumerate(row) for _ in range(n)] for row in doc_lengths])


def attn_mask(T, causal, window_size, doc_lengths=None):
    """The mask SDPA is given, built another way than the reference's: j <= i is the lower triangle, and of it
    tril(-W) holds the keys W or more behind the query, the ones a window of W hides; packed documents are the
    diagonal blocks of a block-diagonal matrix, (B, 1, T, T) to broadcast over the heads."""
    ones = torch.ones(T, T, dtype=torch.bool)
    mask = None if not causal else ones.tril() if window_size is None else ones.tril() & ~ones.tril(-window_size)
    if doc_lengths is None:
        return mask
    docs = torch.stack([torch.block_diag(*(torch.ones(n, n, dtype=torch.bool) for n in row)) for row in doc_lengths])
    return docs[:, None] if mask is None else docs[:, None] & mask


def with_docs(cases, doc_cases):
    """pytest parameters (case, doc_lengths, id): cases without documents, then doc_cases with them."""
    return ([pytest.param(case, None, id=name) for name, case in cases.items()]
            + [pytest.param(case[:-1], case[-1], id=name) for name, case in doc_cases.items()])


@pytest.mark.parametrize("case, doc_lengths", with_docs(CASES, DOC_CASES))
def test_tiled_attention_equals_reference(case, doc_lengths):
    B, n_head, n_kv_head, T, d_qk, d_v, causal, window_size, softmax_scale, block_m, block_n = case
    q, k, v = random_qkv(B, n_head, n_kv_head, T, d_qk, d_v, torch.float32)
    doc_ids = None if doc_lengths is None else packed_doc_ids(doc_lengths)
    out, lse = tiled_attention(q, k, v, causal, softmax_scale, window_size, doc_ids, block_m=block_m, block_n=block_n)
    expected = reference_attention(q, k, v, causal, softmax_scale, window_size, doc_ids)
    assert out.shape == (B, n_head, T, d_v) and out.dtype == torch.float32 and lse.shape == (B, n_head, T)
    torch.testing.assert_close(out.double(), expected, rtol=0, atol=1e-5)
    assert_lse_is_the_log_of_the_softmax_denominator(lse, q, k, case, doc_lengths)


def assert_lse_is_the_log_of_the_softmax_denominator(lse, q, k, case, doc_lengths, sinks=None):
    """lse is base 2 (the kernel's units): times ln 2 it is the natural log-sum-exp of the row's scaled scores (and
    of its sink logit, given sinks)."""
    _, n_head, n_kv_head, T, d_qk, _, causal, window_size, softmax_scale, _, _ = case
    scale = 1.0 / math.sqrt(d_qk) if softmax_scale is None else softmax_scale
    k64 = k.double().repeat_interleave(n_head // n_kv_head, dim=1)
    scores = q.double() @ k64.transpose(-2, -1) * scale
    mask = attn_mask(T, causal, window_size, doc_lengths)
    if mask is not None:
        scores = scores.masked_fill(~mask, float("-inf"))
    if sinks is not None:
        scores = torch.cat((scores, sinks.double().view(1, -1, 1, 1).expand(*scores.shape[:3], 1)), dim=-1)
    torch.testing.assert_close(lse.double() * math.log(2), torch.logsumexp(scores, dim=-1), rtol=1e-6, atol=1e-5)


def test_tiled_attention_accumulates_half_inputs_in_float32():
    q, k, v = random_qkv(1, 2, 1, 40, 16, 16, torch.float16)
    out, lse = tiled_attention(q, k, v, window_size=7, block_m=16, block_n=8)
    assert out.dtype == torch.float16 and lse.dtype == torch.float32
    # Only the final rounding to fp16 (relative 2^-11) separates it from the exact result.
    torch.testing.assert_close(out.double(), reference_attention(q, k, v, window_size=7), rtol=1e-3, atol=1e-3)


@pytest.mark.parametrize("case, doc_lengths", with_docs(CASES, DOC_CASES))
def test_reference_equals_torch_sdpa(case, doc_lengths):
    B, n_head, n_kv_head, T, d_qk, d_v, causal, window_size, softmax_scale, _, _ = case
    q, k, v = (x.requires_grad_() for x in random_qkv(B, n_head, n_kv_head, T, d_qk, d_v, torch.float64))
    mask = attn_mask(T, causal, window_size, doc_lengths)
    expected = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=False, scale=softmax_scale,
                                              enable_gqa=True)
    out = reference_attention(q, k, v, causal, softmax_scale, window_size,
                              None if doc_lengths is None else packed_doc_ids(doc_lengths))
    assert out.dtype == torch.float64
    torch.testing.assert_close(out, expected, rtol=1e-12, atol=1e-12)
    # tests/test_kernels.py checks the backward kernels against the reference's gradients: those too.
    dout = torch.randn(out.shape, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    for ours, theirs in zip(torch.autograd.grad(out, (q, k, v), dout), torch.autograd.grad(expected, (q, k, v), dout)):
        torch.testing.assert_close(ours, theirs, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("attention", [reference_attention, tiled_attention])
@pytest.mark.parametrize("causal, window_size", [(False, 4), (True, 0)])
def test_rejects_a_window_without_causal_or_below_one(attention, causal, window_size):
    q, k, v = random_qkv(1, 2, 2, 8, 16, 16, torch.float32)
    with pytest.raises(ValueError, match="window_size"):
        attention(q, k, v, causal=causal, window_size=window_size)


# Attention sinks, a few of CASES and DOC_CASES: causal and not, windows, GQA, packed documents, T mid-block.
SINK_CASES = {name: CASES[name] for name in ("mha_causal_T37", "gqa2_full_T50", "window5_smaller_than_blocks",
                                             "window40_spans_blocks_gqa2", "T1")}
SINK_DOC_CASES = {name: DOC_CASES[name] for name in ("docs_causal_T70", "docs_window9_gqa4")}


def random_sinks(n_head, dtype):
    """Sink logits around the scores' own size (unit q and k: s ~ N(0, 1)), so that the sink takes a real share of
    some rows and almost none of others; one far above every score, where the sink takes nearly all."""
    sinks = torch.randn(n_head, generator=torch.Generator().manual_seed(2), dtype=dtype) * 2
    sinks[0] = 6.0
    return sinks


@pytest.mark.parametrize("case, doc_lengths", with_docs(SINK_CASES, SINK_DOC_CASES))
def test_reference_with_sinks_equals_gpt_oss_eager_attention(case, doc_lengths):
    from transformers.models.gpt_oss.modeling_gpt_oss import eager_attention_forward

    B, n_head, n_kv_head, T, d_qk, d_v, causal, window_size, softmax_scale, _, _ = case
    q, k, v = (x.requires_grad_() for x in random_qkv(B, n_head, n_kv_head, T, d_qk, d_v, torch.float64))
    sinks = random_sinks(n_head, torch.float64).requires_grad_()
    mask = attn_mask(T, causal, window_size, doc_lengths)
    additive = None if mask is None else torch.zeros(mask.shape, dtype=torch.float64).masked_fill(~mask, float("-inf"))
    scale = 1.0 / math.sqrt(d_qk) if softmax_scale is None else softmax_scale
    module = SimpleNamespace(num_key_value_groups=n_head // n_kv_head, sinks=sinks, training=False)
    expected, _ = eager_attention_forward(module, q, k, v, additive, scaling=scale)
    expected = expected.transpose(1, 2)  # theirs is (B, T, n_head, d_v)
    out = reference_attention(q, k, v, causal, softmax_scale, window_size,
                              None if doc_lengths is None else packed_doc_ids(doc_lengths), sinks=sinks)
    torch.testing.assert_close(out, expected, rtol=0, atol=1e-6)
    # Without the sink the outputs differ: the sink's share of each row is missing from its weights.
    assert (out - reference_attention(q, k, v, causal, softmax_scale, window_size,
                                      None if doc_lengths is None else packed_doc_ids(doc_lengths))).abs().max() > 0.1
    dout = torch.randn(out.shape, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    inputs = (q, k, v, sinks)
    for name, ours, theirs in zip("q k v sinks".split(), torch.autograd.grad(out, inputs, dout),
                                  torch.autograd.grad(expected, inputs, dout)):
        torch.testing.assert_close(ours, theirs, rtol=0, atol=1e-6, msg=f"d{name}")


@pytest.mark.parametrize("case, doc_lengths", with_docs(SINK_CASES, SINK_DOC_CASES))
def test_tiled_attention_with_sinks_equals_reference(case, doc_lengths):
    B, n_head, n_kv_head, T, d_qk, d_v, causal, window_size, softmax_scale, block_m, block_n = case
    q, k, v = random_qkv(B, n_head, n_kv_head, T, d_qk, d_v, torch.float32)
    sinks = random_sinks(n_head, torch.float32)
    doc_ids = None if doc_lengths is None else packed_doc_ids(doc_lengths)
    out, lse = tiled_attention(q, k, v, causal, softmax_scale, window_size, doc_ids, sinks, block_m, block_n)
    expected = reference_attention(q, k, v, causal, softmax_scale, window_size, doc_ids, sinks)
    torch.testing.assert_close(out.double(), expected, rtol=0, atol=1e-5)
    assert_lse_is_the_log_of_the_softmax_denominator(lse, q, k, case, doc_lengths, sinks)
