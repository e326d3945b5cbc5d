"""Optional: VBench's own subject and background consistency on the same folder, for a side-by-side check.

Needs the ``vbench`` package (``pip install vbench``), which loads its own models (DINO through
torch.hub, OpenAI CLIP) and may download them; this project never requires it.
"""

from __future__ import annotations

import importlib.util
import json
import tempfile
from pathlib import Path
from typing import Any

from utils.errors import MemFlowError

VBENCH_DIMENSIONS = ("subject_consistency", "background_consistency")


def vbench_available() -> bool:
    """Whether the ``vbench`` package can be imported here."""
    return importlib.util.find_spec("vbench") is not None


def require_vbench() -> None:
    """MemFlowError with the install command when ``vbench`` is not importable."""
    if not vbench_available():
        raise MemFlowError("--vbench needs the vbench package, which is not importable here; pip install vbench, "
                           "or leave out --vbench")  # fmt: skip


def run_vbench(folder: str | Path, device: str) -> dict[str, Any]:
    """``{"overall": {dim: score}, "videos": {file name: {dim: score}}}`` from VBench's custom-input mode."""
    import vbench

    folder = Path(folder)
    info = Path(vbench.__file__).parent / "VBench_full_info.json"
    with tempfile.TemporaryDirectory() as tmp:
        try:
            bench = vbench.VBench(device, str(info), tmp)
            bench.evaluate(videos_path=str(folder), name="memflow", dimension_list=list(VBENCH_DIMENSIONS),
                           mode="custom_input")  # fmt: skip
            results = json.loads((Path(tmp) / "memflow_eval_results.json").read_text(encoding="utf-8"))
        except Exception as err:  # a third-party failure of any kind becomes one line
            raise MemFlowError(f"--vbench: VBench failed on {folder} ({type(err).__name__}: {err})") from None
    overall: dict[str, float] = {}
    videos: dict[str, dict[str, float]] = {}
    for dimension in VBENCH_DIMENSIONS:
        score, per_video = results[dimension]
        overall[dimension] = float(score)
        for row in per_video:
            videos.setdefault(Path(row["video_path"]).with_suffix(".mp4").name, {})[dimension] = float(
                row["video_results"]
            )
    return {"overall": overall, "videos": videos}


def attach_vbench(report: dict[str, Any], results: dict[str, Any]) -> dict[str, Any]:
    """Put VBench's scores beside ours: per video under ``vbench`` and folder-wide under ``overall.vbench``."""
    for video in report["videos"]:
        video["vbench"] = results["videos"].get(video["video"])
    report["overall"]["vbench"] = results["overall"]
    return report
