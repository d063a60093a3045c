"""
parallel.py: data parallelism written on raw torch.distributed collectives.

train.py runs unchanged as one process (`python train.py ...`) or as N processes under torchrun
(`torchrun --nproc_per_node=N train.py ...`); everything that moves between processes lives here.

The one idea: data parallelism is "same weights, different data, averaged gradients". Every rank
starts from rank 0's weights and applies the same averaged gradient with the same optimizer, so the
replicas never drift apart, and N ranks each doing 1/N of a global batch compute exactly the step one
process would compute on the whole global batch.

This is the plain version: one all-reduce of all gradients after the backward. Overlapping that
communication with the backward (buckets) and sharding optimizer state, gradients and parameters
(ZeRO) build on it.
"""

import datetime
import os

import torch
import torch.distributed as dist


def init_distributed(timeout_s: float = 600.0) -> tuple[int, int, int]:
    """Joins the process group when launched by torchrun; returns (rank, local_rank, world_size).

    torchrun tells each process who it is through environment variables (RANK, LOCAL_RANK,
    WORLD_SIZE, MASTER_ADDR/PORT); a plain `python train.py` has none and is a world of one, with no
    process group at all, so nothing below costs anything there.
    """
    if "RANK" not in os.environ:
        return 0, 0, 1
    rank, local_rank = int(os.environ["RANK"]), int(os.environ["LOCAL_RANK"])
    # NCCL moves GPU memory directly (NVLink / InfiniBand); gloo is the CPU backend. A rank that dies
    # leaves the others blocked inside a collective: the timeout turns that hang into an error.
    timeout = datetime.timedelta(seconds=timeout_s)
    if torch.cuda.is_available():
        torch.cuda.set_device(local_rank)
        dist.init_process_group("nccl", timeout=timeout, device_id=torch.device("cuda", local_rank))
    else:
        dist.init_process_group("gloo", timeout=timeout)
    return rank, local_rank, dist.get_world_size()


def is_distributed() -> bool:
    return dist.is_available() and dist.is_initialized()


def destroy() -> None:
    if is_distributed():
        dist.destroy_process_group()


def check_same_on_all_ranks(obj, what: str) -> None:
    """Fails fast when ranks disagree (say, a config override given to one rank only): a mismatch
    would otherwise surface much later as a hang or as silently diverging replicas."""
    if not is_distributed():
        return
    everyone = [None] * dist.get_world_size()
    dist.all_gather_object(everyone, obj)
    if any(o != everyone[0] for o in everyone):
        raise SystemExit(f"the ranks disagree on the {what}: rank 0 has {everyone[0]!r}, "
                         f"but some rank has {next(o for o in everyone if o != everyone[0])!r}")


def broadcast_parameters(model: torch.nn.Module) -> None:
    """Copies rank 0's parameters and buffers to every rank, so all replicas start identical
    whatever each rank's random initialisation produced."""
    if not is_distributed():
        return
    for tensor in list(model.parameters()) + list(model.buffers()):
        dist.broadcast(tensor.data, src=0)


def all_reduce_gradients(model: torch.nn.Module) -> None:
    """Replaces every gradient by its mean over the ranks.

    All gradients are packed into one flat buffer so the step makes one collective instead of one
    per parameter: each collective pays a fixed latency, and a small model has hundreds of small
    tensors. A parameter without a gradient this step contributes zeros, so every rank sends a
    buffer of the same layout and no rank waits for a tensor another rank never sends.
    Summing and then dividing (rather than ReduceOp.AVG) works on every backend and torch version.
    """
    if not is_distributed():
        return
    params = list(model.parameters())
    for p in params:
        if p.grad is None:
            p.grad = torch.zeros_like(p)
    flat = torch.cat([p.grad.reshape(-1) for p in params])
    dist.all_reduce(flat, op=dist.ReduceOp.SUM)
    flat /= dist.get_world_size()
    offset = 0
    for p in params:
        p.grad.copy_(flat[offset:offset + p.numel()].view_as(p))
        offset += p.numel()


def all_reduce_sum(tensor: torch.Tensor) -> torch.Tensor:
    """Sums a small tensor of statistics (eval losses, token counts) over the ranks, in place."""
    if is_distributed():
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
    return tensor


def all_gather_objects(obj) -> list:
    """Collects one picklable object from every rank (e.g. RNG states for a checkpoint)."""
    if not is_distributed():
        return [obj]
    everyone = [None] * dist.get_world_size()
    dist.all_gather_object(everyone, obj)
    return everyone
