"""The embedded demo: one held-out narrative on MemFlow-Tiny, memory off and on, on the CPU, scored by the oracle.

usage: python scripts/demo.py [--seed 1000000] [--frames 36] [--modes none,nam]
                              [--config_path configs/toy/interactive_inference.yaml] [key=value ...]

Generates the story-world narrative of a test-split seed once per memory mode through the inference product
(plan, components, ``VideoRunner``: streaming decode to MP4, sidecar JSON, memory-trace PNG) into
``<output_folder>/<mode>/``, prompts switching at the narrative's segment starts, with the same noise. Each
video is scored by the oracle into ``<stem>.oracle.json`` (metrics, per-segment observations, the narrative).
One contact sheet, ``<output_folder>/narrative-<seed>.sheet.png``, shows the ground truth and each mode a row
each, the frames of the segments only memory can restore framed in red: the picture to look at first.
"""

from __future__ import annotations

import json
import math
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageDraw
from safetensors.torch import load_file

from pipeline.outputs import reserve_stem
from pipeline.plan import plan_run
from pipeline.runner import VideoRunner, build_components
from tiny.evaluate import parse_modes
from tiny.oracle import Oracle
from tiny.world import Narrative, from_model_pixels, narrative_from_seed, split_of, split_seeds
from utils.atomic import atomic_path
from utils.config import ScriptParser, load_config, parse_cli, run_cli
from utils.errors import ConfigError

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_CONFIG = ROOT / "configs" / "toy" / "interactive_inference.yaml"

COLUMNS = 12  # frames per row of the contact sheet, evenly spaced over the video
SCALE = 2  # pixels per frame pixel on the sheet
LABEL = 56  # width of the row labels
BORDER = 2
RETURN_COLOUR = (220, 30, 30)  # frames of a segment only memory can restore


def narrative_overrides(seed: int, frames: int, folder: Path) -> tuple[list[str], Narrative]:
    """The narrative of ``seed`` as a JSONL prompt file in ``folder`` and the overrides that run it."""
    if split_of(seed) != "test":
        raise ConfigError(f"--seed {seed} is not a held-out test seed; use one of {split_seeds('test', 1)[0]}...")
    try:
        narrative = narrative_from_seed(seed, frames)
    except ValueError as err:
        raise ConfigError(f"--frames {frames}: {err}") from None
    prompts = folder / f"narrative-{seed}.jsonl"
    prompts.write_text(json.dumps({"prompts": [s.prompt for s in narrative.segments]}) + "\n")
    switches = ",".join(str(s.start) for s in narrative.segments[1:])
    return [f"data_path={prompts}", f"num_output_frames={frames}", f"switch_frame_indices=[{switches}]",
            "save_latents=true", "save_trace=true"], narrative  # fmt: skip


def run_mode(config_path: str, overrides: list[str], mode: str, folder: Path) -> tuple[dict, np.ndarray, float]:
    """One generation under memory ``mode`` into ``folder``: the runner's result, the decoded frames and FPS."""
    mode_overrides = [f"model_kwargs.memory={mode}", f"model_kwargs.SMA={str(mode == 'nam_sma').lower()}",
                      f"output_folder={folder}"]  # fmt: skip
    plan = plan_run(load_config(config_path, [*overrides, *mode_overrides]))
    components = build_components(plan)
    result = VideoRunner(plan, components).run(plan.jobs[0])
    latents = load_file(str(result.latents))["latents"]
    with torch.no_grad():
        pixels = components.vae.decode(latents[None].to(plan.dtype))[0].float().numpy()
    return result, from_model_pixels(pixels), result.fps


def write_report(narrative: Narrative, frames: np.ndarray, result, mode: str, fps: float) -> tuple[Path, dict]:
    report = Oracle().evaluate(narrative, frames)
    report.pop("identity_pairs")  # the observations it holds are in report["segments"] already
    report.update(mode=mode, fps=fps, video=result.video.name, narrative=narrative.to_json())
    path = result.video.with_suffix(".oracle.json")
    with atomic_path(path) as tmp:
        # measures without a test in this narrative are NaN: written as null (strict JSON)
        strict = json.loads(json.dumps(report), parse_constant=lambda _: None)
        tmp.write_text(json.dumps(strict, indent=2) + "\n")
    return path, report["metrics"]


