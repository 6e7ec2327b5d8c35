"""training.compile: the compiled step (blocks or the whole dense arch) trains the losses of the eager one (the
reference) and stays compiled."""

from __future__ import annotations

from pathlib import Path

from tests.test_content_source import BANK, _trainer, in_process

STEPS = 5
TOLERANCE = 1e-4
"""Relative, on float32 losses: inductor fuses and reorders the reductions (LayerNorm, softmax, sums), so the compiled
step rounds differently; measured at <= 2e-7 over these 5 steps and the eval logloss (torch 2.13, CPU)."""


def _losses(dataset: str, out: str, scope: str | None) -> tuple[list[float], dict[str, float], bool]:
    """`scope`: training.compile_scope, None for eager."""
    import torch
    import torch._inductor.config
    from torch.profiler import ProfilerActivity, profile

    torch._inductor.config.fallback_random = True  # dropout draws what eager draws
    compiled = [] if scope is None else ["training.compile=true", f'training.compile_scope="{scope}"']
    t = _trainer(dataset, [*BANK, *compiled], out)
    losses = []
    stream = iter(t.inputs)
    for _ in range(STEPS):  # through step 2, where the MFU meter counts FLOPs under a dispatch mode
        losses.append(float(t.train_step(next(stream))))
        t.step += 1
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        t.train_step(next(stream))
    compiled = any("Compiled" in e.name for e in prof.events())
    metrics = t.evaluate()
    t.close()
    return losses, metrics, compiled


def _compare(dataset: str, out: str) -> None:
    eager, eager_metrics, eager_compiled = _losses(dataset, f"{out}/eager", None)
    assert not eager_compiled
    for scope in ("blocks", "dense"):
        compiled, compiled_metrics, ran_compiled = _losses(dataset, f"{out}/{scope}", scope)
        assert ran_compiled, scope
        for a, b in zip(eager, compiled):
            assert abs(a - b) <= TOLERANCE * abs(a), (scope, eager, compiled)
        eager_logloss, logloss = eager_metrics["logloss"], compiled_metrics["logloss"]
        assert abs(eager_logloss - logloss) <= TOLERANCE * eager_logloss, scope


def test_compiled_step_trains_the_eager_losses(small_dataset: Path, tmp_path: Path) -> None:
    in_process(_compare, str(small_dataset), str(tmp_path))
