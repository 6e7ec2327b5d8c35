"""`chart.png`: a grouped bar chart of each variant's delta vs the baseline, one group per metric, drawn with Pillow.

Bars are the mean paired deltas in percentage points; error bars span ± 2 standard errors, so a bar whose error
bar crosses zero is inside the seed-to-seed noise (drawn pale).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from pathlib import Path

from PIL import Image, ImageDraw, ImageFont

from trainer.experiment.report import METRICS, Delta, VariantReport

PALETTE = [
    (31, 119, 180),
    (255, 127, 14),
    (44, 160, 44),
    (214, 39, 40),
    (148, 103, 189),
    (140, 86, 75),
    (227, 119, 194),
    (127, 127, 127),
    (188, 189, 34),
    (23, 190, 207),
]
WIDTH, HEIGHT = 1100, 560
LEFT, RIGHT, TOP, BOTTOM = 80, 230, 64, 56


Font = ImageFont.ImageFont | ImageFont.FreeTypeFont


def _font(size: int) -> Font:
    try:
        return ImageFont.load_default(size=size)
    except TypeError:  # Pillow < 10.1: one bitmap size
        return ImageFont.load_default()


def _pale(rgb: tuple[int, int, int]) -> tuple[int, int, int]:
    return tuple(int(c + (255 - c) * 0.65) for c in rgb)  # type: ignore[return-value]


def nice_ticks(low: float, high: float, count: int = 6) -> list[float]:
    """Round tick values (1, 2 or 5 times a power of ten) covering [low, high]."""
    span = max(high - low, 1e-9)
    raw = span / count
    power = 10 ** math.floor(math.log10(raw))
    step = next(m * power for m in (1, 2, 5, 10) if m * power >= raw)
    first = math.floor(low / step) * step
    ticks, value = [], first
    while value <= high + step * 1e-6:
        ticks.append(round(value, 10))
        value += step
    return ticks


def _extent(bars: list[list[Delta | None]]) -> tuple[float, float]:
    values = [0.0]
    for row in bars:
        for d in row:
            if d is not None and math.isfinite(d.mean):
                err = 2 * d.se if math.isfinite(d.se) else 0.0
                values += [d.mean - err, d.mean + err]
    low, high = min(values), max(values)
    pad = (high - low) * 0.08 or 0.1
    return low - pad, high + pad


def draw_chart(path: Path, title: str, baseline: str, variants: list[VariantReport]) -> None:
    """Write the PNG; `variants` without the baseline (those are the bars)."""
    bars = [[v.deltas.get(key) for v in variants] for key, _ in METRICS]
    low, high = _extent(bars)
    ticks = [t for t in nice_ticks(low, high) if low <= t <= high]
    image = Image.new("RGB", (WIDTH, HEIGHT), "white")
    draw = ImageDraw.Draw(image)
    font, small = _font(15), _font(12)
    plot = (LEFT, TOP, WIDTH - RIGHT, HEIGHT - BOTTOM)

    def y_of(value: float) -> float:
        return plot[3] - (value - low) / (high - low) * (plot[3] - plot[1])

    draw.text((LEFT, 14), title, fill="black", font=font)
    draw.text(
        (LEFT, 36),
        f"delta vs {baseline} in percentage points; error bars: +-2 standard errors; pale bars: inside the noise",
        fill=(90, 90, 90),
        font=small,
    )
    for tick in ticks:
        y = y_of(tick)
        draw.line([(plot[0], y), (plot[2], y)], fill=(230, 230, 230))
        draw.text((plot[0] - 8, y), f"{tick:g}", fill="black", font=small, anchor="rm")
    draw.rectangle(plot, outline=(150, 150, 150))
    draw.line([(plot[0], y_of(0.0)), (plot[2], y_of(0.0))], fill="black", width=2)
    _draw_groups(draw, plot, bars, y_of, font)
    _draw_legend(draw, [v.name for v in variants], plot, small)
    path.parent.mkdir(parents=True, exist_ok=True)
    image.save(path)


def _draw_groups(
    draw: ImageDraw.ImageDraw,
    plot: tuple[int, int, int, int],
    bars: list[list[Delta | None]],
    y_of: Callable[[float], float],
    font: Font,
) -> None:
    group_w = (plot[2] - plot[0]) / len(METRICS)
    n = max(1, max(len(row) for row in bars))
    bar_w = group_w * 0.8 / n
    zero = y_of(0.0)
    for g, ((_, title), row) in enumerate(zip(METRICS, bars)):
        left = plot[0] + g * group_w + group_w * 0.1
        draw.text((left + group_w * 0.4, plot[3] + 18), title, fill="black", font=font, anchor="mm")
        for i, d in enumerate(row):
            if d is None or not math.isfinite(d.mean):
                continue
            colour = PALETTE[i % len(PALETTE)]
            x0, x1 = left + i * bar_w + 1, left + (i + 1) * bar_w - 1
            top, bottom = sorted((y_of(d.mean), zero))
            draw.rectangle((x0, top, x1, bottom), fill=_pale(colour) if d.noise else colour, outline=colour)
            if math.isfinite(d.se):
                mid, cap = (x0 + x1) / 2, min(6.0, bar_w / 4)
                y_lo, y_hi = y_of(d.mean - 2 * d.se), y_of(d.mean + 2 * d.se)
                draw.line([(mid, y_lo), (mid, y_hi)], fill="black", width=1)
                draw.line([(mid - cap, y_lo), (mid + cap, y_lo)], fill="black")
                draw.line([(mid - cap, y_hi), (mid + cap, y_hi)], fill="black")


def _draw_legend(
    draw: ImageDraw.ImageDraw, names: list[str], plot: tuple[int, int, int, int], font: Font
) -> None:
    x, y = plot[2] + 16, plot[1]
    for i, name in enumerate(names):
        colour = PALETTE[i % len(PALETTE)]
        draw.rectangle((x, y + i * 22, x + 14, y + i * 22 + 14), fill=colour)
        draw.text((x + 22, y + i * 22 + 7), name, fill="black", font=font, anchor="lm")
