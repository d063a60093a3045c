"""
bench/plot_metrics.py: curves from the metrics.jsonl of one or more runs, one panel per key, as a PNG.

    python bench/plot_metrics.py out/grpo_add2 --keys pass@1 reward kl --out bench/grpo_add2.png

A key is any field of metrics.jsonl (train.py writes one record per logged step and one per evaluation); each
panel plots the records that hold it against the step. Needs matplotlib (pip install ".[plot]"), which nothing
else in the project does.
"""

import argparse
import json
import os


def curves(out_dir: str, key: str) -> tuple[list[int], list[float]]:
    try:
        with open(os.path.join(out_dir, "metrics.jsonl")) as f:
            points = [(r["iter"], r[key]) for r in map(json.loads, f) if isinstance(r.get(key), (int, float))]
    except (OSError, ValueError) as e:
        raise SystemExit(f"cannot read {out_dir}/metrics.jsonl: {e}") from None
    return [p[0] for p in points], [p[1] for p in points]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("runs", nargs="+", help="out_dirs of train.py runs")
    parser.add_argument("--keys", nargs="+", required=True, help="metrics.jsonl fields, one panel each")
    parser.add_argument("--out", required=True, help="the PNG to write")
    args = parser.parse_args()
    try:
        import matplotlib
    except ImportError:
        raise SystemExit('bench/plot_metrics.py needs matplotlib: pip install ".[plot]"') from None
    matplotlib.use("Agg")  # a file, no screen
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(args.keys), figsize=(4 * len(args.keys), 3), squeeze=False)
    for ax, key in zip(axes[0], args.keys):
        for out_dir in args.runs:
            steps, values = curves(out_dir, key)
            if not steps:
                raise SystemExit(f"{out_dir}/metrics.jsonl has no record with a number for {key!r}")
            ax.plot(steps, values, label=os.path.basename(os.path.normpath(out_dir)))
        ax.set_xlabel("step")
        ax.set_title(key)
        ax.grid(alpha=0.3)
    axes[0][0].legend()
    fig.tight_layout()
    fig.savefig(args.out, dpi=100)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
