"""`lemur data import`: Parquet logs (an interactions table and an items table) -> a lemur dataset directory.

The output is what `lemur data synth` writes: train-%06d.tar / eval-%06d.tar shards (KEY.json + KEY.jpg|png,
KEY.1.jpg, ...), items.parquet, tokenizer/ (trained from the items' text and the queries) and dataset.json.
Each input is a .parquet file or a directory of them (read recursively, in name order, in record batches).

Interactions table, one row per impression:

  column                  type                                   meaning
  user_id, item_id        int64 (any integer type)               required, never null
  timestamp               int64 epoch seconds, or a timestamp    required, never null; orders the train/eval split
  label                   0/1 int or bool                        required (or label_<name>): the task "click"
  label_<name>            0/1 int or bool                        more tasks; the first label column is the main task
  query                   string                                 optional; raw query text (makes it "search")
  query_id                int64                                  optional (makes it "search"); derived from query
  session_id, request_id  int64                                  optional; null = absent
  sparse_<name>           int64 -> single-valued,                optional categorical feature; null = no value
                          list<int64> -> multi-valued
  dense_<name>            float or int                           optional; null = missing (0); NaN/inf is an error
  history_<name>          list<int64> item ids, most recent last optional; null = empty
  anything else           ignored, with a warning

Items table, one row per item:

  item_id                 int64 (any integer type)               required, unique, never null
  text_<field>            string                                 optional item text; null = absent
  image                   binary or list<binary>                 JPEG or PNG bytes (first = cover image)
  image_path              string or list<string>                 .jpg/.jpeg/.png files, absolute or relative to
                                                                 the directory of the items file (symlinks are
                                                                 followed; the target must be a JPEG or PNG file)
  anything else           ignored, with a warning

Every interaction's item_id must be in the items table: the item's text and images are joined into its sample.
An image (an `image` value or an `image_path` file) may hold at most max_image_bytes (MAX_IMAGE_BYTES, 32 MiB):
a file's size is checked with stat before it is read, and images are read one item at a time when written.
Split by time: eval = timestamp >= eval_from, or else the last eval_share of the samples (rounded to a timestamp
boundary: samples sharing the boundary's timestamp all go to eval). Eval samples carry cold = 1 when their item
is never a train target. Bad input raises DataImportError naming the file, the column and the row (0-based,
within that file); a file that is not Parquet names the file.

Output: everything is written to a hidden sibling, `.<out>.partial`, removed on every way out (an exception,
Ctrl-C, SIGTERM) and renamed onto `out` only when complete, so a failed import leaves no partial dataset and an
existing one untouched. Replacing a dataset takes two renames (out -> `.<out>.old`, partial -> out); a process
killed outright (SIGKILL, the OOM killer) cleans nothing, so the next import into the same `out` first repairs what
it left: a `.<out>.old` with no `out` beside it (killed between the renames) is renamed back to `out`, the dataset
as it was before; a `.<out>.old` beside `out` (killed after them) is removed, and so is a `.<out>.partial`.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import stat
import threading
import time
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from trainer.data.record import FLOAT32_MAX
from trainer.data.spec import INT64_MAX, DatasetSpec, ShardInfo, write_spec
from trainer.data.tokenizer import train_tokenizer
from trainer.dataset_tools.shard_writer import ShardWriter, encode_record, shard_name
from trainer.dataset_tools.synth.content import stable_id

REQUIRED = ("user_id", "item_id", "timestamp")
OPTIONAL_IDS = ("query_id", "session_id", "request_id")
PREFIXES = ("label_", "sparse_", "dense_", "history_")
BATCH_ROWS = {"interactions": 65_536, "items": 1_024}
ITEMS_CHUNK = 1_000
"""Most items per row group of the output items.parquet."""
ITEMS_CHUNK_BYTES = 64 * 2**20
"""A row group of the output items.parquet is written once its images reach this many bytes."""
MAX_IMAGE_BYTES = 32 * 2**20
"""The default cap on one image's size (`import_parquet(max_image_bytes=...)`)."""
JPEG_MAGIC, PNG_MAGIC = b"\xff\xd8\xff", b"\x89PNG\r\n\x1a\n"
PATH_EXTS = {".jpg": "jpg", ".jpeg": "jpg", ".png": "png"}


class DataImportError(ValueError):
    """Input that does not follow the import schema; the message names the table file, column and row."""


def _where(source: Path, column: str | None = None, row: int | None = None) -> str:
    parts = [str(source)]
    if column is not None:
        parts.append(f"column {column!r}")
    if row is not None:
        parts.append(f"row {row}")
    return ", ".join(parts)


# ---------------------------------------------------------------------------------------------- input files


def parquet_files(path: str | os.PathLike, table: str) -> list[Path]:
    """A .parquet file, or every .parquet file under a directory (hidden and _-prefixed names skipped)."""
    path = Path(path)
    if path.is_file():
        return [path]
    if not path.is_dir():
        raise FileNotFoundError(f"{path}: no such {table} file or directory")
    files = sorted(
        p
        for p in path.rglob("*.parquet")
        if not any(part.startswith((".", "_")) for part in p.relative_to(path).parts)
    )
    if not files:
        raise DataImportError(f"{path}: no .parquet files in this {table} directory")
    return files


