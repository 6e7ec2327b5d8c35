"""The training loop: build the pieces from config, then the loop and its small step functions (train step, eval,
log, checkpoint). The step itself (embed → content → dense → loss) is `trainer/step.py`."""

from __future__ import annotations

import hashlib
import logging
import os
import random
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from torch.profiler import record_function
from tqdm import tqdm

from embeddings.memory_bank import MemoryBank
from embeddings.sharding import ShardingOptions, describe_plan, shard_sparse
from trainer.checkpoint import (
    Checkpointer,
    CheckpointPart,
    ModelState,
    RankState,
    RngState,
    ShardedState,
)
from trainer.collector import StepCollector
from trainer.config import Config, ConfigError, config_to_toml
from trainer.content import EVAL, SERVE, TRAIN, BankContent, ContentSource, build_content_source
from trainer.data.batch import Batch
from trainer.data.device_decode import decode_batch
from trainer.data.item_catalog import ItemsParquet
from trainer.data.prefetch import DevicePrefetcher
from trainer.data.reader import BatchStream, images_from_cache, make_batch_stream
from trainer.data.spec import read_spec
from trainer.data.text_fields import with_dataset_text
from trainer.distributed import DistInfo, StopSignals, all_gather_rows
from trainer.engine import (
    EngineState,
    autocast_dtype,
    clip_gradients,
    compile_blocks,
    release,
    wrap_dense,
)
from trainer.flops import FlopMeter
from trainer.logger import MetricsLogger
from trainer.metrics import EvalAccumulator, format_metric
from trainer.models.frozen_cache import FrozenFeatureCache, HostFiles
from trainer.models.model import LemurModel, build_model, plan_id_tables
from trainer.phases import apply_phase, phase_at
from trainer.step import LemurStep, StepOutput
from trainer.two_stage import freeze_encoders, load_encoders, save_encoders

log = logging.getLogger("lemur")


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def sharding_options(cfg: Config) -> ShardingOptions:
    e = cfg.embeddings
    return ShardingOptions(list(e.sharding_types), e.compute_kernel, e.optimizer, e.lr)


class TrainState:
    """The trainer's own progress, as a checkpoint state: the step and the LoRA phase. Loading a phase other than
    the current one enters it first (`enter_phase`), so the engine has that phase's trainable set."""

    def __init__(self, phase: int, enter_phase: Callable[[int], None], progress: bool = True) -> None:
        self.step = 0
        self.phase = phase
        self.enter_phase = enter_phase
        self.progress = progress
        """False: loading restores the phase only (weights for eval or export), not the step."""

    def state_dict(self) -> dict[str, Any]:
        return {"step": self.step, "phase": self.phase}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if self.progress:
            self.step = state["step"]
        if state["phase"] != self.phase:
            self.enter_phase(state["phase"])

    def reshard_state(self, states: list[dict[str, Any]]) -> tuple[dict[str, Any], str]:
        """Saved by another number of ranks: the step and phase are every rank's, so rank 0's."""
        if any(s != states[0] for s in states):
            raise ValueError(f"the saved ranks disagree on the step and phase: {states}")
        return states[0], f"step {states[0]['step']} and phase {states[0]['phase']} from rank 0"


