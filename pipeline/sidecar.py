"""The sidecar JSON beside every video: what was asked, what was done, how long it took, what memory did.

It is rewritten atomically after every chunk with ``"complete": false`` (and no memory trace), so a
killed run keeps a valid sidecar for what it wrote; the finished video's sidecar holds the trace too.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any

import numpy as np
import torch
from omegaconf import DictConfig, ListConfig, OmegaConf

from utils.atomic import atomic_path
from utils.config import to_container
from utils.errors import MemFlowError

from .outputs import FPS
from .plan import RunPlan, VideoJob
from .schedule import ChunkCondition


def _jsonable(value: Any) -> Any:
    if isinstance(value, (DictConfig, ListConfig)):
        return OmegaConf.to_container(value, resolve=True)
    if isinstance(value, (torch.Tensor, np.ndarray)):
        return value.tolist()
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, Path):
        return str(value)
    if isinstance(value, (set, frozenset)):
        return sorted(value)
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return dataclasses.asdict(value)
    raise TypeError(f"cannot write a {type(value).__name__} to the sidecar JSON")


def write_sidecar(path: str | Path, data: dict[str, Any], replace: bool = False) -> Path:
    """Write ``data`` as JSON atomically (temp file, then rename) so a reader never sees half a file.

    ``replace=True`` lets a run update its own sidecar as chunks finish; without it an existing file
    is an error. Tensors, arrays, paths, dataclasses and OmegaConf nodes are converted.
    """
    path = Path(path)
    if not replace and path.exists():
        raise MemFlowError(f"{path} already exists; outputs are never overwritten, choose another name")
    text = json.dumps(data, indent=2, default=_jsonable, allow_nan=False, ensure_ascii=False)
    with atomic_path(path) as tmp:
        tmp.write_text(text + "\n", encoding="utf-8")
    return path


@dataclasses.dataclass(frozen=True)
class ChunkReport:
    """Progress after one chunk: what is done and how long each part took (seconds)."""

    chunk: int
    num_chunks: int
    pixel_frames: int
    total_pixel_frames: int
    generate_s: float
    decode_s: float
    write_s: float
    elapsed_s: float
    conditioning: dict[str, Any] = dataclasses.field(default_factory=dict)

    @property
    def fps(self) -> float:
        return self.total_pixel_frames / self.elapsed_s if self.elapsed_s > 0 else 0.0


@dataclasses.dataclass
class VideoResult:
    """Files and figures of one video, finished or in progress."""

    job: VideoJob
    video: Path
    sidecar: Path
    trace: Path | None
    latents: Path | None
    pixel_frames: int
    seconds: float
    peak_memory: dict[str, Any]
    chunks: list[ChunkReport] = dataclasses.field(default_factory=list)

    @property
    def fps(self) -> float:
        return self.pixel_frames / self.seconds if self.seconds > 0 else 0.0


def conditioning_record(job: VideoJob, cond: ChunkCondition) -> dict[str, Any]:
    """What conditioned one chunk: its segment's weighted prompts and, inside a transition, how far from the
    previous segment's embedding it has moved (``transition`` 1.0 is the segment's own embedding)."""
    segment = job.schedule.segments[cond.segment]
    return {
        "segment": cond.segment,
        "switch": cond.switch,
        "prompts": [{"text": text, "weight": weight} for text, weight in segment.prompts],
        "transition": cond.alpha,
        "from_segment": cond.segment - 1 if cond.alpha < 1.0 else None,
    }


def sidecar_data(plan: RunPlan, result: VideoResult, trace: dict | None, complete: bool) -> dict[str, Any]:
    """The sidecar of ``result``: resolved config, seeds, prompts, switches, timings, memory and trace."""
    job = result.job
    return {
        "video": result.video.name,
        "complete": complete,
        "config": to_container(plan.config),
        "seed": plan.config.seed,
        "video_seed": job.seed,
        "sample_index": job.index,
        "prompt_index": job.prompt_index,
        "sample": job.sample,
        "rank": plan.rank,
        "world_size": plan.world_size,
        "prompts": job.schedule.to_dict(),
        "switch_frames": job.schedule.switch_frames,
        "resolution": {"height": plan.height, "width": plan.width},
        "latent_frames": plan.num_frames,
        "pixel_frames": result.pixel_frames,
        "fps_video": FPS,
        "device": str(plan.device),
        "dtype": str(plan.dtype).removeprefix("torch."),
        "timings": {
            "total_s": result.seconds,
            "fps": result.fps,
            "chunks": [
                {"chunk": r.chunk, "pixel_frames": r.pixel_frames, "generate_s": r.generate_s,
                 "decode_s": r.decode_s, "write_s": r.write_s}
                for r in result.chunks
            ],
        },
        "conditioning": [{"chunk": r.chunk, **r.conditioning} for r in result.chunks],
        "peak_memory": result.peak_memory,
        "files": {
            "latents": result.latents.name if result.latents else None,
            "memory_trace_png": result.trace.name if result.trace else None,
        },
        "memory_trace": trace,
    }
