"""embeddings.id_map = "vocab" (`trainer/data/id_vocab.py`): every item id of the train split gets an item-table row
of its own and every other id one reserved row; the vocabulary is cached beside the dataset and rebuilt when the
train shards change; a vocabulary larger than the table stops the run. On the tiny churn world the reader's batches
carry those rows, and through training the reserved row's ID-gate count stays 0, so every cold eval item (in no
training sample) reads the new-item embedding, where hashing puts about a fifth of them on trained rows."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch

from embeddings.tables import hash_ids
from tests.conftest import small_config
from tests.test_content_source import _trainer, in_process
from tests.test_synth import records
from tests.test_synth_churn import SMALL_CHURN
from trainer.config.schema import ConfigError
from trainer.data import id_vocab
from trainer.data.id_vocab import RESERVED_ROW, IdVocab, id_vocab_for
from trainer.data.reader import make_batch_stream
from trainer.data.spec import read_spec, write_spec
from trainer.dataset_tools.synth.generate import synthesize
from trainer.models.model import plan_id_tables, target_rows

VOCAB = 'embeddings.id_map="vocab"'
BATCH = 256
"""The training run's batch: an epoch of the tiny churn world in 9 steps (a test's time is mostly steps)."""


@pytest.fixture(scope="module")
def churn(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny churn world of test_synth_churn: 200 items (400 item-table rows), 2,400 train and 600 eval samples,
    about a third of the eval rows on items in no training sample."""
    out = tmp_path_factory.mktemp("churn") / "data"
    synthesize(small_config(out, *SMALL_CHURN).data.synth, out, vocab_size=300, progress=False)
    return out


def in_training(dataset: Path) -> set[int]:
    """The item ids of the train records, targets and history items (what the dataset's `cold` flag is measured on)."""
    train = records(dataset, "train")
    return {r["item_id"] for r in train} | {i for r in train for ids in r["history"].values() for i in ids}


def vocab_of(dataset: Path, *overrides: str) -> IdVocab:
    cfg = small_config(dataset, VOCAB, *overrides)
    spec = read_spec(dataset)
    vocab = id_vocab_for(cfg, spec, plan_id_tables(spec, cfg.embeddings).rows)
    assert vocab is not None
    return vocab


def test_train_ids_get_rows_of_their_own_and_every_other_id_the_reserved_row(churn: Path) -> None:
    vocab = vocab_of(churn)
    train = np.array(sorted(in_training(churn)))
    assert vocab.ids.tolist() == train.tolist()
    # the rows plan_tables gives the item table (twice the catalog), unchanged
    assert vocab.rows == 2 * read_spec(churn).cardinalities["item_id"]
    rows = vocab.rows_of(train)
    assert len(np.unique(rows)) == len(train) and RESERVED_ROW not in rows and rows.max() < vocab.rows
    items = pq.read_table(churn / "items.parquet").to_pydict()
    never_trained = np.array([i for i, cold in zip(items["item_id"], items["cold_start"]) if cold])
    assert len(never_trained) > 10
    strangers = np.array([-1, 0, 2**62, 2**63 - 1, -(2**63), train.max() + 1, train.min() - 1])
    assert (vocab.rows_of(np.concatenate([never_trained, strangers])) == RESERVED_ROW).all()
    # the dataset's cold flag is exactly "not in the vocabulary"
    evals = records(churn, "eval")
    flagged = np.array([r["cold"] for r in evals], dtype=bool)
    eval_rows = vocab.rows_of(np.array([r["item_id"] for r in evals]))
    assert flagged.any() and np.array_equal(eval_rows == RESERVED_ROW, flagged)
    # what it replaces: hashing puts cold eval items on rows that training targets use
    targets = torch.tensor(sorted({r["item_id"] for r in records(churn, "train")}))
    table = torch.tensor(vocab.rows)
    hashed = hash_ids(torch.tensor([r["item_id"] for r in evals if r["cold"]]), table)
    assert torch.isin(hashed, hash_ids(targets, table)).float().mean() > 0.1


