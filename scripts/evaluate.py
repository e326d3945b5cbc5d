"""Evaluate a folder of generated videos, or compare two folders narrative by narrative.

usage: python scripts/evaluate.py VIDEO_DIR [--out REPORT.json] [options]
       python scripts/evaluate.py --compare A B [--out COMPARISON.md] [options]

Options and definitions: --help, docs/evaluation.md.
"""

from pipeline.evaluation.cli import main
from utils.config import run_cli

if __name__ == "__main__":
    run_cli(main)
