"""
bench/gated_delta_rule.py: our Triton chunked gated delta rule (myllm_kernels/gated_delta_rule.py) against the PyTorch
chunked form (linear_attention.gated_delta_rule_chunked) and, when it is installed, fla's chunk_gated_delta_rule
(pip install flash-linear-attention), on one GPU.

    python bench/gated_delta_rule.py

First correctness on the GPU, bf16 included (the CPU tests cannot: Triton's interpreter gets bf16 wrong): o, the final
state and every gradient (q, k, v, log_a, beta, initial state; random upstream gradients on o and the final state),
from bf16 or fp32 inputs, against the PyTorch form in float64 on the same input values. Ours passes when its largest
error, relative to the largest entry, is within twice the fp32 PyTorch form's or under a floor: bf16 inputs get TF32
products and bf16 outputs and gradients (8-bit mantissas), fp32 inputs 3xTF32 products. fla's errors are printed
beside, for reference (it computes in its own precisions). Then milliseconds and TFLOP/s of the forward and of
forward+backward at B * T = 16384 tokens: ours and fla on bf16 inputs, the PyTorch form on fp32 (torch's triangular
solve takes no bf16), q, k, v laid out (B, T, H, d) in memory as a model produces them.

The one idea to understand first: FLOPs are the chunked form's matrix products, counted once per chunk of C tokens:
K K^T, Q K^T (2 C^2 d_k each), U = A V and Kd = A e^g K (2 C^2 d_v and 2 C^2 d_k), the causal product P W (2 C^2 d_v),
and the three that touch the state, W = U - Kd S, Q S and the state's update (2 C d_k d_v each): per token
F = 2 C (3 d_k + 2 d_v) + 6 d_k d_v, independent of T (linear attention's point). The triangular solve (C^3 / 3 per
chunk, off the tensor cores) is not counted. Forward+backward is credited 3 F, the usual "a backward costs two
forwards"; ours really does more, as it recomputes stages 2 and 3 in the backward, but it is credited the same as
everyone else.
"""

import datetime
import inspect
import os
import sys
import time

import torch
import torch.nn.functional as F

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

TOKENS = 16384
CHUNK = 64


def fla_rule():
    """fla's chunk_gated_delta_rule wrapped to our layout and arguments, or None when fla is not installed."""
    try:
        from fla.ops.gated_delta_rule import chunk_gated_delta_rule
    except ImportError:
        return None
    # Our q arrives scaled (the model folds d_k^-1/2 in); fla scales by d_k^-1/2 unless told otherwise. Older fla
    # versions took (B, H, T, d) by default (head_first=True); ask for (B, T, H, d) wherever the switch exists.
    options = dict(scale=1.0, output_final_state=True)
    if "head_first" in inspect.signature(chunk_gated_delta_rule).parameters:
        options["head_first"] = False

    def rule(q, k, v, log_a, beta, state=None):
        o, final = chunk_gated_delta_rule(*(x.transpose(1, 2) for x in (q, k, v, log_a, beta)), initial_state=state,
                                          **options)
        return o.transpose(1, 2), final
    return rule


def make_inputs(B, H, T, d_k, d_v, dtype, with_state=False, seed=0):
    """q, k, v (B, H, T, d) as transposed views of (B, T, H, d) memory, log_a and beta (B, H, T) likewise, state or
    None; q and k L2-normalised (q also scaled by d_k^-1/2), as the model passes them."""
    gen = torch.Generator(device="cuda").manual_seed(seed)

    def randn(*shape):
        return torch.randn(*shape, generator=gen, device="cuda")

    q = F.normalize(randn(B, T, H, d_k), dim=-1) * d_k ** -0.5
    k = F.normalize(randn(B, T, H, d_k), dim=-1)
    v = randn(B, T, H, d_v)
    log_a = -F.softplus(randn(B, T, H) - 2.0)  # decays mostly in (0.7, 1), as Mamba2's initialisation gives
    beta = torch.sigmoid(randn(B, T, H))
    state = randn(B, H, d_k, d_v) * 0.1 if with_state else None
    heads = [x.to(dtype).transpose(1, 2) for x in (q, k, v, log_a, beta)]
    return heads + [None if state is None else state.to(dtype)]


