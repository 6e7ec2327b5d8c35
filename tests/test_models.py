"""Towers, fusion and rankers on CPU with tiny sizes; the fast RankMixer paths against plain loops."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from transformers import BertConfig, BertModel, ViTConfig, ViTModel

from trainer.config.schema import ModelConfig, TowerConfig
from trainer.data.batch import Tokens
from trainer.models.fusion import ContentEncoder, QueryEncoder
from trainer.models.ranker import DlrmMlp, PerTokenLinear, RankMixer, build_ranker, token_mixing
from trainer.models.towers import TextTower, VisionTower

VOCAB, PAD, CLS, SEP = 100, 0, 2, 3
IMAGE, PATCH = 32, 8
FUSIONS = ["fqformer", "masked_fqformer", "1flow", "2flow"]


@pytest.fixture(autouse=True, scope="module")
def few_threads() -> Iterator[None]:
    before = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny matmuls: more threads only spin on a busy CI box
    yield
    torch.set_num_threads(before)


def tower(layers: int = 2, top: int = -1, pretrained: str = "") -> TowerConfig:
    return TowerConfig(pretrained=pretrained, layers=layers, hidden=32, heads=2, trainable_top_layers=top)


def model_cfg(fusion: str = "fqformer", use_images: bool = True, top: int = -1) -> ModelConfig:
    return ModelConfig(
        text_fields=["title", "body"],
        text_max_tokens=[6, 10],
        query_max_tokens=5,
        use_images=use_images,
        text_tower=tower(top=top),
        query_tower=tower(layers=1),
        vision_tower=tower(top=top),
        patch_size=PATCH,
        fusion=fusion,
        fusion_queries=2,
        fusion_layers=1,
        content_dim=16,
    )


def field(lengths: list[int], budget: int, seed: int) -> Tokens:
    """'[CLS] w.. [SEP]' per row with `lengths` real tokens (CLS and SEP included), padded to `budget`."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.full((len(lengths), budget), PAD)
    for row, n in enumerate(lengths):
        ids[row, :n] = torch.randint(5, VOCAB, (n,), generator=g)
        ids[row, 0], ids[row, n - 1] = CLS, SEP
    return Tokens(ids, (ids != PAD).long())


def text_batch(cfg: ModelConfig, batch: int = 3, seed: int = 0) -> dict[str, Tokens]:
    g = torch.Generator().manual_seed(seed)
    out = {}
    for i, (name, budget) in enumerate(zip(cfg.text_fields, cfg.text_max_tokens)):
        lengths = torch.randint(2, budget + 1, (batch,), generator=g).tolist()
        out[name] = field(lengths, budget, seed * 10 + i)
    return out


def image_batch(batch: int = 3, n: int = 2, seed: int = 0) -> tuple[Tensor, Tensor]:
    g = torch.Generator().manual_seed(seed)
    images = torch.randint(0, 256, (batch, n, 3, IMAGE, IMAGE), generator=g, dtype=torch.uint8)
    mask = torch.ones(batch, n, dtype=torch.bool)
    mask[1:, 1:] = False
    if batch > 2:
        mask[2] = False  # one sample without any image
    return images * mask[..., None, None, None], mask


def content_encoder(cfg: ModelConfig, seed: int = 0) -> ContentEncoder:
    torch.manual_seed(seed)
    return ContentEncoder(cfg, VOCAB, PAD, IMAGE)


@pytest.mark.parametrize("fusion", FUSIONS)
def test_every_fusion_with_and_without_images(fusion: str) -> None:
    text = text_batch(model_cfg())
    images, mask = image_batch()
    with_vision = content_encoder(model_cfg(fusion))
    for imgs, m in ((images, mask), (images[:, :0], mask[:, :0])):
        out = with_vision(text, imgs, m)
        assert out.shape == (3, 16) and out.isfinite().all()
    text_only = content_encoder(model_cfg(fusion, use_images=False))
    assert text_only.vision is None
    out = text_only(text, images, mask)
    assert out.shape == (3, 16) and out.isfinite().all()


def test_query_encoder_shape() -> None:
    cfg = model_cfg()
    out = QueryEncoder(cfg, VOCAB, PAD)(field([2, 5, 3], cfg.query_max_tokens, seed=1))
    assert out.shape == (3, cfg.content_dim) and out.isfinite().all()


