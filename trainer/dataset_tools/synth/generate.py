"""`lemur data synth`: write train/eval shards, items.parquet, a tokenizer and dataset.json for a SynthConfig.

Shards are independent jobs (a time block each, seeded by its index), run on all cores; a job holds one shard's
samples at a time, so memory stays flat however many samples are asked for. Train shards are written first: in the
churn world, an eval sample's `cold` flag says its item is in no training sample (target or history), which only
the train shards' item sets tell.
"""

from __future__ import annotations

import math
import multiprocessing as mp
import os
import shutil
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from tqdm import tqdm

from trainer.config.schema import SynthConfig
from trainer.data import record as binary_record
from trainer.data.record import RecordLayout
from trainer.data.spec import DatasetSpec, ShardInfo, write_spec
from trainer.data.tokenizer import train_tokenizer
from trainer.dataset_tools.shard_writer import ShardWriter, encode_record, shard_name
from trainer.dataset_tools.synth.content import TEXT_FIELDS, ContentRenderer, stable_id
from trainer.dataset_tools.synth.world import (
    EPOCH,
    SECONDS_PER_DAY,
    SHARD,
    World,
    alive_items,
    build_world,
    click_logit,
    sample_topic_items,
    user_timeline,
)

SPLITS = ("train", "eval")
DEVICES = 4
TAGS_PER_TOPIC = 4


@dataclass
class ShardJob:
    split: str
    index: int
    samples: int
    t_start: float
    t_end: float


@dataclass
class ShardResult:
    split: str
    index: int
    name: str
    samples: int
    clicks: int
    items: np.ndarray
    users: np.ndarray
    queries: np.ndarray
    history_items: np.ndarray
    """Item indices in the shard's histories (targets: `items`)."""


def plan_shards(cfg: SynthConfig) -> list[ShardJob]:
    """Train covers the first (1 - eval_share) of the timeline, eval the rest; each split is cut into time
    blocks of samples_per_shard impressions."""
    n_eval = max(1, round(cfg.num_samples * cfg.eval_share))
    counts = {"train": cfg.num_samples - n_eval, "eval": n_eval}
    boundary = cfg.days * SECONDS_PER_DAY * (1.0 - cfg.eval_share)
    spans = {"train": (0.0, boundary), "eval": (boundary, float(cfg.days * SECONDS_PER_DAY))}
    jobs = []
    for split in SPLITS:
        total, (t0, t1) = counts[split], spans[split]
        n_shards = math.ceil(total / cfg.samples_per_shard)
        for i in range(n_shards):
            lo, hi = i * cfg.samples_per_shard, min(total, (i + 1) * cfg.samples_per_shard)
            jobs.append(ShardJob(split, i, hi - lo, t0 + (t1 - t0) * lo / total, t0 + (t1 - t0) * hi / total))
    return jobs


_WORLD: World | None = None
_RENDER: ContentRenderer | None = None


def _init_worker(cfg: SynthConfig) -> None:
    global _WORLD, _RENDER
    _WORLD = build_world(cfg)
    _RENDER = ContentRenderer(_WORLD)


def _run_job(args: tuple[ShardJob, str, np.ndarray | None]) -> ShardResult:
    job, out_dir, cold = args
    assert _WORLD is not None and _RENDER is not None
    return write_shard(_WORLD, _RENDER, job, Path(out_dir), cold)


