"""Memory bank benchmark (issue 4): bank reads/writes against the GPU's copy bandwidth, and the trainer's samples/s
in bank mode against recompute mode at several history lengths.

    python benchmarks/memory_bank.py --part micro                                        # 1 GPU
    torchrun --standalone --nproc-per-node 2 benchmarks/memory_bank.py --part micro      # 2 GPUs, NCCL
    python benchmarks/memory_bank.py --part e2e                                          # 1 GPU, one child per cell
    python benchmarks/memory_bank.py --part all --small                                  # a quick check on a CPU

micro: the payload copy bandwidth (``dst.copy_(src)`` of a large bf16 tensor), then ``MemoryBank.read`` and
``write`` + ``flush`` of N random held ids, in vectors/s and payload GB/s (N x dim x 2 bytes over the time; a copy
counts its tensor's bytes once), the pieces of each (hashing, lookup, scatter, routing) and, with ``--profile``,
the kernels of one read and one write. e2e: the real ``Trainer`` on preloaded batches (the reader excluded), one
subprocess per (history length, mode). Writes ``memory_bank-DATE-HARDWARE.{md,json}`` under --out; sections of
later invocations with the same name (e.g. 1 GPU, then 2 GPUs) are merged into the same report.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks.train_throughput import hardware_name  # noqa: E402
from embeddings.memory_bank import MemoryBank, owner_of, row_of  # noqa: E402
from trainer.config import load_config  # noqa: E402
from trainer.distributed import DistInfo, init_distributed  # noqa: E402

GiB = 1 << 30
HISTORIES = (32, 128, 512, 1000)
MODES = ("bank", "recompute", "bank_p20")
"""bank_p20: the bank with LEMUR's deployed encoder sampling, p = q = 0.2 (forward_share = backward_share)."""
GOAL_COPY_SHARE = 0.5
GOAL_SPEEDUP_AT_128 = 20.0


# ------------------------------------------------------------------------------------------------- sizes


@dataclass
class MicroSizes:
    capacity: int
    """Bank rows over all ranks."""
    fill: int
    """Distinct ids written by the warm-up (those that survive collisions are the held set)."""
    requests: int
    """Ids per rank per read or write (distinct, drawn from the held set)."""
    dim: int
    copy_bytes: int
    warmup: int
    iters: int


def micro_sizes(args: argparse.Namespace) -> MicroSizes:
    if args.small:
        return MicroSizes(1 << 16, 1 << 13, 1 << 12, args.dim, 16 << 20, 2, 5)
    return MicroSizes(
        args.capacity,
        2 * args.requests,
        args.requests,
        args.dim,
        args.copy_gib * GiB,
        args.warmup,
        args.iters,
    )


# ------------------------------------------------------------------------------------------------ timing


