"""
train.py: pretrain, fine-tune or distill a myllm Transformer on one CPU, one GPU, or many GPUs.

    python train.py config/cpu_demo.py                          # one process
    python train.py config/cpu_demo.py --max_iters=200 --compile=True   # --key=value overrides
    python train.py config/cpu_demo.py --init_from=resume       # continue from out_dir/ckpt.pt
    python train.py config/sft_add2.py                          # fine-tune a run on conversations
    python train.py config/distill_cpu_demo.py                  # a student distilled from a teacher run
    torchrun --nproc_per_node=6 train.py config/pretrain.py     # data parallel (NCCL, or gloo on CPU)
    torchrun --nproc_per_node=6 train.py config/pretrain.py --zero_stage=3   # ZeRO-3 (parallel.py)

A flat script in nanoGPT's shape: configuration, distributed set-up, data, model, optimizer,
evaluation, the loop. The one idea: an optimizer step consumes one *global batch* of
`gradient_accumulation_steps * batch_size` windows of `block_size` tokens. The micro-batches'
gradients add up to the gradient of that global batch; with N processes each does 1/N of the
micro-batches and parallel.py averages, so the step is the same computation whatever N is, and the
batch drawn for step `it` depends only on (seed, it), which makes a resumed run replay exactly.
"""

import bisect
import gc
import hashlib
import json
import math
import os
import sys
import time
import uuid
from contextlib import nullcontext
from dataclasses import MISSING, asdict, fields

import numpy as np
import torch
import torch.nn.functional as F
from tqdm import tqdm

from checkpoint import (check_base, load_checkpoint, load_model, load_optimizer_shards, remove_other_shards,
                        save_checkpoint, sha256_of, shard_names)
from configurator import load_config, peak_flops, resolve_device, resolve_dtype
from files import atomic_write, copy_file, lock_folder, os_error
from lora import adapter_state_dict, add_lora, load_adapters
from model import ModelConfig, Transformer
from objectives import distillation_loss
from parallel import (FSDP2, Engine, all_gather_objects, all_reduce_sum, broadcast_parameters,
                      check_same_on_all_ranks, destroy, init_distributed, load_optimizer_state, on_rank0,
                      optimizer_state_shard, shard_experts)
from preferences import Preferences
from rollouts import Policy
from tasks import TASKS
from tokenizer import PAD_ID, Tokenizer

# -----------------------------------------------------------------------------------------------
# Configuration. Every name below is a config key; config/*.py files are executed as plain Python
# and may set any of them, then --key=value arguments override (values parsed as Python literals).
# Every ModelConfig field (n_layer, n_head, n_kv_head, n_embd, ..., see model.py) is a key too;
# rope_scaling is a dict, e.g. --rope_scaling="{'rope_type': 'linear', 'factor': 4.0}".
out_dir = "out"
data_dir = "data/pystdlib"  # made by prepare_data.py: train.bin, val.bin, meta.json, tokenizer.model
init_from = "scratch"  # or "resume": continue from out_dir/ckpt.pt; or another run's out_dir: start from its
# weights (fine-tuning: a fresh optimizer and schedule, the model's shape from that checkpoint, a new out_dir)
overwrite = False  # a fresh run into an out_dir that holds a run replaces it only when this is True
eval_interval = 250
eval_iters = 20  # batches per split per evaluation
log_interval = 10
always_save_checkpoint = True  # else save only when val loss improves
# batch: tokens per optimizer step = gradient_accumulation_steps * batch_size * block_size
batch_size = 16  # windows per micro-batch per process
gradient_accumulation_steps = 1  # global count, divided among the processes
# The optimizer and the learning-rate schedule
optimizer = "adamw"  # or "muon": Muon steps the blocks' weight matrices, AdamW the rest (muon.py)
muon_momentum = 0.95  # Muon's momentum (the speedrun's and Moonlight's); lr and weight decay are AdamW's (muon.py)
learning_rate = 6e-4
max_iters = 5000
weight_decay = 0.1
beta1 = 0.9
beta2 = 0.95
grad_clip = 1.0  # clip the global gradient norm to this; 0 disables clipping
warmup_iters = 100
lr_decay_iters = 5000  # cosine decay reaches min_lr here (nanoGPT: about max_iters)
min_lr = 6e-5  # about learning_rate / 10 (Chinchilla)
lr_schedule = "cosine"  # or "wsd": constant after the warmup, then a linear cool-down to min_lr (get_lr)
cooldown_frac = 0.2  # wsd: the cool-down's share of lr_decay_iters
align_windows = False  # start every training window at a document's start (prepare_data.py's document index)
# system
device = "auto"  # "auto": cuda if available, else cpu
dtype = "auto"  # "auto": bfloat16 on a GPU that has it, else float32; or float32/bfloat16/float16
compile = False  # torch.compile the model (first step compiles for a while)
seed = 1337
dist_timeout_s = 600.0  # a collective waiting longer than this fails instead of hanging
zero_stage = 0  # 0 DDP, 1 shard optimizer state, 2 + gradients, 3 + parameters (parallel.py)
parallel = "handwritten"  # or "fsdp2": PyTorch's fully_shard (needs torchrun)
bucket_mb = 25.0  # gradient bucket size of stages 0-2: big enough to amortise each collective's latency
expert_parallel = 1  # > 1: groups of this many consecutive ranks share out the routed experts (parallel.py)
# LoRA (lora.py): lora_rank > 0 trains low-rank adapters on a frozen copy of the init_from run's weights
lora_rank = 0  # 0: fine-tune (or pretrain) every weight
lora_alpha = 16.0  # the update is scaled by lora_alpha / lora_rank
lora_dropout = 0.0  # on the adapters' input
lora_targets = "all-linear"  # or comma-separated projection names: wq,wk,wv,wo (attention), w1,w2,w3 (MLP), ...
lora_embeddings = False  # also train the token embedding and head: the chat tokens are new to a pretrained base
# The objective: "lm" is next-token cross-entropy on the data (pretraining, SFT); "distill" adds a teacher's
# softened distribution as a second target (objectives.distillation_loss); "grpo" trains on the model's own
# replies to a task's prompts, scored by its verifier (rollouts.py; data_dir then only gives the val loss);
# "dpo" trains on pairs of a preferred and a rejected reply (preferences.py)
objective = "lm"
teacher = ""  # distill: the out_dir of a trained run with the data's tokenizer, frozen during the run
distill_alpha = 0.5  # distill: the weight of the data's cross-entropy at step 0; the KL to the teacher gets 1 - alpha
distill_alpha_final = 0.5  # alpha at max_iters, linear from distill_alpha in between (stepped every step, logged)
distill_temperature = 1.0  # T > 1 softens both distributions, so the teacher's ranking of unlikely tokens counts
# grpo: a step trains on batch_size * gradient_accumulation_steps replies, group_size to each of its prompts
task = ""  # grpo: a task of tasks.py, whose train split gives the prompts and whose verifier the rewards
task_difficulty = 0  # grpo: the task's difficulty knob (its --digits, --k or --length); 0 is the task's default
group_size = 8  # grpo: replies sampled per prompt, the group whose mean reward is each one's baseline
max_new_tokens = 32  # grpo: a reply ends at its <|im_end|> or after this many tokens
temperature = 1.0  # grpo: of the sampling; the replies of a group must differ for any of them to teach
scale_by_std = False  # grpo: divide each group's advantages by its reward std (GRPO) or not (Dr. GRPO)
ppo_epochs = 1  # grpo: optimizer steps on each round of replies; after the first the ratio pi / pi_old weighs them
clip_eps = 0.0  # grpo: > 0 clips that ratio to 1 +- clip_eps, PPO's surrogate (0: the plain REINFORCE form)
cispo_clip = 0.0  # grpo: > 0 instead clips the ratio's weight at 1 + cispo_clip, CISPO's form
kl_beta = 0.0  # grpo: weight of the k3 estimate of KL to the frozen init_from model (logged whatever its weight)
eval_problems = 200  # grpo: held-out problems whose greedy replies give pass@1 at every evaluation
dpo_pairs = ""  # dpo: the preference pairs to train on, JSONL (preferences.py); data_dir then only gives the val loss
dpo_val_pairs = ""  # dpo: held-out pairs, whose preference accuracy every evaluation logs
dpo_beta = 0.1  # dpo: the scale of the implicit reward beta log(pi / pi_ref); smaller lets pi move further
dpo_nll_weight = 0.0  # dpo: > 0 adds that times the chosen reply's per-token cross-entropy (RPO), 0 is plain DPO
# DeepSeek Sparse Attention (model keys index_n_heads, index_head_dim, index_topk): DeepSeek-V3.2's recipe adds the
# indexers to a trained dense MLA run (init_from it; only their weights start fresh), trains them alone while
# attention stays dense (dsa_warmup), then trains the whole model sparse, from that run, with dsa_warmup off.
dsa_warmup = False  # attend to every key and train only the indexers, by KL to that attention
# Lowercase names only: the constants imported above (PAD_ID) are not settings.
DEFAULTS = {k: v for k, v in globals().items()
            if k.islower() and not k.startswith("_") and isinstance(v, (int, float, bool, str))}
