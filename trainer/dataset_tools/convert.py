"""`lemur data convert DIR`: rewrite a dataset's JSON records as binary ones (`trainer/data/record.py`).

Shard by shard: the new tar is written beside the old one and renamed over it when complete, so a shard is always
whole, in one format or the other (the reader takes either, so an interrupted conversion leaves a readable dataset
and a second run finishes it). Images and other members are copied as they are. A sample whose JSON record breaks
the format is copied unchanged, not dropped: the reader's `data.bad_input` policy still sees it and counts it.
"""

from __future__ import annotations

import json
import logging
import os
from dataclasses import dataclass, field
from pathlib import Path

from tqdm import tqdm

from trainer.data import record as binary_record
from trainer.data.decode import BadSample, Limits, SkipCounter, parse_sample, tar_samples
from trainer.data.spec import DatasetSpec, read_spec
from trainer.dataset_tools.shard_writer import ShardWriter

log = logging.getLogger(__name__)


@dataclass
class Converted:
    shards: int = 0
    """Shards rewritten."""
    already: int = 0
    """Shards that held no JSON record (left as they were)."""
    samples: int = 0
    kept_as_json: dict[str, int] = field(default_factory=dict)
    """Bad samples copied unchanged, by reason."""


def convert_dataset(path: str | os.PathLike, progress: bool = True) -> Converted:
    root = Path(path)
    spec = read_spec(root)
    layout = binary_record.RecordLayout.of(spec)
    # The widest limits: conversion checks the format, not a run's text or image settings.
    limits = Limits(max_text_chars=2**31 - 1, image_size=1, images_per_sample=0)
    shards = [root / s.name for split in spec.shards.values() for s in split]
    missing = [str(s) for s in shards if not s.is_file()]
    if missing:
        raise FileNotFoundError(f"{root}: dataset.json lists shards that are not there: {missing[:5]}")
    done = Converted()
    for shard in tqdm(shards, desc="convert", unit="shard", disable=not progress):
        convert_shard(shard, spec, layout, limits, done)
    log.info(
        "converted %d shards (%d samples) of %s to %s records; %d already binary; bad samples kept as JSON: %s",
        done.shards,
        done.samples,
        root,
        binary_record.EXT,
        done.already,
        done.kept_as_json or "none",
    )
    return done


def convert_shard(
    shard: Path, spec: DatasetSpec, layout: binary_record.RecordLayout, limits: Limits, done: Converted
) -> None:
    """Streams: one sample in memory at a time. A corrupt tar raises before the shard is replaced."""
    converted, samples = 0, 0
    kept: dict[str, int] = {}
    writer = ShardWriter(shard)
    try:
        for sample in tar_samples(str(shard), SkipCounter(policy="error")):
            members = dict(sample.members)
            if "json" in members:
                try:
                    parse_sample(sample, spec, limits)
                    payload = binary_record.encode(json.loads(members.pop("json")), layout)
                    members = {binary_record.EXT: payload, **members}
                    converted += 1
                except BadSample as err:
                    kept[err.reason] = kept.get(err.reason, 0) + 1
            writer.write(sample.key, members)
            samples += 1
    except BaseException:
        writer.abort()
        raise
    if converted == 0:  # nothing to do: leave the shard's bytes as they are
        writer.abort()
        done.already += 1
        return
    writer.close()
    done.shards += 1
    done.samples += samples
    for reason, n in kept.items():
        done.kept_as_json[reason] = done.kept_as_json.get(reason, 0) + n