def sync(device: torch.device, world: int) -> None:
    if world > 1:
        dist.barrier()
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(fn: Callable[[], object], device: torch.device, world: int, warmup: int, iters: int) -> float:
    """Median seconds of one call of fn, after `warmup` calls. Each call runs between synchronisations (and
    barriers, with several ranks) and is timed with CUDA events on a GPU, the host clock on a CPU."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(iters):
        sync(device, world)
        if device.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end) / 1e3)
        else:
            began = time.perf_counter()
            fn()
            times.append(time.perf_counter() - began)
    return statistics.median(times)


def copy_bandwidth(sizes: MicroSizes, device: torch.device, world: int) -> float:
    """Payload bytes/s of dst.copy_(src) for a bf16 tensor of sizes.copy_bytes (each byte read once, written
    once: the DRAM traffic is twice this)."""
    src = torch.randn(sizes.copy_bytes // 2, dtype=torch.bfloat16, device=device)
    dst = torch.empty_like(src)
    seconds = timed(lambda: dst.copy_(src), device, world, sizes.warmup, sizes.iters)
    return sizes.copy_bytes / seconds


# ------------------------------------------------------------------------------------------------- micro


def filled_bank(sizes: MicroSizes, info: DistInfo) -> tuple[MemoryBank, torch.Tensor]:
    """A bank warmed up with `fill` random ids (each rank a share) and the ids it holds (collisions dropped)."""
    bank = MemoryBank(sizes.capacity, sizes.dim, dtype=torch.bfloat16, device=info.device)
    ids = torch.randint(0, 2**62, (sizes.fill,), generator=torch.Generator().manual_seed(0)).unique()
    ids = ids.to(info.device)
    mine = ids[info.rank :: info.world_size]
    bank.warm_up(mine, torch.randn(mine.numel(), sizes.dim, device=info.device).to(torch.bfloat16))
    _, hit = bank.read(ids, step=0)  # every rank asks the whole set: the same held set everywhere
    return bank, ids[hit]


def requests_of(held: torch.Tensor, n: int, rank: int) -> torch.Tensor:
    if held.numel() < n:
        raise ValueError(f"only {held.numel()} ids held, {n} requested: raise --capacity or lower --requests")
    order = torch.randperm(held.numel(), generator=torch.Generator().manual_seed(1 + rank))[:n]
    return held[order.to(held.device)]


def rate(seconds: float, n: int, dim: int, copy: float) -> dict[str, float]:
    payload = n * dim * 2 / seconds
    return {
        "ms": seconds * 1e3,
        "vectors_per_s": n / seconds,
        "gb_per_s": payload / 1e9,
        "copy_share": payload / copy,
    }


def bank_ops(bank: MemoryBank, ids: torch.Tensor, vectors: torch.Tensor) -> dict[str, Callable[[], object]]:
    """The public operations timed against the goal."""
    step = [10]

    def write() -> None:
        step[0] += 1
        bank.write(ids, vectors, step[0])
        bank.flush()

    return {"read": lambda: bank.read(ids, step=1 << 30), "write": write}


def bank_pieces(
    bank: MemoryBank, ids: torch.Tensor, vectors: torch.Tensor
) -> dict[str, Callable[[], object]]:
    """Parts of read and write (private methods: diagnostics, not API), and the plain gather and scatter of the
    same rows (the least a read or a write must move)."""
    world, capacity = bank.world_size, bank.capacity
    mine = ids[owner_of(ids, world, capacity) == bank.rank]
    rows = row_of(mine, world, capacity)
    versions = torch.zeros_like(mine)
    pieces: dict[str, Callable[[], object]] = {
        "hash (row_of)": lambda: row_of(ids, world, capacity),
        "lookup (owner side)": lambda: bank._lookup(mine),
        "scatter (owner side)": lambda: bank._scatter(mine, vectors[: mine.numel()], versions),
        "floor: vectors.index_select": lambda: bank.vectors.index_select(0, rows),
        "floor: vectors.index_copy_": lambda: bank.vectors.index_copy_(0, rows, vectors[: mine.numel()]),
    }
    scratch = torch.full((bank.rows_per_rank,), -1, dtype=torch.int64, device=ids.device)
    pieces["scatter's sort: argsort(rows, stable), int64"] = lambda: torch.argsort(rows, stable=True)
    pieces["the same on int32 rows"] = lambda: torch.argsort(rows.int(), stable=True)
    pieces["sort-free last writer: scatter_reduce amax"] = lambda: last_writer(rows, scratch)
    if world > 1:
        pieces["route (owner, argsort, split sizes)"] = lambda: bank._route(ids)
        route = bank._route(ids)
        pieces["exchange vectors (all-to-all)"] = lambda: bank._exchange(vectors, route)
    return pieces


def last_writer(rows: torch.Tensor, scratch: torch.Tensor) -> torch.Tensor:
    """Which entries are the last of their row, without a sort (a candidate for ``_scatter``): the highest
    position per row by an atomic max into a per-row scratch (reset where touched)."""
    positions = torch.arange(rows.numel(), device=rows.device)
    scratch.index_fill_(0, rows, -1)
    scratch.scatter_reduce_(0, rows, positions, "amax")
    return scratch[rows] == positions


def profile_ops(ops: dict[str, Callable[[], object]], device: torch.device) -> dict[str, str]:
    """The kernels of one call of each op (torch.profiler, sorted by device time)."""
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    sort = "self_device_time_total" if device.type == "cuda" else "self_cpu_time_total"
    tables = {}
    for name, fn in ops.items():
        with profile(activities=activities) as prof:
            fn()
            sync(device, 1)
        tables[name] = prof.key_averages().table(sort_by=sort, row_limit=14, max_name_column_width=60)
    return tables


def run_micro(args: argparse.Namespace) -> dict[str, Any] | None:
    info = init_distributed("auto" if torch.cuda.is_available() else "gloo")
    sizes = micro_sizes(args)
    copy = copy_bandwidth(sizes, info.device, info.world_size)
    bank, held = filled_bank(sizes, info)
    ids = requests_of(held, sizes.requests, info.rank)
    vectors = torch.randn(ids.numel(), sizes.dim, device=info.device).to(torch.bfloat16)
    timing = (info.device, info.world_size, sizes.warmup, sizes.iters)
    ops = {
        name: rate(timed(fn, *timing), ids.numel(), sizes.dim, copy)
        for name, fn in bank_ops(bank, ids, vectors).items()
    }
    _, hit = bank.read(ids, step=1 << 30)
    local = {
        "rank": info.rank,
        "device": torch.cuda.get_device_name(info.device) if info.device.type == "cuda" else "cpu",
        "copy_gb_per_s": copy / 1e9,
        "ops": ops,
        "pieces_ms": {name: timed(fn, *timing) * 1e3 for name, fn in bank_pieces(bank, ids, vectors).items()},
        "hit_rate": float(hit.float().mean()),
        "remote_share": float((owner_of(ids, info.world_size, sizes.capacity) != info.rank).float().mean()),
    }
    if args.profile and info.world_size == 1:
        local["profile"] = profile_ops(bank_ops(bank, ids, vectors), info.device)
    ranks = gather_objects(local, info.world_size)
    dist.destroy_process_group()
    if info.rank != 0:
        return None
    return {
        "world_size": info.world_size,
        "backend": info.backend,
        "sizes": asdict(sizes),
        "ranks": ranks,
        "total": totals(ranks, sizes),
    }


def gather_objects(local: dict[str, Any], world: int) -> list[dict[str, Any]]:
    if world == 1:
        return [local]
    out: list[Any] = [None] * world
    dist.all_gather_object(out, local)
    return out


def totals(ranks: list[dict[str, Any]], sizes: MicroSizes) -> dict[str, Any]:
    """All ranks together: world x N vectors over the slowest rank's time."""
    out = {}
    for op in ranks[0]["ops"]:
        seconds = max(r["ops"][op]["ms"] for r in ranks) / 1e3
        n = sizes.requests * len(ranks)
        out[op] = {"vectors_per_s": n / seconds, "gb_per_s": n * sizes.dim * 2 / seconds / 1e9}
    return out


