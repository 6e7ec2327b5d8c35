"""`lemur data import`: Parquet interactions + items -> shards, items.parquet, tokenizer, dataset.json."""

from __future__ import annotations

import io
import json
import os
import shutil
import signal
import tarfile
from collections import defaultdict
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from trainer.data.spec import read_spec
from trainer.data.tokenizer import load_tokenizer
from trainer.dataset_tools import parquet_import as importer
from trainer.dataset_tools.parquet_import import DataImportError, import_parquet
from trainer.dataset_tools.synth.content import stable_id

N_ITEMS, N_ROWS = 6, 20
BASE_ID = 10**12
COLD_ITEM = BASE_ID + 5
T0 = 1_700_000_000


def _image(fmt: str, shade: int) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (8, 8), (shade, 255 - shade, 40)).save(buf, format=fmt)
    return buf.getvalue()


def _item_ids() -> list[int]:
    return [BASE_ID + k for k in range(N_ITEMS)]


def _items_table(tmp_path: Path, images: str) -> pa.Table:
    """Two text fields, and images as a list of bytes (JPEG + PNG) or as one path per item."""
    ids = _item_ids()
    columns: dict[str, Any] = {
        "item_id": pa.array(ids, pa.int64()),
        "text_title": [f"title number {k}" for k in range(N_ITEMS)],
        "text_description": [None if k == 2 else f"a fine description {k}" for k in range(N_ITEMS)],
    }
    if images == "bytes":
        columns["image"] = pa.array(
            [[_image("JPEG", k * 30), _image("PNG", k * 30)] for k in range(N_ITEMS)], pa.list_(pa.binary())
        )
    else:
        (tmp_path / "img").mkdir(exist_ok=True)
        for k in range(N_ITEMS):
            (tmp_path / "img" / f"{k}.jpg").write_bytes(_image("JPEG", k * 30))
        columns["image_path"] = [f"img/{k}.jpg" for k in range(N_ITEMS)]
    return pa.table(columns)


