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
    cached = _trainer(dataset, CACHED, out + "/cached")  # its reader decodes no image: the cache has them
    plain = _trainer(
        dataset, CACHED[:-1], out + "/plain"
    )  # the same model, decoding and computing everything
    cached.build_frozen_cache()
    cache = cached.model.dense.content.frozen_cache
    assert cache is not None and len(cache) == len(cached.items) and cache.images is not None
    for (name, a), (_, b) in zip(
        cached.model.dense.state_dict().items(), plain.model.dense.state_dict().items()
    ):
        assert torch.equal(a, b), name  # one seed, one init
    cached_batches, plain_batches = iter(cached.train_stream), iter(plain.train_stream)
    for step in range(3):
        batch, reference = next(cached_batches), next(plain_batches)
        assert torch.equal(batch.item_id, reference.item_id) and batch.known_item_ids is not None
        assert torch.equal(batch.image_mask, reference.image_mask) and bool(batch.image_mask.any())
        assert batch.images.numel() == 0 and bool(reference.images.any())  # no JPEG decoded, no pixels
        losses = []
        for trainer, b in ((cached, batch), (plain, reference)):
            torch.manual_seed(5 + step)  # the top blocks' dropout draws alike
            losses.append(float(trainer.train_step(b)))
            trainer.step += 1
        assert losses[0] == pytest.approx(losses[1], rel=1e-5), step
    for (name, a), (_, b) in zip(cached.model.dense.named_parameters(), plain.model.dense.named_parameters()):
        assert torch.allclose(a, b, atol=1e-5), name  # the same updates: the frozen bottoms got none


@pytest.mark.slow
def test_cached_and_uncached_steps_give_the_same_loss_and_gradients(
    small_dataset: Path, tmp_path: Path
) -> None:
    in_process(_same_loss_with_and_without_cache, str(small_dataset), str(tmp_path / "run"))


def test_the_cache_needs_a_frozen_bottom() -> None:
    from trainer.config import ConfigError, load_config

    with pytest.raises(ConfigError, match="frozen_cache"):
        load_config("tiny", ["model.frozen_cache=true"])


def test_with_the_cache_a_sample_whose_item_is_not_in_items_parquet_is_bad(
    small_dataset: Path, tmp_path: Path
) -> None:
    import shutil

    import pyarrow.compute as pc
    import pyarrow.parquet as pq

    from tests.conftest import small_config
    from trainer.data.decode import BadSample
    from trainer.data.reader import make_batch_stream

    data = tmp_path / "data"
    shutil.copytree(small_dataset, data, ignore=shutil.ignore_patterns(".cache"))
    items = pq.read_table(data / "items.parquet")
    kept = items.filter(pc.not_equal(pc.bit_wise_and(items["item_id"], 1), 1))  # odd items gone
    pq.write_table(kept, data / "items.parquet")
    overrides = [*CACHED, "data.bad_input=skip", "data.num_workers=0"]
    skipped: dict[str, int] = {}
    for batch in make_batch_stream(small_config(data, *overrides), "eval"):
        for reason, n in batch.skipped.items():
            skipped[reason] = skipped.get(reason, 0) + n
        ids = batch.item_id[batch.valid]
        assert not bool((ids % 2 == 1).any())
        assert batch.known_item_ids is not None  # an all-padding batch takes any cached item
        assert batch.images.numel() == 0
    assert skipped.get("not_in_items", 0) > 0, skipped
    with pytest.raises(BadSample, match="item_id.*not_in_items"):
        for _ in make_batch_stream(small_config(data, *CACHED, "data.num_workers=0"), "eval"):
            pass
