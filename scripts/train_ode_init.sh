#!/usr/bin/env bash
# ODE initialisation: teacher trajectories, then regression of the causal generator (writes base.pt).
# usage: bash scripts/train_ode_init.sh [--config_path PATH] [--logdir DIR] [--resume] [key=value ...]
# Default config: configs/ode_init.yaml; default logdir: logs/ode_init. A logdir holding this run's
# checkpoints is resumed automatically. NPROC=N runs N processes (one GPU each) through torchrun with FSDP.
exec bash "$(dirname "${BASH_SOURCE[0]}")/../scripts/launch.sh" scripts/train.py --stage ode_init "$@"
