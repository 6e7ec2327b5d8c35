"""`lemur data inspect`: measured numbers agree with dataset.json, the contact sheet is drawn, bad data is reported."""

from __future__ import annotations

import io
import pickle
import shutil
import tarfile
from pathlib import Path

import pytest
from PIL import Image

from trainer.config import load_config
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
    problems = {(p["shard"], p["member"]): p["error"] for p in report["problems"]}
    assert problems[(shard.name, "eval_000000_000000.json")].startswith("bad JSON")
    assert problems[(shard.name, "eval_000000_000001.jpg")].startswith("bad image")
    assert report["counts"]["eval"] == spec.counts["eval"] - 1
    assert report["counts"]["train"] == spec.counts["train"]
    assert report["members"]["other"] == 1
    assert "valid samples read" in problems[(shard.name, "")]
    assert len(problems) == 3


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
    errors = [p["error"] for p in report["problems"] if p["shard"] == shard.name]
    assert any("unreadable tar" in error for error in errors)
    assert any("valid samples read" in error for error in errors)
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
