"""train.py: the configuration rules, the schedule, and the promises of the loop -- gradient accumulation and a
resumed run compute what one straight run computes (several processes: tests/test_parallel.py)."""

import json
import math
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest
import torch

from train import DEFAULTS, get_lr

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = ["--n_layer=2", "--n_head=4", "--n_kv_head=2", "--n_embd=32", "--block_size=32", "--batch_size=4",
        "--eval_iters=2", "--log_interval=1", "--warmup_iters=2", "--learning_rate=3e-3", "--lr_decay_iters=8",
        "--min_lr=3e-4"]


def run(args, launcher=(sys.executable,), check=True):
    result = subprocess.run([*launcher, os.path.join(ROOT, "train.py"), *args], cwd=ROOT,
                            capture_output=True, text=True, timeout=300)
    if check and result.returncode != 0:
        raise AssertionError(f"train.py failed:\n{result.stdout[-3000:]}\n{result.stderr[-3000:]}")
    return result


def weights(out_dir):
    return torch.load(os.path.join(out_dir, "ckpt.pt"), weights_only=True)["model"]


def step_losses(out_dir):
    with open(os.path.join(out_dir, "metrics.jsonl")) as f:
        return {r["iter"]: r["loss"] for r in map(json.loads, f) if "loss" in r}


def assert_same_weights(a, b, tol):
    assert a.keys() == b.keys()
    for k in a:
        assert torch.allclose(a[k], b[k], atol=tol, rtol=0), f"{k} differs by {(a[k] - b[k]).abs().max()}"


def test_bad_config_is_one_clear_error():
    # Every rule is tested in tests/test_configurator.py; here, that the command turns one into a sentence.
    for args, message in [(["--learing_rate=1e-3"], "unknown config key 'learing_rate'"),
                          (["--PAD_ID=3"], "unknown config key 'PAD_ID'"),  # an imported constant, not a setting
                          (["config/nope.py"], "config file 'config/nope.py' does not exist")]:
        result = run(args, check=False)
        assert result.returncode == 1 and message in result.stderr and "Traceback" not in result.stderr


def test_impossible_model_shape_is_a_clear_error(prepared_data):
    result = run([f"--data_dir={prepared_data}", "--n_embd=100", "--n_head=3"], check=False)
    assert result.returncode == 1 and "n_embd (100) must be divisible by n_head (3)" in result.stderr
    result = run([f"--data_dir={prepared_data}", "--rope_scaling={'rope_type': 'yarn', 'factor': 2.0}"], check=False)
    assert result.returncode == 1 and "needs the keys ['original_max_position_embeddings']" in result.stderr


def test_missing_data_and_missing_checkpoint_are_clear_errors(tmp_path, prepared_data):
    result = run([f"--data_dir={tmp_path}/nothing"], check=False)
    assert result.returncode == 1 and "run prepare_data.py first" in result.stderr
    result = run([f"--data_dir={prepared_data}", f"--out_dir={tmp_path}/out", "--init_from=resume"], check=False)
    assert result.returncode == 1 and "does not exist" in result.stderr
    assert not (tmp_path / "out").exists()  # nothing is left behind by a run that could not start


def test_lr_warms_up_from_nonzero_then_follows_the_cosine():
    config = dict(DEFAULTS, learning_rate=1.0, min_lr=0.1, warmup_iters=10, lr_decay_iters=110)
    lrs = [get_lr(it, config) for it in range(120)]
    assert 0 < lrs[0] < lrs[1] < lrs[9] < 1.0
    assert lrs[10] == pytest.approx(1.0)
    for it in (10, 35, 60, 85, 110):  # the cosine, written out independently
        assert lrs[it] == pytest.approx(0.1 + 0.45 * (1 + math.cos(math.pi * (it - 10) / 100)))
    assert lrs[119] == pytest.approx(0.1)


def test_wsd_holds_the_rate_then_cools_down_linearly_over_its_fraction():
    config = dict(DEFAULTS, learning_rate=1.0, min_lr=0.1, warmup_iters=10, lr_decay_iters=110, lr_schedule="wsd",
                  cooldown_frac=0.2)
    lrs = [get_lr(it, config) for it in range(120)]
    assert 0 < lrs[0] < lrs[9] < 1.0 and lrs[10:89] == [1.0] * 79  # the cool-down is the last 22 steps of 110
    for it in (88, 99, 110):
        assert lrs[it] == pytest.approx(1.0 - 0.9 * (it - 88) / 22)
    assert lrs[119] == pytest.approx(0.1)


