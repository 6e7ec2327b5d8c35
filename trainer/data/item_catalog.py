"""The item catalog: items of items.parquet, tokenised (and their images decoded) once and held as tensors, so the
content encoder can run on any set of item ids without reading shards. Used by the `recompute` baseline (it
encodes every history item at every step), by the memory bank's warm-up and by `lemur export` (both streamed in
chunks).

Memory: per item the token ids of every text field (int32) and its images (uint8); fine for catalogs of up to a few
million text-only items. Larger catalogs are what the memory bank is for.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pyarrow as pa
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

    @staticmethod
    def concat(parts: list[ItemCatalog], pad_token_id: int) -> ItemCatalog:
        if not parts:
            raise ValueError("no catalog parts to join")
        return ItemCatalog(
            torch.cat([p.item_ids for p in parts]),
            {f: torch.cat([p.tokens[f] for p in parts]) for f in parts[0].tokens},
            torch.cat([p.images for p in parts]),
            torch.cat([p.image_mask for p in parts]),
            pad_token_id,
        )

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


class ItemsParquet:
    """items.parquet as content-encoder inputs: tokenised with the reader's own collator (tokenizer and budgets), so
    an item encodes exactly as the same item does as a batch's target. The one place that turns catalog rows into
    encoder inputs: the recompute baseline, the bank's warm-up and `lemur export` all read it.

    Rows are shared out by global row index: row i goes to rank i % world_size."""

    def __init__(self, path: str | Path, collator: Collator) -> None:
        self.path = Path(path)
        self.collator = collator
        spec = collator.spec
        self.columns = ["item_id", *spec.text_fields] + (["images"] if spec.images_per_sample else [])

    def __len__(self) -> int:
        """Items in the file (its footer's row count: nothing is read)."""
        return pq.ParquetFile(self.path).metadata.num_rows

    def chunks(self, rank: int = 0, world_size: int = 1, rows: int = CHUNK) -> Iterator[ItemCatalog]:
        """This rank's rows, about `rows` at a time (constant memory). Every rank gets the same number of chunks
        (some may be empty), so a collective per chunk lines up across ranks."""
        file = pq.ParquetFile(self.path)
        missing = [c for c in self.columns if c not in file.schema_arrow.names]
        if missing:
            raise ValueError(f"{self.path}: missing column(s) {missing}")
        start = 0
        batches = file.iter_batches(batch_size=rows * world_size, columns=self.columns)
        if file.metadata.num_rows == 0:
            batches = iter(
                [
                    pa.RecordBatch.from_pylist(
                        [], schema=pa.schema([file.schema_arrow.field(c) for c in self.columns])
                    )
                ]
            )  # type: ignore[assignment]
        for record_batch in batches:
            first = (rank - start) % world_size  # this rank's first row inside the record batch
            start += record_batch.num_rows
            mine = np.arange(first, record_batch.num_rows, world_size)
            yield self.encoder_inputs(record_batch.take(pa.array(mine, pa.int64())))

    def load(self, rank: int = 0, world_size: int = 1) -> ItemCatalog:
        """This rank's rows at once (all of items.parquet with the defaults)."""
        return ItemCatalog.concat(list(self.chunks(rank, world_size)), self.collator.tokenizer.pad_token_id)

    def encoder_inputs(self, table: pa.RecordBatch) -> ItemCatalog:
        spec, path = self.collator.spec, self.path
        ids = np.asarray(table.column("item_id").to_numpy(zero_copy_only=False), dtype=np.int64)
        columns = {f: table.column(f) for f in spec.text_fields}
        arrays = self.collator.item_token_arrays(ids, lambda f, i: columns[f][i].as_py() or "")
        tokens = {f: torch.from_numpy(token_ids).to(torch.int32) for f, (token_ids, _) in arrays.items()}
        n, size = spec.images_per_sample, spec.image_size
        images = torch.zeros(len(ids), n, 3, size, size, dtype=torch.uint8)
        mask = torch.zeros(len(ids), n, dtype=torch.bool)
        if n:
            for i, blobs in enumerate(table.column("images").to_pylist()):
                for j, data in enumerate((blobs or [])[:n]):
                    try:
                        pixels = decode_image(data, size)
                    except Exception as err:  # noqa: BLE001 - re-raised with the record named
                        raise ValueError(
                            f"{path}: item_id {int(ids[i])}: field 'images'[{j}]: {err}"
                        ) from err
                    images[i, j] = torch.from_numpy(pixels.copy()).permute(2, 0, 1)
                    mask[i, j] = True
        pad = self.collator.tokenizer.pad_token_id
        return ItemCatalog(torch.from_numpy(ids.astype(np.int64)), tokens, images, mask, pad)


def load_catalog(
    items_path: str | Path, collator: Collator, rank: int = 0, world_size: int = 1
) -> ItemCatalog:
    """Rows `rank::world_size` of items.parquet (all of it with the defaults), as one catalog."""
    return ItemsParquet(items_path, collator).load(rank, world_size)
