"""
bench/levers.py: the speedrun's levers, each alone and all together, in validation bits per byte on this CPU.

    python bench/levers.py --input tinyshakespeare.txt              # config/shakespeare_cpu.py, every row
    python bench/levers.py --input tinyshakespeare.txt --only muon,wsd
    python bench/levers.py --data_dir data/pystdlib --config config/cpu_demo.py   # a prepared corpus instead

Every row trains the config with one change (or all of them), twice: at the baseline's steps, and with as many steps
as fit in the baseline's wall time at that row's own measured speed (its schedule stretched or shrunk to match), so a
lever that slows a step pays for it. Runs go one after another on a quiet machine: two at once would each slow the
other several times over. The table keeps every row, whether the lever helps here or not.
"""

import argparse
import os
import sys
import tempfile

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from hybrid_attention import ROOT, train_run  # noqa: E402  (it puts the repository root on the path too)
from shakespeare import prepare  # noqa: E402
from configurator import load_config  # noqa: E402
from train import DEFAULTS  # noqa: E402

# name: (one sentence of why, train.py arguments). Each is off by default in train.py.
LEVERS = {
    "muon": ("Muon on the blocks' matrices, AdamW's rate and decay (Jordan et al. 2024; Moonlight)",
             ["--optimizer=muon"]),
    "qk_norm": ("RMSNorm of each query and key head bounds the attention logits (Dehghani et al. 2023)",
                ["--qk_norm=True"]),
    "relu2": ("ungated ReLU^2 MLP of the same parameter count (Primer, So et al. 2021)", ["--hidden_act=relu2"]),
    "softcap": ("logits capped at 15 by 15 tanh(z / 15) (Gemma 2)", ["--final_logit_softcapping=15.0"]),
    "zero_init": ("wo and w2 start at zero: every block starts as the identity (the speedrun)",
                  ["--zero_init_residual=True"]),
    "untied": ("a head of its own instead of the embedding's transpose (the speedrun)", ["--tie_embeddings=False"]),
    "wsd": ("constant rate, then a linear cool-down over the last 20% (WSD; MiniCPM)", ["--lr_schedule=wsd"]),
    "aligned": ("training windows start at documents (the speedrun's aligned batches)", ["--align_windows=True"]),
    "compile": ("torch.compile of the model", ["--compile=True"]),
}


def steps_of(config_path: str) -> int:
    """The config's max_iters, read as train.py reads it."""
    return load_config(DEFAULTS, [os.path.join(ROOT, config_path)])["max_iters"]


def train(name, extra, data_dir, config, steps):
    """One run of `steps` (the schedule ending there): (final val bits per byte, wall seconds)."""
    return train_run(f"levers/{name}", extra, data_dir, steps, config=config)


def single_document(data_dir: str) -> bool:
    return len(np.load(os.path.join(data_dir, "train_doc_index.npy"))) < 2


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--input", help="tinyshakespeare.txt, prepared as bench/shakespeare.py does")
    parser.add_argument("--data_dir", help="or a prepare_data.py folder")
    parser.add_argument("--config", default="config/shakespeare_cpu.py")
    parser.add_argument("--only", default="", help="comma-separated lever names (default: all, then all together)")
    args = parser.parse_args()
    if bool(args.input) == bool(args.data_dir):
        raise SystemExit("give --input (tiny Shakespeare) or --data_dir (a prepared corpus), one of them")
    unknown = set(filter(None, args.only.split(","))) - set(LEVERS)
    if unknown:
        raise SystemExit(f"--only: no lever named {', '.join(sorted(unknown))} (levers: {', '.join(LEVERS)})")
    data_dir = args.data_dir or prepare(args.input, tempfile.mkdtemp(prefix="levers_"))[0]
    names = [n for n in LEVERS if not args.only or n in args.only.split(",")]
    if single_document(data_dir) and "aligned" in names:
        names.remove("aligned")
        print("aligned: left out, the corpus is one document (every window would start at its first token)")
    steps = steps_of(args.config)
    base_bpb, base_s = train("baseline", [], data_dir, args.config, steps)
    rows = [("baseline", "the config as it is", base_bpb, base_s, base_bpb, steps)]
    together = [a for n in names if n != "compile" for a in LEVERS[n][1]]
    runs = [(n, *LEVERS[n]) for n in names] + ([("all", "every lever above but compile", together)]
                                                if not args.only else [])
    for name, why, extra in runs:
        bpb, seconds = train(name, extra, data_dir, args.config, steps)
        fit = max(1, round(steps * base_s / seconds))  # steps at this row's speed in the baseline's wall time
        bpb_timed, _ = train(name + "_timed", extra, data_dir, args.config, fit) if fit != steps else (bpb, seconds)
        rows.append((name, why, bpb, seconds, bpb_timed, fit))
    print(f"\n{args.config}, {steps} steps; equal time: the baseline's {base_s:.0f} s\n")
    print("| lever | why | val bpb, equal steps | wall s | val bpb, equal time | steps in that time |")
    print("|---|---|---:|---:|---:|---:|")
    for name, why, bpb, seconds, bpb_timed, fit in rows:
        print(f"| {name} | {why} | {bpb:.3f} ({bpb / base_bpb - 1:+.1%}) | {seconds:.0f} | {bpb_timed:.3f} "
              f"({bpb_timed / base_bpb - 1:+.1%}) | {fit} |")


if __name__ == "__main__":
    main()
