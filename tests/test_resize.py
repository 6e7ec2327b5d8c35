"""Resume at another world size (and another number of data workers): a checkpoint of 2 ranks continues on 1, one
of 1 rank (ZeRO 2) on 2; the dense weights, the ZeRO partitions and the tables right after the load are the saved
ones. A part that cannot load at the new size refuses before anything loads. The same-size resume stays exact
(tests/test_train.py and tests/test_preemption.py)."""

from __future__ import annotations

import math
import multiprocessing as mp
from pathlib import Path
from typing import Any

import pytest
import torch

from tests.conftest import small_config
from tests.test_train import FAST_MODEL, join_ranks, metrics, rank_environment
from trainer.checkpoint import Checkpointer, RankState, RngState, rank_file
from trainer.distributed import free_port

COMMON = ["training.steps=6", "training.eval_every=0", "training.checkpoint_every=3"]

# ------------------------------------------------------------------------------------- no process group


class Recorder:
    """A part that records its loads."""

    def __init__(self) -> None:
        self.loaded = False

    def save(self, directory: Path) -> None: ...

    def load(self, directory: Path) -> None:
        self.loaded = True


class FakeEngine:
    def __init__(self, stage: int, optimizer: Any = None) -> None:
        self.stage, self.optimizer = stage, optimizer

    def zero_optimization_stage(self) -> int:
        return self.stage


def written_by(path: Path, parts: dict[str, Any], world_size: int) -> None:
    for name, state in parts.items():
        (path / name).mkdir(parents=True)
        for r in range(world_size):
            torch.save({"world_size": world_size, "state": state}, path / name / rank_file(r))


def test_a_part_that_cannot_load_at_this_size_refuses_before_anything_loads(tmp_path: Path) -> None:
    from deepspeed.runtime.bf16_optimizer import BF16_Optimizer

    from trainer.engine import EngineState
    from trainer.loop import TrainState

    path = tmp_path / "step-00000004"
    written_by(path, {"trainer": {"step": 4, "phase": 0}}, world_size=2)
    (path / "sparse").mkdir()
    (path / "dense").mkdir()
    train = TrainState(0, enter_phase=lambda phase: None)
    sparse = Recorder()
    cases = [
        (FakeEngine(3), "distributed.zero_stage = 3"),
        (FakeEngine(0, BF16_Optimizer.__new__(BF16_Optimizer)), 'training.bf16_mode = "autocast"'),
    ]
    for engine, setting in cases:
        dense = EngineState(lambda engine=engine: engine)
        parts = {"trainer": RankState(train), "sparse": sparse, "dense": dense}
        with pytest.raises(ValueError, match="resume this checkpoint on 2 ranks|resume on 2 ranks") as err:
            Checkpointer(tmp_path, parts).load(path)  # type: ignore[arg-type]
        assert setting in str(err.value)
        assert not sparse.loaded and train.step == 0  # nothing loaded

    # A rank file missing: every rank fails alike, before anything loads.
    (path / "trainer" / rank_file(1)).unlink()
    parts = {"trainer": RankState(train), "sparse": sparse}
    with pytest.raises(FileNotFoundError, match="rank00001.pt missing"):
        Checkpointer(tmp_path, parts).load(path)  # type: ignore[arg-type]
    assert not sparse.loaded


def test_per_rank_states_reshard(tmp_path: Path) -> None:
    """2 saved ranks into 1 (no process group: rank 0 of 1): step and phase from rank 0, RNG of rank 0."""
    from trainer.loop import TrainState

    rng = RngState().state_dict()
    path = tmp_path / "step-00000004"
    written_by(path, {"trainer": {"step": 4, "phase": 1}, "rng": rng}, world_size=2)
    (path / "sparse").mkdir()
    entered: list[int] = []
    train = TrainState(0, enter_phase=entered.append)
    sparse = Recorder()
    parts = {"trainer": RankState(train), "sparse": sparse, "rng": RankState(RngState())}
    resize = Checkpointer(tmp_path, parts).load(path)  # type: ignore[arg-type]
    assert train.step == 4 and entered == [1] and sparse.loaded
    assert resize is not None and resize.describe() == (
        "a checkpoint of 2 ranks on 1 rank: trainer step 4 and phase 1 from rank 0, sparse resharded, "
        "rng restored per rank where saved (else rank 0's)"
    )


