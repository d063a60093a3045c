"""
bench/shakespeare.py: myllm against nanoGPT on tiny Shakespeare, in bits per byte, measured in the same run.

    python bench/shakespeare.py --input tinyshakespeare.txt --nanogpt path/to/nanoGPT   # both, back to back
    python bench/shakespeare.py --input tinyshakespeare.txt      # ours only, against nanoGPT's stored figures

Bits per byte is the one number that compares models with different tokenizers: total information over total text
(nanoGPT's model reads characters, and the text is ASCII, so its val loss in nats per character / ln 2 is bits per
byte). With --nanogpt the README's CPU command of nanoGPT (config/train_shakespeare_char.py with its CPU overrides)
runs first, from copies of the few files it needs: the checkout is only read, and nanoGPT is not our dependency (its
data script needs numpy and requests). Then ours on the same split (first 90% of the characters train, the rest
val) with a 1,024-token BPE: config/shakespeare_cpu.py, the AdamW recipe of the first table, and
config/shakespeare_fast.py, Muon and the levers bench/levers.py found to help, also on a 70-step schedule (the
sprint). All evaluate along the way, so the
table also gives the wall time at which each first reached nanoGPT's final bits per byte, and the bits per byte it had
reached within nanoGPT's wall time (each process's own start-up included). Times mean something only back to back on
a quiet machine. Last, training tokens/s of a 6-layer, 384-wide model on the same data.
"""

import argparse
import importlib.util
import json
import math
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# nanoGPT @3adf61e, README CPU command, measured by --nanogpt on this project's 2-core machines (torch 2.13, fp32) on
# 2026-12-04 (its loss curve is the same on every machine; its time was 107 s on another one on 2026-12-01):
NANOGPT_VAL_BPB = 1.8857 / math.log(2)
NANOGPT_WALL_S = 92.0
NANOGPT_6x384_TOKENS_PER_S = 533  # 6 layers, 384 wide, block 256, batch 8, GPT-2 vocabulary (50,257)
# nanoGPT's README, "I only have a macbook": its CPU command for the character-level Shakespeare model.
NANOGPT_CPU_COMMAND = ["train.py", "config/train_shakespeare_char.py", "--device=cpu", "--compile=False",
                       "--eval_iters=20", "--log_interval=1", "--block_size=64", "--batch_size=12", "--n_layer=4",
                       "--n_head=4", "--n_embd=128", "--max_iters=2000", "--lr_decay_iters=2000", "--dropout=0.0"]
NANOGPT_FILES = ["train.py", "model.py", "configurator.py", "config/train_shakespeare_char.py",
                 "data/shakespeare_char/prepare.py"]
# Ours: (label, train.py's config files and overrides). The sprint is the fast config on a 70-step schedule at
# batch 16 (its cool-down at the end, two cheaper evaluations), the quickest way here to nanoGPT's final bits per byte.
CPU, FAST = "config/shakespeare_cpu.py", "config/shakespeare_fast.py"
OURS = [(CPU, [CPU]), (FAST, [CPU, FAST]),
        (f"{FAST}, 70-step sprint", [CPU, FAST, "--batch_size=16", "--max_iters=70", "--lr_decay_iters=70",
                                     "--eval_interval=35", "--eval_iters=10", "--learning_rate=6e-3", "--min_lr=6e-4"])]


def run(cmd: list[str]) -> float:
    """Runs a command from the repository root, showing its output; returns its wall time."""
    t0 = time.time()
    subprocess.run(cmd, cwd=ROOT, check=True)
    return time.time() - t0


def last_record(out_dir: str, key: str) -> dict:
    with open(os.path.join(out_dir, "metrics.jsonl")) as f:
        return [r for r in map(json.loads, f) if key in r][-1]


def prepare(input_path: str, work: str) -> tuple[str, float]:
    """nanoGPT's split (first 90% of the characters train, the rest val), prepared with a 1,024-token tokenizer into
    work/data: (that folder, seconds taken)."""
    if not os.path.isfile(input_path):
        raise SystemExit(f"{input_path} not found")
    with open(input_path, encoding="utf-8") as f:
        text = f.read()
    split = int(len(text) * 0.9)
    for name, part in (("train.txt", text[:split]), ("val.txt", text[split:])):
        with open(os.path.join(work, name), "w", encoding="utf-8") as f:
            f.write(part)
    data = os.path.join(work, "data")
    seconds = run([sys.executable, "prepare_data.py", "--input", os.path.join(work, "train.txt"),
                   "--val_input", os.path.join(work, "val.txt"), "--vocab_size", "1024", "--out", data])
    return data, seconds


