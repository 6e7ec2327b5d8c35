"""Samples -> Batch: KeyedJaggedTensors of ids, dense tensors, tokenised text fields, stacked images."""

from __future__ import annotations

import itertools
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor
from transformers import PreTrainedTokenizerFast

from embeddings.tables import hash_kjt
from trainer.config.schema import ConfigError
from trainer.data.batch import Batch, EncodedImages, PackedText, Tokens
from trainer.data.decode import EncodedJpeg
from trainer.data.id_vocab import IdVocab
from trainer.data.item_tokens import ItemTokens
from trainer.data.spec import DatasetSpec

QUERY_CACHE = 50_000
"""Distinct query texts a collator keeps tokenised (tens of MB at most with 10-token queries; cleared when full)."""
PAD_MULTIPLE = 8
"""Trimmed text widths are multiples of this: fewer distinct shapes (compiled graphs) and tensor-core friendly."""


@dataclass
class CollateSpec:
    """What the batch holds, resolved from the dataset spec and the model config."""

    id_features: list[str]
    sparse_features: list[str]
    pooled_keys: list[str]
    """Pooled (EmbeddingBagCollection) features: every id but the item, then the sparse features."""
    sequence_keys: list[str]
    """Item-id sequences (EmbeddingCollection): the target item (length 1), then the histories; they share one
    item table, so target and history embeddings live in one space."""
    sequences: list[str]
    history_lengths: dict[str, int]
    """History -> items kept (the most recent), model.max_history applied."""
    dense: list[str]
    text_fields: dict[str, int]
    """Field -> token budget."""
    query_tokens: int
    """0: no query in the batch."""
    image_size: int
    images_per_sample: int
    num_labels: int
    table_rows: dict[str, int] | None = None
    """Hash every id into its table's rows (the trainer's table plan), so the sharded collections take the batch
    as it is; None: the batch keeps raw ids."""
    id_vocab: IdVocab | None = None
    """embeddings.id_map = "vocab" (with table_rows): the item-id sequences are looked up in the train split's item
    vocabulary (a row per train item, one reserved row for every other id) instead of hashed; the pooled features
    are still hashed."""
    raw_histories: bool = False
    """Also keep the histories' raw item ids (`Batch.raw_histories`, for the memory bank)."""
    pad_to_longest: bool = False
    """Pad each text field to the batch's longest (rounded up to a multiple of PAD_MULTIPLE, at most the budget)
    instead of the budget. The towers' outputs do not change (positions count real tokens, attention masks
    padding); their work shrinks with the padding (the synthetic lemur text fills about a fifth of its budgets)."""
    pixels: bool = True
    """False: the frozen-feature cache serves every target's image features (the reader decodes no image), so the
    batch carries the image mask and no pixels ([B, N, 3, 0, 0]), and every row a cached item id."""
    jpeg_on_device: bool = False
    """The reader leaves JPEGs to the device (`data.image_decode = "device"`): they travel as `Batch.encoded_images`,
    and `images` carries pixels only when some image of the batch was decoded on the CPU (PNG, CMYK)."""
    bad_input: str = "error"
    """data.bad_input, for the device decoder (`EncodedImages.policy`)."""
    text_buckets: int = 0
    """> 0: also hand the text to the towers packed (`Batch.packed_text`): real tokens only, rows sorted by length
    into this many buckets, each padded to its own longest row (rounded up to PAD_MULTIPLE)."""


def history_lengths(spec: DatasetSpec, max_history: dict[str, int] | None = None) -> dict[str, int]:
    """Each history's length: the dataset's, or the shorter model.max_history."""
    limits = dict(max_history or {})
    unknown = sorted(set(limits) - set(spec.history))
    if unknown:
        raise ConfigError(
            f"model.max_history: {unknown} not among the dataset's histories {list(spec.history)}"
        )
    return {name: min(n, limits.get(name, n)) for name, n in spec.history.items()}


def collate_spec(
    spec: DatasetSpec,
    text_fields: dict[str, int],
    query_tokens: int,
    image_size: int,
    images_per_sample: int,
    max_history: dict[str, int] | None = None,
    table_rows: dict[str, int] | None = None,
    raw_histories: bool = False,
    pad_to_longest: bool = False,
    text_buckets: int = 0,
    id_vocab: IdVocab | None = None,
) -> CollateSpec:
    missing = [f for f in text_fields if f not in spec.text]
    if missing:
        raise ValueError(f"model.text_fields: {missing} not in the dataset's text fields {spec.text}")
    return CollateSpec(
        id_features=spec.id_features,
        sparse_features=list(spec.sparse),
        pooled_keys=spec.pooled_features,
        sequence_keys=spec.sequence_features,
        sequences=list(spec.history),
        history_lengths=history_lengths(spec, max_history),
        dense=list(spec.dense),
        text_fields=dict(text_fields),
        query_tokens=query_tokens if spec.query_text else 0,
        image_size=image_size,
        images_per_sample=min(images_per_sample, spec.images),
        num_labels=len(spec.labels),
        table_rows=dict(table_rows) if table_rows is not None else None,
        raw_histories=raw_histories,
        pad_to_longest=pad_to_longest,
        text_buckets=text_buckets,
        id_vocab=id_vocab,
    )


