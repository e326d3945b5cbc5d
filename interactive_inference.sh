#!/usr/bin/env bash
# Interactive (prompt-switching) generation: bash interactive_inference.sh [--config_path PATH] [key=value ...]
# Default config: configs/interactive_inference.yaml. NPROC=N shards the prompts over N processes (one GPU each).
exec bash "$(dirname "${BASH_SOURCE[0]}")/scripts/launch.sh" scripts/inference.py --interactive "$@"
