"""The one place that wraps the dense part with DeepSpeed: config dict from our config, optimizer, LR schedule, and
the engine's checkpoint part."""

from __future__ import annotations

import contextlib
import functools
import math
import re
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

# DeepSpeed's logger writes to stdout, and binds the stream when it is first imported: bind it to stderr, so stdout
# carries only results (`lemur eval --json | jq`).
with contextlib.redirect_stdout(sys.stderr):
    import deepspeed

from deepspeed.runtime.bf16_optimizer import BF16_Optimizer  # noqa: E402

from trainer.config.schema import Config, ConfigError


def deepspeed_config(cfg: Config, world_size: int) -> dict[str, Any]:
    """Everything DeepSpeed needs, derived from our config (no separate JSON to keep in sync)."""
    training = cfg.training
    return {
        "train_micro_batch_size_per_gpu": cfg.data.batch_size,
        "gradient_accumulation_steps": training.grad_accum,
        "train_batch_size": cfg.data.batch_size * training.grad_accum * world_size,
        "gradient_clipping": 0.0 if clips_itself(cfg) else training.grad_clip,
        "zero_optimization": {"stage": cfg.distributed.zero_stage},
        "bf16": {"enabled": bf16_mode(cfg) == "weights", "check_grad_overflow": training.overflow_check},
        "torch_autocast": {"enabled": bf16_mode(cfg) == "autocast", "dtype": "bfloat16"},
        "steps_per_print": 2**31 - 1,
        "wall_clock_breakdown": False,
        # DeepSpeed's throughput timer (on by default when it does not own the data loader) synchronizes the device
        # at every engine forward and step: the GPU then idles while the host issues the next step's first
        # kernels. The trainer measures its own throughput.
        "timers": {"throughput": {"enabled": False}},
    }


def bf16_mode(cfg: Config) -> str | None:
    """How bf16 applies (`training.bf16_mode`: weights or autocast), or None for float32."""
    return cfg.training.bf16_mode if cfg.training.dtype == "bfloat16" else None


def plain_zero0(cfg: Config) -> bool:
    """ZeRO 0 over the weights as they are (fp32, or bf16 autocast): the gradients sit in `param.grad` and the
    client optimizer steps them directly. Not so with bf16 weights, where DeepSpeed's FP16_Optimizer (in bf16; its
    BF16_Optimizer only with fp32 gradient accumulation, which this config never asks for) keeps fp32 copies of
    weights and gradients of its own."""
    return cfg.distributed.zero_stage == 0 and bf16_mode(cfg) != "weights"


def clips_itself(cfg: Config) -> bool:
    """With `plain_zero0` the trainer clips the dense gradients with torch's foreach clip (a few kernels for all
    tensors); DeepSpeed's own clip there loops over the tensors in Python. ZeRO 1/2 and the bf16-weights optimizer
    clip their flat fp32 copies themselves."""
    return plain_zero0(cfg) and cfg.training.grad_clip > 0


def clip_gradients(cfg: Config, engine: deepspeed.DeepSpeedEngine) -> None:
    """Between `engine.backward` and `engine.step` where `clips_itself`: the global-norm clip, no host sync."""
    if clips_itself(cfg):
        # the optimizer's list, not module.parameters(): that walks every submodule (~1 ms a step on an H200 host)
        params = [p for group in engine.optimizer.param_groups for p in group["params"] if p.grad is not None]
        torch.nn.utils.clip_grad_norm_(params, cfg.training.grad_clip, foreach=True)


def autocast_dtype(cfg: Config) -> torch.dtype | None:
    """The dtype the step runs under torch.autocast, or None where the weights carry the dtype themselves."""
    return torch.bfloat16 if bf16_mode(cfg) == "autocast" else None


def lr_lambda(cfg: Config, steps: int | None = None):  # type: ignore[no-untyped-def]
    """Warm-up then the schedule over `steps` (default training.steps)."""
    opt = cfg.optimizer
    steps = cfg.training.steps if steps is None else steps

    def factor(step: int) -> float:
        if step < opt.warmup_steps:
            return (step + 1) / opt.warmup_steps
        if opt.schedule == "constant":
            return 1.0
        progress = min(1.0, (step - opt.warmup_steps) / max(1, steps - opt.warmup_steps))
        shape = 1.0 - progress if opt.schedule == "linear" else 0.5 * (1.0 + math.cos(math.pi * progress))
        return opt.min_lr_ratio + (1.0 - opt.min_lr_ratio) * shape

    return factor


