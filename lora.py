"""lora.py: low-rank adapters (LoRA; Hu et al. 2021, "LoRA: Low-Rank Adaptation of Large Language Models").

    python train.py config/sft_add2.py --lora_rank=8      # adapters on every projection of every block

The one idea: the change fine-tuning makes to a d_out x d_in matrix W is close to low rank, so learn it as a
product B A of a (d_out, r) and an (r, d_in) matrix with r << d and leave W frozen:

    y = W x + (alpha / r) B A x          B starts at zero, so the adapted model starts as exactly the base

Only A and B get gradients and AdamW state (r (d_in + d_out) numbers instead of d_in d_out), and a checkpoint
holds only them. For inference the product folds back into one matrix, W + (alpha / r) B A: a merged model has
the base's shape and costs nothing extra (sampling, evaluation and export all see a plain model).

One exception is worth knowing: tokens the base never saw. The chat tokens <|im_start|> and <|im_end|> do not
occur in pretraining text, so their embedding rows were only ever pushed down as wrong predictions (the base
gives <|im_end|> about 20 nats of loss where a reply ends). Low-rank updates of the blocks can only slowly steer
the hidden state towards such a row; `embeddings=True` trains the token embedding (and the head, one matrix when
tied) fully beside the adapters, as PEFT's `modules_to_save=["embed_tokens", "lm_head"]` does for chat templates,
and the checkpoint holds it with the adapters.

alpha / r keeps the update's scale steady when r changes (the paper tunes alpha once and varies r), and A
starts as nn.Linear's own weights do (Kaiming-uniform), as in the paper's code: with B = 0 the first step moves
B only, and A gets a gradient from then on.
"""

import math

import torch
import torch.nn as nn
import torch.nn.functional as F


class LoRALinear(nn.Module):
    """A frozen linear layer plus its trainable low-rank update. It keeps the layer's own `weight` and `bias`
    (same names, so the base's state dict loads into it unchanged) and adds `lora_A` (rank, in) and
    `lora_B` (out, rank)."""

    def __init__(self, linear: nn.Linear, rank: int, alpha: float, dropout: float):
        super().__init__()
        self.in_features, self.out_features = linear.in_features, linear.out_features
        self.weight = linear.weight
        self.bias = linear.bias
        self.weight.requires_grad_(False)
        if self.bias is not None:
            self.bias.requires_grad_(False)
        device, dtype = linear.weight.device, linear.weight.dtype
        self.lora_A = nn.Parameter(torch.empty(rank, self.in_features, device=device, dtype=dtype))
        self.lora_B = nn.Parameter(torch.zeros(self.out_features, rank, device=device, dtype=dtype))
        nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))
        self.scale = alpha / rank
        # Dropout on the adapter's input only (the paper's lora_dropout): the frozen path sees x as it is.
        self.dropout = nn.Dropout(dropout)

    def forward(self, x):
        update = F.linear(F.linear(self.dropout(x), self.lora_A), self.lora_B)  # (..., rank) -> (..., out)
        return F.linear(x, self.weight, self.bias) + self.scale * update

    def merged_weight(self) -> torch.Tensor:
        """W + (alpha / r) B A: the one matrix that computes what this layer computes (without dropout)."""
        return self.weight + self.scale * (self.lora_B @ self.lora_A)


def projections(model: nn.Module) -> dict[str, list[tuple[nn.Module, str]]]:
    """Every nn.Linear inside the model's blocks, by its attribute name (wq, wkv_b, w1, ...): (parent, name)
    pairs. The embedding and the head stay out, as in the paper, which adapts the attention projections."""
    found = {}
    for block in model.blocks():
        for parent in block.modules():
            for name, child in parent.named_children():
                if isinstance(child, (nn.Linear, LoRALinear)):
                    found.setdefault(name, []).append((parent, name))
    return found


EMBEDDINGS = ("wte.weight", "lm_head.weight")  # the token embedding and the head (the same matrix when tied)


def add_lora(model: nn.Module, rank: int, alpha: float, dropout: float, targets: str, embeddings: bool = False) -> None:
    """Freezes every parameter of the model and gives the projections named in targets (comma-separated
    attribute names, or "all-linear" for every projection in the blocks) trainable adapters, in place;
    embeddings=True leaves the token embedding and the head trainable too. ValueError names a target the model
    does not have."""
    found = projections(model)
    names = sorted(found) if targets == "all-linear" else [t.strip() for t in targets.split(",") if t.strip()]
    unknown = [name for name in names if name not in found]
    if unknown or not names:
        raise ValueError(f"lora_targets: this model has no projection named {', '.join(unknown) or repr(targets)} "
                         f"(its projections: {', '.join(sorted(found))}, or all-linear)")
    for p in model.parameters():
        p.requires_grad_(False)
    for name in names:
        for parent, attr in found[name]:
            setattr(parent, attr, LoRALinear(getattr(parent, attr), rank, alpha, dropout))
    if embeddings:
        model.wte.weight.requires_grad_(True)
        model.lm_head.weight.requires_grad_(True)


def merge_lora(model: nn.Module) -> nn.Module:
    """Folds every adapter into its layer, in place: each LoRALinear becomes a plain nn.Linear holding
    W + (alpha / r) B A. Returns the model, now of the base's exact shape."""
    for pairs in projections(model).values():
        for parent, attr in pairs:
            layer = getattr(parent, attr)
            if isinstance(layer, LoRALinear):
                merged = nn.Linear(layer.in_features, layer.out_features, bias=layer.bias is not None,
                                   device=layer.weight.device, dtype=layer.weight.dtype)
                with torch.no_grad():
                    merged.weight.copy_(layer.merged_weight())
                    if layer.bias is not None:
                        merged.bias.copy_(layer.bias)
                setattr(parent, attr, merged)
    return model


def adapter_state_dict(state_dict: dict, embeddings: bool = False) -> dict:
    """The trained part of a model's state dict, what a LoRA checkpoint holds: the adapters, and with
    embeddings=True the token embedding and the head."""
    return {k: v for k, v in state_dict.items() if k.endswith((".lora_A", ".lora_B")) or (embeddings and k in EMBEDDINGS)}


def load_adapters(model: nn.Module, adapters: dict, embeddings: bool = False) -> None:
    """Loads a LoRA checkpoint's adapters (and embeddings) into a model that add_lora gave the same ones;
    ValueError when the two do not hold the same ones."""
    expected = {k: v.shape for k, v in adapter_state_dict(model.state_dict(), embeddings).items()}
    if {k: v.shape for k, v in adapters.items()} != expected:
        raise ValueError(f"the checkpoint's adapters ({len(adapters)}) are not the model's ({len(expected)}): "
                         "lora_rank, lora_targets and lora_embeddings must be the ones the run trained with")
    model.load_state_dict(adapters, strict=False)
