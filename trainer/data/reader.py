"""The streaming reader: shards -> samples -> batches, as small generator stages, on each rank and worker.

Equal batches on every rank (all-to-alls hang otherwise):
- train: shards are split by rank, then by DataLoader worker ("reader" = one (rank, worker) pair). Every reader
  yields the same number of batches per epoch: the fewest full batches any reader's shards hold. Readers with
  more drop their surplus (the shard order is reshuffled every epoch, so a different surplus is dropped each
  time); a reader that runs short because bad samples were skipped tops up from its own shards, pass after pass,
  and gives up (NoProgress) after a full pass that gave no good sample.
- eval: every sample is read exactly once; the last batch of a reader and readers with fewer batches are padded
  with invalid rows (`Batch.valid` is False), so every rank still sees the same number of full batches.

Exact resume: the reader's position is (epoch, batches yielded this epoch, raw samples each reader consumed).
On resume, each reader re-opens its shards in the same order with the same shuffle seed and skips the raw samples
it had consumed (no decoding), and workers are rotated so the next batch comes from the reader that was next.
"""

from __future__ import annotations

import gc
import itertools
import logging
import os
import random
import signal
from collections import Counter
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from trainer.config.schema import Config
from trainer.data.batch import Batch
from trainer.data.collate import CollateSpec, Collator, collate_spec, empty_sample
from trainer.data.decode import BadSample, Limits, RawSample, SkipCounter, parse_sample, tar_samples
from trainer.data.device_decode import resolve_image_decode
from trainer.data.id_vocab import id_vocab_for
from trainer.data.item_tokens import ItemTokens, load_item_tokens
from trainer.data.shard_lists import ShardRef, assign_shards, epoch_order, expand_shards, reader_sample_counts
from trainer.data.spec import DatasetSpec, read_spec
from trainer.data.text_fields import with_dataset_text
from trainer.data.tokenizer import resolve_tokenizer

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
log = logging.getLogger(__name__)


@dataclass
class ReaderSettings:
    batch_size: int
    training: bool
    """Shuffle and equalise by truncation (train) or read everything once and pad (eval)."""
    num_workers: int
    shuffle_buffer: int
    seed: int
    bad_input: str
    limits: Limits
    split: str = "train"
    """For messages."""


class NoProgress(RuntimeError):
    """A train reader under `skip` made a full pass over its shards without one good sample: it would loop forever."""