MODEL_KEYS = [f.name for f in fields(ModelConfig) if f.name != "vocab_size"]  # vocab comes from the data
DEFAULTS |= {f.name: f.default if f.default is not MISSING else f.default_factory()
             for f in fields(ModelConfig) if f.name in MODEL_KEYS}
# -----------------------------------------------------------------------------------------------


# Every numeric training key has a valid range, checked before any work (the model's keys: ModelConfig).
POSITIVE = ("eval_interval", "eval_iters", "log_interval", "batch_size", "gradient_accumulation_steps",
            "learning_rate", "dist_timeout_s", "bucket_mb", "expert_parallel", "lora_alpha", "distill_temperature",
            "max_new_tokens", "temperature", "ppo_epochs", "eval_problems", "dpo_beta")
NON_NEGATIVE = ("max_iters", "warmup_iters", "lr_decay_iters", "min_lr", "weight_decay", "grad_clip", "lora_rank",
                "task_difficulty", "clip_eps", "cispo_clip", "kl_beta", "dpo_nll_weight")


def check_config(c: dict, world_size: int) -> None:
    """Values out of range and settings that cannot work together, refused with one sentence before any work."""
    for key, value in c.items():
        if isinstance(value, float) and not math.isfinite(value):
            raise SystemExit(f"{key} must be a finite number, got {value}")
    for key in POSITIVE:
        if not c[key] > 0:
            raise SystemExit(f"{key} must be positive, got {c[key]}")
    for key in NON_NEGATIVE:
        if not c[key] >= 0:
            raise SystemExit(f"{key} must be >= 0, got {c[key]}")
    if not 0 <= c["seed"] < 2**62:  # torch's seeds are 64-bit, and each rank adds its rank
        raise SystemExit(f"seed must be between 0 and 2**62, got {c['seed']}")
    for key in ("beta1", "beta2", "muon_momentum"):
        if not 0 <= c[key] < 1:
            raise SystemExit(f"{key} must be in [0, 1), got {c[key]}")
    if c["min_lr"] > c["learning_rate"]:
        raise SystemExit(f"min_lr ({c['min_lr']}) must not exceed learning_rate ({c['learning_rate']})")
    for key in ("out_dir", "data_dir"):
        if not c[key]:
            raise SystemExit(f"{key} must name a folder")
    if c["gradient_accumulation_steps"] % world_size:
        raise SystemExit(f"gradient_accumulation_steps={c['gradient_accumulation_steps']} must be a multiple of the "
                         f"number of processes ({world_size}): each process does an equal share of the micro-batches")
    if c["init_from"] not in ("scratch", "resume"):
        if not os.path.isfile(os.path.join(c["init_from"], "ckpt.pt")):
            raise SystemExit(f"init_from must be 'scratch', 'resume' or the out_dir of a run to start from, and "
                             f"{c['init_from']} holds no ckpt.pt")
        if os.path.abspath(c["init_from"]) == os.path.abspath(c["out_dir"]):
            raise SystemExit("init_from names out_dir itself: a run started from another writes its own out_dir "
                             "(to continue a run, use init_from='resume')")
    if c["parallel"] not in ("handwritten", "fsdp2"):
        raise SystemExit(f"parallel must be 'handwritten' or 'fsdp2', got '{c['parallel']}'")
    if c["zero_stage"] not in (0, 1, 2, 3):
        raise SystemExit(f"zero_stage must be 0, 1, 2 or 3, got {c['zero_stage']}")
    if c["parallel"] == "fsdp2" and c["zero_stage"] != 0:
        raise SystemExit("zero_stage is for parallel='handwritten'; fsdp2 always shards as stage 3 does")
    if c["parallel"] == "fsdp2" and world_size == 1:
        raise SystemExit("parallel='fsdp2' needs a process group: launch with torchrun (even --nproc_per_node=1)")
    if c["lr_schedule"] not in ("cosine", "wsd"):
        raise SystemExit(f"lr_schedule must be 'cosine' or 'wsd', got '{c['lr_schedule']}'")
    if not 0 < c["cooldown_frac"] <= 1:
        raise SystemExit(f"cooldown_frac must be in (0, 1], got {c['cooldown_frac']}")
    if c["optimizer"] not in ("adamw", "muon"):
        raise SystemExit(f"optimizer must be 'adamw' or 'muon', got '{c['optimizer']}'")
    if c["optimizer"] == "muon" and c["lora_rank"]:
        raise SystemExit("optimizer='muon' orthogonalises whole weight matrices and LoRA trains low-rank adapters of "
                         "them: use optimizer='adamw' with lora_rank")
    if c["optimizer"] == "muon" and c["dtype"] == "float16":
        raise SystemExit("optimizer='muon' does not take float16's loss scaling: use dtype 'bfloat16' or 'float32'")
    if not 0 <= c["lora_dropout"] < 1:
        raise SystemExit(f"lora_dropout must be in [0, 1), got {c['lora_dropout']}")
    if c["lora_embeddings"] and not c["lora_rank"]:
        raise SystemExit("lora_embeddings trains the embeddings beside LoRA adapters: set lora_rank too")
    if c["lora_rank"] and c["init_from"] == "scratch":
        raise SystemExit("lora_rank > 0 adapts a trained model: set init_from to the out_dir of the run to adapt")
    if c["objective"] not in ("lm", "distill", "grpo", "dpo"):
        raise SystemExit(f"objective must be 'lm', 'distill', 'grpo' or 'dpo', got '{c['objective']}'")
    if (c["objective"] == "distill") != bool(c["teacher"]):
        raise SystemExit("objective='distill' needs a teacher (the out_dir of a trained run), and a teacher needs "
                         "objective='distill'")
    if c["teacher"] and not os.path.isfile(os.path.join(c["teacher"], "ckpt.pt")):
        raise SystemExit(f"teacher must be the out_dir of a trained run, and {c['teacher']} holds no ckpt.pt")
    for key in ("distill_alpha", "distill_alpha_final"):
        if not 0 <= c[key] <= 1:
            raise SystemExit(f"{key} must be in [0, 1], got {c[key]}")
    if c["objective"] in ("grpo", "dpo"):
        check_post_training_config(c, world_size)
    if c["task"] and c["objective"] != "grpo":
        raise SystemExit(f"task={c['task']!r} is the prompts of objective='grpo': set that objective too")
    if (c["dpo_pairs"] or c["dpo_val_pairs"]) and c["objective"] != "dpo":
        raise SystemExit("dpo_pairs and dpo_val_pairs are the data of objective='dpo': set that objective too")
    if c["dsa_warmup"] and not (c["index_n_heads"] and c["attn"] == "mla" and c["objective"] == "lm" and
                                not c["lora_rank"]):
        raise SystemExit("dsa_warmup trains DeepSeek Sparse Attention's indexers (attn='mla', index_n_heads > 0) on "
                         "the language-model objective, without LoRA")
    if c["compile"] and c["zero_stage"] == 3:
        raise SystemExit("compile=True does not go with zero_stage=3, whose hooks free and regather parameter memory")
    if c["expert_parallel"] > 1:
        check_expert_parallel(c, world_size)


