#!/usr/bin/env bash
# Stage 2: streaming long tuning with prompt switches (LoRA).
# usage: bash train_long.sh [--config_path PATH] [--logdir DIR] [--resume] [key=value ...]
# Default config: configs/train_long.yaml; default logdir: logs/train_long. A logdir holding this run's
# checkpoints is resumed automatically. NPROC=N runs N processes (one GPU each) through torchrun with FSDP.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
PYTHON="$ROOT/.venv/bin/python"
[ -x "$PYTHON" ] || PYTHON=python
ARGS=(--stage long)
case " $* " in *" --logdir"*) ;; *) ARGS+=(--logdir logs/train_long) ;; esac
if [ "${NPROC:-1}" -gt 1 ]; then
    exec "$PYTHON" -m torch.distributed.run --standalone --nproc_per_node "$NPROC" "$ROOT/scripts/train.py" "${ARGS[@]}" "$@"
fi
exec "$PYTHON" "$ROOT/scripts/train.py" "${ARGS[@]}" "$@"
