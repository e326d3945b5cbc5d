"""The command lines of inference and its tools; ``scripts/*.py`` call these.

Each takes ``argv`` and returns an exit code; :func:`utils.config.run_cli` turns a user error into one
line and exit code 2. Progress and results are printed here, never in the library.
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

import torch
from tqdm import tqdm

from memflow.config import PRESETS
from memflow.verify import COMPANIONS, Layouts, Verifier
from utils.config import load_config, override_keys, parse_cli
from utils.distributed import barrier, init_distributed, setup_logging
from utils.errors import ConfigError, WeightsError

from .compat import RELEASE
from .golden import check_cases
from .plan import DTYPES, plan_run
from .runner import VideoRunner, build_components, format_bytes
from .sidecar import ChunkReport

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = {False: ROOT / "configs" / "inference.yaml", True: ROOT / "configs" / "interactive_inference.yaml"}
DEFAULT_GOLDEN = ROOT.parent / "shared" / "golden"
GOLDEN_ATOL = {"float32": 1e-4, "bfloat16": 0.3}  # bfloat16: the VAE's pixels err most (0.12 of [-1, 1])


def inference(argv: list[str]) -> int:
    """``scripts/inference.py``: plan, load, then every video of this rank with a progress bar."""
    interactive = "--interactive" in argv
    argv = [arg for arg in argv if arg != "--interactive"]
    config_path, options, overrides = parse_cli(argv, str(CONFIGS[interactive]), prog="inference.sh")
    if options["logdir"] or options["resume"]:
        raise ConfigError("--logdir and --resume are training options; inference writes to output_folder")
    env = init_distributed()
    setup_logging(env)
    cfg = load_config(config_path, overrides, defaults_path=CONFIGS[interactive], compat=RELEASE)
    plan = plan_run(cfg, rank=env.rank, world_size=env.world_size, local_rank=env.local_rank,
                    command_line=override_keys(overrides))  # fmt: skip
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


def verify_weights(argv: list[str]) -> int:
    """``scripts/verify_weights.py``: one line per file; 2 when any check fails."""
    parser = argparse.ArgumentParser(prog="verify_weights.py", description="Check weights without loading them.")
    parser.add_argument("wan_dir", nargs="?", type=Path, help="Wan2.1 folder (original or Diffusers layout)")
    parser.add_argument("--checkpoints", type=Path, help="MemFlow folder with base.pt and lora.pt")
    parser.add_argument("--preset", default="wan2.1-t2v-1.3b", choices=sorted(set(PRESETS) & set(COMPANIONS)))
    parser.add_argument("--lora-rank", type=int, default=256, help="LoRA rank the config uses (MemFlow: 256)")
    args = parser.parse_args(argv)
    if args.wan_dir is None and args.checkpoints is None:
        raise ConfigError("nothing to check: pass a Wan2.1 folder and/or --checkpoints DIR")
    verifier = Verifier(Layouts(args.preset, args.lora_rank))
    for folder in (args.wan_dir, args.checkpoints):
        if folder is not None and not folder.is_dir():
            raise WeightsError(f"folder not found: {folder}")
    if args.wan_dir is not None:
        verifier.wan_folder(args.wan_dir)
    if args.checkpoints is not None:
        verifier.checkpoints(args.checkpoints)
    print("\n".join(verifier.lines))
    total = len(verifier.lines)
    if verifier.failures:
        print(f"{verifier.failures} of {total} checks failed")
        return 2
    print(f"all {total} checks passed")
    return 0


def check_golden(argv: list[str]) -> int:
    """``scripts/check_golden.py``: one line per golden case; 1 when any fails."""
    parser = argparse.ArgumentParser(prog="check_golden.py", description="Run every golden case of the released code.")
    parser.add_argument("golden_dir", nargs="?", default=str(DEFAULT_GOLDEN))
    parser.add_argument("--dtype", choices=sorted(GOLDEN_ATOL), default="float32",
                        help="model dtype; the reference is float32 (bfloat16 skips SMA's near-tie selections)")
    parser.add_argument("--atol", type=float, help="largest allowed absolute error (default 1e-4, bfloat16 0.3)")
    args = parser.parse_args(argv)
    golden = Path(args.golden_dir)
    if not (golden / "cases.json").is_file():
        print(f"error: {golden / 'cases.json'} not found; pass the golden folder as the first argument",
              file=sys.stderr)
        return 2
    torch.set_num_threads(1)
    torch.use_deterministic_algorithms(True)
    atol = GOLDEN_ATOL[args.dtype] if args.atol is None else args.atol
    lines, failed = check_cases(golden, atol, DTYPES[args.dtype])
    print("\n".join(lines))
    return 1 if failed else 0
