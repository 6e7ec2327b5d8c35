"""Shared fixtures: every test makes its own data (nothing is downloaded or committed)."""

from __future__ import annotations

from pathlib import Path

import pytest

from trainer.config import Config, load_config
from trainer.dataset_tools.synth.generate import synthesize

SMALL = [
    "data.synth.num_samples=1800",
    "data.synth.samples_per_shard=300",
    "data.synth.num_items=200",
    "data.synth.num_users=60",
    "data.synth.long_history=40",
    "data.synth.short_history=10",
    "data.synth.image_size=24",
    "data.synth.workers=2",
    'data.synth.record_format="json"',  # the tests that read or corrupt records by hand read JSON
    "data.image_size=24",
    "data.vocab_size=500",
    "data.batch_size=16",
    "data.shuffle_buffer=50",
]


def small_config(dataset: Path | str, *overrides: str) -> Config:
    return load_config("tiny", [*SMALL, f'data.path="{dataset}"', *overrides])


@pytest.fixture(scope="session")
def small_dataset(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """1,800 samples: 5 train shards of 300 and 2 eval shards (300, 60)."""
    out = tmp_path_factory.mktemp("small") / "data"
    cfg = small_config(out)
    synthesize(cfg.data.synth, out, vocab_size=cfg.data.vocab_size, progress=False)
    return out


@pytest.fixture(scope="session")
def binary_dataset(small_dataset: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """`small_dataset` after `lemur data convert`: the same samples, tokenizer and items, in binary records."""
    import shutil

    from trainer.dataset_tools.convert import convert_dataset

    out = tmp_path_factory.mktemp("binary") / "data"
    shutil.copytree(small_dataset, out, ignore=shutil.ignore_patterns(".cache"))
    convert_dataset(out, progress=False)
    return out
