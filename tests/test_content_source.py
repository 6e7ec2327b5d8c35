"""Where content vectors come from: encoder sampling (p forward, q backward) against the plain encoder call, the
item catalog against the reader, the bank warm-up, the serving path (bank only) against training-time scores, and
the recompute baseline against the bank."""

from __future__ import annotations

import math
import multiprocessing as mp
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import nn

from embeddings.memory_bank import MemoryBank
from tests.conftest import small_config
from trainer.config.schema import MemoryBankConfig
from trainer.content import EVAL, SERVE, TRAIN, BankContent, SampledRows, sample_rows
from trainer.data.batch import Tokens

DIM = 6


# ------------------------------------------------------------------------------------------- sampling (unit)


def test_sample_rows_counts_and_padding() -> None:
    valid = torch.tensor([True] * 10 + [False] * 3)
    rows = sample_rows(valid, 0.45, 0.2, torch.Generator().manual_seed(0))
    assert rows.backward.numel() == 2 and rows.forward_only.numel() == math.ceil(4.5) - 2
    every = torch.cat([rows.backward, rows.forward_only, rows.from_bank]).sort().values
    assert torch.equal(every, torch.arange(13))  # a partition of the batch
    assert set(range(10, 13)) <= set(rows.from_bank.tolist())  # padding rows never run the encoder
    again = sample_rows(valid, 0.45, 0.2, torch.Generator().manual_seed(0))
    assert torch.equal(again.backward, rows.backward) and torch.equal(again.from_bank, rows.from_bank)
    full = sample_rows(valid, 1.0, 1.0, torch.Generator().manual_seed(1))
    assert full.backward.numel() == 10 and full.forward_only.numel() == 0


class FakeEncoder(nn.Module):
    """Content from token ids (the sum of an embedding over the title field), and a call log."""

    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Embedding(50, DIM)
        self.calls: list[tuple[int, bool]] = []

    def forward(
        self,
        text: dict[str, Tokens],
        images: torch.Tensor,
        image_mask: torch.Tensor,
        item_ids: torch.Tensor | None = None,
        packed: Any = None,
    ) -> torch.Tensor:
        self.calls.append((text["title"].input_ids.shape[0], torch.is_grad_enabled()))
        return self.embed(text["title"].input_ids).sum(1)


def fake_batch(n: int) -> Any:
    from types import SimpleNamespace

    ids = torch.randint(0, 50, (n, 3), generator=torch.Generator().manual_seed(3))
    return SimpleNamespace(
        size=n,
        text={"title": Tokens(ids, torch.ones_like(ids))},
        images=torch.zeros(n, 0, 3, 4, 4, dtype=torch.uint8),
        image_mask=torch.zeros(n, 0, dtype=torch.bool),
        valid=torch.ones(n, dtype=torch.bool),
        item_id=torch.arange(100, 100 + n),
        known_item_ids=None,
        packed_text=None,
    )


def test_sampled_targets_match_the_plain_call_and_only_q_rows_get_gradient() -> None:
    encoder = FakeEncoder()
    bank = MemoryBank(1 << 16, DIM, dtype=torch.float32)
    batch = fake_batch(8)
    from_bank = torch.randn(8, DIM)
    bank.warm_up(batch.item_id, from_bank)
    cfg = MemoryBankConfig(enabled=True, forward_share=0.5, backward_share=0.25)
    source = BankContent(cfg, bank, encoder, torch.float32, seed=0, rank=0)
    rows = SampledRows(torch.tensor([1, 6]), torch.tensor([0, 3]), torch.tensor([2, 4, 5, 7]))
    target, fresh = source.target(batch, rows, from_bank[rows.from_bank])

    plain = encoder(batch.text, batch.images, batch.image_mask)
    encoded = torch.tensor([0, 1, 3, 6])
    assert torch.allclose(target[encoded], plain[encoded])  # the reference: one plain call on every row
    assert torch.equal(target[rows.from_bank], from_bank[rows.from_bank])
    assert fresh.tolist() == [i in (0, 1, 3, 6) for i in range(8)]
    assert encoder.calls[:2] == [(2, True), (2, False)]  # q rows with gradient, the rest of p without

    weights = torch.randn(8, DIM)
    (target * weights).sum().backward()
    got = encoder.embed.weight.grad.clone()
    encoder.zero_grad()
    (plain[rows.backward] * weights[rows.backward]).sum().backward()  # only the q rows reach the encoder
    assert torch.allclose(got, encoder.embed.weight.grad)


