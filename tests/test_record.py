"""Binary sample records (`trainer/data/record.py`): the reader gives the same batches from them as from the JSON
records they were converted from; synth writes them by default and they stay plain WebDataset tars; every way a
record can break is a BadSample naming its field; `lemur data convert` is idempotent and keeps bad samples."""

from __future__ import annotations

import dataclasses
import io
import itertools
import json
import math
import shutil
import tarfile
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
import webdataset as wds

from tests.conftest import small_config
from trainer.data import record
from trainer.data.decode import BadSample, Limits, RawSample, parse_sample
from trainer.data.reader import make_batch_stream
from trainer.data.spec import read_spec
from trainer.dataset_tools.convert import convert_dataset
from trainer.dataset_tools.shard_writer import ShardWriter
from trainer.dataset_tools.synth.generate import synthesize

TABLE_ROWS = {
    k: 997
    for k in [
        "user_id",
        "item_id",
        "query_id",
        "category",
        "author",
        "tags",
        "user_segment",
        "device",
        "short",
        "long",
    ]
}


def same_batch(a: Any, b: Any) -> None:
    for f in dataclasses.fields(a):
        x, y = getattr(a, f.name), getattr(b, f.name)
        if isinstance(x, torch.Tensor):
            assert x.dtype == y.dtype and torch.equal(x, y), f.name
        elif hasattr(x, "lengths"):  # KJTs
            assert x.keys() == y.keys() and torch.equal(x.values(), y.values()), f.name
            assert torch.equal(x.lengths(), y.lengths()), f.name
        elif hasattr(x, "input_ids"):
            assert torch.equal(x.input_ids, y.input_ids) and torch.equal(x.attention_mask, y.attention_mask)
        elif isinstance(x, dict) and x and hasattr(next(iter(x.values())), "input_ids"):
            for k in x:
                assert torch.equal(x[k].input_ids, y[k].input_ids), (f.name, k)
        else:
            assert x == y, f.name


@pytest.mark.parametrize("split,workers", [("train", 2), ("eval", 0)])
def test_binary_records_give_the_same_batches_as_json(
    small_dataset: Path, binary_dataset: Path, split: str, workers: int
) -> None:
    def batches(path: Path) -> list[Any]:
        cfg = small_config(path, f"data.num_workers={workers}")
        stream = make_batch_stream(cfg, split, table_rows=TABLE_ROWS, raw_histories=True, pad_to_longest=True)
        return list(itertools.islice(iter(stream), 6))

    json_batches, binary_batches = batches(small_dataset), batches(binary_dataset)
    assert len(json_batches) == len(binary_batches) == 6
    for a, b in zip(json_batches, binary_batches):
        same_batch(a, b)
    shard = read_spec(binary_dataset).shards["train"][0].name
    with tarfile.open(binary_dataset / shard) as tar:
        assert {n.split(".", 1)[1] for n in tar.getnames()} == {"rec", "jpg"}
    assert (binary_dataset / shard).stat().st_size < (small_dataset / shard).stat().st_size


def test_synth_writes_binary_records_in_plain_webdataset_tars(tmp_path: Path) -> None:
    cfg = small_config(tmp_path, 'data.synth.record_format="binary"', "data.synth.num_samples=600")
    synthesize(cfg.data.synth, tmp_path, vocab_size=cfg.data.vocab_size, progress=False)
    spec = read_spec(tmp_path)
    path = str(tmp_path / spec.shards["train"][0].name)
    samples = list(wds.WebDataset(path, shardshuffle=False))
    assert len(samples) == spec.shards["train"][0].samples and {"__key__", "rec", "jpg"} <= set(samples[0])
    batch = next(iter(make_batch_stream(cfg, "eval")))
    assert batch.size == cfg.data.batch_size and bool(batch.valid.all())
    assert batch.sequences.to_dict()["long"].lengths().sum() > 0


