"""The prepared GPU check: environment, golden cases, benchmark, training and memory figures in one JSON.

usage: python scripts/gpu_check.py [--out gpu_check.json] [--golden ../shared/golden] [--budget 480] [--smoke]

On one GPU (about 8 minutes on an H100, by estimate: not yet run on one); ``--smoke`` runs the same steps at
tiny size on the CPU. What it measures: trainer/gpu_check.py and docs/benchmark.md.
"""

from trainer.gpu_check import main
from utils.config import run_cli

if __name__ == "__main__":
    run_cli(main)
