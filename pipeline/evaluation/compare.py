"""Paired comparison of two evaluation reports (e.g. ``memory: none`` against ``memory: nam``).

Videos are paired by sidecar ``sample_index`` and prompt schedule, so both folders must come from
the same prompts (and, for a fair comparison, the same seeds). For every metric the comparison
gives, over the paired narratives, the mean of B - A, its standard error (sample standard
deviation / sqrt(n)) and wins:losses (narratives where B scores higher : lower). Differences below
:data:`TIE` count for neither: features computed with other thread counts or devices differ in the
last digits, and that is not a win.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from utils.errors import MemFlowError

from .metrics import mean

METRICS = {
    "subject_consistency": "subject consistency",
    "background_consistency": "background consistency",
    "text_alignment": "text alignment (own prompt)",
    "text_alignment_margin": "text margin (own - others)",
    "cross_switch_subject": "cross-switch subject",
    "cross_switch_background": "cross-switch background",
    "fps_transformer": "FPS, transformer only",
    "fps_with_decode": "FPS, with VAE decode",
}
VBENCH_METRICS = {"vbench_subject_consistency": "VBench subject consistency",
                  "vbench_background_consistency": "VBench background consistency"}  # fmt: skip
TIE = 1e-6
SEGMENT_METRICS = ("subject_consistency", "background_consistency", "text_alignment")
SHORT = {"subject_consistency": "subject", "background_consistency": "background", "text_alignment": "text",
         "text_alignment_margin": "margin", "cross_switch_subject": "switch subject",
         "cross_switch_background": "switch background"}  # fmt: skip


Key = tuple[int, tuple[str, ...]]


def report_keys(report: dict[str, Any]) -> list[tuple[Key, str]]:
    """``(pairing key, video file name)`` of every video of a report (the key of ``VideoEntry.key``)."""
    return [((v["sample_index"], tuple(seg["prompt"] for seg in v["segments"])), v["video"]) for v in report["videos"]]


def _index(keys: Sequence[tuple[Key, str]], source: str) -> dict[Key, int]:
    index: dict[Key, int] = {}
    for i, (key, name) in enumerate(keys):
        if key in index:
            raise MemFlowError(
                f"{source}: {keys[index[key]][1]} and {name} have the same sample_index {key[0]} and prompts; "
                "keep one of them in the folder"
            )
        index[key] = i
    return index


def match_keys(keys_a: Sequence[tuple[Key, str]], keys_b: Sequence[tuple[Key, str]],
               sources: Sequence[str]) -> list[tuple[int, int]]:  # fmt: skip
    """Index pairs ``(i in A, j in B)`` of videos with the same sample index and prompts; every video needs one.

    Called on the sidecars before any model runs, so an unpaired video fails in a second.
    """
    index_a, index_b = _index(keys_a, sources[0]), _index(keys_b, sources[1])
    for keys, other, source, other_source in ((keys_a, index_b, *sources), (keys_b, index_a, *sources[::-1])):
        for key, name in keys:
            if key not in other:
                raise MemFlowError(
                    f"{source}: {name} has no partner in {other_source} (same sample_index {key[0]} and prompts); "
                    "generate both folders from the same prompts, or remove it"
                )
    return [(i, index_b[key]) for key, i in index_a.items()]


def pair_videos(report_a: dict[str, Any], report_b: dict[str, Any], sources: Sequence[str]) -> list[tuple[dict, dict]]:
    """Videos of A and B with the same sample index and prompts, in A's order (see :func:`match_keys`)."""
    pairs = match_keys(report_keys(report_a), report_keys(report_b), sources)
    return [(report_a["videos"][i], report_b["videos"][j]) for i, j in pairs]


def metric_value(video: dict[str, Any], metric: str) -> float | None:
    """A video's value of a comparison metric (scores, speed fields and, when present, VBench's)."""
    if metric.startswith("vbench_"):
        return (video.get("vbench") or {}).get(metric.removeprefix("vbench_"))
    return video["speed"][metric] if metric in video["speed"] else video[metric]


def paired_stats(values_a: Sequence[float | None], values_b: Sequence[float | None]) -> dict[str, Any]:
    """Mean of A, of B and of B - A over the pairs where both exist, its standard error and wins:losses."""
    pairs = [(a, b) for a, b in zip(values_a, values_b, strict=True) if a is not None and b is not None]
    diffs = [b - a for a, b in pairs]
    n = len(diffs)
    diff = sum(diffs) / n if n else None
    se = math.sqrt(sum((d - diff) ** 2 for d in diffs) / (n - 1) / n) if n > 1 else None
    return {
        "n": n, "mean_a": mean([a for a, _ in pairs]), "mean_b": mean([b for _, b in pairs]), "mean_diff": diff,
        "se": se, "wins": sum(d > TIE for d in diffs), "losses": sum(d < -TIE for d in diffs),
    }  # fmt: skip


