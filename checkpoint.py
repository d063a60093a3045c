"""
checkpoint.py: the files a training run leaves in its out_dir, and reading them back, for every script.

    model, tokenizer = load_model("out/cpu_demo", "cpu")     # sample.py, export_hf.py, evaluation
    checkpoint = load_checkpoint("out/cpu_demo/ckpt.pt", "cpu")

An out_dir holds ckpt.pt (the whole model, or a LoRA run's adapters and the name and sha256 of the base they adapt;
its ModelConfig, the step, the run's config, every rank's RNG state, the names of the optimizer shards written
with it), one optimizer.<iter>.<rank>-of-<N>.pt per rank (that rank's AdamW moments, as pieces of the flattened
parameters: parallel.py), and the tokenizer.model the data was made with, so an out_dir is all that sampling or
exporting needs (a LoRA run's, with its base in place).

The one idea: a checkpoint is data, never code. Every file is read with weights_only=True, so unpickling a
file can build tensors, numbers, strings, lists and dicts but never call a function: a checkpoint downloaded
from anywhere cannot run anything. Every file is written with files.atomic_write, so a kill leaves the old
complete file or the new one. Importing this module loads the model and the tokenizer, not the training loop.
"""

import errno
import hashlib
import os
import pickle

import torch

from files import atomic_write
from lora import add_lora, load_adapters, merge_lora
from model import ModelConfig, Transformer
from tokenizer import Tokenizer


def save_checkpoint(path: str, checkpoint: dict) -> None:
    try:
        with atomic_write(path) as f:
            torch.save(checkpoint, f)
    except RuntimeError:
        # torch.save reports some writes that failed part-way (a full disk, a file-size limit) as "unexpected pos ...".
        raise OSError(errno.ENOSPC, "the write failed part-way (is the disk full?); nothing was replaced", path) from None
    except OSError as e:
        raise OSError(e.errno, f"{e.strerror}; nothing was replaced", path) from None


def load_checkpoint(path: str, device: str, mmap: bool = False) -> dict:
    """The checkpoint at path, or one clear sentence if it is torn or not a checkpoint. mmap: tensors are read
    from disk only when touched (each rank reads only its slices out of every optimizer shard)."""
    try:
        return torch.load(path, map_location=device, weights_only=True, mmap=mmap)
    except Exception as e:
        if isinstance(e, pickle.UnpicklingError) and "weights only" in str(e).lower():
            # torch's own message goes on to explain how to load the file anyway: that advice is not passed on.
            raise SystemExit(f"cannot read {path}: it holds Python objects besides tensors and plain data, and "
                             "unpickling those could run code") from None
        first_line = (str(e).splitlines() or [""])[0][:200]
        raise SystemExit(f"cannot read {path}: it is torn or not a checkpoint ({type(e).__name__}"
                         f"{': ' + first_line if first_line else ''})") from None


def shard_names(iter_num: int, world_size: int) -> list[str]:
    """The optimizer shard files of the checkpoint of step iter_num, one per rank."""
    return [f"optimizer.{iter_num}.{rank}-of-{world_size}.pt" for rank in range(world_size)]


def remove_other_shards(out_dir: str, keep: list[str]) -> None:
    """Delete the optimizer shards of earlier checkpoints, once a newer ckpt.pt names its own."""
    for name in os.listdir(out_dir):
        if name.startswith("optimizer.") and name.endswith(".pt") and name not in keep:
            os.remove(os.path.join(out_dir, name))


