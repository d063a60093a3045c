"""
Flash attention (FlashAttention-2, Dao 2023) forward and backward in Triton, with grouped-query heads,
sliding windows, packed documents, attention sinks, block-sparse masks and different q.k and v head dims.

    from myllm_kernels import flash_attention
    out = flash_attention(q, k, v, causal=True)   # q (B, n_head, T, d_qk), k (B, n_kv_head, T, d_qk),
                                                  # v (B, n_kv_head, T, d_v) -> out (B, n_head, T, d_v)
    out = flash_attention(q, k, v, doc_ids=doc_ids)  # doc_ids (B, T): several documents packed in each row
    out = flash_attention(q, k, v, sinks=sinks)      # sinks (n_head,): a learned logit per head, without a value
    out = flash_attention(q, k, v, block_mask=block_mask_of(allowed, 64))  # visit only the tiles listed (BlockMask)

On a CPU, set TRITON_INTERPRET=1 before importing this module and the same kernels run in Triton's
interpreter (slowly: one program after another); tests/test_kernels.py does that.

The one idea to understand first: softmax(S) V can be computed one block of keys at a time without ever
holding the (T, T) score matrix S, by keeping per query row the running maximum m and the running sum l
of exp(s - m). When a new block raises the maximum from m to m', everything accumulated so far was
computed relative to m, so it is rescaled by exp(m - m') ("online softmax", Milakov & Gimelshein 2018).
Memory drops from O(T^2) to O(T), and no (T, T) matrix ever travels to GPU memory and back, which is
what makes it fast: unfused attention is limited by that memory traffic, not by its arithmetic.

Read tiled_attention in myllm_kernels/attention_reference.py first: the same algorithm in plain PyTorch, with the
same names (m_i, l_i, acc, alpha, base-2 scores, MIN_SCORE) and a Python loop over the query blocks that the GPU
runs as one program each.

Packed documents (FlashAttention's "variable-length" mode, in our (B, heads, T, d) layout): doc_ids (B, T) numbers
the documents packed one after another in each row, and a query attends only to keys of its own document. The
kernels name each position's document by its first position (doc_start, computed once from doc_ids) and mask pairs
whose names differ. Because a document is one contiguous run, a block of queries needs no key before the start of
its first query's document nor after the end of its last query's, and those blocks are never visited: the work is
then the sum of the documents' squared lengths instead of T^2, so a row packed with short documents costs about
what those documents cost alone.

Attention sinks (gpt-oss): each head h has one more logit sinks[h] in every row's softmax, a key with no value, so
p_ij = exp(s_ij) / (exp(sinks[h]) + sum_j exp(s_ij)) and the weights on the keys sum to less than one. In the online
softmax that is a key seen before the first block: the forward starts each row at m = sinks[h] (base 2) and l = 1
instead of m = MIN_SCORE and l = 0, with acc still 0, and the log-sum-exp it saves then includes the sink. Given
that LSE the backward's dQ, dK, dV are unchanged, and the sink's gradient is a sum over rows of values the backward
already holds (see _sink_grad).

Conventions used by every kernel below:
- One program handles one tile: BLOCK_M query rows or BLOCK_N key rows of one (batch, head).
- Scores are kept in base 2: s2 = q.k * softmax_scale * log2(e), so exp(s) = exp2(s2). exp2 is the
  GPU's native instruction (exp costs an extra multiply), and the log2(e) factor is folded into the one
  multiply by the scale that the scores need anyway.
- Head dims are padded to a power of two (tl.arange needs one) with masked, zero-filled columns: a zero
  column adds nothing to q.k or to p @ v. Rows past the sequence end are masked the same way.
- Grouped-query attention: query head h reads key/value head h // group, with group = n_head // n_kv_head,
  directly through pointers, so K and V are never copied per query head.
"""

import functools
import math
import os
from typing import NamedTuple

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

# Read once, when the kernels are defined: @triton.jit decides interpreter or compiler at that moment.
INTERPRETED = os.environ.get("TRITON_INTERPRET") == "1"
LOG2_E = 1.4426950408889634
# Finite, not -inf: a row whose first key block is entirely masked (a sliding window starting inside a
# block, or a block shared with an earlier document) then computes exp2(-inf - m) = 0 and exp2(m - m) = 1,
# where -inf would give exp2(-inf + inf) = NaN. Every row sees at least itself, so none stays at MIN_SCORE.
MIN_SCORE = tl.constexpr(-1.0e30)


def available() -> bool:
    """Whether flash_attention can run here: a CUDA GPU, or Triton's CPU interpreter enabled at import."""
    return torch.cuda.is_available() or INTERPRETED


# ----------------------------------------------------------------------------------------------------
# Helpers shared by the kernels


@triton.jit
def _load_tile(base, rows, stride_row, cols, n_rows, N_COLS: tl.constexpr):
    """The (len(rows), len(cols)) tile of a (n_rows, N_COLS) matrix with rows stride_row apart and adjacent
    columns; zeros outside it (rows past the sequence end, padding columns of the head dim)."""
    mask = (rows[:, None] < n_rows) & (cols[None, :] < N_COLS)
    return tl.load(base + rows[:, None] * stride_row + cols[None, :], mask=mask, other=0.0)


@triton.jit
def _store_tile(base, tile, rows, stride_row, cols, n_rows, N_COLS: tl.constexpr):
    mask = (rows[:, None] < n_rows) & (cols[None, :] < N_COLS)
    tl.store(base + rows[:, None] * stride_row + cols[None, :], tile.to(base.dtype.element_ty), mask=mask)


