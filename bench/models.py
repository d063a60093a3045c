"""
bench/models.py: dense vs MoE vs MLA models of the same active parameters on the CPU, and our generation
against Hugging Face transformers' on the same weights.

    python bench/models.py            # a few minutes on 2 cores; prints a markdown table

Three models of cpu_demo's shape (4 layers, 256 wide, 4 heads, block 256, vocab 6,400), each with about
2.95M active parameters besides the embedding: dense (GQA, 2 kv heads, SwiGLU 704), MoE (the same attention,
8 routed experts of 176 of which 3 per token + 1 shared, after one dense layer) and MLA (DeepSeek head shapes
64 + 32 / 64, latents of 64 for keys and values and 96 for queries, dense SwiGLU). For each:
  - training tokens/s (fp32, batch 8 x 256 tokens, forward + backward + AdamW, the MoE bias update too) and
    the peak memory it adds to the process, each model trained in a fresh process of its own;
  - generation tokens/s with the KV cache at batch 1, greedy: a 16-token prompt and 200 new tokens;
  - the same with transformers' generate() on the model exported by export_hf.py, the ratio, and whether
    both produced the same tokens;
  - KV-cache bytes per token (MHA of the same width added for scale).
Then both generators once more on the dense model shrunk to 32 wide, where the matmuls cost next to nothing:
what a step costs besides them; and the floor under both: the dense model's matrix-vector products alone, and
how fast this machine streams weights through them as their total size grows past its share of the CPU cache.
--threads sets torch's threads (default: all cores).
The one idea: compare like with like. Same active parameters, same machine, ours and theirs in alternation,
best of five runs each (the machine is shared; the best run is the one least disturbed).
"""

import argparse
import json
import os
import subprocess
import sys
import sysconfig
import tempfile
import time

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
from export_hf import export  # noqa: E402
from model import KVCache, ModelConfig, Transformer  # noqa: E402
from tokenizer import train_tokenizer  # noqa: E402

SHAPE = dict(vocab_size=6400, block_size=256, n_layer=4, n_head=4, n_kv_head=2, n_embd=256)
MODELS = {
    "dense": {},
    "MoE": dict(n_routed_experts=8, num_experts_per_tok=3, n_shared_experts=1, moe_inter_dim=176),
    "MLA": dict(attn="mla", q_lora_rank=96, kv_lora_rank=64, qk_nope_head_dim=64, qk_rope_head_dim=32, v_head_dim=64),
}
BATCH, TRAIN_STEPS, PROMPT, NEW_TOKENS, RUNS = 8, 8, 16, 200, 5


# The dense model at 32 wide with a 64-token vocabulary: its matmuls cost next to nothing, so its generation
# speed measures what a step costs besides them (Python, kernel launches, cache and mask bookkeeping).
OVERHEAD_ONLY = dict(n_embd=32, vocab_size=64)


def make_model(name: str, **shape) -> Transformer:
    torch.manual_seed(0)
    return Transformer(ModelConfig(**{**SHAPE, **MODELS[name], **shape}))


def peak_rss_mb() -> float:
    """The process's peak resident memory so far (Linux's VmHWM; getrusage's ru_maxrss would include the
    parent's peak from before exec)."""
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("VmHWM")) / 1024


def train_worker(name: str) -> dict:
    """Runs in its own process: tokens/s of training steps and the peak RSS they add to it."""
    base = peak_rss_mb()
    model = make_model(name).train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    g = torch.Generator().manual_seed(0)
    times = []
    for step in range(TRAIN_STEPS + 2):  # the first two steps allocate the optimizer state: not timed
        x = torch.randint(0, SHAPE["vocab_size"], (BATCH, SHAPE["block_size"] + 1), generator=g)
        t0 = time.perf_counter()
        _, loss = model(x[:, :-1], x[:, 1:])
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if model.moe_layers():
            model.update_expert_bias(model.expert_load())
        times.append(time.perf_counter() - t0)
    tokens = BATCH * SHAPE["block_size"]
    return {"tokens_per_s": tokens / min(times[2:]), "peak_mb": peak_rss_mb() - base}


def best_generation_times(*generators) -> list[float]:
    """Best of RUNS timings of each generator, the runs interleaved so a disturbance hits them alike."""
    for generate in generators:
        generate(8)  # warm-up: first calls allocate and pick kernels
    best = [float("inf")] * len(generators)
    for _ in range(RUNS):
        for i, generate in enumerate(generators):
            t0 = time.perf_counter()
            generate(NEW_TOKENS)
            best[i] = min(best[i], time.perf_counter() - t0)
    return best


def small_tokenizer(work: str) -> str:
    """An export writes the tokenizer too; generation speed does not depend on which, so one of 512 pieces trained
    on three standard-library files (a second), once per work folder."""
    path = os.path.join(work, "tokenizer.model")
    if not os.path.exists(path):
        stdlib = sysconfig.get_paths()["stdlib"]
        texts = [open(os.path.join(stdlib, name), encoding="utf-8").read() for name in ("argparse.py", "typing.py", "inspect.py")]
        train_tokenizer(texts, 512, work)
    return path


