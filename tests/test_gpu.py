"""GPU-only checks (skipped without CUDA): metrics gathered over NCCL equal the single-process result, and the
trainer's sharded embedding path with row-wise sharding runs forward/backward on CUDA."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp

from trainer.distributed import free_port
from trainer.metrics import EvalAccumulator

needs_two_gpus = pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs 2 CUDA GPUs")


def rows(rank: int, n: int, device: str | torch.device) -> tuple[torch.Tensor, ...]:
    g = torch.Generator().manual_seed(rank)
    logits = torch.randn(n, generator=g)
    labels = (torch.rand(n, generator=g) < torch.sigmoid(logits)).float()
    users = torch.randint(1, 10**6, (n,), generator=g)
    queries = torch.randint(0, 10**3, (n,), generator=g)
    cold = torch.rand(n, generator=g) < 0.3
    valid = torch.rand(n, generator=g) < 0.8
    return tuple(t.to(device) for t in (logits, labels, users, queries, cold, valid))


def _nccl_worker(rank: int, port: int, out: str) -> None:
    import torch.distributed as dist

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.cuda.set_device(rank)
    dist.init_process_group("nccl", rank=rank, world_size=2)
    accumulator = EvalAccumulator()
    accumulator.add(*rows(rank, [1000, 1700][rank], torch.device("cuda", rank)))
    torch.save(accumulator.compute(), f"{out}/rank{rank}.pt")
    dist.destroy_process_group()


@needs_two_gpus
def test_metrics_over_nccl_equal_single_process(tmp_path: Path) -> None:
    mp.spawn(_nccl_worker, args=(free_port(), str(tmp_path)), nprocs=2)
    per_rank = [torch.load(tmp_path / f"rank{r}.pt") for r in range(2)]
    union = EvalAccumulator()
    union.add(*rows(0, 1000, "cpu"))
    union.add(*rows(1, 1700, "cpu"))
    expected = union.compute()
    assert per_rank[0] == per_rank[1] or all(str(per_rank[0][k]) == str(per_rank[1][k]) for k in expected)
    for key, value in expected.items():
        assert per_rank[0][key] == pytest.approx(value, nan_ok=True), key


def _bank_worker(rank: int, port: int, out: str) -> None:
    import torch.distributed as dist

    from embeddings.memory_bank import MemoryBank

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.cuda.set_device(rank)
    dist.init_process_group("nccl", rank=rank, world_size=2)
    device = torch.device("cuda", rank)
    bank = MemoryBank(2**22, 16, dtype=torch.float32, device=device, max_staleness=1)  # no row collisions
    g = torch.Generator().manual_seed(7)
    all_ids = torch.randint(1, 2**62, (2, 6, 64), generator=g)  # [rank, step, n]
    all_vectors = torch.randn(2, 6, 64, 16, generator=g)
    seen_before, seen_after = [], []
    for step in range(6):
        ids = all_ids[rank, step].to(device)
        if step:  # read the other rank's previous-step ids: visible now (written at step - 1)
            _, hit = bank.read(all_ids[1 - rank, step - 1].to(device), step)
            seen_after.append(bool(hit.all()))
        _, hit_now = bank.read(all_ids[1 - rank, step].to(device), step)  # not written yet
        seen_before.append(bool(hit_now.any()))
        bank.write(ids, all_vectors[rank, step].to(device), step)  # async on a side stream
    vectors, hit = bank.read(all_ids[:, :5].reshape(-1).to(device), 6)
    torch.save((seen_before, seen_after, vectors.cpu(), hit.cpu()), f"{out}/bank{rank}.pt")
    dist.destroy_process_group()


@needs_two_gpus
def test_memory_bank_over_nccl_with_async_writes(tmp_path: Path) -> None:
    mp.spawn(_bank_worker, args=(free_port(), str(tmp_path)), nprocs=2)
    g = torch.Generator().manual_seed(7)
    torch.randint(1, 2**62, (2, 6, 64), generator=g)  # the ids, drawn first in the worker too
    expected = torch.randn(2, 6, 64, 16, generator=g)[:, :5].reshape(-1, 16)
    for rank in range(2):
        seen_before, seen_after, vectors, hit = torch.load(tmp_path / f"bank{rank}.pt")
        assert not any(seen_before) and all(seen_after)
        assert hit.all()
        assert torch.equal(vectors, expected)
