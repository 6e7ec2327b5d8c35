"""The training loop: build from config, then small step functions (train step, eval, log, checkpoint)."""

from __future__ import annotations

import logging
import random
import sys
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from tqdm import tqdm

from embeddings.memory_bank import MemoryBank
from embeddings.sharding import describe_plan, shard_sparse
from embeddings.tables import plan_tables
from trainer.checkpoint import Checkpointer
from trainer.config import Config, config_to_toml
from trainer.content_source import EVAL, SERVE, TRAIN, BankContent, RecomputeContent, StepContent
from trainer.contrastive import cic_loss, sqdc_loss
from trainer.data.batch import Batch
from trainer.data.items import load_catalog
from trainer.data.reader import make_batch_stream
from trainer.data.spec import DatasetSpec, read_spec
from trainer.distributed import DistInfo
from trainer.engine import release, wrap_dense
from trainer.flops import FlopMeter
from trainer.logger import MetricsLogger
from trainer.losses import bce_loss
from trainer.metrics import EvalAccumulator
from trainer.models.model import DenseOutput, Embedded, build_model
from trainer.phases import apply_phase, phase_at
from trainer.two_stage import freeze_encoders, load_encoders, save_encoders

log = logging.getLogger("lemur")
WARM_UP_BATCH = 256
CAPACITY_PER_ITEM = 8
"""Default bank rows per known item: a direct-mapped cache at load factor a misses about a/2 of the items
(1 - (1 - e^-a) / a): 6% at 1/8, 21% at 1/2."""


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def build_bank(cfg: Config, spec: DatasetSpec, device: torch.device) -> MemoryBank:
    capacity = cfg.memory_bank.capacity or CAPACITY_PER_ITEM * max(
        1, spec.cardinalities.get("item_id", spec.counts.get("items", 1))
    )
    dtype = torch.bfloat16 if cfg.memory_bank.dtype == "bfloat16" else torch.float32
    return MemoryBank(
        capacity,
        cfg.model.content_dim,
        dtype=dtype,
        device=device,
        max_staleness=cfg.memory_bank.max_staleness,
    )


def bank_mode(cfg: Config) -> str | None:
    """bank, recompute, or None (history tokens carry ID embeddings only)."""
    if not (cfg.memory_bank.enabled and cfg.model.use_content):
        return None
    return cfg.memory_bank.mode


