"""Scope's timeline JSON -> a prompt schedule and the settings it asks for.

Segments are in seconds, each a weighted blend of prompts, optionally reached by a transition over
some chunks. Times map to latent frames as: pixel frame = seconds * 16 (fps); latent frame =
round(pixel / 4) (the VAE's temporal stride); then the latent frame is snapped to the nearest chunk
boundary (multiple of ``num_frame_per_block``). Both roundings go half up, so 0.375 s (1.5 latent
frames) with 3-frame chunks snaps to frame 3.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from itertools import pairwise
from pathlib import Path
from typing import Any

from utils.errors import MemFlowError

from .prompts import read_prompt_file
from .schedule import DEFAULT_INTERPOLATION, INTERPOLATIONS, PromptSchedule, PromptSegment

FPS = 16
VAE_TEMPORAL_STRIDE = 4
MAX_SECONDS = 24 * 3600  # a timeline longer than a day is a typo, and larger times overflow the frame maths
MAX_SEED = 2**64 - 1
PIPELINE_ID = "memflow"
# settings this engine reads; "version"/"exportedAt" beside them are file metadata
READ_SETTINGS = ("pipelineId", "inputMode", "resolution", "seed", "denoisingSteps")
# settings that ask for nothing when they hold these values (Scope's defaults for MemFlow)
INACTIVE_SETTINGS = {"quantization": None, "loras": [], "manageCache": True, "loraMergeStrategy": "permanent_merge"}


def seconds_to_latent_frame(seconds: float, chunk_frames: int) -> int:
    """Timeline seconds -> the chunk-boundary latent frame (see the module docstring for the rule)."""
    latent = math.floor(seconds * FPS / VAE_TEMPORAL_STRIDE + 0.5)
    return chunk_frames * math.floor(latent / chunk_frames + 0.5)


@dataclass(frozen=True)
class Timeline:
    """A Scope timeline: the prompt schedule plus the settings it asks for as config overrides.

    ``settings`` holds any of ``height``, ``width``, ``seed``, ``denoising_step_list``; ``unsupported``
    the settings this engine does not honour (named to the user, never applied), ``pipeline_id`` the
    Scope pipeline the timeline was made for.
    """

    schedule: PromptSchedule
    settings: dict[str, Any]
    unsupported: dict[str, Any] = field(default_factory=dict)
    pipeline_id: str | None = None


class _Json:
    """Typed reads from parsed JSON that raise with the file and the JSON path of the bad field."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def fail(self, where: str, problem: str) -> MemFlowError:
        return MemFlowError(f"{self.path}: {where}: {problem}")

    def get(self, obj: dict, key: str, where: str, kind: type | tuple[type, ...], default: Any = ...) -> Any:
        field = f"{where}.{key}" if where else key
        if key not in obj:
            if default is ...:
                raise self.fail(field, "is missing")
            return default
        value = obj[key]
        numeric = kind in (float, (int, float))
        if isinstance(value, bool) or not isinstance(value, kind):
            expected = {dict: "an object", list: "a list", str: "a string", int: "an integer"}.get(kind, "a number")
            raise self.fail(field, f"must be {expected}, got {value!r}")
        if numeric and not math.isfinite(value):
            raise self.fail(field, f"must be a finite number, got {value!r}")
        return value

    def seconds(self, obj: dict, key: str, where: str, default: Any = ...) -> float | None:
        """A time in seconds, in [0, MAX_SECONDS]."""
        value = self.get(obj, key, where, (int, float), default)
        if value is not None and not 0 <= value <= MAX_SECONDS:
            raise self.fail(f"{where}.{key}", f"{value} s is outside [0, {MAX_SECONDS}] seconds")
        return value


def load_timeline(path: str | Path, chunk_frames: int, num_frames: int | None = None) -> Timeline:
    """Scope timeline JSON -> :class:`Timeline`.

    Segments must be in time order; a gap between one segment's ``endTime`` and the next
    ``startTime`` keeps the earlier prompt. The video length is ``num_frames`` when given,
    otherwise the last segment's ``endTime`` in latent frames (same rounding as the starts).
    ``transitionSteps`` counts chunks; it is ignored on the first segment (nothing to blend from).
    Unknown keys are ignored; ``settings.inputMode`` other than ``"text"`` is refused.
    """
    path, text = read_prompt_file(path, "timeline file")
    try:
        data = json.loads(text)
    except json.JSONDecodeError as err:
        raise MemFlowError(f"{path}:{err.lineno}:{err.colno}: malformed JSON ({err.msg})") from None
    js = _Json(path)
    if not isinstance(data, dict):
        raise js.fail("(top level)", 'must be an object with a "prompts" list')
    entries = js.get(data, "prompts", "", list)
    if not entries:
        raise js.fail("prompts", "is empty; add at least one segment")
    segments: list[PromptSegment] = []
    last_end = 0.0
    for i, entry in enumerate(entries):
        segment, start_time, end_time = _segment(js, entry, i, chunk_frames)
        if segments and start_time < last_end:
            raise js.fail(f"prompts[{i}].startTime", f"{start_time} s is before the previous segment ends "
                          f"({last_end} s); segments must not overlap")  # fmt: skip
        last_end = end_time
        if segments and segment.start <= segments[-1].start:
            raise js.fail(
                f"prompts[{i}].startTime",
                f"{entry['startTime']} s maps to latent frame {segment.start}, not after the previous segment's "
                f"frame {segments[-1].start}; segments must be in time order and at least one chunk "
                f"({chunk_frames * VAE_TEMPORAL_STRIDE / FPS} s) apart",
            )
        segments.append(segment)
    num_frames = _video_length(js, segments, last_end, chunk_frames, num_frames)
    schedule = PromptSchedule(tuple(segments), num_frames, chunk_frames)
    settings = data.get("settings")
    if settings is not None and not isinstance(settings, dict):
        raise js.fail("settings", "must be an object")
    settings = settings or {}
    unsupported = {key: value for key, value in settings.items()
                   if key not in READ_SETTINGS and INACTIVE_SETTINGS.get(key, ...) != value}  # fmt: skip
    pipeline_id = js.get(settings, "pipelineId", "settings", str, None)
    return Timeline(schedule, _timeline_settings(js, settings), unsupported, pipeline_id)


