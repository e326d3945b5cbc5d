"""Prompt inputs -> a validated schedule of segments, and per-chunk text conditioning.

Three input formats:

* a text file, one prompt per line: each non-blank line is one single-prompt video;
* the release JSONL: one ``{"prompts": [p1, p2, ...]}`` object per line (one video per line), with
  the switch frames given by the config's ``switch_frame_indices`` (an index inside a chunk takes
  effect at the next chunk boundary, as in the release: 40 -> 42 with 3-frame chunks);
* Scope's timeline JSON (segments in seconds, weighted prompt blends, transitions).

Times map to latent frames as: pixel frame = seconds * 16 (fps); latent frame = round(pixel / 4)
(the VAE's temporal stride); then the latent frame is snapped to the nearest chunk boundary
(multiple of ``num_frame_per_block``). Both roundings go half up, so 0.375 s (1.5 latent frames)
with 3-frame chunks snaps to frame 3.

Conditioning (:class:`ChunkConditioning`): a segment's embedding is the weighted blend of its
prompts' embeddings. At the first chunk of every segment after the first the prompt switches (the
engine re-caches its KV). A segment with ``transition_chunks = n > 0`` starts from the embedding
the previous chunk used and reaches its own embedding gradually: its i-th chunk (i = 1..n) uses
``alpha = i / (n + 1)`` of the way, and chunk n + 1 onwards uses its own embedding exactly.
"""

from __future__ import annotations

import json
import logging
import math
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from itertools import pairwise
from pathlib import Path
from typing import Any

import torch

from memflow.errors import ConfigError, MemFlowError

FPS = 16
VAE_TEMPORAL_STRIDE = 4
INTERPOLATIONS = ("slerp", "linear")
DEFAULT_INTERPOLATION = "linear"

log = logging.getLogger(__name__)

# |cos| above this counts as (anti)parallel: slerp's 1/sin(angle) is ill-conditioned there.
_PARALLEL_COS = 1.0 - 1e-6


# --------------------------------------------------------------------------------------------
# Data model


@dataclass(frozen=True)
class PromptSegment:
    """Prompts in force from latent frame ``start`` until the next segment starts.

    ``prompts`` holds ``(text, weight)`` pairs blended in embedding space; ``transition_chunks``
    chunks after the switch move gradually from the previous embedding to this one.
    """

    start: int
    prompts: tuple[tuple[str, float], ...]
    transition_chunks: int = 0
    interpolation: str = DEFAULT_INTERPOLATION

    def __post_init__(self) -> None:
        object.__setattr__(self, "prompts", tuple((str(t), float(w)) for t, w in self.prompts))
        if not self.prompts:
            raise ConfigError(f"segment at frame {self.start} has no prompt; give at least one")
        for text, weight in self.prompts:
            if not text.strip():
                raise ConfigError(f"segment at frame {self.start} has an empty prompt; write the prompt text")
            if not math.isfinite(weight) or weight < 0:
                raise ConfigError(f"segment at frame {self.start}: prompt weight {weight} must be a number >= 0")
        if sum(w for _, w in self.prompts) <= 0:
            raise ConfigError(f"segment at frame {self.start}: prompt weights sum to 0; give one a weight > 0")
        if self.transition_chunks < 0:
            raise ConfigError(f"segment at frame {self.start}: transition_chunks must be >= 0")
        if self.interpolation not in INTERPOLATIONS:
            raise ConfigError(
                f"segment at frame {self.start}: interpolation {self.interpolation!r} is not one of "
                f"{', '.join(INTERPOLATIONS)}"
            )

    @property
    def texts(self) -> tuple[str, ...]:
        return tuple(text for text, _ in self.prompts)

    @property
    def weights(self) -> tuple[float, ...]:
        return tuple(weight for _, weight in self.prompts)


