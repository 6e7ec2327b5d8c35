"""A corpus of bad samples through both policies: `error` names shard, key and field; `skip` counts by reason."""

from __future__ import annotations

import json
import pickle
import shutil
import tarfile
from pathlib import Path

import pytest

from tests.conftest import small_config
from trainer.data.decode import BadSample
from trainer.data.reader import make_batch_stream
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
    assert 0 < valid < 20 and stream.skipped == {"corrupt_tar": 1}


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