def test_reader_restarts_the_epoch_from_the_samples_consumed(small_dataset: Path) -> None:
    """3 saved ranks 5 batches into epoch 1 (3 * 5 * 16 = 240 samples) -> rank 1 of 2 with 2 workers: 7 whole
    batches done (240 // 32), dealt 4, 3 to its readers; it then delivers the rest of epoch 1 and goes on."""
    from trainer.data.reader import make_batch_stream

    cfg = small_config(small_dataset, "data.num_workers=2")
    stream = make_batch_stream(cfg, "train", rank=1, world_size=2)
    saved = [
        {"epoch": 1, "batches": 5, "positions": [80], "readers": 1, "world_size": 3, "skipped": {"x": r}}
        for r in range(3)
    ]
    state, note = stream.reshard_state(saved)
    assert note == "restarts epoch 1 at sample 240"
    assert (state["epoch"], state["batches"], state["positions"]) == (1, 7, [64, 48])
    assert state["skipped"] == {"x": 1}  # saved rank 1 (1 % 2): the skip counts are not counted twice
    stream.load_state_dict(state)
    per_epoch = stream.dataset.batches_per_epoch(1)
    seen = 0
    for _ in stream:
        if stream.epoch != 1:  # the first batch of epoch 2
            break
        seen += 1
    assert seen == per_epoch - 7

    # Another number of workers on as many ranks: the same restart, from this rank's own state.
    other = make_batch_stream(small_config(small_dataset), "train", rank=1, world_size=2)
    other.load_state_dict({**saved[0], "world_size": 2, "readers": 3, "positions": [32, 32, 16]})
    assert (other.epoch, other.batches, other.positions) == (1, 5, [80])  # 5 * 16 * 2 // (16 * 2)


# ------------------------------------------------------------------------------------- 1 and 2 gloo processes


def _worker(
    rank: int, world_size: int, port: int, dataset: str, overrides: list[str], resume: str | None, dump: str
) -> None:
    """One rank of `train()`; after a resume it writes what it loaded to `dump/rank{rank}.pt`."""
    rank_environment(rank, world_size, port)
    from trainer.checkpoint import ModelState
    from trainer.loop import Trainer
    from trainer.train import train

    resume_method = Trainer.resume

    def resume_and_dump(self: Trainer, checkpoint: str) -> None:
        resume_method(self, checkpoint)
        sparse = ModelState(self.model.sparse, self.dmp.fused_optimizer).state_dict()
        loaded = {
            "step": self.step,
            "dense": {k: v.detach().clone() for k, v in self.model.dense.state_dict().items()},
            "sparse": {k: local_pieces(v) for k, v in flatten(sparse).items() if torch.is_tensor(v)},
            "zero": zero_partitions(self.engine.optimizer),
        }
        torch.save(loaded, Path(dump) / f"rank{rank}.pt")

    Trainer.resume = resume_and_dump  # type: ignore[method-assign]
    train(small_config(dataset, *FAST_MODEL, *overrides), resume=resume)


def zero_partitions(optimizer: Any) -> list[dict[str, torch.Tensor]]:
    """This rank's ZeRO 1/2 partitions per parameter group: the fp32 masters and the optimizer state tensors."""
    parts = []
    for master in getattr(optimizer, "single_partition_of_fp32_groups", []):
        state = optimizer.optimizer.state[master]
        tensors = {k: v.clone() for k, v in state.items() if torch.is_tensor(v) and v.dim() > 0}
        parts.append({"fp32": master.detach().clone(), **tensors})
    return parts


