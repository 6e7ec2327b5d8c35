"""Process group set-up: torchrun's env:// when launched by it, else a one-process group, so DMP and DeepSpeed
always have one. NCCL on GPU, gloo on CPU, from the same code."""

from __future__ import annotations

import os
import socket
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


def close_distributed() -> None:
    if dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()
