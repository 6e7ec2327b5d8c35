"""Offline ranking metrics (AUC, and QAUC as LEMUR defines it) and their distributed collection.

Everything is rank-based and vectorised in NumPy: an eval pass of tens of millions of rows is scored in
seconds on the host, with no Python loop per user or query.

- ``auc``: Mann-Whitney AUC; tied scores get their average rank (the same value as sklearn's ROC AUC).
- ``group_auc``: AUC per group over the groups that hold both labels; weighted by group size (GAUC) or a
  plain mean over groups (QAUC as LEMUR defines it).
- ``EvalAccumulator``: each rank keeps its own valid rows; ``compute`` gathers every rank's rows (uneven
  counts are padded to the max and trimmed) so all ranks return the same numbers.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

import numpy as np
import torch
import torch.distributed as dist

if TYPE_CHECKING:
    from torch.distributed import ProcessGroup

METRIC_KEYS = (
    "auc",
    "gauc",
    "qauc",
    "cold_auc",
    "warm_auc",
    "logloss",
    "label_rate",
    "samples",
    "users",
    "queries",
    "cold_samples",
)

NO_QUERY = 0
"""query_id of rows without a query (feed samples, padding): they belong to no QAUC group."""


# --------------------------------------------------------------------------------------------- scalar metrics


def _positive(labels: np.ndarray) -> np.ndarray:
    """Binary labels as bool (labels are 0/1; anything above 0.5 counts as positive)."""
    return np.asarray(labels).reshape(-1) > 0.5


def _dense_codes(values: np.ndarray) -> tuple[np.ndarray, int]:
    """Order-preserving codes 0..k-1 of the distinct values, and their bit width."""
    uniq, inverse = np.unique(values, return_inverse=True)
    return inverse.reshape(-1).astype(np.uint64), max(int(uniq.size - 1).bit_length(), 1)


def _score_codes(scores: np.ndarray) -> tuple[np.ndarray, int]:
    """Order-preserving unsigned codes of the scores; equal scores (ties) get equal codes.

    float32 scores (model logits) map to their IEEE bits made monotone, with no sort; other scores get dense
    ranks. ``+ 0.0`` turns -0.0 into +0.0 so the two zeros tie.
    """
    s32 = scores.astype(np.float32) + np.float32(0.0)
    if not np.array_equal(s32, scores, equal_nan=True):
        return _dense_codes(scores + 0.0)
    bits = s32.view(np.uint32)
    negative = (bits >> np.uint32(31)).astype(bool)
    monotone = np.where(negative, ~bits, bits | np.uint32(1 << 31))
    return monotone.astype(np.uint64), 32


def _group_codes(groups: np.ndarray) -> tuple[np.ndarray, int]:
    """Unsigned group codes: integer ids offset by their minimum when they span < 2**31, else dense codes."""
    if groups.size and np.issubdtype(groups.dtype, np.integer):
        low, high = int(groups.min()), int(groups.max())
        if high - low < 1 << 31:
            return (groups - low).astype(np.uint64), max((high - low).bit_length(), 1)
    return _dense_codes(groups)


def _sorted_keys(scores: np.ndarray, pos: np.ndarray, groups: np.ndarray) -> tuple[np.ndarray, int]:
    """One uint64 per row, ``group | score | label`` from high bits to low, sorted; and the group's shift.

    Sorting plain integers is several times faster than argsort or lexsort (no permutation to carry), and the
    sorted keys alone hold everything AUC needs: rows come out ordered by group, then score, and the label bit
    only orders rows inside a tie, where every member shares the run's average rank anyway.
    """
    score_code, score_bits = _score_codes(scores)
    group_code, group_bits = _group_codes(groups)
    if group_bits + score_bits + 1 > 64:
        raise ValueError(f"too many rows to pack ({scores.size})")
    shift = score_bits + 1
    keys = (group_code << np.uint64(shift)) | (score_code << np.uint64(1)) | pos.astype(np.uint64)
    keys.sort()
    return keys, shift


def _run_starts(values: np.ndarray) -> np.ndarray:
    """Indices where a sorted array starts a new run of equal values."""
    if values.size == 0:
        return np.zeros(0, dtype=np.int64)
    return np.flatnonzero(np.concatenate(([True], values[1:] != values[:-1])))


def _group_rank_stats(
    scores: np.ndarray, pos: np.ndarray, groups: np.ndarray
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Per group: sample count, positive count, and the positives' rank sum (ranks 1-based inside the group).

    A run is a block of equal (group, score) keys: each member gets the mean of the in-group positions the run
    spans, which makes the rank-sum AUC count a tie as half a correct pair. Work is per run, not per row.
    """
    keys, shift = _sorted_keys(scores, pos, groups)
    run_start = _run_starts(keys >> np.uint64(1))
    run_end = np.append(run_start[1:], keys.size)
    run_pos = np.add.reduceat((keys & np.uint64(1)).astype(np.float64), run_start)

    group_start = _run_starts(keys >> np.uint64(shift))
    group_end = np.append(group_start[1:], keys.size)
    starts_group = np.zeros(keys.size, dtype=bool)
    starts_group[group_start] = True
    group_of_run = np.cumsum(starts_group[run_start]) - 1
    run_rank = (run_start + 1 + run_end) / 2.0 - group_start[group_of_run]

    n_groups = group_start.size
    n_pos = np.bincount(group_of_run, weights=run_pos, minlength=n_groups)
    rank_sum = np.bincount(group_of_run, weights=run_rank * run_pos, minlength=n_groups)
    return (group_end - group_start).astype(np.float64), n_pos, rank_sum


