"""
export_hf.py: write a train.py checkpoint as a Hugging Face transformers model folder.

    python export_hf.py --ckpt out/cpu_demo --out out/cpu_demo/hf
    python -c "from transformers import AutoModelForCausalLM; AutoModelForCausalLM.from_pretrained('out/cpu_demo/hf')"

The one idea: an export is worth something only if it is exact. Each of our architectures is one that a
transformers class computes to the last digit, and we write its config.json and weight names:
  GQA + dense MLP            LlamaForCausalLM  (Qwen2ForCausalLM with qkv_bias: biases on q, k, v only)
  GQA + DeepSeek MoE         Glm4MoeForCausalLM (GLM-4.5: Llama-style attention, DeepSeek-V3's router)
  MLA, dense MLP or MoE      DeepseekV3ForCausalLM (a model without MoE is one whose dense layers never end)
Anything no class represents exactly is refused with the reason; an approximate export is never written.
tests/test_export_hf.py loads every family back into transformers and compares logits and generations.

Writes config.json, model.safetensors, the tokenizer.model of the run and a README.md on loading it. Each file
goes to a temporary name and is renamed into place, config.json last: a folder with a config.json is complete.
"""

import argparse
import json
import os
import sys

import torch

from checkpoint import load_model  # reads and checks the checkpoint and its tokenizer, with clear errors
from files import atomic_write, copy_file
from model import ModelConfig, Transformer
from tokenizer import BOS_ID, EOS_ID, PAD_ID

# Our module names, component by component, to Hugging Face's (the same in all four classes).
HF_NAMES = {
    "wte": "embed_tokens", "attn_norm": "input_layernorm", "ffn_norm": "post_attention_layernorm",
    "attn": "self_attn", "ffn": "mlp", "wq": "q_proj", "wk": "k_proj", "wv": "v_proj", "wo": "o_proj",
    "wq_a": "q_a_proj", "q_norm": "q_a_layernorm", "wq_b": "q_b_proj", "wkv_a": "kv_a_proj_with_mqa",
    "kv_norm": "kv_a_layernorm", "wkv_b": "kv_b_proj", "w1": "gate_proj", "w3": "up_proj", "w2": "down_proj",
}

README = """# {name}

Exported by myllm's export_hf.py from `{ckpt}` ({arch}, {params:,} parameters).

```python
from transformers import AutoModelForCausalLM
model = AutoModelForCausalLM.from_pretrained("{out}")
```

The tokenizer is myllm's lossless sentencepiece BPE (`tokenizer.model`; ids: <pad> {pad}, <s> {bos}, </s> {eos}).
Load it with myllm's `tokenizer.py`, which round-trips every string exactly:

```python
from tokenizer import Tokenizer
tok = Tokenizer("{out}/tokenizer.model")
ids = tok.encode("def fibonacci(n):")
```

Plain sentencepiece (`sentencepiece.SentencePieceProcessor(model_file="tokenizer.model").encode(text)`) gives the
same ids for any text without a literal U+2581 character (`tokenizer.py` escapes that one as its UTF-8 bytes).
No transformers tokenizer files are written: the export writes only what it has checked to be exact.
"""


