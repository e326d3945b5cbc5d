#!/usr/bin/env bash
# Stage 1: Self-Forcing initialisation with the memory active.
# usage: bash train_init.sh [--config_path PATH] [--logdir DIR] [--resume] [key=value ...]
# Default config: configs/train_init.yaml; default logdir: logs/train_init. A logdir holding this run's
# checkpoints is resumed automatically (--allow_changed KEY,... accepts deliberate changes). NPROC=N runs N
# processes per node (one GPU each) through torchrun with FSDP; NNODES, NODE_RANK, MASTER_ADDR, MASTER_PORT (or
# SLURM under srun) spread them over nodes. SIGTERM/SIGUSR1: checkpoint, exit 75, rerun to continue (docs/clusters.md).
exec bash "$(dirname "${BASH_SOURCE[0]}")/scripts/launch.sh" scripts/train.py --stage init "$@"
