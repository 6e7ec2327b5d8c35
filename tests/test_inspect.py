"""`lemur data inspect`: measured numbers agree with dataset.json, the contact sheet is drawn, bad data is reported."""

from __future__ import annotations

import io
import json
import pickle
import shutil
import tarfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from PIL import Image

from trainer.config import load_config
from trainer.data import record as binary_record
from trainer.data.decode import parse_sample
from trainer.data.spec import DatasetSpec, read_spec
from trainer.dataset_tools.inspect import THUMB, abbreviate, inspect_dataset
from trainer.dataset_tools.synth.generate import synthesize

SMALL = [
    "data.synth.num_samples=1500",
    "data.synth.samples_per_shard=500",
    "data.synth.num_items=200",
    "data.synth.num_users=50",
    'data.synth.record_format="json"',  # these tests edit JSON records; test_record.py inspects binary ones
]
HEADINGS = [
    "== spec ==",
    "== splits ==",
    "== labels ==",
    "== cardinalities ==",
    "== history lengths ==",
    "== text lengths (chars) ==",
    "== images ==",
    "== samples (first 2) ==",
    "== contact sheet ==",
    "== problems",
]


def make_dataset(out: Path, overrides: list[str]) -> DatasetSpec:
    cfg = load_config("tiny", SMALL + overrides)
    return synthesize(cfg.data.synth, out, vocab_size=500, force=True, progress=False)


