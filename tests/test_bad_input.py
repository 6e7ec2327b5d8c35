"""A corpus of bad samples through both policies: `error` names shard, key and field; `skip` counts by reason."""

from __future__ import annotations

import gc
import io
import json
import pickle
import shutil
import signal
import tarfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
import torch

from tests.conftest import small_config
from trainer.data.decode import BadSample
from trainer.data.reader import NoProgress, make_batch_stream
from trainer.data.spec import ShardInfo, read_spec, write_spec
from trainer.dataset_tools.shard_writer import ShardWriter

MARKER = Path("/tmp/lemur-test-unpickled")


class Exploit:
    """Unpickling this would create MARKER."""

    def __reduce__(self):  # type: ignore[no-untyped-def]
        return (Path.touch, (MARKER,))


def good_samples(dataset: Path, n: int) -> list[tuple[str, dict[str, bytes]]]:
    spec = read_spec(dataset)
    out: dict[str, dict[str, bytes]] = {}
    with tarfile.open(dataset / spec.shards["eval"][0].name) as tar:
        for info in tar:
            key, ext = info.name.split(".", 1)
            if len(out) == n and key not in out:
                break
            out.setdefault(key, {})[ext] = tar.extractfile(info).read()
    return list(out.items())


def corrupt(kind: str, members: dict[str, bytes]) -> dict[str, bytes]:
    record = json.loads(members["json"])
    members = dict(members)
    if kind == "bad_image":
        members["jpg"] = members["jpg"][: len(members["jpg"]) // 2]
    elif kind == "malformed_json":
        members["json"] = members["json"][:-7]
    elif kind == "missing_field":
        del record["user_id"]
    elif kind == "bad_id":
        record["item_id"] = 2**64 + 5
    elif kind == "nan_dense":
        record["dense"]["hour"] = float("nan")
    elif kind == "text_too_long":
        record["text"]["title"] = "word " * 2000
    elif kind == "history_too_long":
        record["history"]["long"] = record["history"]["long"] * 50
    elif kind == "missing_json":
        del members["json"]
    if kind not in ("bad_image", "malformed_json", "missing_json"):
        members["json"] = json.dumps(
            record
        ).encode()  # NaN is written as the token NaN, which json.loads reads
    return members


KINDS = {
    "bad_image": "jpg",
    "malformed_json": "json",
    "missing_field": "user_id",
    "bad_id": "item_id",
    "nan_dense": "dense.hour",
    "text_too_long": "text.title",
    "history_too_long": "history.long",
}


def write_dataset(
    src: Path, out: Path, samples: list[tuple[str, dict[str, bytes]]], truncate: bool = False
) -> Path:
    out.mkdir(parents=True)
    shutil.copytree(src / "tokenizer", out / "tokenizer")
    with ShardWriter(out / "eval-000000.tar") as writer:
        for key, members in samples:
            writer.write(key, members)
    if truncate:
        data = (out / "eval-000000.tar").read_bytes()
        (out / "eval-000000.tar").write_bytes(data[: len(data) // 2 + 100])
    spec = read_spec(src)
    spec.shards = {"eval": [ShardInfo("eval-000000.tar", len(samples))]}
    write_spec(out, spec)
    return out


@pytest.mark.parametrize("kind", sorted(KINDS))
def test_error_policy_names_shard_key_and_field(small_dataset: Path, tmp_path: Path, kind: str) -> None:
    good = good_samples(small_dataset, 3)
    bad_key, bad_members = good[1]
    samples = [good[0], (bad_key, corrupt(kind, bad_members)), good[2]]
    data = write_dataset(small_dataset, tmp_path / "d", samples)
    with pytest.raises(BadSample) as info:
        list(make_batch_stream(small_config(data, "data.bad_input=error"), "eval"))
    err = info.value
    assert err.reason == kind and err.key == bad_key and err.field == KINDS[kind]
    assert "eval-000000.tar" in str(err) and bad_key in str(err) and KINDS[kind] in str(err)


def test_skip_policy_counts_by_reason_and_keeps_the_rest(small_dataset: Path, tmp_path: Path) -> None:
    good = good_samples(small_dataset, 2 * len(KINDS) + 1)
    samples = []
    for i, kind in enumerate(sorted(KINDS)):
        samples.append(good[2 * i])
        key, members = good[2 * i + 1]
        samples.append((key, corrupt(kind, members)))
    samples.append(good[-1])
    data = write_dataset(small_dataset, tmp_path / "d", samples)
    stream = make_batch_stream(small_config(data, "data.bad_input=skip"), "eval")
    valid = sum(int(b.valid.sum()) for b in stream)
    assert valid == len(KINDS) + 1
    assert stream.skipped == {kind: 1 for kind in KINDS}
    assert "skipped 7 bad samples" in stream.report()


def test_truncated_tar_is_reported_or_skipped(small_dataset: Path, tmp_path: Path) -> None:
    data = write_dataset(small_dataset, tmp_path / "d", good_samples(small_dataset, 20), truncate=True)
    with pytest.raises(BadSample, match="corrupt_tar") as info:
        list(make_batch_stream(small_config(data), "eval"))
    assert "eval-000000.tar" in str(info.value)
    stream = make_batch_stream(small_config(data, "data.bad_input=skip"), "eval")
    valid = sum(int(b.valid.sum()) for b in stream)
    # every sample the shard held is delivered or counted: the cut costs all the samples after it
    assert 0 < valid < 20 and stream.skipped == {"corrupt_tar": 20 - valid}


def test_nothing_is_ever_unpickled(small_dataset: Path, tmp_path: Path) -> None:
    MARKER.unlink(missing_ok=True)
    good = good_samples(small_dataset, 2)
    payload = pickle.dumps(Exploit())
    samples = [(key, {**members, "pyd": payload, "pickle": payload}) for key, members in good]
    data = write_dataset(small_dataset, tmp_path / "d", samples)
    batches = list(make_batch_stream(small_config(data), "eval"))
    assert sum(int(b.valid.sum()) for b in batches) == 2
    assert not MARKER.exists()


def _record_with(base: dict, **changes: object) -> bytes:
    return json.dumps({**base, **changes}).encode()


def test_records_that_used_to_crash_the_reader_are_bad_samples(small_dataset: Path) -> None:
    """Each of these once escaped as RecursionError, ValueError or OverflowError, or was read wrongly (a string
    "false" as a true cold flag, 1e39 as a float32 inf); each is now that sample's BadSample."""
    from trainer.data.decode import Limits, RawSample, parse_sample

    spec = read_spec(small_dataset)
    limits = Limits(max_text_chars=1000, image_size=24, images_per_sample=0)
    key, members = good_samples(small_dataset, 1)[0]
    base = json.loads(members["json"])
    cases = {
        "nested 100k deep": (b"[" * 100_000 + b"]" * 100_000, "json", "malformed_json"),
        "5,000-digit id": (
            members["json"].replace(str(base["user_id"]).encode(), b"9" * 5000, 1),
            "json",
            "malformed_json",
        ),
        "dense 10**400": (
            _record_with(base, dense={**base["dense"], "hour": 10**400}),
            "dense.hour",
            "nan_dense",
        ),
        "dense 1e39": (_record_with(base, dense={**base["dense"], "hour": 1e39}), "dense.hour", "nan_dense"),
        'cold "false"': (_record_with(base, cold="false"), "cold", "bad_type"),
    }
    for name, (payload, field, reason) in cases.items():
        with pytest.raises(BadSample) as err:
            parse_sample(RawSample("s.tar", key, {"json": payload}), spec, limits)
        assert (err.value.field, err.value.reason) == (field, reason), name
    assert parse_sample(RawSample("s.tar", key, {"json": _record_with(base, cold=True)}), spec, limits)[
        "cold"
    ]


# ------------------------------------------------------------- issue 12: no silent loss, no endless skip, dataset.json


def one_shard_dataset(
    src: Path, out: Path, shard: bytes, count: int, labels: list[str] | None = None, copies: int = 1
) -> Path:
    """A dataset whose train and eval splits are both the one shard `shard.tar` (or `copies` of it,
    `shard0.tar`, ...), which dataset.json counts as `count` samples."""
    out.mkdir(parents=True)
    shutil.copytree(src / "tokenizer", out / "tokenizer")
    names = ["shard.tar"] if copies == 1 else [f"shard{i}.tar" for i in range(copies)]
    for name in names:
        (out / name).write_bytes(shard)
    spec = read_spec(src)
    spec.shards = {split: [ShardInfo(name, count) for name in names] for split in ("train", "eval")}
    spec.labels = labels or spec.labels
    write_spec(out, spec)
    return out


def shard_bytes(
    samples: list[tuple[str, dict[str, bytes]]], fmt: int = tarfile.GNU_FORMAT, pax: int = -1
) -> bytes:
    """A tar of the samples; `pax`: the member given a pax header `size=abc` (tarfile reads it as size 0)."""
    out = io.BytesIO()
    with tarfile.open(fileobj=out, mode="w", format=fmt) as tar:
        names = [(f"{key}.{ext}", payload) for key, members in samples for ext, payload in members.items()]
        for i, (name, payload) in enumerate(names):
            info = tarfile.TarInfo(name)
            info.size = len(payload)
            info.pax_headers = {"size": "abc"} if i == pax else {}
            tar.addfile(info, io.BytesIO(payload))
    return out.getvalue()


class Hang(BaseException):
    """Past a deadline (a BaseException, so no `except Exception` in the reader swallows it)."""


@contextmanager
def deadline(seconds: float) -> Iterator[None]:
    """Fails the test instead of hanging it."""

    def fire(signum: int, frame: object) -> None:
        raise Hang(f"still running after {seconds} s")

    previous = signal.signal(signal.SIGALRM, fire)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


def read_eval(data: Path, policy: str, pattern: str = "") -> tuple[int, dict[str, int]]:
    overrides = [f"data.bad_input={policy}"] + ([f'data.eval_shards="{pattern}"'] if pattern else [])
    stream = make_batch_stream(small_config(data, *overrides), "eval")
    with deadline(60):
        valid = sum(int(b.valid.sum()) for b in stream)
    return valid, dict(stream.skipped)


def flip_header_bit(data: bytes, member: int) -> bytes:
    with tarfile.open(fileobj=io.BytesIO(data)) as tar:
        offset = tar.getmembers()[member].offset
    out = bytearray(data)
    out[offset + 100] ^= 0x04  # in the mode field: the name still reads, the checksum does not
    return bytes(out)


DAMAGE = {
    "header bit flip": lambda good: flip_header_bit(shard_bytes(good), 21),
    "pax size=abc": lambda good: shard_bytes(good, tarfile.PAX_FORMAT, pax=21),
    "zero blocks mid-tar": lambda good: (lambda d: d[:6144] + bytes(2048) + d[8192:])(shard_bytes(good)),
    "data after the end": lambda good: shard_bytes(good) + b"more",
    "two tars run together": lambda good: shard_bytes(good) + shard_bytes(good),
}


@pytest.mark.parametrize("damage", sorted(DAMAGE))
@pytest.mark.parametrize("piped", [False, True], ids=["file", "pipe"])
def test_mid_tar_damage_is_an_error_or_counted_per_lost_sample(
    small_dataset: Path, tmp_path: Path, damage: str, piped: bool
) -> None:
    """Item 7: tarfile stops quietly at a damaged header after the first (and at a pax size it cannot parse, and
    at the first end-of-archive blocks); the reader does not, on a local file (its own header walker) or a pipe
    (tarfile, with the last block it read checked). Under skip every sample the shard held is delivered or
    counted."""
    good = good_samples(small_dataset, 20)
    data = one_shard_dataset(small_dataset, tmp_path / "d", DAMAGE[damage](good), 20)
    pattern = f"pipe:cat {data / 'shard.tar'}" if piped else ""
    with pytest.raises(BadSample, match="corrupt_tar") as err:
        read_eval(data, "error", pattern)
    assert "shard.tar" in str(err.value)
    valid, skipped = read_eval(data, "skip", pattern)
    assert set(skipped) == {"corrupt_tar"} and valid + skipped["corrupt_tar"] == 20
    if "tars" not in damage and "after" not in damage:
        assert valid < 20


def test_a_truncated_shard_counts_every_sample_it_lost(small_dataset: Path, tmp_path: Path) -> None:
    good = shard_bytes(good_samples(small_dataset, 20))
    for cut in (700, len(good) // 3, 2 * len(good) // 3):
        data = one_shard_dataset(small_dataset, tmp_path / f"d{cut}", good[:cut], 20)
        valid, skipped = read_eval(data, "skip")
        lost = skipped.get("corrupt_tar", 0) + skipped.get("missing_samples", 0)
        assert valid + lost == 20 and valid < 20, (cut, valid, skipped)


@pytest.mark.parametrize("listed,reason", [(25, "missing_samples"), (15, "extra_samples")])
def test_a_shard_that_disagrees_with_its_count(
    small_dataset: Path, tmp_path: Path, listed: int, reason: str
) -> None:
    """dataset.json's count plans eval and train; a shard holding fewer samples counts the rest as missing, one
    holding more is read up to its count and the rest counted as extra (a rank cannot take more batches than the
    others)."""
    data = one_shard_dataset(
        small_dataset, tmp_path / "d", shard_bytes(good_samples(small_dataset, 20)), listed
    )
    with pytest.raises(BadSample, match=reason) as err:
        read_eval(data, "error")
    assert f"dataset.json counts {listed} samples" in str(err.value)
    valid, skipped = read_eval(data, "skip")
    assert valid == min(20, listed) and skipped == {reason: abs(20 - listed)}


def test_a_count_no_file_could_hold_is_stopped_before_reading(small_dataset: Path, tmp_path: Path) -> None:
    """Item 10: a count of 10**12 never finished; it is checked against the file's size (a sample takes at least a
    512-byte header): an error under `error`, under `skip` the shard is planned at what it can hold."""
    data = one_shard_dataset(
        small_dataset, tmp_path / "d", shard_bytes(good_samples(small_dataset, 20)), 10**12
    )
    with pytest.raises(BadSample, match="can hold at most") as err:
        make_batch_stream(small_config(data), "eval")
    assert str(data / "dataset.json") in str(err.value) and err.value.reason == "missing_samples"
    valid, skipped = read_eval(data, "skip")
    assert valid == 20 and skipped == {"missing_samples": 10**12 - 20}


def all_bad(samples: list[tuple[str, dict[str, bytes]]]) -> list[tuple[str, dict[str, bytes]]]:
    return [(key, corrupt("missing_field", members)) for key, members in samples]


@pytest.mark.parametrize("case", ["every sample bad", "a label no sample has", "every sample lost"])
@pytest.mark.parametrize("workers", [0, 2])
def test_train_under_skip_gives_up_when_a_pass_yields_nothing(
    small_dataset: Path, tmp_path: Path, case: str, workers: int
) -> None:
    """Item 9: train under skip used to re-read its shards forever when no sample was good. A reader gives up after
    a full pass over its shards without one good sample, naming the split, the shards and the skips by reason
    (also from a DataLoader worker)."""
    good, out, copies = good_samples(small_dataset, 40), tmp_path / "d", max(1, workers)
    if case == "every sample bad":
        data = one_shard_dataset(small_dataset, out, shard_bytes(all_bad(good)), 40, copies=copies)
    elif case == "a label no sample has":
        labels = [*read_spec(small_dataset).labels, "like"]
        data = one_shard_dataset(small_dataset, out, shard_bytes(good), 40, labels=labels, copies=copies)
    else:
        data = one_shard_dataset(small_dataset, out, flip_header_bit(shard_bytes(good), 0), 40, copies=copies)
    cfg = small_config(data, "data.bad_input=skip", f"data.num_workers={workers}")
    with deadline(120), pytest.raises(NoProgress) as err:
        for _ in make_batch_stream(cfg, "train", epochs=1):
            pass
    started = time.monotonic()
    gc.collect()  # the workers ended with the error: nothing left to wait for (it once took 5 s a worker)
    assert time.monotonic() - started < 2
    message = str(err.value)
    assert "train reader" in message and "shard" in message and "no good sample" in message
    expected = {
        "every sample bad": "missing_field=40 (user_id)",
        "a label no sample has": "missing_field=40 (labels.like)",
        "every sample lost": "corrupt_tar=40 (<tar>)",
    }[case]
    assert expected in message


def test_train_tops_up_and_finishes_when_few_samples_are_good(small_dataset: Path, tmp_path: Path) -> None:
    """Progress, however slow, is not a reason to give up: 3 good samples of 40 fill 2 batches of 16 by reading
    the shard again."""
    good = good_samples(small_dataset, 40)
    samples = good[:3] + all_bad(good[3:])
    data = one_shard_dataset(small_dataset, tmp_path / "d", shard_bytes(samples), 40)
    stream = make_batch_stream(
        small_config(data, "data.bad_input=skip", "data.shuffle_buffer=1"), "train", epochs=1
    )
    with deadline(60):
        assert len(list(stream)) == 2
    assert stream.skipped["missing_field"] >= 37 * 10


@pytest.mark.parametrize("workers", [0, 2])
def test_resume_under_skip_counts_each_skip_once(small_dataset: Path, tmp_path: Path, workers: int) -> None:
    """The samples a resumed reader passes over were read before the checkpoint: the damage it meets again on the
    way is not counted again, and a top-up pass it passes over is not taken for a pass without progress. The
    batches are those of an uninterrupted run."""
    data = tmp_path / "d"
    shutil.copytree(small_dataset, data, ignore=shutil.ignore_patterns(".cache"))
    shards = [data / info.name for info in read_spec(data).shards["train"][:3]]
    for shard in shards[:2]:
        shard.write_bytes(flip_header_bit(shard.read_bytes(), 301))
    pattern = ",".join(map(str, shards))
    cfg = small_config(
        data,
        "data.bad_input=skip",
        f"data.num_workers={workers}",
        f'data.train_shards="{pattern}"',
        "model.use_images=false",
    )
    reference = make_batch_stream(cfg, "train", epochs=2)
    expected = [b.item_id for b in reference]
    first = make_batch_stream(cfg, "train", epochs=2)
    got = []
    for batch in first:
        got.append(batch.item_id)
        if len(got) == len(expected) * 3 // 8:  # late in the first epoch: past the damage, into a top-up pass
            break
    resumed = make_batch_stream(cfg, "train", epochs=2)
    resumed.load_state_dict(json.loads(json.dumps(first.state_dict())))
    got += [b.item_id for b in resumed]
    assert reference.skipped["corrupt_tar"] > 0 and resumed.skipped == reference.skipped
    assert len(got) == len(expected) and all(torch.equal(a, b) for a, b in zip(got, expected))


def _spec_json(dataset: Path) -> dict:
    return json.loads((dataset / "dataset.json").read_text())


SPEC_DAMAGE = {
    "not JSON": (lambda raw: "{ not json", "not valid JSON"),
    "not an object": (lambda raw: [], "expected a JSON object"),
    "count a string": (
        lambda raw: raw["shards"]["eval"][0].update(samples="300") or raw,
        "shards.eval[0].samples",
    ),
    "count negative": (
        lambda raw: raw["shards"]["eval"][0].update(samples=-1) or raw,
        "shards.eval[0].samples",
    ),
    "count a bool": (
        lambda raw: raw["shards"]["train"][1].update(samples=True) or raw,
        "shards.train[1].samples",
    ),
    "count a float": (
        lambda raw: raw["shards"]["eval"][1].update(samples=60.5) or raw,
        "shards.eval[1].samples",
    ),
    "shard name a path": (
        lambda raw: raw["shards"]["eval"][0].update(name="../x.tar") or raw,
        "shards.eval[0].name",
    ),
    "shard listed twice": (
        lambda raw: raw["shards"]["eval"].append(dict(raw["shards"]["eval"][0])) or raw,
        "shards.eval[2].name",
    ),
    "shard without a count": (lambda raw: raw["shards"]["eval"][0].pop("samples") and raw, "shards.eval[0]"),
    "no labels": (lambda raw: raw.update(labels=[]) or raw, "'labels'"),
    "history length a string": (lambda raw: raw["history"].update(long="40") or raw, "history.long"),
    "unknown field": (lambda raw: raw.update(extra=1) or raw, "unknown fields ['extra']"),
    "counts negative": (lambda raw: raw["counts"].update(train=-5) or raw, "counts.train"),
}


@pytest.mark.parametrize("case", sorted(SPEC_DAMAGE))
def test_a_malformed_dataset_json_is_an_error_naming_file_and_field(
    small_dataset: Path, tmp_path: Path, case: str
) -> None:
    """Item 10: a malformed dataset.json gave a bare JSONDecodeError or was taken as it was."""
    data = tmp_path / "d"
    data.mkdir()
    change, fragment = SPEC_DAMAGE[case]
    raw = change(_spec_json(small_dataset))
    (data / "dataset.json").write_text(raw if isinstance(raw, str) else json.dumps(raw))
    with pytest.raises(ValueError) as err:
        read_spec(data)
    assert str(data / "dataset.json") in str(err.value) and fragment in str(err.value), str(err.value)


def test_a_listed_shard_that_is_not_there_names_dataset_json(small_dataset: Path, tmp_path: Path) -> None:
    data = tmp_path / "d"
    shutil.copytree(small_dataset, data, ignore=shutil.ignore_patterns(".cache", "eval-000001.tar"))
    with pytest.raises(FileNotFoundError, match="eval-000001.tar: shard not found") as err:
        make_batch_stream(small_config(data), "eval")
    assert str(data / "dataset.json") in str(err.value)


def _jpeg(size: tuple[int, int] = (32, 32)) -> bytearray:
    import io

    import numpy as np
    from PIL import Image

    out = io.BytesIO()
    Image.fromarray((np.random.default_rng(0).random((*size[::-1], 3)) * 255).astype("uint8")).save(
        out, "JPEG"
    )
    return bytearray(out.getvalue())


@pytest.mark.parametrize(
    "claimed, message",
    [((12000, 12000), "at most 8192 a side"), ((4000, 4000), "cannot hold the 4000x4000 pixels")],
)
def test_a_jpeg_header_claiming_more_than_its_bytes_is_a_bad_image(
    claimed: tuple[int, int], message: str
) -> None:
    """libjpeg decodes such a file as flat grey without an error; the reader must not train on it."""
    import struct

    from trainer.data.decode import decode_image

    data = _jpeg()
    sof = data.find(b"\xff\xc0")
    data[sof + 5 : sof + 9] = struct.pack(">HH", *claimed[::-1])
    with pytest.raises(ValueError, match=message):
        decode_image(bytes(data), 24)
    assert decode_image(bytes(_jpeg()), 24).shape == (24, 24, 3)


@pytest.mark.parametrize("kind", ["GIF", "BMP", "WEBP"])
def test_images_other_than_jpeg_or_png_are_bad_images_whatever_their_name(kind: str) -> None:
    import io

    import numpy as np
    from PIL import Image

    from trainer.data.decode import decode_image

    out = io.BytesIO()
    Image.fromarray(np.zeros((8, 8, 3), dtype=np.uint8)).save(out, kind)
    with pytest.raises(ValueError, match=f"a {kind} image, not JPEG or PNG"):
        decode_image(out.getvalue(), 24)
