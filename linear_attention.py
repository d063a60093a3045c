"""
linear_attention.py: Gated DeltaNet (Yang, Kautz and Hatamizadeh, ICLR 2025), the linear attention of Qwen3-Next's
and Qwen3.5's hybrid stacks, as one function in two forms and the layer the production models build around it.

The one idea: softmax attention keeps every key and value and reads them all for every query, so its cost per token
grows with the context. Linear attention keeps one matrix per head instead, a state S (d_k x d_v) that every token
edits and every query reads, so a token costs the same at position 10 as at position 100,000:

    S_t = a_t (I - b_t k_t k_t^T) S_{t-1} + b_t k_t v_t^T        o_t = S_t^T q_t

Read S as a memory that maps keys to values. k_t^T S_{t-1} is what the memory returns for k_t now; the delta rule
(Widrow and Hoff 1960; DeltaNet, Schlag et al. 2021) writes b_t (v_t - k_t^T S_{t-1}), the error, so that with b_t = 1
and a unit key the memory then returns exactly v_t: one step of online regression, where plain linear attention
(S_t = S_{t-1} + k_t v_t^T) only piles values up. The gate a_t in (0, 1] (Mamba2's decay) lets it forget everything at
once, the delta rule forgets one key at a time; Gated DeltaNet has both.

Two forms compute the same function. gated_delta_rule_recurrent runs the recurrence token by token: generation,
where each step has one token anyway. gated_delta_rule_chunked is for training: chunks of C tokens, within which the
C updates are one set of matrix products (the WY representation, see there), and a sequential pass over chunk
states only, T / C steps instead of T.

Switch the delta rule off (delta_rule=False) and the recurrence is S_t = a_t S_{t-1} + b_t k_t v_t^T, and the same
chunk code is a whole family: a fixed a per head is RetNet (Sun et al. 2023) and Lightning attention (MiniMax-01), an
input-dependent scalar a_t is simple GLA and Mamba2's SSD (Dao and Gu 2024, with b_t its step size); a = 1 is plain
linear attention. tests/test_linear_attention.py checks each against its quadratic "attention form".
"""

import math

import torch
import torch.nn as nn
import torch.nn.functional as F


def gated_delta_rule_recurrent(q, k, v, log_a, beta, state=None, delta_rule=True):
    """The recurrence, one token at a time. q, k (B, H, T, d_k); v (B, H, T, d_v); log_a, beta (B, H, T), log_a <= 0
    the log of the decay; state (B, H, d_k, d_v) or None (zeros). Returns o (B, H, T, d_v) and the final state."""
    B, H, T, d_k = k.shape
    S = k.new_zeros(B, H, d_k, v.size(-1)) if state is None else state
    out = []
    for t in range(T):
        S = S * log_a[:, :, t, None, None].exp()
        write = v[:, :, t]  # (B, H, d_v)
        if delta_rule:  # the error of what the memory returns for k_t
            write = write - (k[:, :, t, None, :] @ S)[:, :, 0]
        S = S + k[:, :, t, :, None] * (beta[:, :, t, None, None] * write[:, :, None, :])
        out.append((q[:, :, t, None, :] @ S)[:, :, 0])  # S_t^T q_t, (B, H, d_v)
    return torch.stack(out, dim=2), S


