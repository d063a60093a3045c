"""parallel.py: every ZeRO stage computes the step one process computes, holds 1/N of what it shards, resumes
at any world size, and fails clearly. The equality tests run train.py end to end under torchrun; the memory
and unused-parameter checks run this file itself as a torchrun script (the __main__ part at the bottom),
which checks every stage in one launch against plain torch.optim.AdamW (and torch.optim.Muon) on the whole batch in
the same process."""

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time

import pytest
import torch
import torch.nn as nn

from checkpoint import load_model
from test_train import SFT, ROOT, TINY, assert_same_weights, chat_data, run, step_losses, weights  # noqa: F401

TORCHRUN = (sys.executable, "-m", "torch.distributed.run", "--standalone")
MLA_MOE = ["--attn=mla", "--kv_lora_rank=16", "--qk_nope_head_dim=8", "--qk_rope_head_dim=4", "--v_head_dim=8",
           "--n_routed_experts=4", "--num_experts_per_tok=2", "--n_group=2", "--topk_group=1", "--moe_inter_dim=16",
           "--bias_update_rate=0.01", "--balance_loss_coef=0.01"]


def torchrun(n):
    return (*TORCHRUN, f"--nproc_per_node={n}")


def test_every_stage_matches_one_process_and_stage_3_matches_fsdp2(tmp_path, prepared_data):
    # MLA and MoE, accumulation, a clip tight enough to act, weight decay, buckets small enough to make many.
    # The expert biases move after every step from token counts summed over the ranks, so they (and with them
    # the routing of the next step) must come out the same as in one process. eval_iters=3 does not divide among 2
    # ranks: one rank runs a forward it does not count (so stage 3's gathers stay in step), and the evaluation is
    # of the same 3 x batch_size windows as in one process.
    common = [*TINY, *MLA_MOE, f"--data_dir={prepared_data}", "--max_iters=3", "--eval_interval=3",
              "--gradient_accumulation_steps=4", "--grad_clip=0.5", "--bucket_mb=0.02", "--eval_iters=3"]
    run([*common, f"--out_dir={tmp_path}/one"])
    one = weights(tmp_path / "one")
    steps = one["layers.1.ffn.gate.bias"] / 0.01  # each update moves a bias by -1, 0 or +1 times the rate
    assert steps.abs().sum() > 0 and torch.allclose(steps, steps.round(), atol=1e-4) and steps.abs().max() <= 3
    for name, args in [("zero0", ["--zero_stage=0"]), ("zero1", ["--zero_stage=1"]), ("zero2", ["--zero_stage=2"]),
                       ("zero3", ["--zero_stage=3"]), ("fsdp2", ["--parallel=fsdp2"])]:
        run([*common, *args, f"--out_dir={tmp_path}/{name}"], launcher=torchrun(2))
        assert_same_weights(one, weights(tmp_path / name), tol=1e-6)
        assert step_losses(tmp_path / name) == pytest.approx(step_losses(tmp_path / "one"), abs=1e-6)
        with open(tmp_path / "one" / "metrics.jsonl") as f, open(tmp_path / name / "metrics.jsonl") as g:
            first, here = json.loads(f.readline()), json.loads(g.readline())  # the evaluation before any step
        for key in ("train_loss", "val_loss", "train_bpb", "val_bpb"):
            assert here[key] == pytest.approx(first[key], rel=1e-12, abs=0), (name, key)
    assert_same_weights(weights(tmp_path / "zero3"), weights(tmp_path / "fsdp2"), tol=1e-6)
    for stage in range(4):
        with open(tmp_path / f"zero{stage}" / "metrics.jsonl") as f:
            records = [r for r in map(json.loads, f) if "loss" in r]
        assert len(records) == 3 and all(len(r["expert_load_max_over_mean"]) == 1 for r in records)
        for r in records:  # bytes sent against the ZeRO paper's count; padding adds < 1 KB here
            if stage < 3:
                assert r["comm_bytes_theory"] <= r["comm_bytes"] < r["comm_bytes_theory"] + 4096
            else:  # the root (embedding, head) is gathered once per micro-batch, not twice
                assert 0.5 * r["comm_bytes_theory"] < r["comm_bytes"] <= r["comm_bytes_theory"] + 4096
            assert r["comm_wait_s"] >= 0


