"""Where a launcher sits in a job: one process, or torchrun on one node or several.

By hand every node runs the same command with ``NNODES``, its own ``NODE_RANK`` (0 .. NNODES-1),
``MASTER_ADDR`` (the address of node 0) and optionally ``MASTER_PORT`` (torchrun's default, 29500);
``NPROC`` is the number of processes (GPUs) per node. Under ``srun`` the node count, node rank and
address come from SLURM (``SLURM_STEP_NUM_NODES``, ``SLURM_NODEID``, the first host of the step's
node list) and the default port is ``10000 + SLURM_JOB_ID % 20000``, so jobs sharing a first node do
not collide. Every missing or inconsistent value is one :class:`~utils.errors.ConfigError`.
"""

from __future__ import annotations

import re
import shutil
import subprocess
from collections.abc import Mapping
from dataclasses import dataclass

from utils.errors import ConfigError

DEFAULT_SHUTDOWN_TIMEOUT = 300  # seconds torchrun waits for workers to checkpoint after a stop signal
HANDLED_SIGNALS = ("SIGTERM", "SIGINT", "SIGHUP", "SIGQUIT", "SIGUSR1")
_BRACKETS = re.compile(r"\[([^\]]*)\]")


@dataclass(frozen=True)
class Launch:
    """Processes per node, the node count and this node's rank, the rendezvous address and port."""

    nproc: int
    nnodes: int
    node_rank: int
    master_addr: str | None
    master_port: int | None
    shutdown_timeout: int

    def torchrun_args(self) -> list[str] | None:
        """torchrun's options for this node, or ``None`` when the job is a single process."""
        if self.nproc == 1 and self.nnodes == 1:
            return None
        common = ["--nproc_per_node", str(self.nproc), "--signals_to_handle", ",".join(HANDLED_SIGNALS),
                  "--shutdown_timeout", str(self.shutdown_timeout)]  # fmt: skip
        if self.nnodes == 1:
            return ["--standalone", *common]
        port = [] if self.master_port is None else ["--master_port", str(self.master_port)]
        return ["--nnodes", str(self.nnodes), "--node_rank", str(self.node_rank), "--master_addr",
                str(self.master_addr), *port, *common]  # fmt: skip


def _count(env: Mapping[str, str], name: str, default: int, minimum: int, what: str) -> int:
    value = env.get(name, "").strip() or str(default)
    if not re.fullmatch(r"[0-9]+", value) or int(value) < minimum:
        raise ConfigError(f"{name}={value} must be a whole number >= {minimum} ({what}), e.g. {name}={max(minimum, 2)}")
    return int(value)


def first_host(nodelist: str) -> str:
    """The first host of a SLURM node list (``node[01-04,07],gpu9`` -> ``node01``), with ``scontrol`` if present."""
    if shutil.which("scontrol"):
        out = subprocess.run(["scontrol", "show", "hostnames", nodelist], capture_output=True, text=True, check=False)
        if out.returncode == 0 and out.stdout.split():
            return out.stdout.split()[0]
    depth, end = 0, len(nodelist)
    for i, char in enumerate(nodelist):
        depth += {"[": 1, "]": -1}.get(char, 0)
        if char == "," and depth == 0:
            end = i
            break
    first = nodelist[:end].strip()
    host = _BRACKETS.sub(lambda m: re.split(r"[-,]", m.group(1))[0], first)
    if not first or "[" in host or "]" in host:
        raise ConfigError(f"SLURM node list {nodelist!r} cannot be read; set MASTER_ADDR to the first node's address")
    return host


def _slurm(env: Mapping[str, str]) -> tuple[int, int, str | None, int] | None:
    """(nodes, node rank, first host, default port) of the ``srun`` step this runs in; None outside SLURM."""
    if "SLURM_JOB_ID" not in env:
        return None
    job = _count(env, "SLURM_JOB_ID", 0, 0, "SLURM's job id")
    if "SLURM_STEP_NUM_NODES" not in env:  # the batch shell (or salloc) itself, not a task of srun
        nodes = _count(env, "SLURM_NNODES", 1, 1, "SLURM's node count")
        if nodes > 1:
            raise ConfigError(
                f"this is the batch shell of a {nodes}-node SLURM job: start one launcher per node, "
                "srun --ntasks-per-node=1 bash train_init.sh ..."
            )
        return 1, 0, None, 10000 + job % 20000
    nodes = _count(env, "SLURM_STEP_NUM_NODES", 1, 1, "SLURM's node count")
    tasks = _count(env, "SLURM_STEP_NUM_TASKS", nodes, 1, "SLURM's task count")
    if tasks != nodes:
        raise ConfigError(
            f"srun started {tasks} tasks on {nodes} node(s): start exactly one launcher per node "
            "(srun --ntasks-per-node=1 ...); NPROC sets the processes per node"
        )
    rank = _count(env, "SLURM_NODEID", 0, 0, "SLURM's node id")
    nodelist = env.get("SLURM_STEP_NODELIST") or env.get("SLURM_JOB_NODELIST", "")
    return nodes, rank, first_host(nodelist), 10000 + job % 20000


def _agree(env: Mapping[str, str], name: str, value: int) -> None:
    given = env.get(name, "").strip()
    if given and given != str(value):
        raise ConfigError(f"{name}={given} but SLURM gives {value} for this job step; unset {name} under SLURM (the "
                          "launcher reads SLURM's node count and node id)")


def launch_from_env(env: Mapping[str, str]) -> Launch:
    """The launch described by ``env`` (see the module docstring); checked before anything starts."""
    nproc = _count(env, "NPROC", 1, 1, "processes per node, one GPU each")
    timeout = _count(env, "SHUTDOWN_TIMEOUT", DEFAULT_SHUTDOWN_TIMEOUT, 0, "seconds to checkpoint after a stop signal")
    slurm = _slurm(env)
    if slurm is not None:
        nnodes, node_rank, host, default_port = slurm
        _agree(env, "NNODES", nnodes)
        _agree(env, "NODE_RANK", node_rank)
    else:
        nnodes = _count(env, "NNODES", 1, 1, "the number of nodes")
        node_rank = _count(env, "NODE_RANK", 0, 0, "this node's number, 0 .. NNODES-1")
        host, default_port = None, None
    if node_rank >= nnodes:
        raise ConfigError(f"NODE_RANK={node_rank} is outside NNODES={nnodes}: number the nodes 0..{nnodes - 1}")
    addr = env.get("MASTER_ADDR", "").strip() or host
    if nnodes > 1 and not addr:
        raise ConfigError(
            f"MASTER_ADDR is not set: with NNODES={nnodes} every node needs the address of node 0 (NODE_RANK=0), "
            "e.g. MASTER_ADDR=node01"
        )
    port = default_port
    if env.get("MASTER_PORT", "").strip():
        port = _count(env, "MASTER_PORT", 0, 1, "a TCP port on node 0")
        if port > 65535:
            raise ConfigError(f"MASTER_PORT={port} is not a TCP port; use one in 1..65535 that is free on node 0")
    return Launch(nproc, nnodes, node_rank, addr, port, timeout)
