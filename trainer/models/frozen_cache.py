"""EM3's frozen-feature cache: the output of a tower's frozen bottom, computed once per item and looked up by id.

With `trainable_top_layers = k`, a tower's embeddings and all but its top k blocks never change, and they run as a
fixed feature extractor (eval mode, `towers.FrozenBottom`). Their output for an item is then a function of the item's
content alone, so EM3's feature system computes it offline and serves it from a table: here, one pass of the frozen
bottoms over items.parquet before training (`build`), kept on the device, and a step gathers its targets' rows and
runs only the trainable top (`ContentEncoder.forward` with `item_ids`). Items not in the table (a batch the reader
says holds one) take the uncached path, which computes the same function.

Memory: items × (text tokens × text hidden + images × patches × vision hidden) × the tower dtype's bytes, on every
rank (each rank's batches may show any item). The em3 preset's 200k items at 224 px: ~47 GB in bf16; the log line
names the size before anything is allocated.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable
from typing import TYPE_CHECKING

import torch
from torch import Tensor

from trainer.models.towers import TextTower, VisionTower

if TYPE_CHECKING:  # torchrec-heavy imports; only the annotations need them
    from trainer.data.batch import Tokens
    from trainer.data.item_catalog import ItemCatalog

log = logging.getLogger("lemur")


class FrozenFeatureCache:
    """Item ids and, per tower with a frozen bottom, that bottom's output for each item (rows in items.parquet
    order): text [N, ΣL, H] over the fields at their full budgets, images [N, n, P, H]. Ids are found by binary
    search over a sorted copy, so the big tables are never permuted (no second copy while building)."""

    def __init__(
        self, item_ids: Tensor, budgets: list[int], text: Tensor | None, images: Tensor | None
    ) -> None:
        self.sorted_ids, self.order = torch.sort(item_ids)
        if item_ids.numel() > 1 and bool((self.sorted_ids[1:] == self.sorted_ids[:-1]).any()):
            raise ValueError("frozen-feature cache: item ids must be unique")
        self.budgets = budgets
        self.text = text
        self.images = images

    def __len__(self) -> int:
        return int(self.sorted_ids.numel())

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (self.text, self.images) if t is not None)

    def rows(self, item_ids: Tensor) -> Tensor:
        """The table row of each id. The caller only asks for ids the table holds (the reader checked them against
        the same items.parquet); a device-side assert guards that without making the host wait."""
        slot = torch.searchsorted(self.sorted_ids, item_ids).clamp_(max=len(self) - 1)
        torch._assert_async((self.sorted_ids[slot] == item_ids).all(), "item not in the frozen-feature cache")
        return self.order[slot]

    def text_features(self, rows: Tensor, fields: list[Tokens]) -> Tensor:
        """The rows' text features laid out as the batch's fields are: each field cut to the batch's width (the
        reader may pad a field to its longest row rather than its budget)."""
        assert self.text is not None
        features = self.text[rows]
        if [f.input_ids.shape[1] for f in fields] == self.budgets:
            return features
        parts, start = [], 0
        for budget, f in zip(self.budgets, fields):
            parts.append(features[:, start : start + f.input_ids.shape[1]])
            start += budget
        return torch.cat(parts, dim=1)

    @staticmethod
    def build(
        text_tower: TextTower,
        vision_tower: VisionTower | None,
        fields: list[str],
        budgets: list[int],
        chunks: Iterable[ItemCatalog],
        count: int,
        device: torch.device,
        dtype: torch.dtype | None = None,
    ) -> FrozenFeatureCache:
        """One pass of the frozen bottoms over the catalog chunks (`count` items: all of items.parquet), written
        into tables allocated once at their final size, in `dtype` (None: as the bottoms return them; under bf16
        autocast they return fp32 from their final LayerNorm, and bf16 halves the table at a rounding's cost)."""
        cache_text = text_tower.frozen_layers > 0
        cache_images = vision_tower is not None and vision_tower.frozen_layers > 0
        ids = torch.zeros(count, dtype=torch.long, device=device)
        text: Tensor | None = None
        images: Tensor | None = None
        start = 0
        for chunk in chunks:
            end = start + len(chunk)
            if end > count:
                raise ValueError(
                    f"frozen-feature cache: the catalog holds more than the {count} items announced"
                )
            if len(chunk) == 0:
                continue
            ids[start:end] = chunk.item_ids.to(device)
            inputs, pixels, _ = chunk.to(device).inputs(torch.arange(len(chunk), device=device))
            if cache_text:
                part = text_tower.frozen_features([inputs[f] for f in fields]).to(dtype)
                text = allocated(text, count, part)
                text[start:end] = part
            if cache_images:
                assert vision_tower is not None
                part = vision_tower.frozen_features(pixels).to(dtype)
                images = allocated(images, count, part)
                images[start:end] = part
            start = end
        if start != count:
            raise ValueError(
                f"frozen-feature cache: the catalog held {start} items, not the {count} announced"
            )
        cache = FrozenFeatureCache(ids, budgets, text, images)
        log.info(
            "frozen-feature cache: %d items, %.2f GiB on %s (text %s, images %s)",
            len(cache),
            cache.nbytes / 2**30,
            device,
            "cached" if cache_text else "computed",
            "cached" if cache_images else ("computed" if vision_tower is not None else "none"),
        )
        return cache


def allocated(table: Tensor | None, count: int, part: Tensor) -> Tensor:
    """The table for `count` rows shaped like `part`'s, allocated at the first chunk."""
    if table is None:
        table = part.new_empty(count, *part.shape[1:])
    return table
