"""`lemur experiment NAME`: synthesise the table's data, train every variant for every seed, write the report.

Outputs in `--out` (default `outputs/experiments/<NAME>-<size>/`): `results.json`, `table.md`, `chart.png`,
`data/` (the synthetic dataset, reused) and `runs/<variant>/seed<k>/` (each run's config, metrics and log).
"""

from __future__ import annotations

import json
import os
import shlex
import time
from pathlib import Path
from typing import Any

from trainer.experiment import machine
from trainer.experiment.chart import draw_chart
from trainer.experiment.dataset import ensure_dataset
from trainer.experiment.report import (
    CheckResult,
    VariantReport,
    aggregate,
    collect_variants,
    render_markdown,
    results_json,
    run_checks,
)
from trainer.experiment.runner import Runner, RunResult, base_overrides, log, plan_runs, validate_runs
from trainer.experiment.sizes import SIZES
from trainer.experiment.tables import TABLES, Table, get_table


def list_tables() -> str:
    width = max(len(name) for name in TABLES)
    lines = [f"{name.ljust(width)}  {t.description} (baseline {t.baseline})" for name, t in TABLES.items()]
    lines += ["", "sizes:"] + [f"  {s.name}: {s.description}" for s in SIZES.values()]
    return "\n".join(lines)


def experiment_command(
    name: str,
    size: str,
    seeds: int,
    out: str | None,
    nproc: int,
    jobs: int | None,
    variants: list[str] | None,
    overrides: list[str],
) -> str:
    """The canonical command line that reproduces the experiment."""
    parts = ["lemur", "experiment", name, "--size", size, "--seeds", str(seeds)]
    if out:
        parts += ["--out", out]
    if nproc != 1:
        parts += ["--nproc", str(nproc)]
    if jobs is not None:
        parts += ["--jobs", str(jobs)]
    if variants:
        parts += ["--variants", ",".join(variants)]
    for item in overrides:
        parts += ["--set", item]
    return shlex.join(parts)


def run_experiment(
    name: str,
    size: str = "small",
    seeds: int = 3,
    out: str | None = None,
    nproc: int = 1,
    jobs: int | None = None,
    variants: list[str] | None = None,
    overrides: list[str] | None = None,
) -> int:
    """Run the table; 0 when every run finished, 1 when some failed (the report is written either way)."""
    started = time.time()
    table, chosen_size, user = get_table(name), SIZES[size], list(overrides or [])
    if seeds < 1:
        raise ValueError("--seeds must be >= 1")
    command = experiment_command(name, size, seeds, out, nproc, jobs, variants, user)
    out_dir = Path(out or f"outputs/experiments/{name}-{size}").resolve()
    out_dir.mkdir(parents=True, exist_ok=True)
    chains = plan_runs(table, chosen_size, list(range(seeds)), out_dir, user, variants)
    validate_runs(chains, chosen_size.preset)
    jobs = jobs or chosen_size.jobs
    threads = max(1, (os.cpu_count() or 1) // (jobs * nproc))
    runs = sum(map(len, chains))
    log(f"{name} ({size}): {len(chains)} chains, {runs} runs, {jobs} at a time, {threads} threads each")
    synth_s = ensure_dataset(out_dir, chosen_size.preset, base_overrides(table, chosen_size, user), log)
    results = Runner(chosen_size.preset, nproc, jobs, threads, len(machine.gpus())).run_all(chains)

    order = list(dict.fromkeys(c[0].variant for c in chains))
    reports = collect_variants(order, results, {c[0].variant: len(c) for c in chains})
    aggregate(table, reports)
    checks = run_checks(table.checks, reports)
    hardware = machine.describe()
    summary = machine.summary(hardware, nproc, jobs)
    invocations = record_invocation(out_dir, command, started, synth_s, results, summary)
    meta = {
        "command": command,
        "size": size,
        "size_description": chosen_size.description,
        "preset": chosen_size.preset,
        "seeds": list(range(seeds)),
        "nproc": nproc,
        "jobs": jobs,
        "threads_per_run": threads,
        "size_overrides": list(chosen_size.overrides),
        "table_overrides": [*table.common, *table.per_size.get(size, ())],
        "user_overrides": user,
        "hardware": hardware,
        "hardware_summary": summary,
        "wall_s": invocations[-1]["wall_s"],
        "synth_s": round(synth_s, 1),
        "run_s": round(sum(r.wall_s for r in results), 1),
        "runs_done": sum(r.ok for r in results),
        "runs_failed": sum(not r.ok for r in results),
        "invocations": invocations,
        "out": str(out_dir),
    }
    write_outputs(out_dir, table, reports, checks, meta)
    log(f"wrote {out_dir / 'table.md'}, results.json and chart.png in {meta['wall_s']:.0f} s")
    print("\n" + (out_dir / "table.md").read_text(), flush=True)
    return 0 if meta["runs_failed"] == 0 else 1


def record_invocation(
    out_dir: Path, command: str, started: float, synth_s: float, results: list[RunResult], hardware: str
) -> list[dict[str, Any]]:
    """Append this invocation to `<out>/invocations.jsonl` (a resumed experiment has several); return them all."""
    line = {
        "started": time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(started)),
        "wall_s": round(time.time() - started, 1),
        "synth_s": round(synth_s, 1),
        "runs_run": sum(not r.skipped for r in results if r.ok or r.wall_s > 0),
        "runs_skipped": sum(r.skipped for r in results),
        "runs_failed": sum(not r.ok for r in results),
        "command": command,
        "hardware": hardware,
    }
    path = out_dir / "invocations.jsonl"
    with path.open("a") as f:
        f.write(json.dumps(line) + "\n")
    return [json.loads(x) for x in path.read_text().splitlines() if x.strip()]


def write_outputs(
    out_dir: Path, table: Table, reports: list[VariantReport], checks: list[CheckResult], meta: dict[str, Any]
) -> None:
    (out_dir / "results.json").write_text(results_json(table, reports, checks, meta))
    (out_dir / "table.md").write_text(render_markdown(table, reports, checks, meta))
    bars = [r for r in reports if r.name != table.baseline]
    title = f"{table.name} ({meta['size']}, {len(meta['seeds'])} seeds)"
    draw_chart(out_dir / "chart.png", title, table.baseline, bars)