def check_expert_parallel(c: dict, world_size: int) -> None:
    """expert_parallel > 1: what the groups need of the world, the model and the rest of the run."""
    E = c["expert_parallel"]
    if world_size % E:
        raise SystemExit(f"expert_parallel={E} must divide the number of processes ({world_size}): the ranks form "
                         "groups of that many")
    if not c["n_routed_experts"] or c["n_routed_experts"] % E:
        raise SystemExit(f"expert_parallel={E} shares out the routed experts: n_routed_experts "
                         f"({c['n_routed_experts']}) must be a positive multiple of it")
    if c["objective"] not in ("lm", "distill") or c["lora_rank"] or c["compile"]:
        raise SystemExit("expert_parallel is written for objective='lm' or 'distill', without LoRA and compile: the "
                         "ranks of a group exchange tokens in every forward, so each must run the same forwards (grpo "
                         "samples and dpo evaluates a different number on each rank)")


def check_post_training_config(c: dict, world_size: int) -> None:
    """objective = "grpo" or "dpo": the run each starts from, and what its own data needs of the rest."""
    name = f"objective={c['objective']!r}"
    if c["init_from"] == "scratch":
        raise SystemExit(f"{name} improves a model that can already answer: set init_from to the out_dir of a "
                         "fine-tuned run")
    if c["dropout"] > 0:
        raise SystemExit(f"{name} needs dropout=0: it compares the model's log-probabilities with those of a model "
                         "without dropout (the sampler's, the reference's)")
    if not c["always_save_checkpoint"]:
        raise SystemExit(f"{name} saves at every evaluation (always_save_checkpoint=True): its val loss is not what "
                         "it optimises, so it cannot choose the best checkpoint")
    if c["objective"] == "dpo":
        for key in ("dpo_pairs", "dpo_val_pairs"):
            if not os.path.isfile(c[key]):
                raise SystemExit(f"objective='dpo' needs {key}, a file of preference pairs (JSONL): {c[key]!r} is "
                                 "not a file")
        return
    if c["task"] not in TASKS:
        raise SystemExit(f"objective='grpo' needs task, one of {', '.join(TASKS)}; got {c['task']!r}")
    if c["group_size"] < 2:
        raise SystemExit(f"group_size must be at least 2 (a reply's baseline is the rest of its group), got "
                         f"{c['group_size']}")
    replies = c["batch_size"] * c["gradient_accumulation_steps"] // world_size
    if replies % c["group_size"]:
        raise SystemExit(f"each process samples whole groups: batch_size * gradient_accumulation_steps / processes "
                         f"= {replies} replies is not a multiple of group_size={c['group_size']}")
    if c["zero_stage"] == 3 or c["parallel"] == "fsdp2":
        raise SystemExit("objective='grpo' samples with as many forwards as its replies are long, different on each "
                         "rank, and parameter sharding (zero_stage=3, fsdp2) gathers in every forward: use zero_stage "
                         "0, 1 or 2")
    if c["eval_interval"] % c["ppo_epochs"] or c["max_iters"] % c["ppo_epochs"]:
        raise SystemExit(f"eval_interval and max_iters must be multiples of ppo_epochs={c['ppo_epochs']}: a checkpoint "
                         "falls between rounds of replies, so a resumed run samples what the straight run did")
    if c["clip_eps"] and c["cispo_clip"]:
        raise SystemExit("clip_eps (PPO) and cispo_clip (CISPO) are two forms of one clip: set one of them")


def get_lr(it: int, config: dict) -> float:
    """Linear warmup, then cosine decay to min_lr (Loshchilov & Hutter, SGDR). Warmup starts at
    learning_rate / (warmup_iters + 1), never at 0: a step with lr 0 would be a wasted batch.

    lr_schedule="wsd" (warmup-stable-decay; Hu et al. 2024, MiniCPM; the speedrun's schedule): learning_rate until
    the last cooldown_frac of lr_decay_iters, then linear to min_lr. Most of the loss drop comes in the cool-down
    whenever it starts, so a run can be extended (or branched into a cool-down) without knowing its length up front."""
    if it < config["warmup_iters"]:
        return config["learning_rate"] * (it + 1) / (config["warmup_iters"] + 1)
    if it >= config["lr_decay_iters"]:
        return config["min_lr"]
    if config["lr_schedule"] == "wsd":
        cooldown = max(1, round(config["cooldown_frac"] * config["lr_decay_iters"]))
        start = max(config["warmup_iters"], config["lr_decay_iters"] - cooldown)
        if it < start:
            return config["learning_rate"]
        ratio = (it - start) / max(1, config["lr_decay_iters"] - start)
        return config["learning_rate"] + ratio * (config["min_lr"] - config["learning_rate"])
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


def read_meta(data_dir: str) -> tuple[dict, str]:
    """prepare_data.py's meta.json with the keys train.py relies on, and its sha256; one sentence if it is missing
    or corrupt."""
    meta_path = os.path.join(data_dir, "meta.json")
    if not os.path.isfile(meta_path):
        raise SystemExit(f"{meta_path} not found: run prepare_data.py first (or set --data_dir)")
    try:
        with open(meta_path, "rb") as f:
            text = f.read()
        meta = json.loads(text)
        np.dtype(meta["dtype"])
        if not (isinstance(meta, dict) and all(isinstance(meta[k], int) for k in ("vocab_size", "train_tokens", "val_tokens"))
                and isinstance(meta["tokenizer_sha256"], str)):
            raise ValueError("a field has the wrong type")
    except (ValueError, KeyError, TypeError) as e:
        raise SystemExit(f"{meta_path} is corrupt ({type(e).__name__}: {e}): run prepare_data.py again") from None
    return meta, hashlib.sha256(text).hexdigest()


def pack_documents(lengths: np.ndarray, capacity: int) -> tuple[list[list[int]], int]:
    """Best-fit decreasing bin packing: documents longest first, each into the window whose free space it fits
    most tightly (a new window when none has room), so windows end up nearly full of real tokens and no
    document is cut in two. A document longer than a window is truncated to it. Returns the documents of each
    window and how many were truncated."""
    windows, free = [], []  # free: sorted (free space, window) pairs
    for doc in np.argsort(-lengths, kind="stable"):
        size = min(int(lengths[doc]), capacity)
        at = bisect.bisect_left(free, (size, -1))
        if at == len(free):
            windows.append([])
            space, window = capacity, len(windows) - 1
        else:
            space, window = free.pop(at)
        windows[window].append(int(doc))
        if space - size > 0:
            bisect.insort(free, (space - size, window))
    return windows, int((lengths > capacity).sum())


