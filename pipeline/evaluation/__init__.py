"""Narrative evaluation of generated videos: VBench-style consistency, per-segment text alignment,
cross-switch consistency and the sidecar's speed figures; paired comparison of two folders.

Modules: :mod:`.videos` (sidecars, segments, frames), :mod:`.features` (VBench input transforms,
DINO and CLIP encoders), :mod:`.metrics` (plain functions of features), :mod:`.report` (one
folder), :mod:`.compare` and :mod:`.plot` (two folders), :mod:`.vbench_dims` (optional VBench).
Definitions: ``docs/evaluation.md``.
"""

from .compare import compare_reports, comparison_markdown
from .features import DEFAULT_CLIP, DEFAULT_DINO, ImageEncoder, TextImageEncoder, load_clip, load_dino
from .plot import render_comparison
from .report import evaluate_videos, load_report, report_markdown, write_report
from .videos import VideoEntry, find_videos

__all__ = [
    "DEFAULT_CLIP",
    "DEFAULT_DINO",
    "ImageEncoder",
    "TextImageEncoder",
    "VideoEntry",
    "compare_reports",
    "comparison_markdown",
    "evaluate_videos",
    "find_videos",
    "load_clip",
    "load_dino",
    "load_report",
    "render_comparison",
    "report_markdown",
    "write_report",
]
