#!/usr/bin/env python
"""The training step at full size: time, MFU, GPU-busy share, kernels and host syncs per step, where the time goes.

    python benchmarks/step.py                                  # lemur shapes, batch 2048, every variant, 1 GPU
    python benchmarks/step.py --gpus 1 2                       # the same on 1 and 2 GPUs, side by side
    python benchmarks/step.py --variants lemur --no-reader     # one variant, reader excluded only
    python benchmarks/step.py --small --batch-size 64 --samples 2048   # a CPU smoke run in a few minutes
    python benchmarks/step.py --variants lemur --arm 'ref:optimizer.fused=false' \
        --arm 'autocast:training.bf16_mode="autocast";distributed.zero_stage=0'   # config arms side by side
    python benchmarks/step.py --preset em3 --variants em3_top1,em3_top1_cached --batch-size 512 \
        --long-history 500 --items 20000 --samples 8192    # EM3's frozen-feature cache against its absence

Variants (the lemur preset, text only, histories 1,000 / 50, bf16, ZeRO-2 on GPU):
  id_only    model.use_content = false, no bank
  content    content end to end, no bank (history tokens carry ID embeddings only)
  lemur      as shipped: memory bank, encoder sampling p = q = 0.2
  bank_p1    memory bank, p = q = 1 (every target encoded, with gradient)
With --preset em3 (text + image towers, Fusion-Q-Former):
  em3_top1          both towers frozen but their top block (trainable_top_layers = 1)
  em3_top1_cached   the same with EM3's frozen-feature cache (model.frozen_cache): the frozen bottoms run once
                    per item before the timed steps (reported as frozen_cache_build_s), a step runs the tops only

Each (variant, GPU count) runs the real `Trainer` (DMP + DeepSpeed) in its own process(es) (torchrun). Reader
excluded: --preload batches are read first and moved to the GPU, then --warmup steps, then --steps timed steps
(synchronised at both ends: step ms and samples/s), then --profile-steps under torch.profiler: kernel time per step
(GPU busy = kernel time / step time; overlapping kernels of several streams counted once), kernels per step, host
syncs per step (cudaStreamSynchronize / cudaDeviceSynchronize / cudaEventSynchronize calls, device-to-host copies,
`.item()` calls, `nonzero`), and per phase the GPU time of the kernels each phase launched (the step's
`record_function` labels: h2d, embed, content, dense_forward, loss, backward, optimizer, bank_write). FLOPs are
counted once with FlopCounterMode over a whole step (matmuls and attention): MFU on padded FLOPs counts every token
slot, MFU on real-token FLOPs scales the text and query towers' FLOPs by the share of real tokens (linear ops) and
of real token pairs (attention). Then the same steps under cProfile alone: the Python functions the host spends a
step in. Then, reader included: the same trainer reads from a fresh stream (--workers DataLoader workers
per rank, or each of --reader-workers) for --reader-warmup steps (at least one a worker)
and --reader-steps timed ones, with the step thread's wait for its batch timed apart. Give the dataset enough
samples that these steps stay inside the first epoch (the report says whether they did): a new epoch restarts
every worker, and a measurement across it times the workers' start, not the steady state.

Writes benchmarks/results/step-<date>-<hardware>.md/.json/.png (--out for another folder; --report-from JSON
rewrites the markdown and the chart from a saved JSON). The dataset is synthesised once under --data-dir.
"""

from __future__ import annotations

import argparse
import datetime
import gc
import itertools
import json
import math
import os
import platform
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks.data_loader import cpu_model  # noqa: E402
from benchmarks.memory_bank import SMALL_MODEL, timed_run  # noqa: E402  (shared with the bank benchmark)

VARIANTS: dict[str, list[str]] = {
    "id_only": ["model.use_content=false", "memory_bank.enabled=false"],
    "content": ["memory_bank.enabled=false"],
    "lemur": [],
    "bank_p1": ["memory_bank.forward_share=1.0", "memory_bank.backward_share=1.0"],
    "em3_top1": ["model.text_tower.trainable_top_layers=1", "model.vision_tower.trainable_top_layers=1"],
    "em3_top1_cached": [
        "model.text_tower.trainable_top_layers=1",
        "model.vision_tower.trainable_top_layers=1",
        "model.frozen_cache=true",
    ],
}
Arm = tuple[str, list[str]]
"""A labelled set of config overrides that every (variant, GPU count) also runs under (`--arm`)."""
PHASES = ["h2d", "embed", "content", "dense_forward", "loss", "backward", "optimizer", "bank_write"]
SYNC_CALLS = ("cudaStreamSynchronize", "cudaDeviceSynchronize", "cudaEventSynchronize")
PEAK_BF16 = 989e12  # H100/H200 dense bf16 (trainer/flops.py)


# ------------------------------------------------------------------------------------------------ data


def synth_overrides(args: argparse.Namespace) -> list[str]:
    return [
        f"data.synth.num_samples={args.samples}",
        f"data.synth.samples_per_shard={args.samples_per_shard}",
        f"data.synth.num_items={args.items}",
        f"data.synth.num_users={max(1000, args.samples // 5)}",
        f"data.synth.long_history={args.long_history}",
        "data.synth.eval_share=0.02",
    ]


def ensure_data(args: argparse.Namespace) -> Path:
    from trainer.config import load_config
    from trainer.dataset_tools.synth.generate import synthesize

    overrides = synth_overrides(args)
    name = "-".join(o.split("=")[1] for o in overrides[:5])
    out = Path(args.data_dir) / (f"step-{name}" if args.preset == "lemur" else f"step-{args.preset}-{name}")
    if not (out / "dataset.json").is_file():
        started = time.time()
        cfg = load_config(args.preset, overrides)
        synthesize(cfg.data.synth, out, vocab_size=cfg.data.vocab_size, force=True, progress=False)
        print(f"synthesised {out.name} in {time.time() - started:.0f}s", flush=True)
    return out


def reader_workers(data: Path, batch_size: int, gpus: int, wanted: int) -> int:
    """The most reader workers per rank, up to `wanted`, that each get a full batch from their shards whatever
    order an epoch deals the shards in (dataset.json's train counts): every reader (rank x worker) reads shards of
    its own, and the worst-off one gets the fewest and smallest."""
    sizes = sorted(s["samples"] for s in json.loads((data / "dataset.json").read_text())["shards"]["train"])
    for workers in range(wanted, 0, -1):
        fewest = len(sizes) // (gpus * workers)
        if fewest and sum(sizes[:fewest]) >= batch_size:
            return workers
    return 1


