"""ID tables derived from the dataset's feature spec, and the hashing of raw int64 ids into table rows.

Pooled features (user_id, query_id, the spec's sparse features) get one EmbeddingBagCollection table each. The
target item and the history sequences share one EmbeddingCollection table ("item"), so target and history
embeddings live in one space.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn
from torchrec import (
    EmbeddingBagCollection,
    EmbeddingBagConfig,
    EmbeddingCollection,
    EmbeddingConfig,
    PoolingType,
)
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor

from trainer.config.schema import EmbeddingsConfig
from trainer.data.spec import DatasetSpec

ITEM_TABLE = "item"
MIN_ROWS = 16


@dataclass
class TablePlan:
    """Rows per feature and the TorchRec table configs."""

    rows: dict[str, int]
    pooled: list[EmbeddingBagConfig]
    sequence: list[EmbeddingConfig]
    pooled_features: list[str]
    sequence_features: list[str]


def table_rows(feature: str, cardinality: int | None, cfg: EmbeddingsConfig) -> int:
    """hash_sizes[feature] if set; else hash_size, shrunk to twice the known cardinality (small data, small tables)."""
    if feature in cfg.hash_sizes:
        return cfg.hash_sizes[feature]
    if cardinality:
        return max(MIN_ROWS, min(cfg.hash_size, 2 * cardinality))
    return cfg.hash_size


def plan_tables(spec: DatasetSpec, cfg: EmbeddingsConfig) -> TablePlan:
    cards = {**{k: v.get("cardinality") for k, v in spec.sparse.items()}, **spec.cardinalities}
    pooled_features = [k for k in spec.id_features if k != "item_id"] + list(spec.sparse)
    sequence_features = ["item_id", *spec.history]
    rows = {f: table_rows(f, cards.get(f), cfg) for f in pooled_features}
    item_rows = table_rows("item_id", cards.get("item_id"), cfg)
    rows.update({f: item_rows for f in sequence_features})
    pooled = [
        EmbeddingBagConfig(
            name=f"t_{f}",
            embedding_dim=cfg.dim,
            num_embeddings=rows[f],
            feature_names=[f],
            pooling=PoolingType.MEAN,
        )
        for f in pooled_features
    ]
    sequence = [
        EmbeddingConfig(
            name=ITEM_TABLE, embedding_dim=cfg.dim, num_embeddings=item_rows, feature_names=sequence_features
        )
    ]
    return TablePlan(rows, pooled, sequence, pooled_features, sequence_features)


GOLDEN = 0x9E3779B97F4A7C15 - 2**64  # the 64-bit golden-ratio constant as a signed int64


def hash_ids(values: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
    """Raw int64 ids -> [0, rows). A multiplicative mix first (int64 products wrap), so ids that share low bits
    spread over the table."""
    mixed = values.long() * GOLDEN
    mixed = mixed ^ (mixed >> 29)
    return torch.remainder(mixed, rows)


def hash_kjt(kjt: KeyedJaggedTensor, rows: dict[str, int]) -> KeyedJaggedTensor:
    """Hash every key's values into its table's row range; keys and lengths are unchanged."""
    device = kjt.values().device
    sizes = torch.tensor([rows[k] for k in kjt.keys()], dtype=torch.int64, device=device)  # noqa: SIM118 (a KJT)
    counts = torch.tensor(kjt.length_per_key(), dtype=torch.int64, device=device)
    per_value = torch.repeat_interleave(sizes, counts, output_size=kjt.values().numel())
    return KeyedJaggedTensor(
        keys=kjt.keys(), values=hash_ids(kjt.values(), per_value), lengths=kjt.lengths(), stride=kjt.stride()
    )


class SparseArch(nn.Module):
    """Raw ids -> hashed -> pooled embeddings (EBC) and sequence embeddings (EC). DMP shards the two collections."""

    def __init__(self, plan: TablePlan, device: torch.device | str = "meta") -> None:
        super().__init__()
        self.rows = plan.rows
        self.pooled_features = plan.pooled_features
        self.sequence_features = plan.sequence_features
        self.ebc = EmbeddingBagCollection(tables=plan.pooled, device=torch.device(device))
        self.ec = EmbeddingCollection(tables=plan.sequence, device=torch.device(device))

    def forward(
        self, pooled: KeyedJaggedTensor, sequences: KeyedJaggedTensor
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """Returns the pooled embeddings concatenated [B, F * dim] (in pooled_features order) and, per sequence
        feature, its JaggedTensor of embeddings."""
        pooled_out = self.ebc(hash_kjt(pooled, self.rows))
        sequence_out = self.ec(hash_kjt(sequences, self.rows))
        # By name, never .values(): a sharded collection returns its features grouped by the sharding plan, so
        # the column order would change with the plan (and the number of ranks).
        pooled_cat = torch.cat([pooled_out[f] for f in self.pooled_features], dim=1)
        return pooled_cat, {k: sequence_out[k] for k in self.sequence_features}