def test_muon_on_two_ranks_matches_one_process_and_an_fsdp2_run_resumes_in_one(tmp_path, prepared_data):
    # Distributed Muon: the momentum sharded as AdamW's moments are, the whole matrices gathered, each rank
    # orthogonalising its share of them. Its checkpoint holds the momentum as pieces of the flattened matrices, so
    # FSDP2's run on 2 ranks continues in one process with the handwritten engine.
    common = [*TINY, f"--data_dir={prepared_data}", "--optimizer=muon", "--eval_interval=2", "--max_iters=4",
              "--gradient_accumulation_steps=2", "--grad_clip=0.5"]
    result = run([*common, f"--out_dir={tmp_path}/one"])
    assert "Muon: 14 matrices" in result.stdout  # 2 layers x (wq, wk, wv, wo, w1, w2, w3); the tied wte on AdamW
    one = weights(tmp_path / "one")
    for name, args in (("zero1", ["--zero_stage=1"]), ("zero3", ["--zero_stage=3"])):
        run([*common, *args, f"--out_dir={tmp_path}/{name}"], launcher=torchrun(2))
        assert_same_weights(one, weights(tmp_path / name), tol=1e-6)
        assert step_losses(tmp_path / name) == pytest.approx(step_losses(tmp_path / "one"), abs=1e-6)
    with open(tmp_path / "zero1" / "metrics.jsonl") as f:  # Muon's gathers and scatters add one all-reduce's bytes
        steps = [r for r in map(json.loads, f) if "loss" in r]
    assert len(steps) == 4
    assert all(r["comm_bytes_theory"] <= r["comm_bytes"] < r["comm_bytes_theory"] + 4096 for r in steps)
    run([*common, "--parallel=fsdp2", "--max_iters=2", f"--out_dir={tmp_path}/fsdp2"], launcher=torchrun(2))
    run([*common, "--init_from=resume", f"--out_dir={tmp_path}/fsdp2"])
    assert_same_weights(one, weights(tmp_path / "fsdp2"), tol=1e-6)
    assert step_losses(tmp_path / "fsdp2") == pytest.approx(step_losses(tmp_path / "one"), abs=1e-6)
    result = run([*TINY, f"--data_dir={prepared_data}", "--init_from=resume", f"--out_dir={tmp_path}/one",
                  "--max_iters=6"], check=False)
    assert result.returncode == 1 and "resume: optimizer='adamw' here but 'muon'" in result.stderr


def test_a_hybrid_with_linear_attention_at_stage_3_matches_one_process(tmp_path, prepared_data):
    # Gated DeltaNet's parameters (a 3-d conv weight, per-head decays) gathered, freed and sharded like any other.
    common = [*TINY, "--full_attention_interval=2", f"--data_dir={prepared_data}", "--max_iters=3",
              "--eval_interval=3", "--gradient_accumulation_steps=2"]
    run([*common, f"--out_dir={tmp_path}/one"])
    run([*common, "--zero_stage=3", f"--out_dir={tmp_path}/zero3"], launcher=torchrun(2))
    one = weights(tmp_path / "one")
    assert "layers.0.attn.A_log" in one and "layers.1.attn.wq.weight" in one
    assert_same_weights(one, weights(tmp_path / "zero3"), tol=1e-6)
    assert step_losses(tmp_path / "zero3") == pytest.approx(step_losses(tmp_path / "one"), abs=1e-6)


@pytest.mark.parametrize("args, message", [
    (["--zero_stage=4"], "zero_stage must be 0, 1, 2 or 3, got 4"),
    (["--parallel=deepspeed"], "parallel must be 'handwritten' or 'fsdp2', got 'deepspeed'"),
    (["--parallel=fsdp2"], "parallel='fsdp2' needs a process group"),
    (["--parallel=fsdp2", "--zero_stage=2"], "zero_stage is for parallel='handwritten'"),
    (["--dtype=float16", "--zero_stage=1"], "dtype=float16 needs the handwritten zero_stage=0"),
    (["--compile=True", "--zero_stage=3"], "compile=True does not go with zero_stage=3"),
    (["--expert_parallel=2", "--n_routed_experts=4"], "expert_parallel=2 must divide the number of processes (1)"),
    (["--expert_parallel=0"], "expert_parallel must be positive, got 0"),
])
def test_bad_parallel_settings_are_one_clear_error(args, message):
    result = run(args, check=False)
    assert result.returncode == 1 and message in result.stderr and "Traceback" not in result.stderr


