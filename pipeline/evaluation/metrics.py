"""Metrics as plain functions of feature tensors ``[T, D]`` (one row per frame) and sidecar timings.

Consistency follows VBench's subject / background consistency: every frame after the first is
scored by the mean of its cosine similarity to the first frame and to the previous frame, each
clipped at 0, and a clip's score is the mean over those frames. Here a "clip" is a whole video or
one prompt segment (then the first frame is the segment's first frame).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F


def frame_similarities(features: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per frame: cosine similarity to the first frame and to the previous frame (frame 0: both 1)."""
    unit = F.normalize(features.double(), dim=-1)
    to_first = unit @ unit[0]
    to_previous = torch.ones_like(to_first)
    to_previous[1:] = (unit[1:] * unit[:-1]).sum(-1)
    return to_first, to_previous


def consistency(features: torch.Tensor) -> float:
    """VBench's consistency of a clip: mean over frames t >= 1 of (max(0, cos(t, 0)) + max(0, cos(t, t-1))) / 2.

    A clip of one frame scores 1.
    """
    if len(features) < 2:
        return 1.0
    to_first, to_previous = frame_similarities(features)
    scores = (to_first[1:].clamp(min=0) + to_previous[1:].clamp(min=0)) / 2
    return float(scores.mean())


def cross_similarity(before: torch.Tensor, after: torch.Tensor) -> float:
    """Mean cosine similarity (each clipped at 0) over all pairs of a frame before and a frame after a switch."""
    a, b = F.normalize(before.double(), dim=-1), F.normalize(after.double(), dim=-1)
    return float((a @ b.T).clamp(min=0).mean())


def alignment_matrix(
    image_features: torch.Tensor, text_features: torch.Tensor, bounds: Sequence[tuple[int, int]]
) -> torch.Tensor:
    """``[S, S]``: entry (s, p) is the mean over segment s's frames of cos(frame, prompt p).

    The diagonal is each segment's alignment with its own prompt; row s off the diagonal is how
    well its frames match the other segments' prompts (a model ignoring switches scores as high there).
    """
    unit_img = F.normalize(image_features.double(), dim=-1)
    unit_txt = F.normalize(text_features.double(), dim=-1)
    sims = unit_img @ unit_txt.T
    return torch.stack([sims[start:end].mean(0) for start, end in bounds])


def alignment_summary(matrix: torch.Tensor) -> list[dict[str, float | list[float] | None]]:
    """Per segment: own-prompt alignment, alignment with each other prompt, and the margin own - mean(other)."""
    rows = []
    for s, row in enumerate(matrix.tolist()):
        others = row[:s] + row[s + 1 :]
        margin = row[s] - sum(others) / len(others) if others else None
        rows.append({"own": row[s], "others": others, "margin": margin})
    return rows


def speed(timings: dict, pixel_frames: int) -> dict[str, float | None]:
    """Speed figures from a sidecar's ``timings`` (seconds summed over chunks).

    ``fps_transformer``: frames per second of the transformer alone (``generate_s``: denoising and
    the cache commit, no VAE); ``fps_with_decode``: transformer plus VAE decode; ``fps_end_to_end``:
    the whole video including writing the MP4 (``total_s``).
    """
    chunks = timings.get("chunks") or []
    generate = sum(float(c.get("generate_s", 0.0)) for c in chunks)
    decode = sum(float(c.get("decode_s", 0.0)) for c in chunks)
    write = sum(float(c.get("write_s", 0.0)) for c in chunks)
    total = float(timings.get("total_s") or 0.0)

    def fps(seconds: float) -> float | None:
        return pixel_frames / seconds if seconds > 0 else None

    return {
        "fps_transformer": fps(generate),
        "fps_with_decode": fps(generate + decode),
        "fps_end_to_end": fps(total),
        "generate_s": generate,
        "decode_s": decode,
        "write_s": write,
        "total_s": total,
        "pixel_frames": pixel_frames,
    }


def mean(values: Sequence[float | None]) -> float | None:
    """Mean of the values that are not None (None when there are none)."""
    present = [v for v in values if v is not None and not math.isnan(v)]
    return sum(present) / len(present) if present else None