def contact_sheet(narrative: Narrative, rows: dict[str, np.ndarray]) -> Image.Image:
    """``rows`` (label -> uint8 frames [T, H, W, 3]) as COLUMNS evenly spaced frames each; the frames of segments
    with a subject or scene only memory can restore framed in ``RETURN_COLOUR``."""
    total, height, width = narrative.frames.shape[:3]
    picks = np.linspace(0, total - 1, COLUMNS).round().astype(int)
    memory = np.zeros(total, dtype=bool)
    for segment in narrative.segments:
        if segment.memory_subjects or segment.memory_background:
            memory[segment.pixel_start : segment.pixel_end] = True
    cell_w, cell_h = width * SCALE + 2 * BORDER, height * SCALE + 2 * BORDER
    sheet = Image.new("RGB", (LABEL + COLUMNS * cell_w, len(rows) * cell_h), "white")
    draw = ImageDraw.Draw(sheet)
    for row, (label, frames) in enumerate(rows.items()):
        draw.text((4, row * cell_h + cell_h // 2 - 6), label, fill="black")
        for column, t in enumerate(picks):
            x, y = LABEL + column * cell_w, row * cell_h
            if memory[t]:
                draw.rectangle((x, y, x + cell_w - 1, y + cell_h - 1), fill=RETURN_COLOUR)
            tile = Image.fromarray(frames[t]).resize((width * SCALE, height * SCALE), Image.NEAREST)
            sheet.paste(tile, (x + BORDER, y + BORDER))
    return sheet


def main(argv: list[str]) -> int:
    parser = ScriptParser(prog="demo.py")
    parser.add_argument("--seed", type=int, default=split_seeds("test", 1)[0])
    parser.add_argument("--frames", type=int, default=36, help="latent frames (whole 3-frame chunks, >= 27)")
    parser.add_argument("--modes", default="none,nam", help="memory modes to run, comma-separated")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (1 avoids oversubscribing a shared CPU)")
    args, rest = parser.parse_known_args(argv)
    modes = parse_modes(args.modes)
    config_path, _, overrides = parse_cli(rest, str(DEFAULT_CONFIG), prog="demo.py")
    torch.set_num_threads(args.threads)
    start = time.perf_counter()
    with tempfile.TemporaryDirectory() as scratch:
        extra, narrative = narrative_overrides(args.seed, args.frames, Path(scratch))
        base = Path(str(load_config(config_path, [*overrides, *extra]).output_folder))
        print(f"narrative {args.seed} ({narrative.plan}): {len(narrative.segments)} prompts, {args.frames} latent "
              "frames")  # fmt: skip
        for segment in narrative.segments:
            print(f"  frame {segment.start:3d} [{segment.kind}] {segment.prompt}")
        rows = {"truth": narrative.frames}
        for mode in modes:
            result, frames, fps = run_mode(config_path, [*overrides, *extra], mode, base / mode)
            report, metrics = write_report(narrative, frames, result, mode, fps)
            rows[mode] = frames
            shown = ", ".join(f"{k} {v:.2f}" for k, v in metrics.items()
                              if not k.endswith("_tests") and not math.isnan(v))  # fmt: skip
            print(f"{mode}: oracle {shown}")
            print(f"{mode}: video {result.video}, memory trace {result.trace}, oracle report {report}, "
                  f"{result.pixel_frames} frames at {fps:.1f} FPS (generate + decode)")
    stem = reserve_stem(base, f"narrative-{args.seed}", [".sheet.png"])
    sheet_path = base / f"{stem}.sheet.png"
    with atomic_path(sheet_path) as tmp:
        contact_sheet(narrative, rows).save(tmp, format="PNG")
    print(f"contact sheet {sheet_path} (rows: {', '.join(rows)}; red frames: only memory can restore them); "
          f"{time.perf_counter() - start:.1f} s in all")
    return 0


if __name__ == "__main__":
    run_cli(main)
