"""Reading and checking samples. Only `.rec` (binary, `record.py`), `.json` and image members are ever decoded
(nothing is unpickled); every problem is a BadSample naming the shard, the key and the field, which the policy
turns into an error or a skip."""

from __future__ import annotations

import contextlib
import io
import json
import logging
import lzma
import math
import mmap
import os
import tarfile
import warnings
import zlib
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any, BinaryIO

import numpy as np
from PIL import Image
from webdataset.gopen import gopen

from trainer.data import record as binary
from trainer.data.record import FLOAT32_MAX, RecordLayout
from trainer.data.spec import IMAGE_EXTS, INT64_MAX, INT64_MIN, DatasetSpec

log = logging.getLogger(__name__)


class BadSample(ValueError):
    """A sample that breaks the format. `reason` is a short tag used to count skips."""

    def __init__(self, shard: str, key: str, field: str, reason: str, detail: str = "") -> None:
        self.shard, self.key, self.field, self.reason, self.detail = shard, key, field, reason, detail
        super().__init__(
            f"{shard}: sample {key!r}: field {field!r}: {reason}" + (f" ({detail})" if detail else "")
        )


@dataclass
class SkipCounter:
    """Counts skipped samples by reason (and logs the first few), and the samples that decoded well."""

    policy: str = "error"
    log_first: int = 5
    counts: Counter = field(default_factory=Counter)
    """By reason, since the last `take()`."""
    by_field: Counter = field(default_factory=Counter)
    """By (reason, field), never reset: what a reader that gives up reports."""
    good: int = 0
    """Samples that decoded without a problem (the reader's measure of progress)."""
    logged: int = 0

    def handle(self, err: BadSample, samples: int = 1) -> None:
        """`samples`: how many samples the problem cost (a damaged tar loses the rest of its shard)."""
        if self.policy == "error":
            raise err
        self.counts[err.reason] += samples
        self.by_field[err.reason, err.field] += samples
        self.logged += 1
        if self.logged <= self.log_first:
            log.warning("skipping bad sample%s: %s", f"s (x{samples})" if samples > 1 else "", err)

    def take(self) -> dict[str, int]:
        """The counts since the last take (they ride along with each batch to the training process)."""
        out, self.counts = dict(self.counts), Counter()
        return out


@dataclass
class RawSample:
    shard: str
    key: str
    members: dict[str, bytes]


MAX_MEMBER_BYTES = 64 << 20
"""A tar member larger than this is never read into memory: its sample is `member_too_large` (a gzip shard can
hold a member of gigabytes in a few kilobytes)."""

TAR_ERRORS = (tarfile.TarError, OSError, EOFError, zlib.error, lzma.LZMAError)


@dataclass(frozen=True)
class Oversized:
    """In place of a member's bytes: the member is larger than the limit and was not read."""

    size: int


def tar_samples(
    url: str, skips: SkipCounter, expected: int | None = None, max_member_bytes: int = MAX_MEMBER_BYTES
) -> Iterator[RawSample]:
    """A tar's samples: its members grouped by key (the name up to the first dot). Damage anywhere (a bad header, a
    cut, bytes after the end-of-archive blocks) is a `corrupt_tar` BadSample naming the last key read; under
    `skip` the rest of the shard is dropped.

    `expected`: the shard's sample count (dataset.json). Given it, every one of those samples is yielded or
    counted, so nothing is lost quietly: damage counts each sample not yet read as `corrupt_tar`, a shard that ends
    early counts the samples it lacks as `missing_samples`, and samples past the count are not yielded but counted
    as `extra_samples` (readers give every rank the same number of batches from the counts, so they cannot take
    more). Without it, damage counts one `corrupt_tar` and the count is not checked."""
    key, seen = "<start>", 0  # seen: samples yielded or counted, in shard order
    groups = sample_groups(url, max_member_bytes)
    while True:
        try:
            group = next(groups, None)
        except TAR_ERRORS as err:
            lost = max(1, expected - seen) if expected is not None else 1
            detail = f"{err}" + (
                f"; {lost} of its {expected} samples not read" if expected is not None else ""
            )
            skips.handle(BadSample(url, key, "<tar>", "corrupt_tar", detail), lost)
            return
        if group is None:
            break
        key, members = group
        seen += 1
        if expected is not None and seen > expected:
            skips.handle(
                BadSample(
                    url,
                    key,
                    "<tar>",
                    "extra_samples",
                    f"dataset.json counts {expected} samples for the shard",
                )
            )
            continue
        big = [(ext, p.size) for ext, p in members.items() if isinstance(p, Oversized)]
        if big:
            ext, size = big[0]
            skips.handle(BadSample(url, key, ext, "member_too_large", f"{size} bytes > {max_member_bytes}"))
            continue
        yield RawSample(url, key, members)
    if expected is not None and seen < expected:
        detail = f"dataset.json counts {expected} samples, the shard holds {seen}"
        skips.handle(BadSample(url, key, "<tar>", "missing_samples", detail), expected - seen)


