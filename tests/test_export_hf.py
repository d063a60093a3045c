"""export_hf.py: each family of our model, exported and loaded by Hugging Face transformers, computes our logits
(fp32, within 1e-4) and our greedy generations, including RoPE scaling at positions past the original context;
what no transformers class represents exactly is refused. The exported tokenizer gives our ids on a megabyte of
held-out code, Chinese, emoji and whitespace, its chat template gives render_chat's ids, and pipeline() generates
what our model does."""

import json
import os
import random
import shutil
import subprocess
import sys
import sysconfig
from dataclasses import asdict
from pathlib import Path

import pytest
import torch
import transformers
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, AutoTokenizer, pipeline

from export_hf import export, hf_architecture
from model import ModelConfig, Transformer, beam_search
from checkpoint import load_model
from tokenizer import EOS_ID, IM_END_ID, IM_START_ID, SPACE_MARK, SPECIAL_TOKENS, Tokenizer, train_tokenizer

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BASE = dict(vocab_size=64, block_size=32, n_layer=2, n_head=4, n_kv_head=2, n_embd=32, rope_theta=1e4)
MLA = dict(attn="mla", kv_lora_rank=16, qk_nope_head_dim=8, qk_rope_head_dim=8, v_head_dim=12)
MOE = dict(n_routed_experts=8, n_shared_experts=2, num_experts_per_tok=3, n_group=4, topk_group=2, moe_inter_dim=16,
           routed_scaling_factor=2.5)
LINEAR = dict(linear_num_key_heads=2, linear_num_value_heads=4, linear_key_head_dim=8, linear_value_head_dim=6,
              linear_chunk_size=8)
