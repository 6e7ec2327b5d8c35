"""Checkpoints made of parts that save themselves (torchtitan's `CheckpointManager(states={...})`).

The checkpointer takes `{name: part}` and knows nothing else about the run: each part writes and reads its own
sub-directory of `step-N/` (`save(directory)`, `load(directory)`, both collectives: every rank calls them, in
the order the parts are given). The adapters below turn a `state_dict`/`load_state_dict` object into a part:
`ShardedState` (sharded tensors, through torch.distributed.checkpoint, resharded on load) and `RankState` (one
file per rank: the reader position, the trainer's step and RNG). The DeepSpeed engine (`trainer/engine.py`) and the
memory bank save themselves.

Another number of ranks: a checkpoint written by N ranks loads into M. Before any part loads, `Checkpointer.load`
asks every part with a `plan_resize(directory, saved_world_size)` how it will load (a phrase for the log) or to
refuse (then nothing was loaded; every rank reads the same files, so every rank decides alike). Parts without it
reshard by themselves (`ShardedState`, the memory bank). A `RankState` reads every saved rank's file and lets its
state build this rank's state from them (`reshard_state(states) -> (state, phrase)`).

Atomic: everything is written under `step-N.partial/`; once every rank is done, rank 0 renames it to `step-N/` and
then points `latest` at it (write-then-rename). A crash mid-save leaves `latest` on the previous checkpoint.
The directory must be on storage every rank sees (one machine, or a shared filesystem across nodes).
"""

from __future__ import annotations

import errno
import logging
import random
import shutil
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp

log = logging.getLogger("lemur")
LATEST = "latest"
CONFIG_FILE = "config.toml"


class Stateful(Protocol):
    def state_dict(self) -> dict[str, Any]: ...

    def load_state_dict(self, state: dict[str, Any]) -> None: ...


class CheckpointPart(Protocol):
    """One part of a checkpoint: writes and reads its own directory. Both are collectives. A part may also have
    `plan_resize(directory, saved_world_size) -> str` (see `Resizable`)."""

    def save(self, directory: Path) -> None: ...

    def load(self, directory: Path) -> None: ...


class Resizable(Protocol):
    def plan_resize(self, directory: Path, saved_world_size: int) -> str:
        """Before any part loads: how this part will load a checkpoint that `saved_world_size` ranks wrote into
        this run's number of ranks (a phrase for the log), or raise if it cannot. Not a collective."""
        ...


class Reshardable(Protocol):
    def reshard_state(self, states: list[dict[str, Any]]) -> tuple[dict[str, Any], str]:
        """This rank's state, built from the states every rank of a run of another size saved (in rank order),
        and a phrase for the log saying how."""
        ...


class ShardedState:
    """A state whose tensors are sharded over the ranks (TorchRec's tables and their fused optimizer state):
    saved with torch.distributed.checkpoint, and resharded to this run's plan on load (any number of ranks)."""

    def __init__(self, state: Stateful) -> None:
        self.state = state

    def save(self, directory: Path) -> None:
        dcp.save(self.state.state_dict(), checkpoint_id=str(directory))

    def load(self, directory: Path) -> None:
        target = self.state.state_dict()  # DCP loads in place, into this run's shards
        dcp.load(target, checkpoint_id=str(directory))
        self.state.load_state_dict(target)


class RankState:
    """A state that is each rank's own: one file per rank, which records the number of ranks that wrote it.
    `source_rank` reads that rank's file on every rank instead (state that is the same on all ranks, read by a
    run of any size). Written by another number of ranks, every saved rank's file is read and the state builds
    this rank's state from them (`Reshardable.reshard_state`; a state without it cannot be resized)."""

    def __init__(self, state: Stateful, source_rank: int | None = None) -> None:
        self.state = state
        self.source_rank = source_rank

    def save(self, directory: Path) -> None:
        directory.mkdir(parents=True, exist_ok=True)
        rank, world_size = rank_and_world()
        torch.save({"world_size": world_size, "state": self.state.state_dict()}, directory / rank_file(rank))

    def load(self, directory: Path) -> None:
        rank, world_size = rank_and_world()
        if self.source_rank is not None:
            self.state.load_state_dict(read_rank_file(directory, self.source_rank)["state"])
            return
        saved = saved_world_size(directory)
        if saved == world_size:
            self.state.load_state_dict(read_rank_file(directory, rank)["state"])
        else:
            self.state.load_state_dict(self.resharded(directory, saved)[0])

    def plan_resize(self, directory: Path, saved_world_size: int) -> str:
        if self.source_rank is not None:
            return f"from rank {self.source_rank}"
        return self.resharded(directory, saved_world_size)[1]

    def resharded(self, directory: Path, saved: int) -> tuple[dict[str, Any], str]:
        reshard = getattr(self.state, "reshard_state", None)
        if reshard is None:
            raise ValueError(
                f"{directory}: written by {saved} ranks, and {type(self.state).__name__} cannot be loaded by "
                f"{rank_and_world()[1]}"
            )
        return reshard([read_rank_file(directory, r)["state"] for r in range(saved)])