def _interactions_table() -> pa.Table:
    """Rows out of time order; the last item only shows up at the latest timestamps (cold in eval)."""
    rows = range(N_ROWS)
    times = [T0 + 60 * ((7 * r) % N_ROWS) for r in rows]
    items = [COLD_ITEM if t >= T0 + 60 * 17 else BASE_ID + r % (N_ITEMS - 1) for r, t in zip(rows, times)]
    return pa.table(
        {
            "user_id": pa.array([100 + r % 3 for r in rows], pa.int64()),
            "item_id": pa.array(items, pa.int64()),
            "label": pa.array([r % 2 == 0 for r in rows], pa.bool_()),
            "timestamp": pa.array(times, pa.int64()),
            "query": [f"query {r % 4}" for r in rows],
            "session_id": pa.array([r // 5 for r in rows], pa.int64()),
            "sparse_device": pa.array([None if r == 1 else r % 3 for r in rows], pa.int64()),
            "sparse_tags": pa.array([[r, r + 1] if r % 3 else [] for r in rows], pa.list_(pa.int64())),
            "dense_price": pa.array([None if r == 2 else r / 4 for r in rows], pa.float64()),
            "history_recent": pa.array(
                [[BASE_ID + j for j in range(r % 4)] for r in rows], pa.list_(pa.int64())
            ),
        }
    )


def _write(tmp_path: Path, interactions: pa.Table, items: pa.Table) -> tuple[Path, Path]:
    inter_path, items_path = tmp_path / "interactions.parquet", tmp_path / "items.parquet"
    pq.write_table(interactions, inter_path, row_group_size=7)
    pq.write_table(items, items_path)
    return inter_path, items_path


def _import(inter: Path, items: Path, out: Path, **kwargs: Any) -> Any:
    args = {"samples_per_shard": 4, "eval_share": 0.25, "eval_from": None, "vocab_size": 200, "force": False}
    return import_parquet(interactions=inter, items=items, out=out, **{**args, **kwargs})


def _read_shard(path: Path) -> list[tuple[str, dict[str, Any], dict[str, bytes]]]:
    """(key, record, {member suffix: bytes}) in shard order."""
    members: dict[str, dict[str, bytes]] = defaultdict(dict)
    with tarfile.open(path) as tar:
        for info in tar.getmembers():
            key, suffix = info.name.split(".", 1)
            members[key][suffix] = tar.extractfile(info).read()
    return [(key, json.loads(m.pop("json")), m) for key, m in members.items()]


def _read_split(out: Path, split: str) -> list[tuple[str, dict[str, Any], dict[str, bytes]]]:
    return [s for shard in sorted(out.glob(f"{split}-*.tar")) for s in _read_shard(shard)]


@pytest.mark.parametrize("images", ["bytes", "path"])
def test_import_round_trip(tmp_path: Path, images: str) -> None:
    inter, items_table = _interactions_table(), _items_table(tmp_path, images)
    inter_path, items_path = _write(tmp_path, inter, items_table)
    out = tmp_path / "dataset"
    spec = _import(inter_path, items_path, out)

    train, evals = _read_split(out, "train"), _read_split(out, "eval")
    assert [len(train), len(evals)] == [15, 5]
    assert max(r["timestamp"] for _, r, _ in train) < min(r["timestamp"] for _, r, _ in evals)
    assert [r["timestamp"] for _, r, _ in train + evals] == sorted(inter["timestamp"].to_pylist())
    assert train[0][0] == "train_000000_000000" and evals[-1][0] == "eval_000001_000000"

    source = {row["timestamp"]: row for row in inter.to_pylist()}
    item_rows = {row["item_id"]: row for row in items_table.to_pylist()}
    for _, record, members in train + evals:
        row = source[record["timestamp"]]
        assert (record["user_id"], record["item_id"]) == (row["user_id"], row["item_id"])
        assert record["labels"] == {"click": int(row["label"])}
        assert record["query"] == row["query"] and record["query_id"] == stable_id(row["query"])
        assert record["session_id"] == row["session_id"]
        device = [] if row["sparse_device"] is None else [row["sparse_device"]]
        assert record["sparse"] == {"device": device, "tags": row["sparse_tags"]}
        assert record["dense"] == ({} if row["dense_price"] is None else {"price": row["dense_price"]})
        assert record["history"] == {"recent": row["history_recent"]}
        item = item_rows[record["item_id"]]
        expected_text = {"title": item["text_title"], "description": item["text_description"]}
        assert record["text"] == {k: v for k, v in expected_text.items() if v is not None}
        if images == "bytes":
            assert members == {"jpg": item["image"][0], "1.png": item["image"][1]}
        else:
            assert members == {"jpg": (tmp_path / item["image_path"]).read_bytes()}
    assert all("cold" not in r for _, r, _ in train)
    assert [r["cold"] for _, r, _ in evals] == [int(r["item_id"] == COLD_ITEM) for _, r, _ in evals]

    on_disk = read_spec(out)
    assert on_disk == spec
    assert spec.scenario == "search" and spec.query_text and spec.labels == ["click"]
    assert spec.text == ["title", "description"] and spec.dense == ["price"]
    tags = {t for row in inter["sparse_tags"].to_pylist() for t in row}
    assert spec.sparse == {
        "device": {"multi": False, "cardinality": 3},
        "tags": {"multi": True, "cardinality": len(tags)},
    }
    assert spec.history == {"recent": 3}
    assert spec.images == (2 if images == "bytes" else 1)
    assert spec.counts == {
        "train": 15, "eval": 5, "items": 6, "cold_items": 1, "eval_cold_items": 1, "eval_cold_samples": 3
    }  # fmt: skip
    assert [(s.name, s.samples) for s in spec.shards["train"]] == [
        ("train-000000.tar", 4), ("train-000001.tar", 4), ("train-000002.tar", 4), ("train-000003.tar", 3)
    ]  # fmt: skip
    assert [(s.name, s.samples) for s in spec.shards["eval"]] == [
        ("eval-000000.tar", 4),
        ("eval-000001.tar", 1),
    ]
    for split, samples in (("train", train), ("eval", evals)):
        rate = sum(r["labels"]["click"] for _, r, _ in samples) / len(samples)
        assert spec.label_rate[split] == round(rate, 5)
    assert spec.split["eval_from_timestamp"] == evals[0][1]["timestamp"]
    assert spec.cardinalities["user_id"] == 3 and spec.cardinalities["query_id"] == 4

    catalog = pq.read_table(out / "items.parquet")
    assert catalog.column_names == ["item_id", "title", "description", "images", "cold_start"]
    assert catalog["cold_start"].to_pylist() == [i == COLD_ITEM for i in _item_ids()]
    tok = load_tokenizer(out / "tokenizer")
    assert tok("title number 3")["input_ids"][0] == tok.cls_token_id
    assert not list(tmp_path.glob(".dataset*"))


def test_timestamp_type_eval_from_and_label_columns(tmp_path: Path) -> None:
    inter = _interactions_table().drop_columns(["query", "label"])
    seconds = inter["timestamp"].to_pylist()
    stamps = pa.array([s * 1000 + 999 for s in seconds], pa.timestamp("ms", tz="UTC"))
    inter = inter.set_column(inter.column_names.index("timestamp"), "timestamp", stamps)
    inter = inter.append_column("label_buy", pa.array([0] * N_ROWS, pa.int8()))
    inter = inter.append_column("label_like", pa.array([1] * N_ROWS, pa.int64()))
    inter_path, items_path = _write(tmp_path, inter, _items_table(tmp_path, "path"))
    spec = _import(inter_path, items_path, tmp_path / "out", eval_from=T0 + 60 * 10)
    assert spec.scenario == "feed" and spec.labels == ["buy", "like"] and not spec.query_text
    assert spec.counts["train"] == 10 and spec.counts["eval"] == 10
    assert spec.label_rate == {"train": 0.0, "eval": 0.0}
    records = [r for _, r, _ in _read_split(tmp_path / "out", "train")]
    assert records[0]["timestamp"] == T0 and records[0]["labels"] == {"buy": 0, "like": 1}
    assert "query_id" not in records[0]


def test_missing_column_leaves_nothing(tmp_path: Path) -> None:
    inter_path, items_path = _write(
        tmp_path, _interactions_table().drop_columns(["timestamp"]), _items_table(tmp_path, "bytes")
    )
    out = tmp_path / "dataset"
    with pytest.raises(DataImportError, match=rf"{inter_path}.*'timestamp'.*missing required column"):
        _import(inter_path, items_path, out)
    assert not out.exists() and not list(tmp_path.glob(".dataset*"))

    out.mkdir()
    (out / "dataset.json").write_text("old")
    (out / "train-000000.tar").write_bytes(b"old shard")
    with pytest.raises(DataImportError, match="timestamp"):
        _import(inter_path, items_path, out, force=True)
    assert sorted(p.name for p in out.iterdir()) == ["dataset.json", "train-000000.tar"]
    assert (out / "dataset.json").read_text() == "old"
    assert not list(tmp_path.glob(".dataset*"))


def test_failure_while_writing_keeps_old_output(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    inter_path, items_path = _write(tmp_path, _interactions_table(), _items_table(tmp_path, "bytes"))
    out = tmp_path / "dataset"
    _import(inter_path, items_path, out)
    before = {p.name: p.read_bytes() for p in out.iterdir() if p.is_file()}

    def broken_tokenizer(*args: Any) -> None:
        raise RuntimeError("disk full")

    monkeypatch.setattr(importer, "train_tokenizer", broken_tokenizer)
    with pytest.raises(RuntimeError, match="disk full"):
        _import(inter_path, items_path, out, force=True, samples_per_shard=100)
    assert {p.name: p.read_bytes() for p in out.iterdir() if p.is_file()} == before
    assert not list(tmp_path.glob(".dataset*"))


def test_missing_item_id_column_names_items_table(tmp_path: Path) -> None:
    inter_path, items_path = _write(
        tmp_path, _interactions_table(), _items_table(tmp_path, "bytes").drop_columns(["item_id"])
    )
    with pytest.raises(DataImportError, match=rf"{items_path}.*'item_id'.*missing required column"):
        _import(inter_path, items_path, tmp_path / "out")


def test_wrong_type_names_column(tmp_path: Path) -> None:
    inter = _interactions_table()
    inter = inter.set_column(0, "user_id", pa.array([str(u) for u in inter["user_id"].to_pylist()]))
    inter_path, items_path = _write(tmp_path, inter, _items_table(tmp_path, "bytes"))
    with pytest.raises(DataImportError, match=r"'user_id'.*expected an integer.*got string"):
        _import(inter_path, items_path, tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_nan_in_dense_names_column_and_row(tmp_path: Path) -> None:
    inter = _interactions_table()
    prices = inter["dense_price"].to_pylist()
    prices[9] = float("nan")
    inter = inter.set_column(
        inter.column_names.index("dense_price"), "dense_price", pa.array(prices, pa.float64())
    )
    inter_path, items_path = _write(tmp_path, inter, _items_table(tmp_path, "bytes"))
    with pytest.raises(DataImportError, match=r"'dense_price', row 9: nan"):
        _import(inter_path, items_path, tmp_path / "out")


def test_unknown_item_id(tmp_path: Path) -> None:
    inter = _interactions_table()
    ids = inter["item_id"].to_pylist()
    ids[11] = 42
    inter = inter.set_column(1, "item_id", pa.array(ids, pa.int64()))
    inter_path, items_path = _write(tmp_path, inter, _items_table(tmp_path, "bytes"))
    with pytest.raises(DataImportError, match=r"'item_id', row 11: item_id 42 is not in the items table"):
        _import(inter_path, items_path, tmp_path / "out")


def test_existing_output_needs_force(tmp_path: Path) -> None:
    inter_path, items_path = _write(tmp_path, _interactions_table(), _items_table(tmp_path, "bytes"))
    out = tmp_path / "dataset"
    _import(inter_path, items_path, out)
    with pytest.raises(FileExistsError, match="--force"):
        _import(inter_path, items_path, out)
    spec = _import(inter_path, items_path, out, force=True, samples_per_shard=100)
    assert sorted(p.name for p in out.glob("*.tar")) == ["eval-000000.tar", "train-000000.tar"]
    assert read_spec(out) == spec
    assert not list(tmp_path.glob(".dataset*"))


def test_directory_of_parquet_files(tmp_path: Path) -> None:
    inter = _interactions_table()
    (tmp_path / "logs").mkdir()
    pq.write_table(inter.slice(0, 8), tmp_path / "logs" / "part-0.parquet")
    pq.write_table(inter.slice(8), tmp_path / "logs" / "part-1.parquet")
    items = _items_table(tmp_path, "bytes").append_column("vendor", pa.array([7] * N_ITEMS))
    _, items_path = _write(tmp_path, inter, items)
    with pytest.warns(UserWarning, match="ignoring columns outside the import schema: vendor"):
        spec = _import(tmp_path / "logs", items_path, tmp_path / "out")
    assert spec.counts["train"] + spec.counts["eval"] == N_ROWS


# ------------------------------------------------------------------------------------------- bad input (issue 12)


def _no_leftovers(tmp_path: Path) -> bool:
    return not list(tmp_path.glob(".dataset*"))


def test_image_file_over_the_cap_is_refused_before_it_is_read(tmp_path: Path) -> None:
    items = _items_table(tmp_path, "path")
    with open(tmp_path / "img" / "3.jpg", "wb") as f:
        f.truncate(2 * 2**30)  # sparse: 2 GiB on paper, no disk used; reading it would take 2 GiB of memory
    inter_path, items_path = _write(tmp_path, _interactions_table(), items)
    with pytest.raises(DataImportError) as err:
        _import(inter_path, items_path, tmp_path / "dataset")
    message = str(err.value)
    assert f"{items_path}, column 'image_path', row 3: {tmp_path / 'img' / '3.jpg'}" in message
    assert "2,147,483,648 bytes, over the 33,554,432-byte cap" in message
    assert not (tmp_path / "dataset").exists() and _no_leftovers(tmp_path)


def test_image_bytes_over_the_cap_name_the_row(tmp_path: Path) -> None:
    inter_path, items_path = _write(tmp_path, _interactions_table(), _items_table(tmp_path, "bytes"))
    with pytest.raises(DataImportError, match=r"column 'image', row 0: \d+ bytes, over the 100-byte cap"):
        _import(inter_path, items_path, tmp_path / "dataset", max_image_bytes=100)


@pytest.mark.parametrize("link", [True, False])
def test_image_path_to_a_non_image_names_the_row(tmp_path: Path, link: bool) -> None:
    items = _items_table(tmp_path, "path")
    target = (
        tmp_path / "notes"
    )  # no suffix: the old importer took the format from the target's name (KeyError '')
    target.write_text("not an image")
    (tmp_path / "img" / "4.jpg").unlink()
    if link:
        (tmp_path / "img" / "4.jpg").symlink_to(target)
    else:
        (tmp_path / "img" / "4.jpg").write_text("not an image")
    inter_path, items_path = _write(tmp_path, _interactions_table(), items)
    shown = f"{tmp_path / 'img' / '4.jpg'} -> {target}" if link else str(tmp_path / "img" / "4.jpg")
    with pytest.raises(DataImportError) as err:
        _import(inter_path, items_path, tmp_path / "dataset")
    assert str(err.value) == f"{items_path}, column 'image_path', row 4: {shown} is not a JPEG or PNG file"


def test_symlinked_image_takes_its_format_from_its_bytes(tmp_path: Path) -> None:
    items = _items_table(tmp_path, "path")
    target = tmp_path / "blob"
    target.write_bytes(_image("PNG", 9))
    (tmp_path / "img" / "0.jpg").unlink()
    (tmp_path / "img" / "0.jpg").symlink_to(target)
    inter_path, items_path = _write(tmp_path, _interactions_table(), items)
    _import(inter_path, items_path, tmp_path / "dataset")
    members = [m for _, r, m in _read_split(tmp_path / "dataset", "train") if r["item_id"] == BASE_ID]
    assert members and all(m == {"png": target.read_bytes()} for m in members)


@pytest.mark.parametrize("column", ["user_id", "history_recent"])
def test_uint64_past_int64_names_the_row(tmp_path: Path, column: str) -> None:
    inter = _interactions_table()
    values = inter[column].to_pylist()
    huge = 2**63 + 1
    if column == "user_id":
        values[4] = huge
        array = pa.array(values, pa.uint64())
    else:
        values[4] = [1, huge]
        array = pa.array(values, pa.list_(pa.uint64()))
    inter = inter.set_column(inter.column_names.index(column), column, array)
    inter_path, items_path = _write(tmp_path, inter, _items_table(tmp_path, "bytes"))
    with pytest.raises(DataImportError, match=rf"{inter_path}, column '{column}', row 4: {huge} is beyond"):
        _import(inter_path, items_path, tmp_path / "dataset")


def test_dense_value_past_float32_names_the_row(tmp_path: Path) -> None:
    inter = _interactions_table()
    prices = inter["dense_price"].to_pylist()
    prices[6] = 1e39  # finite in float64 and JSON, inf in the float32 batch: the reader rejects it
    inter = inter.set_column(inter.column_names.index("dense_price"), "dense_price", pa.array(prices))
    inter_path, items_path = _write(tmp_path, inter, _items_table(tmp_path, "bytes"))
    with pytest.raises(
        DataImportError, match=r"'dense_price', row 6: 1e\+39 \(NaN/inf, or not finite as float32"
    ):
        _import(inter_path, items_path, tmp_path / "dataset")


def test_non_parquet_input_names_the_file(tmp_path: Path) -> None:
    _, items_path = _write(tmp_path, _interactions_table(), _items_table(tmp_path, "bytes"))
    (tmp_path / "logs").mkdir()
    pq.write_table(_interactions_table(), tmp_path / "logs" / "part-0.parquet")
    csv = tmp_path / "logs" / "part-1.parquet"
    csv.write_text("user_id,item_id\n1,2\n")
    with pytest.raises(DataImportError, match=rf"^{csv}: not a readable Parquet file \(.*magic bytes"):
        _import(tmp_path / "logs", items_path, tmp_path / "dataset")


@pytest.mark.parametrize("how", ["ctrl_c", "sigterm"])
def test_interrupt_removes_the_partial_directory(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, how: str
) -> None:
    inter_path, items_path = _write(tmp_path, _interactions_table(), _items_table(tmp_path, "bytes"))

    def interrupted(*args: Any) -> None:
        assert list(tmp_path.glob(".dataset.partial/*.tar"))  # shards were written
        if how == "ctrl_c":
            raise KeyboardInterrupt
        os.kill(os.getpid(), signal.SIGTERM)

    monkeypatch.setattr(importer, "train_tokenizer", interrupted)
    with pytest.raises(KeyboardInterrupt if how == "ctrl_c" else SystemExit):
        _import(inter_path, items_path, tmp_path / "dataset")
    assert not (tmp_path / "dataset").exists() and _no_leftovers(tmp_path)
    assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL


def test_kill_between_the_final_renames_is_repaired_next_time(tmp_path: Path) -> None:
    inter_path, items_path = _write(tmp_path, _interactions_table(), _items_table(tmp_path, "bytes"))
    out = tmp_path / "dataset"
    _import(inter_path, items_path, out)
    before = {p.name: p.read_bytes() for p in out.iterdir() if p.is_file()}
    old, partial = tmp_path / ".dataset.old", tmp_path / ".dataset.partial"

    # Killed between the renames: the previous dataset is at .old, none at out; it is put back.
    out.rename(old)
    partial.mkdir()
    (partial / "train-000000.tar").write_bytes(b"half written")
    with pytest.warns(UserWarning, match="restored it to"), pytest.raises(FileExistsError, match="--force"):
        _import(inter_path, items_path, out)
    assert {p.name: p.read_bytes() for p in out.iterdir() if p.is_file()} == before
    assert _no_leftovers(tmp_path)

    # Killed after them: .old is the replaced dataset beside the new one; it is removed.
    shutil.copytree(out, old)
    with pytest.warns(UserWarning, match="removed the dataset an interrupted import had replaced"):
        _import(inter_path, items_path, out, force=True)
    assert _no_leftovers(tmp_path)


def test_items_parquet_is_written_a_bounded_run_of_images_at_a_time(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    inter_path, items_path = _write(tmp_path, _interactions_table(), _items_table(tmp_path, "path"))
    monkeypatch.setattr(importer, "ITEMS_CHUNK_BYTES", 1)  # every item's images end a row group
    _import(inter_path, items_path, tmp_path / "dataset")
    written = pq.ParquetFile(tmp_path / "dataset" / "items.parquet")
    assert written.metadata.num_row_groups == N_ITEMS
    images = written.read()["images"].to_pylist()
    assert images == [[(tmp_path / "img" / f"{k}.jpg").read_bytes()] for k in range(N_ITEMS)]
