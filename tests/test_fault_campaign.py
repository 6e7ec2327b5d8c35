"""The fault campaign (issue 12): seeded mutants of real shards, each read by the real reader under both policies.

Two base shards (the 60-sample eval shard of `small_dataset`, JSON records, and of `binary_dataset`, binary
records) go through every mutation below a few times with a fixed seed. Each mutant is written beside the others in
one campaign directory and listed in its dataset.json (under its own name, with the count the mutation leaves
dataset.json claiming), then read with a timeout:
- eval under `error`: it finishes with every sample delivered, or raises BadSample; anything else is a crash;
- eval under `skip`: it finishes, and delivered + skipped by reason == the shard's count in dataset.json
  (`extra_samples`, samples past that count, are counted apart: they are not among those it claims);
- train under `skip`, one epoch: it finishes, or gives up clearly (NoProgress, only where eval found no good
  sample; "no full batch" or "hold no samples": the shard cannot hold one batch).
`pytest -s` prints the per-mutation table."""

from __future__ import annotations

import gzip
import io
import json
import random
import tarfile
import time
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

from tests.conftest import small_config
from tests.test_bad_input import Hang, deadline
from trainer.data.decode import MAX_MEMBER_BYTES, BadSample
from trainer.data.reader import NoProgress, make_batch_stream
from trainer.data.spec import ShardInfo, read_spec, write_spec

SEED = 12
TIMEOUT_S = 10.0
"""Per read: a healthy read of a 60-sample shard takes ~30 ms."""


@dataclass
class Base:
    """A shard to mutate: its bytes and its members in order."""

    label: str
    data: bytes
    members: list[tarfile.TarInfo]
    samples: int

    def payloads(self) -> list[tuple[str, bytes]]:
        return [(m.name, self.data[m.offset_data : m.offset_data + m.size]) for m in self.members]

    def record_members(self) -> list[int]:
        return [i for i, m in enumerate(self.members) if m.name.endswith((".json", ".rec"))]


@dataclass
class Mutant:
    kind: str
    name: str
    data: bytes
    count: int
    """What dataset.json claims the shard holds."""


def load_base(label: str, path: Path, samples: int) -> Base:
    data = path.read_bytes()
    with tarfile.open(fileobj=io.BytesIO(data)) as tar:
        members = tar.getmembers()
    return Base(label, data, members, samples)


def write_tar(
    members: list[tuple[str, bytes]],
    fmt: int = tarfile.GNU_FORMAT,
    pax: dict[int, dict[str, str]] | None = None,
) -> bytes:
    out = io.BytesIO()
    with tarfile.open(fileobj=out, mode="w", format=fmt) as tar:
        for i, (name, payload) in enumerate(members):
            info = tarfile.TarInfo(name)
            info.size, info.mtime = len(payload), 0
            info.pax_headers = (pax or {}).get(i, {})
            tar.addfile(info, io.BytesIO(payload))
    return out.getvalue()


def edited(base: Base, index: int, payload: bytes) -> bytes:
    members = base.payloads()
    members[index] = (members[index][0], payload)
    return write_tar(members)