def _read_schema(path: Path) -> pa.Schema:
    try:
        return pq.read_schema(path)
    except (pa.ArrowException, OSError) as err:
        raise DataImportError(f"{path}: not a readable Parquet file ({err})") from err


def _batches(path: Path, table: str) -> Iterator[tuple[int, pa.RecordBatch]]:
    """(row offset within the file, batch). A file that cannot be read is a DataImportError naming it."""
    row0 = 0
    try:
        with pq.ParquetFile(path) as parquet:
            for batch in parquet.iter_batches(batch_size=BATCH_ROWS[table]):
                yield row0, batch
                row0 += batch.num_rows
    except (pa.ArrowException, OSError) as err:
        raise DataImportError(
            f"{_where(path, row=row0)}: cannot read this Parquet file from here ({err})"
        ) from err


def _common_layout(files: list[Path], layout_of: Callable[[pa.Schema, Path], Any]) -> Any:
    """The layout every file shares (each file's columns are classified and type-checked once)."""
    layout = layout_of(_read_schema(files[0]), files[0])
    for source in files[1:]:
        if layout_of(_read_schema(source), source) != layout:
            raise DataImportError(f"{source}: its columns differ from those of {files[0]}")
    return layout


def _warn_ignored(source: Path, columns: list[str]) -> None:
    if columns:
        warnings.warn(
            f"{source}: ignoring columns outside the import schema: {', '.join(columns)}", stacklevel=3
        )


# ----------------------------------------------------------------------------------------- type checks


def _is_int(t: pa.DataType) -> bool:
    return pa.types.is_integer(t)


def _is_list_of(t: pa.DataType, pred: Callable[[pa.DataType], bool]) -> bool:
    listy = pa.types.is_list(t) or pa.types.is_large_list(t) or pa.types.is_fixed_size_list(t)
    return listy and pred(t.value_type)


def _is_str(t: pa.DataType) -> bool:
    return pa.types.is_string(t) or pa.types.is_large_string(t)


def _is_bin(t: pa.DataType) -> bool:
    return pa.types.is_binary(t) or pa.types.is_large_binary(t)


def _expect(ok: bool, source: Path, column: str, t: pa.DataType, expected: str) -> None:
    if not ok:
        raise DataImportError(f"{_where(source, column)}: expected {expected}, got {t}")


# ----------------------------------------------------------------------------------- array validation


def _first(mask: pa.Array | pa.ChunkedArray) -> int | None:
    """Index of the first true value, or None."""
    i = pc.index(mask, True).as_py()
    return None if i < 0 else i


def _no_nulls(arr: pa.Array, source: Path, column: str, row0: int) -> None:
    row = _first(pc.is_null(arr))
    if row is not None:
        raise DataImportError(f"{_where(source, column, row0 + row)}: null in a required column")


def _first_past_int64(arr: pa.Array) -> int | None:
    """The first value past int64 (only uint64 has any; comparing with a plain INT64_MAX would cast arr to int64)."""
    if arr.type != pa.uint64():
        return None
    return _first(pc.greater(arr, pa.scalar(INT64_MAX, pa.uint64())))


def _to_int64(arr: pa.Array, source: Path, column: str, row0: int) -> pa.Array:
    row = _first_past_int64(arr)
    if row is not None:
        raise DataImportError(f"{_where(source, column, row0 + row)}: {arr[row]} is beyond the int64 range")
    return arr.cast(pa.int64())


def _to_int64_list(arr: pa.Array, source: Path, column: str, row0: int) -> pa.Array:
    flat, parents = pc.list_flatten(arr), pc.list_parent_indices(arr)
    k = _first(pc.is_null(flat))
    if k is not None:
        raise DataImportError(f"{_where(source, column, row0 + parents[k].as_py())}: null inside the list")
    k = _first_past_int64(flat)
    if k is not None:
        row = row0 + parents[k].as_py()
        raise DataImportError(f"{_where(source, column, row)}: {flat[k]} is beyond the int64 range")
    return arr.cast(pa.list_(pa.int64()))


def _to_epoch_seconds(arr: pa.Array, source: Path, column: str, row0: int) -> pa.Array:
    if pa.types.is_timestamp(arr.type):
        # Sub-second precision is dropped: the contract's timestamps are whole seconds.
        return pc.cast(arr, pa.timestamp("s", tz=arr.type.tz), safe=False).cast(pa.int64())
    return _to_int64(arr, source, column, row0)


def _to_label(arr: pa.Array, source: Path, column: str, row0: int) -> pa.Array:
    _no_nulls(arr, source, column, row0)
    if pa.types.is_boolean(arr.type):
        return arr.cast(pa.int8())
    row = _first(pc.invert(pc.is_in(arr, value_set=pa.array([0, 1], arr.type))))
    if row is not None:
        raise DataImportError(f"{_where(source, column, row0 + row)}: label {arr[row]} is not 0 or 1")
    return arr.cast(pa.int8())


def _to_dense(arr: pa.Array, source: Path, column: str, row0: int) -> pa.Array:
    """Float64 values whose float32 (what a batch holds) is finite: the reader rejects the rest."""
    values = arr.cast(pa.float64())
    bad = pc.or_(pc.invert(pc.is_finite(values)), pc.greater(pc.abs(values), FLOAT32_MAX))
    row = _first(bad)
    if row is not None:
        raise DataImportError(
            f"{_where(source, column, row0 + row)}: {values[row]} (NaN/inf, or not finite as float32, is not allowed)"
        )
    return values


