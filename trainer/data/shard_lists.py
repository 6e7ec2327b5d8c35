"""Shard lists: expansion (paths, globs, brace patterns, `pipe:` URLs), per-epoch order, and the split by node then
by worker."""

from __future__ import annotations

import glob
import logging
import os
import random
from dataclasses import dataclass
from pathlib import Path

from webdataset.shardlists import expand_urls

from trainer.data.decode import BadSample
from trainer.data.spec import DatasetSpec

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ShardRef:
    url: str
    """A local path or a `pipe:` command."""
    samples: int
    """Samples in the shard (from dataset.json, at most what the file can hold); needed to give every rank the same
    number of batches."""
    listed: int | None = None
    """dataset.json's count where the file cannot hold that many (under `skip`): the reader counts the samples
    the shard lacks as missing_samples."""

    @property
    def expected(self) -> int:
        """The samples dataset.json says the shard holds: each is delivered or counted as lost."""
        return self.samples if self.listed is None else self.listed


def shard_basename(url: str) -> str:
    if url.startswith("pipe:"):
        # the last word that looks like a tar, e.g. `pipe:curl -s http://host/train-000001.tar`
        words = [w for w in url[5:].split() if ".tar" in w]
        url = words[-1] if words else url
    return os.path.basename(url.rstrip("/"))


def expand_shards(
    pattern: str, dataset_dir: str | os.PathLike, split: str, spec: DatasetSpec, strict: bool = True
) -> list[ShardRef]:
    """The shards of `split`: `pattern` if given (comma- or `::`-separated paths, globs, brace patterns or
    `pipe:` URLs), else every shard dataset.json lists for the split. Sample counts come from dataset.json, matched
    by file name, and checked against each local file's size (`max_samples`): the counts decide how much every
    reader reads, so a count no file could hold is not taken as it is. `strict` (bad_input = error): it is a
    BadSample (`missing_samples`) here; else the shard is planned at what it can hold and the reader counts the
    rest as missing."""
    counts = {s.name: s.samples for s in spec.shards.get(split, [])}
    source = Path(dataset_dir) / "dataset.json"
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
                f"{url}: shard {name!r} has no sample count in {source} (split {split!r}); "
                "equal batch counts per rank need every shard's count"
            )
        count, most = counts[name], None
        if not url.startswith("pipe:"):
            if not os.path.isfile(url):
                raise FileNotFoundError(f"{url}: shard not found (listed in {source}, split {split!r})")
            most = max_samples(url)
        if most is None or count <= most:
            refs.append(ShardRef(url, count))
            continue
        problem = BadSample(
            url,
            "<start>",
            "<tar>",
            "missing_samples",
            f"{source} (shards.{split}) counts {count} samples, the file ({os.path.getsize(url)} bytes) can hold "
            f"at most {most}",
        )
        if strict:
            raise problem
        log.warning("%s; planned at %d, the rest will be counted as missing", problem, most)
        refs.append(ShardRef(url, most, listed=count))
    return refs


GZIP_MAX_RATIO = 1032
"""Deflate's largest expansion: one compressed byte holds at most this many."""


def max_samples(path: str) -> int | None:
    """The most samples a local shard can hold, from its size: every sample takes at least one 512-byte header
    (gzip: of the uncompressed stream); None where that bound is not cheap (bzip2 and xz expand without a
    useful bound)."""
    size = os.path.getsize(path)
    with open(path, "rb") as f:
        magic = f.read(6)
    if magic.startswith(b"\x1f\x8b"):
        return size * GZIP_MAX_RATIO // 512
    if magic.startswith((b"BZh", b"\xfd7zXZ\x00")):
        return None
    return size // 512


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
