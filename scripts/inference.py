"""Streaming video generation from a config: single-prompt (text file) or interactive (JSONL, timeline).

usage: python scripts/inference.py [--interactive] [--config_path PATH] [key=value ...]

The default config is configs/inference.yaml, or configs/interactive_inference.yaml with
--interactive; the prompt format follows data_path (.txt, .jsonl or .json timeline). Under torchrun
(``torchrun --nproc_per_node N scripts/inference.py ...``) rank r generates samples r, r+N, ...
and writes its own files. Run from the repository root: data_path and output_folder are relative
to the working directory, as in the release.
"""

from __future__ import annotations

import logging
import sys
from pathlib import Path

from tqdm import tqdm

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from memflow.errors import ConfigError  # noqa: E402
from pipeline.inference import ChunkReport, VideoRunner, build_components, format_bytes, plan_run  # noqa: E402
from utils.config import load_config, parse_cli, run_cli  # noqa: E402
from utils.distributed import barrier, init_distributed, setup_logging  # noqa: E402

CONFIGS = {False: ROOT / "configs" / "inference.yaml", True: ROOT / "configs" / "interactive_inference.yaml"}


def main(argv: list[str]) -> int:
    interactive = "--interactive" in argv
    argv = [arg for arg in argv if arg != "--interactive"]
    config_path, options, overrides = parse_cli(argv, str(CONFIGS[interactive]), prog="inference.sh")
    if options["logdir"] or options["resume"]:
        raise ConfigError("--logdir and --resume are training options; inference writes to output_folder")
    cfg = load_config(config_path, overrides)
    env = init_distributed()
    setup_logging(env)
    plan = plan_run(cfg, rank=env.rank, world_size=env.world_size, local_rank=env.local_rank)
    logging.getLogger("inference").info(
        "%d video(s) in total, %d on this rank; %dx%d, %d latent frames, memory=%s, %s %s",
        plan.total_videos, len(plan.jobs), plan.width, plan.height, plan.num_frames, plan.stream.memory,
        plan.device, str(plan.dtype).removeprefix("torch."),
    )  # fmt: skip
    runner = VideoRunner(plan, build_components(plan))
    runner.encode_prompts([text for job in plan.jobs for text in job.schedule.texts])
    prefix = f"[rank {env.rank}] " if env.world_size > 1 else ""
    for job in plan.jobs:
        num_chunks = job.schedule.num_chunks
        with tqdm(total=num_chunks, desc=f"{job.index + 1}/{plan.total_videos}", unit="chunk", file=sys.stderr,
                  disable=not env.is_main, dynamic_ncols=True) as bar:  # fmt: skip

            def progress(report: ChunkReport, bar: tqdm = bar) -> None:
                bar.set_postfix_str(f"chunk {report.chunk + 1}/{report.num_chunks}, "
                                    f"{report.total_pixel_frames} frames, {report.fps:.2f} FPS")  # fmt: skip
                bar.update(1)

            result = runner.run(job, on_chunk=progress)
        print(f"{prefix}{result.video}  {result.fps:.2f} FPS  peak memory {format_bytes(result.peak_memory['bytes'])} "
              f"({result.peak_memory['kind']})", flush=True)  # fmt: skip
    barrier()
    return 0


if __name__ == "__main__":
    run_cli(main)
