"""Checkpoint and resume: sparse tables and their fused optimizer state through torch.distributed.checkpoint, the
dense engine through DeepSpeed, and per rank the reader position, step and RNG states; plus the resolved config.

Atomic: everything is written under `step-N.partial/`; once every rank is done, rank 0 renames it to `step-N/` and
then points `latest` at it (write-then-rename). A crash mid-save leaves `latest` on the previous checkpoint.
The directory must be on storage every rank sees (one machine, or a shared filesystem across nodes).
"""

from __future__ import annotations

import logging
import random
import shutil
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp

from trainer.config import config_to_toml
from trainer.phases import phase_at

if TYPE_CHECKING:
    from trainer.loop import Trainer

log = logging.getLogger("lemur")
LATEST = "latest"


def rng_state() -> dict[str, Any]:
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


class Checkpointer:
    def __init__(self, root: Path, trainer: Trainer, keep: int = 2) -> None:
        self.root = root
        self.trainer = trainer
        self.keep = keep

    def sparse_state(self) -> dict[str, Any]:
        return {
            "model": self.trainer.model.sparse.state_dict(),
            "optimizer": self.trainer.dmp.fused_optimizer.state_dict(),
        }

    def save(self, step: int) -> Path:
        t, rank = self.trainer, dist.get_rank()
        final = self.root / f"step-{step:08d}"
        partial = self.root / f"step-{step:08d}.partial"
        if rank == 0:
            shutil.rmtree(partial, ignore_errors=True)
            partial.mkdir(parents=True)
            (partial / "config.toml").write_text(config_to_toml(t.cfg))
        dist.barrier()
        dcp.save(self.sparse_state(), checkpoint_id=str(partial / "sparse"))
        t.engine.save_checkpoint(str(partial / "dense"), tag="dense")
        if t.bank is not None:
            t.bank.save(partial / "bank")
        torch.save(
            {
                "step": step,
                "phase": t.phase,
                "reader": t.train_stream.state_dict(),
                "rng": rng_state(),
                "world_size": dist.get_world_size(),
            },
            partial / f"trainer-rank{rank:05d}.pt",
        )
        dist.barrier()
        if rank == 0:
            shutil.rmtree(final, ignore_errors=True)
            partial.rename(final)
            tmp = self.root / f".{LATEST}.tmp"
            tmp.write_text(final.name + "\n")
            tmp.replace(self.root / LATEST)
            self.prune()
            log.info("checkpoint: %s", final)
        dist.barrier()
        return final

    def prune(self) -> None:
        done = sorted(p for p in self.root.glob("step-*") if p.is_dir() and not p.name.endswith(".partial"))
        for old in done[: -self.keep] if self.keep > 0 else []:
            shutil.rmtree(old, ignore_errors=True)

    def latest(self) -> Path | None:
        pointer = self.root / LATEST
        if not pointer.is_file():
            return None
        path = self.root / pointer.read_text().strip()
        return path if path.is_dir() else None

    def resolve(self, resume: str) -> Path | None:
        """`auto`: the latest complete checkpoint if any; else a path to one."""
        if resume == "auto":
            return self.latest()
        path = Path(resume)
        if not (path / "sparse").is_dir():
            raise FileNotFoundError(f"--resume {resume}: not a checkpoint directory (no sparse/ in it)")
        return path

    def load(self, path: Path, weights_only: bool = False) -> int:
        """Restore everything for an exact resume (same number of ranks), or with weights_only just the model
        (sparse tables are resharded by DCP to this run's plan, any rank count), e.g. for eval and export."""
        t, rank = self.trainer, dist.get_rank()
        state_file = path / f"trainer-rank{rank:05d}.pt"
        if not weights_only and not state_file.is_file():
            raise FileNotFoundError(
                f"{state_file}: missing; was the checkpoint written by {dist.get_world_size()} ranks?"
            )
        saved_step = torch.load(path / "trainer-rank00000.pt", weights_only=False)["step"]
        if phase_at(t.cfg, saved_step) != t.phase:  # the engine must have that phase's trainable set
            t.step = saved_step
            t.enter_phase(phase_at(t.cfg, saved_step))
        sparse = self.sparse_state() if not weights_only else {"model": t.model.sparse.state_dict()}
        dcp.load(sparse, checkpoint_id=str(path / "sparse"))
        t.model.sparse.load_state_dict(sparse["model"])
        if (
            t.bank is not None and (path / "bank").is_dir()
        ):  # any number of ranks: rows go to their new owners
            t.bank.load(path / "bank")
        if weights_only:
            t.engine.load_checkpoint(
                str(path / "dense"), tag="dense", load_optimizer_states=False, load_lr_scheduler_states=False
            )
            log.info("loaded weights from %s", path)
            return t.step
        t.dmp.fused_optimizer.load_state_dict(sparse["optimizer"])
        t.engine.load_checkpoint(str(path / "dense"), tag="dense")
        state = torch.load(state_file, weights_only=False)  # our own file: reader position, RNG states
        t.train_stream.load_state_dict(state["reader"])
        set_rng_state(state["rng"])
        t.step = state["step"]
        log.info("resumed from %s at step %d", path, t.step)
        return t.step
