"""LoRA: low-rank adapters on a model's nn.Linear layers, applied from outside the model.

    names = apply_lora(model, cfg.lora)     # freezes the model; only the adapters train
    ...                                     # train
    merge_lora(model)                       # fold the adapters in: plain nn.Linear layers again

Each adapted layer computes base(x) + B(A(x)) * alpha / rank with A and B stock nn.Linear layers
(so Opacus computes their per-sample gradients and bitsandbytes sees plain layers after merging).
B starts at zero: the adapted model starts equal to the base model.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from deepkiln.config import LoraArgs


class LoraLinear(nn.Module):
    """A frozen nn.Linear plus a trainable low-rank update."""

    def __init__(self, base: nn.Linear, rank: int, alpha: float):
        super().__init__()
        self.base = base
        self.lora_a = nn.Linear(base.in_features, rank, bias=False, device=base.weight.device, dtype=base.weight.dtype)
        self.lora_b = nn.Linear(rank, base.out_features, bias=False, device=base.weight.device, dtype=base.weight.dtype)
        nn.init.kaiming_uniform_(self.lora_a.weight, a=math.sqrt(5))
        nn.init.zeros_(self.lora_b.weight)
        self.scale = alpha / rank

    def forward(self, x):
        return self.base(x) + self.lora_b(self.lora_a(x)) * self.scale

    @torch.no_grad()
    def merged(self) -> nn.Linear:
        """The base layer with the update folded into its weight."""
        delta = (self.lora_b.weight.float() @ self.lora_a.weight.float()) * self.scale
        self.base.weight += delta.to(self.base.weight.dtype)
        return self.base


def apply_lora(model: nn.Module, args: LoraArgs) -> list[str]:
    """Freeze every parameter of `model` and wrap each nn.Linear whose own name is in args.targets.
    Returns the wrapped layers' qualified names; ValueError when no layer matches."""
    for p in model.parameters():
        p.requires_grad_(False)
    names = [name for name, m in model.named_modules()
             if isinstance(m, nn.Linear) and name.rsplit(".", 1)[-1] in args.targets]
    if not names:
        raise ValueError(f"lora.targets={args.targets} matches no nn.Linear layer of the model")
    for name in names:
        parent, _, child = name.rpartition(".")
        owner = model.get_submodule(parent) if parent else model
        setattr(owner, child, LoraLinear(getattr(owner, child), args.rank, args.alpha))
    return names


def merge_lora(model: nn.Module) -> nn.Module:
    """Fold every adapter into its base layer in place; the model has plain nn.Linear layers again
    (trainable as they were before apply_lora froze them)."""
    for name, m in list(model.named_modules()):
        if isinstance(m, LoraLinear):
            parent, _, child = name.rpartition(".")
            setattr(model.get_submodule(parent) if parent else model, child, m.merged())
    for p in model.parameters():
        p.requires_grad_(True)
    return model


def lora_parameters(model: nn.Module) -> list[nn.Parameter]:
    return [p for m in model.modules() if isinstance(m, LoraLinear)
            for p in (m.lora_a.weight, m.lora_b.weight)]