def test_vision_pooled_is_masked_mean_of_cls_states() -> None:
    torch.manual_seed(0)
    vision = VisionTower(tower(), IMAGE, PATCH).eval()
    images, mask = image_batch()
    out = vision(images, mask)
    per_image = (IMAGE // PATCH) ** 2 + 1
    assert out.tokens.shape == (3, 2 * per_image, 32) and out.mask.shape == (3, 2 * per_image)
    assert out.mask.sum(1).tolist() == [2 * per_image, per_image, 0]
    cls = out.tokens.view(3, 2, per_image, 32)[:, :, 0]
    torch.testing.assert_close(out.pooled[0], cls[0].mean(0))
    torch.testing.assert_close(out.pooled[1], cls[1, 0])
    assert (out.pooled[2] == 0).all()


def tower_params(encoder: ContentEncoder) -> dict[str, list[tuple[str, nn.Parameter]]]:
    """Per tower: 'embeddings', each layer index, and 'rest' (ViT's final norm)."""
    groups: dict[str, list[tuple[str, nn.Parameter]]] = {}
    for tower_name, tower_module in (("text", encoder.text), ("vision", encoder.vision)):
        for name, p in tower_module.encoder.named_parameters():
            parts = name.split(".")
            if parts[0] == "embeddings":
                key = "embeddings"
            elif "layer" in parts or "layers" in parts:
                key = f"layer{parts[parts.index('layer' if 'layer' in parts else 'layers') + 1]}"
            else:
                key = "rest"
            groups.setdefault(f"{tower_name}.{key}", []).append((name, p))
    return groups


@pytest.mark.parametrize("top", [-1, 0, 1])
def test_gradients_reach_exactly_the_trainable_layers(top: int) -> None:
    cfg = model_cfg(top=top)
    encoder = content_encoder(cfg)
    images, mask = image_batch()
    encoder(text_batch(cfg), images, mask).square().sum().backward()
    trainable = {
        -1: {"embeddings", "layer0", "layer1", "rest"},
        0: set(),
        1: {"layer1", "rest"},
    }[top]
    for group, params in tower_params(encoder).items():
        should_train = group.split(".")[1] in trainable
        for name, p in params:
            assert p.requires_grad == should_train, (group, name)
            if should_train:
                assert p.grad is not None and p.grad.abs().sum() > 0, (group, name)
            else:
                assert p.grad is None, (group, name)
    assert all(p.grad is not None for p in encoder.fusion.parameters())


def test_masked_fqformer_keeps_text_tokens_blind_to_images() -> None:
    cfg = model_cfg("masked_fqformer")
    encoder = content_encoder(cfg).eval()
    text = text_batch(cfg)
    images, mask = image_batch()
    other = images.flip(-1)
    q, lt = cfg.fusion_queries, sum(cfg.text_max_tokens)
    with torch.no_grad():
        before = encoder.fusion.states(*encoder.encode(text, images, mask))
        after = encoder.fusion.states(*encoder.encode(text, other, mask))
        changed = encoder(text, images, mask) - encoder(text, other, mask)
    torch.testing.assert_close(before[:, q : q + lt], after[:, q : q + lt], atol=1e-6, rtol=0)
    assert changed[:2].abs().max() > 1e-4  # samples with images
    assert changed[2].abs().max() == 0  # the sample without images

    plain = content_encoder(model_cfg("fqformer")).eval()
    with torch.no_grad():
        before = plain.fusion.states(*plain.encode(text, images, mask))
        after = plain.fusion.states(*plain.encode(text, other, mask))
    assert (before[:2, q : q + lt] - after[:2, q : q + lt]).abs().max() > 1e-4


def test_text_padding_does_not_change_outputs() -> None:
    torch.manual_seed(0)
    text = TextTower(tower(), VOCAB, num_fields=2, max_tokens=30, pad_token_id=PAD).eval()
    short = [field([3, 6, 2], 6, seed=1), field([10, 2, 7], 10, seed=2)]
    long = [field([3, 6, 2], 9, seed=1), field([10, 2, 7], 14, seed=2)]
    with torch.no_grad():
        a, b = text(short), text(long)
    torch.testing.assert_close(a.pooled, b.pooled, atol=1e-5, rtol=1e-5)
    real_a, real_b = a.tokens[a.mask], b.tokens[b.mask]
    torch.testing.assert_close(real_a, real_b, atol=1e-5, rtol=1e-5)


def small_bert() -> BertModel:
    """A 2-block BERT of hidden 32 with 40 positions and 2 segments, as a checkpoint to load."""
    config = BertConfig(
        vocab_size=VOCAB,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=64,
        max_position_embeddings=40,
        type_vocab_size=2,
    )
    return BertModel(config, add_pooling_layer=False)


def test_pretrained_text_tower_round_trip(tmp_path: Path) -> None:
    saved = small_bert()
    saved.save_pretrained(tmp_path)
    loaded = TextTower(tower(layers=5, pretrained=str(tmp_path)), VOCAB, 3, 30, PAD).encoder
    assert loaded.config.num_hidden_layers == 2
    loaded_state = loaded.state_dict()
    for name, value in saved.state_dict().items():
        if "token_type" not in name:
            torch.testing.assert_close(loaded_state[name], value, atol=0, rtol=0)
    types = loaded.embeddings.token_type_embeddings.weight
    old = saved.embeddings.token_type_embeddings.weight
    assert types.shape == (3, 32)
    torch.testing.assert_close(types[:2], old)
    torch.testing.assert_close(types[2], old[0])
    with pytest.raises(ValueError, match="position embeddings"):
        TextTower(tower(pretrained=str(tmp_path)), VOCAB, 3, 41, PAD)


def test_a_pretrained_tower_saved_in_bf16_trains_in_fp32(tmp_path: Path) -> None:
    """Published checkpoints are often bf16; transformers loads their dtype, which crashed fp32 training."""
    small_bert().to(torch.bfloat16).save_pretrained(tmp_path)
    text = TextTower(tower(pretrained=str(tmp_path)), VOCAB, 1, 30, PAD)
    assert {p.dtype for p in text.parameters()} == {torch.float32}
    ids = torch.randint(3, VOCAB, (2, 6))
    pooled = text([Tokens(ids, torch.ones_like(ids))]).pooled
    (nn.Linear(32, 4)(pooled)).sum().backward()  # an fp32 head on top: the crash was here
    assert pooled.dtype == torch.float32


def test_pretrained_vision_tower_round_trip(tmp_path: Path) -> None:
    config = ViTConfig(
        image_size=IMAGE,
        patch_size=PATCH,
        hidden_size=32,
        num_hidden_layers=1,
        num_attention_heads=2,
        intermediate_size=64,
    )
    saved = ViTModel(config, add_pooling_layer=False)
    saved.save_pretrained(tmp_path)
    vision = VisionTower(tower(pretrained=str(tmp_path), top=0), IMAGE, patch_size=16)
    loaded_state = vision.encoder.state_dict()
    for name, value in saved.state_dict().items():
        torch.testing.assert_close(loaded_state[name], value, atol=0, rtol=0)
    assert not any(p.requires_grad for p in vision.parameters())
    images, mask = image_batch()
    assert vision(images, mask).tokens.shape == (3, 2 * 17, 32)


def reference_per_token_linear(layer: PerTokenLinear, x: Tensor) -> Tensor:
    return torch.stack([x[:, t] @ layer.weight[t] + layer.bias[t] for t in range(x.shape[1])], dim=1)


def reference_token_mixing(x: Tensor) -> Tensor:
    tokens, width = x.shape[1], x.shape[2] // x.shape[1]
    heads = [
        torch.cat([x[:, t, h * width : (h + 1) * width] for t in range(tokens)], -1) for h in range(tokens)
    ]
    return torch.stack(heads, dim=1)


def reference_rankmixer(model: RankMixer, features: Tensor) -> Tensor:
    """RankMixer with every per-token op as a Python loop over tokens."""
    flat = F.pad(features, (0, model.tokens * model.chunk - features.shape[1]))
    chunks = [flat[:, t * model.chunk : (t + 1) * model.chunk] for t in range(model.tokens)]
    x = reference_per_token_linear(model.embed, torch.stack(chunks, dim=1))
    for block in model.blocks:
        x = block.mix_norm(x + reference_token_mixing(x))
        hidden = F.gelu(reference_per_token_linear(block.up, x))
        x = block.ffn_norm(x + reference_per_token_linear(block.down, hidden))
    return model.head(x.mean(dim=1)).squeeze(-1)


@pytest.mark.parametrize(("in_dim", "tokens", "hidden"), [(24, 4, 16), (10, 3, 8)])
def test_rankmixer_matches_reference_loops(in_dim: int, tokens: int, hidden: int) -> None:
    torch.manual_seed(0)
    model = RankMixer(in_dim, tokens, hidden, layers=2)
    assert model.hidden % tokens == 0 and model.hidden >= hidden
    features = torch.randn(5, in_dim)
    x = torch.randn(5, tokens, model.hidden)
    torch.testing.assert_close(
        model.blocks[0].up(x), reference_per_token_linear(model.blocks[0].up, x), atol=1e-5, rtol=1e-5
    )
    torch.testing.assert_close(token_mixing(x), reference_token_mixing(x), atol=0, rtol=0)
    out = model(features)
    assert out.shape == (5,)
    torch.testing.assert_close(out, reference_rankmixer(model, features), atol=1e-5, rtol=1e-5)


def test_dlrm_mlp_and_build_ranker() -> None:
    assert DlrmMlp(12, 16, 3)(torch.randn(4, 12)).shape == (4,)
    cfg = model_cfg()
    assert isinstance(build_ranker(cfg, 12), RankMixer)
    cfg.ranker = "dlrm_mlp"
    assert isinstance(build_ranker(cfg, 12), DlrmMlp)


def test_content_encoder_and_rankmixer_fit_a_toy_target() -> None:
    cfg = model_cfg("fqformer")
    encoder = content_encoder(cfg)
    ranker = RankMixer(cfg.content_dim, tokens=4, hidden=16, layers=1)
    text = text_batch(cfg, batch=16, seed=3)
    images, mask = image_batch(batch=16, n=1, seed=3)
    labels = (text["title"].input_ids[:, 1] % 2).float()  # the first title word decides the click
    params = [*encoder.parameters(), *ranker.parameters()]
    opt = torch.optim.Adam(params, lr=3e-3)
    losses = []
    for _ in range(50):
        loss = F.binary_cross_entropy_with_logits(ranker(encoder(text, images, mask)), labels)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0] / 2, losses