def sample_groups(url: str, max_member_bytes: int = MAX_MEMBER_BYTES) -> Iterator[tuple[str, dict[str, Any]]]:
    """(key, {ext: bytes or Oversized}) of a tar's samples in order; raises (TAR_ERRORS) on damage. A local plain
    tar is walked header by header from a memory map (`ustar_members`); compressed files and other URLs (`pipe:`,
    ...) go through `tarfile`."""
    key, members = "", {}
    plain = (
        not url.startswith("pipe:")
        and os.path.isfile(url)
        and os.path.getsize(url) > 0
        and not compressed(url)
    )
    for name, payload in (
        ustar_members(url, max_member_bytes) if plain else tarfile_members(url, max_member_bytes)
    ):
        name = name.rsplit("/", 1)[-1]
        if "." not in name:
            continue
        this_key, ext = name.split(".", 1)
        if this_key != key and members:
            yield key, members
            members = {}
        key = this_key
        members[ext.lower()] = payload
    if members:
        yield key, members


COMPRESSED_MAGIC = (b"\x1f\x8b", b"BZh", b"\xfd7zXZ\x00")


def compressed(path: str) -> bool:
    """Whether a local file starts like gzip, bzip2 or xz (tarfile reads those; the header walker cannot)."""
    with open(path, "rb") as f:
        return f.read(6).startswith(COMPRESSED_MAGIC)


BLOCK = tarfile.BLOCKSIZE
REGULAR = (tarfile.REGTYPE, tarfile.AREGTYPE, tarfile.CONTTYPE)
OTHER = (
    tarfile.LNKTYPE,
    tarfile.SYMTYPE,
    tarfile.CHRTYPE,
    tarfile.BLKTYPE,
    tarfile.DIRTYPE,
    tarfile.FIFOTYPE,
)


