"""EM3's frozen-feature cache: the output of a tower's frozen bottom, computed once per item and looked up by id.

With `trainable_top_layers = k`, a tower's embeddings and all but its top k blocks never change, and they run as a
fixed feature extractor (eval mode, `towers.FrozenBottom`). Their output for an item is then a function of the item's
content alone, so EM3's feature system computes it offline and serves it from a table: here, one pass of the frozen
bottoms over items.parquet before training (`build`), and a step runs only the trainable top over its targets' rows
(`ContentEncoder.forward` with `item_ids`). Items not in the table (a batch the reader says holds one) take the
uncached path, which computes the same function.

Where the table lives (`model.frozen_cache_placement`):
- device: on every rank's device; a step gathers its targets' rows there by id (`rows`, no host sync).
- host: in host memory; `Trainer.to_device` gathers the rows of a batch's distinct items there (`gather`, on the
  prefetch thread, beside the step) into pinned memory of their own, and they travel with the batch
  (`Batch.frozen_ids`, `frozen_text`, `frozen_images`); the encoder looks them up by id in that small table
  (`served`). The device then holds one batch's rows, not the catalog's. The table itself is not pinned: the
  gather copies anyway, into pinned memory, and tens of GB pinned per rank would be memory the OS cannot page.

Memory: items × (text tokens × text hidden + images × patches × vision hidden) × the tower dtype's bytes, on every
rank (each rank's batches may show any item), on its device or in host memory; in host memory once per host when its
local ranks share one copy (`HostFiles`, model.frozen_cache_share). The em3 preset's 200k items at 224 px: ~47 GB in
bf16; the log line names the size and the place.
"""

from __future__ import annotations

import json
import logging
import math
import shutil
from collections.abc import Callable, Iterable
from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from torch import Tensor

from trainer.models.towers import TextTower, VisionTower

if TYPE_CHECKING:  # torchrec-heavy imports; only the annotations need them
    from trainer.data.batch import Batch, Tokens
    from trainer.data.item_catalog import ItemCatalog

log = logging.getLogger("lemur")

Allocate = Callable[[str, tuple[int, ...], torch.dtype], Tensor]
"""Makes a host table: (name, shape, dtype) -> a tensor of that shape (`HostFiles.allocate`)."""


class FrozenFeatureCache:
    """Item ids and, per tower with a frozen bottom, that bottom's output for each item: text [N, ΣL, H] over the
    fields at their full budgets, images [N, n, P, H]. Ids are found by binary search over `sorted_ids`; row
    `order[i]` holds the item `sorted_ids[i]` (None: row i does), so the big tables are never permuted (no second
    copy while building)."""

    def __init__(
        self,
        sorted_ids: Tensor,
        order: Tensor | None,
        budgets: list[int],
        text: Tensor | None,
        images: Tensor | None,
        host: bool = False,
    ) -> None:
        self.sorted_ids = sorted_ids
        self.order = order
        self.budgets = budgets
        self.text = text
        self.images = images
        self.host = host
        """Host placement: the tables are in host memory, and only `gather` reads them (never a step)."""

    @staticmethod
    def of_items(
        item_ids: Tensor, budgets: list[int], text: Tensor | None, images: Tensor | None, host: bool = False
    ) -> FrozenFeatureCache:
        """The table whose row i holds item `item_ids[i]` (ids unique)."""
        sorted_ids, order = torch.sort(item_ids)
        if item_ids.numel() > 1 and bool((sorted_ids[1:] == sorted_ids[:-1]).any()):
            raise ValueError("frozen-feature cache: item ids must be unique")
        return FrozenFeatureCache(sorted_ids, order, budgets, text, images, host)

    @staticmethod
    def from_tables(tables: dict[str, Tensor], budgets: list[int]) -> FrozenFeatureCache:
        """The host table another process built (`HostFiles.mapped`: ids, and text and/or images)."""
        cache = FrozenFeatureCache.of_items(
            tables["ids"], budgets, tables.get("text"), tables.get("images"), host=True
        )
        log.info(
            "frozen-feature cache: %d items, %.2f GiB mapped from host memory",
            len(cache),
            cache.nbytes / 2**30,
        )
        return cache

    @staticmethod
    def served(batch: Batch, budgets: list[int]) -> FrozenFeatureCache | None:
        """The rows `gather` put in `batch` (on its device by now) as a table of their own, or None when it holds
        none. Their ids are sorted and distinct already: no sort and no check (a host sync) on the step's path."""
        if batch.frozen_ids is None:
            return None
        return FrozenFeatureCache(batch.frozen_ids, None, budgets, batch.frozen_text, batch.frozen_images)

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
        return slot if self.order is None else self.order[slot]

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

    def gather(self, batch: Batch, pin: bool = False) -> Batch:
        """Host placement: `batch` (still on the host) with the rows of its distinct target items gathered here,
        each copied once, into memory of their own (`pin`: pinned, so the copy to the device does not wait), for
        `Batch.to` to move. As it is when it names no items (`known_item_ids` None), is on a device already, holds
        its rows already, or names an item this table lacks: that batch takes the uncached path. Vectorised, and on
        host tensors only: nothing waits for a device."""
        ids = batch.known_item_ids
        if ids is None or ids.device.type != "cpu" or batch.frozen_ids is not None or len(self) == 0:
            return batch
        ids = torch.unique(ids)  # sorted
        slot = torch.searchsorted(self.sorted_ids, ids).clamp_(max=len(self) - 1)
        if not torch.equal(self.sorted_ids[slot], ids):
            return batch
        rows = slot if self.order is None else self.order[slot]
        text, images = taken(self.text, rows, pin), taken(self.images, rows, pin)
        return replace(batch, frozen_ids=ids, frozen_text=text, frozen_images=images)

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
        host: bool = False,
        allocate: Allocate | None = None,
    ) -> FrozenFeatureCache:
        """One pass of the frozen bottoms (on `device`) over the catalog chunks (`count` items: all of
        items.parquet), written into tables allocated once at their final size, on `device` or in host memory
        (`host`; there by `allocate` if given, e.g. in files a host's processes share), in `dtype` (None: as the
        bottoms return them; under bf16 autocast they return fp32 from their final LayerNorm, and bf16 halves the
        table at a rounding's cost)."""
        cache_text = text_tower.frozen_layers > 0
        cache_images = vision_tower is not None and vision_tower.frozen_layers > 0
        home = torch.device("cpu") if host else device
        make = allocate if host and allocate is not None else device_allocator(home)
        ids = make("ids", (count,), torch.long)
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
            ids[start:end] = chunk.item_ids.to(home)
            inputs, pixels, _ = chunk.to(device).inputs(torch.arange(len(chunk), device=device))
            if cache_text:
                part = text_tower.frozen_features([inputs[f] for f in fields]).to(dtype)
                text = text if text is not None else make("text", (count, *part.shape[1:]), part.dtype)
                text[start:end] = part
            if cache_images:
                assert vision_tower is not None
                part = vision_tower.frozen_features(pixels).to(dtype)
                images = (
                    images if images is not None else make("images", (count, *part.shape[1:]), part.dtype)
                )
                images[start:end] = part
            start = end
        if start != count:
            raise ValueError(
                f"frozen-feature cache: the catalog held {start} items, not the {count} announced"
            )
        cache = FrozenFeatureCache.of_items(ids, budgets, text, images, host)
        log.info(
            "frozen-feature cache: %d items, %.2f GiB %s (text %s, images %s)",
            len(cache),
            cache.nbytes / 2**30,
            "in host memory" if host else f"on {device}",
            "cached" if cache_text else "computed",
            "cached" if cache_images else ("computed" if vision_tower is not None else "none"),
        )
        return cache