# ---------------------------------------------------------------------------------------------------- e2e


def e2e_synth_overrides(args: argparse.Namespace) -> list[str]:
    samples, items, long = (600, 2000, 40) if args.small else (args.samples, args.items, max(HISTORIES))
    return [
        f"data.synth.num_samples={samples}",
        f"data.synth.samples_per_shard={max(100, samples // 10)}",
        f"data.synth.num_items={items}",
        f"data.synth.num_users={max(200, samples // 5)}",
        f"data.synth.long_history={long}",
        "data.synth.short_history=32",
        "data.synth.images_per_item=0",
        "data.synth.eval_share=0.05",
    ]


def ensure_e2e_data(args: argparse.Namespace) -> Path:
    """Synthesise the long-history, text-only dataset once (cached under --data-dir by its settings)."""
    from trainer.dataset_tools.synth.generate import synthesize

    overrides = e2e_synth_overrides(args)
    name = "-".join(o.split("=")[1] for o in overrides[:5])
    out = Path(args.data_dir) / f"membank-{name}"
    if (out / "dataset.json").is_file():
        return out
    cfg = load_config("lemur", overrides)
    started = time.time()
    synthesize(cfg.data.synth, out, vocab_size=cfg.data.vocab_size, force=True, progress=False)
    print(f"synthesised {out.name} in {time.time() - started:.0f}s", flush=True)
    return out


SMALL_MODEL = [
    "model.text_tower.layers=1",
    "model.text_tower.hidden=32",
    "model.query_tower.hidden=32",
    "model.content_dim=16",
    "model.ranker_hidden=32",
    "model.ranker_tokens=4",
    "model.longer_layers=1",
    "model.text_max_tokens=[8, 16, 8]",
    "embeddings.dim=8",
    "embeddings.hash_size=10007",
]


