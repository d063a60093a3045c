"""
bench/attention.py: our Triton flash attention (myllm_kernels/) against PyTorch's SDPA on one GPU.

    python bench/attention.py            # correctness, then speed tables: about 4 minutes on an H100
    python bench/attention.py --sweep    # then also time candidate tiles, to retune GPU_TILES

First it checks correctness on the GPU, bf16 included (the CPU tests cannot: Triton's interpreter gets bf16
wrong): outputs and gradients of ours and of SDPA against float64 math attention, ours passing when its
error is within twice SDPA's (or a small floor). Then it prints TFLOP/s of forward, backward and both, ours
against SDPA's flash and cuDNN backends, at 16k tokens per batch (B * T = 16384), model width 2048
(32 heads of 64 or 16 of 128), plus grouped-query, MLA (192/128) and sliding-window shapes, the causal and window
masks again as a BlockMask's lists (the block-sparse path), and last the time of one training step of model.py with
each attention implementation it accepts.

The one idea to understand first: FLOPs are counted as the FlashAttention papers count them, so numbers
compare with theirs: 2 * pairs * (d_qk + d_v) for the forward, where pairs are the (query, key) pairs the
mask allows (half of T^2 when causal), and 2 * pairs * (3 d_qk + 2 d_v) for the backward's five matmuls
(2.5x the forward at d_qk = d_v). Our backward really does seven (dK/dV and dQ are separate kernels, so both
recompute S and dP, the price of having no atomics), but it is credited with five, like everyone else's.
"""

import argparse
import datetime
import math
import os
import statistics
import sys
import time
import warnings

import torch
import torch.nn.functional as F

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

TOKENS = 16384
WIDTH = 2048  # n_head * head_dim of the table's shapes, as in the FlashAttention-2 paper's benchmarks


def sdpa(q, k, v, causal, window):
    """PyTorch's attention for the same arguments; a window needs an explicit mask (so no flash kernel)."""
    if window is None:
        return F.scaled_dot_product_attention(q, k, v, is_causal=causal, enable_gqa=True)
    T = q.size(2)
    i, j = torch.arange(T, device=q.device)[:, None], torch.arange(T, device=q.device)[None, :]
    return F.scaled_dot_product_attention(q, k, v, attn_mask=(j <= i) & (j > i - window), enable_gqa=True)


def random_qkv(B, n_head, n_kv_head, T, d_qk, d_v, dtype, seed=0):
    gen = torch.Generator(device="cuda").manual_seed(seed)
    shapes = ((B, n_head, T, d_qk), (B, n_kv_head, T, d_qk), (B, n_kv_head, T, d_v))
    return [torch.randn(s, generator=gen, device="cuda", dtype=dtype).requires_grad_() for s in shapes]


def out_and_grads(attention, q, k, v, dout):
    q, k, v = (x.detach().requires_grad_() for x in (q, k, v))
    out = attention(q, k, v)
    out.backward(dout)
    return out, q.grad, k.grad, v.grad


def relative_error(actual, exact):
    return ((actual.double() - exact).abs().max() / exact.abs().max().clamp(min=1.0)).item()


