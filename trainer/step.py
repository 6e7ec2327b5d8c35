"""One step as one module (TorchRec's `DLRMTrain`): embed → content → dense → loss, returning `(loss, output)`.

`LemurStep` holds the plain model (`LemurModel`: sparse + dense arch), the content source (memory bank, recompute
baseline or none) and the objective. On one process without wrappers it is the reference path. The trainer hands
the same module to DMP (which shards `model.sparse` in place) and routes the dense forward through the DeepSpeed
engine that wraps `model.dense` (`use_dense_engine`); the forward below is the same in both.

The batch comes with its ids already hashed into table rows (the reader's collate does it), so the sharded
collections take `batch.sparse` and `batch.sequences` as they are.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, replace

import torch
from torch import nn
from torch.profiler import record_function

from trainer.config.schema import TrainingConfig
from trainer.content import SERVE, TRAIN, ContentSource, StepContent
from trainer.data.batch import Batch
from trainer.losses import objective_loss
from trainer.models.model import DenseOutput, Embedded, LemurModel

DenseForward = Callable[[Batch, Embedded, "torch.Tensor | None"], DenseOutput]


@dataclass
class StepOutput:
    dense: DenseOutput
    """Logits, the target's content vector, the query vector, the CIC projections."""
    content: StepContent | None
    """Where the content vectors came from (None without a content source); `after_step` writes from it."""

    @property
    def logits(self) -> torch.Tensor:
        return self.dense.logits


class LemurStep(nn.Module):
    def __init__(
        self,
        model: LemurModel,
        content: ContentSource | None,
        objective: TrainingConfig,
        dtype: torch.dtype = torch.float32,
        autocast: torch.dtype | None = None,
    ) -> None:
        """`dtype`: what the embeddings are cast to before the dense arch; `autocast`: the dtype the content and
        dense parts run under torch.autocast (None: off, the weights carry the dtype)."""
        super().__init__()
        self.model = model
        self.content = content
        self.objective = objective
        self.dtype = dtype
        self.autocast = autocast
        # A bound method, not a module: the engine that replaces it wraps model.dense, which is already ours.
        self.dense_forward: DenseForward = model.dense.__call__

    def use_dense_engine(self, engine: nn.Module) -> None:
        """Run the dense arch through `engine` (DeepSpeed's, which wraps model.dense) from now on."""
        self.dense_forward = engine.__call__

    def forward(self, batch: Batch, step: int = 0, mode: str = TRAIN) -> tuple[torch.Tensor, StepOutput]:
        """`step`: the global step (the bank's reads and writes are versioned by it, encoder sampling is seeded
        by it); `mode`: train, eval (targets encoded, no dedup join) or serve (content from the bank only)."""
        encoder = self.model.dense.content
        if encoder is not None and encoder.frozen_cache is not None and encoder.frozen_cache.host:
            encoder.serve(batch)  # the frozen-feature rows this batch brought from the host (to_device)
        # The labels name the phases of a step in a torch.profiler trace (benchmarks/step.py reads them).
        with record_function("embed"):
            embedded = self.model.embed(batch, self.dtype)
            if self.dtype != torch.float32:
                embedded, batch = self.cast(embedded), replace(batch, dense=batch.dense.to(self.dtype))
        device = embedded.pooled.device.type
        with torch.autocast(device, self.autocast or torch.bfloat16, enabled=self.autocast is not None):
            content = None
            if self.content is not None:
                with record_function("content"):
                    content = self.content.prepare(batch, embedded, step, mode)
                embedded.history_content = content.histories
            elif mode == SERVE:
                raise ValueError("scoring from the bank needs memory_bank.enabled with mode 'bank'")
            with record_function("dense_forward"):
                out = self.dense_forward(batch, embedded, content.target if content is not None else None)
            with record_function("loss"):
                loss = objective_loss(self.objective, batch, out)
        return loss, StepOutput(out, content)

    def after_step(self, batch: Batch, output: StepOutput, step: int, measure: bool) -> None:
        """After the optimizer step: the content source's writes (the bank stores this step's fresh vectors)."""
        if self.content is not None and output.content is not None:
            with record_function("bank_write"):
                self.content.after_step(batch, output.content, step, measure)

    def cast(self, embedded: Embedded) -> Embedded:
        histories = {k: (v.to(self.dtype), m) for k, (v, m) in embedded.histories.items()}
        pooled, target = embedded.pooled.to(self.dtype), embedded.target.to(self.dtype)
        return Embedded(pooled, target, histories, embedded.history_ids, embedded.history_content)