def test_aligned_windows_start_at_documents_and_evaluation_keeps_its_windows(prepared_data, chat_data):
    from train import TokenData

    c = dict(DEFAULTS, data_dir=prepared_data, block_size=32, batch_size=4, gradient_accumulation_steps=2)
    plain, aligned = TokenData(c, 0, 1, "cpu"), TokenData({**c, "align_windows": True}, 0, 1, "cpu")
    starts = np.load(os.path.join(prepared_data, "train_doc_index.npy"))
    drawn = np.concatenate([aligned._draw("train", it, 0, 8) for it in range(20)])
    assert set(drawn.tolist()) <= set(starts.tolist()) and len(set(drawn.tolist())) > 4
    tokens = np.memmap(os.path.join(prepared_data, "train.bin"), np.dtype(plain.meta["dtype"]), mode="r")
    x, y, _ = aligned.train_batch(3, 1)  # micro-batch 1 of step 3: windows 4-7 of that step's draw
    for row, start in zip(x, aligned._draw("train", 3, 0, 8)[4:]):
        assert row.tolist() == tokens[start:start + 32].tolist()
    assert torch.equal(aligned.eval_batch("val", 1)[0], plain.eval_batch("val", 1)[0])
    with pytest.raises(SystemExit, match="packed by conversation already"):
        TokenData({**c, "data_dir": chat_data, "align_windows": True}, 0, 1, "cpu")
    with pytest.raises(SystemExit, match=f"has {len(starts)} documents .* fewer than the 80 windows of a step"):
        TokenData({**c, "align_windows": True, "gradient_accumulation_steps": 20}, 0, 1, "cpu")


def test_gradient_accumulation_equals_one_big_batch(tmp_path, prepared_data):
    common = [*TINY, f"--data_dir={prepared_data}", "--max_iters=3", "--eval_interval=3"]
    run([*common, f"--out_dir={tmp_path}/big", "--batch_size=4", "--gradient_accumulation_steps=1"])
    run([*common, f"--out_dir={tmp_path}/accum", "--batch_size=2", "--gradient_accumulation_steps=2"])
    assert_same_weights(weights(tmp_path / "big"), weights(tmp_path / "accum"), tol=1e-6)


def test_resume_replays_the_straight_run_exactly(tmp_path, prepared_data):
    # Dropout makes the result depend on the restored random state, not only on weights and data.
    common = [*TINY, f"--data_dir={prepared_data}", "--eval_interval=3", "--dropout=0.1"]
    run([*common, f"--out_dir={tmp_path}/straight", "--max_iters=6"])
    run([*common, f"--out_dir={tmp_path}/resumed", "--max_iters=3"])
    run([*common, f"--out_dir={tmp_path}/resumed", "--max_iters=6", "--init_from=resume"])
    straight, resumed = step_losses(tmp_path / "straight"), step_losses(tmp_path / "resumed")
    assert [resumed[i] for i in range(1, 7)] == [straight[i] for i in range(1, 7)]
    assert_same_weights(weights(tmp_path / "straight"), weights(tmp_path / "resumed"), tol=0)
    # One record per iteration, as in the straight run: the resumed run's evaluation of step 3 replaces the first.
    assert records(tmp_path / "resumed") == records(tmp_path / "straight")


def records(out_dir):
    """metrics.jsonl without the fields that measure time."""
    timing = {"elapsed_s", "tokens_per_s", "mfu", "comm_wait_s"}
    with open(os.path.join(out_dir, "metrics.jsonl")) as f:
        return [{k: v for k, v in json.loads(line).items() if k not in timing} for line in f]


def test_metrics_hold_one_record_per_iteration_after_resumes_past_the_last_checkpoint(tmp_path, prepared_data):
    common = [*TINY, f"--data_dir={prepared_data}", "--eval_interval=2", "--max_iters=6"]
    run([*common, f"--out_dir={tmp_path}/straight"])
    # A run killed after step 3 has logged steps past its last checkpoint (step 2): simulate it by appending them.
    run([*common, f"--out_dir={tmp_path}/resumed", "--max_iters=2"])
    with open(tmp_path / "straight" / "metrics.jsonl") as f:
        after_checkpoint = [line for line in f if json.loads(line)["iter"] in (2, 3) and "loss" in json.loads(line)]
    with open(tmp_path / "resumed" / "metrics.jsonl", "a") as f:
        f.writelines(after_checkpoint[1:] + ['{"iter": 3, "lo'])  # step 3, and a line torn by the kill
    for _ in range(2):  # resumed twice from the same checkpoint
        run([*common, f"--out_dir={tmp_path}/resumed", "--init_from=resume"])
        assert records(tmp_path / "resumed") == records(tmp_path / "straight")


