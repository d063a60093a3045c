"""
The gated delta rule (Gated DeltaNet, Yang, Kautz and Hatamizadeh, ICLR 2025) in chunks, forward and backward in Triton.

    from myllm_kernels import chunk_gated_delta_rule
    o, final_state = chunk_gated_delta_rule(q, k, v, log_a, beta, state=None, chunk_size=64)
    # q, k (B, H, T, d_k); v (B, H, T, d_v); log_a, beta (B, H, T), log_a <= 0; state (B, H, d_k, d_v) or None
    # -> o (B, H, T, d_v) in q's dtype, final_state (B, H, d_k, d_v) in float32 (float64 for float64 inputs)

The same function as gated_delta_rule_chunked in linear_attention.py, whose docstring derives the algorithm: read it
first, the names here are its names. On a CPU, set TRITON_INTERPRET=1 before importing this module and the kernels run
in Triton's interpreter (tests/test_gated_delta_rule.py does that); bench/gated_delta_rule.py times them on a GPU.

The one idea to understand first: of the recurrence S_t = a_t (I - b_t k_t k_t^T) S_{t-1} + b_t k_t v_t^T, only the
hand-over of the state from one chunk of C tokens to the next is sequential. Everything else about a chunk, including
the triangular solve that turns C rank-one updates into matrix products (the WY representation), depends only on that
chunk's own tokens, so it runs for all chunks at once. The kernels are that split, as fla's chunk_gated_delta_rule
(the production version) and the papers stage it:

    1. g = cumsum(log_a) within each chunk                         _prepare_kernel, one program per (chunk, b*h)
    2. M = I + diag(b) L,  U = M^-1 (b V),  Kd = M^-1 (b e^g K)     the same program; L = strictly lower (G * K K^T)
    3. W = U - Kd S,  S <- e^{g_C} S + (e^{g_C - g} K)^T W          _state_kernel, one program per (d_v tile, b*h)
       over the chunks in order, storing each chunk's entering S      walking the chunks: the only sequential part
    4. O = e^g Q S + (G * Q K^T, lower with the diagonal) W         _output_kernel, one program per (chunk, b*h)

with A = M^-1 diag(b) of linear_attention.py kept as its first factor M^-1 (diag(b) is folded into the right-hand
sides), and fla's names: its w is our Kd, its v_new our W, its h our chunk states S. Kd and U use the same M^-1, and
the backward needs M^-1 itself, which is why M is inverted once rather than solved against twice.

The inverse of the unit lower-triangular C x C matrix M is by forward substitution, row by row, in registers
(_unit_lower_inverse): row i of M^-1 needs rows 0..i-1 only. That is C - 1 dependent steps of C x C vector work on
the CUDA cores, about as many operations as one of the chunk's matrix products but without tensor cores. fla inverts
16 x 16 diagonal blocks that way and joins them with block products on tensor cores ([[A, 0], [B, D]]^-1 =
[[A^-1, 0], [-D^-1 B A^-1, D^-1]]); that is the next step if the profile says so. A series (I + N)^-1 = prod_j
(I + (-N)^{2^j}) would be all matrix products, but its terms grow like binomial coefficients (N all ones below the
diagonal: entries up to C(62, 31) ~ 5e17 at C = 64) and cancel catastrophically in fp32, to an inverse of entries
0 and +-1; forward substitution is the stable one.

What the backward stores and what it recomputes. The forward keeps for the backward only g (one number per token)
and M^-1 (C numbers per token per head, the costly solve), besides the inputs. It does not keep U and Kd (d_v + d_k
per token: two matrix products per chunk to redo from M^-1) nor the chunk states S (d_k d_v / C per token, 256 at
d = 128, C = 64: more than q, k and v together in bf16). The backward re-runs stages 2 (from the stored M^-1, no
solve) and 3 to get U, Kd, every chunk's S and W back, then walks the chunks in reverse for the gradient of each
chunk's final state (_state_backward_kernel, sequential like stage 3), and last computes every other gradient chunk
by chunk in parallel (_grad_kernel). The recomputed states live only during the backward, one layer at a time.

Conventions used by every kernel below:
- All arithmetic in fp32 (fp64 for fp64 inputs, for gradcheck), whatever the inputs' dtype: each load is cast at
  once. The state sums thousands of small updates, which bf16 would round away.
- Tokens past T are loaded as k = v = q = b = 0, log a = 0, so a last partial chunk is the reference's padded chunk
  without any padding in memory: its padding rows write nothing and decay nothing.
- Head dims are padded to a power of two (tl.arange needs one, tl.dot at least 16) with masked, zero columns.
- Intermediate buffers are contiguous (B * H, rows, cols) in the compute dtype; the inputs are read through their
  strides, with each row contiguous.
"""

import torch
import triton
import triton.language as tl

from myllm_kernels.flash_attention import INTERPRETED, _batch_and_head, _load_tile, _pad, _store_tile, \
    _unit_last_stride

CHUNK_SIZES = (16, 32, 64, 128)  # powers of two (tl.arange), at least 16 (tl.dot)


# ----------------------------------------------------------------------------------------------------
# Helpers shared by the kernels


