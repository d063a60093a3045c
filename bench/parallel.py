"""
bench/parallel.py: what each ZeRO stage costs in time and bytes moved and saves in memory, and the MFU of one GPU.

    python bench/parallel.py          # CPU, gloo, 1 and 2 ranks, stages 0-3: about two minutes on 2 cores
    python bench/parallel.py --gpu    # one GPU: MFU of config/pretrain.py and config/gpt2_124m.py (world size 1)

CPU: a model of cpu_demo's shape (4 layers, 256 wide, vocab 6,400: 4.6M parameters) trains on random tokens, a
global batch of 8 x 128 tokens split over the ranks, each rank on one thread. Per stage and world size: the
median step time, the bytes each rank sent per step against the ZeRO paper's count, the seconds it waited on
collectives, and the bytes of model states (parameters + gradients + AdamW moments) a rank holds after the
backward, per parameter. The one idea: ZeRO's memory table (Rajbhandari et al. 2020, figure 1) in bytes per
parameter. The paper trains fp16 parameters with fp32 master copies: 2 + 2 + 12 = 16 for DDP, 4 + 12/N for
stage 1, 2 + 14/N for stage 2, 16/N for stage 3. Here the parameters are the fp32 masters (autocast makes the
bf16 copies on the fly), so ours is 4 + 4 + 8 = 16, 8 + 8/N, 4 + 12/N and 16/N.
GPU: bf16 autocast, torch.compile, the config's micro-batch, tokens/s and MFU (PaLM's 6N + attention FLOPs per
token over the GPU's dense bf16 peak).
"""

import argparse
import json
import os
import statistics
import subprocess
import sys
import time

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
import parallel  # noqa: E402
from model import ModelConfig, Transformer  # noqa: E402

MODEL_FIELDS = set(ModelConfig.__dataclass_fields__)

SHAPE = dict(vocab_size=6400, block_size=128, n_layer=4, n_head=4, n_kv_head=2, n_embd=256)
GLOBAL_BATCH, WARMUP, STEPS = 8, 2, 6
OURS = {0: lambda n: 16, 1: lambda n: 8 + 8 / n, 2: lambda n: 4 + 12 / n, 3: lambda n: 16 / n}
PAPER = {0: lambda n: 16, 1: lambda n: 4 + 12 / n, 2: lambda n: 2 + 14 / n, 3: lambda n: 16 / n}


def peak_rss_mb() -> float:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("VmHWM")) / 1024


def model_state_bytes(engine: parallel.Engine) -> int:
    """Bytes of the distinct storages holding parameters, gradients and AdamW moments on this rank."""
    tensors = [t for b in engine.buckets for t in (b.flat, b.shard, b.shard.grad, getattr(b, "grad", None), b.staging)]
    tensors += [p.grad for p in engine.model.parameters()]
    tensors += [t for state in engine.optimizer.state.values() for t in state.values() if t.dim() > 0]
    return sum({t.untyped_storage().data_ptr(): t.untyped_storage().nbytes() for t in tensors if t is not None}.values())


