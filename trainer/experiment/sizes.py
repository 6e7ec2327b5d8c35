"""How big an experiment's runs are: a preset, overrides on it, and how many runs share the machine at once.

`small` is sized for the 2-core CPU CI machine (a table of 8 variants x 3 seeds in under 30 minutes); `large` for
one GPU (bf16, ZeRO-2, more samples, bigger towers) in under 20 minutes a table.
"""

from __future__ import annotations

from dataclasses import dataclass

QUIET = (
    "training.eval_every=0",
    "training.checkpoint_every=0",
    "logging.tensorboard=false",
    "logging.progress_bar=false",
)
"""Every experiment run: one eval at the end, the final checkpoint only (deleted once read), no TensorBoard."""


@dataclass(frozen=True)
class Size:
    name: str
    preset: str
    overrides: tuple[str, ...]
    jobs: int
    """Runs at a time (each gets cores / (jobs x nproc) OpenMP threads)."""
    description: str


SMALL = Size(
    name="small",
    preset="tiny",
    overrides=(
        *QUIET,
        "data.batch_size=128",
        "training.steps=200",
        "model.text_tower.hidden=32",
        "model.query_tower.hidden=32",
        "model.vision_tower.hidden=32",
        "model.max_history={long = 50}",
        "logging.log_every=10",
    ),
    jobs=2,
    description="tiny preset, towers 32 wide, long history cut to 50: 40k synthetic samples (800 items, 300 users), "
    "200 steps of 128 (0.8 epoch), one process a run, 2 runs at a time on one thread each",
)
"""Measured on the 2-core CPU (shared, so +-30% from run to run and up to 2x when other work runs): a full LEMUR
run about 2 minutes (0.35-0.45 s a step, ~35 s start-up and eval), an ID-only run under 1, 2 at a time. At 150 steps
of 128 with 64-wide towers the content models had not yet overtaken the ID-only ones (AUC 0.60 vs 0.65); with
32-wide towers at 200-300 steps they had (0.66-0.69 vs 0.65-0.66). 300 steps at history 100 put the 24-run
ablation table at about 30 minutes on a quiet machine, and 250 at history 50 still close to it, hence 200."""


LARGE = Size(
    name="large",
    preset="small",
    overrides=(
        *QUIET,
        "data.synth.num_samples=200000",
        "data.synth.num_users=10000",
        "data.synth.num_items=20000",
        "data.synth.num_authors=1000",
        "data.synth.samples_per_shard=5000",
        "data.num_workers=6",
        "data.batch_size=512",
        "training.steps=300",
        'training.dtype="bfloat16"',
        "distributed.zero_stage=2",
        "logging.log_every=20",
    ),
    jobs=2,
    description="small preset on one GPU: 200k synthetic samples (20k items, 10k users, histories 50/300), "
    "300 steps of 512 (1 epoch) in bf16 with ZeRO-2, 2-layer 128-wide towers, 2 runs at a time",
)

SIZES: dict[str, Size] = {s.name: s for s in (SMALL, LARGE)}