@dataclass(frozen=True)
class PromptSchedule:
    """The segments of one video of ``num_frames`` latent frames generated in ``chunk_frames`` chunks.

    Invariants: the first segment starts at 0, starts increase strictly, every start is on a chunk
    boundary and lies before ``num_frames``; ``num_frames`` is a whole number of chunks.
    """

    segments: tuple[PromptSegment, ...]
    num_frames: int
    chunk_frames: int

    def __post_init__(self) -> None:
        object.__setattr__(self, "segments", tuple(self.segments))
        if self.chunk_frames < 1:
            raise ConfigError(f"num_frame_per_block must be >= 1, got {self.chunk_frames}")
        if self.num_frames < 1 or self.num_frames % self.chunk_frames:
            raise ConfigError(
                f"num_output_frames={self.num_frames} must be a positive multiple of "
                f"num_frame_per_block={self.chunk_frames}"
            )
        if not self.segments:
            raise ConfigError("a prompt schedule needs at least one segment")
        if self.segments[0].start != 0:
            raise ConfigError(f"the first prompt must start at frame 0, not {self.segments[0].start}")
        for before, seg in pairwise(self.segments):
            if seg.start <= before.start:
                raise ConfigError(f"segment starts must increase strictly: {seg.start} after {before.start}")
        for seg in self.segments:
            if seg.start % self.chunk_frames or seg.start >= self.num_frames:
                raise ConfigError(
                    f"segment start {seg.start} must be a multiple of {self.chunk_frames} below {self.num_frames}"
                )

    @classmethod
    def single(cls, text: str, num_frames: int, chunk_frames: int) -> PromptSchedule:
        return cls((PromptSegment(0, ((text, 1.0),)),), num_frames, chunk_frames)

    @property
    def switch_frames(self) -> list[int]:
        """Latent frames where a new prompt takes over (every segment start but the first)."""
        return [seg.start for seg in self.segments[1:]]

    @property
    def num_chunks(self) -> int:
        return self.num_frames // self.chunk_frames

    @property
    def texts(self) -> list[str]:
        """Distinct prompt texts in order of first use (each is encoded once)."""
        return list(dict.fromkeys(text for seg in self.segments for text in seg.texts))

    def segment_index(self, chunk: int) -> int:
        """Index of the segment in force at ``chunk``."""
        frame = chunk * self.chunk_frames
        return max(i for i, seg in enumerate(self.segments) if seg.start <= frame)

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready description (for the sidecar file)."""
        return {
            "num_frames": self.num_frames,
            "chunk_frames": self.chunk_frames,
            "switch_frames": self.switch_frames,
            "segments": [
                {
                    "start_frame": seg.start,
                    "prompts": [{"text": t, "weight": w} for t, w in seg.prompts],
                    "transition_chunks": seg.transition_chunks,
                    "interpolation": seg.interpolation,
                }
                for seg in self.segments
            ],
        }


# --------------------------------------------------------------------------------------------
# Loaders


def _read_text(path: str | Path, what: str) -> tuple[Path, str]:
    path = Path(path)
    if not path.is_file():
        state = "is a folder, not a file" if path.is_dir() else "does not exist"
        raise MemFlowError(f"{what} {path} {state}")
    raw = path.read_bytes()
    try:
        return path, raw.decode("utf-8-sig")
    except UnicodeDecodeError as err:
        line = raw[: err.start].count(b"\n") + 1
        raise MemFlowError(f"{path}:{line}: not valid UTF-8 text; save the file as UTF-8") from None


def load_text_prompts(path: str | Path, num_frames: int, chunk_frames: int) -> list[PromptSchedule]:
    """One single-prompt video per non-blank line of a text file."""
    path, text = _read_text(path, "prompt file")
    videos = [PromptSchedule.single(line.strip(), num_frames, chunk_frames)
              for line in text.splitlines() if line.strip()]
    if not videos:
        raise MemFlowError(f"{path} has no prompts; write one prompt per line")
    return videos


def effective_switch_frame(index: int, chunk_frames: int) -> int:
    """The chunk-boundary frame where a switch requested at latent frame ``index`` takes effect.

    As in the release, a prompt switch happens at the first chunk that starts at or after the
    requested frame, so an index inside a chunk is rounded up to the next boundary (40 -> 42).
    """
    return -(-index // chunk_frames) * chunk_frames


def check_switch_frames(
    indices: Sequence[int], num_prompts: int, num_frames: int, chunk_frames: int,
    field: str = "switch_frame_indices",
) -> list[int]:
    """Validate the switch indices for ``num_prompts`` prompts; return the effective switch frames.

    There must be one index fewer than prompts, strictly increasing and inside (0, num_frames).
    Each is rounded up to a chunk boundary (:func:`effective_switch_frame`); two indices that land
    on the same chunk, or one that lands at the end of the video, are errors rather than a switch
    that silently never happens.
    """
    indices = list(indices)
    if any(isinstance(i, bool) or not isinstance(i, int) for i in indices):
        raise ConfigError(f"{field} must be a list of integers like [40, 80], got {indices}")
    if len(indices) != num_prompts - 1:
        raise ConfigError(
            f"{field} has {len(indices)} entries but {num_prompts} prompts need {num_prompts - 1} "
            "(one switch before each prompt after the first)"
        )
    for before, after in pairwise(indices):
        if after <= before:
            raise ConfigError(f"{field}={indices} must increase strictly ({after} follows {before})")
    effective = []
    for index in indices:
        if not 0 < index < num_frames:
            raise ConfigError(
                f"{field}: {index} is outside (0, {num_frames}); switches must fall inside the video "
                "(or raise num_output_frames)"
            )
        frame = effective_switch_frame(index, chunk_frames)
        if frame >= num_frames:
            raise ConfigError(
                f"{field}: {index} takes effect at the next chunk boundary {frame}, which is the end of "
                f"the video; use at most {num_frames - chunk_frames} or raise num_output_frames"
            )
        if effective and frame == effective[-1]:
            raise ConfigError(
                f"{field}: {indices[len(effective) - 1]} and {index} fall in the same chunk of "
                f"{chunk_frames} frames (both switch at frame {frame}); move them at least one chunk apart"
            )
        effective.append(frame)
    moved = [(i, f) for i, f in zip(indices, effective, strict=True) if i != f]
    if moved:
        log.info("%s: switches rounded up to chunk boundaries: %s", field,
                 ", ".join(f"{i} -> {f}" for i, f in moved))
    return effective


def load_jsonl_prompts(
    path: str | Path, switch_frame_indices: Sequence[int], num_frames: int, chunk_frames: int
) -> list[PromptSchedule]:
    """Release JSONL: one ``{"prompts": [...]}`` video per non-blank line, switching at the given frames.

    Prompt texts are kept verbatim (as the release encodes them); other keys on a line are ignored.
    """
    path, text = _read_text(path, "prompt file")
    videos = []
    for lineno, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        where = f"{path}:{lineno}"
        try:
            record = json.loads(line)
        except json.JSONDecodeError as err:
            raise MemFlowError(
                f"{where}:{err.colno}: malformed JSON ({err.msg}); each line must be one object like "
                '{"prompts": ["first prompt", "second prompt"]}'
            ) from None
        if not isinstance(record, dict) or "prompts" not in record:
            raise MemFlowError(f'{where}: expected an object with a "prompts" list, got {line.strip()[:60]!r}')
        prompts = record["prompts"]
        if not isinstance(prompts, list) or not prompts:
            raise MemFlowError(f'{where}: "prompts" must be a non-empty list of strings')
        for i, prompt in enumerate(prompts):
            if not isinstance(prompt, str) or not prompt.strip():
                raise MemFlowError(f'{where}: "prompts"[{i}] is empty or not a string; write the prompt text')
        try:
            starts = [0, *check_switch_frames(switch_frame_indices, len(prompts), num_frames, chunk_frames)]
        except ConfigError as err:
            raise ConfigError(f"{where}: {err}") from None
        segments = [PromptSegment(start, ((p, 1.0),)) for start, p in zip(starts, prompts, strict=True)]
        videos.append(PromptSchedule(tuple(segments), num_frames, chunk_frames))
    if not videos:
        raise MemFlowError(f'{path} has no prompts; write one {{"prompts": [...]}} object per line')
    return videos


def seconds_to_latent_frame(seconds: float, chunk_frames: int) -> int:
    """Timeline seconds -> the chunk-boundary latent frame (see the module docstring for the rule)."""
    latent = math.floor(seconds * FPS / VAE_TEMPORAL_STRIDE + 0.5)
    return chunk_frames * math.floor(latent / chunk_frames + 0.5)


@dataclass(frozen=True)
class Timeline:
    """A Scope timeline: the prompt schedule plus the settings it asks for as config overrides.

    ``settings`` holds any of ``height``, ``width``, ``seed``, ``denoising_step_list``.
    """

    schedule: PromptSchedule
    settings: dict[str, Any]


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


def load_timeline(path: str | Path, chunk_frames: int, num_frames: int | None = None) -> Timeline:
    """Scope timeline JSON -> :class:`Timeline`.

    Segments must be in time order; a gap between one segment's ``endTime`` and the next
    ``startTime`` keeps the earlier prompt. The video length is ``num_frames`` when given,
    otherwise the last segment's ``endTime`` in latent frames (same rounding as the starts).
    ``transitionSteps`` counts chunks; it is ignored on the first segment (nothing to blend from).
    Unknown keys are ignored; ``settings.inputMode`` other than ``"text"`` is refused.
    """
    path, text = _read_text(path, "timeline file")
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
        where = f"prompts[{i}]"
        if not isinstance(entry, dict):
            raise js.fail(where, "must be an object with startTime and prompts")
        start_time = js.get(entry, "startTime", where, (int, float))
        end_time = js.get(entry, "endTime", where, (int, float), None)
        if start_time < 0:
            raise js.fail(f"{where}.startTime", f"must be >= 0 seconds, got {start_time}")
        if end_time is not None and end_time <= start_time:
            raise js.fail(f"{where}.endTime", f"{end_time} must be after startTime {start_time}")
        last_end = end_time if end_time is not None else start_time
        steps = js.get(entry, "transitionSteps", where, int, 0)
        if steps < 0:
            raise js.fail(f"{where}.transitionSteps", f"must be >= 0 chunks, got {steps}")
        method = js.get(entry, "temporalInterpolationMethod", where, str, DEFAULT_INTERPOLATION)
        if method not in INTERPOLATIONS:
            raise js.fail(f"{where}.temporalInterpolationMethod", f"{method!r} is not one of slerp, linear")
        weighted = js.get(entry, "prompts", where, list)
        if not weighted:
            raise js.fail(f"{where}.prompts", "is empty; add a prompt")
        pairs = []
        for j, item in enumerate(weighted):
            item_where = f"{where}.prompts[{j}]"
            if not isinstance(item, dict):
                raise js.fail(item_where, 'must be an object like {"text": "...", "weight": 1.0}')
            text_ = js.get(item, "text", item_where, str)
            if not text_.strip():
                raise js.fail(f"{item_where}.text", "is empty; write the prompt text")
            weight = js.get(item, "weight", item_where, (int, float), 1.0)
            if weight < 0:
                raise js.fail(f"{item_where}.weight", f"must be >= 0, got {weight}")
            pairs.append((text_, float(weight)))
        if sum(w for _, w in pairs) <= 0:
            raise js.fail(f"{where}.prompts", "weights sum to 0; give one prompt a weight > 0")
        start = seconds_to_latent_frame(start_time, chunk_frames)
        if i == 0 and start != 0:
            raise js.fail(f"{where}.startTime", f"the first segment must start at 0 s, not {start_time}")
        if segments and start <= segments[-1].start:
            raise js.fail(
                f"{where}.startTime",
                f"{start_time} s maps to latent frame {start}, not after the previous segment's frame "
                f"{segments[-1].start}; segments must be in time order and at least one chunk "
                f"({chunk_frames * VAE_TEMPORAL_STRIDE / FPS} s) apart",
            )
        segments.append(PromptSegment(start, tuple(pairs), steps if i else 0, method))

    if num_frames is None:
        num_frames = seconds_to_latent_frame(last_end, chunk_frames)
        if num_frames <= segments[-1].start:
            raise js.fail(
                f"prompts[{len(entries) - 1}].endTime",
                "the video must end at least one chunk after the last segment starts; set endTime "
                "or num_output_frames",
            )
    else:
        for i, seg in enumerate(segments):
            if seg.start >= num_frames:
                raise js.fail(
                    f"prompts[{i}].startTime",
                    f"starts at latent frame {seg.start}, past the video's {num_frames} frames; raise "
                    "num_output_frames or shorten the timeline",
                )
    schedule = PromptSchedule(tuple(segments), num_frames, chunk_frames)
    return Timeline(schedule, _timeline_settings(js, data.get("settings"), chunk_frames))


def _timeline_settings(js: _Json, settings: Any, chunk_frames: int) -> dict[str, Any]:
    if settings is None:
        return {}
    if not isinstance(settings, dict):
        raise js.fail("settings", "must be an object")
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
        if seed < 0:
            raise js.fail("settings.seed", f"must be >= 0, got {seed}")
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


# --------------------------------------------------------------------------------------------
# Embedding maths


def blend(embeddings: torch.Tensor, weights: Sequence[float] | torch.Tensor) -> torch.Tensor:
    """Weighted average of P prompt embeddings ``[P, T, D]`` -> ``[T, D]``.

    Weights are normalised to sum to 1, so only their ratios matter ((2, 2) == (1, 1)) and a single
    prompt comes back unchanged at any weight: the blend stays at the scale of the text encoder's
    output that the DiT was trained on. Padding rows (zero in every prompt) stay zero.
    """
    if embeddings.dim() != 3:
        raise ValueError(f"embeddings must be [P, T, D], got shape {tuple(embeddings.shape)}")
    w = torch.as_tensor(weights, dtype=torch.float64).flatten()
    if w.numel() != embeddings.shape[0]:
        raise ValueError(f"{w.numel()} weights for {embeddings.shape[0]} embeddings")
    if bool((w < 0).any()) or not bool(torch.isfinite(w).all()) or float(w.sum()) <= 0:
        raise ValueError(f"weights must be finite, >= 0 and not all 0, got {w.tolist()}")
    w = w / w.sum()
    compute = torch.promote_types(embeddings.dtype, torch.float32)
    out = torch.einsum("p,ptd->td", w.to(compute), embeddings.to(compute))
    return out.to(embeddings.dtype)


def slerp(a: torch.Tensor, b: torch.Tensor, alpha: float) -> torch.Tensor:
    """Spherical interpolation between matching rows of ``a`` and ``b`` (``[..., D]``).

    Each row follows the great circle between its two endpoints (unit vectors stay unit), with
    ``alpha=0`` giving ``a`` and ``alpha=1`` giving ``b`` exactly. Rows where either vector is zero
    (prompt padding) or the two are (anti)parallel fall back to linear interpolation, where the
    spherical formula is undefined or ill-conditioned; zero rows in both stay exactly zero.
    """
    if a.shape != b.shape:
        raise ValueError(f"slerp endpoints differ in shape: {tuple(a.shape)} vs {tuple(b.shape)}")
    if alpha == 0:
        return a.clone()
    if alpha == 1:
        return b.clone()
    compute = torch.promote_types(a.dtype, torch.float32)
    a32, b32 = a.to(compute), b.to(compute)
    na = a32.norm(dim=-1, keepdim=True)
    nb = b32.norm(dim=-1, keepdim=True)
    nonzero = (na > 0) & (nb > 0)
    cos = (a32 * b32).sum(-1, keepdim=True) / torch.where(nonzero, na * nb, torch.ones_like(na))
    cos = cos.clamp(-1.0, 1.0)
    spherical = nonzero & (cos.abs() < _PARALLEL_COS)
    omega = torch.acos(torch.where(spherical, cos, torch.zeros_like(cos)))
    sin = torch.where(spherical, torch.sin(omega), torch.ones_like(omega))
    wa = torch.where(spherical, torch.sin((1 - alpha) * omega) / sin, torch.full_like(omega, 1 - alpha))
    wb = torch.where(spherical, torch.sin(alpha * omega) / sin, torch.full_like(omega, alpha))
    return (wa * a32 + wb * b32).to(a.dtype)


def lerp(a: torch.Tensor, b: torch.Tensor, alpha: float) -> torch.Tensor:
    """Linear interpolation ``(1 - alpha) * a + alpha * b``, exact at both ends."""
    if alpha == 0:
        return a.clone()
    if alpha == 1:
        return b.clone()
    return torch.lerp(a, b, alpha)


def interpolate(a: torch.Tensor, b: torch.Tensor, alpha: float, method: str) -> torch.Tensor:
    """``slerp`` or ``linear`` interpolation from ``a`` (alpha 0) to ``b`` (alpha 1)."""
    if method == "slerp":
        return slerp(a, b, alpha)
    if method == "linear":
        return lerp(a, b, alpha)
    raise ValueError(f"interpolation method {method!r} is not one of {', '.join(INTERPOLATIONS)}")


# --------------------------------------------------------------------------------------------
# Per-chunk conditioning


@dataclass(frozen=True)
class ChunkCondition:
    """Text conditioning of one chunk.

    ``switch`` is true at the first chunk of every segment after the first: the engine re-caches its
    KV with ``embedding`` there. ``alpha`` is how far the transition into the segment has gone
    (1.0 = the segment's own embedding).
    """

    chunk: int
    start_frame: int
    segment: int
    embedding: torch.Tensor
    switch: bool
    alpha: float


class ChunkConditioning:
    """The conditioning embedding ``[T, D]`` of every chunk of a :class:`PromptSchedule`.

    ``encode(texts) -> [P, T, D]`` is called once, with every distinct prompt text of the schedule.
    """

    def __init__(self, schedule: PromptSchedule, encode: Callable[[list[str]], torch.Tensor]) -> None:
        self.schedule = schedule
        texts = schedule.texts
        encoded = encode(texts)
        if encoded.dim() != 3 or encoded.shape[0] != len(texts):
            raise ValueError(
                f"encode() returned shape {tuple(encoded.shape)} for {len(texts)} texts; expected [P, T, D]"
            )
        row = {text: i for i, text in enumerate(texts)}
        self._targets = [
            blend(encoded[[row[t] for t in seg.texts]], seg.weights) for seg in schedule.segments
        ]
        self._first_chunk = [seg.start // schedule.chunk_frames for seg in schedule.segments]
        self._origins: list[torch.Tensor | None] = [None]
        for k in range(1, len(schedule.segments)):
            self._origins.append(self._at(self._first_chunk[k] - 1).embedding)

    def __len__(self) -> int:
        return self.schedule.num_chunks

    def __iter__(self) -> Iterator[ChunkCondition]:
        return (self._at(chunk) for chunk in range(len(self)))

    def __getitem__(self, chunk: int) -> ChunkCondition:
        if not 0 <= chunk < len(self):
            raise IndexError(f"chunk {chunk} is outside 0..{len(self) - 1}")
        return self._at(chunk)

    def _at(self, chunk: int) -> ChunkCondition:
        k = self.schedule.segment_index(chunk)
        seg = self.schedule.segments[k]
        step = chunk - self._first_chunk[k] + 1  # 1-based chunk within the segment
        origin = self._origins[k]
        if origin is not None and step <= seg.transition_chunks:
            alpha = step / (seg.transition_chunks + 1)
            embedding = interpolate(origin, self._targets[k], alpha, seg.interpolation)
        else:
            alpha, embedding = 1.0, self._targets[k]
        return ChunkCondition(
            chunk=chunk,
            start_frame=chunk * self.schedule.chunk_frames,
            segment=k,
            embedding=embedding,
            switch=k > 0 and step == 1,
            alpha=alpha,
        )