def cpu_worker(stage: int) -> None:
    """One rank of one (world size, stage) run; rank 0 prints a JSON line."""
    rank, _, world = parallel.init_distributed()
    base_rss = peak_rss_mb()
    torch.manual_seed(0)
    model = Transformer(ModelConfig(**SHAPE))
    parallel.broadcast_parameters(model)
    engine = parallel.Engine(model, model.param_groups(0.1), stage, lr=1e-3, betas=(0.9, 0.95), fused=False)
    scaler = torch.amp.GradScaler("cpu", enabled=False)
    g = torch.Generator().manual_seed(rank)
    times, sent, waited, held = [], [], [], 0
    for step in range(WARMUP + STEPS):
        x = torch.randint(0, SHAPE["vocab_size"], (GLOBAL_BATCH // world, SHAPE["block_size"] + 1), generator=g)
        engine.comm_stats()
        t0 = time.perf_counter()
        engine.set_sync(True)
        _, loss = model(x[:, :-1], x[:, 1:])
        engine.backward(loss)
        held = max(held, model_state_bytes(engine))
        engine.step(1e-3, 1.0, scaler)
        times.append(time.perf_counter() - t0)
        stats = engine.comm_stats()
        sent.append(stats["comm_bytes"])
        waited.append(stats["comm_wait_s"])
    n_params = sum(p.numel() for p in model.parameters())
    peaks = parallel.all_gather_objects(peak_rss_mb() - base_rss)
    if rank == 0:
        print(json.dumps({"world": world, "stage": stage, "step_ms": 1e3 * statistics.median(times[WARMUP:]),
                          "sent_mb": sent[-1] / 1e6, "theory_mb": engine.theory_bytes(1) / 1e6,
                          "wait_ms": 1e3 * statistics.median(waited[WARMUP:]), "bytes_per_param": held / n_params,
                          "peak_rss_mb": max(peaks), "params_m": n_params / 1e6}))
    parallel.destroy()


def cpu_table() -> None:
    rows = []
    for world in (1, 2):
        for stage in range(4):
            launcher = [sys.executable] if world == 1 else [sys.executable, "-m", "torch.distributed.run", "--standalone",
                                                             f"--nproc_per_node={world}"]
            out = subprocess.run([*launcher, os.path.abspath(__file__), f"--worker={stage}"], cwd=ROOT, check=True,
                                 env=dict(os.environ, OMP_NUM_THREADS="1"), capture_output=True, text=True).stdout
            rows.append(json.loads(out.strip().splitlines()[-1]))
            print(f"world {world} stage {stage} done", file=sys.stderr)
    print(f"{rows[0]['params_m']:.2f}M parameters, fp32, global batch {GLOBAL_BATCH} x {SHAPE['block_size']} tokens, "
          "gloo, one thread per rank\n")
    print("| ranks | stage | step ms | sent MB/step/rank | paper's MB | wait ms | model states B/param "
          "| ours: theory | paper (fp16) | peak RSS MB |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        n, s = r["world"], r["stage"]
        print(f"| {n} | {s} | {r['step_ms']:.0f} | {r['sent_mb']:.2f} | {r['theory_mb']:.2f} | {r['wait_ms']:.1f} "
              f"| {r['bytes_per_param']:.2f} | {OURS[s](n):.2f} | {PAPER[s](n):.2f} | {r['peak_rss_mb']:.0f} |")


def gpu_table() -> None:
    """MFU at world size 1 of the two configs, each at its own micro-batch (the largest that the config asks)."""
    from configurator import peak_flops, read_config_file
    if not torch.cuda.is_available():
        raise SystemExit("--gpu needs a CUDA device")
    print(f"{torch.cuda.get_device_name()}, torch {torch.__version__}, bf16 autocast, torch.compile\n")
    print("| config | params | micro-batch | tokens/s | MFU |")
    print("|---|---|---|---|---|")
    for path, vocab in (("config/pretrain.py", 6400), ("config/gpt2_124m.py", 50304)):
        c = read_config_file(os.path.join(ROOT, path))  # both configs set the batch and every model key they change
        torch.manual_seed(0)
        model = Transformer(ModelConfig(vocab_size=vocab, **{k: v for k, v in c.items() if k in MODEL_FIELDS})).cuda()
        engine = parallel.Engine(model, model.param_groups(c["weight_decay"]), 0, lr=1e-4, betas=(0.9, 0.95), fused=True)
        compiled = torch.compile(model)
        scaler = torch.amp.GradScaler("cuda", enabled=False)
        batch, block = c["batch_size"], c["block_size"]
        times = []
        for step in range(3 + 10):  # the first steps compile
            x = torch.randint(0, vocab, (batch, block + 1), device="cuda")
            torch.cuda.synchronize()
            t0 = time.perf_counter()
            with torch.autocast("cuda", dtype=torch.bfloat16):
                _, loss = compiled(x[:, :-1], x[:, 1:])
            engine.backward(loss)
            engine.step(1e-4, 1.0, scaler)
            torch.cuda.synchronize()
            times.append(time.perf_counter() - t0)
        tokens_per_s = batch * block / statistics.median(times[3:])
        peak = peak_flops("cuda", torch.bfloat16)
        mfu = f"{100 * model.estimate_flops() * tokens_per_s / peak:.1f}%" if peak else "unknown GPU"
        print(f"| {path} | {sum(p.numel() for p in model.parameters()) / 1e6:.1f}M | {batch} x {block} "
              f"| {tokens_per_s:,.0f} | {mfu} |")
        del model, engine, compiled
        torch.cuda.empty_cache()


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--gpu", action="store_true", help="MFU on one GPU instead of the CPU table")
    parser.add_argument("--worker", type=int, default=None, help=argparse.SUPPRESS)  # one rank of one CPU run
    args = parser.parse_args()
    if args.worker is not None:
        cpu_worker(args.worker)
    elif args.gpu:
        gpu_table()
    else:
        cpu_table()