def _to_string(arr: pa.Array) -> pa.Array:
    return arr.cast(pa.string())


# -------------------------------------------------------------------------------------- interactions


@dataclass(frozen=True)
class InteractionLayout:
    """Which optional columns an interactions table has; output names are without the column prefix."""

    labels: tuple[tuple[str, str], ...]
    """(label name, column)."""
    query: bool
    ids: tuple[str, ...]
    """The optional id columns present (query_id, session_id, request_id)."""
    sparse: tuple[tuple[str, str, bool], ...]
    """(feature, column, multi-valued)."""
    dense: tuple[tuple[str, str], ...]
    history: tuple[tuple[str, str], ...]

    @property
    def search(self) -> bool:
        return self.query or "query_id" in self.ids

    def schema(self) -> pa.Schema:
        """The normalised table: the same column names, canonical types, query_id derived when absent."""
        ids = [c for c in OPTIONAL_IDS if c in self.ids or (c == "query_id" and self.query)]
        return pa.schema(
            [(c, pa.int64()) for c in REQUIRED]
            + [(col, pa.int8()) for _, col in self.labels]
            + ([("query", pa.string())] if self.query else [])
            + [(c, pa.int64()) for c in ids]
            + [(col, pa.list_(pa.int64()) if multi else pa.int64()) for _, col, multi in self.sparse]
            + [(col, pa.float64()) for _, col in self.dense]
            + [(col, pa.list_(pa.int64())) for _, col in self.history]
        )


def _label_columns(names: list[str], source: Path) -> tuple[tuple[str, str], ...]:
    labels = [
        ("click" if c == "label" else c[len("label_") :], c)
        for c in names
        if c == "label" or c.startswith("label_")
    ]
    if not labels:
        raise DataImportError(f"{_where(source, 'label')}: missing required column (or label_<name> columns)")
    seen: set[str] = set()
    for name, col in labels:
        if not name or name in seen:
            raise DataImportError(f"{_where(source, col)}: empty or duplicate label name {name!r}")
        seen.add(name)
    return tuple(labels)


def interaction_layout(schema: pa.Schema, source: Path) -> InteractionLayout:
    """Classify and type-check the columns of one interactions file."""
    for col in REQUIRED:
        if col not in schema.names:
            raise DataImportError(f"{_where(source, col)}: missing required column")
    types = {f.name: f.type for f in schema}
    for col in ("user_id", "item_id"):
        _expect(_is_int(types[col]), source, col, types[col], "an integer (int64) column")
    ts = types["timestamp"]
    _expect(
        _is_int(ts) or pa.types.is_timestamp(ts),
        source,
        "timestamp",
        ts,
        "int64 epoch seconds or a timestamp",
    )
    labels = _label_columns(schema.names, source)
    for _, col in labels:
        _expect(
            _is_int(types[col]) or pa.types.is_boolean(types[col]), source, col, types[col], "0/1 int or bool"
        )
    if "query" in types:
        _expect(_is_str(types["query"]), source, "query", types["query"], "a string column")
    ids = tuple(c for c in OPTIONAL_IDS if c in types)
    for col in ids:
        _expect(_is_int(types[col]), source, col, types[col], "an integer (int64) column")
    sparse, dense, history = [], [], []
    for col, t in types.items():
        if col.startswith("sparse_"):
            multi = _is_list_of(t, _is_int)
            _expect(_is_int(t) or multi, source, col, t, "int64 or list<int64>")
            sparse.append((col[len("sparse_") :], col, multi))
        elif col.startswith("dense_"):
            _expect(_is_int(t) or pa.types.is_floating(t), source, col, t, "a float or int column")
            dense.append((col[len("dense_") :], col))
        elif col.startswith("history_"):
            _expect(_is_list_of(t, _is_int), source, col, t, "list<int64> of item ids")
            history.append((col[len("history_") :], col))
    for name, col in [(s[0], s[1]) for s in sparse] + dense + history:
        if not name:
            raise DataImportError(f"{_where(source, col)}: a feature name must follow the prefix")
    known = set(REQUIRED) | set(OPTIONAL_IDS) | {"query", "label"}
    _warn_ignored(source, [c for c in schema.names if c not in known and not c.startswith(PREFIXES)])
    return InteractionLayout(labels, "query" in types, ids, tuple(sparse), tuple(dense), tuple(history))


def _query_ids(batch: pa.RecordBatch, layout: InteractionLayout, source: Path, row0: int) -> pa.Array | None:
    """The given query_id, else one derived from the query text (null where both are null)."""
    given = _to_int64(batch["query_id"], source, "query_id", row0) if "query_id" in layout.ids else None
    if not layout.query:
        return given
    derived = pa.array(
        [None if q is None else stable_id(q) for q in batch["query"].to_pylist()], type=pa.int64()
    )
    return derived if given is None else pc.coalesce(given, derived)


