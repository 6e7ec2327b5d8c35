"""LEMUR's memory bank: the latest content vector of every item id, row-sharded over the ranks.

Every step the document encoder runs on the batch's target items and ``write`` stores the result; history
sequences ``read`` their items' vectors by id instead of re-encoding them, without gradient (LEMUR, arXiv
2511.10962).

Layout
    Each rank holds ``rows_per_rank = ceil(capacity / world_size)`` rows: ``vectors`` [rows, D] (bf16 by default),
    ``item_id`` (int64), ``version`` (the step of the write that filled the row, int64) and ``filled`` (bool).
    Item ``i`` has a slot ``slot_of(i, capacity)`` in the whole bank (a double mix of the id with the hash of
    ``embeddings.tables``), independent of the number of ranks; rank r holds the slots
    [r * rows_per_rank, (r + 1) * rows_per_rank). So collisions, and what a checkpoint holds, are the same for any
    number of processes, and a bank saved by N ranks loads into M ranks row for row (same capacity). The slot is a
    mix of the id's first mix: one salted mix alone would correlate with ``hash_ids`` users elsewhere.

Collision policy (a direct-mapped cache)
    Two ids that map to the same row share it: a write overwrites whatever the row holds, and a write that
    displaces a *different* id counts as an eviction (``stats()["evictions"]``). A read hits only when the row is
    filled and its stored ``item_id`` equals the requested id, so a collision turns into a miss, never into
    another item's vector. Inside one write the entries that land on one row are treated as sequential writes in
    global order, so displacing ids count as evictions there too.

Duplicates: the highest global position wins
    The global position of an entry is (source rank, index in that rank's request). When one write holds an id
    (or a row) several times, the entry with the highest position is stored; ``dedup_join`` picks the same entry,
    so after a step the bank holds exactly the vector the dedup join used. Deterministic across runs.

Consistency rule (``max_staleness = k``, default 1)
    A read at step ``t`` sees every write of steps ``<= t - k`` and none of a later step. With k = 1, the loop
    "read the history, encode the targets, write them" sees the previous step's writes and never its own.
    ``write(step=s)`` routes the rows and runs the all-to-all at once (on CUDA on a side stream, so it overlaps
    the rest of the step), then queues the received rows; the scatter into the bank (a local copy) runs at the
    start of the first read with ``t >= s + k``, after the reading stream waited for the write's CUDA event.
    Queued writes are applied in the order they were issued, so write steps should not decrease. ``warm_up``,
    ``flush``, ``save`` and ``state_dict`` apply every queued write at once (warm-up rows are visible to every
    later read, whatever its step). On CPU/gloo every call is synchronous and the rule is the same.

Collectives
    ``read``, ``write``, ``dedup_join``, ``coverage``, ``warm_up``, ``save`` and ``stats(reduce=True)`` are
    collectives over ``group``: every rank calls them in the same order (an empty request is fine). With one rank
    nothing is exchanged. Split sizes are exchanged first and copied to the host (one device sync per call; in
    ``write`` this also waits for the kernels that produced the vectors before the side stream takes over), but for
    ``write`` and ``dedup_join`` with ``same_size`` (every rank passes as many entries: a batch's targets), which
    exchange fixed-size blocks instead and never wait.
    NCCL moves device tensors; gloo moves host tensors (the bank itself may still live on a GPU).
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
import torch.distributed as dist

from embeddings.tables import hash_ids

if TYPE_CHECKING:
    from torch.distributed import ProcessGroup

FILE_PATTERN = "bank-rank{rank:05d}.pt"
MERSENNE_61 = 2**61 - 1
ROW_SALT = 0x632BE59BD9B4E019
WARM_UP_CHUNK = 1 << 16


# ------------------------------------------------------------------------------------------------ placement


def slot_of(item_ids: torch.Tensor, capacity: int) -> torch.Tensor:
    """Each id's slot in the whole bank, [0, capacity): the same whatever the number of ranks, so collisions (and
    so what a checkpoint holds) do not depend on how many processes wrote it."""
    return hash_ids(hash_ids(item_ids, MERSENNE_61) ^ ROW_SALT, capacity)


NO_ITEM = -1
"""The id a read asks for in place of a padding slot: it never hits, whatever was stored."""


def owner_of(item_ids: torch.Tensor, world_size: int, capacity: int) -> torch.Tensor:
    """The rank that owns each id: ranks hold consecutive ranges of ceil(capacity / world_size) slots."""
    return torch.div(slot_of(item_ids, capacity), -(-capacity // world_size), rounding_mode="floor")


def row_of(item_ids: torch.Tensor, world_size: int, capacity: int) -> torch.Tensor:
    """The row of each id inside its owner."""
    return torch.remainder(slot_of(item_ids, capacity), -(-capacity // world_size))


def coverage_of(hit: torch.Tensor, mask: torch.Tensor) -> float:
    """Share of the masked-in entries that hit (nan when none is masked in); no collective."""
    mask = mask.to(torch.bool)
    total = int(mask.sum())
    return float((hit & mask).sum()) / total if total else math.nan


# ------------------------------------------------------------------------------------------ communication


@dataclass
class _Route:
    """How one request travels: ``order`` groups it by owner (stable, so each owner gets its entries in request
    order); ``send[r]`` entries go to rank r, ``recv[r]`` come from rank r. ``order`` is None with one rank."""

    order: torch.Tensor | None
    send: list[int]
    recv: list[int]


@dataclass
class _PendingWrite:
    """Rows received for a write of ``step``, not yet scattered into the bank."""

    step: int
    item_ids: torch.Tensor
    vectors: torch.Tensor
    keep: torch.Tensor | None
    event: torch.cuda.Event | None


def _world(group: ProcessGroup | None) -> tuple[int, int]:
    if not (dist.is_available() and dist.is_initialized()):
        return 0, 1
    return dist.get_rank(group), dist.get_world_size(group)


def _comm_device(group: ProcessGroup | None, bank_device: torch.device) -> torch.device:
    """NCCL only moves CUDA tensors; gloo (and a gloo+nccl group) moves host tensors."""
    backend = str(dist.get_backend(group))
    if "nccl" in backend and "gloo" not in backend:
        if bank_device.type != "cuda":
            raise ValueError("a bank on an NCCL group must live on a CUDA device")
        return bank_device
    return torch.device("cpu")


def _permute(x: torch.Tensor, order: torch.Tensor | None) -> torch.Tensor:
    return x if order is None else x.index_select(0, order)


def _unpermute(x: torch.Tensor, order: torch.Tensor | None) -> torch.Tensor:
    """Inverse of ``_permute``: entry j of x goes back to position order[j]."""
    return x if order is None else torch.empty_like(x).index_copy_(0, order, x)


def _last_of_runs(sorted_keys: torch.Tensor) -> torch.Tensor:
    """Bool mask of the last element of each run of equal values in a sorted 1-D tensor."""
    last = torch.ones_like(sorted_keys, dtype=torch.bool)
    if sorted_keys.numel() > 1:
        last[:-1] = sorted_keys[1:] != sorted_keys[:-1]
    return last


# ----------------------------------------------------------------------------------------------------- bank


class MemoryBank:
    """One vector per item id, row-sharded over the ranks of ``group``; see the module docstring for the rules."""

    def __init__(
        self,
        capacity: int,
        dim: int,
        *,
        dtype: torch.dtype = torch.bfloat16,
        device: torch.device | str | None = None,
        group: ProcessGroup | None = None,
        max_staleness: int = 1,
        async_writes: bool = True,
    ) -> None:
        if capacity < 1 or dim < 1:
            raise ValueError(f"capacity and dim must be positive, got {capacity} and {dim}")
        if max_staleness < 1:
            raise ValueError(
                f"max_staleness must be >= 1 (a read never sees its own step), got {max_staleness}"
            )
        self.group = group
        self.rank, self.world_size = _world(group)
        self.capacity = capacity
        self.rows_per_rank = -(-capacity // self.world_size)
        self.dim = dim
        self.dtype = dtype
        self.device = torch.device(device) if device is not None else torch.device("cpu")
        self.max_staleness = max_staleness
        self._comm = self.device if self.world_size == 1 else _comm_device(group, self.device)
        use_stream = async_writes and self.device.type == "cuda"
        self._stream = torch.cuda.Stream(device=self.device) if use_stream else None
        self._pending: list[_PendingWrite] = []
        # Two spare rows past the bank's own, never filled: a missed read gathers the zero row, and entries of a
        # write that do not stay land in the trash row (never read). So a read is one gather and a write one
        # scatter of the vectors, in request order, with no boolean-mask indexing (no host sync).
        rows = self.rows_per_rank
        self._zero_row, self._trash_row = rows, rows + 1
        self.vectors = torch.zeros(rows + 2, dim, dtype=dtype, device=self.device)
        self.item_id = torch.full((rows + 2,), -1, dtype=torch.int64, device=self.device)
        self.version = torch.full((rows + 2,), -1, dtype=torch.int64, device=self.device)
        self.filled = torch.zeros(rows + 2, dtype=torch.bool, device=self.device)
        self._evictions = torch.zeros((), dtype=torch.int64, device=self.device)

    # ------------------------------------------------------------------------------------------- public API

    @torch.no_grad()
    def read(
        self,
        item_ids: torch.Tensor,
        step: int,
        dtype: torch.dtype | None = None,
        valid: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Vectors [N, D] (``dtype``, default the bank's; zeros where missed) and the hit mask [N], in request
        order. Sees every write of steps <= step - max_staleness. A collective. ``valid`` [N] bool: entries
        where it is False (padding) read as misses, so the caller need not zero them in a pass of its own."""
        ids = self._ids(item_ids)
        if valid is not None:
            ids = torch.where(valid.reshape(-1).to(ids.device), ids, NO_ITEM)
        self._make_visible(step)
        route = self._route(ids)
        requested = self._exchange(_permute(ids, route.order), route)
        vectors, hit = self._lookup(requested)
        vectors = _unpermute(self._exchange(vectors, route, back=True), route.order)
        hit = _unpermute(self._exchange(hit.to(torch.uint8), route, back=True), route.order).bool()
        return vectors.to(dtype or self.dtype), hit

    @torch.no_grad()
    def write(
        self,
        item_ids: torch.Tensor,
        vectors: torch.Tensor,
        step: int,
        keep: torch.Tensor | None = None,
        same_size: bool = False,
    ) -> None:
        """Send detached ``vectors`` [N, D] to their owners, to be stored with version ``step`` once visible
        (reads at steps >= step + max_staleness). ``keep`` [N] bool: only those entries are stored (a mask instead
        of a boolean index keeps the host from waiting for the device). A collective; asynchronous on CUDA.
        ``same_size``: the caller vouches that every rank writes N entries (a batch's targets): each owner then
        gets a block of N slots, the unused ones not kept, so no sizes are exchanged and the host does not wait
        for the device (world_size times the entries travel; the same rows end up stored)."""
        ids = self._ids(item_ids)
        vectors = self._vectors(vectors, ids.numel())
        if keep is not None:
            keep = self._keep(keep, ids.numel())
        with self._writer_stream() as stream:
            if stream is not None:
                ids.record_stream(stream)
                vectors.record_stream(stream)
                if keep is not None:
                    keep.record_stream(stream)
            if same_size and self.world_size > 1:
                received_ids, received, received_keep = self._exchange_blocks(ids, vectors, keep)
            else:
                route = self._route(ids)
                received_ids = self._exchange(_permute(ids, route.order), route)
                received = self._exchange(_permute(vectors, route.order), route)
                received_keep = None
                if keep is not None:
                    received_keep = self._exchange(_permute(keep.to(torch.uint8), route.order), route).bool()
            event = None
            if stream is not None:
                event = torch.cuda.Event()
                event.record(stream)
        self._pending.append(_PendingWrite(step, received_ids, received, received_keep, event))

    def flush(self) -> None:
        """Apply every queued write now (visible to any later read)."""
        self._apply(self._pending)
        self._pending = []

    @torch.no_grad()
    def warm_up(
        self, item_ids: torch.Tensor, vectors: torch.Tensor, step: int = 0, chunk: int = WARM_UP_CHUNK
    ) -> None:
        """Bulk write (e.g. every item of items.parquet, each rank a share) in chunks, visible at once.
        A collective: every rank runs as many chunks as the rank with the most rows."""
        ids = self._ids(item_ids)
        vectors = self._vectors(vectors, ids.numel())
        chunks = self._max_over_ranks(-(-ids.numel() // chunk))
        for c in range(chunks):
            part = slice(c * chunk, (c + 1) * chunk)
            self.write(ids[part], vectors[part], step)
        self.flush()

    def dedup_join(
        self,
        history_ids: torch.Tensor,
        history_mask: torch.Tensor,
        cached: torch.Tensor,
        fresh_ids: torch.Tensor,
        fresh_vectors: torch.Tensor,
        *,
        fresh_mask: torch.Tensor | None = None,
        grad: bool = False,
        same_size: bool = False,
    ) -> torch.Tensor:
        """[B, L, D] history vectors where every masked-in entry whose id was encoded this step, on any rank,
        holds the fresh vector (the highest global position of that id wins) instead of the cached one.

        ``fresh_ids`` [M] / ``fresh_vectors`` [M, D] are this rank's encoded targets; all ranks' are all-gathered
        (a collective). ``fresh_mask`` [M] bool: only those entries count as encoded (a mask instead of a boolean
        index keeps the host from waiting for the device). With ``grad`` the local fresh vectors keep their graph
        (gathered remote ones are detached); without it the result is detached. The result's dtype promotes
        cached's and fresh's. No host sync with one rank; with several, one (the ranks' sizes) unless the caller
        vouches with ``same_size`` that every rank passes as many fresh ids (a batch's targets, say).
        """
        if history_ids.shape != history_mask.shape or cached.shape != (*history_ids.shape, self.dim):
            raise ValueError(f"history {tuple(history_ids.shape)} and cached {tuple(cached.shape)} disagree")
        if not grad:
            fresh_vectors = fresh_vectors.detach()
        if fresh_ids.dim() != 1 or fresh_ids.dtype.is_floating_point:
            raise ValueError(f"fresh ids must be a 1-D integer tensor, got {fresh_ids.dtype}")
        fresh_ids = fresh_ids.to(fresh_vectors.device, torch.int64)
        if fresh_mask is None:
            fresh_mask = torch.ones_like(fresh_ids, dtype=torch.bool)
        elif fresh_mask.shape != fresh_ids.shape or fresh_mask.dtype != torch.bool:
            raise ValueError(f"fresh_mask must be a bool tensor like the fresh ids {tuple(fresh_ids.shape)}")
        table_ids, table_vectors, table_fresh = self._gather_fresh(
            fresh_ids, fresh_vectors, fresh_mask.to(fresh_vectors.device), same_size
        )
        dtype = torch.promote_types(cached.dtype, fresh_vectors.dtype)
        flat = cached.detach().reshape(-1, self.dim).to(device=table_vectors.device, dtype=dtype)
        hist = history_ids.reshape(-1).to(table_ids.device, torch.int64)
        mask = history_mask.reshape(-1).to(table_ids.device, torch.bool)
        matched, source = self._fresh_matches(table_ids, table_fresh, hist, mask)
        if matched is None:
            return flat.view(cached.shape)
        out = torch.where(matched.unsqueeze(1), table_vectors[source].to(dtype), flat)
        return out.view(cached.shape)

    def coverage(self, item_ids: torch.Tensor, mask: torch.Tensor, step: int) -> float:
        """Share of the masked-in ids (any shape) that hit in a read at ``step``; this rank's share.
        A collective (it reads); to score a read already made use ``coverage_of(hit, mask)``."""
        _, hit = self.read(item_ids.reshape(-1), step)
        return coverage_of(hit, mask.reshape(-1).to(hit.device))

    def stats(self, reduce: bool = False) -> dict[str, int]:
        """Rows, filled rows and evictions of this rank (summed over ranks with ``reduce``, a collective), and
        the writes still queued."""
        local = torch.stack(
            [
                torch.tensor(self.rows_per_rank, device=self.device),
                self.filled.sum(),
                self._evictions,
            ]
        )
        if reduce and self.world_size > 1:
            local = local.to(self._comm)
            dist.all_reduce(local, group=self.group)
        rows, filled, evictions = local.tolist()
        return {"rows": rows, "filled": filled, "evictions": evictions, "pending_writes": len(self._pending)}

    def reset(self) -> None:
        """Empty the bank and drop queued writes."""
        self._pending = []
        self.filled.zero_()
        self.item_id.fill_(-1)
        self.version.fill_(-1)
        self.vectors.zero_()
        self._evictions.zero_()

    # --------------------------------------------------------------------------------------------- checkpoint

    def state_dict(self) -> dict[str, Any]:
        """This rank's filled rows (ids, vectors, versions) on the host, after applying queued writes."""
        self.flush()
        rows = self.filled.nonzero().squeeze(1)
        return {
            "item_ids": self.item_id[rows].cpu(),
            "vectors": self.vectors[rows].cpu(),
            "versions": self.version[rows].cpu(),
            "dim": self.dim,
            "rank": self.rank,
            "world_size": self.world_size,
        }

    def load_state_dict(self, states: Mapping[str, Any] | Iterable[Mapping[str, Any]]) -> None:
        """Replace the bank by the rows of one or several state dicts (from any world size) that this rank owns
        under the current world size. Where two of them share a row, the newer version wins. No collective."""
        self.reset()
        for state in [states] if isinstance(states, Mapping) else states:
            if state["dim"] != self.dim:
                raise ValueError(f"saved vectors have dim {state['dim']}, the bank {self.dim}")
            ids = state["item_ids"]
            mine = (
                owner_of(ids, self.world_size, self.capacity) == self.rank
            )  # filtered where the file was loaded
            self._scatter(
                ids[mine].to(self.device),
                state["vectors"][mine].to(self.device, self.dtype),
                state["versions"][mine].to(self.device),
                keep_newer=True,
            )

    def save(self, path: str | Path) -> None:
        """Write this rank's rows to ``path/bank-rank{rank:05d}.pt`` (rank 0 removes files of higher ranks left by
        an earlier, larger job). A collective: returns once every rank has written."""
        directory = Path(path)
        directory.mkdir(parents=True, exist_ok=True)
        torch.save(self.state_dict(), directory / FILE_PATTERN.format(rank=self.rank))
        if self.rank == 0:
            for stale, rank in _rank_files(directory):
                if rank >= self.world_size:
                    stale.unlink()
        if self.world_size > 1:
            dist.barrier(group=self.group)

    def load(self, path: str | Path) -> None:
        """Read every rank file under ``path`` (saved by any world size), one at a time, and keep the rows this
        rank owns now. Raises if the set of files is incomplete."""
        files = _rank_files(Path(path))
        if not files:
            raise FileNotFoundError(f"no {FILE_PATTERN.format(rank=0)} style files under {path}")
        ranks = [rank for _, rank in files]
        if ranks != list(range(len(files))):
            raise ValueError(f"bank files under {path} are not ranks 0..{len(files) - 1}: {ranks}")
        self.load_state_dict(_load_states([f for f, _ in files], expected_world=len(files)))

    # ------------------------------------------------------------------------------------------------ internals

    def _ids(self, item_ids: torch.Tensor) -> torch.Tensor:
        if item_ids.dim() != 1 or item_ids.dtype.is_floating_point:
            raise ValueError(
                f"item ids must be a 1-D integer tensor, got {item_ids.dtype} {tuple(item_ids.shape)}"
            )
        return item_ids.to(self.device, torch.int64).contiguous()

    def _keep(self, keep: torch.Tensor, n: int) -> torch.Tensor:
        if keep.shape != (n,) or keep.dtype != torch.bool:
            raise ValueError(
                f"keep must be a bool tensor of shape ({n},), got {keep.dtype} {tuple(keep.shape)}"
            )
        return keep.to(self.device).contiguous()

    def _vectors(self, vectors: torch.Tensor, n: int) -> torch.Tensor:
        if vectors.shape != (n, self.dim):
            raise ValueError(f"expected vectors of shape ({n}, {self.dim}), got {tuple(vectors.shape)}")
        return vectors.detach().to(self.device, self.dtype).contiguous()

    def _route(self, ids: torch.Tensor) -> _Route:
        """Group the request by owner and exchange split sizes (one host sync)."""
        if self.world_size == 1:
            return _Route(None, [ids.numel()], [ids.numel()])
        owner = owner_of(ids, self.world_size, self.capacity)
        order = torch.argsort(owner, stable=True)
        send = torch.bincount(owner, minlength=self.world_size).to(self._comm)
        recv = torch.empty_like(send)
        dist.all_to_all_single(recv, send, group=self.group)
        sizes = torch.stack([send, recv]).tolist()
        return _Route(order, sizes[0], sizes[1])

    def _exchange(self, x: torch.Tensor, route: _Route, back: bool = False) -> torch.Tensor:
        """Rows of x to their owners (or, ``back``, the owners' answers to the requesters), on the bank device."""
        if self.world_size == 1:
            return x
        send, recv = (route.recv, route.send) if back else (route.send, route.recv)
        out = torch.empty((sum(recv), *x.shape[1:]), dtype=x.dtype, device=self._comm)
        dist.all_to_all_single(out, x.to(self._comm).contiguous(), recv, send, group=self.group)
        return out.to(self.device)

    def _exchange_blocks(
        self, ids: torch.Tensor, vectors: torch.Tensor, keep: torch.Tensor | None
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """A write of N entries on every rank, sizes unexchanged: block r of what this rank sends holds, in request
        order, its entries that rank r owns, then NO_ITEM entries not kept; block r of what it receives is rank r's
        for it. The kept entries arrive in the order `_route` gives them, so `_scatter` stores the same rows."""
        n, world = ids.numel(), self.world_size
        if n == 0:  # on every rank, as the caller vouched: nothing to exchange
            return ids, vectors, torch.zeros(0, dtype=torch.bool, device=ids.device)
        owner = owner_of(ids, world, self.capacity)
        order = torch.argsort(owner, stable=True)
        # not bincount: on CUDA it reads the largest value back to size its output
        counts = torch.zeros(world, dtype=torch.int64, device=ids.device).index_add_(
            0, owner, torch.ones_like(owner)
        )
        by_owner = owner[order]
        slot = (
            by_owner * n + torch.arange(n, device=ids.device) - (torch.cumsum(counts, 0) - counts)[by_owner]
        )
        kept = keep if keep is not None else torch.ones(n, dtype=torch.bool, device=ids.device)

        def blocks(x: torch.Tensor, fill: int) -> torch.Tensor:
            out = x.new_full((world * n, *x.shape[1:]), fill)
            return out.index_copy_(0, slot, x.index_select(0, order))

        equal = _Route(None, [n] * world, [n] * world)  # sizes known on every rank: nothing read back
        received = [
            self._exchange(blocks(x, fill), equal)
            for x, fill in ((ids, NO_ITEM), (vectors, 0), (kept.to(torch.uint8), 0))
        ]
        return received[0], received[1], received[2].bool()

    def _lookup(self, ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Owner side of a read: the rows' vectors (zeros on a miss) and whether the stored id is the one asked."""
        rows = row_of(ids, self.world_size, self.capacity)
        hit = self.filled[rows] & (self.item_id[rows] == ids) & (ids != NO_ITEM)
        return self.vectors.index_select(0, torch.where(hit, rows, self._zero_row)), hit

    def _max_over_ranks(self, value: int) -> int:
        if self.world_size == 1:
            return value
        t = torch.tensor([value], dtype=torch.int64, device=self._comm)
        dist.all_reduce(t, op=dist.ReduceOp.MAX, group=self.group)
        return int(t.item())

    @contextmanager
    def _writer_stream(self) -> Iterator[torch.cuda.Stream | None]:
        """The side stream (after the current stream's work so far: the vectors, and earlier reads of the bank),
        or nothing on CPU / with async_writes off."""
        if self._stream is None:
            yield None
            return
        self._stream.wait_stream(torch.cuda.current_stream(self.device))
        with torch.cuda.stream(self._stream):
            yield self._stream

    def _make_visible(self, step: int) -> None:
        """Apply the queued writes of steps <= step - max_staleness, in issue order."""
        limit = step - self.max_staleness
        ready = [p for p in self._pending if p.step <= limit]
        if ready:
            self._pending = [p for p in self._pending if p.step > limit]
            self._apply(ready)

    @torch.no_grad()
    def _apply(self, writes: list[_PendingWrite]) -> None:
        for w in writes:
            if w.event is not None:  # rows received on the side stream: wait, and tell the allocator
                current = torch.cuda.current_stream(self.device)
                current.wait_event(w.event)
                w.item_ids.record_stream(current)
                w.vectors.record_stream(current)
            versions = torch.full_like(w.item_ids, w.step)
            self._scatter(w.item_ids, w.vectors, versions, keep=w.keep)

    def _scatter(
        self,
        ids: torch.Tensor,
        vectors: torch.Tensor,
        versions: torch.Tensor,
        keep_newer: bool = False,
        keep: torch.Tensor | None = None,
    ) -> None:
        """Store rows on this rank. Entries sharing a row act as sequential writes in their given order (the last
        one stays). ``keep_newer`` (loading): sort by version first, and never replace a newer stored row. Entries
        that do not stay are written to the trash row, so the vectors are copied once, in their given order.
        ``keep`` False: the entry is not a write at all (it goes to the trash row before anything is decided)."""
        if ids.numel() == 0:
            return
        if keep_newer:
            by_version = torch.argsort(versions, stable=True)
            ids, vectors, versions = ids[by_version], vectors[by_version], versions[by_version]
        rows = row_of(ids, self.world_size, self.capacity)
        if keep is not None:
            rows = torch.where(keep, rows, self._trash_row)
        order = torch.argsort(rows.int() if self.rows_per_rank < 2**31 else rows, stable=True)
        sorted_rows = rows[order]
        last = _last_of_runs(sorted_rows)
        stays = torch.zeros_like(last).index_put_((order,), last)
        if keep_newer:
            stays &= ~self.filled[rows] | (versions >= self.version[rows])
        else:
            self._count_evictions(sorted_rows, ids[order], last)
        stays &= rows != self._trash_row
        target = torch.where(stays, rows, self._trash_row)
        self.vectors.index_copy_(0, target, vectors)
        self.item_id.index_copy_(0, target, ids)
        self.version.index_copy_(0, target, versions)
        self.filled.index_put_((target,), stays)

    def _count_evictions(self, rows: torch.Tensor, ids: torch.Tensor, last: torch.Tensor) -> None:
        """Row-sorted entries: the first of a row evicts a different stored id, each later one a different
        previous entry. Accumulated on the device (no sync)."""
        first = torch.ones_like(last)
        first[1:] = last[:-1]
        displaced = self.filled[rows] & (self.item_id[rows] != ids)
        previous = torch.cat([ids[:1], ids[:-1]])
        evicted = torch.where(first, displaced, previous != ids) & (rows != self._trash_row)
        self._evictions += evicted.sum()

    def _gather_fresh(
        self, ids: torch.Tensor, vectors: torch.Tensor, fresh: torch.Tensor, same_size: bool = False
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Every rank's fresh ids, vectors and masks in rank order; this rank's block is ``vectors`` itself (its
        graph kept), the others are detached copies. ``same_size``: every rank has as many ids as this one, so
        the sizes need no exchange (and the host does not wait for it)."""
        if vectors.shape != (ids.numel(), self.dim):
            raise ValueError(f"fresh vectors {tuple(vectors.shape)} for {ids.numel()} fresh ids")
        if self.world_size == 1:
            return ids, vectors, fresh
        if same_size:
            sizes = [ids.numel()] * self.world_size
        else:
            counts = self._all_gather(torch.tensor([ids.numel()], dtype=torch.int64, device=self._comm))
            sizes = [int(c) for c in torch.cat(counts).tolist()]
        longest = max(max(sizes), 1)
        id_blocks = self._all_gather(_padded(ids, longest, self._comm))
        vec_blocks = self._all_gather(_padded(vectors.detach(), longest, self._comm))
        fresh_blocks = self._all_gather(_padded(fresh.to(torch.uint8), longest, self._comm))
        device = vectors.device
        all_ids = torch.cat([b[:n] for b, n in zip(id_blocks, sizes)]).to(device)
        all_fresh = torch.cat([b[:n] for b, n in zip(fresh_blocks, sizes)]).to(device).bool()
        parts = [
            vectors if r == self.rank else b[:n].to(device) for r, (b, n) in enumerate(zip(vec_blocks, sizes))
        ]
        return all_ids, torch.cat(parts), all_fresh

    def _all_gather(self, x: torch.Tensor) -> list[torch.Tensor]:
        blocks = [torch.empty_like(x) for _ in range(self.world_size)]
        dist.all_gather(blocks, x, group=self.group)
        return blocks

    @staticmethod
    def _fresh_matches(
        table_ids: torch.Tensor, table_fresh: torch.Tensor, hist: torch.Tensor, mask: torch.Tensor
    ) -> tuple[torch.Tensor | None, torch.Tensor]:
        """(per history entry: whether a fresh table entry replaces it, and which one), dense over the entries:
        per id the last fresh table entry wins. None when the table is empty."""
        if table_ids.numel() == 0:
            return None, torch.zeros(0, dtype=torch.int64, device=hist.device)
        # Non-fresh entries first within an id, so the last entry of an id's run is its last fresh one if any.
        by_fresh = torch.argsort(table_fresh.to(torch.uint8), stable=True)
        by_id = torch.argsort(table_ids[by_fresh], stable=True)
        order = by_fresh[by_id]
        sorted_ids = table_ids[order]
        last = _last_of_runs(sorted_ids)
        # Runs collapse onto their last entry: every position points at the next run end (a reverse cummin).
        run_end = torch.where(last, torch.arange(last.numel(), device=last.device), last.numel())
        run_end = torch.flip(torch.cummin(torch.flip(run_end, [0]), 0).values, [0])
        slot = torch.searchsorted(sorted_ids, hist).clamp_(max=sorted_ids.numel() - 1)
        end = run_end[slot]
        source = order[end]
        matched = mask & (sorted_ids[slot] == hist) & table_fresh[source]
        return matched, source


# ----------------------------------------------------------------------------------------------- helpers


def _padded(x: torch.Tensor, rows: int, device: torch.device) -> torch.Tensor:
    out = torch.zeros((rows, *x.shape[1:]), dtype=x.dtype, device=device)
    out[: x.shape[0]] = x.to(device)
    return out


def _rank_files(directory: Path) -> list[tuple[Path, int]]:
    """(file, rank) of every bank-rank*.pt under directory, by rank."""
    found = []
    for f in directory.glob("bank-rank*.pt"):
        digits = f.name[len("bank-rank") : -len(".pt")]
        if digits.isdigit():
            found.append((f, int(digits)))
    return sorted(found, key=lambda item: item[1])


def _load_states(files: list[Path], expected_world: int) -> Iterator[dict[str, Any]]:
    """One rank file at a time (host memory holds one shard, not the whole bank)."""
    for f in files:
        state = torch.load(f, map_location="cpu", weights_only=True)
        if state["world_size"] != expected_world:
            raise ValueError(
                f"{f} was saved by {state['world_size']} ranks, but {expected_world} files are present"
            )
        yield state