RECORD = {
    "user_id": 7,
    "item_id": 2**62,
    "timestamp": 1_700_000_000,
    "query_id": -3,
    "session_id": 11,
    "request_id": 11,
    "labels": {"click": 1},
    "sparse": {"category": [4], "tags": [1, 2, 3]},
    "dense": {"item_log_pop": 0.5, "hour": -1.25},
    "history": {"short": [5, 6], "long": list(range(40))},
    "text": {"title": "ünïcode title", "ocr": ""},
    "query": "a query",
    "cold": 1,
}


def _raw(members: dict[str, bytes]) -> RawSample:
    return RawSample("shard.tar", "k1", members)


def test_a_binary_record_decodes_to_what_its_json_gives(small_dataset: Path) -> None:
    spec = read_spec(small_dataset)
    limits = Limits(max_text_chars=1000, image_size=24, images_per_sample=0)
    from_json = parse_sample(_raw({"json": json.dumps(RECORD).encode()}), spec, limits)
    payload = record.encode(RECORD, record.RecordLayout.of(spec))
    from_binary = parse_sample(_raw({"rec": payload}), spec, limits)
    for key, value in from_json.items():
        got = from_binary[key]
        if isinstance(value, dict):
            assert {k: list(v) if isinstance(v, np.ndarray) else v for k, v in got.items()} == value, key
        elif isinstance(got, np.ndarray):
            assert got.tolist() == pytest.approx(value), key
        else:
            assert got == value, key
    assert record.as_json_record(from_binary, record.RecordLayout.of(spec))["labels"] == {"click": 1}


def _corrupt(payload: bytes, at: int, value: bytes) -> bytes:
    return payload[:at] + value + payload[at + len(value) :]


def test_every_broken_binary_record_names_its_field(small_dataset: Path) -> None:
    spec = read_spec(small_dataset)
    layout = record.RecordLayout.of(spec)
    limits = Limits(max_text_chars=100, image_size=24, images_per_sample=0)
    good = record.encode(RECORD, layout)
    k = layout.counts
    scalars = record.HEADER + 4 * (k + k % 2)
    dense = scalars + 8 * len(record.SCALARS)
    labels = len(good) - len("ünïcode title".encode()) - len(b"a query") - 1
    other_layout = dataclasses.replace(layout, dense=(*layout.dense, "extra"))
    long_history = {**RECORD, "history": {"long": list(range(spec.history["long"] + 1))}}
    cases = {
        "bad magic": (b"JUNK" + good[4:], "rec", "malformed_record"),
        "cut short": (good[:-3], "rec", "malformed_record"),
        "trailing bytes": (good + b"\0", "rec", "malformed_record"),
        "newer version": (_corrupt(good, 4, b"\x02\x00"), "rec", "malformed_record"),
        "another layout": (record.encode(RECORD, other_layout), "rec", "malformed_record"),
        "negative count": (_corrupt(good, record.HEADER, b"\xff\xff\xff\xff"), "rec", "malformed_record"),
        "cold not 0/1": (_corrupt(good, scalars + 8 * 6, b"\x05"), "cold", "bad_type"),
        "NaN dense": (
            _corrupt(good, dense + 8, np.float64("nan").tobytes()),
            "dense.user_log_activity",
            "nan_dense",
        ),
        "label 2": (_corrupt(good, labels, b"\x02"), "labels.click", "bad_label"),
        "dense past float32": (
            record.encode({**RECORD, "dense": {"hour": 1e39}}, layout),
            "dense.hour",
            "nan_dense",
        ),
        "history too long": (record.encode(long_history, layout), "history.long", "history_too_long"),
        "not UTF-8": (_corrupt(good, labels + 1, b"\xff"), "text.title", "bad_type"),
        "text too long": (record.encode({**RECORD, "query": "q" * 101}, layout), "query", "text_too_long"),
    }
    for name, (payload, field, reason) in cases.items():
        with pytest.raises(BadSample) as err:
            parse_sample(_raw({"rec": payload}), spec, limits)
        assert (err.value.field, err.value.reason) == (field, reason), (name, str(err.value))
        assert "shard.tar" in str(err.value) and "k1" in str(err.value), name
    with pytest.raises(ValueError, match="finite"):
        record.encode({**RECORD, "dense": {"hour": math.inf}}, layout)


