"""Aggregate an experiment's runs over seeds and write `results.json` and `table.md`.

Every variant is compared with the table's baseline seed by seed (same `training.seed` and `data.seed`): the
paired deltas' mean and standard deviation are reported in absolute percentage points (0.01 AUC = 1 point). A
delta is marked as noise when |mean| <= 2 x its standard error (std / sqrt(n)): a rough rule, not a significance
test (with 3 seeds a t-test would ask for about 4.3 standard errors).
"""

from __future__ import annotations

import json
import math
import statistics
from dataclasses import asdict, dataclass, field
from typing import Any

from trainer.experiment.runner import RunResult
from trainer.experiment.tables import Check, Table

METRICS = (
    ("auc", "AUC"),
    ("qauc", "QAUC"),
    ("gauc", "GAUC"),
    ("cold_auc", "cold AUC"),
    ("warm_auc", "warm AUC"),
)
NOISE_MARK = "~"


@dataclass
class Summary:
    """A value over seeds."""

    mean: float
    std: float
    n: int


@dataclass
class Delta:
    """Paired per-seed differences against a reference variant, in percentage points."""

    mean: float
    std: float
    se: float
    n: int
    noise: bool | None
    """|mean| <= 2 standard errors; None with fewer than 2 seeds (no spread to judge by)."""


@dataclass
class VariantReport:
    name: str
    per_seed: dict[int, dict[str, float]]
    """The final stage's eval metrics per seed."""
    samples_per_s: dict[int, float] = field(default_factory=dict)
    wall_s: dict[int, float] = field(default_factory=dict)
    """All stages of the seed together."""
    runs: list[dict[str, Any]] = field(default_factory=list)
    metrics: dict[str, Summary] = field(default_factory=dict)
    deltas: dict[str, Delta] = field(default_factory=dict)
    throughput: Summary | None = None
    errors: list[str] = field(default_factory=list)

    def metric(self, key: str) -> dict[int, float]:
        return {s: m[key] for s, m in self.per_seed.items() if _finite(m.get(key))}


@dataclass
class CheckResult:
    text: str
    delta: Delta | None
    above: float
    holds: bool | None
    """None when a side has no finished seed."""

    def verdict(self) -> str:
        if self.delta is None or self.holds is None:
            return "not measured"
        margin = self.delta.mean - self.above
        clear = self.delta.n >= 2 and abs(margin) > 2 * self.delta.se
        if self.holds:
            return "holds" if clear else "holds on the mean, but within the seed-to-seed noise"
        return "does not hold" if clear else "does not hold on the mean (within the seed-to-seed noise)"


# ----------------------------------------------------------------------------------------------- arithmetic


def _finite(value: Any) -> bool:
    return isinstance(value, (int, float)) and math.isfinite(value)


def summarize(values: list[float]) -> Summary:
    """Mean and sample standard deviation (n - 1; nan for one value) of the finite values."""
    values = [v for v in values if _finite(v)]
    if not values:
        return Summary(math.nan, math.nan, 0)
    std = statistics.stdev(values) if len(values) > 1 else math.nan
    return Summary(statistics.fmean(values), std, len(values))


def paired_delta(values: dict[int, float], reference: dict[int, float], scale: float = 100.0) -> Delta | None:
    """Mean, std and standard error of `values[s] - reference[s]` over the seeds both have, times `scale`."""
    seeds = sorted(s for s in values if s in reference and _finite(values[s]) and _finite(reference[s]))
    if not seeds:
        return None
    diffs = summarize([(values[s] - reference[s]) * scale for s in seeds])
    if diffs.n < 2:
        return Delta(diffs.mean, math.nan, math.nan, diffs.n, None)
    se = diffs.std / math.sqrt(diffs.n)
    return Delta(diffs.mean, diffs.std, se, diffs.n, abs(diffs.mean) <= 2 * se)


# ------------------------------------------------------------------------------------------------ aggregation