def test_training_rows_come_from_the_step_seeded_sampler() -> None:
    encoder = FakeEncoder()
    bank = MemoryBank(1 << 16, DIM, dtype=torch.float32)
    batch = fake_batch(10)
    cfg = MemoryBankConfig(enabled=True, forward_share=0.3, backward_share=0.1)
    source = BankContent(cfg, bank, encoder, torch.float32, seed=0, rank=0)
    a, b, c = source.rows(batch, 7, TRAIN), source.rows(batch, 7, TRAIN), source.rows(batch, 8, TRAIN)
    assert torch.equal(a.backward, b.backward) and a.backward.numel() == 1 and a.forward_only.numel() == 2
    assert not (torch.equal(a.backward, c.backward) and torch.equal(a.forward_only, c.forward_only))
    assert source.rows(batch, 7, EVAL).forward_only.numel() == 10  # eval encodes every target
    assert source.rows(batch, 7, SERVE).from_bank.numel() == 10  # serving encodes none


# ------------------------------------------------------------------------------ the catalog against the reader


def test_catalog_inputs_equal_the_readers_target_inputs(small_dataset: Path) -> None:
    from trainer.data.item_catalog import load_catalog
    from trainer.data.reader import make_batch_stream

    cfg = small_config(small_dataset)
    stream = make_batch_stream(cfg, "train")
    batch = next(iter(stream))
    catalog = load_catalog(small_dataset / "items.parquet", stream.dataset.collator)
    rows, found = catalog.rows_of(batch.item_id)
    assert bool(found.all())
    text, images, mask = catalog.inputs(rows)
    for field, tokens in batch.text.items():
        assert torch.equal(text[field].input_ids, tokens.input_ids), field
        assert torch.equal(text[field].attention_mask, tokens.attention_mask), field
    assert torch.equal(images, batch.images) and torch.equal(mask, batch.image_mask)
    _, unknown = catalog.rows_of(torch.tensor([-5, 10**12]))
    assert not unknown.any()


# ------------------------------------------------------------- trainer in one gloo process (spawned: clean state)


def in_process(fn: Callable[..., None], *args: Any) -> None:
    p = mp.get_context("spawn").Process(target=_run, args=(fn, *args))
    p.start()
    p.join(600)
    assert p.exitcode == 0, f"{fn.__name__} failed (exit code {p.exitcode}); see the output above"


def _run(fn: Callable[..., None], *args: Any) -> None:
    os.environ.update(OMP_NUM_THREADS="1")
    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK"):
        os.environ.pop(key, None)
    fn(*args)


def _trainer(dataset: str, overrides: list[str], out: str, backend: str = "gloo") -> Any:
    from tests.test_train import FAST_MODEL
    from trainer.distributed import init_distributed
    from trainer.loop import Trainer
    from trainer.train import setup_logging

    info = init_distributed(backend)
    setup_logging(0)
    cfg = small_config(dataset, *FAST_MODEL, *overrides, f'logging.out_dir="{out}"')
    return Trainer(cfg, info)


def count_calls(module: nn.Module) -> list[int]:
    calls: list[int] = []
    module.register_forward_hook(lambda m, args, out: calls.append(out.shape[0]))
    return calls


BANK = [
    "memory_bank.enabled=true",
    "memory_bank.capacity=1048576",  # no two of the 200 items share a row
    "model.history_encoder=longer",
    "model.similarity_top_k=4",
]


