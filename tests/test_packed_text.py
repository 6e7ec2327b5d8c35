"""Text without its padding (`data.text_buckets`): the reader packs each row's real tokens and buckets rows by length;
the content encoder run bucket by bucket is the same function as on the padded fields (eval mode: dropout draws
differ with the shapes), in its outputs and its gradients."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from tests.test_content_source import _trainer, in_process
from trainer.config import load_config
from trainer.data.batch import Tokens
from trainer.data.collate import PAD_MULTIPLE, pack_text
from trainer.models.fusion import ContentEncoder

BUDGETS = (6, 20, 9)


def padded_fields(batch: int, seed: int = 0) -> list[tuple[np.ndarray, np.ndarray]]:
    """Per field: ids [B, budget] (a CLS-like 2 first, then words) and mask, each row 1..budget tokens long."""
    rng = np.random.default_rng(seed)
    fields = []
    for budget in BUDGETS:
        lengths = rng.integers(1, budget + 1, batch)
        mask = (np.arange(budget)[None, :] < lengths[:, None]).astype(np.int64)
        ids = rng.integers(5, 90, (batch, budget)) * mask
        ids[:, 0] = 2
        fields.append((ids, mask))
    return fields


def test_packing_keeps_every_rows_real_tokens_in_field_order() -> None:
    fields = padded_fields(37)
    packed = pack_text(fields, 4)
    assert sorted(packed.rows.tolist()) == list(range(37))
    assert [b[0].shape[0] for b in packed.buckets] == [10, 9, 9, 9]
    start, previous = 0, 0
    for ids, mask, types in packed.buckets:
        rows = packed.rows[start : start + ids.shape[0]].numpy()
        start += ids.shape[0]
        assert ids.shape[1] % PAD_MULTIPLE == 0 or ids.shape[1] == sum(BUDGETS)
        lengths = mask.sum(1)
        assert int(lengths.min()) >= previous and int(lengths.max()) <= ids.shape[1]  # sorted by length
        previous = int(lengths.max())
        for i, row in enumerate(rows):
            expected = np.concatenate([f[0][row][f[1][row] == 1] for f in fields])
            expected_types = np.concatenate([np.full(int(f[1][row].sum()), k) for k, f in enumerate(fields)])
            n = int(lengths[i])
            assert mask[i, :n].all() and not mask[i, n:].any()
            assert ids[i, :n].tolist() == expected.tolist()
            assert types[i, :n].tolist() == expected_types.tolist()


@pytest.mark.parametrize("fusion", ["fqformer", "masked_fqformer", "1flow", "2flow"])
def test_the_encoder_on_packed_text_is_the_encoder_on_padded_text(fusion: str) -> None:
    cfg = load_config(
        "tiny",
        [
            'model.text_fields=["title", "description", "ocr"]',
            f"model.text_max_tokens={list(BUDGETS)}",
            f'model.fusion="{fusion}"',
            "model.text_tower.layers=2",
            "model.text_tower.hidden=32",
            "model.vision_tower.hidden=32",
            "model.patch_size=8",
        ],
    )
    torch.manual_seed(0)
    encoder = ContentEncoder(cfg.model, vocab_size=100, pad_token_id=0, image_size=16).eval()
    fields = padded_fields(12, seed=1)
    text = {
        f: Tokens(torch.from_numpy(ids), torch.from_numpy(mask))
        for f, (ids, mask) in zip(encoder.fields, fields)
    }
    images = torch.randint(0, 256, (12, 1, 3, 16, 16), dtype=torch.uint8)
    image_mask = torch.rand(12, 1) > 0.3
    padded = encoder(text, images, image_mask)
    packed = encoder(text, images, image_mask, packed=pack_text(fields, 3))
    assert torch.allclose(padded, packed, atol=1e-5), (padded - packed).abs().max()
    weights = torch.randn_like(padded)
    grads = []
    for out in (padded, packed):
        encoder.zero_grad(set_to_none=True)
        (out * weights).sum().backward(retain_graph=True)
        grads.append({n: p.grad.clone() for n, p in encoder.named_parameters() if p.grad is not None})
    assert grads[0].keys() == grads[1].keys()
    for name, grad in grads[0].items():
        assert torch.allclose(grad, grads[1][name], atol=1e-4), name


def _same_eval_loss_packed_or_not(dataset: str, out: str) -> None:
    t = _trainer(dataset, ["data.text_buckets=4"], out)
    batch = next(iter(t.train_stream))
    assert batch.packed_text is not None and len(batch.packed_text.buckets) == 4
    widths = [ids.shape[1] for ids, _, _ in batch.packed_text.buckets]
    assert widths == sorted(widths) and widths[-1] <= sum(t.input_ids.shape[1] for t in batch.text.values())
    t.engine.eval()
    with torch.no_grad():
        packed = float(t.forward(batch)[0])
        batch.packed_text = None
        padded = float(t.forward(batch)[0])
    assert packed == pytest.approx(padded, rel=1e-5)


@pytest.mark.slow
def test_the_trainer_gives_the_same_loss_on_packed_and_padded_text(
    small_dataset: Path, tmp_path: Path
) -> None:
    in_process(_same_eval_loss_packed_or_not, str(small_dataset), str(tmp_path / "run"))