@triton.jit
def _decay(g, CHUNK: tl.constexpr, DIAGONAL: tl.constexpr):
    """G_ij = exp(g_i - g_j), the decay from token j to token i of a chunk, below the diagonal (and on it if
    DIAGONAL), 0 above. The mask comes before the exp: above the diagonal g_i - g_j > 0 could overflow, and the
    inf times a zero would be NaN."""
    idx = tl.arange(0, CHUNK)
    if DIAGONAL:
        keep = idx[:, None] >= idx[None, :]
    else:
        keep = idx[:, None] > idx[None, :]
    return tl.exp(tl.where(keep, g[:, None] - g[None, :], float("-inf")))


@triton.jit
def _unit_lower_inverse(n, CHUNK: tl.constexpr):
    """(I + n)^-1 for a strictly lower-triangular (CHUNK, CHUNK) n, by forward substitution.

    Row i of X = (I + n)^-1 solves X_i + sum_{j<i} n_ij X_j = e_i, and rows j < i are final when row i is computed,
    so X starts as I and each step replaces row i by e_i - n_i X (row i of n is zero from column i on, so the rows
    of X not yet replaced, still rows of I, add nothing). Registers cannot be indexed by a variable, so row i is
    read and written through a mask.
    """
    idx = tl.arange(0, CHUNK)
    x = tl.where(idx[:, None] == idx[None, :], 1.0, 0.0).to(n.dtype)
    for i in range(1, CHUNK):
        n_i = tl.sum(tl.where(idx[:, None] == i, n, 0.0), 0)  # (C,) row i of n, as a vector over j
        x = tl.where(idx[:, None] == i, x - tl.sum(n_i[:, None] * x, 0)[None, :], x)
    return x


@triton.jit
def _chunk_g(G, bh, c, n_chunks, CHUNK: tl.constexpr):
    """The chunk's g (C,) and its last entry g_C. G holds whole chunks (n_chunks * C per head, the padding rows of
    the last chunk included), so no mask: a padding row carries its chunk's last real g, and g_C is that value."""
    base = G + (bh * n_chunks + c) * CHUNK
    return tl.load(base + tl.arange(0, CHUNK)), tl.load(base + CHUNK - 1)


@triton.jit
def _state_base(HS, bh, c, n_chunks, D_K: tl.constexpr, D_V: tl.constexpr):
    """Where chunk c's (d_k, d_v) state starts in a contiguous (B * H, n_chunks, d_k, d_v) buffer."""
    return HS + (bh * n_chunks + c) * (D_K * D_V)


# ----------------------------------------------------------------------------------------------------
# Forward


@triton.jit
def _prepare_kernel(K, V, LOG_A, BETA, G, M_INV, U, KD, stride_kb, stride_kh, stride_kt, stride_vb, stride_vh,
                    stride_vt, T, n_heads, n_chunks, D_K: tl.constexpr, D_V: tl.constexpr, BLOCK_DK: tl.constexpr,
                    BLOCK_V: tl.constexpr, CHUNK: tl.constexpr, SOLVE: tl.constexpr, DOT_PRECISION: tl.constexpr):
    """Stages 1 and 2 for one chunk of one (batch, head): g, M^-1, U = M^-1 (b V), Kd = M^-1 (b e^g K).

    SOLVE: compute g and M^-1 and store them (the forward); otherwise load them (the backward, which recomputes U and
    Kd from the stored M^-1 instead of keeping them, see the module docstring).
    """
    c = tl.program_id(0)
    b, h = _batch_and_head(tl.program_id(1), n_heads)
    bh = b * n_heads + h
    idx = tl.arange(0, CHUNK)
    rows = c * CHUNK + idx  # token positions
    offs_dk = tl.arange(0, BLOCK_DK)
    acc = G.dtype.element_ty
    k = _load_tile(K + b * stride_kb + h * stride_kh, rows, stride_kt, offs_dk, T, D_K).to(acc)  # (C, BLOCK_DK)
    beta = tl.load(BETA + bh * T + rows, mask=rows < T, other=0.0).to(acc)
    if SOLVE:
        g = tl.cumsum(tl.load(LOG_A + bh * T + rows, mask=rows < T, other=0.0).to(acc), 0)
        tl.store(G + (bh * n_chunks + c) * CHUNK + idx, g)
        kkt = tl.dot(k, tl.trans(k), input_precision=DOT_PRECISION)  # (C, C)
        m_inv = _unit_lower_inverse(beta[:, None] * kkt * _decay(g, CHUNK, False), CHUNK)
        _store_tile(M_INV + bh * T * CHUNK, m_inv, rows, CHUNK, idx, T, CHUNK)
    else:
        g, _ = _chunk_g(G, bh, c, n_chunks, CHUNK)
        m_inv = _load_tile(M_INV + bh * T * CHUNK, rows, CHUNK, idx, T, CHUNK)
    kd = tl.dot(m_inv, k * (beta * tl.exp(g))[:, None], input_precision=DOT_PRECISION)  # (C, BLOCK_DK)
    _store_tile(KD + bh * T * D_K, kd, rows, D_K, offs_dk, T, D_K)
    for v0 in range(0, D_V, BLOCK_V):
        offs_v = v0 + tl.arange(0, BLOCK_V)
        v = _load_tile(V + b * stride_vb + h * stride_vh, rows, stride_vt, offs_v, T, D_V).to(acc)  # (C, BLOCK_V)
        u = tl.dot(m_inv, v * beta[:, None], input_precision=DOT_PRECISION)
        _store_tile(U + bh * T * D_V, u, rows, D_V, offs_v, T, D_V)


