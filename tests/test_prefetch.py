"""The pipelined input (`trainer/data/prefetch.py`): the same batches as the plain reader, a checkpointed state that
leaves the batch in flight unconsumed (a resume reads it again), and a trainer that trains the same losses with it
as without it."""

from __future__ import annotations

from pathlib import Path

import torch

from tests.conftest import small_config
from tests.test_content_source import _trainer, in_process
from trainer.data.batch import Batch
from trainer.data.prefetch import DevicePrefetcher
from trainer.data.reader import make_batch_stream

CPU = torch.device("cpu")


def _stream(dataset: Path):  # type: ignore[no-untyped-def]
    cfg = small_config(dataset, "data.num_workers=2")
    return make_batch_stream(cfg, "train", pad_to_longest=True)


def _key(batch: Batch) -> tuple[list[int], list[float]]:
    return batch.item_id.tolist(), batch.labels[:, 0].tolist()


def test_prefetcher_states_leave_the_batch_in_flight_unconsumed(small_dataset: Path) -> None:
    plain = _stream(small_dataset)
    batches, states = [], []
    for batch in plain:  # the reference: the state after each batch handed out
        batches.append(_key(batch))
        states.append(plain.state_dict())
        if len(batches) == 6:
            break

    prefetched = DevicePrefetcher(_stream(small_dataset), lambda b: b, CPU)
    for i, batch in zip(range(3), prefetched):
        assert _key(batch) == batches[i]
        assert prefetched.in_flight is not None  # the next one is already read
        assert prefetched.state_dict() == states[i]
        assert prefetched.stream.state_dict() != states[i]  # ...which the reader itself counts

    resumed = DevicePrefetcher(_stream(small_dataset), lambda b: b, CPU)
    resumed.load_state_dict(prefetched.state_dict())
    assert [_key(b) for _, b in zip(range(3), resumed)] == batches[3:6]


def test_prefetcher_applies_to_device_ahead(small_dataset: Path) -> None:
    moved: list[int] = []

    def to_device(batch: Batch) -> Batch:
        moved.append(batch.size)
        return batch

    prefetched = DevicePrefetcher(_stream(small_dataset), to_device, CPU)
    next(prefetched)
    assert len(moved) == 2  # the batch handed out and the one in flight


def _same_losses(dataset: str, out: str) -> None:
    losses = {}
    for prefetch in (True, False):
        t = _trainer(dataset, [f"training.prefetch={str(prefetch).lower()}"], f"{out}/{prefetch}")
        assert isinstance(t.inputs, DevicePrefetcher) == prefetch
        run = []
        for _, batch in zip(range(5), t.inputs):
            run.append(float(t.train_step(batch)))
            t.step += 1
        losses[prefetch] = run
        t.close()
    assert losses[True] == losses[False]


def test_trainer_with_prefetch_trains_the_same_losses(small_dataset: Path, tmp_path: Path) -> None:
    in_process(_same_losses, str(small_dataset), str(tmp_path))


def test_prefetcher_on_a_thread_gives_the_same_batches_and_states(small_dataset: Path) -> None:
    plain = _stream(small_dataset)
    expected = []
    for batch in plain:
        expected.append((_key(batch), plain.state_dict()))
        if len(expected) == 4:
            break
    threaded = DevicePrefetcher(_stream(small_dataset), lambda b: b, CPU, background=True)
    try:
        for i, batch in zip(range(4), threaded):
            assert (_key(batch), threaded.state_dict()) == expected[i]
    finally:
        threaded.close()


def test_bad_images_found_by_to_device_count_once_handed_out(small_dataset: Path) -> None:
    """to_device may find bad samples (a JPEG only the GPU cannot decode): counted with their batch, when it is
    handed out, and kept across a load."""
    from dataclasses import replace

    def finds_one(batch: Batch) -> Batch:
        return replace(batch, skipped={**batch.skipped, "bad_image": batch.skipped.get("bad_image", 0) + 1})

    for background in (False, True):
        prefetched = DevicePrefetcher(_stream(small_dataset), finds_one, CPU, background=background)
        assert prefetched.skipped.get("bad_image", 0) == 0
        next(prefetched)
        next(prefetched)
        assert prefetched.skipped["bad_image"] == 2  # not the one in flight
        state = prefetched.state_dict()
        prefetched.close()
        resumed = DevicePrefetcher(_stream(small_dataset), finds_one, CPU, background=background)
        resumed.load_state_dict(state)
        next(resumed)
        assert resumed.skipped["bad_image"] == 3
        assert "bad_image=3" in resumed.report()
        resumed.close()


def test_an_error_in_to_device_is_raised_when_its_batch_is_handed_out(small_dataset: Path) -> None:
    calls = []

    def fails_second(batch: Batch) -> Batch:
        calls.append(1)
        if len(calls) == 2:
            raise ValueError("bad JPEG in shard x, key y, field jpg")
        return batch

    for background in (False, True):
        calls.clear()
        prefetched = DevicePrefetcher(_stream(small_dataset), fails_second, CPU, background=background)
        next(prefetched)  # the first is fine (the second is already in flight)
        try:
            next(prefetched)
        except ValueError as err:
            assert "shard x" in str(err)
        else:
            raise AssertionError("the error of the batch in flight was lost")
        prefetched.close()
