"""Generated videos and their sidecars: discovery, validation, segment boundaries and frame reading.

Every MP4 the inference scripts write has a sidecar ``<stem>.json`` (see ``pipeline.outputs``) with
the prompt schedule in latent frames. The causal VAE turns latent frame 0 into one pixel frame and
every later latent frame into four, so latent frame ``k > 0`` starts at pixel frame ``4k - 3``; a
segment starting at latent frame ``s`` therefore owns pixel frames ``[pixel_start(s), next start)``.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import dataclass
from itertools import pairwise
from pathlib import Path
from typing import Any

import imageio_ffmpeg
import numpy as np

from pipeline.timeline import VAE_TEMPORAL_STRIDE
from utils.errors import MemFlowError

SIDECAR_FIELDS = ("video", "complete", "sample_index", "prompts", "pixel_frames", "fps_video", "timings")


def pixel_start(latent_frame: int) -> int:
    """First pixel frame decoded from ``latent_frame`` (0 -> 0, k -> 4k - 3)."""
    return 0 if latent_frame == 0 else VAE_TEMPORAL_STRIDE * latent_frame - (VAE_TEMPORAL_STRIDE - 1)


@dataclass(frozen=True)
class Segment:
    """One prompt segment of a video: its prompts and the pixel frames ``[start, end)`` it owns."""

    index: int
    start_latent: int
    start: int
    end: int
    prompts: tuple[tuple[str, float], ...]

    @property
    def text(self) -> str:
        """The segment's prompts as one line (weights shown only for a blend)."""
        if len(self.prompts) == 1:
            return self.prompts[0][0]
        return " + ".join(f"{weight:g} x {text}" for text, weight in self.prompts)


@dataclass(frozen=True)
class VideoEntry:
    """A video to evaluate, with what its sidecar says about it."""

    video: Path
    sidecar: Path
    sample_index: int
    video_seed: int | None
    memory: str | None
    device: str | None
    dtype: str | None
    pixel_frames: int
    fps_video: int
    segments: tuple[Segment, ...]
    timings: dict[str, Any]

    @property
    def key(self) -> tuple[int, tuple[str, ...]]:
        """What pairs this video with its counterpart in another folder: sample index and prompts."""
        return self.sample_index, tuple(seg.text for seg in self.segments)


def _field(data: dict, key: str, kind: type | tuple[type, ...], where: Path) -> Any:
    value = data.get(key)
    if not isinstance(value, kind) or (isinstance(value, bool) and kind is not bool):
        raise MemFlowError(f"{where}: field {key!r} is missing or malformed; regenerate the video with inference.sh")
    return value


def segments_from_schedule(schedule: dict, pixel_frames: int, where: Path) -> tuple[Segment, ...]:
    """The segments of a sidecar's ``prompts`` (``PromptSchedule.to_dict``) in pixel frames of a video."""
    raw = schedule.get("segments") if isinstance(schedule, dict) else None
    if not isinstance(raw, list) or not raw:
        raise MemFlowError(f"{where}: 'prompts.segments' is missing or empty; regenerate the video with inference.sh")
    starts, prompts = [], []
    for i, seg in enumerate(raw):
        try:
            starts.append(int(seg["start_frame"]))
            prompts.append(tuple((str(p["text"]), float(p["weight"])) for p in seg["prompts"]))
        except (KeyError, TypeError, ValueError):
            raise MemFlowError(f"{where}: prompts.segments[{i}] is malformed; regenerate the video") from None
    bounds = [pixel_start(s) for s in starts] + [pixel_frames]
    if bounds[0] != 0 or any(b <= a for a, b in pairwise(bounds)):
        raise MemFlowError(
            f"{where}: segment starts {starts} do not fit the video's {pixel_frames} pixel frames; regenerate it"
        )
    return tuple(
        Segment(i, starts[i], bounds[i], bounds[i + 1], prompts[i]) for i in range(len(starts))
    )


