"""
parallel.py: data parallelism and ZeRO written on raw torch.distributed collectives.

    torchrun --nproc_per_node=4 train.py config/pretrain.py --zero_stage=2       # one node
    torchrun --nnodes=2 --node_rank=0 --nproc_per_node=8 --rdzv_backend=c10d \
             --rdzv_endpoint=HOST:29500 train.py config/pretrain.py --zero_stage=3   # on each node

train.py runs unchanged as one process or as N processes; everything that moves between processes lives here.

The one idea: data parallelism is "same weights, different data, averaged gradients", and ZeRO (Rajbhandari
et al. 2020) notices that AdamW is elementwise. Rank r can own a contiguous slice of the flattened parameters
and step only that slice: it needs only that slice of the averaged gradient (a reduce-scatter instead of an
all-reduce) and only that slice of the AdamW moments. An all-gather of the updated slices rebuilds the full
parameters, and reduce-scatter + all-gather move the same bytes as one all-reduce. Stage 1 shards the optimizer
state, stage 2 also frees each full gradient as soon as it is reduce-scattered, stage 3 also keeps only the
parameter slices and gathers each block's full parameters just before it runs. Every stage computes the same
step as one process on the whole global batch.

The flat layout: parameters travel in buckets, runs of parameters whose values live in one flat buffer (the
parameters are views into it) padded to a multiple of the world size. Buckets never mix weight-decay groups, so
each rank's slice of a bucket is one tensor for torch.optim.AdamW with one weight decay. Checkpoints store each
rank's AdamW state as pieces of the flattened parameters, not of buckets, so a run resumes at any world size and
stage. FSDP2 at the end wraps PyTorch's own fully_shard in the same interface, for comparison and production.

Muon (muon.py) is elementwise in its momentum, which shards as AdamW's moments do, but orthogonalises whole
matrices: each step gathers them, each rank orthogonalises its share, and the updates are scattered back
(Engine._muon_step), with communication counted like the rest.

Expert parallelism (shard_experts) splits MoE layers' routed experts among groups of ranks, tokens going to them by
all-to-all; each expert's gradient is then summed, and sharded, among its own copies only (Replicas).
"""

import datetime
import os
import time

import torch
import torch.distributed as dist

from muon import assign_owners, nesterov_momentum, orthogonalised_update

# torch 2.13 renamed the tensor collectives (reduce_scatter_tensor -> reduce_scatter_single) and warns on the old
# names; older torch (the GPU image runs 2.11) has only the old ones.
_reduce_scatter = getattr(dist, "reduce_scatter_single", None) or dist.reduce_scatter_tensor
_all_gather = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor


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


def destroy(wait_for_others: bool = True) -> None:
    """Leaves the process group, normally after a barrier: a rank that closes its connections while another
    still reads from them can make that one abort at exit ("terminate called without an active exception")."""
    if is_distributed():
        if wait_for_others:
            dist.barrier()
        dist.destroy_process_group()


def lost_a_rank(error: RuntimeError) -> SystemExit:
    """The one sentence for a collective that failed: gloo and NCCL raise a RuntimeError when a peer closed its
    connection (it died) or did not answer within dist_timeout_s (it hangs)."""
    rank = dist.get_rank() if is_distributed() else 0
    return SystemExit(f"rank {rank}: a collective failed, so another rank died or stopped answering within "
                      f"dist_timeout_s ({str(error).splitlines()[0][:200]})")


def _wait(work) -> None:
    try:
        work.wait()
    except RuntimeError as e:
        raise lost_a_rank(e) from None


def check_same_on_all_ranks(config: dict, what: str) -> None:
    """Fails fast when ranks disagree (say, a config override given to one rank only): a mismatch
    would otherwise surface much later as a hang or as silently diverging replicas."""
    if not is_distributed():
        return
    me, everyone = dist.get_rank(), all_gather_objects(config)
    for rank, other in enumerate(everyone):
        differ = sorted(k for k in config.keys() | other.keys() if config.get(k) != other.get(k))
        if differ:
            destroy()  # leave the group cleanly: every rank reaches this line with the same verdict
            k = differ[0]
            raise SystemExit(f"the ranks disagree on the {what}: {k} is {config.get(k)!r} on rank {me} "
                             f"but {other.get(k)!r} on rank {rank}")


def on_rank0(fn):
    """fn() on rank 0 alone (the checks and writes of shared files); its SystemExit is raised on every rank with the
    same sentence, so no rank is left waiting in a collective for one that stopped. Returns fn's result on rank 0."""
    if not is_distributed():
        return fn()
    result, error = None, None
    if dist.get_rank() == 0:
        try:
            result = fn()
        except SystemExit as e:
            error = str(e)
    error = all_gather_objects(error)[0]
    if error is not None:
        destroy()
        raise SystemExit(error)
    return result


def broadcast_parameters(model: torch.nn.Module) -> None:
    """Copies rank 0's parameters and buffers to every rank, so all replicas start identical
    whatever each rank's random initialisation produced."""
    if not is_distributed():
        return
    for tensor in list(model.parameters()) + list(model.buffers()):
        dist.broadcast(tensor.data, src=0)


def all_reduce_sum(tensor: torch.Tensor) -> torch.Tensor:
    """Sums a small tensor of statistics (eval losses, token counts) over the ranks, in place."""
    if is_distributed():
        _wait(dist.all_reduce(tensor, op=dist.ReduceOp.SUM, async_op=True))
    return tensor


def all_gather_objects(obj) -> list:
    """Collects one picklable object from every rank (e.g. RNG states for a checkpoint)."""
    if not is_distributed():
        return [obj]
    everyone = [None] * dist.get_world_size()
    try:
        dist.all_gather_object(everyone, obj)
    except RuntimeError as e:
        raise lost_a_rank(e) from None
    return everyone


# ----------------------------------------------------------------------------------------------------
# Expert parallelism: each rank of an expert-parallel group holds its share of the routed experts, and the tokens
# travel to them and back. A routed expert's parameters are then held by fewer ranks than the dense ones: by its
# data-parallel copies, one in each group. Replicas names such a set of ranks, and the engine sums and shards each
# parameter's gradient over its own.


