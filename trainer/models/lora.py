"""LoRA adapters for EM3's long-sequence phase: y = W x + b + (alpha / r) · B A x, with B zero-initialised, so an
adapter starts as the identity change. Phase 1 trains W (adapters frozen); phase 2 freezes everything of the
sequence model but the adapters."""

from __future__ import annotations

import math

import torch.nn.functional as F
from torch import Tensor, nn


class LoRALinear(nn.Module):
    def __init__(self, base: nn.Linear, rank: int, alpha: float) -> None:
        super().__init__()
        self.base = base
        self.lora_a = nn.Parameter(base.weight.new_empty(rank, base.in_features))
        self.lora_b = nn.Parameter(base.weight.new_zeros(base.out_features, rank))
        nn.init.kaiming_uniform_(self.lora_a, a=math.sqrt(5))  # as nn.Linear, and peft
        self.scale = alpha / rank

    def forward(self, x: Tensor) -> Tensor:
        return self.base(x) + F.linear(F.linear(x, self.lora_a), self.lora_b) * self.scale


def add_lora(module: nn.Module, rank: int, alpha: float) -> list[LoRALinear]:
    """Wrap every nn.Linear inside `module` (in place) and return the adapters."""
    adapters = []
    for name, child in list(module.named_children()):
        if isinstance(child, nn.Linear):
            adapter = LoRALinear(child, rank, alpha)
            setattr(module, name, adapter)
            adapters.append(adapter)
        elif not isinstance(child, LoRALinear):
            adapters += add_lora(child, rank, alpha)
    return adapters


def set_lora_phase(module: nn.Module, phase: int) -> None:
    """Phase 1: the module's own weights train, the adapters do not. Phase 2: only the adapters train."""
    for name, param in module.named_parameters():
        is_adapter = name.rsplit(".", 1)[-1] in ("lora_a", "lora_b")
        param.requires_grad_(is_adapter == (phase == 2))
