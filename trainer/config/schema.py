"""The one config tree. Every field has a docstring-style comment; `validate()` names the bad field and why.

Presets live in `presets/*.toml`; a file or preset is loaded first, then `--set a.b=c` overrides (see loader.py).
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from typing import Any

from embeddings.registry import FUSED_OPTIMIZERS, SHARDING_TYPES, Registry
from trainer.config.registry import FUSIONS, RANKERS


class ConfigError(ValueError):
    """A config value is wrong; the message names the dotted field and the reason."""


def check(condition: bool, name: str, why: str) -> None:
    if not condition:
        raise ConfigError(f"{name}: {why}")


def check_choice(value: str, name: str, registry: Registry) -> None:
    check(value in registry, name, f"must be one of {', '.join(registry.names)} (got {value!r})")


@dataclass
class SynthConfig:
    """`lemur data synth`: the generated dataset's shape. Defaults are the `tiny` preset's."""

    num_users: int = 300
    """Distinct users."""
    num_items: int = 800
    """Distinct items (documents) in the catalog."""
    num_samples: int = 12_000
    """Impressions in total (train + eval)."""
    num_topics: int = 8
    """Latent topics; they show in items' text, images and categorical ids, and in users' interests."""
    num_categories: int = 16
    """Category ids; each topic owns a few, so category is a coarse, noisy view of the topic."""
    num_authors: int = 60
    """Author ids; each author writes mostly on one topic."""
    eval_share: float = 0.2
    """Share of the timeline (the last part) that becomes the eval split."""
    cold_item_share: float = 0.1
    """Static world: share of items that never appear in training (targets or histories); only content can score
    them. The churn world ignores it: there, its fresh items are the cold ones."""
    world: str = "static"
    """static: a fixed catalog and Zipf popularity over the whole log, a `cold_item_share` held out of training.
    churn: items are born over the timeline (`new_items_per_day`), their popularity decays with age
    (`item_lifetime_days`), histories hold what was fresh when it was clicked; eval (the end of the log) so shows
    many items with few or no training impressions, and `cold` marks exactly those in no training sample (target
    or history). `trainer/dataset_tools/synth/world.py` says more."""
    new_items_per_day: float = 0.02
    """Churn world: share of the catalog born each day, at a steady rate up to the log's end (so the oldest items
    were born 1 / new_items_per_day days before it; new_items_per_day x days must stay below 1)."""
    item_lifetime_days: float = 3.0
    """Churn world: an item's popularity decays as exp(-age / item_lifetime_days) after its birth."""
    popularity_exponent: float = 0.9
    """Item popularity is Zipf, rank^-a, ranks shuffled over the items (the long tail). The static world samples
    impressions and history clicks by its square root, the churn world by it times the age decay."""
    samples_per_shard: int = 2_000
    """Impressions per tar shard; shards of one split hold equal counts but for the last."""
    images_per_item: int = 1
    """JPEG images per item (0: text only, as in the LEMUR paper)."""
    image_size: int = 64
    """Side of the rendered square JPEGs, in pixels."""
    short_history: int = 20
    """Length of the short user-history sequence (most recent clicks)."""
    long_history: int = 100
    """Maximum length of the long user-history sequence (the papers go to 1,000)."""
    search: bool = True
    """Generate the search scenario: raw queries, query ids and sessions."""
    impressions_per_request: int = 6
    """Items shown per request (one query, one session); SQDC and QAUC need several."""
    days: int = 30
    """Span of the log in days; timestamps are seconds."""
    workers: int = 0
    """Processes used to write shards (0: all cores)."""
    seed: int = 0
    """Everything generated is a function of this seed."""
    record_format: str = "binary"
    """binary: each sample a `.rec` record (`trainer/data/record.py`: int64 id arrays, read without parsing);
    json: the older `.json` record (human-readable, ~4x slower to read). The reader takes either."""

    def validate(self, p: str) -> None:
        check(self.record_format in ("binary", "json"), f"{p}.record_format", "must be binary or json")
        for name in ("num_users", "num_items", "num_samples", "num_topics", "samples_per_shard", "days"):
            check(getattr(self, name) > 0, f"{p}.{name}", "must be > 0")
        check(self.num_categories >= self.num_topics, f"{p}.num_categories", "must be >= num_topics")
        check(self.num_authors >= self.num_topics, f"{p}.num_authors", "must be >= num_topics")
        check(0.0 < self.eval_share < 1.0, f"{p}.eval_share", "must be in (0, 1)")
        check(0.0 <= self.cold_item_share < 0.9, f"{p}.cold_item_share", "must be in [0, 0.9)")
        check(0 <= self.images_per_item <= 8, f"{p}.images_per_item", "must be in [0, 8]")
        check(16 <= self.image_size <= 1024, f"{p}.image_size", "must be in [16, 1024]")
        check(
            1 <= self.short_history <= self.long_history, f"{p}.short_history", "must be in [1, long_history]"
        )
        check(self.long_history <= 10_000, f"{p}.long_history", "must be <= 10000")
        check(self.impressions_per_request >= 1, f"{p}.impressions_per_request", "must be >= 1")
        check(self.workers >= 0, f"{p}.workers", "must be >= 0")
        check(self.world in ("static", "churn"), f"{p}.world", "must be static or churn")
        if self.world == "churn":
            check(
                0.0 < self.new_items_per_day * self.days < 1.0,
                f"{p}.new_items_per_day",
                "must be > 0 with new_items_per_day x days < 1 (items must exist when the log starts)",
            )
            check(0.1 <= self.item_lifetime_days <= 1e4, f"{p}.item_lifetime_days", "must be in [0.1, 10000]")
        check(0.0 <= self.popularity_exponent <= 3.0, f"{p}.popularity_exponent", "must be in [0, 3]")