GATED = dict(qk_norm=True, attn_output_gate=True)
DSA = dict(q_lora_rank=24, index_n_heads=16, index_head_dim=12, index_topk=6)
FAMILIES = {
    "qwen3_next_hybrid": (dict(layer_types=["linear_attention", "full_attention"], **GATED, **LINEAR,
                               tie_embeddings=False), "Qwen3NextForCausalLM"),
    "qwen3_next_linear_first_tied": (dict(n_layer=3, layer_types=["linear_attention"] * 2 + ["full_attention"],
                                          **GATED, **LINEAR), "Qwen3NextForCausalLM"),
    "qwen3_next_full_attention": (dict(**GATED, n_kv_head=1), "Qwen3NextForCausalLM"),
    "llama_gqa_tied": ({}, "LlamaForCausalLM"),
    "llama_mha_untied": (dict(n_kv_head=4, tie_embeddings=False), "LlamaForCausalLM"),
    "llama_qkv_bias": (dict(qkv_bias=True, tie_embeddings=False), "LlamaForCausalLM"),
    "arcee_relu2_qkv_bias": (dict(hidden_act="relu2", qkv_bias=True, tie_embeddings=False), "ArceeForCausalLM"),
    "mla_with_q_lora": ({**MLA, "q_lora_rank": 24}, "DeepseekV3ForCausalLM"),
    "mla_without_q_lora": ({**MLA, "tie_embeddings": False}, "DeepseekV3ForCausalLM"),
    # With an MTP module, which the export leaves out (it only trains and drafts): the main model is exported.
    "mla_moe_shared_groups_sigmoid": ({**MLA, **MOE, "mtp_depth": 1}, "DeepseekV3ForCausalLM"),
    # DeepSeek Sparse Attention, 6 keys chosen of up to 24. 16 index heads: a key scores exactly 0 only where all 16
    # ReLUs are 0, so no tie sits at a top-k boundary here (at one, transformers' topk may take another tied key).
    "ministral_sliding_then_full": (dict(layer_types=["sliding_attention", "full_attention"], sliding_window=5),
                                    "MinistralForCausalLM"),
    "mla_dsa": ({**MLA, **DSA}, "DeepseekV32ForCausalLM"),
    "mla_dsa_moe_untied": ({**MLA, **MOE, **DSA, "tie_embeddings": False}, "DeepseekV32ForCausalLM"),
    "gqa_moe": ({**MOE, "qkv_bias": True, "first_k_dense_replace": 0, "norm_topk_prob": False}, "Glm4MoeForCausalLM"),
    # ScMoE's shortcut layers (two MLA sublayers each) and LongCat-Flash's router: a softmax over 6 routed and 3 zero
    # experts, 3 chosen, weights not renormalised.
    "longcat_shortcut_zero_experts": ({**MLA, "q_lora_rank": 24, "n_routed_experts": 6, "zero_expert_num": 3,
                                       "num_experts_per_tok": 3, "n_shared_experts": 0, "moe_inter_dim": 16,
                                       "scoring_func": "softmax", "norm_topk_prob": False, "routed_scaling_factor": 2.0,
                                       "first_k_dense_replace": 0, "moe_shortcut": True, "tie_embeddings": False},
                                      "LongcatFlashForCausalLM"),
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

STDLIB = sorted(Path(sysconfig.get_paths()["stdlib"]).glob("*.py"))
# Common Chinese words, commonest first: text drawn from them Zipf-like repeats them enough for BPE to merge them.
CHINESE_WORDS = """的 是 在 我们 一个 没有 中国 他们 自己 这个 什么 可以 就是 时候 知道 已经 因为 所以 如果 还是 问题
    工作 现在 生活 发展 社会 国家 人民 经济 我 你 他 她 和 了 不 有 也 都 很 说 要 去 来 看 想 会 能 做 上 下 大 小
    多 好 新 人 年 天 时间 地方 世界 文化 历史 学习 学生 老师 朋友 孩子 家庭 城市 北京 上海 电脑 手机 程序 代码 函数
    数据 系统 网络 技术 科学 研究 方法 结果 重要 简单 容易 非常 一起 今天 明天 昨天 东西 事情 开始 最后 可能 应该
    需要 希望 喜欢 觉得 认为 表示 进行 通过 根据 关于 以及 或者 但是 而且 虽然 然后""".split()
# Characters and runs that tokenizers tend to get wrong: sentencepiece's own space mark, whitespace of every kind,
# emoji made of several code points, decomposed accents, characters no vocabulary holds (byte fallback).
EXTRAS = [SPACE_MARK, SPACE_MARK * 3, f"a{SPACE_MARK}b", " " * 2, " " * 5, " " * 17, "\t", "\t\t\t", " \t ",
          "\r\n", "\n\n", "\xa0", "\u3000", "\x00", "\ufeff", "😀", "👨‍👩‍👧‍👦", "🇨🇳", "👍🏽", "e\u0301",
          "ﬁ", "½", "0123456789", "<0x41>", "龘", "𠀀", "。", "，", "“引号”"]

SAMPLES = ["def f(x):\n\treturn  x  # 中文注释 😀\n", "我们的程序，没有问题。", f"{SPACE_MARK}a{SPACE_MARK * 2} \t\t  b\n"]


def chinese_text(rng, n_words):
    """Sentences of Zipf-distributed common words, with Chinese punctuation and line breaks."""
    out = []
    for _ in range(n_words):
        out.append(CHINESE_WORDS[min(int(rng.paretovariate(1.0)), len(CHINESE_WORDS)) - 1])
        if rng.random() < 0.1:
            out.append(rng.choice("，，，。。\n！？、"))
    return "".join(out)


def mixed_lines(rng, n_lines, code_words):
    """Lines that jumble code, Chinese and EXTRAS: every junction of two kinds of text appears somewhere."""
    parts = [code_words, CHINESE_WORDS, EXTRAS]
    return "\n".join("".join(rng.choice(rng.choice(parts)) for _ in range(rng.randint(1, 20))) for _ in range(n_lines))


def rare_characters(rng, n):
    """Characters from all over Unicode (CJK, emoji, Cyrillic, CJK extension B): most are in no vocabulary."""
    ranges = [(0x4E00, 0x9FFF), (0x1F300, 0x1FAFF), (0x0400, 0x04FF), (0x20000, 0x2A6DF)]
    return "".join(chr(rng.randint(*rng.choice(ranges))) for _ in range(n))


def mixed_corpus(seed, files, megabytes):
    """Standard-library source from files (up to `megabytes` of it), then Chinese, mixed lines and rare characters."""
    rng, texts, size = random.Random(seed), [], 0
    for path in files:
        texts.append(path.read_text(encoding="utf-8", errors="replace"))
        size += len(texts[-1].encode())
        if size > megabytes * 1e6:
            break
    code_words = " ".join(texts[:3]).split(" ")
    texts += [chinese_text(rng, 2000) for _ in range(40)] + [mixed_lines(rng, 300, code_words) for _ in range(10)]
    texts.append(rare_characters(rng, 3000))
    return texts


@pytest.fixture(scope="module")
def mixed_tokenizer(tmp_path_factory) -> str:
    """A 2,000-token tokenizer trained on code, Chinese and mixed text, so its vocabulary holds CJK merges."""
    return train_tokenizer(mixed_corpus(0, STDLIB[0::6], 1.0), 2000, str(tmp_path_factory.mktemp("mixed")))


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


def export_and_load(model, tmp_path, tokenizer_path):
    arch = export(model, tokenizer_path, str(tmp_path / "hf"))
    return arch, AutoModelForCausalLM.from_pretrained(tmp_path / "hf").eval()


def assert_same_ids(tokenizer, expected, got, texts):
    """expected == got, or a message showing the first text whose ids differ, around the first differing token."""
    for text, ours, theirs in zip(texts, expected, got):
        if ours != theirs:
            k = next((k for k, (a, b) in enumerate(zip(ours, theirs)) if a != b), min(len(ours), len(theirs)))
            near = [[tokenizer.sp.id_to_piece(i) for i in ids[max(k - 3, 0):k + 4]] for ids in (ours, theirs)]
            raise AssertionError(f"ids differ at token {k} of {tokenizer.decode(ours[:k])[-60:]!r} + "
                                 f"{tokenizer.decode(ours[k:k + 4])!r}: ours {near[0]}, transformers {near[1]}")
    assert len(expected) == len(got)


def assert_same_function(ours, theirs):
    idx = torch.randint(0, 64, (2, 24), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        torch.testing.assert_close(theirs(idx).logits, ours(idx)[0], rtol=0, atol=1e-4)
        prompt, n = idx[:1, :6], 14  # generation runs past the 8 original positions too
        expected = torch.stack(list(ours.generate(prompt, n, temperature=0)), dim=1)
        got = theirs.generate(prompt, max_new_tokens=n, do_sample=False, eos_token_id=None, pad_token_id=0)
    assert torch.equal(got[:, prompt.size(1):], expected)


@pytest.mark.parametrize("family", FAMILIES)
def test_transformers_computes_our_logits_and_generations(family, tmp_path, mixed_tokenizer):
    overrides, expected_arch = FAMILIES[family]
    model = lively_model(**overrides)
    arch, hf = export_and_load(model, tmp_path, mixed_tokenizer)
    assert arch == expected_arch == type(hf).__name__
    assert_same_function(model, hf)
    # Every family's folder gives our tokenizer (a qwen2 model_type would get Qwen2Tokenizer whatever we write).
    ours, theirs = Tokenizer(mixed_tokenizer), AutoTokenizer.from_pretrained(tmp_path / "hf")
    assert_same_ids(ours, ours.encode_batch(SAMPLES), theirs(SAMPLES).input_ids, SAMPLES)


@pytest.mark.parametrize("scaling", ROPE_SCALINGS)
def test_rope_scaling_agrees_past_the_original_context(scaling, tmp_path, mixed_tokenizer):
    rope_scaling, attn = ROPE_SCALINGS[scaling]
    model = lively_model(rope_scaling=rope_scaling, **attn)
    _, hf = export_and_load(model, tmp_path, mixed_tokenizer)
    assert_same_function(model, hf)
    # The scaling matters at these positions: without it the same weights give other logits.
    unscaled = Transformer(ModelConfig(**{**BASE, **attn}))
    unscaled.load_state_dict(model.state_dict())
    idx = torch.randint(0, 64, (1, 24))
    with torch.no_grad():
        assert not torch.allclose(unscaled.eval()(idx)[0], model(idx)[0], atol=1e-3)


@pytest.mark.parametrize("tie", [True, False])
def test_tied_embeddings_are_explicit_in_config_and_weights(tie, tmp_path, mixed_tokenizer):
    _, hf = export_and_load(lively_model(**MLA, tie_embeddings=tie), tmp_path, mixed_tokenizer)
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
    assert sorted(os.listdir(out)) == ["README.md", "config.json", "generation_config.json", "model.safetensors",
                                       "tokenizer.json", "tokenizer.model", "tokenizer_config.json"]
    assert (out / "tokenizer.model").read_bytes() == open(os.path.join(trained_ckpt, "tokenizer.model"), "rb").read()
    assert "AutoModelForCausalLM.from_pretrained" in (out / "README.md").read_text()
    model, tokenizer = load_model(trained_ckpt, "cpu")
    assert_same_ids(tokenizer, tokenizer.encode_batch(SAMPLES), AutoTokenizer.from_pretrained(out)(SAMPLES).input_ids,
                    SAMPLES)
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


@pytest.mark.parametrize("overrides, reason", [
    (dict(layer_types=["linear_attention"] * 2, **LINEAR), "without a full-attention layer"),
    (dict(layer_types=["linear_attention", "full_attention"], **LINEAR), "set both qk_norm and attn_output_gate"),
    (dict(qk_norm=True), "set both qk_norm and attn_output_gate"),
    (dict(**GATED, **MOE), "softmax router"),
    (dict(**GATED, qkv_bias=True), "no biases"),
    (dict(layer_types=["sliding_attention", "full_attention"], sliding_window=4, qkv_bias=True), "Ministral"),
    (dict(layer_types=["sliding_attention", "full_attention"], sliding_window=4, **MOE), "Ministral"),
    (dict(attention_sinks=True), "gpt-oss"),
    (dict(moba_chunk_size=4), "MoBA"),
    (dict(final_logit_softcapping=15.0), "Gemma 2 and 3 only"),
    (dict(hidden_act="relu2", qk_norm=True), "Arcee computes the ungated"),
    ({**MOE, "n_group": 1, "topk_group": 1, "zero_expert_num": 2}, "LongCat-Flash only"),
    (dict(**MOE, first_k_dense_replace=0, moe_shortcut=True), "LongCat-Flash only"),
    (dict(**MLA, **MOE, q_lora_rank=8, first_k_dense_replace=0, moe_shortcut=True), "a softmax over the experts"),
])
def test_what_no_class_computes_is_refused_with_the_reason(overrides, reason):
    with pytest.raises(ValueError, match=reason):
        hf_architecture(lively_model(**overrides).config)


def test_a_norm_gain_that_one_plus_w_cannot_give_back_is_refused(tmp_path, mixed_tokenizer):
    model = lively_model(**GATED)
    with torch.no_grad():
        model.layers[1].attn.q_norm.weight[3] = 0.1  # 0.1 - 1 rounds: 1 + (0.1 - 1) is not 0.1 in float32
    with pytest.raises(ValueError, match="layer 1 q_norm"):
        export(model, mixed_tokenizer, str(tmp_path / "hf"))
    assert not (tmp_path / "hf").exists()


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
def test_beam_search_gives_the_tokens_of_transformers_beam_search(family, tmp_path, mixed_tokenizer):
    model = lively_model(**FAMILIES[family][0])
    _, hf = export_and_load(model, tmp_path, mixed_tokenizer)
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


def test_repetition_penalty_min_new_tokens_and_stop_ids_give_the_tokens_of_transformers(tmp_path, mixed_tokenizer):
    model = lively_model()
    _, hf = export_and_load(model, tmp_path, mixed_tokenizer)
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


def export_tiny(tokenizer_path, out, **overrides):
    """A small random model with the tokenizer's vocabulary, exported to out; returns it."""
    vocab_size = Tokenizer(tokenizer_path).vocab_size
    model = lively_model(**{**BASE, "vocab_size": vocab_size, "block_size": 128, **overrides})
    export(model, tokenizer_path, str(out))
    return model


def test_hf_tokenizer_gives_our_ids_on_a_megabyte_of_held_out_text_and_decodes_it_exactly(mixed_tokenizer, tmp_path):
    export_tiny(mixed_tokenizer, tmp_path / "hf")
    ours, theirs = Tokenizer(mixed_tokenizer), AutoTokenizer.from_pretrained(tmp_path / "hf")
    texts = mixed_corpus(1, STDLIB[3::6], 1.0)  # files, Chinese and jumbles the tokenizer was not trained on
    assert sum(len(text.encode()) for text in texts) > 1_000_000 and all(any(x in t for t in texts) for x in EXTRAS)
    expected, got = ours.encode_batch(texts, num_threads=2), theirs(texts).input_ids
    assert_same_ids(ours, expected, got, texts)
    # The comparison exercised Chinese merges and byte fallback, not only ASCII.
    used = {ours.sp.id_to_piece(i) for ids in got for i in ids}
    assert sum(len(piece) > 1 and all("\u4e00" <= c <= "\u9fff" for c in piece) for piece in used) > 50
    assert {f"<0x{b:02X}>" for b in SPACE_MARK.encode()} | {"<0xF0>"} <= used  # '▁' and 4-byte characters
    decoded = theirs.batch_decode(got)
    wrong = next((text for text, back in zip(texts, decoded) if back != text), None)
    assert wrong is None, f"decode(encode(text)) != text for {wrong[:200]!r}"


def test_apply_chat_template_gives_the_ids_of_render_chat(mixed_tokenizer, tmp_path):
    export_tiny(mixed_tokenizer, tmp_path / "hf")
    ours, theirs = Tokenizer(mixed_tokenizer), AutoTokenizer.from_pretrained(tmp_path / "hf")
    rng = random.Random(3)
    conversations = [[{"role": "system", "content": "You answer in 中文."}, {"role": "user", "content": SAMPLES[0]},
                      {"role": "assistant", "content": "这是一个函数。\n\n"}, {"role": "user", "content": ""}],
                     [{"role": "user", "content": "What is 2 + 3?"}, {"role": "assistant", "content": "5"}]]
    conversations += [[{"role": role, "content": mixed_lines(rng, 3, ["def", " x", "\t", "1"])}
                       for role in ("system", "user", "assistant", "user")[:rng.randint(1, 4)]] for _ in range(50)]
    for messages in conversations:
        for generation_prompt in (False, True):
            expected = ours.render_chat(messages, generation_prompt=generation_prompt)[0]
            got = theirs.apply_chat_template(messages, tokenize=True, add_generation_prompt=generation_prompt)
            assert got["input_ids"] == expected, (messages, generation_prompt)
            assert theirs.decode(expected) == ours.decode(expected)


def test_special_token_text_is_the_documented_difference(mixed_tokenizer, tmp_path):
    # transformers matches special tokens in text; tokenizer.py encodes them as the characters they are.
    export_tiny(mixed_tokenizer, tmp_path / "hf")
    ours = Tokenizer(mixed_tokenizer)
    text = "a <|im_start|>user\nhi</s>"
    assert min(ours.encode(text)) >= len(SPECIAL_TOKENS)
    assert {IM_START_ID, EOS_ID} <= set(AutoTokenizer.from_pretrained(tmp_path / "hf")(text).input_ids)
    split = AutoTokenizer.from_pretrained(tmp_path / "hf", split_special_tokens=True)
    assert split(text).input_ids == ours.encode(text)
    assert "split_special_tokens" in (tmp_path / "hf" / "README.md").read_text()


def test_pipeline_generates_our_greedy_tokens_for_a_prompt_and_a_chat(mixed_tokenizer, tmp_path):
    ours = Tokenizer(mixed_tokenizer)
    model = export_tiny(mixed_tokenizer, tmp_path / "plain", tie_embeddings=False)
    generate = pipeline("text-generation", model=str(tmp_path / "plain"))
    prompt, n = SAMPLES[0], 12
    prompt_ids = ours.encode(prompt)
    expected = torch.cat(list(model.generate(torch.tensor([prompt_ids]), n, temperature=0,
                                             stop_ids=[IM_END_ID, EOS_ID]))).tolist()
    out = generate(prompt, max_new_tokens=n, do_sample=False, return_tensors=True)[0]["generated_token_ids"]
    assert list(out) == prompt_ids + expected
    text = generate(prompt, max_new_tokens=n, do_sample=False)[0]["generated_text"]
    assert text == prompt + ours.decode([i for i in expected if i >= len(SPECIAL_TOKENS)])

    # A chat that ends: swapping the output rows of <|im_end|> and of the free reply's k-th token (one it has not
    # yielded before) makes the model say <|im_end|> there and nothing else differently (untied: inputs unchanged).
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "你好，what is 2 + 3?"}]
    chat_ids = torch.tensor([ours.render_chat(messages, generation_prompt=True)[0]])
    free = torch.cat(list(model.generate(chat_ids, 20, temperature=0))).tolist()
    k = next(k for k in range(4, 20) if free[k] not in free[:k])
    assert not {IM_END_ID, EOS_ID} & set(free[:k + 1])
    with torch.no_grad():
        model.lm_head.weight[[IM_END_ID, free[k]]] = model.lm_head.weight[[free[k], IM_END_ID]]
    expected = torch.cat(list(model.generate(chat_ids, 20, temperature=0, stop_ids=[IM_END_ID, EOS_ID]))).tolist()
    assert expected == free[:k] + [IM_END_ID]
    export(model, mixed_tokenizer, str(tmp_path / "chat"))
    generate = pipeline("text-generation", model=str(tmp_path / "chat"))
    out = generate(messages, max_new_tokens=20, do_sample=False, return_tensors=True)[0]["generated_token_ids"]
    assert list(out) == chat_ids[0].tolist() + expected  # stopped at <|im_end|>, 20 - k - 1 tokens early
    reply = generate(messages, max_new_tokens=20, do_sample=False)[0]["generated_text"][-1]
    assert reply == {"role": "assistant", "content": ours.decode([i for i in free[:k] if i >= len(SPECIAL_TOKENS)])}
