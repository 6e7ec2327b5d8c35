"""The input side of a pipelined step: the next batch is read and on its way to the device while this one trains.

`DevicePrefetcher` keeps one batch in flight. Handing out batch i it reads batch i + 1 from the reader and starts
its `to_device` (the host-to-device copy, and the JPEG decode where the device decodes them) on a side CUDA stream,
so the copy overlaps batch i's compute instead of queueing in front of it. With `background` (the default on CUDA)
`to_device` runs on a thread of its own: nvJPEG's batched decode keeps its calling thread busy for as long as it
decodes (it releases the GIL), which would otherwise be host time taken from the step's launches.

Batches in flight are not consumed: the state a checkpoint saves is the reader's state after the last batch
handed out (with the bad images the device found in it and before it), so a resume reads the in-flight batch again,
as a run without prefetching would. Only the thread that iterates touches the reader; the `to_device` thread sees
one batch and returns it.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import torch

from trainer.data.batch import Batch
from trainer.data.reader import skip_report


@dataclass
class InFlight:
    host: Batch
    """As the reader gave it (its skip counts are the reader's)."""
    moved: Future[Batch]
    """Its `to_device`, done or under way."""
    state: dict[str, Any]
    """The reader's state right after reading it."""


class DevicePrefetcher:
    """Wraps a `BatchStream` (iteration, `state_dict`/`load_state_dict`/`reshard_state`, `skipped`, `report`)."""

    def __init__(
        self,
        stream: Any,
        to_device: Callable[[Batch], Batch],
        device: torch.device,
        background: bool | None = None,
    ) -> None:
        self.stream = stream
        self.to_device = to_device
        self.device = device
        self.copies = torch.cuda.Stream(device) if device.type == "cuda" else None
        background = device.type == "cuda" if background is None else background
        self.pool = ThreadPoolExecutor(1, thread_name_prefix="to_device") if background else None
        self.batches: Iterator[Batch] | None = None
        self.in_flight: InFlight | None = None
        self.consumed: dict[str, Any] | None = None
        """The state after the last batch handed out (None: nothing handed out since the start or a load)."""
        self.device_skips: Counter = Counter()
        """Bad images the device found (`Batch.skipped` gains them in `to_device`) since the start or a load."""

    def __iter__(self) -> Iterator[Batch]:
        return self

    def __next__(self) -> Batch:
        if self.batches is None:
            self.batches = iter(self.stream)
            self.in_flight = self.read()
        current = self.in_flight
        if current is None:
            raise StopIteration
        self.in_flight = self.read()
        batch = current.moved.result()  # raises what to_device raised (a bad JPEG under bad_input = error)
        for reason, n in batch.skipped.items():
            self.device_skips[reason] += n - current.host.skipped.get(reason, 0)
        self.consumed = current.state
        return self.ready(batch)

    def read(self) -> InFlight | None:
        assert self.batches is not None
        try:
            host = next(self.batches)
        except StopIteration:
            return None
        if host.encoded_images is not None:
            host.encoded_images.skipped = None  # counted here, on this thread, not in the reader's counter
        state = self.stream.state_dict()
        if self.pool is not None:
            return InFlight(host, self.pool.submit(self.move, host), state)
        moved: Future[Batch] = Future()
        try:
            moved.set_result(self.move(host))
        except Exception as err:  # noqa: BLE001 (raised when the batch is handed out, as on the thread)
            moved.set_exception(err)
        return InFlight(host, moved, state)

    def move(self, host: Batch) -> Batch:
        if self.copies is None:
            return self.to_device(host)
        torch.cuda.set_device(self.device)  # a new thread starts on device 0
        with torch.cuda.stream(self.copies):
            batch = self.to_device(host)
        event = torch.cuda.Event()
        event.record(self.copies)
        batch.copied = event  # type: ignore[attr-defined]
        return batch

    def ready(self, batch: Batch) -> Batch:
        """The compute stream waits for the batch's copies, and the allocator keeps its memory until the compute
        stream is done with it (it was allocated on the copy stream)."""
        if self.copies is None:
            return batch
        current = torch.cuda.current_stream(self.device)
        current.wait_event(batch.copied)  # type: ignore[attr-defined]
        batch._map(lambda t: t.record_stream(current) or t)
        return batch

    # ------------------------------------------------------------------ the reader's checkpoint part, consumed only

    def state_dict(self) -> dict[str, Any]:
        state = dict(self.consumed) if self.consumed is not None else self.stream.state_dict()
        skipped = Counter(state.get("skipped", {}))
        skipped.update(self.device_skips)
        return {**state, "skipped": dict(skipped)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.reset()
        self.stream.load_state_dict(state)

    def reshard_state(self, states: list[dict[str, Any]]) -> tuple[dict[str, Any], str]:
        return self.stream.reshard_state(states)

    def reset(self) -> None:
        """Drop the batch in flight (waiting for its `to_device`): the next is read from the reader's (restored)
        position."""
        if self.in_flight is not None:
            self.in_flight.moved.exception()  # finished, whatever it raised
        self.batches, self.in_flight, self.consumed = None, None, None
        self.device_skips = Counter()

    def close(self) -> None:
        self.reset()
        if self.pool is not None:
            self.pool.shutdown(wait=True)

    @property
    def skipped(self) -> dict[str, int]:
        return self.state_dict()["skipped"]

    def report(self) -> str:
        return skip_report(self.skipped)
