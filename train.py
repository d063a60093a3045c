"""
train.py: pretrain a myllm Transformer on one CPU, one GPU, or many GPUs.

    python train.py config/cpu_demo.py                          # one process
    python train.py config/cpu_demo.py --max_iters=200 --compile=True   # --key=value overrides
    python train.py config/cpu_demo.py --init_from=resume       # continue from out_dir/ckpt.pt
    torchrun --nproc_per_node=6 train.py config/pretrain.py     # data parallel (NCCL, or gloo on CPU)
    torchrun --nproc_per_node=6 train.py config/pretrain.py --zero_stage=3   # ZeRO-3 (parallel.py)

A flat script in nanoGPT's shape: configuration, distributed set-up, data, model, optimizer,
evaluation, the loop. The one idea: an optimizer step consumes one *global batch* of
`gradient_accumulation_steps * batch_size` windows of `block_size` tokens. The micro-batches'
gradients add up to the gradient of that global batch; with N processes each does 1/N of the
micro-batches and parallel.py averages, so the step is the same computation whatever N is, and the
batch drawn for step `it` depends only on (seed, it), which makes a resumed run replay exactly.
"""

import ast
import json
import math
import os
import shutil
import sys
import time
from contextlib import nullcontext
from dataclasses import MISSING, asdict, fields

import numpy as np
import torch
import torch.nn.functional as F
from tqdm import tqdm

from parallel import (FSDP2, Engine, all_gather_objects, all_reduce_sum, broadcast_parameters,
                      check_same_on_all_ranks, destroy, init_distributed)
from model import ModelConfig, Transformer
from tokenizer import Tokenizer

# -----------------------------------------------------------------------------------------------
# Configuration. Every name below is a config key; config/*.py files are executed as plain Python
# and may set any of them, then --key=value arguments override (values parsed as Python literals).
# Every ModelConfig field (n_layer, n_head, n_kv_head, n_embd, ..., see model.py) is a key too;
# rope_scaling is a dict, e.g. --rope_scaling="{'rope_type': 'linear', 'factor': 4.0}".
out_dir = "out"
data_dir = "data/pystdlib"  # made by prepare_data.py: train.bin, val.bin, meta.json, tokenizer.model
init_from = "scratch"  # or "resume": continue from out_dir/ckpt.pt
eval_interval = 250
eval_iters = 20  # batches per split per evaluation
log_interval = 10
always_save_checkpoint = True  # else save only when val loss improves
# batch: tokens per optimizer step = gradient_accumulation_steps * batch_size * block_size
batch_size = 16  # windows per micro-batch per process
gradient_accumulation_steps = 1  # global count, divided among the processes
# AdamW and the learning-rate schedule
learning_rate = 6e-4
max_iters = 5000
weight_decay = 0.1
beta1 = 0.9
beta2 = 0.95
grad_clip = 1.0  # clip the global gradient norm to this; 0 disables clipping
warmup_iters = 100
lr_decay_iters = 5000  # cosine decay reaches min_lr here (nanoGPT: about max_iters)
min_lr = 6e-5  # about learning_rate / 10 (Chinchilla)
# system
device = "auto"  # "auto": cuda if available, else cpu
dtype = "auto"  # "auto": bfloat16 on a GPU that has it, else float32; or float32/bfloat16/float16
compile = False  # torch.compile the model (first step compiles for a while)
seed = 1337
dist_timeout_s = 600.0  # a collective waiting longer than this fails instead of hanging
zero_stage = 0  # 0 DDP, 1 shard optimizer state, 2 + gradients, 3 + parameters (parallel.py)
parallel = "handwritten"  # or "fsdp2": PyTorch's fully_shard (needs torchrun)
bucket_mb = 25.0  # gradient bucket size of stages 0-2: big enough to amortise each collective's latency
DEFAULTS = {k: v for k, v in globals().items() if not k.startswith("_") and isinstance(v, (int, float, bool, str))}
MODEL_KEYS = [f.name for f in fields(ModelConfig) if f.name != "vocab_size"]  # vocab comes from the data
DEFAULTS |= {f.name: f.default if f.default is not MISSING else f.default_factory()
             for f in fields(ModelConfig) if f.name in MODEL_KEYS}
