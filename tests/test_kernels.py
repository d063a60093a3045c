"""Tests of myllm_kernels/flash_attention.py: output and gradients against float64 math attention
(myllm_kernels/attention_reference.py, tested in tests/test_attention_reference.py). With packed documents (doc_ids)
also each document against itself run alone, and the block skipping against NaN planted in the other documents.
With attention sinks, the output and the gradients of q, k, v and the sink logits against the same reference.

Without a GPU the kernels run in Triton's CPU interpreter. conftest.py sets TRITON_INTERPRET before myllm_kernels is
imported (@triton.jit reads it when a kernel is defined) and stay set (Triton reads it again at launch).
The interpreter computes bf16 wrongly (triton-lang/triton#11584), so bf16 is checked on a GPU by
bench/attention.py; here fp32 and fp16. Shapes are tiny: the interpreter runs programs one by one.
"""

import pytest
import torch

from myllm_kernels import flash_attention  # TRITON_INTERPRET is set by conftest.py when there is no GPU
from myllm_kernels.attention_reference import _allowed, reference_attention, tiled_attention
from myllm_kernels.flash_attention import _document_spans, _forward, block_mask, block_mask_of, launch_tiles
from test_attention_reference import packed_doc_ids, random_sinks, with_docs

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
# Packed documents (doc_ids), as CASES plus each batch row's document lengths: documents shorter than a block and
# spanning several, boundaries inside blocks and on their edges, rows laid out differently, one-document rows,
# padding as a last short document, and a row of 20- and 80-long documents whose long one has whole key blocks
# needing no mask (the unmasked loop runs inside a document).
DOC_CASES = {
    "docs_mha_causal_T70": (2, 2, 2, 70, 16, 16, True, None, None, torch.float32, "bhtd",
                            [[3, 20, 1, 40, 6], [45, 25]]),
    "docs_gqa2_fp16_block_edges": (2, 4, 2, 64, 32, 32, True, None, None, torch.float16, "bthd",
                                   [[16, 16, 32], [7, 57]]),
    "docs_gqa4_full_T50": (2, 4, 1, 50, 16, 24, False, None, None, torch.float32, "bthd", [[10, 33, 7], [50]]),
    "docs_unmasked_blocks_T100": (2, 2, 1, 100, 16, 16, True, None, 1.0, torch.float32, "bhtd",
                                  [[20, 80], [100]]),
    "docs_window9_gqa2_fp16": (2, 4, 2, 70, 16, 16, True, 9, None, torch.float16, "bhtd", [[30, 3, 37], [1, 1, 68]]),
    "docs_window40_spans_blocks": (1, 2, 1, 100, 16, 16, True, 40, None, torch.float32, "bthd", [[4, 96]]),
    "docs_of_one_token_full_fp16": (1, 2, 2, 20, 16, 16, False, None, None, torch.float16, "bhdt", [[1] * 20]),
}


@pytest.mark.parametrize("case, doc_lengths", with_docs(CASES, DOC_CASES))
def test_output_and_gradients_match_float64_reference(case, doc_lengths):
    B, n_head, n_kv_head, T, d_qk, d_v, causal, window_size, softmax_scale, dtype, layout = case
    q, k, v = random_qkv(B, n_head, n_kv_head, T, d_qk, d_v, dtype, layout)
    doc_ids = None if doc_lengths is None else packed_doc_ids(doc_lengths).to(DEVICE)
    out = flash_attention(q, k, v, causal=causal, softmax_scale=softmax_scale, window_size=window_size,
                          doc_ids=doc_ids)
    dout = torch.randn(out.shape, generator=torch.Generator().manual_seed(1)).to(device=DEVICE, dtype=dtype)
    out.backward(dout)

    q64, k64, v64 = (x.detach().double().requires_grad_() for x in (q, k, v))
    expected = reference_attention(q64, k64, v64, causal, softmax_scale, window_size, doc_ids)
    expected.backward(dout.double())
    assert out.shape == (B, n_head, T, d_v) and out.dtype == dtype
    for name, actual, exact in (("out", out, expected), ("dq", q.grad, q64.grad), ("dk", k.grad, k64.grad),
                                ("dv", v.grad, v64.grad)):
        assert_close_to(actual, exact, dtype, name)


@pytest.mark.parametrize("doc_lengths, with_sinks", [(None, False), ([[5, 40, 25], [70]], False),
                                                     ([[5, 40, 25], [70]], True)])