def generation(name: str, work: str, **shape) -> dict:
    from transformers import AutoModelForCausalLM, logging

    logging.set_verbosity_error()
    model = make_model(name, **shape).eval()
    folder = os.path.join(work, f"{name}_{model.config.n_embd}")
    arch = export(model, small_tokenizer(work), folder)
    hf = AutoModelForCausalLM.from_pretrained(folder).eval()
    prompt = torch.randint(0, model.config.vocab_size, (1, PROMPT), generator=torch.Generator().manual_seed(1))
    outputs = {}

    def ours(n):
        outputs["ours"] = torch.stack(list(model.generate(prompt, n, temperature=0)), dim=1)

    def theirs(n):
        with torch.no_grad():
            out = hf.generate(prompt, max_new_tokens=n, do_sample=False, eos_token_id=None, pad_token_id=0)
        outputs["theirs"] = out[:, PROMPT:]

    ours_s, theirs_s = best_generation_times(ours, theirs)
    return {"arch": arch, "ours": NEW_TOKENS / ours_s, "theirs": NEW_TOKENS / theirs_s,
            "same_tokens": torch.equal(outputs["ours"], outputs["theirs"])}


def streaming_ms(weights: list[torch.Tensor], repeats: int = 20) -> float:
    """Best milliseconds of one pass of 1-token matrix-vector products over weights, in order, as a decode step
    makes them: after the first pass, each weight is read again only after all the others."""
    inputs = {w.size(1): torch.randn(1, 1, w.size(1)) for w in weights}
    best = float("inf")
    with torch.inference_mode():
        for _ in range(repeats):
            t0 = time.perf_counter()
            for w in weights:
                torch.nn.functional.linear(inputs[w.size(1)], w)
            best = min(best, time.perf_counter() - t0)
    return best * 1e3


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument("--train_worker", choices=list(MODELS), help=argparse.SUPPRESS)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    if args.train_worker:
        print(json.dumps(train_worker(args.train_worker)))
        return
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, fp32", file=sys.stderr)
    rows = []
    with tempfile.TemporaryDirectory() as work:
        for name in MODELS:
            # A fixed mmap threshold: glibc otherwise raises it after the first large free and keeps later
            # buffers on the heap, which made the peak depend on allocation order (+-40% run to run here).
            env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="65536")
            result = subprocess.run([sys.executable, __file__, f"--train_worker={name}", f"--threads={args.threads}"],
                                    capture_output=True, text=True, check=True, env=env)
            train = json.loads(result.stdout)
            gen = generation(name, work)
            model = make_model(name)
            rows.append((name, model, train, gen))
            print(f"{name}: done", file=sys.stderr)
        overhead = generation("dense", work, **OVERHEAD_ONLY)
    print("| model | parameters (active), without embedding | train tokens/s | train peak MB | "
          "generate tokens/s, ours | transformers | ratio | same tokens | KV cache bytes/token |")
    print("|---|---|---|---|---|---|---|---|---|")
    for name, model, train, gen in rows:
        params = f"{model.num_params() / 1e6:.2f}M ({model.num_params(active=True) / 1e6:.2f}M)"
        print(f"| {name} ({gen['arch'].removesuffix('ForCausalLM')}) | {params} | {train['tokens_per_s']:,.0f} | "
              f"{train['peak_mb']:,.0f} | {gen['ours']:,.0f} | {gen['theirs']:,.0f} | {gen['ours'] / gen['theirs']:.2f}x | "
              f"{'yes' if gen['same_tokens'] else 'NO'} | {KVCache.bytes_per_token(model.config):,} |")
    mha = ModelConfig(**{**SHAPE, "n_kv_head": SHAPE["n_head"]})
    print(f"\nKV cache of MHA at the same width (4 kv heads): {KVCache.bytes_per_token(mha):,} bytes/token (fp32)")
    print(f"Overhead alone (the dense model at 32 wide, vocab 64): ours {overhead['ours']:,.0f} tokens/s, "
          f"transformers {overhead['theirs']:,.0f} ({overhead['ours'] / overhead['theirs']:.2f}x)")
    dense = [m.weight for m in make_model("dense").modules() if isinstance(m, torch.nn.Linear)]
    floor_ms, theirs = streaming_ms(dense), rows[0][3]["theirs"]
    print(f"\nThe dense model's {len(dense)} matrix-vector products alone ({sum(w.numel() for w in dense) * 4 / 1e6:.1f} "
          f"MB of weights): {floor_ms:.2f} ms per token, so no library passes {1e3 / floor_ms:,.0f} tokens/s; against "
          f"transformers' {theirs:,.0f} that is at most {1e3 / floor_ms / theirs:.2f}x.\n")
    print("| weights streamed per pass | GB/s |")
    print("|---|---|")
    for mb in (2, 4, 8, 12, 16, 24, 32):
        weights = [torch.randn(256, 256) for _ in range(mb * 4)]  # 256 KB each
        print(f"| {mb} MB | {mb * 2**20 / streaming_ms(weights) / 1e6:.1f} |")


if __name__ == "__main__":
    main()