def read_rank_file(directory: Path, rank: int) -> dict[str, Any]:
    path = directory / rank_file(rank)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: missing (the checkpoint is incomplete)")
    return torch.load(path, weights_only=False)  # our own file: positions, RNG states


def saved_world_size(directory: Path) -> int:
    """The number of ranks that wrote a `RankState` directory (rank 0's file says), checked against the files
    present: a missing one fails here, on every rank alike, before anything loads."""
    saved = read_rank_file(directory, 0)["world_size"]
    missing = [rank_file(r) for r in range(saved) if not (directory / rank_file(r)).is_file()]
    if missing:
        raise FileNotFoundError(
            f"{directory}: written by {saved} ranks, but {', '.join(missing)} missing (the checkpoint is incomplete)"
        )
    return saved


LOW_SPACE = 64 * 2**20
"""Free bytes under which a failed write is put down to a full disk."""


def write_error(err: BaseException, path: Path) -> OSError:
    """A failed checkpoint write as an error naming the path, and ENOSPC when the disk is full: torch.save and
    DeepSpeed report a full disk as a bare 'basic_ios::clear: iostream error' or 'failed writing file'."""
    free = free_bytes(path)
    if getattr(err, "errno", None) == errno.ENOSPC or (free is not None and free < LOW_SPACE):
        left = "" if free is None else f", {free / 2**20:.0f} MiB free"
        return OSError(
            errno.ENOSPC,
            f"no space left on device writing checkpoint {path}{left} ({err}); the partial checkpoint was removed "
            "and the last complete one is kept",
        )
    return OSError(getattr(err, "errno", None) or errno.EIO, f"writing checkpoint {path}: {err}")


def free_bytes(path: Path) -> int | None:
    """Free space of the filesystem holding `path` (its nearest existing parent)."""
    for parent in (path, *path.parents):
        if parent.exists():
            try:
                return shutil.disk_usage(parent).free
            except OSError:
                return None
    return None


def rank_file(rank: int) -> str:
    return f"rank{rank:05d}.pt"


def rank_and_world() -> tuple[int, int]:
    return (dist.get_rank(), dist.get_world_size()) if dist.is_initialized() else (0, 1)


class ModelState:
    """A module's weights and, optionally, its optimizer's state, as one state dict."""

    def __init__(self, module: torch.nn.Module, optimizer: Any | None = None) -> None:
        self.module, self.optimizer = module, optimizer

    def state_dict(self) -> dict[str, Any]:
        state = {"model": self.module.state_dict()}
        if self.optimizer is not None:
            state["optimizer"] = self.optimizer.state_dict()
        return state

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.module.load_state_dict(state["model"])
        if self.optimizer is not None:
            self.optimizer.load_state_dict(state["optimizer"])


class RngState:
    """Python's, numpy's, torch's and CUDA's RNG states (restore it last: loading other parts may draw)."""

    def state_dict(self) -> dict[str, Any]:
        state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
        if torch.cuda.is_available():
            state["cuda"] = torch.cuda.get_rng_state()
        return state

    def load_state_dict(self, state: dict[str, Any]) -> None:
        random.setstate(state["python"])
        np.random.set_state(state["numpy"])
        torch.set_rng_state(state["torch"])
        if "cuda" in state and torch.cuda.is_available():
            torch.cuda.set_rng_state(state["cuda"])

    def reshard_state(self, states: list[dict[str, Any]]) -> tuple[dict[str, Any], str]:
        """This rank's saved states where it saved any, else rank 0's (ranks past the saved ones then draw what
        rank 0 draws: not the run an uninterrupted job of this size would make)."""
        rank = rank_and_world()[0]
        return states[rank if rank < len(states) else 0], "restored per rank where saved (else rank 0's)"


@dataclass
class Resize:
    """How a checkpoint written by another number of ranks loads: each part's phrase, by part name."""

    saved_world_size: int
    world_size: int
    notes: dict[str, str]

    def describe(self) -> str:
        parts = ", ".join(f"{name} {note}" for name, note in self.notes.items())
        return f"a checkpoint of {ranks(self.saved_world_size)} on {ranks(self.world_size)}: {parts}"


