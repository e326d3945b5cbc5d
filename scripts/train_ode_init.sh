#!/usr/bin/env bash
# ODE initialisation: teacher trajectories, then regression of the causal generator (writes base.pt).
# usage: bash scripts/train_ode_init.sh [--config_path PATH] [--logdir DIR] [--resume] [key=value ...]
# Default config: configs/ode_init.yaml; default logdir: logs/ode_init. A logdir holding this run's
# checkpoints is resumed automatically. NPROC=N runs N processes (one GPU each) through torchrun with FSDP.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
PYTHON="$ROOT/.venv/bin/python"
[ -x "$PYTHON" ] || PYTHON=python
ARGS=(--stage ode_init)
case " $* " in *" --logdir"*) ;; *) ARGS+=(--logdir logs/ode_init) ;; esac
if [ "${NPROC:-1}" -gt 1 ]; then
    exec "$PYTHON" -m torch.distributed.run --standalone --nproc_per_node "$NPROC" "$ROOT/scripts/train.py" "${ARGS[@]}" "$@"
fi
exec "$PYTHON" "$ROOT/scripts/train.py" "${ARGS[@]}" "$@"