def cell_overrides(args: argparse.Namespace, data: Path, mode: str, history: int, out_dir: str) -> list[str]:
    overrides = [
        f'data.path="{data}"',
        f"model.max_history={{long = {history}, short = {min(32, history)}}}",
        "memory_bank.enabled=true",
        f'memory_bank.mode="{mode.split("_")[0]}"',
        f"memory_bank.forward_share={0.2 if mode == 'bank_p20' else 1.0}",
        f"memory_bank.backward_share={0.2 if mode == 'bank_p20' else 1.0}",
        f"data.batch_size={args.batch_size}",
        "data.num_workers=2",
        "data.shuffle_buffer=256",
        f'training.dtype="{args.dtype}"',
        "distributed.zero_stage=2",
        *timed_run(out_dir),
    ]
    return overrides + (SMALL_MODEL if args.small else []) + args.overrides


def timed_run(out_dir: str) -> list[str]:
    """A run that only trains: no eval, checkpoint, log lines, progress bar or TensorBoard in the timed steps."""
    return [
        "training.eval_every=0",
        "training.checkpoint_every=0",
        "logging.log_every=1000000",
        "logging.progress_bar=false",
        "logging.tensorboard=false",
        f'logging.out_dir="{out_dir}"',
    ]


def history_stats(batches: list[Any]) -> dict[str, float]:
    """Mean history entries per sample over the histories, and the share of distinct ids within a batch (what
    recompute encodes, after its in-batch dedup)."""
    entries, distinct, samples = 0, 0, 0
    for batch in batches:
        # raw ids where the reader kept them (bank modes); else table rows, which merge colliding ids
        histories = batch.raw_histories if batch.raw_histories is not None else batch.sequences
        keys = [k for k in histories.keys() if k != "item_id"]  # noqa: SIM118 (a KJT)
        values = torch.cat([histories[k].values() for k in keys])
        entries += values.numel()
        distinct += int(values.unique().numel())
        samples += batch.size
    return {"history_per_sample": entries / samples, "distinct_share": distinct / max(1, entries)}


def child(args: argparse.Namespace) -> dict[str, Any]:
    """One (mode, history) cell in this process: build the trainer, preload batches, warm up, time steps."""
    from trainer.loop import Trainer
    from trainer.train import setup_logging

    info = init_distributed("auto" if torch.cuda.is_available() else "gloo")
    setup_logging(0)
    with tempfile.TemporaryDirectory() as out_dir:
        cfg = load_config("lemur", cell_overrides(args, Path(args.data), args.mode, args.history, out_dir))
        trainer = Trainer(cfg, info)
        stream = iter(trainer.train_stream)
        batches = [next(stream).to(info.device, non_blocking=True) for _ in range(args.preload)]
        stats = history_stats(batches)
        for i in range(args.warmup_steps):
            trainer.train_step(batches[i % len(batches)])
            trainer.step += 1
        sync(info.device, 1)
        began, samples = time.perf_counter(), 0
        for i in range(args.steps):
            batch = batches[(args.warmup_steps + i) % len(batches)]
            trainer.train_step(batch)
            trainer.step += 1
            samples += batch.size
        sync(info.device, 1)
        seconds = time.perf_counter() - began
    result = {
        "status": "ok",
        "samples_per_s": samples / seconds,
        "step_ms": seconds / args.steps * 1e3,
        **stats,
    }
    if info.device.type == "cuda":
        result["peak_gib"] = torch.cuda.max_memory_allocated(info.device) / GiB
    mfu = trainer.flops.mfu(args.steps / seconds)
    if mfu is not None:
        result["mfu"] = mfu
    return result


def child_main(args: argparse.Namespace) -> int:
    try:
        result = child(args)
    except torch.OutOfMemoryError as err:
        result = {"status": "OOM", "error": str(err).splitlines()[0]}
    Path(args.result_file).write_text(json.dumps(result))
    return 0


