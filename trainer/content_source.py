"""Where a step's content vectors come from, with `memory_bank.enabled`: the target items' vectors and the
history items' vectors that the history tokens carry (ID embedding ⊕ content).

- `BankContent` (LEMUR): targets are encoded (a share p forward, q of them with gradient: encoder sampling; the rest
  read the bank), histories read the bank by item id without gradient, and entries encoded in this step on any rank
  take the fresh vector (the dedup join). After the step the fresh vectors are written. At serving time nothing is
  encoded: targets and histories come from the bank only.
- `RecomputeContent` (the naive end-to-end baseline): every history item is re-encoded from raw content at every
  step, with gradient (items deduplicated within the batch first), from an in-memory item catalog.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from embeddings.memory_bank import MemoryBank
from trainer.config.schema import MemoryBankConfig
from trainer.data.batch import Batch, Tokens
from trainer.data.items import ItemCatalog
from trainer.models.model import Embedded

Encoder = Callable[[dict[str, Tokens], torch.Tensor, torch.Tensor], torch.Tensor]
TRAIN, EVAL, SERVE = "train", "eval", "serve"


@dataclass
class StepContent:
    target: torch.Tensor
    """[B, C] the target items' content vectors (fresh, or read from the bank)."""
    fresh: torch.Tensor
    """[B] bool: rows whose target the encoder ran on in this step (they are written to the bank)."""
    histories: dict[str, torch.Tensor]
    """Per history: [B, L, C] content vectors (zeros where unknown or masked out)."""


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


def encode_rows(encoder: Encoder, batch: Batch, rows: torch.Tensor, grad: bool) -> torch.Tensor:
    text = {f: Tokens(t.input_ids[rows], t.attention_mask[rows]) for f, t in batch.text.items()}
    with torch.set_grad_enabled(grad and torch.is_grad_enabled()):
        return encoder(text, batch.images[rows], batch.image_mask[rows])


def flat_histories(embedded: Embedded) -> tuple[list[str], list[int], torch.Tensor, torch.Tensor]:
    """All histories side by side along the sequence axis: names, lengths, ids [B, ΣL], mask [B, ΣL]."""
    names = list(embedded.history_ids)
    lengths = [embedded.history_ids[n].shape[1] for n in names]
    ids = torch.cat([embedded.history_ids[n] for n in names], dim=1)
    mask = torch.cat([embedded.histories[n][1] for n in names], dim=1)
    return names, lengths, ids, mask


def hit_shares(names: list[str], lengths: list[int], hits: torch.Tensor, mask: torch.Tensor) -> dict:
    shares = {}
    for name, hit_part, mask_part in zip(names, hits.split(lengths, 1), mask.split(lengths, 1)):
        asked = mask_part.sum()
        shares[name] = torch.where(asked > 0, hit_part.sum() / asked.clamp(min=1), 1.0)
    return shares