def test_a_fresh_run_refuses_an_out_dir_holding_a_run_unless_told_to_overwrite(tmp_path, prepared_data):
    common = [*TINY, f"--data_dir={prepared_data}", f"--out_dir={tmp_path}/out", "--max_iters=2", "--eval_interval=2"]
    run(common)
    before = {name: (tmp_path / "out" / name).read_bytes() for name in ("ckpt.pt", "metrics.jsonl")}
    result = run([*common, "--learning_rate=1e-2"], check=False)
    assert result.returncode == 1 and "holds an earlier run (ckpt.pt, metrics.jsonl)" in result.stderr
    assert "--init_from=resume" in result.stderr and "--overwrite=True" in result.stderr
    assert all((tmp_path / "out" / name).read_bytes() == data for name, data in before.items())
    run([*common, "--learning_rate=1e-2", "--overwrite=True"])
    assert [r["iter"] for r in records(tmp_path / "out")] == [0, 1, 2, 2]  # this run's records only
    assert sorted(n for n in os.listdir(tmp_path / "out") if n.startswith("optimizer.")) == ["optimizer.2.0-of-1.pt"]


@pytest.mark.parametrize("arg, message", [
    ("--eval_iters=0", "eval_iters must be positive, got 0"),
    ("--gradient_accumulation_steps=0", "gradient_accumulation_steps must be positive, got 0"),
    ("--max_iters=-5", "max_iters must be >= 0, got -5"),
    ("--eval_interval=0", "eval_interval must be positive, got 0"),
    ("--log_interval=0", "log_interval must be positive, got 0"),
    ("--batch_size=0", "batch_size must be positive, got 0"),
    ("--learning_rate=1e999", "learning_rate must be a finite number, got inf"),
    ("--beta2=1.0", "beta2 must be in [0, 1), got 1.0"),
    ("--min_lr=0.1", "min_lr (0.1) must not exceed learning_rate"),
    ("--seed=-1", "seed must be between 0 and 2**62, got -1"),
    ("--dropout=1.5", "dropout must be in [0, 1), got 1.5"),
    ("--block_size=0", "block_size must be positive, got 0"),
    ("--device=cuda" if not torch.cuda.is_available() else "--device=cuda:99", "device=cuda"),
    ("--device=gpu", "device must be auto, cpu, cuda or cuda:N, got 'gpu'"),
    ("--objective=ppo", "objective must be 'lm', 'distill', 'grpo' or 'dpo', got 'ppo'"),
    ("--objective=distill", "objective='distill' needs a teacher"),
    ("--teacher=nowhere", "a teacher needs objective='distill'"),
    ("--distill_alpha=1.5", "distill_alpha must be in [0, 1], got 1.5"),
    ("--distill_temperature=0.0", "distill_temperature must be positive, got 0.0"),
    ("--lora_embeddings=True", "lora_embeddings trains the embeddings beside LoRA adapters: set lora_rank too"),
    ("--optimizer=sgd", "optimizer must be 'adamw' or 'muon', got 'sgd'"),
    ("--muon_momentum=1.0", "muon_momentum must be in [0, 1), got 1.0"),
    ("--lr_schedule=linear", "lr_schedule must be 'cosine' or 'wsd', got 'linear'"),
])
def test_every_key_out_of_range_is_one_sentence_before_any_work(tmp_path, prepared_data, arg, message):
    result = run([*TINY, f"--data_dir={prepared_data}", f"--out_dir={tmp_path}/out", arg], check=False)
    assert result.returncode == 1 and message in result.stderr and "Traceback" not in result.stderr
    assert not (tmp_path / "out").exists()


def broken_copy(prepared_data, where, edit):
    """A copy of the prepared data folder with one file changed by edit(path)."""
    import shutil

    shutil.copytree(prepared_data, where)
    edit(where)
    return where