def ustar_members(
    path: str, max_member_bytes: int = MAX_MEMBER_BYTES
) -> Iterator[tuple[str, bytes | Oversized]]:
    """(name, bytes) of a local tar's regular files: the 512-byte headers parsed here, a few µs a member where
    `tarfile` spends tens. Every header's checksum is checked, so damage anywhere in the file is an error (tarfile
    stops quietly at a bad header after the first), and so is data after the end-of-archive blocks. Headers this
    walker does not read (pax, GNU long names) hand the rest of the file to `tarfile`. A member larger than
    `max_member_bytes` comes as `Oversized`, unread."""
    with open(path, "rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as data:
        size, offset = len(data), 0
        while True:
            if offset + BLOCK > size:
                raise tarfile.ReadError(f"archive cut short at byte {size} (no end-of-archive blocks)")
            header = data[offset : offset + BLOCK]
            if header == ZERO_BLOCK:
                _check_trailer(data, offset + BLOCK, size)
                return
            _check_header(header, offset)
            typeflag = header[156:157]
            if typeflag not in REGULAR and typeflag not in OTHER:
                f.seek(offset)
                yield from tarfile_members(f, max_member_bytes, offset)
                return
            length = _octal(header[124:136], offset)
            start = offset + BLOCK
            if start + length > size:
                raise tarfile.ReadError(
                    f"member at byte {offset} cut short: {length} bytes, {size - start} left"
                )
            if typeflag in REGULAR:
                yield (
                    _name(header),
                    data[start : start + length] if length <= max_member_bytes else Oversized(length),
                )
            offset = start + -(-length // BLOCK) * BLOCK


ZERO_BLOCK = bytes(BLOCK)


def _check_trailer(data: mmap.mmap, start: int, size: int) -> None:
    """After the first end-of-archive block: a second one, then nothing but zeros (the padding to a record). A zero
    block in the middle of a shard (a hole, two tars run together) is damage, not the end."""
    if size - start < BLOCK:
        raise tarfile.ReadError(f"archive cut short at byte {size} (one end-of-archive block)")
    for at in range(start, size, 1 << 20):
        chunk = data[at : min(size, at + (1 << 20))]
        if chunk.count(0) != len(chunk):
            first = at + len(chunk) - len(chunk.lstrip(b"\0"))
            raise tarfile.ReadError(
                f"data at byte {first} after the end-of-archive block at byte {start - BLOCK}"
            )


def _check_header(header: bytes, offset: int) -> None:
    stored = header[148:156].split(b"\0", 1)[0].strip()
    unsigned = sum(header[:148]) + sum(header[156:]) + 8 * 32  # the checksum field counts as spaces
    try:
        value = int(stored, 8)
    except ValueError:
        value = -1
    # some old tars summed signed bytes (tarfile accepts both)
    ok = value == unsigned or value == unsigned - 256 * sum(b > 127 for b in header[:148] + header[156:])
    if not ok:
        raise tarfile.ReadError(f"invalid header at byte {offset} (bad checksum)")


def _octal(field: bytes, offset: int) -> int:
    if field[0] & 0x80:  # GNU base-256 for sizes of 8 GiB and more
        return int.from_bytes(field[1:], "big")
    try:
        return int(field.split(b"\0", 1)[0].strip() or b"0", 8)
    except ValueError:
        raise tarfile.ReadError(f"invalid header at byte {offset} (size {field!r})") from None


def _name(header: bytes) -> str:
    name = header[:100].split(b"\0", 1)[0]
    if (
        header[257:263] == b"ustar\0"
    ):  # POSIX ustar (GNU's "ustar  " keeps other fields where the prefix goes)
        prefix = header[345:500].split(b"\0", 1)[0]
        if prefix:
            name = prefix + b"/" + name
    return name.decode("utf-8", "surrogateescape")


def tarfile_members(
    source: str | BinaryIO, max_member_bytes: int = MAX_MEMBER_BYTES, base: int = 0
) -> Iterator[tuple[str, bytes | Oversized]]:
    """(name, bytes) of the regular files, through `tarfile` in stream mode: a URL (gopen: files, `pipe:`, ...),
    or an open file positioned at byte `base` (the fast walker's hand-over). tarfile ends its loop quietly
    at a damaged header or a cut as at the end of the archive; the last block it read tells them apart."""
    with contextlib.ExitStack() as stack:
        stream = stack.enter_context(gopen(source, "rb")) if isinstance(source, str) else source
        tar = stack.enter_context(tarfile.open(fileobj=stream, mode="r|*"))
        tar.fileobj = blocks = LastRead(tar.fileobj)
        for info in tar:
            if info.isreg():
                if info.size > max_member_bytes:
                    yield info.name, Oversized(info.size)  # tarfile skips it, reading but not keeping it
                else:
                    data = tar.extractfile(info)
                    yield info.name, data.read() if data else b""
            tar.members = []  # streaming: do not keep every TarInfo
        at = f"byte {base + tar.offset}" + ("" if blocks.comptype == "tar" else " of the uncompressed stream")
        if blocks.last is not None and blocks.last != ZERO_BLOCK:  # None: the first header was the end
            if len(blocks.last) < BLOCK:
                raise tarfile.ReadError(f"archive cut short at {at} (no end-of-archive blocks)")
            raise tarfile.ReadError(f"invalid header at {at}")
        rest = 0
        while chunk := blocks.read(1 << 20):
            if chunk.count(0) != len(chunk):
                raise tarfile.ReadError(f"data after the end-of-archive block at {at}")
            rest += len(chunk)
        if rest < BLOCK:
            raise tarfile.ReadError(f"archive cut short after {at} (one end-of-archive block)")


class LastRead:
    """tarfile's stream, keeping the last block read (tarfile reads each header as one block)."""

    def __init__(self, stream: Any) -> None:
        self.stream = stream
        self.last: bytes | None = None

    def read(self, size: int = -1) -> bytes:
        self.last = self.stream.read(size)
        return self.last

    def __getattr__(self, name: str) -> Any:
        return getattr(self.stream, name)


@dataclass
class Limits:
    max_text_chars: int
    image_size: int
    images_per_sample: int
    decode_images: bool = True
    """False: a sample's images are only counted (None for each present one), not decoded: the image features of its
    item come from items.parquet through the frozen-feature cache (`trainer/models/frozen_cache.py`)."""
    jpeg_on_device: bool = False
    """True (`data.image_decode = "device"`): a JPEG is only checked here (its header, as `check_image_header` does,
    and an end-of-image marker after its scan data) and kept as `EncodedJpeg` for the device to decode; PNGs and
    the JPEGs the device is not given (`jpeg_for_device`) are still decoded here."""


@dataclass(frozen=True)
class EncodedJpeg:
    """A JPEG whose header passed the checks, left for the device to decode (`trainer/data/device_decode.py`), with
    where it came from for a bad-sample message."""

    data: bytes
    shard: str
    key: str
    field: str


def parse_sample(raw: RawSample, spec: DatasetSpec, limits: Limits) -> dict[str, Any]:
    """Decode and check one sample (its binary `.rec` record, else its `.json` one); raises BadSample. Missing
    optional features become empty/zero."""

    def bad(field_name: str, reason: str, detail: str = "") -> BadSample:
        return BadSample(raw.shard, raw.key, field_name, reason, detail)

    if binary.EXT in raw.members:
        out = binary.decode(
            raw.members[binary.EXT], RecordLayout.of(spec), spec.history, limits.max_text_chars, bad
        )
        out["__key__"] = raw.key
        out["images"] = _images(raw, limits, bad)
        return out
    if "json" not in raw.members:
        raise bad("json", "missing_field", f"members: {sorted(raw.members)}")
    try:
        record = json.loads(raw.members["json"])
    # ValueError: also integers past Python's digit limit; RecursionError: nesting too deep to parse
    except (UnicodeDecodeError, ValueError, RecursionError) as err:
        raise bad("json", "malformed_json", str(err)) from err
    if not isinstance(record, dict):
        raise bad("json", "malformed_json", "not an object")

    out: dict[str, Any] = {"__key__": raw.key}
    for name in ("user_id", "item_id", "timestamp"):
        if name not in record:
            raise bad(name, "missing_field")
        out[name] = _int(record[name], name, bad)
    for name in ("query_id", "session_id", "request_id"):
        out[name] = _int(record[name], name, bad) if record.get(name) is not None else 0
    cold = record.get("cold", 0)
    if cold not in (0, 1) or isinstance(cold, float):  # True/False are 1/0; "false" is not a flag
        raise bad("cold", "bad_type", f"expected 0 or 1, got {cold!r}"[:120])
    out["cold"] = bool(cold)

    labels = record.get("labels")
    if not isinstance(labels, dict):
        raise bad("labels", "missing_field")
    out["labels"] = []
    for name in spec.labels:
        value = labels.get(name)
        if value not in (0, 1) or isinstance(value, float) and not value.is_integer():
            raise bad(f"labels.{name}", "missing_field" if value is None else "bad_label", repr(value))
        out["labels"].append(float(value))

    sparse = _section(record, "sparse", bad)
    out["sparse"] = {}
    for name in spec.sparse:
        values = sparse.get(name, [])
        values = values if isinstance(values, list) else [values]
        out["sparse"][name] = _ints(values, f"sparse.{name}", bad)

    dense = _section(record, "dense", bad)
    out["dense"] = [_float(dense.get(name, 0.0), f"dense.{name}", bad) for name in spec.dense]

    history = _section(record, "history", bad)
    out["history"] = {}
    for name, max_len in spec.history.items():
        ids = history.get(name, [])
        if not isinstance(ids, list):
            raise bad(f"history.{name}", "bad_type", "expected a list of ids")
        if len(ids) > max_len:
            raise bad(f"history.{name}", "history_too_long", f"{len(ids)} > {max_len}")
        out["history"][name] = _ints(ids, f"history.{name}", bad)

    text = _section(record, "text", bad)
    out["text"] = {name: _text(text.get(name, ""), f"text.{name}", limits, bad) for name in spec.text}
    out["query"] = _text(record.get("query") or "", "query", limits, bad)
    out["images"] = _images(raw, limits, bad)
    return out


def _section(record: dict[str, Any], name: str, bad: Any) -> dict[str, Any]:
    section = record.get(name, {})
    if section is None:
        return {}
    if not isinstance(section, dict):
        raise bad(name, "bad_type", "expected an object")
    return section


def _int(value: Any, name: str, bad: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise bad(name, "bad_id", f"expected an integer, got {value!r}"[:120])
    if not INT64_MIN <= value <= INT64_MAX:
        raise bad(name, "bad_id", f"{value} is outside int64")
    return value


def _ints(values: list[Any], name: str, bad: Any) -> list[int]:
    """`[_int(v) for v in values]`. Histories hold up to thousands of ids, so the usual case (every value a plain int
    within int64) is checked in bulk, in C; only a list that fails it goes value by value, for the same error."""
    if list(map(type, values)).count(int) == len(values) and (
        not values or (min(values) >= INT64_MIN and max(values) <= INT64_MAX)
    ):
        return values
    return [_int(v, name, bad) for v in values]


def _float(value: Any, name: str, bad: Any) -> float:
    """A dense value as the batch holds it (float32): a number whose float32 is finite, else a BadSample."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise bad(name, "bad_type", f"expected a number, got {value!r}"[:120])
    try:
        number = float(value)
    except OverflowError:  # an integer past float64
        number = math.inf
    if not math.isfinite(number) or abs(number) > FLOAT32_MAX:
        raise bad(
            name,
            "nan_dense",
            f"{value!r}"[:120] + (" (not finite as float32)" if math.isfinite(number) else ""),
        )
    return number


def _text(value: Any, name: str, limits: Limits, bad: Any) -> str:
    if not isinstance(value, str):
        raise bad(name, "bad_type", "expected a string")
    if len(value) > limits.max_text_chars:
        raise bad(name, "text_too_long", f"{len(value)} > {limits.max_text_chars} chars")
    return value


def image_members(members: dict[str, bytes]) -> list[str]:
    """`jpg`, then `1.jpg`, `2.jpg`, ... (any of the image extensions), in index order."""
    found = []
    for ext in members:
        parts = ext.split(".")
        if parts[-1] in IMAGE_EXTS and (len(parts) == 1 or (len(parts) == 2 and parts[0].isdigit())):
            found.append((int(parts[0]) if len(parts) == 2 else 0, ext))
    return [ext for _, ext in sorted(found)]


def _images(raw: RawSample, limits: Limits, bad: Any) -> list[np.ndarray | EncodedJpeg | None]:
    present = image_members(raw.members)[: limits.images_per_sample]
    if not limits.decode_images:
        return [None] * len(present)
    out: list[np.ndarray | EncodedJpeg | None] = []
    for ext in present:
        data = raw.members[ext]
        try:
            if limits.jpeg_on_device and jpeg_for_device(data):
                out.append(EncodedJpeg(data, raw.shard, raw.key, ext))
            else:
                out.append(decode_image(data, limits.image_size))
        except (OSError, ValueError, Image.DecompressionBombError) as err:
            raise bad(ext, "bad_image", str(err)) from err
    return out


IMAGE_FORMATS = ("JPEG", "PNG")
MAX_IMAGE_SIDE = 8192
"""Pixels a side an image may claim (67 M pixels at most, under PIL's decompression-bomb warning)."""
MIN_COMPRESSED_BYTES_PER_PIXEL = {"JPEG": 1 / 1024, "PNG": 1 / 1032}
"""Bytes per pixel an image needs at the least: a flat JPEG still spends a few bits per 8x8 block, deflate never
compresses past 1032:1. Fewer bytes than this for the size a header claims is a damaged or forged header, which
libjpeg would otherwise decode as grey without an error."""


def check_image_header(image: Image.Image, data: bytes) -> None:
    """A JPEG or PNG whose claimed size is bounded and fits its bytes; anything else raises ValueError."""
    if image.format not in IMAGE_FORMATS:
        raise ValueError(f"a {image.format or 'unknown'} image, not JPEG or PNG")
    check_claimed_size(image.format, *image.size, len(data))


def check_claimed_size(image_format: str, width: int, height: int, size: int) -> None:
    """The size a header claims is bounded and fits the image's `size` bytes; else ValueError."""
    if max(width, height) > MAX_IMAGE_SIDE or min(width, height) < 1:
        raise ValueError(f"claims {width}x{height} pixels (at most {MAX_IMAGE_SIDE} a side)")
    if size < width * height * MIN_COMPRESSED_BYTES_PER_PIXEL[image_format]:
        raise ValueError(f"{size} bytes cannot hold the {width}x{height} pixels its header claims")


def open_image(data: bytes) -> Image.Image:
    """PIL's lazy open: the header is parsed, no pixel decoded."""
    with warnings.catch_warnings():  # a header past PIL's bomb threshold is refused by `check_image_header`
        warnings.simplefilter("ignore", Image.DecompressionBombWarning)
        return Image.open(io.BytesIO(data))


@dataclass(frozen=True)
class JpegHeader:
    """What `jpeg_header` reads from a JPEG's markers, up to its first scan."""

    frame: int
    """The SOF marker's code: 0xC0 baseline, 0xC1 extended sequential, 0xC2 progressive, ..."""
    precision: int
    width: int
    height: int
    components: bytes
    """The frame's component ids, one byte each (1: grey; 3: YCbCr, or RGB with ids b"RGB"; 4: CMYK/YCCK)."""
    adobe_transform: int | None
    """The Adobe APP14 segment's colour transform (0: no YCbCr transform), None without that segment."""
    scan: int
    """Where the first scan's entropy-coded data starts."""


SOF_MARKERS = frozenset(range(0xC0, 0xD0)) - {0xC4, 0xC8, 0xCC}  # 0xC4 DHT, 0xC8 JPG, 0xCC DAC are not frames
STANDALONE_MARKERS = frozenset([0x01, *range(0xD0, 0xD8)])
DEVICE_FRAMES = (0xC0, 0xC1)
"""Baseline and extended sequential Huffman JPEGs: what nvJPEG's batched decoder takes; progressive, lossless and
arithmetic-coded ones are decoded on the CPU."""
JPEG_EOI = b"\xff\xd9"


def jpeg_header(data: bytes) -> JpegHeader | None:
    """A walk over a JPEG's marker segments up to its first scan (a few µs, where PIL's header parse takes tens).
    None where the walk meets anything it does not expect (no JPEG start, junk between segments, a segment cut
    short, no frame before the scan): such bytes go through PIL, as on the CPU path."""
    if not data.startswith(b"\xff\xd8"):
        return None
    n, pos = len(data), 2
    frame: tuple[int, int, int, int, bytes] | None = None
    adobe: int | None = None
    while pos + 4 <= n:
        if data[pos] != 0xFF:
            return None
        marker = data[pos + 1]
        if marker == 0xFF:  # fill byte
            pos += 1
            continue
        if marker in STANDALONE_MARKERS:
            pos += 2
            continue
        length = int.from_bytes(data[pos + 2 : pos + 4], "big")
        end = pos + 2 + length
        if length < 2 or end > n:
            return None
        if marker in SOF_MARKERS:
            if length < 8:
                return None
            count = data[pos + 9]
            ids = bytes(data[pos + 10 + 3 * c] for c in range(count) if pos + 10 + 3 * c < end)
            height = int.from_bytes(data[pos + 5 : pos + 7], "big")
            width = int.from_bytes(data[pos + 7 : pos + 9], "big")
            frame = (marker, data[pos + 4], width, height, ids)
        elif marker == 0xEE and length >= 14 and data[pos + 4 : pos + 9] == b"Adobe":
            adobe = data[pos + 15]
        elif marker == 0xDA:
            if frame is None:
                return None
            return JpegHeader(*frame, adobe_transform=adobe, scan=end)
        elif marker == 0xD9:
            return None
        pos = end
    return None


def jpeg_for_device(data: bytes) -> bool:
    """Whether these image bytes are a JPEG to leave to the device decoder. Its header is checked as the CPU path
    checks it (`check_claimed_size`; ValueError otherwise), and a file cut short in its scan data (no end-of-image
    marker after the scan starts: the CPU decoder refuses it as truncated, nvJPEG would decode it without a word)
    is refused here, so that the reader skips it and keeps its batch full. False: decode it on the CPU (PNG, and
    JPEGs that are not 8-bit baseline/sequential grey or YCbCr, or whose header this walk does not follow)."""
    header = jpeg_header(data)
    if header is None:
        return False
    check_claimed_size("JPEG", header.width, header.height, len(data))
    rgb_coded = header.adobe_transform == 0 or header.components == b"RGB"
    if (
        header.frame not in DEVICE_FRAMES
        or header.precision != 8
        or len(header.components) not in (1, 3)
        or (len(header.components) == 3 and rgb_coded)
    ):
        return False
    # entropy-coded data never holds 0xFFD9 (0xFF is stuffed as 0xFF00), so the marker past the scan is the end
    if data.rfind(JPEG_EOI, header.scan) < 0:  # searched from the end, where it is
        raise ValueError("image file is truncated (no end-of-image marker after the scan data)")
    return True


def decode_image(data: bytes, size: int) -> np.ndarray:
    """JPEG/PNG bytes -> uint8 [size, size, 3]. `draft` lets libjpeg decode at a reduced scale when it can."""
    image = open_image(data)
    with image:
        check_image_header(image, data)
        image.draft("RGB", (size, size))
        image = image.convert("RGB")
        if image.size != (size, size):
            image = image.resize((size, size), Image.BILINEAR)
        return np.asarray(image, dtype=np.uint8)
