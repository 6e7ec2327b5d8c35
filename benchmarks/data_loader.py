#!/usr/bin/env python
"""Data-loader benchmark: samples/s of the streaming reader (trainer/data/reader.py) at 0..N DataLoader workers.

Modes (the shard shapes of the `lemur` and `em3` presets, on small synthetic datasets made here and cached; binary
`.rec` sample records unless the mode says json):
  lemur-text   LEMUR: title/description/ocr at 31/124/12 tokens, 10-token query, histories of 50 and up to 1,000
  lemur-text-json  the same with the JSON sample records (the first format), to compare in one run
  em3-image    EM3: one 224x224 JPEG per sample decoded to uint8, text at 32/64/16 tokens, histories of 50 and 500
  em3-text     the em3 shards with images off (the JPEG bytes are still read, never decoded)
  em3-image-cached  em3-image under model.frozen_cache: the cache serves the images, so the JPEGs are not decoded
  em3-image-device  em3-image under data.image_decode = "device": the workers check each JPEG's header and ship
               its bytes; the trainer decodes them on the GPU (nvJPEG). The reader's samples/CPU-s is what the
               workers cost; the decode itself is timed apart on a few batches (CUDA events on a GPU, its own section
               of the report; on a host without CUDA the same module's CPU decode is timed, for reference only)

Each point builds the train BatchStream exactly as training does (`make_batch_stream(cfg, "train")` with the ids hashed
into the run's tables and, with the memory bank, the raw history ids kept), skips the first
batches (worker start-up, shuffle-buffer fill) and counts samples for --seconds. Alongside, one worker-less pass per
mode times the stages (tar reading, JSON parse, validation, image decode, tokenisation, KJT building, the rest of
collate) on the same samples, so the report says where the time goes. The shards are read from the page cache: this
measures the CPU cost of the reader, not the storage.

    python benchmarks/data_loader.py                      # every mode at 0 1 2 4 8 16 workers (capped at the cores)
    python benchmarks/data_loader.py --quick              # a smoke run in about a minute
    python benchmarks/data_loader.py --modes lemur-text --workers 0 4 16 --seconds 20

Results: benchmarks/results/data_loader-<date>-<hardware>.md and .json (--out to choose the folder). Needs only the
repository on PYTHONPATH (this file adds its parent folder itself); it never downloads anything.
"""

from __future__ import annotations

import argparse
import cProfile
import dataclasses
import datetime
import gc
import io
import itertools
import json
import math
import os
import platform
import pstats
import re
import subprocess
import sys
import time
from pathlib import Path
from typing import Any
from unittest import mock

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import numpy as np  # noqa: E402
import torch  # noqa: E402

from trainer.config import Config, load_config  # noqa: E402
from trainer.data import collate as collate_module  # noqa: E402
from trainer.data import decode as decode_module  # noqa: E402
from trainer.data.decode import SkipCounter, decode_image, parse_sample, tar_samples  # noqa: E402
from trainer.data.reader import BatchStream, make_batch_stream  # noqa: E402
from trainer.data.spec import read_spec  # noqa: E402
from trainer.dataset_tools.synth.generate import synthesize  # noqa: E402
from trainer.models.model import plan_id_tables  # noqa: E402

GOALS = {"text": 20_000, "image": 5_000}
"""The issue's goal on a 16-core GPU host, samples/s."""
GOAL_CORES = 16
GOAL_DEVICE_DECODE_PER_CPU_S = 5_000
"""Issue 11: em3-image with the JPEGs decoded on the GPU, samples per CPU-second of the reader (its workers and
the process that iterates it)."""


@dataclasses.dataclass(frozen=True)
class Shape:
    """A synthetic dataset with a preset's shard shape, shrunk in users, items and samples (the per-sample cost is
    what matters: history lengths, text lengths and image size are the preset's)."""

    preset: str
    synth: tuple[str, ...]


SHAPES = {
    "lemur": Shape(
        "lemur",
        (
            "images_per_item=0",
            "short_history=50",
            "long_history=1000",
            "num_users=2000",
            "num_items=5000",
            "num_authors=2000",
        ),
    ),
    "em3": Shape(
        "em3",
        (
            "images_per_item=1",
            "image_size=224",
            "short_history=50",
            "long_history=500",
            "num_users=2000",
            "num_items=5000",
            "num_authors=2000",
        ),
    ),
}


@dataclasses.dataclass(frozen=True)
class Mode:
    name: str
    shape: str
    images: bool
    about: str
    record: str = "binary"
    """The shards' sample record: binary (`.rec`, the default since 2026-11-30) or json (the first format)."""
    overrides: tuple[str, ...] = ()
    """Config overrides of the mode (on top of the shape's preset)."""

    @property
    def dataset(self) -> tuple[str, str]:
        return self.shape, self.record

    @property
    def kind(self) -> str:
        return "image" if self.images else "text"


