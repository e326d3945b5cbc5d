"""Streaming video generation from a config: single-prompt (text file) or interactive (JSONL, timeline).

usage: python scripts/inference.py [--interactive] [--config_path PATH] [key=value ...]

The default config is configs/inference.yaml, or configs/interactive_inference.yaml with
--interactive; the prompt format follows data_path (.txt, .jsonl or .json timeline). Under torchrun
(``torchrun --nproc_per_node N scripts/inference.py ...``) rank r generates samples r, r+N, ...
and writes its own files. Run from the repository root: data_path and output_folder are relative
to the working directory, as in the release.
"""

from pipeline.cli import inference
from utils.config import run_cli

if __name__ == "__main__":
    run_cli(inference)