class PackedSplit:
    """One split of fine-tuning data (prepare_data.py --chat): conversations packed into windows of
    block_size + 1 tokens, each window a few whole conversations and padding. A window's targets are its tokens
    whose loss mask is 1 (the assistant replies), and attention stays inside each conversation (doc_ids)."""

    def __init__(self, bin_path: str, mask_path: str, index_path: str, dtype: np.dtype, block_size: int):
        self.bin_path, self.mask_path, self.dtype, self.capacity = bin_path, mask_path, dtype, block_size + 1
        n_tokens = os.path.getsize(bin_path) // dtype.itemsize
        if os.path.getsize(mask_path) != n_tokens:
            raise SystemExit(f"{mask_path} does not hold one byte per token of {bin_path}: run prepare_data.py again")
        self.starts = np.load(index_path)
        self.lengths = np.diff(np.r_[self.starts, n_tokens])
        self.windows, self.truncated = pack_documents(self.lengths, self.capacity)
        mask = np.memmap(mask_path, np.uint8, mode="r")
        targets = [int(mask[s:s + min(n, self.capacity)].sum()) for s, n in zip(self.starts, self.lengths)]
        self.targets = np.array([sum(targets[d] for d in window) for window in self.windows])  # per window
        self.real = sum(min(int(n), self.capacity) for n in self.lengths) / (len(self.windows) * self.capacity)

    def batch(self, chosen: np.ndarray) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """x, y (-100 where no target) and doc_ids, each (len(chosen), block_size), of the chosen windows."""
        data, mask = np.memmap(self.bin_path, self.dtype, mode="r"), np.memmap(self.mask_path, np.uint8, mode="r")
        tokens = np.full((len(chosen), self.capacity), PAD_ID, np.int64)
        is_target = np.zeros((len(chosen), self.capacity), bool)
        doc_ids = np.zeros((len(chosen), self.capacity), np.int64)
        for row, window in enumerate(chosen):
            at = 0
            for doc_id, doc in enumerate(self.windows[window]):
                start, n = self.starts[doc], min(int(self.lengths[doc]), self.capacity)
                tokens[row, at:at + n], is_target[row, at:at + n] = data[start:start + n], mask[start:start + n]
                doc_ids[row, at:at + n] = doc_id
                at += n
            doc_ids[row, at:] = len(self.windows[window])  # the padding is a document of its own
        y = np.where(is_target[:, 1:], tokens[:, 1:], -100)
        return torch.from_numpy(tokens[:, :-1]), torch.from_numpy(y), torch.from_numpy(doc_ids[:, :-1])


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
        self.meta, self.meta_sha256 = read_meta(c["data_dir"])
        self.dtype, self.vocab_size = np.dtype(self.meta["dtype"]), self.meta["vocab_size"]
        self.bins = {split: os.path.join(c["data_dir"], f"{split}.bin") for split in ("train", "val")}
        self.n_tokens = {}
        for split, path in self.bins.items():
            if not os.path.isfile(path):
                raise SystemExit(f"{path} not found: run prepare_data.py again (it writes meta.json last)")
            size = os.path.getsize(path)
            if size % self.dtype.itemsize or size // self.dtype.itemsize != self.meta[f"{split}_tokens"]:
                raise SystemExit(f"{path} holds {size} bytes, not the {self.meta[f'{split}_tokens']:,} {self.dtype} "
                                 "tokens its meta.json describes: it is cut short or from another run of prepare_data.py")
            self.n_tokens[split] = size // self.dtype.itemsize
            if self.n_tokens[split] <= self.block_size:
                raise SystemExit(f"{path} holds {self.n_tokens[split]} tokens, fewer than block_size + 1 = "
                                 f"{self.block_size + 1}: use a smaller block_size or more data")
        self.packs = None  # fine-tuning data: conversations packed into windows, with a loss mask
        if "loss_mask" in self.meta:
            d = c["data_dir"]
            self.packs = {split: PackedSplit(self.bins[split], os.path.join(d, self.meta["loss_mask"][split]),
                                             os.path.join(d, f"{split}_doc_index.npy"), self.dtype, self.block_size)
                          for split in ("train", "val")}
        self.aligned_starts = self.document_starts(c) if c["align_windows"] else None
        # What every rank must agree on: ranks reading different data would each train on their own corpus.
        self.identity = {"meta.json": self.meta_sha256, **{f"{split}.bin tokens": n for split, n in self.n_tokens.items()}}
        self.tokenizer_path = os.path.join(c["data_dir"], "tokenizer.model")
        # Bytes of text each token stands for: bits per byte = total nats / (ln 2 * total bytes), which
        # compares runs with different tokenizers. Special tokens stand for no text and count 0.
        try:
            tokenizer = Tokenizer(self.tokenizer_path)
        except (FileNotFoundError, ValueError) as e:
            raise SystemExit(f"{e}: run prepare_data.py again") from None
        self.token_bytes = torch.tensor(tokenizer.token_bytes(), dtype=torch.float64, device=device)

    def document_starts(self, c: dict) -> np.ndarray:
        """align_windows: the training windows' possible starts, the offsets where documents begin (with a full
        window after them). Random offsets start most windows mid-document, so their first tokens are predicted
        from a context cut off at random; aligned, the context is the document's own beginning (the speedrun's
        document-aligned batches). Evaluation keeps random offsets, so val losses compare across settings."""
        if self.packs is not None:
            raise SystemExit("align_windows starts the windows of pretraining data at documents; fine-tuning data is "
                             "packed by conversation already")
        path = os.path.join(c["data_dir"], "train_doc_index.npy")
        if not os.path.isfile(path):
            raise SystemExit(f"align_windows needs {path}, the document index prepare_data.py writes: run it again")
        starts = np.load(path)
        starts = starts[starts < self.n_tokens["train"] - self.block_size]
        if len(starts) < self.train_rows:
            raise SystemExit(f"align_windows: {path} has {len(starts)} documents with a full window after their start, "
                             f"fewer than the {self.train_rows} windows of a step; leave it off for this corpus")
        return starts

    def train_batch(self, it: int, micro_step: int):
        """This rank's micro-batch micro_step of the global batch of step it: x, y, doc_ids (None unless packed)."""
        return self._micro_batch("train", it, 0, self.train_rows, micro_step)

    def train_targets(self, it: int) -> int:
        """Packed data: the targets in the whole global batch of step it, on every rank the same."""
        return int(self.packs["train"].targets[self._draw("train", it, 0, self.train_rows)].sum())

    def eval_batch(self, split: str, i: int):
        """Batch i of the eval_iters * batch_size evaluation windows of split: the same windows at every evaluation
        and for any world size (rank r reads batches r, r + world_size, ...)."""
        stream = 1 + ("train", "val").index(split)
        return self._micro_batch(split, 0, stream, self.eval_iters * self.batch_size, i // self.world_size,
                                 rank=i % self.world_size)

    def _draw(self, split: str, it: int, stream: int, rows: int) -> np.ndarray:
        """The windows of (split, it, stream): start offsets in the token file, or packed windows' numbers."""
        rng = np.random.default_rng([self.seed, stream, it])
        if self.aligned_starts is not None and stream == 0:
            return self.aligned_starts[rng.integers(0, len(self.aligned_starts), size=rows)]
        if self.packs is None:
            return rng.integers(0, self.n_tokens[split] - self.block_size, size=rows)
        return rng.integers(0, len(self.packs[split].windows), size=rows)

    def _micro_batch(self, split: str, it: int, stream: int, rows: int, m: int, rank: int | None = None):
        """Rank's micro-batch m (block m * world_size + rank) of the `rows` windows of (split, it, stream), on the
        device; x and y (batch_size, block_size), and doc_ids for packed data. rank None: this process's own."""
        lo = (m * self.world_size + (self.rank if rank is None else rank)) * self.batch_size
        chosen = self._draw(split, it, stream, rows)[lo:lo + self.batch_size]
        if self.packs is None:
            x, y = read_windows(self.bins[split], self.dtype, chosen, self.block_size)
            doc_ids = None
        else:
            x, y, doc_ids = self.packs[split].batch(chosen)
        if y.max() >= self.vocab_size or x.max() >= self.vocab_size:  # an embedding lookup would crash, on a GPU cryptically
            raise SystemExit(f"{self.bins[split]} holds a token id beyond the vocabulary of {self.vocab_size}: it was "
                             "not made with this folder's tokenizer")
        return tuple(None if t is None else self.to_device(t) for t in (x, y, doc_ids))

    def to_device(self, t: torch.Tensor) -> torch.Tensor:
        if self.device.startswith("cuda"):  # pinned memory lets the copy run asynchronously
            return t.pin_memory().to(self.device, non_blocking=True)
        return t.to(self.device)


