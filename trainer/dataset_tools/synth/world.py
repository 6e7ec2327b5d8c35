"""The latent world behind the synthetic data: topics, items, users and the click model.

Everything is a pure function of (SynthConfig, seed), rebuilt identically in every writer process, so shards can be
generated in parallel and in constant memory. Item content (text, images) is rendered per item on demand.

Two worlds (`SynthConfig.world`):
- static: every item exists for the whole log with a fixed popularity; a `cold_item_share` of the items is held out
  of training and shown in eval only.
- churn: item i is born at `item_birth[i]` (a steady share `new_items_per_day` of the catalog every day, up to the
  log's end) and is shown, and clicked in histories, with weight popularity[i] * exp(-age / item_lifetime_days),
  never before its birth. Impressions and history clicks so follow what is fresh; the eval split (the end of the
  log) shows many items born after training ended or seen a few times in it, whose ID rows learned little or
  nothing, while their content (text, images) shows their topics and quality as for any item. Cold is measured,
  not drawn: an eval item is cold when no training sample holds it, as target or in a history (`generate.py`).
  The weight factorises as popularity[i] * exp(birth[i] / L) * exp(-t / L), so within a topic (items sorted by
  birth) the items alive at t are a prefix, and one cumulative sum serves every t.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from trainer.config.schema import SynthConfig

LATENT_DIM = 16
SECONDS_PER_DAY = 86_400
# Timestamps start at 2026-01-01T00:00:00Z.
EPOCH = 1_767_225_600
# A user's history window before the log starts: histories are full from the first impression on.
PRE_DAYS = 30


def stream(seed: int, *path: int) -> np.random.Generator:
    """An independent random stream for a named purpose, e.g. stream(seed, ITEM_TEXT, item_index)."""
    return np.random.default_rng([seed, *path])


# Stream names.
WORLD, ITEM_TEXT, ITEM_IMAGE, USER_TIMELINE, SHARD = range(5)


def scramble_ids(index: np.ndarray, salt: int) -> np.ndarray:
    """Distinct, non-contiguous positive int64 ids (splitmix64 is a bijection on 64 bits), so nothing may assume
    ids are dense or small."""
    with np.errstate(over="ignore"):
        x = np.asarray(index, dtype=np.uint64) + np.uint64(salt) * np.uint64(0x9E3779B97F4A7C15)
        x = (x ^ (x >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
        x = (x ^ (x >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
        x = x ^ (x >> np.uint64(31))
    return (x >> np.uint64(2)).astype(np.int64)  # 62 bits: positive and inside int64


@dataclass
class World:
    cfg: SynthConfig
    topic_vectors: np.ndarray  # [K, D]
    # items (index 0..n-1)
    item_ids: np.ndarray
    item_topic: np.ndarray
    item_topic2: np.ndarray
    item_latent: np.ndarray  # [n, D], unit norm
    item_quality: np.ndarray
    item_popularity: np.ndarray  # sums to 1
    item_category: np.ndarray
    item_author: np.ndarray
    item_cold: np.ndarray  # bool; static world only (the churn world's are measured in generate.py)
    item_birth: np.ndarray  # seconds from the log's start; -inf in the static world
    # users
    user_ids: np.ndarray
    user_topics: np.ndarray  # [u, 3]
    user_topic_weights: np.ndarray  # [u, 3]
    user_latent: np.ndarray  # [u, D]
    user_activity: np.ndarray  # relative request rate
    user_bias: np.ndarray
    user_history_rate: np.ndarray  # clicks per day in the user's timeline
    # per topic: warm items (static; churn: all, sorted by birth), and the cumulative sampling weight within the
    # topic (static: normalised; churn: not, as only the prefix of items born by t is drawn from)
    topic_items: list[np.ndarray]
    topic_item_cdf: list[np.ndarray]
    topic_share: np.ndarray
    topic_births: list[np.ndarray]  # churn: the births of topic_items, ascending; static: empty

    @property
    def num_items(self) -> int:
        return len(self.item_ids)

    @property
    def churn(self) -> bool:
        return self.cfg.world == "churn"


def build_world(cfg: SynthConfig) -> World:
    rng = stream(cfg.seed, WORLD)
    k, n, u = cfg.num_topics, cfg.num_items, cfg.num_users
    topics = rng.standard_normal((k, LATENT_DIM))
    topics /= np.linalg.norm(topics, axis=1, keepdims=True)

    topic_share = 1.0 / np.arange(1, k + 1) ** 0.5
    topic_share = rng.permutation(topic_share / topic_share.sum())
    item_topic = rng.choice(k, size=n, p=topic_share)
    item_topic2 = rng.integers(0, k, size=n)
    latent = topics[item_topic] + 0.6 * topics[item_topic2] + 0.35 * rng.standard_normal((n, LATENT_DIM))
    latent /= np.linalg.norm(latent, axis=1, keepdims=True)
    quality = rng.standard_normal(n)
    popularity = 1.0 / rng.permutation(np.arange(1, n + 1)) ** cfg.popularity_exponent
    popularity /= popularity.sum()

    # Each topic owns a contiguous block of categories; 10% of items get a random one (noise).
    cats_per_topic = cfg.num_categories // k
    category = item_topic * cats_per_topic + rng.integers(0, cats_per_topic, size=n)
    noisy = rng.random(n) < 0.1
    category[noisy] = rng.integers(0, cfg.num_categories, size=noisy.sum())
    # Authors write mostly on one topic.
    author_topic = rng.integers(0, k, size=cfg.num_authors)
    author_topic[:k] = np.arange(k)  # every topic has an author
    author = np.empty(n, dtype=np.int64)
    for t in range(k):
        mine = np.flatnonzero(item_topic == t)
        pool = np.flatnonzero(author_topic == t)
        author[mine] = rng.choice(pool, size=len(mine))
    stray = rng.random(n) < 0.2
    author[stray] = rng.integers(0, cfg.num_authors, size=stray.sum())

    cold = np.zeros(n, dtype=bool)
    n_cold = 0 if cfg.world == "churn" else int(round(cfg.cold_item_share * n))
    if n_cold:
        cold[rng.choice(n, size=n_cold, replace=False)] = True

    user_topics = np.stack([rng.choice(k, size=3, replace=False, p=topic_share) for _ in range(u)])
    weights = rng.dirichlet([2.0, 1.0, 0.5], size=u)
    user_latent = np.einsum("uk,ukd->ud", weights, topics[user_topics]) + 0.3 * rng.standard_normal(
        (u, LATENT_DIM)
    )
    user_latent /= np.linalg.norm(user_latent, axis=1, keepdims=True)
    activity = rng.lognormal(0.0, 0.8, size=u)
    activity /= activity.sum()
    bias = 0.4 * rng.standard_normal(u)
    # Expected clicks in the pre-window span 0.3..1.2x the long history: some histories are short, many full.
    history_rate = cfg.long_history * rng.uniform(0.3, 1.2, size=u) / PRE_DAYS

    topic_items, topic_cdf, topic_births = [], [], []
    if cfg.world == "churn":
        birth = item_births(cfg)
        for t in range(k):
            mine = np.flatnonzero(item_topic == t)
            if len(mine) == 0:  # tiny catalogs: fall back to any item
                mine = np.arange(n)
            mine = mine[np.argsort(birth[mine], kind="stable")]
            # exp((birth - latest) / L) <= 1: no overflow; the floor keeps every prefix's total above zero
            decay = np.exp((birth[mine] - birth.max()) / (cfg.item_lifetime_days * SECONDS_PER_DAY))
            topic_items.append(mine)
            topic_cdf.append(np.cumsum(np.maximum(popularity[mine] * decay, 1e-300)))
            topic_births.append(birth[mine])
    else:
        birth = np.full(n, -np.inf)
        for t in range(k):
            mine = np.flatnonzero((item_topic == t) & ~cold)
            if len(mine) == 0:  # tiny catalogs: fall back to any warm item
                mine = np.flatnonzero(~cold)
            cdf = np.cumsum(
                np.sqrt(popularity[mine])
            )  # flatter than the impression popularity: varied histories
            topic_items.append(mine)
            topic_cdf.append(cdf / cdf[-1])

    return World(
        cfg=cfg,
        topic_vectors=topics,
        item_ids=scramble_ids(np.arange(n), salt=1),
        item_topic=item_topic,
        item_topic2=item_topic2,
        item_latent=latent,
        item_quality=quality,
        item_popularity=popularity,
        item_category=category,
        item_author=author,
        item_cold=cold,
        item_birth=birth,
        user_ids=scramble_ids(np.arange(u), salt=2),
        user_topics=user_topics,
        user_topic_weights=weights,
        user_latent=user_latent,
        user_activity=activity,
        user_bias=bias,
        user_history_rate=history_rate,
        topic_items=topic_items,
        topic_item_cdf=topic_cdf,
        topic_share=topic_share,
        topic_births=topic_births,
    )


def item_births(cfg: SynthConfig) -> np.ndarray:
    """Churn world: birth times (seconds) at a steady rate over the 1 / new_items_per_day days before the log's end,
    one in each of n equal slots (jittered), the slots dealt to the items at random. Its own stream: the static
    world's draws are untouched."""
    rng = stream(cfg.seed, WORLD, 2)
    n = cfg.num_items
    span = SECONDS_PER_DAY / cfg.new_items_per_day
    slots = (np.arange(n) + rng.random(n)) / n
    return cfg.days * SECONDS_PER_DAY - span + span * slots[rng.permutation(n)]


