"""ID tables for a dataset's id features, and the hashing of raw int64 ids into table rows.

Pooled features (user_id, query_id, the sparse features) get one EmbeddingBagCollection table each. The target item
and the history sequences share one EmbeddingCollection table ("item"), so target and history embeddings live in
one space. Ids are hashed into rows before the collections see them (`hash_kjt`, run by the reader's collate), so
the sharded collections take a batch's KeyedJaggedTensors as they are. With embeddings.id_map = "vocab" the item
table's features are looked up instead (`trainer/data/id_vocab.py`: a row per train item, one reserved row for every
other id) into the same rows `plan_tables` sizes; the pooled features stay hashed.
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


def table_rows(cardinality: int | None, hash_size: int, override: int | None = None) -> int:
    """`override` if set; else hash_size, shrunk to twice the known cardinality (small data, small tables)."""
    if override:
        return override
    if cardinality:
        return max(MIN_ROWS, min(hash_size, 2 * cardinality))
    return hash_size


def plan_tables(
    pooled_features: list[str],
    sequence_features: list[str],
    cardinalities: dict[str, int],
    dim: int,
    hash_size: int,
    hash_sizes: dict[str, int] | None = None,
) -> TablePlan:
    """One pooled table per pooled feature; one item table shared by `sequence_features` (the target item first,
    then the histories), sized by the first of them. `hash_sizes` overrides the rows of a feature."""
    overrides = hash_sizes or {}
    item = sequence_features[0]
    rows = {f: table_rows(cardinalities.get(f), hash_size, overrides.get(f)) for f in pooled_features}
    item_rows = table_rows(cardinalities.get(item), hash_size, overrides.get(item))
    rows.update({f: item_rows for f in sequence_features})
    pooled = [
        EmbeddingBagConfig(
            name=f"t_{f}",
            embedding_dim=dim,
            num_embeddings=rows[f],
            feature_names=[f],
            pooling=PoolingType.MEAN,
        )
        for f in pooled_features
    ]
    sequence = [
        EmbeddingConfig(
            name=ITEM_TABLE, embedding_dim=dim, num_embeddings=item_rows, feature_names=sequence_features
        )
    ]
    return TablePlan(rows, pooled, sequence, list(pooled_features), list(sequence_features))


GOLDEN = 0x9E3779B97F4A7C15 - 2**64  # the 64-bit golden-ratio constant as a signed int64


def hash_ids(values: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
    """Raw int64 ids -> [0, rows). A multiplicative mix first (int64 products wrap), so ids that share low bits
    spread over the table."""
    mixed = values.long() * GOLDEN
    mixed = mixed ^ (mixed >> 29)
    return torch.remainder(mixed, rows)


def hash_kjt(kjt: KeyedJaggedTensor, rows: dict[str, int]) -> KeyedJaggedTensor:
    """Hash every key's values into its table's row range; keys, lengths and the per-key lengths and offsets
    (kept on the host when known) are unchanged."""
    device = kjt.values().device
    sizes = torch.tensor([rows[k] for k in kjt.keys()], dtype=torch.int64, device=device)  # noqa: SIM118 (a KJT)
    per_key = kjt.length_per_key()
    counts = torch.tensor(per_key, dtype=torch.int64, device=device)
    per_value = torch.repeat_interleave(sizes, counts, output_size=kjt.values().numel())
    return with_values(kjt, hash_ids(kjt.values(), per_value))


def with_values(kjt: KeyedJaggedTensor, values: torch.Tensor) -> KeyedJaggedTensor:
    """`kjt` with its values replaced one for one (ids -> rows): keys, lengths and the per-key lengths and offsets
    (kept on the host when known, so TorchRec never reads them back from the device) are unchanged."""
    return KeyedJaggedTensor(
        keys=kjt.keys(),
        values=values,
        lengths=kjt.lengths(),
        stride=kjt.stride(),
        length_per_key=kjt.length_per_key(),
        offset_per_key=kjt.offset_per_key(),
    )


class SparseArch(nn.Module):
    """Table rows (ids hashed by `hash_kjt`) -> pooled embeddings (EBC) and sequence embeddings (EC). DMP shards
    the two collections."""

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
        feature, its JaggedTensor of embeddings. Both KJTs hold table rows already (`hash_kjt`)."""
        pooled_out = self.ebc(pooled)
        sequence_out = self.ec(sequences)
        # By name, never .values(): a sharded collection returns its features grouped by the sharding plan, so
        # the column order would change with the plan (and the number of ranks).
        pooled_cat = torch.cat([pooled_out[f] for f in self.pooled_features], dim=1)
        return pooled_cat, {k: sequence_out[k] for k in self.sequence_features}
