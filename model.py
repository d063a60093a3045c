"""
The myllm model: a decoder-only Transformer in the Llama / Qwen2 style, in one file that reads top to bottom.

    from model import ModelConfig, Transformer
    model = Transformer(ModelConfig(n_layer=4))
    logits, loss = model(idx, targets)                     # training: idx, targets (B, T) token ids
    for token in model.generate(prompt, 100, top_p=0.9):   # inference: yields (B,) tokens, one per step
        ...

Compared with GPT-2 (nanoGPT): RMSNorm instead of LayerNorm, rotary position embeddings (RoPE) instead of
learned ones, grouped-query attention (GQA), a SwiGLU MLP, no biases except optionally on q/k/v (Qwen2).
Module names (wte, layers.N.attn.wq, ...) are fixed: the Hugging Face export maps them one to one.

The one idea to understand first: every token carries an explicit *position* and every attention call an
explicit *mask* of allowed (query, key) pairs. Training uses the plain case (positions 0..T-1, causal mask);
a KV cache appends new tokens after the cached ones, and left padding (batched prompts of different
lengths) shifts each row's positions and hides its padding keys. One mask function and one position rule
serve all three, so a padded or cached row computes exactly what it computes alone and uncached.
"""

import math
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F


@dataclass
class ModelConfig:
    vocab_size: int = 6400
    block_size: int = 512  # longest sequence; sizes the RoPE tables and the generation window
    n_layer: int = 8
    n_head: int = 8
    n_kv_head: int = 2  # GQA (Ainslie et al. 2023): n_head // n_kv_head query heads share one key/value head
    n_embd: int = 512
    inter_dim: int = 0  # SwiGLU hidden size; 0 = 8/3 * n_embd rounded up to a multiple of 64
    rope_theta: float = 1e6  # RoPE base; large (Qwen2's value) so the slowest pairs barely turn over block_size
    norm_eps: float = 1e-5
    tie_embeddings: bool = True  # lm_head reuses wte's matrix: fewer parameters, as in GPT-2 and small Qwen2
    qkv_bias: bool = False  # Qwen2 puts biases on q, k, v (only)
    dropout: float = 0.0
    attn_impl: str = "sdpa"  # "sdpa" (PyTorch's fused kernels) or "eager" (the readable reference)

    def __post_init__(self):
        for name in ("vocab_size", "block_size", "n_layer", "n_head", "n_kv_head", "n_embd"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be positive, got {getattr(self, name)}")
        if self.n_embd % self.n_head:
            raise ValueError(f"n_embd ({self.n_embd}) must be divisible by n_head ({self.n_head})")
        if self.n_head % self.n_kv_head:
            raise ValueError(f"n_head ({self.n_head}) must be divisible by n_kv_head ({self.n_kv_head})")
        if self.attn_impl not in ("sdpa", "eager"):
            raise ValueError(f"attn_impl must be 'sdpa' or 'eager', got {self.attn_impl!r}")
        if self.head_dim % 2:
            raise ValueError(f"head_dim = n_embd // n_head must be even for RoPE's pairs, got {self.head_dim}")
        if self.inter_dim == 0:
            # 8/3 keeps SwiGLU's three matrices at the parameter count of a 4x two-matrix MLP (Shazeer 2020);
            # a multiple of 64 keeps the matmuls on fast tile sizes.
            self.inter_dim = 64 * math.ceil(8 * self.n_embd / 3 / 64)

    @property
    def head_dim(self):
        return self.n_embd // self.n_head


class RMSNorm(nn.Module):
    """Root-mean-square norm (Zhang & Sennrich 2019): LayerNorm without the mean subtraction and the bias."""

    def __init__(self, dim, eps):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x):
        # In float32: a bf16 sum of squares over thousands of channels loses the low bits of the scale.
        xf = x.float()
        xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * xf.to(x.dtype)


def rope_inv_freq(head_dim, theta):
    """Angular speed of each of the head_dim / 2 rotating pairs: theta^(-2i / head_dim) (RoFormer, Su et al.)."""
    return 1.0 / theta ** (torch.arange(0, head_dim, 2, dtype=torch.float32) / head_dim)