def test_the_reader_puts_the_item_features_on_vocabulary_rows_and_still_hashes_the_rest(churn: Path) -> None:
    cfg = small_config(churn, VOCAB)
    spec = read_spec(churn)
    plan = plan_id_tables(spec, cfg.embeddings)
    stream = make_batch_stream(cfg, "eval", table_rows=plan.rows, raw_histories=True)
    vocab = stream.dataset.collator.spec.id_vocab
    assert vocab is not None, 'embeddings.id_map = "vocab" did not reach the reader (make_batch_stream)'
    cold_rows = 0
    for batch in stream:
        rows, _ = target_rows(batch)
        assert torch.equal(rows, torch.from_numpy(vocab.rows_of(batch.item_id.numpy())))
        cold = batch.cold & batch.valid
        assert (rows[cold] == RESERVED_ROW).all() and (rows[batch.valid & ~batch.cold] != RESERVED_ROW).all()
        cold_rows += int(cold.sum())
        sequences, raw = batch.sequences.to_dict(), batch.raw_histories.to_dict()
        for name in spec.history:
            expected = vocab.rows_of(raw[name].values().numpy())
            assert torch.equal(sequences[name].values(), torch.from_numpy(expected))
        user = batch.sparse.to_dict()["user_id"].values()
        assert torch.equal(user, hash_ids(batch.user_id, torch.tensor(plan.rows["user_id"])))
    assert cold_rows > 50


def test_the_vocabulary_is_cached_and_rebuilt_when_the_train_shards_change(
    churn: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    dataset = tmp_path / "data"
    shutil.copytree(churn, dataset, ignore=shutil.ignore_patterns(".cache"))
    builds = []
    build = id_vocab.build_item_vocab
    monkeypatch.setattr(id_vocab, "build_item_vocab", lambda *a: builds.append(1) or build(*a))
    monkeypatch.setattr(id_vocab, "FLUSH_IDS", 100)  # many merges of a buffer into the ids so far
    first = vocab_of(dataset)
    assert len(builds) == 1 and len(list((dataset / ".cache").glob("item-vocab-*.npy"))) == 1
    assert first.ids.tolist() == sorted(in_training(dataset))
    again = vocab_of(dataset)
    assert len(builds) == 1 and np.array_equal(first.ids, again.ids)  # read from the cache
    # the newest train shard replaced by the oldest (dataset.json's count with it): its new items leave training
    spec = read_spec(dataset)
    oldest, newest = spec.shards["train"][0], spec.shards["train"][-1]
    (dataset / newest.name).write_bytes((dataset / oldest.name).read_bytes())
    newest.samples = oldest.samples
    write_spec(dataset, spec)
    changed = vocab_of(dataset)
    assert len(builds) == 2
    assert changed.ids.tolist() == sorted(in_training(dataset)) != first.ids.tolist()
    assert sorted(p.name.endswith(".npy") for p in (dataset / ".cache").iterdir()) == [
        True,
        True,
    ]  # no partials


def test_a_vocabulary_larger_than_the_item_table_stops_the_run(churn: Path) -> None:
    n = len(in_training(churn))
    with pytest.raises(
        ConfigError, match=rf"{n} distinct item ids \(feature 'item_id'.*for {n} rows.*at least {n + 1}"
    ):
        vocab_of(churn, f"embeddings.hash_sizes={{item_id = {n}}}")
    assert (
        vocab_of(churn, f"embeddings.hash_sizes={{item_id = {n + 1}}}").rows_of(np.array([-1]))[0]
        == RESERVED_ROW
    )
    assert small_config(churn).embeddings.id_map == "hash"  # hashing stays the default
    with pytest.raises(ConfigError, match="embeddings.id_map: must be hash or vocab"):
        small_config(churn, 'embeddings.id_map="modulo"')


def _cold_items_read_count_zero(dataset: str, out: str) -> None:
    overrides = ["model.use_content=false", "model.id_gate_count=5", VOCAB, f"data.batch_size={BATCH}"]
    t = _trainer(dataset, overrides, out)
    steps = t.train_stream.dataset.batches_per_epoch()  # one epoch (9 steps): every train target counted once
    stream, losses = iter(t.train_stream), []
    for _ in range(steps):
        losses.append(float(t.train_step(next(stream))))
        t.step += 1
    assert all(np.isfinite(losses)) and np.mean(losses[-3:]) < np.mean(losses[:3])
    counts = t.model.dense.id_counts
    assert int(counts.sum()) == steps * t.cfg.data.batch_size and int(counts[RESERVED_ROW]) == 0
    cold_seen = warm_known = 0
    for batch in t.batches("eval"):
        batch = t.to_device(batch)
        rows, _ = target_rows(batch)
        gate = t.model.dense.id_gate(rows)
        cold = batch.cold & batch.valid
        assert (rows[cold] == RESERVED_ROW).all() and (gate[cold] == 0).all()
        cold_seen += int(cold.sum())
        warm_known += int((gate[batch.valid & ~batch.cold] > 0).sum())
    assert cold_seen > 50 and warm_known > 50  # the gate tells the two apart
    metrics = t.evaluate()
    assert 0.0 <= metrics["cold_auc"] <= 1.0


def test_training_with_the_vocabulary_leaves_cold_eval_items_at_count_zero(
    churn: Path, tmp_path: Path
) -> None:
    in_process(_cold_items_read_count_zero, str(churn), str(tmp_path / "run"))
