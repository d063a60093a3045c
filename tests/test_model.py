"""Tests of model.py against independent references: float64 math, brute-force attention, uncached forwards."""

import math

import pytest
import torch

from model import (
    KVCache,
    ModelConfig,
    RMSNorm,
    RotaryEmbedding,
    Transformer,
    apply_rope,
    attention,
    make_attention_mask,
    sample_next_token,
)

TINY = dict(vocab_size=64, block_size=16, n_layer=2, n_head=4, n_kv_head=2, n_embd=32)
assert_close = torch.testing.assert_close


def make_model(dtype=torch.float64, seed=0, **overrides):
    torch.manual_seed(seed)
    return Transformer(ModelConfig(**{**TINY, **overrides})).to(dtype).eval()


def lively_model(**overrides):
    """A model whose next token depends on the whole context. At GPT-2's init a tied model mostly predicts
    its last input token again, so a generation test would pass whatever context the model was given."""
    model = make_model(tie_embeddings=False, **overrides)
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() > 1:
                p.normal_(0.0, 0.3)
    return model


def left_padded_batch(seed=1, lengths=(10, 6, 3), vocab_size=64):
    """Rows of random tokens of the given lengths, left-padded (with token 0) to the longest one."""
    g = torch.Generator().manual_seed(seed)
    rows = [torch.randint(0, vocab_size, (n,), generator=g) for n in lengths]
    T = max(lengths)
    idx = torch.zeros(len(rows), T, dtype=torch.long)
    mask = torch.zeros(len(rows), T, dtype=torch.long)
    for b, row in enumerate(rows):
        idx[b, T - len(row) :] = row
        mask[b, T - len(row) :] = 1
    return rows, idx, mask


# ----------------------------------------------------------------------------- config


def test_config_resolves_swiglu_inter_dim():
    assert ModelConfig(n_embd=512).inter_dim == 1408  # 8/3 * 512 = 1365.3 -> next multiple of 64
    assert ModelConfig(n_embd=96, n_head=4, n_kv_head=2).inter_dim == 256  # 8/3 * 96 = 256 exactly
    assert ModelConfig(inter_dim=100).inter_dim == 100
    assert ModelConfig().head_dim == 64


@pytest.mark.parametrize(
    "overrides, field",
    [
        (dict(n_embd=30, n_head=4), "n_embd"),
        (dict(n_head=8, n_kv_head=3), "n_kv_head"),
        (dict(attn_impl="flash"), "attn_impl"),
        (dict(n_embd=12, n_head=4, n_kv_head=4), "head_dim"),
        (dict(n_layer=0), "n_layer"),
    ],
)
def test_config_rejects_bad_values_naming_the_field(overrides, field):
    with pytest.raises(ValueError, match=field):
        ModelConfig(**overrides)


# ----------------------------------------------------------------------------- RMSNorm and RoPE


@pytest.mark.parametrize("dtype, tol", [(torch.float32, 1e-6), (torch.bfloat16, 1e-2)])
@pytest.mark.parametrize("scale", [5.0, 3e-3])  # at 3e-3 the mean square is near eps, so eps matters
def test_rmsnorm_matches_float64_math(dtype, tol, scale):
    torch.manual_seed(0)
    norm = RMSNorm(256, eps=1e-5)
    with torch.no_grad():
        norm.weight.normal_()
    x = torch.randn(3, 7, 256) * scale
    w, x64 = norm.weight.double(), x.to(dtype).double()
    expected = x64 / torch.sqrt((x64**2).mean(-1, keepdim=True) + 1e-5) * w
    got = norm.to(dtype)(x.to(dtype))
    assert got.dtype == dtype
    assert_close(got.double(), expected, atol=tol * 10, rtol=tol)


def test_rope_matches_complex_rotation_in_interleaved_layout():
    # The RoFormer / Meta Llama formulation: consecutive dims (x[2i], x[2i+1]) form the complex number
    # x[2i] + i x[2i+1], multiplied by exp(i * position * theta^(-2i/d)). Our rotate-half layout keeps the
    # pair i in dims (i, i + d/2); interleaving them must give the paper's layout.
    hd, theta, max_len = 16, 1e4, 64
    rope = RotaryEmbedding(hd, max_len, theta)
    positions = torch.randint(0, max_len, (2, 5))
    x = torch.randn(2, 3, 5, hd, dtype=torch.float64)
    got = apply_rope(x, *rope(positions, torch.float64))

    half = hd // 2
    x_paper = torch.stack((x[..., :half], x[..., half:]), dim=-1)  # (2, 3, 5, half, 2)
    freqs = theta ** (-2 * torch.arange(half, dtype=torch.float64) / hd)
    angle = positions[:, None, :, None].double() * freqs  # (2, 1, 5, half)
    rotated = torch.view_as_real(torch.view_as_complex(x_paper.contiguous()) * torch.polar(torch.ones_like(angle), angle))
    expected = torch.cat((rotated[..., 0], rotated[..., 1]), dim=-1)
    assert_close(got, expected, atol=2e-5, rtol=0)  # the tables are float32, like Hugging Face's


