"""The memory trace of a video as a picture: rows are chunks, columns latent frames.

Each row shows what that chunk attended to - the sink, the local window, the share of layers whose
bank held a frame, the share of heads whose SMA routing selected it - and where the prompt switched.
The trace is the ``memory_trace`` of the sidecar (``StreamingGenerator.memory_trace``), checked here
before anything is drawn.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

from PIL import Image, ImageDraw, ImageFont

from utils.errors import MemFlowError

SINK = (31, 119, 180)
WINDOW = (255, 187, 120)
CHUNK = (214, 39, 40)
PAST = (235, 235, 235)
FUTURE = (255, 255, 255)
BANK_LIGHT, BANK_DARK = (199, 233, 192), (0, 109, 44)
SMA_LIGHT, SMA_DARK = (218, 218, 235), (84, 39, 143)
SWITCH = (0, 0, 0)
TEXT = (20, 20, 20)


def shade(light: tuple[int, int, int], dark: tuple[int, int, int], fraction: float) -> tuple[int, int, int]:
    """Colour of a fraction in (0, 1]: ``light`` for the smallest share, ``dark`` for all."""
    return tuple(round(lo + (hi - lo) * fraction) for lo, hi in zip(light, dark, strict=True))  # type: ignore[return-value]


def _fail(where: str, problem: str) -> MemFlowError:
    return MemFlowError(f"memory trace: {where}: {problem}")


def _frame_list(value: Any, where: str, num_frames: int) -> list[int]:
    if not isinstance(value, list):
        raise _fail(where, f"must be a list of frame ids, got {type(value).__name__}")
    for frame in value:
        if isinstance(frame, bool) or not isinstance(frame, int) or not 0 <= frame < num_frames:
            raise _fail(where, f"frame {frame!r} is not an id in 0..{num_frames - 1}")
    return value


def _positive(trace: dict, key: str) -> int:
    value = trace.get(key)
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise _fail(key, f"must be a positive integer, got {value!r}")
    return value


@dataclasses.dataclass(frozen=True)
class TraceRow:
    """What one chunk's context held, per latent frame: role, bank share and SMA share."""

    chunk: int
    start_frame: int
    num_frames: int
    switch: bool
    sink: frozenset[int]
    window: frozenset[int]
    bank: dict[int, float] | None
    sma: dict[int, float] | None


def parse_trace(trace: dict) -> tuple[int, list[TraceRow]]:
    """Validate a trace (schema in :func:`render_memory_trace`) -> ``(num_frames, rows)``."""
    if not isinstance(trace, dict):
        raise _fail("(top level)", "must be an object")
    num_frames = _positive(trace, "num_frames")
    num_layers = _positive(trace, "num_layers")
    num_heads = _positive(trace, "num_heads")
    _positive(trace, "chunk_frames")
    chunks = trace.get("chunks")
    if not isinstance(chunks, list) or not chunks:
        raise _fail("chunks", "must be a non-empty list")
    rows = []
    for i, entry in enumerate(chunks):
        where = f"chunks[{i}]"
        if not isinstance(entry, dict):
            raise _fail(where, "must be an object")
        start, count = entry.get("start_frame"), entry.get("num_frames")
        fits = isinstance(start, int) and isinstance(count, int) and start >= 0 and count >= 1
        if not fits or start + count > num_frames:
            raise _fail(where, f"start_frame={start!r}, num_frames={count!r} do not fit in {num_frames} frames")
        bank = sma = None
        if entry.get("bank") is not None:
            layers = entry["bank"]
            if not isinstance(layers, list) or len(layers) != num_layers:
                raise _fail(f"{where}.bank", f"must hold one frame list per layer ({num_layers})")
            counts: dict[int, int] = {}
            for layer, frames in enumerate(layers):
                for frame in set(_frame_list(frames, f"{where}.bank[{layer}]", num_frames)):
                    counts[frame] = counts.get(frame, 0) + 1
            bank = {frame: n / num_layers for frame, n in counts.items()}
        if entry.get("sma") is not None:
            layers = entry["sma"]
            if not isinstance(layers, list) or len(layers) != num_layers:
                raise _fail(f"{where}.sma", f"must hold one list per layer ({num_layers})")
            counts = {}
            for layer, heads in enumerate(layers):
                if not isinstance(heads, list) or len(heads) != num_heads:
                    raise _fail(f"{where}.sma[{layer}]", f"must hold one frame list per head ({num_heads})")
                for head, frames in enumerate(heads):
                    for frame in set(_frame_list(frames, f"{where}.sma[{layer}][{head}]", num_frames)):
                        counts[frame] = counts.get(frame, 0) + 1
            sma = {frame: n / (num_layers * num_heads) for frame, n in counts.items()}
        rows.append(TraceRow(
            chunk=entry.get("chunk", i),
            start_frame=start,
            num_frames=count,
            switch=bool(entry.get("switch", False)),
            sink=frozenset(_frame_list(entry.get("sink", []), f"{where}.sink", num_frames)),
            window=frozenset(_frame_list(entry.get("window", []), f"{where}.window", num_frames)),
            bank=bank,
            sma=sma,
        ))
    return num_frames, rows


