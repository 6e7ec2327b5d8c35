"""`lemur export`: the item lookup table a serving system loads: item_id -> content vector, as parquet.

Every rank encodes a slice of items.parquet (rows rank::world) with the trained content encoder and writes a part;
rank 0 merges the parts into one file, written under a temporary name and renamed when complete.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch
import torch.distributed as dist

from trainer.data.decode import decode_image

if TYPE_CHECKING:
    from trainer.loop import Trainer

EXPORT_BATCH = 256


def item_batches(items_path: Path, rank: int, world_size: int) -> Iterator[list[dict]]:
    """This rank's rows of items.parquet (global row i goes to rank i % world_size), streamed in batches."""
    start = 0
    for record_batch in pq.ParquetFile(items_path).iter_batches(batch_size=EXPORT_BATCH * world_size):
        rows = record_batch.to_pylist()
        mine = rows[(rank - start) % world_size :: world_size]
        start += len(rows)
        if mine:
            yield mine


@torch.no_grad()
def encode_items(trainer: Trainer, rows: list[dict]) -> np.ndarray:
    collator = trainer.train_stream.dataset.collator
    spec = collator.spec
    text = {
        f: collator.tokens([r.get(f) or "" for r in rows], budget) for f, budget in spec.text_fields.items()
    }
    n, size = spec.images_per_sample, spec.image_size
    images = torch.zeros(len(rows), n, 3, size, size, dtype=torch.uint8)
    mask = torch.zeros(len(rows), n, dtype=torch.bool)
    for i, row in enumerate(rows):
        for j, data in enumerate((row.get("images") or [])[:n]):
            images[i, j] = torch.from_numpy(decode_image(data, size).copy()).permute(2, 0, 1)
            mask[i, j] = True
    device = trainer.info.device
    text = {f: type(t)(t.input_ids.to(device), t.attention_mask.to(device)) for f, t in text.items()}
    vectors = trainer.model.dense.content(text, images.to(device), mask.to(device))
    return vectors.float().cpu().numpy()


def export_items(trainer: Trainer, out: Path) -> Path | None:
    """Returns the written path on rank 0 (None elsewhere)."""
    if trainer.model.dense.content is None:
        raise ValueError("model.use_content is false: an ID-only model has no content vectors to export")
    rank, world = dist.get_rank(), dist.get_world_size()
    out = Path(out)
    parts_dir = out.with_name(f".{out.name}.parts")
    if rank == 0:
        parts_dir.mkdir(parents=True, exist_ok=True)
    dist.barrier()
    trainer.engine.eval()
    ids, vectors = [], []
    for rows in item_batches(Path(trainer.cfg.data.path) / "items.parquet", rank, world):
        ids += [r["item_id"] for r in rows]
        vectors.append(encode_items(trainer, rows))
    dim = trainer.cfg.model.content_dim
    matrix = np.concatenate(vectors) if vectors else np.zeros((0, dim), dtype=np.float32)
    part = pa.table(
        {
            "item_id": pa.array(ids, pa.int64()),
            "vector": pa.FixedSizeListArray.from_arrays(pa.array(matrix.reshape(-1), pa.float32()), dim),
        }
    )
    pq.write_table(part, parts_dir / f"part-{rank:05d}.parquet")
    dist.barrier()
    if rank != 0:
        return None
    merged = pa.concat_tables([pq.read_table(p) for p in sorted(parts_dir.glob("part-*.parquet"))])
    tmp = out.with_name(f".{out.name}.tmp")
    pq.write_table(merged.sort_by("item_id"), tmp)
    tmp.replace(out)
    for p in parts_dir.iterdir():
        p.unlink()
    parts_dir.rmdir()
    return out
