"""The memory bank against plain Python references: a dict (latest vector per id) and a direct-mapped slot
simulation of the documented placement and collision policy; one process and two gloo processes."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from embeddings.memory_bank import MemoryBank, coverage_of, owner_of, row_of, slot_of

DIM = 8
BIG = 1 << 20  # rows in all: the few hundred ids of a test never share a row (asserted where it matters)

Writes = list[tuple[int, torch.Tensor, torch.Tensor]]
"""(step, ids, vectors) in issue order; inside a step, ranks in rank order (the global position order)."""


# ----------------------------------------------------------------------------------------------- references


def latest(writes: Writes, max_step: float = math.inf) -> dict[int, torch.Tensor]:
    """The dict reference: the last written vector (bf16-rounded, as stored) of each id, over steps <= max_step."""
    ref: dict[int, torch.Tensor] = {}
    for step, ids, vectors in writes:
        if step <= max_step:
            for i, v in zip(ids.tolist(), vectors):
                ref[i] = v.to(torch.bfloat16).float()
    return ref


def slots(
    writes: Writes, world: int, rows: int
) -> tuple[dict[tuple[int, int], tuple[int, torch.Tensor]], int]:
    """Direct-mapped simulation, one entry at a time: slot (owner, row) -> (id, vector), and the evictions."""
    table: dict[tuple[int, int], tuple[int, torch.Tensor]] = {}
    evictions = 0
    for _, ids, vectors in writes:
        owners, places = (
            owner_of(ids, world, world * rows).tolist(),
            row_of(ids, world, world * rows).tolist(),
        )
        for i, v, o, r in zip(ids.tolist(), vectors, owners, places):
            if (o, r) in table and table[o, r][0] != i:
                evictions += 1
            table[o, r] = (i, v.to(torch.bfloat16).float())
    return table, evictions


def expected_read(ref: dict[int, torch.Tensor], ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    hit = torch.tensor([i in ref for i in ids.tolist()], dtype=torch.bool)
    vectors = (
        torch.stack([ref.get(i, torch.zeros(DIM)) for i in ids.tolist()])
        if ids.numel()
        else torch.zeros(0, DIM)
    )
    return vectors, hit


def assert_read(
    got: tuple[torch.Tensor, torch.Tensor], ref: dict[int, torch.Tensor], ids: torch.Tensor
) -> None:
    vectors, hit = expected_read(ref, ids)
    assert torch.equal(got[1], hit)
    assert torch.equal(got[0].float(), vectors)


def distinct_slots(ids: torch.Tensor, world: int, rows: int) -> bool:
    uniq = ids.unique()
    keys = owner_of(uniq, world, world * rows) * rows + row_of(uniq, world, world * rows)
    return keys.unique().numel() == uniq.numel()


def random_writes(seed: int, steps: range, n: int, id_range: tuple[int, int]) -> Writes:
    """Random writes with duplicate ids inside and across steps."""
    g = torch.Generator().manual_seed(seed)
    return [(s, torch.randint(*id_range, (n,), generator=g), torch.randn(n, DIM, generator=g)) for s in steps]


def dedup_reference(
    hist: torch.Tensor, mask: torch.Tensor, cached: torch.Tensor, fresh_ids: torch.Tensor, fresh: torch.Tensor
) -> torch.Tensor:
    """The obvious loop: a masked-in history entry whose id is fresh takes the last fresh vector of that id."""
    rows = []
    last = {i: k for k, i in enumerate(fresh_ids.tolist())}
    for b in range(hist.shape[0]):
        for j in range(hist.shape[1]):
            i = int(hist[b, j])
            rows.append(fresh[last[i]] if bool(mask[b, j]) and i in last else cached[b, j].float())
    return torch.stack(rows).view(cached.shape)


def assert_same_grad(got: torch.Tensor, want: torch.Tensor) -> None:
    """Equal up to summation order, and zero exactly where the reference is zero."""
    torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-6)
    assert torch.equal(got == 0, want == 0)


def dedup_inputs(seed: int, batch: int = 4, length: int = 6, m: int = 7) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {
        "hist": torch.randint(0, 20, (batch, length), generator=g),
        "mask": torch.rand(batch, length, generator=g) < 0.8,
        "cached": torch.randn(batch, length, DIM, generator=g).to(torch.bfloat16),
        "fresh_ids": torch.randint(0, 20, (m,), generator=g),
        "fresh": torch.randn(m, DIM, generator=g),
        "weights": torch.randn(batch, length, DIM, generator=g),
    }


def write_all(bank: MemoryBank, writes: Writes) -> None:
    for step, ids, vectors in writes:
        bank.write(ids, vectors, step)


# ------------------------------------------------------------------------------------------- one process


def test_placement_is_world_independent_and_spreads_over_rows() -> None:
    ids = torch.arange(200_000) << 20  # ids sharing their low bits
    capacity = 4 * 1024
    for world in (1, 2, 3, 4):
        rows = -(-capacity // world)
        assert torch.equal(
            owner_of(ids, world, capacity) * rows + row_of(ids, world, capacity), slot_of(ids, capacity)
        )
    per_slot = torch.bincount(slot_of(ids, capacity), minlength=capacity).double()
    expected = ids.numel() / per_slot.numel()
    chi2_per_slot = ((per_slot - expected) ** 2 / expected).mean()
    assert chi2_per_slot < 1.2  # ~1 for uniform slots: the row does not correlate with the owner


def test_one_process_matches_the_dict() -> None:
    writes = random_writes(0, range(1, 6), 64, (0, 300))
    assert distinct_slots(torch.cat([w[1] for w in writes]), 1, BIG)
    bank = MemoryBank(BIG, DIM)
    write_all(bank, writes)
    ids = torch.cat(
        [torch.arange(0, 400), torch.tensor([7, 7, 399, 7])]
    )  # 300..399 never written; duplicates
    got = bank.read(ids, step=6, dtype=torch.float32)
    assert got[0].dtype == torch.float32
    assert_read(got, latest(writes), ids)
    assert bank.stats() == {"rows": BIG, "filled": len(latest(writes)), "evictions": 0, "pending_writes": 0}


def test_entries_read_as_invalid_miss_even_where_their_id_is_stored() -> None:
    """Padding slots are asked for with valid=False: zero vectors and no hit, whatever id they carry (id 0 is a
    real item here), and the valid entries read as without the mask."""
    bank = MemoryBank(BIG, DIM)
    ids = torch.arange(0, 10)
    bank.write(ids, torch.randn(10, DIM), step=0)
    valid = torch.arange(10) % 3 != 0
    vectors, hit = bank.read(ids, step=1, dtype=torch.float32, valid=valid)
    plain, plain_hit = bank.read(ids, step=1, dtype=torch.float32)
    assert bool(plain_hit.all())
    assert torch.equal(hit, valid)
    assert torch.equal(vectors[valid], plain[valid])
    assert not bool(vectors[~valid].any())


def test_duplicates_in_one_write_last_position_wins() -> None:
    bank = MemoryBank(BIG, DIM, dtype=torch.float32)
    ids = torch.tensor([5, 9, 5, 5, 9])
    vectors = torch.arange(5.0).unsqueeze(1).expand(5, DIM)
    bank.write(ids, vectors, step=1)
    got, hit = bank.read(torch.tensor([9, 5]), step=2)
    assert hit.all() and got[:, 0].tolist() == [4.0, 3.0]


def test_collisions_miss_instead_of_returning_another_item() -> None:
    rows = 16
    writes = random_writes(1, range(1, 6), 20, (0, 100))
    bank = MemoryBank(rows, DIM)
    write_all(bank, writes)
    ids = torch.arange(0, 120)
    vectors, hit = bank.read(ids, step=6, dtype=torch.float32)
    table, evictions = slots(writes, 1, rows)
    ref = {i: v for i, v in table.values()}  # what the direct-mapped policy keeps
    assert_read((vectors, hit), ref, ids)
    assert 0 < hit.sum() <= rows < len(latest(writes))
    newest = latest(writes)
    for i in ids[hit].tolist():  # a hit is always the item's own latest vector
        assert torch.equal(vectors[i], newest[i])
    assert bank.stats()["evictions"] == evictions > 0
    assert bank.stats()["filled"] == len(table)


@pytest.mark.parametrize("staleness", [1, 2, 3])
def test_read_at_t_sees_exactly_the_writes_up_to_t_minus_k(staleness: int) -> None:
    """A training-like loop: read everything at step t, then write step t's vectors."""
    writes = random_writes(2, range(1, 9), 12, (0, 30))
    bank = MemoryBank(BIG, DIM, max_staleness=staleness)
    ids = torch.arange(0, 30)
    for step, step_ids, vectors in writes:
        assert_read(bank.read(ids, step), latest(writes, step - staleness), ids)
        bank.write(step_ids, vectors, step)
        assert_read(bank.read(ids, step), latest(writes, step - staleness), ids)  # not its own step's write
    for t in range(9, 9 + staleness + 1):
        assert_read(bank.read(ids, t), latest(writes, t - staleness), ids)


