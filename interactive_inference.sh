#!/usr/bin/env bash
# Interactive (prompt-switching) generation: bash interactive_inference.sh [--config_path PATH] [key=value ...]
# Default config: configs/interactive_inference.yaml. NPROC=N shards the prompts over N processes (one GPU each).
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
PYTHON="$ROOT/.venv/bin/python"
[ -x "$PYTHON" ] || PYTHON=python
if [ "${NPROC:-1}" -gt 1 ]; then
    exec "$PYTHON" -m torch.distributed.run --standalone --nproc_per_node "$NPROC" "$ROOT/scripts/inference.py" --interactive "$@"
fi
exec "$PYTHON" "$ROOT/scripts/inference.py" --interactive "$@"
