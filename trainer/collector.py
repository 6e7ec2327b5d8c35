"""Python's garbage collector in the training process: collected at steps chosen in advance, not whenever the
allocation count says.

A training process holds millions of long-lived objects (torch, TorchRec, DeepSpeed, torch.compile's graphs and
guards), and Python's automatic collector runs in the middle of whichever step crosses its allocation threshold;
a collection walks every tracked object its generations hold (a gen-1 collection over what a benchmark's profiled
steps had left took 205 and 283 ms on the H200 host). Across ranks, such a pause on one rank holds up
all the others at the next collective. As torchtitan does (`training.gc_freq`), the automatic collector is off while
the loop runs, and the young generations are collected every `every` steps, at the same steps on every rank; every
`FULL_EVERY`th of those collections is a full one, so cycles that reached the oldest generation are still freed.
On one H200 the automatic collections of the lemur step, reader included, took under 0.1 ms a step
(benchmarks/results/step-2026-12-03-h200-x1-reader-steady.md): the schedule is not a single-GPU speed-up.
"""

from __future__ import annotations

import gc
import logging
import time
from types import TracebackType

log = logging.getLogger(__name__)

FULL_EVERY = 20
"""Every this many scheduled collections, a full one (all generations)."""


class StepCollector:
    """`with collector:` turns automatic collection off (and back to what it was on leaving); `collector.step(n)`
    at each step collects at the steps due. `every` = 0: Python's automatic collection throughout, and both do
    nothing. Entering and leaving collect nothing themselves: a full collection walks the whole heap (0.2 s in a
    process that has imported torch, DeepSpeed and TorchRec, on a 2-core CPU), and automatic collection, back on
    after the loop, frees what the loop left."""

    def __init__(self, every: int) -> None:
        if every < 0:
            raise ValueError(f"collection interval must be >= 0 steps, got {every}")
        self.every = every
        self.active = False
        self.collections = 0
        self._was_enabled = True

    def __enter__(self) -> StepCollector:
        if self.every and not self.active:
            self._was_enabled = gc.isenabled()
            gc.disable()
            self.active = True
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        if self.active:
            self.active = False
            if self._was_enabled:
                gc.enable()

    def step(self, step: int) -> None:
        """At a step the schedule names: collect (young generations, or all of them every `FULL_EVERY`th time)."""
        if self.active and step > 0 and step % self.every == 0:
            self._collect(2 if (step // self.every) % FULL_EVERY == 0 else 1)

    def _collect(self, generation: int) -> None:
        began = time.perf_counter()
        gc.collect(generation)
        self.collections += 1
        log.debug("gc: generation %d collected in %.1f ms", generation, (time.perf_counter() - began) * 1e3)
