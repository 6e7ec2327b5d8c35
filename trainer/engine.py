"""The one place that wraps the dense part with DeepSpeed: config dict from our config, optimizer, LR schedule."""

from __future__ import annotations

import contextlib
import math
import sys
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
    return {
        "train_micro_batch_size_per_gpu": cfg.data.batch_size,
        "gradient_accumulation_steps": cfg.training.grad_accum,
        "train_batch_size": cfg.data.batch_size * cfg.training.grad_accum * world_size,
        "gradient_clipping": cfg.training.grad_clip,
        "zero_optimization": {"stage": cfg.distributed.zero_stage},
        "bf16": {"enabled": cfg.training.dtype == "bfloat16"},
        "steps_per_print": 2**31 - 1,
        "wall_clock_breakdown": False,
    }


def lr_lambda(cfg: Config):  # type: ignore[no-untyped-def]
    opt, steps = cfg.optimizer, cfg.training.steps

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
    if cfg.optimizer.name == "sgd":
        return torch.optim.SGD(
            params, lr=cfg.optimizer.lr, momentum=0.9, weight_decay=cfg.optimizer.weight_decay
        )
    return torch.optim.AdamW(params, lr=cfg.optimizer.lr, weight_decay=cfg.optimizer.weight_decay)


def skip_cpu_shm_comm_op() -> None:
    """On CPU, DeepSpeed JIT-compiles a shared-memory allreduce op the first time it starts (minutes of g++ on a
    small machine). Our process group is plain gloo, which does that job, so the op is marked unavailable."""
    import deepspeed.ops

    deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False


def wrap_dense(cfg: Config, dense: nn.Module, world_size: int) -> deepspeed.DeepSpeedEngine:
    if next(dense.parameters()).device.type == "cpu":
        skip_cpu_shm_comm_op()
    optimizer = build_optimizer(cfg, dense)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda(cfg))
    engine, _, _, _ = deepspeed.initialize(
        model=dense, optimizer=optimizer, lr_scheduler=scheduler, config=deepspeed_config(cfg, world_size)
    )
    return engine
