"""The step module is the model that trains: `Trainer` (DMP + DeepSpeed, one gloo process) and the plain
`LemurStep` on one process without wrappers give the same loss and the same gradients on the same batch, with
the memory bank on (a fresh bank) and off, in float32 and under bf16 autocast; and the trainer's fast optimizer
path (fused AdamW / SGD, its own foreach clip) updates the weights as torch's per-tensor loop with a plain clip."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch
from torch import nn

from tests.test_content_source import BANK, _trainer, in_process

SPARSE_LR = 0.5
REFERENCE = [
    'embeddings.optimizer="sgd"',  # the fused update is then -lr * gradient: the tables' gradient is observable
    f"embeddings.lr={SPARSE_LR}",
    'embeddings.sharding_types=["table_wise"]',
]


def full_tensor(value: object) -> torch.Tensor:
    """A plain tensor, or the whole table of a one-process sharded one (a single local shard)."""
    if isinstance(value, torch.Tensor) and not hasattr(value, "local_shards"):
        return value.detach()
    shards = value.local_shards()  # type: ignore[attr-defined]
    assert len(shards) == 1 and list(shards[0].tensor.shape) == list(value.size())  # type: ignore[attr-defined]
    return shards[0].tensor.detach()


def sparse_weights(module: nn.Module) -> dict[str, torch.Tensor]:
    return {k: full_tensor(v).clone() for k, v in module.state_dict().items()}


AUTOCAST = ['training.dtype="bfloat16"', 'training.bf16_mode="autocast"']
TOLERANCE = {False: dict(loss=1e-6, logits=1e-5, grads=1e-4), True: dict(loss=1e-3, logits=2e-2, grads=2e-2)}
"""float32; bf16 autocast (the same bf16 matmuls on both paths, summed in another order by DMP and DeepSpeed)."""


def plain_copy(t: Any) -> Any:
    """The trainer's model as a plain `LemurModel` on the CPU, with the same dense and table weights."""
    from trainer.models.model import build_model

    collator = t.train_stream.dataset.collator
    plain = build_model(
        t.cfg, t.spec, t.plan, len(collator.tokenizer), collator.tokenizer.pad_token_id, "cpu"
    )
    plain.dense.load_state_dict(t.model.dense.state_dict())
    plain.sparse.load_state_dict(sparse_weights(t.model.sparse))
    return plain


def _same_step(dataset: str, out: str, bank: bool, autocast: bool = False) -> None:
    from trainer.content import build_content_source
    from trainer.step import LemurStep

    tol = TOLERANCE[autocast]
    t = _trainer(dataset, [*REFERENCE, *(BANK if bank else []), *(AUTOCAST if autocast else [])], out)
    plain = plain_copy(t)
    before = sparse_weights(t.model.sparse)
    dtype = torch.bfloat16 if autocast else torch.float32
    content = build_content_source(t.cfg, t.spec, plain.dense.content, t.items, torch.device("cpu"), dtype)
    reference = LemurStep(plain, content, t.cfg.training, dtype, dtype if autocast else None)
    assert (t.content_source is None) == (not bank) and (content is None) == (not bank)

    batch = next(iter(t.train_stream))
    torch.manual_seed(1)  # the same dropout masks on both paths
    loss, out_trainer = t.forward(batch)
    t.engine.backward(loss)
    torch.manual_seed(1)
    expected, out_plain = reference(batch)
    expected.backward()

    assert float(loss) == pytest.approx(float(expected), rel=tol["loss"], abs=1e-7)
    assert torch.allclose(out_trainer.logits.float(), out_plain.logits.float(), atol=tol["logits"])
    if bank:  # the histories carried content vectors: fresh targets joined in (the bank itself is empty)
        for name, vectors in out_plain.content.histories.items():
            assert torch.allclose(out_trainer.content.histories[name], vectors, atol=tol["logits"] / 10), name
        assert any(bool(v.abs().sum() > 0) for v in out_plain.content.histories.values())
    dense = dict(plain.dense.named_parameters())
    compared = 0
    for name, p in t.model.dense.named_parameters():
        if p.grad is None:
            assert dense[name].grad is None or not bool(dense[name].grad.any()), name
            continue
        assert torch.allclose(p.grad, dense[name].grad, rtol=tol["grads"], atol=tol["grads"] / 100), name
        compared += 1
    assert compared > 10
    # The tables were updated in the backward (fused SGD): the update is -lr times the plain gradient.
    after = sparse_weights(t.model.sparse)
    grads = {k: v.grad for k, v in plain.sparse.named_parameters()}
    assert set(grads) == set(after)
    for name, grad in grads.items():
        assert grad is not None and bool(grad.abs().sum() > 0), name
        update = (before[name] - after[name]) / SPARSE_LR
        assert torch.allclose(update, grad, atol=tol["grads"] / 10), (name, (update - grad).abs().max())