@triton.jit
def _state_program(n_heads, CHUNK: tl.constexpr, BLOCK_DK: tl.constexpr, BLOCK_V: tl.constexpr):
    """What a program of the two sequential passes (_state_kernel and its mirror) owns: its batch, head and
    batch * head, a chunk's row offsets, the d_k offsets, and its tile of d_v columns (grid axis 0)."""
    b, h = _batch_and_head(tl.program_id(1), n_heads)
    offs_v = tl.program_id(0) * BLOCK_V + tl.arange(0, BLOCK_V)
    return b, h, b * n_heads + h, tl.arange(0, CHUNK), tl.arange(0, BLOCK_DK), offs_v


@triton.jit
def _state_kernel(K, G, U, KD, H0, HS, WS, HT, stride_kb, stride_kh, stride_kt, T, n_heads, n_chunks,
                  D_K: tl.constexpr, D_V: tl.constexpr, BLOCK_DK: tl.constexpr, BLOCK_V: tl.constexpr,
                  CHUNK: tl.constexpr, DOT_PRECISION: tl.constexpr):
    """Stage 3: one program per (d_v tile, batch * head) carries its (d_k, BLOCK_V) columns of the state through the
    chunks in order. Columns of S never mix (every product acts on S from the left), so d_v tiles are independent.

    Stores each chunk's entering state (HS, for the outputs), what each token writes, W = U - Kd S (WS), and the
    final state (HT).
    """
    b, h, bh, rows0, offs_dk, offs_v = _state_program(n_heads, CHUNK, BLOCK_DK, BLOCK_V)
    acc = G.dtype.element_ty
    s = _load_tile(H0 + bh * (D_K * D_V), offs_dk, D_V, offs_v, D_K, D_V).to(acc)  # (BLOCK_DK, BLOCK_V)
    for c in range(n_chunks):
        rows = c * CHUNK + rows0
        _store_tile(_state_base(HS, bh, c, n_chunks, D_K, D_V), s, offs_dk, D_V, offs_v, D_K, D_V)
        g, g_last = _chunk_g(G, bh, c, n_chunks, CHUNK)
        k = _load_tile(K + b * stride_kb + h * stride_kh, rows, stride_kt, offs_dk, T, D_K).to(acc)  # (C, BLOCK_DK)
        kd = _load_tile(KD + bh * T * D_K, rows, D_K, offs_dk, T, D_K)
        u = _load_tile(U + bh * T * D_V, rows, D_V, offs_v, T, D_V)  # (C, BLOCK_V)
        w = u - tl.dot(kd, s, input_precision=DOT_PRECISION)
        _store_tile(WS + bh * T * D_V, w, rows, D_V, offs_v, T, D_V)
        k_to_end = k * tl.exp(g_last - g)[:, None]  # each token's write, decayed to the chunk's end
        s = s * tl.exp(g_last) + tl.dot(tl.trans(k_to_end), w, input_precision=DOT_PRECISION)
    _store_tile(HT + bh * (D_K * D_V), s, offs_dk, D_V, offs_v, D_K, D_V)


@triton.jit
def _output_kernel(Q, K, G, HS, WS, O, stride_qb, stride_qh, stride_qt, stride_kb, stride_kh, stride_kt, T, n_heads,
                   n_chunks, D_K: tl.constexpr, D_V: tl.constexpr, BLOCK_DK: tl.constexpr, BLOCK_V: tl.constexpr,
                   CHUNK: tl.constexpr, DOT_PRECISION: tl.constexpr):
    """Stage 4, one program per (chunk, batch * head): O = e^g Q S + P W with P = G * Q K^T (lower, diagonal
    included), the entering state read for all queries of the chunk and the chunk's own writes read causally."""
    c = tl.program_id(0)
    b, h = _batch_and_head(tl.program_id(1), n_heads)
    bh = b * n_heads + h
    rows = c * CHUNK + tl.arange(0, CHUNK)
    offs_dk = tl.arange(0, BLOCK_DK)
    acc = G.dtype.element_ty
    q = _load_tile(Q + b * stride_qb + h * stride_qh, rows, stride_qt, offs_dk, T, D_K).to(acc)  # (C, BLOCK_DK)
    k = _load_tile(K + b * stride_kb + h * stride_kh, rows, stride_kt, offs_dk, T, D_K).to(acc)
    g, _ = _chunk_g(G, bh, c, n_chunks, CHUNK)
    p = tl.dot(q, tl.trans(k), input_precision=DOT_PRECISION) * _decay(g, CHUNK, True)  # (C, C)
    q_decayed = q * tl.exp(g)[:, None]  # reads the entering state decayed to each token
    for v0 in range(0, D_V, BLOCK_V):
        offs_v = v0 + tl.arange(0, BLOCK_V)
        s = _load_tile(_state_base(HS, bh, c, n_chunks, D_K, D_V), offs_dk, D_V, offs_v, D_K, D_V)
        w = _load_tile(WS + bh * T * D_V, rows, D_V, offs_v, T, D_V)  # (C, BLOCK_V)
        o = tl.dot(q_decayed, s, input_precision=DOT_PRECISION) + tl.dot(p, w, input_precision=DOT_PRECISION)
        _store_tile(O + bh * T * D_V, o, rows, D_V, offs_v, T, D_V)