def run_cell(args: argparse.Namespace, data: Path, mode: str, history: int, timeout: float) -> dict[str, Any]:
    """One child process; its output goes to a log file, shown (the tail) only when it fails."""
    with tempfile.TemporaryDirectory() as tmp:
        result_file, log_file = Path(tmp) / "result.json", Path(tmp) / "log.txt"
        command = [sys.executable, __file__, "--child", "--mode", mode, "--history", str(history)]
        command += ["--data", str(data), "--result-file", str(result_file), *child_flags(args)]
        env = {**os.environ, "PYTHONPATH": f"{ROOT}:{os.environ.get('PYTHONPATH', '')}"}
        for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
            env.pop(key, None)
        with log_file.open("w") as log:
            proc = subprocess.Popen(
                command, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True
            )
            try:
                code = proc.wait(timeout=max(1.0, timeout))
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
                return {"status": "timeout"}
        if code == 0 and result_file.is_file():
            return json.loads(result_file.read_text())
        tail = log_file.read_text().splitlines()[-15:]
        print(f"{mode} L={history} failed (exit {code}):\n" + "\n".join(tail), flush=True)
        return {"status": f"failed (exit {code})", "log_tail": tail}


def child_flags(args: argparse.Namespace) -> list[str]:
    flags = ["--batch-size", str(args.batch_size), "--dtype", args.dtype, "--preload", str(args.preload)]
    flags += ["--warmup-steps", str(args.warmup_steps), "--steps", str(args.steps)]
    flags += [f"--set={o}" for o in args.overrides] + (["--small"] if args.small else [])
    return flags


def run_e2e(args: argparse.Namespace, report: Callable[[dict[str, Any]], None]) -> dict[str, Any]:
    """Every (history, mode) cell, the goal's history first; the report is rewritten after each cell, and cells
    past --budget-s are skipped, so a cut-off run still leaves what it measured."""
    started = time.time()
    data = ensure_e2e_data(args)
    histories = args.histories or ((8, 16) if args.small else HISTORIES)
    order = sorted(histories, key=lambda h: (h != 128, h))
    section: dict[str, Any] = {
        "data": data.name,
        "synth": e2e_synth_overrides(args),
        "batch_size": args.batch_size,
        "dtype": args.dtype,
        "warmup_steps": args.warmup_steps,
        "steps": args.steps,
        "preload": args.preload,
        "overrides": args.overrides,
        "cells": {},
    }
    for history in order:
        for mode in args.modes:
            left = args.budget_s - (time.time() - started)
            cell = run_cell(args, data, mode, history, left) if left > 20 else {"status": "skipped (budget)"}
            section["cells"].setdefault(str(history), {})[mode] = cell
            print(f"e2e L={history} {mode}: {cell_text(cell)}", flush=True)
            report(section)
    return section


def cell_text(cell: dict[str, Any]) -> str:
    return (
        f"{cell['samples_per_s']:,.0f} samples/s" if cell.get("status") == "ok" else cell.get("status", "-")
    )


# ------------------------------------------------------------------------------------------------- report


def commit() -> str:
    try:
        out = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True
        )
        dirty = subprocess.run(["git", "status", "--porcelain"], cwd=ROOT, capture_output=True, text=True)
        return out.stdout.strip() + ("+dirty" if dirty.stdout.strip() else "")
    except OSError:
        return "unknown"


class Report:
    """memory_bank-DATE-HARDWARE.{json,md}: sections merged with what an earlier invocation wrote."""

    def __init__(self, out: Path, hardware: str) -> None:
        date = datetime.date.today().isoformat()
        self.stem = out / f"memory_bank-{date}-{hardware}"
        out.mkdir(parents=True, exist_ok=True)
        path = self.stem.with_suffix(".json")
        self.data = json.loads(path.read_text()) if path.is_file() else {}
        self.data.update(
            date=date, hardware=hardware, host=platform.node(), torch=torch.__version__, commit=commit()
        )

    def put(self, key: str, section: dict[str, Any]) -> None:
        self.data[key] = section
        self.stem.with_suffix(".json").write_text(json.dumps(self.data, indent=1) + "\n")
        self.stem.with_suffix(".md").write_text(render(self.data))


