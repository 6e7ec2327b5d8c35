"""Named choices of a pluggable family, one registry per family: the config validates names against it (nothing
heavy is imported for that) and the builders resolve a name to its implementation (imported on first use).

This module holds the registries of the sparse part (sharding types, fused optimizers) and the `Registry` type the
trainer's own families (rankers, fusions: `trainer/config/registry.py`) use too.
"""

from __future__ import annotations

import importlib
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class Registry:
    """`name -> "module:attribute.path"` for one family, e.g. the rankers."""

    family: str
    entries: Mapping[str, str]

    @property
    def names(self) -> list[str]:
        return list(self.entries)

    def __contains__(self, name: object) -> bool:
        return name in self.entries

    def resolve(self, name: str) -> Any:
        """The implementation registered under `name` (imported now if it was not yet)."""
        if name not in self.entries:
            raise KeyError(f"unknown {self.family} {name!r}; registered: {', '.join(self.entries)}")
        module, _, path = self.entries[name].partition(":")
        found: Any = importlib.import_module(module)
        for attribute in path.split("."):
            found = getattr(found, attribute)
        return found


SHARDING_TYPES = Registry(
    "sharding type",
    {
        "table_wise": "torchrec.distributed.types:ShardingType.TABLE_WISE",
        "row_wise": "torchrec.distributed.types:ShardingType.ROW_WISE",
        "column_wise": "torchrec.distributed.types:ShardingType.COLUMN_WISE",
        "table_column_wise": "torchrec.distributed.types:ShardingType.TABLE_COLUMN_WISE",
        "table_row_wise": "torchrec.distributed.types:ShardingType.TABLE_ROW_WISE",
    },
)
"""The table sharding types the planner may be offered. data_parallel is not one: DDP is off (DeepSpeed owns the
dense part), so nothing would all-reduce a data-parallel table's gradients."""

CPU_SHARDING_TYPES = ("table_wise", "column_wise", "table_column_wise")
"""What TorchRec shards on CPU (row-wise sharding needs CUDA)."""

FUSED_OPTIMIZERS = Registry(
    "fused sparse optimizer",
    {
        "rowwise_adagrad": "torchrec.optim:RowWiseAdagrad",
        "adagrad": "torch.optim:Adagrad",
        "adam": "torch.optim:Adam",
        "sgd": "torch.optim:SGD",
    },
)
"""Optimizers fused into the embedding backward (fbgemm's TBE update), by the optimizer class TorchRec maps."""
