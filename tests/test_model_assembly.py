"""The whole model without distribution (the reference path): every history encoder and the SQDC term train."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from tests.conftest import small_config
from trainer.data.reader import make_batch_stream
from trainer.data.spec import read_spec
from trainer.models.model import build_model, plan_id_tables
from trainer.step import LemurStep

TINY = [
    "model.text_tower.hidden=32",
    "model.vision_tower.hidden=32",
    "model.patch_size=8",
    "embeddings.dim=8",
]


@pytest.mark.parametrize("encoder", ["mean", "longer"])
def test_model_trains_with_each_history_encoder(small_dataset: Path, encoder: str) -> None:
    torch.manual_seed(0)
    cfg = small_config(small_dataset, *TINY, f"model.history_encoder={encoder}", "training.sqdc_weight=0.1")
    spec = read_spec(small_dataset)
    plan = plan_id_tables(spec, cfg.embeddings)
    stream = make_batch_stream(cfg, "train", epochs=1, table_rows=plan.rows)
    tokenizer = stream.dataset.collator.tokenizer
    model = build_model(cfg, spec, plan, len(tokenizer), tokenizer.pad_token_id, "cpu")
    step = LemurStep(model, None, cfg.training)  # BCE + 0.1 SQDC (training.sqdc_weight)
    optimizer = torch.optim.Adam(model.parameters(), lr=3e-3)
    batches = list(stream)[:8]
    losses = []
    for _ in range(2):
        for batch in batches:
            loss, out = step(batch)
            assert out.logits.shape == (batch.size,) and torch.isfinite(out.logits).all()
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            losses.append(loss.item())
    assert sum(losses[-8:]) < sum(losses[:8])
    if encoder == "longer":
        assert model.dense.decoders is not None
        assert all(p.grad is not None for p in model.dense.decoders.parameters())
        assert model.dense.query_token.weight.grad is not None