def test_an_older_value_stays_readable_until_the_newer_write_is_due() -> None:
    bank = MemoryBank(BIG, DIM, dtype=torch.float32, max_staleness=2)
    item = torch.tensor([42])
    bank.write(item, torch.full((1, DIM), 1.0), step=3)
    bank.write(item, torch.full((1, DIM), 2.0), step=5)
    seen = {t: bank.read(item, t) for t in range(4, 8)}
    assert not seen[4][1].any()
    assert [float(seen[t][0][0, 0]) for t in (5, 6, 7)] == [1.0, 1.0, 2.0]
    assert bank.stats()["pending_writes"] == 0


def test_no_gradient_reaches_bank_reads() -> None:
    source = torch.randn(4, DIM, requires_grad=True)
    bank = MemoryBank(BIG, DIM, dtype=torch.float32)
    ids = torch.arange(4)
    bank.write(ids, source * 2, step=0)
    vectors, _ = bank.read(ids, step=1)
    assert not vectors.requires_grad and vectors.grad_fn is None
    with pytest.raises(RuntimeError):
        vectors.sum().backward()
    scale = torch.ones((), requires_grad=True)
    (vectors * scale).sum().backward()
    assert source.grad is None and scale.grad is not None


def test_dedup_join_matches_the_loop_and_routes_gradient() -> None:
    x = dedup_inputs(3)
    x["fresh_ids"][:3] = x["fresh_ids"][3:6]  # duplicates: the later occurrence must win
    bank = MemoryBank(BIG, DIM)
    fresh = x["fresh"].clone().requires_grad_(True)
    out = bank.dedup_join(x["hist"], x["mask"], x["cached"], x["fresh_ids"], fresh, grad=True)
    ref_fresh = x["fresh"].clone().requires_grad_(True)
    ref = dedup_reference(x["hist"], x["mask"], x["cached"], x["fresh_ids"], ref_fresh)
    assert out.dtype == torch.float32 and torch.equal(out, ref)
    (out * x["weights"]).sum().backward()
    (ref * x["weights"]).sum().backward()
    assert_same_grad(fresh.grad, ref_fresh.grad)
    assert (fresh.grad[:3] == 0).all()  # earlier duplicates are never used
    detached = bank.dedup_join(x["hist"], x["mask"], x["cached"], x["fresh_ids"], fresh, grad=False)
    assert not detached.requires_grad and torch.equal(detached, ref.detach())
    none = bank.dedup_join(x["hist"], x["mask"], x["cached"], x["fresh_ids"][:0], fresh[:0])
    assert torch.equal(none, x["cached"].float())