def device_allocator(device: torch.device) -> Allocate:
    """Tables as plain tensors on `device`."""
    return lambda name, shape, dtype: torch.empty(shape, dtype=dtype, device=device)


class HostFiles:
    """Host tables in files under a shared-memory folder, mapped (MAP_SHARED) by each process that opens them: one
    copy in host memory for all the local ranks of a host instead of one per rank (model.frozen_cache_share). The
    builder makes them (`allocate`, then `write_meta`), the others open them (`mapped`), and once every process
    holds its mapping the names are removed (`unlink`): the memory stays until the last mapping goes, and a crash
    after that leaves nothing behind."""

    def __init__(self, prefix: str) -> None:
        self.prefix = prefix
        self.meta: dict[str, tuple[list[int], str]] = {}

    def path(self, name: str) -> Path:
        return Path(f"{self.prefix}-{name}.bin")

    @property
    def meta_path(self) -> Path:
        return Path(f"{self.prefix}-meta.json")

    def allocate(self, name: str, shape: tuple[int, ...], dtype: torch.dtype) -> Tensor:
        path, numel = self.path(name), math.prod(shape)
        need, free = numel * dtype.itemsize, shutil.disk_usage(path.parent).free
        if need > free:
            raise ValueError(
                f"frozen-feature cache: the {name} table needs {need / 2**30:.2f} GiB in {path.parent}, which has "
                f"{free / 2**30:.2f} GiB free; make it larger (e.g. docker --shm-size) or set "
                "model.frozen_cache_share = false (a copy per rank)"
            )
        self.meta[name] = (list(shape), str(dtype).removeprefix("torch."))
        return torch.from_file(str(path), shared=True, size=numel, dtype=dtype).view(shape)

    def write_meta(self) -> None:
        self.meta_path.write_text(json.dumps(self.meta))

    def mapped(self) -> dict[str, Tensor]:
        """Every table the builder wrote, by name, mapped into this process."""
        meta = json.loads(self.meta_path.read_text())
        return {
            name: torch.from_file(
                str(self.path(name)), shared=True, size=math.prod(shape), dtype=getattr(torch, dtype)
            ).view(shape)
            for name, (shape, dtype) in meta.items()
        }

    def unlink(self) -> None:
        for path in [*(self.path(name) for name in self.meta), self.meta_path]:
            path.unlink(missing_ok=True)


def taken(table: Tensor | None, rows: Tensor, pin: bool) -> Tensor | None:
    """`table`'s `rows`, gathered straight into a tensor of their own (pinned with `pin`: no staging copy)."""
    if table is None:
        return None
    out = torch.empty(rows.numel(), *table.shape[1:], dtype=table.dtype, pin_memory=pin)
    return torch.index_select(table, 0, rows, out=out)
