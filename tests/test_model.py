"""Tests of model.py against independent references: float64 math, brute-force attention, uncached forwards,
a per-token reference router. (The comparison with Hugging Face's implementations is in test_export_hf.py.)"""

import math

import pytest
import torch
import torch.nn.functional as F
from types import SimpleNamespace

from model import (
    KVCache,
    ModelConfig,
    MoE,
    RMSNorm,
    RotaryEmbedding,
    Transformer,
    apply_rope,
    attention,
    eager_attention,
    make_attention_mask,
    rope_inv_freq,
    sample_next_token,
    sliding_band,
)

TINY = dict(vocab_size=64, block_size=16, n_layer=2, n_head=4, n_kv_head=2, n_embd=32)
MLA_TINY = dict(attn="mla", q_lora_rank=12, kv_lora_rank=16, qk_nope_head_dim=8, qk_rope_head_dim=4, v_head_dim=6)
MOE_TINY = dict(n_routed_experts=8, n_shared_experts=1, num_experts_per_tok=2, n_group=4, topk_group=2, moe_inter_dim=16)
HYBRID = dict(layer_types=["linear_attention", "full_attention"], linear_num_key_heads=2, linear_num_value_heads=4,
              linear_key_head_dim=6, linear_value_head_dim=5, linear_chunk_size=4)
ARCHS = {"gqa": {}, "mla": MLA_TINY, "moe": MOE_TINY, "mla_moe": {**MLA_TINY, **MOE_TINY},
         # Gated DeltaNet layers (linear_attention.py) beside full ones; the second with MLA and, on the linear
         # layer, MoE; the third linear only.
         "hybrid": HYBRID, "hybrid_mla_moe": {**HYBRID, **MLA_TINY, **MOE_TINY, "layer_types": ["full_attention", "linear_attention"]},
         "linear": {**HYBRID, "layer_types": [], "full_attention_interval": 0},
         # A sliding-window layer (5 keys) before a full one; with MLA too.
         "sliding": dict(layer_types=["sliding_attention", "full_attention"], sliding_window=5),
         "sliding_mla": dict(layer_types=["sliding_attention", "full_attention"], sliding_window=5, **MLA_TINY),
         # DeepSeek Sparse Attention: 4 keys chosen of up to 16.
         "dsa": dict(**MLA_TINY, index_n_heads=4, index_head_dim=8, index_topk=4),
         # MoBA: blocks of 4 keys, each query its own and the best earlier one.
         "moba": dict(moba_chunk_size=4, moba_topk=2),
         # LongCat-Flash: ScMoE's shortcut layers (two attention sublayers each) and its router with 2 zero experts.
         "scmoe": dict(**MLA_TINY, n_routed_experts=6, n_shared_experts=0, num_experts_per_tok=3, zero_expert_num=2,
                       moe_inter_dim=16, scoring_func="softmax", norm_topk_prob=False, routed_scaling_factor=2.0,
                       first_k_dense_replace=0, moe_shortcut=True),
         # The speedrun's levers on GQA: q/k norm, the ReLU^2 MLP, logits capped at 2 (the lively weights exceed it).
         "speedrun": dict(qk_norm=True, hidden_act="relu2", final_logit_softcapping=2.0)}
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


def test_config_gives_experts_the_dense_width_between_them():
    # 3 routed + 1 shared expert of 352 = the dense MLP's 1408: the same active parameters.
    assert ModelConfig(n_embd=512, n_routed_experts=16, num_experts_per_tok=3).moe_inter_dim == 352
    assert ModelConfig(n_routed_experts=16, moe_inter_dim=100).moe_inter_dim == 100


@pytest.mark.parametrize(
    "overrides, field",
    [
        (dict(n_embd=30, n_head=4), "n_embd"),
        (dict(n_head=8, n_kv_head=3), "n_kv_head"),
        (dict(attn_impl="triton"), "attn_impl"),
        (dict(n_embd=12, n_head=4, n_kv_head=4), "head_dim"),
        (dict(n_layer=0), "n_layer"),
        (dict(attn="mqa"), "attn"),
        (dict(attn="mla", qkv_bias=True), "qkv_bias"),
        (dict(attn="mla", qk_rope_head_dim=5), "head_dim"),
        (dict(rope_scaling={"rope_type": "ntk", "factor": 2.0}), "rope_type"),
        (dict(rope_scaling={"rope_type": "yarn", "factor": 2.0}), "original_max_position_embeddings"),
        (dict(rope_scaling={"rope_type": "linear", "factor": 2.0, "beta_fast": 4}), "beta_fast"),
        (dict(rope_scaling={"rope_type": "linear", "factor": 0.5}), "factor"),
        (dict(n_routed_experts=6, n_group=4), "n_group"),
        (dict(n_routed_experts=4, num_experts_per_tok=5), "num_experts_per_tok"),
        (dict(n_routed_experts=8, n_group=4, topk_group=1, num_experts_per_tok=3), "topk_group"),
        (dict(n_routed_experts=8, scoring_func="relu"), "scoring_func"),
        (dict(n_routed_experts=8, first_k_dense_replace=9), "first_k_dense_replace"),
        (dict(n_layer=2, layer_types=["full_attention"]), "layer_types"),
        (dict(n_layer=1, layer_types=["local_attention"]), "layer_types"),
        (dict(n_layer=1, layer_types=["sliding_attention"]), "sliding_window"),
        (dict(full_attention_interval=-1), "full_attention_interval"),
        (dict(full_attention_interval=0, linear_num_key_heads=3, linear_num_value_heads=4), "linear_num_value_heads"),
        (dict(full_attention_interval=0, linear_conv_kernel_dim=1), "linear_conv_kernel_dim"),
        (dict(index_n_heads=4), "index_n_heads"),
        (dict(**{**MLA_TINY, "q_lora_rank": 0}, index_n_heads=4), "q_lora_rank"),
        (dict(**MLA_TINY, index_n_heads=4, index_head_dim=2), "index_head_dim"),
        (dict(**MLA_TINY, index_n_heads=4, index_topk=0), "index_topk"),
        (dict(**MLA_TINY, index_n_heads=4, layer_types=["sliding_attention"] * 2, sliding_window=4), "sliding"),
        (dict(**MLA_TINY, moba_chunk_size=4), "moba_chunk_size"),
        (dict(moba_chunk_size=4, moba_topk=0), "moba_topk"),
    ],
)
def test_config_rejects_bad_values_naming_the_field(overrides, field):
    with pytest.raises(ValueError, match=field):
        ModelConfig(**overrides)