@dataclass
class DataConfig:
    """Where the shards are and how the reader turns them into batches."""

    path: str = "outputs/data"
    """Dataset directory (train-*.tar, eval-*.tar, items.parquet, dataset.json)."""
    train_shards: str = ""
    """Shard list for training: paths, a brace pattern or `pipe:` URL; empty = DIR/train-*.tar."""
    eval_shards: str = ""
    """Shard list for evaluation; empty = DIR/eval-*.tar."""
    batch_size: int = 64
    """Samples per batch on each rank."""
    num_workers: int = 0
    """DataLoader worker processes per rank (0: read in the training process)."""
    shuffle_buffer: int = 1_000
    """Samples held in the shuffle buffer of each reader (0: no sample shuffling)."""
    image_size: int = 64
    """Images are decoded and resized to this square side."""
    images_per_sample: int = 1
    """Images per sample in the batch (missing ones are zero and masked)."""
    image_decode: str = "auto"
    """Where JPEGs are decoded: `cpu` (PIL in the reader's workers, `draft` decoding then a bilinear resize),
    `device` (the workers only check each JPEG's header and ship its bytes; `Trainer.to_device` decodes the batch
    in one batched torchvision `decode_jpeg` call on the training device, nvJPEG on a GPU, and resizes there:
    `trainer/data/device_decode.py`), or `auto` (device when the batches go to a CUDA device and torchvision
    decodes JPEG there, else cpu). PNGs, and JPEGs other than 8-bit baseline grey or YCbCr (progressive, CMYK),
    are decoded in the workers either way. The two paths give the same pixels within a stated tolerance
    (device_decode.TOLERANCE); a JPEG that only the device finds broken makes its row invalid (`Batch.valid`) and
    counts as `bad_image`, or stops the run under bad_input = error."""
    tokenizer: str = ""
    """A local Hugging Face fast-tokenizer directory; empty = DIR/tokenizer, trained from the dataset if absent."""
    vocab_size: int = 8_000
    """Vocabulary size when the tokenizer is trained from the dataset's text."""
    bad_input: str = "error"
    """What a bad sample does: `error` stops naming shard, key and field; `skip` drops and counts it."""
    max_text_chars: int = 4_000
    """A text field longer than this is bad input (tokens are truncated per field; this guards memory)."""
    text_buckets: int = 0
    """> 0: the reader also packs the target items' text (real tokens only, rows sorted by length into this many
    buckets, each padded to its own longest row) and the content encoder runs bucket by bucket wherever it encodes
    every row of a batch: the same function, without the work on padding. 0: the padded fields (the reference).
    Measured on one H200 at the lemur shapes (eager: that run's compile fell back after step 2, see
    benchmarks/README.md): 4 buckets made the step slower (73 -> 93 ms without the bank), as it is bound by kernel
    launches there and each bucket launches the towers again; it pays where tower FLOPs bound the step (long,
    unevenly filled texts; big towers). Not measured with the blocks really compiled."""
    seed: int = 0
    """Seeds shard order and the shuffle buffer (with the epoch, rank and worker)."""
    synth: SynthConfig = field(default_factory=SynthConfig)

    def validate(self, p: str) -> None:
        check(self.batch_size > 0, f"{p}.batch_size", "must be > 0")
        check(self.num_workers >= 0, f"{p}.num_workers", "must be >= 0")
        check(self.shuffle_buffer >= 0, f"{p}.shuffle_buffer", "must be >= 0")
        check(16 <= self.image_size <= 1024, f"{p}.image_size", "must be in [16, 1024]")
        check(0 <= self.images_per_sample <= 8, f"{p}.images_per_sample", "must be in [0, 8]")
        check(
            self.image_decode in ("cpu", "device", "auto"),
            f"{p}.image_decode",
            "must be 'cpu', 'device' or 'auto'",
        )
        check(self.vocab_size >= 100, f"{p}.vocab_size", "must be >= 100")
        check(self.bad_input in ("error", "skip"), f"{p}.bad_input", "must be 'error' or 'skip'")
        check(self.max_text_chars > 0, f"{p}.max_text_chars", "must be > 0")
        check(self.text_buckets >= 0, f"{p}.text_buckets", "must be >= 0")
        self.synth.validate(f"{p}.synth")