def test_rope_scores_depend_only_on_distance():
    hd = 16
    rope = RotaryEmbedding(hd, 64, theta=1e4)
    q, k = torch.randn(hd, dtype=torch.float64), torch.randn(hd, dtype=torch.float64)

    def score(m, n):
        cos, sin = rope(torch.tensor([[m, n]]), torch.float64)
        return apply_rope(q, cos[0, 0, 0], sin[0, 0, 0]) @ apply_rope(k, cos[0, 0, 1], sin[0, 0, 1])

    for distance in (0, 3, 11):
        scores = torch.stack([score(n + distance, n) for n in (0, 5, 40)])
        assert_close(scores, scores[:1].expand(3), atol=1e-5, rtol=0)
    assert not torch.isclose(score(3, 0), score(4, 0), atol=1e-3)


# ----------------------------------------------------------------------------- attention


@pytest.mark.parametrize("impl", ["eager", "sdpa"])
def test_attention_matches_float64_brute_force(impl):
    # 3 new queries after 3 cached keys; row 0 is left-padded by 4, so its first query sees no real key.
    torch.manual_seed(0)
    B, H, KV, T, S, hd = 2, 4, 2, 3, 6, 8
    q = torch.randn(B, H, T, hd, dtype=torch.float64)
    k, v = torch.randn(B, KV, S, hd, dtype=torch.float64), torch.randn(B, KV, S, hd, dtype=torch.float64)
    key_is_real = torch.tensor([[0, 0, 0, 0, 1, 1], [1, 1, 1, 1, 1, 1]], dtype=torch.bool)
    got = attention(q, k, v, make_attention_mask(key_is_real, T), impl)

    expected = torch.zeros_like(got)
    for b in range(B):
        for h in range(H):
            kv_head = h // (H // KV)
            for i in range(T):
                keys = [j for j in range(S) if j <= S - T + i and key_is_real[b, j]]
                if not keys:
                    continue  # a query with nothing to attend to outputs zeros
                scores = torch.stack([q[b, h, i] @ k[b, kv_head, j] for j in keys]) / math.sqrt(hd)
                weights = torch.exp(scores - scores.max())
                weights = weights / weights.sum()
                expected[b, h, i] = sum(w * v[b, kv_head, j] for w, j in zip(weights, keys))
    assert_close(got, expected)
    assert (got[0, :, 0] == 0).all()


@pytest.mark.parametrize("impl", ["eager", "sdpa"])
def test_changing_a_future_token_keeps_earlier_logits(impl):
    model = make_model(attn_impl=impl)
    idx = torch.randint(0, 64, (2, 12))
    changed = idx.clone()
    changed[:, 7] = (idx[:, 7] + 1) % 64
    logits, _ = model(idx)
    logits_changed, _ = model(changed)
    assert_close(logits_changed[:, :7], logits[:, :7])
    assert not torch.allclose(logits_changed[:, 7:], logits[:, 7:])


@pytest.mark.parametrize("n_kv_head", [4, 2, 1])  # GQA ratios 1, 2, 4
@pytest.mark.parametrize("padded", [False, True])
def test_sdpa_matches_eager_logits_and_gradients(n_kv_head, padded):
    eager = make_model(attn_impl="eager", n_kv_head=n_kv_head, qkv_bias=True)
    sdpa = make_model(attn_impl="sdpa", n_kv_head=n_kv_head, qkv_bias=True)
    sdpa.load_state_dict(eager.state_dict())
    _, idx, mask = left_padded_batch()
    if not padded:
        mask = torch.ones_like(mask)
    targets = idx.roll(-1, dims=1).masked_fill(mask == 0, -100)
    results = []
    for model in (eager, sdpa):
        logits, loss = model(idx, targets, attention_mask=mask if padded else None)
        loss.backward()
        results.append((logits, {name: p.grad for name, p in model.named_parameters()}))
    (logits_e, grads_e), (logits_s, grads_s) = results
    assert_close(logits_s, logits_e)
    assert grads_s.keys() == grads_e.keys()
    for name in grads_e:
        assert_close(grads_s[name], grads_e[name], msg=name)


