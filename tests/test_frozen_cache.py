"""EM3's frozen-feature cache: a tower's frozen bottom is a fixed function of the item (eval mode, in training too),
so its output computed once and looked up by id gives the step the same loss and the same gradients as computing
it; the trainable top alone gets gradients either way."""

from __future__ import annotations

import copy
from dataclasses import replace
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
import torch

from tests.test_content_source import _trainer, in_process
from trainer.config.schema import TowerConfig
from trainer.data.batch import Batch, Tokens
from trainer.models.frozen_cache import FrozenFeatureCache
from trainer.models.fusion import ContentEncoder
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
    host = _trainer(dataset, [*CACHED, 'model.frozen_cache_placement="host"'], out + "/host")
    plain = _trainer(
        dataset, CACHED[:-1], out + "/plain"
    )  # the same model, decoding and computing everything
    for trainer in (cached, host):
        trainer.build_frozen_cache()
        cache = trainer.model.dense.content.frozen_cache
        assert cache is not None and len(cache) == len(trainer.items) and cache.images is not None
    host.model.dense.content.frozen_cache.rows = not_called  # host placement: no lookup in the full table
    for other in (host, plain):
        for (name, a), (_, b) in zip(
            cached.model.dense.state_dict().items(), other.model.dense.state_dict().items()
        ):
            assert torch.equal(a, b), name  # one seed, one init
    streams = [iter(t.train_stream) for t in (cached, host, plain)]
    for step in range(3):
        batch, host_batch, reference = (next(s) for s in streams)
        assert torch.equal(batch.item_id, reference.item_id) and batch.known_item_ids is not None
        assert torch.equal(batch.image_mask, reference.image_mask) and bool(batch.image_mask.any())
        assert batch.images.numel() == 0 and bool(reference.images.any())  # no JPEG decoded, no pixels
        assert host_batch.frozen_ids is None  # the reader's batch: gathered in to_device
        moved = host.to_device(host_batch)
        assert torch.equal(moved.frozen_ids, torch.unique(batch.known_item_ids))
        assert moved.frozen_text is not None and moved.frozen_images is not None
        losses = []
        for trainer, b in ((cached, batch), (host, moved), (plain, reference)):
            torch.manual_seed(5 + step)  # the top blocks' dropout draws alike
            losses.append(float(trainer.train_step(b)))
            trainer.step += 1
        assert losses[0] == pytest.approx(losses[2], rel=1e-5), step
        assert losses[1] == pytest.approx(losses[2], rel=1e-5), step
    for other in (host, plain):
        for (name, a), (_, b) in zip(
            cached.model.dense.named_parameters(), other.model.dense.named_parameters()
        ):
            assert torch.allclose(a, b, atol=1e-5), name  # the same updates: the frozen bottoms got none
    eval_host, eval_plain = host.evaluate(), plain.evaluate()  # eval moves its batches with to_device too
    assert eval_host["logloss"] == pytest.approx(eval_plain["logloss"], rel=1e-4)


def not_called(*args: Any) -> None:
    raise AssertionError("the full table's id lookup ran")


@pytest.mark.slow
def test_cached_and_uncached_steps_give_the_same_loss_and_gradients_on_the_device_and_the_host(
    small_dataset: Path, tmp_path: Path
) -> None:
    in_process(_same_loss_with_and_without_cache, str(small_dataset), str(tmp_path / "run"))


def _shared_on_two_ranks(rank: int, port: int, dataset: str, out: str) -> None:
    import os

    import torch.distributed as dist

    from tests.test_train import rank_environment
    from trainer.loop import shared_host_files

    rank_environment(rank, 2, port)
    os.environ["LOCAL_WORLD_SIZE"] = "2"  # what torchrun sets: both ranks on this host
    host = [*CACHED, 'model.frozen_cache_placement="host"']
    t = _trainer(dataset, host, out + "/shared")
    content = t.model.dense.content
    runs: list[int] = []
    bottom = content.text.frozen_features
    content.text.frozen_features = lambda fields: runs.append(1) or bottom(fields)  # type: ignore[method-assign]
    t.build_frozen_cache()
    assert bool(runs) == (rank == 0)  # local rank 0 built it; rank 1 only mapped it
    files = shared_host_files(t.cfg)
    dist.barrier()  # local rank 0 removes the names after the build's last barrier
    assert files is not None and not list(Path(files.prefix).parent.glob(Path(files.prefix).name + "*"))
    shared = content.frozen_cache
    assert shared is not None and shared.host and shared.text is not None and shared.images is not None
    own = _trainer(dataset, [*host, "model.frozen_cache_share=false"], out + f"/own{rank}")
    own.build_frozen_cache()  # a copy of its own, from the same weights (one seed, one init)
    mine = own.model.dense.content.frozen_cache
    assert torch.equal(shared.sorted_ids, mine.sorted_ids) and torch.equal(shared.order, mine.order)
    assert torch.equal(shared.text, mine.text) and torch.equal(shared.images, mine.images)
    dist.barrier()
    if rank == 0:
        shared.text[0, 0, 0] = 12345.0  # one memory: rank 1 sees the write
    dist.barrier()
    assert float(shared.text[0, 0, 0]) == 12345.0
    dist.barrier()
    dist.destroy_process_group()


def test_local_ranks_share_one_host_copy(small_dataset: Path, tmp_path: Path) -> None:
    from tests.test_train import run_ranks

    run_ranks(_shared_on_two_ranks, 2, str(small_dataset), str(tmp_path))


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


