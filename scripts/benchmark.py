"""Streaming speed per memory mode, with random weights (see pipeline/benchmark.py).

usage: python scripts/benchmark.py --preset {tiny,wan2.1-t2v-1.3b} --device {cpu,cuda} --height H --width W
                                   --chunks N [--dtype bfloat16] [--warmup 2] [--modes none nam nam_sma] [--json]

The streaming settings come from --config (default configs/inference.yaml: 4 steps, 3-frame
chunks, sink 3, window 12, bank 3) with only the memory mode changed.
"""

from pipeline.benchmark import main
from utils.config import run_cli

if __name__ == "__main__":
    run_cli(main)
