"""MemFlow-Tiny's stages that are not distillation: prompts, VAE, teacher and packaging (tiny/train.py)."""

from tiny.train import main
from utils.config import run_cli

if __name__ == "__main__":
    run_cli(main)
