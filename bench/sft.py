"""
bench/sft.py: from a pretrained model to one that answers, measured: supervised fine-tuning and LoRA on the
verifiable tasks of tasks.py, each scored by eval.py on 500 held-out problems.

    python bench/sft.py                          # pretrains config/cpu_demo.py first (about 10 minutes)
    python bench/sft.py --base out/cpu_demo      # or starts from a cpu_demo run already there

For each row: tasks.py writes the training conversations, prepare_data.py --chat tokenizes them with the base's
tokenizer, train.py runs the row's config/sft_<task>.py from the base (LoRA rows add --lora_rank=8), and eval.py
scores greedy replies by exact match against the problems' own answers. The table gives the training wall time
(the run's own clock, evaluations included), the share of window tokens that are real conversation tokens after
packing, and training tokens/s next to pretraining tokens/s of the same model at the same batch, measured first.
"""

import argparse
import json
import os
import re
import statistics
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# Adapters move the model through a product of two small matrices, one of them starting at 0: a higher peak
# rate than full fine-tuning's, reached over a longer warm-up (at 20 steps the early steps spike and stall).
LORA = ["--lora_rank=8", "--lora_alpha=16.0", "--learning_rate=5e-3", "--min_lr=5e-4", "--warmup_iters=100"]
# (row, its out_dir's name, task and its difficulty, config, extra train.py arguments)
ROWS = [
    ("SFT", "sft_add2", ["--task", "addition", "--digits", "2"], "config/sft_add2.py", []),
    ("LoRA rank 8", "lora_add2", ["--task", "addition", "--digits", "2"], "config/sft_add2.py", LORA),
    ("LoRA rank 8 + embeddings", "lora_emb_add2", ["--task", "addition", "--digits", "2"], "config/sft_add2.py",
     [*LORA, "--lora_embeddings=True"]),
    ("LoRA rank 8 + embeddings, 500 steps", "lora_emb500_add2", ["--task", "addition", "--digits", "2"],
     "config/sft_add2.py", [*LORA, "--lora_embeddings=True", "--max_iters=500", "--lr_decay_iters=500"]),
    ("SFT", "sft_add3", ["--task", "addition", "--digits", "3"], "config/sft_add3.py", []),
    ("SFT", "sft_reverse", ["--task", "reverse", "--length", "6"], "config/sft_reverse.py", []),
    # Half way through learning the task: the start of bench/grpo.py and bench/dpo.py.
    ("SFT, 300 steps", "sft300_add2", ["--task", "addition", "--digits", "2"], "config/sft_add2.py",
     ["--max_iters=300", "--lr_decay_iters=300"]),
]
TRAIN_PROBLEMS = 20000


def run(cmd: list[str]) -> str:
    """Runs a command from the repository root; returns its stdout (stderr, the progress bars, passes through)."""
    print("$", " ".join(cmd), flush=True)
    result = subprocess.run(cmd, cwd=ROOT, stdout=subprocess.PIPE, text=True)
    if result.returncode != 0:
        raise SystemExit(f"failed ({result.returncode}): {' '.join(cmd)}\n{result.stdout[-2000:]}")
    return result.stdout


def records(out_dir: str, key: str) -> list[dict]:
    with open(os.path.join(out_dir, "metrics.jsonl")) as f:
        return [r for r in map(json.loads, f) if key in r]


def tokens_per_s(out_dir: str) -> float:
    """The median over logged steps, the first one (warm-up) left out."""
    return statistics.median(r["tokens_per_s"] for r in records(out_dir, "tokens_per_s")[1:])


def pretrain(work: str) -> str:
    base = os.path.join(work, "base")
    if not os.path.isfile(os.path.join(base, "ckpt.pt")):
        data = os.path.join(work, "pystdlib")
        if not os.path.isfile(os.path.join(data, "meta.json")):
            run([sys.executable, "prepare_data.py", "--out", data])
        run([sys.executable, "train.py", "config/cpu_demo.py", f"--data_dir={data}", f"--out_dir={base}"])
    return base