def _serving(dataset: str, out: str, bank_dtype: str) -> None:
    from trainer.content import EVAL, SERVE

    t = _trainer(dataset, [*BANK, f'memory_bank.dtype="{bank_dtype}"'], out)
    stream = iter(t.train_stream)
    for _ in range(4):
        t.train_step(next(stream))
        t.step += 1
    t.content_source.warm_up(t.step)  # every item's entry is now the current encoder's output: fresh
    assert t.bank.stats()["filled"] == 200  # every item of items.parquet
    calls = count_calls(t.model.dense.content)
    eval_batch = next(stream)
    with torch.no_grad():
        t.engine.eval()
        _, trained = t.forward(eval_batch, EVAL)
        encoder_runs = len(calls)
        _, served = t.forward(eval_batch, SERVE)
    assert encoder_runs == 1 and len(calls) == 1  # serving never ran the encoder
    held = t.bank.read(eval_batch.item_id, t.step)[1]
    assert bool(held.all())
    tol = 1e-5 if bank_dtype == "float32" else 0.05
    assert torch.allclose(served.logits, trained.logits, atol=tol), (
        (served.logits - trained.logits).abs().max()
    )
    # a stale bank (a few more steps after the warm-up) no longer matches: the test can tell the two apart
    for _ in range(6):
        t.train_step(next(stream))
        t.step += 1
    with torch.no_grad():
        t.engine.eval()
        _, retrained = t.forward(eval_batch, EVAL)
        _, stale = t.forward(eval_batch, SERVE)
    assert not torch.allclose(stale.logits, retrained.logits, atol=tol)
    metrics = t.evaluate(from_bank=True)
    assert 0.0 <= metrics["auc"] <= 1.0


@pytest.mark.slow
@pytest.mark.parametrize("bank_dtype", ["float32", "bfloat16"])
def test_serving_from_the_bank_matches_training_scores(
    small_dataset: Path, tmp_path: Path, bank_dtype: str
) -> None:
    in_process(_serving, str(small_dataset), str(tmp_path / "run"), bank_dtype)


def _recompute(dataset: str, out: str) -> None:
    from trainer.content import EVAL

    bank = _trainer(dataset, [*BANK, 'memory_bank.dtype="float32"'], out + "-bank")
    torch.manual_seed(0)
    recompute = _trainer(dataset, [*BANK, 'memory_bank.mode="recompute"'], out)
    recompute.model.dense.load_state_dict(bank.model.dense.state_dict())
    recompute.model.sparse.load_state_dict(bank.model.sparse.state_dict())
    bank.content_source.warm_up(bank.step)
    batch = next(iter(bank.train_stream))
    for t in (bank, recompute):
        t.engine.eval()
    with torch.no_grad():
        _, from_bank = bank.forward(batch, EVAL)
        _, recomputed = recompute.forward(batch, EVAL)
    for name, vectors in recomputed.content.histories.items():
        assert torch.allclose(vectors, from_bank.content.histories[name], atol=1e-5), name
    assert torch.allclose(recomputed.logits, from_bank.logits, atol=1e-5)
    # in training, the ranking loss reaches the encoder through the history items too
    recompute.engine.train()
    calls = count_calls(recompute.model.dense.content)
    _, out_train = recompute.forward(batch, "train")
    assert len(calls) == 2  # the targets, then the batch's unique history items in one call
    recompute.model.dense.zero_grad()
    next(iter(out_train.content.histories.values())).sum().backward()
    grads = [p.grad for p in recompute.model.dense.content.parameters() if p.requires_grad]
    assert any(g is not None and bool(g.abs().sum() > 0) for g in grads)
    assert all(float(v) == 1.0 for v in recompute.content_source.coverage.values())
    losses = []
    stream = iter(recompute.train_stream)
    for _ in range(3):
        losses.append(float(recompute.train_step(next(stream))))
        recompute.step += 1
    assert all(math.isfinite(x) for x in losses)


@pytest.mark.slow
def test_recompute_mode_equals_a_fresh_bank_and_trains_the_encoder(
    small_dataset: Path, tmp_path: Path
) -> None:
    in_process(_recompute, str(small_dataset), str(tmp_path / "run"))