def mid_member(base: Base, rng: random.Random) -> int:
    """A member in the middle of the shard (not the first: tarfile itself notices damage there)."""
    return rng.randrange(len(base.members) // 4, len(base.members))


def flip_bits(data: bytes, rng: random.Random, at: int, span: int, flips: int) -> bytes:
    out = bytearray(data)
    for _ in range(flips):
        out[at + rng.randrange(span)] ^= 1 << rng.randrange(8)
    return bytes(out)


# ---------------------------------------------------------------------------------------------- the mutations
# Each: (base, rng) -> (shard bytes, dataset.json count); the count is the base's unless the mutation is of it.


def truncate(base: Base, rng: random.Random) -> tuple[bytes, int]:
    return base.data[: rng.randrange(len(base.data))], base.samples


def header_bit_flip(base: Base, rng: random.Random) -> tuple[bytes, int]:
    member = base.members[mid_member(base, rng)]
    return flip_bits(base.data, rng, member.offset, tarfile.BLOCKSIZE, 1), base.samples


def random_bytes(base: Base, rng: random.Random) -> tuple[bytes, int]:
    at, n = rng.randrange(len(base.data) // 4, len(base.data)), rng.randint(1, 1500)
    out = bytearray(base.data)
    out[at : at + n] = rng.randbytes(len(out[at : at + n]))
    return bytes(out), base.samples


def zero_hole(base: Base, rng: random.Random) -> tuple[bytes, int]:
    member = base.members[mid_member(base, rng)]
    n = tarfile.BLOCKSIZE * rng.randint(1, 8)
    out = bytearray(base.data)
    out[member.offset : member.offset + n] = bytes(len(out[member.offset : member.offset + n]))
    return bytes(out), base.samples


def pax_size_abc(base: Base, rng: random.Random) -> tuple[bytes, int]:
    index = mid_member(
        base, rng
    )  # tarfile reads size=abc as 0 and takes the member's data for the next header
    return write_tar(base.payloads(), tarfile.PAX_FORMAT, {index: {"size": "abc"}}), base.samples


def renamed_member(base: Base, rng: random.Random) -> tuple[bytes, int]:
    members = base.payloads()
    index = mid_member(base, rng)
    name = members[index][0]
    key, ext = name.split(".", 1)
    new = rng.choice([f"{key}x.{ext}", f"{key}.{ext}x", key + ext, f"dir/{key}.{ext}", name.upper()])
    members[index] = (new, members[index][1])
    return write_tar(members), base.samples


def gzip_bomb(base: Base, rng: random.Random) -> tuple[bytes, int]:
    """One sample's image member replaced by zeros just past the member limit, gzipped (tens of KB on disk)."""
    members = base.payloads()
    images = [i for i, (n, _) in enumerate(members) if n.endswith(".jpg")]
    index = rng.choice(images)
    members[index] = (members[index][0], bytes(MAX_MEMBER_BYTES + 1))
    return gzip.compress(write_tar(members), compresslevel=1), base.samples


def gzip_cut(base: Base, rng: random.Random) -> tuple[bytes, int]:
    packed = gzip.compress(base.data)
    return packed[: rng.randrange(len(packed) // 4, len(packed))], base.samples


def gzip_intact(base: Base, rng: random.Random) -> tuple[bytes, int]:
    return gzip.compress(base.data), base.samples


def empty_shard(base: Base, rng: random.Random) -> tuple[bytes, int]:
    return b"", base.samples


def zero_length_member(base: Base, rng: random.Random) -> tuple[bytes, int]:
    return edited(base, mid_member(base, rng), b""), base.samples


def record_bytes(base: Base, rng: random.Random) -> tuple[bytes, int]:
    index = rng.choice(base.record_members())
    payload = base.payloads()[index][1]
    return edited(base, index, flip_bits(payload, rng, 0, len(payload), rng.randint(1, 8))), base.samples


def record_cut(base: Base, rng: random.Random) -> tuple[bytes, int]:
    index = rng.choice(base.record_members())
    payload = base.payloads()[index][1]
    return edited(base, index, payload[: rng.randrange(len(payload))]), base.samples


def json_values(base: Base, rng: random.Random) -> tuple[bytes, int]:
    """The values issue 12 found crashing or misread (JSON records only)."""
    index = rng.choice(base.record_members())
    name, payload = base.payloads()[index]
    if not name.endswith(".json"):
        return record_bytes(base, rng)
    record = json.loads(payload)
    case = rng.randrange(7)
    if case == 0:
        new = b"[" * 100_000 + b"]" * 100_000
    elif case == 1:
        new = payload.replace(str(record["user_id"]).encode(), b"9" * 5000, 1)
    else:
        if case == 2:
            record["item_id"] = [record["item_id"]]
        elif case == 3:
            record["dense"] = {
                k: 10**400 if i == 0 else v for i, (k, v) in enumerate(record["dense"].items())
            }
        elif case == 4:
            record["cold"] = "false"
        elif case == 5:
            record["labels"] = {}
        else:
            record["history"] = {k: [2**64] for k in record.get("history", {})} or {"long": "x"}
        new = json.dumps(record).encode()
    return edited(base, index, new), base.samples


def every_record_bad(base: Base, rng: random.Random) -> tuple[bytes, int]:
    """No good sample at all: train under skip used to re-read the shard forever."""
    members = base.payloads()
    for i in base.record_members():
        members[i] = (members[i][0], members[i][1][: rng.randrange(len(members[i][1]) // 2)])
    return write_tar(members), base.samples


def image_bytes(base: Base, rng: random.Random) -> tuple[bytes, int]:
    images = [i for i, m in enumerate(base.members) if m.name.endswith(".jpg")]
    index = rng.choice(images)
    jpg = base.payloads()[index][1]
    new = rng.choice(
        [
            jpg[: rng.randrange(len(jpg))],
            rng.randbytes(len(jpg)),
            b"GIF89a" + jpg[6:],
            jpg[:2] + rng.randbytes(64) + jpg[66:],
        ]
    )
    return edited(base, index, new), base.samples


def sample_repeated(base: Base, rng: random.Random) -> tuple[bytes, int]:
    """An earlier sample's members again at the end: one more sample than dataset.json counts."""
    members = base.payloads()
    first = members[0][0].split(".", 1)[0]
    return write_tar(members + [m for m in members if m[0].startswith(first + ".")]), base.samples


def trailing_garbage(base: Base, rng: random.Random) -> tuple[bytes, int]:
    return base.data + rng.randbytes(rng.randint(1, 4096)), base.samples


def two_tars(base: Base, rng: random.Random) -> tuple[bytes, int]:
    """`cat a.tar b.tar`: tarfile (and webdataset) stop at the first end-of-archive blocks."""
    return base.data + base.data, base.samples


def count_high(base: Base, rng: random.Random) -> tuple[bytes, int]:
    return base.data, base.samples + rng.randint(1, 20)


def count_low(base: Base, rng: random.Random) -> tuple[bytes, int]:
    return base.data, base.samples - rng.randint(1, 20)


def count_huge(base: Base, rng: random.Random) -> tuple[bytes, int]:
    return base.data, 10**12


MUTATIONS: dict[str, tuple[Callable[[Base, random.Random], tuple[bytes, int]], int]] = {
    "truncate": (truncate, 6),
    "header bit flip": (header_bit_flip, 6),
    "random bytes": (random_bytes, 6),
    "zero hole": (zero_hole, 3),
    "pax size=abc": (pax_size_abc, 2),
    "member renamed": (renamed_member, 4),
    "gzip bomb": (gzip_bomb, 1),
    "gzip cut": (gzip_cut, 2),
    "gzip intact": (gzip_intact, 1),
    "empty shard": (empty_shard, 1),
    "zero-length member": (zero_length_member, 2),
    "record bytes": (record_bytes, 4),
    "record cut": (record_cut, 2),
    "json values": (json_values, 5),
    "every record bad": (every_record_bad, 1),
    "image bytes": (image_bytes, 3),
    "sample repeated": (sample_repeated, 1),
    "trailing garbage": (trailing_garbage, 1),
    "two tars": (two_tars, 1),
    "count too high": (count_high, 1),
    "count too low": (count_low, 1),
    "count 10**12": (count_huge, 1),
}


def mutants(bases: list[Base], seed: int = SEED) -> Iterator[Mutant]:
    """Every mutation, `n` times, of every base; each (base, mutation) has its own seeded generator, so adding a
    mutation leaves the others' mutants as they were."""
    for base in bases:
        for kind, (mutate, n) in MUTATIONS.items():
            if kind == "json values" and not any(m.name.endswith(".json") for m in base.members):
                continue
            rng = random.Random(f"{seed}/{base.label}/{kind}")
            for i in range(n):
                data, count = mutate(base, rng)
                name = f"{base.label}-{kind.replace(' ', '_').replace('*', '').replace('=', '_')}-{i}.tar"
                yield Mutant(kind, name, data, count)


# ---------------------------------------------------------------------------------------------- the reading


@dataclass
class Outcome:
    delivered: int = 0
    skipped: Counter = field(default_factory=Counter)
    error: BaseException | None = None
    hang: bool = False


def read(directory: Path, mutant: Mutant, split: str, policy: str) -> Outcome:
    shards = "train_shards" if split == "train" else "eval_shards"
    cfg = small_config(
        directory,
        f'data.{shards}="{directory / mutant.name}"',
        "data.num_workers=0",
        f"data.bad_input={policy}",
    )
    out = Outcome()
    try:
        with deadline(TIMEOUT_S):
            stream = make_batch_stream(cfg, split, epochs=1)
            for batch in stream:
                out.delivered += int(batch.valid.sum())
            out.skipped = Counter(stream.skipped)
    except Hang:
        out.hang = True
    except Exception as err:  # classified by the caller
        out.error = err
    return out


@dataclass
class Row:
    mutants: int = 0
    crashes: int = 0
    hangs: int = 0
    unaccounted: int = 0
    stopped: int = 0
    """Under `error`: reads that stopped with a BadSample."""
    gave_up: int = 0
    """Under `skip`: reads that stopped clearly with nothing to read (`gave_up`)."""
    lost: Counter = field(default_factory=Counter)
    """Under `skip` (eval): samples counted by reason."""
    failures: list[str] = field(default_factory=list)


def judge(row: Row, mutant: Mutant, directory: Path) -> None:
    row.mutants += 1

    def crash(what: str, outcome: Outcome) -> None:
        row.crashes += 1
        row.failures.append(f"{mutant.name} {what}: {type(outcome.error).__name__}: {outcome.error}"[:300])

    strict = read(directory, mutant, "eval", "error")
    if strict.hang:
        row.hangs += 1
        row.failures.append(f"{mutant.name} eval/error: hang")
    elif isinstance(strict.error, BadSample):
        row.stopped += 1
    elif strict.error is not None:
        crash("eval/error", strict)
    elif strict.delivered != mutant.count:  # no error, so nothing may be missing
        row.unaccounted += abs(mutant.count - strict.delivered)
        row.failures.append(
            f"{mutant.name} eval/error: {strict.delivered} of {mutant.count} delivered, no error"
        )

    lenient = read(directory, mutant, "eval", "skip")
    if lenient.hang:
        row.hangs += 1
        row.failures.append(f"{mutant.name} eval/skip: hang")
    elif gave_up(lenient.error, "eval"):
        row.gave_up += 1
    elif lenient.error is not None:
        crash("eval/skip", lenient)
    else:
        counted = sum(n for reason, n in lenient.skipped.items() if reason != "extra_samples")
        gap = mutant.count - lenient.delivered - counted
        row.lost.update(lenient.skipped)
        if gap:
            row.unaccounted += abs(gap)
            row.failures.append(
                f"{mutant.name} eval/skip: {lenient.delivered} delivered + {dict(lenient.skipped)} "
                f"!= {mutant.count}"
            )

    train = read(directory, mutant, "train", "skip")
    if train.hang:
        row.hangs += 1
        row.failures.append(f"{mutant.name} train/skip: hang")
    elif gave_up(train.error, "train") and not (isinstance(train.error, NoProgress) and lenient.delivered):
        row.gave_up += 1
    elif train.error is not None:
        crash("train/skip", train)


def gave_up(err: BaseException | None, split: str) -> bool:
    """A clear stop under `skip` of a run with nothing to read: eval, when its shards hold no samples at all;
    train, also after a full pass without one good sample (NoProgress) or with no full batch planned."""
    if isinstance(err, NoProgress):
        return split == "train"
    if not isinstance(err, ValueError) or isinstance(err, BadSample):
        return False
    return "hold no samples" in str(err) or (split == "train" and "no full batch" in str(err))


def campaign_directory(small_dataset: Path, out: Path, all_mutants: list[Mutant]) -> Path:
    """One dataset directory holding every mutant, listed in both splits of its dataset.json; the tokenizer,
    items and cache are the small dataset's."""
    out.mkdir()
    for name in ("tokenizer", "items.parquet"):
        (out / name).symlink_to(small_dataset / name)
    spec = read_spec(small_dataset)
    listed = [ShardInfo(m.name, m.count) for m in all_mutants]
    spec.shards = {"train": listed, "eval": listed}
    write_spec(out, spec)
    for m in all_mutants:
        (out / m.name).write_bytes(m.data)
    return out


COLUMNS = ("mutants", "crashes", "hangs", "unaccounted", "stopped", "gave_up")


def table(rows: dict[str, Row], seconds: float) -> str:
    """Markdown: per mutation, the mutants, the failures (crashes, hangs, samples unaccounted for), the reads that
    stopped with a BadSample under `error`, those that gave up clearly under `skip`, and what `skip` counted."""
    header = "| mutation | mutants | crashes | hangs | unaccounted | stopped (error) | gave up (skip) | counted (skip) |"
    lines = [
        f"fault campaign: seed {SEED}, {sum(r.mutants for r in rows.values())} mutants of 2 shards of 60 "
        f"samples, each read as eval/error, eval/skip and train/skip; {seconds:.1f} s",
        header,
        "|---|" + "---:|" * len(COLUMNS) + "---|",
    ]
    for kind, r in rows.items():
        lost = ", ".join(f"{k}={v}" for k, v in sorted(r.lost.items())) or "-"
        lines.append(f"| {kind} | " + " | ".join(str(getattr(r, c)) for c in COLUMNS) + f" | {lost} |")
    totals = [sum(getattr(r, c) for r in rows.values()) for c in COLUMNS]
    lines.append("| **total** | " + " | ".join(map(str, totals)) + " | |")
    return "\n".join(lines)


def test_fault_campaign(small_dataset: Path, binary_dataset: Path, tmp_path: Path) -> None:
    started = time.time()
    bases = []
    for label, dataset in (("json", small_dataset), ("rec", binary_dataset)):
        info = read_spec(dataset).shards["eval"][-1]  # the small one: 60 samples
        bases.append(load_base(label, dataset / info.name, info.samples))
    all_mutants = list(mutants(bases))
    directory = campaign_directory(small_dataset, tmp_path / "campaign", all_mutants)
    rows: dict[str, Row] = {}
    for mutant in all_mutants:
        judge(rows.setdefault(mutant.kind, Row()), mutant, directory)
    report = table(rows, time.time() - started)
    print("\n" + report)
    failures = [f for r in rows.values() for f in r.failures]
    assert not failures, "\n".join(failures[:20])
    assert sum(r.stopped for r in rows.values()) > 0
