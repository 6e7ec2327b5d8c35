"""Losses. Padding rows (Batch.valid False) never count."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from trainer.config.schema import TrainingConfig
from trainer.contrastive import cic_loss, sqdc_loss
from trainer.data.batch import Batch
from trainer.models.model import DenseOutput


def bce_loss(logits: torch.Tensor, labels: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    """Mean binary cross-entropy over the valid rows (logits and labels [B])."""
    per_row = F.binary_cross_entropy_with_logits(logits.float(), labels.float(), reduction="none")
    weights = valid.to(per_row.dtype)
    return (per_row * weights).sum() / weights.sum().clamp(min=1.0)


def objective_loss(cfg: TrainingConfig, batch: Batch, out: DenseOutput) -> torch.Tensor:
    """The training objective: BCE (objective "ranking"), plus λ·SQDC between the query and the target item's
    content vector and EM3's CIC between the content and ID projections, when configured."""
    if cfg.objective == "ranking":
        loss = bce_loss(out.logits, batch.labels[:, 0], batch.valid)
    else:  # the two-stage baseline's first stage: contrastive losses only (zero keeps the graph)
        loss = out.logits.float().sum() * 0.0
    if cfg.cic_weight > 0 and out.cic is not None:
        content, ids = out.cic
        loss = loss + cfg.cic_weight * cic_loss(
            content, ids, batch.valid, cfg.cic_temperature, item_ids=batch.item_id
        )
    if cfg.sqdc_weight > 0 and out.query is not None and out.content is not None:
        sqdc = sqdc_loss(
            out.query,
            out.content,
            batch.labels[:, 0],
            batch.query_id,
            batch.valid,
            cfg.sqdc_temperature,
            cfg.sqdc_session_mask,
        )
        loss = loss + cfg.sqdc_weight * sqdc
    return loss