@pytest.mark.parametrize("edit, message", [
    (lambda d: (d / "meta.json").write_text("{not json"), "meta.json is corrupt"),
    (lambda d: (d / "meta.json").write_text('{"dtype": "uint16"}'), "meta.json is corrupt (KeyError"),
    (lambda d: (d / "val.bin").write_bytes((d / "val.bin").read_bytes() + b"x"), "not the"),
    (lambda d: (d / "train.bin").write_bytes(b"\xff\xff" * (len((d / "train.bin").read_bytes()) // 2)),
     "holds a token id beyond the vocabulary"),
    (lambda d: (d / "tokenizer.model").write_bytes(b"junk"), "is not a sentencepiece model"),
    (lambda d: (d / "tokenizer.model").unlink(), "no tokenizer model at"),
])
def test_corrupt_data_is_one_sentence(tmp_path, prepared_data, edit, message):
    data = broken_copy(prepared_data, tmp_path / "data", edit)
    result = run([*TINY, f"--data_dir={data}", f"--out_dir={tmp_path}/out", "--max_iters=1"], check=False)
    assert result.returncode == 1 and message in result.stderr and "Traceback" not in result.stderr


def test_a_full_disk_during_a_save_is_a_sentence_and_keeps_the_previous_checkpoint(tmp_path, prepared_data):
    import resource
    import signal

    common = [*TINY, f"--data_dir={prepared_data}", f"--out_dir={tmp_path}/out", "--eval_interval=2"]
    run([*common, "--max_iters=2"])
    before = (tmp_path / "out" / "ckpt.pt").read_bytes()

    def small_disk():  # files may not grow past 64 KB: a write beyond fails as on a full disk (EFBIG for ENOSPC)
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (64 << 10, 64 << 10))

    result = subprocess.run([sys.executable, os.path.join(ROOT, "train.py"), *common, "--max_iters=4",
                             "--init_from=resume"], cwd=ROOT,
                            capture_output=True, text=True, timeout=300, preexec_fn=small_disk)
    assert result.returncode == 1 and "Traceback" not in result.stderr, result.stderr[-2000:]
    assert "train.py: " in result.stderr and str(tmp_path / "out") in result.stderr
    assert (tmp_path / "out" / "ckpt.pt").read_bytes() == before
    assert not [n for n in os.listdir(tmp_path / "out") if n.endswith(".tmp")]


def test_a_shard_of_another_run_is_refused(tmp_path, prepared_data):
    common = [*TINY, f"--data_dir={prepared_data}", "--eval_interval=2", "--max_iters=2"]
    run([*common, f"--out_dir={tmp_path}/a"])
    run([*common, f"--out_dir={tmp_path}/b", "--seed=7"])  # same layout, other weights
    (tmp_path / "a" / "optimizer.2.0-of-1.pt").write_bytes((tmp_path / "b" / "optimizer.2.0-of-1.pt").read_bytes())
    result = run([*common, f"--out_dir={tmp_path}/a", "--max_iters=4", "--init_from=resume"], check=False)
    assert result.returncode == 1 and "was written by another run or at another step" in result.stderr


def test_a_second_run_into_the_same_out_dir_is_refused_while_the_first_runs(tmp_path, prepared_data):
    common = [*TINY, f"--data_dir={prepared_data}", f"--out_dir={tmp_path}/out", "--eval_interval=1000000"]
    first = subprocess.Popen([sys.executable, os.path.join(ROOT, "train.py"), *common, "--max_iters=1000000"],
                             cwd=ROOT, stdout=subprocess.DEVNULL,
                             stderr=subprocess.DEVNULL)
    try:
        import time

        deadline = time.time() + 60
        while not (tmp_path / "out" / "metrics.jsonl").exists() and time.time() < deadline:
            time.sleep(0.2)
        result = run([*common, "--max_iters=2", "--init_from=resume"], check=False)
        assert result.returncode == 1 and "is in use by another train.py run" in result.stderr
    finally:
        first.kill()
        first.wait()
    # The lock dies with the process that held it: a killed run leaves nothing stale behind.
    result = run([*common, "--max_iters=2"], check=False)
    assert "is in use" not in result.stderr


def test_resume_refuses_a_different_model_shape_but_not_another_attention_backend(tmp_path, prepared_data):
    common = [*TINY, f"--data_dir={prepared_data}", f"--out_dir={tmp_path}/out", "--eval_interval=2"]
    run([*common, "--max_iters=2", "--attn_impl=sdpa"])
    result = run([*common, "--max_iters=4", "--init_from=resume", "--n_layer=3"], check=False)
    assert result.returncode == 1 and "n_layer=3 here but 2 in" in result.stderr
    run([*common, "--max_iters=4", "--init_from=resume", "--attn_impl=eager"])
    assert max(step_losses(tmp_path / "out")) == 4


def test_metrics_log_has_the_promised_fields(tmp_path, prepared_data):
    run([*TINY, f"--data_dir={prepared_data}", f"--out_dir={tmp_path}/out", "--max_iters=2", "--eval_interval=2"])
    with open(tmp_path / "out" / "metrics.jsonl") as f:
        records = [json.loads(line) for line in f]
    steps = [r for r in records if "loss" in r]
    evals = [r for r in records if "val_loss" in r]
    assert [r["iter"] for r in steps] == [1, 2] and [r["iter"] for r in evals] == [0, 2]
    assert {"iter", "loss", "lr", "grad_norm", "tokens_per_s", "mfu", "elapsed_s",
            "comm_bytes", "comm_wait_s", "comm_bytes_theory"} <= steps[0].keys()
    assert {"iter", "train_loss", "val_loss", "val_bpb", "elapsed_s"} <= evals[0].keys()
    # Untrained, the model is near uniform over the vocabulary: loss about ln(vocab).
    vocab = torch.load(tmp_path / "out" / "ckpt.pt", weights_only=True)["model_config"]["vocab_size"]
    assert abs(evals[0]["val_loss"] - math.log(vocab)) < 0.5
    assert os.path.isfile(tmp_path / "out" / "tokenizer.model")


def test_unreadable_checkpoint_is_a_clear_error(tmp_path, prepared_data):
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "ckpt.pt").write_bytes(b"not a checkpoint")
    result = run([*TINY, f"--data_dir={prepared_data}", f"--out_dir={tmp_path}/out", "--init_from=resume"], check=False)
    assert result.returncode == 1 and "cannot read" in result.stderr and "Traceback" not in result.stderr