def check_correctness(flash_attention):
    """Ours and SDPA against float64; returns whether every case passed."""
    from myllm_kernels.attention_reference import reference_attention
    floor = {torch.float32: 2e-5, torch.float16: 2e-3, torch.bfloat16: 1.6e-2}
    # (B, n_head, n_kv_head, T, d_qk, d_v, causal, window): T not a multiple of any tile, GQA 1..8, MLA dims.
    # fp16 and fp32 run the first two: the same code as bf16, and each (dtype, dims, causal) is a compile.
    cases = [(2, 4, 4, 1000, 64, 64, True, None), (1, 8, 2, 1000, 128, 128, False, None),
             (1, 8, 1, 777, 192, 128, True, None), (1, 4, 2, 1000, 96, 96, True, 256),
             (2, 4, 4, 1, 64, 64, True, None)]
    runs = [(torch.bfloat16, case) for case in cases] + [(dtype, case) for dtype in (torch.float16, torch.float32)
                                                          for case in cases[:2]]
    print("## Correctness: largest error relative to the largest entry (out / dq / dk / dv), ours and SDPA\n")
    print("| dtype | B, heads, kv heads, T, d_qk/d_v, causal, window | ours | SDPA | |")
    print("|---|---|---|---|---|")
    all_ok = True
    for dtype, (B, n_head, n_kv_head, T, d_qk, d_v, causal, window) in runs:
        q, k, v = random_qkv(B, n_head, n_kv_head, T, d_qk, d_v, dtype)
        dout = torch.randn(B, n_head, T, d_v, device="cuda", dtype=dtype)
        exact = out_and_grads(lambda *x: reference_attention(*x, causal=causal, window_size=window), q, k, v,
                              dout.double())
        ours = out_and_grads(lambda *x: flash_attention(*x, causal=causal, window_size=window), q, k, v, dout)
        theirs = out_and_grads(lambda *x: sdpa(*x, causal, window), q, k, v, dout)
        ours_err = [relative_error(a, e) for a, e in zip(ours, exact)]
        sdpa_err = [relative_error(a, e) for a, e in zip(theirs, exact)]
        ok = all(o <= max(2 * s, floor[dtype]) for o, s in zip(ours_err, sdpa_err))
        all_ok &= ok
        print(f"| {str(dtype)[6:]} | {B}, {n_head}, {n_kv_head}, {T}, {d_qk}/{d_v}, {causal}, {window} | "
              f"{' / '.join(f'{e:.1e}' for e in ours_err)} | {' / '.join(f'{e:.1e}' for e in sdpa_err)} | "
              f"{'ok' if ok else 'FAIL'} |", flush=True)
    q, k, v = random_qkv(1, 16, 2, 2048, 128, 128, torch.bfloat16)  # GQA 8: where atomics would show
    runs = [out_and_grads(lambda *x: flash_attention(*x), q, k, v, torch.ones(1, 16, 2048, 128, device="cuda",
                                                                             dtype=torch.bfloat16))
            for _ in range(2)]
    same = all(torch.equal(a, b) for a, b in zip(*runs))
    all_ok &= same
    print(f"\nTwo backward runs bit-identical (GQA 8, T=2048, bf16): {same}\n")
    return all_ok


def pairs(T, causal, window):
    """(query, key) pairs the mask allows."""
    if not causal:
        return T * T
    W = T if window is None else min(window, T)
    return W * (W + 1) // 2 + (T - W) * W


def timings(attention, q, k, v):
    """Median milliseconds of forward, backward and both; None where this attention rejects the shape."""
    from triton.testing import do_bench
    try:
        out = attention(q, k, v)
        dout = torch.randn_like(out)
        fwd = do_bench(lambda: attention(q, k, v), warmup=10, rep=40, return_mode="median")
        bwd = do_bench(lambda: out.backward(dout, retain_graph=True), warmup=10, rep=40, grad_to_none=[q, k, v],
                       return_mode="median")
        both = do_bench(lambda: attention(q, k, v).backward(dout), warmup=10, rep=40, grad_to_none=[q, k, v],
                        return_mode="median")
        return fwd, bwd, both
    except RuntimeError:  # "No available kernel": this backend does not take these dims or this GQA ratio
        return None


def sdpa_backend(backend):
    """SDPA restricted to one backend (flash, cuDNN), for one shape."""
    from torch.nn.attention import sdpa_kernel

    def attention(q, k, v, causal):
        with sdpa_kernel(backend):
            return F.scaled_dot_product_attention(q, k, v, is_causal=causal, enable_gqa=True)
    return attention


def speed_row(impls, B, n_head, n_kv_head, T, d_qk, d_v, causal, window, label):
    """One table row: TFLOP/s of each implementation, forward | backward | forward+backward."""
    q, k, v = random_qkv(B, n_head, n_kv_head, T, d_qk, d_v, torch.bfloat16)
    n = B * n_head * pairs(T, causal, window)
    flops = (2 * n * (d_qk + d_v), 2 * n * (3 * d_qk + 2 * d_v))
    flops = (*flops, flops[0] + flops[1])
    cells, ratios = [], []
    for name, attention in impls:
        ms = timings(lambda q, k, v: attention(q, k, v, causal, window), q, k, v)
        cells.append(["-"] * 3 if ms is None else [f"{f / t / 1e9:.0f}" for f, t in zip(flops, ms)])
        ratios.append(ms)
    print(f"| {label} | " + " | ".join(" / ".join(c) for c in cells) + " |", flush=True)
    return ratios