class Trainer:
    def __init__(self, cfg: Config, info: DistInfo, training: bool = True) -> None:
        """`training` False: a trainer that only loads a checkpoint to score or export it, which writes nothing to
        the run directory (the run's config.toml stays the one it trained with). Text fields, budgets and image use
        the config leaves open are the dataset's (`with_dataset_text`), and so recorded in config.toml."""
        self.spec = read_spec(cfg.data.path)
        cfg = with_dataset_text(cfg, self.spec)
        self.cfg, self.info = cfg, info
        self.out_dir = Path(cfg.logging.out_dir)
        self.plan = plan_id_tables(self.spec, cfg.embeddings)
        self.train_stream, self.inputs = self.train_inputs()
        """What the loop iterates and checkpoints: the reader, with the next batch in flight (`training.prefetch`)."""
        collator = self.train_stream.dataset.collator
        seed_everything(cfg.training.seed)
        model = build_model(
            cfg, self.spec, self.plan, len(collator.tokenizer), collator.tokenizer.pad_token_id
        )
        if cfg.model.content_init:  # the two-stage baseline's second stage
            load_encoders(model.dense, cfg.model.content_init)
        if cfg.model.freeze_content:
            freeze_encoders(model.dense)
        self.full_history = dict(model.history_lengths)
        self.state = TrainState(phase_at(cfg, 0), self.enter_phase)
        apply_phase(cfg, model, self.full_history, self.state.phase)
        model.dense.to(info.device)
        if cfg.training.compile:
            log.info(
                "torch.compile: %s",
                ", ".join(compile_blocks(model.dense, cfg.training.compile_mode, cfg.training.compile_scope)),
            )
        self.items = ItemsParquet(Path(cfg.data.path) / "items.parquet", collator)
        dtype = torch.bfloat16 if cfg.training.dtype == "bfloat16" else torch.float32
        content = build_content_source(
            cfg, self.spec, model.dense.content, self.items, info.device, dtype, info.rank
        )
        step = LemurStep(model, content, cfg.training, dtype, autocast_dtype(cfg))
        try:
            self.dmp = shard_sparse(
                step, model.sparse, sharding_options(cfg), info.device, cfg.data.batch_size
            )
        except ValueError as err:
            raise ConfigError(f"embeddings.sharding_types: {err}") from err
        self.step_module: LemurStep = self.dmp.module
        self.model: LemurModel = self.step_module.model
        self.engine = wrap_dense(cfg, self.model.dense, info.world_size)
        self.step_module.use_dense_engine(self.engine)
        self.checkpointer = Checkpointer(
            self.out_dir / "checkpoints", self.checkpoint_parts(), config_to_toml(cfg), optional=("bank",)
        )
        self.metrics = MetricsLogger(self.out_dir, info.is_main, cfg.logging.tensorboard)
        self.stop_signals = StopSignals()  # installed while `fit` runs
        self.flops = FlopMeter(info.device)
        self.collector = StepCollector(cfg.training.gc_every)
        """Python's garbage collection at scheduled steps while `fit` runs (or inside `with trainer.collector`)."""
        if info.is_main and training:
            self.out_dir.mkdir(parents=True, exist_ok=True)
            (self.out_dir / "config.toml").write_text(config_to_toml(cfg))
        if info.is_main:
            log.info("sharding plan:\n%s", describe_plan(self.dmp))
            log.info("dense parameters: %s (trainable %s)", self.count_params(False), self.count_params(True))

    # ----------------------------------------------------------------------------------------------- parts

    @property
    def step(self) -> int:
        return self.state.step

    @step.setter
    def step(self, value: int) -> None:
        self.state.step = value

    @property
    def phase(self) -> int:
        return self.state.phase

    @property
    def content_source(self) -> ContentSource | None:
        return self.step_module.content

    @property
    def bank(self) -> MemoryBank | None:
        """The memory bank (None unless memory_bank.mode is bank)."""
        source = self.content_source
        return source.bank if isinstance(source, BankContent) else None

    def batches(self, split: str, pin_memory: bool = False) -> BatchStream:
        """The reader for `split`: ids hashed into this run's tables, raw history ids kept for a content source,
        text padded to each batch's longest row."""
        return make_batch_stream(
            self.cfg,
            split,
            self.info.rank,
            self.info.world_size,
            pin_memory=pin_memory,
            table_rows=self.plan.rows,
            raw_histories=self.cfg.memory_bank.enabled,  # a content source looks histories up by raw id
            pad_to_longest=True,
            device=self.info.device,  # data.image_decode = auto: JPEGs are decoded where the batches go
        )

    def train_inputs(self) -> tuple[BatchStream, DevicePrefetcher | BatchStream]:
        """A fresh train reader from the start of its data, and what the loop iterates: that reader, or it with the
        next batch in flight (`training.prefetch`)."""
        stream = self.batches("train", pin_memory=self.info.device.type == "cuda")
        if not self.cfg.training.prefetch:
            return stream, stream
        return stream, DevicePrefetcher(stream, self.to_device, self.info.device)

    def count_params(self, trainable: bool) -> int:
        return sum(p.numel() for p in self.model.dense.parameters() if p.requires_grad or not trainable)

    def checkpoint_parts(self, weights_only: bool = False) -> dict[str, CheckpointPart]:
        """Everything an exact resume needs, in load order: the phase first (it may rebuild the engine), the RNG
        last. `weights_only`: the model only (eval, export; the tables and the bank reshard to any rank count)."""
        sparse = ModelState(self.model.sparse, None if weights_only else self.dmp.fused_optimizer)
        trainer = RankState(self.state)
        if (
            weights_only
        ):  # the saved phase applies (the shape the weights belong to), from rank 0's file by any
            # number of ranks; the step does not
            trainer = RankState(TrainState(self.state.phase, self.enter_phase, progress=False), source_rank=0)
        parts: dict[str, CheckpointPart] = {
            "trainer": trainer,
            "sparse": ShardedState(sparse),
            "dense": EngineState(lambda: self.engine, optimizer=not weights_only),
        }
        if self.bank is not None:
            parts["bank"] = self.bank
        if not weights_only:
            parts["reader"] = RankState(self.inputs)
            parts["rng"] = RankState(RngState())
        return parts

    def resume(self, checkpoint: str) -> None:
        """Continue from `checkpoint` ('auto': the latest in the run directory, if any; none: from step 0). The
        metrics logged after that step go: the run logs those steps again. A checkpoint of another number of ranks
        (or data workers) loads too, not bit-exact (see `Checkpointer.load` and the parts' `reshard_state`)."""
        path = self.checkpointer.resolve(checkpoint)
        if path is not None:
            resize = self.checkpointer.load(path)
            if resize is not None and self.info.is_main:
                log.warning("resuming %s (not bit-exact)", resize.describe())
            log.info("resumed at step %d", self.step)
        dropped = self.metrics.resume_at(self.step)
        if dropped:
            log.info("metrics.jsonl: dropped %d records after step %d", dropped, self.step)

    def load_weights(self, checkpoint: str) -> None:
        """The model of `checkpoint` ('auto': the latest), for eval or export."""
        path = self.checkpointer.resolve(checkpoint)
        if path is None:
            raise FileNotFoundError(f"no checkpoint under {self.checkpointer.root}")
        parts = self.checkpoint_parts(weights_only=True)
        resize = Checkpointer(path.parent, parts, optional=("bank",)).load(path)
        if resize is not None:
            log.info("loaded %s", resize.describe())

    def build_frozen_cache(self) -> None:
        """EM3's frozen-feature cache (model.frozen_cache), computed after any resume or weight load, so the frozen
        bottoms are the weights the run trains with, and under the step's autocast. In host memory
        (model.frozen_cache_placement), each step serves the rows its batch brought along (`to_device`)."""
        content = self.model.dense.content
        if not self.cfg.model.frozen_cache or content is None:
            return
        device = self.info.device
        autocast = autocast_dtype(self.cfg)
        host = self.cfg.model.frozen_cache_placement == "host"
        files = shared_host_files(self.cfg) if host else None
        if files is None or self.info.local_rank == 0:
            with torch.autocast(device.type, autocast or torch.bfloat16, enabled=autocast is not None):
                content.use_frozen_cache(
                    self.items.chunks(), len(self.items), device, autocast, host, files and files.allocate
                )
        if files is not None:  # one host copy, built by local rank 0, mapped by the others
            if self.info.local_rank == 0:
                files.write_meta()
            dist.barrier()
            if self.info.local_rank != 0:
                content.adopt_frozen_cache(FrozenFeatureCache.from_tables(files.mapped(), content.budgets))
            dist.barrier()
            if self.info.local_rank == 0:
                files.unlink()
        if images_from_cache(self.cfg) and content.frozen_cache.images is None:
            raise ConfigError(
                "model.frozen_cache: the reader leaves images undecoded for the cache, but the vision tower has no "
                "frozen block to cache (model.vision_tower.trainable_top_layers >= its depth)"
            )

    # ------------------------------------------------------------------------------------------------ steps

    def forward(self, batch: Batch, mode: str = TRAIN) -> tuple[torch.Tensor, StepOutput]:
        """The step module on this rank's batch (already on the device) at the current step."""
        if self.cfg.training.compile and self.cfg.training.compile_mode == "reduce-overhead":
            torch.compiler.cudagraph_mark_step_begin()  # the last step's graph outputs may be overwritten now
        return self.dmp(batch, self.step, mode)

    def to_device(self, batch: Batch) -> Batch:
        """The reader's batch (pinned host memory) on this rank's device, its JPEGs decoded there when the reader
        left them to the device (data.image_decode; a batch already decoded is returned as it is). With the
        frozen-feature cache in host memory, the rows of the batch's items are gathered here first, on the host
        (on the prefetch thread, beside the step), and go with it (`FrozenFeatureCache.gather`)."""
        content = self.model.dense.content
        cache = content.frozen_cache if content is not None else None
        if cache is not None and cache.host:
            batch = cache.gather(batch, pin=self.info.device.type == "cuda")
        return decode_batch(batch.to(self.info.device, non_blocking=True))

    def train_step(self, batch: Batch) -> torch.Tensor:
        self.collector.step(self.step)
        with record_function("h2d"):
            batch = self.to_device(batch)
        with self.flops.measure(self.step):
            loss, output = self.forward(batch)
            with record_function("backward"):
                self.engine.backward(loss)
        with record_function("optimizer"):
            clip_gradients(self.cfg, self.engine)
            self.engine.step()
        measure = (self.step + 1) % self.cfg.logging.log_every == 0
        self.step_module.after_step(batch, output, self.step, measure)
        self.model.count_targets(batch, gather=all_gather_rows)  # the ID-frequency gate's counts (if on)
        return loss.detach()

    def enter_phase(self, phase: int) -> None:
        """EM3's LoRA phases: new trainable set and history lengths, so a new DeepSpeed engine (optimizer and LR
        schedule restart over the steps left)."""
        apply_phase(self.cfg, self.model, self.full_history, phase)
        release(self.engine)
        left = self.cfg.training.steps - self.cfg.lora.phase2_start
        self.engine = wrap_dense(self.cfg, self.model.dense, self.info.world_size, schedule_steps=left)
        self.step_module.use_dense_engine(self.engine)
        self.state.phase = phase
        log.info(
            "step %d: LoRA phase %d (histories %s, %s trainable dense parameters)",
            self.step,
            phase,
            self.model.history_lengths,
            self.count_params(True),
        )

    @torch.no_grad()
    def evaluate(self, from_bank: bool = False) -> dict[str, float]:
        """Metrics on the eval split; `from_bank`: the serving path (content vectors read from the bank only,
        the encoder does not run)."""
        content = self.model.dense.content
        if self.cfg.model.frozen_cache and content is not None and content.frozen_cache is None:
            self.build_frozen_cache()  # `lemur eval`: the reader left the images to the cache
        self.engine.eval()
        accumulator = EvalAccumulator()
        for batch in self.batches("eval"):
            batch = self.to_device(batch)
            _, out = self.forward(batch, SERVE if from_bank else EVAL)
            accumulator.add(
                out.logits.float(), batch.labels[:, 0], batch.user_id, batch.query_id, batch.cold, batch.valid
            )
        self.engine.train()
        return accumulator.compute()

    # ------------------------------------------------------------------------------------------------ loop

    def fit(self) -> dict[str, Any]:
        """Train to `training.steps`, evaluate, save. A SIGTERM or SIGUSR1 on any rank stops it early instead (see
        `StopSignals`): the ranks agree on a step in the all-reduce of the next log or checkpoint step, at most
        `logging.log_every` steps after the signal (a save or eval under way finishes first), save a checkpoint
        there (the periodic one, so `--resume auto` continues exactly) and return without the final eval, with
        `results["stopped"]`. The previous signal handlers are back when it returns."""
        with self.stop_signals, self.collector:
            return self.train_loop()

    def train_loop(self) -> dict[str, Any]:
        cfg = self.cfg.training
        if self.step == 0 and self.content_source is not None:
            self.content_source.start(self.step)
        self.build_frozen_cache()
        batches = iter(self.inputs)
        show = self.info.is_main and self.cfg.logging.progress_bar
        # Redrawn often on a terminal; in a log file a line every 30 s is plenty.
        interval = 0.5 if sys.stderr.isatty() else 30.0
        bar = tqdm(total=cfg.steps, initial=self.step, disable=not show, desc="train", mininterval=interval)
        window = Window(self.step)
        history: list[float] = []
        results: dict[str, Any] = {"train_loss": history}
        stop = self.stop_signals
        while self.step < cfg.steps:
            if phase_at(self.cfg, self.step) != self.phase:
                self.enter_phase(phase_at(self.cfg, self.step))
            batch = next(batches)
            loss = self.train_step(batch)
            self.step += 1
            window.add(loss, batch.size)
            bar.update(1)
            if self.step % self.cfg.logging.log_every == 0 or self.step == cfg.steps:
                try:
                    values = self.log_train(window)  # the ranks also agree here whether to stop
                except NonFiniteLoss as err:
                    self.roll_back(err, results, bar)
                    window = Window(self.step)
                    continue
                history.append(values["loss"])
                bar.set_postfix(loss=f"{values['loss']:.4f}", refresh=False)
                window = Window(self.step)
            eval_step = cfg.eval_every and self.step % cfg.eval_every == 0
            if eval_step and self.step < cfg.steps and not stop.requested:  # stopping: no time for an eval
                self.log_eval(self.evaluate())
            checkpoint_step = cfg.checkpoint_every and self.step % cfg.checkpoint_every == 0
            if (checkpoint_step and self.step < cfg.steps) or stop.requested:
                try:
                    self.step_losses(window)  # never a checkpoint after a non-finite loss (and agree again)
                except NonFiniteLoss as err:
                    self.roll_back(err, results, bar)
                    window = Window(self.step)
                    continue
                self.checkpointer.save(self.step)
            if stop.requested:
                bar.close()
                if self.info.is_main:
                    log.warning(
                        "stopped on %s at step %d of %d, checkpoint saved; continue with --resume auto",
                        stop.describe(self.info.world_size),
                        self.step,
                        cfg.steps,
                    )
                results["stopped"] = {"step": self.step, "signals": dict(stop.agreed)}
                return results
        bar.close()
        results["eval"] = self.evaluate()
        self.log_eval(results["eval"])
        self.checkpointer.save(self.step)
        if cfg.objective == "contrastive" and self.info.is_main:
            log.info("stage-1 encoders -> %s", save_encoders(self.model.dense, self.out_dir))
        log.info("%s", self.inputs.report())
        return results

    def roll_back(self, err: NonFiniteLoss, results: dict[str, Any], bar: Any) -> None:
        """training.on_nonfinite = rollback: every rank (they all saw the same reduced losses) loads the last
        checkpoint but its reader position, so the batches since then are skipped, and drops the metrics after it.
        Re-raises `err` under on_nonfinite = stop, past max_rollbacks, or without a checkpoint to go back to."""
        cfg = self.cfg.training
        done = results.setdefault("rollbacks", [])
        path = self.checkpointer.resolve("auto") if cfg.on_nonfinite == "rollback" else None
        if cfg.on_nonfinite != "rollback":
            raise err
        if path is None or len(done) >= cfg.max_rollbacks:
            why = "no checkpoint to roll back to" if path is None else f"after {len(done)} rollbacks"
            raise NonFiniteLoss(f"{err} ({why})") from err
        parts = {name: part for name, part in self.checkpoint_parts().items() if name != "reader"}
        Checkpointer(path.parent, parts, optional=("bank",)).load(path)
        self.metrics.resume_at(self.step)
        done.append({"diverged": str(err), "to_step": self.step})
        bar.n = self.step
        log.warning(
            "%s: rolled back to %s (step %d), skipping the batches read since (rollback %d of at most %d)",
            err,
            path.name,
            self.step,
            len(done),
            cfg.max_rollbacks,
        )

    def step_losses(self, window: Window) -> torch.Tensor:
        """The window's losses summed over ranks, one per step (float64, on the host): the only host sync of the
        loss, at log and checkpoint steps. Raises `NonFiniteLoss` (on every rank alike) naming the first step
        whose loss is inf or NaN on any rank."""
        return self.reduced_window(window)[0]

    def reduced_window(self, window: Window) -> tuple[torch.Tensor, float]:
        """`step_losses` and the samples of every rank, from one all-reduce, which also carries the ranks' stop
        votes (`StopSignals`): the ranks agree whether to stop at no cost beyond a few more numbers."""
        votes = self.stop_signals.votes()
        extra = torch.tensor([window.samples, *votes], dtype=torch.float64, device=self.info.device)
        totals = torch.cat([window.stacked(self.info.device), extra])
        dist.all_reduce(totals)
        totals = totals.cpu()
        losses, samples = totals[: window.steps], float(totals[window.steps])
        self.stop_signals.agree(totals[window.steps + 1 :].tolist())
        bad = (~torch.isfinite(losses)).nonzero()
        if len(bad):
            raise NonFiniteLoss(
                f"step {window.first_step + int(bad[0]) + 1}: the training loss is {losses[bad[0]].item()} "
                f"(on at least one of {self.info.world_size} ranks); stopped before writing a checkpoint. "
                "Lower optimizer.lr, raise optimizer.warmup_steps or set training.grad_clip, then resume from "
                "the last checkpoint."
            )
        return losses, samples

    def log_train(self, window: Window) -> dict[str, float]:
        losses, samples = self.reduced_window(window)
        seconds = time.perf_counter() - window.started
        samples_per_s = samples / seconds
        values = {
            "loss": losses.sum().item() / max(1, window.steps * self.info.world_size),
            "lr": self.engine.get_lr()[0],
            "samples_per_s": samples_per_s,
            "samples_per_s_per_rank": samples_per_s / self.info.world_size,
        }
        mfu = self.flops.mfu(window.steps / seconds)
        if mfu is not None:
            values["mfu"] = mfu
        values["skipped_samples"] = float(sum(self.inputs.skipped.values()))
        if self.content_source is not None:
            values.update(self.content_source.metrics(self.info.device))
        self.metrics.log(self.step, "train", values)
        return values

    def log_eval(self, values: dict[str, float]) -> None:
        self.metrics.log(self.step, "eval", values)
        if self.info.is_main:
            shown = ", ".join(
                f"{k}={format_metric(v)}"
                for k, v in values.items()
                if k in ("auc", "gauc", "qauc", "cold_auc", "logloss")
            )
            log.info("step %d eval: %s", self.step, shown)

    def close(self) -> None:
        if isinstance(self.inputs, DevicePrefetcher):
            self.inputs.close()
        self.metrics.close()