def _segment(js: _Json, entry: Any, i: int, chunk_frames: int) -> tuple[PromptSegment, float, float]:
    """Segment ``i`` of the timeline, its start time and the time it ends (``endTime``, else ``startTime``)."""
    where = f"prompts[{i}]"
    if not isinstance(entry, dict):
        raise js.fail(where, "must be an object with startTime and prompts")
    start_time = js.seconds(entry, "startTime", where)
    end_time = js.seconds(entry, "endTime", where, None)
    if end_time is not None and end_time <= start_time:
        raise js.fail(f"{where}.endTime", f"{end_time} must be after startTime {start_time}")
    steps = js.get(entry, "transitionSteps", where, int, 0)
    if steps < 0:
        raise js.fail(f"{where}.transitionSteps", f"must be >= 0 chunks, got {steps}")
    method = js.get(entry, "temporalInterpolationMethod", where, str, DEFAULT_INTERPOLATION)
    if method not in INTERPOLATIONS:
        raise js.fail(f"{where}.temporalInterpolationMethod", f"{method!r} is not one of slerp, linear")
    pairs = _weighted_prompts(js, js.get(entry, "prompts", where, list), where)
    start = seconds_to_latent_frame(start_time, chunk_frames)
    if i == 0 and start != 0:
        raise js.fail(f"{where}.startTime", f"the first segment must start at 0 s, not {start_time}")
    end = end_time if end_time is not None else start_time
    return PromptSegment(start, tuple(pairs), steps if i else 0, method), start_time, end


def _weighted_prompts(js: _Json, weighted: list, where: str) -> list[tuple[str, float]]:
    """The ``(text, weight)`` pairs of a segment's ``prompts`` list."""
    if not weighted:
        raise js.fail(f"{where}.prompts", "is empty; add a prompt")
    pairs = []
    for j, item in enumerate(weighted):
        item_where = f"{where}.prompts[{j}]"
        if not isinstance(item, dict):
            raise js.fail(item_where, 'must be an object like {"text": "...", "weight": 1.0}')
        text = js.get(item, "text", item_where, str)
        if not text.strip():
            raise js.fail(f"{item_where}.text", "is empty; write the prompt text")
        weight = js.get(item, "weight", item_where, (int, float), 1.0)
        if weight < 0:
            raise js.fail(f"{item_where}.weight", f"must be >= 0, got {weight}")
        pairs.append((text, float(weight)))
    if sum(w for _, w in pairs) <= 0:
        raise js.fail(f"{where}.prompts", "weights sum to 0; give one prompt a weight > 0")
    return pairs


def _video_length(
    js: _Json, segments: list[PromptSegment], last_end: float, chunk_frames: int, num_frames: int | None
) -> int:
    """``num_frames`` when given (every segment must start inside it), else the last ``endTime``."""
    if num_frames is None:
        num_frames = seconds_to_latent_frame(last_end, chunk_frames)
        if num_frames <= segments[-1].start:
            raise js.fail(
                f"prompts[{len(segments) - 1}].endTime",
                "the video must end at least one chunk after the last segment starts; set endTime "
                "or num_output_frames",
            )
        return num_frames
    for i, seg in enumerate(segments):
        if seg.start >= num_frames:
            raise js.fail(
                f"prompts[{i}].startTime",
                f"starts at latent frame {seg.start}, past the video's {num_frames} frames; raise "
                "num_output_frames or shorten the timeline",
            )
    return num_frames


def _timeline_settings(js: _Json, settings: dict) -> dict[str, Any]:
    """The settings this engine honours, as config overrides."""
    out: dict[str, Any] = {}
    mode = js.get(settings, "inputMode", "settings", str, "text")
    if mode != "text":
        raise js.fail("settings.inputMode", f"{mode!r} is not supported; only text-to-video ('text') is")
    resolution = js.get(settings, "resolution", "settings", dict, None)
    if resolution is not None:
        for key in ("height", "width"):
            value = js.get(resolution, key, "settings.resolution", int)
            if value < 16 or value % 16:
                raise js.fail(f"settings.resolution.{key}", f"{value} must be a positive multiple of 16")
            out[key] = value
    seed = js.get(settings, "seed", "settings", int, None)
    if seed is not None:
        if not 0 <= seed <= MAX_SEED:
            raise js.fail("settings.seed", f"must be >= 0 and < 2^64, got {seed}")
        out["seed"] = seed
    steps = js.get(settings, "denoisingSteps", "settings", list, None)
    if steps is not None:
        if not steps:
            raise js.fail("settings.denoisingSteps", "is empty; give timesteps like [1000, 750, 500, 250]")
        for k, t in enumerate(steps):
            if isinstance(t, bool) or not isinstance(t, (int, float)) or not 0 < t <= 1000:
                raise js.fail(f"settings.denoisingSteps[{k}]", f"{t!r} must be a timestep in (0, 1000]")
        if any(b >= a for a, b in pairwise(steps)):
            raise js.fail("settings.denoisingSteps", f"{steps} must decrease strictly")
        out["denoising_step_list"] = [float(t) for t in steps]
    return out

