"""
Attention in plain PyTorch, twice: the float64 reference our kernels are tested against, and the algorithm of
myllm_kernels/flash_attention.py's forward written out block by block, to read before the Triton code.

    from myllm_kernels.attention_reference import reference_attention, tiled_attention
    exact = reference_attention(q, k, v, causal=True)   # float64, the (T, T) scores written out
    out, lse = tiled_attention(q, k, v, causal=True)    # the same function, one block of keys at a time

The one idea: softmax(S) V needs no (T, T) matrix S. Take the keys a block at a time and keep, for every
query row, the largest score m seen so far, the sum l of exp(s - m) and the sum acc of exp(s - m) v. When a
block raises the maximum to m', all that was summed relative to m is multiplied by exp(m - m') ("online
softmax", Milakov & Gimelshein 2018), and after the last block acc / l is the softmax-weighted sum of v.
tiled_attention does this with PyTorch slices; _forward_kernel does the same in one Triton program per query
block, loading padded tiles where this file slices.

Packed documents: with doc_ids (B, T), each position's document among those packed one after another in its row
(ids never decrease along T), a query attends only to keys of its own document, a mask of
doc_ids[:, :, None] == doc_ids[:, None, :] on top of the causal one. As each document is one contiguous run,
tiled_attention skips the key blocks outside the documents of a query block, as the kernels do.

Attention sinks (gpt-oss): sinks (n_head,) gives each head one more logit in every row's softmax, a column with no
value, so the weights on the keys sum to less than one. reference_attention appends it as a column of the score
matrix, as transformers' gpt-oss does; tiled_attention counts it as a key seen before the first block (m = the sink's
logit, l = 1), as the kernel does.
"""

import math

import torch

LOG2_E = math.log2(math.e)
# As MIN_SCORE in myllm_kernels/flash_attention.py: finite, so that a row whose first key block is all masked (a
# window starting inside the block, or an earlier document's keys) gets exp2(m - m) = 1 and exp2(-inf - m) = 0
# rather than exp2(-inf + inf) = NaN.
MIN_SCORE = -1.0e30


def _allowed(q_pos, k_pos, causal, window_size, q_doc=None, k_doc=None):
    """(len(q_pos), len(k_pos)) bool, the kernel's _allowed: which keys each query attends to. Without causal, all;
    with causal, key j for query i when j <= i and, given a window_size W, j > i - W (keys i - W + 1 .. i). Given
    the documents q_doc (B, len(q_pos)) and k_doc (B, len(k_pos)) of packed rows, only pairs in the same document,
    and the mask is (B, 1, len(q_pos), len(k_pos)), broadcasting over the heads."""
    if window_size is not None and (not causal or window_size < 1):
        raise ValueError(f"window_size must be a positive int with causal=True, got {window_size} (causal={causal})")
    i, j = q_pos[:, None], k_pos[None, :]
    allowed = torch.ones(len(q_pos), len(k_pos), dtype=torch.bool, device=q_pos.device)
    if causal:
        allowed &= j <= i
    if window_size is not None:
        allowed &= j > i - window_size
    if q_doc is not None:
        allowed = allowed & (q_doc[:, None, :, None] == k_doc[:, None, None, :])
    return allowed


def reference_attention(q, k, v, causal=True, softmax_scale=None, window_size=None, doc_ids=None, sinks=None,
                        mask=None):
    """softmax(q k^T * softmax_scale) v in float64, written out: K and V repeated per query head, an explicit mask.

    Arguments as flash_attention's: q (B, n_head, T, d_qk), k (B, n_kv_head, T, d_qk), v (B, n_kv_head, T, d_v)
    -> (B, n_head, T, d_v) float64; softmax_scale defaults to 1 / sqrt(d_qk). With sinks (n_head,), head h's logit
    joins every row's softmax as one more column, dropped before the product with v. Differentiable (sinks too).
    mask (B or 1, n_head or 1, T, T) bool: the pairs a block mask keeps, required too (flash_attention's block_mask
    says the same by its tiles and chosen rows).
    """
    q, k, v = q.double(), k.double(), v.double()
    scale = 1.0 / math.sqrt(q.size(-1)) if softmax_scale is None else softmax_scale
    group = q.size(1) // k.size(1)
    k, v = k.repeat_interleave(group, dim=1), v.repeat_interleave(group, dim=1)  # query head h: kv head h // group
    pos = torch.arange(q.size(2), device=q.device)
    scores = q @ k.transpose(-2, -1) * scale  # (B, n_head, T, T)
    allowed = _allowed(pos, pos, causal, window_size, doc_ids, doc_ids)
    scores = scores.masked_fill(~(allowed if mask is None else allowed & mask), float("-inf"))
    if sinks is None:
        return scores.softmax(dim=-1) @ v
    sink_column = sinks.double().view(1, -1, 1, 1).expand(*scores.shape[:3], 1)
    return torch.cat((scores, sink_column), dim=-1).softmax(dim=-1)[..., :-1] @ v


