"""What an experiment ran on: CPU model and cores, memory, GPUs, the code's commit. No torch import needed."""

from __future__ import annotations

import os
import platform
import shutil
import subprocess
from pathlib import Path
from typing import Any

REPO_ROOT = Path(__file__).resolve().parents[2]


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _memory_gib() -> float | None:
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                return round(int(line.split()[1]) / 2**20, 1)
    except OSError:
        pass
    return None


def _output(command: list[str]) -> str:
    try:
        done = subprocess.run(command, capture_output=True, text=True, timeout=20, cwd=REPO_ROOT)
    except (OSError, subprocess.TimeoutExpired):
        return ""
    return done.stdout.strip() if done.returncode == 0 else ""


def gpus() -> list[str]:
    if not shutil.which("nvidia-smi"):
        return []
    names = _output(["nvidia-smi", "--query-gpu=name", "--format=csv,noheader"])
    return [n.strip() for n in names.splitlines() if n.strip()]


def describe() -> dict[str, Any]:
    commit = _output(["git", "rev-parse", "--short", "HEAD"])
    dirty = bool(_output(["git", "status", "--porcelain", "--untracked-files=no"]))
    return {
        "cpu": _cpu_model(),
        "cores": os.cpu_count(),
        "memory_gib": _memory_gib(),
        "gpus": gpus(),
        "platform": platform.platform(),
        "python": platform.python_version(),
        "commit": commit + ("+dirty" if dirty and commit else ""),
        "load_average": [round(x, 2) for x in os.getloadavg()] if hasattr(os, "getloadavg") else None,
    }


def summary(info: dict[str, Any], nproc: int = 1, jobs: int = 1) -> str:
    """One line, e.g. 'NVIDIA H100 80GB HBM3, 1 GPU a run, 2 runs at a time (1 of 2 GPUs); 16-core ..., 128 GiB'."""
    host = f"{info['cores']}-core {info['cpu']}, {info['memory_gib']} GiB"
    names = info.get("gpus") or []
    if not names:
        return f"CPU only: {host}, {jobs} run(s) at a time"
    used = min(len(names), nproc * jobs)
    return f"{names[0]}, {nproc} GPU(s) a run, {jobs} run(s) at a time (GPUs used: {used} of {len(names)}); {host}"
