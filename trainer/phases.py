"""EM3's LoRA for long sequences as two training phases: phase 1 trains the sequence model (the LONGER query token
and decoders) on short histories (lora.short_history); from step lora.phase2_start its weights are frozen and only
its LoRA adapters train, on the full histories, while the rest of the model keeps training. Without lora.rank there
is a single phase (0)."""

from __future__ import annotations

from trainer.config.schema import Config, ConfigError
from trainer.models.lora import set_lora_phase
from trainer.models.model import LemurModel


def phase_at(cfg: Config, step: int) -> int:
    """0: no LoRA phases; 1 before lora.phase2_start; 2 from it on."""
    if cfg.lora.rank == 0:
        return 0
    return 1 if step < cfg.lora.phase2_start else 2


def phase_lengths(cfg: Config, full: dict[str, int], phase: int) -> dict[str, int]:
    """History lengths of a phase: phase 1 keeps the most recent lora.short_history[name] items."""
    unknown = [n for n in cfg.lora.short_history if n not in full]
    if unknown:
        raise ConfigError(f"lora.short_history: {unknown} not among the histories {list(full)}")
    if phase != 1:
        return dict(full)
    return {name: min(n, cfg.lora.short_history.get(name, n)) for name, n in full.items()}


def apply_phase(cfg: Config, model: LemurModel, full: dict[str, int], phase: int) -> None:
    """Set which sequence-model parameters train and the history lengths the model reads."""
    if phase:
        set_lora_phase(model.dense.sequence_model(), phase)
    model.history_lengths = phase_lengths(cfg, full, phase)
