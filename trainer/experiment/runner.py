"""Plan and execute an experiment's training runs: one subprocess per (variant, seed, stage).

A run's directory is `<out>/runs/<variant>/seed<k>` (`.../seed<k>/<stage>` for a variant of several stages); it
keeps the trainer's `config.toml`, `metrics.jsonl` and `train.log`, plus `result.json`, written here once the run
finished and its metrics were read. A run whose `result.json` exists with the same overrides is skipped, so an
interrupted experiment resumes; a run directory without it is wiped and the run starts over. The chain of stages of
one (variant, seed) runs in order; chains run `jobs` at a time.
"""

from __future__ import annotations

import json
import os
import queue
import shutil
import statistics
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path
from string import Template
from typing import Any

from trainer.config import load_config
from trainer.config.loader import apply_override
from trainer.experiment.sizes import Size
from trainer.experiment.tables import Table, Variant
from trainer.logger import read_metrics

REPO_ROOT = Path(__file__).resolve().parents[2]
DIST_ENV = (
    "RANK",
    "WORLD_SIZE",
    "LOCAL_RANK",
    "LOCAL_WORLD_SIZE",
    "MASTER_ADDR",
    "MASTER_PORT",
    "GROUP_RANK",
)


@dataclass
class RunSpec:
    """One training subprocess."""

    variant: str
    seed: int
    stage: str
    """'' for a variant of one stage."""
    dir: Path
    overrides: list[str]
    """Every `--set` of the run, in order (later ones win)."""
    final: bool
    """The variant's last stage: its eval is the variant's result for this seed."""
    keep_checkpoints: bool = False

    @property
    def label(self) -> str:
        return f"{self.variant} seed {self.seed}" + (f" [{self.stage}]" if self.stage else "")


@dataclass
class RunResult:
    variant: str
    seed: int
    stage: str
    dir: str
    ok: bool
    skipped: bool = False
    wall_s: float = 0.0
    eval: dict[str, float] | None = None
    samples_per_s: float | None = None
    """Median of the run's logged training windows (all ranks together)."""
    command: list[str] = field(default_factory=list)
    error: str = ""
    load_average: float | None = None
    """The machine's 1-minute load average when the run ended (about `jobs` x threads when nothing else runs)."""


# ------------------------------------------------------------------------------------------------- planning


def run_dir(out: Path, variant: str, seed: int, stage: str) -> Path:
    base = out / "runs" / variant / f"seed{seed}"
    return base / stage if stage else base


def base_overrides(table: Table, size: Size, user: list[str]) -> list[str]:
    """What every run of the table shares, and what the dataset is synthesised from."""
    return [*size.overrides, *table.common, *table.per_size.get(size.name, ()), *user]


def plan_runs(
    table: Table,
    size: Size,
    seeds: list[int],
    out: Path,
    user: list[str],
    variants: list[str] | None = None,
) -> list[list[RunSpec]]:
    """Chains of runs, one per (variant, seed), seed-major: an interrupted experiment has whole seeds first."""
    chosen = [table.variant(name) for name in (variants or [v.name for v in table.variants])]
    if table.baseline not in [v.name for v in chosen]:
        chosen.insert(0, table.variant(table.baseline))
    return [plan_chain(table, size, variant, seed, out, user) for seed in seeds for variant in chosen]


def plan_chain(
    table: Table, size: Size, variant: Variant, seed: int, out: Path, user: list[str]
) -> list[RunSpec]:
    """The stages of one (variant, seed); each run's overrides: size, table, variant, stage, user, then paths and
    seeds."""
    stages = variant.stage_list()
    dirs = {f"stage_{s.name}": str(run_dir(out, variant.name, seed, s.name)) for s in stages if s.name}
    chain = []
    for i, stage in enumerate(stages):
        where = run_dir(out, variant.name, seed, stage.name)
        settings = [*base_overrides(table, size, []), *variant.overrides, *stage.overrides, *user]
        fixed = [
            f'data.path="{out / "data"}"',
            f'logging.out_dir="{where}"',
            f"training.seed={seed}",
            f"data.seed={seed}",
        ]
        overrides = [*fill_templates(settings, size, dirs), *fixed]
        chain.append(
            RunSpec(
                variant.name, seed, stage.name, where, overrides, i == len(stages) - 1, stage.keep_checkpoints
            )
        )
    return chain


