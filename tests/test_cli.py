"""The documented commands: `lemur data synth --preset tiny --out D && lemur data inspect D`."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from trainer.cli import main


def test_synth_then_inspect_from_the_command_line(tmp_path: Path) -> None:
    out = tmp_path / "d"
    run = [sys.executable, "-m", "trainer"]
    subprocess.run(
        [*run, "data", "synth", "--preset", "tiny", "--out", str(out), "--samples", "2000", "--workers", "2"],
        check=True,
    )
    result = subprocess.run(
        [*run, "data", "inspect", str(out), "--samples", "1"], check=True, capture_output=True, text=True
    )
    assert "== spec ==" in result.stdout and "contact_sheet.png" in result.stdout
    assert (out / "contact_sheet.png").is_file()


def test_errors_are_one_line_with_exit_code_2(tmp_path: Path, capsys) -> None:  # type: ignore[no-untyped-def]
    assert main(["config", "--set", "data.batch_size=-1"]) == 2
    assert "data.batch_size: must be > 0" in capsys.readouterr().err
    assert main(["data", "inspect", str(tmp_path)]) == 2
    assert "dataset.json" in capsys.readouterr().err
    (tmp_path / "x").mkdir()
    (tmp_path / "x" / "keep.txt").write_text("mine")
    assert main(["data", "synth", "--out", str(tmp_path / "x")]) == 2
    assert "not empty" in capsys.readouterr().err


def test_config_prints_resolved_toml(capsys) -> None:  # type: ignore[no-untyped-def]
    assert main(["config", "--config", "lemur", "--set", "training.steps=5"]) == 0
    out = capsys.readouterr().out
    assert 'name = "lemur"' in out and "steps = 5" in out
