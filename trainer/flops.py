"""MFU: the dense step's FLOPs counted once with torch's FlopCounterMode, against the GPU's peak bf16 rate."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch
from torch.utils.flop_counter import FlopCounterMode

# Dense bf16 tensor-core peaks (no sparsity), by device-name fragment.
PEAK_BF16_FLOPS = {"H200": 989e12, "H100": 989e12, "A100": 312e12, "L40S": 362e12}
MEASURE_AT_STEP = 2  # after warm-up steps, before the loop settles


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
        with counter:
            yield
        self.flops_per_step = float(counter.get_total_flops())

    def mfu(self, steps_per_s: float) -> float | None:
        if self.flops_per_step is None or self.peak is None:
            return None
        return self.flops_per_step * steps_per_s / self.peak
