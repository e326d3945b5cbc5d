"""Streaming speed per memory mode, eager and compiled, with random weights (see docs/benchmark.md).

usage: python scripts/benchmark.py --preset {tiny,mid,wan2.1-t2v-1.3b} --device {cpu,cuda} [--height H --width W]
                                   [--chunks 4] [--repeats 3] [--warmup 1] [--dtype auto] [--modes ...]
                                   [--compile] [--cudagraphs] [--sweep 3 6 12 24] [--no-decode] [--json]

The streaming settings come from --config (default configs/inference.yaml: 4 steps, 3-frame
chunks, sink 3, window 12, bank 3) with only the memory mode (and, in the sweep, the bank) changed.
"""

from pipeline.benchmark import main
from utils.config import run_cli

if __name__ == "__main__":
    run_cli(main)
