"""The training loop's garbage-collection schedule (`trainer/collector.py`)."""

from __future__ import annotations

import gc

import pytest

from trainer.collector import FULL_EVERY, StepCollector


class Cycle:
    def __init__(self) -> None:
        self.me = self


def collected_generations(collector: StepCollector, steps: range) -> list[tuple[int, int]]:
    """(step, generation) of every collection the schedule ran over `steps`."""
    seen: list[int] = []

    def callback(phase: str, info: dict[str, int]) -> None:
        if phase == "start":
            seen.append(info["generation"])

    gc.callbacks.append(callback)
    try:
        out = []
        for step in steps:
            before = len(seen)
            collector.step(step)
            out += [(step, g) for g in seen[before:]]
        return out
    finally:
        gc.callbacks.remove(callback)


def test_automatic_collection_is_off_inside_and_back_after() -> None:
    assert gc.isenabled()
    with StepCollector(5) as collector:
        assert not gc.isenabled()
    assert gc.isenabled()
    assert collector.collections == 0  # entering and leaving walk nothing


def test_a_disabled_collector_is_left_disabled() -> None:
    gc.disable()
    try:
        with StepCollector(5):
            pass
        assert not gc.isenabled()
    finally:
        gc.enable()


def test_collections_come_at_the_scheduled_steps_young_then_full() -> None:
    every = 3
    with StepCollector(every) as collector:
        runs = collected_generations(collector, range(every * FULL_EVERY + 1))
    assert [s for s, _ in runs] == list(range(every, every * FULL_EVERY + 1, every))
    assert {g for s, g in runs if s < every * FULL_EVERY} == {1}
    assert runs[-1] == (every * FULL_EVERY, 2)


def test_scheduled_collections_free_cycles_that_automatic_collection_would_not() -> None:
    with StepCollector(2) as collector:
        for _ in range(5000):  # far past generation 0's threshold: automatic collection would have run
            Cycle()
        assert sum(isinstance(o, Cycle) for o in gc.get_objects()) >= 5000
        collector.step(2)
        assert not any(isinstance(o, Cycle) for o in gc.get_objects())


def test_every_zero_leaves_python_in_charge() -> None:
    with StepCollector(0) as collector:
        assert gc.isenabled()
        assert collected_generations(collector, range(100)) == []
    assert collector.collections == 0


def test_outside_the_loop_steps_collect_nothing() -> None:
    collector = StepCollector(1)
    assert collected_generations(collector, range(1, 10)) == []


def test_a_negative_interval_is_refused() -> None:
    with pytest.raises(ValueError, match="must be >= 0"):
        StepCollector(-1)