def outputs_and_grads(rule, inputs, d_o, d_final):
    """o, the final state and the gradients of <o, d_o> + <final, d_final> for every input (None for no state)."""
    leaves = [None if x is None else x.detach().requires_grad_() for x in inputs]
    o, final = rule(*leaves)
    torch.autograd.backward([o, final], [d_o.to(o.dtype), d_final.to(final.dtype)])
    return [o, final] + [None if x is None else x.grad for x in leaves]


def relative_error(actual, exact):
    return ((actual.double() - exact).abs().max() / exact.abs().max().clamp(min=1.0)).item()


def check_correctness(ours, fla):
    """Ours, the fp32 PyTorch form and fla against the float64 PyTorch form; returns whether ours passed every case."""
    from linear_attention import gated_delta_rule_chunked
    floor = {torch.float32: 1e-4, torch.bfloat16: 1.6e-2}
    names = ["o", "state", "dq", "dk", "dv", "dlog_a", "dbeta", "dstate0"]
    # (B, H, T, d_k, d_v, chunk, initial state, dtype): T a multiple of the chunk, not one, below one, and T = 1.
    cases = [(2, 4, 1024, 128, 128, 64, False, torch.bfloat16), (1, 4, 1000, 128, 128, 64, True, torch.bfloat16),
             (2, 4, 777, 64, 128, 32, True, torch.bfloat16), (1, 2, 40, 128, 64, 64, True, torch.bfloat16),
             (2, 2, 1, 128, 128, 64, True, torch.bfloat16), (1, 4, 1000, 128, 128, 64, True, torch.float32),
             (1, 4, 300, 96, 96, 16, False, torch.float32)]
    print("## Correctness: largest error relative to the largest entry, against the float64 PyTorch form\n")
    print(f"({' / '.join(names)})\n")
    print("| dtype | B, H, T, d_k/d_v, chunk, state | ours | PyTorch fp32 | fla | |")
    print("|---|---|---|---|---|---|")
    all_ok = True
    for B, H, T, d_k, d_v, chunk, with_state, dtype in cases:
        inputs = make_inputs(B, H, T, d_k, d_v, dtype, with_state)
        gen = torch.Generator(device="cuda").manual_seed(1)
        d_o = torch.randn(B, H, T, d_v, generator=gen, device="cuda")
        d_final = torch.randn(B, H, d_k, d_v, generator=gen, device="cuda")
        def reference(*x):
            return gated_delta_rule_chunked(*x, chunk_size=chunk)

        def in_dtype(dt):
            return [None if x is None else x.to(dt) for x in inputs]

        exact = outputs_and_grads(reference, in_dtype(torch.float64), d_o.double(), d_final.double())
        errors = {}
        for name, rule, args in (("ours", lambda *x: ours(*x, chunk_size=chunk), inputs),
                                 ("torch", reference, in_dtype(torch.float32)), ("fla", fla, inputs)):
            if rule is None or (name == "fla" and chunk != 64):  # fla's chunk is 64, always
                continue
            try:
                got = outputs_and_grads(rule, args, d_o, d_final)
            except Exception as e:  # fla is optional, of any version: a failure of its own is reported, not fatal
                if name != "fla":
                    raise
                errors[name] = f"failed ({type(e).__name__})"
                continue
            errors[name] = [relative_error(a, e) for a, e in zip(got, exact) if e is not None]
        ok = all(o <= max(2 * t, floor[dtype]) for o, t in zip(errors["ours"], errors["torch"]))
        all_ok &= ok
        cells = [("not installed" if fla is None else "chunk 64 only") if name not in errors else
                 errors[name] if isinstance(errors[name], str) else " / ".join(f"{e:.1e}" for e in errors[name])
                 for name in ("ours", "torch", "fla")]
        print(f"| {str(dtype)[6:]} | {B}, {H}, {T}, {d_k}/{d_v}, {chunk}, {with_state} | " + " | ".join(cells) +
              f" | {'ok' if ok else 'FAIL'} |", flush=True)
    print()
    return all_ok