def hf_architecture(config: ModelConfig) -> str:
    """The transformers class that computes exactly our model, or ValueError saying why none does."""
    if config.n_routed_experts and config.scoring_func != "sigmoid":
        raise ValueError("transformers' DeepSeek-style routers (DeepseekV3, Glm4Moe) score experts with a sigmoid, "
                         f"not {config.scoring_func}")
    if config.attn == "mla":
        return "DeepseekV3ForCausalLM"
    if config.n_routed_experts:
        return "Glm4MoeForCausalLM"
    return "Qwen2ForCausalLM" if config.qkv_bias else "LlamaForCausalLM"


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
        "num_key_value_heads": config.n_kv_head, "intermediate_size": config.inter_dim, "hidden_act": "silu",
        "max_position_embeddings": max_positions, "rms_norm_eps": config.norm_eps, "rope_parameters": rope,
        "tie_word_embeddings": config.tie_embeddings, "attention_dropout": 0.0, "dtype": "float32",
        "bos_token_id": BOS_ID, "eos_token_id": EOS_ID, "pad_token_id": PAD_ID,
    }
    if arch == "LlamaForCausalLM":
        hf |= {"model_type": "llama", "head_dim": config.head_dim, "attention_bias": False, "mlp_bias": False}
    elif arch == "Qwen2ForCausalLM":
        hf |= {"model_type": "qwen2", "use_sliding_window": False}
    if config.n_routed_experts or arch == "DeepseekV3ForCausalLM":
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
    elif arch == "DeepseekV3ForCausalLM":
        hf |= {"model_type": "deepseek_v3", "num_key_value_heads": config.n_head,  # MLA: every head its own key
               "q_lora_rank": config.q_lora_rank or None, "kv_lora_rank": config.kv_lora_rank,
               "qk_nope_head_dim": config.qk_nope_head_dim, "qk_rope_head_dim": config.qk_rope_head_dim,
               "v_head_dim": config.v_head_dim, "rope_interleave": True, "attention_bias": False}
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
    c = model.config
    out = {}
    for name, tensor in model.state_dict().items():
        if name == "lm_head.weight" and c.tie_embeddings:
            continue
        if arch == "DeepseekV3ForCausalLM" and name.endswith(("attn.wq.weight", "attn.wq_b.weight")):
            tensor = interleave_rope_rows(tensor, c.qk_nope_head_dim + c.qk_rope_head_dim, c.qk_rope_head_dim)
        elif arch == "DeepseekV3ForCausalLM" and name.endswith("attn.wkv_a.weight"):
            tensor = interleave_rope_rows(tensor, c.kv_lora_rank + c.qk_rope_head_dim, c.qk_rope_head_dim)
        hf_name = ".".join(HF_NAMES.get(part, part) for part in name.split("."))
        if hf_name.endswith("mlp.gate.bias"):
            hf_name = hf_name.replace("gate.bias", "gate.e_score_correction_bias")
        out[hf_name if hf_name.startswith("lm_head") else "model." + hf_name] = tensor.detach().contiguous()
    return out


def export(model: Transformer, tokenizer_path: str, out_dir: str, source: str = "") -> str:
    """Write the Hugging Face folder for model; returns the architecture. ValueError if none fits exactly."""
    from safetensors.torch import save  # only the export needs it (the "hf" extra)

    arch = hf_architecture(model.config)
    config, weights = hf_config(model.config, arch), hf_state_dict(model, arch)
    os.makedirs(out_dir, exist_ok=True)
    with atomic_write(os.path.join(out_dir, "model.safetensors")) as f:
        f.write(save(weights, metadata={"format": "pt"}))
    copy_file(tokenizer_path, os.path.join(out_dir, "tokenizer.model"))
    readme = README.format(name=os.path.basename(os.path.abspath(out_dir)), ckpt=source, arch=arch, out=out_dir,
                           params=model.num_params(non_embedding=False), pad=PAD_ID, bos=BOS_ID, eos=EOS_ID)
    with atomic_write(os.path.join(out_dir, "README.md"), "w") as f:
        f.write(readme)
    with atomic_write(os.path.join(out_dir, "config.json"), "w") as f:  # last: a folder with config.json is complete
        f.write(json.dumps(config, indent=2) + "\n")
    return arch


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
        raise SystemExit("export_hf.py needs safetensors: pip install '.[hf]'")
    except OSError as e:  # an --out that cannot be created or written, a full disk
        raise SystemExit(f"export_hf.py: cannot write {e.filename or args.out}: {e.strerror}")
    print(f"wrote {args.out} ({arch}); load it with AutoModelForCausalLM.from_pretrained({args.out!r})", file=sys.stderr)


if __name__ == "__main__":
    main()