def collect_variants(
    order: list[str], results: list[RunResult], expected_stages: dict[str, int]
) -> list[VariantReport]:
    """Group run results by variant; a seed counts once its final stage finished."""
    reports = {name: VariantReport(name, {}) for name in order}
    by_chain: dict[tuple[str, int], list[RunResult]] = {}
    for r in results:
        by_chain.setdefault((r.variant, r.seed), []).append(r)
    for (name, seed), chain in sorted(by_chain.items(), key=lambda kv: kv[0][1]):
        report = reports[name]
        report.runs += [asdict(r) for r in chain]
        failed = [r for r in chain if not r.ok]
        if failed:
            report.errors += [
                f"seed {seed}{' [' + r.stage + ']' if r.stage else ''}: {r.error}" for r in failed
            ]
            continue
        if len(chain) < expected_stages[name] or chain[-1].eval is None:
            continue
        report.per_seed[seed] = chain[-1].eval
        report.wall_s[seed] = round(sum(r.wall_s for r in chain), 1)
        if chain[-1].samples_per_s is not None:
            report.samples_per_s[seed] = chain[-1].samples_per_s
    return [reports[name] for name in order]


def aggregate(table: Table, variants: list[VariantReport]) -> None:
    """Fill each variant's summaries and its paired deltas against the baseline."""
    base = next(v for v in variants if v.name == table.baseline)
    for v in variants:
        v.metrics = {key: summarize(list(v.metric(key).values())) for key, _ in METRICS}
        v.metrics["logloss"] = summarize(list(v.metric("logloss").values()))
        v.throughput = summarize(list(v.samples_per_s.values())) if v.samples_per_s else None
        if v.name == table.baseline:
            continue
        for key, _ in METRICS:
            delta = paired_delta(v.metric(key), base.metric(key))
            if delta is not None:
                v.deltas[key] = delta


def run_checks(checks: tuple[Check, ...], variants: list[VariantReport]) -> list[CheckResult]:
    by_name = {v.name: v for v in variants}
    out = []
    for check in checks:
        a, b = by_name.get(check.variant), by_name.get(check.other)
        delta = paired_delta(a.metric(check.metric), b.metric(check.metric)) if a and b else None
        holds = None if delta is None else delta.mean > check.above
        out.append(CheckResult(check.text, delta, check.above, holds))
    return out


def paper_direction(paper: float, ours: Delta | None) -> str:
    """'reproduced', 'opposite', 'noise' or 'not measured', comparing signs."""
    if ours is None:
        return "not measured"
    if ours.noise:
        return "noise"
    return "reproduced" if (paper > 0) == (ours.mean > 0) else "opposite"


# ------------------------------------------------------------------------------------------------- markdown


def fmt_value(s: Summary | None, digits: int = 4) -> str:
    if s is None or s.n == 0:
        return "-"
    if not _finite(s.std):
        return f"{s.mean:.{digits}f}"
    return f"{s.mean:.{digits}f} ± {s.std:.{digits}f}"


def fmt_delta(d: Delta | None) -> str:
    if d is None:
        return "-"
    text = f"{d.mean:+.2f}" if not _finite(d.std) else f"{d.mean:+.2f} ± {d.std:.2f}"
    return f"{text} {NOISE_MARK}" if d.noise else text


def fmt_rate(s: Summary | None) -> str:
    if s is None or s.n == 0:
        return "-"
    return f"{s.mean:,.0f}" if not _finite(s.std) else f"{s.mean:,.0f} ± {s.std:,.0f}"


def fmt_paper(paper: dict[str, float]) -> str:
    titles = dict(METRICS)
    return ", ".join(f"{titles.get(k, k)} {v:+.2f}" for k, v in paper.items())


def markdown_table(table: Table, variants: list[VariantReport]) -> str:
    has_paper = any(table.variant(v.name).paper for v in variants)
    header = ["variant"]
    for _, title in METRICS:
        header += [title, f"Δ {title}"]
    if table.throughput:
        header.append("samples/s")
    header.append("seeds")
    if has_paper:
        header.append("paper Δ (%)")
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for v in variants:
        name = f"{v.name} (baseline)" if v.name == table.baseline else v.name
        cells = [name]
        for key, _ in METRICS:
            delta = "base" if v.name == table.baseline else fmt_delta(v.deltas.get(key))
            cells += [fmt_value(v.metrics.get(key)), delta]
        if table.throughput:
            cells.append(fmt_rate(v.throughput))
        cells.append(str(len(v.per_seed)) + (" (failed runs)" if v.errors else ""))
        if has_paper:
            cells.append(fmt_paper(table.variant(v.name).paper) or "-")
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def legend(table: Table, n_seeds: int) -> str:
    has_paper = any(v.paper for v in table.variants)
    return (
        f"Metrics: mean ± standard deviation over seeds. Δ: the mean of the per-seed differences from "
        f"`{table.baseline}` (same training and data seed), in absolute percentage points (0.01 AUC = 1 point), "
        f"± their standard deviation. `{NOISE_MARK}` marks a delta inside the seed-to-seed spread: |mean| <= 2 "
        f"standard errors of the paired differences (std / sqrt(n), n = {n_seeds} seeds; a rough rule, not a "
        f"significance test)."
        + (
            " Paper Δ: the paper's delta over its baseline, in percent (source under Findings)."
            if has_paper
            else ""
        )
    )


