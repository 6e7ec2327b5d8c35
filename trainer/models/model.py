"""The whole ranking model as plain modules: SparseArch (ID tables) + DenseArch (content towers, fusion, ranker).

Nothing here knows about distribution: embeddings/sharding.py shards `LemurModel.sparse` with DMP and
trainer/engine.py wraps `LemurModel.dense` with DeepSpeed.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn
from torchrec.sparse.jagged_tensor import JaggedTensor

from embeddings.tables import SparseArch, TablePlan, plan_tables
from trainer.config.schema import Config, ConfigError, EmbeddingsConfig
from trainer.data.batch import Batch
from trainer.data.collate import history_lengths
from trainer.data.spec import DatasetSpec
from trainer.models.fusion import ContentEncoder, QueryEncoder
from trainer.models.lora import add_lora
from trainer.models.ranker import build_ranker
from trainer.models.sequence import LongerDecoder, Similarity


@dataclass
class Embedded:
    """What the sparse arch hands to the dense arch (plain tensors)."""

    pooled: torch.Tensor  # [B, F * D]
    target: torch.Tensor  # [B, D] the target item's id embedding
    histories: dict[str, tuple[torch.Tensor, torch.Tensor]]  # name -> ([B, L, D], mask [B, L] bool)
    history_ids: dict[str, torch.Tensor] = field(default_factory=dict)  # name -> raw item ids [B, L]
    history_content: dict[str, torch.Tensor] | None = None  # name -> content vectors [B, L, C] (memory bank)


@dataclass
class DenseOutput:
    logits: torch.Tensor  # [B]
    content: torch.Tensor | None  # [B, C] the target item's content vector
    query: torch.Tensor | None  # [B, C] the query vector (search scenario)
    cic: tuple[torch.Tensor, torch.Tensor] | None = None  # CIC heads' (content, ID) projections [B, cic_dim]


def history_content_dims(cfg: Config, spec: DatasetSpec) -> dict[str, int]:
    """Per history, the width of the content vector its tokens carry (0: ID embeddings only)."""
    bank = cfg.memory_bank.enabled
    unknown = [n for n in cfg.model.no_content_histories if n not in spec.history]
    if unknown:
        raise ConfigError(
            f"model.no_content_histories: {unknown} not among the dataset's histories {list(spec.history)}"
        )
    return {
        name: cfg.model.content_dim if bank and name not in cfg.model.no_content_histories else 0
        for name in spec.history
    }


def padded(
    jt: JaggedTensor, max_len: int, dtype: torch.dtype | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """JaggedTensor of [sum(lengths), ...] values -> ([B, max_len, ...], mask), keeping the most recent max_len;
    `dtype`: the values cast first (the same result as casting the padded tensor, for a smaller one to write).

    No host sync: every value is copied to its slot, the dropped (older) ones to one spare slot past the end,
    so nothing is indexed by a data-dependent boolean mask."""
    lengths = jt.lengths().long()
    values = jt.values() if dtype is None else jt.values().to(dtype)
    batch = lengths.numel()
    offsets = torch.zeros(batch + 1, dtype=torch.long, device=values.device)
    offsets[1:] = torch.cumsum(lengths, 0)
    row = torch.repeat_interleave(
        torch.arange(batch, device=values.device), lengths, output_size=values.shape[0]
    )
    position = torch.arange(values.shape[0], device=values.device) - offsets[row]
    position = position - (lengths[row] - torch.clamp(lengths[row], max=max_len))  # keep the last max_len
    spare = batch * max_len
    slot = torch.where(position >= 0, row * max_len + position, spare)
    flat = values.new_zeros(spare + 1, *values.shape[1:]).index_copy(0, slot, values)
    out = flat[:spare].view(batch, max_len, *values.shape[1:])
    mask = torch.arange(max_len, device=values.device)[None, :] < torch.clamp(lengths, max=max_len)[:, None]
    return out, mask


def target_rows(batch: Batch) -> tuple[torch.Tensor, torch.Tensor]:
    """The target items' item-table rows [B] (0 where a row has none) and whether each row has one [B] bool."""
    rows, present = padded(batch.sequences["item_id"], 1)
    return rows[:, 0], present[:, 0]


def history_rows(batch: Batch, name: str, length: int) -> torch.Tensor:
    """A history's item-table rows [B, length], aligned with its tokens (`LemurModel.embed` pads the same way)."""
    return padded(batch.sequences[name], length)[0]


