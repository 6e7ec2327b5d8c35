"""Shard lists: expansion (paths, globs, brace patterns, `pipe:` URLs), per-epoch order, and the split by node then
by worker."""

from __future__ import annotations

import glob
import os
import random
from dataclasses import dataclass
from pathlib import Path

from webdataset.shardlists import expand_urls

from trainer.data.spec import DatasetSpec


@dataclass(frozen=True)
class ShardRef:
    url: str
    """A local path or a `pipe:` command."""
    samples: int
    """Samples in the shard (from dataset.json); needed to give every rank the same number of batches."""


def shard_basename(url: str) -> str:
    if url.startswith("pipe:"):
        # the last word that looks like a tar, e.g. `pipe:curl -s http://host/train-000001.tar`
        words = [w for w in url[5:].split() if ".tar" in w]
        url = words[-1] if words else url
    return os.path.basename(url.rstrip("/"))


def expand_shards(
    pattern: str, dataset_dir: str | os.PathLike, split: str, spec: DatasetSpec
) -> list[ShardRef]:
    """The shards of `split`: `pattern` if given (comma- or `::`-separated paths, globs, brace patterns or
    `pipe:` URLs), else every shard dataset.json lists for the split. Sample counts come from dataset.json, matched
    by file name."""
    counts = {s.name: s.samples for s in spec.shards.get(split, [])}
    if not pattern:
        urls = [str(Path(dataset_dir) / s.name) for s in spec.shards.get(split, [])]
    else:
        urls = []
        for part in pattern.replace(",", "::").split("::"):
            for url in expand_urls(part.strip()):
                if url.startswith("pipe:") or not glob.has_magic(url):
                    urls.append(url)
                else:
                    urls.extend(sorted(glob.glob(url)))
    if not urls:
        raise FileNotFoundError(f"no {split} shards: pattern {pattern!r} in {dataset_dir} matched nothing")
    refs = []
    for url in urls:
        name = shard_basename(url)
        if name not in counts:
            raise ValueError(
                f"{url}: shard {name!r} has no sample count in {Path(dataset_dir) / 'dataset.json'} (split {split!r}); "
                "equal batch counts per rank need every shard's count"
            )
        if not url.startswith("pipe:") and not os.path.exists(url):
            raise FileNotFoundError(f"{url}: shard not found")
        refs.append(ShardRef(url, counts[name]))
    return refs


def epoch_order(shards: list[ShardRef], seed: int, epoch: int, shuffle: bool) -> list[ShardRef]:
    """The same order on every rank for a (seed, epoch): assignment rotates from epoch to epoch."""
    order = list(shards)
    if shuffle:
        random.Random(f"{seed}/{epoch}").shuffle(order)
    return order


def assign_shards(
    shards: list[ShardRef], rank: int, world_size: int, worker: int, num_workers: int
) -> list[ShardRef]:
    """Split by node (rank), then by worker: every shard goes to exactly one (rank, worker) reader."""
    return shards[rank::world_size][worker::num_workers]


def reader_sample_counts(shards: list[ShardRef], world_size: int, num_workers: int) -> list[int]:
    """Samples each of the world_size * num_workers readers gets, in (rank, worker) order."""
    return [
        sum(s.samples for s in assign_shards(shards, r, world_size, w, num_workers))
        for r in range(world_size)
        for w in range(num_workers)
    ]
