"""
bench/hybrid_attention.py: what Gated DeltaNet costs and buys against full attention, side by side on this CPU.

    python bench/hybrid_attention.py                  # cost tables (about a minute on 2 cores)
    python bench/hybrid_attention.py --quality        # and cpu_demo trained three ways (about 30 more minutes)

Cost: forward + backward of one layer of cpu_demo's width (256, 4 heads of 64; the linear layer with its defaults:
2 key heads and 4 value heads of 64) at batch 1 and T = 512 to 16,384: Gated DeltaNet in its chunked PyTorch form
against GQA attention through PyTorch's SDPA. Then decoding at cpu_demo's shape (4 layers) with a context of 256
and of 8192 tokens already in the cache: ms per token and the cache's size, for full attention, the 3:1 hybrid
(Qwen3-Next's layer_types) and linear attention only. Quality (--quality): config/cpu_demo.py as it is, as the 3:1
hybrid and all linear, same steps and data (--data_dir: python prepare_data.py's), validation bits per byte.
"""

import argparse
import json
import os
import subprocess
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from model import Attention, KVCache, ModelConfig, Transformer  # noqa: E402
from linear_attention import GatedDeltaNet  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
WIDTH = dict(n_layer=4, n_head=4, n_kv_head=2, n_embd=256, vocab_size=6400)
MIXES = {"full attention": 1, "3:1 hybrid": 4, "linear only": 0}  # full_attention_interval


def best_of(fn, repeats=3):
    fn()  # warm-up: the first call allocates
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return min(times)


def layer_costs(lengths):
    """Seconds of forward + backward of one layer, linear and full, at each T."""
    rows = []
    for T in lengths:
        config = ModelConfig(**{**WIDTH, "n_layer": 1}, block_size=T, layer_types=["linear_attention"], attn_impl="sdpa")
        torch.manual_seed(0)
        linear, full = GatedDeltaNet(config, 0), Attention(config, 0)
        x = torch.randn(1, T, 256, requires_grad=True)
        rope = Transformer(config).rope(torch.arange(T)[None], x.dtype)

        def run_linear():
            linear(x, None).sum().backward()

        def run_full():
            full(x, rope, None, None).sum().backward()

        rows.append((T, best_of(run_linear), best_of(run_full)))
    return rows


@torch.inference_mode()
def decode_cost(overrides, context, steps=16):
    """ms per decoded token with `context` tokens cached, and the cache's bytes, for cpu_demo's shape with the model
    keys `overrides` (a layer mix, say)."""
    torch.manual_seed(0)
    config = ModelConfig(**WIDTH, **overrides, block_size=context + steps, attn_impl="sdpa")
    model = Transformer(config).eval()
    cache = KVCache(config, 1, config.block_size)
    model(torch.randint(0, 6400, (1, context)), kv_cache=cache)
    token = torch.randint(0, 6400, (1, 1))
    t0 = time.perf_counter()
    for _ in range(steps):
        model(token, kv_cache=cache)
    seconds = (time.perf_counter() - t0) / steps
    size = KVCache.bytes_per_token(config) * (context + steps) + KVCache.bytes_per_sequence(config)
    return seconds * 1000, size


def train_run(name, extra, data_dir, max_iters, launcher=(sys.executable,), config="config/cpu_demo.py"):
    """config (cpu_demo's by default) with `extra` arguments into out/bench_<name>: (final val bits per byte, wall
    seconds). launcher: what runs train.py (torchrun's command for several processes)."""
    out = os.path.join(ROOT, "out", f"bench_{name}")
    args = [*launcher, os.path.join(ROOT, "train.py"), config, f"--out_dir={out}",
            f"--data_dir={data_dir}", "--overwrite=True", *extra]
    if max_iters:
        args += [f"--max_iters={max_iters}", f"--lr_decay_iters={max_iters}", f"--eval_interval={max_iters}"]
    t0 = time.time()
    if subprocess.run(args, cwd=ROOT, stdout=subprocess.DEVNULL).returncode:
        raise SystemExit(f"{sys.argv[0]}: train.py failed for {name} (its message is above)")
    records = [json.loads(line) for line in open(os.path.join(out, "metrics.jsonl"))]
    return [r for r in records if "val_bpb" in r][-1]["val_bpb"], time.time() - t0


def quality(data_dir, max_iters):
    """Validation bits per byte of cpu_demo trained as each mix, and the run's wall time."""
    return [(name, *train_run("linear/" + name.replace(" ", "_").replace(":", "to"),
                                   [f"--full_attention_interval={interval}"], data_dir, max_iters))
            for name, interval in MIXES.items()]


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quality", action="store_true", help="also train cpu_demo three ways (about 30 minutes)")
    parser.add_argument("--max_iters", type=int, default=0, help="--quality: steps per run (0: cpu_demo's 350)")
    parser.add_argument("--data_dir", default="data/pystdlib", help="--quality: prepare_data.py's default corpus")
    args = parser.parse_args()
    if args.quality and not os.path.isfile(os.path.join(args.data_dir, "meta.json")):
        raise SystemExit(f"--data_dir {args.data_dir} holds no prepared data: run python prepare_data.py first")
    torch.set_num_threads(os.cpu_count())

    print("\nOne layer, forward + backward, batch 1, width 256 (fp32)\n")
    print("| T | Gated DeltaNet (chunked) | full attention (sdpa) | linear / full |")
    print("|---:|---:|---:|---:|")
    rows = layer_costs([512, 2048, 4096, 8192, 16384])
    for T, lin, full in rows:
        print(f"| {T:,} | {lin * 1000:.0f} ms | {full * 1000:.0f} ms | {lin / full:.2f} |")
    cheaper = next((T for T, lin, full in rows if lin < full), None)
    print(f"\nthe linear layer is cheaper from T = {cheaper:,} on (the first length measured where it is)" if cheaper
          else f"\nthe linear layer is not cheaper at any length measured (up to {rows[-1][0]:,})")

    print("\nDecoding at cpu_demo's shape (4 layers), batch 1: ms per token and cache size with the context cached\n")
    print("| layers | ms/token at 256 | at 8,192 | cache at 256 | at 8,192 |")
    print("|---|---:|---:|---:|---:|")
    for name, interval in MIXES.items():
        mix = {"full_attention_interval": interval}
        (short_ms, short_bytes), (long_ms, long_bytes) = decode_cost(mix, 256), decode_cost(mix, 8192)
        print(f"| {name} | {short_ms:.2f} | {long_ms:.2f} | {short_bytes / 2**20:.2f} MiB | {long_bytes / 2**20:.2f} MiB |")

    if args.quality:
        print("\nconfig/cpu_demo.py, same steps and data, three layer mixes\n")
        print("| layers | val bits per byte | wall time |")
        print("|---|---:|---:|")
        for name, bpb, seconds in quality(args.data_dir, args.max_iters):
            print(f"| {name} | {bpb:.3f} | {seconds / 60:.1f} min |")


if __name__ == "__main__":
    main()
