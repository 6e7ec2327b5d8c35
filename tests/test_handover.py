"""A worker's batch handed over as one memfd (`trainer/data/handover.py`), here without a DataLoader: pickled as
the worker's queue pickles it, read as the pinning thread or the reader reads it."""

from __future__ import annotations

import gc
import itertools
import os
from multiprocessing.reduction import ForkingPickler
from pathlib import Path

import pytest
import torch
import torch.multiprocessing  # noqa: F401 (registers the tensor reductions on ForkingPickler)

from tests.conftest import small_config
from trainer.data import handover
from trainer.data.reader import make_batch_stream

pytestmark = pytest.mark.skipif(not handover.AVAILABLE, reason="memfd is Linux only")


def tensors_of(batch) -> list[torch.Tensor]:
    found: list[torch.Tensor] = []
    batch._map_tensors(lambda t: found.append(t) or t)
    return found


def open_fds() -> int:
    return len(os.listdir("/proc/self/fd"))


@pytest.fixture(scope="module")
def batch(small_dataset: Path):
    stream = make_batch_stream(small_config(small_dataset, "data.num_workers=0"), "train")
    first = next(itertools.islice(stream, 1))
    # a view that is not contiguous, and one of a shared tensor: both arrive as plain copies
    first.dense = torch.randn(first.size, 8)[:, ::2]
    first.cold = first.valid
    return first


def round_trip(batch) -> handover.Received:
    payload = ForkingPickler.dumps(handover.HandOver(batch))
    return ForkingPickler.loads(payload)


def test_round_trip_gives_the_same_tensors_as_views_of_one_buffer(batch) -> None:
    got = round_trip(batch).read()
    sent, came = tensors_of(batch), tensors_of(got)
    assert len(sent) == len(came) > 10
    for x, y in zip(sent, came, strict=True):
        assert x.dtype == y.dtype and x.shape == y.shape and torch.equal(x, y)
        assert y.is_contiguous()
    base = got.storage.untyped_storage().data_ptr()
    assert all(t.untyped_storage().data_ptr() == base for t in came)
    starts = sorted(t.data_ptr() - base for t in came if t.numel())
    assert all(s % handover.ALIGN == 0 for s in starts)
    assert got.sequences.keys() == batch.sequences.keys()
    assert torch.equal(got.sequences.lengths(), batch.sequences.lengths())
    assert got.sequences.length_per_key() == batch.sequences.length_per_key()
    assert (got.reader, got.reader_position, got.skipped) == (
        batch.reader,
        batch.reader_position,
        batch.skipped,
    )


def test_a_tensor_replaced_after_the_handover_moves_on_its_own(batch) -> None:
    got = round_trip(batch).read()
    got.labels = torch.ones_like(got.labels)  # no longer on the buffer
    moved = got._map(lambda t: t.clone())
    assert torch.equal(moved.labels, got.labels)
    assert moved.storage is not None
    base = moved.storage.untyped_storage().data_ptr()
    assert moved.item_id.untyped_storage().data_ptr() == base
    assert moved.labels.untyped_storage().data_ptr() != base
    assert torch.equal(moved.item_id, batch.item_id)


def test_descriptors_and_mappings_go_with_the_batch_without_a_collection(batch) -> None:
    """Read or not, nothing stays open once the objects are dropped, with the garbage collector off (as during
    `fit`): a reference cycle holding a batch's buffer would keep its shared memory until the next collection."""
    round_trip(batch).read()  # the resource sharer's listening socket opens on first use, and stays
    before = open_fds()
    gc.disable()
    try:
        received = round_trip(batch)
        got = received.read()
        assert open_fds() == before + 1  # the mapping's own descriptor, while the batch lives
        with pytest.raises(RuntimeError, match="read once"):
            received.read()
        del got, received
        unread = round_trip(batch)
        del unread
        assert open_fds() == before
    finally:
        gc.enable()


def test_the_buffer_is_sealed_at_its_size(batch) -> None:
    """A mapping of it can never run past its end (that would be a SIGBUS, not an error)."""
    received = round_trip(batch)
    with pytest.raises(PermissionError):
        os.ftruncate(received.fd, received.nbytes // 2)
    assert len(tensors_of(received.read())) > 10