@triton.jit
def _batch_and_head(bh, n_heads):
    """Batch and head of a grid index bh = batch * n_heads + head, in int64: batch * stride passes 2^31
    elements in large inputs, where int32 pointer offsets would wrap."""
    return (bh // n_heads).to(tl.int64), (bh % n_heads).to(tl.int64)


@triton.jit
def _allowed(q_idx, k_idx, T, window, DOC_START, b, CAUSAL: tl.constexpr, HAS_DOCS: tl.constexpr):
    """Which (query, key) pairs take part: both inside the sequence and, for causal attention, the key
    neither in the query's future nor older than its last `window` positions (window = T: no window); with
    packed documents, also both in the same document of batch row b, i.e. with the same first position.
    q_idx and k_idx broadcast against each other, so one function serves (M, N) and (N, M) tiles."""
    ok = (q_idx < T) & (k_idx < T)
    if CAUSAL:
        ok = ok & (k_idx <= q_idx) & (k_idx > q_idx - window)
    if HAS_DOCS:
        doc_row = DOC_START + b * T
        q_doc = tl.load(doc_row + q_idx, mask=q_idx < T, other=0)
        k_doc = tl.load(doc_row + k_idx, mask=k_idx < T, other=0)
        ok = ok & (q_doc == k_doc)
    return ok


@triton.jit
def _narrow_range(lo, full_lo, full_hi, hi, first, last, DOC_START, DOC_END, b, T, HAS_DOCS: tl.constexpr,
                  BLOCK: tl.constexpr):
    """The end that _key_range and _query_range share: with packed documents, narrow the range [lo, hi) of
    positions on the other side (keys of a query block, or queries of a key block), in blocks of BLOCK, to the
    documents of this block's positions first .. last; then fit the unmasked part [full_lo, full_hi) inside.

    Doc ids never decrease along T, so the block's documents are the run from first's document to last's:
    nothing before first's document starts, nothing after last's ends. A whole other-side block needs no mask
    only if it lies inside every one of the block's documents: from the start of last's to the end of first's
    (empty when the block holds a document boundary).
    """
    if HAS_DOCS:
        row_start, row_end = DOC_START + b * T, DOC_END + b * T
        lo = tl.maximum(lo, tl.load(row_start + first) // BLOCK * BLOCK)
        hi = tl.minimum(hi, tl.load(row_end + last))
        full_lo = tl.maximum(full_lo, tl.cdiv(tl.load(row_start + last), BLOCK) * BLOCK)
        full_hi = tl.minimum(full_hi, tl.load(row_end + first) // BLOCK * BLOCK)
    full_lo = tl.minimum(tl.maximum(full_lo, lo), hi)
    full_hi = tl.minimum(tl.maximum(full_hi, full_lo), hi)
    return lo, full_lo, full_hi, hi


@triton.jit
def _key_range(start_m, T, window, DOC_START, DOC_END, b, CAUSAL: tl.constexpr, HAS_DOCS: tl.constexpr,
               BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """Keys [lo, hi) that queries start_m .. start_m + BLOCK_M - 1 attend to, and its middle part
    [full_lo, full_hi) of whole key blocks where every pair is allowed, so those blocks skip the mask.

    Visiting only [lo, hi) is what makes causal attention half the work: the key blocks above the
    diagonal, and with a window the blocks before it, are never loaded; with packed documents, neither are
    the blocks of other documents, which is what makes the cost the sum of squared document lengths, not
    T^2. Every bound is a multiple of BLOCK_N or equals hi, so the three loops [lo, full_lo),
    [full_lo, full_hi), [full_hi, hi) tile it.
    """
    last_q = tl.minimum(start_m + BLOCK_M, T) - 1
    if CAUSAL:
        lo = tl.maximum(start_m - window + 1, 0) // BLOCK_N * BLOCK_N  # the first query's oldest key
        hi = last_q + 1  # no query sees past itself
        # Unmasked blocks: the first key is inside the last query's window, the last key is not after
        # the first query.
        full_lo = tl.cdiv(tl.maximum(last_q - window + 1, 0), BLOCK_N) * BLOCK_N
        full_hi = (start_m + 1) // BLOCK_N * BLOCK_N
    else:
        lo = 0
        hi = T
        full_lo = 0
        full_hi = T // BLOCK_N * BLOCK_N  # only the last, partial block needs the sequence-end mask
    return _narrow_range(lo, full_lo, full_hi, hi, start_m, last_q, DOC_START, DOC_END, b, T, HAS_DOCS, BLOCK_N)


@triton.jit
def _query_range(start_n, T, window, DOC_START, DOC_END, b, CAUSAL: tl.constexpr, HAS_DOCS: tl.constexpr,
                 BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """The mirror of _key_range for the dK/dV kernel: queries [lo, hi) that attend to keys
    start_n .. start_n + BLOCK_N - 1, and the whole query blocks [full_lo, full_hi) that need no mask. Sharing
    a document is symmetric, so documents narrow it as they narrow _key_range."""
    last_k = tl.minimum(start_n + BLOCK_N, T) - 1
    if CAUSAL:
        lo = start_n // BLOCK_M * BLOCK_M  # earlier queries cannot see the block's first key
        hi = tl.minimum(last_k + window, T)  # query last_k + window - 1 is the last to reach last_k
        full_lo = tl.cdiv(last_k, BLOCK_M) * BLOCK_M
        full_hi = tl.minimum((start_n + window) // BLOCK_M, T // BLOCK_M) * BLOCK_M
    else:
        lo = 0
        hi = T
        full_lo = 0
        full_hi = T // BLOCK_M * BLOCK_M
    return _narrow_range(lo, full_lo, full_hi, hi, start_n, last_k, DOC_START, DOC_END, b, T, HAS_DOCS, BLOCK_M)


@triton.jit
def _chosen_rows(chosen_base, offs_m, stride_ct, key_block, T):
    """Which of the query rows offs_m take key block key_block (a BlockMask's chosen, int8 per row and block)."""
    return tl.load(chosen_base + offs_m * stride_ct + key_block, mask=offs_m < T, other=0) != 0


# ----------------------------------------------------------------------------------------------------
# Forward: O = softmax(Q K^T * scale) V, and the log-sum-exp of every score row for the backward.


@triton.jit
def _forward_loop(acc, m_i, l_i, q, k_base, v_base, stride_kt, stride_vt, offs_m, offs_dqk, offs_dv, keep,
                  start, end, T, window, DOC_START, b, qk_scale, D_QK: tl.constexpr, D_V: tl.constexpr,
                  CAUSAL: tl.constexpr, HAS_DOCS: tl.constexpr, MASKED: tl.constexpr, BLOCK_N: tl.constexpr,
                  DOT_PRECISION: tl.constexpr):
    """Fold key blocks start .. end into one query block's running softmax. keep (BLOCK_M,): the rows that take
    these keys at all (a block mask's chosen; all rows otherwise), applied with the mask of masked blocks.

    Carried per query row: m_i, the largest score so far (base 2); l_i, the sum of exp2(s2 - m_i) over the
    keys so far; acc, the sum of exp2(s2 - m_i) * v over the same keys. acc / l_i is the attention output
    over the keys seen so far, so after the last block it is the answer.
    """
    for start_n in range(start, end, BLOCK_N):
        offs_n = start_n + tl.arange(0, BLOCK_N)
        k = _load_tile(k_base, offs_n, stride_kt, offs_dqk, T, D_QK)  # (BLOCK_N, BLOCK_DQK)
        s = tl.dot(q, tl.trans(k), input_precision=DOT_PRECISION) * qk_scale  # (BLOCK_M, BLOCK_N), base 2
        if MASKED:
            s = tl.where(_allowed(offs_m[:, None], offs_n[None, :], T, window, DOC_START, b, CAUSAL, HAS_DOCS)
                         & keep[:, None], s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))
        # Rescale what was accumulated relative to the old maximum; subtracting the maximum keeps every
        # exp2 at most 1, so nothing overflows even in fp16 scores.
        alpha = tl.exp2(m_i - m_new)
        p = tl.exp2(s - m_new[:, None])  # (BLOCK_M, BLOCK_N), masked pairs exactly 0
        l_i = l_i * alpha + tl.sum(p, 1)
        v = _load_tile(v_base, offs_n, stride_vt, offs_dv, T, D_V)  # (BLOCK_N, BLOCK_DV)
        # p goes to the tensor cores in the input precision (fp16/bf16), as in FlashAttention; acc stays fp32.
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=DOT_PRECISION)
        m_i = m_new
    return acc, m_i, l_i


@triton.jit
def _forward_kernel(Q, K, V, O, LSE, DOC_START, DOC_END, SINKS, KV_BLOCKS, CHOSEN,
                    stride_qb, stride_qh, stride_qt, stride_kb, stride_kh, stride_kt,
                    stride_vb, stride_vh, stride_vt, stride_ob, stride_oh, stride_ot,
                    stride_lb, stride_lh, stride_lq, stride_cb, stride_ch, stride_ct,
                    T, n_head, group, window, qk_scale,
                    D_QK: tl.constexpr, D_V: tl.constexpr, BLOCK_DQK: tl.constexpr, BLOCK_DV: tl.constexpr,
                    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, CAUSAL: tl.constexpr, HAS_DOCS: tl.constexpr,
                    HAS_SINKS: tl.constexpr, HAS_LISTS: tl.constexpr, HAS_CHOSEN: tl.constexpr,
                    DOT_PRECISION: tl.constexpr):
    """One program per (query block, batch * head). DOC_START and DOC_END, (B, T) int32 (None without
    documents): the first position of each position's document and one past its last. SINKS, (n_head,) fp32
    (None without sinks): each head's sink logit in base 2. KV_BLOCKS and CHOSEN: a BlockMask's kv_blocks and
    chosen (None without one)."""
    # Causal query blocks near the end see the most keys; starting them first shortens the tail of the grid.
    start_m = (tl.num_programs(0) - 1 - tl.program_id(0)) * BLOCK_M
    bh = tl.program_id(1)
    b, h = _batch_and_head(bh, n_head)
    q_base = Q + b * stride_qb + h * stride_qh
    k_base = K + b * stride_kb + (h // group) * stride_kh
    v_base = V + b * stride_vb + (h // group) * stride_vh
    offs_m = start_m + tl.arange(0, BLOCK_M)
    offs_dqk = tl.arange(0, BLOCK_DQK)
    offs_dv = tl.arange(0, BLOCK_DV)

    q = _load_tile(q_base, offs_m, stride_qt, offs_dqk, T, D_QK)  # (BLOCK_M, BLOCK_DQK), loaded once
    if HAS_SINKS:
        # The sink as the first key seen: the maximum so far is its logit, exp2(sink - m) = 1, and it adds no value.
        m_i = tl.zeros([BLOCK_M], tl.float32) + tl.load(SINKS + h)
        l_i = tl.full([BLOCK_M], 1.0, tl.float32)
    else:
        m_i = tl.full([BLOCK_M], MIN_SCORE, tl.float32)
        l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_DV], tl.float32)
    keep = offs_m >= 0  # every row
    if HAS_LISTS:  # block-sparse: the listed key blocks only, each one masked
        listed = KV_BLOCKS + b * stride_lb + h * stride_lh + (start_m // BLOCK_M) * stride_lq
        for j in range(tl.load(listed)):
            start_n = tl.load(listed + 1 + j) * BLOCK_N
            if HAS_CHOSEN:
                keep = _chosen_rows(CHOSEN + b * stride_cb + h * stride_ch, offs_m, stride_ct, start_n // BLOCK_N, T)
            acc, m_i, l_i = _forward_loop(acc, m_i, l_i, q, k_base, v_base, stride_kt, stride_vt, offs_m, offs_dqk,
                                          offs_dv, keep, start_n, start_n + BLOCK_N, T, window, DOC_START, b,
                                          qk_scale, D_QK, D_V, CAUSAL, HAS_DOCS, True, BLOCK_N, DOT_PRECISION)
    else:
        lo, full_lo, full_hi, hi = _key_range(start_m, T, window, DOC_START, DOC_END, b, CAUSAL, HAS_DOCS, BLOCK_M,
                                              BLOCK_N)
        acc, m_i, l_i = _forward_loop(acc, m_i, l_i, q, k_base, v_base, stride_kt, stride_vt, offs_m, offs_dqk,
                                      offs_dv, keep, lo, full_lo, T, window, DOC_START, b, qk_scale, D_QK, D_V,
                                      CAUSAL, HAS_DOCS, True, BLOCK_N, DOT_PRECISION)
        acc, m_i, l_i = _forward_loop(acc, m_i, l_i, q, k_base, v_base, stride_kt, stride_vt, offs_m, offs_dqk,
                                      offs_dv, keep, full_lo, full_hi, T, window, DOC_START, b, qk_scale, D_QK, D_V,
                                      CAUSAL, HAS_DOCS, False, BLOCK_N, DOT_PRECISION)
        acc, m_i, l_i = _forward_loop(acc, m_i, l_i, q, k_base, v_base, stride_kt, stride_vt, offs_m, offs_dqk,
                                      offs_dv, keep, full_hi, hi, T, window, DOC_START, b, qk_scale, D_QK, D_V,
                                      CAUSAL, HAS_DOCS, True, BLOCK_N, DOT_PRECISION)
    # A row past the sequence end may have seen no key (l_i = 0): it is not stored, the guard only avoids 0 / 0.
    l_i = tl.where(l_i == 0.0, 1.0, l_i)
    _store_tile(O + b * stride_ob + h * stride_oh, acc / l_i[:, None], offs_m, stride_ot, offs_dv, T, D_V)
    # log2 of the row's softmax denominator, in the base-2 units of s2: exp2(s2 - lse) is the probability.
    tl.store(LSE + bh.to(tl.int64) * T + offs_m, m_i + tl.log2(l_i), mask=offs_m < T)


# ----------------------------------------------------------------------------------------------------
# Backward. With P = softmax(S), O = P V and dO the gradient of the output:
#     dV = P^T dO,   dP = dO V^T,   dS = P * (dP - delta),   dQ = scale * dS K,   dK = scale * dS^T Q,
# where delta_i = sum_j P_ij dP_ij comes from the softmax Jacobian and equals sum_j P_ij (dO_i . v_j) = dO_i . O_i,
# one dot product per row, computed once by _delta_kernel.
# P is never stored: it would be the (T, T) matrix the forward avoided. Each backward tile recomputes its
# block of P from Q, K and the saved log-sum-exp, P_ij = exp2(s2_ij - lse_i), already normalised, which
# costs one extra matmul per block and no memory. dQ sums over keys and dK, dV over queries, so they come
# from two kernels with different loops; each program owns its output tile and writes it once, without
# atomic adds, so the result does not depend on the order in which programs run: it is bit-reproducible.


@triton.jit
def _delta_kernel(O, DO, DELTA, stride_ob, stride_oh, stride_ot, stride_dob, stride_doh, stride_dot,
                  T, n_head, D_V: tl.constexpr, BLOCK_DV: tl.constexpr, BLOCK_M: tl.constexpr):
    """delta = rowsum(dO * O) in fp32, one program per (query block, batch * head)."""
    start_m = tl.program_id(0) * BLOCK_M
    bh = tl.program_id(1)
    b, h = _batch_and_head(bh, n_head)
    offs_m = start_m + tl.arange(0, BLOCK_M)
    offs_dv = tl.arange(0, BLOCK_DV)
    o = _load_tile(O + b * stride_ob + h * stride_oh, offs_m, stride_ot, offs_dv, T, D_V)
    do = _load_tile(DO + b * stride_dob + h * stride_doh, offs_m, stride_dot, offs_dv, T, D_V)
    delta = tl.sum(o.to(tl.float32) * do.to(tl.float32), 1)
    tl.store(DELTA + bh.to(tl.int64) * T + offs_m, delta, mask=offs_m < T)


@triton.jit
def _dkdv_loop(dk, dv, k, v, q_base, do_base, lse_base, delta_base, stride_qt, stride_dot, offs_n,
               offs_dqk, offs_dv, keep, start, end, T, window, DOC_START, b, qk_scale, D_QK: tl.constexpr,
               D_V: tl.constexpr, CAUSAL: tl.constexpr, HAS_DOCS: tl.constexpr, MASKED: tl.constexpr,
               BLOCK_M: tl.constexpr, DOT_PRECISION: tl.constexpr):
    """Add query blocks start .. end of one query head to a key block's dK and dV.

    Works on transposed tiles, keys as rows (S^T = K Q^T), so that dV = P^T dO and dK = dS^T Q are plain
    products of what is in registers. dk carries sum_i dS_ij q_i (the scale is applied once at the end),
    dv carries sum_i P_ij dO_i.
    """
    for start_m in range(start, end, BLOCK_M):
        offs_m = start_m + tl.arange(0, BLOCK_M)
        q = _load_tile(q_base, offs_m, stride_qt, offs_dqk, T, D_QK)  # (BLOCK_M, BLOCK_DQK)
        do = _load_tile(do_base, offs_m, stride_dot, offs_dv, T, D_V)  # (BLOCK_M, BLOCK_DV)
        lse = tl.load(lse_base + offs_m, mask=offs_m < T, other=0.0)
        delta = tl.load(delta_base + offs_m, mask=offs_m < T, other=0.0)
        s_t = tl.dot(k, tl.trans(q), input_precision=DOT_PRECISION) * qk_scale  # (BLOCK_N, BLOCK_M)
        if MASKED:
            s_t = tl.where(_allowed(offs_m[None, :], offs_n[:, None], T, window, DOC_START, b, CAUSAL, HAS_DOCS)
                           & keep[None, :], s_t, float("-inf"))
        p_t = tl.exp2(s_t - lse[None, :])  # P^T, the forward's probabilities, recomputed
        dv += tl.dot(p_t.to(do.dtype), do, input_precision=DOT_PRECISION)
        dp_t = tl.dot(v, tl.trans(do), input_precision=DOT_PRECISION)  # (BLOCK_N, BLOCK_M)
        ds_t = p_t * (dp_t - delta[None, :])
        dk += tl.dot(ds_t.to(q.dtype), q, input_precision=DOT_PRECISION)
    return dk, dv


@triton.jit
def _dkdv_kernel(Q, K, V, DO, LSE, DELTA, DK, DV, DOC_START, DOC_END, Q_BLOCKS, CHOSEN,
                 stride_qb, stride_qh, stride_qt, stride_kb, stride_kh, stride_kt,
                 stride_vb, stride_vh, stride_vt, stride_dob, stride_doh, stride_dot,
                 stride_dkb, stride_dkh, stride_dkt, stride_dvb, stride_dvh, stride_dvt,
                 stride_lb, stride_lh, stride_lk, stride_cb, stride_ch, stride_ct,
                 T, n_head, n_kv_head, group, window, qk_scale, softmax_scale,
                 D_QK: tl.constexpr, D_V: tl.constexpr, BLOCK_DQK: tl.constexpr, BLOCK_DV: tl.constexpr,
                 BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, CAUSAL: tl.constexpr, HAS_DOCS: tl.constexpr,
                 HAS_LISTS: tl.constexpr, HAS_CHOSEN: tl.constexpr, DOT_PRECISION: tl.constexpr):
    """One program per (key block, batch * kv head). It loops over the `group` query heads that share this
    kv head, so the group's sum of dK and dV happens in registers: no atomics, no per-head copies. With a block
    mask, each head visits the query blocks of Q_BLOCKS (the transposed lists) for this key block."""
    start_n = tl.program_id(0) * BLOCK_N
    bkv = tl.program_id(1)
    b, kvh = _batch_and_head(bkv, n_kv_head)
    offs_n = start_n + tl.arange(0, BLOCK_N)
    offs_dqk = tl.arange(0, BLOCK_DQK)
    offs_dv = tl.arange(0, BLOCK_DV)
    k = _load_tile(K + b * stride_kb + kvh * stride_kh, offs_n, stride_kt, offs_dqk, T, D_QK)  # (BLOCK_N, BLOCK_DQK)
    v = _load_tile(V + b * stride_vb + kvh * stride_vh, offs_n, stride_vt, offs_dv, T, D_V)  # (BLOCK_N, BLOCK_DV)
    dk = tl.zeros([BLOCK_N, BLOCK_DQK], tl.float32)
    dv = tl.zeros([BLOCK_N, BLOCK_DV], tl.float32)
    lo, full_lo, full_hi, hi = _query_range(start_n, T, window, DOC_START, DOC_END, b, CAUSAL, HAS_DOCS, BLOCK_M,
                                            BLOCK_N)
    keep = tl.arange(0, BLOCK_M) >= 0  # every query row
    for g in range(group):
        h = kvh * group + g
        q_base = Q + b * stride_qb + h * stride_qh
        do_base = DO + b * stride_dob + h * stride_doh
        lse_base = LSE + (b * n_head + h) * T
        delta_base = DELTA + (b * n_head + h) * T
        if HAS_LISTS:
            listed = Q_BLOCKS + b * stride_lb + h * stride_lh + (start_n // BLOCK_N) * stride_lk
            for j in range(tl.load(listed)):
                start_m = tl.load(listed + 1 + j) * BLOCK_M
                if HAS_CHOSEN:
                    keep = _chosen_rows(CHOSEN + b * stride_cb + h * stride_ch, start_m + tl.arange(0, BLOCK_M),
                                        stride_ct, start_n // BLOCK_N, T)
                dk, dv = _dkdv_loop(dk, dv, k, v, q_base, do_base, lse_base, delta_base, stride_qt, stride_dot,
                                    offs_n, offs_dqk, offs_dv, keep, start_m, start_m + BLOCK_M, T, window, DOC_START,
                                    b, qk_scale, D_QK, D_V, CAUSAL, HAS_DOCS, True, BLOCK_M, DOT_PRECISION)
        else:
            dk, dv = _dkdv_loop(dk, dv, k, v, q_base, do_base, lse_base, delta_base, stride_qt, stride_dot, offs_n,
                                offs_dqk, offs_dv, keep, lo, full_lo, T, window, DOC_START, b, qk_scale, D_QK, D_V,
                                CAUSAL, HAS_DOCS, True, BLOCK_M, DOT_PRECISION)
            dk, dv = _dkdv_loop(dk, dv, k, v, q_base, do_base, lse_base, delta_base, stride_qt, stride_dot, offs_n,
                                offs_dqk, offs_dv, keep, full_lo, full_hi, T, window, DOC_START, b, qk_scale, D_QK,
                                D_V, CAUSAL, HAS_DOCS, False, BLOCK_M, DOT_PRECISION)
            dk, dv = _dkdv_loop(dk, dv, k, v, q_base, do_base, lse_base, delta_base, stride_qt, stride_dot, offs_n,
                                offs_dqk, offs_dv, keep, full_hi, hi, T, window, DOC_START, b, qk_scale, D_QK, D_V,
                                CAUSAL, HAS_DOCS, True, BLOCK_M, DOT_PRECISION)
    _store_tile(DK + b * stride_dkb + kvh * stride_dkh, dk * softmax_scale, offs_n, stride_dkt, offs_dqk, T, D_QK)
    _store_tile(DV + b * stride_dvb + kvh * stride_dvh, dv, offs_n, stride_dvt, offs_dv, T, D_V)


@triton.jit
def _dq_loop(dq, q, do, lse, delta, k_base, v_base, stride_kt, stride_vt, offs_m, offs_dqk, offs_dv, keep,
             start, end, T, window, DOC_START, b, qk_scale, D_QK: tl.constexpr, D_V: tl.constexpr,
             CAUSAL: tl.constexpr, HAS_DOCS: tl.constexpr, MASKED: tl.constexpr, BLOCK_N: tl.constexpr,
             DOT_PRECISION: tl.constexpr):
    """Add key blocks start .. end to a query block's dQ, which carries sum_j dS_ij k_j (scale at the end)."""
    for start_n in range(start, end, BLOCK_N):
        offs_n = start_n + tl.arange(0, BLOCK_N)
        k = _load_tile(k_base, offs_n, stride_kt, offs_dqk, T, D_QK)  # (BLOCK_N, BLOCK_DQK)
        v = _load_tile(v_base, offs_n, stride_vt, offs_dv, T, D_V)  # (BLOCK_N, BLOCK_DV)
        s = tl.dot(q, tl.trans(k), input_precision=DOT_PRECISION) * qk_scale  # (BLOCK_M, BLOCK_N)
        if MASKED:
            s = tl.where(_allowed(offs_m[:, None], offs_n[None, :], T, window, DOC_START, b, CAUSAL, HAS_DOCS)
                         & keep[:, None], s, float("-inf"))
        p = tl.exp2(s - lse[:, None])
        dp = tl.dot(do, tl.trans(v), input_precision=DOT_PRECISION)
        ds = p * (dp - delta[:, None])
        dq += tl.dot(ds.to(k.dtype), k, input_precision=DOT_PRECISION)
    return dq


@triton.jit
def _dq_kernel(Q, K, V, DO, LSE, DELTA, DQ, DOC_START, DOC_END, KV_BLOCKS, CHOSEN,
               stride_qb, stride_qh, stride_qt, stride_kb, stride_kh, stride_kt,
               stride_vb, stride_vh, stride_vt, stride_dob, stride_doh, stride_dot,
               stride_dqb, stride_dqh, stride_dqt,
               stride_lb, stride_lh, stride_lq, stride_cb, stride_ch, stride_ct,
               T, n_head, group, window, qk_scale, softmax_scale,
               D_QK: tl.constexpr, D_V: tl.constexpr, BLOCK_DQK: tl.constexpr, BLOCK_DV: tl.constexpr,
               BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, CAUSAL: tl.constexpr, HAS_DOCS: tl.constexpr,
               HAS_LISTS: tl.constexpr, HAS_CHOSEN: tl.constexpr, DOT_PRECISION: tl.constexpr):
    """One program per (query block, batch * head), visiting the same key blocks as the forward."""
    start_m = (tl.num_programs(0) - 1 - tl.program_id(0)) * BLOCK_M  # heaviest causal blocks first
    bh = tl.program_id(1)
    b, h = _batch_and_head(bh, n_head)
    k_base = K + b * stride_kb + (h // group) * stride_kh
    v_base = V + b * stride_vb + (h // group) * stride_vh
    offs_m = start_m + tl.arange(0, BLOCK_M)
    offs_dqk = tl.arange(0, BLOCK_DQK)
    offs_dv = tl.arange(0, BLOCK_DV)
    q = _load_tile(Q + b * stride_qb + h * stride_qh, offs_m, stride_qt, offs_dqk, T, D_QK)
    do = _load_tile(DO + b * stride_dob + h * stride_doh, offs_m, stride_dot, offs_dv, T, D_V)
    lse = tl.load(LSE + bh.to(tl.int64) * T + offs_m, mask=offs_m < T, other=0.0)
    delta = tl.load(DELTA + bh.to(tl.int64) * T + offs_m, mask=offs_m < T, other=0.0)
    dq = tl.zeros([BLOCK_M, BLOCK_DQK], tl.float32)
    keep = offs_m >= 0  # every row
    if HAS_LISTS:
        listed = KV_BLOCKS + b * stride_lb + h * stride_lh + (start_m // BLOCK_M) * stride_lq
        for j in range(tl.load(listed)):
            start_n = tl.load(listed + 1 + j) * BLOCK_N
            if HAS_CHOSEN:
                keep = _chosen_rows(CHOSEN + b * stride_cb + h * stride_ch, offs_m, stride_ct, start_n // BLOCK_N, T)
            dq = _dq_loop(dq, q, do, lse, delta, k_base, v_base, stride_kt, stride_vt, offs_m, offs_dqk, offs_dv,
                          keep, start_n, start_n + BLOCK_N, T, window, DOC_START, b, qk_scale, D_QK, D_V, CAUSAL,
                          HAS_DOCS, True, BLOCK_N, DOT_PRECISION)
    else:
        lo, full_lo, full_hi, hi = _key_range(start_m, T, window, DOC_START, DOC_END, b, CAUSAL, HAS_DOCS, BLOCK_M,
                                              BLOCK_N)
        dq = _dq_loop(dq, q, do, lse, delta, k_base, v_base, stride_kt, stride_vt, offs_m, offs_dqk, offs_dv, keep,
                      lo, full_lo, T, window, DOC_START, b, qk_scale, D_QK, D_V, CAUSAL, HAS_DOCS, True, BLOCK_N,
                      DOT_PRECISION)
        dq = _dq_loop(dq, q, do, lse, delta, k_base, v_base, stride_kt, stride_vt, offs_m, offs_dqk, offs_dv, keep,
                      full_lo, full_hi, T, window, DOC_START, b, qk_scale, D_QK, D_V, CAUSAL, HAS_DOCS, False,
                      BLOCK_N, DOT_PRECISION)
        dq = _dq_loop(dq, q, do, lse, delta, k_base, v_base, stride_kt, stride_vt, offs_m, offs_dqk, offs_dv, keep,
                      full_hi, hi, T, window, DOC_START, b, qk_scale, D_QK, D_V, CAUSAL, HAS_DOCS, True, BLOCK_N,
                      DOT_PRECISION)
    _store_tile(DQ + b * stride_dqb + h * stride_dqh, dq * softmax_scale, offs_m, stride_dqt, offs_dqk, T, D_QK)


# ----------------------------------------------------------------------------------------------------
# Launching


class Tiles(NamedTuple):
    """How one kernel is launched: BLOCK_M query rows by BLOCK_N key rows per step, and the GPU settings."""
    block_m: int
    block_n: int
    num_warps: int
    num_stages: int


# Keyed by the bytes of one padded q row plus one padded v row (fp16 64/64: 256): wider rows make every tile
# bigger in shared memory and registers, so they get smaller tiles. Values: (forward, dK/dV, dQ). The dK/dV
# kernel holds K, V, dK and dV of BLOCK_N keys in registers and streams queries, so it wants a tall BLOCK_N
# and a short BLOCK_M; the dQ kernel the other way round. Chosen for data-center GPUs (A100: 163 KB of shared
# memory per block, H100: 227 KB) from what Triton 3.6 and 3.9 compile for them (shared memory in bounds, few
# or no register spills); `python bench/attention.py --sweep` times the alternatives on a real GPU.
GPU_TILES = {
    256: (Tiles(128, 64, 8, 3), Tiles(32, 128, 8, 3), Tiles(128, 64, 8, 3)),
    512: (Tiles(128, 64, 8, 3), Tiles(16, 128, 8, 3), Tiles(128, 32, 8, 3)),
    768: (Tiles(128, 64, 8, 2), Tiles(16, 128, 8, 2), Tiles(128, 32, 8, 2)),
    1024: (Tiles(64, 32, 4, 3), Tiles(32, 64, 8, 2), Tiles(64, 32, 4, 3)),
    2048: (Tiles(32, 32, 4, 2), Tiles(16, 32, 4, 2), Tiles(32, 32, 4, 2)),
}
# The interpreter runs programs serially, so tile size only trades Python overhead; BLOCK_M != BLOCK_N
# keeps the tests exercising the block-range arithmetic the GPU tiles rely on.
INTERPRETER_TILES = (Tiles(32, 16, 1, 1), Tiles(16, 32, 1, 1), Tiles(32, 16, 1, 1))


@functools.cache
def launch_tiles(d_qk: int, d_v: int, dtype: torch.dtype, device: torch.device) -> tuple[Tiles, Tiles, Tiles]:
    """(forward, dK/dV, dQ) tiles for these head dims and dtype on this device."""
    if INTERPRETED:
        return INTERPRETER_TILES
    row_bytes = (_pad(d_qk) + _pad(d_v)) * dtype.itemsize
    if dtype == torch.float32:
        row_bytes *= 2  # fp32 dots are three TF32 products (see _dot_precision) on split copies of each operand
    max_shared_mem = triton.runtime.driver.active.utils.get_device_properties(device.index or 0)["max_shared_mem"]
    return gpu_tiles(row_bytes, max_shared_mem)


def gpu_tiles(row_bytes: int, max_shared_mem: int) -> tuple[Tiles, Tiles, Tiles]:
    """The GPU_TILES entry for rows of row_bytes on a GPU with max_shared_mem bytes per block."""
    if max_shared_mem < 160 * 1024:  # consumer GPUs (~100 KB): the tiles of rows four times as wide
        row_bytes *= 4
    return GPU_TILES[min((size for size in GPU_TILES if size >= row_bytes), default=max(GPU_TILES))]


def _pad(d: int) -> int:
    """Head-dim block: the next power of two, at least 16 (the smallest tl.dot operand)."""
    return max(16, triton.next_power_of_2(d))


def _strides(x: torch.Tensor) -> tuple[int, int, int]:
    return x.stride(0), x.stride(1), x.stride(2)


def _unit_last_stride(x: torch.Tensor) -> torch.Tensor:
    """The kernels read rows through batch, head and time strides but need each row contiguous."""
    return x if x.stride(-1) == 1 else x.contiguous()


def _dot_precision(dtype: torch.dtype) -> str:
    # fp32 inputs get fp32-accurate products: plain TF32 keeps a 10-bit mantissa (errors near 1e-3), while
    # "tf32x3" splits each operand into a TF32 high part and the remainder and sums three tensor-core products
    # (as cuBLAS's 3xTF32), close to fp32 at a fraction of the cost of scalar fp32 math ("ieee"), which also
    # needs so many registers that it spills. fp32 is the exact path; fp16 and bf16 ignore the setting.
    return "tf32x3" if dtype == torch.float32 else "tf32"


def _list_strides(lists, chosen):
    """The (batch, head, row) strides of a block mask's lists and chosen, zeros where absent."""
    return (*(_strides(lists) if lists is not None else (0, 0, 0)),
            *(_strides(chosen) if chosen is not None else (0, 0, 0)))


def _forward(q, k, v, causal, softmax_scale, window, tiles, doc_start=None, doc_end=None, sinks=None, mask=None):
    """Launch the forward: returns out (B, n_head, T, d_v) and lse (B, n_head, T) fp32, base 2. doc_start and
    doc_end: _document_spans's, or None for no documents; sinks: (n_head,) fp32 logits, or None for no sinks; mask: a
    BlockMask (expanded to B and n_head), or None to visit every key block the causal, window and document masks
    allow."""
    B, n_head, T, d_qk = q.shape
    n_kv_head, d_v = k.size(1), v.size(3)
    # out is laid out (B, T, n_head, d_v) in memory and returned as a (B, n_head, T, d_v) view: the model's
    # next step, y.transpose(1, 2).reshape(B, T, -1), is then free instead of a copy.
    out = q.new_empty(B, T, n_head, d_v).transpose(1, 2)
    lse = torch.empty(B, n_head, T, device=q.device, dtype=torch.float32)
    grid = (triton.cdiv(T, tiles.block_m), B * n_head)
    sinks2 = None if sinks is None else sinks * LOG2_E  # base 2, as the scores
    lists, chosen = (None, None) if mask is None else (mask.kv_blocks, mask.chosen)
    _forward_kernel[grid](q, k, v, out, lse, doc_start, doc_end, sinks2, lists, chosen,
                          *_strides(q), *_strides(k), *_strides(v), *_strides(out), *_list_strides(lists, chosen),
                          T, n_head, n_head // n_kv_head, window, softmax_scale * LOG2_E,
                          D_QK=d_qk, D_V=d_v, BLOCK_DQK=_pad(d_qk), BLOCK_DV=_pad(d_v),
                          BLOCK_M=tiles.block_m, BLOCK_N=tiles.block_n, CAUSAL=causal,
                          HAS_DOCS=doc_start is not None, HAS_SINKS=sinks is not None, HAS_LISTS=lists is not None,
                          HAS_CHOSEN=chosen is not None, DOT_PRECISION=_dot_precision(q.dtype),
                          num_warps=tiles.num_warps, num_stages=tiles.num_stages)
    return out, lse


def _backward(do, q, k, v, out, lse, causal, softmax_scale, window, dkdv_tiles, dq_tiles, doc_start=None,
              doc_end=None, sinks=None, mask=None):
    """Launch the three backward kernels: returns dq, dk, dv, each shaped and laid out like its input, and dsinks
    (n_head,) fp32 (None without sinks)."""
    B, n_head, T, d_qk = q.shape
    n_kv_head, d_v = k.size(1), v.size(3)
    group = n_head // n_kv_head
    delta = torch.empty_like(lse)
    dq, dk, dv = torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)
    kv_lists, q_lists, chosen = (None, None, None) if mask is None else (mask.kv_blocks, mask.q_blocks, mask.chosen)
    common = dict(D_QK=d_qk, D_V=d_v, BLOCK_DQK=_pad(d_qk), BLOCK_DV=_pad(d_v), CAUSAL=causal,
                  HAS_DOCS=doc_start is not None, HAS_LISTS=mask is not None, HAS_CHOSEN=chosen is not None,
                  DOT_PRECISION=_dot_precision(q.dtype))
    _delta_kernel[(triton.cdiv(T, dq_tiles.block_m), B * n_head)](
        out, do, delta, *_strides(out), *_strides(do), T, n_head, D_V=d_v, BLOCK_DV=_pad(d_v),
        BLOCK_M=dq_tiles.block_m)
    dsinks = None if sinks is None else _sink_grad(sinks, lse, delta)
    _dkdv_kernel[(triton.cdiv(T, dkdv_tiles.block_n), B * n_kv_head)](
        q, k, v, do, lse, delta, dk, dv, doc_start, doc_end, q_lists, chosen, *_strides(q),
        *_strides(k), *_strides(v), *_strides(do), *_strides(dk), *_strides(dv), *_list_strides(q_lists, chosen),
        T, n_head, n_kv_head, group, window, softmax_scale * LOG2_E, softmax_scale,
        BLOCK_M=dkdv_tiles.block_m, BLOCK_N=dkdv_tiles.block_n, num_warps=dkdv_tiles.num_warps,
        num_stages=dkdv_tiles.num_stages, **common)
    _dq_kernel[(triton.cdiv(T, dq_tiles.block_m), B * n_head)](
        q, k, v, do, lse, delta, dq, doc_start, doc_end, kv_lists, chosen, *_strides(q),
        *_strides(k), *_strides(v), *_strides(do), *_strides(dq), *_list_strides(kv_lists, chosen),
        T, n_head, group, window, softmax_scale * LOG2_E, softmax_scale,
        BLOCK_M=dq_tiles.block_m, BLOCK_N=dq_tiles.block_n, num_warps=dq_tiles.num_warps,
        num_stages=dq_tiles.num_stages, **common)
    return dq, dk, dv, dsinks


def _sink_grad(sinks, lse, delta):
    """d loss / d sinks[h] = -sum over the head's rows i (all batch rows) of p_sink_i * delta_i.

    The sink's probability in row i is p_sink_i = exp(sinks[h]) / Z_i = exp2(sinks[h] * log2(e) - lse_i), and raising
    its logit scales every key's probability by 1 - p_sink, i.e. dp_ij / dsink = -p_ij p_sink_i; summed against
    dO_i . v_j this is -p_sink_i (dO_i . O_i) = -p_sink_i delta_i. In PyTorch rather than in a kernel: lse and delta
    are (B, n_head, T), already in memory, so this is one elementwise pass and a sum per head, small beside the
    attention itself; a kernel would have to add B * T / BLOCK_M partial sums per head with atomics, whose order
    varies on a GPU, and the backward would no longer be bit-reproducible.
    """
    p_sink = torch.exp2(sinks[:, None] * LOG2_E - lse)  # (B, n_head, T)
    return -(p_sink * delta).sum(dim=(0, 2))


class BlockMask(NamedTuple):
    """Which tiles the kernels visit, as FlexAttention's block masks say it (Dong et al. 2024): the sequence cut
    into blocks of `block` positions, and for each query block the list of key blocks to visit, every other tile
    skipped unread. Each list is a row of kv_blocks, (B or 1, n_head or 1, query blocks, 1 + key blocks) int32: its
    length, then the key blocks in increasing order. The dK/dV kernel walks the other way, one key block per program,
    so it reads the transposed lists, q_blocks (B or 1, n_head or 1, key blocks, 1 + query blocks). Within a
    visited tile the causal, window and document masks still apply, and chosen (B or 1, n_head or 1, T, key blocks)
    int8, or None, can say per query row which listed key blocks it takes (MoBA's per-token choice)."""
    block: int
    kv_blocks: torch.Tensor
    q_blocks: torch.Tensor
    chosen: torch.Tensor | None = None


def block_mask(visit: torch.Tensor, block: int, chosen: torch.Tensor | None = None) -> BlockMask:
    """The BlockMask of visit (B or 1, n_head or 1, query blocks, key blocks) bool, the tiles to visit."""
    def lists(tiles):
        # A stable sort puts the visited blocks (False in ~tiles) first, in increasing order.
        order = (~tiles).to(torch.int8).argsort(dim=-1, stable=True)
        return torch.cat((tiles.sum(dim=-1, keepdim=True), order), dim=-1).to(torch.int32).contiguous()

    return BlockMask(block, lists(visit), lists(visit.transpose(-2, -1)),
                     None if chosen is None else chosen.to(torch.int8).contiguous())


def block_mask_of(allowed: torch.Tensor, block: int) -> BlockMask:
    """The BlockMask that visits each tile holding an allowed pair of allowed (B or 1, n_head or 1, T, T) bool (a
    causal, sliding-window or document mask, say), as FlexAttention's create_block_mask finds its tiles; tiles
    with no allowed pair are never read."""
    T, n = allowed.size(-1), triton.cdiv(allowed.size(-1), block)
    padded = F.pad(allowed, (0, n * block - T, 0, n * block - T))
    return block_mask(padded.view(*allowed.shape[:2], n, block, n, block).any(dim=5).any(dim=3), block)


def mask_tiles(block: int, tiles: Tiles) -> Tiles:
    """The launch of every kernel under a block mask: block by block tiles, the GPU settings of the forward's."""
    return Tiles(block, block, tiles.num_warps, min(tiles.num_stages, 2))


class FlashAttention(torch.autograd.Function):
    """Saves q, k, v, the output and the log-sum-exp (O(T) per head), never the (T, T) probabilities."""

    @staticmethod
    def forward(ctx, q, k, v, causal, softmax_scale, window, doc_start, doc_end, sinks, mask):
        fwd_tiles, ctx.dkdv_tiles, ctx.dq_tiles = launch_tiles(q.size(3), v.size(3), q.dtype, q.device)
        if mask is not None:  # every kernel steps by the block mask's blocks, queries and keys alike
            fwd_tiles = ctx.dkdv_tiles = ctx.dq_tiles = mask_tiles(mask.block, fwd_tiles)
        out, lse = _forward(q, k, v, causal, softmax_scale, window, fwd_tiles, doc_start, doc_end, sinks, mask)
        ctx.save_for_backward(q, k, v, out, lse, doc_start, doc_end, sinks)
        ctx.causal, ctx.softmax_scale, ctx.window, ctx.mask = causal, softmax_scale, window, mask
        return out

    @staticmethod
    def backward(ctx, dout):
        q, k, v, out, lse, doc_start, doc_end, sinks = ctx.saved_tensors
        dq, dk, dv, dsinks = _backward(_unit_last_stride(dout), q, k, v, out, lse, ctx.causal, ctx.softmax_scale,
                                       ctx.window, ctx.dkdv_tiles, ctx.dq_tiles, doc_start, doc_end, sinks, ctx.mask)
        return dq, dk, dv, None, None, None, None, None, dsinks, None


def _document_spans(doc_ids):
    """doc_start, doc_end (B, T) int32: the first position of each position's document and one past its last.
    Doc ids never decrease along a row, so a document is the run of equal ids, found by binary search."""
    doc_ids = doc_ids.contiguous()
    return (torch.searchsorted(doc_ids, doc_ids, out_int32=True),
            torch.searchsorted(doc_ids, doc_ids, right=True, out_int32=True))


def flash_attention(q, k, v, causal=True, softmax_scale=None, window_size=None, doc_ids=None, sinks=None,
                    block_mask=None):
    """softmax(q k^T * softmax_scale + mask) v, differentiable, for one sequence length T of queries and keys.

    q (B, n_head, T, d_qk), k (B, n_kv_head, T, d_qk), v (B, n_kv_head, T, d_v) -> (B, n_head, T, d_v), with
    n_head a multiple of n_kv_head (query head h uses kv head h // (n_head // n_kv_head)), head dims up to
    256, fp16, bf16 or fp32 (fp32 accumulation throughout). softmax_scale defaults to 1 / sqrt(d_qk).
    window_size=W (causal only): query i sees keys i - W + 1 .. i. doc_ids (B, T), integers that never decrease
    along T: each position's document among those packed one after another in its row (padding at the end can
    be a document of its own); a query then sees only keys of its own document. sinks (n_head,), finite, float32 or
    q's dtype, differentiable: each head's sink logit, one more term exp(sinks[h]) in every row's softmax
    denominator with no value (gpt-oss), so a row's weights on its keys sum to less than one. block_mask: a
    BlockMask (block_mask(), block_mask_of()) of blocks of 16 or more positions, a power of two: only its listed
    tiles are visited, the pairs outside them are masked, and the masks above apply inside them. There is no other
    padding mask and no offset between query and key positions (a KV cache): callers with those use another
    attention.
    """
    if q.dim() != 4 or k.dim() != 4 or v.dim() != 4:
        raise ValueError(f"q, k, v must be 4-d (B, heads, T, head_dim), got {tuple(q.shape)}, {tuple(k.shape)}, "
                         f"{tuple(v.shape)}")
    B, n_head, T, d_qk = q.shape
    if k.shape != (B, k.size(1), T, d_qk) or v.shape[:3] != k.shape[:3]:
        raise ValueError(f"k must be (B, n_kv_head, T, d_qk) and v (B, n_kv_head, T, d_v) for q {tuple(q.shape)}, "
                         f"got k {tuple(k.shape)} and v {tuple(v.shape)}")
    if n_head % k.size(1):
        raise ValueError(f"n_head ({n_head}) must be a multiple of n_kv_head ({k.size(1)})")
    if max(d_qk, v.size(3)) > 256:
        raise ValueError(f"head dims up to 256 are supported, got d_qk={d_qk}, d_v={v.size(3)}")
    if not (q.dtype == k.dtype == v.dtype) or q.dtype not in (torch.float16, torch.bfloat16, torch.float32):
        raise ValueError(f"q, k, v must share one dtype of float16, bfloat16, float32, got {q.dtype}, {k.dtype}, "
                         f"{v.dtype}")
    if window_size is not None and (not causal or window_size < 1):
        raise ValueError(f"window_size must be a positive int with causal=True, got {window_size} (causal={causal})")
    if doc_ids is not None:
        if doc_ids.shape != (B, T) or doc_ids.dtype not in (torch.uint8, torch.int8, torch.int16, torch.int32,
                                                            torch.int64):
            raise ValueError(f"doc_ids must be an integer tensor of shape (B, T) = ({B}, {T}), got {doc_ids.dtype} "
                             f"{tuple(doc_ids.shape)}")
        if doc_ids.device != q.device:
            raise ValueError(f"doc_ids must be on q's device {q.device}, got {doc_ids.device}")
        # One check on the whole tensor (a device-to-host sync on a GPU): decreasing ids would make the kernels
        # skip blocks that hold allowed keys, silently wrong.
        if (doc_ids[:, 1:] < doc_ids[:, :-1]).any():
            raise ValueError("doc_ids must never decrease along T: documents are packed one after another, each "
                             "a contiguous run of equal ids")
    if sinks is not None and (sinks.shape != (n_head,) or sinks.dtype not in (torch.float32, q.dtype)
                              or sinks.device != q.device):
        raise ValueError(f"sinks must be a float32 or {q.dtype} tensor of shape (n_head,) = ({n_head},) on {q.device}, "
                         f"got {sinks.dtype} {tuple(sinks.shape)} on {sinks.device}")
    if block_mask is not None:
        block_mask = _expand_block_mask(block_mask, B, n_head, T, q.device)
    if not q.is_cuda and not INTERPRETED:
        raise RuntimeError("flash_attention needs CUDA tensors, or TRITON_INTERPRET=1 set before importing myllm_kernels")
    softmax_scale = 1.0 / math.sqrt(d_qk) if softmax_scale is None else float(softmax_scale)
    # A window as long as the sequence is no window: one code path, with no test for "no window" in the kernels.
    window = T if window_size is None else min(int(window_size), T)
    q, k, v = _unit_last_stride(q), _unit_last_stride(k), _unit_last_stride(v)
    doc_start, doc_end = (None, None) if doc_ids is None else _document_spans(doc_ids)
    # The kernels read fp32 logits; autograd casts their gradient back to sinks' own dtype.
    sinks = None if sinks is None else sinks.float()
    return FlashAttention.apply(q, k, v, bool(causal), softmax_scale, window, doc_start, doc_end, sinks, block_mask)


def _expand_block_mask(mask, B, n_head, T, device):
    """mask checked against the call's shapes, its batch and head dims expanded (stride 0) to B and n_head."""
    if not isinstance(mask, BlockMask) or mask.block < 16 or mask.block & (mask.block - 1):
        raise ValueError("block_mask must be a BlockMask whose block is a power of two, at least 16")
    n = triton.cdiv(T, mask.block)
    shapes = [(mask.kv_blocks, (n, n + 1), torch.int32), (mask.q_blocks, (n, n + 1), torch.int32)]
    if mask.chosen is not None:
        shapes.append((mask.chosen, (T, n), torch.int8))
    for t, rows, dtype in shapes:
        if t.dim() != 4 or t.shape[2:] != rows or t.size(0) not in (1, B) or t.size(1) not in (1, n_head) \
                or t.dtype != dtype or t.device != device:
            raise ValueError(f"block_mask's tensors must be (1 or {B}, 1 or {n_head}, ...) of the blocks of {T} "
                             f"positions in blocks of {mask.block}, on {device}: got {t.dtype} {tuple(t.shape)}")
    return BlockMask(mask.block, *(None if t is None else t.expand(B, n_head, *t.shape[2:])
                                   for t in (mask.kv_blocks, mask.q_blocks, mask.chosen)))