def empty_sample(spec: CollateSpec) -> dict[str, Any]:
    """A zero sample, used to pad eval batches (marked invalid)."""
    return {
        "__key__": "<pad>",
        "user_id": 0,
        "item_id": 0,
        "timestamp": 0,
        "query_id": 0,
        "session_id": 0,
        "request_id": 0,
        "cold": False,
        "labels": [0.0] * spec.num_labels,
        "sparse": {k: [] for k in spec.sparse_features},
        "dense": [0.0] * len(spec.dense),
        "history": {k: [] for k in spec.sequences},
        "text": {k: "" for k in spec.text_fields},
        "query": "",
        "images": [],
    }


def jagged(keys: list[str], rows: list[dict[str, list[int]]]) -> KeyedJaggedTensor:
    """KJT with key-major layout: all samples' values of keys[0], then keys[1], ...

    The values (up to a million ids a batch with long histories) go straight from the lists into an int64 array:
    `torch.tensor` on a flat Python list costs three times as much. The per-key lengths are computed here, on the
    host, and travel with the KJT: TorchRec would otherwise read them back from the device (a sync per step)."""
    per_sample = np.array([[len(row[k]) for row in rows] for k in keys], dtype=np.int32)
    lengths = per_sample.reshape(-1)
    parts = [row[k] for k in keys for row in rows]
    if all(type(part) is list for part in parts):  # JSON records
        values = np.fromiter(itertools.chain.from_iterable(parts), dtype=np.int64, count=int(lengths.sum()))
    else:  # binary records: int64 arrays already
        values = np.concatenate(
            [np.asarray(part, dtype=np.int64) for part in parts] or [np.zeros(0, np.int64)]
        )
    return keyed(
        keys, torch.from_numpy(values), torch.from_numpy(lengths), len(rows), per_sample.sum(1).tolist()
    )


def rows_of(values: list[Any], width: int) -> torch.Tensor:
    """[len(values), width] float32 from per-sample lists (JSON records) or arrays (binary records)."""
    return torch.from_numpy(np.array(values, dtype=np.float32).reshape(len(values), width))


def keyed(
    keys: list[str], values: torch.Tensor, lengths: torch.Tensor, stride: int, per_key: list[int]
) -> KeyedJaggedTensor:
    """A KJT whose per-key lengths and offsets are known on the host already."""
    offsets = np.concatenate([[0], np.cumsum(per_key, dtype=np.int64)]).tolist()
    return KeyedJaggedTensor(
        keys=keys,
        values=values,
        lengths=lengths,
        stride=stride,
        length_per_key=list(per_key),
        offset_per_key=offsets,
    )


