"""Run outputs, written while the run progresses: the MP4, the sidecar JSON and the memory-trace PNG.

No function here ever overwrites an existing file: names come from :func:`unique_path`, the video
writer and the PNG refuse an existing path, and the sidecar only replaces its own earlier version
when asked to.
"""

from __future__ import annotations

import contextlib
import itertools
import logging
import re
import subprocess
import tempfile
import threading
import time
import unicodedata
from collections.abc import Sequence
from pathlib import Path
from typing import BinaryIO

import imageio_ffmpeg
import numpy as np
import torch

from utils.errors import MemFlowError

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


def reserve_stem(folder: str | Path, stem: str, suffixes: Sequence[str]) -> str:
    """Like :func:`unique_stem`, and claimed: the first suffix's file is created exclusively, so a process
    reserving the same stem at the same instant takes the next free number instead of failing."""
    folder = Path(folder)
    candidate = stem
    for n in itertools.count(1):
        if not any((folder / f"{candidate}{suffix}").exists() for suffix in suffixes):
            try:
                with open(folder / f"{candidate}{suffixes[0]}", "xb"):
                    return candidate
            except FileExistsError:
                pass
            except OSError as err:
                claim = folder / f"{candidate}{suffixes[0]}"
                raise MemFlowError(f"cannot create {claim}: {err.strerror or err}") from None
        candidate = f"{stem}-{n}"
    raise AssertionError("unreachable")


def check_writable(folder: str | Path) -> Path:
    """Prove that files can be written in ``folder`` (or, when it does not exist yet, created in its nearest
    existing parent) without leaving anything behind; MemFlowError otherwise.

    Call it before any generation so a bad ``output_folder`` fails in a second, not after an hour; the folder
    itself is made only when the first output is written (:func:`make_folder`).
    """
    folder = Path(folder)
    existing = next(p for p in (folder, *folder.parents) if p.exists() or p == Path(p.anchor))
    if not existing.is_dir():
        where = "is a file" if existing == folder else f"is not writable: {existing} is a file"
        raise MemFlowError(f"output folder {folder} {where}; set output_folder to a folder")
    try:
        with tempfile.TemporaryFile(dir=existing):
            pass
    except OSError as err:
        raise MemFlowError(
            f"output folder {folder} is not writable ({err.strerror or err}); choose another output_folder"
        ) from None
    return folder


def make_folder(folder: str | Path) -> Path:
    """Create ``folder`` (and its parents) for the first output written there."""
    folder = Path(folder)
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise MemFlowError(f"cannot create output folder {folder} ({err.strerror or err})") from None
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
        self._claimed = False
        check_writable(self.path.parent)
        if self.path.exists():
            raise MemFlowError(f"{self.path} already exists; outputs are never overwritten, choose another name")

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
        """Claim the file and start ffmpeg at the first frames, so a run killed before them leaves no MP4."""
        if width % 2 or height % 2:
            raise MemFlowError(f"video size {width}x{height} must be even for H.264; use even height and width")
        _reserve(self.path)
        self._claimed = True
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
        """Finish the file. A file this writer claimed but never wrote a frame to is removed.

        ``abort=True`` (an exception is propagating) still finalises what was written but does not
        report ffmpeg's exit status (after Ctrl-C ffmpeg has already finished the file itself).
        """
        proc, self._proc = self._proc, None
        if proc is None:
            if self._claimed and self.frames_written == 0:
                self.path.unlink(missing_ok=True)
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
