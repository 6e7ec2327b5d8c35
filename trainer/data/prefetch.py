"""The input side of a pipelined step: the next batch is read and on its way to the device while this one trains.

`DevicePrefetcher` keeps one batch in flight. Handing out batch i it pulls batch i + 1 from the reader and starts
its host-to-device copy (and whatever `to_device` does on the device, such as decoding images) on a side CUDA
stream, so the copy overlaps batch i's compute instead of queueing in front of it. Batches in flight are not
consumed: the state a checkpoint saves is the reader's state before the in-flight batch was read, so a resume
reads that batch again, as a run without prefetching would.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

import torch

from trainer.data.batch import Batch


class DevicePrefetcher:
    """Wraps a `BatchStream` (iteration, `state_dict`/`load_state_dict`/`reshard_state`, `skipped`, `report`)."""

    def __init__(self, stream: Any, to_device: Callable[[Batch], Batch], device: torch.device) -> None:
        self.stream = stream
        self.to_device = to_device
        self.device = device
        self.copies = torch.cuda.Stream(device) if device.type == "cuda" else None
        self.batches: Iterator[Batch] | None = None
        self.in_flight: Batch | None = None
        self.consumed: dict[str, Any] | None = None
        """The reader's state before the in-flight batch was read: what has been handed out."""

    def __iter__(self) -> Iterator[Batch]:
        return self

    def __next__(self) -> Batch:
        if self.batches is None:
            self.batches = iter(self.stream)
            self.in_flight = self.fetch()
        batch = self.in_flight
        if batch is None:
            raise StopIteration
        self.in_flight = self.fetch()
        return self.ready(batch)

    def fetch(self) -> Batch | None:
        assert self.batches is not None
        self.consumed = self.stream.state_dict()
        try:
            batch = next(self.batches)
        except StopIteration:
            return None
        if self.copies is None:
            return self.to_device(batch)
        with torch.cuda.stream(self.copies):
            return self.to_device(batch)

    def ready(self, batch: Batch) -> Batch:
        """The compute stream waits for the batch's copies, and the allocator keeps its memory until the compute
        stream is done with it (it was allocated on the copy stream)."""
        if self.copies is None:
            return batch
        current = torch.cuda.current_stream(self.device)
        current.wait_stream(self.copies)
        batch._map(lambda t: t.record_stream(current) or t)
        return batch

    # ------------------------------------------------------------------ the reader's checkpoint part, consumed only

    def state_dict(self) -> dict[str, Any]:
        return (
            dict(self.consumed) if self.in_flight is not None and self.consumed else self.stream.state_dict()
        )

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.reset()
        self.stream.load_state_dict(state)

    def reshard_state(self, states: list[dict[str, Any]]) -> tuple[dict[str, Any], str]:
        return self.stream.reshard_state(states)

    def reset(self) -> None:
        """Drop the batch in flight: the next one is read from the reader's (restored) position."""
        self.batches, self.in_flight, self.consumed = None, None, None

    @property
    def skipped(self) -> Any:
        return self.state_dict()["skipped"]

    def report(self) -> str:
        return self.stream.report()