@pytest.mark.slow
@pytest.mark.parametrize(
    "bank, autocast",
    [(False, False), (True, False), (True, True)],
    ids=["no_bank", "fresh_bank", "bf16_autocast"],
)
def test_trainer_and_plain_step_module_agree(
    small_dataset: Path, tmp_path: Path, bank: bool, autocast: bool
) -> None:
    in_process(_same_step, str(small_dataset), str(tmp_path / "run"), bank, autocast)


CLIP = 0.05
"""Small enough that every step clips (asserted), so a missing or wrong clip changes the update."""


def _same_updates(dataset: str, out: str, optimizer: str) -> None:
    from trainer.step import LemurStep

    overrides = [
        *REFERENCE,
        f'optimizer.name="{optimizer}"',
        f"training.grad_clip={CLIP}",
        "model.use_content=false",
    ]
    t = _trainer(dataset, overrides, out)
    assert t.cfg.optimizer.fused and t.cfg.distributed.zero_stage == 0
    plain = plain_copy(t)
    reference = LemurStep(plain, None, t.cfg.training)
    params = [p for p in plain.dense.parameters() if p.requires_grad]
    opt = t.cfg.optimizer
    loop = dict(foreach=False, fused=False)  # torch's per-tensor reference loop
    dense_opt = (
        torch.optim.SGD(params, lr=opt.lr, momentum=0.9, weight_decay=opt.weight_decay, **loop)
        if optimizer == "sgd"
        else torch.optim.AdamW(params, lr=opt.lr, weight_decay=opt.weight_decay, **loop)
    )
    sparse_opt = torch.optim.SGD(plain.sparse.parameters(), lr=SPARSE_LR)
    stream = iter(t.train_stream)
    for step in range(3):
        batch = next(stream)
        lr = t.engine.get_lr()[0]
        torch.manual_seed(step)
        t.train_step(batch)
        t.step += 1
        torch.manual_seed(step)
        loss, _ = reference(batch, step)
        loss.backward()
        norm = torch.nn.utils.clip_grad_norm_(params, CLIP, foreach=False)
        assert float(norm) > 2 * CLIP
        for group in dense_opt.param_groups:
            group["lr"] = lr
        dense_opt.step()
        sparse_opt.step()
        dense_opt.zero_grad()
        sparse_opt.zero_grad()
    dense = dict(plain.dense.named_parameters())
    for name, p in t.model.dense.named_parameters():
        assert torch.allclose(p.detach(), dense[name].detach(), rtol=1e-4, atol=1e-6), name
    trained = sparse_weights(t.model.sparse)
    for name, w in sparse_weights(plain.sparse).items():
        assert torch.allclose(trained[name], w, atol=1e-5), name


@pytest.mark.slow
@pytest.mark.parametrize("optimizer", ["adamw", "sgd"])
def test_fused_optimizer_and_own_clip_match_the_reference_loop(
    small_dataset: Path, tmp_path: Path, optimizer: str
) -> None:
    in_process(_same_updates, str(small_dataset), str(tmp_path / "run"), optimizer)


