"""Preemption: SIGTERM / SIGUSR1 stop the run at a step every rank agrees on, with a checkpoint there, and exit 0;
`--resume auto` then finishes with the uninterrupted run's losses. After a resume, metrics.jsonl and TensorBoard
hold every step once."""

from __future__ import annotations

import json
import multiprocessing as mp
import os
import signal
from pathlib import Path

import pytest

from tests.conftest import small_config
from tests.test_train import FAST_MODEL, join_ranks, metrics, rank_environment
from trainer.distributed import StopSignals, free_port
from trainer.logger import MetricsLogger, drop_records_after

STEPS = 12
COMMON = [
    f"training.steps={STEPS}",
    "training.eval_every=0",
    "training.checkpoint_every=0",  # so the only checkpoint before the end is the stop's
    "logging.log_every=4",  # the ranks agree whether to stop every 4 steps
]


# ------------------------------------------------------------------------------------- no process group


def _reader_worker_gets_sigterm() -> None:
    from trainer.data.reader import _worker_init

    _worker_init(0)
    os.kill(os.getpid(), signal.SIGTERM)  # as torchrun's or Slurm's signal to the rank's process group
    os._exit(0)  # still alive: the rank can stop at an agreed step and save


def test_reader_workers_ignore_sigterm_so_the_rank_can_save() -> None:
    worker = mp.get_context("fork").Process(target=_reader_worker_gets_sigterm)
    worker.start()
    worker.join(30)
    assert worker.exitcode == 0, worker.exitcode


def test_stop_signals_only_note_the_signal_and_restore_the_handlers() -> None:
    previous = signal.getsignal(signal.SIGTERM)
    with StopSignals() as stop:
        os.kill(os.getpid(), signal.SIGTERM)
        os.kill(os.getpid(), signal.SIGTERM)  # a second one changes nothing
        assert stop.received == {signal.SIGTERM}
        assert stop.votes() == [1.0, 0.0]
        assert not stop.requested  # nothing happens before the ranks agree
        stop.agree([0.0, 0.0])
        assert not stop.requested
        stop.agree([1.0, 2.0])  # summed over 3 ranks: one had SIGTERM, two SIGUSR1
        assert stop.requested and stop.describe(3) == "SIGTERM (1 of 3 ranks), SIGUSR1 (2 of 3 ranks)"
        stop.agree([0.0, 0.0])  # a stop stays a stop
        assert stop.requested
    assert signal.getsignal(signal.SIGTERM) is previous


def test_resume_drops_the_records_after_the_checkpoint(tmp_path: Path) -> None:
    path = tmp_path / "metrics.jsonl"
    lines = [{"step": s, "kind": "train", "loss": 1.0} for s in (4, 8, 12)] + [{"step": 8, "kind": "eval"}]
    path.write_text("".join(json.dumps(r) + "\n" for r in lines) + '{"step": 16, "ki')  # cut short by a crash
    assert drop_records_after(path, 8) == 2  # step 12 and the torn line
    assert [(r["step"], r["kind"]) for r in map(json.loads, path.read_text().splitlines())] == [
        (4, "train"),
        (8, "train"),
        (8, "eval"),
    ]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["metrics.jsonl"]  # no temporary file left
    logger = MetricsLogger(tmp_path, enabled=True, tensorboard=False)
    assert logger.resume_at(8) == 0 and logger.purge_step == 9
    logger.log(9, "train", {"loss": 0.5})
    logger.close()
    assert [json.loads(line)["step"] for line in path.read_text().splitlines()] == [4, 8, 8, 9]


# ------------------------------------------------------------------------------------- 2 gloo processes