def test_coverage_and_warm_up() -> None:
    bank = MemoryBank(BIG, DIM)
    bank.warm_up(torch.arange(10), torch.randn(10, DIM), chunk=3)
    assert bank.stats()["filled"] == 10
    ids = torch.tensor([[1, 2, 50, 51], [3, 60, 0, 0]])
    mask = torch.tensor([[True, True, True, True], [True, True, False, False]])
    assert bank.coverage(ids, mask, step=0) == pytest.approx(3 / 6)  # warm-up rows are visible at once
    assert coverage_of(torch.tensor([True, False]), torch.tensor([True, True])) == 0.5
    assert math.isnan(coverage_of(torch.tensor([True]), torch.tensor([False])))


def test_save_load_round_trip_and_newest_wins_on_collision(tmp_path: Path) -> None:
    writes = random_writes(4, range(1, 5), 40, (0, 200))
    bank = MemoryBank(BIG, DIM)
    write_all(bank, writes)
    bank.save(tmp_path / "bank")
    assert sorted(p.name for p in (tmp_path / "bank").iterdir()) == ["bank-rank00000.pt"]
    same = MemoryBank(BIG, DIM)
    same.load(tmp_path / "bank")
    ids = torch.arange(0, 250)
    assert_read(same.read(ids, step=0), latest(writes), ids)
    state = bank.state_dict()
    small = MemoryBank(8, DIM)
    small.load(tmp_path / "bank")
    kept = {}  # per row of the small bank: the saved id of the highest version (the later one on ties)
    order = torch.argsort(state["versions"], stable=True)
    for i, v in zip(state["item_ids"][order].tolist(), state["vectors"][order].float()):
        kept[int(row_of(torch.tensor([i]), 1, 8))] = (i, v)
    assert_read(small.read(ids, step=0), dict(kept.values()), ids)