def micro_batch_loss(train_model, model: Transformer, teacher, own_data, data: TokenData, batch, it: int,
                     accum_steps: int):
    """One micro-batch's loss, weighted by its share of the global batch: (the loss to backpropagate, what the log
    adds up of it, the objective's metrics weighted alike: distillation's (ce, kl), grpo's, dpo's, else zeros)."""
    if own_data is not None:
        return own_data.loss(train_model, model, *batch)
    x, y, doc_ids = batch
    if teacher is None:
        _, loss = train_model(x, y, doc_ids=doc_ids)
        parts = torch.zeros(2, device=loss.device)
        if model.indexed_layers():  # DSA: the indexers' KL, which the loss includes
            parts[1] = model.indexer_kl().detach()
        if model.mtp_ce is not None:  # MTP: its modules' mean cross-entropy, before the weight
            parts[0] = model.mtp_ce
    else:
        loss, parts = teacher.loss(train_model, model, x, y, doc_ids, it)
    if data.packs is None:
        # Each micro-batch's loss is a mean over its tokens; dividing by the number of micro batches makes the
        # accumulated gradient the mean over the whole global batch.
        return loss / accum_steps, loss.detach(), parts / accum_steps
    # A mean over this micro-batch's targets, reweighted to its share of all the global batch's targets (times
    # world_size, which the engine's average divides out): the step minimises the mean over every target, however
    # the targets fall among micro-batches and ranks.
    share = (y != -100).sum() * data.world_size / max(1, data.train_targets(it))
    loss = loss * share
    return loss, loss.detach(), parts * share


@torch.no_grad()
def evaluate(model: Transformer, data: TokenData, autocast, own_data) -> dict:
    """Mean loss and bits per byte on the same eval_iters * batch_size windows of each split every time (a
    fixed step 0: evaluations compare like with like), spread over the ranks and summed back."""
    model.eval()
    out = {}
    for split in ("train", "val"):
        sums = torch.zeros(4, dtype=torch.float64, device=data.device)  # nats, tokens, nats of text tokens, text bytes
        # Every rank runs as many forwards (stage 3 and FSDP2 gather parameters in each); a rank past the last
        # batch recomputes batch 0 and counts nothing of it.
        for i in range(data.rank, data.eval_iters + (-data.eval_iters) % data.world_size, data.world_size):
            x, y, doc_ids = data.eval_batch(split, i if i < data.eval_iters else 0)
            with autocast:
                logits, _ = model(x, doc_ids=doc_ids)
            if i >= data.eval_iters:
                continue
            # Positions without a target (-100: prompts, padding) count neither nats nor bytes.
            nats = F.cross_entropy(logits.float().flatten(0, 1), y.flatten(), reduction="none").double()
            is_target = y.flatten() != -100
            nbytes = data.token_bytes[y.flatten().clamp(min=0)] * is_target
            sums += torch.stack([nats.sum(), is_target.sum().double(), (nats * (nbytes > 0)).sum(), nbytes.sum()])
        all_reduce_sum(sums)
        out[f"{split}_loss"] = (sums[0] / sums[1]).item()
        out[f"{split}_bpb"] = (sums[2] / (math.log(2) * sums[3])).item()
    if own_data is not None:  # grpo's pass@1, dpo's preference accuracy, on their held-out sets
        with autocast:
            out |= own_data.evaluate(model)
    model.train()
    return out


class Teacher:
    """objective = "distill": a trained run's model, frozen, whose logits on each micro-batch are the student's soft
    targets (objectives.distillation_loss). It must have the data's tokenizer: the KL compares two distributions
    over the same token ids, and a teacher of another vocabulary would compare different words id by id (no
    vocabulary is sliced or remapped to hide that). alpha, the weight of the data's own cross-entropy, moves
    linearly from distill_alpha at step 0 to distill_alpha_final at max_iters."""

    def __init__(self, c: dict, data: TokenData):
        path = os.path.join(c["teacher"], "ckpt.pt")
        # Building the teacher's model draws its (then overwritten) initial weights from the CPU generator: forked,
        # so the student starts from the same weights and the same dropout masks as without a teacher.
        with torch.random.fork_rng(devices=[]):
            self.model, _ = load_model(c["teacher"], data.device)  # eval mode: no dropout in the targets
        if sha256_of(os.path.join(c["teacher"], "tokenizer.model")) != data.meta["tokenizer_sha256"]:
            raise SystemExit(f"teacher {c['teacher']} has another tokenizer than {c['data_dir']}: its logits are "
                             "over other tokens, so distillation needs a teacher trained with this tokenizer")
        self.model.requires_grad_(False)
        if self.model.config.block_size < c["block_size"]:
            raise SystemExit(f"teacher {c['teacher']} has block_size {self.model.config.block_size}, shorter than the "
                             f"student's windows of {c['block_size']}")
        self.record = {"out_dir": os.path.abspath(c["teacher"]), "sha256": sha256_of(path)}
        self.start, self.final, self.max_iters = c["distill_alpha"], c["distill_alpha_final"], c["max_iters"]
        self.temperature = c["distill_temperature"]

    def claim(self, progress: dict) -> None:
        """Records the teacher in the run's progress (so in every checkpoint); a resumed run must find it unchanged."""
        if progress["teacher"] is not None and progress["teacher"]["sha256"] != self.record["sha256"]:
            raise SystemExit(f"resume: {self.record['out_dir']} is not the teacher this run started with (its ckpt.pt "
                             "has changed since): put that teacher back or start a new run")
        progress["teacher"] = self.record

    def alpha(self, it: int) -> float:
        return self.start + (self.final - self.start) * min(it, self.max_iters) / max(1, self.max_iters)

    def loss(self, train_model, model: Transformer, x, y, doc_ids, it: int):
        """The micro-batch's distillation loss (a mean over its targets, as the model's own loss is) and its
        detached parts, stacked (ce, kl). model is train_model's uncompiled module (for the MoE balance term)."""
        logits, _ = train_model(x, doc_ids=doc_ids)
        with torch.no_grad():
            teacher_logits, _ = self.model(x, doc_ids=doc_ids)
        loss, parts = distillation_loss(logits, teacher_logits, y, self.alpha(it), self.temperature)
        return loss + model.auxiliary_loss(), torch.stack([parts["ce"], parts["kl"]])


def objective_data(c: dict, data: TokenData, model_config: ModelConfig, base: dict | None, rank: int,
                   world_size: int, autocast):
    """grpo's sampled replies (rollouts.Policy) or dpo's pairs (preferences.Preferences): the objectives that
    bring their own micro-batches and loss, and need the run they start from as a reference; else None."""
    if c["objective"] not in ("grpo", "dpo"):
        return None
    if base is None:
        raise SystemExit(f"resume: {c['out_dir']}/ckpt.pt names no run it started from, and "
                         f"objective={c['objective']!r} needs that run as its frozen reference")
    reference = frozen_reference(model_config, base, data.device)
    if c["objective"] == "grpo":
        return Policy(c, data, reference, rank, world_size)
    return Preferences(c, data, reference, rank, world_size, autocast)


def frozen_reference(model_config: ModelConfig, base: dict, device: str) -> Transformer:
    """The run a post-training run started from (without adapters), frozen in eval mode. Built under a forked
    generator, so that the trained model's own initialisation draws are those of a run without it."""
    with torch.random.fork_rng(devices=[]):
        reference = Transformer(model_config).to(device)
    reference.load_state_dict(base["model"])
    return reference.requires_grad_(False).eval()


