"""Trainer throughput: samples/s (total and per GPU) and MFU for a preset, on whatever this machine has.

    python benchmarks/train_throughput.py --preset small --nproc 1 --steps 100
    python benchmarks/train_throughput.py --preset lemur --nproc 2 --set embeddings.sharding_types='["row_wise"]'

Generates a reduced dataset of the preset's shape (cached under --data-dir), runs the real trainer under torchrun,
and reports the median of the logged windows after the first (warm-up, MFU measurement). Writes a dated,
hardware-named markdown + JSON report under --out.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from trainer.config import load_config  # noqa: E402
from trainer.dataset_tools.synth.generate import synthesize  # noqa: E402


def hardware_name() -> str:
    try:
        import torch

        if torch.cuda.is_available():
            name = torch.cuda.get_device_name(0).replace("NVIDIA ", "").split()[0].lower()
            return f"{name}-x{torch.cuda.device_count()}"
    except ImportError:
        pass
    return f"cpu-{os.cpu_count()}core"


def ensure_data(preset: str, samples: int, data_dir: Path) -> Path:
    out = data_dir / f"{preset}-{samples}"
    if (out / "dataset.json").is_file():
        return out
    cfg = load_config(preset)
    per_shard = max(500, samples // 64)  # plenty of shards for ranks x workers
    overrides = [
        f"data.synth.num_samples={samples}",
        f"data.synth.samples_per_shard={per_shard}",
        "data.synth.eval_share=0.05",
        # The catalog shrinks with the sample count: items.parquet and the tokenizer over a million items cost
        # minutes and do not change the per-step cost being measured.
        f"data.synth.num_items={min(cfg.data.synth.num_items, max(5_000, samples // 4))}",
        f"data.synth.num_users={min(cfg.data.synth.num_users, max(2_000, samples // 10))}",
    ]
    cfg = load_config(preset, overrides)
    started = time.time()
    synthesize(cfg.data.synth, out, vocab_size=cfg.data.vocab_size, force=True, progress=False)
    print(f"synthesised {samples} {preset} samples in {time.time() - started:.0f}s -> {out}", flush=True)
    return out


def run(preset: str, nproc: int, steps: int, data: Path, run_dir: Path, overrides: list[str]) -> dict:
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(nproc)]
    command += [
        "-m",
        "trainer.train",
        "--config",
        preset,
        "--set",
        f'data.path="{data}"',
        "--set",
        f'logging.out_dir="{run_dir}"',
    ]
    fixed = [
        f"training.steps={steps}",
        "training.eval_every=0",
        "training.checkpoint_every=0",
        "logging.log_every=10",
    ]
    for item in [*fixed, "logging.progress_bar=false", "logging.tensorboard=false", *overrides]:
        command += ["--set", item]
    env = {**os.environ, "PYTHONPATH": f"{ROOT}:{os.environ.get('PYTHONPATH', '')}"}
    subprocess.run(command, check=True, cwd=ROOT, env=env)
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    windows = [r for r in records if r["kind"] == "train"][1:]
    final_eval = [r for r in records if r["kind"] == "eval"][-1]
    return {
        "samples_per_s": statistics.median(r["samples_per_s"] for r in windows),
        "samples_per_s_per_gpu": statistics.median(r["samples_per_s_per_rank"] for r in windows),
        "mfu": statistics.median(r["mfu"] for r in windows) if all("mfu" in r for r in windows) else None,
        "final_loss": windows[-1]["loss"],
        "eval_auc": final_eval.get("auc"),
    }


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--preset", default="small")
    parser.add_argument("--nproc", type=int, default=1)
    parser.add_argument("--steps", type=int, default=100)
    parser.add_argument("--samples", type=int, default=100_000, help="dataset size to synthesise")
    parser.add_argument("--data-dir", default="/tmp/lemur-bench-data")
    parser.add_argument("--out", default=str(ROOT / "benchmarks" / "results"))
    parser.add_argument("--label", default="", help="name of this variant in the report")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="A.B=C")
    args = parser.parse_args()
    data = ensure_data(args.preset, args.samples, Path(args.data_dir))
    hardware = hardware_name()
    run_dir = Path(args.data_dir) / "runs" / f"{args.preset}-{args.nproc}-{int(time.time())}"
    result = run(args.preset, args.nproc, args.steps, data, run_dir, args.overrides)
    result.update(
        preset=args.preset, nproc=args.nproc, steps=args.steps, label=args.label, overrides=args.overrides
    )
    result.update(hardware=hardware, host=platform.node(), date=datetime.date.today().isoformat())
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    stem = out / f"train_throughput-{result['date']}-{hardware}"
    with open(f"{stem}.jsonl", "a") as f:
        f.write(json.dumps(result) + "\n")
    mfu = f"{result['mfu']:.1%}" if result["mfu"] is not None else "-"
    line = (
        f"| {args.preset} | {args.label or '-'} | {args.nproc} | {result['samples_per_s']:,.0f} | "
        f"{result['samples_per_s_per_gpu']:,.0f} | {mfu} | {' '.join(args.overrides) or '-'} |"
    )
    md = Path(f"{stem}.md")
    if not md.exists():
        md.write_text(
            f"# Trainer throughput, {result['date']}, {hardware}\n\n"
            "| preset | variant | GPUs | samples/s | samples/s/GPU | MFU | overrides |\n|---|---|---|---|---|---|---|\n"
        )
    with md.open("a") as f:
        f.write(line + "\n")
    print(line)
    return 0


if __name__ == "__main__":
    sys.exit(main())
