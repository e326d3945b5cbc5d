"""Evaluate a folder of generated videos, or compare two folders narrative by narrative.

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

from pipeline.evaluation.cli import main
from utils.config import run_cli

if __name__ == "__main__":
    run_cli(main)