def run_nanogpt(checkout: str, input_path: str, work: str) -> tuple[float, float]:
    """nanoGPT's README CPU command in work/nanogpt, from copies of the checkout's files, on input_path (put where its
    prepare.py looks, so it downloads nothing): (final val bits per byte, wall seconds of the training command)."""
    missing = [f for f in NANOGPT_FILES if not os.path.isfile(os.path.join(checkout, f))]
    if missing:
        raise SystemExit(f"--nanogpt {checkout}: not a nanoGPT checkout (no {missing[0]})")
    if importlib.util.find_spec("requests") is None:
        raise SystemExit("nanoGPT's data/shakespeare_char/prepare.py imports requests (one of nanoGPT's own "
                         "dependencies): pip install requests")
    here = os.path.join(work, "nanogpt")
    for f in NANOGPT_FILES:
        os.makedirs(os.path.dirname(os.path.join(here, f)), exist_ok=True)
        shutil.copyfile(os.path.join(checkout, f), os.path.join(here, f))
    shutil.copyfile(input_path, os.path.join(here, "data", "shakespeare_char", "input.txt"))
    subprocess.run([sys.executable, "data/shakespeare_char/prepare.py"], cwd=here, check=True,
                   stdout=subprocess.DEVNULL)
    t0 = time.time()
    result = subprocess.run([sys.executable, *NANOGPT_CPU_COMMAND], cwd=here, capture_output=True, text=True)
    wall = time.time() - t0
    evals = re.findall(r"step (\d+): train loss [\d.]+, val loss ([\d.]+)", result.stdout)
    if result.returncode or not evals:
        raise SystemExit(f"nanoGPT's train.py failed:\n{result.stdout[-2000:]}{result.stderr[-2000:]}")
    return float(evals[-1][1]) / math.log(2), wall


def run_ours(args: list, data: str, out: str, target_bpb: float, budget_s: float) -> dict:
    """train.py with args on data: its final val bits per byte and wall time, the wall time of its first evaluation at
    or below target_bpb (None if none) and its best val bits per byte among the evaluations within budget_s."""
    wall = run([sys.executable, "train.py", *args, f"--data_dir={data}", f"--out_dir={out}"])
    with open(os.path.join(out, "metrics.jsonl")) as f:
        evals = [r for r in map(json.loads, f) if "val_bpb" in r]
    startup = wall - evals[-1]["elapsed_s"]  # the process's own start and end (an upper bound on the start)
    reached = [r["elapsed_s"] + startup for r in evals if r["val_bpb"] <= target_bpb]
    within = [r["val_bpb"] for r in evals if r["elapsed_s"] + startup <= budget_s]
    return {"bpb": evals[-1]["val_bpb"], "wall": wall, "reached_s": reached[0] if reached else None,
            "within": min(within) if within else None}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--input", required=True, help="tinyshakespeare.txt (1,115,394 characters)")
    parser.add_argument("--nanogpt", default=None, help="a nanoGPT checkout: run its CPU command first, here")
    parser.add_argument("--work_dir", default=None, help="where data and checkpoints go (default: a temp folder)")
    args = parser.parse_args()
    work = args.work_dir or tempfile.mkdtemp(prefix="shakespeare_")
    if args.nanogpt:
        nano_bpb, nano_s = run_nanogpt(args.nanogpt, args.input, work)
        nano_what = "measured in this run"
    else:
        nano_bpb, nano_s = NANOGPT_VAL_BPB, NANOGPT_WALL_S
        nano_what = "stored from 2026-12-04, not measured now: pass --nanogpt PATH to measure it side by side"
    data, prepare_s = prepare(args.input, work)
    ours = {label: run_ours(args, data, os.path.join(work, f"out_{i}"), nano_bpb, nano_s)
            for i, (label, args) in enumerate(OURS)}

    speed_out = os.path.join(work, "out_6x384")
    run([sys.executable, "train.py", "config/shakespeare_cpu.py", f"--data_dir={data}", f"--out_dir={speed_out}",
         "--n_layer=6", "--n_head=6", "--n_kv_head=6", "--n_embd=384", "--block_size=256", "--batch_size=8",
         "--max_iters=20", "--eval_interval=1000", "--log_interval=1", "--always_save_checkpoint=False"])
    with open(os.path.join(speed_out, "metrics.jsonl")) as f:
        speeds = sorted(r["tokens_per_s"] for r in map(json.loads, f) if "tokens_per_s" in r)
    tokens_per_s = speeds[len(speeds) // 2]  # median: the first steps warm up

    print(f"\nnanoGPT: {nano_what}; our data prepared in {prepare_s:.0f} s (once, not counted below)\n")
    print("| run | val bits per byte | wall time | reached nanoGPT's bits per byte at | best bits per byte "
          "within nanoGPT's wall time |")
    print("|---|---:|---:|---:|---:|")
    print(f"| nanoGPT shakespeare_char, CPU command | {nano_bpb:.3f} | {nano_s:.0f} s | {nano_s:.0f} s (1.00x) | "
          f"{nano_bpb:.3f} (1.00x) |")
    for label, r in ours.items():
        reached = f"{r['reached_s']:.0f} s ({r['reached_s'] / nano_s:.2f}x)" if r["reached_s"] else "not reached"
        within = f"{r['within']:.3f} ({r['within'] / nano_bpb:.2f}x)" if r["within"] else "no evaluation in time"
        print(f"| myllm {label} | {r['bpb']:.3f} | {r['wall']:.0f} s | {reached} | {within} |")
    print(f"\n6 layers x 384 wide, block 256, batch 8, vocab 1024: {tokens_per_s:,.0f} training tokens/s "
          f"(nanoGPT with the GPT-2 vocabulary here: {NANOGPT_6x384_TOKENS_PER_S} tokens/s)")


if __name__ == "__main__":
    main()