def test_checkpoint_of_two_ranks_resumes_on_three_and_on_one(tmp_path, prepared_data):
    common = [*TINY, f"--data_dir={prepared_data}", "--eval_interval=3", "--gradient_accumulation_steps=6",
              "--bucket_mb=0.02"]
    run([*common, f"--out_dir={tmp_path}/straight", "--max_iters=6"])  # every stage steps as one process does
    run([*common, "--zero_stage=2", f"--out_dir={tmp_path}/saved", "--max_iters=3"], launcher=torchrun(2))
    assert sorted(n for n in os.listdir(tmp_path / "saved") if n.startswith("optimizer.")) == \
        ["optimizer.3.0-of-2.pt", "optimizer.3.1-of-2.pt"]
    # Other world sizes and other stages (FSDP2's resume: the expert-parallel test): the shards are pieces of the
    # flat parameters, not of buckets.
    for resumed, args, launcher in [("on3", ["--zero_stage=3"], torchrun(3)), ("on1", ["--zero_stage=0"], (sys.executable,))]:
        shutil.copytree(tmp_path / "saved", tmp_path / resumed)
        run([*common, *args, f"--out_dir={tmp_path}/{resumed}", "--max_iters=6", "--init_from=resume"], launcher=launcher)
    straight = step_losses(tmp_path / "straight")
    for resumed in ("on3", "on1"):
        losses = step_losses(tmp_path / resumed)
        assert all(abs(losses[i] - straight[i]) < 1e-5 for i in (4, 5, 6)), (resumed, losses, straight)
    # ckpt.pt holds the whole model whatever the stage: sample.py loads a stage-3 checkpoint of 3 ranks as it is.
    model, _ = load_model(str(tmp_path / "on3"), "cpu")
    assert_same_weights(model.state_dict(), weights(tmp_path / "on3"), tol=0)
    # A missing or torn shard is one sentence, not a traceback.
    os.remove(tmp_path / "saved" / "optimizer.3.1-of-2.pt")
    result = run([*common, f"--out_dir={tmp_path}/saved", "--max_iters=6", "--init_from=resume"], check=False)
    assert result.returncode == 1 and "optimizer.3.1-of-2.pt is missing" in result.stderr and "Traceback" not in result.stderr
    (tmp_path / "saved" / "optimizer.3.1-of-2.pt").write_bytes(b"torn")
    result = run([*common, f"--out_dir={tmp_path}/saved", "--max_iters=6", "--init_from=resume"], check=False)
    assert result.returncode == 1 and "cannot read" in result.stderr and "Traceback" not in result.stderr


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_nodes_over_loopback_match_one_process(tmp_path, prepared_data):
    common = [*TINY, f"--data_dir={prepared_data}", "--max_iters=2", "--eval_interval=2", "--gradient_accumulation_steps=2",
              "--zero_stage=1"]
    run([*common, f"--out_dir={tmp_path}/one"])
    port = free_port()
    logs = [open(tmp_path / f"node{node}.log", "w") for node in (0, 1)]
    nodes = [subprocess.Popen([*TORCHRUN[:-1], "--nnodes=2", f"--node_rank={node}", "--nproc_per_node=1", "--rdzv_backend=c10d",
                               f"--rdzv_endpoint=127.0.0.1:{port}", os.path.join(ROOT, "train.py"), *common,
                               f"--out_dir={tmp_path}/two"], cwd=ROOT, stdout=logs[node], stderr=subprocess.STDOUT)
             for node in (0, 1)]
    for node, log in zip(nodes, logs):
        assert node.wait(timeout=120) == 0, open(log.name).read()[-3000:]
    assert_same_weights(weights(tmp_path / "one"), weights(tmp_path / "two"), tol=1e-6)


def launch_by_hand(args, world_size, port, cwds=None):
    """The ranks as plain processes, as a cluster scheduler starts them: no torchrun agent tears the group down.
    cwds: each rank's working folder (as on machines of their own), ROOT by default."""
    env = dict(os.environ, MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), WORLD_SIZE=str(world_size))
    return [subprocess.Popen([sys.executable, os.path.join(ROOT, "train.py"), *args[rank]], cwd=cwds[rank] if cwds else ROOT,
                             text=True, env=dict(env, RANK=str(rank), LOCAL_RANK=str(rank)), stdout=subprocess.PIPE,
                             stderr=subprocess.PIPE)
            for rank in range(world_size)]