def read_resume_checkpoint(c: dict, model_config: ModelConfig, meta: dict, device: str) -> dict:
    """out_dir/ckpt.pt, after checking that it continues this run: same tokenizer, same model shape."""
    ckpt_path = os.path.join(c["out_dir"], "ckpt.pt")
    checkpoint = load_checkpoint(ckpt_path, device)  # claim_out_dir checked that it exists
    if checkpoint["tokenizer_sha256"] != meta["tokenizer_sha256"]:
        raise SystemExit(f"resume: {c['data_dir']} was tokenized with another tokenizer than {ckpt_path}")
    optimizer = checkpoint["config"].get("optimizer", "adamw")  # runs from before the choice used AdamW
    if optimizer != c["optimizer"]:
        raise SystemExit(f"resume: optimizer={c['optimizer']!r} here but {optimizer!r} in {ckpt_path}, whose "
                         "optimizer state is that one's")
    if checkpoint.get("lora") != lora_settings(c):
        raise SystemExit(f"resume: the LoRA settings here ({lora_settings(c)}) are not those of {ckpt_path} "
                         f"({checkpoint.get('lora')}): pass the config file the run started with")
    saved = asdict(ModelConfig(**checkpoint["model_config"]))  # a field added since then has its default
    for key, value in asdict(model_config).items():
        # The attention backend computes the same function with the same weights: it may change.
        if saved[key] != value and key != "attn_impl":
            raise SystemExit(f"resume: {key}={value!r} here but {saved[key]!r} in {ckpt_path}; "
                             "the model must keep its shape (pass the config file the run started with)")
    return checkpoint


def lora_settings(c: dict) -> dict | None:
    """The run's LoRA settings as lora.add_lora takes them (and a LoRA checkpoint stores them); None without."""
    if not c["lora_rank"]:
        return None
    return {"rank": c["lora_rank"], "alpha": c["lora_alpha"], "dropout": c["lora_dropout"], "targets": c["lora_targets"],
            "embeddings": c["lora_embeddings"]}


def restore_rng(checkpoint: dict, rank: int, device_type: str) -> None:
    rng_states = checkpoint["rng"]
    if rank < len(rng_states):  # a different world size keeps the seeded state for new ranks
        torch.set_rng_state(rng_states[rank]["cpu"].cpu())
        if device_type == "cuda" and rng_states[rank]["cuda"] is not None:
            torch.cuda.set_rng_state(rng_states[rank]["cuda"].cpu())


def save(c: dict, engine, model_config: ModelConfig, data: TokenData, progress: dict) -> None:
    """Each rank writes its optimizer shard first; once every shard is complete, rank 0 writes ckpt.pt naming
    them, then removes older shards. A kill at any point leaves a ckpt.pt whose shards exist. progress: iter_num,
    best_val_loss, run_id (the run's identity that ckpt.pt and every shard carry) and base (the run it started
    from). A LoRA run's ckpt.pt holds only the adapters; the base's weights stay in the base's own out_dir."""
    full_model = engine.model_state_dict()  # every rank takes part: stage 3 gathers
    names = shard_names(progress["iter_num"], data.world_size)
    shard = {**optimizer_state_shard(engine), "run_id": progress["run_id"], "iter_num": progress["iter_num"]}
    save_checkpoint(os.path.join(c["out_dir"], names[data.rank]), shard)
    # Gathering the RNG states is also the barrier after which every shard is on disk.
    on_gpu = data.device.startswith("cuda")
    rng = all_gather_objects({"cpu": torch.get_rng_state(), "cuda": torch.cuda.get_rng_state() if on_gpu else None})
    if data.rank == 0:
        lora = lora_settings(c)
        save_checkpoint(os.path.join(c["out_dir"], "ckpt.pt"), {
            "model": adapter_state_dict(full_model, lora["embeddings"]) if lora else full_model, "lora": lora, "optimizer_shards": names,
            "zero_stage": c["zero_stage"], "parallel": c["parallel"], "world_size": data.world_size,
            "model_config": asdict(model_config), "config": c, **progress,
            "tokenizer_sha256": data.meta["tokenizer_sha256"], "rng": rng})
        remove_other_shards(c["out_dir"], names)


def claim_out_dir(c: dict):
    """Rank 0's out_dir: a folder (made if missing), locked for this run; for a fresh run one without an earlier
    run in it, unless overwrite=True, which removes that run's checkpoint, shards and metrics. Returns the lock."""
    out_dir = c["out_dir"]
    if os.path.exists(out_dir) and not os.path.isdir(out_dir):
        raise SystemExit(f"out_dir {out_dir} exists and is not a folder")
    no_checkpoint = f"--init_from=resume but {os.path.join(out_dir, 'ckpt.pt')} does not exist"
    if c["init_from"] == "resume" and not os.path.isdir(out_dir):
        raise SystemExit(no_checkpoint)  # before making a folder a run that cannot start would leave behind
    try:
        os.makedirs(out_dir, exist_ok=True)
        lock = lock_folder(out_dir, "train.py run")
    except OSError as e:
        raise os_error("train.py", e) from None
    if c["init_from"] == "resume" and not os.path.isfile(os.path.join(out_dir, "ckpt.pt")):
        raise SystemExit(no_checkpoint)
    earlier = [name for name in ("ckpt.pt", "metrics.jsonl") if os.path.exists(os.path.join(out_dir, name))]
    if c["init_from"] != "resume" and earlier:
        if not c["overwrite"]:
            raise SystemExit(f"{out_dir} holds an earlier run ({', '.join(earlier)}): continue it with "
                             "--init_from=resume, replace it with --overwrite=True, or choose another out_dir")
        for name in earlier:
            os.remove(os.path.join(out_dir, name))
        remove_other_shards(out_dir, keep=[])
    return lock


def trim_metrics(out_dir: str, iter_num: int) -> None:
    """After a resume from the checkpoint of step iter_num, keep only what was logged up to it: the steps up to
    iter_num and the evaluations before it (the resumed run evaluates iter_num again). Each iteration then has
    one record, however often the run was resumed. A line torn by a kill mid-write is dropped."""
    path = os.path.join(out_dir, "metrics.jsonl")
    if not os.path.exists(path):
        return
    kept = []
    with open(path, encoding="utf-8") as f:
        for line in f:
            try:
                record = json.loads(line)
            except ValueError:
                continue
            if record["iter"] < iter_num or (record["iter"] == iter_num and "loss" in record):
                kept.append(line)
    with atomic_write(path, "w") as f:
        f.writelines(kept)


def check_finite(what: str, value: float, iter_num: int, out_dir: str) -> None:
    """A NaN or infinite loss ends the run with a non-zero exit (never a checkpoint of a diverged model)."""
    if not math.isfinite(value):
        raise SystemExit(f"iter {iter_num}: the {what} is {value}, so training diverged; {out_dir}/ckpt.pt, if any, "
                         "holds the last good state: resume it with a lower learning_rate or a tighter grad_clip")


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


def take_base_shape(c: dict, base: dict) -> None:
    """A run started from another (base) keeps that checkpoint's shape, block_size (so its windows) included:
    every model key takes the base's value in c, and one set here to something else is refused. The attention
    backend and dropout are this run's."""
    saved = asdict(ModelConfig(**base["model_config"]))  # a field added since then has its default
    adds_indexers = saved["attn"] == "mla" and not saved["index_n_heads"] and c["index_n_heads"]
    for key in MODEL_KEYS:
        if key in ("attn_impl", "dropout") or (adds_indexers and key.startswith("index_")):
            continue  # (DSA's indexers may be added to a dense MLA base: its new weights start fresh, see build)
        if c[key] != DEFAULTS[key] and c[key] != saved[key]:
            raise SystemExit(f"{key}={c[key]!r} here but {saved[key]!r} in {base['record']['out_dir']}, whose shape "
                             "this run keeps: leave the model's keys out of a fine-tuning config")
        c[key] = saved[key]


def model_config_of(c: dict, data: TokenData) -> ModelConfig:
    try:
        config = ModelConfig(vocab_size=data.vocab_size, **{k: c[k] for k in MODEL_KEYS})
    except ValueError as e:
        raise SystemExit(f"model config: {e}") from None
    if data.packs is not None and "linear_attention" in config.layer_types:
        raise SystemExit(f"{c['data_dir']} holds conversations, packed several to a window, and linear-attention "
                         "layers would carry one conversation's state into the next (a per-document reset is not "
                         "written yet): fine-tune a model without them")
    if data.packs is not None and config.moba_chunk_size:
        raise SystemExit(f"{c['data_dir']} holds conversations, packed several to a window, and MoBA's blocks of keys "
                         "would mix them (a block's mean key would route another conversation's queries): fine-tune "
                         "a model without MoBA")
    return config


