"""export_hf.py: each family of our model, exported and loaded by Hugging Face transformers, computes our logits
(fp32, within 1e-4) and our greedy generations, including RoPE scaling at positions past the original context;
what no transformers class represents exactly is refused."""

import json
import os
import shutil
import subprocess
import sys
from dataclasses import asdict

import pytest
import torch
import transformers
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

from export_hf import export
from model import ModelConfig, Transformer, beam_search
from checkpoint import load_model

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BASE = dict(vocab_size=64, block_size=32, n_layer=2, n_head=4, n_kv_head=2, n_embd=32, rope_theta=1e4)
MLA = dict(attn="mla", kv_lora_rank=16, qk_nope_head_dim=8, qk_rope_head_dim=8, v_head_dim=12)
MOE = dict(n_routed_experts=8, n_shared_experts=2, num_experts_per_tok=3, n_group=4, topk_group=2, moe_inter_dim=16,
           routed_scaling_factor=2.5)
FAMILIES = {
    "llama_gqa_tied": ({}, "LlamaForCausalLM"),
    "llama_mha_untied": (dict(n_kv_head=4, tie_embeddings=False), "LlamaForCausalLM"),
    "qwen2_qkv_bias": (dict(qkv_bias=True, tie_embeddings=False), "Qwen2ForCausalLM"),
    "mla_with_q_lora": ({**MLA, "q_lora_rank": 24}, "DeepseekV3ForCausalLM"),
    "mla_without_q_lora": ({**MLA, "tie_embeddings": False}, "DeepseekV3ForCausalLM"),
    "mla_moe_shared_groups_sigmoid": ({**MLA, **MOE}, "DeepseekV3ForCausalLM"),
    "gqa_moe": ({**MOE, "qkv_bias": True, "first_k_dense_replace": 0, "norm_topk_prob": False}, "Glm4MoeForCausalLM"),
}
ORIGINAL = 8  # RoPE scaling: "trained" on 8 positions, compared on 24
ROPE_SCALINGS = {
    "linear": ({"rope_type": "linear", "factor": 4.0}, {}),
    "dynamic": ({"rope_type": "dynamic", "factor": 4.0, "original_max_position_embeddings": ORIGINAL}, {}),
    "yarn": ({"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": ORIGINAL, "beta_fast": 8,
              "beta_slow": 2}, {}),
    "llama3": ({"rope_type": "llama3", "factor": 4.0, "original_max_position_embeddings": ORIGINAL,
                "low_freq_factor": 1.0, "high_freq_factor": 4.0}, {}),
    "yarn_mla_deepseek_mscale": ({"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": ORIGINAL,
                                  "mscale": 1.0, "mscale_all_dim": 1.0}, MLA),
}
transformers.logging.set_verbosity_error()


def lively_model(**overrides):
    """Random weights of every kind at a scale where every part matters: norm gains, biases, and the expert
    biases (which steer routing) included."""
    torch.manual_seed(0)
    model = Transformer(ModelConfig(**{**BASE, **overrides})).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0.0, 0.3) if p.dim() > 1 else p.uniform_(0.5, 1.5)
        for moe in model.moe_layers():
            moe.gate.bias.normal_(0.0, 0.1)
    return model


def export_and_load(model, tmp_path):
    tokenizer = tmp_path / "tokenizer.model"
    tokenizer.write_bytes(b"export copies the tokenizer; it does not read it")
    arch = export(model, str(tokenizer), str(tmp_path / "hf"))
    return arch, AutoModelForCausalLM.from_pretrained(tmp_path / "hf").eval()


