"""
bench/dpo.py: Direct Preference Optimization, measured: config/dpo_add2.py from the SFT run half way through
learning 2-digit addition (bench/grpo.py's start), on pairs made from that model's own samples.

    python bench/dpo.py --sft out/bench_sft/sft300_add2    # the SFT run bench/grpo.py and bench/sft.py make

The SFT model samples 4 replies at temperature 1 to each of 2,000 train and 500 held-out problems (eval.py
--replies); tasks.py --pairs turns each problem into a pair, a right reply over one of the model's own wrong ones
(a corrupted answer where it had none). The table gives the held-out preference accuracy (the chosen reply's
implicit reward beta log(pi / pi_ref) above the rejected one's) and the task's greedy pass@1 on 500 held-out
problems, which DPO should not lower: it pushes the margin, and a margin can also grow by making both replies less
likely. The rows: plain DPO, DPO with RPO's cross-entropy on the chosen reply (config/dpo_add2.py), and, to tell
what the cross-entropy alone would do, more SFT from the same start at the same rate and steps.
"""

import argparse
import json
import os
import sys
import time

from grpo import TASK
from sft import records, run

# (out_dir name, config, extra train.py arguments): plain DPO at 1e-4 for 250 steps (at 3e-5 it ended lower still),
# DPO + RPO's cross-entropy as config/dpo_add2.py sets it, and more SFT at that config's rate and steps.
ROWS = [("dpo_add2_plain", "config/dpo_add2.py", ["--dpo_nll_weight=0", "--learning_rate=1e-4", "--min_lr=1e-5",
                                                  "--max_iters=250", "--lr_decay_iters=250"]),
        ("dpo_add2", "config/dpo_add2.py", []),
        ("sft_more", "config/sft_add2.py", ["--learning_rate=3e-4", "--min_lr=3e-5", "--max_iters=400",
                                            "--lr_decay_iters=400", "--warmup_iters=10"])]


def pair_file(sft: str, work: str, split: str, n: int) -> str:
    """tasks.py --pairs on the SFT model's own samples for n problems of split."""
    samples, pairs = os.path.join(work, f"samples_{split}.jsonl"), os.path.join(work, f"pairs_{split}.jsonl")
    run([sys.executable, "eval.py", "--ckpt", sft, *TASK, "--split", split, "--n", str(n), "--samples", "4",
         "--temperature", "1", "--replies", samples, "--out", os.path.join(work, f"samples_{split}.json")])
    run([sys.executable, "tasks.py", *TASK, "--split", split, "--n", str(n), "--pairs", samples, "--out", pairs])
    return pairs


def greedy_pass_at_1(out_dir: str) -> float:
    path = os.path.join(out_dir, "eval_greedy.json")
    run([sys.executable, "eval.py", "--ckpt", out_dir, *TASK, "--n", "500", "--temperature", "0", "--out", path])
    with open(path) as f:
        return json.load(f)["pass@1"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sft", required=True, help="an SFT out_dir to start from (bench/sft.py's sft300_add2)")
    parser.add_argument("--work_dir", default="out/bench_dpo", help="where pairs and checkpoints go")
    args = parser.parse_args()
    if not os.path.isfile(os.path.join(args.sft, "config.json")):
        raise SystemExit(f"--sft {args.sft} is not an out_dir of train.py (it has no config.json)")
    with open(os.path.join(args.sft, "config.json")) as f:
        data = json.load(f)["data_dir"]
    t0 = time.time()
    os.makedirs(args.work_dir, exist_ok=True)
    train_pairs, val_pairs = pair_file(args.sft, args.work_dir, "train", 2000), pair_file(args.sft, args.work_dir,
                                                                                          "test", 500)
    table = ["| model | training | held-out preference accuracy | mean margin | pass@1, greedy, 500 held out |",
             "|---|---|---|---|---|", f"| SFT ({args.sft}) | | ties at 0 | 0 | {greedy_pass_at_1(args.sft):.1%} |"]
    pairs = [f"--dpo_pairs={train_pairs}", f"--dpo_val_pairs={val_pairs}"]
    for name, config, extra in ROWS:
        out_dir = os.path.join(args.work_dir, name)
        run([sys.executable, "train.py", config, f"--init_from={args.sft}", f"--data_dir={data}",
             f"--out_dir={out_dir}", "--overwrite=True", *(pairs if "dpo" in config else []), *extra])
        held_out = records(out_dir, "val_loss")
        minutes = records(out_dir, "elapsed_s")[-1]["elapsed_s"] / 60
        accuracy = (f"{held_out[-1]['preference_accuracy']:.1%} | {held_out[-1]['margin']:.2f}"
                    if "dpo" in config else "- | -")
        table.append(f"| + {' '.join([config, *extra])} | {minutes:.1f} min | {accuracy} | "
                     f"{greedy_pass_at_1(out_dir):.1%} |")
        if "dpo" in config:
            curve = ", ".join(f"{r['iter']}: {r['preference_accuracy']:.1%}" for r in held_out)
            print(f"{name}: held-out preference accuracy by step: {curve}")
    print("\n".join(table) + f"\n\n{time.time() - t0:.0f} s in all")


if __name__ == "__main__":
    main()