def findings(table: Table, variants: list[VariantReport], checks: list[CheckResult]) -> list[str]:
    lines = []
    for v in variants:
        if v.name == table.baseline:
            continue
        lines.append(_variant_sentence(table, v))
    if table.cumulative:
        lines += _step_sentences(table, variants)
    lines += _paper_sentences(table, variants)
    lines += [f"Check: {c.text}: {c.verdict()} (Δ {fmt_delta(c.delta)} points)." for c in checks]
    for v in variants:
        if v.errors:
            lines.append(f"`{v.name}` had failed runs: " + "; ".join(v.errors))
    return lines


def _variant_sentence(table: Table, v: VariantReport) -> str:
    if not v.deltas:
        return f"`{v.name}`: no finished seed to compare."
    titles = dict(METRICS)
    real = [f"{titles[k]} {d.mean:+.2f}" for k, d in v.deltas.items() if d.noise is False]
    noise = [f"{titles[k]} {d.mean:+.2f}" for k, d in v.deltas.items() if d.noise]
    unknown = [f"{titles[k]} {d.mean:+.2f}" for k, d in v.deltas.items() if d.noise is None]
    parts = []
    if real:
        parts.append("beyond the seed-to-seed noise: " + ", ".join(real))
    if noise:
        parts.append("inside the noise (not a measured difference): " + ", ".join(noise))
    if unknown:
        parts.append("one seed only, no spread to judge by: " + ", ".join(unknown))
    note = table.variant(v.name).note
    return (
        f"`{v.name}` vs `{table.baseline}` (points): "
        + "; ".join(parts)
        + "."
        + (f" ({note})" if note else "")
    )


def _step_sentences(table: Table, variants: list[VariantReport]) -> list[str]:
    """A cumulative table: what each row adds over the row above it, paired per seed, beside the paper's step."""
    out = []
    titles = dict(METRICS)
    for prev, v in zip(variants, variants[1:]):
        before, after = table.variant(prev.name).paper, table.variant(v.name).paper
        parts = []
        for key in ("auc", "qauc"):
            delta = paired_delta(v.metric(key), prev.metric(key))
            if delta is None:
                continue
            text = f"{titles[key]} {fmt_delta(delta)}"
            if key in after:
                paper = after[key] - before.get(key, 0.0)
                text += f" (paper {paper:+.2f}%: {paper_direction(paper, delta)})"
            parts.append(text)
        if parts:
            out.append(f"Step `{prev.name}` → `{v.name}` (points): " + ", ".join(parts) + ".")
    return out


def _paper_sentences(table: Table, variants: list[VariantReport]) -> list[str]:
    verdicts: dict[str, list[str]] = {}
    titles = dict(METRICS)
    for v in variants:
        for key, value in table.variant(v.name).paper.items():
            verdict = paper_direction(value, v.deltas.get(key))
            verdicts.setdefault(verdict, []).append(f"`{v.name}` {titles[key]}")
    if not verdicts:
        return []
    counted = sum(len(x) for x in verdicts.values())
    words = {
        "reproduced": "the paper's direction reproduced",
        "noise": "inside the noise here (neither confirmed nor contradicted)",
        "opposite": "the OPPOSITE of the paper's direction",
        "not measured": "not measured",
    }
    out = [f"Against the paper ({table.source}), {counted} comparisons of sign:"]
    out += [f"{words[k]}: {', '.join(verdicts[k])}." for k in words if k in verdicts]
    return [" ".join(out)]