# ---- fine-tuning: conversations packed into windows, the loss on the replies only -------------------------------

@pytest.fixture(scope="module")
def chat_data(prepared_data, tmp_path_factory):
    """2-digit addition conversations from tasks.py, prepared with prepared_data's tokenizer (trained_ckpt's)."""
    root = tmp_path_factory.mktemp("chat")
    for args in (["tasks.py", "--task", "addition", "--digits", "2", "--n", "400", "--out", str(root / "add.jsonl")],
                 ["prepare_data.py", "--chat", "--input", str(root / "add.jsonl"), "--out", str(root / "data"),
                  "--tokenizer", os.path.join(prepared_data, "tokenizer.model"), "--no_near_dedup", "--workers", "1",
                  "--val_fraction", "0.1"]):
        subprocess.run([sys.executable, os.path.join(ROOT, args[0]), *args[1:]], cwd=ROOT, check=True,
                       capture_output=True)
    return str(root / "data")


SFT = ["--block_size=64", "--eval_iters=2", "--log_interval=1", "--warmup_iters=2", "--learning_rate=3e-3",
       "--lr_decay_iters=8", "--min_lr=3e-4", "--eval_interval=3", "--max_iters=3"]


def test_pack_documents_fills_windows_best_fit_and_keeps_every_document_once():
    from train import pack_documents

    lengths = np.array([30, 5, 64, 70, 12, 40, 1, 24, 33, 8])
    windows, truncated = pack_documents(lengths, 64)
    assert sorted(d for w in windows for d in w) == list(range(len(lengths))) and truncated == 1
    assert all(sum(min(lengths[d], 64) for d in w) <= 64 for w in windows)
    assert len(windows) == math.ceil(sum(np.minimum(lengths, 64)) / 64) == 5  # as few windows as the tokens need


def test_masked_positions_get_exactly_zero_gradient():
    from model import ModelConfig, Transformer

    model = Transformer(ModelConfig(vocab_size=64, block_size=16, n_layer=2, n_head=4, n_kv_head=2, n_embd=32))
    idx = torch.randint(0, 64, (2, 16))
    targets = torch.randint(0, 64, (2, 16))
    targets[:, :9] = -100  # the prompt
    doc_ids = torch.tensor([[0] * 10 + [1] * 6, [0] * 16])
    logits, loss = model(idx, targets, doc_ids=doc_ids)
    logits.retain_grad()
    loss.backward()
    assert torch.count_nonzero(logits.grad[:, :9]) == 0 and torch.count_nonzero(logits.grad[:, 9:]) > 0
    # And the loss does not depend on what the masked targets were.
    other = targets.clone()
    other[:, :9] = torch.randint(0, 64, (2, 9)).masked_fill(torch.ones(2, 9, dtype=torch.bool), -100)
    assert model(idx, other, doc_ids=doc_ids)[1] == loss


def test_fine_tuning_starts_from_a_run_and_accumulation_does_not_change_its_step(tmp_path, trained_ckpt, chat_data):
    common = [*SFT, f"--data_dir={chat_data}", f"--init_from={trained_ckpt}"]
    one = run([*common, f"--out_dir={tmp_path}/big", "--batch_size=4"])
    run([*common, f"--out_dir={tmp_path}/accum", "--batch_size=2", "--gradient_accumulation_steps=2"])
    # The mean over every target of the global batch, however the targets fall into micro-batches.
    assert_same_weights(weights(tmp_path / "big"), weights(tmp_path / "accum"), tol=1e-6)
    assert step_losses(tmp_path / "big") == pytest.approx(step_losses(tmp_path / "accum"), abs=1e-6)
    assert "conversations packed into" in one.stdout and "of them real" in one.stdout
    # It starts from the base run's weights: a step too small to move them leaves exactly those (up to 1e-9).
    run([*common, f"--out_dir={tmp_path}/still", "--max_iters=1", "--learning_rate=1e-12", "--min_lr=0"])
    assert_same_weights(weights(tmp_path / "still"), weights(trained_ckpt), tol=1e-9)


@pytest.mark.parametrize("args, message", [
    (["--init_from=nowhere"], "holds no ckpt.pt"),
    (["--n_layer=5"], "n_layer=5 here but 2 in"),
])
def test_fine_tuning_refuses_what_does_not_fit_its_base(tmp_path, trained_ckpt, chat_data, args, message):
    result = run([*SFT, f"--data_dir={chat_data}", f"--init_from={trained_ckpt}", f"--out_dir={tmp_path}/out", *args],
                 check=False)
    assert result.returncode == 1 and message in result.stderr and "Traceback" not in result.stderr
    result = run([*SFT, f"--data_dir={chat_data}", f"--init_from={trained_ckpt}", f"--out_dir={trained_ckpt}"],
                 check=False)
    assert result.returncode == 1 and "init_from names out_dir itself" in result.stderr


