"""The ID-frequency gate (model.id_gate_count) and the history cold path: the dense arch counts each item-table
row's training impressions as a target, the ranker reads g * ID + (1 - g) * new-item with g = n / (n + k), and an
item whose row never trained (n = 0) reads the new-item embedding alone, as target and as history token.

Pure logic runs on the plain model with no process group; the counting and its checkpoint run through the real
`Trainer` (one gloo process); the no-host-sync checks run the hot path on meta tensors, where any data-dependent
host read (`.item()`, `nonzero`, boolean indexing) raises."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest
import torch
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor

from tests.conftest import small_config
from tests.test_content_source import _trainer, in_process
from trainer.config.schema import ConfigError
from trainer.data.batch import Batch
from trainer.data.reader import make_batch_stream
from trainer.data.spec import read_spec
from trainer.data.text_fields import with_dataset_text
from trainer.models.model import LemurModel, build_model, history_rows, plan_id_tables, target_rows

K = 5
GATE = [f"model.id_gate_count={K}"]
PLAIN = ["model.use_content=false", "embeddings.dim=8", *GATE]


def plain_model(dataset: Path, *overrides: str) -> tuple[LemurModel, list[Batch]]:
    """The plain model (no process group, no wrappers) and a few train batches."""
    torch.manual_seed(0)
    cfg = with_dataset_text(small_config(dataset, *PLAIN, *overrides))
    spec = read_spec(dataset)
    plan = plan_id_tables(spec, cfg.embeddings)
    stream = make_batch_stream(cfg, "train", epochs=1, table_rows=plan.rows)
    tokenizer = stream.dataset.collator.tokenizer
    model = build_model(cfg, spec, plan, len(tokenizer), tokenizer.pad_token_id, "cpu")
    with torch.no_grad():
        model.dense.new_item.normal_()  # not its zero init: a new-item read must be told from a zero
    batches = []
    for batch in stream:
        batches.append(batch)
        if len(batches) == 3:
            break
    return model, batches


def expected_counts(batches: list[Batch], rows: int) -> torch.Tensor:
    counts = torch.zeros(rows, dtype=torch.long)
    for batch in batches:
        target, present = target_rows(batch)
        counts += torch.bincount(target[present & batch.valid], minlength=rows)
    return counts


def item_table(model: LemurModel) -> torch.Tensor:
    (weight,) = [p for name, p in model.sparse.named_parameters() if "item" in name]
    return weight


# ------------------------------------------------------------------------------------------- pure logic


def test_config_validates_the_gate(small_dataset: Path) -> None:
    assert small_config(small_dataset).model.id_gate_count == 0  # off by default
    with pytest.raises(ConfigError, match="id_gate_count"):
        small_config(small_dataset, "model.id_gate_count=-1")
    with pytest.raises(ConfigError, match="id_gate_history"):
        small_config(small_dataset, *GATE, 'model.id_gate_history="always"')


def test_the_gate_is_the_new_item_at_zero_and_tends_to_the_id(small_dataset: Path) -> None:
    model, _ = plain_model(small_dataset)
    dense = model.dense
    n = torch.tensor([0, 1, 5, 100, 10_000, 1_000_000])
    dense.id_counts[: n.numel()] = n
    g = dense.id_gate(torch.arange(n.numel()))
    assert torch.allclose(g, n.float() / (n.float() + K))
    ids = torch.randn(dense.new_item.numel()).expand(n.numel(), -1)  # one item, seen more and more
    out = dense.gated(ids, g)
    assert torch.equal(out[0], dense.new_item.detach())  # n = 0: exactly the new-item embedding
    gap = (out - ids).detach().norm(dim=1)
    assert bool((gap[1:] < gap[:-1]).all()) and float(gap[-1]) < 1e-4 * float(gap[0])  # -> the ID as n grows


def test_eval_marks_a_row_new_exactly_when_its_count_is_zero(small_dataset: Path) -> None:
    """In eval the dataset's `cold` flag no longer decides (it is set against the counts here): n does."""
    model, (batch, *_) = plain_model(small_dataset)
    dense = model.dense.eval()
    rows, _ = target_rows(batch)
    trained = rows % 2 == 0
    dense.id_counts[rows[trained]] = 3
    target = torch.randn(batch.size, dense.new_item.numel())
    out = dense.target_id_embedding(replace(batch, cold=trained), target)
    new = (out == dense.new_item.detach()).all(1)
    assert torch.equal(new, ~trained)
    g = 3 / (3 + K)
    assert torch.allclose(out[trained], g * target[trained] + (1 - g) * dense.new_item.detach(), atol=1e-6)


