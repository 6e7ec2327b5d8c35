"""The two-stage baseline's hand-over: stage 1 (training.objective = "contrastive") writes the content and query
encoders to `encoder.pt`; stage 2 loads them (model.content_init) and may freeze them (model.freeze_content)."""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from trainer.config.schema import ConfigError

ENCODER_FILE = "encoder.pt"


def encoders(dense: nn.Module) -> dict[str, nn.Module]:
    """The dense arch's content and query encoders (those it has)."""
    return {
        name: getattr(dense, name) for name in ("content", "query") if getattr(dense, name, None) is not None
    }


def save_encoders(dense: nn.Module, out_dir: Path) -> Path:
    """Written under a temporary name and renamed: a crash leaves no half file."""
    path = Path(out_dir) / ENCODER_FILE
    tmp = path.with_name(f".{path.name}.tmp")
    state = {
        name: {k: v.float().cpu() for k, v in m.state_dict().items()} for name, m in encoders(dense).items()
    }
    torch.save(state, tmp)
    tmp.replace(path)
    return path


def load_encoders(dense: nn.Module, path: str | Path) -> None:
    """Load every encoder this model has from `path` (strict: the stage-1 model must have the same shape)."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"model.content_init: {path} does not exist (written by a contrastive stage-1 run)")
    state = torch.load(path, map_location="cpu", weights_only=True)
    for name, module in encoders(dense).items():
        if name not in state:
            raise ConfigError(f"model.content_init: {path} has no {name!r} encoder (it has {sorted(state)})")
        try:
            module.load_state_dict(state[name])
        except RuntimeError as err:
            raise ConfigError(
                f"model.content_init: {path}: {name} encoder does not fit this model: {err}"
            ) from err


def freeze_encoders(dense: nn.Module) -> None:
    for module in encoders(dense).values():
        module.requires_grad_(False)