def read_base_checkpoint(c: dict, device: str) -> dict | None:
    """The checkpoint a fine-tuning run starts from: init_from=<another run's out_dir>, or on resume the base
    that the run's own ckpt.pt names (a fine-tuning run keeps its base's shape, and a LoRA run's weights are
    its base's). Checked: the data was tokenized with its tokenizer (else the data would be other words to the
    model), it is a whole model, and on resume it is still the file the run started from (by sha256).
    base["record"], {out_dir, sha256}, goes into every checkpoint of the run."""
    resumed = os.path.join(c["out_dir"], "ckpt.pt")
    if c["init_from"] == "scratch" or (c["init_from"] == "resume" and not os.path.isfile(resumed)):
        return None  # (a missing ckpt.pt to resume from is claim_out_dir's sentence)
    if c["init_from"] == "resume":
        record = load_checkpoint(resumed, device, mmap=True).get("base")
        if record is None:
            return None
        path, sha256 = check_base(record, resumed), record["sha256"]  # check_base compared the hashes
    else:
        path = os.path.join(c["init_from"], "ckpt.pt")
        sha256 = sha256_of(path)
    base = load_checkpoint(path, device)
    if base.get("tokenizer_sha256") != read_meta(c["data_dir"])[0]["tokenizer_sha256"]:
        raise SystemExit(f"{c['data_dir']} was tokenized with another tokenizer than {path} was trained with: "
                         f"prepare it with --tokenizer {os.path.join(os.path.dirname(path), 'tokenizer.model')}")
    if base.get("lora"):
        raise SystemExit(f"{path} holds LoRA adapters, not a whole model: start from its base run, or from a "
                         "checkpoint with the adapters merged")
    base["record"] = {"out_dir": os.path.abspath(os.path.dirname(path)), "sha256": sha256}
    return base


def build(c: dict, data: TokenData, model_config: ModelConfig, base: dict | None, rank: int, device_type: str):
    """The model, its engine and the run's progress (step, best val loss, identity): fresh, resumed, or (base)
    started from another run's weights."""
    checkpoint = read_resume_checkpoint(c, model_config, data.meta, data.device) if c["init_from"] == "resume" else None
    model = Transformer(model_config).to(data.device)
    if base is not None:
        missing, unexpected = model.load_state_dict(base["model"], strict=False)
        if unexpected or any(".indexer." not in name for name in missing):  # new indexers are all it may lack
            model.load_state_dict(base["model"])  # raises, naming the keys
    if c["dsa_warmup"]:  # only the indexers reach param_groups, the engine and AdamW
        model.requires_grad_(False)
        for layer in model.indexed_layers():
            layer.indexer.requires_grad_(True)
            layer.warmup = True
    if c["lora_rank"]:  # frozen base, trainable adapters: only they reach param_groups, the engine and AdamW
        try:
            add_lora(model, **lora_settings(c))
        except ValueError as e:
            raise SystemExit(str(e)) from None
    if checkpoint is not None and c["lora_rank"]:
        load_adapters(model, checkpoint["model"], c["lora_embeddings"])  # the settings were checked equal
    elif checkpoint is not None:
        model.load_state_dict(checkpoint["model"])
    broadcast_parameters(model)
    # The whole model first, identical everywhere (so a resumed run may use any expert_parallel); then each rank
    # keeps its share of the routed experts.
    experts = shard_experts(model, c["expert_parallel"]) if c["expert_parallel"] > 1 else None
    # The engine owns gradients, their communication and the optimizer: AdamW (with weight decay on matrices only,
    # the model's param_groups; the fused kernel does the whole update in one launch on the GPU), and Muon for the
    # blocks' matrices if asked.
    groups = model.param_groups(c["weight_decay"], muon=c["optimizer"] == "muon")
    steps = dict(lr=c["learning_rate"], betas=(c["beta1"], c["beta2"]), fused=device_type == "cuda",
                 momentum=c["muon_momentum"], experts=experts)
    if c["parallel"] == "fsdp2":
        engine = FSDP2(model, groups, **steps)
    else:
        engine = Engine(model, groups, c["zero_stage"], bucket_mb=c["bucket_mb"], **steps)
    if checkpoint is None:
        # A new run gets a new identity (rank 0's: every rank must save the same one).
        return model, engine, {"iter_num": 0, "best_val_loss": float("inf"),
                               "run_id": all_gather_objects(uuid.uuid4().hex)[0], "base": base and base["record"],
                               "teacher": None}
    load_optimizer_state(engine, load_optimizer_shards(c["out_dir"], checkpoint, os.path.join(c["out_dir"], "ckpt.pt")))
    restore_rng(checkpoint, rank, device_type)
    run_id = checkpoint.get("run_id") or all_gather_objects(uuid.uuid4().hex)[0]  # older checkpoints had none
    return model, engine, {"iter_num": checkpoint["iter_num"], "best_val_loss": checkpoint["best_val_loss"],
                           "run_id": run_id, "base": base and base["record"], "teacher": checkpoint.get("teacher")}