# ----------------------------------------------------------------------------------------------------
# Backward. Per chunk, with S the entering state, S' the leaving one and dS' its gradient (the upstream gradient of
# the final state for the last chunk), reverse-mode through the forward's equations, last one first:
#     S' = e^{g_C} S + Ke^T W, Ke = e^{g_C - g} K:  dW  = Ke dS' (+ P^T dO from O = e^g Q S + P W),  dKe = W dS'^T
#     W  = U - Kd S:                                dU  = dW,   dKd = -dW S^T
#     dS = e^{g_C} dS' + (e^g Q)^T dO - Kd^T dW     the only recursion: _state_backward_kernel, chunks in reverse
#     U  = M^-1 (b V), Kd = M^-1 (b e^g K):        dM^-1 = dU (b V)^T + dKd (b e^g K)^T,  d(b V) = M^-T dU, ...
#     M^-1:                                         dM = -M^-T dM^-1 M^-T, of which N = diag(b) L takes the part
#                                                   strictly below the diagonal
# and every g-dependence (e^g, e^{g_C - g}, G) adds to dg, turned into d log_a by a reversed cumulative sum within
# the chunk (g_i sums log_a_1..i, so log_a_t reaches every g_i with i >= t). _grad_kernel does all but the recursion.


@triton.jit
def _state_backward_kernel(Q, K, G, KD, DO, DHT, DH, DW, DH0, stride_qb, stride_qh, stride_qt, stride_kb, stride_kh,
                           stride_kt, T, n_heads, n_chunks, D_K: tl.constexpr, D_V: tl.constexpr,
                           BLOCK_DK: tl.constexpr, BLOCK_V: tl.constexpr, CHUNK: tl.constexpr,
                           DOT_PRECISION: tl.constexpr):
    """The mirror of _state_kernel: one program per (d_v tile, batch * head) carries dS from the final state back to
    the initial one. Stores each chunk's dS' (DH), the whole gradient of its writes dW = P^T dO + Ke dS' (DW) and the
    initial state's gradient (DH0). The recursion needs no state S, only dO and the chunk's keys and queries."""
    b, h, bh, rows0, offs_dk, offs_v = _state_program(n_heads, CHUNK, BLOCK_DK, BLOCK_V)
    acc = G.dtype.element_ty
    ds = _load_tile(DHT + bh * (D_K * D_V), offs_dk, D_V, offs_v, D_K, D_V).to(acc)  # (BLOCK_DK, BLOCK_V)
    for i in range(n_chunks):
        c = n_chunks - 1 - i
        rows = c * CHUNK + rows0
        _store_tile(_state_base(DH, bh, c, n_chunks, D_K, D_V), ds, offs_dk, D_V, offs_v, D_K, D_V)
        g, g_last = _chunk_g(G, bh, c, n_chunks, CHUNK)
        q = _load_tile(Q + b * stride_qb + h * stride_qh, rows, stride_qt, offs_dk, T, D_K).to(acc)  # (C, BLOCK_DK)
        k = _load_tile(K + b * stride_kb + h * stride_kh, rows, stride_kt, offs_dk, T, D_K).to(acc)
        kd = _load_tile(KD + bh * T * D_K, rows, D_K, offs_dk, T, D_K)
        do = _load_tile(DO + bh * T * D_V, rows, D_V, offs_v, T, D_V).to(acc)  # (C, BLOCK_V)
        p = tl.dot(q, tl.trans(k), input_precision=DOT_PRECISION) * _decay(g, CHUNK, True)  # (C, C)
        k_to_end = k * tl.exp(g_last - g)[:, None]
        dw = tl.dot(tl.trans(p), do, input_precision=DOT_PRECISION) + tl.dot(k_to_end, ds,
                                                                             input_precision=DOT_PRECISION)
        _store_tile(DW + bh * T * D_V, dw, rows, D_V, offs_v, T, D_V)
        q_decayed = q * tl.exp(g)[:, None]
        ds = (ds * tl.exp(g_last) + tl.dot(tl.trans(q_decayed), do, input_precision=DOT_PRECISION)
              - tl.dot(tl.trans(kd), dw, input_precision=DOT_PRECISION))
    _store_tile(DH0 + bh * (D_K * D_V), ds, offs_dk, D_V, offs_v, D_K, D_V)


