"""How a DataLoader worker hands a batch to the training process: all its tensors in one memfd, read, never mapped.

With torch's own sharing, every tensor of a batch travels as a shared-memory file that the training process maps;
when the batch is dropped (on the DataLoader's pinning thread, right after it copied the batch into pinned memory)
the mappings are torn down while that thread holds the GIL. For a lemur batch of 2048 (26 tensors, 33 MiB) the
tear-down took 5.7-15 ms on the 2-core CI machine, and a pure-Python loop standing in for the step's thread ran at
80% of its speed alone while batches came in at one per 40 ms (`benchmarks/worker_handover.py`).

Here the worker copies the batch's tensors into one memfd (anonymous shared memory, sealed at its size, freed by
the kernel once the last descriptor and mapping are gone) and sends its descriptor through multiprocessing's
resource sharer, the way torch's `file_descriptor` strategy sends each of its files. The training process maps it
with Python's mmap, whose mapping and unmapping release the GIL, and either pins a copy (torch's copy releases it
too) and drops the mapping, or keeps it; the batch's tensors become views of that one buffer (`Batch.storage`),
which then goes to the device in one copy. `encoded_images` (the JPEGs left for the device) still travel with
torch's sharing.
"""

from __future__ import annotations

import fcntl
import mmap
import os
from multiprocessing.reduction import DupFd
from typing import Any

import torch

from trainer.data.batch import Batch

ALIGN = 64
"""Bytes each tensor starts on in the buffer (a multiple of every element size, and of vector loads' 16)."""

AVAILABLE = hasattr(os, "memfd_create")
"""Linux. Elsewhere workers hand batches over with torch's sharing."""

_PLACEHOLDER = torch.empty(0)
"""Where a tensor was in the batch skeleton that travels with the descriptor (one object: pickled once)."""


def _aligned(offset: int) -> int:
    return -(-offset // ALIGN) * ALIGN


class HandOver:
    """A worker's batch, already written into its own memfd (here, so an error is the worker's, raised in the
    training process; pickling runs later, on the queue's feeder thread). Pickles as `Received`."""

    def __init__(self, batch: Batch) -> None:
        tensors: list[torch.Tensor] = []
        self.skeleton = batch._map_tensors(lambda t: tensors.append(t) or _PLACEHOLDER)
        self.layout: list[tuple[int, torch.dtype, tuple[int, ...]]] = []
        end = 0
        for t in tensors:
            start = _aligned(end)
            self.layout.append((start, t.dtype, tuple(t.shape)))
            end = start + t.numel() * t.element_size()
        self.nbytes = _aligned(max(end, 1))
        self.fd = os.memfd_create("lemur-batch", os.MFD_CLOEXEC | os.MFD_ALLOW_SEALING)
        try:
            os.ftruncate(self.fd, self.nbytes)
            with mmap.mmap(self.fd, self.nbytes) as mapped:
                buffer = torch.frombuffer(mapped, dtype=torch.uint8)
                for t, (start, dtype, shape) in zip(tensors, self.layout):
                    buffer[start : start + t.numel() * t.element_size()].view(dtype).view(shape).copy_(t)
                del buffer  # the mapping closes only once no tensor looks into it
            # its size fixed for good: a mapping of it can never run past its end (SIGBUS)
            fcntl.fcntl(
                self.fd, fcntl.F_ADD_SEALS, fcntl.F_SEAL_SHRINK | fcntl.F_SEAL_GROW | fcntl.F_SEAL_SEAL
            )
        except BaseException:
            os.close(self.fd)
            raise

    def __reduce__(self) -> tuple[Any, ...]:
        return Received, (DupFd(self.fd), self.nbytes, self.skeleton, self.layout)

    def __del__(self) -> None:
        os.close(self.fd)


class Received:
    """A batch handed over, not yet read: the DataLoader's pinning thread reads it into pinned memory
    (`pin_memory`), or the reader maps it (`read`)."""

    def __init__(
        self,
        handle: Any,
        nbytes: int,
        skeleton: Batch,
        layout: list[tuple[int, torch.dtype, tuple[int, ...]]],
    ) -> None:
        self.fd: int | None = handle.detach()
        self.nbytes, self.skeleton, self.layout = nbytes, skeleton, layout

    def pin_memory(self) -> Batch:
        batch = self.read(pin=True)
        if batch.encoded_images is not None:
            batch.encoded_images = batch.encoded_images.pin_memory()
        return batch

    def read(self, pin: bool = False) -> Batch:
        """The batch, its tensors views of the memfd's mapping, or (`pin`) of a pinned copy of it. Mapping,
        copying and unmapping all run with the GIL released (the pages fault in inside torch's copy, and Python's
        mmap unmaps without the GIL), so the step's thread goes on meanwhile."""
        if self.fd is None:
            raise RuntimeError("a handed-over batch is read once")
        try:
            size = os.fstat(self.fd).st_size
            if size != self.nbytes:
                raise EOFError(f"a handed-over batch holds {size} bytes, its layout {self.nbytes}")
            mapped = mmap.mmap(self.fd, self.nbytes)
        finally:
            self.close()
        data = torch.frombuffer(mapped, dtype=torch.uint8)
        storage = data.pin_memory() if pin else data
        del data, mapped  # pinned: the mapping goes here; else with the batch's last tensor
        views = iter(
            storage[start : start + _nbytes(dtype, shape)].view(dtype).view(shape)
            for start, dtype, shape in self.layout
        )
        batch = self.skeleton._map_tensors(lambda _: next(views))
        batch.storage = storage
        return batch

    def close(self) -> None:
        if self.fd is not None:
            os.close(self.fd)
            self.fd = None

    def __del__(self) -> None:
        self.close()


def _nbytes(dtype: torch.dtype, shape: tuple[int, ...]) -> int:
    return torch.Size(shape).numel() * torch.empty(0, dtype=dtype).element_size()


def received(batch: Batch | Received) -> Batch:
    """The batch a DataLoader yielded: read here unless its pinning thread read it."""
    return batch.read() if isinstance(batch, Received) else batch