def test_layer_types_default_to_every_interval_th_layer_full_as_qwen3_next():
    assert ModelConfig(n_layer=3).layer_types == ["full_attention"] * 3
    assert ModelConfig(n_layer=8, full_attention_interval=4).layer_types == (["linear_attention"] * 3 + ["full_attention"]) * 2
    linear = ModelConfig(n_layer=2, n_head=8, n_kv_head=2, n_embd=256, full_attention_interval=0)
    assert linear.layer_types == ["linear_attention"] * 2
    assert (linear.linear_num_key_heads, linear.linear_num_value_heads, linear.linear_key_head_dim) == (2, 8, 32)


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
    rope = RotaryEmbedding(hd, theta, {})
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
    rope = RotaryEmbedding(hd, 1e4, {})
    q, k = torch.randn(hd, dtype=torch.float64), torch.randn(hd, dtype=torch.float64)

    def score(m, n):
        cos, sin = rope(torch.tensor([[m, n]]), torch.float64)
        return apply_rope(q, cos[0, 0, 0], sin[0, 0, 0]) @ apply_rope(k, cos[0, 0, 1], sin[0, 0, 1])

    for distance in (0, 3, 11):
        scores = torch.stack([score(n + distance, n) for n in (0, 5, 40)])
        assert_close(scores, scores[:1].expand(3), atol=1e-5, rtol=0)
    assert not torch.isclose(score(3, 0), score(4, 0), atol=1e-3)


@pytest.mark.parametrize("scaling", [
    {"rope_type": "linear", "factor": 4.0},
    {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 1024},
    {"rope_type": "llama3", "factor": 4.0, "original_max_position_embeddings": 1024, "low_freq_factor": 1.0,
     "high_freq_factor": 4.0},
    {"rope_type": "dynamic", "factor": 4.0, "original_max_position_embeddings": 1024},
], ids=lambda s: s["rope_type"])
def test_rope_scaling_keeps_fast_pairs_and_stretches_slow_ones(scaling):
    # What the schemes promise, checked in float64 against rotations over the original length L: the slowest
    # pair (less than one turn over L) turns factor times slower, so position factor * L looks like L did;
    # pairs that turn over 32 times within L (they saw every angle in training) keep their speed under YaRN
    # and llama3, the fastest one under dynamic NTK; linear slows all pairs alike.
    dim, theta, L, factor = 32, 1e4, 1024, 4.0
    plain = theta ** (-torch.arange(0, dim, 2, dtype=torch.float64) / dim)
    rotations = L * plain / (2 * math.pi)
    # Dynamic NTK grows with the sequence: its base is scaled by factor * seq_len / L - (factor - 1), which is
    # the factor itself at this length.
    seq_len = int(L * (2 * factor - 1) / factor)
    ratio = rope_inv_freq(dim, theta, scaling, seq_len).double() / plain
    kind = scaling["rope_type"]
    assert rotations[-1] < 1 and ratio[-1].item() == pytest.approx(1 / factor, rel=1e-5)
    assert ratio[0].item() == pytest.approx(1 / factor if kind == "linear" else 1.0, rel=1e-5)
    if kind in ("yarn", "llama3"):
        fast = rotations > 32
        assert fast.sum() >= 3 and torch.allclose(ratio[fast], torch.ones_like(ratio[fast]), rtol=1e-5, atol=0)
    assert (ratio[1:] <= ratio[:-1] * (1 + 1e-6)).all()  # slower pairs are stretched at least as much
    if kind == "dynamic":  # within the original length, nothing changes
        assert torch.equal(rope_inv_freq(dim, theta, scaling, L), rope_inv_freq(dim, theta, {}))


def test_yarn_scales_cos_and_sin_by_its_temperature():
    scaling = {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 64}
    cos, sin = RotaryEmbedding(16, 1e4, scaling)(torch.arange(10)[None], torch.float64)
    assert_close(cos**2 + sin**2, torch.full_like(cos, (0.1 * math.log(4.0) + 1) ** 2), rtol=1e-6, atol=0)
    # DeepSeek's configs give mscale == mscale_all_dim: cos and sin stay unscaled, the softmax takes it (MLA).
    cos, sin = RotaryEmbedding(16, 1e4, {**scaling, "mscale": 1.0, "mscale_all_dim": 1.0})(torch.arange(10)[None], torch.float64)
    assert_close(cos**2 + sin**2, torch.ones_like(cos), rtol=1e-6, atol=0)


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


@pytest.mark.parametrize("arch", ["gqa", "mla", "moe", "hybrid", "scmoe"])
@pytest.mark.parametrize("impl", ["eager", "sdpa"])
def test_changing_a_future_token_keeps_earlier_logits(impl, arch):
    model = make_model(attn_impl=impl, **ARCHS[arch])
    idx = torch.randint(0, 64, (2, 12))
    changed = idx.clone()
    changed[:, 7] = (idx[:, 7] + 1) % 64
    logits, _ = model(idx)
    logits_changed, _ = model(changed)
    assert_close(logits_changed[:, :7], logits[:, :7])
    assert not torch.allclose(logits_changed[:, 7:], logits[:, 7:])


@pytest.mark.parametrize("arch", [dict(n_kv_head=4, qkv_bias=True), dict(n_kv_head=2, qkv_bias=True),
                                  dict(n_kv_head=1, qkv_bias=True), ARCHS["mla"], ARCHS["mla_moe"]],
                         ids=["gqa_ratio_1", "gqa_ratio_2", "gqa_ratio_4", "mla", "mla_moe"])
@pytest.mark.parametrize("padded", [False, True])
def test_sdpa_matches_eager_logits_and_gradients(arch, padded):
    eager = make_model(attn_impl="eager", **arch)
    sdpa = make_model(attn_impl="sdpa", **arch)
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


@pytest.mark.parametrize("arch", ["gqa", "mla_moe"])
@pytest.mark.parametrize("impl", ["eager", "sdpa"])
def test_padding_rows_output_zeros_and_gradients_stay_finite(impl, arch):
    model = make_model(dtype=torch.float32, attn_impl=impl, **ARCHS[arch]).train()
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


@pytest.mark.parametrize("arch", ["gqa", "mla", "moe", "hybrid", "linear", "sliding", "sliding_mla", "dsa", "moba",
                                  "scmoe"])
@pytest.mark.parametrize("impl", ["eager", "sdpa"])
def test_left_padded_rows_match_unpadded_rows(impl, arch):
    model = make_model(attn_impl=impl, **ARCHS[arch])
    rows, idx, mask = left_padded_batch()
    logits, _ = model(idx, attention_mask=mask)
    for b, row in enumerate(rows):
        alone, _ = model(row[None])
        assert_close(logits[b, mask[b] == 1], alone[0])


def test_soft_capped_logits_are_the_capped_function_of_the_uncapped_ones():
    capped = lively_model(**ARCHS["speedrun"])
    plain = lively_model(**{**ARCHS["speedrun"], "final_logit_softcapping": 0.0})
    plain.load_state_dict(capped.state_dict())
    idx = torch.randint(0, 64, (2, 12))
    logits, _ = plain(idx)
    assert logits.abs().max() > 2.0  # the cap acts
    assert_close(capped(idx)[0], 2.0 * torch.tanh(logits / 2.0))


