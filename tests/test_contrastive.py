"""SQDC and CIC against plain Python loops over i and j, plus the masking, temperature and gradient behaviour."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor

from trainer.contrastive import cic_loss, sqdc_loss

B, C = 14, 8


def cos(a: Tensor, b: Tensor) -> float:
    return float(F.cosine_similarity(a.double(), b.double(), dim=0))


def nce_term(scores: dict[int, float], positive: int) -> float:
    """-log(exp(s_pos) / sum exp(s_j)) with a max shift, for the references."""
    top = max(scores.values())
    return -(scores[positive] - top) + math.log(sum(math.exp(s - top) for s in scores.values()))


def sqdc_reference(q, d, labels, query_ids, valid, temperature, session_mask) -> float:
    terms = []
    for i in range(len(q)):
        if not (valid[i] and labels[i] == 1):
            continue
        scores = {}
        for j in range(len(q)):
            if not valid[j]:
                continue
            if session_mask and i != j and query_ids[i] == query_ids[j]:
                continue  # A_ij = 0
            scores[j] = temperature * cos(q[i], d[j])
        terms.append(nce_term(scores, i))
    return sum(terms) / len(terms) if terms else 0.0


def cic_reference(content, ids, valid, temperature, item_ids=None) -> float:
    terms = []
    for i in range(len(content)):
        if not valid[i]:
            continue
        to_id, to_content = {}, {}
        for j in range(len(content)):
            if not valid[j] or (item_ids is not None and i != j and item_ids[i] == item_ids[j]):
                continue
            to_id[j] = cos(content[i], ids[j]) / temperature
            to_content[j] = cos(ids[i], content[j]) / temperature
        terms.append((nce_term(to_id, i) + nce_term(to_content, i)) / 2)
    return sum(terms) / len(terms) if terms else 0.0


def batch(seed: int, dtype: torch.dtype = torch.float64) -> dict[str, Tensor]:
    g = torch.Generator().manual_seed(seed)
    labels = (torch.rand(B, generator=g) < 0.4).long()
    labels[:2] = torch.tensor([1, 0])  # at least one positive and one negative
    valid = torch.rand(B, generator=g) < 0.8
    valid[:2] = True
    valid[-1] = False  # at least one padding row
    return {
        "query": torch.randn(B, C, generator=g, dtype=dtype),
        "doc": torch.randn(B, C, generator=g, dtype=dtype),
        "labels": labels,
        "query_ids": torch.randint(0, 4, (B,), generator=g),  # 4 queries over 14 rows: repeats for sure
        "valid": valid,
    }


def lists(x: dict[str, Tensor]) -> tuple:
    return x["query"], x["doc"], x["labels"].tolist(), x["query_ids"].tolist(), x["valid"].tolist()


@pytest.mark.parametrize("seed", range(4))
@pytest.mark.parametrize("session_mask", [True, False])
@pytest.mark.parametrize("temperature", [50.0, 5.0])
def test_sqdc_matches_loop(seed: int, session_mask: bool, temperature: float) -> None:
    x = batch(seed)
    got = sqdc_loss(**x, temperature=temperature, session_mask=session_mask)
    want = sqdc_reference(*lists(x), temperature, session_mask)
    assert got.dtype == torch.float64
    assert float(got) == pytest.approx(want, abs=1e-5)


def test_sqdc_float32_and_bf16() -> None:
    x = batch(0, torch.float32)
    want = sqdc_reference(*lists(x), 50.0, True)
    got = sqdc_loss(**x)
    assert got.dtype == torch.float32
    assert float(got) == pytest.approx(want, abs=1e-4, rel=1e-5)
    bf16 = {**x, "query": x["query"].bfloat16(), "doc": x["doc"].bfloat16()}
    got16 = sqdc_loss(**bf16)
    assert got16.dtype == torch.float32  # computed in float32, not bf16
    assert float(got16) == pytest.approx(sqdc_reference(*lists(bf16), 50.0, True), abs=1e-4, rel=1e-5)


def test_sqdc_session_mask_matters_only_when_queries_repeat() -> None:
    x = batch(1)
    assert not torch.allclose(sqdc_loss(**x, session_mask=True), sqdc_loss(**x, session_mask=False))
    distinct = {**x, "query_ids": torch.arange(B)}
    torch.testing.assert_close(
        sqdc_loss(**distinct, session_mask=True), sqdc_loss(**distinct, session_mask=False)
    )


def test_sqdc_temperature() -> None:
    x = batch(2)
    assert not torch.allclose(sqdc_loss(**x, temperature=50.0), sqdc_loss(**x, temperature=10.0))
    # doc == query on orthogonal directions: a large T makes the positive dominate, a small one does not
    eye = torch.eye(B, dtype=torch.float64)
    aligned = {**x, "query": eye, "doc": eye, "query_ids": torch.arange(B)}
    assert float(sqdc_loss(**aligned, temperature=50.0)) < 1e-10
    assert float(sqdc_loss(**aligned, temperature=0.1)) > 1.0


def test_sqdc_ignores_padding_rows_even_nan() -> None:
    x = batch(3)
    pad = ~x["valid"]
    noisy = {**x, "query": x["query"].clone(), "doc": x["doc"].clone(), "labels": x["labels"].clone()}
    noisy["query"][pad] = float("nan")
    noisy["doc"][pad] = float("nan")
    noisy["labels"][pad] = 1
    noisy["query"].requires_grad_(True)
    loss = sqdc_loss(**noisy)
    torch.testing.assert_close(loss.detach(), sqdc_loss(**x))
    loss.backward()
    assert torch.isfinite(noisy["query"].grad).all()
    assert (noisy["query"].grad[pad] == 0).all()


def test_sqdc_gradients_reach_query_and_doc() -> None:
    x = batch(4)
    query, doc = x["query"].requires_grad_(True), x["doc"].requires_grad_(True)
    sqdc_loss(**x).backward()
    for grad in (query.grad, doc.grad):
        assert torch.isfinite(grad).all() and grad.abs().sum() > 0
    negatives_only = x["valid"] & (x["labels"] == 0)
    assert (query.grad[negatives_only] == 0).all()  # a negative row is never an anchor...
    assert doc.grad[negatives_only].abs().sum() > 0  # ...but its document is some anchor's negative


def test_sqdc_no_positive_is_zero_with_graph() -> None:
    x = batch(5)
    x["labels"] = torch.zeros(B, dtype=torch.long)
    query = x["query"].requires_grad_(True)
    loss = sqdc_loss(**x)
    assert float(loss.detach()) == 0.0 and loss.requires_grad
    loss.backward()
    assert (query.grad == 0).all()


def test_sqdc_float_labels() -> None:
    x = batch(6)
    torch.testing.assert_close(sqdc_loss(**{**x, "labels": x["labels"].float()}), sqdc_loss(**x))


def cic_batch(seed: int) -> dict[str, Tensor]:
    x = batch(seed)
    g = torch.Generator().manual_seed(100 + seed)
    return {
        "content": x["query"],
        "ids": x["doc"],
        "valid": x["valid"],
        "item_ids": torch.randint(0, 6, (B,), generator=g),
    }


@pytest.mark.parametrize("seed", range(4))
@pytest.mark.parametrize("temperature", [0.2, 0.5])
@pytest.mark.parametrize("dedup", [True, False])
def test_cic_matches_loop(seed: int, temperature: float, dedup: bool) -> None:
    x = cic_batch(seed)
    item_ids = x.pop("item_ids")
    item_ids = item_ids if dedup else None
    got = cic_loss(**x, temperature=temperature, item_ids=item_ids)
    items = item_ids.tolist() if item_ids is not None else None
    want = cic_reference(x["content"], x["ids"], x["valid"].tolist(), temperature, items)
    assert float(got) == pytest.approx(want, abs=1e-5)


def test_cic_item_mask_and_symmetry() -> None:
    x = cic_batch(1)
    item_ids = x.pop("item_ids")
    with_mask = cic_loss(**x, item_ids=item_ids)
    assert not torch.allclose(with_mask, cic_loss(**x))  # duplicates in the batch: masking changes the loss
    torch.testing.assert_close(cic_loss(**x, item_ids=torch.arange(B)), cic_loss(**x))
    # content->ID and ID->content are averaged, so swapping the two inputs changes nothing
    swapped = cic_loss(x["ids"], x["content"], x["valid"], item_ids=item_ids)
    torch.testing.assert_close(swapped, with_mask)


def test_cic_temperature_gradients_and_empty() -> None:
    x = cic_batch(2)
    x.pop("item_ids")
    assert not torch.allclose(cic_loss(**x, temperature=0.1), cic_loss(**x, temperature=0.5))
    content, ids = x["content"].requires_grad_(True), x["ids"].requires_grad_(True)
    cic_loss(**x).backward()
    for grad in (content.grad, ids.grad):
        assert torch.isfinite(grad).all() and grad[x["valid"]].abs().sum() > 0
        assert (grad[~x["valid"]] == 0).all()
    content.grad = None
    empty = cic_loss(content, ids, torch.zeros(B, dtype=torch.bool))
    assert float(empty.detach()) == 0.0 and empty.requires_grad
    empty.backward()
    assert (content.grad == 0).all()


def test_cic_shape_mismatch() -> None:
    with pytest.raises(ValueError, match="must match"):
        cic_loss(torch.randn(4, 8), torch.randn(4, 6), torch.ones(4, dtype=torch.bool))