def write_shard(
    world: World, render: ContentRenderer, job: ShardJob, out_dir: Path, cold: np.ndarray | None = None
) -> ShardResult:
    """`cold`: per item index, never in training (the eval flag); None: the static world's held-out items."""
    cfg = world.cfg
    cold = world.item_cold if cold is None else cold
    rng = np.random.default_rng([cfg.seed, SHARD, SPLITS.index(job.split), job.index])
    ipr = cfg.impressions_per_request
    n_requests = math.ceil(job.samples / ipr)
    times = np.sort(rng.uniform(job.t_start, job.t_end, size=n_requests))
    users = rng.choice(len(world.user_ids), size=n_requests, p=world.user_activity)
    cold_by_topic = [np.flatnonzero(world.item_cold & (world.item_topic == t)) for t in range(cfg.num_topics)]
    timelines: dict[int, tuple[np.ndarray, np.ndarray]] = {}
    name = shard_name(job.split, job.index)
    layout = RecordLayout.of(DatasetSpec(**_schema(cfg))) if cfg.record_format == "binary" else None
    written, clicks = 0, 0
    items_seen, queries_seen, history_seen = [], [], []
    with ShardWriter(out_dir / name) as writer:
        for r in range(n_requests):
            user, t = int(users[r]), float(times[r])
            request_id = stable_id(f"request/{job.split}/{job.index}/{r}")
            query_topic, query = None, None
            if cfg.search:
                if rng.random() < 0.75:
                    query_topic = int(
                        world.user_topics[user][rng.choice(3, p=world.user_topic_weights[user])]
                    )
                else:
                    query_topic = int(rng.choice(cfg.num_topics, p=world.topic_share))
                query = str(rng.choice(render.vocab.queries[query_topic]))
            shown = min(ipr, job.samples - written)
            items = _candidates(world, user, query_topic, shown, rng, t)
            if job.split == "eval" and not world.churn:
                items = _mix_in_cold(world, items, cold_by_topic, rng)
            labels = (
                rng.random(shown) < 1.0 / (1.0 + np.exp(-click_logit(world, user, items, query_topic, rng)))
            ).astype(int)
            if user not in timelines:
                timelines[user] = user_timeline(world, user)
            history_index = _history_index(world, timelines[user], t)
            history = _history(world, history_index)
            history_seen.append(history_index)
            for j, item in enumerate(items):
                record = _record(world, render, user, int(item), t, int(labels[j]), history, rng)
                if cfg.search:
                    record.update(
                        query=query, query_id=stable_id(query), session_id=request_id, request_id=request_id
                    )
                    queries_seen.append(record["query_id"])
                else:
                    record.update(session_id=request_id, request_id=request_id)
                if job.split == "eval":
                    record["cold"] = int(cold[item])
                members = (
                    {binary_record.EXT: binary_record.encode(record, layout)}
                    if layout is not None
                    else {"json": encode_record(record)}
                )
                for k in range(cfg.images_per_item):
                    members["jpg" if k == 0 else f"{k}.jpg"] = render.image(int(item), k)
                writer.write(f"{job.split}_{job.index:06d}_{written:06d}", members)
                written += 1
            clicks += int(labels.sum())
            items_seen.append(items)
    return ShardResult(
        job.split,
        job.index,
        name,
        written,
        clicks,
        np.unique(np.concatenate(items_seen)),
        np.unique(users),
        np.unique(np.asarray(queries_seen, dtype=np.int64)),
        np.unique(np.concatenate(history_seen)).astype(np.int64),
    )


def _candidates(
    world: World, user: int, query_topic: int | None, n: int, rng: np.random.Generator, t: float
) -> np.ndarray:
    """Search: mostly items on the query's topic; feed: mostly the user's topics; always some popular filler.
    Churn world: among the items born by `t`."""
    draws = 4 * n  # a request shows distinct items: draw extra and keep the first n distinct
    source = rng.random(draws)
    user_topics = world.user_topics[user][rng.choice(3, size=draws, p=world.user_topic_weights[user])]
    random_topics = rng.choice(world.cfg.num_topics, size=draws, p=world.topic_share)
    if query_topic is not None:
        topics = np.where(source < 0.6, query_topic, np.where(source < 0.8, user_topics, random_topics))
    else:
        topics = np.where(source < 0.7, user_topics, random_topics)
    items = sample_topic_items(world, topics, rng, t)
    items = items[items >= 0]  # churn: topics with no item born yet
    _, first = np.unique(items, return_index=True)
    distinct = items[np.sort(first)]
    if len(distinct) < n:  # small catalogs: fill with other warm (churn: alive) items
        if world.churn:
            alive = alive_items(world, t)
            others = alive[~np.isin(alive, distinct)]
        else:
            others = np.setdiff1d(np.flatnonzero(~world.item_cold), distinct)
        distinct = np.concatenate(
            [distinct, rng.choice(others, size=min(n - len(distinct), len(others)), replace=False)]
        )
    if len(distinct) < n and world.churn:  # fewer items born by t than a request shows: the next to be born
        unborn = np.argsort(world.item_birth, kind="stable")
        distinct = np.concatenate([distinct, unborn[~np.isin(unborn, distinct)][: n - len(distinct)]])
    return distinct[:n]


def _mix_in_cold(
    world: World, items: np.ndarray, cold_by_topic: list[np.ndarray], rng: np.random.Generator
) -> np.ndarray:
    """In eval, a share of impressions shows cold items (never seen in train) of the same topic."""
    items = items.copy()
    for j, item in enumerate(items):
        pool = cold_by_topic[world.item_topic[item]]
        if len(pool) and rng.random() < min(0.5, 2 * world.cfg.cold_item_share):
            items[j] = pool[rng.integers(len(pool))]
    return items


def _history_index(world: World, timeline: tuple[np.ndarray, np.ndarray], t: float) -> np.ndarray:
    """Item indices of the long history at t: the user's last long_history clicks before t."""
    times, items = timeline
    return items[: np.searchsorted(times, t)][-world.cfg.long_history :]