def test_zero_initialised_residual_branches_make_every_block_the_identity():
    model = make_model(zero_init_residual=True, **ARCHS["speedrun"])
    assert all(p.abs().max() == 0 for n, p in model.named_parameters() if n.endswith(("wo.weight", "w2.weight")))
    idx = torch.randint(0, 64, (2, 12))
    assert_close(model(idx)[0], model.head(model.norm(model.wte(idx))), rtol=0, atol=0)


# ----------------------------------------------------------------------------- KV cache and generation


@pytest.mark.parametrize("impl", ["eager", "sdpa"])
@pytest.mark.parametrize("chunks", [[4, 1, 1, 1, 1, 1, 1], [6, 4]], ids=["token_by_token", "two_chunks"])
@pytest.mark.parametrize("padded", [False, True])
@pytest.mark.parametrize("arch", ["gqa", "mla", "mla_moe", "hybrid", "hybrid_mla_moe", "linear", "sliding", "sliding_mla",
                                  "dsa", "moba", "scmoe", "speedrun"])
def test_cached_logits_match_uncached(impl, chunks, padded, arch):
    # For MLA this is the absorbed path (latent cache) against the naive one (no cache).
    model = lively_model(attn_impl=impl, **ARCHS[arch])
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
    # RMSNorm normalises in float32 even in a float64 model, so the two paths agree to float32 precision.
    assert_close(torch.cat(pieces, dim=1), expected, rtol=1e-5, atol=1e-5)


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
@pytest.mark.parametrize("arch", ["gqa", "mla_moe", "hybrid_mla_moe", "sliding_mla", "dsa", "moba", "scmoe"])
def test_greedy_generate_matches_uncached_forwards_past_block_size(impl, prompt_len, arch):
    model = lively_model(attn_impl=impl, **ARCHS[arch])
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
    # Past it too: padding never counts against block_size, and each row restarts its window when its own
    # cache is full, so every row of the padded batch still continues exactly as it does alone.
    got = torch.stack(list(model.generate(idx, 25, temperature=0, attention_mask=mask)), dim=1)
    for b, row in enumerate(rows):
        alone = torch.stack(list(model.generate(row[None], 25, temperature=0)), dim=1)[0]
        assert torch.equal(got[b], alone), b
        assert_close(got[b], greedy_with_uncached_forwards(model, row[None], 25)[0])


def test_generate_refuses_an_empty_prompt_with_a_sentence():
    model = lively_model()
    with pytest.raises(ValueError, match="at least one real prompt token in every row"):
        next(model.generate(torch.zeros(2, 0, dtype=torch.long), 3))
    with pytest.raises(ValueError, match="at least one real prompt token in every row"):
        next(model.generate(torch.ones(2, 3, dtype=torch.long), 3, attention_mask=torch.tensor([[1, 1, 1], [0, 0, 0]])))


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


# ----------------------------------------------------------------------------- MLA


@pytest.mark.parametrize("q_lora_rank", [0, 12])
@pytest.mark.parametrize("impl", ["eager", "sdpa"])
def test_mla_absorbed_path_matches_naive_path(impl, q_lora_rank):
    # The same attention layer on the same left-padded batch: without a cache (naive: per-head keys and values
    # expanded from the latent) and prefilled into a fresh cache (absorbed: attention over the latents).
    model = lively_model(attn_impl=impl, **{**MLA_TINY, "q_lora_rank": q_lora_rank})
    _, idx, mask = left_padded_batch()
    outputs = []
    model.layers[1].attn.register_forward_hook(lambda module, args, out: outputs.append(out))
    model(idx, attention_mask=mask)
    model(idx, attention_mask=mask, kv_cache=KVCache(model.config, idx.size(0), model.config.block_size))
    naive, absorbed = outputs
    assert_close(absorbed, naive)
    assert naive.abs().mean() > 0.1


# 2 kv heads of 8 (k and v); the latent and the rope key; and DSA's index key
@pytest.mark.parametrize("arch, per_layer", [("gqa", 2 * 2 * 8), ("mla", 16 + 4), ("dsa", 16 + 4 + 8)])
def test_kv_cache_holds_bytes_per_token(arch, per_layer):
    model = make_model(dtype=torch.float32, **ARCHS[arch])
    cache = KVCache(model.config, 3, 16)
    model(torch.randint(0, 64, (3, 5)), kv_cache=cache)
    stored = sum(t.numel() * t.element_size() for t in cache.tensors) / (3 * 16)
    assert stored == KVCache.bytes_per_token(model.config) == 2 * per_layer * 4  # 2 layers, float32


def test_a_hybrid_caches_keys_for_its_full_layers_and_a_fixed_state_for_its_linear_ones():
    model = make_model(dtype=torch.float32, **ARCHS["hybrid"])  # layer 0 linear, layer 1 full
    sizes = []
    for n in (3, 12):
        cache = KVCache(model.config, 2, 16)
        model(torch.randint(0, 64, (2, n)), kv_cache=cache)
        stored = sum(t.numel() * t.element_size() for t in cache.tensors) / (2 * 16)
        assert stored == KVCache.bytes_per_token(model.config) == 2 * 2 * 8 * 4  # one full layer's k and v
        sizes.append(sum(t.numel() * t.element_size() for t in cache.linear_states[0]) / 2)
    # The conv keeps 3 inputs of q, k (2 heads of 6) and v (4 heads of 5); S is 4 heads of 6 x 5 in float32.
    assert sizes[0] == sizes[1] == KVCache.bytes_per_sequence(model.config) == (3 * (2 * 12 + 20) + 4 * 6 * 5) * 4


