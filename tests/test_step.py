"""The step module is the model that trains: `Trainer` (DMP + DeepSpeed, one gloo process) and the plain
`LemurStep` on one process without wrappers give the same loss and the same gradients on the same batch, with
the memory bank on (a fresh bank) and off."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from torch import nn

from tests.test_content_source import BANK, _trainer, in_process

SPARSE_LR = 0.5
REFERENCE = [
    'embeddings.optimizer="sgd"',  # the fused update is then -lr * gradient: the tables' gradient is observable
    f"embeddings.lr={SPARSE_LR}",
    'embeddings.sharding_types=["table_wise"]',
]


def full_tensor(value: object) -> torch.Tensor:
    """A plain tensor, or the whole table of a one-process sharded one (a single local shard)."""
    if isinstance(value, torch.Tensor) and not hasattr(value, "local_shards"):
        return value.detach()
    shards = value.local_shards()  # type: ignore[attr-defined]
    assert len(shards) == 1 and list(shards[0].tensor.shape) == list(value.size())  # type: ignore[attr-defined]
    return shards[0].tensor.detach()


def sparse_weights(module: nn.Module) -> dict[str, torch.Tensor]:
    return {k: full_tensor(v).clone() for k, v in module.state_dict().items()}


def _same_step(dataset: str, out: str, bank: bool) -> None:
    from trainer.content import build_content_source
    from trainer.models.model import build_model
    from trainer.step import LemurStep

    t = _trainer(dataset, [*REFERENCE, *(BANK if bank else [])], out)
    collator = t.train_stream.dataset.collator
    plain = build_model(
        t.cfg, t.spec, t.plan, len(collator.tokenizer), collator.tokenizer.pad_token_id, "cpu"
    )
    plain.dense.load_state_dict(t.model.dense.state_dict())
    before = sparse_weights(t.model.sparse)
    plain.sparse.load_state_dict(before)
    content = build_content_source(t.cfg, t.spec, plain.dense.content, t.items, torch.device("cpu"))
    reference = LemurStep(plain, content, t.cfg.training)
    assert (t.content_source is None) == (not bank) and (content is None) == (not bank)

    batch = next(iter(t.train_stream))
    torch.manual_seed(1)  # the same dropout masks on both paths
    loss, out_trainer = t.forward(batch)
    t.engine.backward(loss)
    torch.manual_seed(1)
    expected, out_plain = reference(batch)
    expected.backward()

    assert float(loss) == pytest.approx(float(expected), rel=1e-6, abs=1e-7)
    assert torch.allclose(out_trainer.logits, out_plain.logits, atol=1e-5)
    if bank:  # the histories carried content vectors: fresh targets joined in (the bank itself is empty)
        for name, vectors in out_plain.content.histories.items():
            assert torch.allclose(out_trainer.content.histories[name], vectors, atol=1e-6), name
        assert any(bool(v.abs().sum() > 0) for v in out_plain.content.histories.values())
    dense = dict(plain.dense.named_parameters())
    compared = 0
    for name, p in t.model.dense.named_parameters():
        if p.grad is None:
            assert dense[name].grad is None or not bool(dense[name].grad.any()), name
            continue
        assert torch.allclose(p.grad, dense[name].grad, rtol=1e-4, atol=1e-6), name
        compared += 1
    assert compared > 10
    # The tables were updated in the backward (fused SGD): the update is -lr times the plain gradient.
    after = sparse_weights(t.model.sparse)
    grads = {k: v.grad for k, v in plain.sparse.named_parameters()}
    assert set(grads) == set(after)
    for name, grad in grads.items():
        assert grad is not None and bool(grad.abs().sum() > 0), name
        update = (before[name] - after[name]) / SPARSE_LR
        assert torch.allclose(update, grad, atol=1e-5), (name, (update - grad).abs().max())


@pytest.mark.slow
@pytest.mark.parametrize("bank", [False, True], ids=["no_bank", "fresh_bank"])
def test_trainer_and_plain_step_module_agree(small_dataset: Path, tmp_path: Path, bank: bool) -> None:
    in_process(_same_step, str(small_dataset), str(tmp_path / "run"), bank)