class RotaryEmbedding(nn.Module):
    """cos / sin tables of RoPE, looked up by position so each row of a batch can have its own positions."""

    def __init__(self, head_dim, max_len, theta):
        super().__init__()
        angles = torch.outer(torch.arange(max_len, dtype=torch.float32), rope_inv_freq(head_dim, theta))
        # Rotate-half layout (Hugging Face Llama): dim i is paired with dim i + head_dim/2, not with i + 1 as
        # in the paper, so both halves of a pair share one angle. (max_len, head_dim)
        angles = torch.cat((angles, angles), dim=-1)
        # Non-persistent: derived from the config, so they stay out of checkpoints and exports.
        self.register_buffer("cos", angles.cos(), persistent=False)
        self.register_buffer("sin", angles.sin(), persistent=False)

    def forward(self, positions, dtype):
        """positions (B, T) -> cos, sin, each (B, 1, T, head_dim), broadcasting over heads."""
        return self.cos[positions][:, None].to(dtype), self.sin[positions][:, None].to(dtype)


def apply_rope(x, cos, sin):
    """Rotate each pair (x[..., i], x[..., i + head_dim/2]) of x (B, heads, T, head_dim) by its angle."""
    x1, x2 = x.chunk(2, dim=-1)
    return x * cos + torch.cat((-x2, x1), dim=-1) * sin


def make_attention_mask(key_is_real, n_queries):
    """Which keys each query may attend to, for both attention backends.

    key_is_real (B, S) marks the cached and new keys that are real tokens (not padding); the queries are the
    last n_queries of those S positions. Query i may see key j when j <= i (causal) and key j is real.
    Returns allowed (B, 1, T, S) and has_key (B, 1, T, 1), whether a query has any key it may see.
    """
    S = key_is_real.size(1)
    query_pos = torch.arange(S - n_queries, S, device=key_is_real.device)
    causal = torch.arange(S, device=key_is_real.device)[None, :] <= query_pos[:, None]  # (T, S)
    allowed = causal & key_is_real[:, None, :]  # (B, T, S)
    has_key = allowed.any(dim=-1, keepdim=True)
    # A query with no allowed key (a left-padding position) would get softmax over all -inf = NaN, and masking
    # its output afterwards does not help the backward pass: the gradient still flows through the softmax and
    # 0 * NaN = NaN. So such a query attends to every key (a finite softmax) and attention() zeroes its output.
    allowed = allowed | ~has_key
    return allowed[:, None], has_key[:, None]


def eager_attention(q, k, v, allowed, dropout_p):
    """Softmax attention written out step by step; "sdpa" computes the same thing with fused kernels."""
    n_rep = q.size(1) // k.size(1)
    k = k.repeat_interleave(n_rep, dim=1)  # (B, n_head, S, hd): query head h reads key/value head h // n_rep
    v = v.repeat_interleave(n_rep, dim=1)
    # 1/sqrt(hd) keeps the scores at unit variance, so the softmax does not saturate (Vaswani et al. 2017).
    scores = (q @ k.transpose(-2, -1)) * (1.0 / math.sqrt(q.size(-1)))  # (B, n_head, T, S)
    scores = scores.masked_fill(~allowed, float("-inf"))
    probs = F.softmax(scores.float(), dim=-1).to(q.dtype)  # float32: exp() of bf16 scores is coarse
    probs = F.dropout(probs, p=dropout_p)
    return probs @ v  # (B, n_head, T, hd)


def attention(q, k, v, mask, impl, dropout_p=0.0):
    """q (B, n_head, T, hd) attends over k, v (B, n_kv_head, S, hd) -> (B, n_head, T, hd).

    mask: None for plain causal attention (S == T: no padding, nothing cached), else make_attention_mask().
    """
    if mask is None and impl == "sdpa":
        # No mask tensor at all: lets PyTorch pick the flash-attention kernel.
        return F.scaled_dot_product_attention(q, k, v, dropout_p=dropout_p, is_causal=True, enable_gqa=True)
    if mask is None:
        mask = make_attention_mask(torch.ones(q.size(0), k.size(2), dtype=torch.bool, device=q.device), q.size(2))
    allowed, has_key = mask
    if impl == "sdpa":
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=allowed, dropout_p=dropout_p, enable_gqa=True)
    else:
        y = eager_attention(q, k, v, allowed, dropout_p)
    return y.masked_fill(~has_key, 0.0)  # queries without a real key output zeros (see make_attention_mask)


