#!/usr/bin/env python
"""What receiving the DataLoader workers' batches costs the training process's step thread, per hand-over.

Arms, all in one invocation on the same dataset (the lemur-text shards of `benchmarks/data_loader.py`):
  memfd         as shipped: a worker writes the batch into one memfd, the training process reads it with preadv
                (`trainer/data/handover.py`)
  file_system   torch's sharing, one named shared-memory file per tensor (mapped, then unmapped when the batch is
                dropped), what the workers used before
  file_descriptor  torch's default sharing, every storage fetched through a socket round trip to the worker

Per arm, two measurements:
  hand-over  the workers are ahead (this thread sleeps --pause between batches, as a step would run): the wall and
             CPU time of `next()` (receiving the batch, and reading it where nothing pinned it), and of dropping
             the previous batch (unmapping what torch's sharing mapped)
  step thread  a thread takes a batch every --pace ms from the stream (pinned with --pin, as on a GPU, where the
             DataLoader's pinning thread receives them) and drops the one before, as the prefetcher does; this
             thread meanwhile runs a pure-Python loop, standing in for the host-bound step. Its rate against the
             same loop alone is the share of the step thread's time the hand-over takes (the GIL, and the cores)

    python benchmarks/worker_handover.py                         # batch 2048, 1 worker, the three arms
    python benchmarks/worker_handover.py --pin --workers 4       # on a GPU host: the DataLoader pins, as training
"""

from __future__ import annotations

import argparse
import statistics
import sys
import threading
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from benchmarks import data_loader  # noqa: E402
from trainer.data import handover, reader  # noqa: E402

ARMS = ("memfd", "file_system", "file_descriptor")


def lemur_text_config(args: argparse.Namespace) -> Any:
    """The lemur-text stream's config of `benchmarks/data_loader.py` (its dataset made once and cached)."""
    mode = data_loader.MODES["lemur-text"]
    bench = data_loader.parse_args(
        [
            "--batch-size",
            str(args.batch_size),
            "--data-dir",
            str(args.data_dir),
            "--samples",
            str(args.samples),
        ]
    )
    path = data_loader.ensure_dataset(args.data_dir, mode.dataset, bench.samples, False)
    return data_loader.mode_config(mode, path, args.workers, bench)


class Arm:
    """The workers started inside hand over batches as `name` says (the setting is read in the worker, after fork)."""

    def __init__(self, name: str) -> None:
        self.name = name

    def __enter__(self) -> Arm:
        self.saved = handover.AVAILABLE, reader._worker_init
        original = reader._worker_init
        handover.AVAILABLE = self.name == "memfd" and self.saved[0]

        def worker_init(worker_id: int) -> None:
            original(worker_id)
            if self.name != "memfd":
                torch.multiprocessing.set_sharing_strategy(self.name)

        reader._worker_init = worker_init
        return self

    def __exit__(self, *exc: Any) -> None:
        handover.AVAILABLE, reader._worker_init = self.saved


def handover_ms(cfg: Any, args: argparse.Namespace) -> dict[str, float]:
    """Wall and CPU ms of `next()` and of dropping a batch, the workers ahead."""
    batches = iter(data_loader.train_stream(cfg))
    for _ in range(2 * args.workers):
        next(batches)
    wall, cpu, drop = [], [], []
    batch = next(batches)
    for _ in range(args.batches):
        time.sleep(args.pause)
        w, c = time.perf_counter(), time.thread_time()
        new = next(batches)
        m = time.perf_counter()
        wall.append((m - w) * 1e3)
        cpu.append((time.thread_time() - c) * 1e3)
        del batch
        drop.append((time.perf_counter() - m) * 1e3)
        batch = new
    del batch
    batches.close()
    return {
        "next_wall_ms": statistics.median(wall),
        "next_cpu_ms": statistics.median(cpu),
        "drop_ms": statistics.median(drop),
    }


def spin(seconds: float) -> int:
    """Iterations of a pure-Python loop in `seconds`."""
    n, end = 0, time.perf_counter() + seconds
    while time.perf_counter() < end:
        for _ in range(1000):
            n += 1
    return n


def step_thread_share(cfg: Any, args: argparse.Namespace, alone: int) -> dict[str, float]:
    """The loop's rate while a thread takes a batch every --pace ms, against `alone`."""
    stop = threading.Event()
    taken: list[float] = []

    def take() -> None:
        batches = iter(data_loader.train_stream(cfg, pin_memory=args.pin))
        previous = None
        while not stop.is_set():
            batch = next(batches)
            del previous
            previous = batch
            taken.append(time.perf_counter())
            stop.wait(args.pace / 1e3)
        del previous
        batches.close()

    thread = threading.Thread(target=take)
    thread.start()
    while len(taken) < 2 * args.workers + 2:
        time.sleep(0.05)
    start = len(taken)
    rate = spin(args.seconds)
    batches = len(taken) - start
    stop.set()
    thread.join()
    share = 1 - rate / alone
    return {
        "loop_rate": rate / alone,
        "batches_per_s": batches / args.seconds,
        "step_thread_ms_per_batch": share * args.seconds * 1e3 / max(batches, 1),
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--arms", nargs="+", default=list(ARMS), choices=ARMS)
    p.add_argument("--workers", type=int, default=1)
    p.add_argument("--batch-size", type=int, default=2048)
    p.add_argument(
        "--batches", type=int, default=20, help="batches timed per arm in the hand-over measurement"
    )
    p.add_argument(
        "--pause", type=float, default=0.4, help="seconds between batches there (the workers get ahead)"
    )
    p.add_argument(
        "--pace", type=float, default=40.0, help="ms between batches in the step-thread measurement"
    )
    p.add_argument("--seconds", type=float, default=5.0, help="length of the step-thread measurement")
    p.add_argument("--pin", action="store_true", help="the DataLoader pins the batches (needs CUDA)")
    p.add_argument(
        "--samples", type=int, default=24_000, help="in the dataset (enough for every worker's batches)"
    )
    p.add_argument("--data-dir", type=Path, default=Path("/tmp/lemur-bench-data"))
    args = p.parse_args(argv)
    if args.pin and not torch.cuda.is_available():
        p.error("--pin needs CUDA")
    print(
        f"{data_loader.cpu_model()}, {data_loader.usable_cores()} cores; batch {args.batch_size}, "
        f"{args.workers} worker(s), {args.batches} batches an arm; step thread: a batch every {args.pace:g} ms, "
        f"{'pinned' if args.pin else 'not pinned'}"
    )
    cfg = lemur_text_config(args)
    alone = spin(args.seconds)
    for name in args.arms:
        with Arm(name):
            r = {**handover_ms(cfg, args), **step_thread_share(cfg, args, alone)}
        print(
            f"{name:>15}: next() {r['next_wall_ms']:.2f} ms wall, {r['next_cpu_ms']:.2f} ms CPU; drop "
            f"{r['drop_ms']:.2f} ms | step thread at {100 * r['loop_rate']:.1f}% of alone, "
            f"{r['batches_per_s']:.1f} batches/s, {r['step_thread_ms_per_batch']:.2f} ms of it a batch"
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
