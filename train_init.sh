#!/usr/bin/env bash
# Stage 1: Self-Forcing initialisation with the memory active.
# usage: bash train_init.sh [--config_path PATH] [--logdir DIR] [--resume] [key=value ...]
# Default config: configs/train_init.yaml; default logdir: logs/train_init. A logdir holding this run's
# checkpoints is resumed automatically. NPROC=N runs N processes (one GPU each) through torchrun with FSDP.
exec bash "$(dirname "${BASH_SOURCE[0]}")/scripts/launch.sh" scripts/train.py --stage init "$@"