def test_item_id_dropout_still_works_with_the_gate(small_dataset: Path) -> None:
    model, (batch, *_) = plain_model(small_dataset, "model.item_id_dropout=0.25")
    dense = model.dense.train()
    dense.id_counts += 1_000_000  # every row well trained: only the dropout reads the new item
    target = torch.randn(4000, dense.new_item.numel())
    many = replace(
        batch,
        sequences=KeyedJaggedTensor.from_lengths_sync(
            ["item_id"], torch.arange(4000) % 50, torch.ones(4000, dtype=torch.long)
        ),
    )
    torch.manual_seed(0)
    replaced = (dense.target_id_embedding(many, target) == dense.new_item.detach()).all(1).float().mean()
    assert 0.22 < float(replaced) < 0.28


@pytest.mark.parametrize("encoder", ["mean", "longer"])
def test_rows_that_never_trained_do_not_reach_the_score(small_dataset: Path, encoder: str) -> None:
    """With every count 0, the item table (targets and history tokens alike) cannot change a logit: untrained
    rows are read as the new-item embedding. Counted rows (or the history gate off) do reach it."""
    model, (batch, *_) = plain_model(small_dataset, f"model.history_encoder={encoder}")
    model.eval()
    table = item_table(model)

    def logits() -> torch.Tensor:
        with torch.no_grad():
            return model.dense(batch, model.embed(batch)).logits

    before = logits()
    with torch.no_grad():
        table.add_(torch.randn_like(table))
    assert torch.equal(logits(), before)
    model.dense.id_gate_history = "off"  # the histories read their rows again
    assert not torch.allclose(logits(), before)
    model.dense.id_gate_history = "cold"
    assert torch.equal(logits(), before)
    model.dense.id_counts += 1  # now every row has trained once
    assert not torch.allclose(logits(), before)


@pytest.mark.parametrize("mode", ["gate", "cold"])
def test_history_tokens_of_untrained_items_read_the_new_item(small_dataset: Path, mode: str) -> None:
    model, (batch, *_) = plain_model(small_dataset, f'model.id_gate_history="{mode}"')
    dense = model.dense
    name = dense.history_names[-1]
    tokens, mask = model.embed(batch).histories[name]
    rows = batch.sequences[name].values()
    dense.id_counts[rows[rows % 2 == 0]] = 1_000_000
    out = dense.history_id_tokens(name, batch, tokens)
    hist = history_rows(batch, name, tokens.shape[1])
    untrained = mask & (dense.id_counts[hist] == 0)
    trained = mask & (dense.id_counts[hist] > 0)
    assert bool(untrained.any()) and bool(trained.any())
    assert bool((out[untrained] == dense.new_item.detach()).all())
    if mode == "cold":
        assert torch.equal(out[trained], tokens[trained])
    else:
        assert torch.allclose(out[trained], tokens[trained], atol=1e-4)


def test_the_gate_path_never_reads_the_device_on_the_host(small_dataset: Path) -> None:
    """Counting, the target gate and the history gate run on meta tensors: any host sync would raise."""
    model, (batch, *_) = plain_model(small_dataset)
    dense = model.dense.to("meta").train()
    meta = torch.device("meta")
    sequences = batch.sequences
    on_meta = replace(
        batch,
        sequences=KeyedJaggedTensor(
            keys=sequences.keys(),
            values=sequences.values().to(meta),
            lengths=sequences.lengths().to(meta),
            stride=sequences.stride(),
            length_per_key=sequences.length_per_key(),
            offset_per_key=sequences.offset_per_key(),
        ),
        valid=batch.valid.to(meta),
        cold=batch.cold.to(meta),
    )
    model.count_targets(on_meta)
    dim = dense.new_item.numel()
    dense.target_id_embedding(on_meta, torch.empty(batch.size, dim, device=meta))
    for mode in ("gate", "cold"):
        dense.id_gate_history = mode
        name = dense.history_names[-1]
        dense.history_id_tokens(name, on_meta, torch.empty(batch.size, 7, dim, device=meta))
    dense.eval()
    dense.target_id_embedding(on_meta, torch.empty(batch.size, dim, device=meta))
    with pytest.raises((NotImplementedError, RuntimeError)):  # the check can fail: a host read on meta raises
        dense.id_counts.nonzero()
    with pytest.raises(RuntimeError):
        dense.id_counts.sum().item()