def _normalize_batch(
    batch: pa.RecordBatch, layout: InteractionLayout, source: Path, row0: int
) -> dict[str, pa.Array]:
    cols: dict[str, pa.Array] = {}
    for col in ("user_id", "item_id"):
        _no_nulls(batch[col], source, col, row0)
        cols[col] = _to_int64(batch[col], source, col, row0)
    _no_nulls(batch["timestamp"], source, "timestamp", row0)
    cols["timestamp"] = _to_epoch_seconds(batch["timestamp"], source, "timestamp", row0)
    for _, col in layout.labels:
        cols[col] = _to_label(batch[col], source, col, row0)
    if layout.query:
        cols["query"] = _to_string(batch["query"])
    query_ids = _query_ids(batch, layout, source, row0)
    if query_ids is not None:
        cols["query_id"] = query_ids
    for col in ("session_id", "request_id"):
        if col in layout.ids:
            cols[col] = _to_int64(batch[col], source, col, row0)
    for _, col, multi in layout.sparse:
        cols[col] = (_to_int64_list if multi else _to_int64)(batch[col], source, col, row0)
    for _, col in layout.dense:
        cols[col] = _to_dense(batch[col], source, col, row0)
    for _, col in layout.history:
        cols[col] = _to_int64_list(batch[col], source, col, row0)
    return cols


def _check_items_known(item_ids: pa.Array, catalog: ItemCatalog, source: Path, row0: int) -> None:
    row = _first(pc.invert(pc.is_in(item_ids, value_set=catalog.ids)))
    if row is not None:
        raise DataImportError(
            f"{_where(source, 'item_id', row0 + row)}: item_id {item_ids[row]} is not in the items table "
            f"{catalog.source}"
        )


def load_interactions(path: str | os.PathLike, catalog: ItemCatalog) -> tuple[pa.Table, InteractionLayout]:
    """The whole interactions table, validated and normalised (see InteractionLayout.schema)."""
    files = parquet_files(path, "interactions")
    layout: InteractionLayout = _common_layout(files, interaction_layout)
    schema = layout.schema()
    batches = []
    for source in files:
        for row0, batch in _batches(source, "interactions"):
            cols = _normalize_batch(batch, layout, source, row0)
            _check_items_known(cols["item_id"], catalog, source, row0)
            batches.append(pa.RecordBatch.from_arrays([cols[n] for n in schema.names], schema=schema))
    table = pa.Table.from_batches(batches, schema=schema)
    if table.num_rows == 0:
        raise DataImportError(f"{path}: the interactions table has no rows")
    return table, layout


# --------------------------------------------------------------------------------------------- items


@dataclass
class ItemCatalog:
    """The items table in memory: item_id, text_<field> (string), images (list of bytes or of absolute paths)."""

    table: pa.Table
    text: list[str]
    image_kind: str | None
    """"bytes", "path" or None (no images)."""
    index: dict[int, int]
    source: str
    max_image_bytes: int = MAX_IMAGE_BYTES

    @cached_property
    def ids(self) -> pa.Array:
        return self.table["item_id"].combine_chunks()

    def rows(self, item_ids: list[int]) -> pa.Array:
        return pa.array([self.index[i] for i in item_ids], type=pa.int64())

    @cached_property
    def _image_chunks(self) -> tuple[np.ndarray, list[pa.Array]]:
        column = self.table["images"]
        return np.cumsum([0] + [len(c) for c in column.chunks]), column.chunks

    def images(self, row: int) -> list[Any]:
        """One item's images (bytes or paths), without copying any other item's."""
        starts, chunks = self._image_chunks
        k = int(np.searchsorted(starts, row, side="right")) - 1
        return chunks[k][row - starts[k]].as_py() or []

    def image_payloads(self, row: int) -> dict[str, bytes]:
        """Shard members for an item's images: jpg (or png) for the first, 1.jpg, 2.jpg, ... for the rest."""
        members = {}
        for k, image in enumerate(i for i in self.images(row) if i is not None):
            payload = _read_image(image, self.max_image_bytes) if self.image_kind == "path" else image
            ext = _image_format(payload[: len(PNG_MAGIC)]) or "jpg"
            members[ext if k == 0 else f"{k}.{ext}"] = payload
        return members


@dataclass(frozen=True)
class ItemLayout:
    text: tuple[str, ...]
    """Text columns (text_<field>)."""
    image: str | None
    """"image", "image_path" or None."""

    def schema(self) -> pa.Schema:
        images = pa.large_binary() if self.image == "image" else pa.string()
        return pa.schema(
            [("item_id", pa.int64())]
            + [(col, pa.string()) for col in self.text]
            + [("images", pa.list_(images))]
        )


def item_layout(schema: pa.Schema, source: Path) -> ItemLayout:
    """Classify and type-check the columns of one items file."""
    if "item_id" not in schema.names:
        raise DataImportError(f"{_where(source, 'item_id')}: missing required column")
    types = {f.name: f.type for f in schema}
    _expect(_is_int(types["item_id"]), source, "item_id", types["item_id"], "an integer (int64) column")
    text = tuple(c for c in schema.names if c.startswith("text_"))
    for col in text:
        _expect(_is_str(types[col]) and col != "text_", source, col, types[col], "a named string column")
    if "image" in types and "image_path" in types:
        raise DataImportError(f"{_where(source, 'image_path')}: give either image or image_path, not both")
    image = next((c for c in ("image", "image_path") if c in types), None)
    if image == "image":
        t = types[image]
        _expect(_is_bin(t) or _is_list_of(t, _is_bin), source, image, t, "binary or list<binary>")
    elif image == "image_path":
        t = types[image]
        _expect(_is_str(t) or _is_list_of(t, _is_str), source, image, t, "string or list<string>")
    known = {"item_id", "image", "image_path", *text}
    _warn_ignored(source, [c for c in schema.names if c not in known])
    return ItemLayout(text, image)


