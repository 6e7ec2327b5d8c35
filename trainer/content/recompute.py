"""The naive end-to-end baseline (`memory_bank.mode = "recompute"`): every history item is encoded from raw content
at every step (with gradient in training), from an in-memory item catalog. Items are deduplicated within the batch
first, which only makes the baseline faster."""

from __future__ import annotations

import torch

from trainer.content.source import SERVE, Encoder, StepContent, coverage_values, flat_histories, hit_shares
from trainer.data.batch import Batch
from trainer.data.item_catalog import ItemCatalog
from trainer.models.model import Embedded


class RecomputeContent:
    def __init__(self, catalog: ItemCatalog, encoder: Encoder, dtype: torch.dtype) -> None:
        self.catalog, self.encoder, self.dtype = catalog, encoder, dtype
        self.coverage: dict[str, torch.Tensor] = {}

    def prepare(self, batch: Batch, embedded: Embedded, step: int, mode: str) -> StepContent:
        if mode == SERVE:
            raise ValueError("memory_bank.mode = 'recompute' has no bank to serve from")
        names, lengths, ids, mask = flat_histories(embedded)
        target = self.encoder(
            batch.text, batch.images, batch.image_mask, batch.known_item_ids, batch.packed_text
        )
        unique, inverse = torch.unique(ids[mask], return_inverse=True)
        rows, found = self.catalog.rows_of(unique)
        known = found.nonzero().squeeze(1)
        table = target.new_zeros(unique.numel(), target.shape[1])
        if known.numel():
            encoded = self.encoder(*self.catalog.inputs(rows[known]))
            table = table.index_put((known,), encoded.to(table.dtype))
        flat = target.new_zeros(*ids.shape, target.shape[1])
        flat = flat.index_put((mask,), table[inverse])
        hits = torch.zeros_like(mask)
        hits[mask] = found[inverse]
        self.coverage = hit_shares(names, lengths, hits, mask)
        return StepContent(target, batch.valid.clone(), dict(zip(names, flat.split(lengths, 1))))

    def after_step(self, batch: Batch, content: StepContent, step: int, measure: bool) -> None:
        pass

    def start(self, step: int) -> None:
        pass

    def metrics(self, device: torch.device) -> dict[str, float]:
        return coverage_values(self.coverage)