def render(data: dict[str, Any]) -> str:
    lines = [f"# Memory bank, {data['date']}, {data['hardware']}", ""]
    lines.append(f"Host {data['host']}, torch {data['torch']}, commit {data['commit']}.")
    for key in sorted(k for k in data if k.startswith("micro-")):
        lines += render_micro(data[key])
    for key in sorted((k for k in data if k.startswith("e2e")), key=lambda k: data[k]["batch_size"]):
        lines += render_e2e(data[key])
    return "\n".join(lines) + "\n"


def render_micro(section: dict[str, Any]) -> list[str]:
    s, world = section["sizes"], section["world_size"]
    lines = [
        "",
        f"## Micro: bank reads and writes, {world} rank(s), {section['backend']}, {section['ranks'][0]['device']}",
        "",
        f"Bank of {s['capacity']:,} rows x {s['dim']} bf16 over all ranks, {s['fill']:,} ids written, "
        f"{s['requests']:,} distinct held ids per rank per call; median of {s['iters']} calls after {s['warmup']}. "
        "Payload = N x dim x 2 bytes; copy = `dst.copy_(src)` of a "
        f"{s['copy_bytes'] / GiB:g} GiB bf16 tensor, its size over its time (DRAM moves twice that).",
        "",
        "| rank | copy GB/s | op | ms | vectors/s | payload GB/s | % of copy | hit rate | remote ids |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in section["ranks"]:
        for op, v in r["ops"].items():
            lines.append(
                f"| {r['rank']} | {r['copy_gb_per_s']:,.0f} | {op} | {v['ms']:.3f} | {v['vectors_per_s'] / 1e6:,.1f} M | "
                f"{v['gb_per_s']:,.0f} | {v['copy_share']:.0%} | {r['hit_rate']:.3f} | {r['remote_share']:.0%} |"
            )
    if world > 1:
        for op, v in section["total"].items():
            lines.append(
                f"| all | | {op} | | {v['vectors_per_s'] / 1e6:,.1f} M | {v['gb_per_s']:,.0f} | | | |"
            )
    lines += verdict(section)
    lines += ["", "Pieces (ms, median, rank 0):", "", "| piece | ms |", "|---|---|"]
    lines += [f"| {k} | {v:.3f} |" for k, v in section["ranks"][0]["pieces_ms"].items()]
    for name, table in section["ranks"][0].get("profile", {}).items():
        lines += ["", f"Profile of one `{name}` (torch.profiler):", "", "```", table.rstrip(), "```"]
    return lines


def verdict(section: dict[str, Any]) -> list[str]:
    shares = {
        op: min(r["ops"][op]["copy_share"] for r in section["ranks"]) for op in section["ranks"][0]["ops"]
    }
    met = all(v >= GOAL_COPY_SHARE for v in shares.values())
    text = ", ".join(f"{op} {v:.0%}" for op, v in shares.items())
    goal = f"goal >= {GOAL_COPY_SHARE:.0%} of copy on one GPU"
    scope = "" if section["world_size"] == 1 else " (the goal is for one GPU; shown for comparison)"
    return ["", f"Lowest share of copy bandwidth: {text}; {goal}: **{'met' if met else 'not met'}**{scope}."]


def render_e2e(section: dict[str, Any]) -> list[str]:
    lines = [
        "",
        f"## End to end: bank vs recompute, 1 GPU, batch {section['batch_size']}, {section['dtype']}",
        "",
        f"Dataset {section['data']} ({' '.join(section['synth'])}); lemur preset, ZeRO-2, encoder sampling off "
        "(forward_share = backward_share = 1), short history min(32, L). "
        f"{section['preload']} batches preloaded on the GPU (the reader is excluded), {section['warmup_steps']} "
        f"warm-up steps, then {section['steps']} timed steps; one process per cell. "
        "History/sample: ids read (bank) per sample over both histories; distinct: share of them distinct in a "
        "batch (what recompute encodes).",
        "",
        "| L (long) | history/sample | distinct | bank samples/s | recompute samples/s | bank/recompute | "
        "bank step ms | recompute step ms | bank peak GiB | recompute peak GiB | bank p=q=0.2 samples/s |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for history in sorted(section["cells"], key=int):
        lines.append(e2e_row(history, section["cells"][history]))
    speedup = ratio(section["cells"].get("128", {}))
    met = "not measured" if speedup is None else ("met" if speedup >= GOAL_SPEEDUP_AT_128 else "not met")
    lines += ["", f"Goal >= {GOAL_SPEEDUP_AT_128:g}x at history 128: **{met}**."]
    return lines


def ratio(cells: dict[str, Any]) -> float | None:
    bank, recompute = cells.get("bank", {}), cells.get("recompute", {})
    if bank.get("status") == "ok" and recompute.get("status") == "ok":
        return bank["samples_per_s"] / recompute["samples_per_s"]
    return None


def e2e_row(history: str, cells: dict[str, Any]) -> str:
    bank, recompute = cells.get("bank", {}), cells.get("recompute", {})
    shown = bank if "history_per_sample" in bank else recompute

    def num(cell: dict[str, Any], key: str, fmt: str) -> str:
        return format(cell[key], fmt) if key in cell else "-"

    speedup = ratio(cells)
    return (
        f"| {history} | {num(shown, 'history_per_sample', '.0f')} | {num(shown, 'distinct_share', '.0%')} | "
        f"{cell_text(bank)} | {cell_text(recompute)} | {'-' if speedup is None else f'{speedup:.1f}x'} | "
        f"{num(bank, 'step_ms', '.1f')} | {num(recompute, 'step_ms', '.1f')} | {num(bank, 'peak_gib', '.1f')} | "
        f"{num(recompute, 'peak_gib', '.1f')} | {cell_text(cells.get('bank_p20', {}))} |"
    )


# --------------------------------------------------------------------------------------------------- main


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument(
        "--part", choices=["micro", "e2e", "data", "all"], default="all", help="data: synthesise only"
    )
    p.add_argument("--small", action="store_true", help="tiny sizes (a CPU check)")
    p.add_argument("--out", default=str(ROOT / "benchmarks" / "results"))
    p.add_argument(
        "--hardware", default=None, help="name in the report's file name (default: GPU kind x count)"
    )
    p.add_argument("--capacity", type=int, default=1 << 23, help="micro: bank rows over all ranks")
    p.add_argument("--requests", type=int, default=1 << 20, help="micro: ids per rank per call")
    p.add_argument("--dim", type=int, default=128)
    p.add_argument("--copy-gib", type=int, default=1)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--iters", type=int, default=10)
    p.add_argument("--profile", action="store_true", help="micro: kernels of one read and one write (1 rank)")
    p.add_argument("--data-dir", default="/tmp/lemur-bench-data")
    p.add_argument("--samples", type=int, default=20_000, help="e2e: samples to synthesise")
    p.add_argument("--items", type=int, default=60_000, help="e2e: catalog size to synthesise")
    p.add_argument("--histories", type=int, nargs="*", default=None)
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--modes", nargs="*", default=["bank", "recompute"], choices=MODES, help="e2e cells per L")
    p.add_argument("--dtype", default="bfloat16")
    p.add_argument("--preload", type=int, default=8)
    p.add_argument("--warmup-steps", type=int, default=3)
    p.add_argument("--steps", type=int, default=10)
    p.add_argument(
        "--budget-s", type=float, default=3600.0, help="e2e: skip cells once this much time is spent"
    )
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="A.B=C")
    p.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--mode", help=argparse.SUPPRESS)
    p.add_argument("--history", type=int, help=argparse.SUPPRESS)
    p.add_argument("--data", help=argparse.SUPPRESS)
    p.add_argument("--result-file", help=argparse.SUPPRESS)
    return p.parse_args()


def main() -> int:
    args = parse_args()
    if args.child:
        return child_main(args)
    if args.part == "data":
        print(ensure_e2e_data(args))
        return 0
    report = Report(Path(args.out), args.hardware or hardware_name())
    if args.part in ("micro", "all"):
        section = run_micro(args)
        if section is not None:
            report.put(f"micro-{section['world_size']}", section)
            print("\n".join(render_micro(section)), flush=True)
    if args.part in ("e2e", "all") and int(os.environ.get("RANK", "0")) == 0:
        section = run_e2e(args, lambda s: report.put(f"e2e-b{args.batch_size}", s))
        print("\n".join(render_e2e(section)), flush=True)
    print(f"report: {report.stem}.md", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
