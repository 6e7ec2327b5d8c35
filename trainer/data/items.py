"""The item catalog: every item of items.parquet, tokenised (and its images decoded) once and held as tensors, so
the content encoder can run on any set of item ids without reading shards. Used by the `recompute` baseline (it
encodes every history item at every step) and by the memory bank's warm-up.

Memory: per item the token ids of every text field (int32) and its images (uint8); fine for catalogs of up to a few
million text-only items. Larger catalogs are what the memory bank is for.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import torch

from trainer.data.batch import Tokens
from trainer.data.collate import Collator
from trainer.data.decode import decode_image

CHUNK = 4096


class ItemCatalog:
    """Content inputs of every item, looked up by raw item id (sorted ids + binary search, on `device`)."""

    def __init__(
        self,
        item_ids: torch.Tensor,
        tokens: dict[str, torch.Tensor],
        images: torch.Tensor,
        image_mask: torch.Tensor,
        pad_token_id: int,
    ) -> None:
        order = torch.argsort(item_ids)
        self.item_ids = item_ids[order]
        if self.item_ids.numel() > 1 and bool((self.item_ids[1:] == self.item_ids[:-1]).any()):
            raise ValueError("items.parquet: item_id is not unique")
        self.tokens = {f: t[order] for f, t in tokens.items()}
        self.images, self.image_mask = images[order], image_mask[order]
        self.pad_token_id = pad_token_id

    def __len__(self) -> int:
        return int(self.item_ids.numel())

    def to(self, device: torch.device | str) -> ItemCatalog:
        moved = ItemCatalog.__new__(ItemCatalog)
        moved.item_ids = self.item_ids.to(device)
        moved.tokens = {f: t.to(device) for f, t in self.tokens.items()}
        moved.images, moved.image_mask = self.images.to(device), self.image_mask.to(device)
        moved.pad_token_id = self.pad_token_id
        return moved

    def rows_of(self, item_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Catalog row of each id and whether the id is in the catalog (rows of unknown ids are 0)."""
        if len(self) == 0:
            zeros = torch.zeros_like(item_ids)
            return zeros, zeros.bool()
        slot = torch.searchsorted(self.item_ids, item_ids).clamp_(max=len(self) - 1)
        found = self.item_ids[slot] == item_ids
        return torch.where(found, slot, torch.zeros_like(slot)), found

    def inputs(self, rows: torch.Tensor) -> tuple[dict[str, Tokens], torch.Tensor, torch.Tensor]:
        """The content encoder's inputs (text tokens per field, images, image mask) for catalog rows."""
        text = {}
        for f, ids in self.tokens.items():
            chosen = ids[rows].long()
            text[f] = Tokens(chosen, (chosen != self.pad_token_id).long())
        return text, self.images[rows], self.image_mask[rows]


def load_catalog(
    items_path: str | Path,
    collator: Collator,
    rank: int = 0,
    world_size: int = 1,
) -> ItemCatalog:
    """Rows `rank::world_size` of items.parquet (all of it with the defaults), tokenised with the reader's own
    tokenizer and budgets, so a catalog item encodes exactly as the same item does as a batch's target."""
    spec = collator.spec
    path = Path(items_path)
    table = pq.read_table(path)
    needed = ["item_id", *spec.text_fields] + (["images"] if spec.images_per_sample else [])
    missing = [c for c in needed if c not in table.column_names]
    if missing:
        raise ValueError(f"{path}: missing column(s) {missing}")
    ids = np.asarray(table.column("item_id").to_numpy(zero_copy_only=False))[rank::world_size]
    pad = collator.tokenizer.pad_token_id
    tokens = {}
    for f, budget in spec.text_fields.items():
        texts = [t or "" for t in table.column(f).to_pylist()[rank::world_size]]
        parts = [collator.tokens(texts[i : i + CHUNK], budget).input_ids for i in range(0, len(texts), CHUNK)]
        tokens[f] = torch.cat(parts).to(torch.int32) if parts else torch.zeros(0, budget, dtype=torch.int32)
    n, size = spec.images_per_sample, spec.image_size
    images = torch.zeros(len(ids), n, 3, size, size, dtype=torch.uint8)
    mask = torch.zeros(len(ids), n, dtype=torch.bool)
    if n:
        for i, blobs in enumerate(table.column("images").to_pylist()[rank::world_size]):
            for j, data in enumerate((blobs or [])[:n]):
                try:
                    pixels = decode_image(data, size)
                except Exception as err:  # noqa: BLE001 - re-raised with the record named
                    raise ValueError(f"{path}: item_id {int(ids[i])}: field 'images'[{j}]: {err}") from err
                images[i, j] = torch.from_numpy(pixels.copy()).permute(2, 0, 1)
                mask[i, j] = True
    return ItemCatalog(torch.from_numpy(ids.astype(np.int64)), tokens, images, mask, pad)
