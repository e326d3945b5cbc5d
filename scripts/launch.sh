#!/usr/bin/env bash
# Run a Python entry point of this repository with its virtualenv (when present).
# usage: scripts/launch.sh SCRIPT [args...]   (SCRIPT relative to the repository root)
# NPROC=N launches N processes (one GPU each) through torchrun instead of one.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
PYTHON="$ROOT/.venv/bin/python"
[ -x "$PYTHON" ] || PYTHON=python
# this checkout's packages, whichever copy of them the interpreter has installed
export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}"
SCRIPT="$ROOT/$1"
shift
if [ "${NPROC:-1}" -gt 1 ]; then
    exec "$PYTHON" "$ROOT/scripts/torchrun.py" --standalone --nproc_per_node "$NPROC" "$SCRIPT" "$@"
fi
exec "$PYTHON" "$SCRIPT" "$@"
