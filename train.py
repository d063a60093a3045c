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

import json
import math
import os
import sys
import time
from contextlib import nullcontext
from dataclasses import MISSING, asdict, fields

import numpy as np
import torch
import torch.nn.functional as F
from tqdm import tqdm

from checkpoint import (load_checkpoint, load_optimizer_shards, remove_other_shards, save_checkpoint,
                        shard_names)
from configurator import load_config, peak_flops, resolve_device, resolve_dtype
from files import atomic_write, copy_file
from model import ModelConfig, Transformer
from parallel import (FSDP2, Engine, all_gather_objects, all_reduce_sum, broadcast_parameters,
                      check_same_on_all_ranks, destroy, init_distributed, load_optimizer_state, optimizer_state_shard)
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


def check_config(c: dict, world_size: int) -> None:
    """Settings that cannot work together, refused with one sentence before any work is done."""
    if c["gradient_accumulation_steps"] % world_size:
        raise SystemExit(f"gradient_accumulation_steps={c['gradient_accumulation_steps']} must be a multiple of the "
                         f"number of processes ({world_size}): each process does an equal share of the micro-batches")
    if c["init_from"] not in ("scratch", "resume"):
        raise SystemExit(f"init_from must be 'scratch' or 'resume', got '{c['init_from']}'")
    if c["parallel"] not in ("handwritten", "fsdp2"):
        raise SystemExit(f"parallel must be 'handwritten' or 'fsdp2', got '{c['parallel']}'")
    if c["zero_stage"] not in (0, 1, 2, 3):
        raise SystemExit(f"zero_stage must be 0, 1, 2 or 3, got {c['zero_stage']}")
    if c["parallel"] == "fsdp2" and c["zero_stage"] != 0:
        raise SystemExit("zero_stage is for parallel='handwritten'; fsdp2 always shards as stage 3 does")
    if c["parallel"] == "fsdp2" and world_size == 1:
        raise SystemExit("parallel='fsdp2' needs a process group: launch with torchrun (even --nproc_per_node=1)")
    if c["compile"] and c["zero_stage"] == 3:
        raise SystemExit("compile=True does not go with zero_stage=3, whose hooks free and regather parameter memory")


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


