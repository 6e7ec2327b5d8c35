"""The config tree: presets load, overrides apply with types, errors name the field, TOML round-trips."""

from __future__ import annotations

from pathlib import Path

import pytest

from trainer.config import ConfigError, config_to_toml, load_config, preset_names


def test_every_preset_loads_and_validates() -> None:
    assert {"tiny", "small", "lemur", "em3"} <= set(preset_names())
    for name in preset_names():
        assert load_config(name).name == name


def test_lemur_and_em3_presets_have_the_papers_shape() -> None:
    lemur = load_config("lemur")
    assert (lemur.model.query_tower.layers, lemur.model.text_tower.layers) == (2, 4)
    assert lemur.model.text_tower.hidden == 256 and lemur.model.content_dim == 128
    assert lemur.data.synth.long_history == 1000 and not lemur.model.use_images and lemur.data.synth.search
    em3 = load_config("em3")
    assert em3.model.use_images and em3.model.fusion == "fqformer" and em3.data.image_size == 224


def test_overrides_are_typed() -> None:
    cfg = load_config(
        "tiny",
        [
            "data.batch_size=8",
            "optimizer.lr=1e-2",
            "model.fusion=2flow",
            "embeddings.hash_sizes={item_id = 7}",
        ],
    )
    assert cfg.data.batch_size == 8 and cfg.optimizer.lr == 0.01 and cfg.model.fusion == "2flow"
    assert cfg.embeddings.hash_sizes == {"item_id": 7}
    assert load_config("tiny", ["optimizer.lr=1"]).optimizer.lr == 1.0  # int is fine for a float


@pytest.mark.parametrize(
    "override,message",
    [
        ("data.batch_size=0", "data.batch_size: must be > 0"),
        ("data.batch_size=x", "data.batch_size must be int"),
        ("data.bad_input=maybe", "data.bad_input"),
        ("model.fusion=concat", "model.fusion"),
        ("model.text_budgets={title = 0}", "model.text_budgets: budgets must be > 0"),
        ("model.text_tower.hidden=31", "model.text_tower.hidden: must be divisible by heads"),
        ("training.dtype=float16", "training.dtype"),
        ("data.synth.eval_share=1.5", "data.synth.eval_share"),
        ("data.nope=1", "unknown field 'data.nope'"),
        ("nope.x=1", "no section 'nope'"),
        ("data=1", "is a section"),
        ("data.batch_size", "expected key=value"),
        ('embeddings.sharding_types=["data_parallel"]', "data_parallel is refused: DDP is off"),
        ("training.grad_accum=2", "training.grad_accum: must be 1: fused sparse optimizers"),
        ("training.gc_every=-1", "training.gc_every: must be >= 0"),
        ("optimizer.lr=inf", "optimizer.lr: must be a finite number, got inf"),
        ("embeddings.lr=nan", "embeddings.lr: must be a finite number, got nan"),
        ("model.ranker=mlp", "model.ranker: must be one of rankmixer, dlrm_mlp"),
        ('embeddings.optimizer="lamb"', "embeddings.optimizer: must be one of rowwise_adagrad"),
        ('embeddings.sharding_types=["grid"]', "embeddings.sharding_types: unknown ['grid']"),
    ],
)
def test_errors_name_the_field(override: str, message: str) -> None:
    with pytest.raises(ConfigError, match=message.replace("[", r"\[").replace("]", r"\]")):
        load_config("tiny", [override])


def test_unknown_preset_and_bad_file(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="unknown preset"):
        load_config("huge")
    bad = tmp_path / "bad.toml"
    bad.write_text("[data]\nbatch_size = 'eight'\n")
    with pytest.raises(ConfigError, match=r"bad.toml: data.batch_size must be int"):
        load_config(str(bad))


def test_resolved_config_round_trips_through_toml(tmp_path: Path) -> None:
    for name in preset_names():
        cfg = load_config(name, ["embeddings.hash_sizes={item_id = 11}"])
        path = tmp_path / f"{name}.toml"
        path.write_text(config_to_toml(cfg))
        assert load_config(str(path)) == cfg


@pytest.mark.parametrize(
    "overrides,message",
    [
        (
            ["model.use_content=false", "memory_bank.enabled=true"],
            "memory_bank.enabled: needs model.use_content = true",
        ),
        (["lora.rank=2", "lora.phase2_start=5"], "lora.rank: LoRA adapts the LONGER decoders"),
        (["memory_bank.warm_up=true"], "memory_bank.warm_up: needs memory_bank.enabled = true"),
    ],
)
def test_cross_section_rules_name_the_field(overrides: list[str], message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        load_config("tiny", overrides)
    load_config("lemur", ["model.use_content=false", "memory_bank.enabled=false"])  # the ID-only baseline


def test_every_registered_name_resolves_to_a_builder() -> None:
    from embeddings.registry import FUSED_OPTIMIZERS, SHARDING_TYPES
    from trainer.config.registry import FUSIONS, RANKERS

    for registry in (RANKERS, FUSIONS, FUSED_OPTIMIZERS, SHARDING_TYPES):
        for name in registry.names:
            assert registry.resolve(name) is not None, (registry.family, name)
    with pytest.raises(KeyError, match="unknown ranker 'mlp'"):
        RANKERS.resolve("mlp")


@pytest.mark.parametrize(
    "overrides, trainer_clips",
    [
        (["distributed.zero_stage=0"], True),  # fp32 weights: the gradients are in param.grad
        (['training.dtype="bfloat16"', 'training.bf16_mode="autocast"', "distributed.zero_stage=0"], True),
        (['training.dtype="bfloat16"', 'training.bf16_mode="weights"', "distributed.zero_stage=0"], False),
        (['training.dtype="bfloat16"', 'training.bf16_mode="autocast"', "distributed.zero_stage=2"], False),
        (["distributed.zero_stage=0", "training.grad_clip=0.0"], False),
    ],
)
def test_the_trainer_clips_only_where_deepspeed_would_not(overrides: list[str], trainer_clips: bool) -> None:
    """DeepSpeed clips with ZeRO 1-3 and with bf16 weights (its BF16_Optimizer's fp32 copies); with ZeRO 0 over
    the weights as they are, the trainer clips with one foreach pass and DeepSpeed is told not to."""
    from trainer.engine import clips_itself, deepspeed_config

    cfg = load_config("tiny", ["training.grad_clip=0.5", *overrides])
    ds = deepspeed_config(cfg, world_size=1)
    assert clips_itself(cfg) is trainer_clips
    assert ds["gradient_clipping"] == (0.0 if trainer_clips else cfg.training.grad_clip)
    bf16 = cfg.training.dtype == "bfloat16"
    assert ds["bf16"]["enabled"] == (bf16 and cfg.training.bf16_mode == "weights")
    assert ds["torch_autocast"]["enabled"] == (bf16 and cfg.training.bf16_mode == "autocast")
