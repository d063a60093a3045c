"""
export_hf.py: write a train.py checkpoint as a Hugging Face transformers model folder.

    python export_hf.py --ckpt out/cpu_demo --out out/cpu_demo/hf
    python -c "from transformers import AutoModelForCausalLM; AutoModelForCausalLM.from_pretrained('out/cpu_demo/hf')"

The one idea: an export is worth something only if it is exact. Each of our architectures is one that a
transformers class computes to the last digit, and we write its config.json and weight names:
  GQA + dense MLP            LlamaForCausalLM  (qkv_bias: attention_bias, with o_proj's biases zero)
  GQA + DeepSeek MoE         Glm4MoeForCausalLM (GLM-4.5: Llama-style attention, DeepSeek-V3's router)
  MLA, dense MLP or MoE      DeepseekV3ForCausalLM (a model without MoE is one whose dense layers never end)
  MLA + DSA indexers         DeepseekV32ForCausalLM (DeepSeek Sparse Attention: the same top-k choice of keys)
  GQA with sliding layers    MinistralForCausalLM (Llama with a window per layer_types entry; dense MLP only)
  linear attention, qk_norm  Qwen3NextForCausalLM (Gated DeltaNet beside full attention with q/k norm and an
  + attn_output_gate, dense  output gate; its norms scale by 1 + w, so we write our gain minus 1, where exact)
Anything no class represents exactly is refused with the reason; an approximate export is never written.
tests/test_export_hf.py loads every family back into transformers and compares logits and generations.

The tokenizer is exact too: tokenizer.json is our sentencepiece BPE for the `tokenizers` library, and
AutoTokenizer.from_pretrained(export), pipeline("text-generation", model=export) included, gives the ids of
Tokenizer.encode for every text, and Tokenizer.render_chat's for apply_chat_template (which encodes the rendered
conversation at once, render_chat part by part: the same ids, as special tokens cut the text and no merge spans a
newline). sentencepiece's BPE encoder has no pre-tokenizer (training's splits at spaces, scripts and digits only
decide which pieces exist): it merges the two neighbours that make the best-scored piece, leftmost first, until none
make a piece. A transformers BPE merges the listed pair of lowest rank, leftmost first. So the merges are every
split of every piece into two pieces, ranked by the piece's score; the splits of one piece may go in any order,
since when a piece is the best merge left, every place that can make it holds the same two pieces (its characters
went through the same merges, whatever their neighbours). sentencepiece's space mark is written as the space itself:
no normaliser is needed, and a literal '▁' is a character the vocabulary lacks, which byte fallback encodes as its
three bytes, as Tokenizer.encode does. Not exact (the README written into the export says so too): transformers
matches special tokens in text, so text containing "<|im_start|>" or "</s>" gets those ids where Tokenizer.encode
gives characters (split_special_tokens=True would agree, but the chat template's tokens would then be text); decode
writes or drops all six special tokens where ours writes the chat tokens only; and byte tokens that are not UTF-8
(no text encodes to them) decode to a U+FFFD per byte of their run, where sentencepiece replaces only the invalid
bytes.

Writes config.json, model.safetensors, tokenizer.json, tokenizer_config.json, generation_config.json, the run's
tokenizer.model and a README.md on loading it. Each file goes to a temporary name and is renamed into place,
config.json last: a folder with a config.json is complete.
"""

import argparse
import json
import math
import os
import sys

import torch

from checkpoint import load_model  # reads and checks the checkpoint and its tokenizer, with clear errors
from files import atomic_write, copy_file
from model import ModelConfig, Transformer
from tokenizer import BOS_ID, EOS_ID, IM_END_ID, PAD_ID, SPACE_MARK, SPECIAL_TOKENS, UNK_ID, Tokenizer