def test_without_the_gate_nothing_is_counted_or_saved(small_dataset: Path) -> None:
    cfg = with_dataset_text(
        small_config(small_dataset, "model.use_content=false", "model.item_id_dropout=0.5")
    )
    spec = read_spec(small_dataset)
    model = build_model(cfg, spec, plan_id_tables(spec, cfg.embeddings), 500, 0, "cpu")
    assert model.dense.id_counts is None and "id_counts" not in model.dense.state_dict()


# ------------------------------------------------------------------------------------------- the trainer


def _counts_in_training(dataset: str, out: str) -> None:
    t = _trainer(dataset, ["model.use_content=false", *GATE, "model.item_id_dropout=0.5"], out)
    rows = t.model.dense.id_counts.numel()
    assert rows == t.plan.rows["item_id"]
    stream = iter(t.train_stream)
    seen = []
    for _ in range(3):
        batch = next(stream)
        before = t.model.dense.id_counts.clone()
        t.train_step(batch)
        t.step += 1
        assert torch.equal(t.model.dense.id_counts - before, expected_counts([batch], rows))
        seen.append(batch)
    assert int(t.model.dense.id_counts.sum()) == sum(int(b.valid.sum()) for b in seen)
    path = t.checkpointer.save(t.step)
    saved = t.model.dense.id_counts.clone()

    fresh = _trainer(dataset, ["model.use_content=false", *GATE, "model.item_id_dropout=0.5"], out + "-fresh")
    assert int(fresh.model.dense.id_counts.sum()) == 0
    fresh.checkpointer.load(path)
    assert torch.equal(fresh.model.dense.id_counts, saved)
    metrics: dict[str, Any] = fresh.evaluate()
    assert 0.0 <= metrics["auc"] <= 1.0


def test_training_counts_exactly_the_batch_targets_and_the_checkpoint_keeps_them(
    small_dataset: Path, tmp_path: Path
) -> None:
    in_process(_counts_in_training, str(small_dataset), str(tmp_path / "run"))


def _counts_on_two_ranks(rank: int, port: int, dataset: str, out: str) -> None:
    import torch.distributed as dist

    from tests.test_train import rank_environment

    rank_environment(rank, 2, port)
    t = _trainer(dataset, ["model.use_content=false", *GATE], out)
    rows = t.model.dense.id_counts.numel()
    stream, mine = iter(t.train_stream), []
    for _ in range(3):
        mine.append(next(stream))
        t.train_step(mine[-1])
        t.step += 1
    own = expected_counts(mine, rows)
    counts = t.model.dense.id_counts
    gathered = [torch.empty_like(counts) for _ in range(2)]
    dist.all_gather(gathered, counts)
    assert torch.equal(gathered[0], gathered[1])  # replicated: the same on every rank
    total = own.clone()
    dist.all_reduce(total)
    assert torch.equal(counts, total)  # every rank's targets, once
    assert not torch.equal(counts, own)  # the ranks read different samples
    dist.barrier()
    dist.destroy_process_group()


def test_two_ranks_count_every_ranks_targets_and_agree(small_dataset: Path, tmp_path: Path) -> None:
    from tests.test_train import run_ranks

    run_ranks(_counts_on_two_ranks, 2, str(small_dataset), str(tmp_path / "run"))


def test_kill_and_resume_with_the_gate_gives_the_same_losses(small_dataset: Path, tmp_path: Path) -> None:
    """tests/test_train.py's kill -9 test (2 ranks) with the gate and the dropout on: the counts resume exactly."""
    from tests.test_train import test_kill_and_resume_gives_the_same_losses

    test_kill_and_resume_gives_the_same_losses(small_dataset, tmp_path, [*GATE, "model.item_id_dropout=0.2"])
