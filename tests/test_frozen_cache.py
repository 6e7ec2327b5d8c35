"""EM3's frozen-feature cache: a tower's frozen bottom is a fixed function of the item (eval mode, in training too),
so its output computed once and looked up by id gives the step the same loss and the same gradients as computing
it; the trainable top alone gets gradients either way."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from tests.test_content_source import _trainer, in_process
from trainer.config.schema import TowerConfig
from trainer.data.batch import Tokens
from trainer.models.towers import TextTower, VisionTower

TOWER = TowerConfig(layers=3, hidden=32, heads=2, trainable_top_layers=1)


def text_inputs(batch: int = 4) -> list[Tokens]:
    generator = torch.Generator().manual_seed(0)
    fields = []
    for budget in (6, 10):
        ids = torch.randint(5, 100, (batch, budget), generator=generator)
        lengths = torch.randint(1, budget + 1, (batch,), generator=generator)
        mask = (torch.arange(budget)[None, :] < lengths[:, None]).long()
        fields.append(Tokens(ids * mask, mask))
    return fields


def test_the_frozen_bottom_stays_in_eval_mode_and_the_top_trains() -> None:
    tower = TextTower(TOWER, vocab_size=100, num_fields=2, max_tokens=16, pad_token_id=0).train()
    assert tower.frozen_layers == 2
    assert not tower.encoder.embeddings.training
    assert [layer.training for layer in tower.top_layers()] == [True]
    layers = tower.encoder.encoder.layer
    assert not layers[0].training and not layers[1].training and layers[2].training


def test_text_tower_from_cached_features_matches_the_full_forward() -> None:
    tower = TextTower(TOWER, vocab_size=100, num_fields=2, max_tokens=16, pad_token_id=0).train()
    fields = text_inputs()
    mask = torch.cat([f.attention_mask for f in fields], dim=1)
    torch.manual_seed(3)  # the top block's dropout draws the same masks on both paths
    full = tower(fields)
    torch.manual_seed(3)
    cached = tower.from_frozen(tower.frozen_features(fields), mask)
    real = mask.bool()
    assert torch.allclose(full.tokens[real], cached.tokens[real], atol=1e-5)
    assert torch.allclose(full.pooled, cached.pooled, atol=1e-5)
    full.pooled.sum().backward()
    grads = {n: p.grad.clone() for n, p in tower.named_parameters() if p.grad is not None}
    tower.zero_grad(set_to_none=True)
    cached.pooled.sum().backward()
    assert grads and all(n.startswith("encoder.encoder.layer.2.") for n in grads)
    for name, p in tower.named_parameters():
        if name in grads:
            assert torch.allclose(p.grad, grads[name], atol=1e-5), name


def test_vision_tower_from_cached_features_matches_the_full_forward() -> None:
    tower = VisionTower(TOWER, image_size=16, patch_size=8).eval()
    images = torch.randint(0, 256, (3, 2, 3, 16, 16), dtype=torch.uint8)
    image_mask = torch.tensor([[True, False], [True, True], [False, False]])
    full = tower(images, image_mask)
    cached = tower.from_frozen(tower.frozen_features(images), image_mask)
    assert torch.allclose(full.tokens, cached.tokens, atol=1e-5)
    assert torch.allclose(full.pooled, cached.pooled, atol=1e-5)


CACHED = [
    "model.text_tower.layers=2",
    "model.text_tower.trainable_top_layers=1",
    "model.vision_tower.layers=2",
    "model.vision_tower.trainable_top_layers=1",
    "model.frozen_cache=true",
]


def _same_loss_with_and_without_cache(dataset: str, out: str) -> None:
    t = _trainer(dataset, CACHED, out)
    content = t.model.dense.content
    t.build_frozen_cache()
    cache = content.frozen_cache
    assert cache is not None and len(cache) == len(t.items) and cache.images is not None
    stream = iter(t.train_stream)
    for _ in range(2):
        batch = next(stream)
        assert batch.items_known
        losses = []
        for use_cache in (True, False):  # both forwards first: the fused sparse optimizer updates in backward
            content.frozen_cache = cache if use_cache else None
            torch.manual_seed(5)
            losses.append(t.forward(batch)[0])
        assert float(losses[0]) == pytest.approx(float(losses[1]), rel=1e-6)
        grads = []
        for loss in losses:
            loss.backward()
            grads.append({n: p.grad.clone() for n, p in content.named_parameters() if p.grad is not None})
            content.zero_grad(set_to_none=True)
        assert grads[0].keys() == grads[1].keys() and any("vision" in n for n in grads[0])
        for name, grad in grads[0].items():
            assert torch.allclose(grad, grads[1][name], atol=1e-6), name
        # the frozen bottoms get no gradient on either path
        assert not any(".layer.0." in n or "embeddings" in n for n in grads[0])
    content.frozen_cache = cache
    assert torch.isfinite(t.train_step(next(stream)))  # the trainer's own step over the cache


@pytest.mark.slow
def test_cached_and_uncached_steps_give_the_same_loss_and_gradients(
    small_dataset: Path, tmp_path: Path
) -> None:
    in_process(_same_loss_with_and_without_cache, str(small_dataset), str(tmp_path / "run"))


def test_the_cache_needs_a_frozen_bottom() -> None:
    from trainer.config import ConfigError, load_config

    with pytest.raises(ConfigError, match="frozen_cache"):
        load_config("tiny", ["model.frozen_cache=true"])