@pytest.mark.parametrize("impl", ["eager", "sdpa"])
def test_padding_rows_output_zeros_and_gradients_stay_finite(impl):
    model = make_model(dtype=torch.float32, attn_impl=impl)
    _, idx, mask = left_padded_batch()
    attn_outputs = []
    for block in model.layers:
        block.attn.register_forward_hook(lambda module, args, out: attn_outputs.append(out))
    targets = idx.roll(-1, dims=1).masked_fill(mask == 0, -100)
    logits, loss = model(idx, targets, attention_mask=mask)
    loss.backward()
    assert torch.isfinite(logits).all()
    for name, p in model.named_parameters():
        assert torch.isfinite(p.grad).all(), name
    for out in attn_outputs:  # every padding position of a left-padded row has no real key to attend to
        assert (out[mask == 0] == 0).all()
        assert (out[mask == 1] != 0).any()


@pytest.mark.parametrize("impl", ["eager", "sdpa"])
def test_left_padded_rows_match_unpadded_rows(impl):
    model = make_model(attn_impl=impl)
    rows, idx, mask = left_padded_batch()
    logits, _ = model(idx, attention_mask=mask)
    for b, row in enumerate(rows):
        alone, _ = model(row[None])
        assert_close(logits[b, mask[b] == 1], alone[0])


# ----------------------------------------------------------------------------- KV cache and generation


@pytest.mark.parametrize("impl", ["eager", "sdpa"])
@pytest.mark.parametrize("chunks", [[4, 1, 1, 1, 1, 1, 1], [6, 4]], ids=["token_by_token", "two_chunks"])
@pytest.mark.parametrize("padded", [False, True])
def test_cached_logits_match_uncached(impl, chunks, padded):
    model = make_model(attn_impl=impl)
    _, idx, mask = left_padded_batch()
    full_mask = mask if padded else None
    expected, _ = model(idx, attention_mask=full_mask)
    cache = KVCache(model.config, idx.size(0), model.config.block_size)
    pieces, start = [], 0
    for n in chunks:
        chunk_mask = mask[:, start : start + n] if padded else None
        logits, _ = model(idx[:, start : start + n], attention_mask=chunk_mask, kv_cache=cache)
        pieces.append(logits)
        start += n
    assert cache.length == idx.size(1)
    assert_close(torch.cat(pieces, dim=1), expected)


def greedy_with_uncached_forwards(model, idx, n_tokens, attention_mask=None):
    """The context policy generate() promises, spelled out with full forward passes: the window starts at the
    prompt's last block_size tokens, and when it would exceed block_size it restarts at the last
    block_size // 2 tokens (not nanoGPT's crop to the last block_size tokens at every step)."""
    block = model.config.block_size
    tokens = idx
    mask = torch.ones_like(idx) if attention_mask is None else attention_mask
    start = max(0, idx.size(1) - block)
    out = []
    for _ in range(n_tokens):
        if tokens.size(1) - start > block:
            start = tokens.size(1) - block // 2
        logits, _ = model(tokens[:, start:], attention_mask=mask[:, start:])
        out.append(logits[:, -1].argmax(-1))
        tokens = torch.cat((tokens, out[-1][:, None]), dim=1)
        mask = torch.cat((mask, torch.ones_like(mask[:, :1])), dim=1)
    return torch.stack(out, dim=1)


@pytest.mark.parametrize("impl", ["eager", "sdpa"])
@pytest.mark.parametrize("prompt_len", [5, 20])  # block_size is 16: 20 starts beyond it
def test_greedy_generate_matches_uncached_forwards_past_block_size(impl, prompt_len):
    model = lively_model(attn_impl=impl)
    idx = torch.randint(0, 64, (2, prompt_len))
    n_tokens = 30  # several window restarts
    got = torch.stack(list(model.generate(idx, n_tokens, temperature=0)), dim=1)
    assert_close(got, greedy_with_uncached_forwards(model, idx, n_tokens))


def test_greedy_generate_of_left_padded_batch():
    model = lively_model()
    rows, idx, mask = left_padded_batch()
    # Within block_size, each row continues exactly as it would alone (10 + 6 tokens fit in 16).
    got = torch.stack(list(model.generate(idx, 6, temperature=0, attention_mask=mask)), dim=1)
    for b, row in enumerate(rows):
        assert_close(got[b], greedy_with_uncached_forwards(model, row[None], 6)[0])
    # Past it the window is the same columns for every row, so the padded batch follows the batch policy.
    got = torch.stack(list(model.generate(idx, 25, temperature=0, attention_mask=mask)), dim=1)
    assert_close(got, greedy_with_uncached_forwards(model, idx, 25, attention_mask=mask))