@pytest.mark.parametrize("impl", ["eager", "sdpa", "flash"])
@pytest.mark.parametrize("arch", ["gqa", "mla"])
def test_a_sliding_layer_attends_to_its_window_only(impl, arch):
    # One sliding layer: position i sees tokens i - 4 .. i, so changing token t moves no logit past t + 4, and the
    # layer's output is softmax attention over exactly those keys (a float64 brute force).
    model = make_model(n_layer=1, layer_types=["sliding_attention"], sliding_window=5, attn_impl=impl, **ARCHS[arch],
                       dtype=torch.float32 if impl == "flash" else torch.float64)
    idx = torch.randint(0, 64, (2, 16))
    changed = idx.clone()
    changed[:, 3] = (idx[:, 3] + 1) % 64
    logits, changed_logits = model(idx)[0], model(changed)[0]
    assert_close(changed_logits[:, 8:], logits[:, 8:])
    assert (changed_logits[:, 3:8] - logits[:, 3:8]).abs().max() > 1e-3
    if arch == "gqa":
        attn = model.layers[0].attn
        x = model.layers[0].attn_norm(model.wte(idx)).double()
        q = (x @ attn.wq.weight.double().T).view(2, 16, 4, 8).transpose(1, 2)
        k = (x @ attn.wk.weight.double().T).view(2, 16, 2, 8).transpose(1, 2).repeat_interleave(2, dim=1)
        v = (x @ attn.wv.weight.double().T).view(2, 16, 2, 8).transpose(1, 2).repeat_interleave(2, dim=1)
        cos, sin = model.rope(torch.arange(16)[None], torch.float64)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        i, j = torch.arange(16)[:, None], torch.arange(16)[None, :]
        scores = (q @ k.transpose(-1, -2) / 8 ** 0.5).masked_fill(~((j <= i) & (j > i - 5)), float("-inf"))
        expected = (scores.softmax(-1) @ v).transpose(1, 2).reshape(2, 16, 32) @ attn.wo.weight.double().T
        rope = model.rope(torch.arange(16)[None].expand(2, -1), model.wte.weight.dtype)
        got = attn(model.layers[0].attn_norm(model.wte(idx)), rope, None, None).double()
        assert_close(got, expected, rtol=0, atol=1e-4 if impl == "flash" else 1e-6)  # eager: softmax in float32


@pytest.mark.parametrize("impl, with_sinks", [("sdpa", False), ("eager", False), ("eager", True)])
def test_a_window_computed_chunk_by_chunk_equals_the_band_mask_over_the_whole_sequence(impl, with_sinks):
    g = torch.Generator().manual_seed(11)
    q, k, v = (torch.randn(2, heads, 100, 8, dtype=torch.float64, generator=g, requires_grad=True) for heads in (4, 2, 2))
    sinks = torch.randn(4, dtype=torch.float64, generator=g, requires_grad=True) if with_sinks else None
    chunked = attention(q, k, v, None, impl, window=16, sinks=sinks)  # 100 > 2 * 16: seven chunks of queries
    banded = attention(q, k, v, make_attention_mask(torch.ones(2, 100, dtype=torch.bool), 100), impl, window=16,
                       sinks=sinks)
    assert_close(chunked, banded, rtol=1e-12, atol=1e-12)
    inputs = [q, k, v] + ([sinks] if with_sinks else [])
    for got, want in zip(torch.autograd.grad(chunked.square().sum(), inputs), torch.autograd.grad(banded.square().sum(), inputs)):
        assert_close(got, want, rtol=1e-12, atol=1e-12)


def test_sink_logits_compute_what_gpt_oss_eager_attention_computes():
    from transformers.models.gpt_oss.modeling_gpt_oss import eager_attention_forward

    g = torch.Generator().manual_seed(0)
    q, k, v = torch.randn(2, 4, 9, 8, generator=g), torch.randn(2, 2, 9, 8, generator=g), torch.randn(2, 2, 9, 8, generator=g)
    sinks = torch.randn(4, generator=g) * 2
    allowed = torch.ones(9, 9, dtype=torch.bool).tril() & sliding_band(9, 9, 4, "cpu")  # a window too, as gpt-oss has
    additive = torch.zeros(9, 9).masked_fill(~allowed, float("-inf"))[None, None]
    theirs, _ = eager_attention_forward(SimpleNamespace(num_key_value_groups=2, sinks=sinks, training=False), q, k, v,
                                        additive, scaling=8 ** -0.5)
    ours = eager_attention(q, k, v, allowed[None, None], 0.0, 8 ** -0.5, sinks)
    assert_close(ours.transpose(1, 2), theirs, rtol=0, atol=1e-6)
    # The weights on the keys sum to less than one: the sink took the rest (an all-equal v would show it).
    plain = eager_attention(q, k, torch.ones_like(v), allowed[None, None], 0.0, 8 ** -0.5, sinks)
    assert (plain < 1).all() and (plain > 0).all()


def test_sinks_on_the_triton_kernel_compute_what_eager_computes():
    # The kernel (in its interpreter) against eager attention, logits and every gradient, the sinks' included.
    models = [lively_model(attn_impl=impl, attention_sinks=True, dtype=torch.float32, **ARCHS["sliding"])
              for impl in ("flash", "eager")]
    for model in models:
        with torch.no_grad():
            for block in model.layers:
                block.attn.sinks.normal_(0.0, 2.0, generator=torch.Generator().manual_seed(3))
    idx = torch.randint(0, 64, (2, 16))
    (logits, loss), (expected, expected_loss) = (model(idx, idx) for model in models)
    assert_close(logits, expected, rtol=0, atol=1e-4)
    loss.backward()
    expected_loss.backward()
    for (name, p), q in zip(models[0].named_parameters(), models[1].parameters()):
        assert_close(p.grad, q.grad, rtol=0, atol=1e-4, msg=name)


@pytest.mark.parametrize("impl", ["eager", "sdpa"])
def test_a_model_with_sinks_caches_pads_and_learns_its_sink_logits(impl):
    model = lively_model(attn_impl=impl, attention_sinks=True, **ARCHS["sliding"])
    _, idx, mask = left_padded_batch()
    logits, _ = model(idx, attention_mask=mask)
    cache = KVCache(model.config, idx.size(0), model.config.block_size)
    cached = torch.cat([model(idx[:, :6], attention_mask=mask[:, :6], kv_cache=cache)[0],
                        model(idx[:, 6:], attention_mask=mask[:, 6:], kv_cache=cache)[0]], dim=1)
    real = mask.bool()
    assert_close(cached[real], logits[real])
    _, loss = model(idx[:, :-1].clamp(min=0), idx[:, 1:])
    loss.backward()
    assert all(block.attn.sinks.grad.abs().sum() > 0 for block in model.layers)


@pytest.mark.parametrize("arch", ["sliding", "sliding_mla"])
def test_a_sliding_layer_caches_only_its_window(arch):
    model = make_model(dtype=torch.float32, **ARCHS[arch])  # layer 0 sliding (window 5), layer 1 full
    for n in (3, 12):
        cache = KVCache(model.config, 2, 16)
        model(torch.randint(0, 64, (2, n)), kv_cache=cache)
        full = sum(t.numel() * t.element_size() for t in cache.tensors) / (2 * 16)
        kept = sum(t.numel() * t.element_size() for t in cache.rolling[0]) / 2
        assert full == KVCache.bytes_per_token(model.config) == KVCache.bytes_per_position(model.config)
        assert kept == KVCache.bytes_per_sequence(model.config) == 4 * KVCache.bytes_per_position(model.config)


# ----------------------------------------------------------------------------- DeepSeek Sparse Attention


