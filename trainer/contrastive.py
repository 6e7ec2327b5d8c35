"""In-batch contrastive losses: LEMUR's SQDC (query <-> document) and EM3's CIC (content <-> ID).

Both are InfoNCE over a [B, B] similarity matrix where row i's positive is column i and the other columns are
negatives, unless a mask says otherwise. Shared rules:

- computed in float32 (or float64 if given): bf16 inputs are upcast, since T * cos with T = 50 spans [-50, 50]
  and bf16 keeps only 8 bits of mantissa;
- padding rows (`valid` False) are neither anchors nor negatives; their values are replaced by zeros before any
  arithmetic, so even NaN padding cannot leak into the loss or its gradient;
- excluded negatives get -inf before a logsumexp; the diagonal is always kept, so no row is all -inf (which would
  give NaN gradients even for rows that are later dropped);
- the mean is over anchor rows; with no anchor the loss is an exact 0 that still depends on the inputs, so
  backward() works and gives zero gradients on every rank (no rank skips a collective).

Negatives are in-batch on the local rank only (no all-gather).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor


def _compute_dtype(x: Tensor) -> torch.dtype:
    return torch.promote_types(x.dtype, torch.float32)


def _normalized(x: Tensor, valid: Tensor, dtype: torch.dtype) -> Tensor:
    """L2-normalised rows in `dtype`, padding rows zeroed (a zero vector has cosine 0 with everything)."""
    x = torch.where(valid[:, None], x.to(dtype), 0.0)
    return F.normalize(x, dim=-1)


def allowed_pairs(valid: Tensor, groups: Tensor | None = None) -> Tensor:
    """[B, B] bool, True where column j may appear in row i's denominator.

    j must be valid; with `groups`, j != i of the same group is excluded (it is not a true negative); j == i is
    always kept.
    """
    allowed = valid[None, :].expand(valid.shape[0], -1)
    if groups is not None:
        allowed = allowed & (groups[:, None] != groups[None, :])
    eye = torch.eye(valid.shape[0], dtype=torch.bool, device=valid.device)
    return allowed | eye


def info_nce_rows(logits: Tensor, allowed: Tensor) -> Tensor:
    """Per-row InfoNCE with the diagonal as positive: -logits_ii + logsumexp_j over allowed j. Shape [B]."""
    masked = logits.masked_fill(~allowed, float("-inf"))
    return torch.logsumexp(masked, dim=-1) - logits.diagonal()


def _masked_mean(per_row: Tensor, rows: Tensor) -> Tensor:
    """Mean over `rows`; unselected rows enter as 0 * finite, so the graph survives when none is selected."""
    weights = rows.to(per_row.dtype)
    return (per_row * weights).sum() / weights.sum().clamp(min=1.0)


def sqdc_loss(
    query: Tensor,
    doc: Tensor,
    labels: Tensor,
    query_ids: Tensor,
    valid: Tensor,
    temperature: float = 50.0,
    session_mask: bool = True,
) -> Tensor:
    """LEMUR's session-masked query-doc contrastive loss, mean over the valid positives.

    For every valid i with label 1: -log( exp(T cos(q_i, d_i)) / sum_j A_ij exp(T cos(q_i, d_j)) ), j over valid
    rows (positives and negatives alike: every document in the batch is a candidate negative). A_ij = 0 when
    i != j and query_ids[i] == query_ids[j]: the other documents shown for the same query (often also relevant)
    are never negatives. session_mask=False gives the plain in-batch loss (A = 1).

    `temperature` MULTIPLIES the cosine (the paper's T = 50), unlike `cic_loss`'s, which divides.
    query, doc: [B, C]; labels: [B] (0/1, any dtype; > 0.5 counts as positive); query_ids: [B] int; valid: [B]
    bool. Returns a float32 (float64 for float64 inputs) scalar.
    """
    dtype = _compute_dtype(query)
    logits = temperature * _normalized(query, valid, dtype) @ _normalized(doc, valid, dtype).T
    allowed = allowed_pairs(valid, query_ids if session_mask else None)
    anchors = valid & (labels > 0.5)
    return _masked_mean(info_nce_rows(logits, allowed), anchors)


def cic_loss(
    content: Tensor,
    ids: Tensor,
    valid: Tensor,
    temperature: float = 0.2,
    item_ids: Tensor | None = None,
) -> Tensor:
    """EM3's Content-ID-Contrastive loss: symmetric InfoNCE between an item's content and ID vectors.

    content: [B, C] and ids: [B, C], both already projected to one size by the model's heads (C_i = f(content_i),
    I_i = f'(id_i)); they are L2-normalised here. Logits are cos / temperature (EM3's code: 0.1-0.5). The loss is
    the mean over valid rows of (content->ID CE + ID->content CE) / 2, with in-batch negatives over valid rows.

    A batch may hold the same item several times (several users clicked it); its other copies are then counted as
    negatives although their ID vectors are identical to the positive: false negatives. Pass `item_ids` [B] to
    exclude j != i with the same item id from row i's denominator (both directions), as SQDC does per query.
    """
    if content.shape != ids.shape:
        raise ValueError(f"cic_loss: content {tuple(content.shape)} and ids {tuple(ids.shape)} must match")
    dtype = _compute_dtype(content)
    logits = _normalized(content, valid, dtype) @ _normalized(ids, valid, dtype).T / temperature
    allowed = allowed_pairs(valid, item_ids)  # the same rule holds for ID->content rows (row i = I_i)
    per_row = (info_nce_rows(logits, allowed) + info_nce_rows(logits.T, allowed)) / 2
    return _masked_mean(per_row, valid)