MODES = {
    m.name: m
    for m in (
        Mode(
            "lemur-text",
            "lemur",
            False,
            "lemur shape, text only (title 31, description 124, ocr 12, query 10)",
        ),
        Mode(
            "lemur-text-json",
            "lemur",
            False,
            "lemur-text with the JSON records (the format before the binary one), side by side",
            "json",
        ),
        Mode(
            "em3-image",
            "em3",
            True,
            "em3 shape, one 224x224 JPEG per sample decoded (text 32/64/16)",
            overrides=("data.image_decode=cpu",),
        ),
        Mode("em3-text", "em3", False, "em3 shards with images off (JPEG bytes read, not decoded)"),
        Mode(
            "em3-image-cached",
            "em3",
            True,
            "em3-image with EM3's frozen-feature cache serving the images: the JPEGs are counted, not decoded",
            overrides=("model.frozen_cache=true",),
        ),
        Mode(
            "em3-image-device",
            "em3",
            True,
            "em3-image with the JPEGs left to the GPU (data.image_decode = device): the workers check headers only",
            overrides=("data.image_decode=device",),
        ),
    )
}
DEVICE_DECODE = "data.image_decode=device"

SHARDS_PER_SPLIT = 40
"""Train shards per dataset: at least two per worker up to 20 workers. More workers still get shards, since the
benchmark's shard list repeats the dataset (see `repeated_shards`)."""
EPOCH_SAMPLES = 4_000_000
"""The train shard list is the dataset repeated up to this many samples, so that no epoch boundary (which restarts
the DataLoader workers) falls inside a measurement."""


# ------------------------------------------------------------------------------------------------- datasets


def dataset_dir(data_dir: Path, shape: str, samples: int, record: str = "binary") -> Path:
    return data_dir / f"{shape}-{samples}{'-json' if record == 'json' else ''}"


def ensure_dataset(data_dir: Path, dataset: tuple[str, str], samples: int, regenerate: bool) -> Path:
    """Generate the (shape, record format) dataset into data_dir/<shape>-<samples>[-json] unless an identical one
    is there already."""
    shape_name, record = dataset
    shape = SHAPES[shape_name]
    out = dataset_dir(data_dir, shape_name, samples, record)
    eval_share = 0.05
    train = samples - max(1, round(samples * eval_share))
    overrides = [
        *shape.synth,
        f"num_samples={samples}",
        f"samples_per_shard={math.ceil(train / SHARDS_PER_SPLIT)}",
        f"eval_share={eval_share}",
        f'record_format="{record}"',
        "workers=0",  # all cores
    ]
    cfg = load_config(shape.preset, [f"data.synth.{o}" for o in overrides])
    stamp = {
        "preset": shape.preset,
        "synth": dataclasses.asdict(cfg.data.synth),
        "vocab": cfg.data.vocab_size,
    }
    stamp["synth"].pop("workers")
    marker = out / "benchmark.json"
    cached = not regenerate and marker.is_file() and (out / "dataset.json").is_file()
    if cached and json.loads(marker.read_text()) == stamp:
        return out
    print(f"generating the {shape_name} dataset ({samples} samples) in {out} ...", flush=True)
    started = time.perf_counter()
    synthesize(cfg.data.synth, out, vocab_size=cfg.data.vocab_size, force=True, progress=False)
    marker.write_text(json.dumps(stamp, indent=1) + "\n")
    print(f"  done in {time.perf_counter() - started:.0f}s", flush=True)
    return out


def repeated_shards(path: Path) -> str:
    """The train shards, listed again and again up to EPOCH_SAMPLES samples (a `::`-separated shard list)."""
    spec = read_spec(path)
    shards = spec.shards["train"]
    total = sum(s.samples for s in shards)
    repeats = max(1, math.ceil(EPOCH_SAMPLES / total))
    return "::".join(str(path / s.name) for _ in range(repeats) for s in shards)


def mode_config(mode: Mode, path: Path, workers: int, args: argparse.Namespace) -> Config:
    shape = SHAPES[mode.shape]
    cfg = load_config(
        shape.preset,
        [
            f"data.path={json.dumps(str(path))}",
            f"data.num_workers={workers}",
            f"data.batch_size={args.batch_size}",
            f"data.shuffle_buffer={args.shuffle_buffer}",
            f"model.use_images={'true' if mode.images else 'false'}",
            "data.images_per_sample=1",
            "data.image_size=224",
            *mode.overrides,
        ],
    )
    cfg.data.train_shards = repeated_shards(path)
    return cfg


# ------------------------------------------------------------------------------------------------- throughput


def train_stream(cfg: Config, pin_memory: bool = False) -> BatchStream:
    """The train stream as the trainer builds it (`Trainer.batches`)."""
    rows = plan_id_tables(read_spec(cfg.data.path), cfg.embeddings).rows
    return make_batch_stream(
        cfg,
        "train",
        epochs=None,
        pin_memory=pin_memory,
        table_rows=rows,
        raw_histories=cfg.memory_bank.enabled,
        pad_to_longest=True,
    )