def test_dsa_with_topk_at_least_the_keys_is_dense_mla_exactly():
    dense = lively_model(**MLA_TINY)
    indexed = lively_model(**{**ARCHS["dsa"], "index_topk": 16})
    missing, unexpected = indexed.load_state_dict(dense.state_dict(), strict=False)
    assert not unexpected and missing and all(".indexer." in name for name in missing)
    idx = torch.randint(0, 64, (2, 16), generator=torch.Generator().manual_seed(3))
    assert torch.equal(indexed(idx)[0], dense(idx)[0])
    cache = KVCache(indexed.config, 2, 16)  # cached, every key is chosen: the absorbed form over all of them
    assert_close(torch.cat([indexed(idx[:, :9], kv_cache=cache)[0]] + [indexed(idx[:, t:t + 1], kv_cache=cache)[0]
                                                                      for t in range(9, 16)], dim=1), dense(idx)[0])


def reference_top_k(scores, k):
    """(B, T, S) float64 -> which keys each query reads (B, 1, T, S): the k best among its causal keys, ties to the
    later key, by a stable sort of the keys in reverse order."""
    T, S = scores.shape[-2:]
    causal = torch.ones(T, S, dtype=torch.bool).tril(S - T)
    ranked = scores.masked_fill(~causal, float("-inf")).flip(-1).sort(dim=-1, descending=True, stable=True).indices
    chosen = torch.zeros_like(scores, dtype=torch.bool).scatter(-1, S - 1 - ranked[..., :k], True)
    return (chosen & causal)[:, None]


def test_dsa_attends_to_the_indexers_top_k_only_and_its_kl_is_the_papers():
    # The layer against float64 dense attention under the explicit mask of the chosen keys, forward and gradients,
    # and the indexer's loss against KL(mean attention over heads || softmax of the index scores) over those keys.
    model = lively_model(**ARCHS["dsa"]).train()
    mla, rope = model.layers[0].attn, model.rope(torch.arange(12)[None].expand(2, -1), torch.float64)
    x = torch.randn(2, 12, 32, dtype=torch.float64, generator=torch.Generator().manual_seed(4), requires_grad=True)
    y = mla(x, rope, None, None)
    q_in = mla.q_norm(mla.wq_a(x))
    scores = mla.indexer(x, q_in, rope, mla.indexer.keys(x, rope))  # (B, T, S)
    chosen = reference_top_k(scores.detach(), 4)
    q = mla.wq_b(q_in).view(2, 12, 4, 12).transpose(1, 2)
    q_nope, q_rope = q.split([8, 4], dim=-1)
    latent, k_rope = mla.wkv_a(x).split([16, 4], dim=-1)
    q, k, v = mla.expand_heads(q_nope, apply_rope(q_rope, *rope), mla.kv_norm(latent), apply_rope(k_rope[:, None], *rope))
    probs = ((q @ k.transpose(-2, -1)) * mla.scale).masked_fill(~chosen, float("-inf")).softmax(dim=-1)
    expected = mla.wo((probs @ v).transpose(1, 2).reshape(2, 12, -1))
    assert_close(y, expected, rtol=1e-10, atol=1e-12)
    params = [x, mla.wq_a.weight, mla.wkv_a.weight, mla.wkv_b.weight, mla.wo.weight]
    for got, want in zip(torch.autograd.grad(y.square().sum(), params), torch.autograd.grad(expected.square().sum(), params)):
        assert_close(got, want, rtol=1e-10, atol=1e-12)
    p = probs.mean(dim=1).detach()  # (B, T, S), zero off the chosen keys
    log_q = scores.masked_fill(~chosen[:, 0], float("-inf")).log_softmax(dim=-1)
    kl = torch.where(chosen[:, 0], p * (p.clamp(min=1e-300).log() - log_q), 0.0).sum(-1).mean()
    assert_close(mla.indexer_loss, kl, rtol=1e-10, atol=1e-12)
    assert kl > 1e-3  # an untrained indexer disagrees with attention


def test_dsa_indexer_learns_only_from_its_kl_and_the_rest_only_from_the_language_loss():
    model = lively_model(**ARCHS["dsa"]).train()
    idx = torch.randint(0, 64, (2, 16), generator=torch.Generator().manual_seed(5))
    logits, loss = model(idx[:, :-1], idx[:, 1:])
    indexer = [p for n, p in model.named_parameters() if ".indexer." in n]
    rest = [p for n, p in model.named_parameters() if ".indexer." not in n]
    language = F.cross_entropy(logits.flatten(0, 1), idx[:, 1:].flatten())
    assert_close(loss, language + model.indexer_kl())  # both layers' KL, added to the loss
    assert all(g is None for g in torch.autograd.grad(language, indexer, retain_graph=True, allow_unused=True))
    assert all(g is None for g in torch.autograd.grad(model.indexer_kl(), rest, retain_graph=True, allow_unused=True))
    assert all(g.abs().sum() > 0 for g in torch.autograd.grad(model.indexer_kl(), indexer))


def test_dsa_warmup_attends_densely_and_teaches_the_indexer_the_dense_attention():
    dense = lively_model(**MLA_TINY)
    model = lively_model(**ARCHS["dsa"]).train()
    model.load_state_dict(dense.state_dict(), strict=False)
    for layer in model.indexed_layers():
        layer.warmup = True
    idx = torch.randint(0, 64, (2, 16), generator=torch.Generator().manual_seed(6))
    assert torch.equal(model(idx)[0], dense.train()(idx)[0])
    mla = model.layers[1].attn
    before = mla.indexer_loss.item()
    optimizer = torch.optim.Adam(mla.indexer.parameters(), lr=3e-2)
    for _ in range(30):
        model(idx)
        optimizer.zero_grad()
        mla.indexer_loss.backward()
        optimizer.step()
    assert mla.indexer_loss.item() < 0.5 * before


# ----------------------------------------------------------------------------- MoBA


