"""What every content source shares: the modes, what a step's content is, and the history helpers.

With `memory_bank.enabled`, each history token carries the item's content vector besides its ID embedding, and
the target items' content vectors come from the content source too. `BankContent` (LEMUR's memory bank) and
`RecomputeContent` (the naive end-to-end baseline) are the two sources; `build_content_source` picks one.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

import torch
from torch import nn

from trainer.data.batch import Batch
from trainer.models.model import Embedded

Encoder = nn.Module
"""The content encoder: (text tokens per field, images [B, N, 3, H, W], image mask [B, N], the item ids or None
(`Batch.known_item_ids`: given only when every item is in items.parquet)) -> [B, C]."""
TRAIN, EVAL, SERVE = "train", "eval", "serve"
"""Modes of a step: train; eval (every target encoded, no dedup join); serve (content from the bank only)."""


@dataclass
class StepContent:
    target: torch.Tensor
    """[B, C] the target items' content vectors (fresh, or read from the bank)."""
    fresh: torch.Tensor
    """[B] bool: rows whose target the encoder ran on in this step (they are written to the bank)."""
    histories: dict[str, torch.Tensor]
    """Per history: [B, L, C] content vectors (zeros where unknown or masked out)."""


class ContentSource(Protocol):
    """Where a step's content vectors come from, and what it does around the step."""

    def prepare(self, batch: Batch, embedded: Embedded, step: int, mode: str) -> StepContent:
        """The targets' and the histories' content vectors for this step."""
        ...

    def after_step(self, batch: Batch, content: StepContent, step: int, measure: bool) -> None:
        """After the optimizer step (e.g. write the fresh vectors); `measure`: this step is logged."""
        ...

    def start(self, step: int) -> None:
        """Before the first step of a fresh run (e.g. the bank's warm-up)."""
        ...

    def metrics(self, device: torch.device) -> dict[str, float]:
        """Values for the log line (collectives where they reduce over ranks: every rank calls this)."""
        ...


def flat_histories(embedded: Embedded) -> tuple[list[str], list[int], torch.Tensor, torch.Tensor]:
    """All histories side by side along the sequence axis: names, lengths, raw ids [B, ΣL], mask [B, ΣL]."""
    if not embedded.history_ids:
        raise ValueError(
            "the batch carries no raw history ids: build its reader with raw_histories=True "
            "(the content source looks history items up by raw item id, not by table row)"
        )
    names = list(embedded.history_ids)
    lengths = [embedded.history_ids[n].shape[1] for n in names]
    ids = torch.cat([embedded.history_ids[n] for n in names], dim=1)
    mask = torch.cat([embedded.histories[n][1] for n in names], dim=1)
    return names, lengths, ids, mask


def hit_shares(
    names: list[str], lengths: list[int], hits: torch.Tensor, mask: torch.Tensor
) -> dict[str, torch.Tensor]:
    """Per history, the share of its masked-in entries that had a vector (kept on the device)."""
    shares = {}
    for name, hit_part, mask_part in zip(names, hits.split(lengths, 1), mask.split(lengths, 1)):
        asked = mask_part.sum()
        shares[name] = torch.where(asked > 0, hit_part.sum() / asked.clamp(min=1), 1.0)
    return shares


def coverage_values(coverage: dict[str, torch.Tensor]) -> dict[str, float]:
    """The last step's hit rate per history, for the log line."""
    return {f"bank_coverage_{name}": float(share) for name, share in coverage.items()}
