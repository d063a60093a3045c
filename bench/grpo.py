"""
bench/grpo.py: reinforcement learning on verifiable rewards, measured: config/grpo_add2.py from an SFT run half
way through learning 2-digit addition, scored before and after on the same 500 held-out problems.

    python bench/grpo.py                             # pretrains cpu_demo and fine-tunes it first (about 12 minutes)
    python bench/grpo.py --sft out/bench_sft/sft300_add2     # or starts from that SFT run (bench/sft.py's row)

pass@1 is the greedy reply's exact match, as eval.py scores it by default; pass@8 comes from 8 replies per
problem sampled at temperature 1 (eval.py's unbiased estimator), the replies RL samples and learns from. RL
that only sharpened the distribution onto answers it already found would raise pass@1 and lower pass@8 (Yue et
al. 2025, "Does Reinforcement Learning Really Incentivize Reasoning Capacity?"): the table shows both. The
curve of pass@1 on the run's own 200 held-out problems is in its metrics.jsonl (bench/plot_metrics.py).
"""

import argparse
import json
import os
import sys
import time

from sft import ROWS, cpu_demo_run, fine_tune, records, run

TASK = ["--task", "addition", "--digits", "2"]


def sft_start(args) -> tuple[str, str]:
    """(out_dir, data_dir) of the SFT run to start from: --sft, or bench/sft.py's sft300_add2 row fine-tuned here from
    a cpu_demo base."""
    if args.sft is None:
        base = cpu_demo_run(args.base, args.work_dir, "--base")
        [(_, run_name, task, config, extra)] = [row for row in ROWS if row[1] == "sft300_add2"]
        fine_tune(args.work_dir, base, run_name, task, config, extra)
        args.sft = os.path.join(args.work_dir, run_name)
    if not os.path.isfile(os.path.join(args.sft, "config.json")):
        raise SystemExit(f"--sft {args.sft} is not an out_dir of train.py (it has no config.json)")
    with open(os.path.join(args.sft, "config.json")) as f:
        return args.sft, json.load(f)["data_dir"]


def score(out_dir: str) -> dict:
    """Greedy pass@1 and sampled pass@1, pass@8 and mean reward on the 500 held-out problems."""
    results = {}
    for name, options in (("greedy", ["--temperature", "0"]),
                          ("sampled", ["--temperature", "1", "--samples", "8", "--pass_k", "1", "8"])):
        path = os.path.join(out_dir, f"eval_{name}.json")
        run([sys.executable, "eval.py", "--ckpt", out_dir, *TASK, "--n", "500", *options, "--out", path])
        with open(path) as f:
            results[name] = json.load(f)
    return {"pass@1": results["greedy"]["pass@1"], "sampled pass@1": results["sampled"]["pass@1"],
            "pass@8": results["sampled"]["pass@8"]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sft", help="an SFT out_dir to start from (default: make sft300_add2)")
    parser.add_argument("--base", help="without --sft: a cpu_demo out_dir to fine-tune (default: pretrain one)")
    parser.add_argument("--work_dir", default="out/bench_sft", help="where data and checkpoints go")
    parser.add_argument("--args", nargs="*", default=[], help="extra train.py arguments for the GRPO run")
    args = parser.parse_args()
    t0 = time.time()
    sft, data = sft_start(args)
    before = score(sft)
    out_dir = os.path.join(args.work_dir, "grpo_add2")
    run([sys.executable, "train.py", "config/grpo_add2.py", f"--init_from={sft}", f"--data_dir={data}",
         f"--out_dir={out_dir}", "--overwrite=True", *args.args])
    after = score(out_dir)
    steps = records(out_dir, "reward")
    minutes = records(out_dir, "elapsed_s")[-1]["elapsed_s"] / 60
    table = ["| model | training | pass@1, greedy | pass@1, sampled | pass@8 | mean reward of the step's replies |",
             "|---|---|---|---|---|---|",
             f"| SFT ({sft}) | | {before['pass@1']:.1%} | {before['sampled pass@1']:.1%} | {before['pass@8']:.1%} | "
             f"{steps[0]['reward']:.3f} (step 1) |",
             f"| + GRPO ({' '.join(['config/grpo_add2.py', *args.args])}) | {minutes:.1f} min, {len(steps)} steps | "
             f"{after['pass@1']:.1%} | {after['sampled pass@1']:.1%} | {after['pass@8']:.1%} | "
             f"{sum(r['reward'] for r in steps[-20:]) / len(steps[-20:]):.3f} (last 20 steps) |"]
    curve = [f"{r['iter']}: {r['pass@1']:.1%}" for r in records(out_dir, "pass@1")]
    print("\n".join(table))
    print(f"\npass@1 on the run's 200 held-out problems, by step: {', '.join(curve)}")
    print(f"{time.time() - t0:.0f} s in all")


if __name__ == "__main__":
    main()