class Collator:
    def __init__(
        self, spec: CollateSpec, tokenizer: PreTrainedTokenizerFast, items: ItemTokens | None = None
    ) -> None:
        self.spec = spec
        self.tokenizer = tokenizer
        self.items = items
        """Items tokenised once (`item_tokens.py`): the target's text fields are joined by item id, not tokenised."""
        self.query_cache: dict[str, tuple[np.ndarray, np.ndarray]] = {}

    def query_tokens(self, texts: list[str]) -> Tokens:
        """The queries' tokens. Search logs repeat queries across samples (a session shows several items for one
        query), so each distinct query text is tokenised once per worker and kept (up to QUERY_CACHE texts)."""
        budget = self.spec.query_tokens
        cache = self.query_cache
        missing = list(dict.fromkeys(t for t in texts if t not in cache))
        if missing:
            if len(cache) + len(missing) > QUERY_CACHE:
                cache.clear()
            ids, mask = self.encode(missing, budget)
            cache.update(zip(missing, zip(ids, mask)))
        rows = [cache[t] for t in texts]
        ids = np.stack([r[0] for r in rows]) if rows else np.zeros((0, budget), dtype=np.int64)
        mask = np.stack([r[1] for r in rows]) if rows else np.zeros((0, budget), dtype=np.int64)
        return self.as_tokens(ids, mask)

    def tokens(self, texts: list[str], budget: int) -> Tokens:
        return self.as_tokens(*self.encode(texts, budget))

    def encode(self, texts: list[str], budget: int) -> tuple[np.ndarray, np.ndarray]:
        """Token ids and mask [n, budget], padded to the budget. Lists, then one numpy copy: the tokenizer's own
        return_tensors="pt" walks every token in Python first and costs as much again as the tokenising."""
        enc = self.tokenizer(texts, max_length=budget, truncation=True, padding="max_length")
        ids = np.array(enc["input_ids"], dtype=np.int64).reshape(len(texts), budget)
        return ids, np.array(enc["attention_mask"], dtype=np.int64).reshape(len(texts), budget)

    def as_tokens(self, ids: np.ndarray, mask: np.ndarray) -> Tokens:
        """Every row the same length: the budget, or with pad_to_longest the longest row (rounded up)."""
        if self.spec.pad_to_longest and len(ids):
            longest = int(mask.sum(1).max())
            width = min(ids.shape[1], -(-max(longest, 1) // PAD_MULTIPLE) * PAD_MULTIPLE)
            ids, mask = ids[:, :width], mask[:, :width]
        return Tokens(
            torch.from_numpy(np.ascontiguousarray(ids)), torch.from_numpy(np.ascontiguousarray(mask))
        )

    def item_text(self, samples: list[dict[str, Any]]) -> tuple[dict[str, Tokens], PackedText | None]:
        """The target items' text fields as the towers take them, and packed (with spec.text_buckets)."""
        ids = np.fromiter((x["item_id"] for x in samples), np.int64, len(samples))
        arrays = self.item_token_arrays(ids, lambda field, i: samples[i]["text"][field])
        packed = pack_text(list(arrays.values()), self.spec.text_buckets) if self.spec.text_buckets else None
        return {f: self.as_tokens(*arrays[f]) for f in arrays}, packed

    def known_item_ids(self, samples: list[dict[str, Any]], valid: list[bool]) -> torch.Tensor | None:
        """The target ids if every valid row's item is in the item token table (that is, in items.parquet), with
        padding rows given a valid row's id; else None."""
        ids = np.fromiter((x["item_id"] for x in samples), np.int64, len(samples))
        real = np.asarray(valid, dtype=bool)
        if self.items is None or len(self.items) == 0 or not self.items.rows_of(ids[real])[1].all():
            return None
        filler = (
            ids[real][0] if real.any() else self.items.item_ids[0]
        )  # an all-padding batch: any cached item
        return torch.from_numpy(np.where(real, ids, filler))

    def item_token_arrays(
        self, item_ids: np.ndarray, text_of: Callable[[str, int], str]
    ) -> dict[str, tuple[np.ndarray, np.ndarray]]:
        """Per text field, token ids and mask [n, budget] of these items: joined from the item token table by id,
        tokenised from `text_of(field, row)` where an item is not in it (every row without a table). The reader
        and the item catalog (recompute, bank warm-up, export) both take items' tokens from here."""
        budgets = self.spec.text_fields
        if self.items is None:
            rows, found = np.zeros(len(item_ids), dtype=np.int64), np.zeros(len(item_ids), dtype=bool)
        else:
            rows, found = self.items.rows_of(item_ids)
        missing = np.flatnonzero(~found)
        arrays = {}
        for f, budget in budgets.items():
            if self.items is None:
                ids = np.zeros((len(item_ids), budget), dtype=np.int64)
                mask = np.zeros_like(ids)
            else:
                ids = self.items.tokens[f][rows].astype(np.int64)
                mask = (np.arange(budget)[None, :] < self.items.lengths[f][rows][:, None]).astype(np.int64)
            if len(missing):
                ids[missing], mask[missing] = self.encode([text_of(f, int(i)) for i in missing], budget)
            arrays[f] = (ids, mask)
        return arrays

    def __call__(self, samples: list[dict[str, Any]], valid: list[bool] | None = None) -> Batch:
        s = self.spec
        pooled_rows = [{**{k: [x[k]] for k in s.id_features}, **x["sparse"]} for x in samples]
        keep = s.history_lengths
        sequence_rows = [
            {"item_id": [x["item_id"]], **{k: v[-keep[k] :] for k, v in x["history"].items()}}
            for x in samples
        ]
        n_img, size = s.images_per_sample, s.image_size
        # [B, N, 3, H, W]: each decoded [H, W, 3] image is transposed as it is copied in (one pass over the pixels;
        # a permute of the whole uint8 batch afterwards costs twice as much).
        decoded_here = any(isinstance(p, np.ndarray) for x in samples for p in x["images"][:n_img])
        if not s.pixels or (s.jpeg_on_device and not decoded_here):
            size = 0  # nothing to copy across the worker queue and to the device
        images = np.zeros((len(samples), n_img, 3, size, size), dtype=np.uint8)
        image_mask = np.zeros((len(samples), n_img), dtype=bool)
        jpegs: list[tuple[int, int, EncodedJpeg]] = []
        for i, x in enumerate(samples):
            for j, pixels in enumerate(x["images"][:n_img]):
                image_mask[i, j] = True
                if isinstance(pixels, EncodedJpeg):
                    jpegs.append((i, j, pixels))
                elif pixels is not None and s.pixels:  # None: present, not decoded (the cache serves it)
                    images[i, j] = pixels.transpose(2, 0, 1)

        def column(name: str, dtype: torch.dtype) -> torch.Tensor:
            return torch.tensor([x[name] for x in samples], dtype=dtype)

        text, packed_text = self.item_text(samples)
        valid_rows = valid if valid is not None else [True] * len(samples)
        sparse, sequences = jagged(s.pooled_keys, pooled_rows), jagged(s.sequence_keys, sequence_rows)
        raw_histories = None
        if s.raw_histories:
            # the histories follow the target item (one id per sample) in the key-major values
            n = len(samples)
            per_key = sequences.length_per_key()[1:]
            raw_histories = keyed(s.sequences, sequences.values()[n:], sequences.lengths()[n:], n, per_key)
        if s.table_rows is not None:
            sparse = hash_kjt(sparse, s.table_rows)
            vocab = s.id_vocab
            sequences = vocab.map_kjt(sequences) if vocab is not None else hash_kjt(sequences, s.table_rows)
        return Batch(
            sparse=sparse,
            sequences=sequences,
            dense=rows_of([x["dense"] for x in samples], len(s.dense)),
            text=text,
            packed_text=packed_text,
            query=self.query_tokens([x["query"] for x in samples]) if s.query_tokens else None,
            images=torch.from_numpy(images),
            image_mask=torch.from_numpy(image_mask),
            labels=rows_of([x["labels"] for x in samples], s.num_labels),
            user_id=column("user_id", torch.int64),
            item_id=column("item_id", torch.int64),
            query_id=column("query_id", torch.int64),
            session_id=column("session_id", torch.int64),
            timestamp=column("timestamp", torch.int64),
            cold=column("cold", torch.bool),
            valid=torch.tensor(valid_rows, dtype=torch.bool),
            raw_histories=raw_histories,
            known_item_ids=self.known_item_ids(samples, valid_rows),
            encoded_images=encoded_images(jpegs, s.image_size, s.bad_input) if jpegs else None,
        )


def encoded_images(jpegs: list[tuple[int, int, EncodedJpeg]], size: int, policy: str) -> EncodedImages:
    """(row, slot, JPEG) triples -> `EncodedImages`: the bytes back to back in one uint8 tensor, with offsets."""
    lengths = np.fromiter((len(j.data) for _, _, j in jpegs), np.int64, len(jpegs))
    offsets = np.zeros(len(jpegs) + 1, dtype=np.int64)
    np.cumsum(lengths, out=offsets[1:])
    data = np.frombuffer(b"".join(j.data for _, _, j in jpegs), dtype=np.uint8).copy()  # writable, for torch
    slots = np.array([(i, k) for i, k, _ in jpegs], dtype=np.int64).reshape(len(jpegs), 2)
    return EncodedImages(
        data=torch.from_numpy(data),
        offsets=torch.from_numpy(offsets),
        slots=torch.from_numpy(slots),
        size=size,
        sources=[(j.shard, j.key, j.field) for _, _, j in jpegs],
        policy=policy,
    )


def pack_text(fields: list[tuple[np.ndarray, np.ndarray]], buckets: int) -> PackedText:
    """Token ids and masks [B, budget] per field -> `PackedText`: every row's real tokens left-packed in field order
    (a stable sort of the columns by "is padding"), rows sorted by length and cut into `buckets` equal parts, each
    as wide as its longest row (rounded up to PAD_MULTIPLE)."""
    ids = np.concatenate([f[0] for f in fields], axis=1)
    mask = np.concatenate([f[1] for f in fields], axis=1).astype(bool)
    types = np.concatenate([np.full(f[0].shape, i, dtype=np.int64) for i, f in enumerate(fields)], axis=1)
    columns = np.argsort(~mask, axis=1, kind="stable")
    ids, mask, types = (np.take_along_axis(a, columns, axis=1) for a in (ids, mask, types))
    lengths = mask.sum(1)
    rows = np.argsort(lengths, kind="stable")
    out = []
    for part in np.array_split(rows, min(buckets, len(rows)) or 1):
        longest = int(lengths[part].max()) if len(part) else 1
        width = min(ids.shape[1], -(-max(longest, 1) // PAD_MULTIPLE) * PAD_MULTIPLE)
        out.append(
            tuple(
                torch.from_numpy(np.ascontiguousarray(a[part, :width]))
                for a in (ids, mask.astype(np.int64), types)
            )
        )
    return PackedText(torch.from_numpy(rows.astype(np.int64)), out)  # type: ignore[arg-type]
