"""The CTR rankers: RankMixer (ByteDance) and the papers' DLRM-MLP baseline. Both map [B, in_dim] to [B] logits."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from trainer.config.registry import RANKERS
from trainer.config.schema import ModelConfig


class PerTokenLinear(nn.Module):
    """T independent Linear layers applied to T tokens at once: [B, T, in] -> [B, T, out] with one batched einsum."""

    def __init__(self, tokens: int, in_dim: int, out_dim: int) -> None:
        super().__init__()
        bound = 1 / math.sqrt(in_dim)  # nn.Linear's default init, per token
        self.weight = nn.Parameter(torch.empty(tokens, in_dim, out_dim).uniform_(-bound, bound))
        self.bias = nn.Parameter(torch.empty(tokens, out_dim).uniform_(-bound, bound))

    def forward(self, x: Tensor) -> Tensor:
        return torch.einsum("bti,tio->bto", x, self.weight) + self.bias


def token_mixing(x: Tensor) -> Tensor:
    """Parameter-free multi-head token mixing: [B, T, H] with T heads of H/T per token; new token h is head h of every
    token, concatenated in token order."""
    b, t, h = x.shape
    return x.view(b, t, t, h // t).transpose(1, 2).reshape(b, t, h)


class RankMixerBlock(nn.Module):
    """Token mixing, residual + LayerNorm; per-token FFN (hidden -> 4*hidden -> hidden, GELU), residual + LayerNorm."""

    def __init__(self, tokens: int, hidden: int) -> None:
        super().__init__()
        self.mix_norm = nn.LayerNorm(hidden)
        self.up = PerTokenLinear(tokens, hidden, 4 * hidden)
        self.down = PerTokenLinear(tokens, 4 * hidden, hidden)
        self.ffn_norm = nn.LayerNorm(hidden)

    def forward(self, x: Tensor) -> Tensor:
        x = self.mix_norm(x + token_mixing(x))
        return self.ffn_norm(x + self.down(F.gelu(self.up(x))))


class RankMixer(nn.Module):
    """RankMixer: the features [B, in_dim] split into T equal chunks (zero-padded up to a multiple of T), each chunk
    projected by its own Linear to `hidden`; `layers` RankMixerBlocks; mean over tokens -> Linear -> 1 logit.

    hidden is rounded up to a multiple of T, since token mixing cuts each token into T heads.
    """

    def __init__(self, in_dim: int, tokens: int, hidden: int, layers: int) -> None:
        super().__init__()
        self.tokens = tokens
        self.chunk = math.ceil(in_dim / tokens)
        self.hidden = math.ceil(hidden / tokens) * tokens
        self.embed = PerTokenLinear(tokens, self.chunk, self.hidden)
        self.blocks = nn.ModuleList(RankMixerBlock(tokens, self.hidden) for _ in range(layers))
        self.head = nn.Linear(self.hidden, 1)

    def tokenize(self, features: Tensor) -> Tensor:
        """[B, in_dim] -> [B, T, chunk], zero-padded at the end."""
        pad = self.tokens * self.chunk - features.shape[1]
        return F.pad(features, (0, pad)).view(features.shape[0], self.tokens, self.chunk)

    def forward(self, features: Tensor) -> Tensor:
        x = self.embed(self.tokenize(features))
        for block in self.blocks:
            x = block(x)
        return self.head(x.mean(dim=1)).squeeze(-1)


class DlrmMlp(nn.Module):
    """The papers' DLRM-MLP baseline: concatenated features -> MLP (layers x hidden, ReLU) -> 1 logit."""

    def __init__(self, in_dim: int, hidden: int, layers: int) -> None:
        super().__init__()
        dims = [in_dim] + [hidden] * layers
        body = [m for a, b in zip(dims, dims[1:]) for m in (nn.Linear(a, b), nn.ReLU())]
        self.net = nn.Sequential(*body, nn.Linear(dims[-1], 1))

    def forward(self, features: Tensor) -> Tensor:
        return self.net(features).squeeze(-1)


def build_rankmixer(cfg: ModelConfig, in_dim: int) -> nn.Module:
    return RankMixer(in_dim, cfg.ranker_tokens, cfg.ranker_hidden, cfg.ranker_layers)


def build_dlrm_mlp(cfg: ModelConfig, in_dim: int) -> nn.Module:
    return DlrmMlp(in_dim, cfg.ranker_hidden, cfg.ranker_layers)


def build_ranker(cfg: ModelConfig, in_dim: int) -> nn.Module:
    """The ranker registered as `cfg.ranker` (trainer/config/registry.py)."""
    return RANKERS.resolve(cfg.ranker)(cfg, in_dim)