# -----------------------------------------------------------------------------------------------


def load_config(defaults: dict, argv: list[str]) -> dict:
    """Config files (executed as Python) and --key=value overrides, applied in order.

    Every key must already exist and keep its type: a typo such as --learing_rate=1e-3 is an error,
    never a silently ignored setting. An int is accepted where a float is expected.
    """
    config = dict(defaults)

    def set_key(key, value, where):
        if key not in config:
            raise SystemExit(f"{where}: unknown config key '{key}'")
        expected = type(config[key])
        if expected is float and type(value) is int:
            value = float(value)
        if type(value) is not expected:
            raise SystemExit(f"{where}: config key '{key}' must be {expected.__name__}, got {value!r}")
        config[key] = value

    for arg in argv:
        if arg.startswith("--"):
            key, sep, text = arg[2:].partition("=")
            if not sep:
                raise SystemExit(f"override '{arg}' must look like --key=value")
            try:
                value = ast.literal_eval(text)
            except (ValueError, SyntaxError):
                value = text  # a bare word such as --device=cpu is a string
            set_key(key, value, arg)
        else:
            if not os.path.isfile(arg):
                raise SystemExit(f"config file '{arg}' does not exist")
            namespace = {}
            exec(open(arg).read(), namespace)
            for key, value in namespace.items():
                if not key.startswith("_") and isinstance(value, (int, float, bool, str, dict)):
                    set_key(key, value, arg)
    return config


def get_lr(it: int, config: dict) -> float:
    """Linear warmup, then cosine decay to min_lr (Loshchilov & Hutter, SGDR). Warmup starts at
    learning_rate / (warmup_iters + 1), never at 0: a step with lr 0 would be a wasted batch."""
    if it < config["warmup_iters"]:
        return config["learning_rate"] * (it + 1) / (config["warmup_iters"] + 1)
    if it >= config["lr_decay_iters"]:
        return config["min_lr"]
    ratio = (it - config["warmup_iters"]) / max(1, config["lr_decay_iters"] - config["warmup_iters"])
    coeff = 0.5 * (1.0 + math.cos(math.pi * ratio))
    return config["min_lr"] + coeff * (config["learning_rate"] - config["min_lr"])