@triton.jit
def _sums_over_d_v(V, HS, DH, WS, DW, DO, DV, beta, m_inv, b, h, bh, c, rows, stride_vb, stride_vh, stride_vt, T,
                   n_chunks, D_K: tl.constexpr, D_V: tl.constexpr, BLOCK_DK: tl.constexpr, BLOCK_V: tl.constexpr,
                   CHUNK: tl.constexpr, DOT_PRECISION: tl.constexpr):
    """The part of _grad_kernel that runs over the value dim, BLOCK_V columns at a time: the products that sum over
    d_v, and dV (which has d_v columns itself), stored on the way. Returns, for the chunk,
        dq_s = dO S^T,  dp = dO W^T,  dke = W dS'^T,  dkd = -dW S^T      (C, d_k) and (C, C)
        dm_inv = dW (b V)^T  (dKd's part is added later),  dbeta_v = rowsum(M^-T dW * V),  s_ds = rowsum(S * dS')."""
    offs_dk = tl.arange(0, BLOCK_DK)
    acc = beta.dtype
    dq_s = tl.zeros([CHUNK, BLOCK_DK], acc)
    dke = tl.zeros([CHUNK, BLOCK_DK], acc)
    dkd = tl.zeros([CHUNK, BLOCK_DK], acc)
    dp = tl.zeros([CHUNK, CHUNK], acc)
    dm_inv = tl.zeros([CHUNK, CHUNK], acc)
    dbeta_v = tl.zeros([CHUNK], acc)
    s_ds = tl.zeros([BLOCK_DK], acc)
    for v0 in range(0, D_V, BLOCK_V):
        offs_v = v0 + tl.arange(0, BLOCK_V)
        s = _load_tile(_state_base(HS, bh, c, n_chunks, D_K, D_V), offs_dk, D_V, offs_v, D_K, D_V)  # (BLOCK_DK, BV)
        ds = _load_tile(_state_base(DH, bh, c, n_chunks, D_K, D_V), offs_dk, D_V, offs_v, D_K, D_V)
        w = _load_tile(WS + bh * T * D_V, rows, D_V, offs_v, T, D_V)  # (C, BLOCK_V)
        dw = _load_tile(DW + bh * T * D_V, rows, D_V, offs_v, T, D_V)
        do = _load_tile(DO + bh * T * D_V, rows, D_V, offs_v, T, D_V).to(acc)
        v = _load_tile(V + b * stride_vb + h * stride_vh, rows, stride_vt, offs_v, T, D_V).to(acc)
        dq_s += tl.dot(do, tl.trans(s), input_precision=DOT_PRECISION)
        dp += tl.dot(do, tl.trans(w), input_precision=DOT_PRECISION)
        dke += tl.dot(w, tl.trans(ds), input_precision=DOT_PRECISION)
        dkd -= tl.dot(dw, tl.trans(s), input_precision=DOT_PRECISION)
        dm_inv += tl.dot(dw, tl.trans(v * beta[:, None]), input_precision=DOT_PRECISION)
        dbv = tl.dot(tl.trans(m_inv), dw, input_precision=DOT_PRECISION)  # d(b V), (C, BLOCK_V)
        _store_tile(DV + bh * T * D_V, dbv * beta[:, None], rows, D_V, offs_v, T, D_V)
        dbeta_v += tl.sum(dbv * v, 1)
        s_ds += tl.sum(s * ds, 1)
    return dq_s, dp, dke, dkd, dm_inv, dbeta_v, s_ds


@triton.jit
def _solve_backward(k, beta, g, m_inv, dm_inv, dkd, CHUNK: tl.constexpr, DOT_PRECISION: tl.constexpr):
    """Gradients through Kd = M^-1 (b e^g K) and through M^-1 itself, M = I + diag(b) (G * K K^T, strictly lower),
    given dM^-1 without Kd's part and dKd. Returns (dk, dbeta, dg) contributions."""
    be = beta * tl.exp(g)
    k_be = k * be[:, None]
    dm_inv += tl.dot(dkd, tl.trans(k_be), input_precision=DOT_PRECISION)
    dk_be = tl.dot(tl.trans(m_inv), dkd, input_precision=DOT_PRECISION)  # d(b e^g K), (C, BLOCK_DK)
    dk = dk_be * be[:, None]
    dk_be_k = tl.sum(dk_be * k, 1)
    dbeta = dk_be_k * tl.exp(g)
    dg = dk_be_k * be
    # X = M^-1: dM = -X^T dX X^T; N = diag(b) L is M's strictly lower part.
    dm = -tl.dot(tl.trans(m_inv), tl.dot(dm_inv, tl.trans(m_inv), input_precision=DOT_PRECISION),
                 input_precision=DOT_PRECISION)
    # Only dM's strictly lower entries are N's; the others meet only the zeros of decay and L on and above the
    # diagonal below, so they need no mask.
    decay = _decay(g, CHUNK, False)
    lower = tl.dot(k, tl.trans(k), input_precision=DOT_PRECISION) * decay  # L
    dbeta += tl.sum(dm * lower, 1)
    d_lower = dm * beta[:, None]
    dkkt = d_lower * decay
    dk += tl.dot(dkkt, k, input_precision=DOT_PRECISION) + tl.dot(tl.trans(dkkt), k, input_precision=DOT_PRECISION)
    r = d_lower * lower  # G_ij = exp(g_i - g_j): +g_i, -g_j
    dg += tl.sum(r, 1) - tl.sum(r, 0)
    return dk, dbeta, dg


