"""LEMUR's memory bank as a step's content source.

Targets are encoded (a share p forward, q of them with gradient: encoder sampling; the rest read the bank),
histories read the bank by item id without gradient, and entries encoded in this step on any rank take the fresh
vector (the dedup join). After the step the fresh vectors are written. At serving time nothing is encoded: targets
and histories come from the bank only. The source also owns the bank's life around the loop: its size, the warm-up
from items.parquet before a fresh run, and LEMUR's staleness and coverage metrics.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass

import torch
import torch.distributed as dist
import torch.nn.functional as F

from embeddings.memory_bank import MemoryBank
from trainer.config.schema import MemoryBankConfig
from trainer.content.source import (
    EVAL,
    SERVE,
    TRAIN,
    Encoder,
    StepContent,
    coverage_values,
    flat_histories,
    hit_shares,
)
from trainer.data.batch import Batch, Tokens
from trainer.data.item_catalog import ItemsParquet
from trainer.models.model import Embedded

log = logging.getLogger("lemur")
CAPACITY_PER_ITEM = 8
"""Default bank rows per known item: a direct-mapped cache at load factor a misses about a/2 of the items
(1 - (1 - e^-a) / a): 6% at 1/8, 21% at 1/2."""
WARM_UP_BATCH = 256


def build_bank(cfg: MemoryBankConfig, items: int, dim: int, device: torch.device) -> MemoryBank:
    """The bank for `items` known items (capacity: cfg.capacity, or CAPACITY_PER_ITEM rows per item)."""
    capacity = cfg.capacity or CAPACITY_PER_ITEM * max(1, items)
    dtype = torch.bfloat16 if cfg.dtype == "bfloat16" else torch.float32
    return MemoryBank(capacity, dim, dtype=dtype, device=device, max_staleness=cfg.max_staleness)


@dataclass
class SampledRows:
    """Encoder sampling: rows encoded with gradient, rows encoded without, rows that read the bank."""

    backward: torch.Tensor
    forward_only: torch.Tensor
    from_bank: torch.Tensor


def sample_rows(valid: torch.Tensor, p: float, q: float, generator: torch.Generator) -> SampledRows:
    """ceil(p·n) of the n valid rows run the encoder forward, ceil(q·n) of those also backward; the rest (and the
    padding rows) read the bank. Drawn on the host from `generator`, so a resumed run draws the same rows."""
    rows = valid.nonzero().squeeze(1).cpu()
    n = rows.numel()
    n_forward, n_backward = math.ceil(p * n - 1e-9), math.ceil(q * n - 1e-9)
    chosen = rows[torch.randperm(n, generator=generator)]
    everything = torch.ones(valid.numel(), dtype=torch.bool)
    everything[chosen[:n_forward]] = False
    device = valid.device
    return SampledRows(
        chosen[:n_backward].sort().values.to(device),
        chosen[n_backward:n_forward].sort().values.to(device),
        everything.nonzero().squeeze(1).to(device),
    )


def sample_rows_on_device(
    size: int, p: float, q: float, generator: torch.Generator, device: torch.device
) -> SampledRows:
    """`sample_rows` for a batch of `size` rows that are all valid (training batches always are), drawn on the
    device: the row counts are known on the host, so nothing waits for the device."""
    n_forward, n_backward = math.ceil(p * size - 1e-9), math.ceil(q * size - 1e-9)
    chosen = torch.randperm(size, generator=generator, device=device)
    return SampledRows(
        chosen[:n_backward].sort().values,
        chosen[n_backward:n_forward].sort().values,
        chosen[n_forward:].sort().values,
    )


def encode_rows(encoder: Encoder, batch: Batch, rows: torch.Tensor, grad: bool) -> torch.Tensor:
    text = {f: Tokens(t.input_ids[rows], t.attention_mask[rows]) for f, t in batch.text.items()}
    with torch.set_grad_enabled(grad and torch.is_grad_enabled()):
        ids = batch.known_item_ids
        return encoder(
            text, batch.images[rows], batch.image_mask[rows], ids[rows] if ids is not None else None
        )


class BankContent:
    """LEMUR's path: see the module docstring. `coverage` (per history, last step) and the staleness totals are
    what `metrics()` reports."""

    def __init__(
        self,
        cfg: MemoryBankConfig,
        bank: MemoryBank,
        encoder: Encoder,
        dtype: torch.dtype,
        seed: int,
        rank: int,
        items: ItemsParquet | None = None,
    ) -> None:
        self.cfg, self.bank, self.encoder, self.dtype = cfg, bank, encoder, dtype
        self.seed, self.rank = seed, rank
        self.items = items
        self.coverage: dict[str, torch.Tensor] = {}
        self.staleness: torch.Tensor | None = None

    @property
    def sampling(self) -> bool:
        return self.cfg.forward_share < 1.0 or self.cfg.backward_share < 1.0

    # ------------------------------------------------------------------------------------------- the step

    def prepare(self, batch: Batch, embedded: Embedded, step: int, mode: str) -> StepContent:
        names, lengths, ids, mask = flat_histories(embedded)
        rows = self.rows(batch, step, mode)
        # One read (a collective) for every history slot and the targets that are not encoded. Masked-out slots
        # are asked for as misses (zero vectors): fixed shapes, so the host never waits for the device, and no
        # pass of its own over the [B, L, D] vectors to zero them.
        n_hist = ids.numel()
        wanted = torch.cat([ids.reshape(-1), batch.item_id[rows.from_bank]])
        valid = torch.cat([mask.reshape(-1), torch.ones_like(rows.from_bank, dtype=torch.bool)])
        vectors, hit = self.bank.read(wanted, step, dtype=self.dtype, valid=valid)
        cached = vectors[:n_hist].view(*ids.shape, self.bank.dim)
        hits = hit[:n_hist].view(ids.shape)
        self.coverage = hit_shares(names, lengths, hits, mask)
        target, fresh = self.target(batch, rows, vectors[n_hist:])
        if mode == TRAIN:
            # every rank's batch is the same size (the reader's guarantee): no exchange of sizes
            cached = self.bank.dedup_join(
                ids,
                mask,
                cached,
                batch.item_id,
                target,
                fresh_mask=fresh,
                grad=self.cfg.join_gradient,
                same_size=True,
            )
        parts = cached.to(self.dtype).split(lengths, 1)
        return StepContent(target, fresh, dict(zip(names, parts)))

    def rows(self, batch: Batch, step: int, mode: str) -> SampledRows:
        everything = torch.arange(batch.size, device=batch.valid.device)
        none = everything[:0]
        if mode == SERVE:
            return SampledRows(none, none, everything)
        if mode == EVAL:
            return SampledRows(none, everything, none)
        if not self.sampling:
            return SampledRows(everything, none, none)
        device = batch.valid.device
        generator = torch.Generator(device).manual_seed(hash((self.seed, step, self.rank)) & (2**63 - 1))
        p, q = self.cfg.forward_share, self.cfg.backward_share
        return sample_rows_on_device(batch.size, p, q, generator, device)

    def target(
        self, batch: Batch, rows: SampledRows, from_bank: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """[B, C] target vectors assembled from the encoded rows and the bank rows, and the encoded-rows mask."""
        size = batch.size
        if rows.backward.numel() == size or rows.forward_only.numel() == size:  # every row: one plain call
            with torch.set_grad_enabled(rows.backward.numel() == size and torch.is_grad_enabled()):
                target = self.encoder(
                    batch.text, batch.images, batch.image_mask, batch.known_item_ids, batch.packed_text
                )
                return target, batch.valid.clone()
        target = from_bank.new_zeros(size, self.bank.dim)
        target = target.index_put((rows.from_bank,), from_bank)
        for part, grad in ((rows.backward, True), (rows.forward_only, False)):
            if part.numel():
                encoded = encode_rows(self.encoder, batch, part, grad)
                target = target.to(encoded.dtype).index_put((part,), encoded)
        # index_fill_, not `fresh[rows] = True`: that copies the True from pageable host memory (a host sync)
        fresh = torch.zeros_like(batch.valid).index_fill_(0, rows.backward, True)
        fresh.index_fill_(0, rows.forward_only, True)
        return target, fresh & batch.valid

    def after_step(self, batch: Batch, content: StepContent, step: int, measure: bool) -> None:
        """Write this step's fresh target vectors (visible to later steps' reads); LEMUR's staleness check first
        when `measure` (a logging step: it may wait for the device)."""
        if measure:
            self.measure_staleness(batch.item_id[content.fresh], content.target[content.fresh].detach(), step)
        # every rank's batch is the same size (the reader's guarantee): no exchange of sizes, no host sync
        self.bank.write(batch.item_id, content.target.detach(), step, keep=content.fresh, same_size=True)

    # ------------------------------------------------------------------------------------ around the loop

    def start(self, step: int) -> None:
        if self.cfg.warm_up:
            self.warm_up(step)

    @torch.no_grad()
    def warm_up(self, step: int) -> None:
        """Encode this rank's share of items.parquet (the encoder in eval mode) into the bank, a chunk at a time;
        visible to every later read. A collective."""
        if self.items is None:
            raise ValueError("the bank's warm-up needs the item catalog (items.parquet)")
        device, training = self.bank.device, self.encoder.training
        self.encoder.eval()
        for chunk in self.items.chunks(self.bank.rank, self.bank.world_size):
            chunk = chunk.to(device)
            vectors = [
                self.encoder(*chunk.inputs(rows)).to(self.bank.dtype)
                for rows in torch.arange(len(chunk), device=device).split(WARM_UP_BATCH)
            ]
            encoded = torch.cat(vectors) if vectors else torch.zeros(0, self.bank.dim, device=device)
            self.bank.warm_up(chunk.item_ids, encoded, step=step)
        self.encoder.train(training)
        stats = self.bank.stats(reduce=True)
        log.info("bank warmed up from %s: %d rows filled", self.items.path, stats["filled"])

    def measure_staleness(self, ids: torch.Tensor, fresh: torch.Tensor, step: int) -> None:
        """Cosine between the encoder's output for this step's targets and the vectors the bank still holds for
        them (on the targets it holds), and the share it holds. Summed here; `metrics` reduces over ranks."""
        cached, hit = self.bank.read(ids, step, dtype=torch.float32)
        cosine = F.cosine_similarity(cached[hit], fresh[hit].float(), dim=-1)
        totals = [cosine.sum(), hit.sum().float(), torch.tensor(float(hit.numel()), device=hit.device)]
        self.staleness = torch.stack(totals).to(torch.float64)

    def metrics(self, device: torch.device) -> dict[str, float]:
        """The last step's hit rate per history and, when measured since the last call, the staleness cosine and
        the share of targets held, over all ranks (a collective then: every rank measured the same steps)."""
        values = coverage_values(self.coverage)
        if self.staleness is not None:  # summed over ranks: cosine sum, targets held, targets
            totals = self.staleness.to(device)
            if dist.is_initialized():
                dist.all_reduce(totals)
            values["bank_staleness_cosine"] = (totals[0] / totals[1].clamp(min=1)).item()
            values["bank_target_hit"] = (totals[1] / totals[2].clamp(min=1)).item()
            self.staleness = None
        return values
