"""MFU: the dense step's FLOPs counted once with torch's FlopCounterMode, against the GPU's peak bf16 rate."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch
from torch.utils.flop_counter import FlopCounterMode

# Dense bf16 tensor-core peaks (no sparsity), by device-name fragment.
PEAK_BF16_FLOPS = {"H200": 989e12, "H100": 989e12, "A100": 312e12, "L40S": 362e12}
MEASURE_AT_STEP = 2  # after warm-up steps, before the loop settles


def eager() -> contextlib.AbstractContextManager:
    """Compiled blocks run eagerly inside: a compiled frame entered under FlopCounterMode (a dispatch mode) is
    never run compiled again in this process (seen on torch 2.11 and 2.13: every later step ran eager)."""
    set_stance = getattr(torch.compiler, "set_stance", None)
    return set_stance("force_eager") if set_stance is not None else contextlib.nullcontext()


class FlopMeter:
    def __init__(self, device: torch.device) -> None:
        self.flops_per_step: float | None = None
        self.peak = None
        if device.type == "cuda":
            name = torch.cuda.get_device_name(device)
            self.peak = next((v for k, v in PEAK_BF16_FLOPS.items() if k in name), None)

    @contextlib.contextmanager
    def measure(self, step: int) -> Iterator[None]:
        """Counts forward + backward FLOPs of one step (matmuls and attention; embedding lookups are not FLOPs)."""
        if step != MEASURE_AT_STEP or self.flops_per_step is not None:
            yield
            return
        counter = FlopCounterMode(display=False)
        with eager(), counter:
            yield
        self.flops_per_step = float(counter.get_total_flops())

    def mfu(self, steps_per_s: float) -> float | None:
        if self.flops_per_step is None or self.peak is None:
            return None
        return self.flops_per_step * steps_per_s / self.peak
