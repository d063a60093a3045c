"""
The myllm model: a decoder-only Transformer in the Llama / Qwen2 style, with DeepSeek-V3's attention and experts as
options, in one file that reads top to bottom.

    from model import ModelConfig, Transformer
    model = Transformer(ModelConfig(n_layer=4))                        # Llama-style: GQA + SwiGLU
    model = Transformer(ModelConfig(attn="mla", n_routed_experts=16))  # DeepSeek-V3-style: MLA + MoE
    logits, loss = model(idx, targets)                     # training: idx, targets (B, T) token ids
    for token in model.generate(prompt, 100, top_p=0.9):   # inference: yields (B,) tokens, one per step
        ...

Compared with GPT-2 (nanoGPT): RMSNorm instead of LayerNorm, rotary position embeddings (RoPE, optionally stretched
past the training length) instead of learned ones, grouped-query attention (GQA) or DeepSeek's multi-head latent
attention (MLA), a SwiGLU MLP or a DeepSeek mixture of experts (MoE), no biases except optionally on q/k/v (Qwen2).
Module names (wte, layers.N.attn.wq, ...) are fixed: export_hf.py maps them one to one to Hugging Face's.

The one idea to understand first: every token carries an explicit *position* and every attention call an
explicit *mask* of allowed (query, key) pairs. Training uses the plain case (positions 0..T-1, causal mask);
a KV cache appends new tokens after the cached ones, and left padding (batched prompts of different
lengths) shifts each row's positions and hides its padding keys. One mask function and one position rule
serve all three, so a padded or cached row computes exactly what it computes alone and uncached.
"""

import math
import warnings
from dataclasses import dataclass, field, replace
from types import SimpleNamespace

import torch
import torch.nn as nn
import torch.nn.functional as F

from linear_attention import GatedDeltaNet
from lora import LoRALinear

# rope_scaling types: (required keys, optional keys), spelled as Hugging Face's config.json spells them. One addition:
# "dynamic" names its original_max_position_embeddings here, where Hugging Face takes max_position_embeddings.
ROPE_SCALING_KEYS = {
    "linear": ({"factor"}, set()),
    "dynamic": ({"factor", "original_max_position_embeddings"}, set()),
    "yarn": ({"factor", "original_max_position_embeddings"},
             {"beta_fast", "beta_slow", "mscale", "mscale_all_dim", "attention_factor", "truncate"}),
    "llama3": ({"factor", "original_max_position_embeddings", "low_freq_factor", "high_freq_factor"}, set()),
}


