"""From raw content to one vector: the target item's text and images (EM3's fusion variants) and the raw query."""

from __future__ import annotations

from collections.abc import Iterable
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from trainer.config.registry import FUSIONS
from trainer.config.schema import ModelConfig
from trainer.models.frozen_cache import Allocate, FrozenFeatureCache
from trainer.models.towers import Encoded, TextTower, VisionTower

if TYPE_CHECKING:  # torchrec-heavy import; only the annotations need it
    from trainer.data.batch import Batch, PackedText, Tokens
    from trainer.data.item_catalog import ItemCatalog

DROPOUT = 0.1
"""Same as the Hugging Face towers' default."""
QUERY, TEXT, IMAGE = 0, 1, 2
"""Modality of each position in the fusion sequence."""


def mlp(in_dim: int, width: int, out_dim: int) -> nn.Sequential:
    return nn.Sequential(nn.Linear(in_dim, width), nn.GELU(), nn.Linear(width, out_dim))


class FusionBlock(nn.Module):
    """Pre-LN self-attention block over a boolean [B, 1, L, L] mask (True = may attend).

    Written on SDPA rather than nn.TransformerEncoderLayer: the masked variant needs a per-sample mask, which that
    layer's eval fast path handles differently from its training path.
    """

    def __init__(self, width: int, heads: int) -> None:
        super().__init__()
        self.heads = heads
        self.norm1 = nn.LayerNorm(width)
        self.qkv = nn.Linear(width, 3 * width)
        self.out = nn.Linear(width, width)
        self.norm2 = nn.LayerNorm(width)
        self.ffn = nn.Sequential(mlp(width, 4 * width, width), nn.Dropout(DROPOUT))
        self.dropout = nn.Dropout(DROPOUT)

    def forward(self, x: Tensor, allowed: Tensor) -> Tensor:
        b, length, width = x.shape
        q, k, v = self.qkv(self.norm1(x)).view(b, length, 3, self.heads, -1).permute(2, 0, 3, 1, 4)
        p = DROPOUT if self.training else 0.0
        attn = F.scaled_dot_product_attention(q, k, v, attn_mask=allowed, dropout_p=p)
        x = x + self.dropout(self.out(attn.transpose(1, 2).reshape(b, length, width)))
        return x + self.ffn(self.norm2(x))


class FusionQFormer(nn.Module):
    """EM3's Fusion-Q-Former: Q learnable queries in front of the projected text and image tokens, self-attention over
    the whole sequence, the first Q outputs flattened -> Linear -> content vector.

    masked: text tokens attend only to text, image tokens only to images; the queries attend to everything (EM3's
    masked FQ-Former ablation).
    """

    def __init__(
        self,
        text_dim: int,
        image_dim: int | None,
        queries: int,
        layers: int,
        heads: int,
        out_dim: int,
        masked: bool,
    ) -> None:
        super().__init__()
        width = text_dim
        self.masked = masked
        self.queries = nn.Parameter(torch.randn(queries, width) * 0.02)
        self.text_proj = nn.Linear(text_dim, width)
        self.image_proj = nn.Linear(image_dim, width) if image_dim is not None else None
        self.blocks = nn.ModuleList(FusionBlock(width, heads) for _ in range(layers))
        self.norm = nn.LayerNorm(width)
        self.head = nn.Linear(queries * width, out_dim)

    def states(self, text: Encoded, image: Encoded | None) -> Tensor:
        """[B, Q + L_text + L_image, width] outputs of the fusion transformer, in that order."""
        b, q = text.tokens.shape[0], len(self.queries)
        parts = [(self.queries.expand(b, -1, -1), text.mask.new_ones(b, q), QUERY)]
        parts.append((self.text_proj(text.tokens), text.mask, TEXT))
        if image is not None:
            parts.append((self.image_proj(image.tokens), image.mask, IMAGE))
        x = torch.cat([p[0] for p in parts], dim=1)
        kinds = torch.cat([torch.full((m.shape[1],), k, device=x.device) for _, m, k in parts])
        allowed = self.attention_mask(torch.cat([p[1] for p in parts], dim=1), kinds)
        for block in self.blocks:
            x = block(x, allowed)
        return self.norm(x)

    def attention_mask(self, valid: Tensor, kinds: Tensor) -> Tensor:
        """[B, 1, L, L] bool. Every position may attend to itself, so no row is empty (an all-masked row is NaN in
        softmax, and NaN leaks through zero attention weights into the queries)."""
        allowed = valid[:, None, :].expand(-1, valid.shape[1], -1)
        if self.masked:
            same = (kinds[:, None] == kinds[None, :]) | (kinds[:, None] == QUERY)
            allowed = allowed & same
        eye = torch.eye(valid.shape[1], dtype=torch.bool, device=valid.device)
        return (allowed | eye).unsqueeze(1)

    def forward(self, text: Encoded, image: Encoded | None) -> Tensor:
        q = len(self.queries)
        return self.head(self.states(text, image)[:, :q].flatten(1))