LORA = ["--lora_rank=4", "--lora_alpha=8.0", "--learning_rate=1e-2"]


def test_lora_saves_adapters_only_samples_merged_resumes_and_refuses_another_base(tmp_path, trained_ckpt, chat_data):
    from checkpoint import load_model, save_checkpoint
    from lora import add_lora, load_adapters, merge_lora

    shutil.copytree(trained_ckpt, tmp_path / "base")  # a base of its own, to change below
    common = [*SFT, *LORA, f"--data_dir={chat_data}", f"--init_from={tmp_path}/base", "--max_iters=6"]
    result = run([*common, f"--out_dir={tmp_path}/straight"])
    assert "adapter parameters trained" in result.stdout
    run([*common, f"--out_dir={tmp_path}/resumed", "--max_iters=3"])
    run([*common, f"--out_dir={tmp_path}/resumed", "--init_from=resume"])
    assert step_losses(tmp_path / "resumed") == pytest.approx(step_losses(tmp_path / "straight"), abs=1e-6)
    ckpt = torch.load(tmp_path / "straight" / "ckpt.pt", weights_only=True)
    assert ckpt["model"] and all(k.endswith((".lora_A", ".lora_B")) for k in ckpt["model"])
    assert ckpt["base"]["out_dir"] == str(tmp_path / "base")
    # load_model merges: the base's weights plus (alpha / r) B A, as computed here from the two files.
    model, _ = load_model(str(tmp_path / "straight"), "cpu")
    base, _ = load_model(str(tmp_path / "base"), "cpu")
    add_lora(base, rank=4, alpha=8.0, dropout=0.0, targets="all-linear")
    load_adapters(base, ckpt["model"])
    expected = merge_lora(base).state_dict()
    assert_same_weights(model.state_dict(), expected, tol=0)
    assert not torch.equal(expected["layers.0.attn.wq.weight"], weights(tmp_path / "base")["layers.0.attn.wq.weight"])
    # Other adapter settings on resume, and a base that changed since, are refused.
    result = run([*common, f"--out_dir={tmp_path}/resumed", "--init_from=resume", "--lora_rank=8"], check=False)
    assert result.returncode == 1 and "the LoRA settings here" in result.stderr
    changed = torch.load(tmp_path / "base" / "ckpt.pt", weights_only=True)
    changed["model"]["lm_head.weight"] = changed["model"]["lm_head.weight"] + 1e-3
    save_checkpoint(str(tmp_path / "base" / "ckpt.pt"), changed)
    result = run([*common, f"--out_dir={tmp_path}/resumed", "--init_from=resume", "--max_iters=9"], check=False)
    assert result.returncode == 1 and "is not the base" in result.stderr and "Traceback" not in result.stderr
    with pytest.raises(SystemExit, match="is not the base"):
        load_model(str(tmp_path / "straight"), "cpu")


@pytest.mark.parametrize("args, message", [
    (["--init_from=scratch"], "lora_rank > 0 adapts a trained model"),
    (["--lora_targets=wq,qkv"], "no projection named qkv"),
    (["--lora_dropout=1.0"], "lora_dropout must be in [0, 1)"),
    (["--optimizer=muon"], "optimizer='muon' orthogonalises whole weight matrices and LoRA trains low-rank adapters"),
])
def test_lora_settings_that_cannot_work_are_refused(tmp_path, trained_ckpt, chat_data, args, message):
    result = run([*SFT, *LORA, f"--data_dir={chat_data}", f"--init_from={trained_ckpt}", f"--out_dir={tmp_path}/o",
                  *args], check=False)
    assert result.returncode == 1 and message in result.stderr and "Traceback" not in result.stderr


def test_lora_with_embeddings_saves_and_merges_them(tmp_path, trained_ckpt, chat_data):
    from checkpoint import load_model

    run([*SFT, *LORA, "--lora_embeddings=True", f"--data_dir={chat_data}", f"--init_from={trained_ckpt}",
         f"--out_dir={tmp_path}/out"])
    saved = weights(tmp_path / "out")
    assert {"wte.weight", "lm_head.weight"} <= set(saved)
    assert not torch.equal(saved["wte.weight"], weights(trained_ckpt)["wte.weight"])  # they did train
    model, _ = load_model(str(tmp_path / "out"), "cpu")
    assert torch.equal(model.wte.weight, saved["wte.weight"]) and model.lm_head.weight is model.wte.weight