def tiled_attention(q, k, v, causal=True, softmax_scale=None, window_size=None, doc_ids=None, sinks=None,
                    block_m=128, block_n=64):
    """reference_attention's function computed as the Triton forward computes it, block_m queries by block_n keys
    at a time (any sizes give the same result), in float32 as the kernel's accumulators.

    Returns what the kernel's _forward returns: out (B, n_head, T, d_v) in q's dtype, and lse (B, n_head, T), the
    base-2 log-sum-exp of every row of scaled scores, which the backward uses to recompute the probabilities.
    """
    B, n_head, T, d_qk = q.shape
    scale = 1.0 / math.sqrt(d_qk) if softmax_scale is None else softmax_scale
    # Base-2 scores, s2 = s * log2(e), so exp(s) = exp2(s2): the GPU's native exp2, the factor folded into the scale.
    qk_scale = scale * LOG2_E
    window = T if window_size is None else min(window_size, T)  # a window of T is no window
    group = n_head // k.size(1)
    # The kernel reads kv head h // group through pointers; here the copy keeps the indexing plain.
    k, v = k.float().repeat_interleave(group, dim=1), v.float().repeat_interleave(group, dim=1)
    pos = torch.arange(T, device=q.device)
    outs, lses = [], []
    # The kernel runs these (batch row, query block) pairs in parallel, one program per head of each; here the
    # heads of a block go together. Rows one by one, because with documents each row skips different key blocks.
    for b in range(B):
        row, row_outs, row_lses = slice(b, b + 1), [], []
        for start_m in range(0, T, block_m):
            q_rows = slice(start_m, start_m + block_m)  # bm <= block_m rows, fewer at the end
            q_blk = q[row, :, q_rows].float()  # (1, n_head, bm, d_qk)
            # Names as in _forward_loop. m_i (1, n_head, bm): the largest score so far, base 2; l_i: the sum of
            # exp2(s2 - m_i) over the keys so far; acc (1, n_head, bm, d_v): the sum of exp2(s2 - m_i) v.
            m_i = torch.full(q_blk.shape[:3], MIN_SCORE, device=q.device)
            l_i = torch.zeros_like(m_i)
            if sinks is not None:
                # The sink as a key seen before the first block: the largest score so far, with exp2(0) = 1 in l_i
                # and no value in acc. The lse below then counts it, and the backward needs nothing else.
                m_i = (sinks.float() * LOG2_E).view(1, -1, 1).expand_as(m_i)
                l_i = torch.ones_like(m_i)
            acc = q_blk.new_zeros(*q_blk.shape[:3], v.size(-1))
            # _key_range: a causal query block needs no key after its last query, nor any block wholly before its
            # first query's window.
            lo = max(start_m - window + 1, 0) // block_n * block_n if causal else 0
            hi = min(start_m + block_m, T) if causal else T
            if doc_ids is not None:
                # _narrow_range: ids never decrease along the row, so no key before the start of the first
                # query's document nor after the end of the last query's is seen; skipping them makes a row of
                # packed documents cost the sum of their squared lengths, not T^2.
                doc = doc_ids[b]
                lo = max(lo, int(torch.searchsorted(doc, doc[start_m])) // block_n * block_n)
                hi = min(hi, int(torch.searchsorted(doc, doc[min(start_m + block_m, T) - 1], right=True)))
            # The kernel splits [lo, hi) in three (_key_range's full_lo, full_hi) so that the blocks where every
            # pair is allowed skip the mask; masking them too changes nothing.
            for start_n in range(lo, hi, block_n):
                k_rows = slice(start_n, start_n + block_n)
                k_blk, v_blk = k[row, :, k_rows], v[row, :, k_rows]  # (1, n_head, bn, d)
                s = q_blk @ k_blk.transpose(-2, -1) * qk_scale  # (1, n_head, bm, bn)
                docs = (None, None) if doc_ids is None else (doc_ids[row, q_rows], doc_ids[row, k_rows])
                s = s.masked_fill(~_allowed(pos[q_rows], pos[k_rows], causal, window_size, *docs), float("-inf"))
                m_new = torch.maximum(m_i, s.amax(dim=-1))
                alpha = torch.exp2(m_i - m_new)  # rescales the sums made relative to the old maximum; at most 1
                p = torch.exp2(s - m_new[..., None])  # (1, n_head, bm, bn), masked pairs exactly 0
                l_i = l_i * alpha + p.sum(dim=-1)
                acc = acc * alpha[..., None] + p @ v_blk
                m_i = m_new
            row_outs.append(acc / l_i[..., None])  # every query sees at least itself, so l_i > 0
            row_lses.append(m_i + torch.log2(l_i))  # log2 of the softmax denominator: P = exp2(s2 - lse)
        outs.append(torch.cat(row_outs, dim=2))
        lses.append(torch.cat(row_lses, dim=2))
    return torch.cat(outs).to(q.dtype), torch.cat(lses)