def test_load_rejects_an_incomplete_checkpoint(tmp_path: Path) -> None:
    bank = MemoryBank(64, DIM)
    bank.save(tmp_path)
    (tmp_path / "bank-rank00000.pt").rename(tmp_path / "bank-rank00001.pt")
    with pytest.raises(ValueError, match="not ranks"):
        bank.load(tmp_path)
    with pytest.raises(FileNotFoundError):
        bank.load(tmp_path / "missing")


def test_save_removes_files_of_a_larger_earlier_job(tmp_path: Path) -> None:
    torch.save({}, tmp_path / "bank-rank00003.pt")
    MemoryBank(64, DIM).save(tmp_path)
    assert [p.name for p in tmp_path.iterdir()] == ["bank-rank00000.pt"]


# ----------------------------------------------------------------------------------------------- two ranks

WORLD = 2
SMALL_ROWS = 64
SHARED = (5000, 5010)  # both ranks write these ids in the same steps: rank 1 (the higher position) wins


def rank_writes(rank: int) -> Writes:
    """Rank-specific ids (with duplicates) and shared ones, steps 1..3."""
    own = random_writes(10 + rank, range(1, 4), 30, (rank * 1000, rank * 1000 + 60))
    shared = random_writes(20 + rank, range(1, 4), 6, SHARED)
    return [(s, torch.cat([i, j]), torch.cat([v, w])) for (s, i, v), (_, j, w) in zip(own, shared)]


def global_writes() -> Writes:
    """Every rank's writes in global position order: by step, then by rank."""
    per_rank = [rank_writes(r) for r in range(WORLD)]
    return [
        (s, torch.cat([w[k][1] for w in per_rank]), torch.cat([w[k][2] for w in per_rank]))
        for k, s in enumerate(range(1, 4))
    ]


def read_ids(rank: int) -> torch.Tensor:
    """Both ranks' ids, shared ones, never-written ones; rank 1 also asks duplicates."""
    ids = torch.cat([torch.arange(0, 70), torch.arange(1000, 1070), torch.arange(*SHARED)])
    return ids if rank == 0 else torch.cat([ids.flip(0), ids[:5]])


