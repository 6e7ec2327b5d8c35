"""Which checkpoint `--resume auto` takes (`Checkpointer.latest`): the one `latest` names when it is complete,
else the newest complete `step-N/`, never a `.partial` one or one missing a part. No process group needed."""

from __future__ import annotations

from pathlib import Path

from trainer.checkpoint import LATEST, Checkpointer

PARTS = {"trainer": object(), "sparse": object(), "bank": object()}


def make(root: Path, name: str, parts: tuple[str, ...] = ("trainer", "sparse")) -> Path:
    path = root / name
    for part in parts:
        (path / part).mkdir(parents=True)
    return path


def test_auto_resume_takes_the_pointer_else_the_newest_complete_checkpoint(tmp_path: Path) -> None:
    ckpt = Checkpointer(tmp_path, PARTS, optional=("bank",))  # type: ignore[arg-type]
    assert ckpt.resolve("auto") is None  # a fresh run
    two = make(tmp_path, "step-00000002")
    four = make(tmp_path, "step-00000004")
    make(tmp_path, "step-00000006.partial")  # a save cut short
    make(tmp_path, "step-00000008", parts=("trainer",))  # no sparse/: not complete
    assert ckpt.resolve("auto") == four  # no pointer: the newest complete one, not a fresh start
    (tmp_path / LATEST).write_text("step-00000002\n")
    assert ckpt.resolve("auto") == two  # the pointer wins when it names a complete checkpoint
    (tmp_path / LATEST).write_text("step-00000010\n")  # names one that is gone
    assert ckpt.resolve("auto") == four
