#!/usr/bin/env python
"""How long the training process spends receiving one batch from a DataLoader worker, per sharing strategy.

The reader's workers are ahead (the process sleeps between batches, as a step would run), so `next()` measures only
the hand-over: unpickling the batch and opening its tensors' shared memory. `file_system` is what the reader's
workers use (`trainer/data/reader.py: _worker_init`); `file_descriptor` is torch's default, where every storage is
fetched through a socket round trip that the worker's sharer thread answers. Both arms run in one invocation on the
same dataset (the lemur-text shards of `benchmarks/data_loader.py`).

    python benchmarks/worker_handover.py                       # batch 2048, 1 worker, 20 batches an arm
    python benchmarks/worker_handover.py --workers 4 --batches 40
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from benchmarks import data_loader  # noqa: E402
from trainer.data import reader  # noqa: E402

STRATEGIES = ("file_system", "file_descriptor")


def lemur_text_config(args: argparse.Namespace) -> Any:
    """The lemur-text stream's config of `benchmarks/data_loader.py` (its dataset made once and cached)."""
    mode = data_loader.MODES["lemur-text"]
    bench = data_loader.parse_args(["--batch-size", str(args.batch_size), "--data-dir", str(args.data_dir)])
    path = data_loader.ensure_dataset(args.data_dir, mode.dataset, bench.samples, False)
    return data_loader.mode_config(mode, path, args.workers, bench)


def handover_ms(strategy: str, cfg: Any, args: argparse.Namespace) -> dict[str, Any]:
    """Wall and CPU ms of the training process's `next()` a batch, the workers' strategy set to `strategy`."""
    original = reader._worker_init

    def worker_init(worker_id: int) -> None:
        original(worker_id)
        torch.multiprocessing.set_sharing_strategy(strategy)

    reader._worker_init = worker_init
    try:
        batches = iter(data_loader.train_stream(cfg))
        for _ in range(2 * args.workers):
            next(batches)
        wall, cpu = [], []
        for _ in range(args.batches):
            time.sleep(args.pause)
            w, c = time.perf_counter(), time.process_time()
            next(batches)
            wall.append((time.perf_counter() - w) * 1e3)
            cpu.append((time.process_time() - c) * 1e3)
        batches.close()
    finally:
        reader._worker_init = original
    return {
        "strategy": strategy,
        "wall_ms_median": statistics.median(wall),
        "wall_ms_mean": statistics.mean(wall),
        "cpu_ms_median": statistics.median(cpu),
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--workers", type=int, default=1)
    p.add_argument("--batch-size", type=int, default=2048)
    p.add_argument("--batches", type=int, default=20, help="batches timed per arm")
    p.add_argument("--pause", type=float, default=0.4, help="seconds between batches (the workers get ahead)")
    p.add_argument("--data-dir", type=Path, default=Path("/tmp/lemur-bench-data"))
    args = p.parse_args(argv)
    print(
        f"{data_loader.cpu_model()}, {data_loader.usable_cores()} cores; batch {args.batch_size}, "
        f"{args.workers} worker(s), {args.batches} batches an arm"
    )
    cfg = lemur_text_config(args)
    rows = [handover_ms(s, cfg, args) for s in STRATEGIES]
    for r in rows:
        print(
            f"{r['strategy']:>15}: next() {r['wall_ms_median']:.2f} ms median ({r['wall_ms_mean']:.2f} mean) wall, "
            f"{r['cpu_ms_median']:.2f} ms CPU"
        )
    print(
        f"file_descriptor / file_system, median wall: {rows[1]['wall_ms_median'] / rows[0]['wall_ms_median']:.2f}x"
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