def ranks(n: int) -> str:
    return f"{n} rank{'' if n == 1 else 's'}"


class Checkpointer:
    """Saves and loads `parts` (in their order) under `root/step-N/<name>/`. Parts named in `optional` may be
    absent from a checkpoint (they are then left as they are)."""

    def __init__(
        self,
        root: Path,
        parts: Mapping[str, CheckpointPart],
        config_text: str = "",
        keep: int = 2,
        optional: tuple[str, ...] = (),
    ) -> None:
        self.root = Path(root)
        self.parts = dict(parts)
        self.config_text = config_text
        self.keep = keep
        self.optional = set(optional)

    def save(self, step: int) -> Path:
        rank = dist.get_rank()
        final = self.root / f"step-{step:08d}"
        partial = self.root / f"step-{step:08d}.partial"
        if rank == 0:
            shutil.rmtree(partial, ignore_errors=True)
            partial.mkdir(parents=True)
            (partial / CONFIG_FILE).write_text(self.config_text)
        dist.barrier()
        for name, part in self.parts.items():
            try:
                part.save(partial / name)
            except Exception as err:  # noqa: BLE001 - torch.save, DCP and DeepSpeed each raise their own kind
                shutil.rmtree(partial, ignore_errors=True)  # never the latest: the last complete one stays
                raise write_error(err, partial / name) from err
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

    def load(self, path: Path) -> Resize | None:
        """Load every part present. Written by another number of ranks: every part plans its load first, so one
        that cannot load at this size refuses before anything loads; returns the plan (None at the same size)."""
        missing = self.missing_parts(path)
        if missing:
            raise FileNotFoundError(
                f"{path}: not a complete checkpoint for this run: no {', '.join(missing)}"
            )
        present = {name: part for name, part in self.parts.items() if (path / name).is_dir()}
        resize = self.plan_resize(path, present)
        for name, part in present.items():
            part.load(path / name)
        log.info("loaded %s from %s", ", ".join(present), path)
        return resize

    def plan_resize(self, path: Path, present: Mapping[str, CheckpointPart]) -> Resize | None:
        """The number of ranks that wrote `path` (its `RankState` parts' files say; without any, this run's) and,
        where it differs from this run's, each part's plan (`Resizable.plan_resize`; a part without one reshards
        by itself: DCP, the memory bank)."""
        world = rank_and_world()[1]
        per_rank = [name for name, part in present.items() if isinstance(part, RankState)]
        saved = saved_world_size(path / per_rank[0]) if per_rank else world
        if saved == world:
            return None
        notes = {}
        for name, part in present.items():
            plan = getattr(part, "plan_resize", None)
            notes[name] = plan(path / name, saved) if plan is not None else "resharded"
        return Resize(saved, world, notes)

    def missing_parts(self, path: Path) -> list[str]:
        return [f"{n}/" for n in self.parts if n not in self.optional and not (path / n).is_dir()]

    def prune(self) -> None:
        done = sorted(p for p in self.root.glob("step-*") if p.is_dir() and not p.name.endswith(".partial"))
        for old in done[: -self.keep] if self.keep > 0 else []:
            shutil.rmtree(old, ignore_errors=True)

    def latest(self) -> Path | None:
        """The complete checkpoint `latest` names. Without a pointer to one (lost, or a crash between the rename
        and the pointer's update), the newest complete `step-N/`: a run never starts over on top of its own
        checkpoints (and overwrites them)."""
        pointer = self.root / LATEST
        if pointer.is_file():
            path = self.root / pointer.read_text().strip()
            if path.is_dir() and not self.missing_parts(path):
                return path
        complete = sorted(
            p
            for p in self.root.glob("step-*")
            if p.is_dir() and not p.name.endswith(".partial") and not self.missing_parts(p)
        )
        if not complete:
            return None
        log.warning(
            "%s: no valid %r pointer; taking the newest complete checkpoint, %s",
            self.root,
            LATEST,
            complete[-1].name,
        )
        return complete[-1]

    def resolve(self, resume: str) -> Path | None:
        """`auto`: the latest complete checkpoint if any; else a path to one."""
        if resume == "auto":
            return self.latest()
        path = Path(resume)
        missing = self.missing_parts(path)
        if not path.is_dir() or missing:
            raise FileNotFoundError(
                f"--resume {resume}: not a checkpoint directory (no {', '.join(missing) or 'such directory'})"
            )
        return path
