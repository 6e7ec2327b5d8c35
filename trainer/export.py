"""`lemur export`: the item lookup table a serving system loads: item_id -> content vector, as parquet.

Every rank encodes its share of items.parquet (rows rank::world, streamed as the item catalog's encoder inputs)
with the trained content encoder and writes a part; rank 0 merges the parts into one file, written under a
temporary name and renamed when complete.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch
import torch.distributed as dist
from torch import nn

from trainer.data.item_catalog import ItemsParquet

EXPORT_BATCH = 256


@torch.no_grad()
def encode_share(
    encoder: nn.Module, items: ItemsParquet, device: torch.device, dim: int
) -> tuple[np.ndarray, np.ndarray]:
    """This rank's item ids and their content vectors [N, dim] (float32), the encoder in eval mode."""
    rank, world = dist.get_rank(), dist.get_world_size()
    training = encoder.training
    encoder.eval()
    ids, vectors = [], []
    for chunk in items.chunks(rank, world):
        chunk = chunk.to(device)
        for rows in torch.arange(len(chunk), device=device).split(EXPORT_BATCH):
            vectors.append(encoder(*chunk.inputs(rows)).float().cpu().numpy())
        ids.append(chunk.item_ids.cpu().numpy())
    encoder.train(training)
    return np.concatenate(ids), np.concatenate(vectors) if vectors else np.zeros((0, dim), np.float32)


def export_items(
    encoder: nn.Module, items: ItemsParquet, out: Path, device: torch.device, dim: int
) -> Path | None:
    """Writes `out` (item_id, vector of `dim` floats); returns it on rank 0 (None elsewhere). A collective."""
    rank = dist.get_rank()
    out = Path(out)
    parts_dir = out.with_name(f".{out.name}.parts")
    if rank == 0:
        parts_dir.mkdir(parents=True, exist_ok=True)
    dist.barrier()
    ids, matrix = encode_share(encoder, items, device, dim)
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