def speed_tables(flash_attention):
    from torch.nn.attention import SDPBackend
    ours = ("ours", lambda q, k, v, causal, window: flash_attention(q, k, v, causal=causal, window_size=window))
    flash = sdpa_backend(SDPBackend.FLASH_ATTENTION)
    cudnn = sdpa_backend(SDPBackend.CUDNN_ATTENTION)
    impls = [ours, ("SDPA flash", lambda q, k, v, causal, window: flash(q, k, v, causal)),
             ("SDPA cuDNN", lambda q, k, v, causal, window: cudnn(q, k, v, causal))]
    print(f"## TFLOP/s, bf16, B * T = {TOKENS}: forward / backward / forward+backward\n")
    print("| shape | " + " | ".join(name for name, _ in impls) + " |")
    print("|---|" + "---|" * len(impls))
    fwd_ratios, bwd_ratios = [], []
    for d in (64, 128):
        for causal in (False, True):
            for T in (1024, 2048, 4096, 8192, 16384):
                ms = speed_row(impls, TOKENS // T, WIDTH // d, WIDTH // d, T, d, d, causal, None,
                               f"T={T} d={d} {'causal' if causal else 'full'}")
                if T >= 2048 and ms[0] and ms[1]:
                    fwd_ratios.append(ms[1][0] / ms[0][0])
                    bwd_ratios.append(ms[1][1] / ms[0][1])
    speed_row(impls, 2, 16, 2, 8192, 128, 128, True, None, "GQA 16/2 heads, T=8192 d=128 causal")
    speed_row(impls, 2, 16, 16, 8192, 192, 128, True, None, "MLA 192/128, 16 heads, T=8192 causal")
    speed_row(impls[:1], 2, 16, 16, 8192, 128, 128, True, 1024, "window 1024, T=8192 d=128 (ours only)")
    # The same causal and window masks as a BlockMask's lists of 64-position tiles (block-sparse attention, as MoBA
    # and FlexAttention drive it): what reading the lists costs against the kernel's own block ranges.
    from myllm_kernels.flash_attention import block_mask_of
    pos = torch.arange(8192, device="cuda")
    for window in (None, 1024):
        allowed = (pos[None, :] <= pos[:, None]) & (pos[None, :] > pos[:, None] - (window or 8192))
        lists = block_mask_of(allowed[None, None], 64)
        listed = ("ours, lists", lambda q, k, v, causal, w, lists=lists: flash_attention(q, k, v, causal=causal,
                                                                                          window_size=w, block_mask=lists))
        speed_row([listed], 2, 16, 16, 8192, 128, 128, True, window,
                  f"{'causal' if window is None else f'window {window}'}, T=8192 d=128 as block lists (ours)")
    if fwd_ratios:
        print(f"\nOurs / SDPA flash at T >= 2048: forward speed {min(fwd_ratios):.2f}x to {max(fwd_ratios):.2f}x "
              f"(goal >= 1.0), backward {min(bwd_ratios):.2f}x to {max(bwd_ratios):.2f}x (goal >= 0.9)\n")


def model_step_times():
    """Milliseconds per training step of model.py (bf16 autocast, AdamW) with each attn_impl it accepts."""
    from model import ModelConfig, Transformer
    shape = dict(vocab_size=32768, block_size=2048, n_layer=8, n_head=16, n_kv_head=4, n_embd=1024)
    B = 8
    print(f"## Training step of model.py: {shape}, batch {B} x {shape['block_size']}, bf16 autocast, AdamW\n")
    print("| attn_impl | ms / step | tokens / s | loss at step 1 |")
    print("|---|---|---|---|")
    for impl in ("sdpa", "flash"):
        try:
            config = ModelConfig(**shape, attn_impl=impl)
        except ValueError as e:
            print(f"| {impl} | skipped: {e} | | |")
            continue
        torch.manual_seed(0)
        model = Transformer(config).cuda()
        opt = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=True)
        idx = torch.randint(shape["vocab_size"], (B, shape["block_size"]), device="cuda",
                            generator=torch.Generator(device="cuda").manual_seed(0))
        losses, times = [], []
        for step in range(13):
            torch.cuda.synchronize()
            t0 = time.perf_counter()
            with torch.autocast("cuda", dtype=torch.bfloat16):
                _, loss = model(idx, idx)
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
            torch.cuda.synchronize()
            losses.append(loss.item())
            if step >= 3:  # the first steps compile kernels and warm the allocator
                times.append(time.perf_counter() - t0)
        ms = statistics.median(times) * 1e3
        print(f"| {impl} | {ms:.1f} | {B * shape['block_size'] / ms * 1e3:,.0f} | {losses[0]:.4f} |", flush=True)
        del model, opt
    print()


