"""The MFU meter counts one step's FLOPs without knocking compiled blocks back to eager for the rest of the run."""

from __future__ import annotations

import torch
from torch import nn
from torch.profiler import ProfilerActivity, profile

from trainer.flops import MEASURE_AT_STEP, FlopMeter


class Block(nn.Module):
    """User code (dynamo skips torch.nn's own forwards when a builtin module is compiled at the top)."""

    def __init__(self) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(16)
        self.proj = nn.Linear(16, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(torch.nn.functional.gelu(self.norm(x)))


def runs_compiled(block: nn.Module, x: torch.Tensor) -> bool:
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        block(x).sum().backward()
    return any("Compiled" in e.name for e in prof.events())


def test_compiled_blocks_stay_compiled_after_the_counted_step() -> None:
    torch.manual_seed(0)
    block, x = Block(), torch.randn(8, 16)
    block.compile(dynamic=False)
    meter = FlopMeter(torch.device("cpu"))
    for step in range(MEASURE_AT_STEP + 2):
        with meter.measure(step):
            block(x).sum().backward()
    # forward + backward of the two matmuls: 3 x 2 * 8 * 16 * 4 (the LayerNorm and GELU are not counted)
    assert meter.flops_per_step == 3 * 2 * 8 * 16 * 4
    assert runs_compiled(block, x)