@dataclass
class TowerConfig:
    """A transformers encoder built from a config (random init) or loaded from a local directory."""

    pretrained: str = ""
    """Local directory of saved weights; empty = build from the fields below (no download ever happens)."""
    layers: int = 2
    """Transformer layers."""
    hidden: int = 64
    """Hidden size."""
    heads: int = 2
    """Attention heads."""
    trainable_top_layers: int = -1
    """-1: train every layer; k >= 0: freeze all but the top k layers (EM3 freezes single-modal encoders)."""

    @property
    def has_frozen_bottom(self) -> bool:
        """Some blocks never train (a pretrained checkpoint's depth is known only once loaded)."""
        return self.trainable_top_layers >= 0 and (
            bool(self.pretrained) or self.trainable_top_layers < self.layers
        )

    def validate(self, p: str) -> None:
        check(self.layers > 0, f"{p}.layers", "must be > 0")
        check(self.hidden > 0 and self.heads > 0, f"{p}.hidden", "hidden and heads must be > 0")
        check(self.hidden % self.heads == 0, f"{p}.hidden", f"must be divisible by heads ({self.heads})")
        check(self.trainable_top_layers >= -1, f"{p}.trainable_top_layers", "must be >= -1")


@dataclass
class ModelConfig:
    """Towers, fusion and ranker."""

    text_fields: list[str] = field(default_factory=list)
    """Item text fields the document tower reads (concatenated, with a segment embedding per field); empty: the
    dataset's own text fields, in dataset.json's order (`trainer/data/text_fields.py`)."""
    text_max_tokens: list[int] = field(default_factory=list)
    """Token budget per text field, in the order of text_fields; empty: text_budgets by field name, else derived from
    the field's token counts in items.parquet (95th percentile). LEMUR: title 31, OCR 124, ASR 12, cover OCR 12."""
    text_budgets: dict[str, int] = field(default_factory=dict)
    """Token budget by field name, for the fields text_max_tokens does not give (presets name theirs here, so a
    dataset with other fields gets budgets derived from its own text)."""
    query_max_tokens: int = 10
    """Token budget of the raw query (LEMUR: max 10)."""
    use_content: bool = True
    """Encode the target item's raw content (and the query) end to end; False = the ID-only baseline."""
    use_images: bool = True
    """Feed item images to the vision tower (EM3); False = text only (LEMUR)."""
    text_tower: TowerConfig = field(default_factory=TowerConfig)
    query_tower: TowerConfig = field(default_factory=lambda: TowerConfig(layers=1))
    vision_tower: TowerConfig = field(default_factory=TowerConfig)
    patch_size: int = 16
    """ViT patch size."""
    fusion: str = "fqformer"
    """How text and image tokens become one content vector: fqformer, masked_fqformer, 1flow, 2flow
    (`trainer/config/registry.py`: FUSIONS)."""
    fusion_queries: int = 4
    """Fusion-Q-Former: learnable queries Q put in front of the single-modal tokens."""
    fusion_layers: int = 1
    """Fusion-Q-Former Transformer layers."""
    content_dim: int = 32
    """Size of the content (query and document) representation; LEMUR uses 128."""
    max_history: dict[str, int] = field(default_factory=dict)
    """Per history sequence, keep only its most recent N items (e.g. {long_history = 128}); unset = the
    dataset's length."""
    history_encoder: str = "mean"
    """How each user-history sequence becomes features: mean (pooled ID embeddings, the DLRM-style baseline) or
    longer (LEMUR's LONGER-style target-attention decoder: a query token built from the other features
    cross-attends over the history, no self-attention over it)."""
    longer_layers: int = 1
    """LONGER decoder layers (cross-attention + FFN each)."""
    longer_heads: int = 2
    """LONGER attention heads."""
    similarity_top_k: int = 8
    """LEMUR's similarity module (with the memory bank): cosines of the target's and the history's content
    vectors, the most recent k in sequence order and the k largest, per history (0: off)."""
    no_content_histories: list[str] = field(default_factory=list)
    """With memory_bank.enabled: histories whose tokens carry NO content vector (ID embedding only) and get no
    similarity features; LEMUR's "no short / no long multimodal sequence" ablations."""
    stop_gradient: bool = False
    """Stop the ranking loss's gradient into the content and query encoders (their vectors are detached where the
    ranker, the history tokens and the similarity module read them); only SQDC / CIC train the encoders then.
    LEMUR's "stop-gradient into the Transformer" ablation."""
    freeze_content: bool = False
    """Freeze the content and query encoders (no gradient, not in the optimizer): the second stage of the
    two-stage baseline, usually with content_init."""
    content_init: str = ""
    """Initialise the content and query encoders from an `encoder.pt` written by a run with
    training.objective = "contrastive" (the two-stage baseline's first stage)."""
    cic_features: list[str] = field(default_factory=lambda: ["item_id", "category", "author"])
    """EM3's CIC: the ID embeddings concatenated into the item's ID vector (item_id and pooled id features)."""
    cic_dim: int = 32
    """CIC: size of the content and ID projection heads' outputs."""
    item_id_dropout: float = 0.0
    """Cold start: > 0 gives the model a learned "new item" embedding that stands in for the target's item-ID
    embedding in the ranker's input, for a random share p of the rows in training and for every item absent from
    training in eval and serving, whose ID row never trained (the dataset's `cold` flag; the counts instead with
    id_gate_count). The model so learns to score an item from its content and its other features alone. 0: off (the
    ID embedding always)."""
    id_gate_count: int = 0
    """Cold start, gating by ID frequency (k): the dense arch counts each item-table row's impressions as a training
    target (n, a buffer replicated on every rank and saved with the dense weights), and the ranker reads
    g * ID embedding + (1 - g) * the learned new-item embedding, g = n / (n + k): a rarely seen item leans on the
    new-item embedding (its content and other features make up the rest), a frequent one on its own ID. In eval and
    serving an item whose row has n = 0 never trained and reads the new-item embedding alone (the dataset's `cold`
    flag is then only for the metrics). Counts are per table row: an unseen id that the hash puts on a trained id's
    row reads that row. Combines with item_id_dropout (dropped rows read the new-item embedding). 0: off."""
    id_gate_history: str = "gate"
    """With id_gate_count > 0, the history tokens' ID embeddings: gate (the target's g per token), cold (the new-item
    embedding for items with n = 0, the ID row otherwise) or off (the ID rows as they are)."""
    ranker: str = "rankmixer"
    """rankmixer or dlrm_mlp (the papers' baseline); `trainer/config/registry.py`: RANKERS."""
    ranker_tokens: int = 8
    """RankMixer: features are split into this many tokens."""
    ranker_layers: int = 2
    """RankMixer blocks (token mixing, then per-token FFN)."""
    ranker_hidden: int = 64
    """Per-token width in RankMixer / MLP width in DLRM-MLP."""
    frozen_cache: bool = False
    """EM3's frozen-feature cache: with a tower's trainable_top_layers = k >= 0, compute its frozen bottom (the
    embeddings and all but the top k blocks) once per item of items.parquet before training, keep the outputs
    (frozen_cache_placement) and run only the top k blocks in a step (`trainer/models/frozen_cache.py`; the same
    losses as without it). Memory: items x tokens (text) or images x patches (vision) x hidden x dtype bytes, on
    every rank."""
    frozen_cache_placement: str = "device"
    """Where the frozen-feature cache's tables live. device: on every rank's device, a step gathers its rows there.
    host: in host memory (per rank, or per host: frozen_cache_share); each batch's rows are gathered there as it is moved to the device (on the
    prefetch thread, beside the step) and travel with it, so the device holds a batch's rows only, for a copy of
    them per step (at em3's 224 px, ~0.2 MB per item)."""
    frozen_cache_share: bool = True
    """With frozen_cache_placement = host and several local ranks (torchrun's LOCAL_WORLD_SIZE): local rank 0 builds
    one host copy in files under /dev/shm that the host's other ranks map instead of building their own (host memory:
    one table per host, not per rank); the names are removed once every rank has mapped them. Off: a copy per rank."""

    def validate(self, p: str) -> None:
        check(
            not (self.text_fields and self.text_max_tokens)
            or len(self.text_max_tokens) == len(self.text_fields),
            f"{p}.text_max_tokens",
            f"needs one budget per text field ({len(self.text_fields)})",
        )
        check(all(t > 0 for t in self.text_max_tokens), f"{p}.text_max_tokens", "budgets must be > 0")
        check(all(t > 0 for t in self.text_budgets.values()), f"{p}.text_budgets", "budgets must be > 0")
        check(self.query_max_tokens > 0, f"{p}.query_max_tokens", "must be > 0")
        for name in ("text_tower", "query_tower", "vision_tower"):
            getattr(self, name).validate(f"{p}.{name}")
        check_choice(self.fusion, f"{p}.fusion", FUSIONS)
        check(self.fusion_queries > 0, f"{p}.fusion_queries", "must be > 0")
        check(self.content_dim > 0, f"{p}.content_dim", "must be > 0")
        check_choice(self.ranker, f"{p}.ranker", RANKERS)
        check(all(n > 0 for n in self.max_history.values()), f"{p}.max_history", "lengths must be > 0")
        check(self.cic_dim > 0, f"{p}.cic_dim", "must be > 0")
        check(0.0 <= self.item_id_dropout < 1.0, f"{p}.item_id_dropout", "must be in [0, 1)")
        check(self.id_gate_count >= 0, f"{p}.id_gate_count", "must be >= 0 (0: off)")
        check(
            self.id_gate_history in ("gate", "cold", "off"),
            f"{p}.id_gate_history",
            "must be gate, cold or off",
        )
        check(len(self.cic_features) > 0, f"{p}.cic_features", "needs at least one feature")
        check(
            not (self.freeze_content and self.stop_gradient),
            f"{p}.stop_gradient",
            "pointless with freeze_content (frozen encoders get no gradient at all)",
        )
        check(self.history_encoder in ("mean", "longer"), f"{p}.history_encoder", "must be mean or longer")
        check(
            self.longer_layers > 0 and self.longer_heads > 0,
            f"{p}.longer_layers",
            "layers and heads must be > 0",
        )
        check(
            self.ranker_tokens > 0 and self.ranker_layers > 0, f"{p}.ranker_tokens", "tokens and layers > 0"
        )
        towers = [self.text_tower, *([self.vision_tower] if self.use_images else [])]
        check(
            not self.frozen_cache or (self.use_content and any(t.has_frozen_bottom for t in towers)),
            f"{p}.frozen_cache",
            "needs use_content and a content tower with a frozen bottom (0 <= trainable_top_layers < layers)",
        )
        check(
            self.frozen_cache_placement in ("device", "host"),
            f"{p}.frozen_cache_placement",
            "must be device or host",
        )


