"""`lemur data inspect DIR`: print a dataset's spec and what its shards really hold, and draw a contact sheet.

The shards are streamed once (one sample in memory at a time; only distinct-id sets grow) through the reader's own
stages: `tar_samples` splits them into samples and `parse_sample` checks each record (`.rec` or `.json`), so every
sample the reader would reject is reported, per shard and key, with the field and the reader's reason (bad types,
ids outside int64, NaN/inf or past-float32 dense values, labels other than 0/1, histories longer than the spec's
max_len, text longer than data.max_text_chars, a damaged tar, ...): the two cannot drift apart. Images (jpg, jpeg,
png members) are decoded by PIL here, all of them, where the reader decodes the first data.images_per_sample; a
failure is `bad_image` as in the reader. Nothing is ever unpickled, and any other member is only counted.

The statistics (labels, cardinalities, lengths, dense values, images) are measured over the samples the reader
accepts; `counts` are the samples the shards hold, compared with dataset.json. Problems are counted by reason, and
the first PROBLEMS_KEPT are kept with where they are. This is a diagnostic tool: it reports and goes on.
"""

from __future__ import annotations

import io
import json
import math
import sys
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from PIL import Image, ImageDraw, UnidentifiedImageError

from trainer.config.schema import DataConfig
from trainer.data import record as binary_record
from trainer.data.decode import BadSample, Limits, RawSample, SkipCounter, parse_sample, tar_samples
from trainer.data.spec import ID_FIELDS, IMAGE_EXTS, DatasetSpec, read_spec

HISTORY_BUCKETS: tuple[tuple[str, int, int], ...] = (
    ("0", 0, 0),
    ("1-10", 1, 10),
    ("11-50", 11, 50),
    ("51-100", 51, 100),
    ("101-500", 101, 500),
    ("501-1000", 501, 1000),
    (">1000", 1001, sys.maxsize),
)
SHEET_ITEMS = 64
SHEET_COLUMNS = 8
THUMB = 96
PAD = 6
LABEL_HEIGHT = 14
TITLE_HEIGHT = 20
BAR_WIDTH = 40
ABBREVIATE_LIST = 8
ABBREVIATE_KEEP = 5
ABBREVIATE_CHARS = 100
PROBLEMS_SHOWN = 20
PROBLEMS_KEPT = 1_000
"""Problems kept with their shard and key (all are counted by reason)."""
RECORD_EXTS = ("json", binary_record.EXT)


# ---------------------------------------------------------------------------------------------------- reading


def member_kind(ext: str) -> str:
    """json, rec (binary record), image or other: only the first three are ever decoded."""
    if ext in ("json", binary_record.EXT):
        return ext
    if ext.rsplit(".", 1)[-1].lower() in IMAGE_EXTS:
        return "image"
    return "other"


def decode_image(payload: bytes) -> Image.Image:
    try:
        image = Image.open(io.BytesIO(payload))
    except UnidentifiedImageError:
        raise ValueError("not a recognised image format") from None
    image.load()
    return image


def is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


# ---------------------------------------------------------------------------------------------------- measuring


@dataclass
class Problem:
    """Something the reader would reject (its BadSample's shard, key, field, reason and detail), or a shard
    missing, unlisted or holding another count than dataset.json says (key and field empty)."""

    shard: str
    key: str
    field: str
    reason: str
    detail: str = ""

    def __str__(self) -> str:
        where = " ".join(
            part for part in (self.shard, self.key, self.field and f"field {self.field}") if part
        )
        return f"{where}: {self.reason}" + (f" ({self.detail})" if self.detail else "")


class ShardProblems(SkipCounter):
    """What `tar_samples` finds (a damaged tar, an oversized member, ...) recorded as problems: the shard is read
    under the `skip` policy, so the reading goes on wherever the reader's would."""

    def __init__(self, scan: DatasetScan) -> None:
        super().__init__(policy="skip")
        self.scan = scan

    def handle(self, err: BadSample, samples: int = 1) -> None:
        self.scan.add_problem(Problem(Path(err.shard).name, err.key, err.field, err.reason, err.detail))