def param_groups(cfg: Config, module: nn.Module) -> list[dict[str, Any]]:
    """The trainable parameters, one group per learning rate (optimizer.lr_multipliers: the longest name prefix
    wins), the base rate's group first (the one the log line reports)."""
    multipliers = cfg.optimizer.lr_multipliers
    named = list(module.named_parameters())
    # A part this config does not build (`content` with model.use_content = false: a table's ID-only arm under the
    # same --set) names nothing to scale, which is no typo.
    absent = [k for k in multipliers if getattr(module, k.split(".")[0], ...) is None]
    unknown = [
        k
        for k in multipliers
        if k not in absent and not any(n == k or n.startswith(k + ".") for n, _ in named)
    ]
    if unknown:
        parts = sorted({n.split(".")[0] for n, _ in named})
        raise ConfigError(
            f"optimizer.lr_multipliers: {unknown} name no parameter of the dense arch (parts: {parts})"
        )
    groups: dict[float, list[nn.Parameter]] = {1.0: []}
    for name, param in named:
        if param.requires_grad:
            matches = [k for k in multipliers if name == k or name.startswith(k + ".")]
            factor = multipliers[max(matches, key=len)] if matches else 1.0
            groups.setdefault(factor, []).append(param)
    lr = cfg.optimizer.lr
    return [{"params": params, "lr": lr * factor} for factor, params in groups.items() if params]


def build_optimizer(cfg: Config, module: nn.Module) -> torch.optim.Optimizer:
    groups = param_groups(cfg, module)
    opt = cfg.optimizer
    # torch's fused kernels exist for CUDA and CPU parameters; off, the per-tensor loop (the reference).
    fused = opt.fused and all(p.device.type in ("cuda", "cpu") for g in groups for p in g["params"])
    kernel: dict[str, bool] = {"fused": True} if fused else {"foreach": False}
    if opt.name == "sgd":
        return torch.optim.SGD(groups, lr=opt.lr, momentum=0.9, weight_decay=opt.weight_decay, **kernel)
    return torch.optim.AdamW(groups, lr=opt.lr, weight_decay=opt.weight_decay, **kernel)


def skip_cpu_shm_comm_op() -> None:
    """On CPU, DeepSpeed JIT-compiles a shared-memory allreduce op the first time it starts (minutes of g++ on a
    small machine). Our process group is plain gloo, which does that job, so the op is marked unavailable."""
    import deepspeed.ops

    deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False


def wrap_dense(
    cfg: Config, dense: nn.Module, world_size: int, schedule_steps: int | None = None
) -> deepspeed.DeepSpeedEngine:
    """DeepSpeed over the trainable parameters of `dense`; the LR schedule spans `schedule_steps` (default
    training.steps; a new training phase passes the steps it has left)."""
    if next(dense.parameters()).device.type == "cpu":
        skip_cpu_shm_comm_op()
    optimizer = build_optimizer(cfg, dense)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda(cfg, schedule_steps))
    engine, _, _, _ = deepspeed.initialize(
        model=dense, optimizer=optimizer, lr_scheduler=scheduler, config=deepspeed_config(cfg, world_size)
    )
    if plain_zero0(cfg) and world_size == 1:
        # One rank has nothing to all-reduce; DeepSpeed would still flatten and copy back every gradient.
        engine.enable_backward_allreduce = False
    if plain_zero0(cfg):
        # DeepSpeed's own zero_grad here walks every submodule in Python (`module.named_parameters()`, ~1.3 ms of
        # host time a lemur step on an H200 host, which bounds the step); the optimizer holds every trainable
        # tensor, and a frozen one never has a gradient.
        engine.zero_grad = functools.partial(engine.optimizer.zero_grad, set_to_none=True)
    return engine