def test_forward_matches_tiled_attention_with_the_same_tiles(doc_lengths, with_sinks):
    # tiled_attention is the forward's algorithm in plain PyTorch: given the kernel's tiles it visits the same key
    # blocks, so the output and the log-sum-exp saved for the backward (with sinks: including the sink) agree to
    # fp32 rounding.
    q, k, v = (x.detach() for x in random_qkv(2, 4, 2, 70, 32, 24, torch.float32, "bhtd"))
    doc_ids = None if doc_lengths is None else packed_doc_ids(doc_lengths).to(DEVICE)
    spans = (None, None) if doc_ids is None else _document_spans(doc_ids)  # what flash_attention passes
    sinks = random_sinks(4, torch.float32).to(DEVICE) if with_sinks else None
    tiles = launch_tiles(32, 24, q.dtype, q.device)[0]
    out, lse = _forward(q, k, v, True, 0.2, 20, tiles, *spans, sinks)
    expected_out, expected_lse = tiled_attention(q, k, v, True, 0.2, 20, doc_ids, sinks, tiles.block_m,
                                                 tiles.block_n)
    torch.testing.assert_close(out, expected_out, rtol=0, atol=2e-5)
    torch.testing.assert_close(lse, expected_lse, rtol=0, atol=2e-5)


# Attention sinks on a few of the cases above: causal and not, windows, GQA, packed documents, T mid-block, fp16
# (with fp16 sink logits, the inputs' dtype; fp32 ones otherwise).
SINK_CASES = {name: CASES[name] for name in ("mha_causal_T37", "gqa2_full_T50", "window5_smaller_than_blocks_d40",
                                             "window20_gqa2_fp16", "T1")}
SINK_DOC_CASES = {name: DOC_CASES[name] for name in ("docs_mha_causal_T70", "docs_window9_gqa2_fp16")}


@pytest.mark.parametrize("case, doc_lengths", with_docs(SINK_CASES, SINK_DOC_CASES))
def test_output_and_gradients_with_sinks_match_float64_reference(case, doc_lengths):
    B, n_head, n_kv_head, T, d_qk, d_v, causal, window_size, softmax_scale, dtype, layout = case
    q, k, v = random_qkv(B, n_head, n_kv_head, T, d_qk, d_v, dtype, layout)
    sinks = random_sinks(n_head, dtype).to(DEVICE).requires_grad_()
    doc_ids = None if doc_lengths is None else packed_doc_ids(doc_lengths).to(DEVICE)
    out = flash_attention(q, k, v, causal=causal, softmax_scale=softmax_scale, window_size=window_size,
                          doc_ids=doc_ids, sinks=sinks)
    dout = torch.randn(out.shape, generator=torch.Generator().manual_seed(1)).to(device=DEVICE, dtype=dtype)
    out.backward(dout)

    q64, k64, v64, sinks64 = (x.detach().double().requires_grad_() for x in (q, k, v, sinks))
    expected = reference_attention(q64, k64, v64, causal, softmax_scale, window_size, doc_ids, sinks64)
    expected.backward(dout.double())
    assert out.shape == (B, n_head, T, d_v) and out.dtype == dtype and sinks.grad.dtype == dtype
    for name, actual, exact in (("out", out, expected), ("dq", q.grad, q64.grad), ("dk", k.grad, k64.grad),
                                ("dv", v.grad, v64.grad), ("dsinks", sinks.grad, sinks64.grad)):
        assert_close_to(actual, exact, dtype, name)


@pytest.mark.parametrize("causal, window_size", [(True, 8), (False, None)])
def test_each_packed_document_equals_that_document_alone(causal, window_size):
    # What packing promises: a document's outputs and gradients do not depend on its neighbours in the row, nor on
    # where in the row it sits (only the rounding of a different tiling separates them).
    doc_lengths = [[5, 23, 1, 31], [40, 20]]
    q, k, v = random_qkv(2, 4, 2, 60, 16, 16, torch.float32, "bthd")
    kwargs = dict(causal=causal, window_size=window_size)
    out = flash_attention(q, k, v, doc_ids=packed_doc_ids(doc_lengths).to(DEVICE), **kwargs)
    dout = torch.randn(out.shape, generator=torch.Generator().manual_seed(1)).to(DEVICE)
    packed = (out, *torch.autograd.grad(out, (q, k, v), dout))
    for b, row in enumerate(doc_lengths):
        start = 0
        for length in row:
            doc = (slice(b, b + 1), slice(None), slice(start, start + length))
            alone_qkv = [x[doc].detach().requires_grad_() for x in (q, k, v)]
            out_alone = flash_attention(*alone_qkv, **kwargs)
            alone = (out_alone, *torch.autograd.grad(out_alone, alone_qkv, dout[doc]))
            for name, packed_part, alone_part in zip(("out", "dq", "dk", "dv"), packed, alone):
                torch.testing.assert_close(packed_part[doc], alone_part, rtol=1e-5, atol=1e-5, msg=name)
            start += length