class TokenData:
    """The token files of a prepare_data.py folder, and the micro-batches each rank reads from them.

    The windows of a global batch are drawn by a generator seeded with (seed, stream, step) alone, so they are
    the same on every rank and for any world size; micro-batch m of rank r is block m * world_size + r of
    them, so the ranks together read exactly the rows one process would.
    """

    def __init__(self, c: dict, rank: int, world_size: int, device: str):
        self.seed, self.block_size, self.batch_size = c["seed"], c["block_size"], c["batch_size"]
        self.train_rows, self.eval_iters = c["gradient_accumulation_steps"] * c["batch_size"], c["eval_iters"]
        self.rank, self.world_size, self.device = rank, world_size, device
        meta_path = os.path.join(c["data_dir"], "meta.json")
        if not os.path.isfile(meta_path):
            raise SystemExit(f"{meta_path} not found: run prepare_data.py first (or set --data_dir)")
        with open(meta_path) as f:
            self.meta = json.load(f)
        self.dtype = np.dtype(self.meta["dtype"])
        self.bins = {split: os.path.join(c["data_dir"], f"{split}.bin") for split in ("train", "val")}
        self.n_tokens = {}
        for split, path in self.bins.items():
            if not os.path.isfile(path):
                raise SystemExit(f"{path} not found: run prepare_data.py again (it writes meta.json last)")
            self.n_tokens[split] = os.path.getsize(path) // self.dtype.itemsize
            if self.n_tokens[split] <= self.block_size:
                raise SystemExit(f"{path} holds {self.n_tokens[split]} tokens, fewer than block_size + 1 = "
                                 f"{self.block_size + 1}: use a smaller block_size or more data")
        self.tokenizer_path = os.path.join(c["data_dir"], "tokenizer.model")
        # Bytes of text each token stands for: bits per byte = total nats / (ln 2 * total bytes), which
        # compares runs with different tokenizers. Special tokens stand for no text and count 0.
        self.token_bytes = torch.tensor(Tokenizer(self.tokenizer_path).token_bytes(), dtype=torch.float64,
                                        device=device)

    def train_batch(self, it: int, micro_step: int) -> tuple[torch.Tensor, torch.Tensor]:
        """This rank's micro-batch micro_step of the global batch of step it."""
        return self._micro_batch("train", it, 0, self.train_rows, micro_step)

    def eval_batch(self, split: str, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        """This rank's batch i of the evaluation windows of split: the same windows at every evaluation."""
        stream = 1 + ("train", "val").index(split)
        return self._micro_batch(split, 0, stream, self.eval_iters * self.batch_size * self.world_size, i)

    def _micro_batch(self, split: str, it: int, stream: int, rows: int, m: int) -> tuple[torch.Tensor, torch.Tensor]:
        """This rank's micro-batch m of the `rows` windows of (split, it, stream), on the device."""
        rng = np.random.default_rng([self.seed, stream, it])
        starts = rng.integers(0, self.n_tokens[split] - self.block_size, size=rows)
        lo = (m * self.world_size + self.rank) * self.batch_size
        x, y = read_windows(self.bins[split], self.dtype, starts[lo:lo + self.batch_size], self.block_size)
        if self.device.startswith("cuda"):  # pinned memory lets the copy run asynchronously
            return x.pin_memory().to(self.device, non_blocking=True), y.pin_memory().to(self.device, non_blocking=True)
        return x.to(self.device), y.to(self.device)


@torch.no_grad()
def evaluate(model: Transformer, data: TokenData, autocast) -> dict:
    """Mean loss and bits per byte on the same eval_iters * batch_size windows of each split every time (a
    fixed step 0: evaluations compare like with like), spread over the ranks and summed back."""
    model.eval()
    out = {}
    for split in ("train", "val"):
        sums = torch.zeros(4, dtype=torch.float64, device=data.device)  # nats, tokens, nats of text tokens, text bytes
        for i in range(data.eval_iters):
            x, y = data.eval_batch(split, i)
            with autocast:
                logits, _ = model(x)
            nats = F.cross_entropy(logits.float().flatten(0, 1), y.flatten(), reduction="none").double()
            nbytes = data.token_bytes[y.flatten()]
            sums += torch.stack([nats.sum(), nats.new_tensor(nats.numel()), (nats * (nbytes > 0)).sum(), nbytes.sum()])
        all_reduce_sum(sums)
        out[f"{split}_loss"] = (sums[0] / sums[1]).item()
        out[f"{split}_bpb"] = (sums[2] / (math.log(2) * sums[3])).item()
    model.train()
    return out


def read_resume_checkpoint(c: dict, model_config: ModelConfig, meta: dict, device: str) -> dict:
    """out_dir/ckpt.pt, after checking that it continues this run: same tokenizer, same model shape."""
    ckpt_path = os.path.join(c["out_dir"], "ckpt.pt")
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
    return checkpoint


def restore_rng(checkpoint: dict, rank: int, device_type: str) -> None:
    rng_states = checkpoint["rng"]
    if rank < len(rng_states):  # a different world size keeps the seeded state for new ranks
        torch.set_rng_state(rng_states[rank]["cpu"].cpu())
        if device_type == "cuda" and rng_states[rank]["cuda"] is not None:
            torch.cuda.set_rng_state(rng_states[rank]["cuda"].cpu())


def save(c: dict, engine, model_config: ModelConfig, meta: dict, iter_num: int, best_val_loss: float,
         rank: int, world_size: int, device_type: str) -> None:
    """Each rank writes its optimizer shard first; once every shard is complete, rank 0 writes ckpt.pt naming
    them, then removes older shards. A kill at any point leaves a ckpt.pt whose shards exist."""
    full_model = engine.model_state_dict()  # every rank takes part: stage 3 gathers
    names = shard_names(iter_num, world_size)
    save_checkpoint(os.path.join(c["out_dir"], names[rank]), optimizer_state_shard(engine))
    # Gathering the RNG states is also the barrier after which every shard is on disk.
    rng = all_gather_objects({"cpu": torch.get_rng_state(),
                              "cuda": torch.cuda.get_rng_state() if device_type == "cuda" else None})
    if rank == 0:
        save_checkpoint(os.path.join(c["out_dir"], "ckpt.pt"), {
            "model": full_model, "optimizer_shards": names, "zero_stage": c["zero_stage"],
            "parallel": c["parallel"], "world_size": world_size,
            "model_config": asdict(model_config), "config": c, "iter_num": iter_num,
            "best_val_loss": best_val_loss, "tokenizer_sha256": meta["tokenizer_sha256"], "rng": rng})
        remove_other_shards(c["out_dir"], names)


def log_metrics(out_dir: str, record: dict) -> None:
    with open(os.path.join(out_dir, "metrics.jsonl"), "a") as f:
        f.write(json.dumps(record) + "\n")


def mixed_precision(c: dict, device_type: str):
    """The compute dtype, its autocast context and its loss scaler."""
    ptdtype = resolve_dtype(c["dtype"], device_type)
    if ptdtype == torch.float16 and (c["zero_stage"] > 0 or c["parallel"] == "fsdp2"):
        # GradScaler would see only this rank's slice of the gradient, and ranks could disagree on skipping a step.
        raise SystemExit("dtype=float16 needs the handwritten zero_stage=0 (loss scaling sees the whole gradient "
                         "only there): use bfloat16")
    # Autocast runs matmuls in bf16/fp16 while the weights, optimizer state and reductions stay in
    # fp32 (mixed precision, Micikevicius et al. 2018). On the CPU bf16 is emulated and ~15x slower.
    autocast = nullcontext() if ptdtype == torch.float32 else torch.autocast(device_type, dtype=ptdtype)
    # fp16's narrow exponent range needs loss scaling so small gradients do not flush to zero; bf16 does not.
    scaler = torch.amp.GradScaler(device_type, enabled=ptdtype == torch.float16)
    return ptdtype, autocast, scaler


def build(c: dict, data: TokenData, rank: int, device_type: str):
    """The model, its config and its engine, fresh or resumed from out_dir (then with its step and best loss)."""
    try:
        model_config = ModelConfig(vocab_size=data.meta["vocab_size"], **{k: c[k] for k in MODEL_KEYS})
    except ValueError as e:
        raise SystemExit(f"model config: {e}")
    checkpoint = read_resume_checkpoint(c, model_config, data.meta, data.device) if c["init_from"] == "resume" else None
    model = Transformer(model_config).to(data.device)
    if checkpoint is not None:
        model.load_state_dict(checkpoint["model"])
    broadcast_parameters(model)
    # The engine owns gradients, their communication and AdamW (with weight decay on matrices only, the
    # model's param_groups). The fused kernel does the whole update in one launch on the GPU.
    groups = model.param_groups(c["weight_decay"])
    adamw = dict(lr=c["learning_rate"], betas=(c["beta1"], c["beta2"]), fused=device_type == "cuda")
    if c["parallel"] == "fsdp2":
        engine = FSDP2(model, groups, **adamw)
    else:
        engine = Engine(model, groups, c["zero_stage"], bucket_mb=c["bucket_mb"], **adamw)
    if checkpoint is None:
        return model, model_config, engine, 0, float("inf")
    load_optimizer_state(engine, load_optimizer_shards(c["out_dir"], checkpoint, os.path.join(c["out_dir"], "ckpt.pt")))
    restore_rng(checkpoint, rank, device_type)
    return model, model_config, engine, checkpoint["iter_num"], checkpoint["best_val_loss"]


def main(argv: list[str]) -> None:
    config = load_config(DEFAULTS, argv)
    c = config  # short alias for the loop below

    # ---- processes, devices, precision --------------------------------------------------------
    rank, local_rank, world_size = init_distributed(c["dist_timeout_s"])
    master = rank == 0
    check_same_on_all_ranks(config, "config")
    check_config(c, world_size)
    accum_steps = c["gradient_accumulation_steps"] // world_size  # micro-batches per process per step
    device = resolve_device(c["device"], local_rank)
    device_type = "cuda" if device.startswith("cuda") else "cpu"
    ptdtype, autocast, scaler = mixed_precision(c, device_type)
    # TF32 tensor cores for the fp32 matmuls that remain on a GPU (10 mantissa bits: fine for training).
    torch.set_float32_matmul_precision("high")
    # Different dropout masks per rank (they see different data anyway); weights come from rank 0.
    torch.manual_seed(c["seed"] + rank)

    # ---- data, model, optimizer ---------------------------------------------------------------
    data = TokenData(c, rank, world_size, device)
    os.makedirs(c["out_dir"], exist_ok=True)
    model, model_config, engine, iter_num, best_val_loss = build(c, data, rank, device_type)
    train_model = torch.compile(model) if c["compile"] else model

    moe = len(model.moe_layers()) > 0
    flops_per_token, peak = model.estimate_flops(), peak_flops(device_type, ptdtype)
    tokens_per_iter = c["gradient_accumulation_steps"] * c["batch_size"] * c["block_size"]
    comm_theory = engine.theory_bytes(accum_steps)
    if master:
        print(json.dumps(config, indent=1))
        active = f" ({model.num_params(active=True) / 1e6:.2f}M active)" if moe else ""
        print(f"{model.num_params() / 1e6:.2f}M parameters{active} (without embeddings), vocab {model_config.vocab_size}, "
              f"{world_size} process(es) on {device} in {str(ptdtype).removeprefix('torch.')}, "
              f"{tokens_per_iter:,} tokens per step")
        with atomic_write(os.path.join(c["out_dir"], "config.json"), "w") as f:
            json.dump(config, f, indent=1)
        # The checkpoint folder carries its own tokenizer, so sample.py needs nothing else.
        copy_file(data.tokenizer_path, os.path.join(c["out_dir"], "tokenizer.model"))

    # ---- the loop -----------------------------------------------------------------------------
    start_iter, t_start = iter_num, time.time()
    bar = tqdm(total=c["max_iters"], initial=iter_num, disable=not master, dynamic_ncols=True, desc="train")
    x, y = data.train_batch(iter_num, 0)
    while True:
        lr = get_lr(iter_num, config)
        if iter_num % c["eval_interval"] == 0 or iter_num == c["max_iters"]:
            losses = evaluate(model, data, autocast)
            improved = losses["val_loss"] < best_val_loss
            best_val_loss = min(best_val_loss, losses["val_loss"])
            if master:
                bar.write(f"iter {iter_num}: train loss {losses['train_loss']:.4f}, val loss {losses['val_loss']:.4f}, "
                          f"val {losses['val_bpb']:.4f} bits per byte")
                log_metrics(c["out_dir"], {"iter": iter_num, **losses, "elapsed_s": time.time() - t_start})
            if iter_num > start_iter and (improved or c["always_save_checkpoint"]):
                save(c, engine, model_config, data.meta, iter_num, best_val_loss, rank, world_size, device_type)
        if iter_num >= c["max_iters"]:
            break

        t0 = time.time()
        engine.comm_stats()  # count this step's traffic only, not the evaluation's
        loss_sum = torch.zeros((), device=device)
        for micro_step in range(accum_steps):
            engine.set_sync(micro_step == accum_steps - 1)  # decided before the forward, as DDP's no_sync
            with autocast:
                _, loss = train_model(x, y)
            # Read the next micro-batch while this one is still computing, as nanoGPT does: on CUDA the forward
            # was only queued, so the host's read and the pinned copy overlap the GPU's work.
            last = micro_step == accum_steps - 1
            x, y = data.train_batch(iter_num + last, 0 if last else micro_step + 1)
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
                log_metrics(c["out_dir"], record)
    bar.close()
    destroy()


if __name__ == "__main__":
    try:
        main(sys.argv[1:])
    finally:
        destroy(wait_for_others=False)  # after an error too: a process group left alive can abort the exit