def flops_per_token(d_k, d_v, chunk=CHUNK):
    return 2 * chunk * (3 * d_k + 2 * d_v) + 6 * d_k * d_v


def timings(rule, inputs):
    """Median milliseconds of the forward and of forward+backward."""
    from triton.testing import do_bench
    leaves = [x.detach().requires_grad_() for x in inputs if x is not None]
    o, final = rule(*leaves)
    d_o, d_final = torch.randn_like(o), torch.randn_like(final)
    with torch.no_grad():
        fwd = do_bench(lambda: rule(*leaves), warmup=5, rep=30, return_mode="median")
    both = do_bench(lambda: torch.autograd.backward(rule(*leaves), [d_o, d_final]), warmup=5, rep=30,
                    grad_to_none=leaves, return_mode="median")
    return fwd, both


def speed_table(ours, fla):
    from linear_attention import gated_delta_rule_chunked
    impls = [("ours", lambda *x: ours(*x, chunk_size=CHUNK), torch.bfloat16),
             ("PyTorch", lambda *x: gated_delta_rule_chunked(*x, chunk_size=CHUNK), torch.float32)]
    if fla is not None:
        impls.append(("fla", fla, torch.bfloat16))
    print(f"## Milliseconds (TFLOP/s), chunk {CHUNK}, B * T = {TOKENS}; ours and fla bf16 inputs, PyTorch fp32\n")
    print(f"fla: {'installed' if fla is not None else 'not installed'}\n")
    names = [name for name, _, _ in impls]
    print("| B, H, T, d | " + " | ".join(f"{n} fwd" for n in names) + " | " + " | ".join(f"{n} fwd+bwd" for n in names)
          + " | ours / PyTorch, fwd / fwd+bwd | ours / fla, fwd / fwd+bwd |")
    print("|---|" + "---|" * (2 * len(names) + 2))
    for H, T, d in ((16, 1024, 128), (16, 2048, 128), (16, 4096, 128), (16, 8192, 128), (32, 2048, 64)):
        B = TOKENS // T
        flops = B * H * T * flops_per_token(d, d)
        ms = {name: timings(rule, make_inputs(B, H, T, d, d, dtype)) for name, rule, dtype in impls}
        fwd_cells = [f"{ms[n][0]:.2f} ({flops / ms[n][0] / 1e9:.0f})" for n in names]
        both_cells = [f"{ms[n][1]:.2f} ({3 * flops / ms[n][1] / 1e9:.0f})" for n in names]
        speedups = [f"{ms[other][0] / ms['ours'][0]:.2f}x / {ms[other][1] / ms['ours'][1]:.2f}x" if other in ms
                    else "not installed" for other in ("PyTorch", "fla")]
        print(f"| {B}, {H}, {T}, {d} | " + " | ".join(fwd_cells + both_cells + speedups) + " |", flush=True)
        torch.cuda.empty_cache()
    print("\n(ratios are speed-ups: the other's time over ours, above 1 when ours is faster)\n")


def main():
    if not torch.cuda.is_available():
        raise SystemExit("bench/gated_delta_rule.py needs a CUDA GPU; the CPU checks are in "
                         "tests/test_gated_delta_rule.py")
    import triton
    from myllm_kernels import chunk_gated_delta_rule

    fla = fla_rule()
    start = time.time()
    print(f"# {torch.cuda.get_device_name()}, torch {torch.__version__}, triton {triton.__version__}, "
          f"fla {'not installed' if fla is None else 'installed'}, {datetime.date.today()}\n")
    ok = check_correctness(chunk_gated_delta_rule, fla)
    print(f"(correctness: {time.time() - start:.0f} s)\n", flush=True)
    speed_table(chunk_gated_delta_rule, fla)
    print(f"(total: {time.time() - start:.0f} s)")
    if not ok:
        raise SystemExit("correctness check FAILED: see the table above")


if __name__ == "__main__":
    main()
