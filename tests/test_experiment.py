"""`lemur experiment`: the tables' definitions, aggregation and noise marks against hand-computed numbers, the
report files, multi-stage planning, the runner's resume and failure handling (with a fake trainer), and one real
mini experiment through the CLI."""

from __future__ import annotations

import dataclasses
import json
import math
import sys
from pathlib import Path

import pytest
from PIL import Image

from tests.conftest import SMALL
from trainer import cli
from trainer.experiment import main as experiment_main
from trainer.experiment import runner as runner_module
from trainer.experiment.report import (
    aggregate,
    collect_variants,
    findings,
    paired_delta,
    run_checks,
    summarize,
)
from trainer.experiment.runner import RunResult, plan_runs, validate_runs
from trainer.experiment.sizes import SIZES
from trainer.experiment.tables import TABLES, Check, Stage, Table, Variant

SMALL_SIZE = SIZES["small"]

# ------------------------------------------------------------------------------------------------ definitions


@pytest.mark.parametrize("size", sorted(SIZES))
def test_every_table_plans_and_validates(tmp_path: Path, size: str) -> None:
    for table in TABLES.values():
        chains = plan_runs(table, SIZES[size], [0, 1, 2], tmp_path, [])
        validate_runs(chains, SIZES[size].preset)
        assert len(chains) == 3 * len(table.variants)
        assert {c[0].variant for c in chains} == {v.name for v in table.variants}
        for chain in chains:
            for spec in chain:
                assert f"training.seed={spec.seed}" in spec.overrides
                assert f"data.seed={spec.seed}" in spec.overrides


def test_table_definitions_are_checked() -> None:
    with pytest.raises(ValueError, match="baseline"):
        Table("t", "d", "missing", (Variant("a"),))
    with pytest.raises(ValueError, match="data.synth"):
        Table("t", "d", "a", (Variant("a", ("data.synth.num_items=5",)),))
    with pytest.raises(ValueError, match="unknown variant"):
        Table("t", "d", "a", (Variant("a"),), checks=(Check("x", "a", "b", "auc", 0.0),))


def test_list_names_every_table(capsys: pytest.CaptureFixture[str]) -> None:
    assert cli.main(["experiment", "--list"]) == 0
    out = capsys.readouterr().out
    for name in TABLES:
        assert name in out


def test_multi_stage_plan_passes_the_earlier_run_dir(tmp_path: Path) -> None:
    table = Table(
        "two",
        "two stages",
        "base",
        (
            Variant("base"),
            Variant(
                "staged",
                ("model.use_content=true",),
                stages=(
                    Stage("first", ("training.sqdc_weight=0.1",)),
                    Stage(
                        "second",
                        (
                            'data.tokenizer="${stage_first}/tok"',
                            "lora.rank=2",
                            "lora.phase2_start=$half_steps",
                        ),
                    ),
                ),
            ),
        ),
    )
    chains = plan_runs(table, SMALL_SIZE, [4], tmp_path, ["training.steps=30"])
    staged = next(c for c in chains if c[0].variant == "staged")
    first, second = staged
    assert first.dir == tmp_path / "runs" / "staged" / "seed4" / "first"
    assert not first.final and second.final
    assert f'data.tokenizer="{first.dir}/tok"' in second.overrides
    assert "lora.phase2_start=15" in second.overrides
    assert "training.sqdc_weight=0.1" not in second.overrides  # a stage's overrides are its own
    assert chains[0][0].variant == "base"  # the baseline first


def test_unknown_placeholder_is_a_clear_error(tmp_path: Path) -> None:
    table = Table("t", "d", "a", (Variant("a", ('data.tokenizer="${stage_nope}/x"',)),))
    with pytest.raises(ValueError, match="unknown placeholder"):
        plan_runs(table, SMALL_SIZE, [0], tmp_path, [])


# ------------------------------------------------------------------------------------------------ arithmetic


