"""Run outputs, written while the run progresses: the MP4, the sidecar JSON and the memory-trace PNG.

No function here ever overwrites an existing file: names come from :func:`unique_path`, the video
writer and the PNG refuse an existing path, and the sidecar only replaces its own earlier version
when asked to.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import re
import subprocess
import tempfile
import threading
import time
import unicodedata
from collections.abc import Sequence
from pathlib import Path
from typing import Any, BinaryIO

import imageio_ffmpeg
import numpy as np
import torch
from omegaconf import DictConfig, ListConfig, OmegaConf
from PIL import Image, ImageDraw, ImageFont

from memflow.errors import MemFlowError
from utils.atomic import atomic_path

log = logging.getLogger(__name__)

FPS = 16


# --------------------------------------------------------------------------------------------
# Names


def slugify(text: str, max_len: int = 60) -> str:
    """A filesystem-safe, lowercase ASCII slug of ``text``, cut at a word boundary within ``max_len``."""
    ascii_text = unicodedata.normalize("NFKD", text).encode("ascii", "ignore").decode("ascii")
    slug = re.sub(r"[^a-z0-9]+", "-", ascii_text.lower()).strip("-")
    if len(slug) > max_len:
        cut = slug[: max_len + 1]
        slug = cut[: cut.rfind("-")] if "-" in cut[1:] else slug[:max_len]
        slug = slug.strip("-")
    return slug or "video"


def output_stem(index: int, prompt: str, save_with_index: bool, max_len: int = 60) -> str:
    """File stem of the ``index``-th video: ``0003-a-panda-walks...`` or just the prompt slug."""
    slug = slugify(prompt, max_len)
    return f"{index:04d}-{slug}" if save_with_index else slug


def unique_stem(folder: str | Path, stem: str, suffixes: Sequence[str]) -> str:
    """``stem``, or ``stem-1``, ``stem-2``..., the first for which no ``stem + suffix`` file exists.

    Pass every suffix a run will write (``.mp4``, ``.json``, ``.memory.png``) so they share one stem.
    """
    folder = Path(folder)
    candidate, n = stem, 0
    while any((folder / f"{candidate}{suffix}").exists() for suffix in suffixes):
        n += 1
        candidate = f"{stem}-{n}"
    return candidate


def unique_path(folder: str | Path, stem: str, suffix: str) -> Path:
    """``folder/stem+suffix``, numbered (``stem-1``...) when that file already exists."""
    return Path(folder) / f"{unique_stem(folder, stem, [suffix])}{suffix}"


def check_writable(folder: str | Path) -> Path:
    """Create ``folder`` if needed and prove a file can be written there; MemFlowError otherwise.

    Call it before any generation so a bad ``output_folder`` fails in a second, not after an hour.
    """
    folder = Path(folder)
    if folder.exists() and not folder.is_dir():
        raise MemFlowError(f"output folder {folder} is a file; set output_folder to a folder")
    try:
        folder.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=folder):
            pass
    except OSError as err:
        raise MemFlowError(
            f"output folder {folder} is not writable ({err.strerror or err}); choose another output_folder"
        ) from None
    return folder


def _reserve(path: Path) -> None:
    """Create ``path`` exclusively, so neither we nor a concurrent run can overwrite a file."""
    try:
        with open(path, "xb"):
            pass
    except FileExistsError:
        raise MemFlowError(f"{path} already exists; outputs are never overwritten, choose another name") from None
    except OSError as err:
        raise MemFlowError(f"cannot create {path}: {err.strerror or err}") from None


# --------------------------------------------------------------------------------------------
# Video


def to_uint8_frames(frames: torch.Tensor | np.ndarray) -> np.ndarray:
    """``[T, 3, H, W]`` tensor in [-1, 1] (or uint8), or a ``[T, H, W, 3]`` uint8 array -> uint8 ``[T, H, W, 3]``."""
    if isinstance(frames, torch.Tensor):
        if frames.dim() != 4 or frames.shape[1] != 3:
            raise ValueError(f"frames must be [T, 3, H, W], got shape {tuple(frames.shape)}")
        if frames.dtype != torch.uint8:
            frames = ((frames.detach().float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
        return frames.permute(0, 2, 3, 1).contiguous().cpu().numpy()
    if isinstance(frames, np.ndarray) and frames.dtype == np.uint8 and frames.ndim == 4 and frames.shape[3] == 3:
        return np.ascontiguousarray(frames)
    raise ValueError("frames must be a [T, 3, H, W] tensor in [-1, 1] or a uint8 [T, H, W, 3] array")


class VideoWriter:
    """Writes an H.264 MP4 chunk by chunk through imageio-ffmpeg's ffmpeg binary.

    The file is a fragmented MP4 with one fragment per frame, and :meth:`write` returns only once
    ffmpeg reports every frame of the chunk muxed. A run killed at any point (even with ffmpeg
    itself) therefore leaves a playable file holding every frame written before the kill except
    the most recent one (the muxer closes a fragment when the next frame arrives; :meth:`close`
    writes it). Libx264 runs with ``-tune zerolatency`` so no frames wait in encoder lookahead.
    """

    def __init__(self, path: str | Path, fps: int = FPS, crf: int = 18, flush_timeout: float = 300.0) -> None:
        self.path = Path(path)
        self.fps = fps
        self.crf = crf
        self.flush_timeout = flush_timeout
        self.frames_written = 0
        self._size: tuple[int, int] | None = None
        self._proc: subprocess.Popen | None = None
        self._stderr: BinaryIO | None = None
        self._reader: threading.Thread | None = None
        self._muxed = 0
        self._progress_done = False
        self._progress = threading.Condition()
        check_writable(self.path.parent)
        _reserve(self.path)

    def __enter__(self) -> VideoWriter:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            self.close()
            return
        try:
            self.close(abort=True)
        except MemFlowError as err:
            log.warning("while handling %s: %s", exc_type.__name__, err)

    def _command(self, width: int, height: int) -> list[str]:
        return [
            imageio_ffmpeg.get_ffmpeg_exe(), "-hide_banner", "-nostdin", "-loglevel", "error", "-nostats",
            "-f", "rawvideo", "-pix_fmt", "rgb24", "-s", f"{width}x{height}", "-r", str(self.fps), "-i", "pipe:0",
            "-an", "-c:v", "libx264", "-preset", "veryfast", "-tune", "zerolatency", "-crf", str(self.crf),
            "-pix_fmt", "yuv420p",
            "-movflags", "+frag_keyframe+empty_moov+default_base_moof+frag_every_frame",
            "-flush_packets", "1", "-progress", "pipe:1", "-stats_period", "0.05",
            "-y", str(self.path),
        ]

    def _start(self, width: int, height: int) -> None:
        if width % 2 or height % 2:
            raise MemFlowError(f"video size {width}x{height} must be even for H.264; use even height and width")
        self._size = (width, height)
        self._stderr = tempfile.TemporaryFile()  # noqa: SIM115 - lives as long as ffmpeg; closed in close()
        self._proc = subprocess.Popen(
            self._command(width, height), stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=self._stderr
        )
        self._reader = threading.Thread(target=self._read_progress, name="ffmpeg-progress", daemon=True)
        self._reader.start()

    def _read_progress(self) -> None:
        assert self._proc is not None and self._proc.stdout is not None
        for raw in self._proc.stdout:
            if raw.startswith(b"frame="):
                with self._progress:
                    self._muxed = int(raw[6:])
                    self._progress.notify_all()
        with self._progress:
            self._progress_done = True
            self._progress.notify_all()

    def _ffmpeg_error(self, what: str) -> MemFlowError:
        detail = ""
        if self._stderr is not None:
            self._stderr.seek(0)
            lines = self._stderr.read().decode("utf-8", "replace").strip().splitlines()
            detail = f": {lines[-1]}" if lines else ""
        return MemFlowError(f"ffmpeg {what} while writing {self.path}{detail}")

    def write(self, frames: torch.Tensor | np.ndarray) -> None:
        """Append frames (see :func:`to_uint8_frames`) and wait until ffmpeg has muxed them."""
        array = to_uint8_frames(frames)
        height, width = array.shape[1:3]
        if self._proc is None:
            self._start(width, height)
        elif (width, height) != self._size:
            raise ValueError(f"frame size {width}x{height} differs from the video's {self._size[0]}x{self._size[1]}")
        assert self._proc is not None and self._proc.stdin is not None
        try:
            self._proc.stdin.write(array.tobytes())
            self._proc.stdin.flush()
        except BrokenPipeError:
            raise self._ffmpeg_error("stopped") from None
        self.frames_written += len(array)
        self._wait_muxed(self.frames_written)

    def _wait_muxed(self, count: int) -> None:
        deadline = time.monotonic() + self.flush_timeout
        with self._progress:
            while self._muxed < count:
                if self._progress_done:
                    raise self._ffmpeg_error("exited")
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    raise self._ffmpeg_error(f"did not mux {count} frames within {self.flush_timeout:.0f} s")
                self._progress.wait(remaining)

    def close(self, abort: bool = False) -> None:
        """Finish the file. With no frames written the reserved empty file is removed.

        ``abort=True`` (an exception is propagating) still finalises what was written but does not
        report ffmpeg's exit status (after Ctrl-C ffmpeg has already finished the file itself).
        """
        proc, self._proc = self._proc, None
        if proc is None:
            if self.frames_written == 0 and self.path.exists() and self.path.stat().st_size == 0:
                self.path.unlink()
            return
        assert proc.stdin is not None
        with contextlib.suppress(BrokenPipeError):
            proc.stdin.close()
        try:
            code = proc.wait(timeout=self.flush_timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            code = proc.wait()
        if self._reader is not None:
            self._reader.join()
        try:
            if code != 0 and not abort:
                raise self._ffmpeg_error(f"failed with exit code {code}")
        finally:
            if self._stderr is not None:
                self._stderr.close()
                self._stderr = None


# --------------------------------------------------------------------------------------------
# Sidecar


def _jsonable(value: Any) -> Any:
    if isinstance(value, (DictConfig, ListConfig)):
        return OmegaConf.to_container(value, resolve=True)
    if isinstance(value, (torch.Tensor, np.ndarray)):
        return value.tolist()
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, Path):
        return str(value)
    if isinstance(value, (set, frozenset)):
        return sorted(value)
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return dataclasses.asdict(value)
    raise TypeError(f"cannot write a {type(value).__name__} to the sidecar JSON")


def write_sidecar(path: str | Path, data: dict[str, Any], replace: bool = False) -> Path:
    """Write ``data`` as JSON atomically (temp file, then rename) so a reader never sees half a file.

    The sidecar of a run holds its resolved config, seed, prompts, switch points, per-chunk timings
    and memory trace. ``replace=True`` lets a run update its own sidecar as chunks finish; without
    it an existing file is an error. Tensors, arrays, paths, dataclasses and OmegaConf nodes are
    converted.
    """
    path = Path(path)
    if not replace and path.exists():
        raise MemFlowError(f"{path} already exists; outputs are never overwritten, choose another name")
    text = json.dumps(data, indent=2, default=_jsonable, allow_nan=False, ensure_ascii=False)
    with atomic_path(path) as tmp:
        tmp.write_text(text + "\n", encoding="utf-8")
    return path


# --------------------------------------------------------------------------------------------
# Memory trace


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