@dataclasses.dataclass(frozen=True)
class TraceLayout:
    """Where things are drawn in a memory-trace image (pixels)."""

    left: int
    top: int
    cell_width: int
    stripe_height: int
    row_gap: int
    stripes: tuple[str, ...]
    num_frames: int
    num_rows: int

    @property
    def row_height(self) -> int:
        return self.stripe_height * len(self.stripes) + self.row_gap

    @property
    def grid_width(self) -> int:
        return self.cell_width * self.num_frames

    @property
    def grid_height(self) -> int:
        return self.row_height * self.num_rows

    def cell_box(self, row: int, frame: int, stripe: str) -> tuple[int, int, int, int]:
        """Inclusive pixel box ``(x0, y0, x1, y1)`` of a stripe of a cell."""
        x0 = self.left + frame * self.cell_width
        y0 = self.top + row * self.row_height + self.stripes.index(stripe) * self.stripe_height
        return x0, y0, x0 + self.cell_width - 2, y0 + self.stripe_height - 1

    def cell_center(self, row: int, frame: int, stripe: str) -> tuple[int, int]:
        x0, y0, x1, y1 = self.cell_box(row, frame, stripe)
        return (x0 + x1) // 2, (y0 + y1) // 2


def _context_colour(row: TraceRow, frame: int) -> tuple[int, int, int]:
    if row.start_frame <= frame < row.start_frame + row.num_frames:
        return CHUNK
    if frame in row.sink:
        return SINK
    if frame in row.window:
        return WINDOW
    return PAST if frame < row.start_frame else FUTURE