def test_summary_and_paired_delta_by_hand() -> None:
    s = summarize([0.70, 0.72, 0.71, math.nan])
    assert s.n == 3 and s.mean == pytest.approx(0.71) and s.std == pytest.approx(0.01)

    base = {0: 0.70, 1: 0.72, 2: 0.71}
    # per-seed deltas 1.0, 2.0, 0.0 points: mean 1, std 1, se 1/sqrt(3) = 0.577; 1 <= 2 x 0.577: noise
    noisy = paired_delta({0: 0.71, 1: 0.74, 2: 0.71}, base)
    assert noisy is not None
    assert (noisy.mean, noisy.std, noisy.n) == (pytest.approx(1.0), pytest.approx(1.0), 3)
    assert noisy.se == pytest.approx(1 / math.sqrt(3))
    assert noisy.noise is True
    # deltas 1.0, 1.2, 0.8: mean 1, std 0.2, se 0.115; 1 > 0.23: a real difference
    clear = paired_delta({0: 0.71, 1: 0.732, 2: 0.718}, base)
    assert clear is not None and clear.noise is False
    assert clear.mean == pytest.approx(1.0) and clear.std == pytest.approx(0.2)
    # only the seeds both sides have count; one seed gives no spread and no verdict
    single = paired_delta({0: 0.69, 5: 0.9}, base)
    assert (
        single is not None and single.n == 1 and single.mean == pytest.approx(-1.0) and single.noise is None
    )
    assert paired_delta({7: 0.5}, base) is None


def _result(variant: str, seed: int, auc: float, stage: str = "", ok: bool = True) -> RunResult:
    metrics = {"auc": auc, "qauc": auc - 0.05, "gauc": auc - 0.02, "cold_auc": math.nan, "logloss": 0.5}
    return RunResult(
        variant,
        seed,
        stage,
        f"/runs/{variant}/{seed}",
        ok,
        wall_s=10.0,
        eval=metrics,
        samples_per_s=100.0 + seed,
    )


FAKE = Table(
    "fake",
    "a fake table",
    "base",
    (
        Variant("base"),
        Variant("better", paper={"auc": 0.5}),
        Variant("same", paper={"auc": 0.5}),
        Variant("broken"),
    ),
    throughput=True,
    checks=(
        Check("better beats base", "better", "base", "auc", 0.0),
        Check("same beats base by half a point", "same", "base", "auc", 0.5),
    ),
    source="made up",
)


def _fake_reports() -> tuple[list, list]:
    results = []
    for seed, base in enumerate([0.70, 0.72, 0.71]):
        results.append(_result("base", seed, base))
        results.append(_result("better", seed, base + [0.010, 0.012, 0.008][seed]))
        results.append(_result("same", seed, base + [0.01, 0.02, 0.0][seed]))
    results.append(_result("broken", 0, 0.0, ok=False))
    reports = collect_variants(
        ["base", "better", "same", "broken"], results, {v.name: 1 for v in FAKE.variants}
    )
    aggregate(FAKE, reports)
    return reports, run_checks(FAKE.checks, reports)


def test_aggregate_marks_noise_and_runs_checks() -> None:
    reports, checks = _fake_reports()
    by_name = {r.name: r for r in reports}
    assert by_name["better"].deltas["auc"].noise is False
    assert by_name["better"].deltas["qauc"].mean == pytest.approx(1.0)  # qauc = auc - 0.05 on both sides
    assert by_name["same"].deltas["auc"].noise is True
    assert "cold_auc" not in by_name["better"].deltas  # nan everywhere: nothing to compare
    assert by_name["base"].deltas == {}
    assert by_name["base"].throughput is not None and by_name["base"].throughput.mean == pytest.approx(101.0)
    assert by_name["broken"].per_seed == {} and by_name["broken"].errors
    assert [c.holds for c in checks] == [True, True]
    assert checks[0].verdict() == "holds"
    assert "within the seed-to-seed noise" in checks[1].verdict()


def test_cumulative_table_reports_each_step() -> None:
    reports, checks = _fake_reports()
    cumulative = dataclasses.replace(FAKE, cumulative=True)
    lines = findings(cumulative, reports, checks)
    step = next(line for line in lines if line.startswith("Step `better` → `same`"))
    # same - better per seed: 0.0, +0.8, -0.8 points; the paper's step is 0.5 - 0.5 = 0
    assert "AUC +0.00 ± 0.80 ~" in step and "paper +0.00%" in step
    assert not any(line.startswith("Step") for line in findings(FAKE, reports, checks))


