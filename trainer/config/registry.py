"""The trainer's pluggable model families. The config validates `model.ranker` and `model.fusion` against these;
the model builders resolve the same names (see `embeddings/registry.py` for the sparse part's families)."""

from __future__ import annotations

from embeddings.registry import Registry

RANKERS = Registry(
    "ranker",
    {
        "rankmixer": "trainer.models.ranker:build_rankmixer",
        "dlrm_mlp": "trainer.models.ranker:build_dlrm_mlp",
    },
)
"""Builders `(ModelConfig, in_dim) -> nn.Module` mapping [B, in_dim] features to [B] logits."""

FUSIONS = Registry(
    "fusion",
    {
        "fqformer": "trainer.models.fusion:build_fqformer",
        "masked_fqformer": "trainer.models.fusion:build_masked_fqformer",
        "1flow": "trainer.models.fusion:build_one_flow",
        "2flow": "trainer.models.fusion:build_two_flow",
    },
)
"""Builders `(ModelConfig, text_hidden, image_dim | None, text_heads) -> nn.Module` fusing single-modal encodings
into one content vector."""
