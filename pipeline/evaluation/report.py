"""One folder of generated videos -> an evaluation report (per video, per segment, overall).

The report is a JSON-ready dict; :func:`write_report` never overwrites a file. Definitions of every
number are in ``docs/evaluation.md`` and, in short, in the report itself (``definitions``).
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterable, Sequence
from itertools import pairwise
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from pipeline.sidecar import write_sidecar
from utils.errors import MemFlowError

from .features import ImageEncoder, TextImageEncoder
from .metrics import alignment_matrix, alignment_summary, consistency, cross_similarity, frame_similarities, mean, speed
from .videos import Segment, VideoEntry, read_frames

REPORT_KIND = "memflow-evaluation"
REPORT_VERSION = 1
SCALARS = ("subject_consistency", "background_consistency", "text_alignment", "text_alignment_margin",
           "cross_switch_subject", "cross_switch_background")  # fmt: skip
SPEED_FIELDS = ("fps_transformer", "fps_with_decode", "fps_end_to_end")
DEFINITIONS = {
    "subject_consistency": "VBench: mean over frames t>=1 of (max(0,cos(t,first)) + max(0,cos(t,t-1)))/2, DINO CLS "
    "features; per segment the first frame is the segment's",
    "background_consistency": "the same with CLIP image features",
    "text_alignment": "mean over a segment's frames of cos(CLIP image, CLIP text of the segment's own prompt)",
    "text_alignment_margin": "own-prompt alignment minus the mean alignment with the other segments' prompts",
    "cross_switch_subject": "mean cos (clipped at 0) of DINO features over all pairs of a frame among the `window` "
    "frames before a switch and one among the `window` frames after it",
    "cross_switch_background": "the same with CLIP image features",
    "fps_transformer": "pixel frames / sum of generate_s (transformer only: denoising + cache commit)",
    "fps_with_decode": "pixel frames / sum of generate_s + decode_s (transformer and VAE decode)",
    "fps_end_to_end": "pixel frames / total_s (everything, MP4 writing included)",
}


def segment_text_features(encoder: TextImageEncoder, segments: Sequence[Segment]) -> torch.Tensor:
    """``[S, D]``: each segment's prompt feature; a blend is the weighted mean of its prompts' unit features."""
    texts = list(dict.fromkeys(text for seg in segments for text, _ in seg.prompts))
    unit = F.normalize(encoder.text_features(texts).double(), dim=-1)
    row = {text: unit[i] for i, text in enumerate(texts)}
    return torch.stack([sum(w * row[t] for t, w in seg.prompts) / sum(w for _, w in seg.prompts)
                        for seg in segments])  # fmt: skip


def encode_frames(
    batches: Iterable[np.ndarray],
    dino: ImageEncoder,
    clip: ImageEncoder,
    on_frames: Callable[[int], None] | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """DINO and CLIP features ``[T, D]`` of uint8 ``[B, H, W, 3]`` frame batches."""
    subject, background = [], []
    for batch in batches:
        frames = torch.from_numpy(np.ascontiguousarray(batch)).permute(0, 3, 1, 2)
        subject.append(dino.image_features(frames))
        background.append(clip.image_features(frames))
        if on_frames is not None:
            on_frames(len(batch))
    return torch.cat(subject), torch.cat(background)


def _switches(segments: Sequence[Segment], subject: torch.Tensor, background: torch.Tensor, window: int) -> list[dict]:
    rows = []
    for before, after in pairwise(segments):
        lo, hi = max(before.start, after.start - window), min(after.end, after.start + window)
        rows.append({
            "latent_frame": after.start_latent, "pixel_frame": after.start, "window": min(window, hi - after.start),
            "subject": cross_similarity(subject[lo:after.start], subject[after.start:hi]),
            "background": cross_similarity(background[lo:after.start], background[after.start:hi]),
        })  # fmt: skip
    return rows


def score_video(
    entry: VideoEntry, subject: torch.Tensor, background: torch.Tensor, text: torch.Tensor, window: int
) -> dict[str, Any]:
    """The report of one video from its frame features ``[T, D]`` and segment text features ``[S, D]``."""
    bounds = [(seg.start, seg.end) for seg in entry.segments]
    alignment = alignment_summary(alignment_matrix(background, text, bounds))
    segments = [{
        "index": seg.index, "start_latent": seg.start_latent, "start": seg.start, "end": seg.end, "prompt": seg.text,
        "subject_consistency": consistency(subject[seg.start:seg.end]),
        "background_consistency": consistency(background[seg.start:seg.end]),
        "text_alignment": align,
    } for seg, align in zip(entry.segments, alignment, strict=True)]  # fmt: skip
    switches = _switches(entry.segments, subject, background, window)
    subject_first, subject_previous = frame_similarities(subject)
    background_first, background_previous = frame_similarities(background)
    return {
        "video": entry.video.name, "sidecar": entry.sidecar.name, "sample_index": entry.sample_index,
        "video_seed": entry.video_seed, "memory": entry.memory, "device": entry.device, "dtype": entry.dtype,
        "pixel_frames": entry.pixel_frames, "fps_video": entry.fps_video,
        "subject_consistency": consistency(subject),
        "background_consistency": consistency(background),
        "text_alignment": mean([a["own"] for a in alignment]),
        "text_alignment_margin": mean([a["margin"] for a in alignment]),
        "cross_switch_subject": mean([s["subject"] for s in switches]),
        "cross_switch_background": mean([s["background"] for s in switches]),
        "segments": segments,
        "switches": switches,
        "frames": {
            "subject_to_first": subject_first.tolist(), "subject_to_previous": subject_previous.tolist(),
            "background_to_first": background_first.tolist(), "background_to_previous": background_previous.tolist(),
        },
        "speed": speed(entry.timings, entry.pixel_frames),
    }  # fmt: skip


def overall(videos: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """Scores averaged over videos (each narrative counts once); speed as total frames over total seconds."""
    result: dict[str, Any] = {"videos": len(videos)}
    result.update({key: mean([v[key] for v in videos]) for key in SCALARS})
    frames = sum(v["speed"]["pixel_frames"] for v in videos)
    seconds = {
        "fps_transformer": sum(v["speed"]["generate_s"] for v in videos),
        "fps_with_decode": sum(v["speed"]["generate_s"] + v["speed"]["decode_s"] for v in videos),
        "fps_end_to_end": sum(v["speed"]["total_s"] for v in videos),
    }
    result["speed"] = {key: frames / s if s > 0 else None for key, s in seconds.items()}
    return result


def evaluate_videos(
    entries: Sequence[VideoEntry],
    dino: ImageEncoder,
    clip: TextImageEncoder,
    window: int = 16,
    batch_size: int = 32,
    on_frames: Callable[[int], None] | None = None,
) -> dict[str, Any]:
    """Read, encode and score every video; ``on_frames(n)`` is called after each batch of ``n`` frames."""
    if window < 1 or batch_size < 1:
        raise MemFlowError(f"window ({window}) and batch size ({batch_size}) must be at least 1")
    videos = []
    for entry in entries:
        subject, background = encode_frames(read_frames(entry.video, batch_size), dino, clip, on_frames)
        text = segment_text_features(clip, entry.segments)
        videos.append(score_video(entry, subject, background, text, window))
    folders = sorted({str(entry.video.parent) for entry in entries})
    return {
        "kind": REPORT_KIND, "version": REPORT_VERSION, "folder": folders[0] if len(folders) == 1 else folders,
        "models": {"dino": dino.name, "clip": clip.name}, "settings": {"window": window},
        "definitions": DEFINITIONS, "overall": overall(videos), "videos": videos,
    }  # fmt: skip


def write_report(path: str | Path, report: dict[str, Any]) -> Path:
    """Write ``report`` as JSON; an existing file is an error (reports are never overwritten)."""
    return write_sidecar(path, report)


def load_report(path: str | Path) -> dict[str, Any]:
    """A report written by :func:`write_report`, checked for its kind and version."""
    path = Path(path)
    try:
        report = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise MemFlowError(f"{path} is not a readable report ({err}); pass a video folder or a report JSON") from None
    if not isinstance(report, dict) or report.get("kind") != REPORT_KIND or report.get("version") != REPORT_VERSION:
        raise MemFlowError(
            f"{path} is not an evaluation report (version {REPORT_VERSION}); write one with scripts/evaluate.py --out"
        )
    return report


def _cell(value: float | None, digits: int = 4) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


def report_markdown(report: dict[str, Any]) -> str:
    """A markdown table: one row per video and one for the whole folder."""
    header = ("| video | memory | segments | subject | background | text | text margin | switch subject "
              "| switch background | FPS transformer | FPS with decode |")  # fmt: skip
    lines = [header, "|" + "---|" * 11]
    rows = [(v["video"], v["memory"] or "-", str(len(v["segments"])), v, v["speed"]) for v in report["videos"]]
    rows.append(("**overall**", "", str(report["overall"]["videos"]) + " videos", report["overall"],
                 report["overall"]["speed"]))  # fmt: skip
    for name, memory, segments, scores, fps in rows:
        cells = [_cell(scores[key]) for key in SCALARS] + [_cell(fps[key], 2) for key in SPEED_FIELDS[:2]]
        lines.append(f"| {name} | {memory} | {segments} | " + " | ".join(cells) + " |")
    return "\n".join(lines)
