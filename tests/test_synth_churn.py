"""The churn world (`data.synth.world = "churn"`): items born over the timeline, a long tail, eval targets and
history items with few or no training impressions, `cold` exact; and the static world left as it was."""

from __future__ import annotations

import hashlib
from collections import Counter
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest

from tests.conftest import small_config
from tests.test_synth import records
from trainer.config import ConfigError, load_config
from trainer.data.spec import read_spec
from trainer.dataset_tools.synth.generate import synthesize
from trainer.dataset_tools.synth.world import EPOCH, SECONDS_PER_DAY, build_world

CHURN = ('data.synth.world="churn"', "data.synth.images_per_item=0")
# The small churn world: 200 items, 4 born a day (0.02 of the catalog), 3-day lifetime, 3,000 samples.
SMALL_CHURN = (*CHURN, "data.synth.num_samples=3000", "data.synth.samples_per_shard=500")


@pytest.fixture(scope="module")
def churn_dataset(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("churn") / "data"
    cfg = small_config(out, *SMALL_CHURN)
    synthesize(cfg.data.synth, out, vocab_size=300, progress=False)
    return out


def test_cold_is_exactly_the_items_in_no_training_sample(churn_dataset: Path) -> None:
    train, evals = records(churn_dataset, "train"), records(churn_dataset, "eval")
    in_train = {r["item_id"] for r in train} | {i for r in train for i in r["history"]["long"]}
    assert all(r["cold"] == int(r["item_id"] not in in_train) for r in evals)
    items = pq.read_table(churn_dataset / "items.parquet").to_pydict()
    cold = {i for i, c in zip(items["item_id"], items["cold_start"]) if c}
    assert cold == set(items["item_id"]) - in_train
    spec = read_spec(churn_dataset)
    assert spec.counts["cold_items"] == len(cold) and spec.split["cold_item_share"] == pytest.approx(
        len(cold) / len(items["item_id"]), abs=1e-5
    )


def test_eval_targets_and_histories_have_few_or_no_training_impressions(churn_dataset: Path) -> None:
    """About half the eval rows show an item never trained on (the static tiny world: 17%), most of the rest items
    seen a few times; fresh items reach eval histories too."""
    train, evals = records(churn_dataset, "train"), records(churn_dataset, "eval")
    shown = Counter(r["item_id"] for r in train)
    impressions = np.array([shown[r["item_id"]] for r in evals])
    assert 0.3 < np.mean(impressions == 0) < 0.7
    assert np.mean(impressions == 0) == pytest.approx(np.mean([r["cold"] for r in evals]), abs=0.05)
    assert np.mean(impressions <= 5) > 0.45
    recent = [i for r in evals for i in r["history"]["short"]]
    assert 0.03 < np.mean([shown[i] == 0 for i in recent]) < 0.5
    assert 0.1 < read_spec(churn_dataset).label_rate["eval"] < 0.5


def test_items_are_born_over_the_timeline_and_never_shown_before(churn_dataset: Path) -> None:
    cfg = small_config("unused", *SMALL_CHURN).data.synth
    world = build_world(cfg)
    day = world.item_birth / SECONDS_PER_DAY
    # A steady 4 items a day (0.02 x 200) over the 50 days before the log's end, 20 of them before the log.
    assert day.min() >= -1 / cfg.new_items_per_day + cfg.days and day.max() < cfg.days
    per_day = np.bincount(np.floor(day - day.min()).astype(int))
    assert per_day.sum() == cfg.num_items and per_day.min() >= 3 and per_day.max() <= 5
    index = {int(i): k for k, i in enumerate(world.item_ids)}
    for r in records(churn_dataset, "train") + records(churn_dataset, "eval"):
        assert r["timestamp"] - EPOCH >= world.item_birth[index[r["item_id"]]]
    # Fresh items take the impressions: the median shown item is a few days old.
    ages = [
        (r["timestamp"] - EPOCH - world.item_birth[index[r["item_id"]]]) / SECONDS_PER_DAY
        for r in records(churn_dataset, "train")
    ]
    assert np.median(ages) < 2 * cfg.item_lifetime_days


def test_popularity_has_a_long_tail(churn_dataset: Path) -> None:
    """The top 10% of the catalog take a large share of the training impressions (here 0.39)."""
    shown = np.array(sorted(Counter(r["item_id"] for r in records(churn_dataset, "train")).values()))[::-1]
    num_items = read_spec(churn_dataset).counts["items"]
    assert shown[: num_items // 10].sum() / shown.sum() > 0.3  # a uniform catalog: 0.1


def test_same_seed_same_bytes_whatever_the_worker_count(tmp_path: Path) -> None:
    outs = []
    for workers, name in ((1, "a"), (2, "b"), (2, "c")):
        seed = 1 if name == "c" else 0
        cfg = small_config(
            tmp_path / name,
            *CHURN,
            "data.synth.num_samples=900",
            f"data.synth.workers={workers}",
            f"data.synth.seed={seed}",
        )
        synthesize(cfg.data.synth, tmp_path / name, vocab_size=300, progress=False)
        outs.append(tmp_path / name)
    a, b, c = outs
    assert (a / "dataset.json").read_text() == (b / "dataset.json").read_text()
    for info in read_spec(a).shards["train"] + read_spec(a).shards["eval"]:
        assert (a / info.name).read_bytes() == (b / info.name).read_bytes()
    assert pq.read_table(a / "items.parquet").equals(pq.read_table(b / "items.parquet"))
    assert (a / "eval-000000.tar").read_bytes() != (c / "eval-000000.tar").read_bytes()


# sha256 of dataset.json and the shards (in spec order) of the static world at small_config + 600 samples, written
# by the generator before the churn world existed (commit c9aabb0): the default world must not change a byte.
STATIC_DIGEST = "95265d1a244c84e1be29e4abe6534867ada705034dee3030843d54cb04c226dd"


def static_digest(dataset: Path) -> str:
    digest = hashlib.sha256((dataset / "dataset.json").read_bytes())
    spec = read_spec(dataset)
    for info in spec.shards["train"] + spec.shards["eval"]:
        digest.update((dataset / info.name).read_bytes())
    return digest.hexdigest()


def test_static_world_is_unchanged(tmp_path: Path) -> None:
    cfg = small_config(tmp_path, "data.synth.num_samples=600")
    assert cfg.data.synth.world == "static"
    synthesize(cfg.data.synth, tmp_path, vocab_size=300, progress=False)
    assert static_digest(tmp_path) == STATIC_DIGEST


@pytest.mark.parametrize(
    "override, message",
    [
        ('data.synth.world="drift"', "data.synth.world: must be static or churn"),
        ("data.synth.new_items_per_day=0.04", "data.synth.new_items_per_day: must be > 0"),
        ("data.synth.item_lifetime_days=0.01", r"data.synth.item_lifetime_days: must be in \[0.1"),
    ],
)
def test_churn_settings_are_validated(override: str, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        load_config("tiny", ['data.synth.world="churn"', override])
    if "world=" not in override:  # the churn knobs do not bind the static world
        load_config("tiny", [override])