class Attention(nn.Module):
    """Multi-head causal self-attention with grouped-query key/value heads and RoPE."""

    def __init__(self, config, layer_id):
        super().__init__()
        self.layer_id = layer_id  # which slot of the KV cache is ours
        self.n_head, self.n_kv_head, self.head_dim = config.n_head, config.n_kv_head, config.head_dim
        self.attn_impl, self.dropout = config.attn_impl, config.dropout
        self.wq = nn.Linear(config.n_embd, config.n_head * config.head_dim, bias=config.qkv_bias)
        self.wk = nn.Linear(config.n_embd, config.n_kv_head * config.head_dim, bias=config.qkv_bias)
        self.wv = nn.Linear(config.n_embd, config.n_kv_head * config.head_dim, bias=config.qkv_bias)
        self.wo = nn.Linear(config.n_head * config.head_dim, config.n_embd, bias=False)

    def forward(self, x, rope, mask, kv_cache):
        B, T, _ = x.shape
        q = self.wq(x).view(B, T, self.n_head, self.head_dim).transpose(1, 2)  # (B, n_head, T, hd)
        k = self.wk(x).view(B, T, self.n_kv_head, self.head_dim).transpose(1, 2)  # (B, n_kv_head, T, hd)
        v = self.wv(x).view(B, T, self.n_kv_head, self.head_dim).transpose(1, 2)
        q, k = apply_rope(q, *rope), apply_rope(k, *rope)
        if kv_cache is not None:
            k, v = kv_cache.update(self.layer_id, k, v)  # (B, n_kv_head, S, hd): cached keys, then the new ones
        y = attention(q, k, v, mask, self.attn_impl, self.dropout if self.training else 0.0)
        return self.wo(y.transpose(1, 2).reshape(B, T, -1))  # (B, T, n_embd)


class MLP(nn.Module):
    """SwiGLU feed-forward (Shazeer 2020, "GLU Variants Improve Transformer"): w2(silu(w1 x) * w3 x)."""

    def __init__(self, config):
        super().__init__()
        self.w1 = nn.Linear(config.n_embd, config.inter_dim, bias=False)  # gate
        self.w3 = nn.Linear(config.n_embd, config.inter_dim, bias=False)  # up
        self.w2 = nn.Linear(config.inter_dim, config.n_embd, bias=False)  # down

    def forward(self, x):
        return self.w2(F.silu(self.w1(x)) * self.w3(x))


class Block(nn.Module):
    """Pre-norm residual block: the residual stream itself is never normalised, which keeps deep stacks stable."""

    def __init__(self, config, layer_id):
        super().__init__()
        self.attn_norm = RMSNorm(config.n_embd, config.norm_eps)
        self.attn = Attention(config, layer_id)
        self.ffn_norm = RMSNorm(config.n_embd, config.norm_eps)
        self.ffn = MLP(config)
        self.resid_dropout = nn.Dropout(config.dropout)

    def forward(self, x, rope, mask, kv_cache):
        x = x + self.resid_dropout(self.attn(self.attn_norm(x), rope, mask, kv_cache))
        return x + self.resid_dropout(self.ffn(self.ffn_norm(x)))