def test_a_resumed_fine_tuning_run_is_the_straight_run(tmp_path, trained_ckpt, chat_data):
    # On resume the shape comes from the base the run's checkpoint names, as it did when the run started.
    common = [*SFT, f"--data_dir={chat_data}", f"--init_from={trained_ckpt}", "--max_iters=6"]
    run([*common, f"--out_dir={tmp_path}/straight"])
    run([*common, f"--out_dir={tmp_path}/resumed", "--max_iters=3"])
    run([*common, f"--out_dir={tmp_path}/resumed", "--init_from=resume"])
    assert step_losses(tmp_path / "resumed") == pytest.approx(step_losses(tmp_path / "straight"), abs=1e-6)
    assert_same_weights(weights(tmp_path / "resumed"), weights(tmp_path / "straight"), tol=1e-6)


def test_fine_tuning_data_of_another_tokenizer_is_refused(tmp_path, trained_ckpt):
    other = tmp_path / "other.txt"
    other.write_text(open(os.path.join(ROOT, "README.md")).read())
    subprocess.run([sys.executable, os.path.join(ROOT, "tasks.py"), "--task", "reverse", "--n", "200", "--out",
                    str(tmp_path / "r.jsonl")], check=True, capture_output=True)
    subprocess.run([sys.executable, os.path.join(ROOT, "prepare_data.py"), "--chat", "--input", str(tmp_path / "r.jsonl"),
                    "--out", str(tmp_path / "data"), "--vocab_size", "300", "--workers", "1"], check=True,
                   capture_output=True)
    result = run([*SFT, f"--data_dir={tmp_path}/data", f"--init_from={trained_ckpt}", f"--out_dir={tmp_path}/out"],
                 check=False)
    assert result.returncode == 1 and "tokenized with another tokenizer" in result.stderr


def distill(teacher, *args):
    return ["--objective=distill", f"--teacher={teacher}", *args]


def test_distillation_at_alpha_1_is_plain_training_and_logs_its_schedule(tmp_path, prepared_data, trained_ckpt):
    common = [*TINY, f"--data_dir={prepared_data}", "--max_iters=4", "--eval_interval=4"]
    run([*common, f"--out_dir={tmp_path}/lm"])
    # alpha = 1 weighs the KL by 0: the data's cross-entropy alone, computed by log-softmax and gather instead of
    # F.cross_entropy (so equal to float rounding), whatever the teacher says.
    run([*common, f"--out_dir={tmp_path}/alpha1", *distill(trained_ckpt, "--distill_alpha=1.0",
                                                          "--distill_alpha_final=1.0", "--distill_temperature=2.0")])
    assert step_losses(tmp_path / "alpha1") == pytest.approx(step_losses(tmp_path / "lm"), abs=1e-5)
    assert_same_weights(weights(tmp_path / "alpha1"), weights(tmp_path / "lm"), tol=1e-5)
    # The schedule is applied: alpha moves linearly from 0 at step 0 to 1 at max_iters, and the log shows it.
    run([*common, f"--out_dir={tmp_path}/ramp", *distill(trained_ckpt, "--distill_alpha=0.0",
                                                        "--distill_alpha_final=1.0")])
    steps = [r for r in records(tmp_path / "ramp") if "loss" in r]
    assert [r["distill_alpha"] for r in steps] == [0.0, 0.25, 0.5, 0.75]
    for r in steps:  # the loss is the logged mix of the two logged terms
        assert r["loss"] == pytest.approx(r["distill_alpha"] * r["ce"] + (1 - r["distill_alpha"]) * r["kl"], rel=1e-5)
        assert r["kl"] > 0
    assert torch.load(tmp_path / "ramp" / "ckpt.pt", weights_only=True)["teacher"]["sha256"]


def test_a_student_equal_to_its_teacher_gets_zero_kl_and_no_gradient(tmp_path, prepared_data, trained_ckpt):
    # Started from the teacher's own weights with alpha 0: KL(teacher || student) is exactly 0, and its gradient
    # q - p is 0 up to float rounding (the softmax sums to 1 only to float precision), against a norm of order 1
    # from the data's cross-entropy at alpha 1.
    common = [f"--data_dir={prepared_data}", f"--init_from={trained_ckpt}", "--max_iters=1", "--eval_interval=1",
              "--eval_iters=1", "--log_interval=1", "--batch_size=4"]
    norms = {}
    for alpha in (0.0, 1.0):
        run([*common, f"--out_dir={tmp_path}/{alpha}", *distill(trained_ckpt, f"--distill_alpha={alpha}",
                                                                 f"--distill_alpha_final={alpha}")])
        [step] = [r for r in records(tmp_path / str(alpha)) if "loss" in r]
        norms[alpha] = step["grad_norm"]
        if alpha == 0.0:
            assert step["kl"] == 0.0 and step["loss"] == 0.0
    assert norms[0.0] < 1e-6 and norms[1.0] > 0.1