@dataclass
class EmbeddingsConfig:
    """TorchRec ID tables."""

    dim: int = 16
    """Embedding dimension of every ID table."""
    hash_size: int = 100_003
    """Raw int64 ids are hashed into this many rows per table (per feature overrides: hash_sizes)."""
    hash_sizes: dict[str, int] = field(default_factory=dict)
    """Per-feature row counts, e.g. {item_id = 1000003}."""
    id_map: str = "hash"
    """How item ids become item-table rows (the target item_id and the histories, which share that table; the other
    features are always hashed). hash: hashed like every feature, so ids collide, and an item absent from training
    can land on a row a training item trained (27% of the churn world's cold eval rows), which the ID-frequency gate
    then reads as known. vocab: every item id of the train split (targets and history items) gets a row of its own
    and every other id one reserved row that nothing trains, so eval and serving read ids absent from training as
    new items (gate count 0). The vocabulary is built once per dataset from the train shards and cached beside it
    (`trainer/data/id_vocab.py`); the train ids must fit the item table with the reserved row, else the run stops
    with the counts (raise hash_sizes.item_id)."""
    sharding_types: list[str] = field(default_factory=lambda: ["table_wise", "row_wise", "column_wise"])
    """Sharding types the planner may choose (`embeddings/registry.py`: SHARDING_TYPES; data_parallel is refused:
    see the README). On CPU only table_wise, column_wise and table_column_wise apply."""
    compute_kernel: str = "fused"
    """TorchRec compute kernel, always with the optimizer fused into backward: fused (tables in device memory),
    fused_uvm_caching (GPU: UVM-backed tables with an HBM cache), fused_uvm."""
    optimizer: str = "rowwise_adagrad"
    """Fused sparse optimizer: rowwise_adagrad, adagrad, adam, sgd (`embeddings/registry.py`: FUSED_OPTIMIZERS)."""
    lr: float = 0.05
    """Sparse learning rate."""

    def validate(self, p: str) -> None:
        check(self.dim > 0, f"{p}.dim", "must be > 0")
        check(self.hash_size > 0, f"{p}.hash_size", "must be > 0")
        check(all(v > 0 for v in self.hash_sizes.values()), f"{p}.hash_sizes", "sizes must be > 0")
        check(self.id_map in ("hash", "vocab"), f"{p}.id_map", f"must be hash or vocab (got {self.id_map!r})")
        check(
            "data_parallel" not in self.sharding_types,
            f"{p}.sharding_types",
            "data_parallel is refused: DDP is off (DeepSpeed owns the dense part), so nothing would all-reduce "
            "a data-parallel table's gradients",
        )
        bad = [t for t in self.sharding_types if t not in SHARDING_TYPES]
        check(not bad, f"{p}.sharding_types", f"unknown {bad}; allowed: {SHARDING_TYPES.names}")
        check(bool(self.sharding_types), f"{p}.sharding_types", "needs at least one sharding type")
        check(
            self.compute_kernel in ("fused", "fused_uvm_caching", "fused_uvm"),
            f"{p}.compute_kernel",
            "must be fused, fused_uvm_caching or fused_uvm",
        )
        check_choice(self.optimizer, f"{p}.optimizer", FUSED_OPTIMIZERS)
        check(self.lr > 0, f"{p}.lr", "must be > 0")