def _history(world: World, index: np.ndarray) -> dict[str, list[int]]:
    long = world.item_ids[index]
    return {"short": long[-world.cfg.short_history :].tolist(), "long": long.tolist()}


def _record(
    world: World,
    render: ContentRenderer,
    user: int,
    item: int,
    t: float,
    label: int,
    history: dict[str, list[int]],
    rng: np.random.Generator,
) -> dict[str, Any]:
    k = world.cfg.num_topics
    n_tags = int(rng.integers(1, 4))
    tag_topics = np.where(rng.random(n_tags) < 0.5, world.item_topic[item], rng.integers(0, k, size=n_tags))
    tags = sorted(set((tag_topics * TAGS_PER_TOPIC + rng.integers(0, TAGS_PER_TOPIC, size=n_tags)).tolist()))
    segment = int(world.user_topics[user][0]) if rng.random() < 0.7 else int(rng.integers(k))
    return {
        "user_id": int(world.user_ids[user]),
        "item_id": int(world.item_ids[item]),
        "timestamp": EPOCH + int(t),
        "labels": {"click": label},
        "sparse": {
            "category": [int(world.item_category[item])],
            "author": [int(world.item_author[item])],
            "tags": tags,
            "user_segment": [segment],
            "device": [int(rng.integers(DEVICES))],
        },
        "dense": {
            "item_log_pop": round(float(np.log(world.item_popularity[item] * world.num_items)) / 5.0, 5),
            "user_log_activity": round(
                float(np.log(world.user_activity[user] * len(world.user_ids))) / 3.0, 5
            ),
            "hour": round((t % SECONDS_PER_DAY) / SECONDS_PER_DAY, 5),
        },
        "history": history,
        "text": render.text(item),
    }


def write_items(
    world: World, render: ContentRenderer, path: Path, cold: np.ndarray, chunk: int = 10_000
) -> None:
    """The item catalog: ids, raw text, images (bytes), categorical ids, popularity, cold flag."""
    schema = pa.schema(
        [("item_id", pa.int64())]
        + [(f, pa.string()) for f in TEXT_FIELDS]
        + [
            ("images", pa.list_(pa.binary())),
            ("category", pa.int64()),
            ("author", pa.int64()),
            ("popularity", pa.float64()),
            ("cold_start", pa.bool_()),
        ]
    )
    tmp = path.with_name(f".{path.name}.partial")
    with pq.ParquetWriter(tmp, schema) as writer:
        for lo in range(0, world.num_items, chunk):
            idx = range(lo, min(world.num_items, lo + chunk))
            texts = [render.text(i) for i in idx]
            columns = {
                "item_id": world.item_ids[lo : lo + len(idx)],
                **{f: [t[f] for t in texts] for f in TEXT_FIELDS},
                "images": [[render.image(i, k) for k in range(world.cfg.images_per_item)] for i in idx],
                "category": world.item_category[lo : lo + len(idx)],
                "author": world.item_author[lo : lo + len(idx)],
                "popularity": world.item_popularity[lo : lo + len(idx)],
                "cold_start": cold[lo : lo + len(idx)],
            }
            writer.write_table(pa.table(columns, schema=schema))
    tmp.replace(path)


def prepare_out_dir(out: Path, force: bool) -> None:
    if out.exists() and any(out.iterdir()):
        if not force:
            raise FileExistsError(f"{out} is not empty; pass --force to replace the dataset in it")
        if not (out / "dataset.json").exists() and not any(out.glob("*.tar")):
            raise FileExistsError(f"{out} holds something that is not a lemur dataset; refusing to clear it")
        shutil.rmtree(out)
    out.mkdir(parents=True, exist_ok=True)