@pytest.mark.parametrize("failure", ["dies", "hangs"])
def test_a_rank_that_dies_or_hangs_makes_the_other_exit_clearly(tmp_path, prepared_data, failure):
    args = [*TINY, f"--data_dir={prepared_data}", f"--out_dir={tmp_path}/out", "--max_iters=100000", "--eval_interval=100000",
            "--gradient_accumulation_steps=2", "--zero_stage=2", "--dist_timeout_s=5"]
    rank0, rank1 = launch_by_hand([args, args], 2, free_port())
    try:
        metrics = tmp_path / "out" / "metrics.jsonl"
        deadline = time.time() + 60
        while not (metrics.exists() and len(metrics.read_text().splitlines()) >= 3) and time.time() < deadline:
            time.sleep(0.2)
        os.kill(rank1.pid, signal.SIGKILL if failure == "dies" else signal.SIGSTOP)
        t0 = time.time()
        assert rank0.wait(timeout=30) == 1
        assert time.time() - t0 < 5 + 10
        stderr = rank0.stderr.read()
        assert "rank 0: a collective failed, so another rank died or stopped answering" in stderr and "Traceback" not in stderr
    finally:
        for p in (rank0, rank1):
            if p.poll() is None:
                p.kill()
            p.wait()


def test_ranks_with_different_configs_refuse_to_start(tmp_path, prepared_data):
    args = [*TINY, f"--data_dir={prepared_data}", f"--out_dir={tmp_path}/out", "--max_iters=2"]
    ranks = launch_by_hand([args, [*args, "--learning_rate=1e-2"]], 2, free_port())
    for p in ranks:
        assert p.wait(timeout=60) == 1
        stderr = p.stderr.read()
        assert "the ranks disagree on the config" in stderr and "Traceback" not in stderr


def test_ranks_with_the_same_config_but_different_data_refuse_to_start(tmp_path, prepared_data):
    # The same relative data_dir on two "machines" whose folders hold different corpora.
    for rank in (0, 1):
        shutil.copytree(prepared_data, tmp_path / f"node{rank}" / "data")
    meta = tmp_path / "node1" / "data" / "meta.json"
    meta.write_text(meta.read_text().replace('"seed"', '"note": "another corpus", "seed"'))
    args = [*TINY, "--data_dir=data", f"--out_dir={tmp_path}/out", "--max_iters=2", "--gradient_accumulation_steps=2"]
    for p in launch_by_hand([args, args], 2, free_port(), cwds=[tmp_path / "node0", tmp_path / "node1"]):
        assert p.wait(timeout=60) == 1
        stderr = p.stderr.read()
        assert "the ranks disagree on the data: meta.json is" in stderr and "Traceback" not in stderr


def test_distillation_on_two_ranks_matches_one_process(tmp_path, trained_ckpt, chat_data):
    # Each rank runs its own copy of the frozen teacher on its micro-batches, weighted by their share of the global
    # batch's targets like SFT's loss; the logged terms are summed over the ranks. One process takes the whole
    # batch of 4 conversations' windows at once, each of two ranks 2 of them.
    common = [*SFT, f"--data_dir={chat_data}", f"--init_from={trained_ckpt}", "--objective=distill",
              f"--teacher={trained_ckpt}", "--distill_alpha=0.2", "--distill_alpha_final=0.8",
              "--distill_temperature=2.0"]
    run([*common, f"--out_dir={tmp_path}/one", "--batch_size=4"])
    run([*common, f"--out_dir={tmp_path}/two", "--batch_size=2", "--gradient_accumulation_steps=2", "--zero_stage=3"],
        launcher=torchrun(2))
    assert_same_weights(weights(tmp_path / "one"), weights(tmp_path / "two"), tol=1e-6)
    logs = [[r for r in map(json.loads, open(tmp_path / name / "metrics.jsonl")) if "kl" in r] for name in ("one", "two")]
    assert len(logs[0]) == 3
    for a, b in zip(*logs):
        assert (a["distill_alpha"], a["loss"], a["ce"], a["kl"]) == pytest.approx(
            (b["distill_alpha"], b["loss"], b["ce"], b["kl"]), abs=1e-6)


def test_lora_on_two_ranks_matches_one_process_and_keeps_the_base_out_of_the_engine(tmp_path, trained_ckpt, chat_data):
    # Only the adapters are bucketed, reduced, sharded and stepped; the frozen base stays whole on every rank. The
    # packed conversations' loss is the mean over every target of the global batch, whichever rank holds them.
    common = [*SFT, "--lora_rank=4", "--lora_alpha=8.0", "--learning_rate=1e-2", f"--data_dir={chat_data}",
              f"--init_from={trained_ckpt}", "--batch_size=2", "--gradient_accumulation_steps=2"]
    run([*common, f"--out_dir={tmp_path}/one"])
    for name, args in [("zero2", ["--zero_stage=2"]), ("zero3", ["--zero_stage=3"]), ("fsdp2", ["--parallel=fsdp2"])]:
        run([*common, f"--out_dir={tmp_path}/{name}", *args], launcher=torchrun(2))
        assert_same_weights(weights(tmp_path / "one"), weights(tmp_path / name), tol=1e-6)
        assert step_losses(tmp_path / name) == pytest.approx(step_losses(tmp_path / "one"), abs=1e-6)
    shards = [torch.load(tmp_path / "zero2" / f"optimizer.3.{r}-of-2.pt", weights_only=True) for r in (0, 1)]
    names = {name for shard in shards for name in shard["pieces"]}
    assert names == set(weights(tmp_path / "one")), "AdamW state for exactly the adapters"