@triton.jit
def _grad_kernel(Q, K, V, BETA, G, M_INV, HS, DH, WS, DW, DO, DQ, DK, DV, DBETA, DLOG_A, stride_qb, stride_qh,
                 stride_qt, stride_kb, stride_kh, stride_kt, stride_vb, stride_vh, stride_vt, T, n_heads, n_chunks,
                 D_K: tl.constexpr, D_V: tl.constexpr, BLOCK_DK: tl.constexpr, BLOCK_V: tl.constexpr,
                 CHUNK: tl.constexpr, DOT_PRECISION: tl.constexpr):
    """Every gradient but the states', one program per (chunk, batch * head), from the chunk's inputs, its entering
    state S and dS' (HS, DH), its W and dW (WS, DW) and dO. See the derivation above."""
    c = tl.program_id(0)
    b, h = _batch_and_head(tl.program_id(1), n_heads)
    bh = b * n_heads + h
    idx = tl.arange(0, CHUNK)
    rows = c * CHUNK + idx
    offs_dk = tl.arange(0, BLOCK_DK)
    acc = G.dtype.element_ty
    q = _load_tile(Q + b * stride_qb + h * stride_qh, rows, stride_qt, offs_dk, T, D_K).to(acc)  # (C, BLOCK_DK)
    k = _load_tile(K + b * stride_kb + h * stride_kh, rows, stride_kt, offs_dk, T, D_K).to(acc)
    beta = tl.load(BETA + bh * T + rows, mask=rows < T, other=0.0).to(acc)
    g, g_last = _chunk_g(G, bh, c, n_chunks, CHUNK)
    m_inv = _load_tile(M_INV + bh * T * CHUNK, rows, CHUNK, idx, T, CHUNK)  # (C, C)
    dq_s, dp, dke, dkd, dm_inv, dbeta, s_ds = _sums_over_d_v(
        V, HS, DH, WS, DW, DO, DV, beta, m_inv, b, h, bh, c, rows, stride_vb, stride_vh, stride_vt, T, n_chunks,
        D_K, D_V, BLOCK_DK, BLOCK_V, CHUNK, DOT_PRECISION)
    # O = e^g Q S + P W, P = G * Q K^T
    decay = _decay(g, CHUNK, True)
    dq = dq_s * tl.exp(g)[:, None]
    dg = tl.sum(dq * q, 1)  # e^g's share: sum_v dO (e^g Q S)
    dp_decay = dp * decay
    dq += tl.dot(dp_decay, k, input_precision=DOT_PRECISION)
    dk = tl.dot(tl.trans(dp_decay), q, input_precision=DOT_PRECISION)
    r = dp_decay * tl.dot(q, tl.trans(k), input_precision=DOT_PRECISION)  # dP * P
    dg += tl.sum(r, 1) - tl.sum(r, 0)
    # S' = e^{g_C} S + Ke^T W, Ke = e^{g_C - g} K
    to_end = tl.exp(g_last - g)
    dk += dke * to_end[:, None]
    r_end = tl.sum(dke * k, 1) * to_end
    dg -= r_end
    dg_last = tl.exp(g_last) * tl.sum(s_ds, 0) + tl.sum(r_end, 0)
    # Kd and M^-1
    dk_solve, dbeta_solve, dg_solve = _solve_backward(k, beta, g, m_inv, dm_inv, dkd, CHUNK, DOT_PRECISION)
    dk += dk_solve
    dbeta += dbeta_solve
    dg += dg_solve + tl.where(idx == CHUNK - 1, dg_last, 0.0)  # g_C is the chunk's last g (padding rows' too)
    _store_tile(DQ + bh * T * D_K, dq, rows, D_K, offs_dk, T, D_K)
    _store_tile(DK + bh * T * D_K, dk, rows, D_K, offs_dk, T, D_K)
    tl.store(DBETA + bh * T + rows, dbeta.to(DBETA.dtype.element_ty), mask=rows < T)
    d_log_a = tl.cumsum(dg, 0, reverse=True)
    tl.store(DLOG_A + bh * T + rows, d_log_a.to(DLOG_A.dtype.element_ty), mask=rows < T)


# ----------------------------------------------------------------------------------------------------
# Launching


def _block_v(d_k: int) -> int:
    """d_v columns per program (state kernels) or per step (the others). The state kernels hold a (d_k, BLOCK_V)
    fp32 state and its chunk's (C, d_k) keys in registers. The GPU values are first choices, not measured (this
    project's CPU machines have no GPU): bench/gated_delta_rule.py times them. In the interpreter 16, so that the
    tests' d_v = 32 spans two tiles."""
    if INTERPRETED:
        return 16
    return 64 if _pad(d_k) <= 64 else 32


