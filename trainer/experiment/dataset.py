"""The experiment's synthetic dataset: made once per table and size in `<out>/data`, reused while its settings match.

`<out>/data.json` records the `data.synth` settings and vocabulary size the dataset was made from; it is written
only after the dataset is complete, so a dataset cut short by an interruption is made again.
"""

from __future__ import annotations

import json
import shutil
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any

from trainer.config import load_config


def synth_settings(preset: str, overrides: list[str]) -> dict[str, Any]:
    cfg = load_config(preset, overrides)
    return {"synth": asdict(cfg.data.synth), "vocab_size": cfg.data.vocab_size}


def ensure_dataset(out: Path, preset: str, overrides: list[str], log: Any = print) -> float:
    """Synthesise `out/data` unless a complete one made from the same settings is there; returns seconds spent."""
    data, stamp = out / "data", out / "data.json"
    settings = synth_settings(preset, overrides)
    if stamp.is_file() and json.loads(stamp.read_text()) == settings and (data / "dataset.json").is_file():
        log(f"data: reusing {data}")
        return 0.0
    from trainer.config.schema import SynthConfig
    from trainer.dataset_tools.synth.generate import synthesize

    stamp.unlink(missing_ok=True)
    shutil.rmtree(data, ignore_errors=True)
    log(f"data: synthesising {settings['synth']['num_samples']:,} samples into {data}")
    started = time.perf_counter()
    synthesize(SynthConfig(**settings["synth"]), data, vocab_size=settings["vocab_size"], progress=False)
    seconds = time.perf_counter() - started
    stamp.write_text(json.dumps(settings, indent=1) + "\n")
    log(f"data: made in {seconds:.0f} s")
    return seconds
