"""The batch: what one step consumes."""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field, fields, replace

import torch
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor


@dataclass
class Tokens:
    input_ids: torch.Tensor  # [B, L] int64
    attention_mask: torch.Tensor  # [B, L] int64 (1 = token)


@dataclass
class PackedText:
    """The target items' text fields with their padding squeezed out, for the towers: each row's real tokens of all
    fields left-packed (the segment of each token in `token_types`), the rows sorted by length and cut into buckets
    of equal row counts, each padded only to its own longest row. The towers' outputs are those of the padded
    fields (positions count real tokens, attention masks padding, the fusion has no positions), so running them
    bucket by bucket skips the padding's work (`ContentEncoder.forward`)."""

    rows: torch.Tensor
    """[B] int64: the batch rows in bucket order (bucket k holds rows[k * n : (k + 1) * n])."""
    buckets: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]
    """Per bucket: token ids, attention mask (int64, 1 = token) and token types (field index), [n_k, width_k]."""


@dataclass
class EncodedImages:
    """A batch's JPEGs still compressed (`data.image_decode = "device"`): the reader's workers checked their headers
    and `Trainer.to_device` decodes them into `Batch.images` on the device (`trainer/data/device_decode.py`). The
    bytes stay in host memory (pinned with the batch; `Batch.to` leaves them there): torchvision's decoder takes
    host tensors, also for device="cuda"."""

    data: torch.Tensor
    """[total bytes] uint8: every JPEG of the batch, back to back."""
    offsets: torch.Tensor
    """[K + 1] int64: JPEG k is data[offsets[k] : offsets[k + 1]]."""
    slots: torch.Tensor
    """[K, 2] int64: the (row, image slot) of `Batch.images` each JPEG goes to."""
    size: int
    """The square side the images are resized to (data.image_size)."""
    sources: list[tuple[str, str, str]]
    """(shard, key, field) of each JPEG, for the bad-sample message and count."""
    policy: str = "error"
    """data.bad_input: a JPEG the device cannot decode stops the run (`error`) or invalidates its row (`skip`)."""
    skipped: Counter | None = None
    """The counter of the stream the batch came from (`BatchStream.skipped`, attached as the batch is yielded):
    bad images found on the device are counted there, by reason, beside the reader's own skips."""

    @property
    def count(self) -> int:
        return int(self.slots.shape[0])

    def jpeg(self, k: int) -> torch.Tensor:
        """JPEG k's bytes: a view of `data`."""
        return self.data[int(self.offsets[k]) : int(self.offsets[k + 1])]

    def jpegs(self) -> list[torch.Tensor]:
        """Every JPEG's bytes, as views of `data` (one split, not K slices)."""
        return list(self.data.split(self.offsets.diff().tolist()))

    def pin_memory(self) -> EncodedImages:
        return replace(self, data=self.data.pin_memory())


@dataclass
class Batch:
    sparse: KeyedJaggedTensor
    """Pooled id features (EmbeddingBagCollection): user_id, query_id (search), then the spec's sparse features.
    Table rows when the reader hashes ids (the trainer's reader does), else raw ids."""
    sequences: KeyedJaggedTensor
    """Item-id sequences (EmbeddingCollection, one shared item table): item_id (the target, length 1), then the
    user-history sequences, most recent last. Table rows or raw ids, as `sparse`."""
    dense: torch.Tensor
    """[B, num_dense] float32."""
    text: dict[str, Tokens]
    """Per item text field: token ids and mask."""
    query: Tokens | None
    """Raw query tokens (search scenario)."""
    images: torch.Tensor
    """[B, N, 3, H, W] uint8 (normalise on the device: 4x less to copy). [B, N, 3, 0, 0] when no pixels travel:
    the frozen-feature cache serves the images, or `encoded_images` holds them all, still to be decoded."""
    image_mask: torch.Tensor
    """[B, N] bool: which images exist."""
    labels: torch.Tensor
    """[B, num_labels] float32."""
    user_id: torch.Tensor
    item_id: torch.Tensor
    query_id: torch.Tensor
    session_id: torch.Tensor
    timestamp: torch.Tensor
    cold: torch.Tensor
    """[B] bool: the item never appears in train (eval shards)."""
    valid: torch.Tensor
    """[B] bool: False for padding rows (eval pads so every rank has full, equal batches)."""
    raw_histories: KeyedJaggedTensor | None = None
    """The history sequences' raw item ids (same lengths as in `sequences`), when the reader keeps them: the memory
    bank and the recompute baseline look items up by raw id, not by table row."""
    packed_text: PackedText | None = None
    """`text` without its padding, in length buckets (`data.text_buckets` > 0), for the calls that encode every row."""
    known_item_ids: torch.Tensor | None = None
    """[B] the target item ids when every valid row's item is in items.parquet (padding rows carry a valid row's
    id), else None: what item-keyed caches of content built from that file take (`ContentEncoder.frozen_cache`)."""
    frozen_ids: torch.Tensor | None = None
    """[U] the distinct `known_item_ids`, sorted, when `Trainer.to_device` gathered their frozen-feature cache rows
    on the host (model.frozen_cache_placement = "host"); None otherwise (the cache is on the device, absent, or
    lacks an item of the batch: then the uncached path). Row u of the two below is item frozen_ids[u]'s."""
    frozen_text: torch.Tensor | None = None
    """[U, ΣL, H] the text tower's frozen-bottom output per item (fields at their full budgets), or None."""
    frozen_images: torch.Tensor | None = None
    """[U, N, P, H] the vision tower's frozen-bottom output per item, or None."""
    encoded_images: EncodedImages | None = None
    """The JPEGs left for the device to decode (`data.image_decode = "device"`), until `Trainer.to_device` has
    decoded them into `images` (None after: decoding a decoded batch does nothing)."""
    skipped: dict[str, int] = field(default_factory=dict)
    """Bad samples dropped while this batch was built, by reason."""
    reader: int = 0
    """Logical reader (DataLoader worker) that built the batch."""
    reader_position: int = 0
    """Raw samples that reader had consumed when the batch was complete (for exact resume)."""

    @property
    def size(self) -> int:
        return int(self.labels.shape[0])

    def to(self, device: torch.device | str, non_blocking: bool = False) -> Batch:
        """On `device`, but for `encoded_images`, which the decoder takes from host memory."""
        return self._map(lambda t: t.to(device, non_blocking=non_blocking))

    def pin_memory(self) -> Batch:
        batch = self._map(lambda t: t.pin_memory())
        if batch.encoded_images is not None:
            batch.encoded_images = batch.encoded_images.pin_memory()
        return batch

    def _map(self, fn) -> Batch:  # type: ignore[no-untyped-def]
        return Batch(**{f.name: _map_value(getattr(self, f.name), fn) for f in fields(self)})


def _map_value(value, fn):  # type: ignore[no-untyped-def]
    """`fn` over one field's tensors (whole KJTs). A module-level function: a nested one that called itself would be
    a reference cycle holding `fn` and what it holds, garbage for the collector after every `to`/`pin_memory`."""
    if isinstance(value, EncodedImages):
        return value
    if isinstance(value, (torch.Tensor, KeyedJaggedTensor)):
        return fn(value)
    if isinstance(value, Tokens):
        return Tokens(fn(value.input_ids), fn(value.attention_mask))
    if isinstance(value, PackedText):
        return PackedText(fn(value.rows), [tuple(fn(t) for t in bucket) for bucket in value.buckets])
    if isinstance(value, dict) and value and isinstance(next(iter(value.values())), Tokens):
        return {k: _map_value(v, fn) for k, v in value.items()}
    return value