class ShardDataset(IterableDataset):
    """Yields whole batches; one instance per rank, iterated by each DataLoader worker."""

    def __init__(
        self,
        shards: list[ShardRef],
        spec: DatasetSpec,
        collate: CollateSpec,
        tokenizer: Any,
        settings: ReaderSettings,
        rank: int = 0,
        world_size: int = 1,
        items: ItemTokens | None = None,
    ) -> None:
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} outside world size {world_size}")
        self.shards, self.spec, self.settings = shards, spec, settings
        self.collator = Collator(collate, tokenizer, items)
        self.rank, self.world_size = rank, world_size
        self.readers = max(1, settings.num_workers)
        self.epoch = 0
        self.start_batches = 0
        self.start_positions = [0] * self.readers

    def batches_per_reader(self, epoch: int) -> int:
        counts = reader_sample_counts(self.epoch_shards(epoch), self.world_size, self.readers)
        bs = self.settings.batch_size
        if self.settings.training:
            return min(counts) // bs
        return max(-(-c // bs) for c in counts)

    def batches_per_epoch(self, epoch: int = 0) -> int:
        return self.batches_per_reader(epoch) * self.readers

    def epoch_shards(self, epoch: int) -> list[ShardRef]:
        return epoch_order(self.shards, self.settings.seed, epoch, shuffle=self.settings.training)

    def __iter__(self) -> Iterator[Batch]:
        info = get_worker_info()
        physical = info.id if info is not None else 0
        # Rotate workers so that, after a resume mid-round, the first batch comes from the reader that was next.
        reader = (physical + self.start_batches) % self.readers
        done = self.start_batches // self.readers + (1 if reader < self.start_batches % self.readers else 0)
        total = self.batches_per_reader(self.epoch)
        yield from itertools.islice(self._reader_batches(reader, self.start_positions[reader]), total - done)

    def _reader_batches(self, reader: int, skip_raw: int) -> Iterator[Batch]:
        s = self.settings
        mine = assign_shards(self.epoch_shards(self.epoch), self.rank, self.world_size, reader, self.readers)
        skips = SkipCounter(policy=s.bad_input)
        rng = random.Random(f"{s.seed}/{self.epoch}/{self.rank}/{reader}")
        raw = self._raw_stream(mine, skips, rng) if s.training else self._one_pass(mine, skips)
        counted = Counted(raw)
        # The samples passed over were read before the checkpoint (their skips reported then): not decoded again,
        # they count as progress (a pass passed over is not a pass without a good sample), and the tar-level skips
        # met again on the way (a shard's damage, the shuffle buffer's read-ahead) are the same ones, not new.
        for _ in itertools.islice(counted, skip_raw):
            skips.good += 1
        skips.take()
        for chunk in chunks(self._decoded(counted, skips), s.batch_size):
            valid = [True] * len(chunk)
            if len(chunk) < s.batch_size:  # eval only: pad the last batch
                valid += [False] * (s.batch_size - len(chunk))
                chunk = chunk + [empty_sample(self.collator.spec)] * (s.batch_size - len(chunk))
            batch = self.collator(chunk, valid)
            batch.skipped, batch.reader, batch.reader_position = skips.take(), reader, counted.consumed
            yield batch
        if not s.training:  # readers with fewer batches pad with fully invalid ones
            pad = [empty_sample(self.collator.spec)] * s.batch_size
            while True:
                batch = self.collator(pad, [False] * s.batch_size)
                batch.skipped, batch.reader = skips.take(), reader
                yield batch

    def _one_pass(self, shards: list[ShardRef], skips: SkipCounter) -> Iterator[RawSample]:
        for shard in shards:
            yield from tar_samples(shard.url, skips, expected=shard.expected)

    def _raw_stream(
        self, shards: list[ShardRef], skips: SkipCounter, rng: random.Random
    ) -> Iterator[RawSample]:
        """The reader's shards through the shuffle buffer; then, only if it runs short, again in a fresh order.
        Each pass is shuffled on its own, so no sample comes twice before every sample came once. A pass with no
        good sample (every one of them decoded by the time the next pass starts) would repeat forever: NoProgress."""
        order = list(shards)
        while shards:
            good, bad = skips.good, Counter(skips.by_field)
            yield from shuffled(self._one_pass(order, skips), self.settings.shuffle_buffer, rng)
            if skips.good == good:
                raise NoProgress(self._no_progress(shards, skips.by_field - bad))
            order = list(shards)
            rng.shuffle(order)

    def _no_progress(self, shards: list[ShardRef], bad: Counter) -> str:
        by_reason: Counter = Counter()
        for (reason, _), n in bad.items():
            by_reason[reason] += n
        parts = []
        for reason, n in sorted(by_reason.items()):
            fields = sorted({f for r, f in bad if r == reason})
            parts.append(f"{reason}={n} ({', '.join(fields[:3])}{', ...' if len(fields) > 3 else ''})")
        names = [s.url for s in shards]
        return (
            f"{self.settings.split} reader (rank {self.rank}): a full pass over its {len(shards)} shards "
            f"{names[:5]}{' ...' if len(names) > 5 else ''} gave no good sample "
            f"(skipped: {', '.join(parts) or 'none; the shards hold no samples'}); under bad_input = skip it would "
            "read them again forever. Check the shards, and dataset.json's labels and counts"
        )

    def _decoded(self, raw: Iterator[RawSample], skips: SkipCounter) -> Iterator[dict[str, Any]]:
        for sample in raw:
            try:
                decoded = parse_sample(sample, self.spec, self.settings.limits)
                self.check_item_known(sample, decoded)
            except BadSample as err:
                skips.handle(err)
                continue
            skips.good += 1
            yield decoded

    def check_item_known(self, raw: RawSample, decoded: dict[str, Any]) -> None:
        """Images left undecoded (`Limits.decode_images` False) are served by item from items.parquet: a sample
        whose item is not there has no image features at all, so it is a bad sample."""
        if self.settings.limits.decode_images or not decoded["images"]:
            return
        items = self.collator.items
        known = items is not None and bool(
            items.rows_of(np.array([decoded["item_id"]], dtype=np.int64))[1][0]
        )
        if not known:
            raise BadSample(
                raw.shard,
                raw.key,
                "item_id",
                "not_in_items",
                f"item {decoded['item_id']} is not in items.parquet, where the frozen-feature cache takes images from",
            )


class Counted:
    """Passes a stream through, counting what was taken from it (generators are lazy, so this is exact)."""

    def __init__(self, stream: Iterator[Any]) -> None:
        self.stream = stream
        self.consumed = 0

    def __iter__(self) -> Iterator[Any]:
        return self

    def __next__(self) -> Any:
        item = next(self.stream)
        self.consumed += 1
        return item


def shuffled(stream: Iterator[Any], buffer: int, rng: random.Random) -> Iterator[Any]:
    """A shuffle buffer: fill, then yield a random element and replace it with the next from the stream."""
    if buffer <= 1:
        yield from stream
        return
    buf: list[Any] = []
    for item in stream:
        if len(buf) < buffer:
            buf.append(item)
            continue
        k = rng.randrange(buffer)
        buf[k], item = item, buf[k]
        yield item
    rng.shuffle(buf)
    yield from buf


def chunks(stream: Iterator[Any], size: int) -> Iterator[list[Any]]:
    while chunk := list(itertools.islice(stream, size)):
        yield chunk


def _worker_init(worker_id: int) -> None:
    """A DataLoader worker, which only reads.

    SIGTERM is ignored: torchrun and Slurm signal a rank's whole process group, workers included, and torch's
    worker handler would kill the worker and fail the rank before it saves (`StopSignals`: the rank stops at an
    agreed step and saves). A worker still ends when its loader shuts down or its parent dies.

    Garbage collection: the objects forked from the training process (torch, the tokenizer: hundreds of thousands)
    are frozen out of the collector's sight, so full collections stop walking them (and stop un-sharing their memory
    pages); young objects are collected less often, since every sample brings large, short-lived id lists that each
    collection walks. Cycles are still collected. Together this saves about a tenth of a worker's time on long
    histories.

    Sharing: a worker hands its batch's tensors over as named shared-memory files (torch's `file_system` strategy),
    set here so the training process keeps torch's default. With the default, the training process fetches each
    of a batch's ~25 storages through a socket round trip (connect, authentication, a file descriptor) that the
    worker's sharer thread answers, when the worker's busy reading lets it take the GIL: 5.7 against 3.4 ms (median)
    a batch of 2048 on a 2-core CPU (`benchmarks/worker_handover.py`), paid in the thread that also runs the step.
    Named files are opened without the worker; torch's shared-memory manager removes them if a process dies."""
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    gc.freeze()
    gc.set_threshold(10_000, 50, 100)
    torch.multiprocessing.set_sharing_strategy("file_system")


class BatchStream:
    """A rank's batches across epochs, with a resumable position. Iterating continues where the last batch left off."""

    def __init__(self, dataset: ShardDataset, pin_memory: bool = False, epochs: int | None = None) -> None:
        self.dataset = dataset
        self.pin_memory = pin_memory
        self.epochs = epochs
        self.epoch = 0
        self.batches = 0
        self.positions = [0] * dataset.readers
        self.skipped: Counter = Counter()

    def state_dict(self) -> dict[str, Any]:
        return {
            "epoch": self.epoch,
            "batches": self.batches,
            "positions": list(self.positions),
            "readers": self.dataset.readers,
            "rank": self.dataset.rank,
            "world_size": self.dataset.world_size,
            "batch_size": self.dataset.settings.batch_size,
            "skipped": dict(self.skipped),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Exact with the same number of ranks and data workers. Another number of workers (same ranks): the
        epoch restarts from the samples consumed, as in `reshard_state` (another number of ranks goes there)."""
        ds = self.dataset
        if state["world_size"] != ds.world_size:
            raise ValueError(
                f"reader state was saved with world_size={state['world_size']} but this run has "
                f"{ds.world_size}: load it through reshard_state"
            )
        if state["readers"] != ds.readers:
            saved_readers = state["readers"]
            samples = state["batches"] * state.get("batch_size", ds.settings.batch_size) * ds.world_size
            state = self.restart_state(state["epoch"], samples, Counter(state.get("skipped", {})))
            if ds.rank == 0:
                log.warning(
                    "reader: saved with %d readers (data workers) per rank, this run has %d: restarts epoch %d "
                    "at sample %d (not bit-exact)",
                    saved_readers,
                    ds.readers,
                    state["epoch"],
                    samples,
                )
        self.epoch, self.batches = state["epoch"], state["batches"]
        self.positions = list(state["positions"])
        self.skipped = Counter(state.get("skipped", {}))

    def reshard_state(self, states: list[dict[str, Any]]) -> tuple[dict[str, Any], str]:
        """This rank's position from the reader states of every rank of a run of another size (any number of
        data workers): the same epoch, restarted from the samples the saved ranks had consumed in it (the sum of
        their batches): this rank skips its share of whole batches. Deterministic, but not bit-exact: the shards
        are dealt to the ranks and workers anew, so some samples of the epoch come again and others not at all
        until the next epoch. The skip counts go to rank (saved rank % ranks)."""
        ds = self.dataset
        positions = {(s["epoch"], s["batches"]) for s in states}
        if len(positions) != 1:
            raise ValueError(
                f"the saved reader states are at different positions (epoch, batches): {positions}"
            )
        epoch = states[0]["epoch"]
        samples = sum(s["batches"] * s.get("batch_size", ds.settings.batch_size) for s in states)
        skipped: Counter = Counter()
        for saved_rank, s in enumerate(states):
            if saved_rank % ds.world_size == ds.rank:
                skipped.update(s.get("skipped", {}))
        return self.restart_state(epoch, samples, skipped), f"restarts epoch {epoch} at sample {samples}"

    def restart_state(self, epoch: int, samples: int, skipped: Counter) -> dict[str, Any]:
        """A state at `samples` into `epoch` for this layout: every rank skips samples // (batch * ranks) whole
        batches, dealt round-robin to its readers as the workers deliver them; each reader passes over the raw
        samples of its batches (exact without bad samples; with them, a few samples come again)."""
        ds = self.dataset
        batch = ds.settings.batch_size
        done = samples // (batch * ds.world_size)
        per_reader = [done // ds.readers + (1 if r < done % ds.readers else 0) for r in range(ds.readers)]
        return {
            "epoch": epoch,
            "batches": done,
            "positions": [n * batch for n in per_reader],
            "readers": ds.readers,
            "rank": ds.rank,
            "world_size": ds.world_size,
            "batch_size": batch,
            "skipped": dict(skipped),
        }

    def __iter__(self) -> Iterator[Batch]:
        while self.epochs is None or self.epoch < self.epochs:
            per_epoch = self.dataset.batches_per_epoch(self.epoch)
            if per_epoch == 0 and not any(s.samples for s in self.dataset.shards):
                raise ValueError(
                    f"rank {self.dataset.rank}: the {self.dataset.settings.split} shards hold no samples "
                    f"({len(self.dataset.shards)} shards: dataset.json's counts, bounded by the files' sizes)"
                )
            if per_epoch == 0:
                raise ValueError(
                    f"rank {self.dataset.rank}: no full batch of {self.dataset.settings.batch_size} per reader; "
                    "use fewer workers or ranks, a smaller batch, or more shards"
                )
            if self.batches < per_epoch:
                yield from self._epoch()
            self.epoch, self.batches = self.epoch + 1, 0
            self.positions = [0] * self.dataset.readers

    def _epoch(self) -> Iterator[Batch]:
        ds = self.dataset
        ds.epoch, ds.start_batches, ds.start_positions = self.epoch, self.batches, list(self.positions)
        workers = ds.settings.num_workers
        loader = DataLoader(
            ds,
            batch_size=None,
            num_workers=workers,
            pin_memory=self.pin_memory,
            persistent_workers=False,
            prefetch_factor=4 if workers else None,
            multiprocessing_context="fork" if workers else None,
            worker_init_fn=_worker_init if workers else None,
            # Its own generator: a DataLoader iterator otherwise draws its base seed from the global torch RNG,
            # which would shift dropout masks after every epoch boundary and after a resume.
            generator=torch.Generator().manual_seed(ds.settings.seed),
        )
        try:
            for batch in loader:
                self.batches += 1
                self.positions[batch.reader] = batch.reader_position
                self.skipped.update(batch.skipped)
                if batch.encoded_images is not None:  # bad JPEGs the device finds are counted here too
                    batch.encoded_images.skipped = self.skipped
                yield batch
        except Exception as err:
            if not workers:
                raise
            # DataLoader re-raises a worker's error from a frame that refers to the error: a reference cycle that
            # keeps the workers' iterator alive until a garbage collection, which then waits 5 s per worker to end
            # them. The message carries the worker's traceback; without the re-raise's, the workers end now.
            raise err.with_traceback(None) from None

    def report(self) -> str:
        return skip_report(self.skipped)


def skip_report(skipped: Mapping[str, int]) -> str:
    """The end-of-training line on the bad samples skipped, by reason."""
    if not skipped:
        return "reader: no bad samples"
    parts = ", ".join(f"{k}={v}" for k, v in sorted(skipped.items()))
    return f"reader: skipped {sum(skipped.values())} bad samples ({parts})"


def images_from_cache(cfg: Config) -> bool:
    """The vision tower's frozen bottom is served from the frozen-feature cache, so the reader decodes no image."""
    model = cfg.model
    return (
        model.frozen_cache and model.use_content and model.use_images and model.vision_tower.has_frozen_bottom
    )


def make_batch_stream(
    cfg: Config,
    split: str,
    rank: int = 0,
    world_size: int = 1,
    epochs: int | None = None,
    pin_memory: bool = False,
    table_rows: dict[str, int] | None = None,
    raw_histories: bool = False,
    pad_to_longest: bool = False,
    device: torch.device | str | None = None,
) -> BatchStream:
    """The reader for `split` ("train" or "eval") of cfg.data.path, as configured. `table_rows`: hash the ids into
    these table rows in the reader (what the trainer's sharded tables read); `raw_histories`: also keep the
    histories' raw item ids (`Batch.raw_histories`); `pad_to_longest`: text fields padded to the batch's longest
    row, not their budget (`CollateSpec.pad_to_longest`); `device`: where the batches will go, for
    data.image_decode = "auto" (None: the trainer's device, CUDA under an NCCL process group, else the CPU)."""
    spec = read_spec(cfg.data.path)
    cfg = with_dataset_text(cfg, spec)  # the dataset's text fields and budgets where the config leaves them
    data, model = cfg.data, cfg.model
    pattern = data.train_shards if split == "train" else data.eval_shards
    shards = expand_shards(pattern, data.path, split, spec, strict=data.bad_input == "error")
    tokenizer = resolve_tokenizer(data.tokenizer, data.path, spec.text, data.vocab_size)
    images = data.images_per_sample if model.use_images else 0
    pixels = not images_from_cache(
        cfg
    )  # the frozen-feature cache serves the images: none decoded, none carried
    on_device = pixels and images > 0 and resolve_image_decode(data.image_decode, device)
    settings = ReaderSettings(
        batch_size=data.batch_size,
        training=split == "train",
        num_workers=data.num_workers,
        shuffle_buffer=data.shuffle_buffer,
        seed=data.seed,
        bad_input=data.bad_input,
        limits=Limits(
            data.max_text_chars, data.image_size, images, decode_images=pixels, jpeg_on_device=on_device
        ),
        split=split,
    )
    collate = collate_spec(
        spec,
        dict(zip(model.text_fields, model.text_max_tokens)),
        model.query_max_tokens,
        data.image_size,
        images,
        model.max_history,
        table_rows,
        raw_histories,
        pad_to_longest,
        data.text_buckets,
    )
    collate.pixels = pixels
    collate.jpeg_on_device, collate.bad_input = on_device, data.bad_input
    collate.id_vocab = id_vocab_for(cfg, spec, table_rows)  # embeddings.id_map = "vocab": the item ids' rows
    items = load_item_tokens(Path(data.path) / "items.parquet", tokenizer, collate.text_fields)
    dataset = ShardDataset(shards, spec, collate, tokenizer, settings, rank, world_size, items)
    return BatchStream(dataset, pin_memory=pin_memory, epochs=epochs if split == "train" else 1)