def _non_finite_named(dataset: str, out: str) -> None:
    from trainer.loop import NonFiniteLoss, Window

    t = _trainer(dataset, ["model.use_content=false"], out)
    window = Window(first_step=10)
    for value in (0.5, 0.7, float("nan"), float("inf")):
        window.add(torch.tensor(value), 32)
    with pytest.raises(NonFiniteLoss, match="step 13: the training loss is nan"):
        t.step_losses(window)
    finite = Window(first_step=3)
    finite.add(torch.tensor(0.25), 32)
    assert t.step_losses(finite).tolist() == [0.25]


@pytest.mark.slow
def test_a_non_finite_loss_stops_training_naming_its_step(small_dataset: Path, tmp_path: Path) -> None:
    in_process(_non_finite_named, str(small_dataset), str(tmp_path / "run"))


def _host_runs_ahead(dataset: str, out: str) -> None:
    from deepspeed.accelerator import get_accelerator

    t = _trainer(dataset, BANK, out)
    accelerator = get_accelerator()
    synchronize, named_modules = accelerator.synchronize, torch.nn.Module.named_modules
    calls: list[int] = []
    walks: list[int] = []

    def counted_named_modules(self: torch.nn.Module, *args: Any, **kwargs: Any) -> Any:
        if self is t.model.dense:
            walks.append(1)
        return named_modules(self, *args, **kwargs)

    accelerator.synchronize = lambda *args, **kwargs: calls.append(1) or synchronize(*args, **kwargs)
    torch.nn.Module.named_modules = counted_named_modules  # type: ignore[method-assign]
    try:
        stream = iter(t.train_stream)
        for _ in range(5):  # DeepSpeed's throughput timer starts syncing at its third step
            t.train_step(next(stream))
            t.step += 1
    finally:
        accelerator.synchronize, torch.nn.Module.named_modules = synchronize, named_modules  # type: ignore[method-assign]
    assert calls == [], f"{len(calls)} device synchronizations from DeepSpeed in 5 steps"
    assert walks == [], f"{len(walks)} walks over the dense arch's modules in 5 steps"
    assert all(p.grad is None for p in t.model.dense.parameters()), "the step left gradients behind"


@pytest.mark.slow
def test_the_host_runs_ahead_of_the_device(small_dataset: Path, tmp_path: Path) -> None:
    """The host must run ahead of the GPU: a device sync per step idles the GPU while the next step is issued
    (DeepSpeed's throughput timer made 6 in 5 steps), and a host-bound step waits on every walk over the dense
    arch's hundreds of modules (DeepSpeed's zero_grad and the clip made 2 a step)."""
    in_process(_host_runs_ahead, str(small_dataset), str(tmp_path / "run"))


def _rolls_back(dataset: str, out: str, rollbacks: int) -> None:
    import json

    from trainer.loop import NonFiniteLoss

    overrides = [
        "model.use_content=false",
        "training.steps=12",
        "training.checkpoint_every=4",
        "training.eval_every=0",
        "logging.log_every=2",
        'training.on_nonfinite="rollback"',
        f"training.max_rollbacks={rollbacks}",
    ]
    t = _trainer(dataset, overrides, out)
    step = t.train_step
    poisoned: list[int] = []

    def diverging_step(batch: Any) -> torch.Tensor:  # step 6 blows the ranker's weights up once
        loss = step(batch)
        if t.step == 5 and not poisoned:
            poisoned.append(t.step)
            with torch.no_grad():
                next(t.model.dense.ranker.parameters()).fill_(float("nan"))
            return loss * float("nan")
        return loss

    t.train_step = diverging_step  # type: ignore[method-assign]
    if rollbacks == 0:
        with pytest.raises(NonFiniteLoss, match="step 6: .*after 0 rollbacks"):
            t.fit()
        return
    results = t.fit()
    assert results["rollbacks"] == [{"diverged": results["rollbacks"][0]["diverged"], "to_step": 4}]
    assert "step 6" in results["rollbacks"][0]["diverged"]
    assert all(bool(torch.isfinite(p).all()) for p in t.model.dense.parameters())
    records = [json.loads(line) for line in (Path(out) / "metrics.jsonl").read_text().splitlines()]
    steps = [r["step"] for r in records if r["kind"] == "train"]
    assert steps == [2, 4, 6, 8, 10, 12]  # the diverged window is gone, every step once
    assert all(r["loss"] is not None for r in records if r["kind"] == "train")