class AllToAll(torch.autograd.Function):
    """Rows exchanged between the ranks of a group: this rank sends its next send[j] rows to rank j and receives
    recv[j] rows from each rank j, in rank order (all_to_all_single with split sizes). The exchange is its own
    transpose, so its backward is the same exchange with send and recv swapped: each received row's gradient goes
    back to the rank, and the place, it came from. The forward only starts the exchange: its output is filled once
    exchange.wait() has returned, and until then the caller may compute something else."""

    @staticmethod
    def forward(ctx, rows, send, recv, exchange, phase):
        ctx.send, ctx.recv, ctx.exchange = send, recv, exchange
        out = rows.new_empty(sum(recv), *rows.shape[1:])
        exchange.start(out, rows.contiguous(), recv, send, phase)
        return out

    @staticmethod
    def backward(ctx, grad):
        back = grad.new_empty(sum(ctx.send), *grad.shape[1:])
        ctx.exchange.start(back, grad.contiguous(), ctx.send, ctx.recv, "backward")
        ctx.exchange.wait()
        return back, None, None, None, None


class ExpertExchange:
    """One MoE layer's round trip over an expert-parallel group of E ranks, rank r holding routed experts
    r * experts_per_rank .. (r + 1) * experts_per_rank - 1.

    send: this rank's (token, slot) rows, sorted by expert, with counts (n_experts,) per expert. The counts go first
    (an all-to-all of E x experts_per_rank numbers), so each rank knows how many rows it will receive from whom for
    which of its experts; then the rows start travelling. receive waits for them: they arrive grouped by source rank,
    and within it by expert, and a stable sort by local expert groups them for the experts, each a contiguous run.
    send_back and receive_back: the experts' outputs, in that order, put back in arrival order and sent home, where
    they come back in the order send was given. Between a send and its receive the caller computes what does not
    need the rows (ScMoE's dense path), and wait_s counts only the time still left to wait. An expert that gets no
    rows runs on an empty run: nothing waits for it, and its gradient is zeros, not missing."""

    def __init__(self, experts_per_rank: int, group=None):
        self.experts_per_rank, self.group = experts_per_rank, group
        self.world, self.rank = dist.get_world_size(group), dist.get_rank(group)
        self.work, self.overlap = None, True  # overlap=False waits at once: the synchronous schedule
        self.bytes_sent = 0  # rows sent to other ranks, forward and backward
        self.wait_s = dict.fromkeys(("dispatch", "combine", "backward"), 0.0)  # time blocked, by exchange

    def start(self, out: torch.Tensor, rows: torch.Tensor, recv: list, send: list, phase: str) -> None:
        self.bytes_sent += (sum(send) - send[self.rank]) * rows[0].numel() * rows.element_size() if len(rows) else 0
        self.work, self.phase = dist.all_to_all_single(out, rows, recv, send, group=self.group, async_op=True), phase
        if not self.overlap:
            self.wait()

    def wait(self) -> None:
        if self.work is not None:
            t0 = time.perf_counter()
            _wait(self.work)
            self.wait_s[self.phase] += time.perf_counter() - t0
            self.work = None

    def send(self, rows: torch.Tensor, counts: torch.Tensor) -> None:
        """rows (n, d) sorted by expert, counts (n_experts,) int64: start them towards their experts' ranks."""
        received = torch.empty_like(counts)
        _wait(dist.all_to_all_single(received, counts, group=self.group, async_op=True))
        self.received = received.view(self.world, self.experts_per_rank)  # [source rank, local expert]
        self.to_ranks = counts.view(self.world, self.experts_per_rank).sum(dim=1).tolist()
        self.from_ranks = self.received.sum(dim=1).tolist()
        self.arrived = AllToAll.apply(rows, self.to_ranks, self.from_ranks, self, "dispatch")  # by rank, expert

    def receive(self) -> tuple[torch.Tensor, list]:
        """-> the rows for this rank's experts, grouped by expert (m, d), and how many each got (experts_per_rank,)."""
        self.wait()
        expert_of = torch.arange(self.experts_per_rank, device=self.arrived.device).repeat(self.world)
        self.order = expert_of.repeat_interleave(self.received.flatten()).argsort(stable=True)
        return self.arrived[self.order], self.received.sum(dim=0).tolist()

    def send_back(self, outputs: torch.Tensor) -> None:
        """The experts' outputs (m, d), in receive's order: start them home."""
        self.returned = AllToAll.apply(outputs[torch.argsort(self.order)], self.from_ranks, self.to_ranks, self,
                                       "combine")

    def receive_back(self) -> torch.Tensor:
        """-> this rank's rows back (n, d), in the order they were sent."""
        self.wait()
        return self.returned

    def stats(self) -> dict:
        """Bytes of rows sent and seconds waited (by exchange: the forward's dispatch and combine, the backward's)
        since the last call."""
        stats = {"bytes": self.bytes_sent, "wait_s": self.wait_s}
        self.bytes_sent, self.wait_s = 0, dict.fromkeys(self.wait_s, 0.0)
        return stats


class Replicas:
    """The ranks that hold the same parameters and sum their gradients: the whole world for the dense parameters;
    under expert parallelism, for a routed expert its data-parallel copies, the ranks at its place in every
    expert-parallel group. rank and size: this rank's place among them and their number. Gradients are reduced on
    group, ZeRO-3's all-gathers run on gather_group: a communicator of their own, as they are issued in module order
    and the reductions in bucket order, and a communicator needs one order of calls on all its ranks. shard_group:
    for sharded parameters, the ranks that between them hold all of them (the expert-parallel group)."""

    def __init__(self, rank: int, size: int, group=None, gather_group=None, shard_group=None):
        self.rank, self.size = rank, size
        self.group, self.gather_group, self.shard_group = group, gather_group, shard_group