def _as_lists(arr: pa.Array, value_type: pa.DataType) -> pa.Array:
    """One value per row -> a one-element list per row (null rows become [null], dropped when read)."""
    if (
        not pa.types.is_list(arr.type)
        and not pa.types.is_large_list(arr.type)
        and not pa.types.is_fixed_size_list(arr.type)
    ):
        arr = pa.ListArray.from_arrays(pa.array(np.arange(len(arr) + 1), pa.int32()), arr)
    return arr.cast(pa.list_(value_type))


def _image_format(head: bytes) -> str | None:
    if head.startswith(JPEG_MAGIC):
        return "jpg"
    if head.startswith(PNG_MAGIC):
        return "png"
    return None


def _check_image_bytes(images: pa.Array, source: Path, row0: int, max_bytes: int) -> None:
    flat, parents = pc.list_flatten(images), pc.list_parent_indices(images)
    sizes = pc.binary_length(flat)
    k = _first(pc.greater(sizes, max_bytes))
    if k is not None:
        row = row0 + parents[k].as_py()
        raise DataImportError(f"{_where(source, 'image', row)}: {_too_big(sizes[k].as_py(), max_bytes)}")
    heads = pc.binary_slice(flat, 0, len(PNG_MAGIC)).to_pylist()
    for k, head in enumerate(heads):
        if head is not None and _image_format(head) is None:
            row = row0 + parents[k].as_py()
            raise DataImportError(f"{_where(source, 'image', row)}: not a JPEG or PNG image")


def _too_big(size: int, max_bytes: int) -> str:
    return f"{size:,} bytes, over the {max_bytes:,}-byte cap on one image (max_image_bytes)"


def _check_image_file(path: Path, max_bytes: int) -> str | None:
    """Why `path` (symlinks followed) is not an image the import takes, or None. Its size is checked with stat
    before anything is read; then only its first bytes are (the format)."""
    shown = f"{path} -> {path.resolve()}" if path.is_symlink() else str(path)
    try:
        info = path.stat()
        if not stat.S_ISREG(info.st_mode):
            return f"{shown} is not a regular file"
        if info.st_size > max_bytes:
            return f"{shown}: {_too_big(info.st_size, max_bytes)}"
        with path.open("rb") as f:
            head = f.read(len(PNG_MAGIC))
    except FileNotFoundError:
        return f"no such file {shown}"
    except OSError as err:
        return f"{shown}: {err}"
    if _image_format(head) is None:
        return f"{shown} is not a JPEG or PNG file"
    return None


def _resolve_image_paths(images: pa.Array, source: Path, row0: int, max_bytes: int) -> pa.Array:
    """Absolute paths (relative ones are taken from the items file's directory; symlinks resolved), each checked
    to be a JPEG or PNG file within the size cap."""
    resolved = []
    for r, paths in enumerate(images.to_pylist()):
        row = []
        for p in paths or []:
            if p is None:
                continue
            path = Path(p) if Path(p).is_absolute() else source.parent / p
            if path.suffix.lower() not in PATH_EXTS:
                raise DataImportError(f"{_where(source, 'image_path', row0 + r)}: {p} is not .jpg/.jpeg/.png")
            problem = _check_image_file(path, max_bytes)
            if problem is not None:
                raise DataImportError(f"{_where(source, 'image_path', row0 + r)}: {problem}")
            row.append(str(path.resolve()))
        resolved.append(row)
    return pa.array(resolved, type=pa.list_(pa.string()))


def _read_image(path: str, max_bytes: int) -> bytes:
    """An image file checked when the items were loaded, read again within the cap (it may have changed since)."""
    try:
        with open(path, "rb") as f:
            size = os.fstat(f.fileno()).st_size
            if size > max_bytes:
                raise DataImportError(f"image_path {path}: {_too_big(size, max_bytes)}")
            payload = f.read(max_bytes + 1)
    except OSError as err:
        raise DataImportError(f"image_path {path}: {err}") from err
    if len(payload) > max_bytes:
        raise DataImportError(
            f"image_path {path}: grew past the cap while read: {_too_big(len(payload), max_bytes)}"
        )
    if _image_format(payload[: len(PNG_MAGIC)]) is None:
        raise DataImportError(f"image_path {path}: no longer a JPEG or PNG file")
    return payload


def _normalize_items(
    batch: pa.RecordBatch, layout: ItemLayout, source: Path, row0: int, max_image_bytes: int
) -> list[pa.Array]:
    _no_nulls(batch["item_id"], source, "item_id", row0)
    cols = [_to_int64(batch["item_id"], source, "item_id", row0)]
    cols += [_to_string(batch[col]) for col in layout.text]
    if layout.image == "image":
        images = _as_lists(batch["image"], pa.large_binary())
        _check_image_bytes(images, source, row0, max_image_bytes)
    elif layout.image == "image_path":
        paths = _as_lists(batch["image_path"], pa.string())
        images = _resolve_image_paths(paths, source, row0, max_image_bytes)
    else:
        images = pa.array([[]] * batch.num_rows, type=pa.list_(pa.string()))
    return [*cols, images]


