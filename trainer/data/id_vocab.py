"""The item-id vocabulary (embeddings.id_map = "vocab"): a row of its own for every item id of the train split, one
reserved row for every other id.

Hashing (`embeddings/tables.py: hash_ids`) places an id by its value alone: on the churn world 27% of the cold eval
rows (items in no training sample) land on a row that a training item trained, so the ID-frequency gate, which
counts per row (`DenseArch.id_gate`), reads them as known and the ranker takes another item's embedding for theirs.
The vocabulary maps the k-th smallest train item id to row k + 1 and every id absent from training to row 0
(`RESERVED_ROW`), which no training sample reaches: its count stays 0, so eval and serving read such an item as
new. The item table keeps the rows `plan_tables` gives it (twice the dataset's item cardinality, or
embeddings.hash_sizes.item_id); a vocabulary that does not fit them stops the run with the counts rather than
hashing the overflow, which would bring the collisions back unseen.

The vocabulary is the sorted distinct item ids of the train shards, targets and history items alike (the `cold`
flag's definition: in no training sample). It is built once per dataset by streaming the shards (memory: the
vocabulary plus one buffer of ids, whatever the sample count) and cached beside the dataset as
`.cache/item-vocab-<key>.npy`; the key covers the train shards' paths, sizes and modification times and the item
features, so a changed dataset builds a new one. It is written to a temporary file and renamed, so processes racing
to build it never read half a file, and loaded memory-mapped, so a reader's workers share one copy.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor

from embeddings.tables import with_values
from trainer.config.schema import Config, ConfigError
from trainer.data.decode import BadSample, Limits, SkipCounter, parse_sample, tar_samples
from trainer.data.shard_lists import ShardRef, expand_shards
from trainer.data.spec import DatasetSpec

log = logging.getLogger(__name__)
CACHE_DIR = ".cache"
FORMAT = 1
"""Bumped when what the vocabulary holds changes: old cache files are then never read."""
RESERVED_ROW = 0
"""The row of every id absent from the vocabulary."""
FLUSH_IDS = 1 << 20
"""Ids buffered (8 MiB) before they are merged into the distinct ids so far."""
FLUSH_SAMPLES = 1 << 16
"""Samples buffered at most (an array each: short histories would otherwise buffer millions of small arrays)."""


@dataclass(frozen=True)
class IdVocab:
    """Sorted distinct item ids; the k-th maps to row k + 1 of a table of `rows` rows, any other id to RESERVED_ROW."""

    ids: np.ndarray
    rows: int
    features: tuple[str, ...]
    """The features that read the item table (the target item, then the histories)."""

    def __post_init__(self) -> None:
        if len(self.ids) + 1 > self.rows:
            raise ConfigError(
                f'embeddings.id_map: "vocab" needs a row per train item id plus one reserved row, and the train '
                f"split holds {len(self.ids)} distinct item ids (feature {self.features[0]!r} and the histories "
                f"{list(self.features[1:])}, which share its table) for {self.rows} rows: set "
                f'embeddings.hash_sizes.{self.features[0]} to at least {len(self.ids) + 1}, or use id_map = "hash"'
            )

    def rows_of(self, values: np.ndarray) -> np.ndarray:
        """Each id's row: a binary search over the sorted ids per distinct id, in increasing order. A batch repeats
        its history items many times, and numpy's search of sorted keys starts from the last hit, so it stays in
        cache: with a million-id vocabulary a 128-sample batch with 1,000-item histories (134k ids) maps in 28 ms
        on the 2-core CPU, against 150 ms searching the values as they come and 60 ms hashing them."""
        values = np.asarray(values, dtype=np.int64)
        if len(self.ids) == 0:
            return np.full(values.shape, RESERVED_ROW, dtype=np.int64)
        distinct, inverse = np.unique(values.ravel(), return_inverse=True)
        slot = np.minimum(np.searchsorted(self.ids, distinct), len(self.ids) - 1)
        rows = np.where(self.ids[slot] == distinct, slot + 1, RESERVED_ROW)
        return rows[inverse].reshape(values.shape)

    def map_kjt(self, kjt: KeyedJaggedTensor) -> KeyedJaggedTensor:
        """The item-id sequences (every key one of `features`) with their ids replaced by rows."""
        unknown = [k for k in kjt.keys() if k not in self.features]  # noqa: SIM118 (a KJT)
        if unknown:
            raise ValueError(f"{unknown} do not read the item table {list(self.features)}")
        return with_values(kjt, torch.from_numpy(self.rows_of(kjt.values().numpy())))


def id_vocab_for(cfg: Config, spec: DatasetSpec, table_rows: dict[str, int] | None) -> IdVocab | None:
    """The vocabulary the reader maps the item features through, for these table rows (the trainer's plan); None
    when ids are hashed (id_map = "hash", or a reader that keeps raw ids)."""
    if cfg.embeddings.id_map != "vocab" or table_rows is None:
        return None
    features = tuple(spec.sequence_features)
    sizes = {table_rows[f] for f in features}
    if len(sizes) != 1:
        raise ValueError(f"the item features {list(features)} do not share one table: rows {sorted(sizes)}")
    data = cfg.data
    shards = expand_shards(data.train_shards, data.path, "train", spec, strict=data.bad_input == "error")
    ids = load_item_vocab(Path(data.path), shards, spec, data.max_text_chars)
    return IdVocab(ids, sizes.pop(), features)


def load_item_vocab(
    dataset_dir: Path, shards: list[ShardRef], spec: DatasetSpec, max_text_chars: int
) -> np.ndarray:
    """The train shards' sorted distinct item ids, from the cache or built (and cached) now. A dataset directory
    that cannot be written gets the vocabulary built for this process only (a warning says so)."""
    path = dataset_dir / CACHE_DIR / f"item-vocab-{vocab_key(shards, spec, max_text_chars)}.npy"
    if path.is_file():
        return np.load(path, mmap_mode="r", allow_pickle=False)
    ids = build_item_vocab(shards, spec, max_text_chars)
    try:
        save_atomic(path, ids)
    except OSError as err:
        log.warning("%s: item vocabulary not cached (%s); it is built again by every run", path, err)
        return ids
    return np.load(path, mmap_mode="r", allow_pickle=False)


def vocab_key(shards: list[ShardRef], spec: DatasetSpec, max_text_chars: int) -> str:
    """Changes with any train shard (path, size, modification time and listed sample count; a `pipe:` URL by its
    text), with the item features and with what makes a sample bad (data.max_text_chars): all that decides which
    ids the vocabulary holds."""
    described = {
        "format": FORMAT,
        "features": spec.sequence_features,
        "max_text_chars": max_text_chars,
        "shards": [shard_identity(s) for s in shards],
    }
    return hashlib.sha256(json.dumps(described, sort_keys=True).encode()).hexdigest()[:16]


def shard_identity(shard: ShardRef) -> list[str | int]:
    if shard.url.startswith("pipe:") or not os.path.isfile(shard.url):
        return [shard.url, shard.expected]
    stat = os.stat(shard.url)
    return [str(Path(shard.url).resolve()), stat.st_size, stat.st_mtime_ns, shard.expected]


def build_item_vocab(shards: list[ShardRef], spec: DatasetSpec, max_text_chars: int) -> np.ndarray:
    """Stream the shards once: every good sample's target and history item ids, merged into the sorted distinct ids
    whenever FLUSH_IDS are buffered. Samples the reader would skip (bad records) are skipped here too and reported."""
    started = time.time()
    skips = SkipCounter(policy="skip")
    vocab = np.zeros(0, dtype=np.int64)
    buffer: list[np.ndarray] = []
    buffered = 0
    for ids in sample_item_ids(shards, spec, max_text_chars, skips):
        buffer.append(ids)
        buffered += len(ids)
        if buffered >= FLUSH_IDS or len(buffer) >= FLUSH_SAMPLES:
            vocab, buffer, buffered = merge(vocab, buffer), [], 0
    vocab = merge(vocab, buffer)
    skipped = skips.take()
    if skipped:
        log.warning("item vocabulary: %d bad train samples skipped (%s)", sum(skipped.values()), skipped)
    log.info(
        "item vocabulary: %d distinct train item ids from %d shards in %.1fs",
        len(vocab),
        len(shards),
        time.time() - started,
    )
    return vocab


def sample_item_ids(
    shards: list[ShardRef], spec: DatasetSpec, max_text_chars: int, skips: SkipCounter
) -> Iterator[np.ndarray]:
    """Per good sample, its target item id and its histories' item ids in one array, a copy: a binary record's
    ids are views of its bytes, which would keep every buffered record whole (text too) until the next merge.
    Images are not decoded, only counted."""
    limits = Limits(max_text_chars, image_size=0, images_per_sample=0, decode_images=False)
    for shard in shards:
        for raw in tar_samples(shard.url, skips, expected=shard.expected):
            try:
                sample = parse_sample(raw, spec, limits)
            except BadSample as err:
                skips.handle(err)
                continue
            histories = [np.asarray(ids, dtype=np.int64) for ids in sample["history"].values()]
            yield np.concatenate([np.array([sample["item_id"]], dtype=np.int64), *histories])


def merge(vocab: np.ndarray, buffer: list[np.ndarray]) -> np.ndarray:
    """The sorted distinct ids of both."""
    if not buffer:
        return vocab
    return np.union1d(vocab, np.concatenate(buffer))


def save_atomic(path: Path, ids: np.ndarray) -> None:
    """Write to a file of this process's own, then rename: a reader sees the whole vocabulary or none."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.stem}.{os.getpid()}.partial.npy")
    try:
        with open(tmp, "wb") as f:
            np.save(f, np.ascontiguousarray(ids, dtype=np.int64), allow_pickle=False)
        tmp.replace(path)
    finally:
        tmp.unlink(missing_ok=True)
