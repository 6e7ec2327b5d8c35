"""Process group set-up: torchrun's env:// when launched by it, else a one-process group, so DMP and DeepSpeed
always have one. NCCL on GPU, gloo on CPU, from the same code."""

from __future__ import annotations

import contextlib
import logging
import os
import socket
from collections.abc import Iterator
from dataclasses import dataclass

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