@dataclass
class MemoryBankConfig:
    """LEMUR's bank of item content vectors, row-sharded across ranks."""

    enabled: bool = False
    """History tokens carry the items' content vectors (ID embedding ⊕ content) and the similarity module runs;
    `mode` says where the vectors come from. Needs model.use_content (an error otherwise)."""
    mode: str = "bank"
    """bank: LEMUR's memory bank (history vectors read by id, no encoder run for them); recompute: the naive
    end-to-end baseline, every history item re-encoded from raw content at every step, with gradient (it holds the
    whole item catalog in memory)."""
    capacity: int = 0
    """Rows over all ranks (a direct-mapped cache: colliding ids evict each other, so at n items in r rows about
    n/2r of them miss); 0 = 8x the dataset's item cardinality (about 6% of the items collide)."""
    dtype: str = "bfloat16"
    """Storage dtype of the bank: bfloat16 or float32."""
    max_staleness: int = 1
    """Reads in step t see every write of steps <= t - max_staleness."""
    forward_share: float = 1.0
    """Encoder sampling, share p: the targets of ceil(p·n) of a batch's n samples run the encoder (and are
    written to the bank); the others read their vectors from the bank (zeros on a miss). LEMUR deploys 0.2."""
    backward_share: float = 1.0
    """Encoder sampling, share q <= p: ceil(q·n) of the encoded targets keep their gradient into the encoder."""
    join_gradient: bool = False
    """Dedup join: let the ranking loss's gradient flow through the fresh vectors that replaced cached history
    entries (this rank's; gathered ones from other ranks stay detached)."""
    warm_up: bool = False
    """Before the first step of a fresh run, encode every item of items.parquet (each rank a share) into the
    bank, so the first steps' histories are not empty."""

    def validate(self, p: str) -> None:
        check(self.dtype in ("bfloat16", "float32"), f"{p}.dtype", "must be bfloat16 or float32")
        check(self.capacity >= 0, f"{p}.capacity", "must be >= 0")
        check(self.max_staleness >= 1, f"{p}.max_staleness", "must be >= 1")
        check(self.mode in ("bank", "recompute"), f"{p}.mode", "must be bank or recompute")
        check(
            self.mode == "bank" or (self.forward_share == 1.0 and self.backward_share == 1.0),
            f"{p}.forward_share",
            "encoder sampling needs the bank (mode = 'recompute' encodes every target)",
        )
        check(self.mode == "bank" or not self.warm_up, f"{p}.warm_up", "only with mode = 'bank'")
        check(0.0 < self.forward_share <= 1.0, f"{p}.forward_share", "must be in (0, 1]")
        check(
            0.0 <= self.backward_share <= self.forward_share,
            f"{p}.backward_share",
            "must be in [0, forward_share]",
        )


