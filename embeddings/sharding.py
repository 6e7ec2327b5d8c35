"""The one place that shards the sparse part: fused optimizers in backward, the planner, and DMP without DDP.

The dense part belongs to DeepSpeed (trainer/engine.py), so DMP's data-parallel wrapper does nothing here.
Data-parallel table sharding is refused: with DDP off, nothing would all-reduce those tables' gradients.
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass, field

import torch
import torch.distributed as dist
from torch import nn
from torchrec.distributed.model_parallel import DataParallelWrapper, DistributedModelParallel
from torchrec.distributed.planner import EmbeddingShardingPlanner, ParameterConstraints, Topology
from torchrec.distributed.types import ShardingEnv, ShardingPlan
from torchrec.optim.apply_optimizer_in_backward import apply_optimizer_in_backward

from embeddings.registry import CPU_SHARDING_TYPES, FUSED_OPTIMIZERS, SHARDING_TYPES
from embeddings.tables import SparseArch

FUSED_EPS = 1e-8


@dataclass
class ShardingOptions:
    """How the sparse part is sharded and updated (names from `embeddings/registry.py`)."""

    sharding_types: list[str] = field(default_factory=lambda: ["table_wise"])
    compute_kernel: str = "fused"
    optimizer: str = "rowwise_adagrad"
    lr: float = 0.05


class NoDataParallel(DataParallelWrapper):
    """Leave the unsharded (dense) modules alone: DeepSpeed reduces their gradients."""

    def wrap(self, dmp: DistributedModelParallel, env: ShardingEnv, device: torch.device) -> None:
        return None


def attach_fused_optimizer(sparse: SparseArch, name: str, lr: float) -> None:
    """The sparse optimizer runs inside the embedding backward (fbgemm's fused TBE update)."""
    optimizer = FUSED_OPTIMIZERS.resolve(name)
    extra = {"eps": FUSED_EPS} if "eps" in inspect.signature(optimizer).parameters else {}
    apply_optimizer_in_backward(optimizer, sparse.parameters(), {"lr": lr, **extra})


def allowed_sharding_types(sharding_types: list[str], device: torch.device) -> list[str]:
    """The requested types that TorchRec can use on `device` (row-wise sharding needs CUDA)."""
    allowed = list(sharding_types)
    if device.type != "cuda":
        allowed = [t for t in allowed if t in CPU_SHARDING_TYPES]
    if not allowed:
        raise ValueError(
            f"none of the sharding types {sharding_types} runs on {device.type}; "
            f"on CPU use one of {list(CPU_SHARDING_TYPES)} (row-wise sharding needs CUDA)"
        )
    return [SHARDING_TYPES.resolve(t).value for t in allowed]


def plan_sharding(
    model: nn.Module, sparse: SparseArch, options: ShardingOptions, device: torch.device, batch_size: int
) -> ShardingPlan:
    world_size = dist.get_world_size() if dist.is_initialized() else 1
    local_world_size = torch.cuda.device_count() if device.type == "cuda" else world_size
    topology = Topology(
        world_size=world_size, local_world_size=min(local_world_size, world_size), compute_device=device.type
    )
    types = allowed_sharding_types(options.sharding_types, device)
    kernel = options.compute_kernel
    constraints = {
        t.name: ParameterConstraints(sharding_types=types, compute_kernels=[kernel])
        for t in list(sparse.ebc.embedding_bag_configs()) + list(sparse.ec.embedding_configs())
    }
    planner = EmbeddingShardingPlanner(topology=topology, batch_size=batch_size, constraints=constraints)
    if dist.is_initialized():
        return planner.collective_plan(model, pg=dist.group.WORLD)
    return planner.plan(model, sharders=None)


def shard_sparse(
    model: nn.Module, sparse: SparseArch, options: ShardingOptions, device: torch.device, batch_size: int
) -> DistributedModelParallel:
    """Attach the fused optimizer, plan, and wrap `model` (which holds `sparse`) in DMP: the sparse arch's
    collections are sharded and materialised on `device`; everything else is left as it is (moved to `device`)."""
    attach_fused_optimizer(sparse, options.optimizer, options.lr)
    cache_kjt_recat()
    plan = plan_sharding(model, sparse, options, device, batch_size)
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


RECAT_CACHE_ENTRIES = 256


def cache_kjt_recat() -> None:
    """TorchRec's KJT all-to-all (1.6 and 1.8) builds its feature-permute index with `torch.tensor(list,
    device=...)` in every input dist, even on one rank where it goes unused: a copy from pageable host memory, so
    a host sync per sharded collection per step (benchmarks/step.py found two a step on an H200). The index is a
    function of its arguments and only read (a permute's index), so it is built once per arguments and device."""
    from torchrec.distributed import dist_data

    original = dist_data._get_recat
    if getattr(original, "lemur_cached", False):
        return
    cache: dict[tuple, torch.Tensor | None] = {}

    def cached_recat(
        local_split: int,
        num_splits: int,
        stagger: int = 1,
        device: torch.device | None = None,
        batch_size_per_rank: list[int] | None = None,
    ) -> torch.Tensor | None:
        sizes = tuple(batch_size_per_rank) if batch_size_per_rank is not None else None
        key = (local_split, num_splits, stagger, str(device), sizes)
        if key not in cache:
            if len(cache) >= RECAT_CACHE_ENTRIES:  # variable batch sizes: bounded, never stale
                cache.clear()
            cache[key] = original(local_split, num_splits, stagger, device, batch_size_per_rank)
        return cache[key]

    cached_recat.lemur_cached = True  # type: ignore[attr-defined]
    dist_data._get_recat = cached_recat