@dataclass
class SplitStats:
    shards: int = 0
    held: int = 0
    """Samples in the shards (what dataset.json counts)."""
    rejected: int = 0
    """Of those, the samples the reader would reject."""
    samples: int = 0
    """Of those, the samples the reader accepts: what the statistics measure."""
    label_sums: Counter[str] = field(default_factory=Counter)
    label_counts: Counter[str] = field(default_factory=Counter)
    members: Counter[str] = field(default_factory=Counter)
    cold: int = 0
    ids: dict[str, set[int]] = field(default_factory=dict)

    def label_rate(self, label: str) -> float | None:
        count = self.label_counts[label]
        return self.label_sums[label] / count if count else None


@dataclass
class LengthStats:
    count: int = 0
    total: int = 0
    longest: int = 0
    empty: int = 0

    def add(self, length: int) -> None:
        self.count += 1
        self.total += length
        self.longest = max(self.longest, length)
        self.empty += length == 0

    def as_dict(self) -> dict[str, float]:
        mean = self.total / self.count if self.count else 0.0
        return {"count": self.count, "mean": round(mean, 2), "max": self.longest, "empty": self.empty}


@dataclass
class DenseStats:
    """Over accepted samples, whose dense values are numbers finite as float32 (the others are problems)."""

    count: int = 0
    missing: int = 0
    total: float = 0.0
    low: float = math.inf
    high: float = -math.inf

    def add(self, value: Any) -> None:
        if value is None:
            self.missing += 1
            return
        self.count += 1
        self.total += value
        self.low, self.high = min(self.low, value), max(self.high, value)

    def as_dict(self) -> dict[str, float | int | None]:
        seen = self.count > 0
        return {
            "count": self.count,
            "missing": self.missing,
            "mean": round(self.total / self.count, 5) if seen else None,
            "min": self.low if seen else None,
            "max": self.high if seen else None,
        }


@dataclass
class ShownSample:
    """A sample kept for printing: its record and what its other members were."""

    shard: str
    key: str
    record: dict[str, Any]
    images: list[str]
    other: list[str]


@dataclass
class SheetTile:
    item_id: int | None
    category: int | None
    image: bytes


