#!/usr/bin/env bash
# Single-prompt streaming generation: bash inference.sh [--config_path PATH] [key=value ...]
# Default config: configs/inference.yaml. NPROC=N shards the prompts over N processes (one GPU each).
exec bash "$(dirname "${BASH_SOURCE[0]}")/scripts/launch.sh" scripts/inference.py "$@"
