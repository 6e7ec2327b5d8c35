"""The one place that shards the sparse part: fused optimizers in backward, the planner, and DMP without DDP.

The dense part belongs to DeepSpeed (trainer/engine.py), so DMP's data-parallel wrapper does nothing here.
Data-parallel table sharding is refused: with DDP off, nothing would all-reduce those tables' gradients.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.distributed as dist
from torch import nn
from torchrec import optim as trec_optim
from torchrec.distributed.model_parallel import DataParallelWrapper, DistributedModelParallel
from torchrec.distributed.planner import EmbeddingShardingPlanner, ParameterConstraints, Topology
from torchrec.distributed.types import ShardingEnv, ShardingPlan
from torchrec.optim.apply_optimizer_in_backward import apply_optimizer_in_backward

from embeddings.tables import SparseArch
from trainer.config.schema import ConfigError, EmbeddingsConfig

CPU_SHARDING_TYPES = {"table_wise", "column_wise", "table_column_wise"}
FUSED_OPTIMIZERS: dict[str, tuple[type[torch.optim.Optimizer], dict[str, Any]]] = {
    "rowwise_adagrad": (trec_optim.RowWiseAdagrad, {"eps": 1e-8}),
    "adagrad": (torch.optim.Adagrad, {"eps": 1e-8}),
    "adam": (torch.optim.Adam, {"eps": 1e-8}),
    "sgd": (torch.optim.SGD, {}),
}


class NoDataParallel(DataParallelWrapper):
    """Leave the unsharded (dense) modules alone: DeepSpeed reduces their gradients."""

    def wrap(self, dmp: DistributedModelParallel, env: ShardingEnv, device: torch.device) -> None:
        return None


def attach_fused_optimizer(sparse: SparseArch, cfg: EmbeddingsConfig) -> None:
    """The sparse optimizer runs inside the embedding backward (fbgemm's fused TBE update)."""
    optimizer, extra = FUSED_OPTIMIZERS[cfg.optimizer]
    apply_optimizer_in_backward(optimizer, sparse.parameters(), {"lr": cfg.lr, **extra})


def allowed_sharding_types(cfg: EmbeddingsConfig, device: torch.device) -> list[str]:
    allowed = list(cfg.sharding_types)
    if device.type != "cuda":
        allowed = [t for t in allowed if t in CPU_SHARDING_TYPES]
    if not allowed:
        raise ConfigError(
            f"embeddings.sharding_types: none of {cfg.sharding_types} runs on {device.type}; "
            f"on CPU use one of {sorted(CPU_SHARDING_TYPES)} (row-wise sharding needs CUDA)"
        )
    return allowed


def plan_sharding(
    model: nn.Module, sparse: SparseArch, cfg: EmbeddingsConfig, device: torch.device, batch_size: int
) -> ShardingPlan:
    world_size = dist.get_world_size() if dist.is_initialized() else 1
    local_world_size = torch.cuda.device_count() if device.type == "cuda" else world_size
    topology = Topology(
        world_size=world_size, local_world_size=min(local_world_size, world_size), compute_device=device.type
    )
    types = allowed_sharding_types(cfg, device)
    kernel = cfg.compute_kernel
    constraints = {
        t.name: ParameterConstraints(sharding_types=types, compute_kernels=[kernel])
        for t in list(sparse.ebc.embedding_bag_configs()) + list(sparse.ec.embedding_configs())
    }
    planner = EmbeddingShardingPlanner(topology=topology, batch_size=batch_size, constraints=constraints)
    if dist.is_initialized():
        return planner.collective_plan(model, pg=dist.group.WORLD)
    return planner.plan(model, sharders=None)


def shard_sparse(
    model: nn.Module, sparse: SparseArch, cfg: EmbeddingsConfig, device: torch.device, batch_size: int
) -> DistributedModelParallel:
    """Attach the fused optimizer, plan, and wrap `model` in DMP: the sparse arch's collections are sharded and
    materialised on `device`; everything else is left as it is (moved to `device`)."""
    attach_fused_optimizer(sparse, cfg)
    plan = plan_sharding(model, sparse, cfg, device, batch_size)
    env = (
        ShardingEnv.from_process_group(dist.group.WORLD)
        if dist.is_initialized()
        else ShardingEnv.from_local(1, 0)
    )
    return DistributedModelParallel(
        module=model, env=env, device=device, plan=plan, data_parallel_wrapper=NoDataParallel()
    )


def describe_plan(dmp: DistributedModelParallel) -> str:
    """One line per table: its sharding type and ranks."""
    lines = []
    for module_path, module_plan in dmp.plan.plan.items():
        for table, spec in module_plan.items():  # type: ignore[union-attr]
            ranks = sorted({r for r in (spec.ranks or [])})
            lines.append(f"{module_path}.{table}: {spec.sharding_type} {spec.compute_kernel} ranks={ranks}")
    return "\n".join(lines)