def measure(mode: Mode, path: Path, workers: int, args: argparse.Namespace) -> dict[str, Any]:
    """Samples/s of the train stream after a warm-up: every worker has delivered --warmup batches before the clock
    starts, and the clock stops after a whole round of batches (one from each worker). CPU time is counted too (this
    process and its live children, the workers), so that a point measured beside other load still gives a fair
    samples per CPU-second."""
    cfg = mode_config(mode, path, workers, args)
    started = time.perf_counter()
    stream = train_stream(cfg, pin_memory=args.pin_memory)
    batches = iter(stream)
    next(batches)
    first_batch = time.perf_counter() - started
    for _ in range(args.warmup * max(1, workers) - 1):
        next(batches)
    epoch = stream.epoch
    count, wall0, main0, children0 = 0, time.perf_counter(), time.process_time(), children_cpu()
    while True:
        batch = next(batches)
        count += 1
        elapsed = time.perf_counter() - wall0
        # Whole rounds only: the DataLoader hands out one batch per worker in turn, and workers that started
        # together deliver in bursts, so a window cut mid-round would count part of a burst.
        if elapsed >= args.seconds and count >= args.min_batches and count % max(1, workers) == 0:
            break
    main_cpu, children = time.process_time() - main0, children_cpu() - children0
    crossed = stream.epoch - epoch
    close(batches, stream)
    samples = count * batch.size
    cpu = main_cpu + children
    return {
        "mode": mode.name,
        "workers": workers,
        "samples_per_s": samples / elapsed,
        "per_worker": samples / elapsed / max(1, workers),
        "samples_per_cpu_s": samples / cpu if cpu > 0 else None,
        "cores_busy": cpu / elapsed,
        "main_process_cpu": main_cpu / elapsed,
        "batches": count,
        "batch_size": batch.size,
        "seconds": elapsed,
        "first_batch_s": first_batch,
        "epoch_boundaries": crossed,
        "loadavg_after": os.getloadavg()[0] if hasattr(os, "getloadavg") else None,
    }


def children_cpu() -> float:
    """CPU seconds (user + system) used so far by this process's live children (the DataLoader workers); 0 where
    /proc is missing."""
    me, total = str(os.getpid()), 0
    try:
        entries = [d for d in os.listdir("/proc") if d.isdigit()]
    except OSError:
        return 0.0
    for pid in entries:
        try:
            with open(f"/proc/{pid}/stat") as f:
                stat = f.read()
        except OSError:
            continue
        fields = stat[stat.rfind(")") + 2 :].split()
        if fields[1] == me:
            total += int(fields[11]) + int(fields[12])
    return total / os.sysconf("SC_CLK_TCK")


def close(batches: Any, stream: BatchStream) -> None:
    """Stop the DataLoader workers before the next point starts."""
    batches.close()
    del batches, stream
    gc.collect()


# ------------------------------------------------------------------------------------------------- stages


class Probe:
    """Adds up the CPU time spent in functions the reader calls, by patching them for the duration of a `with`."""

    def __init__(self, targets: dict[str, tuple[Any, str]]) -> None:
        self.targets = targets
        self.spent = dict.fromkeys(targets, 0.0)

    def _wrap(self, key: str, fn: Any) -> Any:
        def timed_call(*args: Any, **kwargs: Any) -> Any:
            t = time.process_time()
            try:
                return fn(*args, **kwargs)
            finally:
                self.spent[key] += time.process_time() - t

        return timed_call

    def __enter__(self) -> Probe:
        self.patches = [
            mock.patch.object(owner, attr, self._wrap(key, getattr(owner, attr)))
            for key, (owner, attr) in self.targets.items()
        ]
        for patch in self.patches:
            patch.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        for patch in reversed(self.patches):
            patch.stop()


def best_of(
    repeat: int, fn: Any, targets: dict[str, tuple[Any, str]] | None = None
) -> tuple[float, dict, Any]:
    """The cheapest of `repeat` runs of fn(): its CPU time, the CPU time spent inside `targets` then, and its result.
    CPU time, not wall time, so that other load on the machine changes the numbers little."""
    best: tuple[float, dict, Any] = (math.inf, {}, None)
    for _ in range(repeat):
        with Probe(targets or {}) as probe:
            t = time.process_time()
            out = fn()
            cpu = time.process_time() - t
        if cpu < best[0]:
            best = (cpu, dict(probe.spent), out)
    return best