def test_report_files_are_written_and_parse(tmp_path: Path) -> None:
    reports, checks = _fake_reports()
    meta = {
        "command": "lemur experiment fake",
        "size": "small",
        "size_description": "tiny",
        "seeds": [0, 1, 2],
        "hardware": {"commit": "abc"},
        "hardware_summary": "CPU only: test",
        "wall_s": 75.0,
        "synth_s": 5.0,
        "run_s": 90.0,
        "runs_done": 9,
        "out": str(tmp_path),
    }
    experiment_main.write_outputs(tmp_path, FAKE, reports, checks, meta)

    def no_nan(text: str) -> None:
        raise AssertionError(f"non-standard JSON constant {text}")

    body = json.loads((tmp_path / "results.json").read_text(), parse_constant=no_nan)
    assert body["baseline"] == "base" and set(body["variants"]) == {"base", "better", "same", "broken"}
    assert body["variants"]["better"]["deltas"]["auc"]["noise"] is False
    assert body["variants"]["better"]["metrics"]["cold_auc"]["mean"] is None
    assert body["checks"][0]["verdict"] == "holds"

    table_md = (tmp_path / "table.md").read_text()
    rows = {
        line.split(" | ")[0].lstrip("| "): line for line in table_md.splitlines() if line.startswith("| ")
    }
    assert "+1.00 ± 0.20 |" in rows["better"] and "~" not in rows["better"]
    assert "+1.00 ± 1.00 ~" in rows["same"]
    assert "samples/s" in table_md and "paper Δ" in table_md
    assert "lemur experiment fake" in table_md
    assert "inside the noise" in table_md and "failed" in table_md

    with Image.open(tmp_path / "chart.png") as image:
        image.verify()
    with Image.open(tmp_path / "chart.png") as image:
        assert image.size[0] > 500 and image.getbbox() is not None


# --------------------------------------------------------------------------------- the runner, fake trainer

FAKE_TRAINER = r"""
import json, sys
from pathlib import Path
sets = dict(a.split("=", 1) for a in sys.argv[2:])
out = Path(json.loads(sets["logging.out_dir"]))
seed = int(sets["training.seed"])
with open(sys.argv[1], "a") as calls:
    calls.write(str(out) + "\n")
if sets.get("training.objective") == '"contrastive"':  # stage 1: leaves a file for stage 2
    (out / "encoder.pt").write_text("weights")
init = sets.get("model.content_init")
if init and not Path(json.loads(init)).is_file():
    sys.exit(3)
if sets.get("training.cic_weight") == "0.5":  # the variant that always fails
    sys.exit(1)
(out / "checkpoints" / "step-1").mkdir(parents=True)
auc = 0.70 + 0.01 * seed + (0.02 if sets.get("model.use_content") == "true" else 0.0)
with open(out / "metrics.jsonl", "a") as f:
    f.write(json.dumps({"step": 5, "kind": "train", "samples_per_s": 50.0 + seed}) + "\n")
    f.write(json.dumps({"step": 10, "kind": "eval", "auc": auc, "qauc": auc, "gauc": auc, "cold_auc": auc}) + "\n")
"""

STAGED = Table(
    "staged-fake",
    "fake stages",
    "ids",
    (
        Variant("ids", ("model.use_content=false",)),
        Variant(
            "two_stage",
            ("model.use_content=true",),
            stages=(
                Stage("pretrain", ('training.objective="contrastive"', "training.sqdc_weight=0.1")),
                Stage("rank", ('model.content_init="${stage_pretrain}/encoder.pt"',)),
            ),
        ),
        Variant("fails", ("model.use_content=true", "training.cic_weight=0.5")),
    ),
)