def compile_blocks(dense: nn.Module, mode: str = "default", scope: str = "blocks") -> list[str]:
    """torch.compile the dense arch in place (`nn.Module.compile`: parameter names and state dicts do not change, so
    checkpoints and DeepSpeed see the same module) in torch.compile's `mode`. `scope`: blocks (its heavy blocks one
    by one) or dense (its whole forward as one graph, so the glue between the blocks fuses too; the content tower
    is compiled on its own as well, for the callers that run it outside that forward: the memory bank). Returns
    what was compiled."""
    if scope == "dense":
        dense.compile(mode=mode)
        content = getattr(dense, "content", None)
        if content is not None:
            content.compile(mode=mode)
        return ["dense"] + (["content"] if content is not None else [])
    compiled = []
    for name in ("content", "query", "ranker", "similarity"):
        block = getattr(dense, name, None)
        if block is not None:
            block.compile(mode=mode)
            compiled.append(name)
    for name, decoder in (getattr(dense, "decoders", None) or {}).items():
        decoder.compile(mode=mode)
        compiled.append(f"decoders.{name}")
    return compiled


def release(engine: deepspeed.DeepSpeedEngine) -> None:
    """Drop an engine before wrapping the same module again: ZeRO 1/2 leave gradient hooks on the parameters."""
    destroy = getattr(engine, "destroy", None)
    if destroy is not None:
        destroy()


ENGINE_TAG = "dense"


class EngineState:
    """The DeepSpeed engine as a checkpoint part: weights, (ZeRO-partitioned) optimizer state and LR schedule, in
    DeepSpeed's own layout. `engine` is called at save and load time (a new training phase replaces the engine);
    `optimizer=False` loads the weights only (eval, export).

    Another number of ranks: the weights are whole in DeepSpeed's model-states file (ZeRO 0-2), and so is the
    optimizer state with ZeRO 0 (fp32 or bf16 autocast weights: the client optimizer; bf16 weights: DeepSpeed's
    FP16_Optimizer in bf16, whose fp32 masters are whole too). ZeRO 1/2 keep one optimizer partition per rank,
    which DeepSpeed refuses to load at another data-parallel size (its `elastic_checkpoint` too, in 0.19): they
    are regathered here (`load_zero_partitions`). ZeRO 3 and DeepSpeed's BF16_Optimizer are refused up front."""

    def __init__(self, engine: Callable[[], deepspeed.DeepSpeedEngine], optimizer: bool = True) -> None:
        self.engine = engine
        self.optimizer = optimizer

    def save(self, directory: Path) -> None:
        self.engine().save_checkpoint(str(directory), tag=ENGINE_TAG)

    def load(self, directory: Path) -> None:
        engine = self.engine()
        partitions = zero_partition_files(directory)
        regather = (
            self.optimizer
            and engine.zero_optimization_stage() in (1, 2)
            and len(partitions) != dist.get_world_size(group=engine.optimizer.dp_process_group)
        )
        path, _ = engine.load_checkpoint(
            str(directory),
            tag=ENGINE_TAG,
            load_optimizer_states=self.optimizer and not regather,
            load_lr_scheduler_states=self.optimizer,
        )
        if path is None:
            raise FileNotFoundError(f"{directory}: no DeepSpeed checkpoint tagged {ENGINE_TAG!r}")
        if regather:
            load_zero_partitions(engine.optimizer, partitions)

    def plan_resize(self, directory: Path, saved_world_size: int) -> str:
        """How the dense state loads on another number of ranks, or why it cannot (before anything loads)."""
        engine = self.engine()
        stage = engine.zero_optimization_stage()
        saved = saved_world_size
        if not self.optimizer:
            return "weights loaded"
        if stage == 3:
            raise ValueError(
                f"{directory}: ZeRO 3 (distributed.zero_stage = 3) partitions the dense weights over the {saved} "
                f"ranks that wrote them; resume this checkpoint on {saved} ranks"
            )
        if isinstance(engine.optimizer, BF16_Optimizer):
            raise ValueError(
                f"{directory}: DeepSpeed's BF16_Optimizer keeps one optimizer partition per rank, which loads only "
                f"on the {saved} ranks that wrote it; resume on {saved} ranks (runs that must change size: "
                'training.bf16_mode = "autocast", or distributed.zero_stage = 2)'
            )
        if stage == 0:
            return "replicated (ZeRO 0) and loaded as saved"
        partitions = zero_partition_files(directory)
        if len(partitions) != saved:
            raise FileNotFoundError(
                f"{directory}: {len(partitions)} ZeRO optimizer partitions for a checkpoint of {saved} ranks"
            )
        if getattr(engine.optimizer, "round_robin_gradients", False) or getattr(
            engine.optimizer, "parameter_alignment", False
        ):
            raise ValueError(
                f"{directory}: with zero_optimization.round_robin_gradients or parameter_alignment the ZeRO "
                "partitions are not the parameters end to end; they cannot be regathered"
            )
        return f"weights loaded and ZeRO {stage} optimizer partitions regathered"


