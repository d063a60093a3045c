"""
bench/sparse_attention.py: what sliding windows with sinks and DeepSeek Sparse Attention cost and buy against dense
attention, side by side on this CPU.

    python bench/sparse_attention.py                  # cost tables (a few minutes on 2 cores)
    python bench/sparse_attention.py --quality        # and cpu_demo trained five ways (about an hour more)

Cost: forward + backward of one attention layer of cpu_demo's width (256, 4 heads) at batch 1, T = 2048 and 8192:
GQA dense through PyTorch's SDPA, GQA with a window of 256 keys (SDPA chunk by chunk; with sinks, eager), GQA with
MoBA (3 blocks of 256: SDPA under the mask of its choice, as the CPU has no block-sparse kernel), MLA dense (naive
form, SDPA) and MLA with DSA choosing 256 keys (4 index heads of 32; the absorbed form over the chosen latents, plus
the indexer's scores and KL). The tiles the block-sparse kernel visits against the density of the mask. Then decoding
at cpu_demo's shape (4 layers) with 2048 and 8192 tokens cached: tokens per second for GQA, 3 windowed + sinks : 1 full
(gpt-oss's alternation), MoBA, MLA and MLA + DSA.
Quality (--quality): config/cpu_demo.py (block 256) as it is, as 3 windowed (64 keys) + sinks : 1 full, with MoBA (its
own block and the best earlier one, of 32 keys each), as MLA, and as MLA + DSA (64 keys of up to 256, trained sparse
from the start), same steps and data, val bits per byte; then the trained MoBA run's routing: the pairs it keeps and
the block-sparse kernel's tiles it visits.
"""

import argparse
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from hybrid_attention import ROOT, WIDTH, best_of, decode_cost, train_run  # noqa: E402
from model import MLA, Attention, KVCache, ModelConfig, Transformer, moba_choice  # noqa: E402

MLA_SHAPE = dict(attn="mla", q_lora_rank=128, kv_lora_rank=128, qk_nope_head_dim=48, qk_rope_head_dim=16,
                 v_head_dim=64)
DSA = dict(**MLA_SHAPE, index_n_heads=4, index_head_dim=32)
WINDOWED = dict(layer_types=["sliding_attention"] * 3 + ["full_attention"], attention_sinks=True)
LAYERS = {  # one layer: (its model keys, its window)
    "GQA, dense (sdpa)": ({}, None),
    "GQA, window 256 (sdpa, by chunks)": ({}, 256),
    "GQA, window 256 + sinks (eager, by chunks)": (dict(attention_sinks=True), 256),
    "GQA, MoBA 3 blocks of 256 (sdpa, mask)": (dict(moba_chunk_size=256, moba_topk=3), None),
    "MLA, dense (sdpa)": (MLA_SHAPE, None),
    "MLA + DSA, 256 keys": ({**DSA, "index_topk": 256}, None),
}
MODELS = {  # decoding at cpu_demo's shape
    "GQA, dense": {},
    "3 windowed (256) + sinks : 1 full": {**WINDOWED, "sliding_window": 256},
    "MoBA, 3 blocks of 256": dict(moba_chunk_size=256, moba_topk=3),
    "MLA, dense": MLA_SHAPE,
    "MLA + DSA, 256 keys": {**DSA, "index_topk": 256},
}
RUNS = {  # quality, at cpu_demo's block of 256
    "GQA, dense (cpu_demo)": [],
    "3 windowed (64) + sinks : 1 full": ["--layer_types=" + str(WINDOWED["layer_types"]),
                                        "--sliding_window=64", "--attention_sinks=True"],
    "MoBA, 2 blocks of 32": ["--moba_chunk_size=32", "--moba_topk=2"],
    "MLA, dense": [f"--{k}={v}" for k, v in MLA_SHAPE.items()],
    "MLA + DSA, 64 keys": [f"--{k}={v}" for k, v in {**DSA, "index_topk": 64}.items()],
}