def _index_items(ids: pa.Array, index: dict[int, int], source: Path, row0: int) -> None:
    base = len(index)
    for k, item in enumerate(ids.to_pylist()):
        if item in index:
            raise DataImportError(f"{_where(source, 'item_id', row0 + k)}: duplicate item_id {item}")
        index[item] = base + k


def load_items(path: str | os.PathLike, max_image_bytes: int = MAX_IMAGE_BYTES) -> ItemCatalog:
    files = parquet_files(path, "items")
    layout: ItemLayout = _common_layout(files, item_layout)
    schema = layout.schema()
    batches, index = [], {}
    for source in files:
        for row0, batch in _batches(source, "items"):
            arrays = _normalize_items(batch, layout, source, row0, max_image_bytes)
            _index_items(arrays[0], index, source, row0)
            batches.append(pa.RecordBatch.from_arrays(arrays, schema=schema))
    table = pa.Table.from_batches(batches, schema=schema)
    if table.num_rows == 0:
        raise DataImportError(f"{path}: the items table has no rows")
    kind = {"image": "bytes", "image_path": "path"}.get(layout.image or "")
    text = [col[len("text_") :] for col in layout.text]
    return ItemCatalog(table, text, kind, index, str(path), max_image_bytes)


# --------------------------------------------------------------------------------------------- split


@dataclass
class Split:
    order: np.ndarray
    """Row indices of the interactions table, sorted by timestamp (stable)."""
    n_train: int
    boundary: int
    """The first eval timestamp."""

    @property
    def rows(self) -> dict[str, np.ndarray]:
        return {"train": self.order[: self.n_train], "eval": self.order[self.n_train :]}


def time_split(timestamps: np.ndarray, eval_share: float, eval_from: int | None) -> Split:
    order = np.argsort(timestamps, kind="stable")
    ordered = timestamps[order]
    if eval_from is None:
        n_eval = round(len(order) * eval_share)
        n_eval = max(1, n_eval) if eval_share > 0 else 0
        eval_from = int(ordered[-n_eval]) if n_eval else int(ordered[-1]) + 1
    n_train = int(np.searchsorted(ordered, eval_from, side="left"))
    if n_train == 0:
        raise DataImportError(
            f"no train samples: every timestamp is >= the eval boundary {eval_from}; lower eval_share/eval_from"
        )
    return Split(order, n_train, eval_from)


# -------------------------------------------------------------------------------------------- writing


@dataclass
class SplitResult:
    shards: list[ShardInfo] = field(default_factory=list)
    samples: int = 0
    positives: int = 0


def _record(
    row: dict[str, Any], item: dict[str, Any], layout: InteractionLayout, text: list[str]
) -> dict[str, Any]:
    record: dict[str, Any] = {
        "user_id": row["user_id"],
        "item_id": row["item_id"],
        "timestamp": row["timestamp"],
        "labels": {name: row[col] for name, col in layout.labels},
    }
    for col in ("query", *OPTIONAL_IDS):
        if row.get(col) is not None:
            record[col] = row[col]
    if layout.sparse:
        record["sparse"] = {
            name: (row[col] or []) if multi else ([] if row[col] is None else [row[col]])
            for name, col, multi in layout.sparse
        }
    if layout.dense:
        record["dense"] = {name: row[col] for name, col in layout.dense if row[col] is not None}
    if layout.history:
        record["history"] = {name: row[col] or [] for name, col in layout.history}
    if text:
        record["text"] = {f: item[f"text_{f}"] for f in text if item[f"text_{f}"] is not None}
    return record


def write_split(
    split: str,
    rows: np.ndarray,
    table: pa.Table,
    layout: InteractionLayout,
    catalog: ItemCatalog,
    cold: np.ndarray | None,
    out: Path,
    samples_per_shard: int,
) -> SplitResult:
    """Shards of `rows` (already in time order); `cold` flags each row for eval."""
    result = SplitResult()
    main_label = layout.labels[0][1]
    # item_id too: a table of no columns has no rows, so take() on the text columns alone would drop every sample
    item_columns = ["item_id", *(f"text_{f}" for f in catalog.text)]
    for index, lo in enumerate(range(0, len(rows), samples_per_shard)):
        chunk = table.take(pa.array(rows[lo : lo + samples_per_shard]))
        item_rows = catalog.rows(chunk["item_id"].to_pylist())
        # The items' text for the whole shard; their images one sample at a time (never a shard's worth at once).
        items = catalog.table.select(item_columns).take(item_rows).to_pylist()
        name = shard_name(split, index)
        with ShardWriter(out / name) as writer:
            samples = zip(chunk.to_pylist(), items, item_rows.to_pylist())
            for i, (row, item, item_row) in enumerate(samples):
                record = _record(row, item, layout, catalog.text)
                if cold is not None:
                    record["cold"] = int(cold[lo + i])
                members = {"json": encode_record(record), **catalog.image_payloads(item_row)}
                writer.write(f"{split}_{index:06d}_{i:06d}", members)
        result.shards.append(ShardInfo(name, chunk.num_rows))
        result.samples += chunk.num_rows
        result.positives += int(pc.sum(chunk[main_label]).as_py() or 0)
    return result