ZERO_PARTITION = re.compile(r"zero_pp_rank_(\d+)_mp_rank_00_optim_states\.pt$")


def zero_partition_files(directory: Path) -> list[Path]:
    """DeepSpeed's per-rank ZeRO optimizer files (`[bf16_]zero_pp_rank_R_mp_rank_00_optim_states.pt`), by rank."""
    found = {}
    for f in (directory / ENGINE_TAG).glob("*zero_pp_rank_*_optim_states.pt"):
        match = ZERO_PARTITION.search(f.name)
        if match:
            found[int(match.group(1))] = f
    if sorted(found) != list(range(len(found))):
        raise FileNotFoundError(
            f"{directory}: ZeRO optimizer partitions of ranks {sorted(found)}, not 0..N-1"
        )
    return [found[r] for r in range(len(found))]


def load_zero_partitions(optimizer: Any, files: list[Path]) -> None:
    """ZeRO 1/2 optimizer partitions saved by `len(files)` ranks, loaded into `optimizer`'s partitions at this
    run's data-parallel size. In each parameter group, DeepSpeed's flat fp32 masters and optimizer state are the
    parameters end to end (without zero_optimization.round_robin_gradients and parameter_alignment, both off in
    `deepspeed_config`), padded at the end and cut into equal partitions, rank r taking [r * size, (r + 1) *
    size). So the saved partitions (less their padding) laid end to end are the whole group, of which this rank
    copies its slice: the same fp32 values and state, bit for bit, as DeepSpeed's own load at the same size. One
    file in memory at a time."""
    groups = len(optimizer.single_partition_of_fp32_groups)
    masters = [torch.zeros_like(t, device="cpu") for t in optimizer.single_partition_of_fp32_groups]
    states: list[dict[str, Any]] = [{} for _ in range(groups)]
    offsets = [0] * groups
    param_groups = None
    for f in files:
        saved = torch.load(f, map_location="cpu", weights_only=False)["optimizer_state_dict"]
        base = saved["base_optimizer_state"]
        param_groups = param_groups or base["param_groups"]
        for i in range(groups):
            size = int(optimizer.partition_size[i])
            start = dist.get_rank(group=optimizer.real_dp_process_group[i]) * size
            fp32 = saved["single_partition_of_fp32_groups"][i]  # saved without its padding
            n, offset = fp32.numel(), offsets[i]
            lo, hi = max(start, offset), min(start + size, offset + n)
            if lo < hi:
                masters[i][lo - start : hi - start] = fp32[lo - offset : hi - offset]
            for key, value in base["state"].get(i, {}).items():
                if torch.is_tensor(value) and value.dim() > 0:  # partitioned like the masters (and padded)
                    mine = states[i].setdefault(key, torch.zeros(size, dtype=value.dtype))
                    if lo < hi:
                        mine[lo - start : hi - start] = value[lo - offset : hi - offset]
                else:  # the step count: the same on every rank
                    states[i].setdefault(key, value)
            offsets[i] += n
    for i, group in enumerate(optimizer.round_robin_bit16_groups):
        expected = sum(p.numel() for p in group)
        if offsets[i] != expected:
            raise ValueError(
                f"{files[0].parent}: parameter group {i} holds {offsets[i]} values, the model {expected}"
            )
    optimizer.optimizer.load_state_dict(
        {"state": {i: s for i, s in enumerate(states) if s}, "param_groups": param_groups}
    )
    for current, master in zip(optimizer.single_partition_of_fp32_groups, masters):
        current.data.copy_(master)
    optimizer._link_all_hp_params()  # as DeepSpeed's own load does after the optimizer state