def slug_of(name):
    """A run's folder under out/bench_sparse/."""
    return "".join(ch if ch.isalnum() else "_" for ch in name)


def layer_cost(overrides, window, T):
    """Seconds of forward + backward of one attention layer in training mode (DSA: its indexer's KL included)."""
    config = ModelConfig(**{**WIDTH, "n_layer": 1}, **overrides, block_size=T, attn_impl="sdpa")
    torch.manual_seed(0)
    layer = (MLA if config.attn == "mla" else Attention)(config, 0, window).train()
    x = torch.randn(1, T, WIDTH["n_embd"], requires_grad=True)
    rope = Transformer(config).rope(torch.arange(T)[None], x.dtype)
    extra = ()
    if config.moba_chunk_size:  # MoBA's blocks of the keys and of the queries: by position, the same here
        blocks = torch.arange(T)[None] // config.moba_chunk_size
        extra = ((blocks, blocks),)

    def step():
        loss = layer(x, rope, None, None, *extra).sum()
        if config.index_n_heads:
            loss = loss + layer.indexer_loss
        loss.backward()

    return best_of(step, repeats=2)


def tile_fractions(T, block=64, window=256, chunk=256, topk=3):
    """The block-sparse kernel's work on GPU tiles of `block`: the share of (query block, key block) tiles it visits,
    beside the share of (query, key) pairs the mask allows, for a window and for MoBA. MoBA routes each query on its
    own, and a tile is visited when any of its `block` queries chose the key block: with the random routing of
    untrained weights here, neighbours rarely agree, the worst case (a trained router's neighbours agree more)."""
    from myllm_kernels.flash_attention import block_mask, block_mask_of

    pos = torch.arange(T)
    band = (pos[None, :] <= pos[:, None]) & (pos[None, :] > pos[:, None] - window)
    rows = []
    mask = block_mask_of(band[None, None], block)
    rows.append((f"window {window}", band.float().mean().item(), mask.kv_blocks[..., 0].sum().item()))
    torch.manual_seed(0)
    q, k = torch.randn(1, 4, T, 64), torch.randn(1, 2, T, 64)
    blocks = pos[None] // chunk
    chosen = moba_choice(q, k, (blocks, blocks), topk)  # (1, 4, T, n_blocks) of chunk keys
    pairs = chosen.repeat_interleave(chunk, dim=-1)[..., :T] & (pos[None, :] <= pos[:, None])
    per_tile = chosen.repeat_interleave(chunk // block, dim=-1)  # the choice on kernel tiles
    n = -(-T // block)
    visit = per_tile.view(1, 4, n, block, -1).any(dim=3)[..., :n] & torch.ones(n, n, dtype=torch.bool).tril()
    mask = block_mask(visit, block)
    rows.append((f"MoBA {topk} of blocks of {chunk}", pairs.float().mean().item(),
                 mask.kv_blocks[..., 0].sum().item() / 4))
    return [(name, density, visited / n**2) for name, density, visited in rows]


def trained_moba_tiles(out_dir, data_dir, rows=8):
    """Per layer of a trained MoBA run, on its first validation windows: the share of (query, key) pairs its routing
    keeps, and of the kernel's tiles (moba_chunk_size queries by moba_chunk_size keys) that a BlockMask visits."""
    import numpy as np

    import model as model_module
    from checkpoint import load_model

    (model, _), chosen = load_model(out_dir, "cpu"), []
    T, chunk = model.config.block_size, model.config.moba_chunk_size
    route = model_module.moba_choice
    model_module.moba_choice = lambda *args: chosen.append(route(*args)) or chosen[-1]  # record each layer's choice
    try:
        tokens = np.memmap(os.path.join(data_dir, "val.bin"), dtype=np.uint16, mode="r")[: rows * T]
        with torch.no_grad():
            model(torch.from_numpy(tokens.astype(np.int64)).view(rows, T))
    finally:
        model_module.moba_choice = route
    pos, n = torch.arange(T), T // chunk
    return [((c.repeat_interleave(chunk, dim=-1) & (pos[None, :] <= pos[:, None])).float().mean().item(),
             c.view(*c.shape[:2], n, chunk, n).any(dim=3).float().mean().item()) for c in chosen]


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quality", action="store_true", help="also train cpu_demo five ways (about an hour)")
    parser.add_argument("--max_iters", type=int, default=0, help="--quality: steps per run (0: cpu_demo's 350)")
    parser.add_argument("--data_dir", default="data/pystdlib", help="--quality: prepare_data.py's default corpus")
    parser.add_argument("--skip_cost", action="store_true", help="--quality only")
    args = parser.parse_args()
    if args.quality and not os.path.isfile(os.path.join(args.data_dir, "meta.json")):
        raise SystemExit(f"--data_dir {args.data_dir} holds no prepared data: run python prepare_data.py first")
    torch.set_num_threads(os.cpu_count())

    if not args.skip_cost:
        lengths = (2048, 8192)
        print("\nOne attention layer, forward + backward, batch 1, width 256, 4 heads (fp32)\n")
        print("| layer | " + " | ".join(f"T = {T:,}" for T in lengths) + " | " +
              " | ".join(f"/ dense at {T:,}" for T in lengths) + " |")
        print("|---|" + "---:|" * 2 * len(lengths))
        dense = {}
        for name, (overrides, window) in LAYERS.items():
            seconds = [layer_cost(overrides, window, T) for T in lengths]
            reference = dense.setdefault(overrides.get("attn", "gqa"), seconds)  # the first row of its attention
            print(f"| {name} | " + " | ".join(f"{s * 1000:,.0f} ms" for s in seconds) + " | " +
                  " | ".join(f"{s / r:.2f}" for s, r in zip(seconds, reference)) + " |")

        print("\nThe block-sparse kernel's tiles (64 x 64, a GPU's) against the mask, causal, one head\n")
        print("| mask | T | pairs allowed | tiles visited | tiles skipped |")
        print("|---|---:|---:|---:|---:|")
        for T in lengths:
            for name, density, visited in tile_fractions(T):
                print(f"| {name} | {T:,} | {density:.1%} | {visited:.1%} | {1 - visited:.1%} |")

        contexts = (2048, 8192)
        print("\nDecoding at cpu_demo's shape (4 layers), batch 1, tokens per second with the context cached\n")
        print("| model | " + " | ".join(f"{n:,} cached" for n in contexts) + " | cache at 8,192 |")
        print("|---|" + "---:|" * (len(contexts) + 1))
        for name, overrides in MODELS.items():
            config = ModelConfig(**WIDTH, **overrides, block_size=8192 + 16)
            size = KVCache.bytes_per_token(config) * 8192 + KVCache.bytes_per_sequence(config)
            print(f"| {name} | " + " | ".join(f"{1000 / decode_cost(overrides, n)[0]:.0f}" for n in contexts) +
                  f" | {size / 2**20:.2f} MiB |")

    if args.quality:
        print("\nconfig/cpu_demo.py, same steps and data, five attention patterns\n")
        print("| attention | val bits per byte | wall time |")
        print("|---|---:|---:|")
        for name, extra in RUNS.items():
            bpb, seconds = train_run("sparse/" + slug_of(name), extra, args.data_dir, args.max_iters)
            print(f"| {name} | {bpb:.3f} | {seconds / 60:.1f} min |", flush=True)
        moba = os.path.join(ROOT, "out", "bench_sparse", slug_of("MoBA, 2 blocks of 32"))
        print("\nThe trained MoBA run's routing on 8 validation windows, per layer (causal tiles: "
              f"{(8 * 9 / 2) / 64:.1%})\n")
        print("| layer | pairs kept | 32 x 32 tiles visited |")
        print("|---:|---:|---:|")
        for layer, (pairs, tiles) in enumerate(trained_moba_tiles(moba, args.data_dir)):
            print(f"| {layer} | {pairs:.1%} | {tiles:.1%} |")


if __name__ == "__main__":
    main()