def _sampling_step(dataset: str, out: str) -> None:
    t = _trainer(dataset, [*BANK, "memory_bank.forward_share=0.5", "memory_bank.backward_share=0"], out)
    calls = count_calls(t.model.dense.content)
    before = [p.detach().clone() for p in t.model.dense.content.parameters()]
    ranker_before = [p.detach().clone() for p in t.model.dense.ranker.parameters()]
    batch = next(iter(t.train_stream))
    t.train_step(batch)
    n = int(batch.valid.sum())
    assert calls == [math.ceil(0.5 * n)]  # q = 0: one encoder call, without gradient
    after = list(t.model.dense.content.parameters())
    assert all(torch.equal(a, b) for a, b in zip(after, before))  # no gradient reached the encoder
    assert not all(torch.equal(a, b) for a, b in zip(t.model.dense.ranker.parameters(), ranker_before))
    t.bank.flush()
    held = t.bank.read(batch.item_id, 10)[1]
    written = set(batch.item_id[held].tolist())  # ids (a batch may hold an item twice)
    assert 0 < len(written) <= math.ceil(0.5 * n)  # only the encoded targets were written


@pytest.mark.slow
def test_encoder_sampling_in_the_trainer(small_dataset: Path, tmp_path: Path) -> None:
    in_process(_sampling_step, str(small_dataset), str(tmp_path / "run"))


def test_device_sampler_partitions_a_full_batch_like_the_reference() -> None:
    from trainer.content import sample_rows_on_device

    for p, q in ((0.45, 0.2), (1.0, 1.0), (0.2, 0.0)):
        reference = sample_rows(torch.ones(13, dtype=torch.bool), p, q, torch.Generator().manual_seed(0))
        rows = sample_rows_on_device(13, p, q, torch.Generator().manual_seed(0), torch.device("cpu"))
        for got, expected in zip(
            (rows.backward, rows.forward_only, rows.from_bank),
            (reference.backward, reference.forward_only, reference.from_bank),
        ):
            assert got.numel() == expected.numel()
        every = torch.cat([rows.backward, rows.forward_only, rows.from_bank]).sort().values
        assert torch.equal(every, torch.arange(13))
    a = sample_rows_on_device(13, 0.45, 0.2, torch.Generator().manual_seed(3), torch.device("cpu"))
    b = sample_rows_on_device(13, 0.45, 0.2, torch.Generator().manual_seed(3), torch.device("cpu"))
    assert torch.equal(a.backward, b.backward) and torch.equal(a.from_bank, b.from_bank)


def test_text_padded_to_the_longest_row_encodes_like_the_budget(small_dataset: Path) -> None:
    """pad_to_longest trims each text field to the batch's longest row: same tokens, same content and query
    vectors as padding to the budget, with less padding to compute on."""
    from trainer.data.collate import PAD_MULTIPLE
    from trainer.data.reader import make_batch_stream
    from trainer.data.text_fields import with_dataset_text
    from trainer.models.fusion import ContentEncoder, QueryEncoder

    cfg = with_dataset_text(small_config(small_dataset, "model.text_max_tokens=[48, 160, 48]"))
    full = next(iter(make_batch_stream(cfg, "eval")))
    trimmed = next(iter(make_batch_stream(cfg, "eval", pad_to_longest=True)))
    budgets = dict(zip(cfg.model.text_fields, cfg.model.text_max_tokens))
    shrunk = 0
    for field, tokens in trimmed.text.items():
        width = tokens.input_ids.shape[1]
        assert width == budgets[field] or width % PAD_MULTIPLE == 0
        assert torch.equal(tokens.input_ids, full.text[field].input_ids[:, :width])
        assert full.text[field].attention_mask[:, width:].sum() == 0  # only padding was cut
        shrunk += budgets[field] - width
    assert shrunk > 0
    tokenizer = make_batch_stream(cfg, "eval").dataset.collator.tokenizer
    torch.manual_seed(0)
    encoder = ContentEncoder(cfg.model, len(tokenizer), tokenizer.pad_token_id, cfg.data.image_size).eval()
    query = QueryEncoder(cfg.model, len(tokenizer), tokenizer.pad_token_id).eval()
    with torch.no_grad():
        a = encoder(full.text, full.images, full.image_mask)
        b = encoder(trimmed.text, trimmed.images, trimmed.image_mask)
        assert torch.allclose(a, b, atol=1e-5), (a - b).abs().max()
        assert torch.allclose(query(full.query), query(trimmed.query), atol=1e-5)
