"""`lemur eval` and `lemur export`: load a checkpoint into a freshly built trainer, then score or export."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from trainer.config import Config
from trainer.distributed import ending_job, init_distributed
from trainer.export import export_items
from trainer.logger import strict_json
from trainer.loop import Trainer
from trainer.metrics import format_metrics_table
from trainer.train import setup_logging


def _loaded(cfg: Config, checkpoint: str) -> Trainer:
    info = init_distributed(cfg.distributed.backend)
    setup_logging(info.rank)
    trainer = Trainer(cfg, info, training=False)
    trainer.load_weights(checkpoint)
    return trainer


def evaluate_checkpoint(
    cfg: Config,
    checkpoint: str = "auto",
    as_json: bool = False,
    name: str = "model",
    from_bank: bool = False,
    refresh_bank: bool = False,
) -> dict[str, Any]:
    with ending_job():
        trainer = _loaded(cfg, checkpoint)
        if (from_bank or refresh_bank) and trainer.bank is None:
            raise ValueError("--from-bank/--refresh-bank need memory_bank.enabled = true with mode = 'bank'")
        if refresh_bank:
            trainer.content_source.warm_up(trainer.step)  # type: ignore[union-attr]
        results = trainer.evaluate(from_bank=from_bank)
        if trainer.info.is_main:
            print(strict_json(results, indent=1) if as_json else format_metrics_table({name: results}))
    return results


def export_checkpoint(cfg: Config, checkpoint: str, out: str) -> Path | None:
    with ending_job():
        trainer = _loaded(cfg, checkpoint)
        if trainer.model.dense.content is None:
            raise ValueError("model.use_content is false: an ID-only model has no content vectors to export")
        content = trainer.model.dense.content
        path = export_items(content, trainer.items, Path(out), trainer.info.device, cfg.model.content_dim)
        if path is not None:
            print(f"exported item vectors -> {path}")
    return path
