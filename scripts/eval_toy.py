"""Held-out evaluation of MemFlow-Tiny per memory mode, scored by the story world's oracle (tiny/evaluate.py)."""

from tiny.evaluate import main
from utils.config import run_cli

if __name__ == "__main__":
    run_cli(main)
