"""Content sources: where a step's content vectors come from with `memory_bank.enabled` (see source.py)."""

from __future__ import annotations

import logging

import torch

from trainer.config.schema import Config
from trainer.content.bank import BankContent, SampledRows, build_bank, sample_rows, sample_rows_on_device
from trainer.content.recompute import RecomputeContent
from trainer.content.source import EVAL, SERVE, TRAIN, ContentSource, Encoder, StepContent
from trainer.data.item_catalog import ItemsParquet
from trainer.data.spec import DatasetSpec

log = logging.getLogger("lemur")

__all__ = [
    "EVAL",
    "SERVE",
    "TRAIN",
    "BankContent",
    "ContentSource",
    "RecomputeContent",
    "SampledRows",
    "StepContent",
    "build_content_source",
    "sample_rows",
    "sample_rows_on_device",
]


def build_content_source(
    cfg: Config,
    spec: DatasetSpec,
    encoder: Encoder | None,
    items: ItemsParquet,
    device: torch.device,
    dtype: torch.dtype = torch.float32,
    rank: int = 0,
) -> ContentSource | None:
    """The source `memory_bank` asks for (None when the bank is off: history tokens carry ID embeddings only).
    `encoder` is the model's content encoder; `items` the dataset's items.parquet as encoder inputs; `dtype` the
    step's compute dtype."""
    if not cfg.memory_bank.enabled:
        return None
    assert encoder is not None, (
        "memory_bank.enabled needs model.use_content (the config refuses it otherwise)"
    )
    if cfg.memory_bank.mode == "recompute":
        catalog = items.load()
        log.info("recompute mode: %d items in the catalog", len(catalog))
        return RecomputeContent(catalog.to(device), encoder, dtype)
    known_items = spec.cardinalities.get("item_id", spec.counts.get("items", 1))
    bank = build_bank(cfg.memory_bank, known_items, cfg.model.content_dim, device)
    return BankContent(cfg.memory_bank, bank, encoder, dtype, cfg.training.seed, rank, items)
