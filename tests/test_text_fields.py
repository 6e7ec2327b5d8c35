"""Datasets first: a config that names no text fields reads the dataset's own, with budgets by name from the preset
or derived from the field's token counts in items.parquet; an imported dataset trains with no model.* override."""

from __future__ import annotations

import multiprocessing as mp
from pathlib import Path

import pyarrow as pa
import pytest
import tomllib

from tests.test_import import _image, _import, _interactions_table, _item_ids, _write
from tests.test_train import join_ranks, rank_environment
from trainer.config import ConfigError, load_config
from trainer.data.text_fields import MIN_BUDGET, with_dataset_text


def imported(tmp_path: Path) -> Path:
    """An imported dataset whose items carry their own text fields: a short name and a long blurb."""
    ids = _item_ids()
    items = pa.table(
        {
            "item_id": pa.array(ids, pa.int64()),
            "text_name": [f"item {k}" for k in range(len(ids))],
            "text_blurb": [" ".join(f"word{j}" for j in range(30 + 5 * k)) for k in range(len(ids))],
            "image": pa.array([[_image("JPEG", 30 * k)] for k in range(len(ids))], pa.list_(pa.binary())),
        }
    )
    out = tmp_path / "data"
    _import(*_write(tmp_path, _interactions_table(), items), out)
    return out


def test_the_dataset_names_the_fields_and_its_text_sets_the_budgets(tmp_path: Path) -> None:
    data = imported(tmp_path)
    cfg = with_dataset_text(load_config("tiny", [f'data.path="{data}"']))
    assert cfg.model.text_fields == ["name", "blurb"] and cfg.model.use_images
    name, blurb = cfg.model.text_max_tokens
    assert name == MIN_BUDGET and blurb > 30 and blurb % 8 == 0  # derived: the blurbs are 30 words and more
    named = with_dataset_text(load_config("tiny", [f'data.path="{data}"', "model.text_budgets={blurb = 20}"]))
    assert named.model.text_max_tokens == [MIN_BUDGET, 20]  # by name where given, derived elsewhere
    with pytest.raises(ConfigError, match=r"3 budgets for the 2 text fields \['name', 'blurb'\]"):
        with_dataset_text(load_config("tiny", [f'data.path="{data}"', "model.text_max_tokens=[8, 8, 8]"]))


def _train(data: str, out: str, port: int) -> None:
    rank_environment(0, 1, port)
    from trainer.train import train

    overrides = [
        f'data.path="{data}"',
        "data.batch_size=4",
        "data.num_workers=0",
        "data.image_size=16",
        "training.steps=3",
        "training.eval_every=0",
        "training.checkpoint_every=0",
        f'logging.out_dir="{out}"',
        "logging.progress_bar=false",
        "logging.tensorboard=false",
    ]  # no model.* override: the tiny preset as it is
    train(load_config("tiny", overrides))


@pytest.mark.slow
def test_an_imported_dataset_with_its_own_text_fields_trains_with_no_model_override(tmp_path: Path) -> None:
    from trainer.distributed import free_port

    data = imported(tmp_path)
    out = tmp_path / "run"
    p = mp.get_context("spawn").Process(target=_train, args=(str(data), str(out), free_port()))
    p.start()
    join_ranks([p], 300)
    recorded = tomllib.loads((out / "config.toml").read_text())["model"]
    assert recorded["text_fields"] == ["name", "blurb"] and len(recorded["text_max_tokens"]) == 2
