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


class FullDisk:
    """A part whose write fails as torch.save reports a full disk."""

    def save(self, directory: Path) -> None:
        directory.mkdir(parents=True)
        (directory / "half-written").write_bytes(b"x" * 10)
        raise RuntimeError("basic_ios::clear: iostream error")

    def load(self, directory: Path) -> None:
        raise AssertionError("never loaded")


def _full_disk(root: str) -> None:
    import errno
    import shutil
    from collections import namedtuple

    import pytest
    import torch.distributed as dist

    from trainer.distributed import free_port

    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{free_port()}", rank=0, world_size=1)
    ckpt = Checkpointer(Path(root), {"trainer": FullDisk()})  # type: ignore[dict-item]
    (Path(root) / LATEST).write_text("step-00000002\n")
    usage = namedtuple("usage", "total used free")
    shutil.disk_usage = lambda path: usage(10**9, 10**9, 1024)  # type: ignore[assignment]
    with pytest.raises(
        OSError, match="no space left on device writing checkpoint .*step-00000004.partial/trainer"
    ) as err:
        ckpt.save(4)
    assert err.value.errno == errno.ENOSPC and "iostream error" in str(err.value)
    assert not (Path(root) / "step-00000004.partial").exists()  # nothing half-written is left
    assert (Path(root) / LATEST).read_text() == "step-00000002\n"
    dist.destroy_process_group()


def test_a_full_disk_names_the_path_and_enospc_and_leaves_no_partial_checkpoint(tmp_path: Path) -> None:
    import multiprocessing as mp

    p = mp.get_context("spawn").Process(target=_full_disk, args=(str(tmp_path),))
    p.start()
    p.join(120)
    assert p.exitcode == 0