def stage_breakdown(mode: Mode, path: Path, args: argparse.Namespace) -> dict[str, Any]:
    """CPU-µs per sample of each stage, on the first samples of the train shards, through the reader's own code:
    tar_samples, then parse_sample (json.loads timed apart, decode_image timed inside it), then the Collator
    (Collator.tokens and jagged timed inside it). One torch thread, as in a DataLoader worker; the cheapest of
    --breakdown-repeats runs."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return _stage_breakdown(mode, path, args)
    finally:
        torch.set_num_threads(threads)


def _stage_breakdown(mode: Mode, path: Path, args: argparse.Namespace) -> dict[str, Any]:
    cfg = mode_config(mode, path, 0, args)
    ds = train_stream(cfg).dataset
    collator, limits, r = ds.collator, ds.settings.limits, args.breakdown_repeats
    n = max(1, args.breakdown_samples // args.batch_size) * args.batch_size
    urls = list(dict.fromkeys(s.url for s in ds.shards))

    def read() -> list[Any]:
        return list(itertools.islice((x for url in urls for x in tar_samples(url, SkipCounter())), n))

    t_tar, _, raws = best_of(r, read)
    if len(raws) < n:
        raise RuntimeError(f"{path}: only {len(raws)} samples for the stage breakdown")
    binary = all("rec" in x.members for x in raws)
    t_json = 0.0 if binary else best_of(r, lambda: [json.loads(x.members["json"]) for x in raws])[0]
    t_parse, inside, samples = best_of(
        r,
        lambda: [parse_sample(x, ds.spec, limits) for x in raws],
        {"image": (decode_module, "decode_image"), "header": (decode_module, "jpeg_for_device")},
    )
    chunks = [samples[i : i + args.batch_size] for i in range(0, n, args.batch_size)]

    def collate_all() -> list[Any]:
        collator.query_cache.clear()  # every repeat pays for the queries it sees first, as a fresh worker does
        return [collator(chunk) for chunk in chunks]

    t_collate, within, _ = best_of(
        r,
        collate_all,
        {
            "tokens": (collator, "tokens"),
            "query_tokens": (collator, "query_tokens"),
            "kjt": (collate_module, "jagged"),
            "hash": (collate_module, "hash_kjt"),
        },
    )
    record = "rec" if binary else "json"
    stages = {"tar read": t_tar}
    images = inside["image"] + inside["header"]
    if binary:
        stages["binary record: view + validate"] = max(0.0, t_parse - images)
    else:
        stages["json parse"] = t_json
        stages["validate (ids, text)"] = max(0.0, t_parse - t_json - images)
    if mode.images and DEVICE_DECODE in mode.overrides:
        stages["JPEG header check (decoded on the device)"] = inside["header"]
    elif mode.images:
        stages["image decode"] = inside["image"]
    stages["tokenise (text fields + query)"] = within["tokens"] + within["query_tokens"]
    stages["KJTs (ids, histories)"] = within["kjt"]
    stages["hash ids into table rows"] = within["hash"]
    stages["rest of collate" + (" (image copy, columns)" if mode.images else " (columns)")] = max(
        0.0, t_collate - within["tokens"] - within["query_tokens"] - within["kjt"] - within["hash"]
    )
    out: dict[str, Any] = {
        "mode": mode.name,
        "samples": n,
        "us_per_sample": {k: v / n * 1e6 for k, v in stages.items()},
        "record": record,
        "record_bytes": sum(len(x.members[record]) for x in raws) / n,
        "mean_history": {k: sum(len(x["history"][k]) for x in samples) / n for k in ds.spec.history},
    }
    out["total_us"] = sum(out["us_per_sample"].values())
    if mode.images:
        out["jpeg_bytes"] = sum(len(x.members.get("jpg", b"")) for x in raws) / n
        out["textured_jpeg"] = textured_jpeg_cost(limits.image_size)
    if args.profile:
        out["profile"] = profile(train_stream(cfg), args)
    return out


# ------------------------------------------------------------------------------------------------- device decode


def device_decode_cost(mode: Mode, path: Path, args: argparse.Namespace) -> dict[str, Any] | None:
    """For a mode that leaves the JPEGs to the device: the time `decode_batch` (what `Trainer.to_device` runs)
    takes per batch on the GPU, from CUDA events around it (after one warm-up batch), and the CPU time the
    training process spends in it (nvJPEG parses and Huffman-decodes part of the work on the host). Without CUDA
    the same module decodes on the CPU (torchvision's libjpeg-turbo, else PIL): wall time, for reference."""
    if DEVICE_DECODE not in mode.overrides:
        return None
    from trainer.data.device_decode import decode_batch, decodes_on

    cuda = torch.cuda.is_available()
    device = torch.device("cuda", 0) if cuda else torch.device("cpu")
    if cuda and not decodes_on(device):
        return {
            "mode": mode.name,
            "device": str(device),
            "error": "torchvision cannot decode JPEG on CUDA here",
        }
    stream = train_stream(mode_config(mode, path, 0, args), pin_memory=cuda)
    batches = iter(stream)
    host = list(itertools.islice(batches, args.decode_batches + 1))
    close(batches, stream)
    decode_batch(host[0].to(device))  # warm-up: nvJPEG's handles and buffers
    gpu_ms, cpu_ms, jpegs = [], [], 0
    for batch in host[1:]:
        moved = batch.to(device, non_blocking=True)
        jpegs += batch.encoded_images.count if batch.encoded_images is not None else 0
        if cuda:
            torch.cuda.synchronize()
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        cpu0, wall0 = time.process_time(), time.perf_counter()
        if cuda:
            start.record()
        decode_batch(moved)
        if cuda:
            end.record()
            end.synchronize()
            gpu_ms.append(start.elapsed_time(end))
        else:
            gpu_ms.append((time.perf_counter() - wall0) * 1e3)
        cpu_ms.append((time.process_time() - cpu0) * 1e3)
    n = len(host) - 1
    per_batch = sorted(gpu_ms)[n // 2]
    return {
        "mode": mode.name,
        "device": torch.cuda.get_device_name(0) if cuda else "cpu",
        "batches": n,
        "batch_size": host[0].size,
        "jpegs_per_batch": jpegs / n,
        "decode_ms_per_batch": per_batch,
        "decode_us_per_sample": per_batch * 1e3 / host[0].size,
        "host_cpu_ms_per_batch": sorted(cpu_ms)[n // 2],
        "timed_with": "CUDA events (median batch)" if cuda else "wall clock on the CPU (median batch)",
    }


def textured_jpeg_cost(size: int) -> dict[str, float]:
    """The synthetic covers are flat shapes (small JPEGs, quick to decode); a photo-like, noisy JPEG of the same size
    shows what real covers may cost."""
    from PIL import Image

    rng = np.random.default_rng(0)
    base = rng.integers(0, 256, size=(size // 8, size // 8, 3), dtype=np.uint8)
    pixels = np.kron(base, np.ones((8, 8, 1), dtype=np.uint8))
    pixels = np.clip(pixels.astype(np.int16) + rng.normal(0, 12, pixels.shape), 0, 255).astype(np.uint8)
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, format="JPEG", quality=90)
    data = buf.getvalue()
    reps = 100
    t, _, _ = best_of(3, lambda: [decode_image(data, size) for _ in range(reps)])
    return {"bytes": len(data), "decode_us": t / reps * 1e6}


def profile(stream: BatchStream, args: argparse.Namespace, top: int = 15) -> list[dict[str, Any]]:
    """cProfile of a worker-less pass (a few batches after one warm-up batch): the top functions by own time."""
    batches = iter(stream)
    next(batches)
    prof = cProfile.Profile()
    prof.enable()
    for _ in range(max(2, args.breakdown_samples // args.batch_size)):
        next(batches)
    prof.disable()
    batches.close()
    stats = pstats.Stats(prof)
    total = stats.total_tt  # type: ignore[attr-defined]
    rows = []
    for (file, line, func), (_, calls, tottime, cumtime, _) in stats.stats.items():  # type: ignore[attr-defined]
        where = re.sub(r".*/(site-packages|lib/python3\.\d+)/", "", file)
        where = where.replace(str(REPO) + "/", "")
        rows.append(
            {
                "function": f"{where}:{line}({func})",
                "calls": calls,
                "own_share": tottime / total,
                "cum_share": cumtime / total,
            }
        )
    rows.sort(key=lambda r: -r["own_share"])
    return rows[:top]


# ------------------------------------------------------------------------------------------------- hardware


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def usable_cores() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:
        return os.cpu_count() or 1


def gpu_name() -> str | None:
    try:
        if torch.cuda.is_available():
            return torch.cuda.get_device_name(0)
    except Exception:  # noqa: BLE001 (a broken driver still leaves a CPU benchmark worth reporting)
        pass
    return None


def slug(text: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-")


def host_kind(cores: int, gpu: str | None) -> str:
    """`h100-16core`, or `cpu-2core-amd-epyc` on a machine without a GPU."""
    if gpu:
        match = re.search(r"\b([A-Z]+\d{2,4}[A-Z]?)\b", gpu.replace("NVIDIA", ""))
        name = slug(match.group(1)) if match else slug(gpu)
        return f"{name}-{cores}core"
    model = re.sub(r"\((R|TM)\)|CPU|Processor|\d+-Core|@.*", " ", cpu_model())
    return f"cpu-{cores}core-{slug(' '.join(model.split()[:4]))}"


def versions() -> dict[str, str]:
    out = {"python": platform.python_version(), "torch": torch.__version__, "numpy": np.__version__}
    for name in ("transformers", "tokenizers", "PIL", "torchrec", "webdataset"):
        try:
            out[name] = str(__import__(name).__version__)
        except Exception:  # noqa: BLE001
            out[name] = "?"
    return out


def git_commit() -> str:
    try:
        head = subprocess.run(
            ["git", "-C", str(REPO), "rev-parse", "--short", "HEAD"],
            capture_output=True,
            text=True,
            check=True,
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "-C", str(REPO), "status", "--porcelain", "--untracked-files=no", "trainer"],
            capture_output=True,
            text=True,
            check=True,
        ).stdout.strip()
        return head + (" (trainer/ modified)" if dirty else "")
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def loadavg() -> float | None:
    return round(os.getloadavg()[0], 2) if hasattr(os, "getloadavg") else None


def memory_gib() -> float:
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal"):
                return int(line.split()[1]) / 2**20
    except OSError:
        pass
    return 0.0


# ------------------------------------------------------------------------------------------------- report


def markdown(report: dict[str, Any]) -> str:
    h = report["hardware"]
    lines = [
        f"# Data-loader benchmark, {report['date']}, {report['host_kind']}",
        "",
        f"- CPU: {h['cpu_model']}, {h['cores']} usable cores (os.cpu_count {h['cpu_count']}), "
        f"{h['memory_gib']:.0f} GiB memory",
        f"- GPU: {h['gpu'] or 'none'}",
        f"- Load average (1 min) before the run: {h['loadavg_before']}, after: {h['loadavg_after']}"
        + (
            " (other processes shared the CPUs: samples/s are low; samples/CPU-s hold)"
            if (h["loadavg_before"] or 0) > 0.25 * h["cores"]
            else ""
        ),
        "- Software: " + ", ".join(f"{k} {v}" for k, v in report["versions"].items()),
        f"- Code: {report['commit']}",
        f"- Command: `{report['command']}`",
        f"- Settings: batch {report['settings']['batch_size']}, shuffle buffer {report['settings']['shuffle_buffer']}, "
        f"{report['settings']['seconds']:g} s per point after {report['settings']['warmup']} warm-up batches per "
        f"worker, pin_memory={report['settings']['pin_memory']}; shards read from the page cache",
        "",
        "## Throughput (train stream, `make_batch_stream`)",
        "",
        "CPU: cores kept busy by the reader (this process and its workers); samples/CPU-s: samples per CPU-second, "
        "which other load on the machine leaves about as it is.",
        "",
        "| mode | workers | samples/s | per worker | CPU | samples/CPU-s | batches | seconds | first batch (s) "
        "| main process |",
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for r in report["results"]:
        per_cpu = f"{r['samples_per_cpu_s']:,.0f}" if r["samples_per_cpu_s"] else "?"
        lines.append(
            f"| {r['mode']} | {r['workers']} | {r['samples_per_s']:,.0f} | {r['per_worker']:,.0f} "
            f"| {r['cores_busy']:.2f} | {per_cpu} | {r['batches']} | {r['seconds']:.1f} | {r['first_batch_s']:.1f} "
            f"| {100 * r['main_process_cpu']:.0f}% |"
        )
    if any(r["epoch_boundaries"] for r in report["results"]):
        lines += ["", "Some points crossed an epoch boundary (a DataLoader restart) while measured."]
    lines += ["", "## Against the goal", ""]
    lines += [f"- {line}" for line in report["verdict"]]
    for d in report.get("device_decode", []):
        lines += ["", f"## JPEG decoding on the device: {d['mode']}", ""]
        if "error" in d:
            lines.append(f"Not measured on {d['device']}: {d['error']}.")
            continue
        lines += [
            f"`trainer/data/device_decode.py`'s `decode_batch` (what `Trainer.to_device` runs) on {d['device']}, "
            f"{d['batches']} batches of {d['batch_size']} ({d['jpegs_per_batch']:.0f} JPEGs each), timed with "
            f"{d['timed_with']}: **{d['decode_ms_per_batch']:.2f} ms a batch**, {d['decode_us_per_sample']:.1f} µs "
            f"a sample; the training process spent {d['host_cpu_ms_per_batch']:.2f} CPU-ms a batch in it. Compare "
            "with the step time (benchmarks/step.py): the goal is under 10% of the step.",
        ]
    for b in report["breakdown"]:
        lines += [
            "",
            f"## Where the time goes: {b['mode']} (CPU-µs per sample, one process and thread, {b['samples']} samples)",
            "",
            f"{'binary' if b.get('record') == 'rec' else 'JSON'} record "
            f"{b.get('record_bytes', b.get('json_bytes', 0)) / 1024:.1f} KiB; mean history lengths "
            + ", ".join(f"{k} {v:.0f}" for k, v in b["mean_history"].items())
            + (f"; JPEG {b['jpeg_bytes'] / 1024:.1f} KiB" if "jpeg_bytes" in b else ""),
            "",
            "| stage | µs/sample | share |",
            "| --- | ---: | ---: |",
        ]
        for stage, us in b["us_per_sample"].items():
            lines.append(f"| {stage} | {us:,.0f} | {100 * us / b['total_us']:.0f}% |")
        lines.append(
            f"| **total** (= {1e6 / b['total_us']:,.0f} samples/s on one core) | {b['total_us']:,.0f} | |"
        )
        zero = [r for r in report["results"] if r["mode"] == b["mode"] and r["workers"] == 0]
        if zero and zero[0]["samples_per_cpu_s"]:
            lines += [
                "",
                f"The stream itself, worker-less, took {1e6 / zero[0]['samples_per_cpu_s']:,.0f} CPU-µs per sample "
                "(the stages above, plus the shuffle buffer and batching).",
            ]
        if "textured_jpeg" in b:
            t = b["textured_jpeg"]
            lines += [
                "",
                f"The synthetic covers are flat shapes; a noisy, photo-like {report['settings']['image_size']}px JPEG "
                f"({t['bytes'] / 1024:.0f} KiB) takes {t['decode_us']:,.0f} µs to decode here.",
            ]
        if "profile" in b:
            lines += [
                "",
                "cProfile, top functions by own time:",
                "",
                "| function | calls | own | cumulative |",
            ]
            lines.append("| --- | ---: | ---: | ---: |")
            for p in b["profile"]:
                lines.append(
                    f"| `{p['function']}` | {p['calls']} | {100 * p['own_share']:.1f}% | {100 * p['cum_share']:.1f}% |"
                )
    return "\n".join(lines) + "\n"


def verdict(results: list[dict[str, Any]], cores: int) -> list[str]:
    """Per kind (text, image): the best rate here against the goal, and what one worker's rate per CPU-second says
    about 16 workers on 16 cores (an upper bound: it assumes the workers scale linearly)."""
    out = []
    for kind, goal in GOALS.items():
        rows = [r for r in results if MODES[r["mode"]].kind == kind]
        if not rows:
            continue
        best = max(rows, key=lambda r: r["samples_per_s"])
        line = (
            f"{kind}: best {best['samples_per_s']:,.0f} samples/s here ({best['mode']}, {best['workers']} workers, "
            f"{cores} cores); the goal is {goal:,} on {GOAL_CORES} cores, "
            f"{goal / GOAL_CORES:,.0f} samples/s per worker."
        )
        for mode in dict.fromkeys(r["mode"] for r in rows):
            one = [r for r in rows if r["mode"] == mode and r["workers"] == 1 and r["samples_per_cpu_s"]]
            if one:
                rate = one[0]["samples_per_cpu_s"]
                line += (
                    f" {mode}: one worker gives {one[0]['samples_per_s']:,.0f}/s, {rate:,.0f} per CPU-second "
                    f"(x{GOAL_CORES} = {rate * GOAL_CORES:,.0f}: "
                    + ("enough" if rate * GOAL_CORES >= goal else "short")
                    + " if workers scale linearly)."
                )
        if cores >= GOAL_CORES:
            line += " Goal " + ("met." if best["samples_per_s"] >= goal else "NOT met.")
        out.append(line)
    device = [
        r
        for r in results
        if DEVICE_DECODE in MODES[r["mode"]].overrides and r["workers"] >= 1 and r["samples_per_cpu_s"]
    ]
    if device:
        best = max(device, key=lambda r: r["samples_per_cpu_s"])
        goal = GOAL_DEVICE_DECODE_PER_CPU_S
        out.append(
            f"{best['mode']}: the reader gives {best['samples_per_cpu_s']:,.0f} samples per CPU-second at best "
            f"({best['workers']} workers), the JPEGs left to the device; the goal is {goal:,}: "
            + ("met." if best["samples_per_cpu_s"] >= goal else "NOT met.")
            + " The device's decode time is reported apart, below."
        )
    return out


# ------------------------------------------------------------------------------------------------- main


def default_workers(cores: int) -> list[int]:
    counts = [0] + [w for w in (1, 2, 4, 8, 16, 32, 64) if w <= cores]
    return counts if cores in counts else [*counts, cores]


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter
    )
    p.add_argument("--data-dir", type=Path, default=Path("/tmp/lemur-bench-data"), help="dataset cache")
    p.add_argument("--out", type=Path, default=REPO / "benchmarks" / "results", help="results folder")
    p.add_argument("--modes", nargs="+", choices=list(MODES), default=list(MODES))
    p.add_argument(
        "--workers", nargs="+", type=int, help="worker counts (default: 0 1 2 4 8 16, up to the cores)"
    )
    p.add_argument("--seconds", type=float, default=8.0, help="measured seconds per point")
    p.add_argument("--min-batches", type=int, default=3, help="measure at least this many batches per point")
    p.add_argument("--warmup", type=int, default=2, help="warm-up batches per worker (uncounted)")
    p.add_argument("--batch-size", type=int, default=512)
    p.add_argument("--shuffle-buffer", type=int, default=2000)
    p.add_argument("--samples", type=int, default=24_000, help="samples per generated dataset")
    p.add_argument("--breakdown-samples", type=int, default=2048, help="samples timed in the stage breakdown")
    p.add_argument("--breakdown-repeats", type=int, default=3, help="stage timings: best of this many runs")
    p.add_argument("--no-breakdown", action="store_true", help="skip the per-stage breakdown")
    p.add_argument(
        "--decode-batches",
        type=int,
        default=10,
        help="batches timed for the device decode (em3-image-device)",
    )
    p.add_argument(
        "--profile", action="store_true", help="add a cProfile top-15 of a worker-less pass per mode"
    )
    p.add_argument(
        "--pin-memory", action="store_true", help="pin batches as a CUDA trainer would (needs CUDA)"
    )
    p.add_argument("--regenerate", action="store_true", help="make the datasets again even if cached")
    p.add_argument("--host-kind", help="hardware name for the results file (default: from the CPU/GPU)")
    p.add_argument("--quick", action="store_true", help="smoke run: small data, 0-1 workers, 2 s per point")
    args = p.parse_args(argv)
    if args.quick:
        args.samples = min(args.samples, 4_000)
        args.seconds = min(args.seconds, 2.0)
        args.batch_size = min(args.batch_size, 128)
        args.shuffle_buffer = min(args.shuffle_buffer, 256)
        args.breakdown_samples = min(args.breakdown_samples, 256)
        args.workers = args.workers or [0, 1]
        args.decode_batches = min(args.decode_batches, 3)
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    load_before = loadavg()
    cores, gpu = usable_cores(), gpu_name()
    if args.pin_memory and gpu is None:
        raise SystemExit("--pin-memory needs a CUDA device")
    workers = args.workers or default_workers(cores)
    modes = [MODES[m] for m in args.modes]
    kind = args.host_kind or host_kind(cores, gpu)
    print(f"data-loader benchmark on {kind}: {cpu_model()}, {cores} cores, GPU {gpu or 'none'}", flush=True)

    paths = {
        d: ensure_dataset(args.data_dir, d, args.samples, args.regenerate) for d in {m.dataset for m in modes}
    }
    results, breakdown, decode_costs = [], [], []
    for mode in modes:
        for w in workers:
            r = measure(mode, paths[mode.dataset], w, args)
            results.append(r)
            print(
                f"{mode.name:>10} {w:>3} workers: {r['samples_per_s']:>9,.0f} samples/s "
                f"({r['batches']} batches in {r['seconds']:.1f}s, first batch after {r['first_batch_s']:.1f}s)",
                flush=True,
            )
        cost = device_decode_cost(mode, paths[mode.dataset], args)
        if cost is not None:
            decode_costs.append(cost)
            print(
                f"{mode.name:>10} decode on {cost['device']}: "
                + (cost["error"] if "error" in cost else f"{cost['decode_ms_per_batch']:.2f} ms/batch"),
                flush=True,
            )
        if not args.no_breakdown:
            breakdown.append(stage_breakdown(mode, paths[mode.dataset], args))
            b = breakdown[-1]
            print(
                f"{mode.name:>10} stages (µs/sample): "
                + ", ".join(f"{k} {v:,.0f}" for k, v in b["us_per_sample"].items()),
                flush=True,
            )

    today = datetime.date.today().isoformat()
    report = {
        "date": today,
        "host_kind": kind,
        "hardware": {
            "cpu_model": cpu_model(),
            "cores": cores,
            "cpu_count": os.cpu_count(),
            "memory_gib": memory_gib(),
            "gpu": gpu,
            "platform": platform.platform(),
            "loadavg_before": load_before,
            "loadavg_after": loadavg(),
        },
        "versions": versions(),
        "commit": git_commit(),
        "command": " ".join(
            ["python", "benchmarks/data_loader.py", *(argv if argv is not None else sys.argv[1:])]
        ),
        "settings": {
            "batch_size": args.batch_size,
            "shuffle_buffer": args.shuffle_buffer,
            "seconds": args.seconds,
            "warmup": args.warmup,
            "pin_memory": args.pin_memory,
            "image_size": 224,
            "samples_per_dataset": args.samples,
            "workers": workers,
            "modes": {m.name: m.about for m in modes},
        },
        "results": results,
        "verdict": verdict(results, cores),
        "breakdown": breakdown,
        "device_decode": decode_costs,
    }
    args.out.mkdir(parents=True, exist_ok=True)
    stem = args.out / f"data_loader-{today}-{kind}"
    text = markdown(report)
    stem.with_suffix(".md").write_text(text)
    stem.with_suffix(".json").write_text(json.dumps(report, indent=1) + "\n")
    print("\n" + text)
    print(f"wrote {stem}.md and {stem}.json")
    return 0


if __name__ == "__main__":
    sys.exit(main())
