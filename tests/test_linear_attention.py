"""linear_attention.py: the chunked form equals the recurrence (any length, any chunk), the recurrence equals
transformers' own, the family without the delta rule equals its quadratic attention form, and the layer's cache
and padding change nothing."""

import pytest
import torch
from types import SimpleNamespace

from linear_attention import GatedDeltaNet, gated_delta_rule_chunked, gated_delta_rule_recurrent, l2_normalize


def inputs(B=2, H=3, T=37, d_k=8, d_v=5, dtype=torch.float32, seed=0, unit_keys=True):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(B, H, T, d_k, generator=g, dtype=dtype)
    k = torch.randn(B, H, T, d_k, generator=g, dtype=dtype)
    k = l2_normalize(k) if unit_keys else k
    v = torch.randn(B, H, T, d_v, generator=g, dtype=dtype)
    log_a = -torch.rand(B, H, T, generator=g, dtype=dtype) * 0.5  # decays in (0.6, 1]
    beta = torch.rand(B, H, T, generator=g, dtype=dtype)
    state = torch.randn(B, H, d_k, d_v, generator=g, dtype=dtype) * 0.1
    return q, k, v, log_a, beta, state


@pytest.mark.parametrize("T,chunk", [(37, 16), (64, 64), (1, 64), (5, 1), (37, 37), (37, 100), (130, 64)])
@pytest.mark.parametrize("delta_rule", [True, False])
def test_chunked_equals_the_recurrence(T, chunk, delta_rule):
    q, k, v, log_a, beta, state = inputs(T=T)
    for start in (None, state):
        o1, s1 = gated_delta_rule_recurrent(q, k, v, log_a, beta, start, delta_rule)
        o2, s2 = gated_delta_rule_chunked(q, k, v, log_a, beta, start, delta_rule, chunk_size=chunk)
        torch.testing.assert_close(o2, o1, rtol=0, atol=1e-5)
        torch.testing.assert_close(s2, s1, rtol=0, atol=1e-5)


def test_chunked_gradients_equal_the_recurrences_in_float64():
    args = [t.requires_grad_() for t in inputs(B=1, H=2, T=11, d_k=4, d_v=3, dtype=torch.float64)]
    grads = []
    for rule, options in ((gated_delta_rule_recurrent, {}), (gated_delta_rule_chunked, {"chunk_size": 4})):
        o, s = rule(*args, **options)
        grads.append(torch.autograd.grad((o.sin().sum() + s.cos().sum()), args))
    for a, b in zip(*grads):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-12)
    assert torch.autograd.gradcheck(lambda *x: gated_delta_rule_chunked(*x, chunk_size=4), args, fast_mode=True)


def test_the_recurrence_equals_transformers():
    from transformers.models.qwen3_next.modeling_qwen3_next import (torch_chunk_gated_delta_rule,
                                                                    torch_recurrent_gated_delta_rule)

    q, k, v, log_a, beta, state = inputs(T=70, unit_keys=False)
    # transformers takes (B, T, H, d) and normalises q and k itself, and scales q by d_k^-0.5; ours takes them ready.
    ours, ours_state = gated_delta_rule_recurrent(l2_normalize(q) * 8 ** -0.5, l2_normalize(k), v, log_a, beta, state)
    for theirs_rule in (torch_recurrent_gated_delta_rule, torch_chunk_gated_delta_rule):
        theirs, theirs_state = theirs_rule(*(t.transpose(1, 2) for t in (q, k, v, log_a, beta)), initial_state=state,
                                           output_final_state=True, use_qk_l2norm_in_kernel=True)
        torch.testing.assert_close(theirs.transpose(1, 2), ours, rtol=0, atol=1e-5)
        torch.testing.assert_close(theirs_state, ours_state, rtol=0, atol=1e-5)


def attention_form(q, k, v, log_a, beta):
    """o_t = sum_{s <= t} (a_{s+1} ... a_t) b_s (q_t . k_s) v_s: the quadratic form of S_t = a_t S_{t-1} + b_t k_t v_t^T."""
    g = log_a.cumsum(dim=-1)
    T = q.size(2)
    decay = (g[..., :, None] - g[..., None, :]).masked_fill(~torch.ones(T, T, dtype=torch.bool).tril(), float("-inf"))
    return ((q @ k.transpose(-1, -2)) * decay.exp() * beta[..., None, :]) @ v