def reference_moba_mask(q, k, chunk, topk):
    """(B, n_head, T, T) bool, MoBA's choice query by query: its own block, and the topk - 1 earlier blocks of
    highest q . mean key, causally. q (B, n_head, T, d), k (B, n_kv_head, T, d), no padding."""
    B, H, T, _ = q.shape
    k = k.repeat_interleave(H // k.size(1), dim=1)
    allowed = torch.zeros(B, H, T, T, dtype=torch.bool)
    for b, h, i in ((b, h, i) for b in range(B) for h in range(H) for i in range(T)):
        own = i // chunk
        gates = [float(q[b, h, i] @ k[b, h, c * chunk:(c + 1) * chunk].mean(dim=0)) for c in range(own)]
        for c in [own] + sorted(range(own), key=lambda c: -gates[c])[:topk - 1]:
            allowed[b, h, i, c * chunk:min((c + 1) * chunk, i + 1)] = True
    return allowed


def test_moba_attends_to_its_own_block_and_the_best_earlier_ones():
    model = lively_model(moba_chunk_size=4, moba_topk=3)  # blocks of 4: of 15 positions, 4 blocks, 3 of them chosen
    attn, T = model.layers[0].attn, 15
    x = torch.randn(2, T, 32, dtype=torch.float64, generator=torch.Generator().manual_seed(8), requires_grad=True)
    rope = model.rope(torch.arange(T)[None].expand(2, -1), torch.float64)
    blocks = torch.arange(T).expand(2, -1) // 4
    y = attn(x, rope, None, None, (blocks, blocks))
    q = apply_rope(attn.wq(x).view(2, T, 4, 8).transpose(1, 2), *rope)
    k = apply_rope(attn.wk(x).view(2, T, 2, 8).transpose(1, 2), *rope)
    v = attn.wv(x).view(2, T, 2, 8).transpose(1, 2).repeat_interleave(2, dim=1)
    allowed = reference_moba_mask(q.detach(), k.detach(), 4, 3)
    assert allowed.sum() < torch.ones(T, T).tril().sum() * 2 * 4  # some blocks left out
    scores = (q @ k.repeat_interleave(2, dim=1).transpose(-2, -1) / math.sqrt(8)).masked_fill(~allowed, float("-inf"))
    expected = attn.wo((scores.softmax(dim=-1) @ v).transpose(1, 2).reshape(2, T, -1))
    assert_close(y, expected, rtol=1e-10, atol=1e-12)
    params = [x, attn.wq.weight, attn.wk.weight, attn.wv.weight]
    for got, want in zip(torch.autograd.grad(y.square().sum(), params), torch.autograd.grad(expected.square().sum(), params)):
        assert_close(got, want, rtol=1e-10, atol=1e-12)


def test_moba_choosing_every_block_is_causal_attention():
    moba, dense = lively_model(moba_chunk_size=4, moba_topk=4), lively_model()
    idx = torch.randint(0, 64, (2, 16), generator=torch.Generator().manual_seed(9))
    assert_close(moba(idx)[0], dense(idx)[0], rtol=1e-12, atol=1e-12)


def test_moba_on_the_triton_kernel_walks_only_the_chosen_tiles_and_computes_what_eager_computes():
    # Blocks of 16 (the kernel's tiles), 48 positions: each query its own block and the better of the earlier ones.
    config = dict(block_size=48, moba_chunk_size=16, moba_topk=2)
    flash, eager = (lively_model(**config, attn_impl=impl).float().train() for impl in ("flash", "eager"))
    idx = torch.randint(0, 64, (2, 48), generator=torch.Generator().manual_seed(10))
    results = []
    for model in (flash, eager):
        logits, loss = model(idx, idx)
        results.append((logits, torch.autograd.grad(loss, list(model.parameters()))))
    assert_close(results[0][0], results[1][0], rtol=0, atol=1e-5)
    for got, want in zip(results[0][1], results[1][1]):
        assert_close(got, want, rtol=0, atol=1e-5)


def test_packed_documents_are_refused_with_linear_layers():
    model = make_model(**ARCHS["hybrid"])
    with pytest.raises(ValueError, match="per-document reset"):
        model(torch.randint(0, 64, (1, 8)), doc_ids=torch.zeros(1, 8, dtype=torch.long))


# ----------------------------------------------------------------------------- MoE


def reference_route(scores, bias, k, n_group, topk_group):
    """DeepSeek-V3's routing, one token at a time, as the paper states it: biased scores choose the groups (each
    scored by its two best experts) and then the experts; the unbiased scores of the chosen weigh them."""
    per_group = scores.size(1) // n_group
    routes = []
    for s in scores.tolist():
        biased = [x + b for x, b in zip(s, bias.tolist())]
        group_score = [sum(sorted(biased[g * per_group : (g + 1) * per_group])[-2:]) for g in range(n_group)]
        groups = sorted(range(n_group), key=lambda g: -group_score[g])[:topk_group]
        candidates = [e for g in groups for e in range(g * per_group, (g + 1) * per_group)]
        chosen = sorted(candidates, key=lambda e: -biased[e])[:k]
        routes.append({e: s[e] / sum(s[c] for c in chosen) for e in chosen})
    return routes


def moe_layer(seed=0, **overrides):
    torch.manual_seed(seed)
    config = ModelConfig(**{**TINY, **MOE_TINY, "first_k_dense_replace": 0, **overrides})
    moe = MoE(config).double()
    for p in moe.parameters():
        torch.nn.init.normal_(p, std=0.3)
    torch.nn.init.normal_(moe.gate.bias, std=0.1)
    return moe


@pytest.mark.parametrize("n_group, topk_group, scoring_func", [(1, 1, "sigmoid"), (4, 2, "sigmoid"), (2, 1, "softmax")])
def test_moe_routes_and_mixes_like_a_per_token_reference(n_group, topk_group, scoring_func):
    moe = moe_layer(n_group=n_group, topk_group=topk_group, scoring_func=scoring_func, routed_scaling_factor=2.5).train()
    x = torch.randn(3, 7, 32, dtype=torch.float64)
    y = moe(x)
    logits = x.view(-1, 32) @ moe.gate.weight.t()
    scores = logits.sigmoid() if scoring_func == "sigmoid" else logits.softmax(dim=-1)
    routes = reference_route(scores, moe.gate.bias, 2, n_group, topk_group)
    expected_load = torch.zeros(8, dtype=torch.float64)
    expected = []
    for token, route in zip(x.view(-1, 32), routes):
        for e in route:
            expected_load[e] += 1
        routed = sum(2.5 * w * moe.experts[str(e)](token) for e, w in route.items())
        expected.append(routed + moe.shared_experts(token))
    assert torch.equal(moe.gate.load, expected_load)
    assert_close(y.view(-1, 32), torch.stack(expected))


def test_zero_experts_pass_their_tokens_through_weighted_as_longcat_routes():
    # LongCat-Flash's router: a softmax over 8 routed and 4 zero experts, the top 3 of the biased scores, weighted
    # by their unnormalised scores times the scale. A zero expert's output is its token itself.
    moe = moe_layer(n_group=1, topk_group=1, scoring_func="softmax", norm_topk_prob=False, zero_expert_num=4,
                    num_experts_per_tok=3, routed_scaling_factor=2.0, n_shared_experts=0).train()
    x = torch.randn(3, 7, 32, dtype=torch.float64)
    y = moe(x)
    scores = (x.view(-1, 32) @ moe.gate.weight.t()).softmax(dim=-1)  # (21, 12)
    expected, chosen_zero, chosen_routed = [], 0, 0
    for token, s in zip(x.view(-1, 32), scores):
        chosen = (s + moe.gate.bias).topk(3).indices.tolist()
        chosen_zero += sum(e >= 8 for e in chosen)
        chosen_routed += sum(e < 8 for e in chosen)
        expected.append(sum(2.0 * s[e] * (moe.experts[str(e)](token) if e < 8 else token) for e in chosen))
    assert chosen_zero > 0 and chosen_routed > 0
    assert_close(y.view(-1, 32), torch.stack(expected))
    assert moe.gate.load.sum() == 21 * 3 and moe.gate.load[8:].sum() == chosen_zero


def test_expert_bias_is_a_buffer_that_stays_put():
    # The seed project re-wrapped its bias as a new Parameter in every forward, so no update ever stuck.
    moe = moe_layer().train()
    bias = moe.gate.bias
    before = bias.clone()
    assert "gate.bias" in dict(moe.named_buffers()) and "gate.bias" in moe.state_dict()
    assert all(p is not bias for p in moe.parameters())
    moe(torch.randn(2, 5, 32, dtype=torch.float64)).sum().backward()
    moe.gate.update_bias(moe.gate.load)
    moe(torch.randn(2, 5, 32, dtype=torch.float64))
    assert moe.gate.bias is bias and bias.grad is None
    assert_close((bias - before).abs().max(), torch.tensor(1e-3, dtype=torch.float64))  # moved by the rate
    assert (moe.gate.load > 0).any() and moe.gate.load.sum() == 2 * 5 * 2  # counts restarted after the update


def test_bias_update_moves_a_skewed_router_toward_balance():
    moe = moe_layer(n_group=1, topk_group=1, bias_update_rate=0.01).train()
    torch.nn.init.zeros_(moe.gate.bias)
    with torch.no_grad():
        moe.gate.weight[:2, 0] += 3.0  # experts 0 and 1 outscore the rest on every token whose x[0] is large
    imbalance = []
    for step in range(100):
        x = torch.randn(4, 32, 32, dtype=torch.float64)
        x[..., 0] += 2
        moe(x)
        load = moe.gate.load.clone()
        imbalance.append((load.max() / load.mean()).item())  # 1 = perfectly even, 4 = all tokens on experts 0, 1
        moe.gate.update_bias(load)
    assert imbalance[0] > 3
    assert sum(imbalance[-20:]) / 20 < 1.6
    assert moe.gate.bias[:2].max() < moe.gate.bias[2:].min()


def test_expert_without_tokens_gets_zero_gradients_and_no_nan():
    model = make_model(dtype=torch.float32, **MOE_TINY, first_k_dense_replace=0).train()
    for moe in model.moe_layers():
        moe.gate.bias[3] = -100.0  # expert 3 is never chosen
    idx = torch.randint(0, 64, (2, 12))
    _, loss = model(idx, idx)
    loss.backward()
    assert torch.isfinite(loss)
    for moe in model.moe_layers():
        assert moe.gate.load[3] == 0 and moe.gate.load.sum() == 2 * 12 * 2
        for name, p in moe.experts["3"].named_parameters():
            assert p.grad is not None and (p.grad == 0).all(), name  # zeros, so an all-reduce has a tensor to send
    for name, p in model.named_parameters():
        assert torch.isfinite(p.grad).all(), name


def test_sequence_balance_loss_matches_the_paper_and_enters_the_loss():
    # DeepSeek-V3 eq. 17-20 for one sequence of T tokens: sum_i f_i P_i, f_i = E / (k T) * (tokens choosing i),
    # P_i = mean over tokens of s_i / sum_j s_j.
    model = make_model(**MOE_TINY, first_k_dense_replace=0, balance_loss_coef=0.01).train()
    idx = torch.randint(0, 64, (3, 10))
    routing = []
    for moe in model.moe_layers():
        moe.gate.register_forward_hook(lambda module, args, out: routing.append(out))
    _, loss = model(idx, idx)
    expected = 0.0
    for (_, experts, scores), moe in zip(routing, model.moe_layers()):
        per_sequence = []
        for b in range(3):
            chosen, s = experts.view(3, 10, 2)[b], scores.view(3, 10, 8)[b]
            f = [8 / (2 * 10) * (chosen == i).sum().item() for i in range(8)]
            p = [(s[:, i] / s.sum(dim=1)).mean() for i in range(8)]
            per_sequence.append(sum(fi * pi for fi, pi in zip(f, p)))
        assert_close(moe.balance_loss, sum(per_sequence) / 3)
        expected = expected + moe.balance_loss
    model.eval()
    _, plain = model(idx, idx)
    assert_close(loss, plain + 0.01 * expected)


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


def test_num_params_and_flops_of_mla_and_moe_match_hand_count():
    V, d, L, H, I, T, E, k, M = 64, 32, 2, 4, 96, 16, 8, 2, 16
    model = make_model(**MLA_TINY, **MOE_TINY, inter_dim=I)  # layer 0 dense, layer 1 MoE
    q, rank, nope, rope, v = 12, 16, 8, 4, 6
    attn = d * q + q + q * H * (nope + rope) + d * (rank + rope) + rank + rank * H * (nope + v) + H * v * d
    expert = 3 * d * M
    moe = E * d + E * expert + expert  # gate, 8 routed experts, 1 shared
    total = V * d + L * (attn + 2 * d) + 3 * d * I + moe + d
    assert model.num_params(non_embedding=False) == total
    assert model.num_params(active=True) == total - V * d - (E - k) * expert

    attn_matmuls = attn - q - rank  # without the two norm gains
    matmuls = L * attn_matmuls + 3 * d * I + E * d + (k + 1) * expert + V * d
    assert model.estimate_flops() == 6 * matmuls + 6 * L * H * ((nope + rope) + v) * T


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


@pytest.mark.parametrize("packed", [False, True])
def test_flash_matches_sdpa_loss_and_gradients(packed):
    # Our Triton kernel (Triton's interpreter on a CPU) against PyTorch's SDPA, inside the whole model, with GQA;
    # packed: rows of several documents (the kernel's doc_ids against sdpa's explicit mask).
    idx = torch.randint(0, 64, (2, 16), generator=torch.Generator().manual_seed(0))
    doc_ids = torch.tensor([[0] * 5 + [1] * 9 + [2] * 2, [0] * 16]) if packed else None
    results = []
    for impl in ("sdpa", "flash"):
        model = make_model(dtype=torch.float32, attn_impl=impl).train()
        _, loss = model(idx, idx.roll(-1, dims=1), doc_ids=doc_ids)
        loss.backward()
        results.append((loss.detach(), {name: p.grad for name, p in model.named_parameters()}))
    (sdpa_loss, sdpa_grads), (flash_loss, flash_grads) = results
    assert_close(flash_loss, sdpa_loss, rtol=1e-5, atol=1e-5)
    for name, grad in sdpa_grads.items():
        assert_close(flash_grads[name], grad, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("impl", ["eager", "sdpa", "flash"])
@pytest.mark.parametrize("arch", ["gqa", "mla_moe", "scmoe"])
def test_packed_documents_compute_what_each_computes_alone(impl, arch):
    # The Triton kernel (in its interpreter) takes float32, the other backends run this in float64.
    model = lively_model(attn_impl=impl, dtype=torch.float32 if impl == "flash" else torch.float64, **ARCHS[arch])
    tol = 1e-4 if impl == "flash" else 1e-5
    lengths = [[5, 9, 2], [16], [1, 7, 8]]  # documents packed one after another into rows of 16
    gen = torch.Generator().manual_seed(3)
    idx = torch.randint(0, 64, (3, 16), generator=gen)
    doc_ids = torch.tensor([sum(([d] * n for d, n in enumerate(row)), []) for row in lengths])
    targets = torch.randint(0, 64, (3, 16), generator=gen)
    targets[0, :5] = -100  # positions without a target (a prompt) are left out of the mean
    packed, loss = model(idx, targets, doc_ids=doc_ids)
    nats = []
    for b, row in enumerate(lengths):
        start = 0
        for n in row:
            alone, _ = model(idx[b:b + 1, start:start + n])
            # Softmax runs in float32 even in a float64 model, over rows of other lengths: hence 1e-5. A token
            # that saw another document would differ by far more in this model, whose every logit uses its context.
            assert_close(packed[b, start:start + n], alone[0], atol=tol, rtol=tol)
            kept = targets[b, start:start + n] != -100
            nats.append(F.cross_entropy(alone[0][kept].double(), targets[b, start:start + n][kept], reduction="sum"))
            start += n
    assert_close(loss.double(), torch.stack(nats).sum() / (targets != -100).sum(), atol=tol, rtol=tol)
    with pytest.raises(ValueError, match="doc_ids is for packed training windows"):
        model(idx, doc_ids=doc_ids, attention_mask=torch.ones_like(idx))


# ---- multi-token prediction (DeepSeek-V3 section 2.2) and self-speculative decoding ---------------------------------

def test_mtp_loss_is_deepseeks_chain_computed_position_by_position():
    # The reference runs each module on every prefix separately: h^k_i from the prefix of positions 0..i of h^{k-1}
    # and of the embeddings of tokens 1+k-1 .. i+k, its logits scored on token i + k + 1. Any look past i, any
    # misaligned shift or target, would differ.
    torch.manual_seed(0)
    model = Transformer(ModelConfig(**TINY, mtp_depth=2, mtp_loss_weight=0.25)).double().train()
    idx, targets = torch.randint(0, 64, (2, 9)), torch.randint(0, 64, (2, 9))
    targets[0, 6] = -100  # an ignored target inside a depth's span
    logits, loss, h = model(idx, targets, hidden=True)
    T, ces = idx.size(1), []
    for k, module in enumerate(model.mtp, start=1):
        rows = []
        for i in range(T - k):
            positions = torch.arange(i + 1).expand(2, -1)
            rows.append(module(h[:, :i + 1], model.wte(idx[:, k:k + i + 1]), model.rope(positions, h.dtype), None,
                               None)[:, -1])
        h = torch.stack(rows, dim=1)  # (B, T - k, n_embd)
        ces.append(F.cross_entropy(model.lm_head(module.norm(h)).flatten(0, 1), targets[:, k:].flatten(),
                                   ignore_index=-100))
    expected = sum(ces) / 2  # (the model's cross-entropies are taken in float32, as every loss of it)
    torch.testing.assert_close(model.mtp_ce.double(), expected, rtol=0, atol=1e-6)
    main = F.cross_entropy(logits.float().flatten(0, 1), targets.flatten(), ignore_index=-100)
    torch.testing.assert_close(loss.double(), main.double() + 0.25 * expected, rtol=0, atol=1e-6)
    model.eval()  # evaluation scores the main model alone
    assert torch.equal(model(idx, targets)[1], main)


def test_mtp_at_weight_0_leaves_the_model_its_random_draws_and_its_loss_unchanged():
    torch.manual_seed(3)
    plain = Transformer(ModelConfig(**TINY))
    after_plain = torch.rand(4)
    torch.manual_seed(3)
    with_mtp = Transformer(ModelConfig(**TINY, mtp_depth=1, mtp_loss_weight=0.0))
    assert torch.equal(torch.rand(4), after_plain)  # the MTP modules drew from a fork
    mtp_names = [n for n, _ in with_mtp.named_parameters() if n.startswith("mtp.")]
    assert mtp_names and not any(p.requires_grad for n, p in with_mtp.named_parameters() if n.startswith("mtp."))
    state = with_mtp.state_dict()
    assert all(torch.equal(p, state[n]) for n, p in plain.state_dict().items())
    idx, targets = torch.randint(0, 64, (2, 12)), torch.randint(0, 64, (2, 12))
    assert torch.equal(plain.train()(idx, targets)[1], with_mtp.train()(idx, targets)[1])
    weighted = Transformer(ModelConfig(**TINY, mtp_depth=1, mtp_loss_weight=0.3)).train()
    weighted.load_state_dict(state)
    assert weighted(idx, targets)[1] > plain(idx, targets)[1]  # 0.3 times a positive cross-entropy more


@pytest.mark.parametrize("arch", ["gqa", "mla_moe"])
def test_speculative_greedy_decoding_is_plain_greedy_decoding(arch):
    # Weights scaled up so that the random model's continuations vary and its draft is sometimes right: both the
    # accepted and the rejected path run. float64, so that a 2-token forward and a 1-token one agree on every argmax.
    from model import speculative_generate
    torch.manual_seed(0)
    model = Transformer(ModelConfig(**{**TINY, "vocab_size": 6, "block_size": 64}, **ARCHS[arch], mtp_depth=1))
    model = model.double().eval()
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() == 2:
                p.mul_(8)
    stats = {}
    for seed in range(4):
        idx = torch.randint(0, 6, (1, 5), generator=torch.Generator().manual_seed(seed))
        plain = torch.cat(list(model.generate(idx, 40, temperature=0)))
        assert torch.equal(torch.cat(list(speculative_generate(model, idx, 40, stats=stats))), plain)
        stop = int(plain[20])  # a stop id ends both at its first appearance
        assert torch.equal(torch.cat(list(speculative_generate(model, idx, 40, stop_ids=[stop]))),
                           torch.cat(list(model.generate(idx, 40, temperature=0, stop_ids=[stop]))))
    assert 0 < stats["accepted"] < stats["drafted"], stats
    with pytest.raises(ValueError, match="has none"):
        next(speculative_generate(Transformer(ModelConfig(**TINY)), idx, 4))
    with pytest.raises(ValueError, match="cannot"):
        next(speculative_generate(Transformer(ModelConfig(**TINY, **ARCHS["sliding"], mtp_depth=1)), idx, 4))
