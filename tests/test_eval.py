"""eval.py: pass@k is Chen et al.'s estimator, batched left-padded replies are the replies one at a time, and the
scores are what the verifiers and exact match say of them."""

import itertools
import json
import math
import os
import subprocess
import sys

import pytest

from checkpoint import load_model
from eval import pass_at_k, replies
from test_train import ROOT


@pytest.mark.parametrize("n, c, k", [(5, 0, 1), (5, 2, 1), (5, 2, 3), (6, 5, 2), (8, 3, 8), (10, 1, 4)])
def test_pass_at_k_is_the_chance_that_k_of_n_samples_hold_a_correct_one(n, c, k):
    samples = [True] * c + [False] * (n - c)
    subsets = list(itertools.combinations(samples, k))  # every way to draw k of the n, equally likely
    assert pass_at_k(n, c, k) == pytest.approx(sum(any(s) for s in subsets) / len(subsets), abs=1e-12)
    assert pass_at_k(n, c, k) == pytest.approx(1 - math.comb(n - c, k) / math.comb(n, k), abs=1e-12)


def test_batched_left_padded_replies_equal_replies_one_at_a_time(trained_ckpt):
    model, tokenizer = load_model(trained_ckpt, "cpu")
    conversations = [[{"role": "user", "content": text}] for text in
                     ("def add(a, b):", "What is 2 + 3?", "import os\nimport sys\n", "x")]
    batched = replies(model, tokenizer, conversations, 12, 0.0, batch_size=4)
    alone = [replies(model, tokenizer, [c], 12, 0.0, batch_size=1)[0] for c in conversations]
    assert batched == alone and any(batched)


def eval_cli(*args):
    return subprocess.run([sys.executable, os.path.join(ROOT, "eval.py"), *args], cwd=ROOT, capture_output=True,
                          text=True, timeout=300)


def test_data_mode_scores_exact_match_of_the_last_reply(trained_ckpt, tmp_path):
    # References equal to the model's own greedy replies score 1; changed ones score 0.
    model, tokenizer = load_model(trained_ckpt, "cpu")
    prompts = [[{"role": "user", "content": f"count to {i}"}] for i in range(6)]
    own = replies(model, tokenizer, prompts, 8, 0.0, batch_size=6)
    lines = [{"messages": p + [{"role": "assistant", "content": r if i % 2 else r + " changed"}]}
             for i, (p, r) in enumerate(zip(prompts, own))]
    data = tmp_path / "held_out.jsonl"
    data.write_text("\n".join(map(json.dumps, lines)) + "\nnot a conversation\n")
    result = eval_cli("--ckpt", trained_ckpt, "--data", str(data), "--max_new_tokens", "8", "--out", str(tmp_path / "r.json"))
    assert result.returncode == 0, result.stderr
    assert "held_out.jsonl:7: not valid JSON, line skipped" in result.stderr
    results = json.loads((tmp_path / "r.json").read_text())
    assert results["problems"] == 6 and results["exact_match"] == 0.5 and results["pass@1"] == 0.5
    assert "exact_match: 0.5000" in result.stdout


def test_task_mode_samples_and_reports_pass_at_k(trained_ckpt, tmp_path):
    result = eval_cli("--ckpt", trained_ckpt, "--task", "addition", "--digits", "1", "--n", "6", "--samples", "3",
                      "--pass_k", "1", "3", "--temperature", "1.0", "--max_new_tokens", "4",
                      "--out", str(tmp_path / "r.json"))
    assert result.returncode == 0, result.stderr
    results = json.loads((tmp_path / "r.json").read_text())
    assert results["problems"] == 6 and results["samples"] == 3
    assert 0 <= results["pass@1"] <= results["pass@3"] <= 1 and results["pass@1"] == pytest.approx(results["exact_match"])
    assert len(results["first_replies"]) == 10


def test_replies_are_written_as_a_conversation_file_that_scores_as_the_model_does(trained_ckpt, tmp_path):
    # Black-box distillation data: the model's own greedy replies, which it then matches exactly (--data mode).
    result = eval_cli("--ckpt", trained_ckpt, "--task", "reverse", "--length", "3", "--n", "5", "--max_new_tokens", "6",
                      "--out", str(tmp_path / "r.json"), "--replies", str(tmp_path / "teacher.jsonl"))
    assert result.returncode == 0 and "wrote 5 of 5 replies" in result.stderr, result.stderr
    lines = [json.loads(line) for line in (tmp_path / "teacher.jsonl").read_text().splitlines()]
    results = json.loads((tmp_path / "r.json").read_text())
    assert [line["messages"][-1]["content"] for line in lines] == [r["reply"] for r in results["first_replies"][:5]]
    assert [line["reward"] for line in lines] == [r["reward"] for r in results["first_replies"][:5]]
    again = eval_cli("--ckpt", trained_ckpt, "--data", str(tmp_path / "teacher.jsonl"), "--max_new_tokens", "6",
                     "--out", str(tmp_path / "again.json"))
    assert again.returncode == 0 and json.loads((tmp_path / "again.json").read_text())["exact_match"] == 1.0
    # --min_reward 1 keeps the verified replies only (an untrained model has none here).
    result = eval_cli("--ckpt", trained_ckpt, "--task", "reverse", "--length", "3", "--n", "5", "--max_new_tokens", "6",
                      "--out", str(tmp_path / "r.json"), "--replies", str(tmp_path / "right.jsonl"), "--min_reward", "1")
    kept = sum(r["reward"] == 1.0 for r in results["first_replies"][:5])
    assert f"wrote {kept} of 5 replies" in result.stderr
    assert len((tmp_path / "right.jsonl").read_text().splitlines()) == kept


@pytest.mark.parametrize("args, message", [
    ([], "give exactly one of --task and --data"),
    (["--task", "addition", "--min_reward", "2"], "--min_reward must be between 0 and 1"),
    (["--task", "addition", "--samples", "2"], "--samples above 1 needs --temperature above 0"),
    (["--task", "addition", "--samples", "2", "--temperature", "1", "--pass_k", "3"], "every --pass_k must be between"),
    (["--task", "addition", "--digits", "0"], "--digits must be a whole number from 1"),
    (["--task", "addition", "--length", "3"], "--length does not apply to addition"),
    (["--data", "missing.jsonl"], "cannot read --data missing.jsonl"),
    (["--task", "addition", "--temperature", "nan"], "--temperature must be a number >= 0"),
])
def test_bad_input_is_one_sentence(trained_ckpt, args, message):
    result = eval_cli("--ckpt", trained_ckpt, *args)
    assert result.returncode != 0 and message in result.stderr and "Traceback" not in result.stderr
