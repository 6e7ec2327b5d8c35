"""The binary sample record, `KEY.rec` in a shard (format `lemur-rec`, version 1).

The JSON record (`spec.py`) costs a reader most of its time: parsing 17 KiB of JSON a sample (mostly history ids)
and checking every id in Python. The binary record holds the same sample as a few little-endian arrays that numpy
views without copying; its checks are whole-array operations. Nothing in it is ever unpickled. The field order is
the dataset spec's (`RecordLayout`), and every record carries the CRC-32 of that layout, so a record read against
another dataset's spec is refused instead of misread.

Layout (offsets from the record's start; every 8-byte array starts at a multiple of 8):

    0   b"LREC"                 magic
    4   uint16 version          1
    6   uint16 reserved         0
    8   uint32 layout crc32     of RecordLayout.names()
    12  uint32 k                number of counts = sparse + histories + text fields + 1 (the query)
    16  int32[k] counts         ids per sparse feature, ids per history, UTF-8 bytes per text field, query bytes;
                                padded with one zero int32 when k is odd
        int64[7] scalars        user_id, item_id, timestamp, query_id, session_id, request_id, cold (0|1)
        float64[D] dense        in the spec's order
        int64[N] ids            the sparse features', then the histories' (most recent last), in the spec's order
        uint8[L] labels         0|1, in the spec's order
        bytes                   the text fields, then the query, UTF-8, back to back

The record ends there: a record whose length is not what its counts say is malformed.
"""

from __future__ import annotations

import functools
import math
import struct
import zlib
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np

from trainer.data.spec import DatasetSpec

MAGIC = b"LREC"
VERSION = 1
EXT = "rec"
"""The tar member extension of a binary record."""
SCALARS = ("user_id", "item_id", "timestamp", "query_id", "session_id", "request_id", "cold")
HEADER = 16
FLOAT32_MAX = float(np.finfo(np.float32).max)


@dataclass(frozen=True)
class RecordLayout:
    """The field order of a dataset's records (from its spec)."""

    sparse: tuple[str, ...]
    dense: tuple[str, ...]
    history: tuple[str, ...]
    text: tuple[str, ...]
    labels: tuple[str, ...]

    @classmethod
    def of(cls, spec: DatasetSpec) -> RecordLayout:
        """Built once per distinct field order (the reader asks for every sample)."""
        return _layout(
            tuple(spec.sparse), tuple(spec.dense), tuple(spec.history), tuple(spec.text), tuple(spec.labels)
        )

    def names(self) -> bytes:
        parts = [self.sparse, self.dense, self.history, self.text, self.labels]
        return "|".join(",".join(p) for p in parts).encode()

    @functools.cached_property
    def crc(self) -> int:
        return zlib.crc32(self.names())

    @property
    def counts(self) -> int:
        return len(self.sparse) + len(self.history) + len(self.text) + 1

    @functools.cached_property
    def text_names(self) -> tuple[str, ...]:
        """The text fields' names in BadSample messages, then the query's."""
        return (*(f"text.{t}" for t in self.text), "query")


@functools.lru_cache(maxsize=16)
def _layout(*fields: tuple[str, ...]) -> RecordLayout:
    return RecordLayout(*fields)


def encode(record: dict[str, Any], layout: RecordLayout) -> bytes:
    """A JSON-shaped record (`spec.py`) as binary. Missing optional fields become empty/zero, as the reader reads
    them from JSON; ids must fit int64, dense values be finite."""
    sparse = record.get("sparse") or {}
    history = record.get("history") or {}
    text = record.get("text") or {}
    ids = [_id_list(sparse.get(name, [])) for name in layout.sparse]
    ids += [_id_list(history.get(name, [])) for name in layout.history]
    texts = [str(text.get(name, "")).encode() for name in layout.text] + [
        (record.get("query") or "").encode()
    ]
    counts = [len(x) for x in ids] + [len(t) for t in texts]
    dense = record.get("dense") or {}
    values = [float(dense.get(name, 0.0)) for name in layout.dense]
    if not all(math.isfinite(v) for v in values):
        raise ValueError(f"dense values must be finite: {values}")
    labels = record["labels"]
    scalars = [int(record[n]) for n in SCALARS[:3]] + [int(record.get(n) or 0) for n in SCALARS[3:6]]
    scalars.append(int(bool(record.get("cold", 0))))
    counts_array = np.array(counts + [0] * (len(counts) % 2), dtype="<i4")
    parts = [
        MAGIC,
        np.array([VERSION, 0], dtype="<u2").tobytes(),
        np.array([layout.crc, len(counts)], dtype="<u4").tobytes(),
        counts_array.tobytes(),
        np.array(scalars, dtype="<i8").tobytes(),
        np.array(values, dtype="<f8").tobytes(),
        np.concatenate([np.asarray(x, dtype="<i8") for x in ids]).tobytes() if ids else b"",
        np.array([int(labels[n]) for n in layout.labels], dtype="u1").tobytes(),
        *texts,
    ]
    return b"".join(parts)