@pytest.mark.filterwarnings("ignore:All-NaN slice")  # the poisoned rows' own maxima, in the interpreter
@pytest.mark.parametrize("causal", [True, False])
def test_blocks_of_other_documents_are_never_visited(causal):
    # Documents a whole number of tiles long share no tile, so every kernel must skip the other documents' blocks
    # entirely. NaN there would show a visit: a masked block still multiplies its zero probabilities by v (and by
    # dO in the backward), and 0 * NaN is NaN.
    tiles = launch_tiles(16, 16, torch.float32, torch.device(DEVICE))
    align = max(max(t.block_m, t.block_n) for t in tiles)
    doc_lengths = [[align, 2 * align]]
    q, k, v = random_qkv(1, 2, 1, 3 * align, 16, 16, torch.float32, "bhtd")
    doc_ids = packed_doc_ids(doc_lengths).to(DEVICE)
    for doc, other in ((slice(0, align), slice(align, None)), (slice(align, None), slice(0, align))):
        poisoned = [x.detach().clone() for x in (q, k, v)]
        for x in poisoned:
            x[:, :, other] = float("nan")
        poisoned = [x.requires_grad_() for x in poisoned]
        out = flash_attention(*poisoned, causal=causal, doc_ids=doc_ids)
        dout = torch.ones_like(out)
        dout[:, :, other] = float("nan")
        for name, x in zip(("out", "dq", "dk", "dv"), (out, *torch.autograd.grad(out, poisoned, dout))):
            assert bool(x[:, :, doc].isfinite().all()), f"{name} of positions {doc} read another document"


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
    (((1, 2, 8, 16), (1, 2, 8, 16), (1, 2, 8, 16)), {"doc_ids": torch.zeros(1, 9, dtype=torch.long, device=DEVICE)},
     r"doc_ids must be an integer tensor of shape \(B, T\) = \(1, 8\)"),
    (((1, 2, 8, 16), (1, 2, 8, 16), (1, 2, 8, 16)), {"doc_ids": torch.zeros(8, dtype=torch.long, device=DEVICE)},
     "doc_ids must be an integer tensor"),
    (((1, 2, 8, 16), (1, 2, 8, 16), (1, 2, 8, 16)), {"doc_ids": torch.zeros(1, 8, device=DEVICE)},
     "doc_ids must be an integer tensor"),
    (((1, 2, 8, 16), (1, 2, 8, 16), (1, 2, 8, 16)),
     {"doc_ids": torch.tensor([[0, 0, 1, 1, 0, 2, 2, 2]], device=DEVICE)}, "never decrease"),
    (((1, 2, 8, 16), (1, 2, 8, 16), (1, 2, 8, 16)), {"sinks": torch.zeros(1, 2, device=DEVICE)},
     r"sinks must be a float32 or torch.float32 tensor of shape \(n_head,\) = \(2,\)"),
    (((1, 2, 8, 16), (1, 2, 8, 16), (1, 2, 8, 16)), {"sinks": torch.zeros(2, dtype=torch.float16, device=DEVICE)},
     "sinks must be a float32"),
])
def test_rejects_unsupported_arguments_with_a_clear_error(shapes, kwargs, message):
    q, k, v = (torch.zeros(shape, device=DEVICE) for shape in shapes)
    with pytest.raises(ValueError, match=message):
        flash_attention(q, k, v, **kwargs)


# ----------------------------------------------------------------------------------------------------- block masks


def kernel_and_reference(q, k, v, dtype, mask=None, **kwargs):
    """flash_attention's output and gradients under kwargs, and reference_attention's in float64 under the same
    causal, window, documents and sinks, and `mask`, the pairs a block_mask in kwargs keeps: [(name, ours, exact)]."""
    out = flash_attention(q, k, v, **kwargs)
    dout = torch.randn(out.shape, generator=torch.Generator().manual_seed(1)).to(device=DEVICE, dtype=dtype)
    out.backward(dout)
    sinks = kwargs.get("sinks")
    q64, k64, v64 = (x.detach().double().requires_grad_() for x in (q, k, v))
    sinks64 = None if sinks is None else sinks.detach().double().requires_grad_()
    expected = reference_attention(q64, k64, v64, kwargs.get("causal", True), None, kwargs.get("window_size"),
                                   kwargs.get("doc_ids"), sinks64, mask)
    expected.backward(dout.double())
    pairs = [("out", out, expected), ("dq", q.grad, q64.grad), ("dk", k.grad, k64.grad), ("dv", v.grad, v64.grad)]
    return pairs + ([("dsinks", sinks.grad, sinks64.grad)] if sinks is not None else [])


