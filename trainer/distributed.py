"""Process group set-up: torchrun's env:// when launched by it, else a one-process group, so DMP and DeepSpeed
always have one. NCCL on GPU, gloo on CPU, from the same code. The end of a job (`ending_job`), and the signals
that ask it to stop early (`StopSignals`)."""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import socket
import threading
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from types import FrameType
from typing import Any

import torch
import torch.distributed as dist


@dataclass
class DistInfo:
    rank: int
    world_size: int
    local_rank: int
    device: torch.device
    backend: str

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def init_distributed(backend: str = "auto") -> DistInfo:
    if "RANK" not in os.environ:  # a plain `python -m trainer.train`: a group of one
        os.environ.update(
            RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(free_port())
        )
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    cuda = torch.cuda.is_available() and backend != "gloo"
    if backend == "auto":
        backend = "nccl" if cuda else "gloo"
    if backend == "nccl" and not torch.cuda.is_available():
        raise RuntimeError("distributed.backend = nccl needs CUDA; use gloo (or auto) on CPU")
    device = torch.device("cuda", local_rank) if cuda else torch.device("cpu")
    if cuda:
        torch.cuda.set_device(device)
    if not dist.is_initialized():
        dist.init_process_group(backend=backend, device_id=device if cuda else None)
    return DistInfo(dist.get_rank(), dist.get_world_size(), local_rank, device, backend)


def close_distributed(failed: bool = False) -> None:
    """The end of a job: every rank meets at a barrier, then the group goes. `failed` (this rank raised): no
    barrier, since the other ranks may be waiting in another collective and would keep this one waiting until the
    process group's timeout (30 minutes on gloo); the group is torn down at once, so the peers' collectives fail
    (gloo: the connection closes) and torchrun's agent sees this rank's exit."""
    if not dist.is_initialized():
        return
    if not failed:
        dist.barrier()
        dist.destroy_process_group()
        return
    abort = getattr(dist.distributed_c10d, "_abort_process_group", None)
    try:
        if abort is not None and dist.get_backend() == "nccl":
            abort()  # destroy would wait for this rank's own pending NCCL work
        else:
            dist.destroy_process_group()
    except Exception:  # noqa: BLE001 (tearing down after a failure; the original error is what matters)
        pass


def all_gather_rows(tensor: torch.Tensor) -> torch.Tensor:
    """Every rank's `tensor` (the same shape on each) concatenated along dim 0 in rank order; itself on one rank.
    For a small per-step tensor that replicated state must see from all ranks (the ID-frequency gate's target rows):
    a device-side collective, no host sync."""
    if not dist.is_initialized() or dist.get_world_size() == 1:
        return tensor
    parts = [torch.empty_like(tensor) for _ in range(dist.get_world_size())]
    dist.all_gather(parts, tensor.contiguous())
    return torch.cat(parts)


@contextlib.contextmanager
def ending_job() -> Iterator[None]:
    """The body of a job (train, eval, export) on each rank. It ends with `close_distributed()`; when this rank
    raises, the error is printed here, on the rank that failed (the others only see their collectives break), and
    the group is torn down without waiting for the others (`failed=True`) before the error goes on."""
    try:
        yield
    except BaseException as err:
        if dist.is_initialized() and dist.get_world_size() > 1:
            logging.getLogger("lemur").error("rank %d failed: %r", dist.get_rank(), err, exc_info=True)
        close_distributed(failed=True)
        raise
    close_distributed()


STOP_SIGNALS = (signal.SIGTERM, signal.SIGUSR1)
"""What preemption sends: Slurm's scancel and time limit (SIGTERM, or SIGUSR1 with `--signal=USR1@SECONDS`),
torchrun passing on its own SIGTERM, a Kubernetes pod's deletion."""


class StopSignals:
    """SIGTERM and SIGUSR1 as a request to stop at the next step where the ranks agree. Within `with`, on the main
    thread, the handlers only note which signal came (no logging, no raising), so a signal never interrupts what
    the rank is doing, a checkpoint save included, and a second one changes nothing; the previous handlers come back
    at the end of the block.

    Signals reach the ranks at different times, so no rank may act on its own. The loop adds `votes()` to a sum
    all-reduce it already makes every few steps and gives the sums to `agree`: every rank then sees the same
    numbers at the same step, so all of them stop there (`requested`) or none does."""

    def __init__(self, signals: Sequence[signal.Signals] = STOP_SIGNALS) -> None:
        self.signals = tuple(signals)
        self.received: set[signal.Signals] = set()
        """The signals this rank got (set by the handler)."""
        self.agreed: dict[str, int] = {}
        """Once the ranks agreed to stop: signal name -> the number of ranks that had got it."""
        self._previous: dict[signal.Signals, Any] = {}

    def __enter__(self) -> StopSignals:
        if threading.current_thread() is not threading.main_thread():
            logging.getLogger("lemur").warning("not on the main thread: SIGTERM/SIGUSR1 stop the job at once")
            return self
        for sig in self.signals:
            self._previous[sig] = signal.signal(sig, self._note)
        return self

    def __exit__(self, *exc: object) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, signal.SIG_DFL if handler is None else handler)  # None: not set from Python
        self._previous.clear()

    def _note(self, signum: int, frame: FrameType | None) -> None:
        self.received.add(signal.Signals(signum))

    def votes(self) -> list[float]:
        """Per signal, 1.0 if this rank got it: to be summed over the ranks."""
        return [float(sig in self.received) for sig in self.signals]

    def agree(self, summed: Sequence[float]) -> None:
        """`votes()` summed over the ranks (the same on every rank). Any vote is a stop, and it stays one."""
        if not self.agreed:
            self.agreed = {sig.name: int(n) for sig, n in zip(self.signals, summed) if n > 0}

    @property
    def requested(self) -> bool:
        return bool(self.agreed)

    def describe(self, world_size: int) -> str:
        """E.g. 'SIGTERM (1 of 2 ranks)'."""
        return ", ".join(f"{name} ({n} of {world_size} ranks)" for name, n in self.agreed.items())
