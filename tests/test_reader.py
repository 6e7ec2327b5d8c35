"""The streaming reader: round trip, split coverage, equal batches, exact resume."""

from __future__ import annotations

import itertools
import json
import tarfile
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch
import webdataset as wds

from tests.conftest import small_config
from trainer.data.decode import decode_image
from trainer.data.reader import make_batch_stream
from trainer.data.shard_lists import ShardRef, assign_shards, reader_sample_counts
from trainer.data.spec import read_spec
from trainer.data.tokenizer import load_tokenizer


def tar_records(path: Path) -> list[tuple[dict, bytes | None]]:
    out, members = [], {}
    with tarfile.open(path) as tar:
        for info in tar:
            key, ext = info.name.split(".", 1)
            members.setdefault(key, {})[ext] = tar.extractfile(info).read()
    for key in members:
        out.append((json.loads(members[key]["json"]), members[key].get("jpg")))
    return out


def impressions(stream) -> Counter:
    """Multiset of (request, item, timestamp, label) over the valid rows of every batch."""
    seen: Counter = Counter()
    for batch in stream:
        for i in torch.nonzero(batch.valid).flatten().tolist():
            seen[
                (
                    int(batch.session_id[i]),
                    int(batch.item_id[i]),
                    int(batch.timestamp[i]),
                    float(batch.labels[i, 0]),
                )
            ] += 1
    return seen


def test_round_trip_ids_tokens_pixels(small_dataset: Path) -> None:
    cfg = small_config(small_dataset)
    spec = read_spec(small_dataset)
    records = tar_records(small_dataset / spec.shards["eval"][0].name)
    batch = next(iter(make_batch_stream(cfg, "eval")))  # eval: no shuffle, shard order
    tokenizer = load_tokenizer(small_dataset / "tokenizer")
    for i, (record, jpg) in enumerate(records[: batch.size]):
        assert batch.user_id[i] == record["user_id"] and batch.item_id[i] == record["item_id"]
        assert batch.query_id[i] == record["query_id"] and batch.session_id[i] == record["session_id"]
        assert batch.labels[i, 0] == record["labels"]["click"]
        assert batch.cold[i] == bool(record["cold"])
        assert batch.dense[i].tolist() == pytest.approx([record["dense"][k] for k in spec.dense])
        title = tokenizer.decode(batch.text["title"].input_ids[i], skip_special_tokens=True)
        assert (
            title.replace(" ", "")
            == record["text"]["title"].lower().replace(" ", "")[: len(title.replace(" ", ""))]
        )
        assert tokenizer.decode(batch.query.input_ids[i], skip_special_tokens=True) == record["query"]
        pixels = torch.from_numpy(decode_image(jpg, cfg.data.image_size).copy()).permute(2, 0, 1)
        assert torch.equal(batch.images[i, 0], pixels) and batch.image_mask[i, 0]
    sparse = {**batch.sparse.to_dict(), **batch.sequences.to_dict()}
    assert batch.sequences.keys() == ["item_id", "short", "long"]
    for key in ["user_id", "item_id", "category", "tags"]:
        rows = sparse[key].to_dense()
        for i, (record, _) in enumerate(records[: batch.size]):
            expected = [record[key]] if key.endswith("_id") else record["sparse"][key]
            assert rows[i].tolist() == expected
    history = batch.sequences.to_dict()["long"].to_dense()
    for i, (record, _) in enumerate(records[: batch.size]):
        assert history[i].tolist() == record["history"]["long"]


@pytest.mark.parametrize("world_size,workers", [(1, 0), (2, 2), (3, 1)])
def test_eval_reads_every_sample_exactly_once(small_dataset: Path, world_size: int, workers: int) -> None:
    cfg = small_config(small_dataset, f"data.num_workers={workers}")
    expected: Counter = Counter()
    for info in read_spec(small_dataset).shards["eval"]:
        for record, _ in tar_records(small_dataset / info.name):
            expected[
                (
                    record["session_id"],
                    record["item_id"],
                    record["timestamp"],
                    float(record["labels"]["click"]),
                )
            ] += 1
    seen: Counter = Counter()
    batch_counts = []
    for rank in range(world_size):
        stream = make_batch_stream(cfg, "eval", rank=rank, world_size=world_size)
        batches = list(stream)
        batch_counts.append(len(batches))
        assert all(b.size == cfg.data.batch_size for b in batches)
        seen += impressions(batches)
    assert seen == expected
    assert len(set(batch_counts)) == 1, f"ranks got different batch counts {batch_counts}"