def _mann_whitney(size: np.ndarray, n_pos: np.ndarray, rank_sum: np.ndarray) -> np.ndarray:
    """AUC from rank sums: the fraction of (positive, negative) pairs ordered correctly, ties counting half."""
    n_neg = size - n_pos
    return (rank_sum - n_pos * (n_pos + 1) / 2.0) / (n_pos * n_neg)


def _flat_inputs(scores: np.ndarray, labels: np.ndarray, groups: np.ndarray | None) -> tuple[np.ndarray, ...]:
    scores = np.asarray(scores, dtype=np.float64).reshape(-1)
    pos = _positive(labels)
    groups = np.zeros(scores.size, dtype=np.int64) if groups is None else np.asarray(groups).reshape(-1)
    if not scores.size == pos.size == groups.size:
        raise ValueError(f"lengths differ: scores {scores.size}, labels {pos.size}, groups {groups.size}")
    return scores, pos, groups


def auc(scores: np.ndarray, labels: np.ndarray) -> float:
    """ROC AUC by the Mann-Whitney rank sum, ties at their average rank; nan if either class is absent."""
    scores, pos, groups = _flat_inputs(scores, labels, None)
    n_pos = int(pos.sum())
    if n_pos == 0 or n_pos == pos.size:
        return math.nan
    return float(_mann_whitney(*_group_rank_stats(scores, pos, groups))[0])


def group_auc(
    scores: np.ndarray, labels: np.ndarray, groups: np.ndarray, weighted: bool
) -> tuple[float, int]:
    """AUC per group, averaged over the groups that hold both labels.

    ``weighted=True`` weights each group by its sample count (GAUC); ``False`` is the plain mean over groups
    (LEMUR's QAUC). Returns ``(value, groups used)``; value is nan when no group has both labels.
    All groups are ranked by one sort of (group, score), with no loop over groups.
    """
    scores, pos, groups = _flat_inputs(scores, labels, groups)
    if scores.size == 0:
        return math.nan, 0
    size, n_pos, rank_sum = _group_rank_stats(scores, pos, groups)
    used = (n_pos > 0) & (n_pos < size)
    if not used.any():
        return math.nan, 0
    per_group = _mann_whitney(size[used], n_pos[used], rank_sum[used])
    return float(np.average(per_group, weights=size[used] if weighted else None)), int(used.sum())


