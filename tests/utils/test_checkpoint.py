import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from utils.checkpoint import CheckpointManager, load_checkpoint, remove_leftovers, save_checkpoint
from utils.errors import ConfigError, WeightsError

ROOT = Path(__file__).resolve().parents[2]

# Saves a 64 MB tensor followed by an object whose pickling announces itself and then hangs, so
# the parent can SIGKILL the writer while it is certainly inside torch.save.
_KILLED_WRITER = """
import sys, time
from pathlib import Path
import torch
from utils.checkpoint import save_checkpoint

class Hang:
    def __reduce__(self):
        Path(sys.argv[2]).write_text("saving")
        time.sleep(600)

save_checkpoint({"step": 2, "weights": torch.ones(16 * 1024 * 1024), "hang": Hang()}, sys.argv[1])
"""


def test_sigkill_mid_save_leaves_previous_checkpoint_intact(tmp_path):
    target = tmp_path / "checkpoint_000001.pt"
    save_checkpoint({"step": 1, "weights": torch.arange(4.0)}, target)
    marker = tmp_path / "started"
    proc = subprocess.Popen([sys.executable, "-c", _KILLED_WRITER, str(target), str(marker)], cwd=ROOT)
    try:
        deadline = time.monotonic() + 60
        while not marker.exists():
            assert proc.poll() is None, "the writer exited before reaching the save"
            assert time.monotonic() < deadline, "the writer never started saving"
            time.sleep(0.05)
        assert any(p.name.endswith(".tmp") for p in tmp_path.iterdir())  # the save is under way
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
    state = load_checkpoint(target)
    assert state["step"] == 1 and torch.equal(state["weights"], torch.arange(4.0))


def test_truncated_checkpoint_raises_weights_error(tmp_path):
    path = save_checkpoint({"w": torch.randn(1000)}, tmp_path / "c.pt")
    path.write_bytes(path.read_bytes()[:200])
    with pytest.raises(WeightsError, match=r"c\.pt"):
        load_checkpoint(path)
    with pytest.raises(WeightsError, match="does not exist"):
        load_checkpoint(tmp_path / "missing.pt")


def test_folders_commit_by_rename_rotate_and_never_overwrite(tmp_path):
    manager = CheckpointManager(tmp_path / "run", max_checkpoints=2)
    assert manager.latest() is None
    manager.logdir.mkdir()
    save_checkpoint({"step": 50}, manager.logdir / "checkpoint_000050.pt")  # an earlier version's single file
    (manager.logdir / "rank_000050_000.pt").write_bytes(b"its per-rank companion")
    for step in (100, 200, 300):
        tmp = manager.begin(step)
        (tmp / "part").write_text(str(step))
        assert manager.latest() != manager.path(step)  # invisible until committed
        manager.commit(step)
    assert [p.name for _, p in manager.checkpoints()] == ["checkpoint_000200", "checkpoint_000300"]
    assert (manager.latest() / "part").read_text() == "300"
    assert sorted(p.name for p in manager.logdir.iterdir()) == ["checkpoint_000200", "checkpoint_000300"]
    with pytest.raises(ConfigError, match="already exists"):
        CheckpointManager(tmp_path / "run", max_checkpoints=2).begin(300)
    with pytest.raises(ConfigError, match="max_checkpoints"):
        CheckpointManager(tmp_path, max_checkpoints=0)


def test_a_killed_save_leaves_only_temporaries_which_are_removed(tmp_path):
    manager = CheckpointManager(tmp_path, max_checkpoints=3)
    manager.begin(1)
    manager.commit(1)
    (manager.begin(2) / "__0_0.distcp").write_bytes(b"x" * 1000)  # killed before its commit
    (tmp_path / ".base.pt.abc123.tmp").write_bytes(b"y" * 10)  # an atomic write killed mid-file
    (tmp_path / "samples").mkdir()
    (tmp_path / "samples" / ".sample.json.q.tmp").write_bytes(b"z")
    assert [s for s, _ in manager.checkpoints()] == [1]
    assert remove_leftovers(tmp_path) == (3, 1011)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["checkpoint_000001", "samples"]
    assert remove_leftovers(tmp_path) == (0, 0)