def test_shard_split_covers_every_shard_once() -> None:
    shards = [ShardRef(f"s{i}", 10 + i) for i in range(11)]
    for world_size in (1, 2, 3):
        for workers in (1, 2, 4):
            got = [
                s
                for r in range(world_size)
                for w in range(workers)
                for s in assign_shards(shards, r, world_size, w, workers)
            ]
            assert sorted(got, key=lambda s: s.url) == sorted(shards, key=lambda s: s.url)
            assert sum(reader_sample_counts(shards, world_size, workers)) == sum(s.samples for s in shards)


def test_train_epoch_gives_equal_batches_and_no_duplicates(small_dataset: Path) -> None:
    cfg = small_config(small_dataset, "data.num_workers=2")
    per_rank = [list(make_batch_stream(cfg, "train", rank=r, world_size=2, epochs=1)) for r in range(2)]
    assert len(per_rank[0]) == len(per_rank[1]) > 0
    seen = impressions(b for batches in per_rank for b in batches)
    total = sum(seen.values())
    assert total == len(per_rank[0]) * 2 * cfg.data.batch_size
    assert max(seen.values()) == 1


def test_train_epochs_reshuffle(small_dataset: Path) -> None:
    cfg = small_config(small_dataset)
    stream = make_batch_stream(cfg, "train", epochs=2)
    per_epoch = stream.dataset.batches_per_epoch()
    batches = list(stream)
    assert len(batches) == 2 * per_epoch
    first = torch.cat([b.item_id for b in batches[:per_epoch]])
    second = torch.cat([b.item_id for b in batches[per_epoch:]])
    assert not torch.equal(first, second)


@pytest.mark.parametrize("workers,stop_at", [(0, 7), (2, 5), (2, 6), (3, 10)])
def test_resume_neither_repeats_nor_skips(small_dataset: Path, workers: int, stop_at: int) -> None:
    cfg = small_config(small_dataset, f"data.num_workers={workers}")
    reference = [b.item_id for b in make_batch_stream(cfg, "train", epochs=2)]
    first = make_batch_stream(cfg, "train", epochs=2)
    got = []
    for batch in first:
        got.append(batch.item_id)
        if len(got) == stop_at:
            break
    state = json.loads(json.dumps(first.state_dict()))  # it must survive serialisation
    resumed = make_batch_stream(cfg, "train", epochs=2)
    resumed.load_state_dict(state)
    got += [b.item_id for b in resumed]
    assert len(got) == len(reference)
    for i, (a, b) in enumerate(zip(got, reference)):
        assert torch.equal(a, b), f"batch {i} differs after resuming at {stop_at}"


def test_resume_at_another_worker_count_restarts_the_epoch_at_the_samples_consumed(
    small_dataset: Path,
) -> None:
    stream = make_batch_stream(small_config(small_dataset, "data.num_workers=2"), "train")
    batches = iter(stream)
    for _ in range(3):
        next(batches)
    state = stream.state_dict()
    other = make_batch_stream(small_config(small_dataset, "data.num_workers=1"), "train")
    other.load_state_dict(state)  # not bit-exact (logged): the shards are dealt to the workers anew
    size = other.dataset.settings.batch_size
    assert (other.epoch, other.batches, other.positions) == (state["epoch"], 3, [3 * size])
    assert len(list(itertools.islice(iter(other), 2))) == 2
    with pytest.raises(ValueError, match="world_size=2 .* reshard_state"):
        other.load_state_dict({**state, "world_size": 2})


def test_plain_webdataset_and_tar_read_our_shards(small_dataset: Path) -> None:
    spec = read_spec(small_dataset)
    path = str(small_dataset / spec.shards["train"][0].name)
    samples = list(wds.WebDataset(path, shardshuffle=False).decode("pil"))
    assert len(samples) == spec.shards["train"][0].samples
    assert {"__key__", "json", "jpg"} <= set(samples[0])
    assert samples[0]["json"]["labels"]["click"] in (0, 1)
    assert samples[0]["jpg"].size == (24, 24)
    with tarfile.open(path) as tar:
        members = tar.getmembers()
    assert len(members) == 2 * spec.shards["train"][0].samples
    assert all(info.mtime == 0 for info in members)