def gated_delta_rule_chunked(q, k, v, log_a, beta, state=None, delta_rule=True, chunk_size=64):
    """The same function, chunk by chunk (arguments as gated_delta_rule_recurrent).

    Within a chunk, number the tokens 1..C from the state S_0 before it, and let g_i = log a_1 + ... + log a_i, so
    that G_ij = exp(g_i - g_j) (i >= j) is the decay from token j to token i. Unrolled, the state after token i is
        S_i = exp(g_i) S_0 + sum_{j <= i} G_ij k_j w_j^T,   w_i = b_i (v_i - exp(g_i) S_0^T k_i - sum_{j < i} G_ij (k_i . k_j) w_j)
    where w_i is what token i writes. The second equation, for all i at once, is a triangular system:
        (I + diag(b) L) W = diag(b) (V - diag(exp(g)) K S_0),   L = the strictly lower part of G * K K^T,
    so W = U - Kd S_0 with U = A V and Kd = A diag(exp(g)) K, A = (I + diag(b) L)^-1 diag(b): one triangular solve
    per chunk, independent of S_0, so all chunks solve in parallel (the WY / UT representation; DeltaNet, Yang et al.
    2024). What is left is sequential, and cheap:
        W = U - Kd S_0     O = diag(exp(g)) Q S_0 + (G * Q K^T, lower with the diagonal) W
        S_C = exp(g_C) S_0 + (diag(exp(g_C - g)) K)^T W
    Without the delta rule W = diag(b) V: no solve and no correction from S_0, the chunked form of RetNet and SSD.
    T need not be a multiple of chunk_size: the tail is padded with tokens that change nothing (k = v = b = 0, a = 1).
    """
    B, H, T, d_k = k.shape
    d_v = v.size(-1)
    C = min(chunk_size, T)
    pad = -T % C
    if pad:
        q, k, v = (F.pad(x, (0, 0, 0, pad)) for x in (q, k, v))
        log_a, beta = F.pad(log_a, (0, pad)), F.pad(beta, (0, pad))
    n = (T + pad) // C
    q, k, v = (x.reshape(B, H, n, C, x.size(-1)) for x in (q, k, v))  # (B, H, n, C, d)
    g = log_a.reshape(B, H, n, C).cumsum(dim=-1)  # (B, H, n, C): log decay from the chunk's start
    beta = beta.reshape(B, H, n, C, 1)
    causal = torch.ones(C, C, dtype=torch.bool, device=k.device).tril()
    # exp(g_i - g_j) only where i >= j: above the diagonal g_i - g_j > 0 could overflow, so -inf before exp.
    decay = (g[..., :, None] - g[..., None, :]).masked_fill(~causal, float("-inf")).exp()  # (B, H, n, C, C)
    if delta_rule:
        lower = beta * (k @ k.transpose(-1, -2)) * decay.tril(-1)  # diag(b) L
        eye = torch.eye(C, dtype=k.dtype, device=k.device)
        # One solve for both right-hand sides, [b V, b exp(g) K]: A applied to each.
        rhs = torch.cat((beta * v, beta * k * g[..., None].exp()), dim=-1)
        U, Kd = torch.linalg.solve_triangular(eye + lower, rhs, upper=False, unitriangular=True).split([d_v, d_k], -1)
    else:
        U, Kd = beta * v, None
    scores = (q @ k.transpose(-1, -2)) * decay  # (B, H, n, C, C), zero above the diagonal
    q_decayed = q * g[..., None].exp()  # reads S_0 decayed to each token
    k_to_end = k * (g[..., -1:] - g)[..., None].exp()  # each token's write, decayed to the chunk's end
    S = k.new_zeros(B, H, d_k, d_v) if state is None else state
    # Each chunk's slices taken once with unbind: indexing [:, :, c] in the loop would make autograd add every
    # slice's gradient into a zero tensor of the whole input, n times over (most of the backward, measured).
    chunks = zip(U.unbind(2), Kd.unbind(2) if Kd is not None else [None] * n, q_decayed.unbind(2), scores.unbind(2),
                 k_to_end.unbind(2), g[..., -1, None, None].exp().unbind(2))
    out = []
    for U_c, Kd_c, q_c, scores_c, k_c, decay_c in chunks:
        W = U_c if Kd_c is None else U_c - Kd_c @ S  # (B, H, C, d_v)
        out.append(q_c @ S + scores_c @ W)
        S = S * decay_c + k_c.transpose(-1, -2) @ W
    return torch.cat(out, dim=2)[:, :, :T], S


def l2_normalize(x, eps=1e-6):
    """x / sqrt(sum x^2 + eps), as fla and transformers compute it: a unit key makes b_t the fraction of the error
    written (b = 1 overwrites), and a unit query keeps o_t on the scale of the values whatever d_k is."""
    return x * torch.rsqrt((x * x).sum(dim=-1, keepdim=True) + eps)


