#!/usr/bin/env bash
# Stage 1: Self-Forcing initialisation with the memory active.
# usage: bash train_init.sh [--config_path PATH] [--logdir DIR] [--resume] [key=value ...]
# Default config: configs/train_init.yaml; default logdir: logs/train_init. A logdir holding this run's
# checkpoints is resumed automatically. NPROC=N runs N processes (one GPU each) through torchrun with FSDP.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
PYTHON="$ROOT/.venv/bin/python"
[ -x "$PYTHON" ] || PYTHON=python
ARGS=(--stage init)
case " $* " in *" --logdir"*) ;; *) ARGS+=(--logdir logs/train_init) ;; esac
if [ "${NPROC:-1}" -gt 1 ]; then
    exec "$PYTHON" -m torch.distributed.run --standalone --nproc_per_node "$NPROC" "$ROOT/scripts/train.py" "${ARGS[@]}" "$@"
fi
exec "$PYTHON" "$ROOT/scripts/train.py" "${ARGS[@]}" "$@"