@dataclass
class LoraConfig:
    """EM3's LoRA for long sequences: phase 1 trains the sequence model (the LONGER decoders) on short histories;
    from `phase2_start` on, its weights are frozen and LoRA adapters on its linear layers train on the full
    histories, while the rest of the model keeps training. The dense optimizer and LR schedule restart at the
    boundary (a new stage: the set of trained parameters changes). Checkpoints carry the phase."""

    rank: int = 0
    """Adapter rank (0: off, one phase)."""
    alpha: float = 8.0
    """Adapter scale alpha / rank."""
    phase2_start: int = 0
    """First step of phase 2 (needs rank > 0)."""
    short_history: dict[str, int] = field(default_factory=dict)
    """Phase 1 history lengths (the most recent N), e.g. {long_history = 20}; unset ones keep their length."""

    def validate(self, p: str) -> None:
        check(self.rank >= 0, f"{p}.rank", "must be >= 0")
        check(self.alpha > 0, f"{p}.alpha", "must be > 0")
        check(self.phase2_start >= 0, f"{p}.phase2_start", "must be >= 0")
        check(self.rank > 0 or self.phase2_start == 0, f"{p}.phase2_start", "needs lora.rank > 0")
        check(self.rank == 0 or self.phase2_start > 0, f"{p}.rank", "needs lora.phase2_start > 0")
        check(all(n > 0 for n in self.short_history.values()), f"{p}.short_history", "lengths must be > 0")


@dataclass
class OptimizerConfig:
    """The dense optimizer (DeepSpeed) and its schedule."""

    name: str = "adamw"
    """adamw or sgd."""
    lr: float = 1e-3
    """Peak learning rate."""
    weight_decay: float = 0.0
    """Decoupled weight decay."""
    warmup_steps: int = 20
    """Linear warm-up steps."""
    schedule: str = "cosine"
    """After warm-up: constant, linear or cosine decay to min_lr_ratio * lr."""
    min_lr_ratio: float = 0.1
    """Final learning rate as a share of lr."""
    fused: bool = True
    """torch's fused AdamW / SGD kernel where the parameters' device has one (CUDA, CPU): one kernel updates every
    tensor instead of a dozen a tensor, and the step counter stays on the device (no host sync). False: the
    per-tensor loop, the reference."""
    lr_multipliers: dict[str, float] = field(default_factory=dict)
    """Per part of the dense arch, a factor on lr (and so on its whole schedule): keys are parameter-name prefixes
    of the dense arch, the longest match wins, e.g. {"content.text" = 0.05, query = 0.05} for pretrained text
    towers next to a fresh ranker. Parts: content.text, content.vision, content.fusion, query, ranker, decoders,
    query_token, dense_proj, cic. A key that names no parameter is an error."""

    def validate(self, p: str) -> None:
        check(self.name in ("adamw", "sgd"), f"{p}.name", "must be adamw or sgd")
        check(all(f > 0 for f in self.lr_multipliers.values()), f"{p}.lr_multipliers", "factors must be > 0")
        check(self.lr > 0, f"{p}.lr", "must be > 0")
        check(self.weight_decay >= 0, f"{p}.weight_decay", "must be >= 0")
        check(self.warmup_steps >= 0, f"{p}.warmup_steps", "must be >= 0")
        check(
            self.schedule in ("constant", "linear", "cosine"), f"{p}.schedule", "constant, linear or cosine"
        )
        check(0.0 <= self.min_lr_ratio <= 1.0, f"{p}.min_lr_ratio", "must be in [0, 1]")


