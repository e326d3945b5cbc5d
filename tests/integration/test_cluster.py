"""Clusters on one machine (loopback, gloo): two launchers as two nodes, checkpoints moving between 1 and 2 ranks,
stop signals through torchrun, the launch variables' one-line errors and the logdir lock."""

import json
import os
import signal
import socket
import subprocess
import time
from pathlib import Path

import pytest

from utils.lock import FolderLock

from .test_train import ROOT, TINY, _env, metrics, read_checkpoint, train

pytestmark = pytest.mark.usefixtures("one_thread")

PREEMPTED = 75  # utils.signals.PREEMPTED, the documented exit code of a stopped run
QUIET = ["vis_interval=0", "save_interval=100"]  # checkpoints only where a run stops or ends


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _launch(stage: str, logdir: Path, log: Path, *overrides: str, **env: str) -> subprocess.Popen:
    """``bash train_<stage>.sh`` in the background; its pid is torchrun's agent (the wrappers exec)."""
    command = ["bash", str(ROOT / f"train_{stage}.sh"), "--config_path", str(TINY / f"train_{stage}.yaml"),
               "--logdir", str(logdir), *QUIET, *overrides]  # fmt: skip
    with log.open("w") as out:
        return subprocess.Popen(command, cwd=ROOT, env=_env(**env), stdout=out, stderr=subprocess.STDOUT)


def _wait_for_step(logdir: Path, step: int, procs: list[subprocess.Popen], timeout: float = 240) -> None:
    deadline = time.monotonic() + timeout
    path = logdir / "metrics.jsonl"
    while not (path.exists() and len(path.read_text().splitlines()) >= step):
        assert all(p.poll() is None for p in procs), "a launcher ended before reaching the step"
        assert time.monotonic() < deadline, f"step {step} never came"
        time.sleep(0.1)


def _stopped_at(logdir: Path) -> int:
    """The step the stopped run checkpointed: its last metrics line, which must have a checkpoint."""
    step = metrics(logdir)[-1]["step"]
    assert (logdir / f"checkpoint_{step:06d}" / "meta.pt").is_file()
    return step


def test_stage1_moves_from_one_process_to_two_nodes_stopped_by_sigterm_and_back(stage1_straight, tmp_path):
    """Two launchers (NNODES=2, NPROC=1) continue a one-process checkpoint with the one-process losses; SIGTERM to
    node 0's launcher alone stops both nodes at one step with a checkpoint and exit code 75; one process resumes
    it. Every step's losses are the uninterrupted one-process run's (4 steps, tests/integration/conftest.py), bit
    for bit."""
    straight = metrics(stage1_straight)
    run = tmp_path / "run"
    assert train("init", run, *QUIET, "max_iters=1") == straight[:1]
    port = str(_free_port())
    nodes = [_launch("init", run, tmp_path / f"node{rank}.log", "max_iters=4", NNODES="2", NODE_RANK=str(rank),
                     NPROC="1", MASTER_ADDR="127.0.0.1", MASTER_PORT=port) for rank in (0, 1)]  # fmt: skip
    try:
        _wait_for_step(run, 2, nodes)
        nodes[0].send_signal(signal.SIGTERM)
        codes = [p.wait(timeout=240) for p in nodes]
    finally:
        for p in nodes:
            if p.poll() is None:
                p.kill()
    logs = [(tmp_path / f"node{rank}.log").read_text() for rank in (0, 1)]
    assert codes == [PREEMPTED, PREEMPTED], logs[0][-3000:] + logs[1][-3000:]
    step = _stopped_at(run)
    assert 2 <= step < 4
    assert f"stopped by SIGTERM at step {step}: {run / f'checkpoint_{step:06d}'}" in logs[0]
    assert sorted(p.name for p in (run / f"checkpoint_{step:06d}").iterdir()) == [
        ".metadata", "__0_0.distcp", "__1_0.distcp", "meta.pt"]  # fmt: skip
    assert metrics(run) == straight[:step]  # the two nodes' steps are the one process's
    assert train("init", run, *QUIET, "max_iters=4") == straight


