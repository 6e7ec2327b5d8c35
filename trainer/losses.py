"""Losses. Padding rows (Batch.valid False) never count."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def bce_loss(logits: torch.Tensor, labels: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    """Mean binary cross-entropy over the valid rows (logits and labels [B])."""
    per_row = F.binary_cross_entropy_with_logits(logits.float(), labels.float(), reduction="none")
    weights = valid.to(per_row.dtype)
    return (per_row * weights).sum() / weights.sum().clamp(min=1.0)