def run_overrides(args: argparse.Namespace, variant: str, data: Path, out_dir: str, gpus: int) -> list[str]:
    workers = reader_workers(data, args.batch_size, gpus, max(1, args.workers // gpus)) if args.reader else 0
    return [
        f'data.path="{data}"',
        f"data.batch_size={args.batch_size}",
        f"data.num_workers={workers}",
        "data.shuffle_buffer=1000",
        *timed_run(out_dir),
        *(SMALL_MODEL if args.small else []),
        *(['training.dtype="float32"', "distributed.zero_stage=0"] if args.cpu else []),
        *VARIANTS[variant],
        *args.overrides,
    ]


# ------------------------------------------------------------------------------------------------ one run


def child(args: argparse.Namespace) -> None:
    """One variant on this process's rank: build the trainer, measure, write JSON (rank 0)."""

    from trainer.config import load_config
    from trainer.distributed import init_distributed
    from trainer.flops import eager
    from trainer.loop import Trainer
    from trainer.train import setup_logging

    info = init_distributed("gloo" if args.cpu else "auto")
    setup_logging(info.rank)
    device = info.device
    with tempfile.TemporaryDirectory() as out_dir:
        cfg = load_config(
            args.preset, run_overrides(args, args.variant, Path(args.data), out_dir, args.world)
        )
        trainer = Trainer(cfg, info)
        began = time.perf_counter()
        trainer.build_frozen_cache()  # nothing unless model.frozen_cache
        cache_seconds = time.perf_counter() - began
        # Preloaded from a worker-less reader: the trainer's own stream (its workers prefetching on every core)
        # starts only for the reader-included run, so it cannot slow the reader-excluded steps.
        workers, cfg.data.num_workers = cfg.data.num_workers, 0
        preload = iter(trainer.batches("train"))
        cfg.data.num_workers = workers
        batches = [trainer.to_device(next(preload)) for _ in range(args.preload)]

        def steps(n: int, source: Any = None) -> float:
            sync(device)
            began = time.perf_counter()
            for i in range(n):
                batch = next(source) if source is not None else batches[(trainer.step + i) % len(batches)]
                trainer.train_step(batch)
                trainer.step += 1
            sync(device)
            return time.perf_counter() - began

        first_loss = float(trainer.train_step(batches[0]))  # same seed and batch in every run: comparable
        trainer.step += 1
        steps(max(0, args.warmup - 1))
        # The loop's garbage-collection schedule (training.gc_every) from here, as `fit` runs it, after a collection
        # of what the compiling steps left, which the first scheduled collection would otherwise walk in a timed step.
        gc.collect()
        collector = trainer.collector.__enter__()
        memory_reset(device)
        with GcTimer() as collections:
            seconds = steps(args.steps)
        result: dict[str, Any] = {
            "variant": args.variant,
            "gpus": info.world_size,
            "batch_size": cfg.data.batch_size,
            "step_ms": seconds / args.steps * 1e3,
            "samples_per_s": args.steps * cfg.data.batch_size * info.world_size / seconds,
            "peak_gib": peak_memory(device),
            "first_loss": first_loss,
            "frozen_cache_build_s": cache_seconds if cfg.model.frozen_cache else None,
        }
        result["samples_per_s_per_gpu"] = result["samples_per_s"] / info.world_size
        result["gc_ms_per_step"] = collections.seconds / args.steps * 1e3
        result["gc_collections"] = collections.counts
        result.update(profile_steps(trainer, batches, device, args.profile_steps))
        result["host_functions"] = host_functions(trainer, batches, device, args.profile_steps)
        result["busy"] = result["kernel_ms"] / result["step_ms"] if device.type == "cuda" else None
        with eager():  # dispatch modes see ops only outside compiled regions: count on an eager step
            result["sync_sources"] = sync_sources(trainer, batches[0])
            result.update(count_flops(trainer, batches[0]))
        for kind in ("padded", "real"):
            flops = result[f"flops_{kind}"]
            result[f"mfu_{kind}"] = (
                flops / (result["step_ms"] / 1e3) / PEAK_BF16 if device.type == "cuda" else None
            )
        if args.reader:
            runs = reader_runs(trainer, args, workers)
            result["reader_runs"] = runs
            result["reader_samples_per_s"] = runs[0]["samples_per_s"] if runs else None  # all ranks
            result["reader_workers_per_rank"] = runs[0]["workers"] if runs else None
        collector.__exit__(None, None, None)
        trainer.close()
    if info.is_main:
        Path(args.result).write_text(json.dumps(result, indent=1))


def reader_runs(trainer: Any, args: argparse.Namespace, fitted: int) -> list[dict[str, Any]]:
    """The steps with the reader included, at each of the --reader-workers worker counts, each on a fresh stream
    (as a run starts): --reader-warmup steps, at least one per worker so that every worker's first batch is in,
    then --reader-steps timed ones. Per step: the wait in `next()` (the batch not ready, or its
    hand-over from the worker) apart from the rest; the cores the training process (step thread, pin-memory and
    prefetch threads) and the workers kept busy; and whether the steps stayed inside the first epoch (an epoch
    boundary restarts every worker)."""
    from trainer.data.prefetch import DevicePrefetcher

    device, world = trainer.info.device, trainer.info.world_size
    out = []
    for workers in args.reader_workers or [fitted]:
        trainer.cfg.data.num_workers = workers
        stream, inputs = trainer.train_inputs()
        per_epoch = stream.dataset.batches_per_epoch(0)
        warmup = max(args.reader_warmup, workers)
        if per_epoch == 0:
            print(f"reader x{workers}: no full batch per worker; skipped", flush=True)
            if isinstance(inputs, DevicePrefetcher):
                inputs.close()
            continue
        source = iter(inputs)
        for _ in range(warmup):
            trainer.train_step(next(source))
            trainer.step += 1
        sync(device)
        gc.collect(1)  # the benchmark's own garbage (its profilers'), not the loop's
        cpu, workers_cpu, threads_cpu, waited, kept = time.process_time(), WorkersCpu(), ThreadsCpu(), 0.0, []
        with GcTimer() as collections:
            began = time.perf_counter()
            for _ in range(args.reader_steps):
                asked = time.perf_counter()
                batch = next(source)
                waited += time.perf_counter() - asked
                trainer.train_step(batch)
                trainer.step += 1
                kept.append(batch)
            sync(device)
            seconds = time.perf_counter() - began
        cpu, workers_seconds, threads = (
            time.process_time() - cpu,
            workers_cpu.seconds(),
            threads_cpu.seconds(),
        )
        run = {
            "workers": workers,
            "samples_per_s": args.reader_steps * trainer.cfg.data.batch_size * world / seconds,  # all ranks
            "step_ms": seconds / args.reader_steps * 1e3,
            "next_wait_ms": waited / args.reader_steps * 1e3,
            "main_cores": cpu / seconds,
            "worker_cores": workers_seconds / seconds if workers_seconds is not None else None,
            "thread_cpu_ms_per_step": {k: v / args.reader_steps * 1e3 for k, v in (threads or {}).items()},
            "gc_ms_per_step": collections.seconds / args.reader_steps * 1e3,
            "gc_collections": collections.counts,
            "batches_first_epoch": per_epoch,
            "within_first_epoch": warmup + args.reader_steps <= per_epoch,
        }
        if isinstance(inputs, DevicePrefetcher):
            inputs.close()  # drops the stream's iterator: its workers end
        del source, inputs, stream
        # The same batches again, already on the device, with no reader running: what the reader itself costs.
        sync(device)
        began = time.perf_counter()
        for batch in kept:
            trainer.train_step(batch)
            trainer.step += 1
        sync(device)
        run["replayed_step_ms"] = (time.perf_counter() - began) / len(kept) * 1e3
        del kept
        print(f"reader x{workers}: {json.dumps(run)}", flush=True)
        out.append(run)
    return out


class GcTimer:
    """Python's garbage collections (automatic or called) while inside: time and count by generation."""

    def __init__(self) -> None:
        self.seconds = 0.0
        self.counts = [0, 0, 0]
        self._began = 0.0

    def __enter__(self) -> GcTimer:
        gc.callbacks.append(self._callback)
        return self

    def __exit__(self, *exc: object) -> None:
        gc.callbacks.remove(self._callback)

    def _callback(self, phase: str, info: dict[str, int]) -> None:
        if phase == "start":
            self._began = time.perf_counter()
        else:
            self.seconds += time.perf_counter() - self._began
            self.counts[info["generation"]] += 1


class WorkersCpu:
    """CPU seconds (user + system) that the child processes alive at its creation (the reader's workers) spend
    from then on; None without psutil."""

    def __init__(self) -> None:
        try:
            import psutil
        except ImportError:
            self.start: dict[Any, float] | None = None
            return
        self.start = {}
        for child in psutil.Process().children(recursive=True):
            spent = cpu_seconds(child)
            if spent is not None:
                self.start[child] = spent

    def seconds(self) -> float | None:
        if self.start is None:
            return None
        total = 0.0
        for child, began in self.start.items():
            spent = cpu_seconds(child)
            total += spent - began if spent is not None else 0.0  # one that ended: its last seconds are lost
        return total


class ThreadsCpu:
    """CPU seconds each thread of this process spends from this object's creation on, by what the thread does: the
    step's thread, the DataLoader's pinning thread, the prefetcher's to_device thread; threads Python did not start
    (torch's intra-op pool, which runs large host copies, the CUDA driver's, NCCL's) are "other". psutil counts in
    ticks of 10 ms. None without psutil."""

    def __init__(self) -> None:
        self.start = self.now()

    @staticmethod
    def now() -> dict[int, float] | None:
        try:
            import psutil
        except ImportError:
            return None
        return {t.id: t.user_time + t.system_time for t in psutil.Process().threads()}

    def seconds(self) -> dict[str, float] | None:
        now = self.now()
        if now is None or self.start is None:
            return None
        labels = {t.native_id: thread_label(t) for t in threading.enumerate()}
        spent: Counter = Counter()
        for tid, seconds in now.items():
            spent[labels.get(tid, "other")] += seconds - self.start.get(tid, 0.0)
        return dict(spent)


def thread_label(thread: threading.Thread) -> str:
    if thread is threading.main_thread():
        return "step"
    if "pin_memory" in thread.name:
        return "pin_memory"
    if thread.name.startswith("to_device"):
        return "to_device"
    return thread.name


def cpu_seconds(process: Any) -> float | None:
    import psutil

    try:
        times = process.cpu_times()
    except psutil.Error:
        return None
    return times.user + times.system


def sync(device: Any) -> None:
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize(device)


def memory_reset(device: Any) -> None:
    import torch

    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)


def peak_memory(device: Any) -> float | None:
    import torch

    return torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None


def profile_steps(trainer: Any, batches: list[Any], device: Any, n: int) -> dict[str, Any]:
    """Kernels, syncs (and the op that made each: `sync_callers`) and per-phase GPU time per step from
    torch.profiler over `n` steps."""
    import collections

    import torch
    from torch.autograd import DeviceType
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    sync(device)
    with profile(activities=activities, with_stack=True, record_shapes=True) as prof:
        for i in range(n):
            trainer.train_step(batches[(trainer.step + i) % len(batches)])
            trainer.step += 1
        sync(device)  # one sync of our own, taken off below
    events = prof.events()
    on_gpu = [
        e for e in events if e.device_type == DeviceType.CUDA and not getattr(e, "is_user_annotation", False)
    ]
    kernels = [e for e in on_gpu if not e.name.startswith(("Memcpy", "Memset"))]
    cpu = [e for e in events if e.device_type == DeviceType.CPU]
    count = lambda names: sum(1 for e in cpu if e.name in names)  # noqa: E731
    phases = {p: 0.0 for p in PHASES}
    host = {p: 0.0 for p in PHASES}
    for e in cpu:
        if e.name in phases and getattr(e, "is_user_annotation", True):
            host[e.name] += (e.time_range.end - e.time_range.start) / 1e3
        if e.name in phases and e.name != "backward" and getattr(e, "is_user_annotation", True):
            phases[e.name] += device_time(e) / 1e3
        elif e.name.startswith("autograd::engine::evaluate_function"):  # backward runs on autograd's threads
            phases["backward"] += device_time(e) / 1e3
    callers: collections.Counter = collections.Counter()
    python = [e for e in cpu if ".py(" in e.name]
    for e in cpu:
        if e.name in SYNC_CALLS:
            callers[sync_caller(e, python)] += 1
    return {
        "sync_callers": {k: v / n for k, v in callers.most_common() if v},
        "kernel_ms": union_ms([(e.time_range.start, e.time_range.end) for e in on_gpu]) / n,
        "kernels_per_step": len(kernels) / n,
        "stream_syncs_per_step": (count(SYNC_CALLS) - (1 if device.type == "cuda" else 0)) / n,
        "dtoh_copies_per_step": sum(1 for e in on_gpu if "DtoH" in e.name) / n,
        "item_calls_per_step": count({"aten::_local_scalar_dense"}) / n,
        "nonzero_per_step": count({"aten::nonzero"}) / n,
        "phase_gpu_ms": {p: v / n for p, v in phases.items()},
        "phase_host_ms": {p: v / n for p, v in host.items()},
        "top_host_ops": top_host_ops(prof, n),
        "top_kernels": top_kernels(kernels, n),
        "top_device_ops": top_device_ops(cpu, n),
        "cpu_ops_per_step": sum(1 for e in cpu if e.name.startswith("aten::")) / n,
        "torch_version": torch.__version__,
        "dynamo": dynamo_counters(),
    }


def host_functions(
    trainer: Any, batches: list[Any], device: Any, n: int, k: int = 40
) -> list[tuple[str, float, float]]:
    """The Python functions the host spends a step in (cProfile over `n` steps, no torch profiler: ms a step
    including callees, ms a step of their own), the k with the most time including callees below the step itself:
    which library's Python a host-bound step waits on; then those of the k/2 with the most time of their own
    not already listed."""
    import cProfile
    import pstats

    sync(device)
    profiler = cProfile.Profile()
    profiler.enable()
    for i in range(n):
        trainer.train_step(batches[(trainer.step + i) % len(batches)])
        trainer.step += 1
    profiler.disable()
    sync(device)
    rows = []
    for (file, line, name), (_, _, own, cumulative, _) in pstats.Stats(profiler).stats.items():  # type: ignore[attr-defined]
        where = file.split("site-packages/")[-1].split(f"{ROOT}/")[-1]
        rows.append((f"{where}:{line}({name})", cumulative * 1e3 / n, own * 1e3 / n))
    by_own = sorted(rows, key=lambda r: r[2], reverse=True)[: k // 2]
    top = sorted(rows, key=lambda r: r[1], reverse=True)[:k]
    return top + [r for r in by_own if r not in top]


def top_device_ops(cpu: list[Any], n: int, k: int = 15) -> list[tuple[str, str, str, float, float]]:
    """The ops whose own kernels take the most GPU time (µs a step, calls a step), by op and input shapes, with our
    innermost Python line around them (the profiler's Python frames are events of their own, enclosing the op in
    time on its thread; autograd's thread has none: "backward"): which line of the step a kernel comes from."""
    total: dict[tuple[str, str], list[Any]] = {}
    for e in cpu:
        own = float(getattr(e, "self_device_time_total", 0.0))
        if own > 0 and not getattr(e, "is_user_annotation", False) and not e.name.startswith("cuda"):
            shapes = ", ".join(str(list(s)) for s in (e.input_shapes or [])[:3] if s)
            entry = total.setdefault((e.name[:80], shapes), [0.0, []])
            entry[0] += own
            entry[1].append(e)
    ours = [
        e
        for e in cpu
        if ".py(" in e.name and e.name.split(f"{ROOT}/")[-1].startswith(("trainer/", "embeddings/"))
    ]
    rows = sorted(total.items(), key=lambda kv: kv[1][0], reverse=True)[:k]
    out = []
    for (name, shapes), (us, events) in rows:
        e = events[0]
        around = [
            p
            for p in ours
            if p.thread == e.thread
            and p.time_range.start <= e.time_range.start
            and p.time_range.end >= e.time_range.end
        ]
        where = max(around, key=lambda p: p.time_range.start).name if around else "backward"
        out.append((name, shapes, where.split(str(ROOT) + "/")[-1], us / n, len(events) / n))
    return out


def top_host_ops(prof: Any, n: int, k: int = 12) -> list[tuple[str, float, float]]:
    """The ops with the most host time of their own (µs a step) and their calls a step: where the host's share of
    a launch-bound step goes."""
    rows = [e for e in prof.key_averages() if e.self_cpu_time_total > 0]
    rows.sort(key=lambda e: e.self_cpu_time_total, reverse=True)
    return [(e.key, e.self_cpu_time_total / n, e.count / n) for e in rows[:k]]


def dynamo_counters() -> dict[str, Any]:
    """torch.compile's own counts so far (frames compiled, graph breaks, recompiles, fallbacks): whether the
    compiled blocks really run compiled."""
    from torch._dynamo.utils import counters

    return {
        group: dict(values)
        for group, values in counters.items()
        if values and group not in ("inductor", "aten_mm_info")
    }


def top_kernels(kernels: list[Any], n: int, k: int = 15) -> list[tuple[str, float, float]]:
    """The kernels with the most GPU time (µs a step, launches a step), by name: where a step's kernel time goes."""
    total: dict[str, list[float]] = {}
    for e in kernels:
        entry = total.setdefault(e.name, [0.0, 0.0])
        entry[0] += device_time(e)
        entry[1] += 1
    rows = sorted(total.items(), key=lambda kv: kv[1][0], reverse=True)[:k]
    return [(name[:120], us / n, calls / n) for name, (us, calls) in rows]


def sync_caller(event: Any, python: list[Any]) -> str:
    """The op (if any) and the innermost Python lines outside torch that made a stream sync (the Python frames
    around it in time on its thread: the profiler does not parent ops to them); on autograd's thread (no Python
    there) the backward function instead, or the outermost op."""
    op, lines, outer = None, [], None
    parent = event.cpu_parent
    while parent is not None:
        if op is None and parent.name.startswith("aten::"):
            op = parent.name
        elif parent.name.startswith("autograd::engine::evaluate_function") and not lines:
            lines.append(parent.name.split(": ", 1)[-1])
        outer = parent.name
        parent = parent.cpu_parent
    start, end = event.time_range.start, event.time_range.end
    around = [
        p
        for p in python
        if p.thread == event.thread
        and p.time_range.start <= start
        and p.time_range.end >= end
        and "torch/" not in p.name.split("site-packages/")[-1][:6]
        and "<built-in" not in p.name
    ]
    around.sort(key=lambda p: p.time_range.start, reverse=True)
    lines += [p.name.split("site-packages/")[-1].split(str(ROOT) + "/")[-1] for p in around[:3]]
    if op is not None and not lines and outer is not None and outer != op:
        lines.append(outer)
    return " <- ".join([op or "no op"] + lines) if op or lines else "the profile's closing sync"


def device_time(event: Any) -> float:
    """GPU µs of the kernels an op (and everything under it) launched."""
    for attr in ("device_time_total", "cuda_time_total"):
        if hasattr(event, attr):
            return float(getattr(event, attr))
    return 0.0


def union_ms(intervals: list[tuple[float, float]]) -> float:
    """Length of the union of [start, end) intervals in µs, as ms (kernels of several streams overlap)."""
    total, end = 0.0, -math.inf
    for a, b in sorted(intervals):
        if b <= end:
            continue
        total += b - max(a, end)
        end = b
    return total / 1e3


SYNCING_OPS = (
    "aten._local_scalar_dense",
    "aten.nonzero",
    "aten.masked_select",
    "aten._unique2",
    "aten.unique_dim",
)


def sync_sources(trainer: Any, batch: Any) -> list[list[Any]]:
    """Where one step reads device values on the host: ops that must wait for the device (`.item()`, `nonzero`,
    boolean-mask indexing, `unique`, copies to the host), counted by the calling lines (ours first, then the
    library's). Read from a dispatch mode, so it works on CPU runs too."""
    import collections
    import traceback
    import warnings

    import torch
    from torch.utils._python_dispatch import TorchDispatchMode

    counts: collections.Counter = collections.Counter()

    on_gpu = trainer.info.device.type == "cuda"

    def syncs(func: Any, args: tuple, kwargs: dict) -> bool:
        name = str(func)
        host_tensor = isinstance(args[0], torch.Tensor) and args[0].device.type == "cpu" if args else False
        if on_gpu and host_tensor:  # e.g. fbgemm's CPU iteration counter: its .item() waits for nothing
            return False
        if name.startswith(SYNCING_OPS) or (
            name.startswith("aten.repeat_interleave") and "output_size" not in kwargs
        ):
            return True
        if name.startswith("aten.index.Tensor") and len(args) > 1:
            return any(getattr(i, "dtype", None) == torch.bool for i in args[1] if i is not None)
        if name.startswith("aten._to_copy") and isinstance(args[0], torch.Tensor):
            target = kwargs.get("device")
            return args[0].device.type == "cuda" and target is not None and torch.device(target).type == "cpu"
        return False

    class Spy(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # type: ignore[no-untyped-def]
            kwargs = kwargs or {}
            if syncs(func, args, kwargs):
                frames = traceback.extract_stack()[:-2]
                counts[(str(func).split(".")[1], " <- ".join(where_from(frames)))] += 1
            return func(*args, **kwargs)

    def cuda_sync(message: Any, *args: Any, **kwargs: Any) -> None:
        """torch's own sync debug mode flags what the spy cannot see: copies from pageable host memory."""
        if "synchroniz" in str(message):
            frames = traceback.extract_stack()[:-1]
            counts[("cuda sync", " <- ".join(where_from(frames)))] += 1

    def device_sync(*args: Any, **kwargs: Any) -> None:
        """A device-wide sync (torch.cuda.synchronize: DeepSpeed's timers used one) is no op the spy sees."""
        counts[("device sync", " <- ".join(where_from(traceback.extract_stack()[:-1])))] += 1
        synchronize(*args, **kwargs)

    shown, synchronize = warnings.showwarning, torch.cuda.synchronize
    torch.cuda.synchronize = device_sync
    with Spy(), warnings.catch_warnings():
        warnings.simplefilter("always")
        warnings.showwarning = cuda_sync
        if on_gpu:
            torch.cuda.set_sync_debug_mode("warn")
        try:
            trainer.train_step(batch)
        finally:
            if on_gpu:
                torch.cuda.set_sync_debug_mode("default")
            warnings.showwarning, torch.cuda.synchronize = shown, synchronize
        trainer.step += 1
    return [[op, where, n] for (op, where), n in counts.most_common()]


def where_from(frames: list[Any]) -> list[str]:
    """Our innermost calling line, then the library's below it (if deeper)."""
    mine = [f for f in frames if f"{ROOT}/trainer" in f.filename or f"{ROOT}/embeddings" in f.filename]
    lib = [f for f in frames if any(k in f.filename for k in ("torchrec/", "deepspeed/", "fbgemm"))]
    deepest_lib = lib[-1:] if lib and (not mine or frames.index(lib[-1]) > frames.index(mine[-1])) else []
    where = [f"{Path(f.filename).name}:{f.lineno}" for f in mine[-1:]]
    return where + [f"{f.filename.split('site-packages/')[-1]}:{f.lineno}" for f in deepest_lib]


def count_flops(trainer: Any, batch: Any) -> dict[str, Any]:
    """FLOPs of one training step, padded and on real tokens (see the module docstring). The step's total comes
    from one counted step; the towers' share from a counted forward alone (FlopCounterMode files forward ops under
    the module that ran them; backward ops it does not file reliably), taken 3 times (backward = 2x forward for
    matmuls; a rough rule for attention and for rows encoded without gradient)."""
    from torch.utils.flop_counter import FlopCounterMode

    counter = FlopCounterMode(display=False)
    with counter:
        trainer.train_step(batch)
        trainer.step += 1
    total = float(counter.get_total_flops())
    forward = FlopCounterMode(display=False)
    with forward:
        trainer.forward(batch)
    per_module = forward.get_flop_counts()
    # A module can be listed under several aliases (the DMP path, the DeepSpeed engine's): the largest counts, once.
    towers: dict[str, dict[str, float]] = {}
    for module, ops in per_module.items():
        for tower in ("content", "query"):
            alias = module.endswith((f"dense.{tower}", f"module.{tower}"))
            if alias and sum(ops.values()) > sum(towers.get(tower, {}).values()):
                towers[tower] = {str(op): float(f) for op, f in ops.items()}
    text_linear, text_pairs = token_shares(list(batch.text.values()))
    query_linear, query_pairs = token_shares([batch.query] if batch.query is not None else [])
    real = total
    for tower, ops in towers.items():
        linear, pairs = (text_linear, text_pairs) if tower == "content" else (query_linear, query_pairs)
        for op, flops in ops.items():
            quadratic = "attention" in op or "bmm" in op  # sdpa on GPU; eager attention is bmm
            real -= 3 * flops * (1.0 - (pairs if quadratic else linear))
    return {
        "flops_padded": total,
        "flops_real": real,
        "text_token_share": text_linear,
        "query_token_share": query_linear,
        "text_width": sum(t.input_ids.shape[1] for t in batch.text.values()),
        "tower_forward_flops": {t: sum(ops.values()) for t, ops in towers.items()},
    }


def token_shares(fields: list[Any]) -> tuple[float, float]:
    """(real tokens / token slots, real token pairs / pair slots) of the fields joined into one sequence."""
    if not fields:
        return 1.0, 1.0
    lengths = sum(f.attention_mask.sum(1).double() for f in fields)
    slots = sum(f.attention_mask.shape[1] for f in fields)
    rows = lengths.numel()
    return float(lengths.sum() / (rows * slots)), float((lengths**2).sum() / (rows * slots**2))


# ------------------------------------------------------------------------------------------------ report


def hardware_name(cpu: bool) -> str:
    if not cpu:
        import torch

        if torch.cuda.is_available():
            name = torch.cuda.get_device_name(0).replace("NVIDIA ", "").split()[0].lower()
            return f"{name}-x{torch.cuda.device_count()}"
    return f"cpu-{os.cpu_count()}core"


def fmt(value: Any, spec: str) -> str:
    return "-" if value is None else format(value, spec)


def per_run(
    report: dict[str, Any],
    title: str,
    entries: Callable[[dict[str, Any]], list[str]],
    sep: str = "; ",
    empty: str = "-",
) -> list[str]:
    """A titled list of one line per run: its entries joined, or `empty`."""
    return ["", title, ""] + [
        f"- {r['variant']} x{r['gpus']}: {sep.join(entries(r)) or empty}" for r in report["runs"]
    ]


def reader_table(report: dict[str, Any]) -> list[str]:
    """The reader-included runs by workers (`reader_runs`)."""
    runs = [(r, x) for r in report["runs"] for x in r.get("reader_runs", [])]
    if not runs:
        return []
    lines = [
        "",
        "Reader included (workers per rank, samples/s over all ranks; a fresh stream each; warm-up of at least one step per worker; next() wait: the "
        "step thread waiting for its batch; cores: CPU seconds per second of the training process, all its "
        "threads, and of the workers; gc: Python's garbage collections during the timed steps; replayed: the same "
        "batches stepped again from the device after the reader closed):",
        "",
        "| variant | GPUs | workers | samples/s | step ms | next() wait ms | training process cores "
        "| worker cores | gc ms/step (collections by generation) | same batches replayed, step ms "
        "| first epoch batches | inside it |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---|---:|---:|---|",
    ]
    for r, x in runs:
        lines.append(
            f"| {r['variant']} | {r['gpus']} | {x['workers']} | {x['samples_per_s']:,.0f} | "
            f"{x['step_ms']:.1f} | {x['next_wait_ms']:.1f} | {x['main_cores']:.2f} | "
            f"{fmt(x.get('worker_cores'), '.2f')} | {fmt(x.get('gc_ms_per_step'), '.2f')} "
            f"({'/'.join(map(str, x.get('gc_collections', [])))}) | {fmt(x.get('replayed_step_ms'), '.1f')} | "
            f"{x['batches_first_epoch']} | "
            f"{'yes' if x['within_first_epoch'] else 'no: workers restarted'} |"
        )
    threads = [(r, x) for r, x in runs if x.get("thread_cpu_ms_per_step")]
    if threads:
        lines += ["", "CPU time per step of the training process's threads in those steps (ms):", ""]
        for r, x in threads:
            parts = sorted(x["thread_cpu_ms_per_step"].items(), key=lambda kv: -kv[1])
            shown = ", ".join(f"{k} {v:.1f}" for k, v in parts)
            lines.append(f"- {r['variant']} x{r['gpus']}, {x['workers']} workers: {shown}")
    return lines


def markdown(report: dict[str, Any]) -> str:
    lines = [
        f"# The training step, {report['date']}, {report['hardware']}",
        "",
        f"Command: `{report['command']}`",
        f"Commit: {report['commit']}; host {report['host']} ({report.get('cpu', '?')}: a step bound by the host "
        "runs at its speed); "
        f"torch {report.get('torch', '-')}.",
        f"Shapes: {report.get('preset', 'lemur')} preset{' (small towers)' if report['small'] else ''}, "
        f"batch {report['batch_size']} per GPU, "
        f"histories {report['long_history']} / 50, dataset {report['samples']:,} samples over {report['items']:,} "
        "items. Reader excluded: batches preloaded on the device. GPU busy = kernel time / step time.",
        "",
        "| variant | GPUs | step ms | samples/s | samples/s/GPU | MFU real | MFU padded | GPU busy | kernels/step "
        "| stream syncs/step | DtoH copies/step | .item()/step | nonzero/step | peak GiB | with reader samples/s |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in report["runs"]:
        lines.append(
            f"| {r['variant']} | {r['gpus']} | {r['step_ms']:.1f} | {r['samples_per_s']:,.0f} | "
            f"{r['samples_per_s_per_gpu']:,.0f} | {fmt(r.get('mfu_real'), '.1%')} | {fmt(r.get('mfu_padded'), '.1%')} | "
            f"{fmt(r.get('busy'), '.0%')} | {r['kernels_per_step']:,.0f} | {r['stream_syncs_per_step']:.0f} | "
            f"{r['dtoh_copies_per_step']:.0f} | {r['item_calls_per_step']:.0f} | {r['nonzero_per_step']:.0f} | "
            f"{fmt(r.get('peak_gib'), '.1f')} | {fmt(r.get('reader_samples_per_s'), ',.0f')} |"
        )
    lines += [
        "",
        "The first step's loss (same seed, same batch, before any update; equal up to the dtype's rounding where "
        "two runs compute the same function): "
        + ", ".join(
            f"{r['variant']} x{r['gpus']} {r['first_loss']:.6f}" for r in report["runs"] if "first_loss" in r
        )
        + ".",
    ]
    timed = [r for r in report["runs"] if "gc_ms_per_step" in r]
    if timed:
        lines.append(
            "Python's garbage collections in the timed steps (ms a step, collections by generation): "
            + ", ".join(
                f"{r['variant']} x{r['gpus']} {r['gc_ms_per_step']:.2f} "
                f"({'/'.join(map(str, r['gc_collections']))})"
                for r in timed
            )
            + "."
        )
    lines += reader_table(report)
    built = [r for r in report["runs"] if r.get("frozen_cache_build_s") is not None]
    if built:
        lines.append(
            "Frozen-feature cache built before the timed steps in "
            + ", ".join(f"{r['frozen_cache_build_s']:.1f} s ({r['variant']} x{r['gpus']})" for r in built)
            + "."
        )
    lines += ["", "GPU time per phase (ms per step, kernels each phase launched; idle = step - busy):", ""]
    lines.append("| variant | GPUs | " + " | ".join(PHASES) + " | idle |")
    lines.append("|---|---:|" + "---:|" * (len(PHASES) + 1))
    for r in report["runs"]:
        phases = r["phase_gpu_ms"]
        idle = max(0.0, r["step_ms"] - r["kernel_ms"])
        lines.append(
            f"| {r['variant']} | {r['gpus']} | "
            + " | ".join(f"{phases[p]:.1f}" for p in PHASES)
            + f" | {idle:.1f} |"
        )
    if any("phase_host_ms" in r for r in report["runs"]):
        lines += [
            "",
            "Host time per phase (ms per step, wall time of the Python that issues the phase; a step whose "
            "host total is near its step time is bound by the host):",
            "",
        ]
        lines.append("| variant | GPUs | " + " | ".join(PHASES) + " | host total | step |")
        lines.append("|---|---:|" + "---:|" * (len(PHASES) + 2))
        for r in report["runs"]:
            host = r.get("phase_host_ms")
            if host:
                lines.append(
                    f"| {r['variant']} | {r['gpus']} | "
                    + " | ".join(f"{host[p]:.1f}" for p in PHASES)
                    + f" | {sum(host.values()):.1f} | {r['step_ms']:.1f} |"
                )
        lines += per_run(
            report,
            "Ops with the most host time of their own (µs a step, calls a step):",
            lambda r: [f"{name} {us:,.0f} ({calls:g})" for name, us, calls in r.get("top_host_ops", [])[:8]],
            sep=", ",
        )
    if any(r.get("host_functions") for r in report["runs"]):
        lines += per_run(
            report,
            "Python functions with the most host time (cProfile, no torch profiler; ms a step with callees / own):",
            lambda r: [
                f"`{name}` {total:.2f} / {own:.2f}" for name, total, own in r.get("host_functions", [])
            ],
        )
    if any(r.get("top_kernels") for r in report["runs"]):
        lines += per_run(
            report,
            "Kernels with the most GPU time (µs a step, launches a step):",
            lambda r: [f"`{name}` {us:,.0f} ({calls:g})" for name, us, calls in r.get("top_kernels", [])],
        )
    if any(r.get("top_device_ops") for r in report["runs"]):
        lines += per_run(
            report,
            "Ops whose own kernels take the most GPU time (µs a step, calls a step; input shapes; line):",
            lambda r: [
                f"`{name}` {us:,.0f} ({calls:g}) {shapes} {where}"
                for name, shapes, where, us, calls in r.get("top_device_ops", [])
            ],
        )
    lines += per_run(
        report,
        "Where the host waits for the device (one step, ops that sync, by calling line):",
        lambda r: [f"{op} x{n} ({where or '?'})" for op, where, n in r.get("sync_sources", [])[:8]],
        sep=", ",
        empty="none",
    )
    lines += per_run(
        report,
        "Stream syncs per step in the profile, by the op and the Python lines that made them:",
        lambda r: [f"{op} {n:g}" for op, n in r.get("sync_callers", {}).items()],
        sep=", ",
        empty="none",
    )
    names = list(dict.fromkeys(r["variant"] for r in report["runs"]))
    scaling = [
        (v, two["samples_per_s"] / one["samples_per_s"])
        for v in names
        for one in report["runs"]
        for two in report["runs"]
        if one["variant"] == two["variant"] == v and one["gpus"] == 1 and two["gpus"] == 2
    ]
    if scaling:
        lines += ["", "2 GPUs vs 1 (same call): " + ", ".join(f"{v} {x:.2f}x" for v, x in scaling) + "."]
    return "\n".join(lines) + "\n"


def chart(report: dict[str, Any], path: Path) -> None:
    """A stacked bar per run: where a step's time goes (GPU ms per phase, then idle)."""
    from PIL import Image, ImageDraw

    colours = [
        "#8dd3c7",
        "#ffffb3",
        "#bebada",
        "#fb8072",
        "#80b1d3",
        "#fdb462",
        "#b3de69",
        "#fccde5",
        "#d9d9d9",
    ]
    runs = report["runs"]
    width, left, bar, gap = 1000, 170, 26, 14
    height = 60 + len(runs) * (bar + gap) + 60
    longest = max(r["step_ms"] for r in runs) or 1.0
    scale = (width - left - 30) / longest
    image = Image.new("RGB", (width, height), "white")
    draw = ImageDraw.Draw(image)
    draw.text(
        (10, 10), f"Where a step's time goes (ms), {report['hardware']}, {report['date']}", fill="black"
    )
    y = 40
    for r in runs:
        draw.text((10, y + 7), f"{r['variant']} x{r['gpus']}", fill="black")
        x = float(left)
        idle = max(0.0, r["step_ms"] - r["kernel_ms"])
        other = max(0.0, r["kernel_ms"] - sum(r["phase_gpu_ms"].values()))
        parts = [*(r["phase_gpu_ms"][p] for p in PHASES), other, idle]
        for value, colour in zip(parts, [*colours, "#ffffff"]):
            w = value * scale
            if w > 0:
                draw.rectangle([x, y, x + w, y + bar], fill=colour, outline="black")
            x += w
        draw.text((x + 4, y + 7), f"{r['step_ms']:.1f}", fill="black")
        y += bar + gap
    x = 10
    for name, colour in zip([*PHASES, "other", "idle"], [*colours, "#ffffff"]):
        draw.rectangle([x, y + 10, x + 12, y + 22], fill=colour, outline="black")
        draw.text((x + 16, y + 10), name, fill="black")
        x += 20 + 7 * len(name) + 12
    image.save(path)


def write_report(report: dict[str, Any], out: Path) -> Path:
    out.mkdir(parents=True, exist_ok=True)
    stem = out / f"step-{report['date']}-{report['hardware']}"
    Path(f"{stem}.json").write_text(json.dumps(report, indent=1))
    Path(f"{stem}.md").write_text(markdown(report))
    chart(report, Path(f"{stem}.png"))
    return Path(f"{stem}.md")


# ------------------------------------------------------------------------------------------------ parent


def launch(
    args: argparse.Namespace, variant: str, gpus: int, data: Path, result: Path, arm: Arm = ("", [])
) -> dict[str, Any] | None:
    label, overrides = arm
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={gpus}"]
    command += [__file__, "--child", "--variant", variant, "--world", str(gpus), "--data", str(data)]
    command += ["--result", str(result), *passthrough(args)]
    for item in overrides:
        command += ["--set", item]
    variant = f"{variant} [{label}]" if label else variant
    env = {**os.environ, "PYTHONPATH": f"{ROOT}:{os.environ.get('PYTHONPATH', '')}", "OMP_NUM_THREADS": "1"}
    started = time.time()
    done = subprocess.run(command, cwd=ROOT, env=env)
    if done.returncode != 0 or not result.is_file():
        print(f"{variant} x{gpus}: failed (exit {done.returncode})", flush=True)
        return None
    run = json.loads(result.read_text())
    run["variant"], run["arm"], run["arm_overrides"] = variant, label, overrides
    print(
        f"{variant} x{gpus}: {run['step_ms']:.1f} ms/step, {run['samples_per_s']:,.0f} samples/s "
        f"({time.time() - started:.0f}s)",
        flush=True,
    )
    return run


def passthrough(args: argparse.Namespace) -> list[str]:
    out = ["--batch-size", str(args.batch_size), "--preload", str(args.preload), "--warmup", str(args.warmup)]
    out += [
        "--steps",
        str(args.steps),
        "--profile-steps",
        str(args.profile_steps),
        "--workers",
        str(args.workers),
    ]
    out += ["--reader-steps", str(args.reader_steps), "--reader-warmup", str(args.reader_warmup)]
    out += ["--reader-workers", *map(str, args.reader_workers)] if args.reader_workers else []
    out += [flag for flag, on in (("--small", args.small), ("--cpu", args.cpu)) if on]
    out += ["--preset", args.preset]
    out += [] if args.reader else ["--no-reader"]
    for item in args.overrides:
        out += ["--set", item]
    return out


def parse_arm(text: str) -> Arm:
    label, _, overrides = text.partition(":")
    if not label or not overrides:
        raise SystemExit(f"--arm {text!r}: expected LABEL:A.B=C[;D.E=F...]")
    return label, [o.strip() for o in overrides.split(";") if o.strip()]


def commit() -> str:
    try:
        head = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True
        )
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "-uno"], cwd=ROOT, capture_output=True, text=True
        )
        return head.stdout.strip() + ("+dirty" if dirty.stdout.strip() else "") or "unknown"
    except OSError:
        return "unknown"


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--variants", default=",".join(VARIANTS), help=f"comma-separated of {list(VARIANTS)}")
    parser.add_argument("--gpus", type=int, nargs="+", default=[1], help="GPU counts, each a run per variant")
    parser.add_argument("--batch-size", type=int, default=2048, help="per GPU")
    parser.add_argument("--preload", type=int, default=4)
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--profile-steps", type=int, default=3)
    parser.add_argument(
        "--no-reader", dest="reader", action="store_false", help="skip the reader-included run"
    )
    parser.add_argument(
        "--workers", type=int, default=14, help="DataLoader workers in all (split over ranks)"
    )
    parser.add_argument("--reader-steps", type=int, default=20)
    parser.add_argument(
        "--reader-warmup", type=int, default=3, help="at least one step per worker whatever this says"
    )
    parser.add_argument(
        "--reader-workers",
        type=int,
        nargs="+",
        default=[],
        help="reader-included runs at each of these worker counts per rank (default: --workers, fitted to the data)",
    )
    parser.add_argument(
        "--samples",
        type=int,
        default=98304,
        help="in the dataset (the default keeps 14 workers' reader-included steps inside the first epoch)",
    )
    parser.add_argument("--samples-per-shard", type=int, default=1024)
    parser.add_argument("--items", type=int, default=100_000)
    parser.add_argument("--long-history", type=int, default=1000)
    parser.add_argument("--preset", default="lemur", help="the config preset the variants start from")
    parser.add_argument("--small", action="store_true", help="small towers (a smoke run)")
    parser.add_argument("--cpu", action="store_true", help="gloo on CPU, float32, ZeRO 0")
    parser.add_argument("--data-dir", default="/tmp/lemur-bench-data")
    parser.add_argument("--out", default=str(ROOT / "benchmarks" / "results"))
    parser.add_argument("--report-from", help="rewrite the markdown and chart from this JSON report")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="A.B=C")
    parser.add_argument(
        "--arm",
        dest="arms",
        action="append",
        default=[],
        metavar="LABEL:A.B=C;D.E=F",
        help="run every variant again under these overrides, labelled (repeatable; side by side in one report)",
    )
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--variant", help=argparse.SUPPRESS)
    parser.add_argument("--world", type=int, default=1, help=argparse.SUPPRESS)
    parser.add_argument("--data", help=argparse.SUPPRESS)
    parser.add_argument("--result", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child(args)
        return 0
    if args.report_from:
        print(write_report(json.loads(Path(args.report_from).read_text()), Path(args.out)))
        return 0
    variants = [v.strip() for v in args.variants.split(",") if v.strip()]
    unknown = [v for v in variants if v not in VARIANTS]
    if unknown:
        parser.error(f"unknown variants {unknown}; known: {list(VARIANTS)}")
    arms = [parse_arm(text) for text in args.arms] or [("", [])]
    data = ensure_data(args)
    report: dict[str, Any] = {
        "date": datetime.date.today().isoformat(),
        "hardware": hardware_name(args.cpu),
        "host": platform.node(),
        "cpu": cpu_model(),
        "commit": commit(),
        "command": "python benchmarks/step.py " + " ".join(sys.argv[1:]),
        "small": args.small,
        "preset": args.preset,
        "batch_size": args.batch_size,
        "long_history": args.long_history,
        "samples": args.samples,
        "items": args.items,
        "runs": [],
    }
    with tempfile.TemporaryDirectory() as tmp:
        for (i, arm), gpus, variant in itertools.product(enumerate(arms), args.gpus, variants):
            run = launch(args, variant, gpus, data, Path(tmp) / f"{variant}-{gpus}-{i}.json", arm)
            if run is not None:
                report["runs"].append(run)
                report["torch"] = run.get("torch_version")
    if not report["runs"]:
        return 1
    print(write_report(report, Path(args.out)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
