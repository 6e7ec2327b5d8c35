"""What a config leaves to the dataset: which text fields the towers read, their token budgets, and image use.

`model.text_fields` empty (the default) means the dataset's own text fields, in dataset.json's order. A field's
budget is, in this order: `model.text_max_tokens` (a list aligned with the fields), `model.text_budgets[field]`
(the presets name theirs), else derived from items.parquet: the 95th percentile of the field's token count (with
its special tokens) over up to SAMPLE_ITEMS items, rounded up to a multiple of 8, within [MIN_BUDGET, MAX_BUDGET]
(`lemur data inspect` shows the same distribution). Images are used only if the dataset has any. The trainer
resolves its config once, before anything reads it, and writes the result to the run's config.toml, so eval and
export see the fields and budgets the run trained with.
"""

from __future__ import annotations

import dataclasses
import logging
import math
from pathlib import Path

import numpy as np

from trainer.config.schema import Config, ConfigError
from trainer.data.spec import DatasetSpec, read_spec
from trainer.data.tokenizer import resolve_tokenizer

log = logging.getLogger("lemur")
QUANTILE = 0.95
SAMPLE_ITEMS = 10_000
MIN_BUDGET, MAX_BUDGET, BUDGET_MULTIPLE = 8, 256, 8


def with_dataset_text(cfg: Config, spec: DatasetSpec | None = None) -> Config:
    """`cfg` with its text fields, budgets and image use resolved against the dataset (the same config when it
    already names them all)."""
    model = cfg.model
    spec = spec or read_spec(cfg.data.path)
    fields = list(model.text_fields) or list(spec.text)
    if not fields:
        raise ConfigError(
            f"model.text_fields: the dataset {cfg.data.path} has no text fields and none are set"
        )
    if model.text_max_tokens:
        if len(model.text_max_tokens) != len(fields):
            raise ConfigError(
                f"model.text_max_tokens: {len(model.text_max_tokens)} budgets for the {len(fields)} text fields "
                f"{fields}"
                + ("" if model.text_fields else " (the dataset's; set model.text_fields or text_budgets)")
            )
        budgets = list(model.text_max_tokens)
    else:
        missing = [f for f in fields if f not in model.text_budgets]
        derived = derived_budgets(cfg, spec, missing) if missing else {}
        budgets = [model.text_budgets.get(f, derived.get(f, 0)) for f in fields]
    use_images = model.use_images and spec.images > 0
    if (fields, budgets, use_images) == (model.text_fields, model.text_max_tokens, model.use_images):
        return cfg
    resolved = dataclasses.replace(model, text_fields=fields, text_max_tokens=budgets, use_images=use_images)
    return dataclasses.replace(cfg, model=resolved)


def derived_budgets(cfg: Config, spec: DatasetSpec, fields: list[str]) -> dict[str, int]:
    """Per field, the budget its token counts over items.parquet call for (see the module docstring)."""
    import pyarrow.parquet as pq

    items = Path(cfg.data.path) / "items.parquet"
    tokenizer = resolve_tokenizer(cfg.data.tokenizer, cfg.data.path, spec.text, cfg.data.vocab_size)
    file = pq.ParquetFile(items)
    present = [f for f in fields if f in file.schema_arrow.names]
    texts: dict[str, list[str]] = {f: [] for f in present}
    if present:
        for batch in file.iter_batches(columns=present, batch_size=SAMPLE_ITEMS):
            for f in present:
                texts[f] = [t or "" for t in batch.column(f).to_pylist()]
            break
    budgets = {}
    for f in fields:
        counts = [len(ids) for ids in tokenizer(texts.get(f) or [""])["input_ids"]]
        tokens = float(np.quantile(counts, QUANTILE))
        budget = math.ceil(tokens / BUDGET_MULTIPLE) * BUDGET_MULTIPLE
        budgets[f] = min(MAX_BUDGET, max(MIN_BUDGET, budget))
    log.info("text budgets from %s (%.0fth percentile of tokens): %s", items, QUANTILE * 100, budgets)
    return budgets