NUM_WARPS = 4
GRAD_NUM_WARPS = 8  # _grad_kernel holds the most: q, k, three (C, d_k) sums, dq, dk and four (C, C) tiles
# One stage: the loops' loads are not software-pipelined. Each stage of a state kernel's loop would hold the chunk's
# fp32 keys and Kd (2 x 32 KB at C = 64, d_k = 128) in shared memory, so a few of them would not fit on an A100 (163
# KB per block). The first thing to tune on a GPU, with the tile width, when bench/gated_delta_rule.py says so.
NUM_STAGES = 1


def _dot_precision(dtype: torch.dtype) -> str:
    # All products are of fp32 values (fp64 for gradcheck). Plain TF32 keeps 10 bits of mantissa; "tf32x3" sums three
    # TF32 products of split operands, close to fp32 (as cuBLAS's 3xTF32), and is used for fp32 inputs. bf16 and fp16
    # inputs carry 8 or 11 bits in the first place, so TF32 products cost them little. fp64 needs "ieee".
    if dtype == torch.float64:
        return "ieee"
    return "tf32x3" if dtype == torch.float32 else "tf32"


class _Shape:
    """Sizes and launch constants of one call, shared by the forward and backward launches."""

    def __init__(self, q, v, chunk):
        self.device = q.device
        self.B, self.H, self.T, self.d_k = q.shape
        self.d_v = v.size(3)
        self.chunk = chunk
        self.n_chunks = triton.cdiv(self.T, chunk)
        self.acc = torch.float64 if q.dtype == torch.float64 else torch.float32
        self.block_v = _block_v(self.d_k)
        self.meta = dict(D_K=self.d_k, D_V=self.d_v, BLOCK_DK=_pad(self.d_k), BLOCK_V=self.block_v, CHUNK=chunk,
                         DOT_PRECISION=_dot_precision(q.dtype))

    def scratch(self, *sizes):
        return torch.empty(self.B, self.H, *sizes, device=self.device, dtype=self.acc)

    def chunk_grid(self):
        return self.n_chunks, self.B * self.H

    def v_tile_grid(self):
        return triton.cdiv(self.d_v, self.block_v), self.B * self.H


def _strides(x):
    return x.stride(0), x.stride(1), x.stride(2)


def _prepare(sh, k, v, log_a, beta, g, m_inv, solve):
    """Stages 1-2: fills g and m_inv if solve, else reads them; returns U (B, H, T, d_v) and Kd (B, H, T, d_k)."""
    u, kd = sh.scratch(sh.T, sh.d_v), sh.scratch(sh.T, sh.d_k)
    _prepare_kernel[sh.chunk_grid()](k, v, log_a, beta, g, m_inv, u, kd, *_strides(k), *_strides(v), sh.T, sh.H,
                                     sh.n_chunks, SOLVE=solve, num_warps=NUM_WARPS, num_stages=NUM_STAGES, **sh.meta)
    return u, kd


def _states(sh, k, g, u, kd, state):
    """Stage 3: each chunk's entering state (B, H, n_chunks, d_k, d_v), W (B, H, T, d_v) and the final state."""
    hs, ws = sh.scratch(sh.n_chunks, sh.d_k, sh.d_v), sh.scratch(sh.T, sh.d_v)
    final = sh.scratch(sh.d_k, sh.d_v)
    _state_kernel[sh.v_tile_grid()](k, g, u, kd, state, hs, ws, final, *_strides(k), sh.T, sh.H, sh.n_chunks,
                                    num_warps=NUM_WARPS, num_stages=NUM_STAGES, **sh.meta)
    return hs, ws, final


def _forward(sh, q, k, v, log_a, beta, state):
    """Returns o, the final state, and what the backward keeps: g (B, H, n_chunks * C) and M^-1 (B, H, T, C)."""
    g, m_inv = sh.scratch(sh.n_chunks * sh.chunk), sh.scratch(sh.T, sh.chunk)
    u, kd = _prepare(sh, k, v, log_a, beta, g, m_inv, solve=True)
    hs, ws, final = _states(sh, k, g, u, kd, state)
    o = torch.empty(sh.B, sh.H, sh.T, sh.d_v, device=q.device, dtype=q.dtype)
    _output_kernel[sh.chunk_grid()](q, k, g, hs, ws, o, *_strides(q), *_strides(k), sh.T, sh.H, sh.n_chunks,
                                    num_warps=NUM_WARPS, num_stages=NUM_STAGES, **sh.meta)
    return o, final, g, m_inv