def _tick_step(count: int, target: int) -> int:
    for step in (1, 2, 3, 5, 6, 10, 12, 15, 20, 24, 30, 50, 60, 100, 120, 150, 200, 300, 500, 1000):
        if count / step <= target:
            return step
    return max(1, count // target)


def draw_memory_trace(trace: dict) -> tuple[Image.Image, TraceLayout]:
    """Draw the trace (see :func:`render_memory_trace`) -> ``(image, layout)``."""
    num_frames, rows = parse_trace(trace)
    stripes = ("context",)
    if any(r.bank is not None for r in rows):
        stripes += ("bank",)
    if any(r.sma is not None for r in rows):
        stripes += ("sma",)
    font = ImageFont.load_default(size=12)
    text_h = 14
    cell_width = max(3, min(16, 960 // num_frames))
    stripe_height = {1: 10, 2: 6, 3: 5}[len(stripes)]
    layout = TraceLayout(
        left=70, top=2 * text_h + 12, cell_width=cell_width, stripe_height=stripe_height, row_gap=3,
        stripes=stripes, num_frames=num_frames, num_rows=len(rows),
    )
    legend = _legend_entries(trace, stripes)
    legend_height = len(legend) * (text_h + 4) + 10
    axis_height = 2 * text_h + 14
    width = max(layout.left + layout.grid_width + 20, 560)
    height = layout.top + layout.grid_height + axis_height + legend_height
    image = Image.new("RGB", (width, height), FUTURE)
    draw = ImageDraw.Draw(image)

    title = (f"memory trace: {num_frames} latent frames, {len(rows)} chunks, "
             f"{trace['num_layers']} layers x {trace['num_heads']} heads")
    draw.text((layout.left, 4), title, fill=TEXT, font=font)
    draw.text((layout.left, 4 + text_h), "stripes per cell (top to bottom): " + " | ".join(stripes),
              fill=TEXT, font=font)

    for r, row in enumerate(rows):
        for frame in range(num_frames):
            draw.rectangle(layout.cell_box(r, frame, "context"), fill=_context_colour(row, frame))
            for name, shares, light, dark in (("bank", row.bank, BANK_LIGHT, BANK_DARK),
                                              ("sma", row.sma, SMA_LIGHT, SMA_DARK)):
                if name in stripes and shares and shares.get(frame):
                    draw.rectangle(layout.cell_box(r, frame, name), fill=shade(light, dark, shares[frame]))
        y_mid = layout.top + r * layout.row_height + (layout.row_height - layout.row_gap) // 2
        if row.switch:
            y_gap = layout.top + r * layout.row_height - 2
            draw.line([(layout.left, y_gap), (layout.left + layout.grid_width - 2, y_gap)], fill=SWITCH)
            draw.polygon([(layout.left - 12, y_mid - 4), (layout.left - 12, y_mid + 4), (layout.left - 4, y_mid)],
                         fill=SWITCH)

    # y axis: chunk index every few rows
    ystep = _tick_step(len(rows), max(1, layout.grid_height // (text_h + 4)))
    for r in range(0, len(rows), ystep):
        y_mid = layout.top + r * layout.row_height + (layout.row_height - layout.row_gap) // 2
        draw.text((layout.left - 16, y_mid), str(rows[r].chunk), fill=TEXT, font=font, anchor="rm")
    draw.text((4, layout.top - text_h - 2), "chunk", fill=TEXT, font=font)

    # x axis: latent frame ticks
    axis_y = layout.top + layout.grid_height + 2
    xstep = _tick_step(num_frames, max(1, layout.grid_width // 36))
    for frame in range(0, num_frames, xstep):
        x = layout.left + frame * cell_width + cell_width // 2
        draw.line([(x, axis_y), (x, axis_y + 3)], fill=TEXT)
        draw.text((x, axis_y + 4), str(frame), fill=TEXT, font=font, anchor="mt")
    draw.text((layout.left, axis_y + text_h + 6), "latent frame", fill=TEXT, font=font)

    y = layout.top + layout.grid_height + axis_height
    for label, paint in legend:
        paint(draw, layout.left, y + 2)
        draw.text((layout.left + 110, y), label, fill=TEXT, font=font)
        y += text_h + 4
    return image, layout


def _legend_entries(trace: dict, stripes: tuple[str, ...]) -> list[tuple[str, Any]]:
    def swatch(colour):
        return lambda d, x, y: d.rectangle((x, y, x + 24, y + 9), fill=colour)

    def ramp(light, dark):
        def paint(d, x, y):
            for k in range(100):
                d.line([(x + k, y), (x + k, y + 9)], fill=shade(light, dark, (k + 1) / 100))
        return paint

    def switch(d, x, y):
        d.polygon([(x, y), (x, y + 9), (x + 8, y + 4)], fill=SWITCH)

    entries = [
        ("current chunk (being generated)", swatch(CHUNK)),
        ("frame sink", swatch(SINK)),
        ("local window", swatch(WINDOW)),
        ("earlier frame, not attended", swatch(PAST)),
    ]
    if "bank" in stripes:
        label = f"memory bank: share of the {trace['num_layers']} layers holding the frame"
        entries.append((label, ramp(BANK_LIGHT, BANK_DARK)))
    if "sma" in stripes:
        pairs = trace["num_layers"] * trace["num_heads"]
        entries.append((f"SMA: share of the {pairs} (layer, head) pairs activating it", ramp(SMA_LIGHT, SMA_DARK)))
    entries.append(("prompt switch (KV re-cache) before this chunk", switch))
    return entries


def render_memory_trace(trace: dict, path: str | Path) -> TraceLayout:
    """Save a PNG of what memory did in a run; returns the layout (cell positions) used.

    Rows are chunks, columns latent frames. Each cell has a context stripe (current chunk, frame
    sink, local window or not attended), a bank stripe shaded by the share of layers whose bank
    holds the frame, and for SMA a stripe shaded by the share of (layer, head) pairs that activated
    it; a triangle marks chunks that start with a prompt switch. Trace schema::

        {"num_frames": N, "chunk_frames": 3, "num_layers": L, "num_heads": H,
         "chunks": [{"chunk": c, "start_frame": s, "num_frames": n, "switch": bool,
                     "sink": [frame ids], "window": [frame ids],
                     "bank": [[frame ids] per layer] or null,
                     "sma": [[[frame ids] per head] per layer] or null}, ...]}
    """
    image, layout = draw_memory_trace(trace)
    path = Path(path)
    try:
        with open(path, "xb") as handle:
            image.save(handle, format="PNG")
    except FileExistsError:
        raise MemFlowError(f"{path} already exists; outputs are never overwritten, choose another name") from None
    return layout