@dataclass
class TrainingConfig:
    """The loop."""

    steps: int = 200
    """Optimizer steps."""
    grad_accum: int = 1
    """Micro-batches per optimizer step. Only 1 for now: the fused sparse optimizer updates the tables in every
    backward, so accumulation would apply the sparse part GAS times with 1/GAS-scaled gradients."""
    grad_clip: float = 1.0
    """Clip the dense gradients' global norm (0: off)."""
    eval_every: int = 100
    """Evaluate every N steps (0: only at the end)."""
    checkpoint_every: int = 100
    """Checkpoint every N steps (0: only at the end)."""
    dtype: str = "float32"
    """Compute dtype of the dense part: float32 or bfloat16 (fp16 is refused: its loss scale leaks into fused sparse updates)."""
    bf16_mode: str = "weights"
    """How bfloat16 applies (dtype = bfloat16). weights: the dense weights are bf16 and DeepSpeed's ZeRO optimizer
    keeps fp32 masters (and, with overflow_check, checks every gradient a step). autocast: the weights stay fp32 and
    the step runs under torch.autocast (DeepSpeed's torch_autocast): matmuls and attention in bf16, norms and
    reductions in fp32, and the optimizer updates the weights directly (no master copy, no per-tensor casts)."""
    overflow_check: bool = False
    """With bf16_mode = weights: DeepSpeed's per-step check of every gradient for inf/NaN, skipping such a step. It
    costs about six kernels a parameter tensor and a host sync a step (on one H200 it took the lemur step from 74
    to 124 ms). Either way the trainer keeps every step's loss on the device and, at each log and checkpoint step,
    stops on an inf/NaN loss naming its step, before any checkpoint is written."""
    on_nonfinite: str = "stop"
    """What an inf/NaN training loss does once it is seen, at the next log or checkpoint step (the loss is never
    read per step): stop (naming the step; no checkpoint is written after it) or rollback (load the last checkpoint's
    weights, optimizer state, bank and RNG but keep the reader where it is, so the batches since the checkpoint are
    skipped, and go on; at most max_rollbacks times in a run, then stop)."""
    max_rollbacks: int = 3
    """With on_nonfinite = rollback: rollbacks a run may make before it stops."""
    prefetch: bool = True
    """Pipelined input: the next batch is read and moved to the device (on a side CUDA stream, from a thread of
    its own on CUDA, so the JPEG decode of data.image_decode = device runs beside the step) while this one trains
    (`trainer/data/prefetch.py`); the checkpointed reader state leaves the batch in flight unconsumed. Off: each
    batch is read and moved when its step begins (the reference)."""
    gc_every: int = 50
    """Python's automatic garbage collection is off while the loop trains, and the young generations are collected
    every N steps (a full collection every 20th time; `trainer/collector.py`), as torchtitan's gc_freq: collections
    come at the same steps on every rank instead of whenever a rank's allocation count says, where one rank's pause
    holds up all the others at the next collective. 0: Python's automatic collection."""
    compile: bool = False
    """torch.compile the dense arch's blocks (content and query towers with the fusion, LONGER decoders, ranker):
    fewer, fused kernels; the first steps pay the compile time. Off: eager, the reference path."""
    compile_mode: str = "default"
    """torch.compile's mode for those blocks: default, reduce-overhead (each block replayed as a CUDA graph: one
    launch instead of its hundreds; a step begins with `cudagraph_mark_step_begin`, and a block whose inputs change
    shape records a graph per shape) or max-autotune-no-cudagraphs (benchmarks each matmul's kernels at compile)."""
    compile_scope: str = "blocks"
    """What training.compile compiles: blocks (the towers, LONGER decoders, similarity module and ranker, each on
    its own) or dense (the dense arch's whole forward as one graph, so the glue between the blocks, the history
    joins, the context concatenation and the cosines, fuses as well; the content tower also on its own, for the
    memory bank, which runs it outside that forward)."""
    seed: int = 0
    """Seeds model init and everything random in the loop."""
    sqdc_weight: float = 0.0
    """λ of the SQDC loss (0: off)."""
    sqdc_temperature: float = 50.0
    """T of SQDC (LEMUR: 50)."""
    sqdc_session_mask: bool = True
    """SQDC never uses other samples of the same query as negatives; False = the plain in-batch contrastive loss."""
    cic_weight: float = 0.0
    """Weight of EM3's CIC (content-ID contrastive) loss (0: off; EM3's code 1e-3, a reimplementation 0.1)."""
    cic_temperature: float = 0.2
    """CIC temperature (divides the cosine; EM3: 0.1-0.5)."""
    objective: str = "ranking"
    """ranking: BCE (+ the weighted contrastive losses); contrastive: only the contrastive losses (SQDC, CIC),
    the first stage of the two-stage baseline, which writes the encoders to `encoder.pt` in the run directory."""

    def validate(self, p: str) -> None:
        check(self.steps > 0, f"{p}.steps", "must be > 0")
        check(
            self.grad_accum == 1,
            f"{p}.grad_accum",
            "must be 1: fused sparse optimizers update in every backward, so accumulation would be wrong for the ID tables",
        )
        check(self.grad_clip >= 0, f"{p}.grad_clip", "must be >= 0")
        check(self.eval_every >= 0 and self.checkpoint_every >= 0, f"{p}.eval_every", "must be >= 0")
        check(self.dtype in ("float32", "bfloat16"), f"{p}.dtype", "must be float32 or bfloat16 (not fp16)")
        check(self.bf16_mode in ("weights", "autocast"), f"{p}.bf16_mode", "must be weights or autocast")
        modes = ("default", "reduce-overhead", "max-autotune-no-cudagraphs")
        check(self.compile_mode in modes, f"{p}.compile_mode", f"must be one of {modes}")
        check(self.compile_scope in ("blocks", "dense"), f"{p}.compile_scope", "must be blocks or dense")
        check(self.on_nonfinite in ("stop", "rollback"), f"{p}.on_nonfinite", "must be stop or rollback")
        check(self.max_rollbacks >= 0, f"{p}.max_rollbacks", "must be >= 0")
        check(self.gc_every >= 0, f"{p}.gc_every", "must be >= 0 (0: Python's automatic collection)")
        check(self.sqdc_weight >= 0, f"{p}.sqdc_weight", "must be >= 0")
        check(self.sqdc_temperature > 0, f"{p}.sqdc_temperature", "must be > 0")
        check(self.cic_weight >= 0, f"{p}.cic_weight", "must be >= 0")
        check(self.cic_temperature > 0, f"{p}.cic_temperature", "must be > 0")
        check(
            self.objective in ("ranking", "contrastive"), f"{p}.objective", "must be ranking or contrastive"
        )
        check(
            self.objective == "ranking" or self.sqdc_weight > 0 or self.cic_weight > 0,
            f"{p}.objective",
            "contrastive needs sqdc_weight > 0 or cic_weight > 0",
        )


