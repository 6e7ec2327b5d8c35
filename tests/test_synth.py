"""The synthetic generator: deterministic, time-split, cold items unseen in train, and a learnable signal."""

from __future__ import annotations

import json
import tarfile
from collections import defaultdict
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest

from tests.conftest import small_config
from trainer.data.spec import read_spec
from trainer.dataset_tools.synth.generate import synthesize


def records(dataset: Path, split: str) -> list[dict]:
    out = []
    for info in read_spec(dataset).shards[split]:
        with tarfile.open(dataset / info.name) as tar:
            out += [json.loads(tar.extractfile(m).read()) for m in tar if m.name.endswith(".json")]
    return out


def test_same_seed_same_bytes_whatever_the_worker_count(tmp_path: Path) -> None:
    outs = []
    for workers, name in ((1, "a"), (2, "b")):
        cfg = small_config(tmp_path / name, "data.synth.num_samples=600", f"data.synth.workers={workers}")
        synthesize(cfg.data.synth, tmp_path / name, vocab_size=300, progress=False)
        outs.append(tmp_path / name)
    a, b = outs
    assert (a / "dataset.json").read_text() == (b / "dataset.json").read_text()
    for info in read_spec(a).shards["train"] + read_spec(a).shards["eval"]:
        assert (a / info.name).read_bytes() == (b / info.name).read_bytes()
    assert pq.read_table(a / "items.parquet").equals(pq.read_table(b / "items.parquet"))
    # the trained tokenizer too (its trainer numbered "##" pieces in hash-map order: another vocabulary each run)
    assert (a / "tokenizer" / "tokenizer.json").read_bytes() == (
        b / "tokenizer" / "tokenizer.json"
    ).read_bytes()
    cfg = small_config(tmp_path / "c", "data.synth.num_samples=600", "data.synth.seed=1")
    synthesize(cfg.data.synth, tmp_path / "c", vocab_size=300, progress=False)
    assert (a / "train-000000.tar").read_bytes() != (tmp_path / "c" / "train-000000.tar").read_bytes()


def test_counts_time_split_and_shapes(small_dataset: Path) -> None:
    spec = read_spec(small_dataset)
    train, evals = records(small_dataset, "train"), records(small_dataset, "eval")
    assert len(train) == spec.counts["train"] == 1440 and len(evals) == spec.counts["eval"] == 360
    assert [s.samples for s in spec.shards["train"]] == [300, 300, 300, 300, 240]
    boundary = spec.split["eval_from_timestamp"]
    assert max(r["timestamp"] for r in train) < boundary <= min(r["timestamp"] for r in evals)
    assert np.mean([r["labels"]["click"] for r in train]) == pytest.approx(spec.label_rate["train"], abs=1e-5)
    assert 0.1 < spec.label_rate["train"] < 0.5
    for r in train + evals:
        assert len(r["history"]["long"]) <= 40 and r["history"]["short"] == r["history"]["long"][-10:]
        assert set(r["text"]) == {"title", "description", "ocr"} and r["query"]
    assert np.mean([len(r["history"]["long"]) > 0 for r in train]) > 0.95


def test_cold_items_never_reach_training(small_dataset: Path) -> None:
    items = pq.read_table(small_dataset / "items.parquet").to_pydict()
    cold = {i for i, c in zip(items["item_id"], items["cold_start"]) if c}
    train, evals = records(small_dataset, "train"), records(small_dataset, "eval")
    assert cold and not cold & {r["item_id"] for r in train}
    assert not cold & {i for r in train + evals for i in r["history"]["long"]}
    eval_cold = [r for r in evals if r["item_id"] in cold]
    assert eval_cold and all(r["cold"] == 1 for r in eval_cold)
    assert all(r["cold"] == 0 for r in evals if r["item_id"] not in cold)


def test_history_and_content_carry_the_signal(small_dataset: Path) -> None:
    """Clicks follow the user's history (category overlap), and items of one category share title words:
    what the models have to learn is there."""
    items = pq.read_table(small_dataset / "items.parquet").to_pydict()
    category = dict(zip(items["item_id"], items["category"]))
    train = records(small_dataset, "train")
    match = [
        r["labels"]["click"]
        for r in train
        if category[r["item_id"]] in {category[i] for i in r["history"]["long"]}
    ]
    other = [
        r["labels"]["click"]
        for r in train
        if category[r["item_id"]] not in {category[i] for i in r["history"]["long"]}
    ]
    assert np.mean(match) > np.mean(other) + 0.05

    words = defaultdict(list)
    for cat, title in zip(items["category"], items["title"]):
        words[cat].append(set(title.split()))

    def overlap(pairs: list[tuple[set, set]]) -> float:
        return float(np.mean([len(a & b) / len(a | b) for a, b in pairs]))

    same = [(a, b) for group in words.values() for a, b in zip(group, group[1:])]
    groups = list(words.values())
    across = [(g[0], h[0]) for g, h in zip(groups, groups[1:])]
    assert overlap(same) > 2 * overlap(across)


def test_refuses_to_overwrite_without_force(small_dataset: Path, tmp_path: Path) -> None:
    cfg = small_config(tmp_path / "x", "data.synth.num_samples=300")
    (tmp_path / "x").mkdir()
    (tmp_path / "x" / "notes.txt").write_text("mine")
    with pytest.raises(FileExistsError):
        synthesize(cfg.data.synth, tmp_path / "x", progress=False)
    with pytest.raises(FileExistsError, match="not a lemur dataset"):
        synthesize(cfg.data.synth, tmp_path / "x", force=True, progress=False)
    assert (tmp_path / "x" / "notes.txt").read_text() == "mine"