@pytest.mark.parametrize("family", ["linear attention", "RetNet / Lightning", "simple GLA / Mamba2 SSD"])
def test_without_the_delta_rule_the_chunk_code_is_the_family(family):
    q, k, v, log_a, beta, _ = inputs(T=45, dtype=torch.float64, unit_keys=False)
    if family == "linear attention":  # a = 1, b = 1 (Katharopoulos et al. 2020, without the feature map)
        log_a, beta = torch.zeros_like(log_a), torch.ones_like(beta)
    elif family == "RetNet / Lightning":  # a fixed decay per head, 1 - 2^(-5 - h) (RetNet's); b = 1
        fixed = torch.log(1 - 2.0 ** (-5 - torch.arange(3, dtype=torch.float64)))
        log_a, beta = fixed[None, :, None].expand_as(log_a), torch.ones_like(beta)
    # SSD: a_t = exp(dt_t A) and b_t = dt_t depend on the input; here any log_a <= 0 and any b.
    o, _ = gated_delta_rule_chunked(q, k, v, log_a, beta, delta_rule=False, chunk_size=16)
    torch.testing.assert_close(o, attention_form(q, k, v, log_a, beta), rtol=0, atol=1e-10)


def test_the_delta_rule_writes_the_error_so_the_memory_returns_the_new_value():
    q, k, v, log_a, beta, state = inputs(T=1, dtype=torch.float64)
    k = k / k.norm(dim=-1, keepdim=True)  # exactly unit (l2_normalize's eps leaves |k|^2 a hair below 1)
    _, S = gated_delta_rule_recurrent(q, k, v, torch.zeros_like(log_a), torch.ones_like(beta), state)
    torch.testing.assert_close(k[:, :, 0, None, :] @ S, v, rtol=0, atol=1e-12)  # unit key, b = 1: k^T S_t = v_t
    _, S = gated_delta_rule_recurrent(q, k, v, torch.zeros_like(log_a), torch.ones_like(beta), state, delta_rule=False)
    assert not torch.allclose(k[:, :, 0, None, :] @ S, v)  # plain linear attention adds v to what was there


def layer(**overrides):
    config = SimpleNamespace(n_embd=24, linear_num_key_heads=2, linear_num_value_heads=4, linear_key_head_dim=6,
                             linear_value_head_dim=5, linear_conv_kernel_dim=4, linear_chunk_size=8, norm_eps=1e-6)
    torch.manual_seed(0)
    return GatedDeltaNet(SimpleNamespace(**{**vars(config), **overrides}), 0)


def test_the_cache_continues_a_sequence_exactly_and_padding_changes_nothing():
    net = layer()
    x = torch.randn(2, 21, 24)
    real = torch.ones(2, 21, dtype=torch.bool)
    with torch.no_grad():
        whole, (conv, S) = net.run(x, real)
        y, state = net.run(x[:, :13], real[:, :13])  # a prefill, then one token at a time
        parts = [y]
        for t in range(13, 21):
            y, state = net.run(x[:, t:t + 1], real[:, t:t + 1], state)
            parts.append(y)
        torch.testing.assert_close(torch.cat(parts, dim=1), whole, rtol=0, atol=1e-5)
        torch.testing.assert_close(state[1], S, rtol=0, atol=1e-5)
        # The conv state is the last inputs' projections: the same numbers, computed in matmuls of 21 rows and of
        # 13 + 1 rows, which some BLAS kernels round alike and others not (2.4e-7 apart on an AMD EPYC).
        torch.testing.assert_close(state[0], conv, rtol=0, atol=1e-6)
        # Three tokens of left padding (their inputs arbitrary) give the real tokens the same outputs and state.
        padded = torch.cat((torch.randn(2, 3, 24), x), dim=1)
        mask = torch.cat((torch.zeros(2, 3, dtype=torch.bool), real), dim=1)
        y, (_, S_padded) = net.run(padded, mask)
        torch.testing.assert_close(y[:, 3:], whole, rtol=0, atol=1e-5)
        torch.testing.assert_close(S_padded, S, rtol=0, atol=1e-5)


def test_a_hybrid_model_on_the_triton_kernel_computes_what_it_computes_in_pytorch():
    # The kernel in Triton's interpreter (conftest.py sets TRITON_INTERPRET without a GPU), against the PyTorch form.
    from model import ModelConfig, Transformer

    shape = dict(vocab_size=64, block_size=40, n_layer=2, n_head=2, n_kv_head=1, n_embd=32, linear_chunk_size=16,
                 layer_types=["linear_attention", "full_attention"], linear_key_head_dim=16, linear_value_head_dim=16)
    models = []
    for impl in ("flash", "sdpa"):
        torch.manual_seed(0)
        models.append(Transformer(ModelConfig(**shape, attn_impl=impl)))
    assert models[0].layers[0].attn.use_kernel and not models[1].layers[0].attn.use_kernel
    idx = torch.randint(0, 64, (2, 37))
    (logits, loss), (expected, expected_loss) = (m(idx, idx) for m in models)
    torch.testing.assert_close(logits, expected, rtol=0, atol=1e-4)
    loss.backward()
    expected_loss.backward()
    for (name, p), q in zip(models[0].named_parameters(), models[1].parameters()):
        torch.testing.assert_close(p.grad, q.grad, rtol=0, atol=1e-4, msg=name)
