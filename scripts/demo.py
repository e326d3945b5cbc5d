"""The embedded demo: one held-out narrative on MemFlow-Tiny, scored by the oracle (tiny/demo.py)."""

from tiny.demo import main
from utils.config import run_cli

if __name__ == "__main__":
    run_cli(main)