def log_loss(probs: np.ndarray, labels: np.ndarray, eps: float = 1e-15) -> float:
    """Mean binary cross-entropy of probabilities (clipped to [eps, 1 - eps] so a confident miss is finite)."""
    p = np.clip(np.asarray(probs, dtype=np.float64).reshape(-1), eps, 1.0 - eps)
    y = np.asarray(labels, dtype=np.float64).reshape(-1)
    if p.size == 0:
        return math.nan
    return float(-np.mean(y * np.log(p) + (1.0 - y) * np.log1p(-p)))


def _log_loss_from_logits(logits: np.ndarray, labels: np.ndarray) -> float:
    """The same loss from logits, exactly: softplus(z) - y*z never rounds a sigmoid to 0 or 1."""
    z = np.asarray(logits, dtype=np.float64)
    if z.size == 0:
        return math.nan
    return float(np.mean(np.logaddexp(0.0, z) - np.asarray(labels, dtype=np.float64) * z))


# ------------------------------------------------------------------------------------------------ collection


def _host_rows(columns: dict[str, torch.Tensor], dtype: torch.dtype, valid: torch.Tensor) -> torch.Tensor:
    """[N, C] host tensor of the valid rows: stacked and masked where they live, then one device-to-host copy."""
    device = valid.device
    flat = []
    for name, t in columns.items():
        t = t.detach().reshape(-1)
        if t.numel() != valid.numel():
            raise ValueError(f"{name} has {t.numel()} elements for a batch of {valid.numel()} rows")
        flat.append(t.to(device=device, dtype=dtype))
    return torch.stack(flat, dim=1)[valid].cpu()


class EvalAccumulator:
    """Collects one eval pass on each rank; compute() gathers every rank's rows and returns the same dict on all ranks."""

    def __init__(self) -> None:
        self._floats: list[torch.Tensor] = []
        self._ints: list[torch.Tensor] = []

    def add(
        self,
        logits: torch.Tensor,
        labels: torch.Tensor,
        user_id: torch.Tensor,
        query_id: torch.Tensor,
        cold: torch.Tensor,
        valid: torch.Tensor,
    ) -> None:
        """Keep the valid rows of one batch (labels: the main task, [B] or [B, 1]); padding rows are dropped."""
        mask = valid.detach().reshape(-1).to(device=logits.device, dtype=torch.bool)
        self._floats.append(_host_rows({"logits": logits, "labels": labels}, torch.float32, mask))
        ints = {"user_id": user_id, "query_id": query_id, "cold": cold}
        self._ints.append(_host_rows(ints, torch.int64, mask))

    def reset(self) -> None:
        """Forget every row (start of the next eval pass)."""
        self._floats.clear()
        self._ints.clear()

    def _local(self) -> tuple[torch.Tensor, torch.Tensor]:
        """This rank's rows: floats [N, 2] (logit, label) and ints [N, 3] (user, query, cold)."""
        if not self._floats:
            return torch.zeros(0, 2, dtype=torch.float32), torch.zeros(0, 3, dtype=torch.int64)
        return torch.cat(self._floats), torch.cat(self._ints)

    def compute(self, group: ProcessGroup | None = None) -> dict[str, float]:
        """Metrics over every rank's rows (a collective: call it on all ranks of ``group``)."""
        floats, ints = self._local()
        if _world_size(group) > 1:
            floats, ints = _gather_rows([floats, ints], group)
        return _metrics(floats.double().numpy(), ints.numpy())


def _world_size(group: ProcessGroup | None) -> int:
    if not (dist.is_available() and dist.is_initialized()):
        return 1
    return dist.get_world_size(group)