def test_expert_parallel_matches_one_process_at_every_stage_and_resumes_at_other_sizes(tmp_path, prepared_data):
    # Four ranks in two expert-parallel groups of two: each rank holds 2 of the 4 routed experts, and each expert
    # has two copies (ranks r and r + 2) that sum its gradient. The routing, the bias updates from the global load
    # and the clip on the global norm all come out as in one process.
    common = [*TINY, *MLA_MOE, f"--data_dir={prepared_data}", "--eval_interval=3", "--gradient_accumulation_steps=4",
              "--grad_clip=0.5", "--bucket_mb=0.02"]
    run([*common, f"--out_dir={tmp_path}/one", "--max_iters=3"])
    one = weights(tmp_path / "one")
    for name, args in [("zero2", ["--zero_stage=2"]), ("zero3", ["--zero_stage=3"]), ("fsdp2", ["--parallel=fsdp2"])]:
        run([*common, *args, "--expert_parallel=2", f"--out_dir={tmp_path}/{name}", "--max_iters=3"],
            launcher=torchrun(4))
        assert_same_weights(one, weights(tmp_path / name), tol=1e-6)  # the checkpoint holds every expert
        assert step_losses(tmp_path / name) == pytest.approx(step_losses(tmp_path / "one"), abs=1e-6)
    # Stage 2's AdamW state: rank r holds slices of its own experts 2 (r % 2) and 2 (r % 2) + 1 only, and with its
    # copy r + 2 all of them.
    held = []
    for r in range(4):
        shard = torch.load(tmp_path / "zero2" / f"optimizer.3.{r}-of-4.pt", weights_only=True)
        held.append({name.split(".experts.")[1].split(".")[0] for name in shard["pieces"] if ".experts." in name})
    for r in (0, 1):
        assert held[r] | held[r + 2] == {str(2 * r), str(2 * r + 1)}, held
    with open(tmp_path / "zero2" / "metrics.jsonl") as f:  # the experts' bytes count over their two copies
        records = [r for r in map(json.loads, f) if "loss" in r]
    assert all(r["comm_bytes_theory"] <= r["comm_bytes"] < r["comm_bytes_theory"] + 4096 for r in records)
    # The rows the exchanges sent are those the routing implies (4 trips of each pair sent away), to the byte.
    assert all(r["expert_bytes"] == r["expert_bytes_theory"] > 0 and r["expert_wait_dispatch_s"] >= 0 and
               r["expert_wait_combine_s"] >= 0 and r["expert_wait_backward_s"] > 0 for r in records)
    # The stage-3 checkpoint of 4 ranks resumed in one process and by FSDP2 on two ranks holding 2 experts each (one
    # copy): both continue as the one-process run does.
    shutil.copytree(tmp_path / "one", tmp_path / "straight")
    run([*common, f"--out_dir={tmp_path}/straight", "--max_iters=6", "--init_from=resume"])
    for resumed, args, launcher in [("on1", [], (sys.executable,)),
                                    ("on2", ["--expert_parallel=2", "--parallel=fsdp2"], torchrun(2))]:
        shutil.copytree(tmp_path / "zero3", tmp_path / resumed)
        run([*common, *args, f"--out_dir={tmp_path}/{resumed}", "--max_iters=6", "--init_from=resume"],
            launcher=launcher)
        losses, straight = step_losses(tmp_path / resumed), step_losses(tmp_path / "straight")
        assert all(abs(losses[i] - straight[i]) < 1e-5 for i in (4, 5, 6)), (resumed, losses, straight)