def test_stage2_rollouts_move_from_one_rank_to_two_stopped_by_sigusr1_and_back(stage2_straight, tmp_path):
    """Stage 2's rollouts (KV caches included) are saved by global micro-batch: 1 rank x 2 accumulation steps hands
    them to 2 ranks x 1 and back; SIGUSR1 (SLURM's early warning) to torchrun's agent stops the ranks with a
    checkpoint. The losses are the uninterrupted run's, bit for bit."""
    straight = metrics(stage2_straight)  # 6 steps
    run = tmp_path / "run"
    train("long", run, *QUIET, "max_iters=2")
    agent = _launch("long", run, tmp_path / "two.log", "max_iters=6", NPROC="2")
    try:
        _wait_for_step(run, 3, [agent])
        agent.send_signal(signal.SIGUSR1)
        code = agent.wait(timeout=240)
    finally:
        if agent.poll() is None:
            agent.kill()
    assert code == PREEMPTED, (tmp_path / "two.log").read_text()[-3000:]
    step = _stopped_at(run)
    folder = run / f"checkpoint_{step:06d}"
    assert {"__0_0.distcp", "__1_0.distcp", "source_0000.pt", "source_0001.pt"} <= {p.name for p in folder.iterdir()}
    assert train("long", run, *QUIET, "max_iters=6") == straight
    assert read_checkpoint(run / "checkpoint_000006")["generator"]["model"].keys() == read_checkpoint(
        stage2_straight / "checkpoint_000006")["generator"]["model"].keys()  # fmt: skip


def _bash(script: str, *args: str, **env: str) -> subprocess.CompletedProcess:
    return subprocess.run(["bash", str(ROOT / script), *args], cwd=ROOT, env=_env(**env), capture_output=True,
                          text=True, timeout=120)  # fmt: skip


@pytest.mark.parametrize(
    ("env", "line"),
    [
        ({"NPROC": "abc"}, "error: NPROC=abc must be a whole number >= 1 (processes per node, one GPU each)"),
        ({"NPROC": "1.5"}, "error: NPROC=1.5 must be a whole number"),
        ({"NPROC": "0"}, "error: NPROC=0 must be a whole number"),
        ({"NPROC": "-2"}, "error: NPROC=-2 must be a whole number"),
        ({"NNODES": "2"}, "error: MASTER_ADDR is not set: with NNODES=2 every node needs the address of node 0"),
        ({"NNODES": "2", "NODE_RANK": "2", "MASTER_ADDR": "127.0.0.1"}, "error: NODE_RANK=2 is outside NNODES=2"),
        ({"SLURM_JOB_ID": "7", "SLURM_NNODES": "2"}, "error: this is the batch shell of a 2-node SLURM job"),
    ],
)  # fmt: skip
def test_bad_launch_variables_are_one_line_and_exit_2(tmp_path, env, line):
    result = _bash("train_init.sh", "--config_path", str(TINY / "train_init.yaml"), "--logdir", str(tmp_path / "run"),
                   **env)  # fmt: skip
    assert result.returncode == 2
    assert len(result.stderr.strip().splitlines()) == 1 and result.stderr.startswith(line), result.stderr
    assert not (tmp_path / "run").exists()


def test_a_second_run_into_a_held_logdir_is_refused_naming_the_holder(tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    (run / "metrics.jsonl").write_text(json.dumps({"step": 1, "critic_loss": 1.0}) + "\n")
    holder = FolderLock(run)
    assert holder.acquire() is None
    try:
        result = _bash("train_init.sh", "--config_path", str(TINY / "train_init.yaml"), "--logdir", str(run))
    finally:
        holder.release()
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1
    assert lines[0].startswith(f"error: logdir {run} is in use by another run (pid {os.getpid()} on ")
    assert sorted(p.name for p in run.iterdir()) == [".lock", "metrics.jsonl"]
    assert metrics(run) == [{"step": 1, "critic_loss": 1.0}]