def read_windows(path: str, dtype: np.dtype, starts: np.ndarray, block_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Inputs x and next-token targets y for windows starting at `starts`, each (len(starts), block_size).

    The memmap is opened anew for every batch: a memmap kept open holds on to every page it ever
    touched, and over a long run that shows up as a slow memory leak (nanoGPT, issue #3).
    """
    data = np.memmap(path, dtype=dtype, mode="r")
    windows = np.stack([data[s:s + block_size + 1] for s in starts]).astype(np.int64)
    windows = torch.from_numpy(windows)
    return windows[:, :-1], windows[:, 1:]


def save_checkpoint(path: str, checkpoint: dict) -> None:
    """Write to a temporary name, flush to disk, then rename: a kill at any moment leaves either the
    previous complete checkpoint or the new complete one, never a torn file (rename is atomic)."""
    tmp = path + ".tmp"
    with open(tmp, "wb") as f:
        torch.save(checkpoint, f)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def load_checkpoint(path: str, device: str, mmap: bool = False) -> dict:
    """The checkpoint at path, or one clear sentence if it is torn or not a checkpoint. weights_only: a
    checkpoint is data, and unpickling arbitrary objects from a file would run code. mmap: tensors are read
    from disk only when touched (each rank reads only its slices out of every optimizer shard)."""
    try:
        return torch.load(path, map_location=device, weights_only=True, mmap=mmap)
    except Exception as e:
        raise SystemExit(f"cannot read {path}: {type(e).__name__}: {str(e).splitlines()[0]}")


def peak_flops(device_type: str, ptdtype: torch.dtype) -> float | None:
    """Dense bf16 tensor-core peak of the GPU, for MFU (model FLOPs utilisation, PaLM appendix B).
    Unknown devices (and the CPU) report no MFU rather than a made-up one."""
    if device_type != "cuda" or ptdtype != torch.bfloat16:
        return None
    name = torch.cuda.get_device_name()
    table = {"H100": 989e12, "H200": 989e12, "H800": 989e12, "A100": 312e12, "A800": 312e12, "L40S": 362e12, "4090": 165e12}
    for key, flops in table.items():
        if key in name:
            return flops
    return None


def main(argv: list[str]) -> None:
    config = load_config(DEFAULTS, argv)
    c = config  # short alias for the loop below

    # ---- processes and devices ----------------------------------------------------------------
    rank, local_rank, world_size = init_distributed(c["dist_timeout_s"])
    master = rank == 0
    check_same_on_all_ranks(config, "config")
    if c["gradient_accumulation_steps"] % world_size:
        raise SystemExit(f"gradient_accumulation_steps={c['gradient_accumulation_steps']} must be a multiple of the "
                         f"number of processes ({world_size}): each process does an equal share of the micro-batches")
    accum_steps = c["gradient_accumulation_steps"] // world_size  # micro-batches per process per step
    device = c["device"]
    if device == "auto":
        device = f"cuda:{local_rank}" if torch.cuda.is_available() else "cpu"
    device_type = "cuda" if device.startswith("cuda") else "cpu"
    dtype_name = c["dtype"]
    if dtype_name == "auto":
        dtype_name = "bfloat16" if device_type == "cuda" and torch.cuda.is_bf16_supported() else "float32"
    if dtype_name not in ("float32", "bfloat16", "float16"):
        raise SystemExit(f"dtype must be auto, float32, bfloat16 or float16, got '{dtype_name}'")
    if c["parallel"] not in ("handwritten", "fsdp2"):
        raise SystemExit(f"parallel must be 'handwritten' or 'fsdp2', got '{c['parallel']}'")
    if c["zero_stage"] not in (0, 1, 2, 3):
        raise SystemExit(f"zero_stage must be 0, 1, 2 or 3, got {c['zero_stage']}")
    if c["parallel"] == "fsdp2" and c["zero_stage"] != 0:
        raise SystemExit("zero_stage is for parallel='handwritten'; fsdp2 always shards as stage 3 does")
    if c["parallel"] == "fsdp2" and world_size == 1:
        raise SystemExit("parallel='fsdp2' needs a process group: launch with torchrun (even --nproc_per_node=1)")
    if dtype_name == "float16" and (c["zero_stage"] > 0 or c["parallel"] == "fsdp2"):
        # GradScaler would see only this rank's slice of the gradient, and ranks could disagree on skipping a step.
        raise SystemExit("dtype=float16 needs the handwritten zero_stage=0 (loss scaling sees the whole gradient "
                         "only there): use bfloat16")
    if c["compile"] and c["zero_stage"] == 3:
        raise SystemExit("compile=True does not go with zero_stage=3, whose hooks free and regather parameter memory")
    ptdtype = getattr(torch, dtype_name)
    # Autocast runs matmuls in bf16/fp16 while the weights, optimizer state and reductions stay in
    # fp32 (mixed precision, Micikevicius et al. 2018). On the CPU bf16 is emulated and ~15x slower.
    autocast = nullcontext() if ptdtype == torch.float32 else torch.autocast(device_type, dtype=ptdtype)
    # fp16's narrow exponent range needs loss scaling so small gradients do not flush to zero; bf16 does not.
    scaler = torch.amp.GradScaler(device_type, enabled=ptdtype == torch.float16)
    # TF32 tensor cores for the fp32 matmuls that remain on a GPU (10 mantissa bits: fine for training).
    torch.set_float32_matmul_precision("high")
    # Different dropout masks per rank (they see different data anyway); weights come from rank 0.
    torch.manual_seed(c["seed"] + rank)

    # ---- data ---------------------------------------------------------------------------------
    meta_path = os.path.join(c["data_dir"], "meta.json")
    if not os.path.isfile(meta_path):
        raise SystemExit(f"{meta_path} not found: run prepare_data.py first (or set --data_dir)")
    with open(meta_path) as f:
        meta = json.load(f)
    data_dtype = np.dtype(meta["dtype"])
    bins = {split: os.path.join(c["data_dir"], f"{split}.bin") for split in ("train", "val")}
    block_size = c["block_size"]
    n_tokens = {}
    for split, path in bins.items():
        if not os.path.isfile(path):
            raise SystemExit(f"{path} not found: run prepare_data.py again (it writes meta.json last)")
        n_tokens[split] = os.path.getsize(path) // data_dtype.itemsize
        if n_tokens[split] <= block_size:
            raise SystemExit(f"{path} holds {n_tokens[split]} tokens, fewer than block_size + 1 = {block_size + 1}: "
                             "use a smaller block_size or more data")
    tokenizer_path = os.path.join(c["data_dir"], "tokenizer.model")
    # Bytes of text each token stands for: bits per byte = total nats / (ln 2 * total bytes), which
    # compares runs with different tokenizers. Special tokens stand for no text and count 0.
    token_bytes = torch.tensor(Tokenizer(tokenizer_path).token_bytes(), dtype=torch.float64, device=device)

    def batch(split: str, it: int, rows: int, stream: int) -> np.ndarray:
        """Window starts of the global batch for (split, step): the same on every rank, any world size."""
        rng = np.random.default_rng([c["seed"], stream, it])
        return rng.integers(0, n_tokens[split] - block_size, size=rows)

    def to_device(x, y):
        if device_type == "cuda":  # pinned memory lets the copy run asynchronously
            return x.pin_memory().to(device, non_blocking=True), y.pin_memory().to(device, non_blocking=True)
        return x.to(device), y.to(device)

    # ---- model and optimizer ------------------------------------------------------------------
    os.makedirs(c["out_dir"], exist_ok=True)
    ckpt_path = os.path.join(c["out_dir"], "ckpt.pt")
    try:
        model_config = ModelConfig(vocab_size=meta["vocab_size"], **{k: c[k] for k in MODEL_KEYS})
    except ValueError as e:
        raise SystemExit(f"model config: {e}")
    iter_num, best_val_loss, checkpoint = 0, float("inf"), None
    if c["init_from"] == "resume":
        if not os.path.isfile(ckpt_path):
            raise SystemExit(f"--init_from=resume but {ckpt_path} does not exist")
        checkpoint = load_checkpoint(ckpt_path, device)
        if checkpoint["tokenizer_sha256"] != meta["tokenizer_sha256"]:
            raise SystemExit(f"resume: {c['data_dir']} was tokenized with another tokenizer than {ckpt_path}")
        saved = asdict(ModelConfig(**checkpoint["model_config"]))  # a field added since then has its default
        for key, value in asdict(model_config).items():
            # The attention backend computes the same function with the same weights: it may change.
            if saved[key] != value and key != "attn_impl":
                raise SystemExit(f"resume: {key}={value!r} here but {saved[key]!r} in {ckpt_path}; "
                                 "the model must keep its shape (pass the config file the run started with)")
        iter_num, best_val_loss = checkpoint["iter_num"], checkpoint["best_val_loss"]
    elif c["init_from"] != "scratch":
        raise SystemExit(f"init_from must be 'scratch' or 'resume', got '{c['init_from']}'")
    model = Transformer(model_config).to(device)
    if checkpoint is not None:
        model.load_state_dict(checkpoint["model"])
    broadcast_parameters(model)

    # The engine owns gradients, their communication and AdamW (with weight decay on matrices only). The
    # fused kernel does the whole update in one launch on the GPU.
    adamw = dict(lr=c["learning_rate"], betas=(c["beta1"], c["beta2"]), fused=device_type == "cuda")
    if c["parallel"] == "fsdp2":
        engine = FSDP2(model, c["weight_decay"], **adamw)
    else:
        engine = Engine(model, c["weight_decay"], c["zero_stage"], bucket_mb=c["bucket_mb"], **adamw)
    if checkpoint is not None:
        if "optimizer_shards" not in checkpoint:
            raise SystemExit(f"resume: {ckpt_path} has no optimizer shards (written by an older train.py)")
        shards = []
        for name in checkpoint["optimizer_shards"]:
            shard_path = os.path.join(c["out_dir"], name)
            if not os.path.isfile(shard_path):
                raise SystemExit(f"resume: {shard_path} is missing; {ckpt_path} needs all "
                                 f"{len(checkpoint['optimizer_shards'])} optimizer shards written with it")
            shards.append(load_checkpoint(shard_path, "cpu", mmap=True))
        engine.load_optimizer_shards(shards)
        rng_states = checkpoint["rng"]
        if rank < len(rng_states):  # a different world size keeps the seeded state for new ranks
            torch.set_rng_state(rng_states[rank]["cpu"].cpu())
            if device_type == "cuda" and rng_states[rank]["cuda"] is not None:
                torch.cuda.set_rng_state(rng_states[rank]["cuda"].cpu())
    checkpoint = shards = None  # free the loaded copies
    train_model = torch.compile(model) if c["compile"] else model

    moe = len(model.moe_layers()) > 0
    flops_per_token = model.estimate_flops()
    peak = peak_flops(device_type, ptdtype)
    tokens_per_iter = c["gradient_accumulation_steps"] * c["batch_size"] * block_size
    comm_theory = engine.theory_bytes(accum_steps)
    if master:
        print(json.dumps(config, indent=1))
        active = f" ({model.num_params(active=True) / 1e6:.2f}M active)" if moe else ""
        print(f"{model.num_params() / 1e6:.2f}M parameters{active} (without embeddings), vocab {meta['vocab_size']}, "
              f"{world_size} process(es) on {device} in {dtype_name}, {tokens_per_iter:,} tokens per step")
        with open(os.path.join(c["out_dir"], "config.json"), "w") as f:
            json.dump(config, f, indent=1)
        # The checkpoint folder carries its own tokenizer, so sample.py needs nothing else.
        shutil.copyfile(tokenizer_path, os.path.join(c["out_dir"], "tokenizer.model.tmp"))
        os.replace(os.path.join(c["out_dir"], "tokenizer.model.tmp"), os.path.join(c["out_dir"], "tokenizer.model"))

    @torch.no_grad()
    def evaluate() -> dict:
        """Mean loss on the same eval_iters * batch_size windows of each split every time (a fixed
        seed: evaluations compare like with like), spread over the ranks and summed back."""
        model.eval()
        out = {}
        for split_id, split in enumerate(("train", "val")):
            rows = c["eval_iters"] * c["batch_size"] * world_size
            starts = batch(split, 0, rows, stream=1 + split_id)
            sums = torch.zeros(4, dtype=torch.float64, device=device)  # nats, tokens, nats of text tokens, text bytes
            for i in range(c["eval_iters"]):
                lo = (i * world_size + rank) * c["batch_size"]
                x, y = to_device(*read_windows(bins[split], data_dtype, starts[lo:lo + c["batch_size"]], block_size))
                with autocast:
                    logits, _ = model(x)
                nats = F.cross_entropy(logits.float().flatten(0, 1), y.flatten(), reduction="none").double()
                nbytes = token_bytes[y.flatten()]
                sums += torch.stack([nats.sum(), nats.new_tensor(nats.numel()), (nats * (nbytes > 0)).sum(), nbytes.sum()])
            all_reduce_sum(sums)
            out[f"{split}_loss"] = (sums[0] / sums[1]).item()
            out[f"{split}_bpb"] = (sums[2] / (math.log(2) * sums[3])).item()
        model.train()
        return out

    # ---- the loop -----------------------------------------------------------------------------
    def log_metrics(record: dict) -> None:
        with open(os.path.join(c["out_dir"], "metrics.jsonl"), "a") as f:
            f.write(json.dumps(record) + "\n")

    start_iter, t_start = iter_num, time.time()
    bar = tqdm(total=c["max_iters"], initial=iter_num, disable=not master, dynamic_ncols=True, desc="train")
    while True:
        lr = get_lr(iter_num, config)
        if iter_num % c["eval_interval"] == 0 or iter_num == c["max_iters"]:
            losses = evaluate()
            improved = losses["val_loss"] < best_val_loss
            best_val_loss = min(best_val_loss, losses["val_loss"])
            if master:
                bar.write(f"iter {iter_num}: train loss {losses['train_loss']:.4f}, val loss {losses['val_loss']:.4f}, "
                          f"val {losses['val_bpb']:.4f} bits per byte")
                log_metrics({"iter": iter_num, **losses, "elapsed_s": time.time() - t_start})
            if iter_num > start_iter and (improved or c["always_save_checkpoint"]):
                # Each rank writes its optimizer shard first; once every shard is complete, rank 0 writes ckpt.pt
                # naming them, then removes older shards. A kill at any point leaves a ckpt.pt whose shards exist.
                full_model = engine.model_state_dict()  # every rank takes part: stage 3 gathers
                shard_names = [f"optimizer.{iter_num}.{r}-of-{world_size}.pt" for r in range(world_size)]
                save_checkpoint(os.path.join(c["out_dir"], shard_names[rank]), engine.optimizer_shard())
                rng = all_gather_objects({"cpu": torch.get_rng_state(),
                                          "cuda": torch.cuda.get_rng_state() if device_type == "cuda" else None})
                if master:
                    save_checkpoint(ckpt_path, {
                        "model": full_model, "optimizer_shards": shard_names, "zero_stage": c["zero_stage"],
                        "parallel": c["parallel"], "world_size": world_size,
                        "model_config": asdict(model_config), "config": config, "iter_num": iter_num,
                        "best_val_loss": best_val_loss, "tokenizer_sha256": meta["tokenizer_sha256"], "rng": rng})
                    for name in os.listdir(c["out_dir"]):
                        if name.startswith("optimizer.") and name.endswith(".pt") and name not in shard_names:
                            os.remove(os.path.join(c["out_dir"], name))
                full_model = None
        if iter_num >= c["max_iters"]:
            break

        t0 = time.time()
        engine.comm_stats()  # count this step's traffic only, not the evaluation's
        starts = batch("train", iter_num, c["gradient_accumulation_steps"] * c["batch_size"], stream=0)
        loss_sum = torch.zeros((), device=device)
        for micro_step in range(accum_steps):
            engine.set_sync(micro_step == accum_steps - 1)  # decided before the forward, as DDP's no_sync
            # Micro-batch m of rank r is block m * world_size + r of the global batch: the ranks
            # together cover exactly the rows one process would read, whatever the world size.
            lo = (micro_step * world_size + rank) * c["batch_size"]
            x, y = to_device(*read_windows(bins["train"], data_dtype, starts[lo:lo + c["batch_size"]], block_size))
            with autocast:
                _, loss = train_model(x, y)
            # Each micro-batch's loss is a mean over its tokens; dividing by the number of micro
            # batches makes the accumulated gradient the mean over the whole global batch.
            engine.backward(scaler.scale(loss / accum_steps))
            loss_sum += loss.detach()
        # Averaged over the ranks, clipped on the global norm (still computed with clipping off, for the log).
        grad_norm = engine.step(lr, c["grad_clip"], scaler)
        comm = engine.comm_stats()
        if moe:
            # Auxiliary-loss-free balancing (model.Gate) from the tokens each expert got in this step's whole
            # global batch: summed over the ranks, so every replica moves its biases identically.
            expert_load = all_reduce_sum(model.expert_load())
            model.update_expert_bias(expert_load)
        iter_num += 1
        bar.update(1)

        if iter_num % c["log_interval"] == 0:
            loss = all_reduce_sum(loss_sum / accum_steps).item() / world_size
            dt = time.time() - t0  # .item() above waited for the device, so this is the real step time
            tokens_per_s = tokens_per_iter / dt
            mfu = flops_per_token * tokens_per_s / (peak * world_size) if peak else None
            if master:
                bar.set_postfix(loss=f"{loss:.4f}", tok_s=f"{tokens_per_s:,.0f}")
                record = {"iter": iter_num, "loss": loss, "lr": lr, "grad_norm": grad_norm.item(),
                          "tokens_per_s": tokens_per_s, "mfu": mfu, "elapsed_s": time.time() - t_start,
                          **comm, "comm_bytes_theory": comm_theory}  # per rank, this step
                if moe:  # per MoE layer, the busiest expert's tokens over the mean: 1.0 is perfectly balanced
                    record["expert_load_max_over_mean"] = (expert_load.max(dim=1).values / expert_load.mean(dim=1)).tolist()
                log_metrics(record)
    bar.close()
    destroy()


if __name__ == "__main__":
    try:
        main(sys.argv[1:])
    finally:
        destroy(wait_for_others=False)  # after an error too: a process group left alive can abort the exit
