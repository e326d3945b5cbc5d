"""A video's prompt schedule (segments of weighted prompts) and the text conditioning of each chunk.

A segment's embedding is the weighted blend of its prompts' embeddings. At the first chunk of every
segment after the first the prompt switches (the engine re-caches its KV). A segment with
``transition_chunks = n > 0`` starts from the embedding the previous chunk used and reaches its own
embedding gradually: its i-th chunk (i = 1..n) uses ``alpha = i / (n + 1)`` of the way, and chunk
n + 1 onwards uses its own embedding exactly (:class:`ChunkConditioning`).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from itertools import pairwise
from typing import Any

import torch

from utils.errors import ConfigError

INTERPOLATIONS = ("slerp", "linear")
DEFAULT_INTERPOLATION = "linear"

# |cos| above this counts as (anti)parallel: slerp's 1/sin(angle) is ill-conditioned there.
_PARALLEL_COS = 1.0 - 1e-6


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