def cpu_demo_run(given: str | None, work: str, flag: str) -> str:
    """The cpu_demo out_dir to start from: the one given with flag (checked), or one pretrained in work."""
    if given and not os.path.isfile(os.path.join(given, "config.json")):
        raise SystemExit(f"{flag} {given} is not an out_dir of train.py (it has no config.json)")
    os.makedirs(work, exist_ok=True)
    return given or pretrain(work)


def pretraining_tokens_per_s(work: str, base: str) -> float:
    """Pretraining tokens/s of the base's model at the fine-tuning batch (8 windows of block_size), measured in this
    run, so both numbers come from the same machine minutes apart: 40 steps on the base's own data."""
    out_dir = os.path.join(work, "pretraining_speed")
    with open(os.path.join(base, "config.json")) as f:
        data_dir = json.load(f)["data_dir"]
    run([sys.executable, "train.py", "config/cpu_demo.py", f"--data_dir={data_dir}", f"--out_dir={out_dir}",
         "--overwrite=True", "--batch_size=8", "--max_iters=40", "--eval_interval=40", "--eval_iters=1"])
    return tokens_per_s(out_dir)


def fine_tune(work: str, base: str, run_name: str, task: list[str], config: str, extra: list[str]) -> dict:
    name = "_".join(task[1::2])
    data = os.path.join(work, f"data_{name}")
    if not os.path.isfile(os.path.join(data, "meta.json")):
        jsonl = os.path.join(work, f"{name}_train.jsonl")
        run([sys.executable, "tasks.py", *task, "--n", str(TRAIN_PROBLEMS), "--split", "train", "--out", jsonl])
        # Exact repeats go, but near-duplicate removal stays off: "12 + 34" and "12 + 43" are different problems.
        run([sys.executable, "prepare_data.py", "--chat", "--input", jsonl, "--out", data, "--no_near_dedup",
             "--tokenizer", os.path.join(base, "tokenizer.model")])
    out_dir = os.path.join(work, run_name)
    stdout = run([sys.executable, "train.py", config, f"--init_from={base}", f"--data_dir={data}",
                  f"--out_dir={out_dir}", "--overwrite=True", *extra])
    real = float(re.search(r"train: .* ([\d.]+)% of them real", stdout).group(1)) / 100
    scores = os.path.join(out_dir, "eval.json")
    run([sys.executable, "eval.py", "--ckpt", out_dir, *task, "--n", "500", "--temperature", "0", "--out", scores])
    with open(scores) as f:
        exact = json.load(f)["exact_match"]
    return {"minutes": records(out_dir, "elapsed_s")[-1]["elapsed_s"] / 60, "exact": exact, "real": real,
            "tokens_per_s": tokens_per_s(out_dir)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--base", help="a cpu_demo out_dir to start from (default: pretrain one in --work_dir)")
    parser.add_argument("--work_dir", default="out/bench_sft", help="where data and checkpoints go")
    parser.add_argument("--rows", nargs="+", choices=[row[1] for row in ROWS], help="only these rows (default: all)")
    args = parser.parse_args()
    t0 = time.time()
    base = cpu_demo_run(args.base, args.work_dir, "--base")
    base_tokens_per_s = pretraining_tokens_per_s(args.work_dir, base)
    table = ["| run | task | training | exact match, 500 held out | real tokens after packing | "
             "tokens/s (pretraining: same model) |", "|---|---|---|---|---|---|"]
    for row, run_name, task, config, extra in ROWS:
        if args.rows and run_name not in args.rows:
            continue
        r = fine_tune(args.work_dir, base, run_name, task, config, extra)
        table.append(f"| {row} | {' '.join(task[1:])} | {r['minutes']:.1f} min | {r['exact']:.1%} | {r['real']:.1%} | "
                     f"{r['tokens_per_s']:,.0f} ({base_tokens_per_s:,.0f}) |")
        print("\n".join(table), flush=True)
    print(f"\nbase {base}; {time.time() - t0:.0f} s in all")


if __name__ == "__main__":
    main()