def _backward(sh, do, dht, q, k, v, log_a, beta, state, g, m_inv):
    """Returns dq, dk, dv, dlog_a, dbeta (each like its input) and the initial state's gradient (compute dtype)."""
    u, kd = _prepare(sh, k, v, log_a, beta, g, m_inv, solve=False)
    hs, ws, _ = _states(sh, k, g, u, kd, state)
    del u  # W = U - Kd S holds what the gradients need of it; Kd goes after the next kernel
    dh, dw = sh.scratch(sh.n_chunks, sh.d_k, sh.d_v), sh.scratch(sh.T, sh.d_v)
    dh0 = sh.scratch(sh.d_k, sh.d_v)
    _state_backward_kernel[sh.v_tile_grid()](q, k, g, kd, do, dht, dh, dw, dh0, *_strides(q), *_strides(k), sh.T,
                                             sh.H, sh.n_chunks, num_warps=NUM_WARPS, num_stages=NUM_STAGES, **sh.meta)
    del kd
    dq = torch.empty(q.shape, device=q.device, dtype=q.dtype)
    dk = torch.empty(k.shape, device=q.device, dtype=k.dtype)
    dv = torch.empty(v.shape, device=q.device, dtype=v.dtype)
    dbeta, dlog_a = torch.empty_like(beta), torch.empty_like(log_a)
    _grad_kernel[sh.chunk_grid()](q, k, v, beta, g, m_inv, hs, dh, ws, dw, do, dq, dk, dv, dbeta, dlog_a,
                                  *_strides(q), *_strides(k), *_strides(v), sh.T, sh.H, sh.n_chunks,
                                  num_warps=GRAD_NUM_WARPS, num_stages=NUM_STAGES, **sh.meta)
    return dq, dk, dv, dlog_a, dbeta, dh0


class ChunkGatedDeltaRule(torch.autograd.Function):
    """Saves the inputs, g and M^-1; the backward recomputes U, Kd, the chunk states and W (module docstring)."""

    @staticmethod
    def forward(ctx, q, k, v, log_a, beta, state, chunk_size):
        sh = _Shape(q, v, chunk_size)
        has_state = state is not None
        if not has_state:
            state = q.new_zeros(sh.B, sh.H, sh.d_k, sh.d_v, dtype=sh.acc)
        o, final, g, m_inv = _forward(sh, q, k, v, log_a, beta, state)
        ctx.save_for_backward(q, k, v, log_a, beta, state, g, m_inv)
        ctx.shape, ctx.has_state = sh, has_state
        return o, final

    @staticmethod
    def backward(ctx, do, dht):
        # Unused outputs arrive as zeros (autograd materialises them), so one code path serves every loss.
        q, k, v, log_a, beta, state, g, m_inv = ctx.saved_tensors
        dq, dk, dv, dlog_a, dbeta, dh0 = _backward(ctx.shape, do.contiguous(), dht.contiguous(), q, k, v, log_a,
                                                   beta, state, g, m_inv)
        return dq, dk, dv, dlog_a, dbeta, dh0.to(state.dtype) if ctx.has_state else None, None


def chunk_gated_delta_rule(q, k, v, log_a, beta, state=None, chunk_size=64):
    """linear_attention.gated_delta_rule_chunked (with the delta rule) in Triton, differentiable in every input.

    q, k (B, H, T, d_k); v (B, H, T, d_v); log_a, beta (B, H, T), log_a <= 0 the log of the decay; state (B, H, d_k,
    d_v) or None (zeros). Head dims up to 256; chunk_size one of CHUNK_SIZES; any T >= 1 (the last chunk may be
    partial). fp16, bf16, fp32 or fp64 inputs, fp32 arithmetic (fp64 for fp64). Returns o (B, H, T, d_v) in q's dtype
    and the final state (B, H, d_k, d_v) in the arithmetic's dtype. Gradients flow from both.
    """
    if q.dim() != 4 or k.shape != q.shape or v.dim() != 4 or v.shape[:3] != q.shape[:3]:
        raise ValueError(f"q, k must be (B, H, T, d_k) and v (B, H, T, d_v), got {tuple(q.shape)}, {tuple(k.shape)}, "
                         f"{tuple(v.shape)}")
    B, H, T, d_k = q.shape
    d_v = v.size(3)
    if log_a.shape != (B, H, T) or beta.shape != (B, H, T):
        raise ValueError(f"log_a and beta must be (B, H, T) = {(B, H, T)}, got {tuple(log_a.shape)}, "
                         f"{tuple(beta.shape)}")
    if state is not None and state.shape != (B, H, d_k, d_v):
        raise ValueError(f"state must be (B, H, d_k, d_v) = {(B, H, d_k, d_v)}, got {tuple(state.shape)}")
    if T < 1 or max(d_k, d_v) > 256:
        raise ValueError(f"T must be at least 1 and head dims at most 256, got T={T}, d_k={d_k}, d_v={d_v}")
    if chunk_size not in CHUNK_SIZES:
        raise ValueError(f"chunk_size must be one of {CHUNK_SIZES}, got {chunk_size}")
    floats = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
    tensors = [q, k, v, log_a, beta] + ([] if state is None else [state])
    if any(t.dtype not in floats for t in tensors):
        raise ValueError(f"inputs must be floating point ({floats}), got {[t.dtype for t in tensors]}")
    if not q.is_cuda and not INTERPRETED:
        raise RuntimeError("chunk_gated_delta_rule needs CUDA tensors, or TRITON_INTERPRET=1 set before importing "
                           "myllm_kernels")
    q, k, v = _unit_last_stride(q), _unit_last_stride(k), _unit_last_stride(v)
    # The gates and the state are small (T or d_k d_v numbers per head): contiguous, they need no stride arguments.
    log_a, beta = log_a.contiguous(), beta.contiguous()
    state = None if state is None else state.contiguous()
    return ChunkGatedDeltaRule.apply(q, k, v, log_a, beta, state, chunk_size)