def fill_templates(overrides: list[str], size: Size, stage_dirs: dict[str, str]) -> list[str]:
    """Replace `$steps`, `$half_steps` and `${stage_NAME}` (see tables.py)."""
    steps = resolved_steps(size.preset, overrides)
    context = {"steps": str(steps), "half_steps": str(max(1, steps // 2)), **stage_dirs}
    try:
        return [Template(o).substitute(context) for o in overrides]
    except (KeyError, ValueError) as err:
        known = ", ".join(f"${k}" for k in context)
        raise ValueError(
            f"an override names an unknown placeholder {err} (known: {known}; $$ is a plain $)"
        ) from err


def resolved_steps(preset: str, overrides: list[str]) -> int:
    """`training.steps` after the overrides (only those that set it: the others may not validate yet)."""
    cfg = load_config(preset)
    for item in overrides:
        if item.split("=", 1)[0].strip() == "training.steps":
            apply_override(cfg, item)
    return cfg.training.steps


def validate_runs(chains: list[list[RunSpec]], preset: str) -> None:
    """Load every run's config now, so a bad override stops the experiment before anything trains."""
    for chain in chains:
        for spec in chain:
            load_config(preset, spec.overrides)


# ------------------------------------------------------------------------------------------------ execution


def train_command(preset: str, overrides: list[str], nproc: int) -> list[str]:
    """`python -m trainer.train ...`, under torchrun for several processes."""
    if nproc > 1:
        launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nnodes", "1"]
        launcher += ["--nproc-per-node", str(nproc), "-m", "trainer.train"]
    else:
        launcher = [sys.executable, "-m", "trainer.train"]
    command = [*launcher, "--config", preset]
    for item in overrides:
        command += ["--set", item]
    return command


def child_env(threads: int, gpus: list[int] | None = None) -> dict[str, str]:
    """The parent's environment without torchrun's variables; `gpus`: the devices this run may see."""
    env = {k: v for k, v in os.environ.items() if k not in DIST_ENV}
    if gpus:
        env["CUDA_VISIBLE_DEVICES"] = ",".join(map(str, gpus))
    path = env.get("PYTHONPATH")
    env.update(
        OMP_NUM_THREADS=str(threads),
        MKL_NUM_THREADS=str(threads),
        TOKENIZERS_PARALLELISM="false",
        PYTHONUNBUFFERED="1",
        PYTHONPATH=f"{REPO_ROOT}{os.pathsep}{path}" if path else str(REPO_ROOT),
    )
    return env


def final_eval(records: list[dict[str, Any]]) -> dict[str, float] | None:
    """The last eval record's metrics (without step, kind, time), or None."""
    evals = [r for r in records if r.get("kind") == "eval"]
    if not evals:
        return None
    return {k: v for k, v in evals[-1].items() if k not in ("step", "kind", "time")}


def median_samples_per_s(records: list[dict[str, Any]]) -> float | None:
    rates = [r["samples_per_s"] for r in records if r.get("kind") == "train" and "samples_per_s" in r]
    return statistics.median(rates) if rates else None


def load_done(spec: RunSpec) -> RunResult | None:
    """The saved result of this very run (same overrides), if it finished before."""
    path = spec.dir / "result.json"
    if not path.is_file():
        return None
    saved = json.loads(path.read_text())
    if saved.get("overrides") != spec.overrides or not saved.get("ok"):
        return None
    fields = {k: v for k, v in saved.items() if k in RunResult.__dataclass_fields__}
    return RunResult(**{**fields, "skipped": True})


def tail(path: Path, lines: int = 15) -> str:
    if not path.is_file():
        return ""
    return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])


def gpu_slots(gpu_count: int, nproc: int, jobs: int) -> list[list[int]]:
    """One device list per concurrent run: runs spread over the GPUs, `nproc` each, sharing them when there are
    more runs than GPU groups. With no GPU (or CUDA_VISIBLE_DEVICES set by the user) every slot is [] (no change)."""
    if gpu_count < nproc or "CUDA_VISIBLE_DEVICES" in os.environ:
        return [[] for _ in range(jobs)]
    groups = [list(range(g * nproc, (g + 1) * nproc)) for g in range(gpu_count // nproc)]
    return [groups[i % len(groups)] for i in range(jobs)]


class Runner:
    """Executes chains of runs, `jobs` at a time, and prints one line per run start and end."""

    def __init__(self, preset: str, nproc: int, jobs: int, threads: int, gpu_count: int = 0) -> None:
        self.preset, self.nproc, self.jobs, self.threads = preset, nproc, jobs, threads
        self.slots: queue.Queue[list[int]] = queue.Queue()
        for group in gpu_slots(gpu_count, nproc, jobs):
            self.slots.put(group)
        self.lock = threading.Lock()
        self.started = 0
        self.total = 0
        self.failed: dict[tuple[str, str], int] = {}
        """(variant, stage) -> the seed it failed for: its other seeds are not run (they would fail alike)."""

    def run_all(self, chains: list[list[RunSpec]]) -> list[RunResult]:
        self.total = sum(len(c) for c in chains)
        with ThreadPoolExecutor(max_workers=max(1, self.jobs)) as pool:
            done = list(pool.map(self.run_chain, chains))
        return [r for chain in done for r in chain]

    def run_chain(self, chain: list[RunSpec]) -> list[RunResult]:
        results = []
        for spec in chain:
            result = self.run_one(spec)
            results.append(result)
            if not result.ok:  # later stages need this one
                break
        return results

    def run_one(self, spec: RunSpec) -> RunResult:
        number = self.next_number()
        done = load_done(spec)
        if done is not None:
            log(f"[{number}/{self.total}] skip   {spec.label}: finished before ({done.wall_s:.0f} s)")
            return done
        failed_seed = self.failed.get((spec.variant, spec.stage))
        if failed_seed is not None:
            error = f"not run: the same run failed for seed {failed_seed}"
            log(f"[{number}/{self.total}] skip   {spec.label}: {error}")
            return RunResult(spec.variant, spec.seed, spec.stage, str(spec.dir), ok=False, error=error)
        shutil.rmtree(spec.dir, ignore_errors=True)
        spec.dir.mkdir(parents=True)
        command = train_command(self.preset, spec.overrides, self.nproc)
        log(f"[{number}/{self.total}] start  {spec.label}")
        started = time.perf_counter()
        gpus = self.slots.get()
        try:
            with (spec.dir / "train.log").open("w") as out:
                env = child_env(self.threads, gpus)
                code = subprocess.run(
                    command, stdout=out, stderr=subprocess.STDOUT, env=env, cwd=REPO_ROOT
                ).returncode
        finally:
            self.slots.put(gpus)
        result = self.collect(spec, command, code, time.perf_counter() - started)
        self.finish(spec, result, number)
        return result

    def next_number(self) -> int:
        with self.lock:
            self.started += 1
            return self.started

    def collect(self, spec: RunSpec, command: list[str], code: int, wall_s: float) -> RunResult:
        records = read_metrics(spec.dir / "metrics.jsonl")
        result = RunResult(
            spec.variant,
            spec.seed,
            spec.stage,
            str(spec.dir),
            ok=code == 0,
            wall_s=round(wall_s, 1),
            eval=final_eval(records),
            samples_per_s=median_samples_per_s(records),
            command=command,
            load_average=round(os.getloadavg()[0], 2) if hasattr(os, "getloadavg") else None,
        )
        if code != 0:
            result.error = f"exit code {code}; see {spec.dir / 'train.log'}"
        elif spec.final and result.eval is None:
            result.ok, result.error = False, f"no eval record in {spec.dir / 'metrics.jsonl'}"
        return result

    def finish(self, spec: RunSpec, result: RunResult, number: int) -> None:
        if not result.ok:
            with self.lock:
                self.failed.setdefault((spec.variant, spec.stage), spec.seed)
            log(f"[{number}/{self.total}] FAILED {spec.label} after {result.wall_s:.0f} s: {result.error}")
            print(tail(spec.dir / "train.log"), file=sys.stderr, flush=True)
            return
        if not spec.keep_checkpoints:
            shutil.rmtree(spec.dir / "checkpoints", ignore_errors=True)
        saved = {**asdict(result), "overrides": spec.overrides}
        (spec.dir / "result.json").write_text(json.dumps(saved, indent=1) + "\n")
        shown = ""
        if result.eval:
            shown = "  " + "  ".join(
                f"{k} {result.eval.get(k, float('nan')):.4f}" for k in ("auc", "qauc", "cold_auc")
            )
        log(f"[{number}/{self.total}] done   {spec.label} in {result.wall_s:.0f} s{shown}")


LOG_LOCK = threading.Lock()


def log(message: str) -> None:
    with LOG_LOCK:
        print(f"[{time.strftime('%H:%M:%S')}] {message}", flush=True)
