"""Items tokenised once: the reader's batches carry exactly the tokens of tokenising every sample, the table is
cached beside items.parquet under a key that changes with the tokenizer and budgets, and an item missing from the
table is tokenised from the sample's own text."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from tests.conftest import small_config
from trainer.data import reader as reader_module
from trainer.data.item_tokens import CACHE_DIR, load_item_tokens
from trainer.data.reader import make_batch_stream


def batches(cfg, **kwargs):  # type: ignore[no-untyped-def]
    return list(make_batch_stream(cfg, "eval", **kwargs))


@pytest.mark.parametrize("pad_to_longest", [False, True])
def test_joined_tokens_equal_tokenising_every_sample(
    small_dataset: Path, monkeypatch: pytest.MonkeyPatch, pad_to_longest: bool
) -> None:
    cfg = small_config(small_dataset)
    joined = batches(cfg, pad_to_longest=pad_to_longest)
    assert make_batch_stream(cfg, "eval").dataset.collator.items is not None
    monkeypatch.setattr(reader_module, "load_item_tokens", lambda *args: None)
    assert make_batch_stream(cfg, "eval").dataset.collator.items is None
    tokenised = batches(cfg, pad_to_longest=pad_to_longest)
    assert len(joined) == len(tokenised) > 0
    for a, b in zip(joined, tokenised):
        for field in a.text:
            assert torch.equal(a.text[field].input_ids, b.text[field].input_ids), field
            assert torch.equal(a.text[field].attention_mask, b.text[field].attention_mask), field


def test_table_is_cached_by_tokenizer_and_budgets_and_misses_fall_back(small_dataset: Path) -> None:
    cfg = small_config(small_dataset)
    collator = make_batch_stream(cfg, "eval").dataset.collator
    items = small_dataset / "items.parquet"
    table = load_item_tokens(items, collator.tokenizer, collator.spec.text_fields)
    assert table is not None and len(table) == 200
    cached = sorted(p.name for p in (small_dataset / CACHE_DIR).iterdir())
    other = load_item_tokens(items, collator.tokenizer, {"title": 5})
    assert other is not None and other.tokens["title"].shape == (200, 5)
    assert len(list((small_dataset / CACHE_DIR).iterdir())) == len(cached) + 1  # a new key, a new table
    rows, found = table.rows_of(np.array([int(table.item_ids[3]), -12345], dtype=np.int64))
    assert found.tolist() == [True, False] and rows[0] == 3

    batch_samples = [
        {"item_id": int(table.item_ids[0]), "text": {f: "ignored" for f in collator.spec.text_fields}},
        {"item_id": -12345, "text": {f: "a word" for f in collator.spec.text_fields}},
    ]
    text, _ = collator.item_text(batch_samples)
    expected = collator.tokens(["a word"], collator.spec.text_fields["title"])
    assert torch.equal(text["title"].input_ids[1], expected.input_ids[0])  # the miss: its own text
    n = int(table.lengths["title"][0])
    assert text["title"].attention_mask[0].sum() == n
    assert torch.equal(
        text["title"].input_ids[0, :n], torch.from_numpy(table.tokens["title"][0, :n].astype(np.int64))
    )


@pytest.mark.parametrize("pad_to_longest", [False, True])
def test_cached_query_tokens_equal_tokenising_every_query(
    small_dataset: Path, monkeypatch: pytest.MonkeyPatch, pad_to_longest: bool
) -> None:
    from trainer.data import collate as collate_module

    collator = make_batch_stream(
        small_config(small_dataset), "eval", pad_to_longest=pad_to_longest
    ).dataset.collator
    queries = ["red shoes", "", "red shoes", "a much longer query about blue running shoes", "x"] * 3
    expected = collator.tokens(queries, collator.spec.query_tokens)
    monkeypatch.setattr(collate_module, "QUERY_CACHE", 3)  # the cache fills and is cleared on the way
    for start in (0, 5, 10, 0):
        got = collator.query_tokens(queries[start : start + 5])
        want = collator.tokens(queries[start : start + 5], collator.spec.query_tokens)
        assert torch.equal(got.input_ids, want.input_ids) and torch.equal(
            got.attention_mask, want.attention_mask
        )
    assert len(collator.query_cache) <= 4
    whole = collator.query_tokens(queries)
    assert torch.equal(whole.input_ids, expected.input_ids)