class FlowFusion(nn.Module):
    """EM3's baselines on the pooled vectors. 1flow: concat(text, image) -> MLP. 2flow: one MLP per modality, summed;
    a sample without images gets the text flow alone."""

    def __init__(self, text_dim: int, image_dim: int | None, out_dim: int, separate: bool) -> None:
        super().__init__()
        self.separate = separate
        joint = text_dim + (image_dim or 0) * (not separate)
        self.text_flow = mlp(joint, text_dim, out_dim)
        self.image_flow = mlp(image_dim, text_dim, out_dim) if separate and image_dim is not None else None

    def forward(self, text: Encoded, image: Encoded | None) -> Tensor:
        if image is None:
            return self.text_flow(text.pooled)
        if not self.separate:
            return self.text_flow(torch.cat([text.pooled, image.pooled], dim=-1))
        has_image = image.mask.any(dim=1, keepdim=True).to(image.pooled.dtype)
        return self.text_flow(text.pooled) + self.image_flow(image.pooled) * has_image


class ContentEncoder(nn.Module):
    """Target item raw content -> content vector [B, content_dim].

    fusion (ModelConfig.fusion): fqformer, masked_fqformer (FusionQFormer), 1flow, 2flow (FlowFusion). Without images
    (use_images False, or N == 0) the text tokens alone go through the same fusion.
    """

    def __init__(self, cfg: ModelConfig, vocab_size: int, pad_token_id: int, image_size: int) -> None:
        super().__init__()
        self.fields = list(cfg.text_fields)
        self.text = TextTower(
            cfg.text_tower, vocab_size, len(self.fields), sum(cfg.text_max_tokens), pad_token_id
        )
        self.vision = VisionTower(cfg.vision_tower, image_size, cfg.patch_size) if cfg.use_images else None
        image_dim = self.vision.hidden_size if self.vision is not None else None
        self.fusion = FUSIONS.resolve(cfg.fusion)(cfg, self.text.hidden_size, image_dim, self.text.heads)
        self.budgets = list(cfg.text_max_tokens)
        self.frozen_cache: FrozenFeatureCache | None = None
        """EM3's frozen-feature cache (`use_frozen_cache`); a plain attribute, so no state dict or engine sees it."""
        self.served: FrozenFeatureCache | None = None
        """Host placement: the current step's batch's rows of the cache (`serve`), the table its calls look up."""

    def use_frozen_cache(
        self,
        chunks: Iterable[ItemCatalog],
        count: int,
        device: torch.device,
        dtype: torch.dtype | None = None,
        host: bool = False,
        allocate: Allocate | None = None,
    ) -> None:
        """Compute the towers' frozen bottoms once over the catalog (every item of items.parquet; run under the
        step's autocast, if any) and serve them from then on to every call that names its items: from a table on
        `device`, or (`host`) from the rows each batch brings along (`FrozenFeatureCache.gather`, `serve`)."""
        self.frozen_cache = self.served = None  # the old table's memory goes before the new one is built
        self.frozen_cache = FrozenFeatureCache.build(
            self.text, self.vision, self.fields, self.budgets, chunks, count, device, dtype, host, allocate
        )

    def adopt_frozen_cache(self, cache: FrozenFeatureCache) -> None:
        """Serve from a cache another process built (model.frozen_cache_share: the host copy of local rank 0)."""
        self.frozen_cache, self.served = cache, None

    def serve(self, batch: Batch) -> None:
        """From now on, calls that name items look them up in `batch`'s gathered rows (none: the uncached path).
        `LemurStep.forward` calls it first: the encoder's callers (the model, the bank, the recompute baseline)
        pass it item ids only, and the rows must be this step's batch's, not the next one's, which `to_device`
        gathers meanwhile on the prefetch thread."""
        self.served = FrozenFeatureCache.served(batch, self.budgets)

    def table_for(self, item_ids: Tensor | None) -> FrozenFeatureCache | None:
        """Where the frozen features of `item_ids` come from: the device table, the served batch's rows (host
        placement: the full table is never read here), or nowhere (None: the uncached path)."""
        cache = self.frozen_cache
        if item_ids is None or cache is None:
            return None
        return self.served if cache.host else cache

    def encode(
        self, text: dict[str, Tokens], images: Tensor, image_mask: Tensor, item_ids: Tensor | None = None
    ) -> tuple[Encoded, Encoded | None]:
        """The single-modal encodings; image is None without a vision tower (with N == 0 it holds no tokens).
        `item_ids`: the items' ids when every one is in items.parquet, so the frozen-feature cache may serve them."""
        fields = [text[f] for f in self.fields]
        cache = self.table_for(item_ids)
        rows = cache.rows(item_ids) if cache is not None else None
        if cache is not None and cache.text is not None:
            mask = torch.cat([f.attention_mask for f in fields], dim=1)
            encoded = self.text.from_frozen(cache.text_features(rows, fields), mask)
        else:
            encoded = self.text(fields)
        if self.vision is None:
            return encoded, None
        if cache is not None and cache.images is not None:
            return encoded, self.vision.from_frozen(cache.images[rows], image_mask)
        return encoded, self.vision(images, image_mask)

    def forward(
        self,
        text: dict[str, Tokens],
        images: Tensor,
        image_mask: Tensor,
        item_ids: Tensor | None = None,
        packed: PackedText | None = None,
    ) -> Tensor:
        """`packed`: the same text without its padding (`Batch.packed_text`), encoded bucket by bucket (every row is
        encoded on its own, so the rows may go in any grouping); not with the frozen-feature cache, which serves
        the text tower's bottom by item instead."""
        if packed is not None and self.table_for(item_ids) is None:
            return self.forward_packed(packed, images, image_mask)
        return self.fusion(*self.encode(text, images, image_mask, item_ids))

    def forward_packed(self, packed: PackedText, images: Tensor, image_mask: Tensor) -> Tensor:
        outputs, start = [], 0
        for ids, mask, token_types in packed.buckets:
            rows = packed.rows[start : start + ids.shape[0]]
            start += ids.shape[0]
            text = self.text.encode(self.text.packed_inputs(ids, mask, token_types))
            image = self.vision(images[rows], image_mask[rows]) if self.vision is not None else None
            outputs.append(self.fusion(text, image))
        in_bucket_order = torch.cat(outputs)
        return torch.empty_like(in_bucket_order).index_copy(0, packed.rows, in_bucket_order)