def flatten(state: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    flat = {}
    for key, value in state.items():
        if isinstance(value, dict):
            flat.update(flatten(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = value
    return flat


def local_pieces(value: torch.Tensor) -> list[tuple[list[int], torch.Tensor]]:
    """This rank's pieces of a (sharded) tensor, with their offsets in the whole tensor."""
    from torch.distributed._shard.sharded_tensor import ShardedTensor
    from torch.distributed.tensor import DTensor

    if isinstance(value, ShardedTensor):
        return [(list(s.metadata.shard_offsets), s.tensor.detach().clone()) for s in value.local_shards()]
    if isinstance(value, DTensor):
        from torch.distributed.tensor._utils import compute_local_shape_and_global_offset

        _, offset = compute_local_shape_and_global_offset(value.shape, value.device_mesh, value.placements)
        return [(list(offset), value.to_local().detach().clone())]
    return [([0] * value.dim(), value.detach().clone())]


def run(
    dataset: Path, overrides: list[str], world_size: int, resume: str | None = None, dump: Path | None = None
) -> None:
    ctx = mp.get_context("spawn")
    port = free_port()
    args = (world_size, port, str(dataset), overrides, resume, str(dump))
    procs = [ctx.Process(target=_worker, args=(r, *args)) for r in range(world_size)]
    for p in procs:
        p.start()
    join_ranks(procs, 300)


def assert_loaded_the_checkpoint(checkpoint: Path, dump: Path, world_size: int) -> None:
    """Every rank's dense weights are the saved ones, and its pieces of the tables and their optimizer state are
    the saved tensors' slices."""
    from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

    dense = checkpoint / "dense" / "dense"
    saved_dense = torch.load(dense / "mp_rank_00_model_states.pt", weights_only=False)["module"]
    dcp_to_torch_save(checkpoint / "sparse", dump / "sparse.pt")
    saved_sparse = flatten(torch.load(dump / "sparse.pt", weights_only=False))
    covered = dict.fromkeys(saved_sparse, 0)
    for rank in range(world_size):
        loaded = torch.load(dump / f"rank{rank}.pt", weights_only=False)
        assert loaded["step"] == 3
        assert loaded["dense"].keys() == saved_dense.keys()
        for key, value in loaded["dense"].items():
            assert torch.equal(value, saved_dense[key]), key
        for key, pieces in loaded["sparse"].items():
            for offsets, piece in pieces:
                where = tuple(slice(o, o + n) for o, n in zip(offsets, piece.shape))
                assert torch.equal(piece, saved_sparse[key][where]), key
                covered[key] += piece.numel()
    assert all(covered[k] == v.numel() for k, v in saved_sparse.items() if torch.is_tensor(v)), covered


def assert_continued(out: Path) -> None:
    train = metrics(out, "train")
    assert sorted(train) == list(range(1, 7))
    assert all(math.isfinite(train[s]["loss"]) for s in range(4, 7))
    assert (out / "checkpoints" / "latest").read_text().strip() == "step-00000006"


@pytest.mark.slow
def test_two_ranks_resume_on_one(
    small_dataset: Path, tmp_path: Path, capfd: pytest.CaptureFixture[str]
) -> None:
    out, dump = tmp_path / "run", tmp_path / "dump"
    dump.mkdir()
    overrides = [*COMMON, f'logging.out_dir="{out}"']
    run(small_dataset, overrides, world_size=2)
    checkpoint = out / "checkpoints" / "step-00000003"
    run(small_dataset, overrides, world_size=1, resume=str(checkpoint), dump=dump)
    err = capfd.readouterr().err
    assert (
        "resuming a checkpoint of 2 ranks on 1 rank: trainer step 3 and phase 0 from rank 0, sparse resharded, "
        "dense replicated (ZeRO 0) and loaded as saved, reader restarts epoch 0 at sample 192, "
        "rng restored per rank where saved (else rank 0's) (not bit-exact)"
    ) in err, err[-3000:]
    assert_loaded_the_checkpoint(checkpoint, dump, world_size=1)
    assert_continued(out)


@pytest.mark.slow
def test_one_rank_resumes_on_two_with_zero2_and_data_workers(
    small_dataset: Path, tmp_path: Path, capfd: pytest.CaptureFixture[str]
) -> None:
    out, dump = tmp_path / "run", tmp_path / "dump"
    dump.mkdir()
    overrides = [*COMMON, "distributed.zero_stage=2", f'logging.out_dir="{out}"']
    run(small_dataset, overrides, world_size=1)
    checkpoint = out / "checkpoints" / "step-00000003"
    run(small_dataset, [*overrides, "data.num_workers=2"], world_size=2, resume=str(checkpoint), dump=dump)
    err = capfd.readouterr().err
    assert (
        "resuming a checkpoint of 1 rank on 2 ranks: trainer step 3 and phase 0 from rank 0, sparse resharded, "
        "dense weights loaded and ZeRO 2 optimizer partitions regathered, reader restarts epoch 0 at sample 96"
    ) in err, err[-3000:]
    assert_loaded_the_checkpoint(checkpoint, dump, world_size=2)
    # The one saved ZeRO partition (fp32 masters, Adam's moments), split over the two ranks.
    saved = torch.load(
        checkpoint / "dense" / "dense" / "zero_pp_rank_0_mp_rank_00_optim_states.pt", weights_only=False
    )["optimizer_state_dict"]
    halves = [torch.load(dump / f"rank{r}.pt", weights_only=False)["zero"] for r in range(2)]
    for group, fp32 in enumerate(saved["single_partition_of_fp32_groups"]):
        wholes = {"fp32": fp32, **saved["base_optimizer_state"]["state"][group]}
        assert set(halves[0][group]) == {"fp32", "exp_avg", "exp_avg_sq"}
        for key, loaded in halves[0][group].items():
            whole = wholes[key][: fp32.numel()]
            assert torch.equal(torch.cat([loaded, halves[1][group][key]])[: fp32.numel()], whole), key
    assert_continued(out)
