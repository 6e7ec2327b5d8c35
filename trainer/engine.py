"""The one place that wraps the dense part with DeepSpeed: config dict from our config, optimizer, LR schedule, and
the engine's checkpoint part."""

from __future__ import annotations

import contextlib
import math
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import nn

# DeepSpeed's logger writes to stdout, and binds the stream when it is first imported: bind it to stderr, so stdout
# carries only results (`lemur eval --json | jq`).
with contextlib.redirect_stdout(sys.stderr):
    import deepspeed

from trainer.config.schema import Config


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
    }


def bf16_mode(cfg: Config) -> str | None:
    """How bf16 applies (`training.bf16_mode`: weights or autocast), or None for float32."""
    return cfg.training.bf16_mode if cfg.training.dtype == "bfloat16" else None


def plain_zero0(cfg: Config) -> bool:
    """ZeRO 0 over the weights as they are (fp32, or bf16 autocast): the gradients sit in `param.grad` and the
    client optimizer steps them directly. Not so with bf16 weights, where DeepSpeed's BF16_Optimizer keeps fp32
    copies of weights and gradients of its own."""
    return cfg.distributed.zero_stage == 0 and bf16_mode(cfg) != "weights"


def clips_itself(cfg: Config) -> bool:
    """With `plain_zero0` the trainer clips the dense gradients with torch's foreach clip (a few kernels for all
    tensors); DeepSpeed's own clip there loops over the tensors in Python. ZeRO 1/2 and BF16_Optimizer clip their
    flat fp32 copies themselves."""
    return plain_zero0(cfg) and cfg.training.grad_clip > 0


def clip_gradients(cfg: Config, engine: deepspeed.DeepSpeedEngine) -> None:
    """Between `engine.backward` and `engine.step` where `clips_itself`: the global-norm clip, no host sync."""
    if clips_itself(cfg):
        params = [p for p in engine.module.parameters() if p.grad is not None]
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


def build_optimizer(cfg: Config, module: nn.Module) -> torch.optim.Optimizer:
    params = [p for p in module.parameters() if p.requires_grad]
    opt = cfg.optimizer
    # torch's fused kernels exist for CUDA and CPU parameters; off, the per-tensor loop (the reference).
    fused = opt.fused and all(p.device.type in ("cuda", "cpu") for p in params)
    kernel: dict[str, bool] = {"fused": True} if fused else {"foreach": False}
    if opt.name == "sgd":
        return torch.optim.SGD(params, lr=opt.lr, momentum=0.9, weight_decay=opt.weight_decay, **kernel)
    return torch.optim.AdamW(params, lr=opt.lr, weight_decay=opt.weight_decay, **kernel)


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
    return engine


def compile_blocks(dense: nn.Module) -> list[str]:
    """torch.compile the dense arch's heavy blocks in place (`nn.Module.compile`: parameter names and state dicts
    do not change, so checkpoints and DeepSpeed see the same module). Returns the blocks compiled."""
    compiled = []
    for name in ("content", "query", "ranker"):
        block = getattr(dense, name, None)
        if block is not None:
            block.compile()
            compiled.append(name)
    for name, decoder in (getattr(dense, "decoders", None) or {}).items():
        decoder.compile()
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
    `optimizer=False` loads the weights only (eval, export)."""

    def __init__(self, engine: Callable[[], deepspeed.DeepSpeedEngine], optimizer: bool = True) -> None:
        self.engine = engine
        self.optimizer = optimizer

    def save(self, directory: Path) -> None:
        self.engine().save_checkpoint(str(directory), tag=ENGINE_TAG)

    def load(self, directory: Path) -> None:
        path, _ = self.engine().load_checkpoint(
            str(directory),
            tag=ENGINE_TAG,
            load_optimizer_states=self.optimizer,
            load_lr_scheduler_states=self.optimizer,
        )
        if path is None:
            raise FileNotFoundError(f"{directory}: no DeepSpeed checkpoint tagged {ENGINE_TAG!r}")