class KVCache:
    """Keys and values of the tokens seen so far, so that each generation step runs only the new tokens.

    Preallocated for max_len positions, of which `length` are filled. It also remembers which cached keys are
    real tokens (not padding) and how many real tokens each row has, which is the next token's RoPE position.
    """

    def __init__(self, config, batch_size, max_len, device=None):
        self.shape = (config.n_layer, batch_size, config.n_kv_head, max_len, config.head_dim)
        self.k = self.v = None  # allocated by the first update(), in the keys' dtype (bf16 under autocast)
        self.key_is_real = torch.zeros(batch_size, max_len, dtype=torch.bool, device=device)
        self.n_real = torch.zeros(batch_size, dtype=torch.long, device=device)
        self.length = 0

    def append(self, is_real):
        """Take T new tokens, is_real (B, T); return the real-key mask of all tokens so far (B, length)."""
        T = is_real.size(1)
        self.key_is_real[:, self.length : self.length + T] = is_real
        self.n_real += is_real.sum(dim=1)
        self.length += T
        return self.key_is_real[:, : self.length]

    def update(self, layer, k, v):
        """Store one layer's keys and values of the new tokens (B, n_kv_head, T, hd); return all so far."""
        if self.k is None:
            self.k, self.v = k.new_zeros(self.shape), v.new_zeros(self.shape)
        start = self.length - k.size(2)
        self.k[layer, :, :, start : self.length] = k
        self.v[layer, :, :, start : self.length] = v
        return self.k[layer, :, :, : self.length], self.v[layer, :, :, : self.length]


def sample_next_token(logits, temperature=1.0, top_k=None, top_p=None):
    """Pick one token per row from logits (B, vocab) -> (B,). temperature 0 is greedy."""
    if temperature == 0:
        return logits.argmax(dim=-1)
    logits = logits.float() / temperature
    if top_k is not None:
        kth_largest = torch.topk(logits, min(top_k, logits.size(-1))).values[:, -1:]
        logits = logits.masked_fill(logits < kth_largest, float("-inf"))
    if top_p is not None:
        # Nucleus sampling (Holtzman et al. 2019): the smallest set of most likely tokens with mass >= top_p.
        # A token is dropped when the tokens ranked above it already reach top_p; the first always stays.
        sorted_logits, order = logits.sort(dim=-1, descending=True)
        probs = sorted_logits.softmax(dim=-1)
        drop = probs.cumsum(dim=-1) - probs >= top_p
        drop[:, 0] = False
        logits = logits.scatter(-1, order, sorted_logits.masked_fill(drop, float("-inf")))
    return torch.multinomial(logits.softmax(dim=-1), num_samples=1).squeeze(-1)