def shard_experts(model: torch.nn.Module, expert_parallel: int) -> Replicas:
    """Expert parallelism over groups of expert_parallel consecutive ranks (on a GPU node, the ones NVLink joins):
    every MoE layer keeps its share of the routed experts and exchanges rows within the group. Returns the experts'
    Replicas: rank r's experts are also on ranks r - expert_parallel, r + expert_parallel, and so on. Every rank
    must call it (each creates every group), after the whole model is identical everywhere (broadcast_parameters)."""
    rank, world, E = dist.get_rank(), dist.get_world_size(), expert_parallel
    expert_group, _ = dist.new_subgroups_by_enumeration([list(range(g, g + E)) for g in range(0, world, E)])
    copies = [list(range(r, world, E)) for r in range(E)]
    (group, _), (gather_group, _) = dist.new_subgroups_by_enumeration(copies), dist.new_subgroups_by_enumeration(copies)
    for moe in model.moe_layers():
        moe.shard_experts(ExpertExchange(len(moe.experts) // E, expert_group), rank % E)
    return Replicas(rank // E, world // E, group, gather_group, shard_group=expert_group)


def gather_experts(state: dict, experts: Replicas, rank: int) -> dict:
    """A checkpoint holds whole experts: rank 0 of the first copy of each expert (ranks 0 .. E - 1, the first
    expert-parallel group) sends its share, and rank 0 returns its state with every expert in it."""
    if experts.rank != 0:
        return state
    shares = [None] * dist.get_world_size(experts.shard_group) if rank == 0 else None
    mine = {name: t.detach().cpu() for name, t in state.items() if ".experts." in name}
    dist.gather_object(mine, shares, dst=0, group=experts.shard_group)
    return state | {k: v for share in shares for k, v in share.items()} if rank == 0 else state


class Bucket:
    """Parameters that travel together. Their values live in `flat` (the parameters are views into it), padded
    to a multiple of the world size; `shard` is the part this rank steps (with AdamW, or for muon buckets with
    Muon), and shard.grad its part of the averaged gradient."""

    def __init__(self, named_params: list, weight_decay: float, replicas: Replicas, muon: bool = False):
        self.replicas, self.muon = replicas, muon  # muon: stepped by Muon (whole matrices), not AdamW
        self.names = [name for name, _ in named_params]
        self.params = [p for _, p in named_params]
        self.weight_decay = weight_decay
        self.offsets, self.numel = [], 0
        for p in self.params:
            self.offsets.append(self.numel)
            self.numel += p.numel()
        self.shard_size = -(-self.numel // replicas.size)  # ceil: the padding is at most size - 1 zeros
        first = self.params[0]
        self.flat = torch.zeros(self.shard_size * replicas.size, dtype=first.dtype, device=first.device)
        for p, offset in zip(self.params, self.offsets):
            self.flat[offset:offset + p.numel()].copy_(p.data.reshape(-1))
            p.data = self.flat[offset:offset + p.numel()].view_as(p)
        self.ready = set()  # ids of the parameters whose gradient of this backward has arrived
        self.staging = None  # sharded gradients: the full gradient of the current micro-batch, until it is sent
        self.unit = None  # sharded parameters: the Unit this bucket is gathered with

    def all_ready(self) -> bool:
        return len(self.ready) == len(self.params)

    def owned_range(self, replicated: bool) -> tuple[int, int]:
        r = self.replicas.rank
        return (0, self.flat.numel()) if replicated else (r * self.shard_size, (r + 1) * self.shard_size)

    def pieces(self, lo: int, hi: int):
        """(name, start, stop, position in [lo, hi)) for each parameter's flattened elements inside [lo, hi)."""
        for name, p, offset in zip(self.names, self.params, self.offsets):
            start, stop = max(lo, offset), min(hi, offset + p.numel())
            if start < stop:
                yield name, start - offset, stop - offset, start - lo


def split_by_decay(params: list, groups: list, name_of: dict, replicas_of) -> list:
    """One bucket per weight-decay group of params (a block's parameters, say) and set of replicas, in the groups'
    order."""
    ids, buckets = {id(p) for p in params}, []
    for group, wd, muon in groups:
        mine = [p for p in group if id(p) in ids]
        for replicas in dict.fromkeys(map(replicas_of, mine)):  # the dense ones, then the experts' (if any)
            buckets.append(Bucket([(name_of[id(p)], p) for p in mine if replicas_of(p) is replicas], wd, replicas,
                                  muon))
    return buckets


def size_buckets(groups: list, name_of: dict, cap_bytes: float, replicas_of) -> list:
    """Buckets of about cap_bytes in reverse parameter order (the order the backward produces gradients), so
    the first buckets fill and start communicating while the backward is still running. The first is
    smaller (1/25 of the cap, as PyTorch's DDP): the backward's very first gradients start moving at once.
    The no-decay group (norm gains, a few KB) comes last: its gradients arrive all through the backward,
    and in front it would hold back every bucket behind it until the end. A bucket ends where the replicas change
    (expert parallelism: a layer's routed experts between its dense parameters), as it is sent to one set of them."""
    buckets = []
    for params, wd, muon in groups:
        run, size = [], 0
        for p in reversed(params):
            if run and replicas_of(p) is not replicas_of(run[-1][1]):
                buckets.append(Bucket(run, wd, replicas_of(run[-1][1]), muon))
                run, size = [], 0
            run.append((name_of[id(p)], p))
            size += p.numel() * p.element_size()
            if size >= (cap_bytes / 25 if not buckets else cap_bytes):
                buckets.append(Bucket(run, wd, replicas_of(p), muon))
                run, size = [], 0
        if run:
            buckets.append(Bucket(run, wd, replicas_of(run[-1][1]), muon))
    return buckets


def ring_bytes(kind: str, nbytes: int, world_size: int) -> float:
    """Bytes each rank sends in a ring collective over nbytes of data: reduce-scatter and all-gather pass
    (N-1)/N of it, an all-reduce (one of each) twice that (Patarasuk & Yuan 2009)."""
    share = nbytes * (world_size - 1) / world_size
    return 2 * share if kind == "all_reduce" else share


class Comm:
    """The engine's collectives: each one started asynchronously, its bytes counted as a ring sends them, the
    time spent waiting for it measured. In a world of one a collective is a copy (or nothing, in place)."""

    def __init__(self):
        self.bytes_sent, self.wait_s = 0.0, 0.0

    def start(self, kind: str, out: torch.Tensor, inp: torch.Tensor, replicas: Replicas, gather: bool = False):
        """kind over the ranks of replicas: on their group, or for gather (ZeRO-3's all-gathers) on gather_group."""
        if replicas.size == 1:
            if out.data_ptr() != inp.data_ptr():
                out.copy_(inp)
            return None
        self.bytes_sent += ring_bytes(kind, max(out.numel(), inp.numel()) * out.element_size(), replicas.size)
        group = replicas.gather_group if gather else replicas.group
        if kind == "all_reduce":
            return dist.all_reduce(out, op=dist.ReduceOp.SUM, group=group, async_op=True)
        if kind == "reduce_scatter":
            return _reduce_scatter(out, inp, op=dist.ReduceOp.SUM, group=group, async_op=True)
        return _all_gather(out, inp, group=group, async_op=True)

    def wait(self, work) -> None:
        if work is not None:
            t0 = time.perf_counter()
            _wait(work)
            self.wait_s += time.perf_counter() - t0

    def stats(self) -> dict:
        """Bytes this rank sent and seconds it waited on collectives since the last call."""
        stats = {"comm_bytes": self.bytes_sent, "comm_wait_s": self.wait_s}
        self.bytes_sent, self.wait_s = 0.0, 0.0
        return stats


class Engine:
    """The model's parameters, gradients and AdamW state laid out in buckets and sharded by ZeRO stage.

    train.py calls set_sync(is_last_micro_batch) before each forward, backward(loss) after it, and once all
    micro-batches are done step(lr, grad_clip, scaler). What a stage shards is named once, in three flags
    (ZeRO's P_os, P_g, P_p), and every difference between the stages is a test of one of them:
      shard_optimizer   stage >= 1  each rank keeps and steps only its slice of the AdamW moments; the averaged
                                    gradient is reduce-scattered into that slice and the updated slices are
                                    all-gathered back into the full parameters.
      shard_gradients   stage >= 2  no full gradient outlives the backward: each bucket's gradient is staged,
                                    reduce-scattered during the backward and freed, on every micro-batch.
      shard_parameters  stage 3     only the slices of the parameters persist; ParameterGather rebuilds each
                                    block's full parameters just before it runs and frees them after.
    """

    def __init__(self, model: torch.nn.Module, groups: list[dict], zero_stage: int, lr: float, betas: tuple,
                 fused: bool, bucket_mb: float = 25.0, experts: Replicas | None = None, momentum: float = 0.95):
        self.model, self.experts = model, experts
        # What this stage shards, set once here (each stage shards what the one below it does, and one thing more).
        self.shard_optimizer = zero_stage >= 1
        self.shard_gradients = zero_stage >= 2
        self.shard_parameters = zero_stage >= 3
        self.rank, self.world = (dist.get_rank(), dist.get_world_size()) if is_distributed() else (0, 1)
        self.comm, self.sync = Comm(), True
        gather_group = dist.new_group() if self.shard_parameters and is_distributed() else None
        self.dense = Replicas(self.rank, self.world, gather_group=gather_group)
        # Expert parallelism: the routed experts this rank holds are summed and sharded over their copies only.
        expert_ids = {id(p) for p in model.sharded_expert_parameters()} if experts else set()

        def replicas_of(p):
            return experts if id(p) in expert_ids else self.dense

        name_of = {id(p): name for name, p in model.named_parameters()}
        groups = [(group["params"], group["weight_decay"], group.get("muon", False)) for group in groups
                  if group["params"]]
        if self.shard_parameters:
            self.gather = ParameterGather(model, groups, name_of, self.comm, replicas_of)
            self.buckets = [b for unit in self.gather.units for b in unit.buckets]
        else:
            self.gather = None
            self.buckets = size_buckets(groups, name_of, bucket_mb * 2**20, replicas_of)
        self.where = {id(p): (b, offset) for b in self.buckets for p, offset in zip(b.params, b.offsets)}
        for b in self.buckets:
            self._lay_out(b)
        for p in model.parameters():
            if id(p) in self.where:
                p.register_post_accumulate_grad_hook(self._grad_ready)
        self.next_launch, self.in_flight = 0, []
        # AdamW is elementwise, so stepping each slice is exactly the unsharded AdamW; fused does it in one kernel.
        adamw = [b for b in self.buckets if not b.muon]
        self.optimizer = torch.optim.AdamW(
            [{"params": [b.shard for b in adamw if b.weight_decay == wd], "weight_decay": wd}
             for wd in sorted({b.weight_decay for b in adamw}, reverse=True)],
            lr=lr, betas=betas, fused=fused)
        # Muon's momentum is elementwise too, sharded as AdamW's moments are; its orthogonalisation is not (_muon_step).
        self.muon_buckets, self.momentum = [b for b in self.buckets if b.muon], momentum
        self.muon_state = {id(b.shard): torch.zeros_like(b.shard) for b in self.muon_buckets}
        for replicas in dict.fromkeys(b.replicas for b in self.muon_buckets):
            mine = [b for b in self.muon_buckets if b.replicas is replicas]
            owners = iter(assign_owners([p.numel() for b in mine for p in b.params], replicas.size))
            for b in mine:
                b.owners = [next(owners) for _ in b.params]  # the rank among the replicas that orthogonalises each

    def _lay_out(self, b: Bucket) -> None:
        """The bucket's shard (what AdamW steps) and where its gradients accumulate."""
        lo, hi = b.owned_range(replicated=not self.shard_optimizer)
        b.shard = b.flat[lo:hi]
        if self.shard_parameters:  # the slice is the only copy kept; the full buffer is released right away
            b.shard = b.shard.clone()
            b.flat.untyped_storage().resize_(0)
        if self.shard_gradients:
            b.shard.grad = torch.zeros_like(b.shard)
            return
        # The full gradient of a bucket is one flat buffer too: with p.grad a view into it, autograd accumulates
        # micro-batches in place and the collective sends the buffer as it is, no copy. Sharding the optimizer
        # reduce-scatters it in place, so this rank's averaged slice lands in its own slice.
        b.grad = torch.zeros_like(b.flat)
        b.shard.grad = b.grad[lo:hi]
        for p, offset in zip(b.params, b.offsets):
            p.grad = b.grad[offset:offset + p.numel()].view_as(p)

    # ---- gradients ------------------------------------------------------------------------------
    def set_sync(self, sync: bool) -> None:
        """Whether the coming micro-batch communicates. With full gradients kept, they accumulate locally and go
        out only on the last micro-batch; sharded gradients are reduce-scattered every micro-batch (keeping a
        full gradient across micro-batches is exactly what they save), as DeepSpeed's ZeRO-2 and FSDP do."""
        self.sync = sync

    def _grad_ready(self, p: torch.Tensor) -> None:
        """Runs when p's gradient of this backward is accumulated. Buckets launch strictly in bucket order: a
        rank where some gradient is missing (an unused expert) holds back the later buckets too, so every rank
        issues the same collectives in the same order and none waits for a tensor that never comes."""
        b, offset = self.where[id(p)]
        if self.shard_gradients:
            if b.staging is None:
                b.staging = torch.zeros_like(b.flat)
            b.staging[offset:offset + p.numel()].copy_(p.grad.reshape(-1))
            p.grad = None
        elif not self.sync:
            return
        b.ready.add(id(p))
        if self.gather and all(c.all_ready() for c in b.unit.buckets):
            self.gather.release(b.unit)  # the block's backward is over: its full parameters can go
        while self.next_launch < len(self.buckets) and self.buckets[self.next_launch].all_ready():
            self._launch(self.buckets[self.next_launch])

    def _launch(self, b: Bucket) -> None:
        self.next_launch += 1
        received = None
        if not self.shard_optimizer:
            work = self.comm.start("all_reduce", b.grad, b.grad, b.replicas)
        elif not self.shard_gradients:
            work = self.comm.start("reduce_scatter", b.shard.grad, b.grad, b.replicas)
        else:
            received = torch.empty_like(b.shard)
            work = self.comm.start("reduce_scatter", received, b.staging, b.replicas)
        self.in_flight.append((work, b, received))
        # Sharded gradients bound the full gradients alive to the two newest buckets: waiting for the older one
        # here lets its staging buffer go while the backward goes on.
        while self.shard_gradients and len(self.in_flight) > 2:
            self._complete(*self.in_flight.pop(0))

    def _complete(self, work, b: Bucket, received) -> None:
        self.comm.wait(work)
        if self.shard_gradients:
            b.shard.grad += received  # sums over ranks, and over micro-batches
            b.staging = None

    def backward(self, loss: torch.Tensor) -> None:
        """loss.backward(), then send what the hooks could not: buckets with a parameter that got no gradient
        this time count it as zeros. With full gradients kept, only the last micro-batch communicates."""
        loss.backward()
        if not self.shard_gradients and not self.sync:
            return
        for b in self.buckets[self.next_launch:]:
            if self.shard_gradients and b.staging is None:
                b.staging = torch.zeros_like(b.flat)
            self._launch(b)
        while self.in_flight:
            self._complete(*self.in_flight.pop(0))
        for b in self.buckets:
            b.ready.clear()
        self.next_launch = 0
        if self.gather:  # the root, and a block whose parameters did not all get a gradient
            self.gather.release_all()

    def step(self, lr: float, grad_clip: float, scaler: torch.amp.GradScaler) -> torch.Tensor:
        """Averages, clips on the global norm, steps AdamW on this rank's slices, rebuilds the full parameters
        (sharded optimizer, whole parameters), zeroes the gradients. Returns the global norm before clipping."""
        for b in self.buckets:
            # Summed over ranks -> mean over the global batch. An expert's gradient too is divided by the whole
            # world: its copies' sum already holds every rank's tokens, which the exchange brought to it.
            b.shard.grad /= self.world
        scaler.unscale_(self.optimizer)
        norm = self.global_norm()
        if grad_clip > 0:
            # As torch.nn.utils.clip_grad_norm_: scale by max_norm / (norm + 1e-6) when that is below 1.
            coef = torch.clamp(grad_clip / (norm + 1e-6), max=1.0)
            for b in self.buckets:
                b.shard.grad.mul_(coef)
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        scaler.step(self.optimizer)
        scaler.update()
        for b in self.muon_buckets:
            self._muon_step(b, lr)
        for b in self.buckets:
            (b.shard.grad if self.shard_gradients else b.grad).zero_()
        if self.shard_optimizer and not self.shard_parameters:
            # In place: this rank's slice of the output is the input (NCCL and gloo both allow exactly this alias).
            for work in [self.comm.start("all_gather", b.flat, b.shard, b.replicas) for b in self.buckets]:
                self.comm.wait(work)
        return norm

    @torch.no_grad()
    def _muon_step(self, b: Bucket, lr: float) -> None:
        """Muon on a bucket's matrices, distributed as Moonlight's Muon but with the orthogonalisation shared out:
        each rank updates the momentum of its slice (elementwise), the slices are all-gathered into whole matrices,
        each rank orthogonalises the matrices it owns into a buffer that is zero elsewhere, and a reduce-scatter of
        those buffers (a sum with one nonzero term per element: exact) hands every rank its slice of every update.
        The two collectives move the bytes of one all-reduce. Unsharded (stage 0) the momentum is whole everywhere
        already, and one all-reduce of the buffers shares the updates out."""
        look_ahead = nesterov_momentum(b.shard.grad, self.muon_state[id(b.shard)], self.momentum)
        whole = look_ahead
        if self.shard_optimizer:
            whole = torch.empty(b.flat.numel(), dtype=b.shard.dtype, device=b.shard.device)
            self.comm.wait(self.comm.start("all_gather", whole, look_ahead, b.replicas))
        update = torch.zeros_like(whole)
        for p, offset, owner in zip(b.params, b.offsets, b.owners):
            if owner == b.replicas.rank:
                matrix = whole[offset:offset + p.numel()].view_as(p)
                update[offset:offset + p.numel()] = orthogonalised_update(matrix).reshape(-1)
        if self.shard_optimizer:
            mine = torch.empty_like(b.shard)
            self.comm.wait(self.comm.start("reduce_scatter", mine, update, b.replicas))
        else:
            mine = update
            self.comm.wait(self.comm.start("all_reduce", update, update, b.replicas))
        # Decoupled weight decay, then the step: as AdamW's, so its learning rate and decay carry over (Moonlight).
        b.shard.mul_(1 - lr * b.weight_decay).add_(mine, alpha=-lr)

    def global_norm(self) -> torch.Tensor:
        """The norm of the whole gradient vector. Sharded, each rank holds a disjoint slice and the padding is zeros,
        so the squared slices of all ranks add up to it. Unsharded, the dense part is the same on every rank, and
        the experts' part is summed over the expert-parallel group (which holds each expert once)."""
        squares = [b.shard.grad.float().pow(2).sum() for b in self.buckets]
        sum_sq = torch.stack([sq for sq, b in zip(squares, self.buckets) if b.replicas is self.dense]).sum()
        if self.experts is not None:
            expert_sq = torch.stack([sq for sq, b in zip(squares, self.buckets) if b.replicas is self.experts]).sum()
            if not self.shard_optimizer:
                _wait(dist.all_reduce(expert_sq, group=self.experts.shard_group, async_op=True))
            sum_sq = sum_sq + expert_sq
        if self.shard_optimizer:
            self.comm.wait(self.comm.start("all_reduce", sum_sq, sum_sq, self.dense))
        return sum_sq.sqrt()

    def comm_stats(self) -> dict:
        return self.comm.stats()

    def theory_bytes(self, micro_batches: int) -> float:
        """The ZeRO paper's communication per step per rank (section 7): 2 x params for DDP and stages 1-2
        (reduce-scatter + all-gather = one all-reduce), 3 x params for stage 3 (a second all-gather before the
        backward). Sharded gradients are reduce-scattered (and sharded parameters gathered) every micro-batch. Muon
        adds one all-reduce's worth of its matrices per step (_muon_step)."""
        def ring_share(buckets):
            return sum(b.numel * b.flat.element_size() * (b.replicas.size - 1) / b.replicas.size for b in buckets)
        params, muon = ring_share(self.buckets), 2 * ring_share(self.muon_buckets)  # Muon: one all-reduce's worth
        if self.shard_parameters:
            return params * 3 * micro_batches + muon
        return params * (micro_batches + 1 if self.shard_gradients else 2) + muon

    # ---- checkpoints ----------------------------------------------------------------------------
    def model_state_dict(self) -> dict:
        """The full model state dict for rank 0 to save; every rank must call it (sharded parameters gather, and
        under expert parallelism the experts come together)."""
        state = self.gather.full_state_dict(self.rank) if self.gather else self.model.state_dict()
        return gather_experts(state, self.experts, self.rank) if self.experts else state

    def owned_pieces(self, saving: bool = False):
        """(optimizer tensor, parameter name, start, stop, offset): the flattened elements [start, stop) of each
        parameter whose AdamW state this rank holds, at offset in that optimizer tensor's state. saving: of state
        held unsharded by several replicas, only the first one's (the others hold the same)."""
        for b in self.buckets:
            if saving and not self.shard_optimizer and b.replicas.rank != 0:
                continue
            lo, hi = b.owned_range(replicated=not self.shard_optimizer)
            for name, start, stop, at in b.pieces(lo, hi):
                yield b.shard, name, start, stop, at


class Unit:
    """Sharded parameters: the buckets of one block (or of the root: embedding, final norm, head) whose full
    parameters exist only from just before the block runs until just after."""

    def __init__(self, buckets: list):
        self.buckets = buckets
        for b in buckets:
            b.unit = self
        self.full = False
        self.pending = []  # all-gathers in flight


class ParameterGather:
    """ZeRO stage 3's parameter movement: all-gather each unit's full parameters just before they are needed
    (forward and again backward), free them right after, prefetching the next unit so its gather overlaps the
    current block's compute. The model names its blocks (model.blocks()); everything else is the root."""

    def __init__(self, model: torch.nn.Module, groups: list, name_of: dict, comm: Comm, replicas_of):
        self.model, self.comm = model, comm
        # One unit per block and one for the rest, in the order their gradients are complete: last block first,
        # the root last (a tied embedding's gradient is complete only when the backward reaches wte).
        self.blocks = list(model.blocks())
        in_blocks = {id(p) for block in self.blocks for p in block.parameters()}
        root = [p for p in model.parameters() if id(p) not in in_blocks]
        self.units = [Unit(split_by_decay(list(block.parameters()), groups, name_of, replicas_of))
                      for block in reversed(self.blocks)] + [Unit(split_by_decay(root, groups, name_of, replicas_of))]
        self._install_hooks()

    def gather(self, unit: Unit) -> None:
        """Starts the all-gather of a unit's full parameters (no-op if they are there or on their way)."""
        if unit.full:
            return
        unit.full = True
        for b in unit.buckets:
            b.flat.untyped_storage().resize_(b.flat.numel() * b.flat.element_size())
            unit.pending.append(self.comm.start("all_gather", b.flat, b.shard, b.replicas, gather=True))

    def wait_gathered(self, unit: Unit) -> None:
        self.gather(unit)
        while unit.pending:
            self.comm.wait(unit.pending.pop(0))

    def release(self, unit: Unit) -> None:
        if unit.full:
            self.wait_gathered(unit)  # never free memory a collective is still writing
            for b in unit.buckets:
                b.flat.untyped_storage().resize_(0)
            unit.full = False

    def release_all(self) -> None:
        for unit in self.units:
            self.release(unit)

    def _install_hooks(self) -> None:
        """Forward: gather the root and the first block, then each block's pre-hook waits for its own gather
        and starts the next block's (prefetch: the next gather overlaps this block's compute); a block is
        released after its forward. Backward: a hook on each block's output fires just before the block's
        backward, gathers it again and prefetches the block before it; the block is released once all its
        gradients have arrived (Engine._grad_ready). The root stays whole from forward to the end of the
        backward, as in FSDP: its head runs first and its embedding last in the backward."""
        blocks = self.blocks
        root, block_units = self.units[-1], self.units[-2::-1]  # block_units[i] belongs to blocks[i]

        def before_model(module, args):
            self.wait_gathered(root)
            self.gather(block_units[0])

        def after_model(module, args, output):
            if not torch.is_grad_enabled():
                self.release(root)

        def before_block(i):
            def hook(module, args):
                self.wait_gathered(block_units[i])
                if i + 1 < len(blocks):
                    self.gather(block_units[i + 1])
            return hook

        def before_block_backward(i):
            def hook(grad):
                self.wait_gathered(block_units[i])
                if i > 0:
                    self.gather(block_units[i - 1])
            return hook

        def after_block(i):
            def hook(module, args, output):
                self.release(block_units[i])
                if output.requires_grad:
                    output.register_hook(before_block_backward(i))
            return hook

        self.model.register_forward_pre_hook(before_model)
        self.model.register_forward_hook(after_model)
        for i, block in enumerate(blocks):
            block.register_forward_pre_hook(before_block(i))
            block.register_forward_hook(after_block(i))

    def full_state_dict(self, rank: int) -> dict:
        """Gathers one unit at a time and the first of each bucket's replicas copies it to the CPU, so no rank ever
        holds more than one unit beyond its slices. Rank 0 (the first of all) gets the state dict; another rank
        the routed experts it is the first copy of, for gather_experts ({} without expert parallelism)."""
        copies = {}
        for unit in self.units:
            self.wait_gathered(unit)
            copies |= {id(p): p.detach().to("cpu", copy=True)
                       for b in unit.buckets if b.replicas.rank == 0 for p in b.params}
            self.release(unit)
        # keep_vars: the Parameters themselves, so a tied matrix (wte.weight, lm_head.weight) finds its one copy.
        state = self.model.state_dict(keep_vars=True)
        if rank != 0:
            return {k: copies[id(v)] for k, v in state.items() if id(v) in copies}
        return {k: copies.get(id(v), v) for k, v in state.items()}


# ---- optimizer shards: the AdamW state of any layout as pieces of the flattened parameters ------------------

def local_tensor(t: torch.Tensor) -> torch.Tensor:
    """This rank's part of a tensor: a DTensor's local shard (FSDP2), a plain tensor itself."""
    return t.to_local() if hasattr(t, "to_local") else t


def optimizer_state(engine, param) -> list:
    """The state a parameter (or a shard the engine steps) carries: AdamW's two moments, or Muon's momentum."""
    if id(param) in engine.muon_state:
        return [engine.muon_state[id(param)]]
    return [engine.optimizer.state[param][key] for key in ("exp_avg", "exp_avg_sq")]


def optimizer_state_shard(engine) -> dict:
    """This rank's optimizer state as pieces of the flattened parameters, {name: [(start, exp_avg, exp_avg_sq)]}
    (AdamW) or {name: [(start, momentum)]} (Muon): independent of buckets, stage and world size, so any layout can
    rebuild its own slices from it. State held unsharded by several ranks (all of them, or an expert's copies) is
    saved by the first of them. step: AdamW's count (its bias correction needs it; Muon has none)."""
    pieces, state = {}, engine.optimizer.state
    for param, name, start, stop, at in engine.owned_pieces(saving=True):
        here = slice(at, at + stop - start)
        moments = [local_tensor(t).reshape(-1)[here].clone() for t in optimizer_state(engine, param)]
        pieces.setdefault(name, []).append((start, *moments))
    step = float(next(iter(state.values()))["step"]) if pieces else None
    return {"step": step, "pieces": pieces}


def load_optimizer_state(engine, shards: list) -> None:
    """Rebuilds this rank's optimizer state from the shards of any earlier layout (any world size, stage, FSDP2):
    AdamW's moments into new tensors it then loads, Muon's momentum in place."""
    step, found = merge_shards(shards)
    params = [p for group in engine.optimizer.param_groups for p in group["params"]]
    moments = {id(p): (torch.zeros_like(local_tensor(p)), torch.zeros_like(local_tensor(p))) for p in params}
    for param, name, start, stop, at in engine.owned_pieces():
        here = slice(at, at + stop - start)
        into = moments.get(id(param)) or [local_tensor(t) for t in optimizer_state(engine, param)]
        fill_from_pieces(found, name, start, stop, [t.view(-1)[here] for t in into])

    def like_param(p, local):  # a DTensor parameter (FSDP2) wants DTensor state with its layout
        if not hasattr(p, "device_mesh"):
            return local
        from torch.distributed.tensor import DTensor
        return DTensor.from_local(local, p.device_mesh, p.placements, shape=p.shape, stride=p.stride())

    state = [{"step": torch.tensor(step), "exp_avg": like_param(p, moments[id(p)][0]),
              "exp_avg_sq": like_param(p, moments[id(p)][1])} for p in params]
    # load_state_dict puts each tensor where the optimizer wants it (device, dtype).
    engine.optimizer.load_state_dict({"state": dict(enumerate(state)),
                                      "param_groups": engine.optimizer.state_dict()["param_groups"]})


def merge_shards(shards: list) -> tuple[float, dict]:
    """The step count and {name: [(start, *state), ...]} of all the shards of one checkpoint."""
    found = {}
    for s in shards:
        for name, pieces in s["pieces"].items():
            found.setdefault(name, []).extend(pieces)
    return next(s["step"] for s in shards if s["step"] is not None), found


def fill_from_pieces(found: dict, name: str, start: int, stop: int, into: list) -> None:
    """Copies elements [start, stop) of parameter name's flattened optimizer state out of the saved pieces."""
    covered = 0
    for piece_start, *saved in found.get(name, []):
        if len(saved) != len(into):
            raise SystemExit(f"the optimizer shards hold {len(saved)} state tensors for {name} where this run's "
                             f"optimizer keeps {len(into)}: they were written with another optimizer")
        a, z = max(start, piece_start), min(stop, piece_start + saved[0].numel())
        if a < z:
            for t, piece in zip(into, saved):
                t[a - start:z - start] = piece[a - piece_start:z - piece_start]
            covered += z - a
    if covered != stop - start:
        raise SystemExit(f"the optimizer shards hold {covered} of the {stop - start} values of {name} that this rank "
                         "needs: a shard is missing or comes from another run")


class FSDP2:
    """Engine's interface on PyTorch's own fully_shard (FSDP2): each block and then the root become sharded
    modules whose parameters are DTensors split along dim 0, gathered around each block as in stage 3. The
    production path for users who outgrow the handwritten one, and the reference stage 3 is tested against."""

    shard_optimizer = True

    def __init__(self, model: torch.nn.Module, groups: list[dict], lr: float, betas: tuple, fused: bool,
                 experts: Replicas | None = None, momentum: float = 0.95):
        from torch.distributed.device_mesh import DeviceMesh
        from torch.distributed.fsdp import fully_shard
        name_of = {id(p): name for name, p in model.named_parameters()}
        group_names = [[name_of[id(p)] for p in group["params"]] for group in groups]
        self.experts, world = experts, dist.get_world_size()
        if experts is not None:
            # Each routed expert is sharded over its copies only, and its summed gradient divided by the whole world
            # (FSDP's default, the mean over its mesh, would count only the copies' share of the tokens).
            copies = DeviceMesh.from_group(experts.group, "cuda" if torch.cuda.is_available() else "cpu")
            for moe in model.moe_layers():
                for expert in moe.experts.values():
                    fully_shard(expert, mesh=copies)
                    expert.set_gradient_divide_factor(world)
                    # gloo has no PREMUL_SUM: a plain sum, then the division. (Not on a mesh of one: torch 2.13's
                    # FSDP divides twice there, once when it skips the reduce-scatter and once after it.)
                    expert.set_force_sum_reduction_for_comms(experts.size > 1)
        for block in model.blocks():
            fully_shard(block)
        fully_shard(model)
        self.model, self.rank, self.world = model, dist.get_rank(), world
        self.params = [p for p in model.parameters() if p.requires_grad]
        # fully_shard replaced the parameters by DTensors: the same groups, found again by name.
        sharded = dict(model.named_parameters())
        groups = [{**group, "params": [sharded[name] for name in names]} for group, names in zip(groups, group_names)]
        self.optimizer = torch.optim.AdamW([g for g in groups if g["params"] and not g.get("muon")], lr=lr,
                                           betas=betas, fused=fused)
        # Muon: each matrix's momentum on its local rows, and the rank of its mesh that orthogonalises it.
        self.muon = [(p, g["weight_decay"]) for g in groups if g.get("muon") for p in g["params"]]
        self.muon_state = {id(p): torch.zeros_like(p.to_local()) for p, _ in self.muon}
        self.momentum, self.owners = momentum, {}
        for mesh in dict.fromkeys(p.device_mesh for p, _ in self.muon):
            mine = [p for p, _ in self.muon if p.device_mesh is mesh]
            self.owners |= dict(zip(map(id, mine), assign_owners([p.numel() for p in mine], mesh.size())))

    def set_sync(self, sync: bool) -> None:
        """FSDP2 reduce-scatters every micro-batch by default, as stage 3 does: nothing to decide."""

    def backward(self, loss: torch.Tensor) -> None:
        try:
            loss.backward()
        except RuntimeError as e:
            raise lost_a_rank(e) from None

    def step(self, lr: float, grad_clip: float, scaler: torch.amp.GradScaler) -> torch.Tensor:
        scaler.unscale_(self.optimizer)
        # The global norm from the local shards: every element of every parameter lives on exactly one rank (the
        # experts' too, sharded over their copies, different experts in each place of the group), so one all-reduce
        # of the squared shards gives it. clip_grad_norm_ cannot mix DTensors of two meshes.
        grads = [local_tensor(p.grad) for p in self.params if p.grad is not None]
        sum_sq = torch.stack([g.float().pow(2).sum() for g in grads]).sum()
        _wait(dist.all_reduce(sum_sq, async_op=True))
        norm = sum_sq.sqrt()
        if grad_clip > 0:  # as clip_grad_norm_
            coef = torch.clamp(grad_clip / (norm + 1e-6), max=1.0)
            for g in grads:
                g.mul_(coef)
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        scaler.step(self.optimizer)
        scaler.update()
        for p, weight_decay in self.muon:
            self._muon_step(p, weight_decay, lr)
        self.optimizer.zero_grad(set_to_none=True)
        return norm

    @torch.no_grad()
    def _muon_step(self, p, weight_decay: float, lr: float) -> None:
        """Engine._muon_step on one FSDP2 matrix, DTensor doing the collectives: full_tensor() all-gathers the rows
        of its momentum, and the owner's update (zeros on the others) as a Partial DTensor, a sum still pending,
        redistributed to FSDP2's row sharding is the reduce-scatter."""
        from torch.distributed.tensor import DTensor, Partial
        mesh = p.device_mesh
        grad = local_tensor(p.grad) if p.grad is not None else torch.zeros_like(self.muon_state[id(p)])
        look_ahead = nesterov_momentum(grad, self.muon_state[id(p)], self.momentum)
        whole = DTensor.from_local(look_ahead, mesh, p.placements, shape=p.shape, stride=p.stride()).full_tensor()
        mine = orthogonalised_update(whole) if self.owners[id(p)] == mesh.get_local_rank() else torch.zeros_like(whole)
        mine = DTensor.from_local(mine, mesh, [Partial()]).redistribute(mesh, p.placements).to_local()
        p.grad = None
        p.to_local().mul_(1 - lr * weight_decay).add_(mine, alpha=-lr)

    def comm_stats(self) -> dict:
        return {"comm_bytes": None, "comm_wait_s": None}  # inside FSDP2, not counted here

    def theory_bytes(self, micro_batches: int) -> float:
        def ring_share(params):
            return sum(p.numel() * p.element_size() * (p.device_mesh.size() - 1) / p.device_mesh.size() for p in params)
        return 3 * micro_batches * ring_share(self.params) + 2 * ring_share([p for p, _ in self.muon])

    def model_state_dict(self) -> dict:
        state = {k: v.full_tensor() if hasattr(v, "full_tensor") else v for k, v in self.model.state_dict().items()}
        return gather_experts(state, self.experts, self.rank) if self.experts else state

    def owned_pieces(self, saving: bool = False):
        """As Engine.owned_pieces (FSDP2 shards everything). FSDP2 gives the r-th rank of a parameter's mesh the rows
        of torch.chunk(p, mesh size)[r], that is ceil(rows / size) rows from row r * ceil(rows / size): one piece
        per parameter, at offset 0."""
        for name, p in self.model.named_parameters():
            if not p.requires_grad:  # frozen (LoRA's base): no AdamW state
                continue
            rows, size, r = p.shape[0], p.device_mesh.size(), p.device_mesh.get_local_rank()
            per_row, chunk = p.numel() // rows, -(-rows // size)
            first, last = min(r * chunk, rows), min((r + 1) * chunk, rows)
            if first < last:
                yield p, name, first * per_row, last * per_row, 0
