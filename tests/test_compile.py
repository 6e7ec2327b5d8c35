"""training.compile: the compiled step (blocks or the whole dense arch) trains the losses of the eager one (the
reference) and stays compiled."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from tests.test_content_source import BANK, _trainer, in_process

STEPS = 5
TOLERANCE = 1e-4
"""Relative, on float32 losses: inductor fuses and reorders the reductions (LayerNorm, softmax, sums), so the compiled
step rounds differently; measured at <= 2e-7 over these 5 steps and the eval logloss (torch 2.13, CPU)."""
GPU_TOLERANCE = 1e-3
"""Relative, float32 on CUDA: cuBLAS and cuDNN pick other kernels inside and outside a captured graph."""
CONTINUOUS = ["model.similarity_top_k=0"]
"""LEMUR's similarity module picks the top-k history items by cosine: where two nearly tie, a rounding difference
swaps them, and the update then trains another item's row (most likely why one run in about ten drifted 3e-4 by
step 5). Left out of the step comparisons; `test_compiled_similarity_is_the_eager_one` compares the module itself."""


def _losses(
    dataset: str, out: str, scope: str | None, mode: str = "default", cuda: bool = False
) -> tuple[list[float], dict[str, float], bool]:
    """`scope`: training.compile_scope, None for eager; `mode`: training.compile_mode."""
    import torch._inductor.config
    from torch.profiler import ProfilerActivity, profile

    torch._inductor.config.fallback_random = True  # dropout draws what eager draws
    compiled = (
        []
        if scope is None
        else ["training.compile=true", f'training.compile_scope="{scope}"', f'training.compile_mode="{mode}"']
    )
    t = _trainer(dataset, [*BANK, *CONTINUOUS, *compiled], out, backend="nccl" if cuda else "gloo")
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


def _compare(
    dataset: str,
    out: str,
    mode: str = "default",
    cuda: bool = False,
    scopes: tuple[str, ...] = ("blocks", "dense"),
) -> None:
    """Eager against the compile `scopes` in `mode`: the same step losses and eval logloss."""
    tolerance = GPU_TOLERANCE if cuda else TOLERANCE
    eager, eager_metrics, eager_compiled = _losses(dataset, f"{out}/eager", None, cuda=cuda)
    assert not eager_compiled
    for scope in scopes:
        compiled, compiled_metrics, ran_compiled = _losses(dataset, f"{out}/{scope}", scope, mode, cuda)
        assert ran_compiled, scope
        for a, b in zip(eager, compiled):
            assert abs(a - b) <= tolerance * abs(a), (scope, eager, compiled)
        # eval batches have other shapes than training's: under CUDA graphs, the graphs recorded for them too
        eager_logloss, logloss = eager_metrics["logloss"], compiled_metrics["logloss"]
        assert abs(eager_logloss - logloss) <= tolerance * eager_logloss, scope


def test_compiled_similarity_is_the_eager_one() -> None:
    """The similarity module compiled (with the blocks) gives eager's features and gradients, on inputs without
    near-ties."""
    from trainer.models.sequence import Similarity

    generator = torch.Generator().manual_seed(0)
    target = torch.randn(16, 32, generator=generator, requires_grad=True)
    history = torch.randn(16, 20, 32, generator=generator, requires_grad=True)
    mask = torch.rand(16, 20, generator=generator) < 0.8
    mask[0] = False  # an empty history
    weights = torch.randn(16, 8, generator=generator)
    eager = Similarity(4)
    compiled = Similarity(4)
    compiled.compile()
    results = []
    for module in (eager, compiled):
        out = module(target, history, mask)
        grads = torch.autograd.grad((out * weights).sum(), [target, history])
        results.append((out, *grads))
    for want, got in zip(*results):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)


@pytest.mark.skipif(
    torch.cuda.is_available(), reason="the CPU/gloo reference (DeepSpeed puts the model on a GPU host's GPU)"
)
def test_compiled_step_trains_the_eager_losses(small_dataset: Path, tmp_path: Path) -> None:
    in_process(_compare, str(small_dataset), str(tmp_path))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize(
    "scope",
    [
        "blocks",
        pytest.param(
            "dense",
            marks=pytest.mark.xfail(
                reason="on one H200 (torch 2.11.0+cu130, torchrec 1.6.1, 2026-12-03) the process died of SIGSEGV "
                "while compiling the dense scope under reduce-overhead, after the blocks scope had passed; the "
                "lemur-shaped benchmark ran this scope earlier (benchmarks/README.md). Not yet reproduced apart",
                strict=False,
            ),
        ),
    ],
)
def test_cuda_graphs_train_the_eager_losses(small_dataset: Path, tmp_path: Path, scope: str) -> None:
    """training.compile_mode = reduce-overhead (the lemur preset's) replays the compiled blocks, or the whole dense
    forward (compile_scope = dense), as CUDA graphs: the same losses and eval as eager, on the GPU."""
    in_process(_compare, str(small_dataset), str(tmp_path), "reduce-overhead", True, (scope,))