def sample_topic_items(
    world: World, topics: np.ndarray, rng: np.random.Generator, times: np.ndarray | float | None = None
) -> np.ndarray:
    """One warm item per entry of `topics`, popularity-weighted within its topic. Churn world: among the items born
    by `times` (one per entry, or one for all), weighted by popularity and age; -1 where the topic had none yet."""
    if world.churn:
        assert times is not None, "the churn world samples items at a time"
        return _sample_alive(
            world, topics, np.broadcast_to(np.asarray(times, dtype=float), topics.shape), rng
        )
    out = np.empty(len(topics), dtype=np.int64)
    for t in np.unique(topics):
        where = np.flatnonzero(topics == t)
        pick = np.searchsorted(world.topic_item_cdf[t], rng.random(len(where)))
        out[where] = world.topic_items[t][np.minimum(pick, len(world.topic_items[t]) - 1)]
    return out


def _sample_alive(
    world: World, topics: np.ndarray, times: np.ndarray, rng: np.random.Generator
) -> np.ndarray:
    out = np.empty(len(topics), dtype=np.int64)
    draws = rng.random(len(topics))
    for t in np.unique(topics):
        where = np.flatnonzero(topics == t)
        alive = np.searchsorted(world.topic_births[t], times[where], side="right")  # born by then: a prefix
        cdf = world.topic_item_cdf[t]
        total = np.where(alive > 0, cdf[np.maximum(alive - 1, 0)], 0.0)
        pick = np.minimum(np.searchsorted(cdf, draws[where] * total, side="right"), np.maximum(alive - 1, 0))
        out[where] = np.where(alive > 0, world.topic_items[t][pick], -1)
    return out