def expert_exchange_record(model: Transformer, local_load: torch.Tensor, c: dict, rank: int, world_size: int) -> dict:
    """This step's expert-parallel traffic, means over the ranks: the bytes of rows the exchanges sent, against the
    count the routing implies, and the seconds they waited (the forward's dispatch and combine, the backward). Each (token, slot) pair routed to an expert on another
    rank travels there and back, and its gradient both ways again: 4 rows of n_embd numbers (float32 here; under bf16
    autocast the outputs travel in bf16 and the count is high). local_load (n_moe_layers, experts): this rank's pairs
    per expert. (Summed over the ranks the two counts must be equal: a rank sends for the pairs of others too.)"""
    E, n = c["expert_parallel"], c["n_routed_experts"]
    mine = slice((rank % E) * n // E, (rank % E + 1) * n // E)
    away = local_load[:, :n].sum() - local_load[:, mine].sum()
    stats = model.exchange_stats() | {"expert_bytes_theory": float(away) * 4 * c["n_embd"] * 4}
    means = all_reduce_sum(torch.tensor(list(stats.values()), dtype=torch.float64)) / world_size
    return dict(zip(stats, means.tolist()))


def announce(config: dict, model: Transformer, data: TokenData, setup: str) -> None:
    """Rank 0, before the first step: the run's settings and size on stdout, its config.json and the tokenizer in
    out_dir (an out_dir then carries all that sample.py needs)."""
    print(json.dumps(config, indent=1))
    active = f" ({model.num_params(active=True) / 1e6:.2f}M active)" if model.moe_layers() else ""
    print(f"{model.num_params() / 1e6:.2f}M parameters{active} (without embeddings), vocab {data.vocab_size}, {setup}")
    if config["lora_rank"]:
        trained = sum(p.numel() for p in model.parameters() if p.requires_grad)
        what = "adapter and embedding" if config["lora_embeddings"] else "adapter"
        print(f"LoRA: {trained:,} {what} parameters trained, the base's {model.num_params(False) - trained:,} frozen")
    if config["optimizer"] == "muon":
        maps = model.param_groups(0.0, muon=True)[0]["params"]
        on_muon = sum(p.numel() for p in maps)
        print(f"Muon: {len(maps)} matrices, {on_muon:,} parameters; AdamW: the other "
              f"{model.num_params(False) - on_muon:,}")
    if config["dsa_warmup"]:
        trained = sum(p.numel() for p in model.parameters() if p.requires_grad)
        print(f"DSA warm-up: the indexers' {trained:,} parameters trained, the other {model.num_params(False):,} "
              "frozen, attention dense")
    for split, pack in (data.packs or {}).items():
        print(f"{split}: {len(pack.lengths):,} conversations packed into {len(pack.windows):,} windows of "
              f"{pack.capacity} tokens, {pack.real:.1%} of them real; {pack.truncated} longer than a window, truncated")
    with atomic_write(os.path.join(config["out_dir"], "config.json"), "w") as f:
        json.dump(config, f, indent=1)
    copy_file(data.tokenizer_path, os.path.join(config["out_dir"], "tokenizer.model"))


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

    # ---- data, out_dir, model, optimizer ------------------------------------------------------
    base = read_base_checkpoint(c, device)
    if base is not None:
        take_base_shape(c, base)
    data = TokenData(c, rank, world_size, device)
    check_same_on_all_ranks(data.identity, "data")
    model_config = model_config_of(c, data)
    teacher = Teacher(c, data) if c["objective"] == "distill" else None
    lock = on_rank0(lambda: claim_out_dir(c))  # noqa: F841 (held until the process ends)
    model, engine, progress = build(c, data, model_config, base, rank, device_type)
    own_data = objective_data(c, data, model_config, base, rank, world_size, autocast)
    batches = data if own_data is None else own_data  # where the loop's micro-batches come from
    base = None  # free the loaded copy
    if teacher is not None:
        teacher.claim(progress)
    if progress["iter_num"] > 0:
        on_rank0(lambda: trim_metrics(c["out_dir"], progress["iter_num"]))
    train_model = torch.compile(model) if c["compile"] else model
    moe, dsa = len(model.moe_layers()) > 0, teacher is None and own_data is None and bool(model.indexed_layers())
    mtp = teacher is None and own_data is None and data.packs is None and bool(model.mtp) and \
        model_config.mtp_loss_weight > 0
    experts = c["expert_parallel"] > 1  # the exchanges' bytes and waits are logged
    flops_per_token, peak = model.estimate_flops(), peak_flops(device_type, ptdtype)
    tokens_per_iter = c["gradient_accumulation_steps"] * c["batch_size"] * c["block_size"]
    comm_theory = engine.theory_bytes(accum_steps)
    rows = c["batch_size"] * c["gradient_accumulation_steps"]
    per_step = {"grpo": f"{rows:,} replies, {c['group_size']} to a prompt,", "dpo": f"{rows:,} pairs"}.get(
        c["objective"], f"{tokens_per_iter:,} tokens")
    if master:
        announce(config, model, data, f"{world_size} process(es) on {device} in {str(ptdtype).removeprefix('torch.')}, "
                                      f"{per_step} per step")

    # ---- the loop -----------------------------------------------------------------------------
    iter_num = start_iter = progress["iter_num"]
    t_start = time.time()
    bar = tqdm(total=c["max_iters"], initial=iter_num, disable=not master, dynamic_ncols=True, desc="train")
    batch = batches.train_batch(iter_num, 0)
    while True:
        lr = get_lr(iter_num, config)
        if iter_num % c["eval_interval"] == 0 or iter_num == c["max_iters"]:
            losses = evaluate(model, data, autocast, own_data)
            if master:
                held_out = "".join(f", {k} {losses[k]:.1%}" for k in ("pass@1", "preference_accuracy") if k in losses)
                bar.write(f"iter {iter_num}: train loss {losses['train_loss']:.4f}, val loss {losses['val_loss']:.4f}, "
                          f"val {losses['val_bpb']:.4f} bits per byte{held_out}")
                log_metrics(c["out_dir"], {"iter": iter_num, **losses, "elapsed_s": time.time() - t_start})
            check_finite("validation loss", losses["val_loss"], iter_num, c["out_dir"])
            improved = losses["val_loss"] < progress["best_val_loss"]
            progress |= {"iter_num": iter_num, "best_val_loss": min(progress["best_val_loss"], losses["val_loss"])}
            if iter_num > start_iter and (improved or c["always_save_checkpoint"]):
                save(c, engine, model_config, data, progress)
        if iter_num >= c["max_iters"]:
            break

        t0 = time.time()
        engine.comm_stats()  # count this step's traffic only, not the evaluation's
        if experts:
            model.exchange_stats()
        loss_sum = torch.zeros((), device=device)
        parts_sum = 0  # the objective's metrics (distillation's ce and kl, grpo's), weighted as the loss is
        for micro_step in range(accum_steps):
            engine.set_sync(micro_step == accum_steps - 1)  # decided before the forward, as DDP's no_sync
            with autocast:
                loss, logged, parts = micro_batch_loss(train_model, model, teacher, own_data, data, batch, iter_num,
                                                       accum_steps)
            loss_sum += logged
            parts_sum = parts_sum + parts
            # Read the next micro-batch while this one is still computing, as nanoGPT does: on CUDA the forward
            # was only queued, so the host's read and the pinned copy overlap the GPU's work.
            last = micro_step == accum_steps - 1
            batch = batches.train_batch(iter_num + last, 0 if last else micro_step + 1)
            engine.backward(scaler.scale(loss))
        # Averaged over the ranks, clipped on the global norm (still computed with clipping off, for the log).
        grad_norm = engine.step(lr, c["grad_clip"], scaler)
        comm = engine.comm_stats()
        if moe:
            # Auxiliary-loss-free balancing (model.Gate) from the tokens each expert got in this step's whole
            # global batch: summed over the ranks, so every replica moves its biases identically.
            local_load = model.expert_load()
            expert_load = all_reduce_sum(local_load.clone())
            model.update_expert_bias(expert_load)
        iter_num += 1
        bar.update(1)

        if iter_num % c["log_interval"] == 0:
            # The mean over the global batch: over its tokens, or (packed, grpo) over its targets.
            weighted = data.packs is not None or own_data is not None
            loss = all_reduce_sum(loss_sum if weighted else loss_sum / accum_steps).item() / world_size
            dt = time.time() - t0  # .item() above waited for the device, so this is the real step time (sampling too)
            tokens_per_s = (tokens_per_iter if own_data is None else own_data.step_tokens) / dt
            mfu = flops_per_token * tokens_per_s / (peak * world_size) if peak else None
            if teacher is not None or own_data is not None or dsa or mtp:
                parts = (all_reduce_sum(parts_sum) / world_size).tolist()
            if experts:
                expert_traffic = expert_exchange_record(model, local_load, c, rank, world_size)
            if master:
                bar.set_postfix(loss=f"{loss:.4f}", tok_s=f"{tokens_per_s:,.0f}")
                record = {"iter": iter_num, "loss": loss, "lr": lr, "grad_norm": grad_norm.item(),
                          "tokens_per_s": tokens_per_s, "mfu": mfu, "elapsed_s": time.time() - t_start,
                          **comm, "comm_bytes_theory": comm_theory}  # per rank, this step
                if dsa:  # the indexers' KL to the attention they steer, summed over the layers
                    record["indexer_kl"] = parts[1]
                if mtp:  # the MTP modules' mean cross-entropy (loss includes mtp_loss_weight times it)
                    record["mtp_loss"] = parts[0]
                if teacher is not None:  # the schedule as applied, and both terms (means over the global batch)
                    record |= {"distill_alpha": teacher.alpha(iter_num - 1), "ce": parts[0], "kl": parts[1]}
                if own_data is not None:  # the step's round of replies and the loss's metrics (token means)
                    record |= own_data.record(parts)
                if experts:
                    record |= expert_traffic
                if moe:  # per MoE layer, the busiest expert's tokens over the mean: 1.0 is perfectly balanced
                    record["expert_load_max_over_mean"] = (expert_load.max(dim=1).values / expert_load.mean(dim=1)).tolist()
                log_metrics(c["out_dir"], record)
            check_finite("training loss", loss, iter_num, c["out_dir"])
    bar.close()
    destroy()


if __name__ == "__main__":
    try:
        main(sys.argv[1:])
    except OSError as e:  # a full disk, a read-only out_dir: one sentence (the last checkpoint stays as it was)
        raise os_error("train.py", e) from None
    finally:
        # FSDP2's hooks hold its parameter groups (tensors, communication handles) in reference cycles that only the
        # garbage collector frees. Left to the interpreter's exit, they can reach gloo's threads after Python began
        # shutting down, and a finished run aborts ("terminate called without an active exception"): free them now.
        gc.collect()
        destroy(wait_for_others=False)  # after an error too: a process group left alive can abort the exit
