"""Items tokenised once: every item's text fields as token rows, joined to samples by item id at read time.

A dataset has far fewer items than samples (the lemur preset: 20M samples over 1M items), yet the reader used to
tokenise the target item's text in every sample that showed it. The table holds, per text field, each item's token
ids at the field's budget and its length, for the ids of items.parquet. It is built on first use from
items.parquet and cached beside it (`.cache/item-tokens-<key>/`, one .npy per array, memory-mapped by every reader
process, so the workers share one copy in the page cache). The key covers the tokenizer (its full serialisation),
the fields and budgets, and the items file's size and modification time: any change builds a new table.
Written to a temporary directory and renamed, so readers racing to build it never see half a table.

Raw text stays in items.parquet (inspect, export and the bank warm-up read it); a sample whose item is not in the
table is tokenised from its own text.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow.parquet as pq

log = logging.getLogger(__name__)
CACHE_DIR = ".cache"
BUILD_ROWS = 8192


class ItemTokens:
    """Sorted item ids, and per text field the token ids [N, budget] and lengths [N] of each item."""

    def __init__(
        self, item_ids: np.ndarray, tokens: dict[str, np.ndarray], lengths: dict[str, np.ndarray]
    ) -> None:
        self.item_ids = item_ids
        self.tokens = tokens
        self.lengths = lengths

    def __len__(self) -> int:
        return len(self.item_ids)

    def rows_of(self, item_ids: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """The table row of each id, and whether it is in the table (rows of missing ids are 0)."""
        if len(self) == 0:
            return np.zeros(len(item_ids), dtype=np.int64), np.zeros(len(item_ids), dtype=bool)
        slot = np.minimum(np.searchsorted(self.item_ids, item_ids), len(self) - 1)
        found = self.item_ids[slot] == item_ids
        return np.where(found, slot, 0), found


def cache_key(tokenizer: Any, budgets: dict[str, int], items_path: Path) -> str:
    stat = items_path.stat()
    described = {
        "tokenizer": tokenizer.backend_tokenizer.to_str(),
        "budgets": budgets,
        "items": [str(items_path.resolve()), stat.st_size, stat.st_mtime_ns],
    }
    return hashlib.sha256(json.dumps(described, sort_keys=True).encode()).hexdigest()[:16]


def load_item_tokens(
    items_path: str | os.PathLike, tokenizer: Any, budgets: dict[str, int]
) -> ItemTokens | None:
    """The table for items.parquet, built and cached on first use; None when there is no items.parquet, it lacks
    one of the fields, or the cache cannot be written (the reader then tokenises every sample, as before)."""
    path = Path(items_path)
    if not path.is_file():
        return None
    columns = pq.ParquetFile(path).schema_arrow.names
    if "item_id" not in columns or any(f not in columns for f in budgets):
        return None
    directory = path.parent / CACHE_DIR / f"item-tokens-{cache_key(tokenizer, budgets, path)}"
    if not (directory / "item_ids.npy").is_file():
        try:
            build(path, tokenizer, budgets, directory)
        except OSError as err:
            log.warning("%s: item token table not cached (%s); tokenising every sample instead", path, err)
            return None
    tokens = {f: np.load(directory / f"tokens-{i}.npy", mmap_mode="r") for i, f in enumerate(budgets)}
    lengths = {f: np.load(directory / f"lengths-{i}.npy", mmap_mode="r") for i, f in enumerate(budgets)}
    return ItemTokens(np.load(directory / "item_ids.npy", mmap_mode="r"), tokens, lengths)


def build(items_path: Path, tokenizer: Any, budgets: dict[str, int], directory: Path) -> None:
    """Tokenise every item of items.parquet (as the reader tokenises a sample's text) into `directory`."""
    file = pq.ParquetFile(items_path)
    ids: list[np.ndarray] = []
    tokens: dict[str, list[np.ndarray]] = {f: [] for f in budgets}
    lengths: dict[str, list[np.ndarray]] = {f: [] for f in budgets}
    dtype = np.uint16 if len(tokenizer) <= np.iinfo(np.uint16).max + 1 else np.int32
    for batch in file.iter_batches(batch_size=BUILD_ROWS, columns=["item_id", *budgets]):
        ids.append(np.asarray(batch.column("item_id").to_numpy(zero_copy_only=False), dtype=np.int64))
        for f, budget in budgets.items():
            texts = [t or "" for t in batch.column(f).to_pylist()]
            enc = tokenizer(texts, max_length=budget, truncation=True, padding="max_length")
            tokens[f].append(np.asarray(enc["input_ids"], dtype=dtype).reshape(len(texts), budget))
            lengths[f].append(np.asarray(enc["attention_mask"], dtype=np.int64).sum(1).astype(np.int16))
    item_ids = np.concatenate(ids) if ids else np.zeros(0, dtype=np.int64)
    order = np.argsort(item_ids, kind="stable")
    if len(item_ids) > 1 and bool((np.diff(item_ids[order]) == 0).any()):
        raise ValueError(f"{items_path}: item_id is not unique")
    tmp = directory.with_name(f".{directory.name}.{os.getpid()}.partial")  # readers may race: each its own
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    np.save(tmp / "item_ids.npy", item_ids[order])
    for i, f in enumerate(budgets):
        empty_tokens = np.zeros((0, budgets[f]), dtype=dtype)
        np.save(tmp / f"tokens-{i}.npy", (np.concatenate(tokens[f]) if ids else empty_tokens)[order])
        np.save(
            tmp / f"lengths-{i}.npy", (np.concatenate(lengths[f]) if ids else np.zeros(0, np.int16))[order]
        )
    try:
        tmp.replace(directory)
    except OSError:  # another reader put an identical table in place first
        shutil.rmtree(tmp, ignore_errors=True)
    log.info("%s: %d items tokenised once -> %s", items_path, len(item_ids), directory)