def test_convert_is_idempotent_and_keeps_bad_samples(small_dataset: Path, tmp_path: Path) -> None:
    out = tmp_path / "data"
    shutil.copytree(small_dataset, out, ignore=shutil.ignore_patterns(".cache"))
    shard = out / read_spec(out).shards["train"][0].name
    with tarfile.open(shard) as tar:
        members = [(m.name, tar.extractfile(m).read()) for m in tar.getmembers()]
    with ShardWriter(shard) as writer:  # the first sample's record broken: a label of 3
        for i, (name, payload) in enumerate(members):
            key, ext = name.split(".", 1)
            if i == 0:
                payload = payload.replace(b'"click":0', b'"click":3').replace(b'"click":1', b'"click":3')
            writer.write(key, {ext: payload})
    done = convert_dataset(out, progress=False)
    assert done.shards == len(list(out.glob("*.tar"))) and done.kept_as_json == {"bad_label": 1}
    again = convert_dataset(out, progress=False)
    assert again.shards == 0 and again.already == done.shards
    assert not list(out.glob(".*.partial"))
    with tarfile.open(shard) as tar:
        exts = [n.split(".", 1)[1] for n in tar.getnames()]
    assert exts.count("json") == 1 and exts.count("rec") == len(members) // 2 - 1
    cfg = small_config(out, 'data.bad_input="skip"', "data.num_workers=0")
    stream = make_batch_stream(cfg, "eval")
    total = sum(int(b.valid.sum()) for b in stream)
    spec = read_spec(out)
    assert total == spec.counts["eval"]
    train = make_batch_stream(cfg, "train", epochs=1)
    for _ in train:
        pass
    assert train.skipped == {"bad_label": 1}


def test_inspect_reads_binary_records(binary_dataset: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from trainer.dataset_tools.inspect import inspect_dataset

    inspect_dataset(str(binary_dataset), samples=1, sheet=str(binary_dataset.parent / "sheet.png"))
    printed = capsys.readouterr().out
    assert "binary record" in printed and "invalid record" not in printed


def test_the_tar_walker_reads_what_tarfile_reads(binary_dataset: Path, tmp_path: Path) -> None:
    from trainer.data.decode import tarfile_members, ustar_members

    shard = binary_dataset / read_spec(binary_dataset).shards["train"][0].name
    assert list(ustar_members(str(shard))) == list(tarfile_members(str(shard)))
    for fmt in (tarfile.GNU_FORMAT, tarfile.PAX_FORMAT):  # long names: GNU 'L' and pax 'x' headers hand over
        path = tmp_path / f"{fmt}.tar"
        with tarfile.open(path, "w", format=fmt) as tar:
            for name in ("a/k1.json", "a/" + "x" * 150 + ".json", "a/k3.json"):
                info = tarfile.TarInfo(name)
                info.size = 2
                tar.addfile(info, io.BytesIO(b"{}"))
        assert list(ustar_members(str(path))) == list(tarfile_members(str(path)))
        assert len(list(ustar_members(str(path)))) == 3


def test_damage_in_the_middle_of_a_tar_is_reported_not_silent(binary_dataset: Path, tmp_path: Path) -> None:
    from trainer.data.decode import SkipCounter, tar_samples

    shard = binary_dataset / read_spec(binary_dataset).shards["train"][0].name
    data = bytearray(shard.read_bytes())
    with tarfile.open(shard) as tar:
        tenth = tar.getmembers()[20]  # the 11th sample's record header
    data[tenth.offset + 10] ^= 0x01  # one flipped bit in a name
    damaged = tmp_path / "damaged.tar"
    damaged.write_bytes(bytes(data))
    with pytest.raises(BadSample, match="corrupt_tar") as err:
        list(tar_samples(str(damaged), SkipCounter(policy="error")))
    assert "bad checksum" in str(err.value)
    skips = SkipCounter(policy="skip")
    # the 10th sample may lack members after the damage, so it goes with the rest of the shard
    assert len(list(tar_samples(str(damaged), skips))) == 9 and skips.counts == {"corrupt_tar": 1}