def synthesize(
    cfg: SynthConfig,
    out: str | os.PathLike,
    vocab_size: int = 8000,
    force: bool = False,
    progress: bool = True,
) -> DatasetSpec:
    out = Path(out)
    prepare_out_dir(out, force)
    started = time.time()
    jobs = plan_shards(cfg)
    workers = min(cfg.workers or os.cpu_count() or 1, len(jobs))
    results: list[ShardResult] = []
    bar = tqdm(total=cfg.num_samples, unit="sample", desc="synth", disable=not progress)
    world = build_world(cfg)
    pool = (
        mp.get_context("fork").Pool(workers, initializer=_init_worker, initargs=(cfg,))
        if workers > 1
        else None
    )
    if pool is None:
        _init_worker(cfg)
    cold: np.ndarray | None = None
    try:
        for split in SPLITS:  # train first: the churn world's eval needs its items
            if split == "eval":
                cold = _cold_items(world, [r for r in results if r.split == "train"])
            args = [(job, str(out), cold if world.churn else None) for job in jobs if job.split == split]
            for result in pool.imap(_run_job, args) if pool is not None else map(_run_job, args):
                results.append(result)
                bar.update(result.samples)
    finally:
        if pool is not None:
            pool.close()
            pool.join()
    bar.close()

    assert cold is not None
    render = ContentRenderer(world)
    write_items(world, render, out / "items.parquet", cold)
    texts = (t for i in range(world.num_items) for t in render.text(i).values())
    queries = (q for topic in render.vocab.queries for q in topic)
    train_tokenizer(_chain(texts, queries), vocab_size, out / "tokenizer")
    spec = _spec(cfg, world, results, cold)
    write_spec(out, spec)
    if progress:
        print(
            f"synth: {cfg.num_samples} samples in {len(results)} shards, {time.time() - started:.1f}s -> {out}"
        )
    return spec


def _cold_items(world: World, train: list[ShardResult]) -> np.ndarray:
    """Per item index: in no training sample. Static world: the held-out items (the same set, by construction);
    churn world: measured from the train shards' targets and histories."""
    if not world.churn:
        return world.item_cold
    cold = np.ones(world.num_items, dtype=bool)
    for r in train:
        cold[r.items] = False
        cold[r.history_items] = False
    return cold


def _chain(*iterables: Any) -> Any:
    for it in iterables:
        yield from it


def _schema(cfg: SynthConfig) -> dict[str, Any]:
    """The spec's features (what a record holds, in order), known before any shard is written."""
    return dict(
        scenario="search" if cfg.search else "feed",
        sparse={
            "category": {"multi": False, "cardinality": cfg.num_categories},
            "author": {"multi": False, "cardinality": cfg.num_authors},
            "tags": {"multi": True, "cardinality": cfg.num_topics * TAGS_PER_TOPIC},
            "user_segment": {"multi": False, "cardinality": cfg.num_topics},
            "device": {"multi": False, "cardinality": DEVICES},
        },
        dense=["item_log_pop", "user_log_activity", "hour"],
        history={"short": cfg.short_history, "long": cfg.long_history},
        text=list(TEXT_FIELDS),
        query_text=cfg.search,
        images=cfg.images_per_item,
        labels=["click"],
    )


def _spec(cfg: SynthConfig, world: World, results: list[ShardResult], cold: np.ndarray) -> DatasetSpec:
    by_split = {s: [r for r in results if r.split == s] for s in SPLITS}
    counts = {s: sum(r.samples for r in rs) for s, rs in by_split.items()}
    train_items = np.unique(np.concatenate([r.items for r in by_split["train"]]))
    eval_items = np.unique(np.concatenate([r.items for r in by_split["eval"]]))
    counts.update(
        items=world.num_items,
        cold_items=int(cold.sum()),
        eval_cold_items=int(np.setdiff1d(eval_items, train_items).size),
    )
    all_users = np.unique(np.concatenate([r.users for r in results]))
    all_queries = np.unique(np.concatenate([r.queries for r in results]))
    return DatasetSpec(
        **_schema(cfg),
        cardinalities={
            "user_id": int(all_users.size),
            "item_id": world.num_items,
            "query_id": int(all_queries.size),
        },
        counts=counts,
        label_rate={s: round(sum(r.clicks for r in rs) / max(1, counts[s]), 5) for s, rs in by_split.items()},
        shards={
            s: [ShardInfo(r.name, r.samples) for r in sorted(rs, key=lambda r: r.index)]
            for s, rs in by_split.items()
        },
        split={
            "rule": "time",
            "eval_from_timestamp": EPOCH + int(cfg.days * SECONDS_PER_DAY * (1.0 - cfg.eval_share)),
            "cold_item_share": round(float(cold.mean()), 5) if world.churn else cfg.cold_item_share,
        },
        created_by="lemur data synth " + " ".join(f"{k}={v}" for k, v in _settings(cfg).items()),
    )


CHURN_ONLY = ("world", "new_items_per_day", "item_lifetime_days")


def _settings(cfg: SynthConfig) -> dict[str, Any]:
    """The settings `created_by` records: all but `workers`; a static world leaves out the churn knobs (and a
    default popularity exponent), so its dataset.json reads as it did before they existed."""
    settings = {k: v for k, v in asdict(cfg).items() if k != "workers"}
    if cfg.world == "static":
        for k in CHURN_ONLY:
            settings.pop(k)
        if cfg.popularity_exponent == SynthConfig.popularity_exponent:
            settings.pop("popularity_exponent")
    return settings