def render_markdown(
    table: Table, variants: list[VariantReport], checks: list[CheckResult], meta: dict[str, Any]
) -> str:
    parts = [
        f"# `{table.name}` ({meta['size']})",
        "",
        table.description + ".",
        "",
        markdown_table(table, variants),
        "",
        legend(table, len(meta["seeds"])),
        "",
        "![deltas vs the baseline per metric, error bars +-2 standard errors](chart.png)",
        "",
        "## Findings",
        "",
        *[f"- {line}" for line in findings(table, variants, checks)],
        "",
        "## Run",
        "",
        f"- command: `{meta['command']}`",
        f"- size `{meta['size']}`: {meta['size_description']}",
        f"- seeds: {', '.join(map(str, meta['seeds']))} (`training.seed` = `data.seed` = the seed; the dataset is "
        f"the same for every run)",
        f"- hardware: {meta['hardware_summary']}; commit {meta['hardware'].get('commit') or '?'}",
        *_wall_lines(meta),
        *_load_line(variants, meta),
        f"- run directories: `{meta['out']}/runs/<variant>/seed<k>`",
    ]
    if meta.get("note"):
        parts.append(f"- note: {meta['note']}")
    return "\n".join(parts) + "\n"


def _load_line(variants: list[VariantReport], meta: dict[str, Any]) -> list[str]:
    """The machine's load when the runs ended: on a shared machine, other work slows the runs."""
    loads = [r["load_average"] for v in variants for r in v.runs if r.get("load_average") is not None]
    if not loads:
        return []
    busy = meta.get("jobs", 1) * meta.get("threads_per_run", 1)
    return [
        f"- load average (1 min) as the runs ended: median {statistics.median(loads):.1f}, max {max(loads):.1f} "
        f"(this experiment alone: about {busy}); above that, other work shared the machine and slowed the runs"
    ]


def _wall_lines(meta: dict[str, Any]) -> list[str]:
    """The wall time of the invocations that ran runs (a resumed experiment has several; report-only ones, where
    every run had finished before, are only counted)."""
    runs = f"the {meta['runs_done']} finished runs took {_duration(meta['run_s'])} together"
    invocations = meta.get("invocations") or []
    working = [i for i in invocations if i.get("runs_run", 0) > 0]
    if not working:
        return [f"- wall time: {_duration(meta['wall_s'])} (synthesis {_duration(meta['synth_s'])}); {runs}"]
    idle = len(invocations) - len(working)
    later = (
        f"; {idle} other invocation(s) finished no run (report rewrites, or stopped early)" if idle else ""
    )
    if len(working) == 1:
        w = working[0]
        return [
            f"- wall time: {_duration(w['wall_s'])} (synthesis {_duration(w['synth_s'])}, started {w['started']}); "
            f"{runs}{later}"
        ]
    total = sum(i["wall_s"] for i in working)
    items = "; ".join(
        f"{i['started']}: {_duration(i['wall_s'])}, {i['runs_run']} runs"
        + (f" ({i['note']})" if i.get("note") else "")
        for i in working
    )
    return [f"- wall time: {_duration(total)} over {len(working)} invocations ({items}); {runs}{later}"]


def _duration(seconds: float) -> str:
    seconds = int(round(seconds))
    return f"{seconds // 60} min {seconds % 60:02d} s" if seconds >= 60 else f"{seconds} s"


# ----------------------------------------------------------------------------------------------------- JSON


def _clean(value: Any) -> Any:
    """NaN and inf become null, so the file is strict JSON."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {str(k): _clean(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_clean(v) for v in value]
    return value


def results_json(
    table: Table, variants: list[VariantReport], checks: list[CheckResult], meta: dict[str, Any]
) -> str:
    body = {
        **meta,
        "table": table.name,
        "description": table.description,
        "baseline": table.baseline,
        "units": {
            "metrics": "absolute",
            "deltas": "percentage points (x100), paired per seed vs the baseline",
        },
        "noise_rule": "|mean delta| <= 2 * std / sqrt(n) of the paired deltas",
        "variants": {
            v.name: {
                **asdict(v),
                "overrides": list(table.variant(v.name).overrides),
                "paper": table.variant(v.name).paper,
            }
            for v in variants
        },
        "checks": [{**asdict(c), "verdict": c.verdict()} for c in checks],
        "source": table.source,
    }
    return json.dumps(_clean(body), indent=1, allow_nan=False) + "\n"