@dataclass
class DistributedConfig:
    """Process group and DeepSpeed."""

    backend: str = "auto"
    """auto (nccl with CUDA, else gloo), nccl or gloo."""
    zero_stage: int = 0
    """DeepSpeed ZeRO stage 0-3 for the dense part."""

    def validate(self, p: str) -> None:
        check(self.backend in ("auto", "nccl", "gloo"), f"{p}.backend", "must be auto, nccl or gloo")
        check(self.zero_stage in (0, 1, 2, 3), f"{p}.zero_stage", "must be 0, 1, 2 or 3")


@dataclass
class LoggingConfig:
    """Outputs."""

    out_dir: str = "outputs/run"
    """Run directory: resolved config, metrics.jsonl, TensorBoard events, checkpoints."""
    log_every: int = 10
    """Log metrics every N steps."""
    tensorboard: bool = True
    """Write TensorBoard event files."""
    progress_bar: bool = True
    """tqdm progress bar on rank 0."""

    def validate(self, p: str) -> None:
        check(self.log_every > 0, f"{p}.log_every", "must be > 0")


@dataclass
class Config:
    """Root of the tree."""

    name: str = "tiny"
    """Preset name (informational)."""
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    embeddings: EmbeddingsConfig = field(default_factory=EmbeddingsConfig)
    memory_bank: MemoryBankConfig = field(default_factory=MemoryBankConfig)
    lora: LoraConfig = field(default_factory=LoraConfig)
    optimizer: OptimizerConfig = field(default_factory=OptimizerConfig)
    training: TrainingConfig = field(default_factory=TrainingConfig)
    distributed: DistributedConfig = field(default_factory=DistributedConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)

    def validate(self) -> Config:
        check_finite(self, "")
        for name in (
            "data",
            "model",
            "embeddings",
            "memory_bank",
            "lora",
            "optimizer",
            "training",
            "distributed",
            "logging",
        ):
            getattr(self, name).validate(name)
        check_cross_section(self)
        return self


def check_cross_section(cfg: Config) -> None:
    """The rules that tie two sections together, in one place."""
    check(
        cfg.model.use_content or not cfg.memory_bank.enabled,
        "memory_bank.enabled",
        "needs model.use_content = true (the bank holds content vectors; an ID-only model has none): "
        "set memory_bank.enabled = false for the ID-only baseline",
    )
    check(
        cfg.lora.rank == 0 or cfg.model.history_encoder == "longer",
        "lora.rank",
        "LoRA adapts the LONGER decoders; set model.history_encoder = longer",
    )
    check(
        cfg.memory_bank.warm_up is False or cfg.memory_bank.enabled,
        "memory_bank.warm_up",
        "needs memory_bank.enabled = true",
    )


def check_finite(node: Any, prefix: str) -> None:
    """No float field anywhere in the tree may be inf or NaN (TOML reads `inf` and `nan` as floats)."""
    for f in dataclasses.fields(node):
        value, name = getattr(node, f.name), f"{prefix}{f.name}"
        if dataclasses.is_dataclass(value):
            check_finite(value, f"{name}.")
        elif isinstance(value, float):
            check(math.isfinite(value), name, f"must be a finite number, got {value}")
        elif isinstance(value, list | dict):
            items = value.values() if isinstance(value, dict) else value
            bad = [v for v in items if isinstance(v, float) and not math.isfinite(v)]
            check(not bad, name, f"must hold finite numbers, got {bad}")