def load_optimizer_shards(out_dir: str, checkpoint: dict, ckpt_path: str) -> list[dict]:
    """Every optimizer shard that ckpt.pt names, memory-mapped; one sentence if one is missing or torn."""
    if "optimizer_shards" not in checkpoint:
        raise SystemExit(f"resume: {ckpt_path} has no optimizer shards (written by an older train.py)")
    shards = []
    for name in checkpoint["optimizer_shards"]:
        shard_path = os.path.join(out_dir, name)
        if not os.path.isfile(shard_path):
            raise SystemExit(f"resume: {shard_path} is missing; {ckpt_path} needs all "
                             f"{len(checkpoint['optimizer_shards'])} optimizer shards written with it")
        shard = load_checkpoint(shard_path, "cpu", mmap=True)
        # Shards of another run with the same layout would load without complaint and quietly change the
        # optimizer's state: each file carries the run's identity and step. (Checkpoints from before run_id
        # existed carry none, and are taken as they are.)
        if "run_id" in checkpoint and (shard.get("run_id"), shard.get("iter_num")) != (checkpoint["run_id"], checkpoint["iter_num"]):
            raise SystemExit(f"resume: {shard_path} was written by another run or at another step than {ckpt_path}")
        shards.append(shard)
    return shards


def sha256_of(path: str) -> str:
    with open(path, "rb") as f:
        return hashlib.sha256(f.read()).hexdigest()


def check_base(record: dict, what: str) -> str:
    """The path of the base checkpoint a fine-tuning run names ({"out_dir", "sha256"}), after checking that it
    is still the file the run started from: adapters trained on other weights would adapt the wrong model."""
    path = os.path.join(record["out_dir"], "ckpt.pt")
    if not os.path.isfile(path):
        raise SystemExit(f"{what} was trained on the base {path}, which is missing (put the base run back there)")
    if sha256_of(path) != record["sha256"]:
        raise SystemExit(f"{path} is not the base {what} was trained on (its sha256 differs: that run has changed "
                         "since); put that base back or fine-tune again")
    return path


def adapted_model(model: Transformer, checkpoint: dict, ckpt_path: str, device: str) -> Transformer:
    """A LoRA checkpoint's model: its base's weights, the adapters on them, merged into plain matrices."""
    base_path = check_base(checkpoint["base"], ckpt_path)
    model.load_state_dict(load_checkpoint(base_path, device)["model"])
    add_lora(model, **checkpoint["lora"])
    load_adapters(model, checkpoint["model"], checkpoint["lora"].get("embeddings", False))
    return merge_lora(model)


def load_model(ckpt_dir: str, device: str) -> tuple[Transformer, Tokenizer]:
    """The model (in eval mode) and tokenizer of a train.py out_dir (ckpt.pt and tokenizer.model). A LoRA run's
    adapters come merged into its base's weights: every reader sees a plain model."""
    ckpt_path, tokenizer_path = os.path.join(ckpt_dir, "ckpt.pt"), os.path.join(ckpt_dir, "tokenizer.model")
    for path in (ckpt_path, tokenizer_path):
        if not os.path.isfile(path):
            raise SystemExit(f"{path} not found: --ckpt must be an out_dir written by train.py")
    checkpoint = load_checkpoint(ckpt_path, device)
    try:
        model = Transformer(ModelConfig(**checkpoint["model_config"]))
        if checkpoint.get("lora"):
            model = adapted_model(model, checkpoint, ckpt_path, device)
        else:
            model.load_state_dict(checkpoint["model"])
    except (RuntimeError, KeyError, TypeError, ValueError) as e:
        raise SystemExit(f"{ckpt_path} is not a checkpoint of this model code ({type(e).__name__}: {str(e).splitlines()[0]})")
    tokenizer_sha256 = sha256_of(tokenizer_path)
    if checkpoint.get("tokenizer_sha256", tokenizer_sha256) != tokenizer_sha256:
        raise SystemExit(f"{tokenizer_path} is not the tokenizer {ckpt_path} was trained with (its sha256 differs): "
                         "put the run's own tokenizer.model back")
    try:
        tokenizer = Tokenizer(tokenizer_path)
    except ValueError as e:
        raise SystemExit(str(e)) from None
    if tokenizer.vocab_size != model.config.vocab_size:
        raise SystemExit(f"{tokenizer_path} has {tokenizer.vocab_size} tokens but the model expects {model.config.vocab_size}")
    return model.to(device).eval(), tokenizer