def _item_chunks(catalog: ItemCatalog) -> Iterator[tuple[int, list[list[bytes]]]]:
    """(first row, each item's image bytes) for runs of at most ITEMS_CHUNK items whose images are read one item
    at a time and end the run once they reach ITEMS_CHUNK_BYTES: memory is bounded by the budget plus one item."""
    lo, images, held = 0, [], 0
    for row in range(catalog.table.num_rows):
        payloads = list(catalog.image_payloads(row).values())
        images.append(payloads)
        held += sum(len(p) for p in payloads)
        if len(images) == ITEMS_CHUNK or held >= ITEMS_CHUNK_BYTES:
            yield lo, images
            lo, images, held = row + 1, [], 0
    if images:
        yield lo, images


def write_items(catalog: ItemCatalog, train_items: np.ndarray, path: Path) -> None:
    """items.parquet in synth's shape: item_id, the text fields, images (bytes), cold_start (never in train)."""
    schema = pa.schema(
        [("item_id", pa.int64())]
        + [(f, pa.string()) for f in catalog.text]
        + [("images", pa.list_(pa.binary())), ("cold_start", pa.bool_())]
    )
    tmp = path.with_name(f".{path.name}.partial")
    with pq.ParquetWriter(tmp, schema) as writer:
        for lo, images in _item_chunks(catalog):
            chunk = catalog.table.slice(lo, len(images))
            ids = chunk["item_id"].to_numpy()
            columns = {
                "item_id": ids,
                **{f: chunk[f"text_{f}"] for f in catalog.text},
                "images": images,
                "cold_start": ~np.isin(ids, train_items),
            }
            writer.write_table(pa.table(columns, schema=schema))
    tmp.replace(path)


def _texts(catalog: ItemCatalog, table: pa.Table) -> Iterator[str]:
    """The tokenizer's corpus: every item text and every distinct query."""
    for f in catalog.text:
        for chunk in catalog.table[f"text_{f}"].chunks:
            yield from (t for t in chunk.to_pylist() if t)
    if "query" in table.column_names:
        yield from (q for q in pc.unique(table["query"]).to_pylist() if q)


# ----------------------------------------------------------------------------------------------- spec


def _distinct(column: pa.ChunkedArray) -> int:
    if pa.types.is_list(column.type):
        column = pc.list_flatten(column)
    return int(pc.count_distinct(column).as_py())


def _max_len(column: pa.ChunkedArray) -> int:
    return int(pc.max(pc.list_value_length(column)).as_py() or 0)


def _cardinalities(table: pa.Table, layout: InteractionLayout, catalog: ItemCatalog) -> dict[str, int]:
    cards = {"user_id": _distinct(table["user_id"]), "item_id": catalog.table.num_rows}
    if layout.search:
        cards["query_id"] = _distinct(table["query_id"])
    cards.update({name: _distinct(table[col]) for name, col, _ in layout.sparse})
    return cards


def _counts(
    rows: dict[str, np.ndarray], item_ids: np.ndarray, train_items: np.ndarray, catalog: ItemCatalog
) -> dict[str, int]:
    eval_items = np.unique(item_ids[rows["eval"]])
    cold = ~np.isin(item_ids[rows["eval"]], train_items)
    return {
        "train": len(rows["train"]),
        "eval": len(rows["eval"]),
        "items": catalog.table.num_rows,
        "cold_items": int((~np.isin(catalog.ids.to_numpy(), train_items)).sum()),
        "eval_cold_items": int(np.setdiff1d(eval_items, train_items).size),
        "eval_cold_samples": int(cold.sum()),
    }


def build_spec(
    table: pa.Table,
    layout: InteractionLayout,
    catalog: ItemCatalog,
    split: Split,
    results: dict[str, SplitResult],
    counts: dict[str, int],
    created_by: str,
) -> DatasetSpec:
    cards = _cardinalities(table, layout, catalog)
    return DatasetSpec(
        scenario="search" if layout.search else "feed",
        sparse={name: {"multi": multi, "cardinality": cards[name]} for name, _, multi in layout.sparse},
        dense=[name for name, _ in layout.dense],
        history={name: _max_len(table[col]) for name, col in layout.history},
        text=list(catalog.text),
        query_text=layout.query,
        images=_max_len(catalog.table["images"]),
        labels=[name for name, _ in layout.labels],
        cardinalities=cards,
        counts=counts,
        label_rate={s: round(r.positives / max(1, r.samples), 5) for s, r in results.items()},
        shards={s: r.shards for s, r in results.items()},
        split={
            "rule": "time",
            "eval_from_timestamp": split.boundary,
            "cold_item_share": round(counts["cold_items"] / max(1, counts["items"]), 5),
        },
        created_by=created_by,
    )


# ------------------------------------------------------------------------------------ output directory


def _check_out(out: Path, force: bool) -> None:
    """Refuse a non-empty `out` unless forced, and never replace something that is not a lemur dataset."""
    if not out.exists():
        return
    if out.is_dir() and not any(out.iterdir()):
        return
    if not force:
        raise FileExistsError(f"{out} is not empty; pass --force to replace the dataset in it")
    if not out.is_dir() or not ((out / "dataset.json").exists() or any(out.glob("*.tar"))):
        raise FileExistsError(f"{out} holds something that is not a lemur dataset; refusing to replace it")


def _partial(out: Path) -> Path:
    return out.with_name(f".{out.name}.partial")


def _old(out: Path) -> Path:
    return out.with_name(f".{out.name}.old")