def encoder_and_batch(dataset: Path) -> tuple[ContentEncoder, Batch, Any]:
    """A content encoder with frozen bottoms (eval mode: no dropout), no cache yet, and a train batch of the plain
    reader: pixels decoded, every item in items.parquet (`known_item_ids`), fields padded to their longest row."""
    from tests.conftest import small_config
    from tests.test_train import FAST_MODEL
    from trainer.data.item_catalog import ItemsParquet
    from trainer.data.reader import make_batch_stream
    from trainer.data.text_fields import with_dataset_text

    cfg = with_dataset_text(small_config(dataset, *FAST_MODEL, *CACHED[:-1], "data.num_workers=0"))
    stream = make_batch_stream(cfg, "train", pad_to_longest=True)
    tokenizer = stream.dataset.collator.tokenizer
    torch.manual_seed(0)
    encoder = ContentEncoder(cfg.model, len(tokenizer), tokenizer.pad_token_id, cfg.data.image_size).eval()
    batch = next(iter(stream))
    assert batch.known_item_ids is not None and bool(batch.images.any())
    return encoder, batch, ItemsParquet(dataset / "items.parquet", stream.dataset.collator)


def encoded(encoder: ContentEncoder, batch: Batch, item_ids: bool = True) -> torch.Tensor:
    ids = batch.known_item_ids if item_ids else None
    return encoder(batch.text, batch.images, batch.image_mask, ids, batch.packed_text)


def without_pixels(batch: Batch) -> Batch:
    """As the cached reader sends it: the vision tower cannot run on this batch."""
    return replace(batch, images=batch.images[..., :0, :0])


CPU = torch.device("cpu")


def test_host_placement_gives_the_content_vectors_of_the_device_table_and_the_uncached_path(
    small_dataset: Path,
) -> None:
    from trainer.content.bank import encode_rows

    encoder, batch, items = encoder_and_batch(small_dataset)
    host = copy.deepcopy(encoder)
    with torch.no_grad():
        uncached = encoded(encoder, batch, item_ids=False)
        encoder.use_frozen_cache(items.chunks(), len(items), CPU)
        host.use_frozen_cache(items.chunks(), len(items), CPU, host=True)
        on_device = encoded(encoder, without_pixels(batch))
        assert host.frozen_cache is not None
        gathered = host.frozen_cache.gather(without_pixels(batch))
        host.serve(gathered)
        on_host = encoded(host, gathered)
        rows = torch.tensor([5, 0, 3])  # the bank's encoder sampling passes some rows' ids only
        some = encode_rows(host, gathered, rows, grad=False)
    assert torch.equal(on_host, on_device)  # the same rows of the same table
    torch.testing.assert_close(on_host, uncached, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(some, on_device[rows], atol=1e-6, rtol=1e-6)


def test_to_device_gathers_the_rows_on_the_host_and_the_step_serves_only_them(small_dataset: Path) -> None:
    from trainer.loop import Trainer

    encoder, batch, items = encoder_and_batch(small_dataset)
    with torch.no_grad():
        uncached = encoded(encoder, batch, item_ids=False)
    encoder.use_frozen_cache(items.chunks(), len(items), CPU, host=True)
    cache = encoder.frozen_cache
    assert cache is not None and cache.host and cache.sorted_ids.device == CPU
    trainer = SimpleNamespace(
        model=SimpleNamespace(dense=SimpleNamespace(content=encoder)), info=SimpleNamespace(device=CPU)
    )
    moved = Trainer.to_device(trainer, without_pixels(batch))  # type: ignore[arg-type]
    ids = torch.unique(batch.known_item_ids)
    table_rows = cache.order[torch.searchsorted(cache.sorted_ids, ids)]
    assert torch.equal(moved.frozen_ids, ids) and len(ids) <= batch.size
    assert torch.equal(moved.frozen_text, cache.text[table_rows])
    assert torch.equal(moved.frozen_images, cache.images[table_rows])
    cache.rows = not_called  # type: ignore[method-assign]  # a step never looks up the full table
    encoder.serve(moved)  # what LemurStep.forward does first
    with torch.no_grad():
        out = encoded(encoder, moved)
    assert encoder.served is not None and encoder.served.sorted_ids is moved.frozen_ids
    torch.testing.assert_close(out, uncached, atol=1e-5, rtol=1e-5)


def test_host_placement_takes_the_uncached_path_for_an_item_absent_from_the_cache(
    small_dataset: Path,
) -> None:
    encoder, batch, items = encoder_and_batch(small_dataset)
    with torch.no_grad():
        uncached = encoded(encoder, batch, item_ids=False)
    encoder.use_frozen_cache(items.chunks(), len(items), CPU, host=True)
    full = encoder.frozen_cache
    assert full is not None and full.text is not None and full.images is not None
    keep = full.sorted_ids != batch.known_item_ids[0]
    rows = full.order[keep]
    encoder.frozen_cache = FrozenFeatureCache.of_items(
        full.sorted_ids[keep], full.budgets, full.text[rows], full.images[rows], host=True
    )
    gathered = encoder.frozen_cache.gather(batch)
    assert gathered is batch and gathered.frozen_ids is None
    encoder.serve(gathered)
    vision_calls = count_vision_calls(encoder)
    with torch.no_grad():
        out = encoded(encoder, gathered)  # names its items, but none is served: the pixels are encoded
    assert vision_calls == [batch.size]
    torch.testing.assert_close(out, uncached, atol=0.0, rtol=0.0)


def count_vision_calls(encoder: ContentEncoder) -> list[int]:
    assert encoder.vision is not None
    calls: list[int] = []
    encoder.vision.register_forward_hook(lambda m, args, out: calls.append(args[0].shape[0]))
    return calls


def test_the_placement_is_device_or_host() -> None:
    from trainer.config import ConfigError, load_config

    with pytest.raises(ConfigError, match="frozen_cache_placement"):
        load_config("tiny", ['model.frozen_cache_placement="disk"'])