class GatedDeltaNet(nn.Module):
    """The layer around the rule, as Qwen3-Next builds it (transformers' Qwen3NextGatedDeltaNet computes the same):

        q, k, v = SiLU(short causal depthwise conv(W_q x, W_k x, W_v x))    the conv mixes each channel's last
                                                                            linear_conv_kernel_dim tokens
        q, k = l2_normalize(q) / sqrt(d_k), l2_normalize(k)
        a_t = exp(-exp(A_log) softplus(W_a x + dt_bias))                    Mamba2's discretised decay, in (0, 1)
        b_t = sigmoid(W_b x)
        o = RMSNorm(rule(q, k, v, a, b)) * SiLU(W_z x)                      the gated output norm, per head
        y = W_o o

    linear_num_key_heads query/key heads serve linear_num_value_heads value heads (as GQA's key/value heads serve
    query heads, the other way round: the state is per value head). Its cache is (conv state, S): the last few
    inputs of the conv and the rule's matrix, of a size that does not grow with the sequence.
    """

    def __init__(self, config, layer_id, use_kernel=False):
        super().__init__()
        self.layer_id = layer_id  # its state's key in the cache's linear_states
        # The chunked form in Triton (myllm_kernels/gated_delta_rule.py) where the model runs its flash kernels,
        # for the chunk sizes the kernel takes; the PyTorch form computes the same function.
        self.use_kernel = use_kernel and config.linear_chunk_size in (16, 32, 64, 128)
        self.n_k, self.n_v = config.linear_num_key_heads, config.linear_num_value_heads
        self.d_k, self.d_v = config.linear_key_head_dim, config.linear_value_head_dim
        self.chunk_size, self.eps = config.linear_chunk_size, config.norm_eps
        key_dim, value_dim = self.n_k * self.d_k, self.n_v * self.d_v
        self.wq = nn.Linear(config.n_embd, key_dim, bias=False)
        self.wk = nn.Linear(config.n_embd, key_dim, bias=False)
        self.wv = nn.Linear(config.n_embd, value_dim, bias=False)
        self.wz = nn.Linear(config.n_embd, value_dim, bias=False)  # the output gate
        self.wb = nn.Linear(config.n_embd, self.n_v, bias=False)
        self.wa = nn.Linear(config.n_embd, self.n_v, bias=False)
        self.conv_dim, self.conv_kernel = 2 * key_dim + value_dim, config.linear_conv_kernel_dim
        self.conv = nn.Conv1d(self.conv_dim, self.conv_dim, self.conv_kernel, groups=self.conv_dim, bias=False)
        # Mamba2's initialisation: decay rates A spread over [1, 16] and step sizes dt over [1e-3, 0.1] (log-uniform),
        # stored as A_log and softplus^-1(dt), so that heads start out remembering over very different spans.
        self.A_log = nn.Parameter(torch.empty(self.n_v).uniform_(1, 16).log())
        dt = torch.exp(torch.empty(self.n_v).uniform_(math.log(1e-3), math.log(0.1)))
        self.dt_bias = nn.Parameter(dt + torch.log(-torch.expm1(-dt)))
        self.norm_weight = nn.Parameter(torch.ones(self.d_v))
        self.wo = nn.Linear(value_dim, config.n_embd, bias=False)

    def forward(self, x, is_real, kv_cache=None):
        """x (B, T, n_embd) -> (B, T, n_embd); is_real (B, T) or None marks real tokens. With a cache the layer
        continues from its state there and leaves the new one."""
        state = None if kv_cache is None else kv_cache.linear_states.get(self.layer_id)
        y, state = self.run(x, is_real, state)
        if kv_cache is not None:
            kv_cache.linear_states[self.layer_id] = state
        return y

    def run(self, x, is_real, state=None):
        """x (B, T, n_embd), is_real (B, T) marks real tokens (padding is zeroed, so it changes no state; None: all
        real), state (conv state, S) or None. Returns y (B, T, n_embd) and the new (conv state, S)."""
        B, T, _ = x.shape
        if is_real is not None:
            x = x * is_real[..., None].to(x.dtype)
        qkv = torch.cat((self.wq(x), self.wk(x), self.wv(x)), dim=-1).transpose(1, 2)  # (B, conv_dim, T)
        before = qkv.new_zeros(B, self.conv_dim, self.conv_kernel - 1) if state is None else state[0]
        qkv = torch.cat((before, qkv), dim=-1)  # the conv's causal left context: zeros, or the cached last inputs
        conv_state = qkv[:, :, -(self.conv_kernel - 1):]
        qkv = F.silu(F.conv1d(qkv, self.conv.weight, groups=self.conv_dim)).transpose(1, 2)  # (B, T, conv_dim)
        q, k, v = qkv.split([self.n_k * self.d_k, self.n_k * self.d_k, self.n_v * self.d_v], dim=-1)
        q = l2_normalize(q.view(B, T, self.n_k, self.d_k)) / math.sqrt(self.d_k)
        k = l2_normalize(k.view(B, T, self.n_k, self.d_k))
        # Each query/key head serves n_v / n_k consecutive value heads (transformers' repeat_interleave).
        q, k = (t.repeat_interleave(self.n_v // self.n_k, dim=2).transpose(1, 2) for t in (q, k))  # (B, n_v, T, d_k)
        v = v.view(B, T, self.n_v, self.d_v).transpose(1, 2)
        # The rule and its state in float32 at least: S sums thousands of small updates, which bf16 would round away.
        work = torch.promote_types(x.dtype, torch.float32)
        beta = torch.sigmoid(self.wb(x)).transpose(1, 2).to(work)  # (B, n_v, T)
        log_a = -self.A_log.to(work).exp() * F.softplus(self.wa(x).to(work) + self.dt_bias.to(work))
        S = None if state is None else state[1]
        rule = gated_delta_rule_recurrent if T == 1 else gated_delta_rule_chunked
        if T > 1 and self.use_kernel:
            from myllm_kernels import chunk_gated_delta_rule as rule  # only when asked for: Triton takes seconds
        options = {} if T == 1 else {"chunk_size": self.chunk_size}
        o, S = rule(q.to(work), k.to(work), v.to(work), log_a.transpose(1, 2), beta, S, **options)
        o = F.rms_norm(o.transpose(1, 2), (self.d_v,), eps=self.eps) * self.norm_weight  # (B, T, n_v, d_v)
        o = o * F.silu(self.wz(x).view(B, T, self.n_v, self.d_v).to(work))
        return self.wo(o.to(x.dtype).reshape(B, T, -1)), (conv_state, S)