def build_fqformer(cfg: ModelConfig, text_dim: int, image_dim: int | None, heads: int) -> nn.Module:
    return FusionQFormer(
        text_dim, image_dim, cfg.fusion_queries, cfg.fusion_layers, heads, cfg.content_dim, masked=False
    )


def build_masked_fqformer(cfg: ModelConfig, text_dim: int, image_dim: int | None, heads: int) -> nn.Module:
    return FusionQFormer(
        text_dim, image_dim, cfg.fusion_queries, cfg.fusion_layers, heads, cfg.content_dim, masked=True
    )


def build_one_flow(cfg: ModelConfig, text_dim: int, image_dim: int | None, heads: int) -> nn.Module:
    return FlowFusion(text_dim, image_dim, cfg.content_dim, separate=False)


def build_two_flow(cfg: ModelConfig, text_dim: int, image_dim: int | None, heads: int) -> nn.Module:
    return FlowFusion(text_dim, image_dim, cfg.content_dim, separate=True)


class QueryEncoder(nn.Module):
    """LEMUR's query transformer (cfg.query_tower, one field, query_max_tokens) -> Linear -> content_dim."""

    def __init__(self, cfg: ModelConfig, vocab_size: int, pad_token_id: int) -> None:
        super().__init__()
        self.tower = TextTower(cfg.query_tower, vocab_size, 1, cfg.query_max_tokens, pad_token_id)
        self.proj = nn.Linear(self.tower.hidden_size, cfg.content_dim)

    def forward(self, query: Tokens) -> Tensor:
        return self.proj(self.tower([query]).pooled)
