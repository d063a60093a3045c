"""
bench/experts.py: expert parallelism, ScMoE's shortcut layer and multi-token prediction, side by side on this CPU.

    python bench/experts.py --quality     # cpu_demo trained four ways (about 45 minutes), then the tables below
    python bench/experts.py               # the exchange on 2 gloo ranks and speculative decoding (a few minutes)

The exchange: train.py under torchrun on 2 ranks, expert_parallel=2, 30 steps of cpu_demo's width with MoE in every
layer, as a standard MoE stack (4 layers) and as ScMoE shortcut layers (2 layers, each two attention sublayers) at
equal active parameters: the dense MLPs of a shortcut layer (inter_dim 192) and its one MoE cost what a standard
layer pair's two MoEs cost (3 experts of 128 a token each). Per step: the time, the milliseconds a rank waits on
each exchange per MoE layer (the forward's dispatch and combine, which the shortcut overlaps with dense compute, and
the backward's, which nothing overlaps here), means over the ranks, and the bytes of rows sent against the count the
routing implies. On one machine the link is a memory copy by gloo's threads, so the overlap shows as wait that
disappears, not as network time hidden.

Speculative decoding: the MTP model of --quality (cpu_demo with mtp_depth=1), greedy, batch 1: tokens per second
with and without its first MTP module drafting, the share of drafts accepted, and that the text is the same.

Quality (--quality): cpu_demo as it is and with mtp_depth=1 (mtp_loss_weight 0.3); the standard MoE stack and the
shortcut stack; same steps and data (--data_dir), validation bits per byte, whatever they are.
"""

import argparse
import json
import os
import statistics
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from hybrid_attention import ROOT, train_run  # noqa: E402
from checkpoint import load_model  # noqa: E402
from model import speculative_generate  # noqa: E402

MOE = ["--n_routed_experts=8", "--num_experts_per_tok=2", "--n_shared_experts=1", "--moe_inter_dim=128",
       "--first_k_dense_replace=0"]
STACKS = {"standard MoE, 4 layers": MOE,
          "ScMoE shortcut, 2 layers": [*MOE, "--n_layer=2", "--moe_shortcut=True", "--inter_dim=192"]}
TORCHRUN = (sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2")
PROMPTS = ["def ", "class ", "import os\n", "    return ", "# ", "if __name__ == "]


def exchange_costs(data_dir, steps=30):
    """Per stack: (ms per step, {exchange: ms waited per MoE layer per step}, bytes sent per step, the routing's
    count)."""
    rows = []
    for name, extra in STACKS.items():
        slug = "experts/exchange_" + name.split(",")[0].replace(" ", "_")
        train_run(slug, [*extra, "--expert_parallel=2", "--gradient_accumulation_steps=2", "--log_interval=1",
                              "--eval_iters=1"], data_dir, steps, launcher=TORCHRUN)
        with open(os.path.join(ROOT, "out", f"bench_{slug}", "metrics.jsonl")) as f:
            steps_logged = [r for r in map(json.loads, f) if "loss" in r][5:]  # after the first steps' warm-up
        ms = statistics.median(1000 * 2 * 16 * 256 / r["tokens_per_s"] for r in steps_logged)
        layers = len(steps_logged[0]["expert_load_max_over_mean"])
        wait = {phase: statistics.median(1000 * r[f"expert_wait_{phase}_s"] / layers for r in steps_logged)
                for phase in ("dispatch", "combine", "backward")}
        rows.append((name, ms, wait, statistics.mean(r["expert_bytes"] for r in steps_logged),
                     statistics.mean(r["expert_bytes_theory"] for r in steps_logged)))
    return rows


def speculative_speed(ckpt, new_tokens=150):
    """Greedy continuations of PROMPTS with and without drafting: (tokens/s plain, tokens/s speculative, share of
    drafts accepted, whether every text is the same)."""
    model, tokenizer = load_model(ckpt, "cpu")
    stats, same, seconds = {}, True, [0.0, 0.0]
    for prompt in PROMPTS:
        idx = torch.tensor([tokenizer.encode(prompt)])
        t0 = time.perf_counter()
        plain = torch.cat(list(model.generate(idx, new_tokens, temperature=0)))
        t1 = time.perf_counter()
        drafted = torch.cat(list(speculative_generate(model, idx, new_tokens, stats=stats)))
        t2 = time.perf_counter()
        seconds[0] += t1 - t0
        seconds[1] += t2 - t1
        same &= torch.equal(plain, drafted)
    n = new_tokens * len(PROMPTS)
    return n / seconds[0], n / seconds[1], stats["accepted"] / stats["drafted"], same


def quality(data_dir, max_iters):
    """(name, val bits per byte, minutes) of cpu_demo trained each way."""
    runs = {"dense": [], "dense + MTP depth 1": ["--mtp_depth=1"], **STACKS}
    out = []
    for name, extra in runs.items():
        slug = "experts/" + name.split(",")[0].replace(" ", "_").replace("+", "and")
        bpb, seconds = train_run(slug, extra, data_dir, max_iters)
        out.append((name, bpb, seconds / 60))
    return out


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quality", action="store_true", help="also train cpu_demo four ways (about 45 minutes)")
    parser.add_argument("--max_iters", type=int, default=0, help="--quality: steps per run (0: cpu_demo's 350)")
    parser.add_argument("--data_dir", default="data/pystdlib", help="prepare_data.py's default corpus")
    args = parser.parse_args()
    if not os.path.isfile(os.path.join(args.data_dir, "meta.json")):
        raise SystemExit(f"--data_dir {args.data_dir} holds no prepared data: run python prepare_data.py first")
    torch.set_num_threads(os.cpu_count())
    if args.quality:
        print("\nQuality: cpu_demo's steps and data, validation bits per byte\n")
        print("| model | val bits per byte | training minutes |")
        print("|---|---:|---:|")
        for name, bpb, minutes in quality(args.data_dir, args.max_iters):
            print(f"| {name} | {bpb:.3f} | {minutes:.1f} |")

    print("\nThe exchange: 2 gloo ranks, expert_parallel=2, cpu_demo's width, 30 steps (medians after the 5th)\n")
    print("| stack | ms per step | ms waited per MoE layer: dispatch | combine | backward | bytes sent per step "
          "| routing's count |")
    print("|---|---:|---:|---:|---:|---:|---:|")
    for name, ms, wait, sent, theory in exchange_costs(args.data_dir):
        print(f"| {name} | {ms:.0f} | {wait['dispatch']:.1f} | {wait['combine']:.1f} | {wait['backward']:.1f} | "
              f"{sent:,.0f} | {theory:,.0f} |")

    ckpt = os.path.join(ROOT, "out", "bench_experts", "dense_and_MTP_depth_1")
    if not os.path.isfile(os.path.join(ckpt, "ckpt.pt")):
        print(f"\nno MTP model at {ckpt}: run with --quality first for the speculative-decoding table")
        return
    plain, drafted, accepted, same = speculative_speed(ckpt)
    print("\nSelf-speculative decoding: cpu_demo with mtp_depth=1, greedy, batch 1, 150 new tokens x "
          f"{len(PROMPTS)} prompts\n")
    print("| decoding | tokens/s | drafts accepted |")
    print("|---|---:|---:|")
    print(f"| plain | {plain:.1f} | |")
    print(f"| speculative | {drafted:.1f} | {accepted:.1%} |")
    print(f"\nspeculative / plain: {drafted / plain:.2f}x; the same text: {same}")


if __name__ == "__main__":
    main()