class Trainer:
    def __init__(self, cfg: Config, info: DistInfo) -> None:
        self.cfg, self.info = cfg, info
        self.dtype = torch.bfloat16 if cfg.training.dtype == "bfloat16" else torch.float32
        self.out_dir = Path(cfg.logging.out_dir)
        self.spec = read_spec(cfg.data.path)
        self.train_stream = make_batch_stream(
            cfg, "train", info.rank, info.world_size, pin_memory=info.device.type == "cuda"
        )
        tokenizer = self.train_stream.dataset.collator.tokenizer
        self.plan = plan_tables(self.spec, cfg.embeddings)
        seed_everything(cfg.training.seed)
        model = build_model(cfg, self.spec, self.plan, len(tokenizer), tokenizer.pad_token_id)
        if cfg.model.content_init:  # the two-stage baseline's second stage
            load_encoders(model.dense, cfg.model.content_init)
        if cfg.model.freeze_content:
            freeze_encoders(model.dense)
        self.full_history = dict(model.history_lengths)
        self.phase = phase_at(cfg, 0)
        apply_phase(cfg, model, self.full_history, self.phase)
        model.dense.to(info.device)
        self.dmp = shard_sparse(model, model.sparse, cfg.embeddings, info.device, cfg.data.batch_size)
        self.model = self.dmp.module
        self.engine = wrap_dense(cfg, self.model.dense, info.world_size)
        self.bank = build_bank(cfg, self.spec, info.device) if bank_mode(cfg) == "bank" else None
        self.content_source = self.build_content_source()
        self.checkpointer = Checkpointer(self.out_dir / "checkpoints", self)
        self.metrics = MetricsLogger(self.out_dir, info.is_main, cfg.logging.tensorboard)
        self.flops = FlopMeter(info.device)
        self.step = 0
        if info.is_main:
            self.out_dir.mkdir(parents=True, exist_ok=True)
            (self.out_dir / "config.toml").write_text(config_to_toml(cfg))
            log.info("sharding plan:\n%s", describe_plan(self.dmp))
            log.info("dense parameters: %s (trainable %s)", self.count_params(False), self.count_params(True))

    def count_params(self, trainable: bool) -> int:
        return sum(p.numel() for p in self.model.dense.parameters() if p.requires_grad or not trainable)

    # ------------------------------------------------------------------------------------------------ steps

    def build_content_source(self) -> BankContent | RecomputeContent | None:
        encoder = self.model.dense.content
        mode = bank_mode(self.cfg)
        if mode == "bank":
            assert self.bank is not None
            return BankContent(
                self.cfg.memory_bank, self.bank, encoder, self.dtype, self.cfg.training.seed, self.info.rank
            )
        if mode == "recompute":
            collator = self.train_stream.dataset.collator
            catalog = load_catalog(Path(self.cfg.data.path) / "items.parquet", collator)
            log.info("recompute mode: %d items in the catalog", len(catalog))
            return RecomputeContent(catalog.to(self.info.device), encoder, self.dtype)
        return None

    def forward(self, batch: Batch, mode: str = TRAIN) -> tuple[DenseOutput, StepContent | None]:
        """mode: train, eval (targets encoded, no dedup join) or serve (content from the bank only)."""
        embedded = self.model.embed(batch)
        if self.dtype != torch.float32:
            embedded, batch = self.cast(embedded), replace(batch, dense=batch.dense.to(self.dtype))
        if self.content_source is None:
            if mode == SERVE:
                raise ValueError("scoring from the bank needs memory_bank.enabled with mode 'bank'")
            return self.engine(batch, embedded), None
        content = self.content_source.prepare(batch, embedded, self.step, mode)
        embedded.history_content = content.histories
        return self.engine(batch, embedded, content.target), content

    def cast(self, embedded: Embedded) -> Embedded:
        histories = {k: (v.to(self.dtype), m) for k, (v, m) in embedded.histories.items()}
        pooled, target = embedded.pooled.to(self.dtype), embedded.target.to(self.dtype)
        return Embedded(pooled, target, histories, embedded.history_ids, embedded.history_content)

    def train_step(self, batch: Batch) -> torch.Tensor:
        batch = batch.to(self.info.device, non_blocking=True)
        with self.flops.measure(self.step):
            out, content = self.forward(batch)
            loss = self.loss(batch, out)
            self.engine.backward(loss)
        self.engine.step()
        if content is not None:  # this step's fresh targets, for the next steps' reads
            measure = (self.step + 1) % self.cfg.logging.log_every == 0
            self.content_source.after_step(batch, content, self.step, measure)
        return loss.detach()

    @torch.no_grad()
    def warm_up_bank(self) -> None:
        """Encode this rank's share of items.parquet (eval mode) into the bank; visible to every later read."""
        assert self.bank is not None
        collator = self.train_stream.dataset.collator
        catalog = load_catalog(
            Path(self.cfg.data.path) / "items.parquet", collator, self.info.rank, self.info.world_size
        ).to(self.info.device)
        self.engine.eval()
        vectors = [
            self.model.dense.content(*catalog.inputs(rows)).to(self.bank.dtype)
            for rows in torch.arange(len(catalog), device=self.info.device).split(WARM_UP_BATCH)
        ]
        self.engine.train()
        if vectors:
            self.bank.warm_up(catalog.item_ids, torch.cat(vectors), step=self.step)
        else:
            self.bank.warm_up(catalog.item_ids, torch.zeros(0, self.bank.dim), step=self.step)
        stats = self.bank.stats(reduce=True)
        log.info("bank warmed up from items.parquet: %d rows filled", stats["filled"])

    def enter_phase(self, phase: int) -> None:
        """EM3's LoRA phases: new trainable set and history lengths, so a new DeepSpeed engine (optimizer and LR
        schedule restart over the steps left)."""
        apply_phase(self.cfg, self.model, self.full_history, phase)
        release(self.engine)
        left = self.cfg.training.steps - self.cfg.lora.phase2_start
        self.engine = wrap_dense(self.cfg, self.model.dense, self.info.world_size, schedule_steps=left)
        self.phase = phase
        log.info(
            "step %d: LoRA phase %d (histories %s, %s trainable dense parameters)",
            self.step,
            phase,
            self.model.history_lengths,
            self.count_params(True),
        )

    def loss(self, batch: Batch, out: DenseOutput) -> torch.Tensor:
        """BCE (objective "ranking"), plus λ·SQDC between the query and the target item's content vector and
        EM3's CIC between the content and ID projections, when configured."""
        cfg = self.cfg.training
        if cfg.objective == "ranking":
            loss = bce_loss(out.logits, batch.labels[:, 0], batch.valid)
        else:  # the two-stage baseline's first stage: contrastive losses only (zero keeps the graph)
            loss = out.logits.float().sum() * 0.0
        if cfg.cic_weight > 0 and out.cic is not None:
            content, ids = out.cic
            loss = loss + cfg.cic_weight * cic_loss(
                content, ids, batch.valid, cfg.cic_temperature, item_ids=batch.item_id
            )
        if cfg.sqdc_weight > 0 and out.query is not None and out.content is not None:
            sqdc = sqdc_loss(
                out.query,
                out.content,
                batch.labels[:, 0],
                batch.query_id,
                batch.valid,
                cfg.sqdc_temperature,
                cfg.sqdc_session_mask,
            )
            loss = loss + cfg.sqdc_weight * sqdc
        return loss

    @torch.no_grad()
    def evaluate(self, from_bank: bool = False) -> dict[str, float]:
        """Metrics on the eval split; `from_bank`: the serving path (content vectors read from the bank only,
        the encoder does not run)."""
        self.engine.eval()
        accumulator = EvalAccumulator()
        stream = make_batch_stream(self.cfg, "eval", self.info.rank, self.info.world_size)
        for batch in stream:
            batch = batch.to(self.info.device, non_blocking=True)
            out, _ = self.forward(batch, SERVE if from_bank else EVAL)
            accumulator.add(
                out.logits.float(), batch.labels[:, 0], batch.user_id, batch.query_id, batch.cold, batch.valid
            )
        self.engine.train()
        return accumulator.compute()

    # ------------------------------------------------------------------------------------------------ loop

    def fit(self) -> dict[str, Any]:
        cfg = self.cfg.training
        batches = iter(self.train_stream)
        show = self.info.is_main and self.cfg.logging.progress_bar
        # Redrawn often on a terminal; in a log file a line every 30 s is plenty.
        interval = 0.5 if sys.stderr.isatty() else 30.0
        bar = tqdm(total=cfg.steps, initial=self.step, disable=not show, desc="train", mininterval=interval)
        window = Window()
        history: list[float] = []
        results: dict[str, Any] = {}
        while self.step < cfg.steps:
            if phase_at(self.cfg, self.step) != self.phase:
                self.enter_phase(phase_at(self.cfg, self.step))
            batch = next(batches)
            loss = self.train_step(batch)
            self.step += 1
            window.add(loss, batch.size)
            bar.update(1)
            if self.step % self.cfg.logging.log_every == 0 or self.step == cfg.steps:
                values = self.log_train(window)
                history.append(values["loss"])
                bar.set_postfix(loss=f"{values['loss']:.4f}", refresh=False)
                window = Window()
            if cfg.eval_every and self.step % cfg.eval_every == 0 and self.step < cfg.steps:
                self.log_eval(self.evaluate())
            if cfg.checkpoint_every and self.step % cfg.checkpoint_every == 0 and self.step < cfg.steps:
                self.checkpointer.save(self.step)
        bar.close()
        results["eval"] = self.evaluate()
        self.log_eval(results["eval"])
        self.checkpointer.save(self.step)
        if cfg.objective == "contrastive" and self.info.is_main:
            log.info("stage-1 encoders -> %s", save_encoders(self.model.dense, self.out_dir))
        results["train_loss"] = history
        log.info("%s", self.train_stream.report())
        return results

    def log_train(self, window: Window) -> dict[str, float]:
        totals = torch.tensor(
            [window.loss_sum(), window.steps, window.samples], dtype=torch.float64, device=self.info.device
        )
        dist.all_reduce(totals)
        seconds = time.perf_counter() - window.started
        samples_per_s = totals[2].item() / seconds
        values = {
            "loss": totals[0].item() / max(1.0, totals[1].item()),
            "lr": self.engine.get_lr()[0],
            "samples_per_s": samples_per_s,
            "samples_per_s_per_rank": samples_per_s / self.info.world_size,
        }
        mfu = self.flops.mfu(window.steps / seconds)
        if mfu is not None:
            values["mfu"] = mfu
        values["skipped_samples"] = float(sum(self.train_stream.skipped.values()))
        if self.content_source is not None:
            values.update(self.content_values(self.content_source))
        self.metrics.log(self.step, "train", values)
        return values

    def content_values(self, source: BankContent | RecomputeContent) -> dict[str, float]:
        # the last step's hit rate per history (bank: held; recompute: in the catalog)
        values = {f"bank_coverage_{name}": float(share) for name, share in source.coverage.items()}
        if source.staleness is not None:  # summed over ranks: cosine sum, targets held, targets
            totals = source.staleness.to(self.info.device)
            dist.all_reduce(totals)
            values["bank_staleness_cosine"] = (totals[0] / totals[1].clamp(min=1)).item()
            values["bank_target_hit"] = (totals[1] / totals[2].clamp(min=1)).item()
            source.staleness = None
        return values

    def log_eval(self, values: dict[str, float]) -> None:
        self.metrics.log(self.step, "eval", values)
        if self.info.is_main:
            shown = ", ".join(
                f"{k}={v:.4f}"
                for k, v in values.items()
                if k in ("auc", "gauc", "qauc", "cold_auc", "logloss")
            )
            log.info("step %d eval: %s", self.step, shown)

    def close(self) -> None:
        self.metrics.close()


class Window:
    """Loss and throughput since the last log line."""

    def __init__(self) -> None:
        self.losses: list[torch.Tensor] = []  # kept as tensors: an .item() per step would sync the GPU
        self.samples = 0
        self.started = time.perf_counter()

    def add(self, loss: torch.Tensor, samples: int) -> None:
        self.losses.append(loss)
        self.samples += samples

    @property
    def steps(self) -> int:
        return len(self.losses)

    def loss_sum(self) -> float:
        return float(torch.stack(self.losses).sum().item()) if self.losses else 0.0