def _worker(
    rank: int,
    port: int,
    dataset: str,
    overrides: list[str],
    resume: str | None,
    signal_before_step: dict[int, int],
) -> None:
    """One rank of `train()`. `signal_before_step` {rank: step}: that rank sends itself SIGTERM as it starts that
    step (a real signal, at a known point), and then again in the middle of every checkpoint save."""
    rank_environment(rank, 2, port)
    from trainer import checkpoint
    from trainer.loop import Trainer
    from trainer.train import train

    if rank in signal_before_step:
        train_step, save_part = Trainer.train_step, checkpoint.ShardedState.save

        def signalled_step(self: Trainer, batch):  # type: ignore[no-untyped-def]
            if self.step + 1 == signal_before_step[rank]:
                os.kill(os.getpid(), signal.SIGTERM)
            return train_step(self, batch)

        def signalled_save(self: checkpoint.ShardedState, directory: Path) -> None:
            os.kill(os.getpid(), signal.SIGTERM)  # a second SIGTERM, mid-save
            save_part(self, directory)

        Trainer.train_step = signalled_step  # type: ignore[method-assign]
        checkpoint.ShardedState.save = signalled_save  # type: ignore[method-assign]

    results = train(small_config(dataset, *FAST_MODEL, *overrides), resume=resume)
    line = f"rank {rank} results: stopped={json.dumps(results.get('stopped'))}\n"
    os.write(1, line.encode())  # one write: the two ranks' lines do not interleave


def run(
    dataset: Path,
    overrides: list[str],
    resume: str | None = None,
    signal_before_step: dict[int, int] | None = None,
) -> None:
    ctx = mp.get_context("spawn")
    port = free_port()
    args = (port, str(dataset), overrides, resume, signal_before_step or {})
    procs = [ctx.Process(target=_worker, args=(r, *args)) for r in range(2)]
    for p in procs:
        p.start()
    join_ranks(procs, 300)


def train_losses(out: Path) -> dict[int, float]:
    return {step: r["loss"] for step, r in metrics(out, "train").items()}


def tensorboard_losses(out: Path) -> list[tuple[int, float]]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(out / "tensorboard"))  # purges as TensorBoard does
    events.Reload()
    return [(e.step, e.value) for e in events.Scalars("train/loss")]


def test_sigterm_stops_every_rank_at_one_step_and_resume_is_exact(
    small_dataset: Path, tmp_path: Path, capfd: pytest.CaptureFixture[str]
) -> None:
    reference = tmp_path / "reference"
    run(small_dataset, [*COMMON, f'logging.out_dir="{reference}"'])

    # Rank 1 alone gets SIGTERM as it starts step 6 (and more SIGTERMs mid-save); rank 0 never does. Both
    # learn of it in the all-reduce of log step 8, save there and exit 0 with the other steps not run.
    out = tmp_path / "stopped"
    overrides = [*COMMON, f'logging.out_dir="{out}"', "logging.tensorboard=true"]
    run(small_dataset, overrides, signal_before_step={1: 6})
    err = capfd.readouterr()
    assert f"stopped on SIGTERM (1 of 2 ranks) at step 8 of {STEPS}" in err.err, err.err[-3000:]
    stopped = '{"step": 8, "signals": {"SIGTERM": 1}}'
    assert f"rank 0 results: stopped={stopped}" in err.out and f"rank 1 results: stopped={stopped}" in err.out
    checkpoints = out / "checkpoints"
    assert (checkpoints / "latest").read_text().strip() == "step-00000008"
    assert sorted(p.name for p in checkpoints.iterdir()) == ["latest", "step-00000008"]  # no .partial
    assert sorted(train_losses(out)) == [4, 8]

    # What a run killed after its checkpoint leaves behind: records and TensorBoard events past step 8.
    with (out / "metrics.jsonl").open("a") as f:
        f.write(json.dumps({"step": 12, "kind": "train", "loss": 99.0}) + "\n" + '{"step": 16, "kind": "tr')
    from torch.utils.tensorboard import SummaryWriter

    with SummaryWriter(str(out / "tensorboard")) as writer:
        for step in (12, 16):
            writer.add_scalar("train/loss", 99.0, step)

    run(small_dataset, overrides, resume="auto")
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    steps = [r["step"] for r in records if r["kind"] == "train"]
    assert steps == list(range(4, STEPS + 1, 4))  # strictly increasing, each step once
    assert [r["step"] for r in records if r["kind"] == "eval"] == [STEPS]
    expected, got = train_losses(reference), train_losses(out)
    for step in steps:
        assert got[step] == pytest.approx(expected[step], rel=1e-5, abs=1e-6), f"step {step}"
    assert [s for s, _ in tensorboard_losses(out)] == steps
    assert [v for _, v in tensorboard_losses(out)] == pytest.approx([got[s] for s in steps], rel=1e-6)