class DatasetScan:
    """Accumulates everything measured over the streamed samples of all shards."""

    def __init__(self, spec: DatasetSpec, samples_to_show: int, max_text_chars: int) -> None:
        self.spec = spec
        self.samples_to_show = samples_to_show
        # Images are checked here, not by parse_sample (it is given the record members only).
        self.limits = Limits(max_text_chars, DataConfig.image_size, images_per_sample=0)
        self.splits: dict[str, SplitStats] = {}
        self.sparse_values: dict[str, set[int]] = {name: set() for name in spec.sparse}
        self.sparse_empty: Counter[str] = Counter()
        self.history = {
            name: Counter({bucket: 0 for bucket, _, _ in HISTORY_BUCKETS}) for name in spec.history
        }
        self.history_lengths = {name: LengthStats() for name in spec.history}
        self.text = {name: LengthStats() for name in self.text_fields}
        self.dense = {name: DenseStats() for name in spec.dense}
        self.image_sizes: Counter[str] = Counter()
        self.images_per_sample: Counter[int] = Counter()
        self.other_exts: Counter[str] = Counter()
        self.shown: list[ShownSample] = []
        self.tiles: dict[int | None, SheetTile] = {}
        self.problems: list[Problem] = []
        """The first PROBLEMS_KEPT."""
        self.reasons: Counter[str] = Counter()
        """Every problem, by reason."""

    @property
    def text_fields(self) -> list[str]:
        return list(self.spec.text) + (["query"] if self.spec.query_text else [])

    def add_problem(self, problem: Problem) -> None:
        self.reasons[problem.reason] += 1
        if len(self.problems) < PROBLEMS_KEPT:
            self.problems.append(problem)

    def scan_shard(self, split: str, path: Path) -> int:
        """Add a shard's samples to its split; returns how many samples it held."""
        stats = self.splits.setdefault(split, SplitStats())
        stats.shards += 1
        before = stats.held
        for raw in tar_samples(str(path), ShardProblems(self)):
            self.add_sample(stats, path.name, raw)
        return stats.held - before

    def add_sample(self, stats: SplitStats, shard: str, raw: RawSample) -> None:
        """Check a sample as the reader would; measure it if the reader accepts it."""
        stats.held += 1
        problems_before = self.reasons.total()
        record = self.parse_record(shard, raw)
        images: list[str] = []
        other: list[str] = []
        for ext, payload in sorted(raw.members.items()):
            kind = member_kind(ext)
            stats.members[kind] += 1
            if kind == "image":
                size = self.decode_image_member(shard, raw.key, ext, payload)
                images.append(f"{ext} {size}" if size else f"{ext} (corrupt)")
            elif kind == "other":
                other.append(ext)
                self.other_exts[ext] += 1
        if record is None or self.reasons.total() > problems_before:  # a bad record or a bad image
            stats.rejected += 1
            return
        self.add_record(stats, record)
        self.images_per_sample[len(images)] += 1
        self.collect_tile(record, raw)
        if len(self.shown) < self.samples_to_show:
            self.shown.append(ShownSample(shard, raw.key, record, images, other))

    def parse_record(self, shard: str, raw: RawSample) -> dict[str, Any] | None:
        """The sample's record in the JSON shape (spec.py) if the reader's parse_sample accepts it, else None (and
        the reader's BadSample is a problem)."""
        members = {ext: payload for ext, payload in raw.members.items() if ext in RECORD_EXTS}
        try:
            sample = parse_sample(RawSample(shard, raw.key, members), self.spec, self.limits)
        except BadSample as err:
            self.add_problem(Problem(shard, raw.key, err.field, err.reason, err.detail))
            return None
        except Exception as err:  # noqa: BLE001 (a sample that crashes the reader is the worst problem of all)
            self.add_problem(
                Problem(shard, raw.key, "", "reader_crash", f"{type(err).__name__}: {err}"[:200])
            )
            return None
        if binary_record.EXT in members:
            return binary_record.as_json_record(sample, binary_record.RecordLayout.of(self.spec))
        return json.loads(members["json"])  # parse_sample has checked it

    def decode_image_member(self, shard: str, key: str, ext: str, payload: bytes) -> str | None:
        try:
            image = decode_image(payload)
        except Exception as err:  # noqa: BLE001 (PIL raises many kinds on bad bytes)
            self.add_problem(Problem(shard, key, ext, "bad_image", str(err)))
            return None
        size = f"{image.width}x{image.height}"
        self.image_sizes[size] += 1
        return size

    def add_record(self, stats: SplitStats, record: dict[str, Any]) -> None:
        stats.samples += 1
        stats.cold += record.get("cold") == 1
        for name in ID_FIELDS:
            if is_int(record.get(name)):
                stats.ids.setdefault(name, set()).add(record[name])
        labels = record.get("labels") if isinstance(record.get("labels"), dict) else {}
        for name in self.spec.labels:
            if labels.get(name) in (0, 1):
                stats.label_counts[name] += 1
                stats.label_sums[name] += labels[name]
        self.add_sparse(as_dict(record.get("sparse")))
        self.add_history(as_dict(record.get("history")))
        self.add_text(record)
        dense = as_dict(record.get("dense"))
        for name, dense_stats in self.dense.items():
            dense_stats.add(dense.get(name))

    def add_sparse(self, sparse: dict[str, Any]) -> None:
        for name, values in self.sparse_values.items():
            value = sparse.get(name, [])
            ids = [v for v in (value if isinstance(value, list) else [value]) if is_int(v)]
            if not ids:
                self.sparse_empty[name] += 1
            values.update(ids)

    def add_history(self, history: dict[str, Any]) -> None:
        for name in self.spec.history:
            length = len(as_list(history.get(name)))
            self.history[name][history_bucket(length)] += 1
            self.history_lengths[name].add(length)

    def add_text(self, record: dict[str, Any]) -> None:
        text = as_dict(record.get("text"))
        for name, lengths in self.text.items():
            value = record.get("query") if name == "query" else text.get(name)
            lengths.add(len(value) if isinstance(value, str) else 0)

    def collect_tile(self, record: dict[str, Any], raw: RawSample) -> None:
        """The first image of up to SHEET_ITEMS distinct items, as a fallback when items.parquet has none."""
        item_id = record.get("item_id")
        if len(self.tiles) >= SHEET_ITEMS or item_id in self.tiles:
            return
        image_exts = sorted(ext for ext in raw.members if member_kind(ext) == "image")
        if image_exts:
            categories = as_list(as_dict(record.get("sparse")).get("category"))
            category = categories[0] if categories else None
            self.tiles[item_id] = SheetTile(item_id, category, raw.members[image_exts[0]])

    def measured_cardinalities(self) -> dict[str, int]:
        counts = {name: len(self.ids_in_all_splits(name)) for name in ID_FIELDS}
        counts = {name: n for name, n in counts.items() if n}
        return counts | {name: len(values) for name, values in self.sparse_values.items()}

    def ids_in_all_splits(self, name: str) -> set[int]:
        return set().union(*(stats.ids.get(name, set()) for stats in self.splits.values()))


