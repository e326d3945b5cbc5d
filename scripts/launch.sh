#!/usr/bin/env bash
# Run a Python entry point of this repository with its virtualenv (when present).
# usage: scripts/launch.sh SCRIPT [args...]   (SCRIPT relative to the repository root)
# One process by default; NPROC=N runs N processes per node (one GPU each) through torchrun, and
# NNODES, NODE_RANK, MASTER_ADDR, MASTER_PORT (or SLURM's variables under srun) spread them over nodes
# (scripts/launch.py checks them; docs/clusters.md).
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
PYTHON="$ROOT/.venv/bin/python"
[ -x "$PYTHON" ] || PYTHON=python
# this checkout's packages, whichever copy of them the interpreter has installed
export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}"
SCRIPT="$ROOT/$1"
shift
exec "$PYTHON" "$ROOT/scripts/launch.py" "$SCRIPT" "$@"