def _repair_interrupted(out: Path) -> None:
    """Undo what an import killed outright (SIGKILL, the OOM killer) left: a `.old` with no dataset at `out`
    (killed between _publish's two renames) is the previous dataset, renamed back; a `.old` beside a dataset
    (killed after them) is the replaced one, removed; a `.partial` is removed."""
    old = _old(out)
    if old.is_dir():
        if not out.exists() or (out.is_dir() and not any(out.iterdir())):
            if out.exists():
                out.rmdir()
            old.rename(out)
            warnings.warn(
                f"{old}: an interrupted import left the previous dataset here; restored it to {out}",
                stacklevel=3,
            )
        else:
            shutil.rmtree(old)
            warnings.warn(f"{old}: removed the dataset an interrupted import had replaced", stacklevel=3)
    shutil.rmtree(_partial(out), ignore_errors=True)


def _staging_dir(out: Path) -> Path:
    tmp = _partial(out)
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    return tmp


def _publish(tmp: Path, out: Path) -> None:
    """Swap the complete dataset in; the old one is removed only after the new one is in place."""
    if not out.exists():
        tmp.rename(out)
        return
    old = _old(out)
    shutil.rmtree(old, ignore_errors=True)
    out.rename(old)
    try:
        tmp.rename(out)
    except BaseException:
        old.rename(out)
        raise
    shutil.rmtree(old, ignore_errors=True)


@contextlib.contextmanager
def _terminate_as_exit() -> Iterator[None]:
    """SIGTERM (kill, scancel) raises SystemExit while this is open, so `finally` clauses clean up as they do for
    an exception or Ctrl-C. Only in the main thread, and only over the default handler (never over a caller's)."""
    if threading.current_thread() is not threading.main_thread() or (
        signal.getsignal(signal.SIGTERM) is not signal.SIG_DFL
    ):
        yield
        return

    def exit_on_term(signum: int, frame: Any) -> None:
        raise SystemExit(128 + signum)

    signal.signal(signal.SIGTERM, exit_on_term)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, signal.SIG_DFL)


# ----------------------------------------------------------------------------------------------- main


def _check_args(samples_per_shard: int, eval_share: float, vocab_size: int, max_image_bytes: int) -> None:
    if samples_per_shard < 1:
        raise DataImportError(f"samples_per_shard must be >= 1, got {samples_per_shard}")
    if not 0.0 <= eval_share < 1.0:
        raise DataImportError(f"eval_share must be in [0, 1), got {eval_share}")
    if vocab_size < 1:
        raise DataImportError(f"vocab_size must be >= 1, got {vocab_size}")
    if max_image_bytes < 1:
        raise DataImportError(f"max_image_bytes must be >= 1, got {max_image_bytes}")


def write_dataset(
    table: pa.Table,
    layout: InteractionLayout,
    catalog: ItemCatalog,
    split: Split,
    out: Path,
    samples_per_shard: int,
    vocab_size: int,
    created_by: str,
) -> DatasetSpec:
    """Shards, items.parquet, tokenizer/ and dataset.json into `out` (the staging directory)."""
    item_ids = table["item_id"].to_numpy()
    rows = split.rows
    train_items = np.unique(item_ids[rows["train"]])
    cold = ~np.isin(item_ids[rows["eval"]], train_items)
    results = {
        "train": write_split("train", rows["train"], table, layout, catalog, None, out, samples_per_shard),
        "eval": write_split("eval", rows["eval"], table, layout, catalog, cold, out, samples_per_shard),
    }
    write_items(catalog, train_items, out / "items.parquet")
    train_tokenizer(_texts(catalog, table), vocab_size, out / "tokenizer")
    counts = _counts(rows, item_ids, train_items, catalog)
    spec = build_spec(table, layout, catalog, split, results, counts, created_by)
    write_spec(out, spec)
    return spec


def import_parquet(
    interactions: str | os.PathLike,
    items: str | os.PathLike,
    out: str | os.PathLike,
    samples_per_shard: int = 10_000,
    eval_share: float = 0.1,
    eval_from: int | None = None,
    vocab_size: int = 8_000,
    force: bool = False,
    max_image_bytes: int = MAX_IMAGE_BYTES,
) -> DatasetSpec:
    """Convert an interactions table and an items table (Parquet) into a lemur dataset directory at `out`.
    `max_image_bytes`: the largest image taken (an `image` value or an `image_path` file)."""
    started = time.time()
    out = Path(out)
    _check_args(samples_per_shard, eval_share, vocab_size, max_image_bytes)
    _repair_interrupted(out)
    _check_out(out, force)
    catalog = load_items(items, max_image_bytes)
    table, layout = load_interactions(interactions, catalog)
    split = time_split(table["timestamp"].to_numpy(), eval_share, eval_from)
    created_by = (
        f"lemur data import interactions={interactions} items={items} samples_per_shard={samples_per_shard} "
        f"eval_share={eval_share} eval_from={eval_from} vocab_size={vocab_size}"
    )
    with _terminate_as_exit():
        tmp = _staging_dir(out)
        try:
            spec = write_dataset(
                table, layout, catalog, split, tmp, samples_per_shard, vocab_size, created_by
            )
            _publish(tmp, out)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)  # gone already when published
    print(
        f"import: {spec.counts['train']} train + {spec.counts['eval']} eval samples, {spec.counts['items']} items, "
        f"{time.time() - started:.1f}s -> {out}"
    )
    return spec