def as_dict(value: Any) -> dict[str, Any]:
    return value if isinstance(value, dict) else {}


def as_list(value: Any) -> list[Any]:
    return value if isinstance(value, list) else []


def history_bucket(length: int) -> str:
    return next(name for name, low, high in HISTORY_BUCKETS if low <= length <= high)


def scan_dataset(
    root: Path, spec: DatasetSpec, samples_to_show: int, max_text_chars: int = DataConfig.max_text_chars
) -> DatasetScan:
    """Stream every shard listed in dataset.json, in order; note missing, short and unlisted shards."""
    scan = DatasetScan(spec, samples_to_show, max_text_chars)
    listed = set()
    for split, shards in spec.shards.items():
        scan.splits.setdefault(split, SplitStats())
        for shard in shards:
            listed.add(shard.name)
            path = root / shard.name
            if not path.is_file():
                scan.add_problem(Problem(shard.name, "", "", "missing_shard", "listed in dataset.json"))
                continue
            held = scan.scan_shard(split, path)
            if held != shard.samples:
                detail = f"{held} samples read, dataset.json lists {shard.samples}"
                scan.add_problem(Problem(shard.name, "", "", "count_mismatch", detail))
    for path in sorted(root.glob("*.tar")):
        if path.name not in listed:
            scan.add_problem(Problem(path.name, "", "", "unlisted_shard", "not in dataset.json; not scanned"))
    return scan


# ---------------------------------------------------------------------------------------------------- contact sheet


def item_tiles(items_path: Path, scan: DatasetScan) -> list[SheetTile]:
    """Up to SHEET_ITEMS tiles from items.parquet's `images` column, else those collected from the shards."""
    tiles = parquet_tiles(items_path, scan) if items_path.is_file() else []
    return tiles or list(scan.tiles.values())


def parquet_tiles(items_path: Path, scan: DatasetScan) -> list[SheetTile]:
    import pyarrow.parquet as pq

    try:
        parquet = pq.ParquetFile(items_path)
    except Exception as err:  # noqa: BLE001 (pyarrow raises several kinds on a bad file)
        scan.add_problem(Problem(items_path.name, "", "", "unreadable_parquet", str(err)))
        return []
    names = parquet.schema_arrow.names
    if "images" not in names:
        return []
    columns = [name for name in ("item_id", "images", "category") if name in names]
    tiles: list[SheetTile] = []
    for batch in parquet.iter_batches(batch_size=256, columns=columns):
        for row in batch.to_pylist():
            images = as_list(row.get("images"))
            if images and isinstance(images[0], bytes):
                tiles.append(SheetTile(row.get("item_id"), row.get("category"), images[0]))
            if len(tiles) >= SHEET_ITEMS:
                return tiles
    return tiles