def run_this_file(ranks, *mode) -> str:
    """This file as a torchrun script (its __main__ part) on `ranks` processes: their stdout."""
    env = dict(os.environ, PYTHONPATH=ROOT)
    result = subprocess.run([*torchrun(ranks), os.path.abspath(__file__), *mode], cwd=ROOT, env=env,
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return result.stdout


def test_expert_exchange_sends_rows_to_their_experts_and_back_with_their_gradients():
    # Two ranks, two of four experts each, different numbers of rows, an expert that gets none: outputs, gradients of
    # the rows, and each expert's gradient (the sum over every rank's rows routed to it) equal one process's.
    assert run_this_file(2, "experts").count("experts ok") == 2


def test_shortcut_moe_over_two_ranks_is_one_process_and_its_overlap_changes_nothing():
    # LongCat-Flash layers with zero experts, the routed experts split over 2 ranks: logits and every gradient equal
    # the whole model's on each rank (experts' summed over the ranks), and the asynchronous schedule (dense compute
    # while rows travel) gives exactly what waiting at once gives.
    assert run_this_file(2, "shortcut").count("shortcut ok") == 2


def test_memory_and_unused_parameters_at_every_stage_with_three_ranks_under_adamw_and_muon():
    # Muon: each rank orthogonalises its share of the matrices, and the sharded stages gather and scatter them.
    out = run_this_file(3)
    assert out.count("stage ok adamw") == out.count("stage ok muon") == 3 * 4


# ---- the torchrun script: every stage against torch's AdamW and Muon, with odd sizes and a parameter that sometimes
# gets no gradient
class ToyBlock(nn.Module):
    def __init__(self, dim):
        super().__init__()
        self.norm_gain = nn.Parameter(torch.ones(dim))
        self.mix = nn.Linear(dim, dim)  # 7 x 7 + 7: odd sizes, so every bucket needs padding for 3 ranks
        self.rare = nn.Linear(dim, dim, bias=False)  # used only by batches whose first value is positive

    def forward(self, x):
        y = torch.tanh(self.mix(x * self.norm_gain))
        self.used_rare = bool(x[0, 0, 0] > 0)
        return x + (self.rare(y) if self.used_rare else 0)


class Toy(nn.Module):
    def __init__(self, dim=7, vocab=13, n_layer=3):
        super().__init__()
        self.wte = nn.Embedding(vocab, dim)
        self.layers = nn.ModuleList(ToyBlock(dim) for _ in range(n_layer))
        self.lm_head = nn.Linear(dim, vocab, bias=False)
        self.lm_head.weight = self.wte.weight  # tied, as in model.py

    def blocks(self):
        return list(self.layers)

    def forward(self, idx):
        x = self.wte(idx)
        for block in self.layers:
            x = block(x)
        return self.lm_head(x)


def held_bytes(tensors):
    """Bytes of the distinct storages behind tensors (views of one flat buffer count once)."""
    storages = {t.untyped_storage().data_ptr(): t.untyped_storage().nbytes() for t in tensors if t is not None}
    return sum(storages.values())


def check_every_stage():
    import torch.distributed as dist

    import parallel

    parallel.init_distributed(60)
    for optimizer in ("adamw", "muon"):
        check_every_stage_with(optimizer)
    parallel.destroy()


def groups_of(params, optimizer):
    """As Transformer.param_groups: decay on matrices; with Muon, the blocks' matrices (not the embedding) first."""
    matrices, others = [p for p in params if p.dim() >= 2], [p for p in params if p.dim() < 2]
    adamw = [{"params": matrices, "weight_decay": 0.1}, {"params": others, "weight_decay": 0.0}]
    if optimizer == "adamw":
        return adamw
    maps = [p for p in matrices if p.shape[0] != 13]  # the embedding is the one matrix with the vocabulary's rows
    adamw[0]["params"] = [p for p in matrices if p.shape[0] == 13]
    return [{"params": maps, "weight_decay": 0.1, "muon": True}, *adamw]


def reference_optimizers(params, optimizer):
    """torch's own optimizers on the whole batch: AdamW, or torch.optim.Muon at Moonlight's scale (its Newton-Schulz
    in bfloat16 replaced by muon.py's in float32, which test_muon checks against the SVD) beside AdamW."""
    groups = groups_of(params, optimizer)
    if optimizer == "adamw":
        return [torch.optim.AdamW(groups, lr=1e-2)]
    import torch.optim._muon as torch_muon
    from muon import NS_COEFFICIENTS, newton_schulz

    def ours(grad, coefficients, steps, eps):
        assert tuple(coefficients) == NS_COEFFICIENTS
        return newton_schulz(grad, steps, eps)

    torch_muon._zeropower_via_newtonschulz = ours
    return [torch.optim.Muon(groups[0]["params"], lr=1e-2, weight_decay=0.1, momentum=0.95, nesterov=True,
                             adjust_lr_fn="match_rms_adamw"), torch.optim.AdamW(groups[1:], lr=1e-2)]


def check_every_stage_with(optimizer_name):
    import torch.distributed as dist

    import parallel

    rank, world = dist.get_rank(), dist.get_world_size()
    torch.manual_seed(0)
    batches = [torch.randint(0, 13, (world * 2, 5)) for _ in range(3)]  # 3 steps, 2 micro-batches per rank
    batches[1][:, 0] = 0  # make sure some micro-batches skip `rare` (token 0's embedding is flipped below)

    def loss_of(model, idx):
        return nn.functional.cross_entropy(model(idx[:, :-1]).flatten(0, 1), idx[:, 1:].flatten())

    def fresh():
        torch.manual_seed(1)
        model = Toy()
        with torch.no_grad():
            model.wte.weight[0] = -model.wte.weight[0].abs()
        return model

    reference = fresh()
    params = list(reference.parameters())
    optimizers = reference_optimizers(params, optimizer_name)
    mixed = 0  # steps where some ranks use a block's `rare` and others do not
    for idx in batches:
        used = []
        for micro in range(2 * world):
            (loss_of(reference, idx[micro:micro + 1]) / (2 * world)).backward()
            used.append([block.used_rare for block in reference.layers])
        by_rank = [[any(used[m * world + r][i] for m in range(2)) for r in range(world)] for i in range(3)]
        mixed += sum(len(set(ranks)) == 2 for ranks in by_rank)
        for p in params:  # a parameter no micro-batch used counts as a zero gradient, as in the engine
            if p.grad is None:
                p.grad = torch.zeros_like(p)
        torch.nn.utils.clip_grad_norm_(params, 0.05)
        for optimizer in optimizers:
            optimizer.step()
            optimizer.zero_grad()
    assert mixed > 0
    total = sum(p.numel() for p in params) * 4
    on_muon = sum(p.numel() for g in groups_of(params, optimizer_name) if g.get("muon") for p in g["params"]) * 4
    scaler = torch.amp.GradScaler("cpu", enabled=False)

    for stage in range(4):
        model = fresh()
        engine = parallel.Engine(model, groups_of(list(model.parameters()), optimizer_name), stage, lr=1e-2,
                                 betas=(0.9, 0.999), fused=False, bucket_mb=0.0005)
        block_bytes = sum(p.numel() * 4 for p in model.layers[0].parameters())
        in_forward = []
        for block in model.layers:
            block.register_forward_pre_hook(lambda m, a: in_forward.append(held_bytes([b.flat for b in engine.buckets])))
        for idx in batches:
            for micro in range(2):
                engine.set_sync(micro == 1)
                row = micro * world + rank  # the same rows of the global batch as the reference, split over ranks
                engine.backward(loss_of(model, idx[row:row + 1]) / 2)
                if stage >= 2:  # no full gradient survives the backward, only this rank's slices
                    assert all(p.grad is None for p in model.parameters()) and all(b.staging is None for b in engine.buckets)
                    assert held_bytes([b.shard.grad for b in engine.buckets]) <= total / world + 4 * len(engine.buckets)
            engine.step(1e-2, 0.05, scaler)
        moments = [t for s in engine.optimizer.state.values() for t in (s["exp_avg"], s["exp_avg_sq"])]
        moments += list(engine.muon_state.values())  # Muon: one momentum per element, AdamW two moments
        expected_optimizer = (2 * (total - on_muon) + on_muon) / (world if stage > 0 else 1)
        assert expected_optimizer <= held_bytes(moments) <= expected_optimizer + 8 * len(engine.buckets)
        if stage == 3:
            # Between steps only the slices exist; inside the forward at most the root and two blocks are whole.
            assert held_bytes([b.flat for b in engine.buckets]) == 0
            assert held_bytes([b.shard for b in engine.buckets]) <= total / world + 4 * len(engine.buckets)
            root_bytes = sum(b.flat.numel() * 4 for b in engine.gather.units[-1].buckets)
            assert max(in_forward) <= root_bytes + 2 * block_bytes + 64
        state = engine.model_state_dict()  # at stage 3 only rank 0 gets it (the one that saves it)
        assert state or (stage == 3 and rank != 0)
        for name, p in reference.named_parameters() if state else []:
            assert torch.allclose(state[name], p.detach(), atol=1e-6, rtol=0), (stage, name, (state[name] - p).abs().max())
        print(f"stage ok {optimizer_name} {stage}", flush=True)


def check_expert_exchange():
    """Each rank routes its own rows among 4 linear experts; rank r holds experts 2r and 2r + 1. The reference is every
    expert held everywhere, each rank computing its own rows, the experts' gradients summed over the ranks."""
    import parallel

    parallel.init_distributed()
    rank = torch.distributed.get_rank()
    torch.manual_seed(0)
    weights = torch.randn(4, 6, 6, dtype=torch.float64)  # the same experts on every rank
    g = torch.Generator().manual_seed(10 + rank)
    n = 5 if rank == 0 else 9
    rows = torch.randn(n, 6, dtype=torch.float64, generator=g, requires_grad=True)
    experts = torch.randint(0, 3, (n,), generator=g)  # expert 3 (rank 1's second) gets no row from anyone
    weigh = torch.randn(n, 6, dtype=torch.float64, generator=g)

    everywhere = weights.clone().requires_grad_()
    expected = torch.einsum("nd,ned->ne", rows, everywhere[experts])
    (expected * weigh).sum().backward()
    expected_rows_grad, expert_grads = rows.grad.clone(), parallel.all_reduce_sum(everywhere.grad.clone())
    rows.grad = None

    local = weights[2 * rank:2 * rank + 2].clone().requires_grad_()
    order = experts.argsort(stable=True)
    exchange = parallel.ExpertExchange(2)
    exchange.send(rows[order], torch.bincount(experts, minlength=4))
    arrived, counts = exchange.receive()
    exchange.send_back(torch.cat([run @ w.T for run, w in zip(arrived.split(counts), local)]))
    back = exchange.receive_back()[torch.argsort(order)]
    (back * weigh).sum().backward()
    torch.testing.assert_close(back, expected, rtol=0, atol=1e-12)
    torch.testing.assert_close(rows.grad, expected_rows_grad, rtol=0, atol=1e-12)
    torch.testing.assert_close(local.grad, expert_grads[2 * rank:2 * rank + 2], rtol=0, atol=1e-12)
    assert rank == 0 or (counts[1] == 0 and torch.equal(local.grad[1], torch.zeros(6, 6, dtype=torch.float64)))
    print("experts ok", flush=True)
    parallel.destroy()


def check_shortcut_moe():
    import parallel
    from model import ModelConfig, Transformer

    parallel.init_distributed()
    rank = torch.distributed.get_rank()
    config = ModelConfig(vocab_size=64, block_size=16, n_layer=2, n_head=4, n_kv_head=2, n_embd=32,
                         n_routed_experts=4, n_shared_experts=1, num_experts_per_tok=3, zero_expert_num=2,
                         moe_inter_dim=16, scoring_func="softmax", norm_topk_prob=False, first_k_dense_replace=0,
                         moe_shortcut=True)
    torch.manual_seed(0)
    whole = Transformer(config).double().train()  # the same weights on both ranks
    idx = torch.randint(0, 64, (2, 12), generator=torch.Generator().manual_seed(rank))  # each rank its own batch
    whole(idx, idx)[1].backward()
    # An expert's gradient on its rank sums every rank's tokens: the whole model's, summed over the ranks.
    expected = {n: parallel.all_reduce_sum(p.grad.clone()) if ".experts." in n else p.grad.clone()
                for n, p in whole.named_parameters()}
    sharded = Transformer(config).double().train()
    sharded.load_state_dict(whole.state_dict())
    parallel.shard_experts(sharded, 2)
    results = []
    for overlap in (True, False):
        for moe in sharded.moe_layers():
            moe.exchange.overlap = overlap
        sharded.zero_grad()
        logits, loss = sharded(idx, idx)
        loss.backward()
        results.append((logits.detach(), {n: p.grad.clone() for n, p in sharded.named_parameters()}))
    (logits, grads), (logits_sync, grads_sync) = results
    assert torch.equal(logits, logits_sync) and all(torch.equal(grads[n], grads_sync[n]) for n in grads)
    torch.testing.assert_close(logits, whole(idx)[0], rtol=0, atol=1e-12)
    for name, grad in grads.items():
        torch.testing.assert_close(grad, expected[name], rtol=0, atol=1e-12, msg=name)
    assert {n.split(".experts.")[1].split(".")[0] for n in grads if ".experts." in n} == {str(2 * rank), str(2 * rank + 1)}
    stats = [moe.exchange.stats() for moe in sharded.moe_layers()]
    assert all(s["bytes"] > 0 and min(s["wait_s"].values()) >= 0 for s in stats)
    print("shortcut ok", flush=True)
    parallel.destroy()


if __name__ == "__main__":
    {"experts": check_expert_exchange, "shortcut": check_shortcut_moe}.get(sys.argv[1] if sys.argv[1:] else "",
                                                                          check_every_stage)()
