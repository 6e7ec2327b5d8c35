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
    def from_json(cls, raw: Any, source: str = "dataset.json") -> DatasetSpec:
        """The spec from its JSON, every field's type and range checked (it drives how much every reader reads):
        a ValueError naming `source` and the field."""
        if not isinstance(raw, dict):
            raise ValueError(f"{source}: expected a JSON object, got {type(raw).__name__}")
        if raw.get("format") != FORMAT:
            raise ValueError(f"{source}: not a {FORMAT} spec (format={raw.get('format')!r})")
        if raw.get("version") != VERSION:
            raise ValueError(
                f"{source}: spec version {raw.get('version')} is not supported (this build reads {VERSION})"
            )
        body = {k: v for k, v in raw.items() if k not in ("format", "version")}
        unknown = sorted(set(body) - set(cls.__dataclass_fields__))
        if unknown:
            raise ValueError(f"{source}: unknown fields {unknown}")
        for name, value in body.items():
            FIELD_CHECKS[name](value, Where(source, name))
        body["shards"] = {
            split: [ShardInfo(s["name"], s["samples"]) for s in items]
            for split, items in body.get("shards", {}).items()
        }
        try:
            return cls(**body)
        except TypeError as err:
            raise ValueError(f"{source}: {err}") from err


@dataclass(frozen=True)
class Where:
    """A field of a spec file, for messages: `dataset.json: field 'shards.train[3].samples': ...`."""

    source: str
    field: str

    def __truediv__(self, part: str | int) -> Where:
        return Where(
            self.source, f"{self.field}[{part}]" if isinstance(part, int) else f"{self.field}.{part}"
        )

    def fail(self, expected: str, value: Any) -> ValueError:
        return ValueError(f"{self.source}: field {self.field!r}: expected {expected}, got {value!r}"[:400])


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _count(value: Any, at: Where) -> None:
    if not _is_int(value) or value < 0:
        raise at.fail("a non-negative integer", value)


def _string(value: Any, at: Where) -> None:
    if not isinstance(value, str):
        raise at.fail("a string", value)


def _strings(value: Any, at: Where) -> None:
    if not isinstance(value, list):
        raise at.fail("a list of strings", value)
    for i, v in enumerate(value):
        _string(v, at / i)
    if len(set(value)) != len(value):
        raise at.fail("distinct names", value)


def _mapping(check: Any) -> Any:
    def mapping(value: Any, at: Where) -> None:
        if not isinstance(value, dict):
            raise at.fail("an object", value)
        for k, v in value.items():
            check(v, at / k)

    return mapping


def _number(value: Any, at: Where) -> None:
    if not isinstance(value, (int, float)) or isinstance(value, bool):
        raise at.fail("a number", value)


def _bool(value: Any, at: Where) -> None:
    if not isinstance(value, bool):
        raise at.fail("true or false", value)


def _sparse_feature(value: Any, at: Where) -> None:
    if not isinstance(value, dict):
        raise at.fail('an object {"multi": bool, "cardinality": int}', value)
    if "multi" in value:
        _bool(value["multi"], at / "multi")
    if value.get("cardinality") is not None:
        _count(value["cardinality"], at / "cardinality")


def _labels(value: Any, at: Where) -> None:
    _strings(value, at)
    if not value:
        raise at.fail("at least one label", value)


def _scenario(value: Any, at: Where) -> None:
    if value not in ("search", "feed"):
        raise at.fail("'search' or 'feed'", value)


def _shard_lists(value: Any, at: Where) -> None:
    """{split: [{"name": file name, "samples": count}, ...]}: names are plain file names in the dataset directory,
    each listed once per split."""
    if not isinstance(value, dict):
        raise at.fail("an object {split: [shard, ...]}", value)
    for split, shards in value.items():
        if not isinstance(shards, list):
            raise (at / split).fail("a list of shards", shards)
        names: set[str] = set()
        for i, shard in enumerate(shards):
            where = at / split / i
            if not isinstance(shard, dict) or set(shard) != {"name", "samples"}:
                raise where.fail('{"name": str, "samples": int}', shard)
            name = shard["name"]
            if not isinstance(name, str) or name in ("", ".", "..") or "/" in name or "\\" in name:
                raise (where / "name").fail("a file name in the dataset directory", name)
            if name in names:
                raise (where / "name").fail("a shard listed once", name)
            names.add(name)
            _count(shard["samples"], where / "samples")


FIELD_CHECKS: dict[str, Any] = {
    "scenario": _scenario,
    "sparse": _mapping(_sparse_feature),
    "dense": _strings,
    "history": _mapping(_count),
    "text": _strings,
    "query_text": _bool,
    "images": _count,
    "labels": _labels,
    "cardinalities": _mapping(_count),
    "counts": _mapping(_count),
    "label_rate": _mapping(_number),
    "shards": _shard_lists,
    "split": _mapping(lambda value, at: None),
    "created_by": _string,
}


def spec_path(dataset_dir: str | os.PathLike) -> Path:
    return Path(dataset_dir) / "dataset.json"


def read_spec(dataset_dir: str | os.PathLike) -> DatasetSpec:
    path = spec_path(dataset_dir)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no dataset spec; is {dataset_dir} a lemur dataset directory?")
    try:
        raw = json.loads(path.read_bytes())
    except (UnicodeDecodeError, ValueError, RecursionError) as err:
        raise ValueError(f"{path}: not valid JSON ({err})") from None
    return DatasetSpec.from_json(raw, source=str(path))


def write_spec(dataset_dir: str | os.PathLike, spec: DatasetSpec) -> Path:
    path = spec_path(dataset_dir)
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(spec.to_json(), indent=1) + "\n")
    tmp.replace(path)
    return path
