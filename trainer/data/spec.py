"""The on-disk format: `dataset.json` (versioned feature spec, counts, split) and the sample record.

A shard is a plain tar. Per impression KEY:
  KEY.rec     the record below in binary (format lemur-rec, version 1: `trainer/data/record.py`), or
  KEY.json    the record below as a JSON object (the first format; `lemur data convert` rewrites it as .rec)
  KEY.jpg     the target item's cover image; KEY.1.jpg, KEY.2.jpg, ... for more (JPEG or .png)

The reader takes either record, even mixed in one shard; `lemur data synth` writes .rec unless
data.synth.record_format = "json".

The record (as JSON):
  user_id, item_id, timestamp              int (int64 range)            required
  labels                                   {name: 0|1}                  required, every spec label present
  query_id, session_id, request_id         int                          optional (search scenario)
  query                                    str                          optional (raw query text)
  sparse                                   {feature: [int, ...]}        optional per feature (empty = no value)
  dense                                    {feature: float}             optional per feature (missing = 0, never NaN)
  history                                  {sequence: [item_id, ...]}   optional per sequence, most recent last
  text                                     {field: str}                 optional per field
  cold                                     0|1                          eval only: the item never appears in train
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

FORMAT = "lemur-shards"
VERSION = 1
INT64_MIN, INT64_MAX = -(2**63), 2**63 - 1
IMAGE_EXTS = ("jpg", "jpeg", "png")
ID_FIELDS = ("user_id", "item_id", "query_id", "session_id", "request_id")


@dataclass
class ShardInfo:
    name: str
    samples: int


@dataclass
class DatasetSpec:
    """Everything a reader or trainer needs to know about a dataset directory."""

    scenario: str = "search"
    """search (queries, sessions) or feed."""
    sparse: dict[str, dict[str, Any]] = field(default_factory=dict)
    """Pooled categorical features: {name: {"multi": bool, "cardinality": int}}."""
    dense: list[str] = field(default_factory=list)
    """Dense float features, in batch column order."""
    history: dict[str, int] = field(default_factory=dict)
    """Item-id sequences: {name: max_len}, e.g. {"short": 50, "long": 1000}."""
    text: list[str] = field(default_factory=list)
    """Item text fields (title, description, ocr, ...)."""
    query_text: bool = False
    """Samples carry a raw `query` string."""
    images: int = 0
    """Images per item in the shards."""
    labels: list[str] = field(default_factory=lambda: ["click"])
    """Binary labels; the first is the main task."""
    cardinalities: dict[str, int] = field(default_factory=dict)
    """Distinct values seen per id/sparse feature (informational; tables hash raw ids)."""
    counts: dict[str, int] = field(default_factory=dict)
    """train, eval, items, cold_items, ..."""
    label_rate: dict[str, float] = field(default_factory=dict)
    """Mean of the first label per split."""
    shards: dict[str, list[ShardInfo]] = field(default_factory=dict)
    """Per split, the shard files in order with their sample counts."""
    split: dict[str, Any] = field(default_factory=dict)
    """How train and eval were separated (rule, boundary timestamp, cold-item share)."""
    created_by: str = ""
    """The command that wrote the dataset and its settings."""

    @property
    def id_features(self) -> list[str]:
        ids = ["user_id", "item_id"]
        return ids + (["query_id"] if self.scenario == "search" else [])

    @property
    def pooled_features(self) -> list[str]:
        """The pooled id features (one EmbeddingBagCollection table each): every id but the item, then the sparse
        features."""
        return [k for k in self.id_features if k != "item_id"] + list(self.sparse)

    @property
    def sequence_features(self) -> list[str]:
        """The item-id sequences (one shared item table): the target item (length 1), then the histories."""
        return ["item_id", *self.history]

    def feature_cardinalities(self) -> dict[str, int]:
        """Distinct values per id feature where known (sizes the tables)."""
        sparse = {k: v["cardinality"] for k, v in self.sparse.items() if v.get("cardinality")}
        return {**sparse, **self.cardinalities}

    def to_json(self) -> dict[str, Any]:
        return {"format": FORMAT, "version": VERSION, **asdict(self)}

    @classmethod
    def from_json(cls, raw: dict[str, Any], source: str = "dataset.json") -> DatasetSpec:
        if raw.get("format") != FORMAT:
            raise ValueError(f"{source}: not a {FORMAT} spec (format={raw.get('format')!r})")
        if raw.get("version") != VERSION:
            raise ValueError(
                f"{source}: spec version {raw.get('version')} is not supported (this build reads {VERSION})"
            )
        body = {k: v for k, v in raw.items() if k not in ("format", "version")}
        body["shards"] = {
            split: [ShardInfo(**s) for s in items] for split, items in body.get("shards", {}).items()
        }
        try:
            return cls(**body)
        except TypeError as err:
            raise ValueError(f"{source}: {err}") from err


def spec_path(dataset_dir: str | os.PathLike) -> Path:
    return Path(dataset_dir) / "dataset.json"


def read_spec(dataset_dir: str | os.PathLike) -> DatasetSpec:
    path = spec_path(dataset_dir)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no dataset spec; is {dataset_dir} a lemur dataset directory?")
    return DatasetSpec.from_json(json.loads(path.read_text()), source=str(path))


def write_spec(dataset_dir: str | os.PathLike, spec: DatasetSpec) -> Path:
    path = spec_path(dataset_dir)
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(spec.to_json(), indent=1) + "\n")
    tmp.replace(path)
    return path