@dataclass
class ModelConfig:
    vocab_size: int = 6400
    block_size: int = 512  # longest sequence; sizes the generation window
    n_layer: int = 8
    n_head: int = 8
    n_kv_head: int = 2  # GQA (Ainslie et al. 2023): n_head // n_kv_head query heads share one key/value head
    n_embd: int = 512
    inter_dim: int = 0  # MLP hidden size; 0 = 8/3 * n_embd rounded up to a multiple of 64 (SwiGLU), 4 * n_embd (relu2)
    # The dense MLP: "silu" is SwiGLU (gated, three matrices); "relu2" the ungated w2(relu(w1 x)^2) of Primer (So et
    # al. 2021) and the modded-nanogpt speedrun, as transformers' Arcee computes it.
    hidden_act: str = "silu"
    rope_theta: float = 1e6  # RoPE base; large (Qwen2's value) so the slowest pairs barely turn over block_size
    rope_scaling: dict = field(default_factory=dict)  # {} = none; else as Hugging Face writes it, see rope_inv_freq
    norm_eps: float = 1e-5
    tie_embeddings: bool = True  # lm_head reuses wte's matrix: fewer parameters, as in GPT-2 and small Qwen2
    qkv_bias: bool = False  # Qwen2 puts biases on q, k, v (only)
    # Two changes to GQA attention that Qwen3-Next's full-attention layers make (and its export needs):
    qk_norm: bool = False  # RMSNorm of each query and key head before RoPE (Qwen3, OLMo2; Dehghani et al. 2023)
    attn_output_gate: bool = False  # the output times sigmoid(W_g x), per channel, before wo (Qiu et al. 2025)
    # A learned logit per head that joins every softmax without a value (gpt-oss; StreamingLLM's sink, Xiao et al.
    # 2023): a head can give most of its weight to nothing, so the weights on the keys sum to less than one.
    attention_sinks: bool = False
    dropout: float = 0.0
    # Logit soft-capping (Gemma 2; the speedrun): logits = cap * tanh(logits / cap), so no logit exceeds cap and a
    # confident token cannot push its logit (and the head's weights) ever higher. 0: off.
    final_logit_softcapping: float = 0.0
    # Each residual branch's output projection (wo, w2) starts at zero, so every block starts as the identity and the
    # stream is the embedding (the speedrun's init); the other matrices get gradients from the second step on.
    zero_init_residual: bool = False
    # "auto" (flash on a CUDA GPU, else sdpa), "flash" (our Triton kernels, myllm_kernels/), "sdpa" (PyTorch's fused
    # kernels) or "eager" (the readable reference)
    attn_impl: str = "auto"
    # Attention: "gqa" (n_kv_head key/value heads; n_kv_head = n_head is plain multi-head attention) or "mla",
    # DeepSeek-V2/V3's multi-head latent attention, with the names of DeepSeek-V3's config (n_kv_head is unused).
    attn: str = "gqa"
    q_lora_rank: int = 0  # 0: queries straight from x; else through a bottleneck of this rank
    kv_lora_rank: int = 256  # the latent cached per token, from which every head's keys and values are expanded
    qk_nope_head_dim: int = 64  # per-head query/key dims expanded from the latent, without position
    qk_rope_head_dim: int = 32  # per-head query dims with RoPE; the rope key of this width is shared by all heads
    v_head_dim: int = 64
    # DeepSeek Sparse Attention (DSA, DeepSeek-V3.2, 2025) on MLA, with transformers' DeepseekV32 names: a small
    # "lightning indexer" of index_n_heads heads of index_head_dim scores every earlier token for each query, and
    # attention reads only the index_topk best of them (Indexer). 0 heads: dense MLA, no indexer.
    index_n_heads: int = 0
    index_head_dim: int = 64  # its first qk_rope_head_dim dims carry RoPE, as MLA's decoupled rope dims
    index_topk: int = 256
    # Mixture of experts (DeepSeekMoE, Dai et al. 2024, as configured in DeepSeek-V3).
    n_routed_experts: int = 0  # 0 = the dense SwiGLU MLP in every layer
    n_shared_experts: int = 1  # experts every token goes through
    num_experts_per_tok: int = 2  # routed experts per token
    moe_inter_dim: int = 0  # hidden size of one expert; 0 = inter_dim // (num_experts_per_tok + n_shared_experts)
    n_group: int = 1  # experts are split into groups and a token may only use its topk_group best groups
    topk_group: int = 1
    routed_scaling_factor: float = 1.0  # multiplies the routed experts' weights
    norm_topk_prob: bool = True  # the chosen experts' weights sum to 1 (before routed_scaling_factor)
    scoring_func: str = "sigmoid"  # DeepSeek-V3's "sigmoid" or DeepSeek-V2's "softmax" over the experts
    first_k_dense_replace: int = 1  # the first layers keep the dense MLP (DeepSeek-V3: 3 of 61)
    bias_update_rate: float = 1e-3  # gamma of auxiliary-loss-free balancing (DeepSeek-V3's value)
    balance_loss_coef: float = 0.0  # alpha of the sequence-wise balance loss; 0 = off (DeepSeek-V3: 1e-4)
    # LongCat-Flash (Meituan 2025): zero-computation experts the router may choose beside the routed ones (a token
    # sent to one passes unchanged, times its weight: no compute, no travel), and ScMoE's shortcut layer (Cai et al.
    # 2024, "Shortcut-connected Expert Parallelism"): with moe_shortcut each layer has two attention sublayers and two
    # dense MLPs, and its MoE reads the input of the first dense MLP while its sum joins at the end of the layer.
    zero_expert_num: int = 0
    moe_shortcut: bool = False
    # Linear attention (linear_attention.py: Gated DeltaNet), with transformers' Qwen3-Next names. layer_types gives
    # each layer's mixer, "full_attention" (attn above) or "linear_attention"; left empty, every
    # full_attention_interval-th layer is full and the others linear: 1 (the default) is all full attention,
    # Qwen3-Next's 4 is three linear layers to one full, 0 is linear only.
    layer_types: list = field(default_factory=list)  # also "sliding_attention": attn over the last sliding_window keys
    full_attention_interval: int = 1
    # Keys a "sliding_attention" layer sees: the last sliding_window positions, its own included (Mistral's 4096,
    # gpt-oss's 128): the cost and the reach of the layer stop growing with the context.
    sliding_window: int = 0
    linear_num_key_heads: int = 0  # query/key heads; 0 = n_kv_head
    linear_num_value_heads: int = 0  # value heads, each with its own state; 0 = n_head
    linear_key_head_dim: int = 0  # 0 = head_dim
    linear_value_head_dim: int = 0  # 0 = head_dim
    linear_conv_kernel_dim: int = 4  # the short causal convolution over q, k, v: this many tokens
    linear_chunk_size: int = 64  # tokens per chunk of the chunked (training) form; the result does not depend on it
    # MoBA (Lu et al. 2025, "MoBA: Mixture of Block Attention for Long-Context LLMs"), with the names of its code, on
    # GQA's full-attention layers: the keys are cut into blocks of moba_chunk_size positions, and each query attends
    # to its own block (causally) and to the moba_topk - 1 earlier blocks whose mean key it scores highest. 0: off.
    moba_chunk_size: int = 0
    moba_topk: int = 3
    # Multi-token prediction (DeepSeek-V3 section 2.2): mtp_depth modules after the model, the k-th predicting each
    # token k + 1 places ahead; their mean loss, times mtp_loss_weight, joins the training loss (DeepSeek-V3: depth
    # 1, weight 0.3, then 0.1). The first also drafts tokens for self-speculative decoding (speculative_generate).
    mtp_depth: int = 0
    mtp_loss_weight: float = 0.3

    def __post_init__(self):
        for name in ("vocab_size", "block_size", "n_layer", "n_head", "n_kv_head", "n_embd"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be positive, got {getattr(self, name)}")
        for name in ("norm_eps", "rope_theta", "routed_scaling_factor"):
            if not 0 < getattr(self, name) < math.inf:
                raise ValueError(f"{name} must be a positive number, got {getattr(self, name)}")
        for name in ("inter_dim", "moe_inter_dim", "bias_update_rate", "balance_loss_coef", "mtp_depth",
                     "mtp_loss_weight", "zero_expert_num", "final_logit_softcapping"):
            if not 0 <= getattr(self, name) < math.inf:
                raise ValueError(f"{name} must be >= 0, got {getattr(self, name)}")
        if not 0 <= self.dropout < 1:
            raise ValueError(f"dropout must be in [0, 1), got {self.dropout}")
        if self.attn_impl not in ("auto", "flash", "sdpa", "eager"):
            raise ValueError(f"attn_impl must be 'auto', 'flash', 'sdpa' or 'eager', got {self.attn_impl!r}")
        if self.attn == "gqa":
            if self.n_embd % self.n_head:
                raise ValueError(f"n_embd ({self.n_embd}) must be divisible by n_head ({self.n_head})")
            if self.n_head % self.n_kv_head:
                raise ValueError(f"n_head ({self.n_head}) must be divisible by n_kv_head ({self.n_kv_head})")
        elif self.attn == "mla":
            if self.qk_norm or self.attn_output_gate or self.attention_sinks:
                raise ValueError("qk_norm, attn_output_gate and attention_sinks are for attn='gqa'")
            for name in ("kv_lora_rank", "qk_rope_head_dim", "v_head_dim"):
                if getattr(self, name) < 1:
                    raise ValueError(f"{name} must be positive, got {getattr(self, name)}")
            if self.q_lora_rank < 0 or self.qk_nope_head_dim < 0:
                raise ValueError("q_lora_rank and qk_nope_head_dim must be >= 0")
            if self.qkv_bias:
                raise ValueError("qkv_bias is for attn='gqa'; MLA has no biases")
            if self.index_n_heads:
                self._check_indexer()
        else:
            raise ValueError(f"attn must be 'gqa' or 'mla', got {self.attn!r}")
        if self.index_n_heads and self.attn != "mla":
            raise ValueError("index_n_heads (DeepSeek Sparse Attention) is for attn='mla'")
        if self.moba_chunk_size and (self.attn != "gqa" or self.moba_chunk_size < 1 or self.moba_topk < 1):
            raise ValueError("moba_chunk_size (MoBA) is for attn='gqa', with moba_chunk_size and moba_topk >= 1")
        if self.rope_dim % 2:
            raise ValueError(f"head_dim (the RoPE dims of a head) must be even for RoPE's pairs, got {self.rope_dim}")
        self._check_rope_scaling()
        if self.hidden_act not in ("silu", "relu2"):
            raise ValueError(f"hidden_act must be 'silu' (SwiGLU) or 'relu2', got {self.hidden_act!r}")
        if self.hidden_act == "relu2" and self.n_routed_experts:
            raise ValueError("hidden_act='relu2' is the dense MLP's; DeepSeek's experts are SwiGLU: "
                             "set n_routed_experts=0")
        if self.inter_dim == 0 and self.hidden_act == "relu2":
            self.inter_dim = 4 * self.n_embd  # GPT-2's width; two matrices of it hold as many weights as SwiGLU's three
        elif self.inter_dim == 0:
            # 8/3 keeps SwiGLU's three matrices at the parameter count of a 4x two-matrix MLP (Shazeer 2020);
            # a multiple of 64 keeps the matmuls on fast tile sizes.
            self.inter_dim = 64 * math.ceil(8 * self.n_embd / 3 / 64)
        if self.n_routed_experts:
            self._check_moe()
        elif self.zero_expert_num or self.moe_shortcut:
            raise ValueError("zero_expert_num and moe_shortcut are MoE options: set n_routed_experts")
        self._check_layer_types()
        if self.moe_shortcut and (set(self.layer_types) != {"full_attention"} or self.first_k_dense_replace or
                                  self.index_n_heads):
            raise ValueError("moe_shortcut makes every layer LongCat-Flash's (two full-attention sublayers, two dense "
                             "MLPs, one MoE): with full-attention layers only, first_k_dense_replace=0 and no DSA")

    def _check_rope_scaling(self):
        if not self.rope_scaling:
            return
        kind = self.rope_scaling.get("rope_type")
        if kind not in ROPE_SCALING_KEYS:
            raise ValueError(f"rope_scaling['rope_type'] must be one of {', '.join(ROPE_SCALING_KEYS)}, got {kind!r}")
        required, optional = ROPE_SCALING_KEYS[kind]
        keys = set(self.rope_scaling) - {"rope_type"}
        if required - keys:
            raise ValueError(f"rope_scaling of type {kind!r} needs the keys {sorted(required - keys)}")
        if keys - required - optional:
            raise ValueError(f"rope_scaling of type {kind!r} has unknown keys {sorted(keys - required - optional)}")
        if not self.rope_scaling["factor"] >= 1:
            raise ValueError(f"rope_scaling['factor'] must be >= 1, got {self.rope_scaling['factor']}")

    def _check_layer_types(self):
        if not self.layer_types:
            if self.full_attention_interval < 0:
                raise ValueError(f"full_attention_interval must be >= 0, got {self.full_attention_interval}")
            every = self.full_attention_interval
            self.layer_types = ["full_attention" if every and (i + 1) % every == 0 else "linear_attention"
                                for i in range(self.n_layer)]
        types = self.layer_types
        if len(types) != self.n_layer or set(types) - {"full_attention", "sliding_attention", "linear_attention"}:
            raise ValueError(f"layer_types must list 'full_attention', 'sliding_attention' or 'linear_attention' for "
                             f"each of the {self.n_layer} layers, got {types!r}")
        if "sliding_attention" in types and self.sliding_window < 1:
            raise ValueError(f"sliding_window must be >= 1 for 'sliding_attention' layers, got {self.sliding_window}")
        if "linear_attention" not in types:
            return
        for name, default in (("linear_num_key_heads", self.n_kv_head), ("linear_num_value_heads", self.n_head),
                              ("linear_key_head_dim", self.head_dim), ("linear_value_head_dim", self.head_dim)):
            if getattr(self, name) == 0:
                setattr(self, name, default)
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be positive, got {getattr(self, name)}")
        if self.linear_num_value_heads % self.linear_num_key_heads:
            raise ValueError(f"linear_num_value_heads ({self.linear_num_value_heads}) must be a multiple of "
                             f"linear_num_key_heads ({self.linear_num_key_heads})")
        if self.linear_conv_kernel_dim < 2 or self.linear_chunk_size < 1:
            raise ValueError("linear_conv_kernel_dim must be >= 2 and linear_chunk_size >= 1")

    def _check_indexer(self):
        if self.index_n_heads < 0 or self.index_topk < 1:
            raise ValueError("index_n_heads must be >= 0 and index_topk >= 1")
        if self.q_lora_rank == 0:
            raise ValueError("the DSA indexer reads the query's low-rank latent (as DeepSeek-V3.2's): set q_lora_rank")
        if not self.qk_rope_head_dim <= self.index_head_dim:
            raise ValueError(f"index_head_dim ({self.index_head_dim}) must hold the qk_rope_head_dim "
                             f"({self.qk_rope_head_dim}) dims that carry RoPE")
        if "sliding_attention" in self.layer_types:
            raise ValueError("sliding_attention layers with DSA: a layer either chooses its keys or takes a window")

    def _check_moe(self):
        E, k, groups = self.n_routed_experts, self.num_experts_per_tok, self.n_group
        if E < 0 or self.n_shared_experts < 0:
            raise ValueError("n_routed_experts and n_shared_experts must be >= 0")
        if not 1 <= k <= E + self.zero_expert_num:
            raise ValueError(f"num_experts_per_tok must be between 1 and n_routed_experts + zero_expert_num "
                             f"({E + self.zero_expert_num}), got {k}")
        if self.zero_expert_num and groups > 1:
            raise ValueError("zero_expert_num with n_group > 1: the zero experts belong to no group")
        if groups < 1 or E % groups:
            raise ValueError(f"n_group ({groups}) must divide n_routed_experts ({E})")
        if groups > 1 and E // groups < 2:
            raise ValueError("n_group: each group needs at least 2 experts (a group scores the sum of its top 2)")
        if not 1 <= self.topk_group <= groups or self.topk_group * (E // groups) < k:
            raise ValueError(f"topk_group ({self.topk_group}) must be between 1 and n_group ({groups}) and its groups "
                             f"must hold at least num_experts_per_tok ({k}) experts")
        if self.scoring_func not in ("sigmoid", "softmax"):
            raise ValueError(f"scoring_func must be 'sigmoid' or 'softmax', got {self.scoring_func!r}")
        if not 0 <= self.first_k_dense_replace <= self.n_layer:
            raise ValueError(f"first_k_dense_replace must be between 0 and n_layer, got {self.first_k_dense_replace}")
        if self.moe_inter_dim == 0:
            # A token's experts (routed and shared) together are as wide as the dense MLP: same active parameters.
            self.moe_inter_dim = self.inter_dim // (k + self.n_shared_experts)

    @property
    def attention_types(self):
        """Each attention sublayer's kind, in order (the KV cache's slots): layer_types, each twice with
        moe_shortcut, whose layers have two."""
        return [kind for kind in self.layer_types for _ in range(2 if self.moe_shortcut else 1)]

    @property
    def head_dim(self):
        return self.n_embd // self.n_head

    @property
    def rope_dim(self):
        """Dims of a query or key head that RoPE rotates: all of a GQA head, the decoupled rope part in MLA."""
        return self.qk_rope_head_dim if self.attn == "mla" else self.head_dim


class RMSNorm(nn.Module):
    """Root-mean-square norm (Zhang & Sennrich 2019): LayerNorm without the mean subtraction and the bias."""

    def __init__(self, dim, eps):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x):
        # x / sqrt(mean(x^2) + eps), in float32: a bf16 sum of squares over thousands of channels loses the low
        # bits of the scale. The gain applies after rounding back, as in Llama (so the HF export agrees).
        return self.weight * F.rms_norm(x.float(), (x.size(-1),), eps=self.eps).to(x.dtype)


def yarn_mscale(factor, mscale=1.0):
    """YaRN's attention temperature (Peng et al. 2023, section 3.4): sqrt(1/t) = 0.1 ln(factor) + 1, times mscale."""
    return 1.0 if factor <= 1 else 0.1 * mscale * math.log(factor) + 1.0


def rope_inv_freq(dim, theta, scaling, seq_len=0):
    """Angular speed of each of the dim / 2 rotating pairs: theta^(-2i / dim) (RoFormer, Su et al.), stretched so
    that a model trained on original_max_position_embeddings positions reads further ones. The formulas are Hugging
    Face's (modeling_rope_utils), so an exported model computes the same angles.

    scaling["rope_type"]:
      linear  position interpolation (Chen et al. 2023): every pair turns factor times slower.
      dynamic NTK-aware scaling grown with the sequence (bloc97, emozilla 2023): RoPE's base grows instead of the
              positions shrinking, by (factor * seq_len / original - factor + 1)^(dim / (dim - 2)), which slows
              the slowest pair by that ratio and leaves the fastest alone. Only past the original length;
              seq_len is the longest sequence of the current call.
      yarn    (Peng et al. 2023) pairs that turn more than beta_fast times over the original length keep their
              speed, pairs that turn less than beta_slow times are interpolated by factor, a linear ramp between.
      llama3  (Llama 3.1) the same idea by wavelength: shorter than original / high_freq_factor kept, longer than
              original / low_freq_factor divided by factor, a smooth blend between.
    """
    inv_freq = 1.0 / theta ** (torch.arange(0, dim, 2, dtype=torch.float32) / dim)
    kind = scaling.get("rope_type")
    if kind is None:
        return inv_freq
    factor = scaling["factor"]
    if kind == "linear":
        return inv_freq / factor
    original = scaling["original_max_position_embeddings"]
    if kind == "dynamic":
        if seq_len <= original:
            return inv_freq
        base = theta * (factor * seq_len / original - (factor - 1)) ** (dim / (dim - 2))
        return 1.0 / base ** (torch.arange(0, dim, 2, dtype=torch.float32) / dim)
    if kind == "llama3":
        wavelen = 2 * math.pi / inv_freq
        low, high = scaling["low_freq_factor"], scaling["high_freq_factor"]
        # 0 for wavelengths above original / low (interpolated), 1 below original / high (kept), linear between.
        smooth = ((original / wavelen - low) / (high - low)).clamp(0, 1)
        return (1 - smooth) * inv_freq / factor + smooth * inv_freq

    def pair_turning(rotations):  # the (fractional) pair index that turns `rotations` times over the original length
        return dim * math.log(original / (rotations * 2 * math.pi)) / (2 * math.log(theta))

    low, high = pair_turning(scaling.get("beta_fast") or 32), pair_turning(scaling.get("beta_slow") or 1)
    if scaling.get("truncate", True):
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, dim - 1)
    if low == high:
        high += 0.001  # a ramp of zero width would divide by zero
    ramp = ((torch.arange(dim // 2, dtype=torch.float32) - low) / (high - low)).clamp(0, 1)
    return inv_freq / factor * ramp + inv_freq * (1 - ramp)  # ramp 0: fast pairs kept, 1: slow pairs interpolated


def rope_attention_factor(scaling):
    """YaRN's temperature, applied to cos and sin (so to every q.k score twice): attention_factor, else the ratio
    of the mscales when both are given (DeepSeek's configs give equal ones, and scale the softmax instead), else
    yarn_mscale(factor). 1 for the other types."""
    if scaling.get("rope_type") != "yarn":
        return 1.0
    if scaling.get("attention_factor") is not None:
        return scaling["attention_factor"]
    factor, mscale, mscale_all_dim = scaling["factor"], scaling.get("mscale"), scaling.get("mscale_all_dim")
    if mscale and mscale_all_dim:
        return yarn_mscale(factor, mscale) / yarn_mscale(factor, mscale_all_dim)
    return yarn_mscale(factor)


class RotaryEmbedding(nn.Module):
    """cos / sin of RoPE's angles at given positions, so each row of a batch can have its own positions."""

    def __init__(self, dim, theta, scaling):
        super().__init__()
        self.dim, self.theta, self.scaling = dim, theta, scaling
        # Non-persistent: derived from the config, so it stays out of checkpoints and exports.
        self.register_buffer("inv_freq", rope_inv_freq(dim, theta, scaling), persistent=False)
        self.attention_factor = rope_attention_factor(scaling)

    def forward(self, positions, dtype):
        """positions (B, T) -> cos, sin, each (B, 1, T, dim), broadcasting over heads."""
        inv_freq = self.inv_freq
        if self.scaling.get("rope_type") == "dynamic":
            # As Hugging Face: the frequencies of the longest sequence in this call. Cached keys keep the angles
            # they were given, so with dynamic scaling a cached forward differs from an uncached one.
            seq_len = int(positions.max()) + 1
            inv_freq = rope_inv_freq(self.dim, self.theta, self.scaling, seq_len).to(positions.device)
        angles = positions[..., None].float() * inv_freq  # (B, T, dim / 2)
        # Rotate-half layout (Hugging Face Llama): dim i is paired with dim i + dim/2, not with i + 1 as in the
        # paper, so both halves of a pair share one angle.
        angles = torch.cat((angles, angles), dim=-1)[:, None]  # (B, 1, T, dim)
        return (angles.cos() * self.attention_factor).to(dtype), (angles.sin() * self.attention_factor).to(dtype)


def apply_rope(x, cos, sin):
    """Rotate each pair (x[..., i], x[..., i + dim/2]) of x (B, heads, T, dim) by its angle."""
    x1, x2 = x.chunk(2, dim=-1)
    return x * cos + torch.cat((-x2, x1), dim=-1) * sin


def make_attention_mask(key_is_real, n_queries, doc_ids=None):
    """Which keys each query may attend to, for both attention backends.

    key_is_real (B, S) marks the cached and new keys that are real tokens (not padding); the queries are the
    last n_queries of those S positions. Query i may see key j when j <= i (causal) and key j is real, and,
    given doc_ids (B, S) of packed documents, when both belong to one document.
    Returns allowed (B, 1, T, S) and has_key (B, 1, T, 1), whether a query has any key it may see.
    """
    S = key_is_real.size(1)
    query_pos = torch.arange(S - n_queries, S, device=key_is_real.device)
    causal = torch.arange(S, device=key_is_real.device)[None, :] <= query_pos[:, None]  # (T, S)
    allowed = causal & key_is_real[:, None, :]  # (B, T, S)
    if doc_ids is not None:
        allowed = allowed & (doc_ids[:, -n_queries:, None] == doc_ids[:, None, :])
    has_key = allowed.any(dim=-1, keepdim=True)
    # A query with no allowed key (a left-padding position) would get softmax over all -inf = NaN, and masking
    # its output afterwards does not help the backward pass: the gradient still flows through the softmax and
    # 0 * NaN = NaN. So such a query attends to every key (a finite softmax) and attention() zeroes its output.
    allowed = allowed | ~has_key
    return allowed[:, None], has_key[:, None]


def sliding_band(n_queries, S, window, device):
    """(T, S): key j is among the last `window` positions of the query in column S - T + i (its own included)."""
    query_pos = torch.arange(S - n_queries, S, device=device)
    return torch.arange(S, device=device)[None, :] > query_pos[:, None] - window


def softmax_attention(scores, v, allowed, dropout_p, sinks=None):
    """The weighted sum of values under the softmax of scores (B, n_head, T, S) over the allowed keys; with sinks
    (n_head,), each head's sink logit joins the softmax as one more column, dropped afterwards (it has no value)."""
    scores = scores.masked_fill(~allowed, float("-inf"))
    scores = scores.to(torch.promote_types(scores.dtype, torch.float32))  # float32 at least: exp() of bf16 is coarse
    if sinks is not None:
        sink = sinks.to(scores.dtype).view(1, -1, 1, 1).expand(*scores.shape[:3], 1)
        probs = F.softmax(torch.cat((scores, sink), dim=-1), dim=-1)[..., :-1].to(v.dtype)
    else:
        probs = F.softmax(scores, dim=-1).to(v.dtype)
    probs = F.dropout(probs, p=dropout_p)
    return probs @ v  # (B, n_head, T, d_v)


def eager_attention(q, k, v, allowed, dropout_p, scale, sinks=None):
    """Softmax attention written out step by step; "sdpa" computes the same thing with fused kernels."""
    n_rep = q.size(1) // k.size(1)
    k = k.repeat_interleave(n_rep, dim=1)  # (B, n_head, S, d_qk): query head h reads key/value head h // n_rep
    v = v.repeat_interleave(n_rep, dim=1)
    return softmax_attention((q @ k.transpose(-2, -1)) * scale, v, allowed, dropout_p, sinks)  # scores (B, n_head, T, S)


def resolve_attn_impl(name):
    """The backend a model built here runs: "auto" is our flash kernel on a CUDA GPU and sdpa elsewhere; "flash"
    where Triton cannot run (a CPU without TRITON_INTERPRET=1, its interpreter) falls back to sdpa, saying so once."""
    if name == "auto":
        name = "flash" if torch.cuda.is_available() else "sdpa"
    if name == "flash":
        import myllm_kernels  # only when asked for: importing Triton takes seconds

        if not myllm_kernels.available():
            warnings.warn("attn_impl='flash' needs a CUDA GPU (or TRITON_INTERPRET=1 on a CPU); using sdpa instead")
            return "sdpa"
    return name


def attention(q, k, v, mask, impl, dropout_p=0.0, scale=None, window=None, sinks=None):
    """q (B, n_head, T, d_qk) attends over k (B, n_kv_head, S, d_qk), v (B, n_kv_head, S, d_v) -> (B, n_head, T, d_v).

    mask: make_attention_mask(), or None when no key is padding and the queries are either all S positions (plain
    causal attention) or a single new one (it sees every key); for packed windows (allowed, has_key, doc_ids),
    which the flash kernel reads as doc_ids alone.
    scale: of the scores; None = 1/sqrt(d_qk), which keeps them at unit variance so the softmax does not saturate
    (Vaswani et al. 2017). window: a sliding_attention layer's sliding_window (None: every earlier key). sinks:
    attention_sinks' logits (n_head,), one more softmax column per head: our kernel has it, sdpa does not (eager).
    """
    scale = 1.0 / math.sqrt(q.size(-1)) if scale is None else scale
    if window is not None and mask is None and q.size(2) == k.size(2) > 2 * window and impl != "flash":
        return windowed_attention(q, k, v, impl, dropout_p, scale, window, sinks)
    fallback = "sdpa" if sinks is None else "eager"
    if impl == "sdpa":
        impl = fallback
    if impl == "flash":
        # Our kernel computes causal self-attention, the training case, over whole rows or packed documents.
        # Padding masks, a KV cache (keys beyond the queries), attention dropout and head dims past 256 (MLA's
        # absorbed latent) go to sdpa.
        doc_ids = mask[2] if mask is not None and len(mask) == 3 else None
        if (mask is None or doc_ids is not None) and q.size(2) == k.size(2) and dropout_p == 0.0 \
                and max(q.size(-1), v.size(-1)) <= 256:
            from myllm_kernels import flash_attention

            return flash_attention(q, k, v, causal=True, softmax_scale=scale, window_size=window, doc_ids=doc_ids,
                                   sinks=sinks)
        impl = fallback
    if mask is None and impl == "sdpa" and window is None:
        # No mask tensor at all: lets PyTorch pick its fastest kernel. (is_causal aligns the first query with the
        # first key, so it is right for T == S; a single query needs no mask.)
        return F.scaled_dot_product_attention(q, k, v, dropout_p=dropout_p, is_causal=q.size(2) > 1, scale=scale,
                                              enable_gqa=True)
    if mask is None:
        mask = make_attention_mask(torch.ones(q.size(0), k.size(2), dtype=torch.bool, device=q.device), q.size(2))
    allowed, has_key = mask[:2]
    if window is not None:  # a query keeps a key of its window (itself at least), so has_key stays as it was
        allowed = allowed & sliding_band(q.size(2), k.size(2), window, q.device)
    if impl == "sdpa":
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=allowed, dropout_p=dropout_p, scale=scale, enable_gqa=True)
    else:
        y = eager_attention(q, k, v, allowed, dropout_p, scale, sinks)
    return y.masked_fill(~has_key, 0.0)  # queries without a real key output zeros (see make_attention_mask)


def moba_key_blocks(key_is_real, chunk):
    """Each key's MoBA block (B, S): its position (real keys before it) // chunk, so left padding does not move a
    row's blocks; -1 for padding, which no block holds."""
    positions = key_is_real.long().cumsum(dim=1) - 1
    return torch.where(key_is_real, positions // chunk, -1)


@torch.no_grad()  # the choice passes no gradient (as DSA's): the attention over the chosen blocks does
def moba_choice(q, k, blocks, topk):
    """MoBA's router: which blocks each query attends to, (B, n_head, T, n_blocks) bool. The gate of block c for
    query q is q . mean(keys of c) (the block's mean-pooled key); a query takes its own block and the topk - 1
    earlier blocks of highest gate, never a later one. q (B, n_head, T, d), k (B, n_kv_head, S, d); blocks: the keys'
    (B, S) and the queries' (B, T), Transformer.forward's moba_blocks."""
    key_blocks, query_blocks = blocks
    n = max(int(key_blocks.max()), int(query_blocks.max())) + 1
    members = F.one_hot(key_blocks.clamp(min=0), n).to(k.dtype) * (key_blocks >= 0)[..., None]  # (B, S, n_blocks)
    mean_keys = torch.einsum("bsn,bhsd->bhnd", members, k) / members.sum(dim=1).clamp(min=1)[:, None, :, None]
    gate = q @ mean_keys.repeat_interleave(q.size(1) // k.size(1), dim=1).transpose(-2, -1)  # (B, n_head, T, n)
    own = query_blocks[:, :, None]  # (B, T, 1)
    blocks = torch.arange(n, device=q.device)
    earlier = (blocks < own)[:, None]  # (B, 1, T, n)
    chosen = blocks == own[:, None]  # its own block
    if topk > 1:
        best = gate.masked_fill(~earlier, float("-inf")).topk(min(topk - 1, n), dim=-1).indices
        chosen = chosen | (torch.zeros_like(gate, dtype=torch.bool).scatter(-1, best, True) & earlier)
    return chosen


def moba_attention(q, k, v, mask, blocks, chunk, topk, impl, dropout_p, sinks):
    """Attention over MoBA's chosen blocks: the flash kernel walks only their tiles (a BlockMask, when the blocks
    are the kernel's: training, a power-of-two chunk of 16 or more); elsewhere the choice is a mask on every key."""
    chosen = moba_choice(q, k, blocks, topk)  # (B, n_head, T, n_blocks)
    T, S = q.size(2), k.size(2)
    if impl == "flash" and mask is None and T == S and dropout_p == 0.0 and chunk >= 16 and not chunk & (chunk - 1):
        from myllm_kernels import flash_attention
        from myllm_kernels.flash_attention import block_mask

        n = chosen.size(-1)
        visit = F.pad(chosen, (0, 0, 0, n * chunk - T)).view(*chosen.shape[:2], n, chunk, n).any(dim=3)
        return flash_attention(q, k, v, causal=True, sinks=sinks, block_mask=block_mask(visit, chunk, chosen))
    if mask is None:
        mask = make_attention_mask(torch.ones(q.size(0), S, dtype=torch.bool, device=q.device), T)
    takes = chosen.gather(-1, blocks[0].clamp(min=0)[:, None, None, :].expand(*chosen.shape[:3], S))  # (B, H, T, S)
    # A real query keeps its own block, itself in it, so has_key stays as it was; a padding query (no block) keeps
    # make_attention_mask's every key, for a finite softmax.
    allowed = mask[0] & (takes | ~mask[1])
    return attention(q, k, v, (allowed, mask[1]), "eager" if impl == "eager" else "sdpa", dropout_p, sinks=sinks)


def windowed_attention(q, k, v, impl, dropout_p, scale, window, sinks):
    """Causal attention over each query's last `window` keys, `window` queries at a time: a chunk of queries needs
    its own keys and the window - 1 before them, so the scores cost T * 2 * window instead of T^2, as the flash
    kernel's skipped blocks save on a GPU (sdpa and eager under one (T, T) band mask would compute every score)."""
    T, out = q.size(2), []
    for start in range(0, T, window):
        end, first = min(start + window, T), max(start - window + 1, 0)  # the chunk's queries, its first key
        mask = make_attention_mask(torch.ones(q.size(0), end - first, dtype=torch.bool, device=q.device), end - start)
        out.append(attention(q[:, :, start:end], k[:, :, first:end], v[:, :, first:end], mask, impl, dropout_p, scale,
                             window, sinks))
    return torch.cat(out, dim=2)  # (B, n_head, T, d_v)


class Attention(nn.Module):
    """Multi-head causal self-attention with grouped-query key/value heads and RoPE."""

    def __init__(self, config, layer_id, window=None):
        super().__init__()
        self.layer_id, self.window = layer_id, window  # which slot of the KV cache is ours; a sliding layer's window
        self.n_head, self.n_kv_head, self.head_dim = config.n_head, config.n_kv_head, config.head_dim
        self.attn_impl, self.dropout = resolve_attn_impl(config.attn_impl), config.dropout
        self.wq = nn.Linear(config.n_embd, config.n_head * config.head_dim, bias=config.qkv_bias)
        self.wk = nn.Linear(config.n_embd, config.n_kv_head * config.head_dim, bias=config.qkv_bias)
        self.wv = nn.Linear(config.n_embd, config.n_kv_head * config.head_dim, bias=config.qkv_bias)
        self.wo = nn.Linear(config.n_head * config.head_dim, config.n_embd, bias=False)
        # q/k norm bounds the attention logits, which otherwise grow with the weights until the softmax saturates
        # (the instability Dehghani et al. 2023 saw at scale); the gate lets a head output nothing, where softmax
        # attention must put its weight somewhere (a "sink"), and Qiu et al. 2025 find it trains more stably.
        self.q_norm = RMSNorm(config.head_dim, config.norm_eps) if config.qk_norm else None
        self.k_norm = RMSNorm(config.head_dim, config.norm_eps) if config.qk_norm else None
        self.wg = nn.Linear(config.n_embd, config.n_head * config.head_dim, bias=False) if config.attn_output_gate else None
        self.sinks = nn.Parameter(torch.zeros(config.n_head)) if config.attention_sinks else None
        self.moba = (config.moba_chunk_size, config.moba_topk) if config.moba_chunk_size and window is None else None

    def forward(self, x, rope, mask, kv_cache, moba_blocks=None):
        """moba_blocks: with MoBA, each key's block (B, S), -1 for padding, and each query's (B, T)."""
        B, T, _ = x.shape
        q = self.wq(x).view(B, T, self.n_head, self.head_dim).transpose(1, 2)  # (B, n_head, T, hd)
        k = self.wk(x).view(B, T, self.n_kv_head, self.head_dim).transpose(1, 2)  # (B, n_kv_head, T, hd)
        v = self.wv(x).view(B, T, self.n_kv_head, self.head_dim).transpose(1, 2)
        if self.q_norm is not None:
            q, k = self.q_norm(q), self.k_norm(k)
        q, k = apply_rope(q, *rope), apply_rope(k, *rope)
        if kv_cache is not None:
            k, v = kv_cache.update(self.layer_id, k, v)  # (B, n_kv_head, S, hd): cached keys, then the new ones
        dropout = self.dropout if self.training else 0.0
        if self.moba is not None:
            y = moba_attention(q, k, v, mask, moba_blocks, *self.moba, self.attn_impl, dropout, self.sinks)
        else:
            y = attention(q, k, v, mask, self.attn_impl, dropout, window=self.window, sinks=self.sinks)
        y = y.transpose(1, 2).reshape(B, T, -1)  # (B, T, n_head * hd)
        if self.wg is not None:
            y = y * torch.sigmoid(self.wg(x))
        return self.wo(y)  # (B, T, n_embd)


class MLA(nn.Module):
    """Multi-head latent attention (DeepSeek-V2, 2024): keys and values of every head are expanded from one small
    latent per token, so a KV cache holds only that latent and one RoPE key shared by the heads.

    RoPE cannot act on keys expanded from a cached latent (the rotation would sit between the query and the
    expansion matrix and stop it from being folded away), so position goes through extra "decoupled" dims: each
    head's query has qk_nope_head_dims that meet the expanded key and qk_rope_head_dims that meet the shared
    rotated key. Two ways to compute the same attention:
      naive (no KV cache: training)   expand the latent into per-head keys and values, attend as usual.
      absorbed (with a KV cache)      fold the key expansion W_UK into the query and the value expansion W_UV
                                      into the output, and attend straight over the cached latents: multi-query
                                      attention of width kv_lora_rank + qk_rope_head_dim, with no expansion of
                                      the S cached tokens at each step.
    """

    def __init__(self, config, layer_id, window=None):
        super().__init__()
        self.layer_id, self.window = layer_id, window
        self.attn_impl, self.dropout = resolve_attn_impl(config.attn_impl), config.dropout
        self.n_head, self.q_lora_rank, self.kv_lora_rank = config.n_head, config.q_lora_rank, config.kv_lora_rank
        self.nope_dim, self.rope_dim = config.qk_nope_head_dim, config.qk_rope_head_dim
        self.v_head_dim = config.v_head_dim
        qk_dim = self.nope_dim + self.rope_dim
        if config.q_lora_rank:
            # DeepSeek's inner norms use eps 1e-6 whatever the model's norm_eps (so does Hugging Face's port).
            self.wq_a = nn.Linear(config.n_embd, config.q_lora_rank, bias=False)
            self.q_norm = RMSNorm(config.q_lora_rank, 1e-6)
            self.wq_b = nn.Linear(config.q_lora_rank, config.n_head * qk_dim, bias=False)
        else:
            self.wq = nn.Linear(config.n_embd, config.n_head * qk_dim, bias=False)
        # The latent and the rope key, in one matmul.
        self.wkv_a = nn.Linear(config.n_embd, self.kv_lora_rank + self.rope_dim, bias=False)
        self.kv_norm = RMSNorm(self.kv_lora_rank, 1e-6)
        # W_UK and W_UV of every head, stacked: the latent's expansion into keys (nope part) and values.
        self.wkv_b = nn.Linear(self.kv_lora_rank, config.n_head * (self.nope_dim + self.v_head_dim), bias=False)
        self.wo = nn.Linear(config.n_head * self.v_head_dim, config.n_embd, bias=False)
        # The scores span nope + rope dims, so the 1/sqrt(d) of attention is over both. With YaRN and mscale_all_dim
        # (DeepSeek-V3's long-context config) the softmax temperature mscale^2 goes here, on all dims, as in
        # DeepSeek's and Hugging Face's code.
        self.scale = qk_dim**-0.5
        scaling = config.rope_scaling
        if scaling.get("rope_type") == "yarn" and scaling.get("mscale_all_dim"):
            self.scale *= yarn_mscale(scaling["factor"], scaling["mscale_all_dim"]) ** 2
        self.indexer = Indexer(config) if config.index_n_heads else None
        # DSA's dense warm-up (train.py's dsa_warmup): attend to every key while only the indexer learns.
        self.warmup, self.indexer_loss = False, None  # the loss: set by each training forward

    def forward(self, x, rope, mask, kv_cache):
        B, T, _ = x.shape
        q_in = x if self.q_lora_rank == 0 else self.q_norm(self.wq_a(x))  # with q_lora: the latent DSA's indexer reads
        q = (self.wq if self.q_lora_rank == 0 else self.wq_b)(q_in)
        q = q.view(B, T, self.n_head, self.nope_dim + self.rope_dim).transpose(1, 2)  # (B, n_head, T, nope + rope)
        q_nope, q_rope = q.split([self.nope_dim, self.rope_dim], dim=-1)
        latent, k_rope = self.wkv_a(x).split([self.kv_lora_rank, self.rope_dim], dim=-1)
        latent = self.kv_norm(latent)  # (B, T, kv_lora_rank)
        q_rope, k_rope = apply_rope(q_rope, *rope), apply_rope(k_rope[:, None], *rope)  # k_rope (B, 1, T, rope_dim)
        dropout = self.dropout if self.training else 0.0
        if self.indexer is not None:
            return self.indexed_forward(x, q_in, q_nope, q_rope, latent, k_rope, rope, mask, kv_cache, dropout)
        if kv_cache is None:  # naive: expand each token's latent into every head's key and value
            q, k, v = self.expand_heads(q_nope, q_rope, latent, k_rope)
            y = attention(q, k, v, mask, self.attn_impl, dropout, self.scale, self.window)
        else:  # absorbed: q_nope . (W_UK c) = (W_UK^T q_nope) . c, and W_UV commutes with the weighted sum over c
            kv = torch.cat((latent[:, None], k_rope), dim=-1)  # (B, 1, T, kv_lora_rank + rope_dim): all a token caches
            (kv,) = kv_cache.update(self.layer_id, kv)  # (B, 1, S, kv_lora_rank + rope_dim)
            w_uk, w_uv = self.absorbed_weights()
            q_latent = q_nope @ w_uk  # (B, n_head, T, nope) @ (n_head, nope, rank) -> (B, n_head, T, rank)
            y = self.latent_attention(q_latent, q_rope, kv, mask, dropout)  # (B, n_head, T, kv_lora_rank)
            y = y @ w_uv.transpose(1, 2)  # (B, n_head, T, rank) @ (n_head, rank, v_head_dim) -> (B, n_head, T, v_head_dim)
        return self.wo(y.transpose(1, 2).reshape(B, T, -1))  # (B, T, n_embd)

    def expand_heads(self, q_nope, q_rope, latent, k_rope):
        """The naive form's queries and keys (B, n_head, T, nope + rope) and values (B, n_head, T, v_head_dim)."""
        B, T, _ = latent.shape
        kv = self.wkv_b(latent).view(B, T, self.n_head, self.nope_dim + self.v_head_dim).transpose(1, 2)
        k_nope, v = kv.split([self.nope_dim, self.v_head_dim], dim=-1)  # (B, n_head, T, nope), (B, n_head, T, v)
        k = torch.cat((k_nope, k_rope.expand(-1, self.n_head, -1, -1)), dim=-1)
        return torch.cat((q_nope, q_rope), dim=-1), k, v

    def absorbed_weights(self):
        """W_UK (n_head, nope, rank) and W_UV (n_head, v_head_dim, rank), the halves of wkv_b. An unmerged LoRA
        adapter on wkv_b changes the matrix folded here: fold W + (alpha / r) B A."""
        w_kv = self.wkv_b.merged_weight() if isinstance(self.wkv_b, LoRALinear) else self.wkv_b.weight
        w_kv = w_kv.view(self.n_head, self.nope_dim + self.v_head_dim, self.kv_lora_rank)
        return w_kv[:, : self.nope_dim], w_kv[:, self.nope_dim :]

    def indexed_forward(self, x, q_in, q_nope, q_rope, latent, k_rope, rope, mask, kv_cache, dropout_p):
        """MLA under DeepSeek Sparse Attention: the indexer picks index_topk keys per query, and the absorbed form
        attends over those only (DeepSeek-V3.2 runs DSA on MLA's multi-query form: one latent per key, shared by
        the heads, is read once for all of them). With no more keys than index_topk, or in the dense warm-up, the
        layer is dense MLA. In training the indexer learns by KL to the attention it steers (indexer_kl)."""
        B, T, _ = x.shape
        # The indexer's input is detached (DeepSeek-V3.2's sparse stage): its KL teaches it alone, the language loss
        # the rest (the choice of keys passes no gradient anyway). In the warm-up the rest is frozen.
        x_in, q_in = x.detach(), q_in.detach()
        kv = torch.cat((latent[:, None], k_rope), dim=-1)  # (B, 1, T, kv_lora_rank + rope_dim)
        index_keys = self.indexer.keys(x_in, rope)  # (B, 1, T, index_head_dim)
        if kv_cache is not None:
            kv, index_keys = kv_cache.update(self.layer_id, kv, index_keys)  # (B, 1, S, ...) each
        S = kv.size(2)
        spelled = mask if mask is not None else make_attention_mask(torch.ones(B, S, dtype=torch.bool,
                                                                                device=x.device), T)
        allowed, has_key = spelled[:2]  # (B, 1, T, S), (B, 1, T, 1)
        scores = self.indexer(x_in, q_in, rope, index_keys)  # (B, T, S)
        if (self.warmup or self.indexer.topk >= S) and kv_cache is None:  # dense, naive
            q, k, v = self.expand_heads(q_nope, q_rope, latent, k_rope)
            y = attention(q, k, v, mask, self.attn_impl, dropout_p, self.scale)
            if self.training:  # what the indexer learns: the heads' mean attention over every allowed key
                self.indexer_loss = indexer_kl(scores, head_mean_probs(q, k, allowed, self.scale), allowed[:, 0])
        else:  # absorbed, over the chosen keys (every allowed one where topk >= S)
            n_chosen = S if self.warmup else min(self.indexer.topk, S)
            chosen, valid = self.indexer.choose(scores, allowed, n_chosen)  # (B, T, k) key indices, (B, 1, T, k)
            w_uk, w_uv = self.absorbed_weights()
            q_absorbed = torch.cat((q_nope @ w_uk, q_rope), dim=-1)  # (B, n_head, T, kv_lora_rank + rope_dim)
            y, probs = chosen_latent_attention(q_absorbed, kv, chosen, valid, self.kv_lora_rank, self.scale, dropout_p)
            y = y @ w_uv.transpose(1, 2)  # (B, n_head, T, kv_lora_rank) -> (B, n_head, T, v_head_dim)
            if self.training:  # over the chosen keys only, as attention saw them
                self.indexer_loss = indexer_kl(scores.gather(-1, chosen), probs.mean(dim=1).detach(), valid[:, 0])
        return self.wo(y.masked_fill(~has_key, 0.0).transpose(1, 2).reshape(B, T, -1))  # (B, T, n_embd)

    def latent_attention(self, q_latent, q_rope, kv, mask, dropout_p):
        """Attention straight over the cached latents: kv (B, 1, S, kv_lora_rank + rope_dim) holds each token's
        latent c and rope key side by side, and the values are the latents themselves. The score of a query
        against a cached token is two terms (DeepSeek-V2, section 2.1.3):
            content   q_latent . c        q_nope against the key W_UK c, with W_UK folded into the query
            position  q_rope . k_rope     the decoupled RoPE part, one rope key shared by all heads
        """
        latent, k_rope = kv.split([self.kv_lora_rank, self.rope_dim], dim=-1)  # (B, 1, S, rank), (B, 1, S, rope)
        if self.attn_impl == "eager":
            scores = (q_latent @ latent.transpose(-2, -1) + q_rope @ k_rope.transpose(-2, -1)) * self.scale
            if mask is None:
                mask = make_attention_mask(torch.ones(kv.size(0), kv.size(2), dtype=torch.bool, device=kv.device),
                                           q_latent.size(2))
            allowed, has_key = mask
            if self.window is not None:
                allowed = allowed & sliding_band(q_latent.size(2), kv.size(2), self.window, kv.device)
            return softmax_attention(scores, latent, allowed, dropout_p).masked_fill(~has_key, 0.0)
        # For speed: two dot products over the same (query, key) pairs are one dot product of the concatenated
        # vectors, [q_latent, q_rope] . [c, k_rope], so the fused kernels see multi-query attention of width
        # kv_lora_rank + rope_dim over the cache as it is stored.
        return attention(torch.cat((q_latent, q_rope), dim=-1), kv, latent, mask, self.attn_impl, dropout_p, self.scale,
                         self.window)


class Indexer(nn.Module):
    """DeepSeek-V3.2's lightning indexer: for query t and earlier token s, the index score

        I[t, s] = sum over index heads j of  w[t, j] * ReLU(q[t, j] . k[s] / sqrt(index_head_dim))

    with few small heads (DeepSeek-V3.2: 64 heads of 128 dims; MLA: 128 of 192), one key per token shared by the
    heads (so its cache is one vector per token), a per-query weight w for each head, and ReLU rather than a
    softmax: the scores only rank the keys, and ReLU is cheap (the paper runs it in FP8). The queries come from
    MLA's query latent, the keys from the layer's input; both carry RoPE on their first qk_rope_head_dim dims."""

    def __init__(self, config):
        super().__init__()
        self.n_heads, self.head_dim, self.topk = config.index_n_heads, config.index_head_dim, config.index_topk
        self.rope_dim = config.qk_rope_head_dim
        self.wq_b = nn.Linear(config.q_lora_rank, self.n_heads * self.head_dim, bias=False)
        self.wk = nn.Linear(config.n_embd, self.head_dim, bias=False)
        self.k_norm = nn.LayerNorm(self.head_dim, eps=1e-6)  # a LayerNorm with its bias here, as DeepSeek's
        self.weights_proj = nn.Linear(config.n_embd, self.n_heads, bias=False)

    def rotate(self, x, rope):
        """RoPE on the first rope_dim dims of x (B, heads, T, head_dim), the rest as they are."""
        x_rope, x_pass = x.split([self.rope_dim, self.head_dim - self.rope_dim], dim=-1)
        return torch.cat((apply_rope(x_rope, *rope), x_pass), dim=-1)

    def keys(self, x, rope):
        """x (B, T, n_embd) -> the tokens' index keys (B, 1, T, index_head_dim), what a KV cache keeps of them."""
        return self.rotate(self.k_norm(self.wk(x))[:, None], rope)

    def forward(self, x, q_latent, rope, keys):
        """Index scores (B, T, S) of the T queries (x, and q_latent (B, T, q_lora_rank)) against keys (B, 1, S, d)."""
        B, T, _ = x.shape
        q = self.rotate(self.wq_b(q_latent).view(B, T, self.n_heads, self.head_dim).transpose(1, 2), rope)
        # In float32 at least, as DeepSeek's kernel accumulates; n_heads^-1/2 keeps the sum's scale independent of
        # the number of heads.
        dtype = torch.promote_types(x.dtype, torch.float32)
        weights = self.weights_proj(x).to(dtype) * self.n_heads**-0.5  # (B, T, n_heads)
        logits = F.relu(q.to(dtype) @ keys.to(dtype).transpose(-2, -1) * self.head_dim**-0.5)  # (B, n_heads, T, S)
        return (weights.transpose(1, 2)[..., None] * logits).sum(dim=1)

    def choose(self, scores, allowed, k):
        """The k best-scoring keys of each query, (B, T, k) indices, and which of them it may see (B, 1, T, k): a
        query with fewer than k allowed keys (early in the sequence) takes them all, and some masked ones.

        topk has no rule for ties, and ReLU makes them common (a key that every head scores below 0 scores exactly
        0): which of them it took would depend on the tensor's length, and a cached step would choose other keys
        than the full forward. So the keys above the k-th score are taken, then the latest of those equal to it."""
        scores = scores.masked_fill(~allowed[:, 0], float("-inf"))
        kth = scores.topk(k, dim=-1).values[..., -1:]  # (B, T, 1)
        above, tied = scores > kth, scores == kth
        from_end = tied.flip(-1).cumsum(dim=-1).flip(-1)  # tied keys at or after each position
        take = above | (tied & (from_end <= k - above.sum(dim=-1, keepdim=True)))  # (B, T, S), k per row
        chosen = take.to(torch.uint8).topk(k, dim=-1).indices  # the set is fixed; its order does not matter
        return chosen, allowed[:, 0].gather(-1, chosen)[:, None]


def chosen_latent_attention(q, kv, chosen, valid, kv_lora_rank, scale, dropout_p):
    """MLA's absorbed attention over chosen keys only: q (B, n_head, T, kv_lora_rank + rope_dim) against, for each
    query, its k chosen entries of kv (B, 1, S, kv_lora_rank + rope_dim), the latents being the values. Costs
    T * k rather than T * S. Returns the output (B, n_head, T, kv_lora_rank) and the weights (B, n_head, T, k)."""
    picked = kv[:, 0][torch.arange(kv.size(0), device=kv.device)[:, None, None], chosen]  # (B, T, k, rank + rope)
    scores = torch.einsum("bhtd,btkd->bhtk", q, picked) * scale
    scores = scores.masked_fill(~valid, float("-inf")).to(torch.promote_types(q.dtype, torch.float32))
    probs = F.softmax(scores, dim=-1).to(q.dtype)
    y = torch.einsum("bhtk,btkr->bhtr", F.dropout(probs, p=dropout_p), picked[..., :kv_lora_rank])
    return y, probs


@torch.no_grad()
def head_mean_probs(q, k, allowed, scale):
    """The attention weights averaged over the heads, (B, T, S), what DSA's warm-up teaches the indexer; one head
    at a time, so no (B, n_head, T, S) tensor is ever held. q (B, n_head, T, d), k (B, n_head, S, d)."""
    mean = 0
    for h in range(q.size(1)):
        scores = (q[:, h] @ k[:, h].transpose(-2, -1) * scale).to(torch.promote_types(q.dtype, torch.float32))
        scores = scores.masked_fill(~allowed[:, 0], float("-inf"))
        mean = mean + F.softmax(scores, dim=-1) / q.size(1)
    return mean


def indexer_kl(scores, target, allowed):
    """DeepSeek-V3.2's indexer loss (eq. 3 of the warm-up, 4 of the sparse stage): KL(target || softmax(scores))
    over the keys each query may see, (B, T, S) each, averaged over the queries. target: the main attention's
    weights (summed over heads, normalised), detached, so only the indexer learns from it."""
    log_q = F.log_softmax(scores.masked_fill(~allowed, float("-inf")), dim=-1).masked_fill(~allowed, 0.0)
    return (torch.xlogy(target, target) - target * log_q).sum(dim=-1).mean()


class MLP(nn.Module):
    """SwiGLU feed-forward (Shazeer 2020, "GLU Variants Improve Transformer"): w2(silu(w1 x) * w3 x). With
    hidden_act="relu2", w2(relu(w1 x)^2) (Primer, So et al. 2021): squaring keeps ReLU's sparsity (most hidden units
    exactly 0) and makes the kept ones grow faster than linearly, which Primer's search found and the speedrun uses."""

    def __init__(self, dim, inter_dim, hidden_act="silu"):
        super().__init__()
        self.w1 = nn.Linear(dim, inter_dim, bias=False)  # gate (SwiGLU); up (relu2)
        self.w3 = nn.Linear(dim, inter_dim, bias=False) if hidden_act == "silu" else None  # up
        self.w2 = nn.Linear(inter_dim, dim, bias=False)  # down

    def forward(self, x):
        if self.w3 is None:
            return self.w2(F.relu(self.w1(x)).square())
        return self.w2(F.silu(self.w1(x)) * self.w3(x))


class Gate(nn.Module):
    """DeepSeek-V3's router: which num_experts_per_tok experts each token goes to, and with what weight.

    Auxiliary-loss-free balancing (Wang et al. 2024; DeepSeek-V3 section 2.1.2): a per-expert bias is added to the
    scores for *choosing* experts only, never for weighting them, and after each optimizer step it moves by
    bias_update_rate toward the experts that got fewer tokens than the mean (update_bias).
    """

    def __init__(self, config):
        super().__init__()
        self.k, self.n_group, self.topk_group = config.num_experts_per_tok, config.n_group, config.topk_group
        self.scoring_func, self.norm_topk_prob = config.scoring_func, config.norm_topk_prob
        self.routed_scaling_factor, self.bias_update_rate = config.routed_scaling_factor, config.bias_update_rate
        # The zero experts (if any) are the last rows: the router scores them as any other, and balancing moves
        # their bias too, which is how LongCat-Flash steers the compute a token gets.
        n = config.n_routed_experts + config.zero_expert_num
        self.weight = nn.Parameter(torch.empty(n, config.n_embd))
        # Buffers, not parameters: no gradient moves them. bias is part of the trained model (saved, exported);
        # load counts the tokens routed to each expert since the last update (training forwards only).
        self.register_buffer("bias", torch.zeros(n))
        self.register_buffer("load", torch.zeros(n), persistent=False)

    def forward(self, x):
        """x (N, n_embd) -> weights (N, k), experts (N, k), scores (N, n_routed_experts)."""
        # Routing in float32 even under autocast: near-tied bf16 scores would pick experts at random.
        with torch.autocast(x.device.type, enabled=False):
            logits = F.linear(x.to(self.weight.dtype), self.weight)
        scores = logits.sigmoid() if self.scoring_func == "sigmoid" else logits.softmax(dim=-1)
        biased = scores + self.bias
        if self.n_group > 1:  # group-limited routing: a token's experts lie in its topk_group best groups
            N, E = biased.shape
            group_scores = biased.view(N, self.n_group, -1).topk(2, dim=-1).values.sum(dim=-1)  # (N, n_group)
            best_groups = group_scores.topk(self.topk_group, dim=-1).indices
            dropped = torch.ones_like(group_scores, dtype=torch.bool).scatter_(1, best_groups, False)
            biased = biased.masked_fill(dropped.repeat_interleave(E // self.n_group, dim=1), float("-inf"))
        experts = biased.topk(self.k, dim=-1).indices  # (N, k)
        weights = scores.gather(1, experts)  # from the unbiased scores
        if self.norm_topk_prob:
            weights = weights / (weights.sum(dim=-1, keepdim=True) + 1e-20)
        if self.training:
            self.load += torch.bincount(experts.flatten(), minlength=self.load.numel())
        return weights * self.routed_scaling_factor, experts, scores

    @torch.no_grad()
    def update_bias(self, load):
        """After an optimizer step: an expert that got fewer tokens than the mean (load: tokens per expert, summed
        over all ranks) becomes easier to choose by bias_update_rate, one that got more becomes harder."""
        self.bias += self.bias_update_rate * torch.sign(load.mean() - load)
        self.load.zero_()


class MoE(nn.Module):
    """DeepSeekMoE: many small routed experts of which each token uses a few, plus shared experts every token uses.

    Dispatch without a loop over tokens: the (token, slot) pairs are sorted by expert, each expert runs once on
    the contiguous run of its rows, and the weighted outputs are added back at the tokens' rows. In training
    every expert runs even on zero rows, so each has a gradient (zeros) every step: a rank whose tokens skipped
    an expert still sends that gradient to the all-reduce, and no rank waits for a tensor that never comes.

    Expert parallelism (shard_experts): this rank keeps only its share of the routed experts, and the sorted rows
    travel to the ranks holding theirs and back (parallel.ExpertExchange) between the sort and the sum; everything
    else, the router and the shared experts included, is replicated as in data parallelism. The experts are a
    ModuleDict keyed by their global index, so a shard's parameters keep the names they have in the whole model.
    """

    def __init__(self, config):
        super().__init__()
        self.gate = Gate(config)
        self.experts = nn.ModuleDict({str(i): MLP(config.n_embd, config.moe_inter_dim)
                                      for i in range(config.n_routed_experts)})
        # The shared experts are one MLP of their summed width: the same function, one matmul each.
        n_shared = config.n_shared_experts
        self.shared_experts = MLP(config.n_embd, n_shared * config.moe_inter_dim) if n_shared else None
        self.zero_expert_num = config.zero_expert_num
        self.exchange = None  # a parallel.ExpertExchange once shard_experts kept this rank's share
        self.balance_loss = None  # set by each training forward, read by Transformer.forward

    def shard_experts(self, exchange, ep_rank):
        """Keep routed experts ep_rank * per_rank .. (ep_rank + 1) * per_rank - 1 and route through exchange."""
        per_rank = exchange.experts_per_rank
        self.experts = nn.ModuleDict({str(i): self.experts[str(i)]
                                      for i in range(ep_rank * per_rank, (ep_rank + 1) * per_rank)})
        self.exchange = exchange

    def forward(self, x):
        """x (B, T, D) -> (B, T, D). A standard MoE layer runs its three steps back to back; ScMoE's layer
        (ShortcutBlock) computes its dense path between them while the rows travel."""
        routed = self.start(x)
        self.run_experts(routed)
        return self.finish(routed)

    def start(self, x):
        """Route x (B, T, D) and send the rows to their experts (under expert parallelism, to the experts' ranks:
        the rows travel until run_experts)."""
        B, T, D = x.shape
        x = x.reshape(B * T, D)
        weights, experts, scores = self.gate(x)  # (N, k), (N, k), (N, n_routed_experts + zero_expert_num)
        k = experts.size(1)
        pairs = experts.flatten().argsort(stable=True)  # (N * k,) indices of (token, slot) pairs, grouped by expert
        tokens = pairs // k
        counts = torch.bincount(experts.flatten(), minlength=scores.size(1))
        sizes = counts.tolist()[:scores.size(1) - self.zero_expert_num]  # the routed experts' runs
        routed = sum(sizes)  # pairs sorted after these went to zero experts
        # (N * k, D), each expert's rows contiguous. Gathered expert by expert: x's gradient then sums the experts'
        # parts in the order it always has (one gather for all of them rounds the last bits of it differently).
        rows = torch.cat([x[run] for run in tokens[:routed].split(sizes)])
        if self.exchange is not None:
            self.exchange.send(rows, counts[:len(sizes)])
        return SimpleNamespace(x=x, shape=(B, T, D), weights=weights, experts=experts, scores=scores, pairs=pairs,
                               tokens=tokens, sizes=sizes, routed=routed, rows=rows)

    def run_experts(self, r):
        """This rank's experts on the rows routed to them (waiting for them to arrive), the outputs sent home."""
        if self.exchange is None:
            r.out = self.run_local(r.rows, r.sizes)
        else:
            self.exchange.send_back(self.run_local(*self.exchange.receive()))

    def finish(self, r):
        """The routed outputs (waiting for them to come home) weighted and summed at their tokens, plus the zero
        experts' tokens as they are and the shared experts."""
        out = r.out if self.exchange is None else self.exchange.receive_back()
        x, weight = r.x, r.weights.flatten()[r.pairs]
        y = torch.zeros_like(x).index_add_(0, r.tokens[:r.routed], (out * weight[:r.routed, None]).to(x.dtype))
        if r.routed < len(r.pairs):  # zero-computation experts (LongCat-Flash): the identity, weighted
            identity = r.tokens[r.routed:]
            y = y.index_add(0, identity, (x[identity] * weight[r.routed:, None]).to(x.dtype))
        if self.shared_experts is not None:
            y = y + self.shared_experts(x)
        if self.training:
            B, T, _ = r.shape
            self.balance_loss = self.sequence_balance_loss(r.experts.view(B, -1), r.scores.view(B, T, -1))
        return y.view(r.shape)

    def run_local(self, rows, counts):
        """rows (n, D) grouped by this rank's experts, counts[i] of them for the i-th -> their outputs (n, D)."""
        outs = [expert(run) for expert, run, count in zip(self.experts.values(), rows.split(counts), counts)
                if count or torch.is_grad_enabled()]  # an empty run still defines the expert's (zero) gradient
        return torch.cat(outs) if outs else rows

    @staticmethod
    def sequence_balance_loss(experts, scores):
        """DeepSeek-V3's complementary sequence-wise balance loss (eq. 17-20), before its coefficient alpha:
        sum over experts of f_i * P_i, with f_i the fraction of the sequence's choices that went to expert i
        (scaled so that 1 is perfectly even) and P_i its mean normalised score; averaged over sequences.
        experts (B, T * k) chosen experts, scores (B, T, E)."""
        B, T, E = scores.shape
        chosen = scores.new_zeros(B, E).scatter_add_(1, experts, scores.new_ones(experts.shape))  # (B, E) counts
        f = chosen * E / experts.size(1)  # (B, E)
        p = (scores / scores.sum(dim=-1, keepdim=True)).mean(dim=1)  # (B, E)
        return (f * p).sum(dim=-1).mean()


class Block(nn.Module):
    """Pre-norm residual block: the residual stream itself is never normalised, which keeps deep stacks stable."""

    def __init__(self, config, layer_id):
        super().__init__()
        self.attn_norm = RMSNorm(config.n_embd, config.norm_eps)
        kind = config.layer_types[layer_id]
        self.linear, self.windowed = kind == "linear_attention", kind == "sliding_attention"
        # The KV cache holds the softmax-attention layers only (full and sliding), in order.
        slot = layer_id - config.layer_types[:layer_id].count("linear_attention")
        window = config.sliding_window if kind == "sliding_attention" else None
        if self.linear:
            self.attn = GatedDeltaNet(config, layer_id, use_kernel=resolve_attn_impl(config.attn_impl) == "flash")
        else:
            self.attn = MLA(config, slot, window) if config.attn == "mla" else Attention(config, slot, window)
        self.ffn_norm = RMSNorm(config.n_embd, config.norm_eps)
        # DeepSeek keeps the first layers dense: routing on barely-processed token embeddings balances poorly.
        moe = config.n_routed_experts > 0 and layer_id >= config.first_k_dense_replace
        self.ffn = MoE(config) if moe else MLP(config.n_embd, config.inter_dim, config.hidden_act)
        self.resid_dropout = nn.Dropout(config.dropout)

    def forward(self, x, rope, mask, kv_cache, is_real, moba_blocks=None):
        h = self.attn_norm(x)
        if self.linear:
            h = self.attn(h, is_real, kv_cache)
        else:
            h = self.attn(h, rope, mask, kv_cache) if moba_blocks is None else self.attn(h, rope, mask, kv_cache,
                                                                                       moba_blocks)
        x = x + self.resid_dropout(h)
        return x + self.resid_dropout(self.ffn(self.ffn_norm(x)))


class ShortcutBlock(nn.Module):
    """LongCat-Flash's layer, ScMoE (Cai et al. 2024, "Shortcut-connected Expert Parallelism"): two pre-norm
    attention + dense MLP sublayers, and one MoE that reads the first dense MLP's input and joins the residual
    stream only at the end of the layer:

        h = x + Attn_0(norm(x));   u = norm(h);   route u, send its rows to the experts
        h = h + MLP_0(u);   h = h + Attn_1(norm(h))        while the rows travel
        run the experts, send their outputs home;   h = h + MLP_1(norm(h))        while they travel back
        out = h + MoE(u)

    The MoE's input is older than the place its output is used, and that is the point: under expert parallelism the
    dispatch and the combine overlap dense compute, where a standard MoE layer must wait for both."""

    linear = windowed = False  # what Transformer asks of a Block: every sublayer here is full attention

    def __init__(self, config, layer_id):
        super().__init__()
        norm = lambda: RMSNorm(config.n_embd, config.norm_eps)  # noqa: E731
        attention = MLA if config.attn == "mla" else Attention
        self.attn_norm, self.ffn_norm = nn.ModuleList([norm(), norm()]), nn.ModuleList([norm(), norm()])
        self.attn = nn.ModuleList(attention(config, 2 * layer_id + i) for i in (0, 1))  # its KV cache slots
        self.mlps = nn.ModuleList(MLP(config.n_embd, config.inter_dim, config.hidden_act) for _ in (0, 1))
        self.ffn = MoE(config)
        self.resid_dropout = nn.Dropout(config.dropout)

    def forward(self, x, rope, mask, kv_cache, is_real, moba_blocks=None):
        def attend(i, x):
            h = self.attn_norm[i](x)
            extra = () if moba_blocks is None else (moba_blocks,)
            return self.resid_dropout(self.attn[i](h, rope, mask, kv_cache, *extra))

        x = x + attend(0, x)
        u = self.ffn_norm[0](x)
        routed = self.ffn.start(u)
        x = x + self.resid_dropout(self.mlps[0](u))
        x = x + attend(1, x)
        self.ffn.run_experts(routed)
        x = x + self.resid_dropout(self.mlps[1](self.ffn_norm[1](x)))
        return x + self.resid_dropout(self.ffn.finish(routed))


class MultiTokenPrediction(nn.Module):
    """DeepSeek-V3's MTP module k (section 2.2, eq. 21-22): at position i it combines the previous depth's hidden
    state h^{k-1}_i (the main model's last block output for k = 1) with the embedding of token i + k, the one the
    previous depth predicted there, and runs one Transformer block:

        h^k_i = Block(W_k [RMSNorm(h^{k-1}_i); RMSNorm(Emb(t_{i+k}))]),   p^k_{i+k+1} = Head(RMSNorm(h^k_i))

    Emb and Head are the model's own (shared); the normalisations and W_k (eh_proj) are the module's. Unlike an
    independent head per offset (Gloeckle et al. 2024), the chain keeps each prediction causal on the ones before.
    The block is a plain full-attention one with a dense MLP, whatever the main layers are (a one-layer model's)."""

    def __init__(self, config):
        super().__init__()
        self.hnorm, self.enorm = RMSNorm(config.n_embd, config.norm_eps), RMSNorm(config.n_embd, config.norm_eps)
        self.eh_proj = nn.Linear(2 * config.n_embd, config.n_embd, bias=False)
        self.block_config = replace(config, n_layer=1, layer_types=["full_attention"], n_routed_experts=0,
                                    index_n_heads=0, moba_chunk_size=0, mtp_depth=0, zero_expert_num=0,
                                    moe_shortcut=False)
        self.block = Block(self.block_config, 0)
        self.norm = RMSNorm(config.n_embd, config.norm_eps)  # before the shared head, as the main model's norm

    def forward(self, h, emb, rope, mask, kv_cache):
        """h, emb (B, T, n_embd) -> h^k (B, T, n_embd)."""
        x = self.eh_proj(torch.cat((self.hnorm(h), self.enorm(emb)), dim=-1))
        return self.block(x, rope, mask, kv_cache, None)


def roll_window(kept, new, keep):
    """A sliding layer's keys (or their realness) this step: the kept ones, then the new, along the last dims
    (..., keep + T, dim) or (B, keep + T); and the last `keep` of them, what the next step can still see."""
    dim = 2 if new.dim() == 4 else 1
    keys = torch.cat((kept, new), dim=dim)
    return keys, keys.narrow(dim, keys.size(dim) - keep, keep)


def update_rolling(rolling, layer, new, keep):
    """A sliding layer's cache step: returns its kept keys (and values) with the new, each (B, heads, keep + T, dim),
    and leaves the last keep of them in rolling[layer] (zeros, all masked, before the first step)."""
    kept = rolling.get(layer) or tuple(t.new_zeros(*t.shape[:2], keep, t.size(3)) for t in new)
    rolled = [roll_window(old, t, keep) for old, t in zip(kept, new)]
    rolling[layer] = tuple(last for _, last in rolled)
    return tuple(keys for keys, _ in rolled)


class KVCache:
    """What attention needs of the tokens seen so far, so that each generation step runs only the new tokens.

    Per full-attention layer: keys and values (B, n_kv_head, S, head_dim) for GQA; for MLA one tensor (B, 1, S,
    kv_lora_rank + qk_rope_head_dim), the normalised latent and the rope key. Preallocated for max_len positions,
    of which `length` are filled. It also remembers which cached keys are real tokens (not padding) and how many
    real tokens each row has, which is the next token's RoPE position. A linear-attention layer keeps instead a
    state of fixed size per row, (conv state, S) (linear_attention.GatedDeltaNet), in linear_states, and a
    sliding-window layer only the keys its next query can see, the last sliding_window - 1 (a rolling cache), so
    neither grows with the sequence.
    """

    def __init__(self, config, batch_size, max_len, device=None):
        kinds = [kind for kind in config.attention_types if kind != "linear_attention"]  # by cache slot
        self.full = {slot: i for i, slot in enumerate(s for s, kind in enumerate(kinds) if kind == "full_attention")}
        self.n_layer, self.max_len = len(self.full), max_len
        self.tensors = None  # the full layers', allocated by the first update(), in its dtype (bf16 under autocast)
        self.linear_states = {}  # layer index -> (conv state, S), each (B, ...)
        self.rolling = {}  # a sliding layer's slot -> its last keep keys (and values), each (B, heads, keep, dim)
        self.keep = config.sliding_window - 1 if "sliding_attention" in kinds else 0
        self.window_is_real = torch.zeros(batch_size, self.keep, dtype=torch.bool, device=device)
        self.key_is_real = torch.zeros(batch_size, max_len, dtype=torch.bool, device=device)
        self.n_real = torch.zeros(batch_size, dtype=torch.long, device=device)
        self.padded = False  # whether any cached key is padding
        self.length = 0

    @staticmethod
    def bytes_per_position(config, dtype=torch.float32):
        """What one token costs one softmax-attention layer's cache."""
        if config.attn == "mla":  # the latent and the rope key, and with DSA the indexer's key
            index_key = config.index_head_dim if config.index_n_heads else 0
            return (config.kv_lora_rank + config.qk_rope_head_dim + index_key) * dtype.itemsize
        return 2 * config.n_kv_head * config.head_dim * dtype.itemsize  # a key and a value per kv head

    @staticmethod
    def bytes_per_token(config, dtype=torch.float32):
        """Cache size of one token over the full-attention layers: the number that limits batch size times context."""
        return config.attention_types.count("full_attention") * KVCache.bytes_per_position(config, dtype)

    @staticmethod
    def bytes_per_sequence(config, dtype=torch.float32):
        """The cache of one sequence that does not grow with it: the linear layers' conv inputs and S (in float32: a
        state summed over thousands of tokens in bf16 would lose its small terms), the sliding layers' kept keys."""
        key_dim, value_dim = config.linear_num_key_heads * config.linear_key_head_dim, \
            config.linear_num_value_heads * config.linear_value_head_dim
        conv = (2 * key_dim + value_dim) * (config.linear_conv_kernel_dim - 1) * dtype.itemsize
        state = config.linear_num_value_heads * config.linear_key_head_dim * config.linear_value_head_dim * 4
        window = config.layer_types.count("sliding_attention") * max(config.sliding_window - 1, 0) * \
            KVCache.bytes_per_position(config, dtype)
        return config.layer_types.count("linear_attention") * (conv + state) + window

    def append(self, is_real):
        """Take T new tokens, is_real (B, T); return the real-key mask of all tokens so far (B, length)."""
        T = is_real.size(1)
        self.key_is_real[:, self.length : self.length + T] = is_real
        self.n_real += is_real.sum(dim=1)
        self.length += T
        # The sliding layers' keys this forward: the kept ones, then the new (B, keep + T).
        self.window_keys_real, self.window_is_real = roll_window(self.window_is_real, is_real, self.keep)
        return self.key_is_real[:, : self.length]

    def rewind(self, n):
        """Forget the last n tokens (a rejected draft of speculative_generate). Full-attention layers only: their
        stored positions past length are simply written over; a rolling window or a linear state cannot go back."""
        self.length -= n
        self.n_real -= self.key_is_real[:, self.length:self.length + n].sum(dim=1)
        self.key_is_real[:, self.length:self.length + n] = False

    def select(self, rows):
        """Keep the rows of the given indices (B',), in that order, repeats allowed: beam search's reorder."""
        if self.tensors is not None:
            self.tensors = [t.index_select(1, rows) for t in self.tensors]
        self.linear_states = {layer: tuple(t.index_select(0, rows) for t in state)
                              for layer, state in self.linear_states.items()}
        self.rolling = {slot: tuple(t.index_select(0, rows) for t in kept) for slot, kept in self.rolling.items()}
        self.window_is_real = self.window_is_real.index_select(0, rows)
        self.key_is_real, self.n_real = self.key_is_real.index_select(0, rows), self.n_real.index_select(0, rows)

    def update(self, layer, *new):
        """Store one layer's tensors of the new tokens, each (B, heads, T, dim); return each with all so far (a
        sliding layer: with its kept ones, as window_keys_real describes them)."""
        if layer not in self.full:
            return update_rolling(self.rolling, layer, new, self.keep)
        if self.tensors is None:
            self.tensors = [t.new_zeros(self.n_layer, t.size(0), t.size(1), self.max_len, t.size(3)) for t in new]
        start, i = self.length - new[0].size(2), self.full[layer]
        for stored, t in zip(self.tensors, new):
            stored[i, :, :, start : self.length] = t
        return tuple(stored[i, :, :, : self.length] for stored in self.tensors)


def penalize_repetition(logits, tokens, is_real, penalty):
    """CTRL's repetition penalty (Keskar et al. 2019), as transformers applies it: every token already in the row
    (prompt included, padding not) has its logit divided by penalty where positive and multiplied where negative,
    so that penalty > 1 makes it less likely either way (dividing a negative logit would raise it).
    logits (B, V), tokens and is_real (B, T) -> (B, V)."""
    seen = torch.zeros_like(logits).scatter_add_(1, tokens, is_real.to(logits.dtype)) > 0
    return torch.where(seen, torch.where(logits > 0, logits / penalty, logits * penalty), logits)


def next_token(logits, tokens, is_real, step, temperature=1.0, top_k=None, top_p=None, repetition_penalty=1.0,
               min_new_tokens=0, stop_ids=(), generator=None):
    """The token after logits (B, V) of rows whose tokens so far are tokens (B, T) (is_real marks padding), at the
    step-th new token, the logits processed as transformers' generate processes them, in its order:
    repetition_penalty, then no stop id before min_new_tokens tokens, then temperature, top_k and top_p."""
    if repetition_penalty != 1.0:
        logits = penalize_repetition(logits, tokens, is_real, repetition_penalty)
    if step < min_new_tokens:
        logits[:, list(stop_ids)] = float("-inf")
    return sample_next_token(logits, temperature, top_k, top_p, generator)


def sample_next_token(logits, temperature=1.0, top_k=None, top_p=None, generator=None):
    """Pick one token per row from logits (B, vocab) -> (B,). temperature 0 is greedy. generator: the random
    stream to draw from (the global one if None), so that each of several requests can have its own seed."""
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
    return torch.multinomial(logits.softmax(dim=-1), num_samples=1, generator=generator).squeeze(-1)


def last_real_tokens(tokens, is_real, lengths):
    """The last lengths[r] real tokens of each row r of tokens (B, T), left-padded to the longest: (B, max) tokens
    and their is_real mask. Without padding and with equal lengths, simply tokens[:, -length:]."""
    width = max(lengths)
    if all(n == width for n in lengths) and bool(is_real[:, -width:].all()):
        return tokens[:, -width:], is_real[:, -width:]
    window = tokens.new_zeros(tokens.size(0), width)
    window_is_real = torch.zeros_like(window, dtype=torch.bool)
    for r, n in enumerate(lengths):
        window[r, width - n:] = tokens[r][is_real[r]][-n:]
        window_is_real[r, width - n:] = True
    return window, window_is_real


class Transformer(nn.Module):
    """Token embedding, n_layer blocks, final norm, and the output projection to vocabulary logits."""

    def __init__(self, config):
        super().__init__()
        self.config = config
        # No padding_idx: it pins that row's gradient to zero, and the seed project got NaN gradients from it.
        # Padding is handled by attention_mask instead.
        self.wte = nn.Embedding(config.vocab_size, config.n_embd)
        self.rope = RotaryEmbedding(config.rope_dim, config.rope_theta, config.rope_scaling)
        layer = ShortcutBlock if config.moe_shortcut else Block
        self.layers = nn.ModuleList(layer(config, layer_id) for layer_id in range(config.n_layer))
        self.norm = RMSNorm(config.n_embd, config.norm_eps)
        self.lm_head = nn.Linear(config.n_embd, config.vocab_size, bias=False)
        if config.tie_embeddings:
            self.lm_head.weight = self.wte.weight
        self._init_weights(self.named_parameters())
        # The MTP modules are built and drawn from a fork of the random state: the main model's weights, and every
        # draw after them (batches, dropout), are those of the model without them. With the weight at 0 they get no
        # gradient and stay frozen, so the engine, AdamW and the clip see exactly that model too.
        with torch.random.fork_rng(devices=[]):
            self.mtp = nn.ModuleList(MultiTokenPrediction(config) for _ in range(config.mtp_depth))
            self._init_weights(self.mtp.named_parameters(prefix="mtp"))
        if config.mtp_loss_weight == 0:
            self.mtp.requires_grad_(False)
        self.mtp_ce = None  # set by each training forward with targets (logits_and_loss)

    def _init_weights(self, named_parameters):
        # GPT-2's scheme (as nanoGPT). Each block adds the outputs of wo and w2 to the residual stream, so its
        # variance grows with depth; scaling their init by 1/sqrt(2 * n_layer) (GPT-2 paper, section 2.3)
        # keeps the stream's scale independent of n_layer at initialisation.
        resid_std = 0.02 / math.sqrt(2 * len(self.config.attention_types))  # two adds per attention sublayer
        for name, p in named_parameters:  # a tied matrix is listed (and initialised) once
            if name.endswith(("A_log", "dt_bias", "conv.weight")):
                continue  # GatedDeltaNet initialises its decays and its convolution itself (see there)
            if name.endswith("attn.sinks"):
                nn.init.zeros_(p)  # a sink logit of 0: at the start the sink weighs as much as a key scoring 0
                continue
            if name.endswith(("wo.weight", "w2.weight")):
                if self.config.zero_init_residual:
                    nn.init.zeros_(p)
                else:
                    nn.init.normal_(p, mean=0.0, std=resid_std)
            elif name.endswith("bias"):
                nn.init.zeros_(p)
            elif p.dim() == 1:
                nn.init.ones_(p)  # RMSNorm gains
            else:
                nn.init.normal_(p, mean=0.0, std=0.02)

    def head(self, x):
        """Normalised hidden states (..., n_embd) -> logits (..., vocab), soft-capped if asked."""
        logits = self.lm_head(x)
        cap = self.config.final_logit_softcapping
        return cap * torch.tanh(logits / cap) if cap else logits

    def blocks(self):
        """The repeated blocks, in order: what ZeRO stage 3 and FSDP2 gather and free one at a time."""
        return list(self.layers)

    def param_groups(self, weight_decay, muon=False):
        """The optimizer's parameter groups (nanoGPT's configure_optimizers): weight decay on matrices only (linear
        and embedding weights); decaying RMSNorm gains or biases just pulls them toward 0 for no regularisation
        benefit (the AdamW paper's practice). parameters() lists a tied matrix once.

        muon: the 2-D weights that act as linear maps go first, in a group Muon steps ("muon": True); the token
        embedding and the head stay with AdamW (Moonlight's split: an embedding's rows are looked up one token at a
        time, not applied as one map, and the head's update is better left elementwise too)."""
        params = [p for p in self.parameters() if p.requires_grad]
        lookups = {id(self.wte.weight), id(self.lm_head.weight)}
        maps = [p for p in params if muon and p.dim() == 2 and id(p) not in lookups]
        on_muon = set(map(id, maps))
        adamw = [{"params": [p for p in params if p.dim() >= 2 and id(p) not in on_muon], "weight_decay": weight_decay,
                  "muon": False},
                 {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0, "muon": False}]
        return [{"params": maps, "weight_decay": weight_decay, "muon": True}, *adamw] if muon else adamw

    def moe_layers(self):
        return [block.ffn for block in self.layers if isinstance(block.ffn, MoE)]

    def exchange_stats(self):
        """Under expert parallelism: the bytes of rows every MoE layer's exchange sent to other ranks, and the
        seconds it waited for rows to arrive, since the last call."""
        stats = [moe.exchange.stats() for moe in self.moe_layers()]
        waits = {phase: sum(s["wait_s"][phase] for s in stats) for phase in stats[0]["wait_s"]}
        return {"expert_bytes": sum(s["bytes"] for s in stats), **{f"expert_wait_{k}_s": v for k, v in waits.items()}}

    def sharded_expert_parameters(self):
        """Under expert parallelism, the routed experts' parameters: this rank's share, summed over its copies only."""
        return [p for moe in self.moe_layers() if moe.exchange is not None for p in moe.experts.parameters()]

    def forward(self, idx, targets=None, attention_mask=None, kv_cache=None, doc_ids=None, hidden=False):
        """idx (B, T) token ids -> logits (B, T, vocab), and the mean cross-entropy if targets (B, T) are given
        (in training with MTP modules, plus mtp_loss_weight times their loss). hidden: also return the last block's
        output (B, T, n_embd), what the first MTP module reads.

        attention_mask (B, T): 1 = real token, 0 = padding (Hugging Face convention), for left-padded batches.
        kv_cache: idx holds only the new tokens; they attend to every cached token and are appended.
        doc_ids (B, T): training windows packed with several documents (fine-tuning conversations), each
        position's document, non-decreasing along a row. A token attends only to its own document and its
        position restarts at 0 where its document starts, so each document computes what it computes alone.
        """
        if doc_ids is not None:
            if kv_cache is not None or attention_mask is not None:
                raise ValueError("doc_ids is for packed training windows: no padding mask, no KV cache")
            if "linear_attention" in self.config.layer_types:
                raise ValueError("packed documents (fine-tuning data) with linear-attention layers: the state would "
                                 "carry one conversation into the next, and a per-document reset is not written yet")
            if self.config.moba_chunk_size:
                raise ValueError("packed documents (fine-tuning data) with MoBA: a block of keys would mix "
                                 "conversations, and its mean key route another conversation's queries")
            return self.forward_packed(idx, targets, doc_ids)
        B, T = idx.shape
        start = kv_cache.length if kv_cache is not None else 0
        if start + T > self.config.block_size:
            raise ValueError(f"{start + T} tokens exceed block_size {self.config.block_size}")
        is_real = torch.ones_like(idx, dtype=torch.bool) if attention_mask is None else attention_mask.bool()
        # A token's position is the number of real tokens before it in its row (Hugging Face's cumsum - 1),
        # so left padding does not shift a row: it gets the same logits as without the padding.
        positions = is_real.long().cumsum(dim=1) - is_real.long()  # (B, T)
        key_is_real = is_real
        padded = attention_mask is not None and not bool(is_real.all())
        if kv_cache is not None:
            positions = positions + kv_cache.n_real[:, None]
            key_is_real = kv_cache.append(is_real)  # (B, start + T)
            padded = kv_cache.padded = kv_cache.padded or padded
        # Without padding, the two common cases need no mask tensor: training (T == S) and generating one token.
        mask = make_attention_mask(key_is_real, T) if padded or 1 < T < start + T else None
        # With a cache, sliding layers attend over their kept keys and the new ones (KVCache.update).
        window_mask = make_attention_mask(kv_cache.window_keys_real, T) if kv_cache is not None and kv_cache.keep else None
        chunk = self.config.moba_chunk_size  # MoBA's blocks, by position (a row's blocks do not move with its padding)
        moba_blocks = (moba_key_blocks(key_is_real, chunk), positions // chunk) if chunk else None
        return self.logits_and_loss(idx, targets, positions, mask, kv_cache, is_real, window_mask, moba_blocks, hidden)

    def forward_packed(self, idx, targets, doc_ids):
        T = idx.size(1)
        if T > self.config.block_size:
            raise ValueError(f"{T} tokens exceed block_size {self.config.block_size}")
        steps = torch.arange(T, device=idx.device).expand_as(doc_ids)
        starts = torch.ones_like(doc_ids, dtype=torch.bool)
        starts[:, 1:] = doc_ids[:, 1:] != doc_ids[:, :-1]
        positions = steps - torch.where(starts, steps, 0).cummax(dim=1).values  # (B, T): steps since the start
        mask = (*make_attention_mask(torch.ones_like(doc_ids, dtype=torch.bool), T, doc_ids), doc_ids)
        logits, _ = self.logits_and_loss(idx, None, positions, mask, None, None, None)
        if targets is None:
            return logits, None
        # The mean over the targets there are: a window of prompts only (all -100) adds 0, where the mean would
        # be 0 / 0 = NaN in the forward and the backward.
        nats = F.cross_entropy(logits.float().flatten(0, 1), targets.flatten(), ignore_index=-100, reduction="sum")
        return logits, nats / (targets != -100).sum().clamp(min=1) + self.auxiliary_loss()

    def logits_and_loss(self, idx, targets, positions, mask, kv_cache, is_real, window_mask, moba_blocks=None,
                        hidden=False):
        x = self.wte(idx)  # (B, T, n_embd)
        rope = self.rope(positions, x.dtype)
        for block in self.layers:
            x = block(x, rope, window_mask if block.windowed and window_mask is not None else mask, kv_cache, is_real,
                      moba_blocks)
        logits = self.head(self.norm(x))  # (B, T, vocab)
        loss = None
        if targets is not None:
            # float32 log-softmax: bf16 logits would round the loss; -100 marks positions without a target.
            loss = F.cross_entropy(logits.float().flatten(0, 1), targets.flatten(), ignore_index=-100)
            loss = loss + self.auxiliary_loss()
            # Plain training windows only (no padding, no cache): there every next-but-k token is the data's.
            self.mtp_ce = None  # the MTP modules' mean cross-entropy of this forward, for the log
            if self.training and self.mtp and self.config.mtp_loss_weight > 0 and mask is None and kv_cache is None:
                mtp = self.mtp_loss(x, idx, targets, rope)
                self.mtp_ce = mtp.detach()
                loss = loss + self.config.mtp_loss_weight * mtp
        return (logits, loss, x) if hidden else (logits, loss)

    def mtp_loss(self, h, idx, targets, rope):
        """DeepSeek-V3's L_MTP = (1 / D) sum_k CE_k (eq. 23-24). Depth k reads h^{k-1} and the embeddings of the
        tokens k places ahead, t_{i+k} = idx[:, i + k], at positions i < T - k (the sequence shortens by one per
        depth), and is scored on t_{i+k+1} = targets[:, i + k]. h (B, T, n_embd): the last block's output."""
        T, total = idx.size(1), 0.0
        for k, module in enumerate(self.mtp, start=1):
            n = T - k
            if n < 1:
                break
            h = module(h[:, :n], self.wte(idx[:, k:]), tuple(r[:, :, :n] for r in rope), None, None)
            logits = self.head(module.norm(h))  # (B, T - k, vocab)
            total = total + F.cross_entropy(logits.float().flatten(0, 1), targets[:, k:].flatten(), ignore_index=-100)
        return total / len(self.mtp)

    def draft(self, h, tokens, kv_cache):
        """The first MTP module on new positions, with a cache of its own: h (B, T, n_embd) the last block's output
        there and tokens (B, T) the token after each -> logits (B, T, vocab) for the token after that one."""
        T = tokens.size(1)
        positions = kv_cache.n_real[:, None] + torch.arange(T, device=tokens.device)  # (B, T)
        key_is_real = kv_cache.append(torch.ones_like(tokens, dtype=torch.bool))
        mask = make_attention_mask(key_is_real, T) if 1 < T < kv_cache.length else None
        module = self.mtp[0]
        x = module(h, self.wte(tokens), self.rope(positions, h.dtype), mask, kv_cache)
        return self.head(module.norm(x))

    def auxiliary_loss(self):
        """What training adds to the language loss (0 when evaluating): alpha times DeepSeek-V3's sequence-wise
        balance loss of every MoE layer, and the DSA indexers' KL, summed over the layers (each indexer learns
        from its own layer's term at the same scale, however many layers there are)."""
        if not self.training:
            return 0.0
        loss = self.indexer_kl()
        if self.config.balance_loss_coef > 0:
            loss = loss + self.config.balance_loss_coef * sum(moe.balance_loss for moe in self.moe_layers())
        return loss

    def indexed_layers(self):
        """The MLA layers that DeepSeek Sparse Attention's indexers steer."""
        return [block.attn for block in self.layers if getattr(block.attn, "indexer", None) is not None]

    def indexer_kl(self):
        """The indexers' KL of the last training forward, summed over the layers (0 without DSA)."""
        return sum(layer.indexer_loss for layer in self.indexed_layers())

    def expert_load(self):
        """Tokens routed to each expert since the last bias update, (n_moe_layers, n_routed_experts)."""
        return torch.stack([moe.gate.load for moe in self.moe_layers()])

    def update_expert_bias(self, load):
        """Auxiliary-loss-free balancing after an optimizer step. load: expert_load() summed over all ranks, so
        every rank applies the same update and the replicas stay identical."""
        for moe, layer_load in zip(self.moe_layers(), load):
            moe.gate.update_bias(layer_load)

    def unused_expert_params(self):
        """Parameters of the routed experts a token skips: all but num_experts_per_tok of them in each MoE layer."""
        c = self.config
        unused = max(c.n_routed_experts - c.num_experts_per_tok, 0)  # (zero experts, if chosen, leave more unused)
        return len(self.moe_layers()) * unused * 3 * c.n_embd * c.moe_inter_dim

    def num_params(self, non_embedding=True, active=False):
        """Parameter count, a tied matrix counted once. non_embedding drops wte (the lookup costs no FLOPs);
        an untied lm_head is a real matmul and still counts. active: only the routed experts a token uses."""
        n = sum(p.numel() for p in self.parameters()) - (self.unused_expert_params() if active else 0)
        return n - self.wte.weight.numel() if non_embedding else n

    def estimate_flops(self):
        """Training FLOPs per token, forward + backward (PaLM appendix B, as in nanochat).

        Each matmul weight a token uses costs 2 FLOPs per token forward and 4 backward (gradients of input and
        weight). Attention adds q @ k^T and probs @ v: 2 * n_head * (d_qk + d_v) * block_size per layer forward,
        times 3 (MLA trains on the naive path, so d_qk = nope + rope and d_v = v_head_dim).
        """
        c = self.config
        matmuls = sum(m.weight.numel() for m in self.modules() if isinstance(m, (nn.Linear, Gate)))
        d_qk, d_v = (c.qk_nope_head_dim + c.qk_rope_head_dim, c.v_head_dim) if c.attn == "mla" else (c.head_dim,) * 2
        # Keys a query sees, summed over the softmax-attention layers (a sliding layer's window at most).
        seen = sum(min(c.sliding_window, c.block_size) if kind == "sliding_attention" else c.block_size
                   for kind in c.attention_types if kind != "linear_attention")
        full = c.n_head * (d_qk + d_v) * seen
        # A linear layer per token and head: reading and writing S (2 d_k d_v each) and the chunk's own scores and
        # solve (about chunk (d_k + d_v)), whatever the context.
        d_k, d_v, chunk = c.linear_key_head_dim, c.linear_value_head_dim, min(c.linear_chunk_size, c.block_size)
        linear = c.layer_types.count("linear_attention") * c.linear_num_value_heads * (4 * d_k * d_v + chunk * (d_k + d_v))
        return 6.0 * (matmuls - self.unused_expert_params()) + 6.0 * (full + linear)

    @torch.inference_mode()  # no autograd bookkeeping at all: each of the many small ops per token costs less
    def generate(self, idx, max_new_tokens, temperature=1.0, top_k=None, top_p=None, attention_mask=None,
                 repetition_penalty=1.0, min_new_tokens=0, stop_ids=()):
        """Yield the next token of every row, (B,), max_new_tokens times or until every row has yielded one of
        stop_ids, continuing prompts idx (B, T). The logits are processed as transformers' generate processes
        them (next_token).

        The prompt is prefilled into a KV cache, then only the newest token runs each step. When a row's cache is
        full (block_size tokens), it restarts from that row's last block_size // 2 tokens, re-prefilled: a sliding
        window like nanoGPT's cropping, re-prefilled only every block_size // 2 steps instead of every step.
        Each token is thus predicted from between block_size // 2 and block_size tokens of context.
        attention_mask (B, T) marks left padding of the prompts, as in forward(). Padding never counts as context:
        each row keeps exactly the tokens it would keep alone, so a padded row computes what it computes alone
        (a restart of one row re-prefills the others with the context they already had).
        """
        block = self.config.block_size
        is_real = torch.ones_like(idx, dtype=torch.bool) if attention_mask is None else attention_mask.bool()
        if idx.size(1) == 0 or not bool(is_real.any(dim=1).all()):
            raise ValueError("generate needs at least one real prompt token in every row (to start a fresh "
                             "document, pass the end-of-text token </s>)")
        tokens, kv_cache, context = idx, None, None  # context[r]: how many of row r's last tokens its cache holds
        options = dict(temperature=temperature, top_k=top_k, top_p=top_p, repetition_penalty=repetition_penalty,
                       min_new_tokens=min_new_tokens, stop_ids=stop_ids)
        stop_ids = torch.tensor(list(stop_ids), dtype=torch.long, device=idx.device)
        ended = torch.zeros(idx.size(0), dtype=torch.bool, device=idx.device)
        for step in range(max_new_tokens):
            if kv_cache is None or block in context:
                if kv_cache is None:
                    context = [min(int(n), block) for n in is_real.sum(dim=1)]
                else:  # a full row restarts from its last block // 2 tokens; the others keep theirs, the newest too
                    context = [block // 2 if n == block else n + 1 for n in context]
                window, window_is_real = last_real_tokens(tokens, is_real, context)
                kv_cache = KVCache(self.config, idx.size(0), block, device=idx.device)
                logits, _ = self(window, attention_mask=window_is_real, kv_cache=kv_cache)
            else:
                logits, _ = self(tokens[:, -1:], kv_cache=kv_cache)
                context = [n + 1 for n in context]
            new = next_token(logits[:, -1].float(), tokens, is_real, step, **options)  # (B,)
            yield new
            ended |= torch.isin(new, stop_ids)
            if bool(ended.all()):
                return
            tokens = torch.cat((tokens, new[:, None]), dim=1)
            is_real = torch.cat((is_real, torch.ones_like(new[:, None], dtype=torch.bool)), dim=1)


@torch.inference_mode()
def speculative_generate(model, idx, max_new_tokens, stop_ids=(), stats=None):
    """Greedy decoding of one prompt idx (1, T), the first MTP module drafting (self-speculative decoding, DeepSeek-V3
    section 5.4.3): yields each new token (1,), exactly those of generate at temperature 0, and counts the drafts and
    the accepted ones in stats.

    A step feeds the main model two tokens, the newest t and the draft d of the token after it: its logits at t say
    what truly follows t. If that is d, the draft is accepted and the logits at d give one more token free: two
    tokens for one forward. If not, the true token is kept and the cache forgets d's position. The draft reads the
    last block's output at each position and the token after it, so the main model's hidden states of the step feed
    the next draft; the MTP module has its own KV cache over those positions."""
    config, block = model.config, model.config.block_size
    if not model.mtp:
        raise ValueError("speculative decoding drafts with the model's first MTP module, and this model has none "
                         "(mtp_depth = 0)")
    if set(config.layer_types) != {"full_attention"}:
        raise ValueError("speculative decoding takes a rejected draft back by rewinding the KV cache, which "
                         "sliding-window and linear-attention layers cannot (their state has forgotten)")
    if idx.size(0) != 1 or idx.size(1) + max_new_tokens + 1 > block:
        raise ValueError(f"speculative decoding continues one prompt, which with max_new_tokens and the draft must "
                         f"fit block_size ({block}): got {idx.size(1)} + {max_new_tokens} + 1 tokens")
    stats = {} if stats is None else stats
    stats.setdefault("drafted", 0)
    stats.setdefault("accepted", 0)
    cache = KVCache(config, 1, block, device=idx.device)
    draft_cache = KVCache(model.mtp[0].block_config, 1, block, device=idx.device)
    logits, _, h = model(idx, kv_cache=cache, hidden=True)
    token = logits[:, -1].argmax(dim=-1)  # (1,)
    # The draft's inputs not yet in its cache: each position's hidden state and the token that followed it.
    pending_h, pending_next = h, torch.cat((idx[:, 1:], token[:, None]), dim=1)
    new, produced = [token], 0
    while True:
        for t in new:
            yield t
            produced += 1
            if int(t) in stop_ids or produced == max_new_tokens:
                return
        token = new[-1]
        draft = model.draft(pending_h, pending_next, draft_cache)[:, -1].argmax(dim=-1)  # (1,)
        logits, _, h = model(torch.stack((token, draft), dim=1), kv_cache=cache, hidden=True)
        best = logits.argmax(dim=-1)  # (1, 2): the main model's token after `token`, and after the draft
        stats["drafted"] += 1
        if bool(best[0, 0] == draft):
            stats["accepted"] += 1
            new, pending_h, pending_next = [draft, best[:, 1]], h, torch.stack((draft, best[:, 1]), dim=1)
        else:
            cache.rewind(1)
            new, pending_h, pending_next = [best[:, 0]], h[:, :1], best[:, :1]


@torch.inference_mode()
def beam_search(model, idx, max_new_tokens, num_beams, stop_ids=(), length_penalty=1.0, early_stopping=False,
                attention_mask=None):
    """The best of num_beams hypotheses for each prompt of idx (B, T), as transformers' generate(num_beams=...,
    do_sample=False) chooses it: a list of B token lists, each ending with its stop id or at max_new_tokens.

    Each step extends every live beam by every token and keeps the 2 * num_beams best sums of log-probabilities
    (so that num_beams remain after those ending in a stop id leave); of these, a hypothesis that ends and is
    among the num_beams best is scored sum / generated_length ** length_penalty (> 0 favours longer ones) and
    kept if it beats the worst of the num_beams finished so far. The search stops when each prompt's best live
    beam can no longer beat its worst finished one (early_stopping=False: judged at the current length;
    "never" with length_penalty > 0: at max_new_tokens), or True: as soon as num_beams hypotheses are done.
    The KV cache holds one row per beam; after each step it is reordered to follow the beams kept.
    """
    B, T = idx.shape
    if T + max_new_tokens > model.config.block_size:
        raise ValueError(f"beam search keeps the whole sequence in its cache: the prompt ({T}) plus "
                         f"max_new_tokens ({max_new_tokens}) must fit block_size ({model.config.block_size})")
    is_real = torch.ones_like(idx, dtype=torch.bool) if attention_mask is None else attention_mask.bool()
    kv_cache = KVCache(model.config, B, T + max_new_tokens, device=idx.device)
    logits = model(idx, attention_mask=is_real, kv_cache=kv_cache)[0][:, -1]  # (B, V)
    rows = torch.arange(B, device=idx.device).repeat_interleave(num_beams)  # beam b of prompt p: row p * nb + b
    kv_cache.select(rows)
    logits = logits[rows]
    keep = max(2, 1 + len(stop_ids)) * num_beams
    stop_ids = torch.tensor(list(stop_ids), dtype=torch.long, device=idx.device)
    running = idx.new_zeros(B, num_beams, 0)  # each live beam's tokens so far
    running_score = torch.full((B, num_beams), -1e9, device=idx.device)
    running_score[:, 0] = 0  # the beams start identical: only one may be extended at the first step
    finished = idx.new_zeros(B, num_beams, max_new_tokens)
    finished_len = idx.new_zeros(B, num_beams)
    finished_score = torch.full((B, num_beams), -1e9, device=idx.device)
    is_finished = torch.zeros(B, num_beams, dtype=torch.bool, device=idx.device)
    can_improve = torch.ones(B, 1, dtype=torch.bool, device=idx.device)
    for step in range(max_new_tokens):
        scores = F.log_softmax(logits.float(), dim=-1).view(B, num_beams, -1) + running_score[..., None]
        top_score, top = scores.flatten(1).topk(keep)  # (B, keep): the best continuations of all beams
        beam, token = top // scores.size(-1), top % scores.size(-1)
        candidates = torch.cat([running.gather(1, beam[..., None].expand(-1, -1, step)), token[..., None]], dim=2)
        ends = torch.isin(token, stop_ids) | (step == max_new_tokens - 1)  # a stop id, or the length limit
        # The live beams of the next step: the best num_beams that did not end.
        live = (top_score - 1e9 * ends).topk(num_beams).indices
        running, running_score = candidates.gather(1, live[..., None].expand(-1, -1, step + 1)), \
            (top_score - 1e9 * ends).gather(1, live)
        # The finished hypotheses: the best num_beams of those so far and those that ended now among the best.
        new_score = top_score / (step + 1) ** length_penalty
        admit = ends & (torch.arange(keep, device=idx.device) < num_beams) & can_improve
        if early_stopping is True:
            admit &= ~is_finished.all(dim=1, keepdim=True)
        merged_score = torch.cat([finished_score, torch.where(admit, new_score, -1e9)], dim=1)
        best = merged_score.topk(num_beams).indices
        padded = F.pad(candidates, (0, max_new_tokens - step - 1))
        finished = torch.cat([finished, padded], dim=1).gather(1, best[..., None].expand(-1, -1, max_new_tokens))
        finished_len = torch.cat([finished_len, torch.full_like(token, step + 1)], dim=1).gather(1, best)
        is_finished = torch.cat([is_finished, admit], dim=1).gather(1, best)
        finished_score = merged_score.gather(1, best)
        # Can a live beam still beat the worst finished hypothesis? transformers' heuristic, kept as it is.
        length = max_new_tokens if early_stopping == "never" and length_penalty > 0 else step + 1
        worst = torch.where(is_finished, finished_score.min(dim=1, keepdim=True).values, -1e9)
        can_improve &= (running_score[:, :1] / length ** length_penalty > worst).any(dim=1, keepdim=True)
        done_early = early_stopping is True and bool(is_finished.all())
        if not bool(can_improve.any()) or done_early or bool(ends.all()) or step == max_new_tokens - 1:
            break
        kv_cache.select((torch.arange(B, device=idx.device)[:, None] * num_beams +
                         beam.gather(1, live)).flatten())
        logits = model(running[:, :, -1].reshape(-1, 1), kv_cache=kv_cache)[0][:, -1]
    return [finished[p, 0, :finished_len[p, 0]].tolist() for p in range(B)]