@pytest.fixture(scope="module")
def image_dataset(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("inspect") / "images"
    make_dataset(out, [])
    return out


@pytest.fixture(scope="module")
def image_report(image_dataset: Path) -> dict:
    return inspect_dataset(str(image_dataset), samples=2)


def test_measured_counts_match_spec(image_dataset: Path, image_report: dict) -> None:
    spec = read_spec(image_dataset)
    assert image_report["counts"] == {split: spec.counts[split] for split in spec.shards}
    assert image_report["shards"] == {split: len(shards) for split, shards in spec.shards.items()}
    assert sum(image_report["counts"].values()) == 1500
    assert image_report["members"]["json"] == 1500
    assert image_report["members"]["image"] == 1500
    assert image_report["problems"] == []


def test_label_rate_matches_spec(image_dataset: Path, image_report: dict) -> None:
    spec = read_spec(image_dataset)
    for split, rate in spec.label_rate.items():
        assert image_report["label_rate"][split] == pytest.approx(rate, abs=1e-4)


def test_cardinalities_match_spec(image_dataset: Path, image_report: dict) -> None:
    spec = read_spec(image_dataset)
    measured = image_report["cardinalities"]["measured"]
    assert measured["user_id"] == spec.cardinalities["user_id"]
    assert measured["query_id"] == spec.cardinalities["query_id"]
    assert 0 < measured["item_id"] <= spec.counts["items"]
    assert 0 < measured["session_id"] <= 1500
    for name, feature in spec.sparse.items():
        assert 0 < measured[name] <= feature["cardinality"]


def test_history_histogram_covers_every_sample(image_dataset: Path, image_report: dict) -> None:
    spec = read_spec(image_dataset)
    assert set(image_report["history"]) == set(spec.history)
    for name, buckets in image_report["history"].items():
        assert sum(buckets.values()) == 1500
        assert image_report["history_lengths"][name]["max"] <= spec.history[name]


def test_text_lengths_measured(image_dataset: Path, image_report: dict) -> None:
    spec = read_spec(image_dataset)
    assert set(image_report["text"]) == set(spec.text) | {"query"}
    for stats in image_report["text"].values():
        assert stats["count"] == 1500
        assert 0 < stats["mean"] <= stats["max"]


def test_contact_sheet_written(image_dataset: Path, image_report: dict) -> None:
    sheet = Path(image_report["sheet"])
    assert sheet == image_dataset / "contact_sheet.png"
    with Image.open(sheet) as image:
        assert image.format == "PNG"
        assert 8 * THUMB <= image.width <= 10 * THUMB
        assert 8 * THUMB <= image.height <= 12 * THUMB
        assert len(image.convert("RGB").getcolors(maxcolors=1 << 16) or []) > 20


def test_sheet_path_option(image_dataset: Path, tmp_path: Path) -> None:
    sheet = tmp_path / "sub" / "sheet.png"
    report = inspect_dataset(str(image_dataset), samples=0, sheet=str(sheet))
    assert report["sheet"] == str(sheet)
    with Image.open(sheet) as image:
        assert image.width > THUMB


def test_output_has_sections(image_dataset: Path, capsys: pytest.CaptureFixture[str]) -> None:
    inspect_dataset(str(image_dataset), samples=2)
    out = capsys.readouterr().out
    for heading in HEADINGS:
        assert heading in out
    assert "... (" in out and "more)" in out  # long histories are abbreviated
    assert "jpg 32x32" in out


def test_text_only_dataset_writes_no_sheet(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "text_only"
    make_dataset(out, ["data.synth.images_per_item=0"])
    report = inspect_dataset(str(out), samples=1)
    assert report["sheet"] is None
    assert not (out / "contact_sheet.png").exists()
    assert report["members"].get("image", 0) == 0
    assert "no contact sheet written" in capsys.readouterr().out


def rewrite_shard(path: Path, edit: dict[str, bytes], extra: dict[str, bytes]) -> None:
    """Replace members by name, and add extra members next to the others of their key."""
    with tarfile.open(path) as tar:
        members = [(m.name, edit.get(m.name) or tar.extractfile(m).read()) for m in tar.getmembers()]
    for name, payload in extra.items():
        key = name.split(".")[0]
        last = max(i for i, (member, _) in enumerate(members) if member.startswith(key + "."))
        members.insert(last + 1, (name, payload))
    with tarfile.open(path, "w") as tar:
        for name, payload in members:
            info = tarfile.TarInfo(name)
            info.size = len(payload)
            tar.addfile(info, io.BytesIO(payload))


class Boom:
    def __reduce__(self) -> tuple:
        return (pytest.fail, ("inspect unpickled a member",))


def test_corrupt_members_are_reported(image_dataset: Path, tmp_path: Path) -> None:
    data = tmp_path / "corrupt"
    shutil.copytree(image_dataset, data)
    spec = read_spec(data)
    shard = data / spec.shards["eval"][0].name
    rewrite_shard(
        shard,
        edit={"eval_000000_000000.json": b"{not json", "eval_000000_000001.jpg": b"not a jpeg"},
        extra={"eval_000000_000002.pickle": pickle.dumps(Boom())},
    )
    report = inspect_dataset(str(data), samples=1)
    problems = {(p["shard"], p["key"], p["field"], p["reason"]) for p in report["problems"]}
    assert problems == {
        (shard.name, "eval_000000_000000", "json", "malformed_json"),
        (shard.name, "eval_000000_000001", "jpg", "bad_image"),
    }
    assert report["counts"] == {split: spec.counts[split] for split in spec.shards}  # no sample lost
    assert report["rejected"] == {"train": 0, "eval": 2}
    assert report["members"]["other"] == 1


@pytest.mark.parametrize("cut", ["in_data", "in_header"])
def test_truncated_shard_is_reported(image_dataset: Path, tmp_path: Path, cut: str) -> None:
    data = tmp_path / "truncated"
    shutil.copytree(image_dataset, data)
    spec = read_spec(data)
    shard = data / spec.shards["train"][0].name
    with tarfile.open(shard) as tar:
        middle = tar.getmembers()[len(tar.getmembers()) // 2]
    end = middle.offset_data + 10 if cut == "in_data" else middle.offset + 64
    shard.write_bytes(shard.read_bytes()[:end])
    report = inspect_dataset(str(data), samples=0)
    assert {p["reason"] for p in report["problems"] if p["shard"] == shard.name} == {
        "corrupt_tar",
        "count_mismatch",
    }
    assert 0 < report["counts"]["train"] < spec.counts["train"]
    assert report["counts"]["eval"] == spec.counts["eval"]


def test_missing_spec_names_the_path(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match=str(tmp_path)):
        inspect_dataset(str(tmp_path))


def test_abbreviate_long_lists() -> None:
    assert abbreviate({"h": list(range(100))}) == {"h": [0, 1, 2, 3, 4, "... (95 more)"]}
    assert abbreviate([1, 2, 3]) == [1, 2, 3]


def test_sheet_falls_back_to_shard_images(image_dataset: Path, tmp_path: Path) -> None:
    data = tmp_path / "no_catalog"
    shutil.copytree(image_dataset, data)
    (data / "items.parquet").unlink()
    (data / "contact_sheet.png").unlink(missing_ok=True)
    report = inspect_dataset(str(data), samples=0)
    assert report["sheet"] == str(data / "contact_sheet.png")
    with Image.open(report["sheet"]) as image:
        assert image.width >= 8 * THUMB


def edited_records(shard: Path, edits: dict[int, Callable[[dict[str, Any]], Any]]) -> dict[str, bytes]:
    """{member name: new .json bytes} for the shard's samples at the given positions, each edited in place."""
    with tarfile.open(shard) as tar:
        names = [m.name for m in tar.getmembers() if m.name.endswith(".json")]
        out = {}
        for index, edit in edits.items():
            record = json.loads(tar.extractfile(names[index]).read())
            edit(record)
            out[names[index]] = json.dumps(record).encode()
    return out


def test_what_the_reader_rejects_is_reported_per_shard_and_key(
    image_dataset: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    data = tmp_path / "rejects"
    shutil.copytree(image_dataset, data)
    spec = read_spec(data)
    shard = data / spec.shards["eval"][0].name
    expected = {  # sample -> (edit, field, reason): one of each kind the reader rejects
        0: (lambda r: r.update(user_id="17"), "user_id", "bad_id"),
        1: (lambda r: r.update(item_id=[1, 2]), "item_id", "bad_id"),  # crashed inspect with a TypeError
        2: (lambda r: r.update(item_id=2**63), "item_id", "bad_id"),
        3: (lambda r: r["sparse"].update(tags=[-(2**63) - 1]), "sparse.tags", "bad_id"),
        4: (lambda r: r["dense"].update(hour=float("nan")), "dense.hour", "nan_dense"),
        5: (lambda r: r["dense"].update(hour=1e39), "dense.hour", "nan_dense"),  # finite, but inf as float32
        6: (lambda r: r["dense"].update(hour="0.5"), "dense.hour", "bad_type"),
        7: (lambda r: r["labels"].update(click=2), "labels.click", "bad_label"),
        8: (lambda r: r["history"].update(short=list(range(21))), "history.short", "history_too_long"),
        9: (lambda r: r["text"].update(title="x" * 4001), "text.title", "text_too_long"),
        10: (lambda r: r.update(cold="false"), "cold", "bad_type"),
        11: (lambda r: r.pop("timestamp"), "timestamp", "missing_field"),
    }
    rewrite_shard(shard, edit=edited_records(shard, {i: e for i, (e, _, _) in expected.items()}), extra={})
    report = inspect_dataset(str(data), samples=0)

    keys = [f"eval_000000_{i:06d}" for i in expected]
    found = [(p["shard"], p["key"], p["field"], p["reason"]) for p in report["problems"]]
    assert found == [
        (shard.name, key, field, reason) for key, (_, field, reason) in zip(keys, expected.values())
    ]
    assert report["problem_counts"] == {
        "bad_id": 4, "nan_dense": 2, "bad_type": 2, "bad_label": 1, "history_too_long": 1, "text_too_long": 1,
        "missing_field": 1,
    }  # fmt: skip
    assert report["rejected"] == {"train": 0, "eval": 12}
    assert report["counts"]["eval"] == spec.counts["eval"]  # held: the shard holds them all
    assert (
        report["dense"]["hour"]["count"] == spec.counts["eval"] + spec.counts["train"] - 12
    )  # accepted only
    printed = capsys.readouterr().out
    assert "12 of 1500 samples would be rejected by the reader" in printed
    assert (
        f"! {shard.name} eval_000000_000002 field item_id: bad_id (9223372036854775808 is outside int64)"
        in printed
    )


def test_binary_records_are_checked_by_the_reader_too(image_dataset: Path, tmp_path: Path) -> None:
    data = tmp_path / "binary"
    shutil.copytree(image_dataset, data)
    spec = read_spec(data)
    shard = data / spec.shards["train"][1].name
    layout = binary_record.RecordLayout.of(spec)
    ((name, payload),) = edited_records(shard, {3: lambda r: r["labels"].update(click=2)}).items()
    key = name.split(".")[0]
    rec = binary_record.encode(json.loads(payload), layout)  # the reader takes .rec over .json
    rewrite_shard(shard, edit={}, extra={f"{key}.rec": rec})
    report = inspect_dataset(str(data), samples=0, max_text_chars=40)  # the reader's limit, as configured
    assert (shard.name, key, "labels.click", "bad_label") in {
        (p["shard"], p["key"], p["field"], p["reason"]) for p in report["problems"]
    }
    assert report["problem_counts"]["bad_label"] == 1
    assert report["problem_counts"]["text_too_long"] > 100  # descriptions are longer than 40 chars


def test_a_sample_that_crashes_the_reader_is_a_problem_not_a_crash(
    image_dataset: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from trainer.dataset_tools import inspect as inspect_module

    def crashes_on_one(raw: Any, *args: Any) -> Any:
        if raw.key == "train_000000_000007":
            raise TypeError("unhashable type: 'list'")
        return parse_sample(raw, *args)

    monkeypatch.setattr(inspect_module, "parse_sample", crashes_on_one)
    report = inspect_dataset(str(image_dataset), samples=0)
    assert report["problems"] == [
        {
            "shard": "train-000000.tar",
            "key": "train_000000_000007",
            "field": "",
            "reason": "reader_crash",
            "detail": "TypeError: unhashable type: 'list'",
        }
    ]
    assert report["rejected"]["train"] == 1