@pytest.mark.slow
@pytest.mark.parametrize("rollbacks", [1, 0], ids=["rolls_back", "stops_past_max_rollbacks"])
def test_a_non_finite_loss_rolls_back_to_the_last_checkpoint(
    small_dataset: Path, tmp_path: Path, rollbacks: int
) -> None:
    in_process(_rolls_back, str(small_dataset), str(tmp_path / "run"), rollbacks)


def _lr_multipliers(dataset: str, out: str) -> None:
    from trainer.config import ConfigError

    t = _trainer(dataset, ['optimizer.lr_multipliers={"content.text" = 0.1, query = 0.5}'], out)
    dense = dict(t.model.dense.named_parameters())
    rate = {id(p): g["lr"] for g in t.engine.optimizer.param_groups for p in g["params"]}
    base = next(rate[id(p)] for n, p in dense.items() if n.startswith("ranker.") and p.requires_grad)
    for name, param in dense.items():
        if not param.requires_grad:
            continue
        expected = 0.1 if name.startswith("content.text.") else 0.5 if name.startswith("query.") else 1.0
        assert rate[id(param)] == pytest.approx(base * expected), (
            name
        )  # the schedule scales every group alike
    before = {n: p.detach().clone() for n, p in dense.items()}
    t.train_step(next(iter(t.train_stream)))
    assert any(not torch.equal(before[n], p) for n, p in dense.items() if n.startswith("content.text."))
    t.cfg.optimizer.lr_multipliers = {"content.texts": 0.1}
    with pytest.raises(ConfigError, match=r"\['content.texts'\] name no parameter"):
        from trainer.engine import build_optimizer

        build_optimizer(t.cfg, t.model.dense)


def test_lr_multipliers_scale_each_parts_rate(small_dataset: Path, tmp_path: Path) -> None:
    in_process(_lr_multipliers, str(small_dataset), str(tmp_path / "run"))


def _new_item_embedding(dataset: str, out: str) -> None:
    from dataclasses import replace

    t = _trainer(dataset, ["model.item_id_dropout=0.25"], out)
    dense = t.model.dense
    batch = next(iter(t.train_stream))
    with torch.no_grad():
        dense.new_item.fill_(7.0)
    target = torch.randn(4000, dense.new_item.numel())
    many = replace(batch, cold=torch.zeros(4000, dtype=torch.bool))
    dense.train()
    torch.manual_seed(0)
    replaced = (dense.target_id_embedding(many, target) == 7.0).all(1).float().mean()
    assert 0.22 < float(replaced) < 0.28  # a random quarter of the rows in training
    dense.eval()
    cold = torch.arange(4000) % 3 == 0
    out_eval = dense.target_id_embedding(replace(batch, cold=cold), target)
    assert bool((out_eval[cold] == 7.0).all()) and torch.equal(
        out_eval[~cold], target[~cold]
    )  # new items only
    dense.train()
    loss, _ = t.forward(batch)
    loss.backward()
    assert dense.new_item.grad is not None  # it trains (and always has a gradient: no unused parameter)


def test_item_id_dropout_stands_a_learned_new_item_embedding_in_for_the_id(
    small_dataset: Path, tmp_path: Path
) -> None:
    in_process(_new_item_embedding, str(small_dataset), str(tmp_path / "run"))


def test_lr_multipliers_for_a_part_this_config_does_not_build_are_ignored() -> None:
    """A table's ID-only arm under the same --set as its content arms: `content` is None there, not a typo."""
    from trainer.config import ConfigError, load_config
    from trainer.engine import param_groups

    class Dense(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.ranker = nn.Linear(2, 2)
            self.content = None

    cfg = load_config("tiny", ['optimizer.lr_multipliers={"content.text" = 0.1}'])
    groups = param_groups(cfg, Dense())
    assert [g["lr"] for g in groups] == [cfg.optimizer.lr]
    cfg.optimizer.lr_multipliers = {"rankr": 0.1}
    with pytest.raises(ConfigError, match=r"\['rankr'\] name no parameter"):
        param_groups(cfg, Dense())
