"""Long user histories: a LONGER-style target-attention decoder and LEMUR's similarity module.

Histories arrive as in `trainer.models.model.Embedded.histories`: [B, L, D] tokens and a [B, L] bool mask
(True = a real item), most recent last. Both modules cost O(L) per sample: nothing attends history to history.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn


class HistoryCrossAttention(nn.Module):
    """Multi-head attention of a few query tokens over a long history, computed in the history's own space.

    Standard MHA projects every history token to keys and values: 2 * L * D * dim multiply-adds per sample, the
    dominant cost at L = 1,000. Here the products are folded onto the query side instead: per head h,
    score_hj = (A_h x + a_h) . k_j / sqrt(D) and out = W [ctx_1 .. ctx_H] + w with ctx_h = sum_j softmax_j k_j.
    This is exactly MHA with A_h = W_k,h^T W_q,h (up to the scale), a_h = W_k,h^T b_q,h (the key bias only shifts
    every score of a row equally), W = W_o W_v per head and w = W_o b_v + b_o (the softmax weights sum to 1); the
    parametrisation is a superset (no rank limit per head). The history is touched only by the attention itself:
    H * Q * L * D per sample, with no [B, L, dim] key/value tensors. tests/test_sequence.py loads an
    nn.MultiheadAttention into it to show the equivalence.

    Both projections are plain nn.Linear, so LoRA adapters (EM3's long-sequence phase) wrap them as usual.
    """

    def __init__(self, dim: int, history_dim: int, heads: int) -> None:
        super().__init__()
        self.heads = heads
        self.history_dim = history_dim
        self.query = nn.Linear(dim, heads * history_dim)
        self.out = nn.Linear(heads * history_dim, dim)

    def forward(self, x: Tensor, keys: Tensor, attend: Tensor, nonempty: Tensor) -> Tensor:
        """x [B, Q, dim]; keys [B, L, D] (see `history_keys`); attend [B, L] with >= 1 True per row; nonempty [B].

        Returns the [B, Q, dim] update, exactly 0 on rows whose history is empty.
        """
        b, q, _ = x.shape
        # all heads' queries become rows of one "head" of width D that shares the keys: no per-head key copy
        queries = self.query(x).view(b, q * self.heads, self.history_dim).unsqueeze(1)
        kv = keys.to(queries.dtype).unsqueeze(1)
        ctx = F.scaled_dot_product_attention(
            queries, kv, kv, attn_mask=attend[:, None, None, :], scale=self.history_dim**-0.5
        )
        update = self.out(ctx.view(b, q, self.heads * self.history_dim))
        return torch.where(nonempty[:, None, None], update, 0.0)


def history_keys(history: Tensor, mask: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """Shared by every layer: (LayerNorm'd history with padding zeroed, attend mask, nonempty rows).

    The LayerNorm has no affine part: after the folding in HistoryCrossAttention a per-layer gain and bias on the
    keys would be absorbed by the layer's own query and output projections, so one normalisation serves all layers.
    Padding is zeroed so that garbage (even NaN) in masked slots cannot reach the output or its gradients.
    Rows with no item attend to every slot (all zeros) instead of nothing: SDPA returns NaN for a fully masked row.
    The layer then discards that row's update.
    """
    keys = F.layer_norm(history, history.shape[-1:])
    keys = torch.where(mask[..., None], keys, 0.0)
    nonempty = mask.any(dim=1)
    return keys, mask | ~nonempty[:, None], nonempty


class LongerLayer(nn.Module):
    """Pre-LN decoder layer without self-attention: Q' = Q + CrossAttn(LN(Q), H); Q_next = Q' + FFN(LN(Q'))."""

    def __init__(self, dim: int, history_dim: int, heads: int, ffn_mult: int) -> None:
        super().__init__()
        self.attn_norm = nn.LayerNorm(dim)
        self.attn = HistoryCrossAttention(dim, history_dim, heads)
        self.ffn_norm = nn.LayerNorm(dim)
        self.ffn = nn.Sequential(nn.Linear(dim, ffn_mult * dim), nn.GELU(), nn.Linear(ffn_mult * dim, dim))

    def forward(self, x: Tensor, keys: Tensor, attend: Tensor, nonempty: Tensor) -> Tensor:
        x = x + self.attn(self.attn_norm(x), keys, attend, nonempty)
        return x + self.ffn(self.ffn_norm(x))


class LongerDecoder(nn.Module):
    """LONGER-style target attention: query token(s) built from the sample's other features read a long history
    through `layers` cross-attention + FFN layers; the history itself is never updated (no self-attention), so the
    cost is linear in L. A final LayerNorm scales the output for the ranker.

    history_dim: width of the history tokens (e.g. ID embedding + bank content vector) if it differs from `dim`;
    they are read as they are, with no projection of the L tokens.
    An empty history gives a zero attention update: the output is then a function of the query token alone.
    """

    def __init__(
        self, dim: int, heads: int, layers: int, ffn_mult: int = 4, history_dim: int | None = None
    ) -> None:
        super().__init__()
        self.history_dim = history_dim or dim
        self.layers = nn.ModuleList(
            LongerLayer(dim, self.history_dim, heads, ffn_mult) for _ in range(layers)
        )
        self.norm = nn.LayerNorm(dim)

    def forward(
        self, query_token: Tensor, history: Tensor, mask: Tensor, content: Tensor | None = None
    ) -> Tensor:
        """query_token [B, dim] (or [B, Q, dim] for several query tokens); history [B, L, history_dim], or its ID
        part [B, L, D] with `content` [B, L, history_dim - D] (any float dtype: cast to the history's) joined here,
        where a compiled decoder fuses the join and the cast into its LayerNorm instead of writing a [B, L,
        history_dim] copy first; mask [B, L] bool. Returns [B, dim] (or [B, Q, dim])."""
        if content is not None:
            history = torch.cat([history, content.to(history.dtype)], dim=-1)
        single = query_token.dim() == 2
        x = query_token.unsqueeze(1) if single else query_token
        keys, attend, nonempty = history_keys(history, mask)
        for layer in self.layers:
            x = layer(x, keys, attend, nonempty)
        x = self.norm(x)
        return x.squeeze(1) if single else x


def similarity_features(
    target: Tensor, history: Tensor, mask: Tensor, top_k: int, fill: float = 0.0
) -> Tensor:
    """LEMUR's similarity module: cos(target, history_j) for the ranker, [B, 2 * top_k].

    First top_k columns: the most recent top_k items in sequence order, most recent first. Last top_k: the
    top_k largest similarities, descending. Masked positions, and slots beyond a short history (including
    L < top_k), hold `fill` (0 by default: the same value as an orthogonal item; the ranker sees history
    lengths elsewhere). "Most recent" means the largest index among the unmasked positions, so any mask
    layout works, not only the left-aligned one `padded` produces. Computed in float32, returned in
    target's dtype. target: [B, C]; history: [B, L, C].
    """
    dtype = torch.promote_types(target.dtype, torch.float32)
    t = F.normalize(target.to(dtype), dim=-1)
    h = F.normalize(torch.where(mask[..., None], history.to(dtype), 0.0), dim=-1)  # NaN padding stays out
    cos = torch.einsum("bc,blc->bl", t, h)
    pad = max(top_k - cos.shape[1], 0)
    cos, mask = F.pad(cos, (0, pad)), F.pad(mask, (0, pad), value=False)
    position = torch.arange(cos.shape[1], device=cos.device).expand_as(cos)
    _, recent = torch.where(mask, position, -1).topk(top_k, dim=1)  # largest index first
    in_order = cos.gather(1, recent).masked_fill(~mask.gather(1, recent), fill)
    top, best = cos.masked_fill(~mask, float("-inf")).topk(top_k, dim=1)
    ranked = top.masked_fill(~mask.gather(1, best), fill)
    return torch.cat([in_order, ranked], dim=1).to(target.dtype)


class Similarity(nn.Module):
    """`similarity_features` as a module, so `training.compile` compiles it with the other blocks: eager, its
    float32 masking, normalisation and cosines write several [B, L, C] float32 tensors a history; compiled they fuse
    into a pass over the bf16 vectors. No parameters: state dicts do not change."""

    def __init__(self, top_k: int) -> None:
        super().__init__()
        self.top_k = top_k

    def forward(self, target: Tensor, history: Tensor, mask: Tensor) -> Tensor:
        return similarity_features(target, history, mask, self.top_k)