def sweep():
    """Time candidate tiles of each kernel at T=4096, bf16, causal, to choose GPU_TILES entries by measurement."""
    from triton.testing import do_bench
    from myllm_kernels.flash_attention import Tiles, _backward, _forward, launch_tiles
    fwd_cands = [Tiles(*c) for c in [(128, 64, 4, 3), (128, 64, 8, 3), (128, 128, 8, 2), (64, 64, 4, 3),
                                     (128, 32, 8, 3), (64, 32, 4, 3), (128, 64, 8, 4)]]
    dkdv_cands = [Tiles(*c) for c in [(32, 128, 8, 3), (16, 128, 8, 3), (32, 64, 4, 3), (64, 128, 8, 2),
                                      (32, 128, 4, 3), (32, 64, 8, 3), (16, 64, 4, 3)]]
    dq_cands = [Tiles(*c) for c in [(128, 64, 8, 3), (128, 32, 8, 3), (128, 32, 4, 3), (64, 64, 4, 3),
                                    (64, 32, 4, 3), (128, 64, 8, 2)]]
    print("## Tile sweep, T=4096 causal bf16, B * T = 16384 (ms; tiles = BLOCK_M, BLOCK_N, warps, stages)\n")
    for d in (64, 128):
        q, k, v = random_qkv(TOKENS // 4096, WIDTH // d, WIDTH // d, 4096, d, d, torch.bfloat16)
        fwd0, dkdv0, dq0 = launch_tiles(d, d, q.dtype, q.device)
        out, lse = _forward(q, k, v, True, 1 / math.sqrt(d), 4096, fwd0)
        dout = torch.randn_like(out)

        def time_or_error(fn):
            try:
                return f"{do_bench(fn, warmup=10, rep=40, return_mode='median'):.3f}"
            except Exception as e:  # out of shared memory or registers on this GPU
                return f"failed ({type(e).__name__})"
        for t in fwd_cands:
            print(f"d={d} forward {tuple(t)}: {time_or_error(lambda: _forward(q, k, v, True, 0.1, 4096, t))}")
        for t in dkdv_cands:
            print(f"d={d} backward, dK/dV {tuple(t)}, dQ {tuple(dq0)}: "
                  f"{time_or_error(lambda: _backward(dout, q, k, v, out, lse, True, 0.1, 4096, t, dq0))}")
        for t in dq_cands:
            print(f"d={d} backward, dK/dV {tuple(dkdv0)}, dQ {tuple(t)}: "
                  f"{time_or_error(lambda: _backward(dout, q, k, v, out, lse, True, 0.1, 4096, dkdv0, t))}")
        print(flush=True)


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sweep", action="store_true", help="also time candidate tiles of each kernel")
    args = parser.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("bench/attention.py needs a CUDA GPU; the CPU checks are in tests/test_kernels.py")
    import triton
    from myllm_kernels import flash_attention

    # SDPA warns at length about why a backend declined a shape; the table shows that as "-".
    warnings.filterwarnings("ignore", category=UserWarning)
    start = time.time()
    print(f"# {torch.cuda.get_device_name()}, torch {torch.__version__}, triton {triton.__version__}, "
          f"{datetime.date.today()}\n")
    ok = check_correctness(flash_attention)
    print(f"(correctness: {time.time() - start:.0f} s)\n", flush=True)
    speed_tables(flash_attention)
    print(f"(speed tables: {time.time() - start:.0f} s)\n", flush=True)
    model_step_times()
    if args.sweep:
        sweep()
    print(f"(total: {time.time() - start:.0f} s)")
    if not ok:
        raise SystemExit("correctness check FAILED: see the table above")


if __name__ == "__main__":
    main()