class Transformer(nn.Module):
    """Token embedding, n_layer blocks, final norm, and the output projection to vocabulary logits."""

    def __init__(self, config):
        super().__init__()
        self.config = config
        # No padding_idx: it pins that row's gradient to zero, and the seed project got NaN gradients from it.
        # Padding is handled by attention_mask instead.
        self.wte = nn.Embedding(config.vocab_size, config.n_embd)
        self.rope = RotaryEmbedding(config.head_dim, config.block_size, config.rope_theta)
        self.layers = nn.ModuleList(Block(config, layer_id) for layer_id in range(config.n_layer))
        self.norm = RMSNorm(config.n_embd, config.norm_eps)
        self.lm_head = nn.Linear(config.n_embd, config.vocab_size, bias=False)
        if config.tie_embeddings:
            self.lm_head.weight = self.wte.weight
        self._init_weights()

    def _init_weights(self):
        # GPT-2's scheme (as nanoGPT). Each block adds the outputs of wo and w2 to the residual stream, so its
        # variance grows with depth; scaling their init by 1/sqrt(2 * n_layer) (GPT-2 paper, section 2.3)
        # keeps the stream's scale independent of n_layer at initialisation.
        resid_std = 0.02 / math.sqrt(2 * self.config.n_layer)
        for name, p in self.named_parameters():  # a tied matrix is listed (and initialised) once
            if name.endswith(("wo.weight", "w2.weight")):
                nn.init.normal_(p, mean=0.0, std=resid_std)
            elif name.endswith("bias"):
                nn.init.zeros_(p)
            elif p.dim() == 1:
                nn.init.ones_(p)  # RMSNorm gains
            else:
                nn.init.normal_(p, mean=0.0, std=0.02)

    def forward(self, idx, targets=None, attention_mask=None, kv_cache=None):
        """idx (B, T) token ids -> logits (B, T, vocab), and the mean cross-entropy if targets (B, T) are given.

        attention_mask (B, T): 1 = real token, 0 = padding (Hugging Face convention), for left-padded batches.
        kv_cache: idx holds only the new tokens; they attend to every cached token and are appended.
        """
        B, T = idx.shape
        start = kv_cache.length if kv_cache is not None else 0
        if start + T > self.config.block_size:
            raise ValueError(f"{start + T} tokens exceed block_size {self.config.block_size}")
        is_real = torch.ones_like(idx, dtype=torch.bool) if attention_mask is None else attention_mask.bool()
        # A token's position is the number of real tokens before it in its row (Hugging Face's cumsum - 1),
        # so left padding does not shift a row: it gets the same logits as without the padding.
        positions = is_real.long().cumsum(dim=1) - is_real.long()  # (B, T)
        key_is_real = is_real
        if kv_cache is not None:
            positions = positions + kv_cache.n_real[:, None]
            key_is_real = kv_cache.append(is_real)  # (B, start + T)
        plain_causal = attention_mask is None and start == 0
        mask = None if plain_causal else make_attention_mask(key_is_real, T)

        x = self.wte(idx)  # (B, T, n_embd)
        rope = self.rope(positions, x.dtype)
        for block in self.layers:
            x = block(x, rope, mask, kv_cache)
        logits = self.lm_head(self.norm(x))  # (B, T, vocab)
        loss = None
        if targets is not None:
            # float32 log-softmax: bf16 logits would round the loss; -100 marks positions without a target.
            loss = F.cross_entropy(logits.float().flatten(0, 1), targets.flatten(), ignore_index=-100)
        return logits, loss

    def num_params(self, non_embedding=True):
        """Parameter count, a tied matrix counted once. non_embedding drops wte (the lookup costs no FLOPs);
        an untied lm_head is a real matmul and still counts."""
        n = sum(p.numel() for p in self.parameters())
        return n - self.wte.weight.numel() if non_embedding else n

    def estimate_flops(self):
        """Training FLOPs per token, forward + backward (PaLM appendix B, as in nanochat).

        Each matmul weight costs 2 FLOPs per token forward and 4 backward (gradients of input and weight).
        Attention adds q @ k^T and probs @ v: 2 * 2 * n_head * head_dim * block_size per layer forward, times 3.
        """
        c = self.config
        matmul_params = sum(m.weight.numel() for m in self.modules() if isinstance(m, nn.Linear))
        return 6.0 * matmul_params + 12.0 * c.n_layer * c.n_head * c.head_dim * c.block_size

    @torch.no_grad()
    def generate(self, idx, max_new_tokens, temperature=1.0, top_k=None, top_p=None, attention_mask=None):
        """Yield the next token of every row, (B,), max_new_tokens times, continuing prompts idx (B, T).

        The prompt is prefilled into a KV cache, then only the newest token runs each step. When the cache is
        full (block_size tokens), it restarts from the last block_size // 2 tokens, re-prefilled: a sliding
        window like nanoGPT's cropping, re-prefilled only every block_size // 2 steps instead of every step.
        Each token is thus predicted from between block_size // 2 and block_size tokens of context.
        attention_mask (B, T) marks left padding of the prompts, as in forward().
        """
        block = self.config.block_size
        tokens = idx
        is_real = torch.ones_like(idx, dtype=torch.bool) if attention_mask is None else attention_mask.bool()
        kv_cache = None
        for _ in range(max_new_tokens):
            if kv_cache is None or kv_cache.length == block:
                keep = block if kv_cache is None else block // 2
                kv_cache = KVCache(self.config, idx.size(0), block, device=idx.device)
                logits, _ = self(tokens[:, -keep:], attention_mask=is_real[:, -keep:], kv_cache=kv_cache)
            else:
                logits, _ = self(tokens[:, -1:], kv_cache=kv_cache)
            next_token = sample_next_token(logits[:, -1], temperature, top_k, top_p)  # (B,)
            yield next_token
            tokens = torch.cat((tokens, next_token[:, None]), dim=1)
            is_real = torch.cat((is_real, torch.ones_like(next_token[:, None], dtype=torch.bool)), dim=1)