# Our module names, component by component, to Hugging Face's (the same in all three classes).
HF_NAMES = {
    "wte": "embed_tokens", "attn_norm": "input_layernorm", "ffn_norm": "post_attention_layernorm",
    "attn": "self_attn", "ffn": "mlp", "wq": "q_proj", "wk": "k_proj", "wv": "v_proj", "wo": "o_proj",
    "wq_a": "q_a_proj", "q_norm": "q_a_layernorm", "wq_b": "q_b_proj", "wkv_a": "kv_a_proj_with_mqa",
    "kv_norm": "kv_a_layernorm", "wkv_b": "kv_b_proj", "w1": "gate_proj", "w3": "up_proj", "w2": "down_proj",
}

# Tokenizer.render_chat's ChatML, token for token: each message is "<|im_start|>{role}\n{content}<|im_end|>\n".
CHAT_TEMPLATE = (
    "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>\\n' }}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)

TOKENIZER_CONFIG = {
    "tokenizer_class": "TokenizersBackend",  # reads tokenizer.json as it is (LlamaTokenizer would build Metaspace)
    "bos_token": SPECIAL_TOKENS[BOS_ID], "pad_token": SPECIAL_TOKENS[PAD_ID], "unk_token": SPECIAL_TOKENS[UNK_ID],
    "eos_token": SPECIAL_TOKENS[IM_END_ID],  # what a chat reply ends with; GENERATION_CONFIG stops at </s> too
    # Training documents start without <s> (each ends with </s>), so a prompt is encoded without either.
    "add_bos_token": False, "add_eos_token": False, "clean_up_tokenization_spaces": False,
    "chat_template": CHAT_TEMPLATE,
}

# Chat replies end with <|im_end|>, documents with </s>: generate() stops at either, as chat.py does.
GENERATION_CONFIG = {"bos_token_id": BOS_ID, "eos_token_id": [IM_END_ID, EOS_ID], "pad_token_id": PAD_ID}

README = """# {name}

Exported by myllm's export_hf.py from `{ckpt}` ({arch}, {params:,} parameters).

```python
from transformers import AutoModelForCausalLM, AutoTokenizer, pipeline
model = AutoModelForCausalLM.from_pretrained("{out}")
tok = AutoTokenizer.from_pretrained("{out}")
generate = pipeline("text-generation", model="{out}")
generate("def fibonacci(n):", max_new_tokens=32, do_sample=False)
generate([{{"role": "user", "content": "What is 2 + 3?"}}], max_new_tokens=32)  # ChatML, ends at <|im_end|>
```

The tokenizer is myllm's lossless sentencepiece BPE (`tokenizer.model`), written for transformers as
`tokenizer.json`: it gives the ids of myllm's `Tokenizer.encode` for every text, and `tok.decode(tok(text).input_ids)
== text` (code, Chinese, emoji, runs of spaces and tabs, a literal U+2581 included). A prompt is encoded without
`<s>`, as training documents were (each ended with `</s>`). `tok.apply_chat_template` gives the ids of
`Tokenizer.render_chat`; `eos_token` is `<|im_end|>`, and generation stops there or at `</s>`
(generation_config.json). Special token ids: {ids}.

Where it differs from myllm's `tokenizer.py`, and why:
- Text containing a special token's own text (`<|im_start|>`, `</s>`, ...) gets that token's id: transformers
  matches special tokens in text, while `tokenizer.py` encodes them as characters, so no message can forge a turn.
  `split_special_tokens=True` would agree with `tokenizer.py`, but then the chat template's tokens are text too.
- `tok.decode` writes `<s>`, `</s>`, `<pad>` and `<unk>` (`tokenizer.py` writes nothing for them); with
  `skip_special_tokens=True` it also drops `<|im_start|>` and `<|im_end|>` (`tokenizer.py` writes them).
- Byte tokens that are not valid UTF-8 (no text encodes to them; a sampled model can produce them) decode to one
  U+FFFD per byte of the whole run of bytes; sentencepiece replaces only the bytes that are invalid.

`from tokenizer import Tokenizer; Tokenizer("{out}/tokenizer.model")` loads the same tokenizer in myllm.
"""


def hf_architecture(config: ModelConfig) -> str:
    """The transformers class that computes exactly our model, or ValueError saying why none does."""
    if config.final_logit_softcapping:
        raise ValueError("logit soft-capping: transformers caps final logits in Gemma 2 and 3 only, whose scaled "
                         "embedding, extra norms and MLP are not ours, so no class computes this model")
    if config.hidden_act == "relu2":
        if config.attn != "gqa" or config.layer_types != ["full_attention"] * config.n_layer or config.qk_norm or \
                config.attn_output_gate or config.moba_chunk_size or config.attention_sinks:
            raise ValueError("hidden_act='relu2': transformers' Arcee computes the ungated ReLU^2 MLP, with "
                             "Llama's GQA (no MLA, q/k norm, output gate, sinks, MoBA or other layer types)")
        return "ArceeForCausalLM"
    if config.attention_sinks:
        raise ValueError("attention sinks: transformers computes them in gpt-oss only, whose every layer is a mixture "
                         "of experts with biased, clamped GLU experts and a biased router, not our MLP or DeepSeek's "
                         "experts, so no class computes this model")
    if "sliding_attention" in config.layer_types:
        if config.attn != "gqa" or config.n_routed_experts or config.qkv_bias or config.qk_norm or \
                config.attn_output_gate or "linear_attention" in config.layer_types:
            raise ValueError("sliding-window layers: transformers' Ministral computes them beside full ones, with "
                             "Llama's GQA and dense MLP only (no MLA, experts, q/k/v biases, q/k norm, output gate "
                             "or linear layers)")
        return "MinistralForCausalLM"
    if config.moba_chunk_size:
        raise ValueError("MoBA's block attention: no transformers class computes it")
    if "linear_attention" in config.layer_types or config.qk_norm or config.attn_output_gate:
        return qwen3_next_architecture(config)
    if config.moe_shortcut or config.zero_expert_num:
        return longcat_architecture(config)
    if config.n_routed_experts and config.scoring_func != "sigmoid":
        raise ValueError("transformers' DeepSeek-style routers (DeepseekV3, Glm4Moe) score experts with a sigmoid, "
                         f"not {config.scoring_func}")
    if config.attn == "mla":
        return "DeepseekV32ForCausalLM" if config.index_n_heads else "DeepseekV3ForCausalLM"
    if config.n_routed_experts:
        return "Glm4MoeForCausalLM"
    # q/k/v biases or not. Not Qwen2ForCausalLM for the biases: transformers 5 gives every qwen2 checkpoint
    # Qwen2Tokenizer (NFC, a byte-level pre-tokenizer), whatever tokenizer_config.json names, and our tokenizer
    # would be lost. Llama's attention_bias, with o_proj biases of zero (hf_state_dict), is the same function.
    return "LlamaForCausalLM"


def longcat_architecture(config: ModelConfig) -> str:
    """LongCat-Flash is the one class with shortcut layers and zero experts, and it fixes the rest: MLA with a query
    latent, a softmax router without groups or renormalisation, no shared experts."""
    if not (config.moe_shortcut and config.attn == "mla" and config.q_lora_rank):
        raise ValueError("zero experts and shortcut layers: transformers computes them in LongCat-Flash only, whose "
                         "every layer is a shortcut layer (moe_shortcut) with MLA and a query latent (q_lora_rank)")
    if config.scoring_func != "softmax" or config.norm_topk_prob or config.n_group > 1 or config.n_shared_experts:
        raise ValueError("LongCat-Flash's router is a softmax over the experts, its chosen weights not renormalised "
                         "(norm_topk_prob=False), without groups or shared experts")
    return "LongcatFlashForCausalLM"


def qwen3_next_architecture(config: ModelConfig) -> str:
    """Qwen3-Next's attention layers always normalise q and k and gate their output; its experts are not
    DeepSeek's. So: a full-attention layer needs both options, and the MLP is dense."""
    full = "full_attention" in config.layer_types
    if not full:
        raise ValueError("transformers' Qwen3-Next cannot generate without a full-attention layer (its cache takes "
                         "the mask's size from one): keep at least one")
    if not (config.qk_norm and config.attn_output_gate):
        raise ValueError("Qwen3-Next (the class that computes linear-attention layers, q/k norm and the output gate) "
                         "normalises q and k and gates the output of every full-attention layer: set both qk_norm "
                         "and attn_output_gate")
    if config.n_routed_experts:
        raise ValueError("Qwen3-Next's experts use a softmax router and a gated shared expert, not DeepSeek's")
    if config.qkv_bias:
        raise ValueError("Qwen3-Next puts no biases on q, k and v alone (attention_bias adds one to o_proj too)")
    return "Qwen3NextForCausalLM"


def hf_config(config: ModelConfig, arch: str) -> dict:
    """config.json for transformers; every field that changes the function is written out, never left to a
    class default (tie_word_embeddings defaults differ between classes, for one)."""
    rope = {"rope_type": "default", "rope_theta": config.rope_theta, **config.rope_scaling}
    max_positions = config.block_size
    if rope["rope_type"] == "dynamic":
        # transformers' dynamic NTK reads the original length from max_position_embeddings.
        max_positions = rope.pop("original_max_position_embeddings")
    hf = {
        "architectures": [arch], "vocab_size": config.vocab_size, "hidden_size": config.n_embd,
        "num_hidden_layers": config.n_layer, "num_attention_heads": config.n_head,
        "num_key_value_heads": config.n_kv_head, "intermediate_size": config.inter_dim, "hidden_act": config.hidden_act,
        "max_position_embeddings": max_positions, "rms_norm_eps": config.norm_eps, "rope_parameters": rope,
        "tie_word_embeddings": config.tie_embeddings, "attention_dropout": 0.0, "dtype": "float32",
        "bos_token_id": BOS_ID, "eos_token_id": EOS_ID, "pad_token_id": PAD_ID,
    }
    if arch in ("LlamaForCausalLM", "ArceeForCausalLM"):  # Arcee is Llama with the ungated ReLU^2 MLP
        hf |= {"model_type": "llama" if arch == "LlamaForCausalLM" else "arcee", "head_dim": config.head_dim,
               "attention_bias": config.qkv_bias, "mlp_bias": False}
    elif arch == "MinistralForCausalLM":  # Llama with per-layer windows: key j for query i when i - window < j <= i
        hf |= {"model_type": "ministral", "head_dim": config.head_dim, "layer_types": config.layer_types,
               "sliding_window": config.sliding_window}
    if config.n_routed_experts or arch in ("DeepseekV3ForCausalLM", "DeepseekV32ForCausalLM"):
        hf |= {"n_routed_experts": config.n_routed_experts, "n_shared_experts": config.n_shared_experts,
               "num_experts_per_tok": config.num_experts_per_tok, "moe_intermediate_size": config.moe_inter_dim,
               "n_group": config.n_group, "topk_group": config.topk_group, "norm_topk_prob": config.norm_topk_prob,
               "routed_scaling_factor": config.routed_scaling_factor, "num_nextn_predict_layers": 0,
               # No MoE: every layer is one of the first dense ones.
               "first_k_dense_replace": config.first_k_dense_replace if config.n_routed_experts else config.n_layer}
    if arch == "Glm4MoeForCausalLM":
        rope["partial_rotary_factor"] = 1.0  # GLM-4.5 rotates half of each head; ours rotate all of it
        hf |= {"model_type": "glm4_moe", "head_dim": config.head_dim, "attention_bias": config.qkv_bias,
               "use_qk_norm": False}
    elif arch == "Qwen3NextForCausalLM":
        rope["partial_rotary_factor"] = 1.0  # Qwen3-Next's default rotates a quarter of each head; ours all of it
        hf |= {"model_type": "qwen3_next", "head_dim": config.head_dim, "attention_bias": False,
               "layer_types": config.layer_types, "linear_num_key_heads": config.linear_num_key_heads,
               "linear_num_value_heads": config.linear_num_value_heads,
               "linear_key_head_dim": config.linear_key_head_dim,
               "linear_value_head_dim": config.linear_value_head_dim,
               "linear_conv_kernel_dim": config.linear_conv_kernel_dim, "num_experts": 0, "mlp_only_layers": []}
    elif arch == "LongcatFlashForCausalLM":  # each of num_layers layers has two attention sublayers
        del hf["num_hidden_layers"], hf["n_group"], hf["topk_group"], hf["norm_topk_prob"], hf["first_k_dense_replace"]
        hf |= {"model_type": "longcat_flash", "num_layers": config.n_layer, "ffn_hidden_size": config.inter_dim,
               "expert_ffn_hidden_size": config.moe_inter_dim, "moe_topk": config.num_experts_per_tok,
               "zero_expert_num": config.zero_expert_num, "num_key_value_heads": config.n_head,
               "q_lora_rank": config.q_lora_rank, "kv_lora_rank": config.kv_lora_rank,
               "qk_nope_head_dim": config.qk_nope_head_dim, "qk_rope_head_dim": config.qk_rope_head_dim,
               "head_dim": config.qk_rope_head_dim, "v_head_dim": config.v_head_dim, "attention_bias": False}
        for key in ("n_shared_experts", "intermediate_size", "moe_intermediate_size", "num_experts_per_tok"):
            del hf[key]
    elif arch in ("DeepseekV3ForCausalLM", "DeepseekV32ForCausalLM"):
        hf |= {"model_type": "deepseek_v3", "num_key_value_heads": config.n_head,  # MLA: every head its own key
               "q_lora_rank": config.q_lora_rank or None, "kv_lora_rank": config.kv_lora_rank,
               "qk_nope_head_dim": config.qk_nope_head_dim, "qk_rope_head_dim": config.qk_rope_head_dim,
               "v_head_dim": config.v_head_dim, "rope_interleave": True, "attention_bias": False}
    if arch == "DeepseekV32ForCausalLM":  # always interleaved RoPE in MLA, always rotate-half in the indexer
        del hf["rope_interleave"]
        hf |= {"model_type": "deepseek_v32", "index_n_heads": config.index_n_heads,
               "index_head_dim": config.index_head_dim, "index_topk": config.index_topk}
    return hf


def interleave_rope_rows(weight: torch.Tensor, period: int, rope_dim: int) -> torch.Tensor:
    """Reorder the output rows that make RoPE dims, the last rope_dim of every `period` rows.

    Our RoPE pairs dim i with dim i + rope_dim/2 of a head (rotate-half); DeepSeek-V3's checkpoints pair dims
    2i and 2i + 1, and transformers' DeepseekV3 reads them so (rope_interleave). Row order [0, r/2, 1, r/2 + 1,
    ...] turns ours into theirs; as queries and keys are reordered alike, every q.k score is unchanged.
    """
    order = torch.arange(rope_dim).view(2, -1).t().flatten()
    w = weight.view(-1, period, weight.size(-1)).clone()
    w[:, period - rope_dim :] = w[:, period - rope_dim :][:, order]
    return w.view_as(weight)


def hf_state_dict(model: Transformer, arch: str) -> dict[str, torch.Tensor]:
    """Our weights under transformers' names. A tied lm_head is left out: tie_word_embeddings reties it."""
    if arch == "Qwen3NextForCausalLM":
        return qwen3_next_state_dict(model)
    if arch == "LongcatFlashForCausalLM":
        return longcat_state_dict(model)
    return generic_state_dict(model, arch)


def generic_state_dict(model: Transformer, arch: str) -> dict[str, torch.Tensor]:
    """Each of our tensors under its transformers name (HF_NAMES, part by part), DeepSeek's interleaved RoPE rows."""
    c = model.config
    out = {}
    for name, tensor in model.state_dict().items():
        if name == "lm_head.weight" and c.tie_embeddings:
            continue
        if name.startswith("mtp."):  # MTP modules train and draft; no transformers class runs them (DeepSeek-V3's
            continue                 # config counts its MTP layer, and its modeling code drops the weights)
        # MLA's own projections (layers.i.attn.wq_b, or a shortcut layer's layers.i.attn.0.wq_b), not the indexer's.
        deepseek = arch in ("DeepseekV3ForCausalLM", "DeepseekV32ForCausalLM", "LongcatFlashForCausalLM") and \
            ".indexer." not in name
        if deepseek and name.endswith((".wq.weight", ".wq_b.weight")):
            tensor = interleave_rope_rows(tensor, c.qk_nope_head_dim + c.qk_rope_head_dim, c.qk_rope_head_dim)
        elif deepseek and name.endswith(".wkv_a.weight"):
            tensor = interleave_rope_rows(tensor, c.kv_lora_rank + c.qk_rope_head_dim, c.qk_rope_head_dim)
        outer, indexer, inner = name.partition(".indexer.")  # the indexer's own names are DeepSeek's, as ours
        hf_name = ".".join(HF_NAMES.get(part, part) for part in outer.split(".")) + indexer + inner
        if arch == "ArceeForCausalLM":  # the ungated MLP's one input matrix is Arcee's up_proj
            hf_name = hf_name.replace("mlp.gate_proj", "mlp.up_proj")
        if hf_name.endswith("mlp.gate.bias"):
            hf_name = hf_name.replace("gate.bias", "gate.e_score_correction_bias")
        out[hf_name if hf_name.startswith("lm_head") else "model." + hf_name] = tensor.detach().contiguous()
        if arch in ("LlamaForCausalLM", "ArceeForCausalLM") and name.endswith("attn.wq.bias"):  # and on o_proj
            out["model." + hf_name.replace("q_proj", "o_proj")] = torch.zeros(c.n_embd, dtype=tensor.dtype)
    return out


def longcat_state_dict(model: Transformer) -> dict[str, torch.Tensor]:
    """LongcatFlashForCausalLM's weights: the generic names, each layer's experts stacked (gate_up_proj rows are
    [w1; w3], down_proj is w2), the router as mlp.router.classifier. LongCat's MLA multiplies the query by
    sqrt(hidden / q_lora_rank) and the normalised key latent by sqrt(hidden / kv_lora_rank) (LoRA scaling); ours
    does not, so the export divides them out of q_b_proj and of kv_a_layernorm's gain: the same function."""
    c = model.config
    q_scale, kv_scale = math.sqrt(c.n_embd / c.q_lora_rank), math.sqrt(c.n_embd / c.kv_lora_rank)
    out = {}
    for name, tensor in generic_state_dict(model, "LongcatFlashForCausalLM").items():
        layer, _, rest = name.partition(".mlp.")
        if ".experts." in name or rest == "gate.weight":
            continue
        if rest == "gate.e_score_correction_bias":
            name = f"{layer}.mlp.router.e_score_correction_bias"
        elif name.endswith("q_b_proj.weight"):
            tensor = tensor / q_scale
        elif name.endswith("kv_a_layernorm.weight"):
            tensor = tensor / kv_scale
        out[name] = tensor
    for i, block in enumerate(model.layers):
        experts, at = list(block.ffn.experts.values()), f"model.layers.{i}.mlp."
        out[at + "router.classifier.weight"] = block.ffn.gate.weight.detach()
        out[at + "experts.gate_up_proj"] = torch.stack([torch.cat((e.w1.weight, e.w3.weight)) for e in experts]).detach()
        out[at + "experts.down_proj"] = torch.stack([e.w2.weight for e in experts]).detach()
    return out


def zero_centered(name: str, gain: torch.Tensor) -> torch.Tensor:
    """Qwen3-Next's RMSNorm scales by 1 + w (w starts at 0, so weight decay pulls the gain toward 1, not 0): our
    gain g is written as g - 1, which is exact for every g in [0.5, 2^24] (Sterbenz), checked for the g there are."""
    w = gain.detach() - 1
    if not torch.equal(1 + w, gain.detach()):
        raise ValueError(f"{name}: a norm gain (say {gain.min().item():g}) that 1 + w cannot give back exactly")
    return w


def qwen3_next_state_dict(model: Transformer) -> dict[str, torch.Tensor]:
    """Qwen3NextForCausalLM's weights. A linear layer's projections are fused in transformers per key head:
    in_proj_qkvz rows are, for each of the linear_num_key_heads, [q, k, the v and z of its value heads], and
    in_proj_ba rows [b, a of its value heads]; a full layer's q_proj rows are [q, gate] per head."""
    c = model.config
    out = {"model.embed_tokens.weight": model.wte.weight, "model.norm.weight": zero_centered("norm", model.norm.weight)}
    if not c.tie_embeddings:
        out["lm_head.weight"] = model.lm_head.weight
    groups = c.linear_num_key_heads
    for i, block in enumerate(model.layers):
        at, a = f"model.layers.{i}.", block.attn
        out[at + "input_layernorm.weight"] = zero_centered(f"layer {i} attn_norm", block.attn_norm.weight)
        out[at + "post_attention_layernorm.weight"] = zero_centered(f"layer {i} ffn_norm", block.ffn_norm.weight)
        for ours, theirs in (("w1", "gate_proj"), ("w3", "up_proj"), ("w2", "down_proj")):
            out[at + f"mlp.{theirs}.weight"] = getattr(block.ffn, ours).weight
        if block.linear:
            per_group = lambda w: w.view(groups, -1, w.size(-1))  # noqa: E731 (rows of each key head's group)
            qkvz = torch.cat([per_group(m.weight) for m in (a.wq, a.wk, a.wv, a.wz)], dim=1)
            out |= {at + "linear_attn.in_proj_qkvz.weight": qkvz.reshape(-1, c.n_embd),
                    at + "linear_attn.in_proj_ba.weight": torch.cat((per_group(a.wb.weight), per_group(a.wa.weight)),
                                                                    dim=1).reshape(-1, c.n_embd),
                    at + "linear_attn.conv1d.weight": a.conv.weight, at + "linear_attn.A_log": a.A_log,
                    at + "linear_attn.dt_bias": a.dt_bias, at + "linear_attn.norm.weight": a.norm_weight,
                    at + "linear_attn.out_proj.weight": a.wo.weight}
        else:
            q_and_gate = torch.stack((a.wq.weight.view(c.n_head, c.head_dim, -1), a.wg.weight.view(c.n_head, c.head_dim, -1)), 1)
            out |= {at + "self_attn.q_proj.weight": q_and_gate.reshape(-1, c.n_embd),
                    at + "self_attn.k_proj.weight": a.wk.weight, at + "self_attn.v_proj.weight": a.wv.weight,
                    at + "self_attn.o_proj.weight": a.wo.weight,
                    at + "self_attn.q_norm.weight": zero_centered(f"layer {i} q_norm", a.q_norm.weight),
                    at + "self_attn.k_norm.weight": zero_centered(f"layer {i} k_norm", a.k_norm.weight)}
    return {name: t.detach().contiguous() for name, t in out.items()}


def hf_tokenizer(tokenizer: Tokenizer):
    """Our sentencepiece BPE as a `tokenizers.Tokenizer` (the module docstring says why it is exact), checked on the
    text of every piece and on all of them joined. ValueError if any text gets other ids."""
    from tokenizers import AddedToken, Tokenizer as HFTokenizer, decoders, models  # the "hf" extra, as safetensors

    sp = tokenizer.sp
    pieces = [sp.id_to_piece(i).replace(SPACE_MARK, " ") for i in range(tokenizer.vocab_size)]
    text_ids = [i for i in range(tokenizer.vocab_size) if not (sp.is_control(i) or sp.is_unknown(i) or sp.is_byte(i))]
    bpe = models.BPE(vocab={piece: i for i, piece in enumerate(pieces)}, merges=bpe_merges(sp, pieces, text_ids),
                     unk_token=SPECIAL_TOKENS[UNK_ID], byte_fallback=True)
    hf = HFTokenizer(bpe)  # no normaliser and no pre-tokenizer: sentencepiece encodes with neither
    hf.decoder = decoders.Sequence([decoders.ByteFallback(), decoders.Fuse()])
    hf.add_special_tokens([AddedToken(token, special=True, normalized=False) for token in SPECIAL_TOKENS])
    texts = [pieces[i] for i in text_ids]
    texts.append("".join(texts))
    theirs = hf.encode_batch(texts, add_special_tokens=False)
    for text, ours, encoding in zip(texts, tokenizer.encode_batch(texts, num_threads=1), theirs):
        if ours != encoding.ids:
            raise ValueError(f"the Hugging Face tokenizer encodes {text!r} to {encoding.ids}, ours to {ours}")
    return hf


def bpe_merges(sp, pieces: list[str], text_ids: list[int]) -> list[tuple[str, str]]:
    """Every split of a text piece into two text pieces, ranked by the piece's score, best first: sentencepiece
    merges any two neighbours that make a piece (not only the pair the trainer joined), the best-scored first. Byte
    pieces and special tokens are never made by a merge: sentencepiece does not match them in text."""
    merged = sorted((i for i in text_ids if len(pieces[i]) > 1), key=lambda i: -sp.get_score(i))
    scores = [sp.get_score(i) for i in merged]
    if len(set(scores)) < len(scores):  # tokenizer.py's BPE scores its k-th merge -k; ties would break exactness
        raise ValueError("the tokenizer's merged pieces share scores: not a sentencepiece BPE model from tokenizer.py")
    is_text = {pieces[i] for i in text_ids}
    return [(piece[:k], piece[k:]) for piece in (pieces[i] for i in merged) for k in range(1, len(piece))
            if piece[:k] in is_text and piece[k:] in is_text]


def export(model: Transformer, tokenizer_path: str, out_dir: str, source: str = "") -> str:
    """Write the Hugging Face folder for model; returns the architecture. ValueError if none fits exactly."""
    from safetensors.torch import save  # only the export needs it (the "hf" extra)

    arch = hf_architecture(model.config)
    config, weights = hf_config(model.config, arch), hf_state_dict(model, arch)
    hf = hf_tokenizer(Tokenizer(tokenizer_path))
    os.makedirs(out_dir, exist_ok=True)
    with atomic_write(os.path.join(out_dir, "model.safetensors")) as f:
        f.write(save(weights, metadata={"format": "pt"}))
    copy_file(tokenizer_path, os.path.join(out_dir, "tokenizer.model"))
    readme = README.format(name=os.path.basename(os.path.abspath(out_dir)), ckpt=source, arch=arch, out=out_dir,
                           params=model.num_params(non_embedding=False),
                           ids=", ".join(f"`{token}` {i}" for i, token in enumerate(SPECIAL_TOKENS)))
    files = {
        "tokenizer.json": hf.to_str(pretty=True),
        "tokenizer_config.json": to_json(TOKENIZER_CONFIG),
        "generation_config.json": to_json(GENERATION_CONFIG),
        "README.md": readme,
        "config.json": to_json(config),  # last: a folder with a config.json is complete
    }
    for name, text in files.items():
        with atomic_write(os.path.join(out_dir, name), "w") as f:
            f.write(text)
    return arch


def to_json(data: dict) -> str:
    return json.dumps(data, indent=2, ensure_ascii=False) + "\n"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--ckpt", default="out", help="out_dir of a training run (ckpt.pt + tokenizer.model)")
    parser.add_argument("--out", required=True, help="folder to write the Hugging Face model into")
    args = parser.parse_args(argv)
    if os.path.exists(args.out) and not os.path.isdir(args.out):
        raise SystemExit(f"--out {args.out} exists and is not a folder")
    model, _ = load_model(args.ckpt, "cpu")
    try:
        arch = export(model, os.path.join(args.ckpt, "tokenizer.model"), args.out, source=args.ckpt)
    except ValueError as e:
        raise SystemExit(f"cannot export {args.ckpt} exactly: {e}")
    except ImportError:
        raise SystemExit("export_hf.py needs safetensors and tokenizers: pip install '.[hf]'")
    except OSError as e:  # an --out that cannot be created or written, a full disk
        raise SystemExit(f"export_hf.py: cannot write {e.filename or args.out}: {e.strerror}")
    print(f"wrote {args.out} ({arch}); load it with AutoModelForCausalLM.from_pretrained({args.out!r})", file=sys.stderr)


if __name__ == "__main__":
    main()
