"""Metrics out: JSONL (always) and TensorBoard (optional), written by rank 0 only; on a resume, the steps after
the checkpoint are dropped from both, so the curves have no duplicates."""

from __future__ import annotations

import json
import math
import os
import time
from pathlib import Path
from typing import Any, TextIO


def strict_json(value: Any, **kwargs: Any) -> str:
    """JSON that strict parsers accept: NaN and inf (a metric that has no value, e.g. QAUC without queries) become
    null, where `json.dumps` would write a bare NaN."""
    return json.dumps(_finite_or_null(value), allow_nan=False, **kwargs)


def _finite_or_null(value: Any) -> Any:
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _finite_or_null(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_finite_or_null(v) for v in value]
    return value


def read_metrics(path: str | Path) -> list[dict[str, Any]]:
    """The records of a `metrics.jsonl` (none if it is not there), a null metric read back as NaN."""
    path = Path(path)
    if not path.is_file():
        return []
    records = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    return [{k: math.nan if v is None else v for k, v in r.items()} for r in records]


class MetricsLogger:
    """Rank 0's metrics. A resumed run continues the curves without repeating steps: `resume_at(step)` drops the
    records after the checkpoint's step from metrics.jsonl (the resumed run logs those steps again) and has
    TensorBoard purge its events from the next step on. The files open at the first record."""

    def __init__(self, out_dir: str | Path, enabled: bool, tensorboard: bool) -> None:
        self.enabled = enabled
        self.out = Path(out_dir)
        self.tensorboard = tensorboard
        self.purge_step: int | None = None
        """TensorBoard drops the events of this step and later ones that earlier runs wrote (None: none)."""
        self.jsonl: TextIO | None = None
        self.writer: Any = None

    def resume_at(self, step: int) -> int:
        """The run continues after `step` (a resume, or a rollback mid-run): drops the later records (returns how
        many); the files reopen at the next record."""
        if not self.enabled:
            return 0
        self.close()
        self.jsonl = self.writer = None
        self.purge_step = step + 1
        return drop_records_after(self.out / "metrics.jsonl", step)

    def open(self) -> None:
        self.out.mkdir(parents=True, exist_ok=True)
        self.jsonl = (self.out / "metrics.jsonl").open("a")
        if self.tensorboard:
            from torch.utils.tensorboard import SummaryWriter

            self.writer = SummaryWriter(str(self.out / "tensorboard"), purge_step=self.purge_step)

    def log(self, step: int, kind: str, values: dict[str, Any]) -> None:
        if not self.enabled:
            return
        if self.jsonl is None:
            self.open()
        record = {"step": step, "kind": kind, "time": round(time.time(), 3), **values}
        self.jsonl.write(strict_json(record) + "\n")  # type: ignore[union-attr]
        self.jsonl.flush()  # type: ignore[union-attr]
        if self.writer is not None:
            for key, value in values.items():
                if isinstance(value, (int, float)):
                    self.writer.add_scalar(f"{kind}/{key}", value, step)

    def close(self) -> None:
        if self.jsonl is not None:
            self.jsonl.close()
        if self.writer is not None:
            self.writer.close()


def drop_records_after(path: Path, step: int) -> int:
    """Keeps the records of the JSONL file `path` up to `step`, and drops the later ones and any line that does not
    parse (a write cut short by a crash). The file is rewritten to a temporary one renamed over it, so a crash
    here leaves the old file or the new one, never a torn one. Returns the number of lines dropped."""
    if not path.is_file():
        return 0
    kept: list[str] = []
    dropped = 0
    for line in path.read_text().splitlines():
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            record = None
        if isinstance(record, dict) and isinstance(record.get("step"), int) and record["step"] <= step:
            kept.append(line + "\n")
        else:
            dropped += 1
    if dropped:
        tmp = path.with_name(f".{path.name}.tmp")
        with tmp.open("w") as out:
            out.writelines(kept)
            out.flush()
            os.fsync(out.fileno())
        tmp.replace(path)
    return dropped