class NonFiniteLoss(RuntimeError):
    """The training loss diverged to inf or NaN."""


class Window:
    """Loss and throughput since the last log line, from the step after `first_step`."""

    def __init__(self, first_step: int = 0) -> None:
        self.first_step = first_step
        self.losses: list[torch.Tensor] = []  # kept as tensors: an .item() per step would sync the GPU
        self.samples = 0
        self.started = time.perf_counter()

    def stacked(self, device: torch.device) -> torch.Tensor:
        if not self.losses:
            return torch.zeros(0, dtype=torch.float64, device=device)
        return torch.stack(self.losses).to(device, torch.float64)

    def add(self, loss: torch.Tensor, samples: int) -> None:
        self.losses.append(loss)
        self.samples += samples

    @property
    def steps(self) -> int:
        return len(self.losses)


def shared_host_files(cfg: Config) -> HostFiles | None:
    """Where this host's ranks share the frozen-feature cache's host copy (model.frozen_cache_share), or None for a
    copy per rank: sharing off, one local rank, or no process group. The name is the same for every local rank of
    this job (the rendezvous and the run directory) and differs between jobs."""
    local_ranks = int(os.environ.get("LOCAL_WORLD_SIZE", "1"))
    if not cfg.model.frozen_cache_share or local_ranks <= 1 or not dist.is_initialized():
        return None
    job = (
        ":".join(os.environ.get(k, "") for k in ("MASTER_ADDR", "MASTER_PORT", "TORCHELASTIC_RUN_ID"))
        + f":{Path(cfg.logging.out_dir).resolve()}"
    )
    folder = Path("/dev/shm") if Path("/dev/shm").is_dir() else Path(tempfile.gettempdir())
    return HostFiles(str(folder / f"lemur-frozen-{hashlib.sha1(job.encode()).hexdigest()[:16]}"))
