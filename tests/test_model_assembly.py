"""The whole model without distribution (the reference path): every history encoder and the SQDC term train."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from tests.conftest import small_config
from trainer.data.reader import make_batch_stream
from trainer.data.spec import read_spec
from trainer.data.text_fields import with_dataset_text
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
    cfg = with_dataset_text(cfg)  # the dataset's text fields, as the trainer resolves them
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


def test_padded_keeps_the_most_recent_items_like_a_loop() -> None:
    from torchrec.sparse.jagged_tensor import JaggedTensor

    from trainer.models.model import padded

    g = torch.Generator().manual_seed(0)
    lengths = torch.tensor([3, 0, 9, 5, 1])
    values = torch.randn(int(lengths.sum()), 2, generator=g, requires_grad=True)
    out, mask = padded(JaggedTensor(values=values, lengths=lengths), 5)
    expected = torch.zeros(5, 5, 2)
    start = 0
    for row, n in enumerate(lengths.tolist()):
        kept = values[start : start + n][-5:]
        expected[row, : len(kept)] = kept.detach()
        assert mask[row].tolist() == [i < len(kept) for i in range(5)]
        start += n
    assert torch.equal(out.detach(), expected)
    out.sum().backward()
    dropped = [3 + i for i in range(4)]  # the 4 oldest of the 9-long row
    assert values.grad[dropped].abs().sum() == 0 and values.grad.abs().sum() == 2 * (3 + 5 + 5 + 1)
    low, low_mask = padded(JaggedTensor(values=values, lengths=lengths), 5, torch.bfloat16)
    assert (
        low.dtype == torch.bfloat16
        and torch.equal(low, out.to(torch.bfloat16))
        and torch.equal(low_mask, mask)
    )