@pytest.fixture
def fake_trainer(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """Runs go to a tiny script instead of the trainer; every call is appended to the returned file."""
    calls = tmp_path / "calls.txt"
    calls.touch()

    def command(preset: str, overrides: list[str], nproc: int) -> list[str]:
        return [sys.executable, "-c", FAKE_TRAINER, str(calls), *overrides]

    monkeypatch.setattr(runner_module, "train_command", command)
    monkeypatch.setattr(experiment_main, "ensure_dataset", lambda *args, **kwargs: 0.0)
    monkeypatch.setitem(TABLES, STAGED.name, STAGED)
    return calls


def test_runner_stages_resume_and_failures(tmp_path: Path, fake_trainer: Path) -> None:
    out = tmp_path / "exp"
    code = experiment_main.run_experiment(STAGED.name, seeds=2, out=str(out), jobs=1)
    assert code == 1  # `fails` failed, the rest finished
    calls = fake_trainer.read_text().splitlines()
    fails = [str(out / "runs" / "fails" / f"seed{s}") for s in (0, 1)]
    assert fails[0] in calls and fails[1] not in calls  # seed 1 would fail alike: not run
    assert len(calls) == 2 * 3 + 1  # ids, pretrain, rank per seed
    for seed in (0, 1):
        staged = out / "runs" / "two_stage" / f"seed{seed}"
        assert calls.index(str(staged / "pretrain")) < calls.index(str(staged / "rank"))
        assert (staged / "rank" / "result.json").is_file()
        assert not (staged / "rank" / "checkpoints").exists()  # deleted once read
    body = json.loads((out / "results.json").read_text())
    assert body["variants"]["two_stage"]["deltas"]["auc"]["mean"] == pytest.approx(2.0)
    assert body["variants"]["fails"]["per_seed"] == {} and len(body["variants"]["fails"]["errors"]) == 2
    assert body["runs_failed"] == 2

    # again: the finished runs are skipped, the failed one retried
    assert experiment_main.run_experiment(STAGED.name, seeds=2, out=str(out), jobs=1) == 1
    assert fake_trainer.read_text().splitlines()[len(calls) :] == [fails[0]]

    # a third seed, then a changed override: only what is new or different runs
    assert experiment_main.run_experiment(STAGED.name, seeds=3, out=str(out), variants=["two_stage"]) == 0
    third = fake_trainer.read_text().splitlines()[len(calls) + 1 :]
    staged2 = out / "runs" / "two_stage" / "seed2"
    assert sorted(third) == sorted(
        [str(out / "runs" / "ids" / "seed2"), str(staged2 / "pretrain"), str(staged2 / "rank")]
    )
    changed = ["training.steps=7"]
    experiment_main.run_experiment(
        STAGED.name, seeds=1, out=str(out), variants=["two_stage"], overrides=changed
    )
    assert len(fake_trainer.read_text().splitlines()) == len(calls) + 1 + 3 + 3


# ----------------------------------------------------------------------------------------- a real mini run


@pytest.mark.slow
def test_cli_runs_a_real_table_and_resumes(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "cumulative"
    args = ["experiment", "lemur-cumulative", "--variants", "+rankmixer", "--seeds", "2", "--out", str(out)]
    for item in [*SMALL, "training.steps=6"]:
        args += ["--set", item]
    assert cli.main(args) == 0
    first = capsys.readouterr().out
    assert first.count(" done ") == 4 and "data: synthesising" in first

    body = json.loads((out / "results.json").read_text())
    assert list(body["variants"]) == ["dlrm_mlp", "+rankmixer"]
    for variant in body["variants"].values():
        assert sorted(variant["per_seed"]) == ["0", "1"]
        assert all(0.0 < m["auc"] < 1.0 for m in variant["per_seed"].values())
    assert set(body["variants"]["+rankmixer"]["deltas"]) >= {"auc", "qauc", "gauc"}
    run = out / "runs" / "+rankmixer" / "seed1"
    assert (run / "config.toml").is_file() and (run / "metrics.jsonl").is_file()
    assert 'ranker = "rankmixer"' in (run / "config.toml").read_text()
    assert "seed = 1" in (run / "config.toml").read_text()
    assert not (run / "checkpoints").exists()
    assert (out / "chart.png").is_file() and "| +rankmixer |" in (out / "table.md").read_text()

    assert cli.main(args) == 0  # resumed: nothing left to run
    second = capsys.readouterr().out
    assert second.count(" skip ") == 4 and " start " not in second and "data: reusing" in second


def test_gpu_slots_spread_runs_over_gpus(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    assert runner_module.gpu_slots(0, 1, 2) == [[], []]  # CPU: nothing set
    assert runner_module.gpu_slots(1, 1, 2) == [[0], [0]]  # two runs share the one GPU
    assert runner_module.gpu_slots(2, 1, 2) == [[0], [1]]
    assert runner_module.gpu_slots(8, 4, 3) == [[0, 1, 2, 3], [4, 5, 6, 7], [0, 1, 2, 3]]
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "3")
    assert runner_module.gpu_slots(8, 1, 2) == [[], []]  # the user's choice stands