class BankContent:
    """LEMUR's path: see the module docstring. `coverage` (per history, last step) and the staleness totals are
    read by the trainer's log line."""

    def __init__(
        self,
        cfg: MemoryBankConfig,
        bank: MemoryBank,
        encoder: Encoder,
        dtype: torch.dtype,
        seed: int,
        rank: int,
    ) -> None:
        self.cfg, self.bank, self.encoder, self.dtype = cfg, bank, encoder, dtype
        self.seed, self.rank = seed, rank
        self.coverage: dict[str, torch.Tensor] = {}
        self.staleness: torch.Tensor | None = None

    @property
    def sampling(self) -> bool:
        return self.cfg.forward_share < 1.0 or self.cfg.backward_share < 1.0

    def prepare(self, batch: Batch, embedded: Embedded, step: int, mode: str) -> StepContent:
        names, lengths, ids, mask = flat_histories(embedded)
        rows = self.rows(batch, step, mode)
        # One read (a collective) for the histories and the targets that are not encoded.
        wanted = torch.cat([ids[mask], batch.item_id[rows.from_bank]])
        vectors, hit = self.bank.read(wanted, step, dtype=self.dtype)
        n_hist = int(mask.sum())
        cached = vectors.new_zeros(*ids.shape, self.bank.dim)
        cached[mask] = vectors[:n_hist]
        hits = torch.zeros_like(mask)
        hits[mask] = hit[:n_hist]
        self.coverage = hit_shares(names, lengths, hits, mask)
        target, fresh = self.target(batch, rows, vectors[n_hist:])
        if mode == TRAIN:
            cached = self.bank.dedup_join(
                ids, mask, cached, batch.item_id[fresh], target[fresh], grad=self.cfg.join_gradient
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
        generator = torch.Generator().manual_seed(hash((self.seed, step, self.rank)) & (2**63 - 1))
        return sample_rows(batch.valid, self.cfg.forward_share, self.cfg.backward_share, generator)

    def target(
        self, batch: Batch, rows: SampledRows, from_bank: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """[B, C] target vectors assembled from the encoded rows and the bank rows, and the encoded-rows mask."""
        size = batch.size
        if rows.backward.numel() == size or rows.forward_only.numel() == size:  # every row: one plain call
            with torch.set_grad_enabled(rows.backward.numel() == size and torch.is_grad_enabled()):
                return self.encoder(batch.text, batch.images, batch.image_mask), batch.valid.clone()
        target = from_bank.new_zeros(size, self.bank.dim)
        target = target.index_put((rows.from_bank,), from_bank)
        for part, grad in ((rows.backward, True), (rows.forward_only, False)):
            if part.numel():
                encoded = encode_rows(self.encoder, batch, part, grad)
                target = target.to(encoded.dtype).index_put((part,), encoded)
        fresh = torch.zeros_like(batch.valid)
        fresh[rows.backward] = True
        fresh[rows.forward_only] = True
        return target, fresh & batch.valid

    def after_step(self, batch: Batch, content: StepContent, step: int, measure: bool) -> None:
        """Write this step's fresh target vectors (visible to later steps' reads); LEMUR's staleness check first
        when `measure`."""
        ids, fresh = batch.item_id[content.fresh], content.target[content.fresh].detach()
        if measure:
            self.measure_staleness(ids, fresh, step)
        self.bank.write(ids, fresh, step)

    def measure_staleness(self, ids: torch.Tensor, fresh: torch.Tensor, step: int) -> None:
        """Cosine between the encoder's output for this step's targets and the vectors the bank still holds for
        them (on the targets it holds), and the share it holds. Summed here; the log line reduces over ranks."""
        cached, hit = self.bank.read(ids, step, dtype=torch.float32)
        cosine = F.cosine_similarity(cached[hit], fresh[hit].float(), dim=-1)
        totals = [cosine.sum(), hit.sum().float(), torch.tensor(float(hit.numel()), device=hit.device)]
        self.staleness = torch.stack(totals).to(torch.float64)


class RecomputeContent:
    """The naive end-to-end baseline: every history item is encoded from raw content at every step (with gradient
    in training). Items are deduplicated within the batch first, which only makes the baseline faster."""

    def __init__(self, catalog: ItemCatalog, encoder: Encoder, dtype: torch.dtype) -> None:
        self.catalog, self.encoder, self.dtype = catalog, encoder, dtype
        self.coverage: dict[str, torch.Tensor] = {}
        self.staleness: torch.Tensor | None = None

    def prepare(self, batch: Batch, embedded: Embedded, step: int, mode: str) -> StepContent:
        if mode == SERVE:
            raise ValueError("memory_bank.mode = 'recompute' has no bank to serve from")
        names, lengths, ids, mask = flat_histories(embedded)
        target = self.encoder(batch.text, batch.images, batch.image_mask)
        unique, inverse = torch.unique(ids[mask], return_inverse=True)
        rows, found = self.catalog.rows_of(unique)
        known = found.nonzero().squeeze(1)
        table = target.new_zeros(unique.numel(), target.shape[1])
        if known.numel():
            encoded = self.encoder(*self.catalog.inputs(rows[known]))
            table = table.index_put((known,), encoded.to(table.dtype))
        flat = target.new_zeros(*ids.shape, target.shape[1])
        flat = flat.index_put((mask,), table[inverse])
        hits = torch.zeros_like(mask)
        hits[mask] = found[inverse]
        self.coverage = hit_shares(names, lengths, hits, mask)
        return StepContent(target, batch.valid.clone(), dict(zip(names, flat.split(lengths, 1))))

    def after_step(self, batch: Batch, content: StepContent, step: int, measure: bool) -> None:
        pass