def _collective_device(group: ProcessGroup | None) -> torch.device:
    """NCCL only moves CUDA tensors; gloo (and a gloo+nccl group) moves host tensors."""
    backend = str(dist.get_backend(group))
    if "nccl" in backend and "gloo" not in backend:
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def _gather_rows(columns: list[torch.Tensor], group: ProcessGroup | None) -> list[torch.Tensor]:
    """all_gather row blocks of different lengths: sizes first, pad to the longest, gather, trim, concat.

    Every rank gets the blocks in group-rank order, so the concatenation (and every metric) is identical.
    """
    device = _collective_device(group)
    world = dist.get_world_size(group)
    size = torch.tensor([columns[0].shape[0]], dtype=torch.int64, device=device)
    sizes = [torch.zeros_like(size) for _ in range(world)]
    dist.all_gather(sizes, size, group=group)
    counts = [int(s.item()) for s in sizes]
    longest = max(max(counts), 1)

    out = []
    for col in columns:
        padded = torch.zeros((longest, *col.shape[1:]), dtype=col.dtype, device=device)
        padded[: col.shape[0]] = col.to(device)
        blocks = [torch.empty_like(padded) for _ in range(world)]
        dist.all_gather(blocks, padded, group=group)
        out.append(torch.cat([b[:n] for b, n in zip(blocks, counts)]).cpu())
    return out


def _metrics(floats: np.ndarray, ints: np.ndarray) -> dict[str, float]:
    """The metric dict from gathered rows (floats: logit, label; ints: user, query, cold)."""
    logits, labels = floats[:, 0], floats[:, 1]
    users, queries, cold = ints[:, 0], ints[:, 1], ints[:, 2].astype(bool)
    scores = logits  # AUC is rank-based: logits rank exactly like probabilities, without sigmoid saturation
    gauc, n_users = group_auc(scores, labels, users, weighted=True)
    has_query = queries != NO_QUERY
    if has_query.any():
        qauc, n_queries = group_auc(scores[has_query], labels[has_query], queries[has_query], weighted=False)
    else:
        qauc, n_queries = math.nan, 0
    overall = auc(scores, labels)
    return {
        "auc": overall,
        "gauc": gauc,
        "qauc": qauc,
        "cold_auc": auc(scores[cold], labels[cold]),
        "warm_auc": auc(scores[~cold], labels[~cold]) if cold.any() else overall,
        "logloss": _log_loss_from_logits(logits, labels),
        "label_rate": float(labels.mean()) if labels.size else math.nan,
        "samples": float(labels.size),
        "users": float(n_users),
        "queries": float(n_queries),
        "cold_samples": float(cold.sum()),
    }


# ----------------------------------------------------------------------------------------------- reporting

TABLE_COLUMNS = (
    ("AUC", "auc"),
    ("GAUC", "gauc"),
    ("QAUC", "qauc"),
    ("cold AUC", "cold_auc"),
    ("logloss", "logloss"),
    ("samples", "samples"),
)


def _cell(key: str, value: float | None) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "n/a"  # e.g. QAUC of a dataset without queries, cold AUC without cold items
    if key == "samples":
        return f"{int(value):,}"
    return f"{value:.4f}"


def format_metric(value: float) -> str:
    """A metric for a log line: n/a where it has no value (NaN)."""
    return "n/a" if math.isnan(value) else f"{value:.4f}"


def format_metrics_table(results: dict[str, dict[str, float]]) -> str:
    """Runs as rows (e.g. multimodal vs id_only), metrics as columns: plain aligned text, 'n/a' for nan."""
    header = ["run", *(title for title, _ in TABLE_COLUMNS)]
    rows = [[name, *(_cell(key, m.get(key)) for _, key in TABLE_COLUMNS)] for name, m in results.items()]
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]

    def line(cells: list[str]) -> str:
        first = cells[0].ljust(widths[0])
        return "  ".join([first, *(c.rjust(w) for c, w in zip(cells[1:], widths[1:]))]).rstrip()

    rule = "  ".join("-" * w for w in widths)
    return "\n".join([line(header), rule, *(line(r) for r in rows)])
