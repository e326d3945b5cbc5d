"""Start an entry point as one process, or through torchrun on this node of a one- or multi-node job.

usage: python scripts/launch.py SCRIPT [args...]     (what scripts/launch.sh and the *.sh wrappers run)

The environment decides (utils/cluster.py): NPROC processes per node, NNODES nodes, this node's NODE_RANK,
MASTER_ADDR / MASTER_PORT of node 0, or SLURM's values under srun; SHUTDOWN_TIMEOUT is how long torchrun
lets its workers checkpoint after a stop signal. A bad value is one line ``error: ...`` and exit code 2,
before anything starts. The chosen program replaces this process (``os.execv``), so signals reach it.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

from utils.cluster import launch_from_env
from utils.config import run_cli
from utils.errors import ConfigError

TORCHRUN = Path(__file__).resolve().with_name("torchrun.py")


def main(argv: list[str]) -> int:
    if not argv:
        raise ConfigError("usage: python scripts/launch.py SCRIPT [args...]")
    args = launch_from_env(os.environ).torchrun_args()
    command = [sys.executable, *([] if args is None else [str(TORCHRUN), *args]), *argv]
    os.execv(sys.executable, command)
    return 0  # not reached: execv replaces the process


if __name__ == "__main__":
    run_cli(main)
