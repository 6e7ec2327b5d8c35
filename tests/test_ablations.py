"""The ablation and stage modes as config: which parameters receive gradients under stop-gradient, frozen encoders
(two-stage), the contrastive-only objective, CIC, and each LoRA phase; LoRA adapters start as the identity; the
two-stage hand-over file."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from torch import nn

from tests.test_content_source import BANK, _trainer, in_process
from trainer.models.lora import LoRALinear, add_lora, set_lora_phase


def test_lora_starts_as_the_base_layer_and_phases_pick_the_trainable_set() -> None:
    torch.manual_seed(0)
    block = nn.Sequential(nn.Linear(6, 8), nn.GELU(), nn.Sequential(nn.Linear(8, 4)), nn.LayerNorm(4))
    x = torch.randn(3, 6)
    before = block(x)
    adapters = add_lora(block, rank=2, alpha=4.0)
    assert len(adapters) == 2 and isinstance(block[0], LoRALinear) and isinstance(block[2][0], LoRALinear)
    assert torch.allclose(block(x), before)  # B = 0: the adapter adds nothing yet
    set_lora_phase(block, 1)
    trainable = {n for n, p in block.named_parameters() if p.requires_grad}
    assert trainable == {
        "0.base.weight",
        "0.base.bias",
        "2.0.base.weight",
        "2.0.base.bias",
        "3.weight",
        "3.bias",
    }
    set_lora_phase(block, 2)
    trainable = {n for n, p in block.named_parameters() if p.requires_grad}
    assert trainable == {"0.lora_a", "0.lora_b", "2.0.lora_a", "2.0.lora_b"}
    with torch.no_grad():
        block[0].lora_b.fill_(0.1)
    manual = block[0].base(x) + (x @ block[0].lora_a.T @ block[0].lora_b.T) * 2.0
    assert torch.allclose(block[0](x), manual)


def grads(module: nn.Module) -> dict[str, bool]:
    """Parameter name -> whether it received a non-zero gradient."""
    return {n: p.grad is not None and bool(p.grad.abs().sum() > 0) for n, p in module.named_parameters()}


def any_grad(module: nn.Module, contains: str = "") -> bool:
    return any(v for n, v in grads(module).items() if contains in n)


def backward_once(t, step: int = 0):  # type: ignore[no-untyped-def]
    batch = next(iter(t.train_stream))
    t.step = step
    loss, _ = t.forward(batch)
    t.engine.backward(loss)
    return t.model.dense


def _gradient_modes(dataset: str, out: str) -> None:
    longer = ["model.history_encoder=longer"]
    d = backward_once(_trainer(dataset, [*BANK, "training.sqdc_weight=0"], out + "/e2e"))
    assert any_grad(d.content) and any_grad(d.query) and any_grad(d.ranker)

    d = backward_once(
        _trainer(dataset, [*BANK, "model.stop_gradient=true", "training.sqdc_weight=0"], out + "/sg")
    )
    assert not any_grad(d.content) and not any_grad(d.query) and any_grad(d.ranker)
    d = backward_once(
        _trainer(dataset, [*BANK, "model.stop_gradient=true", "training.sqdc_weight=0.1"], out + "/sg2")
    )
    assert any_grad(d.content) and any_grad(d.query)  # only SQDC trains the encoders now

    t = _trainer(dataset, [*BANK, "model.freeze_content=true"], out + "/frozen")
    d = backward_once(t)
    assert all(not p.requires_grad and p.grad is None for p in d.content.parameters())
    in_optimizer = sum(p.numel() for g in t.engine.optimizer.param_groups for p in g["params"])
    assert in_optimizer == t.count_params(True) < t.count_params(False)

    d = backward_once(
        _trainer(dataset, [*BANK, 'training.objective="contrastive"', "training.sqdc_weight=0.1"], out + "/c")
    )
    assert any_grad(d.content) and any_grad(d.query) and not any_grad(d.ranker)

    d = backward_once(_trainer(dataset, [*BANK, "training.cic_weight=0.1"], out + "/cic"))
    assert any_grad(d.cic) and any_grad(d.content)
    d = backward_once(_trainer(dataset, [*BANK], out + "/nocic"))
    assert d.cic is None

    lora = [*longer, "lora.rank=2", "lora.phase2_start=5", "lora.short_history={long = 4}"]
    t = _trainer(dataset, lora, out + "/lora")
    assert t.phase == 1 and t.model.history_lengths["long"] == 4
    d = backward_once(t)
    seq = d.sequence_model()
    assert any_grad(seq, "base.weight") and not any_grad(seq, "lora_")
    assert any_grad(d.ranker) and any_grad(d.content)
    t.step = 5
    t.enter_phase(2)
    assert t.model.history_lengths["long"] == 40
    for p in d.parameters():
        p.grad = None
    d = backward_once(t, step=5)
    assert any_grad(seq, "lora_b") and not any_grad(seq, "base.")
    assert not any(p.requires_grad for n, p in seq.named_parameters() if "norm" in n)
    assert any_grad(d.ranker) and any_grad(d.content)  # the rest of the model keeps training
    in_optimizer = {id(p) for g in t.engine.optimizer.param_groups for p in g["params"]}
    assert all((id(p) in in_optimizer) == p.requires_grad for p in d.parameters())


@pytest.mark.slow
def test_which_parameters_train_in_each_mode(small_dataset: Path, tmp_path: Path) -> None:
    in_process(_gradient_modes, str(small_dataset), str(tmp_path))


def _two_stage(dataset: str, out: str) -> None:
    from trainer.two_stage import ENCODER_FILE

    stage1 = _trainer(
        dataset,
        [
            'training.objective="contrastive"',
            "training.sqdc_weight=0.1",
            "training.steps=3",
            "training.eval_every=0",
            "training.checkpoint_every=0",
        ],
        out + "/stage1",
    )
    stage1.fit()
    encoder = Path(out) / "stage1" / ENCODER_FILE
    assert encoder.is_file()
    stage2 = _trainer(
        dataset, [f'model.content_init="{encoder}"', "model.freeze_content=true"], out + "/stage2"
    )
    for a, b in zip(stage1.model.dense.content.parameters(), stage2.model.dense.content.parameters()):
        assert torch.equal(a.float(), b.float())
    before = [p.detach().clone() for p in stage2.model.dense.content.parameters()]
    stream = iter(stage2.train_stream)
    for _ in range(2):
        stage2.train_step(next(stream))
        stage2.step += 1
    assert all(torch.equal(a, b) for a, b in zip(before, stage2.model.dense.content.parameters()))


@pytest.mark.slow
def test_two_stage_hands_the_encoders_over_and_keeps_them_frozen(small_dataset: Path, tmp_path: Path) -> None:
    in_process(_two_stage, str(small_dataset), str(tmp_path))


def test_bad_ablation_config_names_the_field(small_dataset: Path) -> None:
    from tests.conftest import small_config
    from trainer.config.schema import ConfigError
    from trainer.data.spec import read_spec
    from trainer.models.model import history_content_dims

    cfg = small_config(small_dataset, *BANK, 'model.no_content_histories=["longest"]')
    with pytest.raises(ConfigError, match="model.no_content_histories"):
        history_content_dims(cfg, read_spec(small_dataset))
    cfg = small_config(small_dataset, *BANK, 'model.no_content_histories=["short"]')
    assert history_content_dims(cfg, read_spec(small_dataset)) == {"short": 0, "long": 32}
    with pytest.raises(ConfigError, match="lora.phase2_start"):
        small_config(small_dataset, "lora.rank=2").validate()