def test_a_teacher_of_another_tokenizer_or_a_changed_one_is_refused(tmp_path, prepared_data, trained_ckpt):
    subprocess.run([sys.executable, os.path.join(ROOT, "tasks.py"), "--task", "reverse", "--n", "200", "--out",
                    str(tmp_path / "r.jsonl")], check=True, capture_output=True)
    subprocess.run([sys.executable, os.path.join(ROOT, "prepare_data.py"), "--chat", "--input", str(tmp_path / "r.jsonl"),
                    "--out", str(tmp_path / "data"), "--vocab_size", "300", "--workers", "1"], check=True,
                   capture_output=True)
    result = run([*TINY, f"--data_dir={tmp_path}/data", f"--out_dir={tmp_path}/out", "--max_iters=1",
                  *distill(trained_ckpt)], check=False)
    assert result.returncode == 1 and "has another tokenizer than" in result.stderr
    assert not (tmp_path / "out").exists()
    # A run resumed with a teacher whose checkpoint changed since would mix two teachers' targets: refused.
    teacher = tmp_path / "teacher"
    shutil.copytree(trained_ckpt, teacher)
    common = [*TINY, f"--data_dir={prepared_data}", f"--out_dir={tmp_path}/student", "--eval_interval=2",
              *distill(teacher)]
    run([*common, "--max_iters=2"])
    state = torch.load(teacher / "ckpt.pt", weights_only=True)
    state["iter_num"] += 1
    torch.save(state, teacher / "ckpt.pt")
    result = run([*common, "--max_iters=4", "--init_from=resume"], check=False)
    assert result.returncode == 1 and "is not the teacher this run started with" in result.stderr


# ----------------------------------------------------------------------------- DeepSeek Sparse Attention's recipe
MLA_ARGS = ["--attn=mla", "--q_lora_rank=16", "--kv_lora_rank=16", "--qk_nope_head_dim=8", "--qk_rope_head_dim=4",
            "--v_head_dim=8"]
INDEXERS = ["--index_n_heads=4", "--index_head_dim=8", "--index_topk=8"]


def test_dsa_recipe_adds_indexers_to_a_dense_run_warms_them_up_then_trains_sparse(tmp_path, prepared_data):
    common = [*TINY, *MLA_ARGS, f"--data_dir={prepared_data}", "--eval_interval=30", "--lr_decay_iters=30"]
    # A base whose attention is far from uniform (lr 1e-2), so there is something for the indexers to learn.
    run([*common, f"--out_dir={tmp_path}/dense", "--max_iters=60", "--eval_interval=60", "--lr_decay_iters=60",
         "--learning_rate=1e-2", "--min_lr=1e-3"])
    # Warm-up: indexers added to the dense run, trained alone (lr 1e-2) by KL to the dense attention.
    run([*common, *INDEXERS, f"--out_dir={tmp_path}/warm", f"--init_from={tmp_path}/dense", "--dsa_warmup=True",
         "--max_iters=30", "--learning_rate=1e-2", "--min_lr=1e-3"])
    dense, warm = weights(tmp_path / "dense"), weights(tmp_path / "warm")
    assert_same_weights(dense, {k: v for k, v in warm.items() if ".indexer." not in k}, tol=0)  # all else frozen
    kl = [r["indexer_kl"] for r in records(tmp_path / "warm") if "loss" in r]
    assert len(kl) == 30 and sum(kl[-5:]) < 0.7 * sum(kl[:5])  # here 0.081 -> 0.038
    val = [r["val_loss"] for r in records(tmp_path / "warm") if "val_loss" in r]
    assert val[0] == val[-1]  # attention stayed dense, and dense attention is the base's
    # Sparse: the whole model trains, choosing 8 of up to 32 keys; the indexers keep learning from their KL.
    run([*common, f"--out_dir={tmp_path}/sparse", f"--init_from={tmp_path}/warm", "--max_iters=10"])
    steps = [r for r in records(tmp_path / "sparse") if "loss" in r]
    assert all(math.isfinite(r["loss"]) and r["indexer_kl"] > 0 for r in steps)
    sparse = weights(tmp_path / "sparse")
    assert not torch.equal(sparse["layers.0.attn.wkv_b.weight"], warm["layers.0.attn.wkv_b.weight"])
    assert not torch.equal(sparse["layers.0.attn.indexer.wk.weight"], warm["layers.0.attn.indexer.wk.weight"])


@pytest.mark.parametrize("args, message", [
    (["--dsa_warmup=True"], "dsa_warmup trains DeepSeek Sparse Attention's indexers"),
    ([*MLA_ARGS, "--dsa_warmup=True"], "dsa_warmup trains DeepSeek Sparse Attention's indexers"),
    ([*MLA_ARGS, "--index_n_heads=4", "--q_lora_rank=0"], "set q_lora_rank"),
])
def test_dsa_settings_that_cannot_work_are_one_sentence(tmp_path, prepared_data, args, message):
    result = run([*TINY, f"--data_dir={prepared_data}", f"--out_dir={tmp_path}/out", *args], check=False)
    assert result.returncode == 1 and message in result.stderr and "Traceback" not in result.stderr