def test_generate_is_lazy_and_yields_one_token_per_row():
    model = lively_model()
    steps = model.generate(torch.randint(0, 64, (3, 4)), 5, temperature=0.8)
    tokens = list(steps)
    assert len(tokens) == 5
    assert all(t.shape == (3,) and t.dtype == torch.long for t in tokens)


def test_top_k_1_and_tiny_top_p_equal_greedy():
    model = lively_model()
    idx = torch.randint(0, 64, (3, 5))
    greedy = torch.stack(list(model.generate(idx, 12, temperature=0)), dim=1)
    top_k = torch.stack(list(model.generate(idx, 12, temperature=1.5, top_k=1)), dim=1)
    top_p = torch.stack(list(model.generate(idx, 12, temperature=1.5, top_p=1e-6)), dim=1)
    assert_close(top_k, greedy)
    assert_close(top_p, greedy)


@pytest.mark.parametrize(
    "top_k, top_p, kept", [(2, None, {1, 3}), (None, 0.75, {1, 3}), (None, 0.85, {0, 1, 3}), (None, 1.0, {0, 1, 2, 3})]
)
def test_sampling_keeps_exactly_the_expected_tokens(top_k, top_p, kept):
    torch.manual_seed(0)
    logits = torch.tensor([0.15, 0.5, 0.05, 0.3]).log()  # ranked: token 1, 3, 0, 2
    samples = sample_next_token(logits.expand(4000, 4), temperature=1.0, top_k=top_k, top_p=top_p)
    assert set(samples.tolist()) == kept


# ----------------------------------------------------------------------------- loss and training


def test_loss_ignores_minus_100_targets():
    model = make_model()
    idx = torch.randint(0, 64, (2, 9))
    targets = torch.randint(0, 64, (2, 9))
    targets[0, :4] = -100
    targets[1, 6] = -100
    logits, loss = model(idx, targets)
    keep = targets != -100
    log_probs = torch.log_softmax(logits.double(), dim=-1)
    expected = -log_probs[keep].gather(-1, targets[keep][:, None]).mean()
    assert_close(loss.double(), expected)
    assert model(idx)[1] is None


def test_tiny_model_overfits_one_batch():
    model = make_model(dtype=torch.float32).train()
    idx = torch.randint(0, 64, (4, 16))
    targets = torch.randint(0, 64, (4, 16))
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
    for _ in range(200):
        _, loss = model(idx, targets)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    assert loss.item() < 0.1


# ----------------------------------------------------------------------------- parameters and init


@pytest.mark.parametrize("tie", [True, False])
def test_num_params_and_flops_match_hand_count(tie):
    V, d, L, H, KV, hd, I, T = 64, 32, 2, 4, 2, 8, 96, 16
    model = make_model(tie_embeddings=tie, qkv_bias=True, inter_dim=I)
    attn = d * H * hd + H * hd + 2 * (d * KV * hd + KV * hd) + H * hd * d
    per_layer = attn + 3 * d * I + 2 * d  # + two RMSNorm gains
    embedding = V * d
    lm_head = 0 if tie else V * d
    total = embedding + L * per_layer + d + lm_head
    assert model.num_params(non_embedding=False) == total
    assert model.num_params() == total - embedding

    matmul_weights = L * (d * H * hd + 2 * d * KV * hd + H * hd * d + 3 * d * I) + V * d  # lm_head always runs
    assert model.estimate_flops() == 6 * matmul_weights + 12 * L * H * hd * T


def test_tied_embeddings_share_storage():
    model = make_model(tie_embeddings=True)
    assert model.lm_head.weight.data_ptr() == model.wte.weight.data_ptr()
    untied = make_model(tie_embeddings=False)
    assert untied.lm_head.weight.data_ptr() != untied.wte.weight.data_ptr()


def test_embedding_has_no_padding_idx():
    model = make_model()
    assert model.wte.padding_idx is None
    _, loss = model(torch.zeros(1, 4, dtype=torch.long), torch.ones(1, 4, dtype=torch.long))
    loss.backward()
    assert model.wte.weight.grad[0].abs().sum() > 0  # a padding_idx row would get no gradient


def test_init_scales_residual_projections():
    model = make_model(dtype=torch.float32, n_layer=8, n_embd=128, n_head=4, qkv_bias=True)
    resid_std = 0.02 / math.sqrt(2 * 8)
    for name, p in model.named_parameters():
        if name.endswith(("wo.weight", "w2.weight")):
            assert abs(p.std().item() - resid_std) < 0.1 * resid_std, name
        elif name.endswith("bias"):
            assert (p == 0).all(), name
        elif p.dim() == 1:
            assert (p == 1).all(), name
        else:
            assert abs(p.std().item() - 0.02) < 0.1 * 0.02, name