def assert_same_function(ours, theirs):
    idx = torch.randint(0, 64, (2, 24), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        torch.testing.assert_close(theirs(idx).logits, ours(idx)[0], rtol=0, atol=1e-4)
        prompt, n = idx[:1, :6], 14  # generation runs past the 8 original positions too
        expected = torch.stack(list(ours.generate(prompt, n, temperature=0)), dim=1)
        got = theirs.generate(prompt, max_new_tokens=n, do_sample=False, eos_token_id=None, pad_token_id=0)
    assert torch.equal(got[:, prompt.size(1):], expected)


@pytest.mark.parametrize("family", FAMILIES)
def test_transformers_computes_our_logits_and_generations(family, tmp_path):
    overrides, expected_arch = FAMILIES[family]
    model = lively_model(**overrides)
    arch, hf = export_and_load(model, tmp_path)
    assert arch == expected_arch == type(hf).__name__
    assert_same_function(model, hf)


@pytest.mark.parametrize("scaling", ROPE_SCALINGS)
def test_rope_scaling_agrees_past_the_original_context(scaling, tmp_path):
    rope_scaling, attn = ROPE_SCALINGS[scaling]
    model = lively_model(rope_scaling=rope_scaling, **attn)
    _, hf = export_and_load(model, tmp_path)
    assert_same_function(model, hf)
    # The scaling matters at these positions: without it the same weights give other logits.
    unscaled = Transformer(ModelConfig(**{**BASE, **attn}))
    unscaled.load_state_dict(model.state_dict())
    idx = torch.randint(0, 64, (1, 24))
    with torch.no_grad():
        assert not torch.allclose(unscaled.eval()(idx)[0], model(idx)[0], atol=1e-3)


@pytest.mark.parametrize("tie", [True, False])
def test_tied_embeddings_are_explicit_in_config_and_weights(tie, tmp_path):
    _, hf = export_and_load(lively_model(**MLA, tie_embeddings=tie), tmp_path)
    config = json.loads((tmp_path / "hf" / "config.json").read_text())
    weights = load_file(tmp_path / "hf" / "model.safetensors")
    assert config["tie_word_embeddings"] is tie
    assert ("lm_head.weight" in weights) is not tie
    assert (hf.lm_head.weight.data_ptr() == hf.model.embed_tokens.weight.data_ptr()) is tie


def export_cli(*args):
    return subprocess.run([sys.executable, os.path.join(ROOT, "export_hf.py"), *args], cwd=ROOT,
                          capture_output=True, text=True, timeout=120)


def test_cli_exports_a_trained_checkpoint_with_its_tokenizer(trained_ckpt, tmp_path):
    out = tmp_path / "hf"
    for _ in range(2):  # a second export over the first replaces it cleanly
        result = export_cli("--ckpt", trained_ckpt, "--out", str(out))
        assert result.returncode == 0, result.stderr
    assert sorted(os.listdir(out)) == ["README.md", "config.json", "model.safetensors", "tokenizer.model"]
    assert (out / "tokenizer.model").read_bytes() == open(os.path.join(trained_ckpt, "tokenizer.model"), "rb").read()
    assert "AutoModelForCausalLM.from_pretrained" in (out / "README.md").read_text()
    model, tokenizer = load_model(trained_ckpt, "cpu")
    hf = AutoModelForCausalLM.from_pretrained(out).eval()
    idx = torch.tensor([tokenizer.encode("def add(a, b):\n    return a + b\n")])
    with torch.no_grad():
        torch.testing.assert_close(hf(idx).logits, model(idx)[0], rtol=0, atol=1e-4)


def test_a_lora_run_exports_merged(trained_ckpt, prepared_data, tmp_path):
    # Two LoRA steps on the base's own data, then the export: a plain transformers model computing the merged one.
    train = subprocess.run([sys.executable, os.path.join(ROOT, "train.py"), f"--data_dir={prepared_data}",
                            f"--init_from={trained_ckpt}", f"--out_dir={tmp_path}/lora", "--lora_rank=4",
                            "--learning_rate=1e-2", "--max_iters=2", "--eval_interval=2", "--eval_iters=1",
                            "--batch_size=2", "--warmup_iters=0"], cwd=ROOT, capture_output=True, text=True,
                           timeout=120)
    assert train.returncode == 0, train.stderr[-2000:]
    result = export_cli("--ckpt", str(tmp_path / "lora"), "--out", str(tmp_path / "hf"))
    assert result.returncode == 0, result.stderr
    merged, tokenizer = load_model(str(tmp_path / "lora"), "cpu")
    base, _ = load_model(trained_ckpt, "cpu")
    hf = AutoModelForCausalLM.from_pretrained(tmp_path / "hf").eval()
    idx = torch.tensor([tokenizer.encode("def add(a, b):\n    return a + b\n")])
    with torch.no_grad():
        torch.testing.assert_close(hf(idx).logits, merged(idx)[0], rtol=0, atol=1e-4)
        assert (merged(idx)[0] - base(idx)[0]).abs().max() > 1e-3  # the adapters are in it


def test_cli_refuses_what_no_transformers_class_represents(trained_ckpt, tmp_path):
    # DeepSeek-V2's softmax router with V3's group routing: no transformers class computes it.
    vocab = load_model(trained_ckpt, "cpu")[0].config.vocab_size
    config = ModelConfig(**{**BASE, "vocab_size": vocab}, **MOE, scoring_func="softmax")
    ckpt = tmp_path / "softmax"
    ckpt.mkdir()
    torch.save({"model": Transformer(config).state_dict(), "model_config": asdict(config)}, ckpt / "ckpt.pt")
    shutil.copyfile(os.path.join(trained_ckpt, "tokenizer.model"), ckpt / "tokenizer.model")
    result = export_cli("--ckpt", str(ckpt), "--out", str(tmp_path / "hf"))
    assert result.returncode == 1 and "Traceback" not in result.stderr
    assert "cannot export" in result.stderr and "sigmoid" in result.stderr
    assert not (tmp_path / "hf" / "config.json").exists()


def test_cli_bad_inputs_are_one_clear_sentence(trained_ckpt, tmp_path):
    result = export_cli("--ckpt", str(tmp_path / "nowhere"), "--out", str(tmp_path / "hf"))
    assert result.returncode == 1 and "ckpt.pt not found" in result.stderr and "Traceback" not in result.stderr
    (tmp_path / "file").write_text("")
    result = export_cli("--ckpt", trained_ckpt, "--out", str(tmp_path / "file"))
    assert result.returncode == 1 and "is not a folder" in result.stderr
    result = export_cli("--ckpt", trained_ckpt, "--out", str(tmp_path / "file" / "hf"))  # a folder under a file
    assert result.returncode == 1 and "cannot write" in result.stderr and "Traceback" not in result.stderr


@pytest.mark.parametrize("family", ["llama_gqa_tied", "mla_with_q_lora"])
def test_beam_search_gives_the_tokens_of_transformers_beam_search(family, tmp_path):
    model = lively_model(**FAMILIES[family][0])
    _, hf = export_and_load(model, tmp_path)
    generator = torch.Generator().manual_seed(2)
    ended_early = 0
    for length in (3, 5, 8):  # three prompts, each under four settings of the search
        prompt = torch.randint(3, 64, (1, length), generator=generator)
        free = beam_search(model, prompt, 12, 4)  # stop ids the search meets: tokens its best hypothesis holds
        for num_beams, length_penalty, early_stopping, stop_ids in ((4, 1.0, False, free[0][3:4]),
                                                                     (3, 0.5, True, free[0][2:4]),
                                                                     (5, 2.0, "never", free[0][5:6]),
                                                                     (2, 1.0, False, [])):
            ours = beam_search(model, prompt, 12, num_beams, stop_ids, length_penalty, early_stopping)[0]
            theirs = hf.generate(prompt, max_new_tokens=12, num_beams=num_beams, do_sample=False,
                                 length_penalty=length_penalty, early_stopping=early_stopping, pad_token_id=0,
                                 eos_token_id=stop_ids or None)[0, length:].tolist()
            # transformers returns the best hypothesis padded to the longest it kept
            assert ours == theirs[:len(ours)] and set(theirs[len(ours):]) <= {0}, (num_beams, ours, theirs)
            ended_early += len(ours) < 12
    assert ended_early > 0  # some hypotheses ended at a stop id, so that rule was compared too


def test_repetition_penalty_min_new_tokens_and_stop_ids_give_the_tokens_of_transformers(tmp_path):
    model = lively_model()
    _, hf = export_and_load(model, tmp_path)
    generator = torch.Generator().manual_seed(3)
    replies = set()
    for length in (3, 6):
        prompt = torch.randint(3, 64, (1, length), generator=generator)
        free = torch.cat(list(model.generate(prompt, 12, temperature=0))).tolist()
        stop = free[2]  # greedy would stop after 3 tokens: min_new_tokens=6 must forbid it until then
        for penalty in (1.0, 1.3, 0.8):
            ours = torch.cat(list(model.generate(prompt, 12, temperature=0, repetition_penalty=penalty,
                                                 min_new_tokens=6, stop_ids=[stop]))).tolist()
            theirs = hf.generate(prompt, max_new_tokens=12, do_sample=False, repetition_penalty=penalty,
                                 min_new_tokens=6, eos_token_id=stop, pad_token_id=0)[0, length:].tolist()
            assert ours == theirs, (penalty, ours, theirs)
            assert stop not in ours[:6] and (stop not in ours or ours.index(stop) == len(ours) - 1)
            replies.add(tuple(ours))
    assert len(replies) > 2  # the penalties changed what was generated
