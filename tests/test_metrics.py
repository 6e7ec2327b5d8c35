"""Metrics against sklearn and plain-loop references; EvalAccumulator alone and across 2 gloo processes."""

from __future__ import annotations

import math
import pickle
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from trainer.metrics import EvalAccumulator, auc, format_metrics_table, group_auc, log_loss


def roc_auc_score(labels: np.ndarray, scores: np.ndarray) -> float:
    """sklearn's, imported on use: the spawned gloo workers import this module and need no sklearn."""
    from sklearn.metrics import roc_auc_score as reference

    return float(reference(labels, scores))


def sk_log_loss(labels: np.ndarray, probs: np.ndarray) -> float:
    from sklearn.metrics import log_loss as reference

    return float(reference(labels, probs, labels=[0, 1]))


def tied_data(n: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Scores rounded to 1 decimal (many ties) and labels that depend on them."""
    rng = np.random.default_rng(seed)
    scores = np.round(rng.normal(size=n), 1)
    labels = (rng.random(n) < 1 / (1 + np.exp(-scores))).astype(np.float64)
    return scores, labels


def loop_group_auc(
    scores: np.ndarray, labels: np.ndarray, groups: np.ndarray, weighted: bool
) -> tuple[float, int]:
    """The obvious definition: sklearn AUC per group that has both labels, then a (weighted) mean."""
    values, weights = [], []
    for g in np.unique(groups):
        sel = groups == g
        if len(np.unique(labels[sel])) < 2:
            continue
        values.append(roc_auc_score(labels[sel], scores[sel]))
        weights.append(sel.sum())
    if not values:
        return math.nan, 0
    return float(np.average(values, weights=weights if weighted else None)), len(values)


def assert_same_metrics(got: dict[str, float], want: dict[str, float]) -> None:
    assert got.keys() == want.keys()
    for key in want:
        if math.isnan(want[key]):
            assert math.isnan(got[key]), key
        else:
            assert got[key] == pytest.approx(want[key], rel=1e-9, abs=1e-12), key


# ------------------------------------------------------------------------------------------------ functions


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_auc_matches_sklearn_with_ties(seed: int) -> None:
    scores, labels = tied_data(5000, seed)
    assert auc(scores, labels) == pytest.approx(roc_auc_score(labels, scores), abs=1e-12)


def test_auc_edge_cases() -> None:
    assert math.isnan(auc(np.array([0.1, 0.2]), np.array([1.0, 1.0])))
    assert math.isnan(auc(np.array([]), np.array([])))
    assert auc(np.array([0.5, 0.5]), np.array([0.0, 1.0])) == 0.5
    assert auc(np.array([0.1, 0.9]), np.array([0, 1])) == 1.0


@pytest.mark.parametrize("weighted", [True, False])
def test_group_auc_matches_loop(weighted: bool) -> None:
    scores, labels = tied_data(2000, 3)
    groups = np.random.default_rng(4).integers(0, 150, size=scores.size)
    # Groups the reference must skip: all positive, all negative, a single row.
    groups[:5], labels[:5] = 10_001, 1.0
    groups[5:9], labels[5:9] = 10_002, 0.0
    groups[9] = 10_003
    value, used = group_auc(scores, labels, groups, weighted=weighted)
    want_value, want_used = loop_group_auc(scores, labels, groups, weighted)
    assert used == want_used
    assert used < len(np.unique(groups))
    assert value == pytest.approx(want_value, abs=1e-12)


def test_group_auc_unsorted_negative_ids_and_no_usable_group() -> None:
    scores = np.array([0.3, 0.1, 0.7, 0.2, 0.9, 0.9])
    labels = np.array([1, 0, 1, 0, 1, 0])
    groups = np.array([-5, 7, 7, -5, 3, 3])
    value, used = group_auc(scores, labels, groups, weighted=False)
    assert (value, used) == pytest.approx(loop_group_auc(scores, labels, groups, False))
    assert used == 3
    assert group_auc(scores[:2], np.ones(2), groups[:2], weighted=True)[1] == 0
    assert math.isnan(group_auc(np.array([]), np.array([]), np.array([]), weighted=True)[0])


def test_group_auc_key_encodings_agree() -> None:
    """float32 scores (bit codes) vs float64 (dense ranks); compact ids (offset) vs hashed 64-bit ids (dense)."""
    scores, labels = tied_data(3000, 7)
    groups = np.random.default_rng(8).integers(-50, 50, size=scores.size)
    want = loop_group_auc(scores, labels, groups, weighted=True)
    hashed = groups * (1 << 40) + 12345
    assert group_auc(scores, labels, hashed, weighted=True) == pytest.approx(want, abs=1e-12)
    as_f32 = scores.astype(np.float32)
    assert group_auc(as_f32, labels, groups, weighted=True) == pytest.approx(want, abs=1e-12)
    assert auc(np.array([-0.0, 0.0], dtype=np.float32), np.array([0, 1])) == 0.5


def test_group_auc_one_million_rows() -> None:
    rng = np.random.default_rng(5)
    n = 1_000_000
    scores = rng.random(n).astype(np.float32)
    labels = (rng.random(n) < scores).astype(np.float32)
    groups = rng.integers(0, 50_000, size=n)
    value, used = group_auc(scores, labels, groups, weighted=True)
    assert 0.5 < value < 1.0 and 0 < used <= 50_000


def test_log_loss_matches_sklearn() -> None:
    rng = np.random.default_rng(6)
    probs = rng.uniform(0.01, 0.99, size=1000)
    labels = (rng.random(1000) < probs).astype(np.float64)
    assert log_loss(probs, labels) == pytest.approx(sk_log_loss(labels, probs), rel=1e-12)
    assert math.isfinite(log_loss(np.array([1.0, 0.0]), np.array([0.0, 1.0])))


# ------------------------------------------------------------------------------------------------ accumulator


def make_rows(n: int, seed: int, feed: bool = False) -> dict[str, torch.Tensor]:
    """One batch of eval rows: tied logits, users, queries (0 = no query), cold items, ~20% padding."""
    g = torch.Generator().manual_seed(seed)
    logits = torch.round(torch.randn(n, generator=g) * 10) / 10
    return {
        "logits": logits,
        "labels": (torch.rand(n, generator=g) < torch.sigmoid(logits)).float(),
        "user_id": torch.randint(1, 40, (n,), generator=g),
        "query_id": torch.zeros(n, dtype=torch.int64) if feed else torch.randint(0, 25, (n,), generator=g),
        "cold": torch.rand(n, generator=g) < 0.3,
        "valid": torch.rand(n, generator=g) < 0.8,
    }


def expected_metrics(batches: list[dict[str, torch.Tensor]]) -> dict[str, float]:
    """The metrics computed directly (sklearn, loops) over the valid rows of all batches."""
    rows = {k: torch.cat([b[k] for b in batches]) for k in batches[0]}
    v = rows["valid"]
    z, y = rows["logits"][v].double().numpy(), rows["labels"][v].double().numpy()
    users, queries, cold = rows["user_id"][v].numpy(), rows["query_id"][v].numpy(), rows["cold"][v].numpy()
    gauc, n_users = loop_group_auc(z, y, users, weighted=True)
    q = queries != 0
    qauc, n_queries = loop_group_auc(z[q], y[q], queries[q], weighted=False) if q.any() else (math.nan, 0)
    probs = 1 / (1 + np.exp(-z))

    def sk_auc(sel: np.ndarray) -> float:
        return roc_auc_score(y[sel], z[sel]) if len(np.unique(y[sel])) == 2 else math.nan

    return {
        "auc": roc_auc_score(y, z),
        "gauc": gauc,
        "qauc": qauc,
        "cold_auc": sk_auc(cold),
        "warm_auc": sk_auc(~cold),
        "logloss": sk_log_loss(y, probs),
        "label_rate": float(y.mean()),
        "samples": float(v.sum()),
        "users": float(n_users),
        "queries": float(n_queries),
        "cold_samples": float(cold.sum()),
    }


def accumulate(batches: list[dict[str, torch.Tensor]]) -> EvalAccumulator:
    acc = EvalAccumulator()
    for b in batches:
        acc.add(b["logits"], b["labels"], b["user_id"], b["query_id"], b["cold"], b["valid"])
    return acc


def test_accumulator_single_process_drops_padding() -> None:
    batches = [make_rows(300, 10), make_rows(200, 11)]
    got = accumulate(batches).compute()
    assert_same_metrics(got, expected_metrics(batches))
    assert 0 < got["cold_samples"] < got["samples"] < 500
    assert got["queries"] > 0 and got["users"] > 0


def test_accumulator_feed_scenario_no_cold_and_reset() -> None:
    batch = make_rows(300, 12, feed=True)
    batch["cold"][:] = False
    batch["labels"] = batch["labels"].unsqueeze(1)  # [B, 1] is accepted
    acc = accumulate([batch])
    got = acc.compute()
    assert math.isnan(got["qauc"]) and got["queries"] == 0
    assert math.isnan(got["cold_auc"]) and got["cold_samples"] == 0
    assert got["auc"] == pytest.approx(got["warm_auc"])
    acc.reset()
    empty = acc.compute()
    assert empty["samples"] == 0 and math.isnan(empty["auc"])


def test_accumulator_rejects_wrong_shapes() -> None:
    rows = make_rows(8, 13)
    with pytest.raises(ValueError, match="labels"):
        EvalAccumulator().add(
            rows["logits"], torch.zeros(8, 3), rows["user_id"], rows["query_id"], rows["cold"], rows["valid"]
        )


# ---------------------------------------------------------------------------------------------- distributed

RANK_BATCHES = {0: [(300, 20)], 1: [(120, 21), (250, 22)]}
"""(rows, seed) per rank: different batch counts and, through the valid masks, different row counts."""


def rank_batches(rank: int) -> list[dict[str, torch.Tensor]]:
    return [make_rows(n, seed) for n, seed in RANK_BATCHES[rank]]


def _gloo_worker(rank: int, world: int, init_file: str, out_dir: str) -> None:
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        acc = accumulate(rank_batches(rank))
        uneven = acc.compute()
        acc.reset()  # second pass: rank 1 holds no rows at all
        if rank == 0:
            acc = accumulate(rank_batches(0))
        one_empty = acc.compute()
        Path(out_dir, f"rank{rank}.pkl").write_bytes(pickle.dumps((uneven, one_empty)))
    finally:
        dist.destroy_process_group()


@pytest.mark.slow
def test_accumulator_two_gloo_ranks_match_the_union(tmp_path: Path) -> None:
    world = 2
    mp.spawn(_gloo_worker, args=(world, str(tmp_path / "init"), str(tmp_path)), nprocs=world, join=True)
    results = [pickle.loads((tmp_path / f"rank{r}.pkl").read_bytes()) for r in range(world)]
    union = expected_metrics(rank_batches(0) + rank_batches(1))
    only_rank0 = expected_metrics(rank_batches(0))
    for uneven, one_empty in results:
        assert_same_metrics(uneven, union)
        assert_same_metrics(one_empty, only_rank0)
    assert repr(results[0]) == repr(results[1])  # bit-identical on every rank


# ------------------------------------------------------------------------------------------------ reporting


def test_format_metrics_table() -> None:
    results = {
        "multimodal": {
            "auc": 0.74321,
            "gauc": 0.61234,
            "qauc": 0.6389,
            "cold_auc": 0.7,
            "logloss": 0.45678,
            "samples": 12345.0,
        },
        "id_only": {
            "auc": 0.71,
            "gauc": 0.6,
            "qauc": math.nan,
            "cold_auc": math.nan,
            "logloss": 0.5,
            "samples": 12345.0,
        },
    }
    table = format_metrics_table(results)
    lines = table.splitlines()
    assert "AUC" in lines[0] and "QAUC" in lines[0] and "cold AUC" in lines[0]
    assert "multimodal" in table and "id_only" in table
    assert "0.7432" in table and "0.6389" in table and "0.4568" in table and "12,345" in table
    id_only = next(line for line in lines if line.startswith("id_only"))
    assert id_only.count("n/a") == 2  # no QAUC without queries, no cold AUC without cold items
    assert len({len(line) for line in lines[:2]}) == 1


def test_metrics_jsonl_is_strict_json_and_reads_back_nan(tmp_path) -> None:  # type: ignore[no-untyped-def]
    """A metric without a value (QAUC on a dataset without queries) is NaN in memory, null on disk (a bare NaN is
    not JSON), and NaN again when read back."""
    import json
    import math

    from trainer.logger import MetricsLogger, read_metrics, strict_json

    logger = MetricsLogger(tmp_path, enabled=True, tensorboard=False)
    logger.log(3, "eval", {"auc": 0.7, "qauc": float("nan"), "per": [1.0, float("inf")]})
    logger.close()
    line = (tmp_path / "metrics.jsonl").read_text().strip()
    assert "NaN" not in line and "Infinity" not in line
    assert json.loads(line, parse_constant=lambda c: pytest.fail(f"non-JSON constant {c}"))["qauc"] is None
    (record,) = read_metrics(tmp_path / "metrics.jsonl")
    assert record["auc"] == 0.7 and math.isnan(record["qauc"])
    assert strict_json({"a": float("nan")}) == '{"a": null}'
    assert read_metrics(tmp_path / "missing.jsonl") == []