def tile_label(tile: SheetTile) -> str:
    parts = []
    if tile.item_id is not None:
        parts.append("#" + str(tile.item_id)[-6:])
    if tile.category is not None:
        parts.append(f"c{tile.category}")
    return " ".join(parts) or "?"


def fit_thumbnail(image: Image.Image) -> Image.Image:
    """Scale to fit a THUMB x THUMB box, keeping the aspect ratio; upscaling keeps the pixels visible."""
    scale = THUMB / max(image.width, image.height)
    size = (max(1, round(image.width * scale)), max(1, round(image.height * scale)))
    resample = Image.Resampling.NEAREST if scale > 1 else Image.Resampling.LANCZOS
    return image.convert("RGB").resize(size, resample)


def draw_contact_sheet(tiles: list[SheetTile], title: str, out: Path, scan: DatasetScan) -> Path:
    columns = min(SHEET_COLUMNS, len(tiles))
    rows = math.ceil(len(tiles) / columns)
    cell_w, cell_h = THUMB + PAD, THUMB + LABEL_HEIGHT + PAD
    sheet = Image.new("RGB", (PAD + columns * cell_w, TITLE_HEIGHT + rows * cell_h + PAD), "white")
    draw = ImageDraw.Draw(sheet)
    draw.text((PAD, 4), title, fill="black")
    for index, tile in enumerate(tiles):
        x = PAD + (index % columns) * cell_w
        y = TITLE_HEIGHT + (index // columns) * cell_h
        try:
            thumb = fit_thumbnail(decode_image(tile.image))
        except Exception as err:  # noqa: BLE001 (PIL raises many kinds on bad bytes)
            scan.add_problem(Problem("contact sheet", f"item {tile.item_id}", "image", "bad_image", str(err)))
            draw.rectangle((x, y, x + THUMB - 1, y + THUMB - 1), outline="red")
        else:
            sheet.paste(thumb, (x + (THUMB - thumb.width) // 2, y + (THUMB - thumb.height) // 2))
        label = tile_label(tile)
        draw.text((x + (THUMB - draw.textlength(label)) / 2, y + THUMB + 1), label, fill="black")
    out.parent.mkdir(parents=True, exist_ok=True)
    sheet.save(out, format="PNG")
    return out


# ---------------------------------------------------------------------------------------------------- printing


def format_table(headers: list[str], rows: list[list[Any]], indent: int = 2) -> str:
    """Columns padded to their widest cell; numbers right-aligned, text left-aligned."""
    cells = [[format_cell(value) for value in row] for row in rows]
    widths = [max(len(row[i]) for row in [headers, *cells]) for i in range(len(headers))]
    numeric = [all(is_number(row[i]) for row in rows) and bool(rows) for i in range(len(headers))]

    def line(row: list[str]) -> str:
        padded = [c.rjust(w) if num else c.ljust(w) for c, w, num in zip(row, widths, numeric)]
        return (" " * indent + "  ".join(padded)).rstrip()

    rule = " " * indent + "  ".join("-" * w for w in widths)
    return "\n".join([line(headers), rule, *(line(row) for row in cells)])


def format_cell(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, float):
        return f"{value:.4f}" if abs(value) < 10 else f"{value:.1f}"
    return str(value)


def is_number(value: Any) -> bool:
    return value is None or (isinstance(value, (int, float)) and not isinstance(value, bool))


def heading(title: str) -> None:
    print(f"\n== {title} ==")


def print_spec(spec: DatasetSpec) -> None:
    heading("spec")
    print(f"  scenario      {spec.scenario}")
    print(f"  labels        {', '.join(spec.labels)}")
    print(f"  dense         {', '.join(spec.dense) or '-'}")
    print(f"  text fields   {', '.join(spec.text) or '-'}{'  (+ raw query)' if spec.query_text else ''}")
    print(f"  images/item   {spec.images}")
    if spec.sparse:
        rows = [[name, bool(f.get("multi")), f.get("cardinality")] for name, f in spec.sparse.items()]
        print("  sparse features:")
        print(format_table(["feature", "multi", "cardinality"], rows, indent=4))
    if spec.history:
        print("  history sequences:")
        print(format_table(["sequence", "max_len"], [[n, m] for n, m in spec.history.items()], indent=4))


def print_splits(spec: DatasetSpec, scan: DatasetScan) -> None:
    heading("splits")
    rows = []
    for split, stats in scan.splits.items():
        listed = len(spec.shards.get(split, []))
        counts = [spec.counts.get(split), stats.held, stats.rejected, stats.cold]
        rows.append([split, listed, stats.shards, *counts])
    headers = ["split", "shards", "read", "samples (spec)", "samples (measured)", "rejected", "cold"]
    print(format_table(headers, rows))
    other = {k: v for k, v in spec.counts.items() if k not in scan.splits}
    if "eval" in scan.splits and "train" in scan.splits:
        other["eval_cold_items (measured)"] = len(eval_only_items(scan))
    if other:
        print("  " + ", ".join(f"{k}={v}" for k, v in other.items()))
    print("  " + members_line(scan))


def members_line(scan: DatasetScan) -> str:
    members = sum((stats.members for stats in scan.splits.values()), Counter())
    line = (
        f"members: {members['rec']} binary record, {members['json']} json, {members['image']} image, "
        f"{members['other']} other"
    )
    if scan.other_exts:
        line += " (" + ", ".join(f".{ext} x{n}" for ext, n in scan.other_exts.most_common(5)) + ")"
    return line


def eval_only_items(scan: DatasetScan) -> set[int]:
    return scan.splits["eval"].ids.get("item_id", set()) - scan.splits["train"].ids.get("item_id", set())


def print_labels(spec: DatasetSpec, scan: DatasetScan) -> None:
    heading("labels")
    rows = []
    for split, stats in scan.splits.items():
        for index, label in enumerate(spec.labels):
            expected = spec.label_rate.get(split) if index == 0 else None
            rows.append([split, label, stats.label_counts[label], expected, stats.label_rate(label)])
    print(format_table(["split", "label", "labelled", "rate (spec)", "rate (measured)"], rows))


def print_cardinalities(spec: DatasetSpec, scan: DatasetScan) -> None:
    heading("cardinalities")
    declared = dict(spec.cardinalities)
    declared.update({n: f.get("cardinality") for n, f in spec.sparse.items() if n not in declared})
    measured = scan.measured_cardinalities()
    names = list(dict.fromkeys([*declared, *measured]))
    rows = [[name, declared.get(name), measured.get(name), sparse_empty(scan, name)] for name in names]
    print(format_table(["feature", "spec", "measured (distinct in shards)", "samples w/o value"], rows))


def sparse_empty(scan: DatasetScan, name: str) -> int | None:
    return scan.sparse_empty[name] if name in scan.sparse_values else None


def print_history(scan: DatasetScan) -> None:
    heading("history lengths")
    if not scan.history:
        print("  no history sequences")
    for name, buckets in scan.history.items():
        lengths = scan.history_lengths[name].as_dict()
        max_len = scan.spec.history[name]
        print(f"  {name} (max_len {max_len}; mean {lengths['mean']}, max {lengths['max']})")
        label_width = max(len(bucket) for bucket, _, _ in HISTORY_BUCKETS)
        print(bar_chart(buckets_up_to(buckets, max(max_len, int(lengths["max"]))), label_width))


def buckets_up_to(buckets: Counter[str], longest: int) -> Counter[str]:
    """The buckets that could hold a length up to `longest` (the rest are empty by construction)."""
    return Counter({name: buckets[name] for name, low, _ in HISTORY_BUCKETS if low <= longest})


def bar_chart(counts: Counter[str], label_width: int = 0, indent: int = 4) -> str:
    total = sum(counts.values()) or 1
    peak = max(counts.values(), default=0) or 1
    label_width = max([label_width, *(len(name) for name in counts)])
    count_width = len(str(max(counts.values(), default=0)))
    lines = []
    for name, count in counts.items():
        bar = "#" * math.ceil(BAR_WIDTH * count / peak)
        share = f"{100 * count / total:5.1f}%"
        lines.append(
            f"{' ' * indent}{name:>{label_width}} | {bar:<{BAR_WIDTH}} {count:>{count_width}} {share}"
        )
    return "\n".join(lines)


def print_text(scan: DatasetScan) -> None:
    heading("text lengths (chars)")
    rows = [[name, *stats.as_dict().values()] for name, stats in scan.text.items()]
    print(format_table(["field", "samples", "mean", "max", "empty"], rows) if rows else "  no text fields")


def print_dense(scan: DatasetScan) -> None:
    heading("dense features")
    rows = [[name, *stats.as_dict().values()] for name, stats in scan.dense.items()]
    headers = ["feature", "present", "missing", "mean", "min", "max"]
    print(format_table(headers, rows) if rows else "  no dense features")


def print_images(spec: DatasetSpec, scan: DatasetScan) -> None:
    heading("images")
    if not scan.image_sizes:
        print(f"  no images in the shards (spec: {spec.images} per item)")
        return
    per_sample = ", ".join(f"{n} image(s): {count}" for n, count in sorted(scan.images_per_sample.items()))
    print(f"  spec: {spec.images} per item; samples with {per_sample}")
    rows = [[size, count] for size, count in scan.image_sizes.most_common(10)]
    print(format_table(["size", "images"], rows))


def abbreviate(value: Any) -> Any:
    """Long lists become their first few items + '... (N more)'; long strings are cut likewise."""
    if isinstance(value, dict):
        return {k: abbreviate(v) for k, v in value.items()}
    if isinstance(value, list) and len(value) > ABBREVIATE_LIST:
        return [abbreviate(v) for v in value[:ABBREVIATE_KEEP]] + [
            f"... ({len(value) - ABBREVIATE_KEEP} more)"
        ]
    if isinstance(value, list):
        return [abbreviate(v) for v in value]
    if isinstance(value, str) and len(value) > ABBREVIATE_CHARS:
        return value[:ABBREVIATE_CHARS] + f"... ({len(value) - ABBREVIATE_CHARS} more chars)"
    return value


def pretty_json(value: Any, indent: int = 0) -> str:
    """Indented JSON; lists of scalars, and short objects of scalars, kept on one line."""
    pad = "  " * indent
    if is_short_flat_dict(value):
        return json.dumps(value, ensure_ascii=False)
    if isinstance(value, dict) and value:
        items = [f"{pad}  {json.dumps(k)}: {pretty_json(v, indent + 1)}" for k, v in value.items()]
        return "{\n" + ",\n".join(items) + f"\n{pad}}}"
    if isinstance(value, list) and any(isinstance(v, (dict, list)) for v in value):
        items = [f"{pad}  {pretty_json(v, indent + 1)}" for v in value]
        return "[\n" + ",\n".join(items) + f"\n{pad}]"
    return json.dumps(value, ensure_ascii=False)


def is_short_flat_dict(value: Any) -> bool:
    if not isinstance(value, dict):
        return False
    flat = not any(isinstance(v, (dict, list)) for v in value.values())
    return flat and len(json.dumps(value, ensure_ascii=False)) <= 80


def print_samples(scan: DatasetScan) -> None:
    heading(f"samples (first {len(scan.shown)})")
    for sample in scan.shown:
        images = ", ".join(sample.images) or "none"
        other = f"; other members: {', '.join(sample.other)}" if sample.other else ""
        print(f"  -- {sample.shard} {sample.key}  images: {images}{other}")
        print("\n".join("  " + line for line in pretty_json(abbreviate(sample.record)).splitlines()))


def print_problems(scan: DatasetScan) -> None:
    """The count by reason, then the first few problems with where they are."""
    total = scan.reasons.total()
    heading(f"problems ({total})")
    if not total:
        print("  none")
        return
    rejected = sum(stats.rejected for stats in scan.splits.values())
    held = sum(stats.held for stats in scan.splits.values())
    print(f"  {rejected} of {held} samples would be rejected by the reader")
    print(format_table(["reason", "count"], [[r, n] for r, n in scan.reasons.most_common()]))
    for problem in scan.problems[:PROBLEMS_SHOWN]:
        print(f"  ! {problem}")
    if total > PROBLEMS_SHOWN:
        print(f"  ... and {total - PROBLEMS_SHOWN} more")


# ---------------------------------------------------------------------------------------------------- entry point


def write_sheet(root: Path, spec: DatasetSpec, scan: DatasetScan, sheet: str | None) -> Path | None:
    heading("contact sheet")
    tiles = item_tiles(root / "items.parquet", scan)
    if not tiles:
        print("  the dataset has no images; no contact sheet written")
        return None
    out = Path(sheet) if sheet else root / "contact_sheet.png"
    title = f"{root.name}: {len(tiles)} items (label: #last id digits, c category)"
    draw_contact_sheet(tiles, title, out, scan)
    print(f"  {len(tiles)} items -> {out}")
    return out


def report(spec: DatasetSpec, scan: DatasetScan, sheet: Path | None) -> dict[str, Any]:
    first_label = spec.labels[0] if spec.labels else None
    return {
        "scenario": spec.scenario,
        "counts": {split: stats.held for split, stats in scan.splits.items()},
        "rejected": {split: stats.rejected for split, stats in scan.splits.items()},
        "shards": {split: stats.shards for split, stats in scan.splits.items()},
        "label_rate": {split: stats.label_rate(first_label) for split, stats in scan.splits.items()},
        "label_rates": {
            split: {label: stats.label_rate(label) for label in spec.labels}
            for split, stats in scan.splits.items()
        },
        "members": dict(sum((stats.members for stats in scan.splits.values()), Counter())),
        "cardinalities": {"spec": dict(spec.cardinalities), "measured": scan.measured_cardinalities()},
        "sparse_empty": {name: scan.sparse_empty[name] for name in spec.sparse},
        "history": {name: dict(buckets) for name, buckets in scan.history.items()},
        "history_lengths": {name: stats.as_dict() for name, stats in scan.history_lengths.items()},
        "text": {name: stats.as_dict() for name, stats in scan.text.items()},
        "dense": {name: stats.as_dict() for name, stats in scan.dense.items()},
        "image_sizes": dict(scan.image_sizes),
        "problems": [vars(problem) for problem in scan.problems],
        "problem_counts": dict(scan.reasons),
        "sheet": str(sheet) if sheet else None,
    }


def inspect_dataset(
    path: str, samples: int = 3, sheet: str | None = None, max_text_chars: int = DataConfig.max_text_chars
) -> dict[str, Any]:
    """Print a dataset directory's spec and measured contents; write a contact sheet; return the numbers.
    `max_text_chars`: the reader's limit on a text field (data.max_text_chars), for the problems it would reject."""
    root = Path(path)
    spec = read_spec(root)
    print(f"dataset {root.resolve()}")
    if spec.created_by:
        print(f"  created by: {abbreviate(spec.created_by)}")
    print_spec(spec)
    scan = scan_dataset(root, spec, samples, max_text_chars)
    print_splits(spec, scan)
    print_labels(spec, scan)
    print_cardinalities(spec, scan)
    print_history(scan)
    print_text(scan)
    print_dense(scan)
    print_images(spec, scan)
    print_samples(scan)
    sheet_path = write_sheet(root, spec, scan, sheet)
    print_problems(scan)
    return report(spec, scan, sheet_path)