def masked_mean(values: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    weights = mask.to(values.dtype).unsqueeze(-1)
    return (values * weights).sum(1) / weights.sum(1).clamp(min=1.0)


class DenseArch(nn.Module):
    """Content towers + fusion (target item), query tower (search), dense features, history encoders and ranker.

    With the memory bank, each history token is the item's ID embedding joined with its content vector from the
    bank, and LEMUR's similarity module adds the cosines between the target and history content vectors."""

    def __init__(
        self,
        cfg: Config,
        spec: DatasetSpec,
        pooled_features: list[str],
        vocab_size: int,
        pad_token_id: int,
        item_rows: int = 0,
    ) -> None:
        """`item_rows`: the item table's rows (the ID-frequency gate keeps a count per row)."""
        super().__init__()
        model, dim = cfg.model, cfg.embeddings.dim
        self.history_names = list(spec.history)
        self.pooled_features = list(pooled_features)
        self.stop_gradient = model.stop_gradient
        self.content = (
            ContentEncoder(model, vocab_size, pad_token_id, cfg.data.image_size)
            if model.use_content
            else None
        )
        search = model.use_content and spec.query_text
        self.query = QueryEncoder(model, vocab_size, pad_token_id) if search else None
        self.dense_proj = nn.Linear(len(spec.dense), dim) if spec.dense else None
        self.item_id_dropout = model.item_id_dropout
        self.id_gate_count = model.id_gate_count
        self.id_gate_history = model.id_gate_history
        cold_path = model.item_id_dropout > 0 or model.id_gate_count > 0
        self.new_item = nn.Parameter(torch.zeros(dim)) if cold_path else None
        """The learned stand-in for the item-ID embedding of a new item (model.item_id_dropout, id_gate_count)."""
        if model.id_gate_count > 0 and item_rows <= 0:
            raise ValueError("model.id_gate_count needs the item table's row count (item_rows)")
        self.id_counts: torch.Tensor | None
        self.register_buffer(
            "id_counts", torch.zeros(item_rows, dtype=torch.long) if model.id_gate_count > 0 else None
        )
        """Per item-table row, its impressions as a training target so far (model.id_gate_count): n in the gate.
        Integer, so a bf16 engine leaves it alone; replicated and saved with the dense weights, so every rank must
        count the same rows (`count_targets`)."""
        context_dim = (len(pooled_features) + 1 + (1 if spec.dense else 0)) * dim
        if self.content is not None:
            context_dim += model.content_dim
        if self.query is not None:
            context_dim += model.content_dim + 1
        self.content_dims = history_content_dims(cfg, spec)
        self.similarity_top_k = model.similarity_top_k
        with_content = any(self.content_dims.values())
        self.similarity = (
            Similarity(model.similarity_top_k) if model.similarity_top_k and with_content else None
        )
        self.decoders = None
        if model.history_encoder == "longer":
            # LONGER: a query token built from every other feature attends over each history (no self-attention).
            self.query_token = nn.Linear(context_dim, dim)
            self.decoders = nn.ModuleDict(
                {
                    name: LongerDecoder(
                        dim,
                        model.longer_heads,
                        model.longer_layers,
                        history_dim=dim + self.content_dims[name],
                    )
                    for name in self.history_names
                }
            )
        history_dim = sum(self.history_features(name, dim) for name in self.history_names)
        self.ranker = build_ranker(model, context_dim + history_dim)
        self.cic = self.build_cic(cfg) if cfg.training.cic_weight > 0 and self.content is not None else None
        if cfg.lora.rank > 0:  # the config makes sure the LONGER decoders exist
            add_lora(self.sequence_model(), cfg.lora.rank, cfg.lora.alpha)

    def history_features(self, name: str, dim: int) -> int:
        """Width of one history's features for the ranker."""
        encoded = dim if self.decoders is not None else dim + self.content_dims[name]
        return encoded + (2 * self.similarity_top_k if self.content_dims[name] else 0)

    def build_cic(self, cfg: Config) -> nn.ModuleDict:
        """EM3's CIC heads: content vector -> cic_dim, concatenated ID embeddings -> cic_dim."""
        known = ["item_id", *self.pooled_features]
        unknown = [f for f in cfg.model.cic_features if f not in known]
        if unknown:
            raise ConfigError(f"model.cic_features: {unknown} are not id features of the dataset {known}")
        self.cic_features = list(cfg.model.cic_features)
        ids_dim = len(self.cic_features) * cfg.embeddings.dim
        return nn.ModuleDict(
            {
                "content": nn.Linear(cfg.model.content_dim, cfg.model.cic_dim),
                "ids": nn.Linear(ids_dim, cfg.model.cic_dim),
            }
        )

    def sequence_model(self) -> nn.ModuleDict:
        """The part EM3's LoRA phase freezes and adapts: the LONGER query token and decoders."""
        assert self.decoders is not None
        return nn.ModuleDict({"query_token": self.query_token, "decoders": self.decoders})

    def encode_content(self, batch: Batch) -> torch.Tensor | None:
        if self.content is None:
            return None
        return self.content(
            batch.text, batch.images, batch.image_mask, batch.known_item_ids, batch.packed_text
        )

    def forward(self, batch: Batch, embedded: Embedded, content: torch.Tensor | None = None) -> DenseOutput:
        """`content`: the target items' content vectors when the caller already encoded them (memory bank)."""
        context = [embedded.pooled, self.target_id_embedding(batch, embedded.target)]
        if self.dense_proj is not None:
            context.append(self.dense_proj(batch.dense))
        if content is None:
            content = self.encode_content(batch)
        ranked_content = self.ranked(content)  # what the ranking loss may train through
        if ranked_content is not None:
            context.append(ranked_content)
        query = None
        if self.query is not None and batch.query is not None:
            query = self.query(batch.query)
            ranked_query = self.ranked(query)
            cosine = F.cosine_similarity(ranked_query, ranked_content, dim=-1).unsqueeze(-1)
            context += [ranked_query, cosine]
        context_vector = torch.cat(context, dim=-1)
        histories = [
            self.encode_history(name, batch, embedded, context_vector, ranked_content)
            for name in self.history_names
        ]
        logits = self.ranker(torch.cat([context_vector, *histories], dim=-1))
        cic = self.cic_projections(embedded, content) if self.cic is not None else None
        return DenseOutput(logits, content, query, cic)

    def target_id_embedding(self, batch: Batch, target: torch.Tensor) -> torch.Tensor:
        """The target's item-ID embedding as the ranker reads it. With the ID-frequency gate, the gated mix of the
        ID and new-item embeddings (`gated`; n = 0, an item that never trained, reads the new-item embedding). With
        item_id_dropout, the new-item embedding instead for a random share of the rows in training, and, without
        the gate (no counts to tell), for the rows the dataset flags absent from training (`batch.cold`) in eval.
        The draw is on the device (no host sync)."""
        if self.new_item is None:
            return target
        if self.id_counts is not None:
            target = self.gated(target, self.id_gate(target_rows(batch)[0]))
        if self.training and self.item_id_dropout > 0:
            new = torch.rand(target.shape[0], device=target.device) < self.item_id_dropout
        elif not self.training and self.id_counts is None:
            new = batch.cold.to(device=target.device, dtype=torch.bool)
        else:
            return target
        return torch.where(new[:, None], self.new_item.to(target.dtype).expand_as(target), target)

    def id_gate(self, rows: torch.Tensor) -> torch.Tensor:
        """g = n / (n + k) for table rows of any shape (n: the row's target impressions in training so far, k:
        model.id_gate_count): 0 for a row that never trained, -> 1 as it is seen more. A gather, no host sync.

        Counts are per ROW, not per id: an id unseen in training that the hash puts on a trained id's row reads
        that row's count and embedding (a known limit; TorchRec's managed-collision modules would remove it)."""
        assert self.id_counts is not None
        n = self.id_counts[rows].float()
        return n / (n + self.id_gate_count)

    def gated(self, ids: torch.Tensor, gate: torch.Tensor) -> torch.Tensor:
        """g * ID embedding + (1 - g) * new-item embedding; `gate` [...] against `ids` [..., D]. Exactly the new-item
        embedding where g = 0."""
        assert self.new_item is not None
        g = gate.to(ids.dtype).unsqueeze(-1)
        return g * ids + (1 - g) * self.new_item.to(ids.dtype)

    def history_id_tokens(self, name: str, batch: Batch, tokens: torch.Tensor) -> torch.Tensor:
        """The history's ID tokens [B, L, D] as the encoders read them: under the ID-frequency gate, items that
        never trained as a target read the new-item embedding instead of their untrained rows (model.id_gate_history:
        `cold`), or every token is gated like the target (`gate`)."""
        if self.id_counts is None or self.id_gate_history == "off":
            return tokens
        rows = history_rows(batch, name, tokens.shape[1])
        if self.id_gate_history == "cold":
            assert self.id_counts is not None
            return self.gated(tokens, (self.id_counts[rows] > 0).float())
        return self.gated(tokens, self.id_gate(rows))

    @torch.no_grad()
    def count_targets(self, rows: torch.Tensor, weights: torch.Tensor) -> None:
        """Add `weights` [N] (1 per target impression, 0 for padding) to the counts of table `rows` [N]: on the device,
        no host sync. The counts are replicated state: every rank must pass the same rows (all ranks' targets)."""
        if self.id_counts is not None:
            self.id_counts.index_add_(0, rows.long(), weights.to(self.id_counts.dtype))

    def ranked(self, vectors: torch.Tensor | None) -> torch.Tensor | None:
        """Content/query vectors as the ranker reads them: detached under model.stop_gradient."""
        if vectors is None or not self.stop_gradient:
            return vectors
        return vectors.detach()

    def cic_projections(self, embedded: Embedded, content: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        assert self.cic is not None
        dim = embedded.target.shape[-1]
        parts = []
        for name in self.cic_features:
            if name == "item_id":
                parts.append(embedded.target)
            else:
                i = self.pooled_features.index(name)
                parts.append(embedded.pooled[:, i * dim : (i + 1) * dim])
        ids = torch.cat(parts, dim=-1)
        return self.cic["content"](content), self.cic["ids"](ids.to(content.dtype))

    def encode_history(
        self, name: str, batch: Batch, embedded: Embedded, context: torch.Tensor, content: torch.Tensor | None
    ) -> torch.Tensor:
        tokens, mask = embedded.histories[name]
        tokens = self.history_id_tokens(name, batch, tokens)
        extra = []
        vectors = None
        if self.content_dims[name]:
            # In the bank's dtype: the decoder and the similarity module cast them where they read them.
            vectors = self.ranked(self.history_content(name, embedded, tokens))
            assert vectors is not None
            if self.similarity is not None:
                extra.append(self.similarity(content, vectors, mask))
        if self.decoders is None:
            joined = tokens if vectors is None else torch.cat([tokens, vectors.to(tokens.dtype)], dim=-1)
            encoded = masked_mean(joined, mask)
        else:
            encoded = self.decoders[name](self.query_token(context), tokens, mask, vectors)
        return torch.cat([encoded, *extra], dim=-1) if extra else encoded

    def history_content(self, name: str, embedded: Embedded, tokens: torch.Tensor) -> torch.Tensor:
        """The bank's vectors for the history (as the bank holds them); zeros where none were given (e.g. the
        single-process reference)."""
        if embedded.history_content is None:
            return tokens.new_zeros(*tokens.shape[:2], self.content_dims[name])
        return embedded.history_content[name]


class LemurModel(nn.Module):
    """The sparse arch (ID tables) and the dense arch, and `embed`, which turns a batch's table rows into the
    embeddings the dense arch reads. The step (content source, dense forward, loss) is `trainer/step.py`."""

    def __init__(self, sparse: SparseArch, dense: DenseArch, history_lengths: dict[str, int]) -> None:
        super().__init__()
        self.sparse = sparse
        self.dense = dense
        self.history_lengths = history_lengths

    def embed(self, batch: Batch, dtype: torch.dtype | None = None) -> Embedded:
        """The batch's embeddings; `dtype`: the histories' (the big part) cast before they are padded."""
        pooled, sequences = self.sparse(batch.sparse, batch.sequences)
        target, _ = padded(sequences["item_id"], 1)
        histories = {name: padded(sequences[name], n, dtype) for name, n in self.history_lengths.items()}
        history_ids = {}
        if batch.raw_histories is not None:
            raw = batch.raw_histories.to_dict()
            history_ids = {name: padded(raw[name], n)[0] for name, n in self.history_lengths.items()}
        return Embedded(pooled, target[:, 0], histories, history_ids)

    def count_targets(
        self, batch: Batch, gather: Callable[[torch.Tensor], torch.Tensor] = lambda rows: rows
    ) -> None:
        """After a training step: count the batch's target impressions per item-table row (the ID-frequency gate;
        nothing without it). `gather`: every rank's [B, 2] (row, weight) pairs concatenated, so that the replicated
        counts stay the same on every rank; the caller supplies it (the model knows nothing of distribution)."""
        if self.dense.id_counts is None:
            return
        rows, present = target_rows(batch)
        weights = present & batch.valid.to(device=rows.device, dtype=torch.bool)
        pairs = gather(torch.stack([rows.long(), weights.long()], dim=1))
        self.dense.count_targets(pairs[:, 0], pairs[:, 1])


def plan_id_tables(spec: DatasetSpec, cfg: EmbeddingsConfig) -> TablePlan:
    """The ID tables for the dataset's features, sized by `embeddings`."""
    return plan_tables(
        spec.pooled_features,
        spec.sequence_features,
        spec.feature_cardinalities(),
        cfg.dim,
        cfg.hash_size,
        cfg.hash_sizes,
    )


def build_model(
    cfg: Config,
    spec: DatasetSpec,
    plan: TablePlan,
    vocab_size: int,
    pad_token_id: int,
    sparse_device: str = "meta",
) -> LemurModel:
    sparse = SparseArch(plan, device=sparse_device)
    item_rows = plan.rows[plan.sequence_features[0]]
    dense = DenseArch(cfg, spec, plan.pooled_features, vocab_size, pad_token_id, item_rows)
    return LemurModel(sparse, dense, history_lengths(spec, cfg.model.max_history))
