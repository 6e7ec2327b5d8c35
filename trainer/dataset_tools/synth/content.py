"""Raw item content rendered from the latent world: text fields drawn from topic vocabularies, JPEGs whose colours,
shapes and textures encode the topics and the quality, and raw queries. Deterministic per item."""

from __future__ import annotations

import colorsys
import hashlib
import io
from functools import lru_cache

import numpy as np
from PIL import Image, ImageDraw

from trainer.dataset_tools.synth.world import ITEM_IMAGE, ITEM_TEXT, WORLD, World, stream

SYLLABLES = [
    "ba",
    "be",
    "bi",
    "bo",
    "bu",
    "da",
    "de",
    "di",
    "do",
    "du",
    "ka",
    "ke",
    "ki",
    "ko",
    "ku",
    "la",
    "le",
    "li",
    "lo",
    "lu",
    "ma",
    "me",
    "mi",
    "mo",
    "mu",
    "na",
    "ne",
    "ni",
    "no",
    "nu",
    "ra",
    "re",
    "ri",
    "ro",
    "ru",
    "sa",
    "se",
    "si",
    "so",
    "su",
    "ta",
    "te",
    "ti",
    "to",
    "tu",
    "va",
    "ve",
    "vi",
    "vo",
    "vu",
    "za",
    "ze",
    "zi",
    "zo",
    "zu",
]
WORDS_PER_TOPIC = 30
QUERY_WORDS_PER_TOPIC = 8
QUERIES_PER_TOPIC = 12
GENERIC_WORDS = 150
GOOD_WORDS = ["premium", "brilliant", "handmade", "awarded", "classic"]
BAD_WORDS = ["cheap", "blurry", "broken", "fake", "dull"]
TEXT_FIELDS = ("title", "description", "ocr")


class Vocab:
    """Pseudo-words per topic plus generic filler, built once per world."""

    def __init__(self, world: World) -> None:
        rng = stream(world.cfg.seed, WORLD, 1)
        needed = world.cfg.num_topics * WORDS_PER_TOPIC + GENERIC_WORDS
        words: list[str] = []
        seen: set[str] = set()
        while len(words) < needed:
            word = "".join(rng.choice(SYLLABLES, size=rng.integers(2, 4)))
            if word not in seen:
                seen.add(word)
                words.append(word)
        k = world.cfg.num_topics
        self.topic_words = [words[t * WORDS_PER_TOPIC : (t + 1) * WORDS_PER_TOPIC] for t in range(k)]
        self.generic = words[k * WORDS_PER_TOPIC :]
        self.queries = [self._topic_queries(t, rng) for t in range(k)]

    def _topic_queries(self, topic: int, rng: np.random.Generator) -> list[str]:
        pool = self.topic_words[topic][:QUERY_WORDS_PER_TOPIC]
        out: list[str] = []
        while len(out) < QUERIES_PER_TOPIC:
            q = " ".join(rng.choice(pool, size=rng.integers(1, 4), replace=False))
            if q not in out:
                out.append(q)
        return out

    def words(self, rng: np.random.Generator, n: int, mix: list[tuple[float, list[str]]]) -> list[str]:
        shares = np.array([s for s, _ in mix])
        sources = rng.choice(len(mix), size=n, p=shares / shares.sum())
        return [mix[s][1][rng.integers(len(mix[s][1]))] for s in sources]


def stable_id(text: str) -> int:
    """A positive int64 id of a string, stable across runs and machines."""
    return int.from_bytes(hashlib.blake2b(text.encode(), digest_size=8).digest(), "little") >> 2


class ContentRenderer:
    """Renders an item's text fields and images (cached: popular items repeat)."""

    def __init__(self, world: World) -> None:
        self.world = world
        self.vocab = Vocab(world)
        self.text = lru_cache(maxsize=50_000)(self._text)
        self.image = lru_cache(maxsize=20_000)(self._image)

    def _text(self, item: int) -> dict[str, str]:
        w, v = self.world, self.vocab
        rng = stream(w.cfg.seed, ITEM_TEXT, item)
        primary, secondary = v.topic_words[w.item_topic[item]], v.topic_words[w.item_topic2[item]]
        title = v.words(rng, int(rng.integers(3, 7)), [(0.7, primary), (0.3, v.generic)])
        quality = w.item_quality[item]
        if abs(quality) > 0.6:
            title.insert(
                int(rng.integers(len(title) + 1)), str(rng.choice(GOOD_WORDS if quality > 0 else BAD_WORDS))
            )
        description = v.words(
            rng, int(rng.integers(12, 31)), [(0.45, primary), (0.25, secondary), (0.3, v.generic)]
        )
        ocr = v.words(rng, int(rng.integers(2, 7)), [(0.7, secondary), (0.3, v.generic)])
        return {"title": " ".join(title), "description": " ".join(description), "ocr": " ".join(ocr)}

    def _image(self, item: int, index: int = 0) -> bytes:
        """Background hue = primary topic; shape kind and colour = secondary topic; shape count and brightness =
        quality; stripes texture for odd primary topics. JPEG bytes."""
        w = self.world
        size = w.cfg.image_size
        rng = stream(w.cfg.seed, ITEM_IMAGE, item, index)
        k = w.cfg.num_topics
        t1, t2, quality = int(w.item_topic[item]), int(w.item_topic2[item]), float(w.item_quality[item])
        value = float(np.clip(0.55 + 0.15 * quality, 0.25, 0.95))
        background = _rgb((t1 / k + rng.normal(0, 0.01)) % 1.0, 0.6, value)
        image = Image.new("RGB", (size, size), background)
        draw = ImageDraw.Draw(image)
        if t1 % 2:
            stripe = _rgb(t1 / k, 0.35, value * 0.8)
            for x in range(0, size, max(2, size // 8)):
                draw.line([(x, 0), (x, size)], fill=stripe, width=max(1, size // 32))
        colour = _rgb(t2 / k, 0.9, 0.9)
        for _ in range(int(np.clip(round(2 + quality), 1, 4))):
            r = size * rng.uniform(0.1, 0.2)
            cx, cy = rng.uniform(r, size - r, size=2)
            box = [cx - r, cy - r, cx + r, cy + r]
            kind = t2 % 4
            if kind == 0:
                draw.ellipse(box, fill=colour)
            elif kind == 1:
                draw.rectangle(box, fill=colour)
            elif kind == 2:
                draw.polygon([(cx, cy - r), (cx - r, cy + r), (cx + r, cy + r)], fill=colour)
            else:
                draw.line([(cx - r, cy - r), (cx + r, cy + r)], fill=colour, width=max(2, int(r / 2)))
        out = io.BytesIO()
        image.save(out, format="JPEG", quality=85)
        return out.getvalue()


def _rgb(hue: float, saturation: float, value: float) -> tuple[int, int, int]:
    r, g, b = colorsys.hsv_to_rgb(hue, saturation, value)
    return int(r * 255), int(g * 255), int(b * 255)
