"""The comparison's PNG: per-segment scores over the course of the narratives, A against B (Pillow only)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from PIL import Image, ImageDraw, ImageFont

from utils.errors import MemFlowError

from .compare import SEGMENT_METRICS

WIDTH, PANEL_HEIGHT = 900, 230
LEFT, RIGHT, TOP, BOTTOM = 80, 30, 34, 40
COLOURS = {"a": (31, 119, 180), "b": (255, 127, 14)}
GRID, AXIS, TEXT = (225, 225, 225), (60, 60, 60), (20, 20, 20)
TITLES = {
    "subject_consistency": "subject consistency (DINO)",
    "background_consistency": "background consistency (CLIP)",
    "text_alignment": "text alignment with the segment's own prompt (CLIP)",
}


def _range(curves: dict[str, list[dict[str, Any]]]) -> tuple[float, float]:
    values = [p["mean"] + sign * (p["se"] or 0.0) for side in curves.values() for p in side for sign in (-1, 1)]
    lo, hi = min(values), max(values)
    pad = (hi - lo) * 0.08 or 0.01
    return lo - pad, hi + pad


def _panel(draw: ImageDraw.ImageDraw, top: int, title: str, curves: dict[str, list[dict]], font) -> None:
    x0, x1, y0, y1 = LEFT, WIDTH - RIGHT, top + TOP, top + PANEL_HEIGHT - BOTTOM
    lo, hi = _range(curves)
    count = max(len(side) for side in curves.values())

    def x(s: int) -> float:
        return x0 + (x1 - x0) * (s + 0.5) / count

    def y(v: float) -> float:
        return y1 - (y1 - y0) * (v - lo) / (hi - lo)

    draw.text((x0, top + 10), title, fill=TEXT, font=font)
    for k in range(5):
        value = lo + (hi - lo) * k / 4
        draw.line([(x0, y(value)), (x1, y(value))], fill=GRID)
        draw.text((8, y(value) - 6), f"{value:.3f}", fill=TEXT, font=font)
    draw.rectangle([x0, y0, x1, y1], outline=AXIS)
    for s in range(count):
        draw.text((x(s) - 20, y1 + 8), f"segment {s + 1}", fill=TEXT, font=font)
    for offset, side in ((-4, "a"), (4, "b")):
        points = [(x(s) + offset, y(p["mean"])) for s, p in enumerate(curves[side])]
        if len(points) > 1:
            draw.line(points, fill=COLOURS[side], width=2)
        for (px, py), p in zip(points, curves[side], strict=True):
            if p["se"]:
                draw.line([(px, y(p["mean"] - p["se"])), (px, y(p["mean"] + p["se"]))], fill=COLOURS[side], width=1)
            draw.ellipse([px - 3, py - 3, px + 3, py + 3], fill=COLOURS[side])


def draw_comparison(comparison: dict[str, Any]) -> Image.Image:
    """One panel per segment metric: mean over narratives at each segment position, bars +- one standard error."""
    font = ImageFont.load_default()
    legend = 30
    image = Image.new("RGB", (WIDTH, legend + PANEL_HEIGHT * len(SEGMENT_METRICS)), "white")
    draw = ImageDraw.Draw(image)
    for i, (side, label) in enumerate((("a", f"A = {comparison['a']}"), ("b", f"B = {comparison['b']}"))):
        x = LEFT + i * (WIDTH - LEFT) // 2
        draw.rectangle([x, 10, x + 14, 22], fill=COLOURS[side])
        draw.text((x + 20, 10), label, fill=TEXT, font=font)
    for i, metric in enumerate(SEGMENT_METRICS):
        _panel(draw, legend + i * PANEL_HEIGHT, TITLES[metric], comparison["segments"][metric], font)
    return image


def render_comparison(comparison: dict[str, Any], path: str | Path) -> Path:
    """Save :func:`draw_comparison` as a PNG; an existing file is an error (never overwritten)."""
    path = Path(path)
    try:
        with open(path, "xb") as handle:
            draw_comparison(comparison).save(handle, format="PNG")
    except FileExistsError:
        raise MemFlowError(f"{path} already exists; outputs are never overwritten, choose another --out") from None
    return path
