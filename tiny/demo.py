"""The embedded demo: one held-out interactive narrative on MemFlow-Tiny, on the CPU, scored by the oracle.

usage: python scripts/demo.py [--seed 1000000] [--frames 36] [--config_path configs/toy/interactive_inference.yaml]
                              [key=value ...]

Generates the story-world narrative of a test-split seed through the inference product (plan, components,
``VideoRunner``: streaming decode to MP4, sidecar JSON, memory-trace PNG), prompts switching at the
narrative's segment starts, then scores the video with the oracle and writes ``<stem>.oracle.json``
(metrics, per-segment observations, the narrative) and prints a short summary.
"""

from __future__ import annotations

import json
import math
import tempfile
import time
from pathlib import Path

import torch
from safetensors.torch import load_file

from pipeline.plan import plan_run
from pipeline.runner import VideoRunner, build_components
from tiny.oracle import Oracle
from tiny.world import from_model_pixels, narrative_from_seed, split_of, split_seeds
from utils.atomic import atomic_path
from utils.config import ScriptParser, load_config, parse_cli, run_cli
from utils.errors import ConfigError

ROOT = Path(__file__).resolve().parents[1]

DEFAULT_CONFIG = ROOT / "configs" / "toy" / "interactive_inference.yaml"


def narrative_overrides(seed: int, frames: int, folder: Path) -> tuple[list[str], object]:
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


def main(argv: list[str]) -> int:
    parser = ScriptParser(prog="demo.py")
    parser.add_argument("--seed", type=int, default=split_seeds("test", 1)[0])
    parser.add_argument("--frames", type=int, default=36, help="latent frames (whole 3-frame chunks, >= 27)")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (1 avoids oversubscribing a shared CPU)")
    args, rest = parser.parse_known_args(argv)
    config_path, _, overrides = parse_cli(rest, str(DEFAULT_CONFIG), prog="demo.py")
    torch.set_num_threads(args.threads)
    start = time.perf_counter()
    with tempfile.TemporaryDirectory() as scratch:
        extra, narrative = narrative_overrides(args.seed, args.frames, Path(scratch))
        plan = plan_run(load_config(config_path, [*overrides, *extra]))
        components = build_components(plan)
        result = VideoRunner(plan, components).run(plan.jobs[0])
    latents = load_file(str(result.latents))["latents"]
    with torch.no_grad():
        pixels = components.vae.decode(latents[None].to(plan.dtype))[0].float().numpy()
    report = Oracle().evaluate(narrative, from_model_pixels(pixels))
    report.pop("identity_pairs")  # the observations it holds are in report["segments"] already
    report["narrative"] = narrative.to_json()
    report["video"] = result.video.name
    report["seconds"] = time.perf_counter() - start
    oracle_path = result.video.with_suffix(".oracle.json")
    with atomic_path(oracle_path) as tmp:
        # measures without a test in this narrative are NaN: written as null (strict JSON)
        strict = json.loads(json.dumps(report), parse_constant=lambda _: None)
        tmp.write_text(json.dumps(strict, indent=2) + "\n")
    metrics = report["metrics"]
    print(f"narrative {args.seed} ({narrative.plan}): {len(narrative.segments)} prompts, {args.frames} latent frames")
    for segment in narrative.segments:
        print(f"  frame {segment.start:3d} [{segment.kind}] {segment.prompt}")
    shown = ", ".join(f"{k} {v:.2f}" for k, v in metrics.items() if not k.endswith("_tests") and not math.isnan(v))
    print(f"oracle: {shown}")
    print(f"video {result.video}, memory trace {result.trace}, oracle report {oracle_path}")
    print(f"{result.pixel_frames} frames at {result.fps:.1f} FPS (generate + decode), {report['seconds']:.1f} s in all")
    return 0


if __name__ == "__main__":
    run_cli(main)
