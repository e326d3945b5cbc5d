"""Check downloaded weights against the layouts our modules load, reading only headers and keys.

usage: python scripts/verify_weights.py [WAN_DIR] [--checkpoints DIR] [--preset wan2.1-t2v-1.3b] [--lora-rank 256]

WAN_DIR is a Wan2.1 folder (original or Diffusers layout); --checkpoints is the MemFlow folder with
base.pt and lora.pt (see memflow/verify.py). Prints one line per file and exits 0 when every file
matches, 2 otherwise.
"""

from pipeline.cli import verify_weights
from utils.config import run_cli

if __name__ == "__main__":
    run_cli(verify_weights)