def alive_items(world: World, t: float) -> np.ndarray:
    """Churn world: every item born by t, oldest first (static world: every warm item)."""
    if not world.churn:
        return np.flatnonzero(~world.item_cold)
    born = np.flatnonzero(world.item_birth <= t)
    return born[np.argsort(world.item_birth[born], kind="stable")]


def user_timeline(world: World, user: int) -> tuple[np.ndarray, np.ndarray]:
    """The user's clicks (times in seconds, item indices), sorted by time, from PRE_DAYS before the log to its end.

    Drawn from the user's interests, independently of the logged impressions, so any shard can compute any user's
    history without global state. Churn world: clicks at times when the topic had no item yet are dropped.
    """
    cfg = world.cfg
    rng = stream(cfg.seed, USER_TIMELINE, user)
    start, end = -PRE_DAYS * SECONDS_PER_DAY, cfg.days * SECONDS_PER_DAY
    n = rng.poisson(world.user_history_rate[user] * (PRE_DAYS + cfg.days))
    times = np.sort(rng.uniform(start, end, size=n))
    topics = world.user_topics[user][rng.choice(3, size=n, p=world.user_topic_weights[user])]
    items = sample_topic_items(world, topics, rng, times)
    keep = items >= 0
    return times[keep], items[keep]


def click_logit(
    world: World, user: int, items: np.ndarray, query_topic: int | None, rng: np.random.Generator
) -> np.ndarray:
    """Click logit of showing `items` to `user` (for `query_topic` in search). Calibrated to a CTR near 0.2."""
    interest = world.item_latent[items] @ world.user_latent[user]
    logit = -2.6 + 2.5 * interest + 0.8 * world.item_quality[items] + world.user_bias[user]
    logit = logit + 0.15 * np.log(world.item_popularity[items] * world.num_items)
    if query_topic is not None:
        logit = logit + 2.0 * (world.item_latent[items] @ world.topic_vectors[query_topic])
    return logit + 0.3 * rng.standard_normal(len(items))