def _id_list(values: Any) -> list[int]:
    return [int(v) for v in (values if isinstance(values, list) else [values])]


Bad = Callable[..., Exception]
"""`bad(field, reason, detail)`: the reader's BadSample for this record."""


def decode(
    data: bytes, layout: RecordLayout, history_limits: dict[str, int], max_text_chars: int, bad: Bad
) -> dict[str, Any]:
    """The sample a JSON record would give (`parse_sample`), with ids as int64 arrays viewing `data`. The small
    fields are read with one `struct` call; the ids with one numpy view."""
    if len(data) < HEADER:
        raise bad(EXT, "malformed_record", f"cut short: {len(data)} bytes")
    magic, version, _, crc, k = _HEAD.unpack_from(data)
    if magic != MAGIC:
        raise bad(EXT, "malformed_record", "not a lemur-rec record (bad magic)")
    if version != VERSION:
        raise bad(EXT, "malformed_record", f"record version {version}; this build reads {VERSION}")
    if crc != layout.crc:
        raise bad(EXT, "malformed_record", "written for another field layout than this dataset's spec")
    if k != layout.counts:
        raise bad(EXT, "malformed_record", f"{k} counts, the spec has {layout.counts}")
    fixed = _fixed(k, len(layout.dense))
    if len(data) < HEADER + fixed.size:
        raise bad(EXT, "malformed_record", f"cut short: {len(data)} bytes")
    values = fixed.unpack_from(data, HEADER)
    counts, scalars, dense = values[:k], values[k : k + len(SCALARS)], values[k + len(SCALARS) :]
    if min(counts) < 0:
        raise bad(EXT, "malformed_record", "negative count")
    n_ids = len(layout.sparse) + len(layout.history)
    id_total = sum(counts[:n_ids])
    at = HEADER + fixed.size
    size = at + 8 * id_total + len(layout.labels) + sum(counts[n_ids:])
    if len(data) != size:
        raise bad(EXT, "malformed_record", f"{len(data)} bytes, its counts say {size}")

    out: dict[str, Any] = dict(zip(SCALARS, scalars))
    if scalars[-1] not in (0, 1):
        raise bad("cold", "bad_type", f"expected 0 or 1, got {scalars[-1]}")
    out["cold"] = bool(scalars[-1])
    for name, value in zip(layout.dense, dense):
        if not math.isfinite(value) or abs(value) > FLOAT32_MAX:  # the batch holds float32
            raise bad(f"dense.{name}", "nan_dense", f"{value!r} (not finite as float32)")
    out["dense"] = list(dense)
    ids = np.frombuffer(data, "<i8", id_total, at)
    at += 8 * id_total
    views, start = [], 0
    for n in counts[:n_ids]:
        views.append(ids[start : start + n])
        start += n
    out["sparse"] = dict(zip(layout.sparse, views[: len(layout.sparse)]))
    out["history"] = history = dict(zip(layout.history, views[len(layout.sparse) :]))
    for name, values_ in history.items():
        if len(values_) > history_limits[name]:
            raise bad(f"history.{name}", "history_too_long", f"{len(values_)} > {history_limits[name]}")
    labels = data[at : at + len(layout.labels)]
    for name, value in zip(layout.labels, labels):
        if value > 1:
            raise bad(f"labels.{name}", "bad_label", repr(value))
    out["labels"] = [float(v) for v in labels]
    at += len(layout.labels)
    texts = []
    for name, n in zip(layout.text_names, counts[n_ids:]):
        try:
            value = data[at : at + n].decode()
        except UnicodeDecodeError as err:
            raise bad(name, "bad_type", f"not UTF-8: {err}") from err
        if len(value) > max_text_chars:
            raise bad(name, "text_too_long", f"{len(value)} > {max_text_chars} chars")
        texts.append(value)
        at += n
    out["text"] = dict(zip(layout.text, texts))
    out["query"] = texts[-1]
    return out


_HEAD = struct.Struct("<4sHHII")


@functools.lru_cache(maxsize=16)
def _fixed(k: int, dense: int) -> struct.Struct:
    """counts (padded to 8 bytes), the scalars and the dense values: one unpack."""
    return struct.Struct(f"<{k}i{4 * (k % 2)}x{len(SCALARS)}q{dense}d")


def as_json_record(sample: dict[str, Any], layout: RecordLayout) -> dict[str, Any]:
    """A decoded binary sample in the JSON record's shape (`spec.py`), for tools that read records (`inspect`)."""
    out: dict[str, Any] = {name: sample[name] for name in SCALARS[:6]}
    out["cold"] = int(sample["cold"])
    out["labels"] = {name: int(v) for name, v in zip(layout.labels, sample["labels"])}
    out["sparse"] = {name: values.tolist() for name, values in sample["sparse"].items()}
    out["dense"] = {name: float(v) for name, v in zip(layout.dense, sample["dense"])}
    out["history"] = {name: values.tolist() for name, values in sample["history"].items()}
    out["text"] = dict(sample["text"])
    out["query"] = sample["query"]
    return out
