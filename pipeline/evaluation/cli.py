"""The evaluation command line (``scripts/evaluate.py``); its usage is below."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

import torch
from tqdm import tqdm

from utils.config import ScriptParser
from utils.errors import ConfigError

from . import (
    DEFAULT_CLIP,
    DEFAULT_DINO,
    compare_reports,
    comparison_markdown,
    evaluate_videos,
    find_videos,
    load_clip,
    load_dino,
    load_report,
    render_comparison,
    report_markdown,
    write_report,
)
from .compare import match_keys, report_keys
from .vbench_dims import attach_vbench, require_vbench, run_vbench

USAGE = """Evaluate a folder of generated videos, or compare two folders narrative by narrative.

usage: python scripts/evaluate.py VIDEO_DIR [--out REPORT.json] [options]
       python scripts/evaluate.py --compare A B [--out COMPARISON.md] [options]

Every MP4 needs the sidecar JSON the inference scripts write beside it (prompts, switch frames,
timings). Per video, per prompt segment and over the folder: subject consistency (DINO) and
background consistency (CLIP) as VBench defines them, text alignment of each segment's frames with
its own prompt and with the other segments' prompts, consistency across each prompt switch, and
the sidecar's speed figures. Definitions: docs/evaluation.md.

--compare pairs the videos of A and B by sample index and prompts (generate both from the same
prompts and seeds, e.g. model_kwargs.memory=none and =nam) and reports, per metric, the mean of
B - A with its standard error and wins:losses; A and B are video folders or reports written with
--out. Models load by hub name from the local Hugging Face cache (nothing is downloaded) or from a
folder written by save_pretrained. Outputs are never overwritten: an existing --out is refused
(with --compare also an existing .json or .png of the same name).
"""


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = ScriptParser(prog="evaluate.py", description=USAGE, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("video_dir", nargs="?", metavar="VIDEO_DIR", help="folder of MP4s with their sidecars")
    parser.add_argument("--compare", nargs=2, metavar=("A", "B"), help="two video folders or reports: B - A")
    parser.add_argument("--out", type=Path, help="write the report (JSON) or, with --compare, the table (.md) "
                        "plus its .json and .png; refused if it exists")  # fmt: skip
    parser.add_argument("--dino", default=DEFAULT_DINO, help=f"DINO ViT name or folder (default {DEFAULT_DINO})")
    parser.add_argument("--clip", default=DEFAULT_CLIP, help=f"CLIP name or folder (default {DEFAULT_CLIP})")
    parser.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto")
    parser.add_argument("--batch_size", type=int, default=32, help="frames per model call")
    parser.add_argument("--window", type=int, default=16, help="frames each side of a switch (16 = 1 s)")
    parser.add_argument("--vbench", action="store_true", help="also run VBench's own dimensions (needs vbench)")
    args = parser.parse_args(argv)
    if (args.video_dir is None) == (args.compare is None):
        raise ConfigError("give either VIDEO_DIR or --compare A B; see python scripts/evaluate.py --help")
    if args.batch_size < 1 or args.window < 1:
        raise ConfigError("--batch_size and --window must be at least 1")
    if args.vbench:
        require_vbench()
    return args


def _device(name: str) -> torch.device:
    if name == "cuda" and not torch.cuda.is_available():
        raise ConfigError("--device cuda: no CUDA device is available; use --device cpu or auto")
    return torch.device("cuda" if name == "cuda" or (name == "auto" and torch.cuda.is_available()) else "cpu")


def _outputs(out: Path | None, compare: bool) -> list[Path]:
    """The files --out will create, checked before any work: none may exist, the folder must."""
    if out is None:
        return []
    paths = [out, out.with_suffix(".json"), out.with_suffix(".png")] if compare else [out]
    if compare and out.suffix == ".json":
        raise ConfigError(f"--out {out}: with --compare name the markdown file (e.g. comparison.md)")
    for path in paths:
        if path.exists():
            raise ConfigError(f"--out: {path} already exists; outputs are never overwritten, choose another --out")
    if not out.parent.is_dir():
        raise ConfigError(f"--out: folder {out.parent} does not exist; create it or choose another --out")
    return paths


def _reports(sources: list[str], args: argparse.Namespace) -> list[dict[str, Any]]:
    """Each source's report: loaded when it is a report JSON, else computed from its videos."""
    inputs = [load_report(src) if Path(src).is_file() else find_videos(src) for src in sources]
    if len(inputs) == 2:
        keys = [report_keys(item) if isinstance(item, dict) else [(e.key, e.video.name) for e in item]
                for item in inputs]  # fmt: skip
        match_keys(keys[0], keys[1], sources)
    if args.vbench and any(isinstance(item, dict) for item in inputs):
        raise ConfigError("--vbench runs on video folders; a report given to --compare was evaluated already")
    pending = [item for item in inputs if not isinstance(item, dict)]
    if not pending:
        return inputs
    device = _device(args.device)
    dino, clip = load_dino(args.dino, device), load_clip(args.clip, device)
    reports = []
    for src, item in zip(sources, inputs, strict=True):
        if isinstance(item, dict):
            reports.append(item)
            continue
        with tqdm(total=sum(e.pixel_frames for e in item), desc=Path(src).name, unit="frame", file=sys.stderr,
                  dynamic_ncols=True) as bar:  # fmt: skip
            report = evaluate_videos(item, dino, clip, window=args.window, batch_size=args.batch_size,
                                     on_frames=bar.update)  # fmt: skip
        if args.vbench:
            attach_vbench(report, run_vbench(src, device.type))
        reports.append(report)
    return reports


def main(argv: list[str]) -> int:
    args = parse_args(argv)
    compare = args.compare is not None
    outputs = _outputs(args.out, compare)
    sources = list(args.compare) if compare else [args.video_dir]
    reports = _reports(sources, args)
    if not compare:
        print(report_markdown(reports[0]))
        if outputs:
            print(f"report: {write_report(outputs[0], reports[0])}")
        return 0
    comparison = compare_reports(reports[0], reports[1], sources)
    if outputs:
        markdown_path, json_path, png_path = outputs
        write_report(json_path, comparison)
        render_comparison(comparison, png_path)
        with open(markdown_path, "x", encoding="utf-8") as handle:
            handle.write(comparison_markdown(comparison, png_path))
    print(comparison_markdown(comparison), end="")
    if outputs:
        print(f"comparison: {', '.join(str(path) for path in outputs)}")
    return 0