def test_pipe_url_and_brace_pattern(small_dataset: Path) -> None:
    spec = read_spec(small_dataset)
    names = [s.name for s in spec.shards["eval"]]
    brace = str(small_dataset / "eval-{000000..000001}.tar")
    piped = ",".join(f"pipe:cat {small_dataset / n}" for n in names)
    counts = []
    for pattern in (brace, piped):
        cfg = small_config(small_dataset, f'data.eval_shards="{pattern}"')
        counts.append(impressions(make_batch_stream(cfg, "eval")))
    assert counts[0] == counts[1]
    assert sum(counts[0].values()) == sum(s.samples for s in spec.shards["eval"])


def test_pixels_are_uint8_and_images_optional(small_dataset: Path) -> None:
    cfg = small_config(small_dataset, "model.use_images=false")
    batch = next(iter(make_batch_stream(cfg, "eval")))
    assert batch.images.shape[1] == 0 and batch.image_mask.shape == (cfg.data.batch_size, 0)
    cfg = small_config(small_dataset)
    batch = next(iter(make_batch_stream(cfg, "eval")))
    assert batch.images.dtype == torch.uint8 and batch.images.shape[1:] == (1, 3, 24, 24)
    assert np.ptp(batch.images.numpy()) > 0


def test_unknown_text_field_is_a_clear_error(small_dataset: Path) -> None:
    cfg = small_config(small_dataset, 'model.text_fields=["title", "asr"]', "model.text_max_tokens=[8, 8]")
    with pytest.raises(ValueError, match="asr"):
        make_batch_stream(cfg, "eval")


def test_missing_shard_count_is_a_clear_error(small_dataset: Path, tmp_path: Path) -> None:
    extra = tmp_path / "other-000000.tar"
    extra.write_bytes((small_dataset / "eval-000001.tar").read_bytes())
    cfg = small_config(small_dataset, f'data.eval_shards="{extra}"')
    with pytest.raises(ValueError, match="no sample count"):
        make_batch_stream(cfg, "eval")


def test_workers_hand_batches_over_without_a_round_trip(small_dataset: Path, monkeypatch) -> None:
    """A worker's batch arrives as named shared memory: the training process opens it without asking the worker
    (torch's default strategy costs a socket round trip to the worker per storage, in the step's thread), gets the
    same tensors as a worker-less stream, and keeps torch's default strategy for itself."""
    import multiprocessing.resource_sharer as sharer

    asked = []
    connect = sharer._resource_sharer.get_connection
    monkeypatch.setattr(sharer._resource_sharer, "get_connection", lambda *a: asked.append(a) or connect(*a))
    default = torch.multiprocessing.get_sharing_strategy()
    with_workers = list(
        itertools.islice(make_batch_stream(small_config(small_dataset, "data.num_workers=1"), "eval"), 3)
    )
    without = list(
        itertools.islice(make_batch_stream(small_config(small_dataset, "data.num_workers=0"), "eval"), 3)
    )
    assert asked == [], f"{len(asked)} storages fetched from the worker through its resource sharer"
    assert torch.multiprocessing.get_sharing_strategy() == default
    for a, b in zip(with_workers, without, strict=True):
        assert torch.equal(a.item_id, b.item_id) and torch.equal(a.labels, b.labels)


def test_moving_a_batch_leaves_no_garbage(small_dataset: Path) -> None:
    """`Batch.to` / `pin_memory` / the prefetcher's record_stream walk the batch once per step: the walk must not
    leave a reference cycle behind (8 objects a call, before), which would wait for a collection that `fit`
    schedules only every `training.gc_every` steps."""
    import gc

    batch = next(iter(make_batch_stream(small_config(small_dataset, "data.num_workers=0"), "train")))
    gc.collect()
    gc.disable()
    try:
        for _ in range(3):
            batch = batch.to("cpu")
        assert gc.collect() == 0
    finally:
        gc.enable()
