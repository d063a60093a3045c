"""lora.py: an adapted model starts as its base, trains only its adapters, and merged computes what unmerged does
(every attention family, with and without the KV cache); what the model lacks is refused."""

import pytest
import torch
import torch.nn as nn

from lora import LoRALinear, adapter_state_dict, add_lora, load_adapters, merge_lora
from model import KVCache, ModelConfig, Transformer
from test_model import ARCHS, TINY


def adapted(arch, targets="all-linear", seed=0, dtype=torch.float32):
    torch.manual_seed(seed)
    model = Transformer(ModelConfig(**{**TINY, **ARCHS[arch]})).to(dtype)
    base = {k: v.clone() for k, v in model.state_dict().items()}
    add_lora(model, rank=4, alpha=8.0, dropout=0.0, targets=targets)
    return model, base


def lively(model):
    """B = 0 makes every adapter a no-op: give them values, so merging has something to get right."""
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("lora_B"):
                p.normal_(0.0, 0.2)
    return model


@pytest.mark.parametrize("arch", ARCHS)
def test_an_adapted_model_starts_as_its_base_and_trains_only_its_adapters(arch):
    model, base = adapted(arch)
    plain = Transformer(ModelConfig(**{**TINY, **ARCHS[arch]}))
    plain.load_state_dict(base)
    idx = torch.randint(0, 64, (2, 16))
    assert torch.equal(model(idx)[0], plain(idx)[0])  # B = 0: exactly the base
    trainable = {name for name, p in model.named_parameters() if p.requires_grad}
    assert trainable and all(name.endswith((".lora_A", ".lora_B")) for name in trainable)
    assert {id(p) for g in model.param_groups(0.1) for p in g["params"]} == \
        {id(p) for p in model.parameters() if p.requires_grad}
    _, loss = lively(model)(idx, idx)
    loss.backward()
    assert all(p.grad is None for p in model.parameters() if not p.requires_grad)
    # Every attention adapter learns (an expert no token chose this time may not).
    assert all(p.grad.abs().sum() > 0 for name, p in model.named_parameters() if ".attn." in name and p.requires_grad)


@pytest.mark.parametrize("arch", ARCHS)
def test_merged_computes_what_unmerged_computes(arch):
    model = lively(adapted(arch)[0]).eval()
    idx = torch.randint(0, 64, (2, 16))
    with torch.no_grad():
        unmerged = model(idx)[0]
        # The KV cache path too: MLA folds wkv_b into its queries and outputs there.
        cache = KVCache(model.config, 2, 16)
        cached = torch.cat([model(idx[:, :10], kv_cache=cache)[0], model(idx[:, 10:], kv_cache=cache)[0]], dim=1)
        merged_model = merge_lora(model)
        merged = merged_model(idx)[0]
    assert not any(isinstance(m, LoRALinear) for m in merged_model.modules())
    # (W + s B A) x and W x + s B (A x) round differently; the linear layers' L2 normalisation of q and k turns
    # that into a little more.
    tol = 1e-5 if "linear_attention" in model.config.layer_types else 1e-6
    torch.testing.assert_close(merged, unmerged, rtol=0, atol=tol)
    torch.testing.assert_close(cached, unmerged, rtol=0, atol=1e-5)
    # The merged model is the base's shape: its state dict loads into a plain model.
    plain = Transformer(model.config)
    plain.load_state_dict(merged_model.state_dict())


def test_merging_is_the_float64_sum_of_the_base_and_the_scaled_product():
    layer = nn.Linear(6, 5, dtype=torch.float64)
    lora = LoRALinear(layer, rank=2, alpha=3.0, dropout=0.0)
    with torch.no_grad():
        lora.lora_B.normal_()
    x = torch.randn(4, 6, dtype=torch.float64)
    expected = x @ layer.weight.T + layer.bias + (3.0 / 2) * (x @ lora.lora_A.T) @ lora.lora_B.T
    torch.testing.assert_close(lora(x), expected, rtol=0, atol=1e-12)
    torch.testing.assert_close(x @ lora.merged_weight().T + layer.bias, expected, rtol=0, atol=1e-12)


def test_targets_pick_projections_by_name_and_unknown_ones_are_refused():
    model, _ = adapted("gqa", targets="wq, wv")
    adapted_names = {name.rsplit(".", 2)[-2] for name in adapter_state_dict(model.state_dict())}
    assert adapted_names == {"wq", "wv"}
    with pytest.raises(ValueError, match="no projection named wqkv.*its projections: w1, w2, w3, wk, wo, wq, wv"):
        adapted("gqa", targets="wq,wqkv")
    mla, _ = adapted("mla_moe", targets="wkv_b")  # MLA's own names, every expert's w1 too with all-linear
    assert all(".wkv_b." in name for name in adapter_state_dict(mla.state_dict()))


def test_adapters_load_only_into_the_same_adapters():
    model = lively(adapted("gqa")[0])
    again, _ = adapted("gqa", seed=1)
    load_adapters(again, adapter_state_dict(model.state_dict()))
    assert all(torch.equal(v, again.state_dict()[k]) for k, v in adapter_state_dict(model.state_dict()).items())
    other, _ = adapted("gqa", targets="wq")
    with pytest.raises(ValueError, match="are not the model's"):
        load_adapters(other, adapter_state_dict(model.state_dict()))


def test_embeddings_train_beside_the_adapters_and_travel_with_them():
    torch.manual_seed(0)
    model = Transformer(ModelConfig(**{**TINY, **ARCHS["gqa"]}))
    add_lora(model, rank=4, alpha=8.0, dropout=0.0, targets="wq", embeddings=True)
    trainable = {name for name, p in model.named_parameters() if p.requires_grad}
    assert trainable == {"wte.weight"} | {n for n in trainable if n.endswith((".lora_A", ".lora_B"))}
    assert model.lm_head.weight.requires_grad  # tied: the head is the same matrix
    with torch.no_grad():
        model.wte.weight.add_(1.0)
    saved = adapter_state_dict(lively(model).state_dict(), embeddings=True)
    assert {"wte.weight", "lm_head.weight"} <= set(saved)
    again, _ = adapted("gqa", targets="wq", seed=1)
    again.wte.weight.requires_grad_(True)
    load_adapters(again, saved, embeddings=True)
    assert all(torch.equal(v, again.state_dict()[k]) for k, v in saved.items())
    with pytest.raises(ValueError, match="lora_embeddings must be the ones"):
        load_adapters(again, saved)  # a run without embeddings has no such weights to load