def _segment_curves(videos: Sequence[dict[str, Any]], metric: str) -> list[dict[str, float | None]]:
    """Per segment position: mean and standard error over the videos that have that many segments."""
    def value(segment: dict[str, Any]) -> float:
        return segment[metric]["own"] if metric == "text_alignment" else segment[metric]

    curves = []
    for s in range(max(len(v["segments"]) for v in videos)):
        values = [value(v["segments"][s]) for v in videos if s < len(v["segments"])]
        m = sum(values) / len(values)
        se = math.sqrt(sum((x - m) ** 2 for x in values) / (len(values) - 1) / len(values)) if len(values) > 1 else None
        curves.append({"mean": m, "se": se, "n": len(values)})
    return curves


def _label(report: dict[str, Any], source: str) -> str:
    modes = sorted({str(v.get("memory")) for v in report["videos"]})
    return f"{modes[0]} ({source})" if len(modes) == 1 else source


def _notes(pairs: Sequence[tuple[dict, dict]]) -> list[str]:
    notes = []
    seeds = sum(a.get("video_seed") != b.get("video_seed") for a, b in pairs)
    if seeds:
        notes.append(f"{seeds} of {len(pairs)} pairs were generated with different seeds")
    runs = {side: sorted({f"{v.get('device')} {v.get('dtype')}" for v in vids})
            for side, vids in (("A", [a for a, _ in pairs]), ("B", [b for _, b in pairs]))}  # fmt: skip
    if runs["A"] != runs["B"]:
        notes.append(f"A ran on {', '.join(runs['A'])} and B on {', '.join(runs['B'])}: speed is not comparable")
    return notes


def compare_reports(report_a: dict[str, Any], report_b: dict[str, Any], sources: Sequence[str]) -> dict[str, Any]:
    """The paired comparison of two reports (``sources`` name them, e.g. their folders)."""
    labels = [_label(report_a, sources[0]), _label(report_b, sources[1])]
    pairs = pair_videos(report_a, report_b, sources)
    metrics = dict(METRICS)
    if all(a.get("vbench") and b.get("vbench") for a, b in pairs):
        metrics.update(VBENCH_METRICS)
    stats = {m: paired_stats([metric_value(a, m) for a, _ in pairs], [metric_value(b, m) for _, b in pairs])
             for m in metrics}  # fmt: skip
    narratives = [{
        "sample_index": a["sample_index"], "video_a": a["video"], "video_b": b["video"],
        "prompt": a["segments"][0]["prompt"],
        "diffs": {m: None if metric_value(a, m) is None or metric_value(b, m) is None
                  else metric_value(b, m) - metric_value(a, m) for m in metrics},
    } for a, b in pairs]  # fmt: skip
    segments = {m: {"a": _segment_curves([a for a, _ in pairs], m), "b": _segment_curves([b for _, b in pairs], m)}
                for m in SEGMENT_METRICS}  # fmt: skip
    return {
        "kind": "memflow-comparison", "a": labels[0], "b": labels[1], "pairs": len(pairs),
        "metric_names": metrics, "metrics": stats, "narratives": narratives, "segments": segments,
        "notes": _notes(pairs),
    }  # fmt: skip


def _num(value: float | None, digits: int = 4, signed: bool = False) -> str:
    if value is None:
        return "-"
    return f"{value:+.{digits}f}" if signed else f"{value:.{digits}f}"


def comparison_markdown(comparison: dict[str, Any], plot: Path | None = None) -> str:
    """The comparison as markdown: one table of paired statistics, one of per-narrative differences."""
    names = comparison["metric_names"]
    lines = [
        f"B = {comparison['b']} against A = {comparison['a']}: {comparison['pairs']} paired narratives. "
        "B - A is the mean over narratives +- its standard error; wins:losses counts narratives where B "
        "is higher : lower.",
        "",
        "| metric | A | B | B - A | +- SE | wins:losses |",
        "|---|---|---|---|---|---|",
    ]
    for metric, stat in comparison["metrics"].items():
        digits = 2 if metric.startswith("fps") else 4
        lines.append(f"| {names[metric]} | {_num(stat['mean_a'], digits)} | {_num(stat['mean_b'], digits)} "
                     f"| {_num(stat['mean_diff'], digits, True)} | {_num(stat['se'], digits)} "
                     f"| {stat['wins']}:{stat['losses']} |")  # fmt: skip
    shown = [m for m in names if m in SHORT]
    lines += ["", "Per narrative, B - A:", "",
              "| # | narrative | " + " | ".join(SHORT[m] for m in shown) + " |",
              "|" + "---|" * (len(shown) + 2)]  # fmt: skip
    for row in comparison["narratives"]:
        prompt = row["prompt"] if len(row["prompt"]) <= 48 else row["prompt"][:45] + "..."
        cells = " | ".join(_num(row["diffs"][m], 4, True) for m in shown)
        lines.append(f"| {row['sample_index']} | {prompt.replace('|', '/')} | {cells} |")
    lines += [""] + [f"Note: {note}." for note in comparison["notes"]]
    if plot is not None:
        lines += ["", f"![per-segment scores]({plot.name})"]
    return "\n".join(lines).rstrip() + "\n"
