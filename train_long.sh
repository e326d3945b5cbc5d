#!/usr/bin/env bash
# Stage 2: streaming long tuning with prompt switches (LoRA).
# usage: bash train_long.sh [--config_path PATH] [--logdir DIR] [--resume] [key=value ...]
# Default config: configs/train_long.yaml; default logdir: logs/train_long. A logdir holding this run's
# checkpoints is resumed automatically. NPROC=N runs N processes (one GPU each) through torchrun with FSDP.
exec bash "$(dirname "${BASH_SOURCE[0]}")/scripts/launch.sh" scripts/train.py --stage long "$@"
