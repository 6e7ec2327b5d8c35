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
from trainer.contrastive import sqdc_loss
from trainer.data.batch import Batch
from trainer.data.reader import make_batch_stream
from trainer.data.spec import DatasetSpec, read_spec
from trainer.distributed import DistInfo
from trainer.engine import wrap_dense
from trainer.flops import FlopMeter
from trainer.logger import MetricsLogger
from trainer.losses import bce_loss
from trainer.metrics import EvalAccumulator
from trainer.models.model import DenseOutput, Embedded, build_model

log = logging.getLogger("lemur")


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def build_bank(cfg: Config, spec: DatasetSpec, device: torch.device) -> MemoryBank:
    capacity = cfg.memory_bank.capacity or 2 * max(
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
        model.dense.to(info.device)
        self.dmp = shard_sparse(model, model.sparse, cfg.embeddings, info.device, cfg.data.batch_size)
        self.model = self.dmp.module
        self.engine = wrap_dense(cfg, self.model.dense, info.world_size)
        self.bank = (
            build_bank(cfg, self.spec, info.device)
            if cfg.memory_bank.enabled and cfg.model.use_content
            else None
        )
        self.coverage: dict[str, torch.Tensor] = {}
        self.staleness: torch.Tensor | None = None
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

    def forward(self, batch: Batch, training: bool = True) -> DenseOutput:
        embedded = self.model.embed(batch)
        if self.dtype != torch.float32:
            embedded, batch = self.cast(embedded), replace(batch, dense=batch.dense.to(self.dtype))
        content = None
        if self.bank is not None:
            content = self.model.dense.encode_content(batch)
            embedded.history_content = self.bank_history(batch, embedded, content, join=training)
        return self.engine(batch, embedded, content)

    def bank_history(
        self, batch: Batch, embedded: Embedded, content: torch.Tensor, join: bool
    ) -> dict[str, torch.Tensor]:
        """History content vectors: read from the bank by item id (no gradient); in training, entries whose item
        was encoded in this step on any rank take the fresh vector (the dedup join). All histories go through one
        read and one join (each is a collective), side by side along the sequence axis."""
        assert self.bank is not None
        names = list(embedded.history_ids)
        lengths = [embedded.history_ids[n].shape[1] for n in names]
        ids = torch.cat([embedded.history_ids[n] for n in names], dim=1)
        mask = torch.cat([embedded.histories[n][1] for n in names], dim=1)
        vectors, hit = self.bank.read(ids[mask], self.step, dtype=self.dtype)
        cached = vectors.new_zeros(*ids.shape, self.bank.dim)
        cached[mask] = vectors
        hits = torch.zeros_like(mask)
        hits[mask] = hit
        for name, hit_part, mask_part in zip(names, hits.split(lengths, 1), mask.split(lengths, 1)):
            asked = mask_part.sum()
            self.coverage[name] = torch.where(asked > 0, hit_part.sum() / asked.clamp(min=1), 1.0)
        if join:
            valid = batch.valid
            cached = self.bank.dedup_join(ids, mask, cached, batch.item_id[valid], content[valid])
        return {name: part.to(self.dtype) for name, part in zip(names, cached.split(lengths, 1))}

    def cast(self, embedded: Embedded) -> Embedded:
        histories = {k: (v.to(self.dtype), m) for k, (v, m) in embedded.histories.items()}
        pooled, target = embedded.pooled.to(self.dtype), embedded.target.to(self.dtype)
        return Embedded(pooled, target, histories, embedded.history_ids, embedded.history_content)

    def train_step(self, batch: Batch) -> torch.Tensor:
        batch = batch.to(self.info.device, non_blocking=True)
        with self.flops.measure(self.step):
            out = self.forward(batch)
            loss = self.loss(batch, out)
            self.engine.backward(loss)
        self.engine.step()
        if (
            self.bank is not None and out.content is not None
        ):  # this step's targets, for the next steps' reads
            fresh_ids, fresh = batch.item_id[batch.valid], out.content[batch.valid].detach()
            if (self.step + 1) % self.cfg.logging.log_every == 0:
                self.measure_staleness(fresh_ids, fresh)
            self.bank.write(fresh_ids, fresh, self.step)
        return loss.detach()

    def measure_staleness(self, ids: torch.Tensor, fresh: torch.Tensor) -> None:
        """LEMUR's staleness check: cosine between the encoder's output for this step's targets and the vectors
        the bank still holds for them (on the targets it holds), and the share it holds."""
        assert self.bank is not None
        cached, hit = self.bank.read(ids, self.step, dtype=torch.float32)
        cosine = torch.nn.functional.cosine_similarity(cached[hit], fresh[hit].float(), dim=-1)
        totals = torch.stack(
            [cosine.sum(), hit.sum().float(), torch.tensor(float(hit.numel()), device=hit.device)]
        )
        self.staleness = totals.to(torch.float64)

    def loss(self, batch: Batch, out: DenseOutput) -> torch.Tensor:
        """BCE, plus λ·SQDC between the query and the target item's content vector when configured."""
        cfg = self.cfg.training
        loss = bce_loss(out.logits, batch.labels[:, 0], batch.valid)
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
    def evaluate(self) -> dict[str, float]:
        self.engine.eval()
        accumulator = EvalAccumulator()
        stream = make_batch_stream(self.cfg, "eval", self.info.rank, self.info.world_size)
        for batch in stream:
            batch = batch.to(self.info.device, non_blocking=True)
            out = self.forward(batch, training=False)
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
        for name, share in self.coverage.items():  # the last step's bank hit rate per history
            values[f"bank_coverage_{name}"] = float(share)
        if self.staleness is not None:  # summed over ranks: cosine sum, targets held, targets
            totals = self.staleness.to(self.info.device)
            dist.all_reduce(totals)
            values["bank_staleness_cosine"] = (totals[0] / totals[1].clamp(min=1)).item()
            values["bank_target_hit"] = (totals[1] / totals[2].clamp(min=1)).item()
            self.staleness = None
        self.metrics.log(self.step, "train", values)
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
