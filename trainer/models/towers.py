"""Single-modal encoders: a BERT-style text tower (LEMUR's query and doc transformers) and a ViT vision tower.

Both wrap a Hugging Face encoder, built from a TowerConfig with random init or loaded from a local directory; nothing is
ever downloaded. They know nothing of distribution.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from operator import attrgetter
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from torch import Tensor, nn
from transformers import AutoModel, BertConfig, BertModel, PreTrainedModel, ViTConfig, ViTModel

from trainer.config.schema import TowerConfig

if TYPE_CHECKING:
    from trainer.data.batch import Tokens  # torchrec-heavy import; only the annotations need it

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
LAYER_PATHS = ("encoder.layer", "encoder.layers", "layers")
"""Where the stack of blocks lives; it moved between transformers releases (ViT: encoder.layer -> layers)."""
ROBERTA_TYPES = ("roberta", "xlm-roberta", "camembert")
"""Checkpoints whose position ids start after the pad id (EM3 uses a RoBERTa text encoder)."""


@dataclass
class Encoded:
    tokens: Tensor
    """[B, L, H] hidden states."""
    mask: Tensor
    """[B, L] bool, True = real token."""
    pooled: Tensor
    """[B, H]."""


def frozen_count(encoder_layers: nn.ModuleList, top: int) -> int:
    """How many bottom blocks never train: none with top = -1 (everything trains), else all but the top `top`."""
    return 0 if top < 0 else max(len(encoder_layers) - top, 0)


def freeze_all_but_top(encoder_layers: nn.ModuleList, embeddings: nn.Module, top: int) -> None:
    """-1: everything trains; k >= 0: the embeddings and all but the top k layers get requires_grad False.

    Frozen bottoms build no autograd graph, which is where EM3's frozen single-modal encoders save their memory.
    """
    frozen = frozen_count(encoder_layers, top)
    embeddings.requires_grad_(top < 0)
    for i, layer in enumerate(encoder_layers):
        layer.requires_grad_(i >= frozen)


class FrozenBottom:
    """What a tower with a frozen bottom (`trainable_top_layers` k >= 0) shares: the bottom (embeddings and the
    frozen blocks) is a fixed feature extractor, so it always runs in eval mode (no dropout), in training too. Its
    output per item is then a function of the item's content alone, which is what lets EM3's frozen-feature cache
    (`frozen_cache.py`) compute it once per item; the cached and the uncached step are the same function."""

    encoder: PreTrainedModel
    top: int

    def frozen_modules(self) -> list[nn.Module]:
        if self.top < 0:
            return []
        layers = encoder_layers(self.encoder)
        return [self.encoder.embeddings, *layers[: frozen_count(layers, self.top)]]

    def keep_bottom_in_eval(self) -> None:
        for module in self.frozen_modules():
            module.eval()

    @property
    def frozen_layers(self) -> int:
        """Blocks below the first trainable one (0: nothing to cache)."""
        return frozen_count(encoder_layers(self.encoder), self.top) if self.top >= 0 else 0

    def top_layers(self) -> nn.ModuleList:
        return encoder_layers(self.encoder)[self.frozen_layers :]


def run_layers(layers: nn.ModuleList, hidden: Tensor, *args: Tensor) -> Tensor:
    """The blocks in order, as the encoder runs them (older transformers releases return a tuple per block)."""
    for layer in layers:
        out = layer(hidden, *args)
        hidden = out[0] if isinstance(out, tuple) else out
    return hidden


def encoder_layers(model: PreTrainedModel) -> nn.ModuleList:
    for path in LAYER_PATHS:
        try:
            layers = attrgetter(path)(model)
        except AttributeError:
            continue
        if isinstance(layers, nn.ModuleList):
            return layers
    raise TypeError(f"{type(model).__name__}: no block list at any of {LAYER_PATHS}")


def with_attention(make: Callable[[str], PreTrainedModel]) -> PreTrainedModel:
    """SDPA where the model and this transformers release support it, else eager attention."""
    try:
        return make("sdpa")
    except (ValueError, ImportError):
        return make("eager")


def load_pretrained(path: str) -> PreTrainedModel:
    if not Path(path).is_dir():
        raise FileNotFoundError(f"pretrained tower: {path!r} is not a local directory")
    model = with_attention(
        lambda attn: AutoModel.from_pretrained(path, local_files_only=True, attn_implementation=attn)
    )
    # transformers keeps a checkpoint's own dtype (published ones are often bf16): the towers start in fp32 like
    # everything else, and the training dtype applies to all of them alike (bf16 weights or autocast).
    model = model.float()
    if getattr(model, "pooler", None) is not None:
        model.pooler = None  # unused: a parameter without gradient stalls DDP and ZeRO reductions
    return model


def resize_token_types(embeddings: nn.Module, num_fields: int) -> None:
    """Grow the segment embedding to one row per field; new rows start as copies of row 0 (the checkpoint's only
    segment for RoBERTa-style models), so a loaded encoder sees unchanged inputs at the first step."""
    old: nn.Embedding = embeddings.token_type_embeddings
    if old.num_embeddings >= num_fields:
        return
    new = nn.Embedding(num_fields, old.embedding_dim, device=old.weight.device, dtype=old.weight.dtype)
    with torch.no_grad():
        new.weight[: old.num_embeddings] = old.weight
        new.weight[old.num_embeddings :] = old.weight[0]
    embeddings.token_type_embeddings = new


class TextTower(FrozenBottom, nn.Module):
    """BERT-style encoder over one or more text fields concatenated in order (each already '[CLS] .. [SEP]'), with a
    token-type (segment) embedding per field added to position embeddings (LEMUR's doc transformer); pooled = the
    hidden state at position 0 (the first field's CLS).

    Positions count real tokens only, so the padding inside each field's budget changes no output.
    """

    def __init__(
        self, cfg: TowerConfig, vocab_size: int, num_fields: int, max_tokens: int, pad_token_id: int
    ) -> None:
        super().__init__()
        self.encoder = self.build(cfg, vocab_size, num_fields, max_tokens, pad_token_id)
        config = self.encoder.config
        self.hidden_size: int = config.hidden_size
        self.heads: int = config.num_attention_heads
        self.position_offset = config.pad_token_id + 1 if config.model_type in ROBERTA_TYPES else 0
        if config.max_position_embeddings < max_tokens + self.position_offset:
            raise ValueError(
                f"text tower: {max_tokens} tokens need more than the checkpoint's "
                f"{config.max_position_embeddings} position embeddings"
            )
        if self.encoder.get_input_embeddings().num_embeddings < vocab_size:
            self.encoder.resize_token_embeddings(vocab_size)
        resize_token_types(self.encoder.embeddings, num_fields)
        self.top = cfg.trainable_top_layers
        freeze_all_but_top(encoder_layers(self.encoder), self.encoder.embeddings, self.top)
        self.keep_bottom_in_eval()

    def train(self, mode: bool = True) -> TextTower:
        super().train(mode)
        self.keep_bottom_in_eval()
        return self

    @staticmethod
    def build(
        cfg: TowerConfig, vocab_size: int, num_fields: int, max_tokens: int, pad_token_id: int
    ) -> PreTrainedModel:
        if cfg.pretrained:
            return load_pretrained(cfg.pretrained)

        def make(attn: str) -> BertModel:
            config = BertConfig(
                vocab_size=vocab_size,
                hidden_size=cfg.hidden,
                num_hidden_layers=cfg.layers,
                num_attention_heads=cfg.heads,
                intermediate_size=4 * cfg.hidden,
                max_position_embeddings=max_tokens,
                type_vocab_size=num_fields,
                pad_token_id=pad_token_id,
                attn_implementation=attn,
            )
            return BertModel(config, add_pooling_layer=False)

        return with_attention(make)

    def inputs(self, fields: list[Tokens]) -> dict[str, Tensor]:
        """The fields concatenated in order, with a segment id per field and positions over real tokens only."""
        ids = torch.cat([f.input_ids for f in fields], dim=1)
        mask = torch.cat([f.attention_mask for f in fields], dim=1)
        token_types = torch.cat(
            [torch.full_like(f.input_ids, i) for i, f in enumerate(fields)],
            dim=1,
        )
        return self.packed_inputs(ids, mask, token_types)

    def packed_inputs(self, ids: Tensor, mask: Tensor, token_types: Tensor) -> dict[str, Tensor]:
        """Ids, mask and segments as laid out (padded fields side by side, or real tokens packed), with positions
        that count real tokens only: the same position for a token in either layout."""
        positions = (mask.cumsum(1) - 1).clamp(min=0) + self.position_offset
        return {"input_ids": ids, "mask": mask, "token_type_ids": token_types, "position_ids": positions}

    def forward(self, fields: list[Tokens]) -> Encoded:
        return self.encode(self.inputs(fields))

    def encode(self, x: dict[str, Tensor]) -> Encoded:
        out = self.encoder(
            input_ids=x["input_ids"],
            attention_mask=self.attention_mask(x["mask"]),
            token_type_ids=x["token_type_ids"],
            position_ids=x["position_ids"],
        )
        tokens = out.last_hidden_state
        return Encoded(tokens=tokens, mask=x["mask"].bool(), pooled=tokens[:, 0])

    @torch.no_grad()
    def frozen_features(self, fields: list[Tokens]) -> Tensor:
        """[B, L, H] hidden states after the frozen bottom (what the frozen-feature cache keeps per item)."""
        x = self.inputs(fields)
        hidden = self.encoder.embeddings(
            input_ids=x["input_ids"], token_type_ids=x["token_type_ids"], position_ids=x["position_ids"]
        )
        frozen = encoder_layers(self.encoder)[: self.frozen_layers]
        return run_layers(frozen, hidden, self.attention_mask(x["mask"]))

    def from_frozen(self, hidden: Tensor, mask: Tensor) -> Encoded:
        """The trainable top over frozen features: the same output as `forward` on the inputs they came from."""
        tokens = run_layers(self.top_layers(), hidden, self.attention_mask(mask))
        return Encoded(tokens=tokens, mask=mask.bool(), pooled=tokens[:, 0])

    def attention_mask(self, mask: Tensor) -> Tensor:
        """The key-padding mask already in the [B, 1, 1, L] form attention takes. Given a 2-D mask, transformers
        first asks whether it is all ones (to drop it), which makes the host wait for the device every step.
        Every row keeps its first token (a field's [CLS]), so no row is fully masked."""
        keep = mask.bool()[:, None, None, :]
        if self.encoder.config._attn_implementation == "sdpa":
            return keep
        dtype = self.encoder.get_input_embeddings().weight.dtype
        return torch.zeros(keep.shape, dtype=dtype, device=mask.device).masked_fill(
            ~keep, torch.finfo(dtype).min
        )


class VisionTower(FrozenBottom, nn.Module):
    """ViT over each of the N images (uint8, normalised inside with ImageNet mean/std); tokens of all images
    concatenated; pooled = masked mean of the images' CLS states (zeros where a sample has no image).

    Missing images (zeros) still run through the ViT: the graph stays the same every step, so every parameter gets a
    gradient (DDP / ZeRO need that) and shapes stay static.
    """

    def __init__(self, cfg: TowerConfig, image_size: int, patch_size: int) -> None:
        super().__init__()
        self.encoder = self.build(cfg, image_size, patch_size)
        config = self.encoder.config
        self.hidden_size: int = config.hidden_size
        self.interpolate = config.image_size != image_size
        self.register_buffer("mean", torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1) * 255, persistent=False)
        self.register_buffer("std", torch.tensor(IMAGENET_STD).view(1, 3, 1, 1) * 255, persistent=False)
        self.top = top = cfg.trainable_top_layers
        freeze_all_but_top(encoder_layers(self.encoder), self.encoder.embeddings, top)
        if hasattr(self.encoder, "layernorm"):
            self.encoder.layernorm.requires_grad_(top != 0)  # the final norm belongs to the top layer
        self.keep_bottom_in_eval()

    def train(self, mode: bool = True) -> VisionTower:
        super().train(mode)
        self.keep_bottom_in_eval()
        return self

    @staticmethod
    def build(cfg: TowerConfig, image_size: int, patch_size: int) -> PreTrainedModel:
        if cfg.pretrained:
            return load_pretrained(cfg.pretrained)

        def make(attn: str) -> ViTModel:
            config = ViTConfig(
                image_size=image_size,
                patch_size=patch_size,
                hidden_size=cfg.hidden,
                num_hidden_layers=cfg.layers,
                num_attention_heads=cfg.heads,
                intermediate_size=4 * cfg.hidden,
                attn_implementation=attn,
            )
            return ViTModel(config, add_pooling_layer=False)

        return with_attention(make)

    @property
    def dtype(self) -> torch.dtype:
        return self.encoder.embeddings.patch_embeddings.projection.weight.dtype

    def pixels(self, images: Tensor) -> Tensor:
        """[B, N, 3, H, W] uint8 -> [B * N, 3, H, W] normalised, in the tower's dtype."""
        return ((images.flatten(0, 1).float() - self.mean) / self.std).to(self.dtype)

    def forward(self, images: Tensor, image_mask: Tensor) -> Encoded:
        b, n = image_mask.shape
        if n == 0:
            return self.empty(b, images.device)
        if images.shape[-1] == 0:
            raise ValueError(
                "the batch carries no pixels (the reader left its images to the frozen-feature cache), "
                "but the vision tower was asked to encode them"
            )
        states = self.encoder(
            pixel_values=self.pixels(images), interpolate_pos_encoding=self.interpolate
        ).last_hidden_state
        return self.pooled(states, image_mask)

    @torch.no_grad()
    def frozen_features(self, images: Tensor) -> Tensor:
        """[B, N, P, H]: each image's patch states after the frozen bottom."""
        b, n = images.shape[:2]
        hidden = self.encoder.embeddings(self.pixels(images), interpolate_pos_encoding=self.interpolate)
        hidden = run_layers(encoder_layers(self.encoder)[: self.frozen_layers], hidden)
        return hidden.view(b, n, *hidden.shape[1:])

    def from_frozen(self, hidden: Tensor, image_mask: Tensor) -> Encoded:
        """The trainable top (and the final norm) over [B, N, P, H] frozen features: `forward`'s output."""
        b, n = image_mask.shape
        if n == 0:
            return self.empty(b, hidden.device)
        states = run_layers(self.top_layers(), hidden.flatten(0, 1))
        if getattr(self.encoder, "layernorm", None) is not None:
            states = self.encoder.layernorm(states)
        return self.pooled(states, image_mask)

    def pooled(self, states: Tensor, image_mask: Tensor) -> Encoded:
        """[B * N, P, H] final states -> the tower's output: every image's tokens and their masked-mean CLS."""
        b, n = image_mask.shape
        per_image = states.shape[1]
        states = states.view(b, n, per_image, self.hidden_size)
        weights = image_mask.to(states.dtype).unsqueeze(-1)
        pooled = (states[:, :, 0] * weights).sum(1) / weights.sum(1).clamp(min=1)
        return Encoded(
            tokens=states.flatten(1, 2),
            mask=image_mask.repeat_interleave(per_image, dim=1),
            pooled=pooled,
        )

    def empty(self, batch: int, device: torch.device) -> Encoded:
        return Encoded(
            tokens=torch.zeros(batch, 0, self.hidden_size, device=device, dtype=self.dtype),
            mask=torch.zeros(batch, 0, dtype=torch.bool, device=device),
            pooled=torch.zeros(batch, self.hidden_size, device=device, dtype=self.dtype),
        )