@pytest.mark.parametrize("window_size, doc_lengths, block", [(20, None, 16), (None, [[5, 40, 25], [70]], 32),
                                                            (9, [[30, 3, 37], [1, 1, 68]], 16)])
def test_a_block_mask_of_a_window_or_documents_computes_what_the_ranges_compute(window_size, doc_lengths, block):
    # The lists of the tiles a sliding window or packed documents touch (FlexAttention's create_block_mask): the
    # same attention as the kernel's own block ranges, to float32 rounding, and as the float64 reference.
    q, k, v = random_qkv(2, 4, 2, 70, 16, 16, torch.float32, "bthd")
    doc_ids = None if doc_lengths is None else packed_doc_ids(doc_lengths).to(DEVICE)
    pos = torch.arange(70, device=DEVICE)
    allowed = _allowed(pos, pos, True, window_size, doc_ids, doc_ids)
    mask = block_mask_of(allowed.expand(2, 1, 70, 70), block)
    visited, tiles = mask.kv_blocks[..., 0].sum().item(), 2 * mask.kv_blocks.size(2) ** 2
    assert visited < tiles * 0.7  # the tiles skipped are most of them
    ranges = [(name, out.detach().clone()) for name, out, _ in kernel_and_reference(
        q, k, v, torch.float32, causal=True, window_size=window_size, doc_ids=doc_ids)]
    q.grad = k.grad = v.grad = None
    listed = kernel_and_reference(q, k, v, torch.float32, causal=True, window_size=window_size, doc_ids=doc_ids,
                                  block_mask=mask)
    for (name, by_ranges), (_, by_lists, exact) in zip(ranges, listed):
        assert_close_to(by_lists, exact, torch.float32, name)
        torch.testing.assert_close(by_lists, by_ranges, rtol=0, atol=1e-5)  # other tiles, other rounding


@pytest.mark.parametrize("with_sinks", [False, True])
def test_block_lists_and_chosen_rows_compute_attention_under_their_explicit_mask(with_sinks):
    # Per head: random tiles to visit, and within them random key blocks per query row (MoBA's per-token choice);
    # the diagonal always, so every row sees itself. GQA, so the dK/dV kernel sums two heads' different lists.
    B, H, T, block = 2, 4, 53, 16
    n = -(-T // block)
    g = torch.Generator().manual_seed(7)
    visit = (torch.rand(B, H, n, n, generator=g) < 0.5) | torch.eye(n, dtype=torch.bool)
    rows = torch.arange(T) // block
    chosen = (torch.rand(B, H, T, n, generator=g) < 0.6) & visit[:, :, rows]
    chosen[:, :, torch.arange(T), rows] = True
    mask = block_mask(visit.to(DEVICE), block, chosen.to(DEVICE))
    explicit = chosen[:, :, :, rows].to(DEVICE)  # (B, H, T, T): query i takes key j's block
    q, k, v = random_qkv(B, H, 2, T, 16, 24, torch.float32, "bhtd")
    sinks = random_sinks(H, torch.float32).to(DEVICE).requires_grad_() if with_sinks else None
    results = kernel_and_reference(q, k, v, torch.float32, causal=True, block_mask=mask, mask=explicit, sinks=sinks)
    for name, ours, exact in results:
        assert_close_to(ours, exact, torch.float32, name)


@pytest.mark.parametrize("make, message", [
    (lambda: block_mask(torch.ones(1, 1, 3, 3, dtype=torch.bool), 24), "power of two"),
    (lambda: block_mask(torch.ones(1, 1, 2, 2, dtype=torch.bool), 16), "blocks of 40 positions"),
    (lambda: block_mask(torch.ones(3, 1, 3, 3, dtype=torch.bool), 16), "1 or 2"),
])
def test_a_block_mask_that_does_not_fit_is_refused_with_a_sentence(make, message):
    q, k, v = random_qkv(2, 2, 2, 40, 16, 16, torch.float32, "bhtd")
    mask = make()
    mask = mask._replace(kv_blocks=mask.kv_blocks.to(DEVICE), q_blocks=mask.q_blocks.to(DEVICE))
    with pytest.raises(ValueError, match=message):
        flash_attention(q, k, v, block_mask=mask)