def late_ids() -> torch.Tensor:
    """Written at step 4 by rank 0 only: owned by both ranks."""
    return torch.arange(7000, 7016)


def solo_writes() -> Writes:
    return random_writes(30, range(1, 4), 50, (0, 400))


def _worker(rank: int, world: int, tmp: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{tmp}/init", rank=rank, world_size=world)
    try:
        torch.save(_scenarios(rank, Path(tmp)), Path(tmp, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


def _scenarios(rank: int, tmp: Path) -> dict[str, Any]:
    out: dict[str, Any] = {}
    bank = MemoryBank(BIG, DIM)
    write_all(bank, rank_writes(rank))
    out["read"] = bank.read(read_ids(rank), step=4)
    out["empty"] = bank.read(read_ids(rank)[: 10 * (1 - rank)], step=4)  # rank 1 asks nothing
    rows = bank.filled.nonzero().squeeze(1)
    out["stored"] = (rows, bank.item_id[rows].clone())

    late = torch.full((16, DIM), 9.0) if rank == 0 else torch.zeros(0, DIM)
    bank.write(late_ids()[: 16 * (1 - rank)], late, step=4)
    out["late_at_4"] = bank.read(late_ids(), step=4)
    out["late_at_5"] = bank.read(late_ids(), step=5)
    bank.save(tmp / "saved2")
    out["stats"] = bank.stats(reduce=True)

    x = dedup_inputs(40 + rank)
    x["hist"][:, :3] = dedup_inputs(40 + 1 - rank)["fresh_ids"][:3]  # the other rank's fresh ids
    fresh = x["fresh"].clone().requires_grad_(True)
    joined = bank.dedup_join(x["hist"], x["mask"], x["cached"], x["fresh_ids"], fresh, grad=True)
    (joined * x["weights"]).sum().backward()
    out["dedup"] = (joined.detach(), fresh.grad)
    args = (x["hist"], x["mask"], x["cached"], x["fresh_ids"], x["fresh"])
    out["dedup_same_size"] = bank.dedup_join(*args, same_size=True)

    for same_size in (False, True):  # a small bank: collisions and evictions; some entries not kept
        small = MemoryBank(SMALL_ROWS, DIM)
        routed: list[int] = []
        small._route = _counting(small._route, routed)  # type: ignore[method-assign]
        for step, ids, vectors in rank_writes(rank):
            small.write(ids, vectors, step, keep=ids % 3 != 0, same_size=same_size)
        small.write(torch.zeros(0, dtype=torch.int64), torch.zeros(0, DIM), 4, same_size=same_size)  # nothing
        small.flush()
        state = (small.item_id, small.vectors, small.version, small.filled)
        out[f"blocks_{same_size}"] = ([t.clone() for t in state], small.stats()["evictions"], routed)

    restored = MemoryBank(BIG, DIM)
    restored.load(tmp / "saved1")
    out["restored"] = restored.read(torch.arange(0, 400), step=100)
    out["restored_filled"] = restored.stats()["filled"]
    warm = MemoryBank(BIG, DIM)
    n = 10 if rank == 0 else 3
    warm.warm_up(torch.arange(n) + 100 * rank, torch.ones(n, DIM), chunk=4)  # 3 chunks vs 1
    out["warm"] = warm.read(torch.cat([torch.arange(10), torch.arange(100, 103)]), step=0)[1]
    return out


def _counting(route: Any, calls: list[int]) -> Any:
    return lambda ids: calls.append(ids.numel()) or route(ids)


@pytest.fixture(scope="module")
def two_ranks(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, list[dict[str, Any]]]:
    tmp = tmp_path_factory.mktemp("bank2")
    solo = MemoryBank(BIG, DIM)
    write_all(solo, solo_writes())
    solo.save(tmp / "saved1")
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("OMP_NUM_THREADS", "1")
        mp.spawn(_worker, args=(WORLD, str(tmp)), nprocs=WORLD, join=True)
    return tmp, [torch.load(tmp / f"rank{r}.pt", weights_only=False) for r in range(WORLD)]


@pytest.mark.slow
def test_two_ranks_read_each_others_writes(two_ranks: tuple[Path, list[dict[str, Any]]]) -> None:
    _, results = two_ranks
    writes = global_writes()
    assert distinct_slots(torch.cat([w[1] for w in writes]), WORLD, BIG // WORLD)
    for rank, out in enumerate(results):
        ids = read_ids(rank)
        assert (owner_of(ids, WORLD, BIG) != rank).sum() > 50  # reads that cross ranks
        assert_read(out["read"], latest(writes), ids)
        assert out["empty"][0].shape == (10 * (1 - rank), DIM)
        rows, stored = out["stored"]
        assert (owner_of(stored, WORLD, BIG) == rank).all()
        assert torch.equal(row_of(stored, WORLD, BIG), rows)
    per_rank = [rank_writes(r) for r in range(WORLD)]
    reversed_order = [
        (s, torch.cat([b[1], a[1]]), torch.cat([b[2], a[2]])) for (s, *_), a, b in zip(writes, *per_rank)
    ]
    shared = torch.arange(*SHARED)
    assert not torch.equal(
        expected_read(latest(reversed_order), shared)[0], results[0]["read"][0][-10:].float()
    )


@pytest.mark.slow
def test_two_ranks_staleness_rule(two_ranks: tuple[Path, list[dict[str, Any]]]) -> None:
    _, results = two_ranks
    assert (owner_of(late_ids(), WORLD, BIG) == 1).any() and (owner_of(late_ids(), WORLD, BIG) == 0).any()
    for out in results:
        assert not out["late_at_4"][1].any()
        assert out["late_at_5"][1].all() and (out["late_at_5"][0].float() == 9.0).all()
        filled = len(latest(global_writes())) + 16
        assert out["stats"] == {"rows": BIG, "filled": filled, "evictions": 0, "pending_writes": 0}
        assert out["warm"].all()


@pytest.mark.slow
def test_two_ranks_dedup_join(two_ranks: tuple[Path, list[dict[str, Any]]]) -> None:
    _, results = two_ranks
    inputs = [dedup_inputs(40 + r) for r in range(WORLD)]
    leaves = [x["fresh"].clone().requires_grad_(True) for x in inputs]
    all_ids = torch.cat([x["fresh_ids"] for x in inputs])
    for rank, out in enumerate(results):
        x = dedup_inputs(40 + rank)
        x["hist"][:, :3] = inputs[1 - rank]["fresh_ids"][:3]
        ref = dedup_reference(x["hist"], x["mask"], x["cached"], all_ids, torch.cat(leaves))
        joined, grad = out["dedup"]
        assert torch.equal(joined, ref.detach())
        assert torch.equal(out["dedup_same_size"], joined)  # sizes known without their exchange
        remote = set(inputs[1 - rank]["fresh_ids"].tolist()) - set(x["fresh_ids"].tolist())
        replaced = x["mask"] & torch.isin(x["hist"], torch.tensor(sorted(remote)))
        assert replaced.any() and not torch.equal(joined[replaced], x["cached"][replaced].float())
        (want,) = torch.autograd.grad((ref * x["weights"]).sum(), leaves[rank])
        assert_same_grad(grad, want)  # only this rank's own fresh vectors, only where used


@pytest.mark.slow
def test_saved_by_two_restored_on_one(two_ranks: tuple[Path, list[dict[str, Any]]]) -> None:
    tmp, _ = two_ranks
    files = sorted(p.name for p in (tmp / "saved2").iterdir())
    assert files == ["bank-rank00000.pt", "bank-rank00001.pt"]
    one = MemoryBank(BIG, DIM)
    one.load(tmp / "saved2")
    saved = [torch.load(tmp / "saved2" / f, weights_only=True) for f in files]
    ids = torch.cat([s["item_ids"] for s in saved])
    assert distinct_slots(ids, 1, BIG)
    vectors, hit = one.read(ids, step=0)
    assert hit.all() and torch.equal(vectors, torch.cat([s["vectors"] for s in saved]))
    ref = latest(global_writes())
    ref.update({i: torch.full((DIM,), 9.0) for i in late_ids().tolist()})
    probe = torch.cat([read_ids(0), late_ids()])
    assert_read(one.read(probe, step=0), ref, probe)


@pytest.mark.slow
def test_saved_by_one_restored_on_two(two_ranks: tuple[Path, list[dict[str, Any]]]) -> None:
    _, results = two_ranks
    ids = torch.arange(0, 400)
    assert distinct_slots(ids, WORLD, BIG // WORLD)
    saved = torch.tensor(sorted(latest(solo_writes())))
    for rank, out in enumerate(results):
        assert_read(out["restored"], latest(solo_writes()), ids)
        assert out["restored_filled"] == (owner_of(saved, WORLD, BIG) == rank).sum()  # only the rows it owns


def test_masked_writes_and_joins_equal_writing_and_joining_the_selected_entries() -> None:
    """`keep` / `fresh_mask` (no host sync) against boolean indexing (the reference): same rows, same evictions,
    same join, same gradient."""
    g = torch.Generator().manual_seed(5)
    ids = torch.randint(0, 30, (40,), generator=g)
    vectors = torch.randn(40, DIM, generator=g)
    keep = torch.rand(40, generator=g) < 0.5
    masked, indexed = MemoryBank(64, DIM, dtype=torch.float32), MemoryBank(64, DIM, dtype=torch.float32)
    masked.write(ids, vectors, step=0, keep=keep)
    indexed.write(ids[keep], vectors[keep], step=0)
    probe = torch.arange(30)
    for a, b in zip(masked.read(probe, step=1), indexed.read(probe, step=1)):
        assert torch.equal(a, b)
    assert masked.stats() == indexed.stats()
    assert masked.stats()["filled"] > 0

    x = dedup_inputs(7)
    x["fresh_ids"][:3] = x["fresh_ids"][3:6]
    fresh_mask = torch.tensor([True, False, True, True, False, True, True])
    bank = MemoryBank(BIG, DIM)
    fresh = x["fresh"].clone().requires_grad_(True)
    out = bank.dedup_join(
        x["hist"], x["mask"], x["cached"], x["fresh_ids"], fresh, fresh_mask=fresh_mask, grad=True
    )
    ref_fresh = x["fresh"].clone().requires_grad_(True)
    ref = bank.dedup_join(
        x["hist"], x["mask"], x["cached"], x["fresh_ids"][fresh_mask], ref_fresh[fresh_mask], grad=True
    )
    assert torch.equal(out, ref)
    (out * x["weights"]).sum().backward()
    (ref * x["weights"]).sum().backward()
    assert_same_grad(fresh.grad, ref_fresh.grad)
    assert (fresh.grad[~fresh_mask] == 0).all()


@pytest.mark.slow
def test_two_ranks_same_size_writes_store_what_routed_writes_store(
    two_ranks: tuple[Path, list[dict[str, Any]]],
) -> None:
    """`write(same_size=True)` (fixed blocks, no sizes exchanged, no host sync on CUDA) leaves every rank's rows,
    versions and eviction count exactly as the routed write does, duplicates, collisions and masks included."""
    _, results = two_ranks
    for out in results:
        (routed_state, routed_evictions, routed_calls) = out["blocks_False"]
        (block_state, block_evictions, block_calls) = out["blocks_True"]
        assert routed_calls and not block_calls  # the blocks exchanged no sizes
        assert routed_evictions > 0 and block_evictions == routed_evictions
        assert routed_state[3].sum() > 0
        rows = SMALL_ROWS // WORLD  # the bank's own rows: the spare trash row keeps whatever landed last
        for got, want in zip(block_state, routed_state, strict=True):
            assert torch.equal(got[:rows], want[:rows])