def load_entry(video: Path) -> VideoEntry:
    """Read and check the sidecar of ``video``; every problem names the file and the fix."""
    sidecar = video.with_suffix(".json")
    if not sidecar.is_file():
        raise MemFlowError(
            f"{video} has no sidecar {sidecar.name} beside it; evaluate only videos written by inference.sh or "
            "interactive_inference.sh (the sidecar holds the prompts and switch frames), or move it out of the folder"
        )
    try:
        data = json.loads(sidecar.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise MemFlowError(f"{sidecar} is not readable JSON ({err}); regenerate the video") from None
    if not isinstance(data, dict) or any(key not in data for key in SIDECAR_FIELDS):
        missing = [key for key in SIDECAR_FIELDS if not isinstance(data, dict) or key not in data]
        raise MemFlowError(f"{sidecar} lacks {', '.join(missing)}; it is not a sidecar of this version's inference")
    if data["complete"] is not True:
        raise MemFlowError(
            f"{sidecar} says complete: false (the run stopped before the video was finished); "
            "regenerate the video or move it and its sidecar out of the folder"
        )
    if data["video"] != video.name:
        raise MemFlowError(f"{sidecar} describes {data['video']!r}, not {video.name}; restore the matching pair")
    pixel_frames = _field(data, "pixel_frames", int, sidecar)
    config = data.get("config") if isinstance(data.get("config"), dict) else {}
    return VideoEntry(
        video=video,
        sidecar=sidecar,
        sample_index=_field(data, "sample_index", int, sidecar),
        video_seed=data.get("video_seed"),
        memory=(config.get("model_kwargs") or {}).get("memory"),
        device=data.get("device"),
        dtype=data.get("dtype"),
        pixel_frames=pixel_frames,
        fps_video=_field(data, "fps_video", int, sidecar),
        segments=segments_from_schedule(data["prompts"], pixel_frames, sidecar),
        timings=_field(data, "timings", dict, sidecar),
    )


def count_frames(video: Path) -> int:
    """Frames in an MP4, counted by ffmpeg (MemFlowError when ffmpeg cannot read it)."""
    try:
        frames, _ = imageio_ffmpeg.count_frames_and_secs(str(video))
    except (RuntimeError, OSError) as err:
        detail = str(err).strip().splitlines()[-1] if str(err).strip() else type(err).__name__
        raise MemFlowError(f"{video} cannot be read as a video ({detail}); regenerate it") from None
    return frames


def find_videos(folder: str | Path) -> list[VideoEntry]:
    """Every ``*.mp4`` of ``folder`` with a valid, complete sidecar and the frame count it promises."""
    folder = Path(folder)
    if not folder.is_dir():
        state = "is a file, not a folder" if folder.exists() else "does not exist"
        raise MemFlowError(f"video folder {folder} {state}; pass the output_folder of an inference run")
    videos = sorted(folder.glob("*.mp4"))
    if not videos:
        raise MemFlowError(
            f"video folder {folder} has no .mp4 videos; generate some with "
            f"bash inference.sh output_folder={folder} (or interactive_inference.sh)"
        )
    entries = [load_entry(video) for video in videos]
    for entry in entries:
        frames = count_frames(entry.video)
        if frames != entry.pixel_frames:
            raise MemFlowError(
                f"{entry.video} has {frames} frames but its sidecar says pixel_frames {entry.pixel_frames}; "
                "the video is truncated or not the sidecar's: regenerate it"
            )
    return entries


def read_frames(video: Path, batch_size: int) -> Iterator[np.ndarray]:
    """The frames of ``video`` as uint8 ``[B, H, W, 3]`` batches, decoded by ffmpeg as they are needed."""
    reader = imageio_ffmpeg.read_frames(str(video))
    try:
        width, height = next(reader)["size"]
        batch: list[np.ndarray] = []
        for raw in reader:
            batch.append(np.frombuffer(raw, dtype=np.uint8).reshape(height, width, 3))
            if len(batch) == batch_size:
                yield np.stack(batch)
                batch = []
        if batch:
            yield np.stack(batch)
    finally:
        reader.close()
