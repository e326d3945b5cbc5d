import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from utils.checkpoint import CheckpointManager, capture_rng_state, load_checkpoint, restore_rng_state, save_checkpoint
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


def test_rotation_latest_and_no_silent_overwrite(tmp_path):
    manager = CheckpointManager(tmp_path / "run", max_checkpoints=2)
    assert manager.latest() is None
    for step in (100, 200, 300, 400):
        manager.save({"step": step}, step)
    assert [p.name for _, p in manager.checkpoints()] == ["checkpoint_000300.pt", "checkpoint_000400.pt"]
    assert manager.latest() == tmp_path / "run" / "checkpoint_000400.pt"
    assert manager.load(manager.latest())["step"] == 400
    with pytest.raises(ConfigError, match="already exists"):
        CheckpointManager(tmp_path / "run", max_checkpoints=2).save({"step": 0}, 400)
    assert manager.load(manager.latest())["step"] == 400
    with pytest.raises(ConfigError, match="max_checkpoints"):
        CheckpointManager(tmp_path, max_checkpoints=0)


def _draws():
    return torch.rand(3), random.random(), np.random.rand(2), np.random.randn()


def test_rng_state_round_trip_through_a_weights_only_checkpoint(tmp_path):
    torch.manual_seed(1)
    random.seed(2)
    np.random.seed(3)
    np.random.randn()  # leave a cached gaussian in numpy's state
    save_checkpoint({"rng": capture_rng_state()}, tmp_path / "rng.pt")
    first = _draws()
    restore_rng_state(load_checkpoint(tmp_path / "rng.pt")["rng"])
    second = _draws()
    assert torch.equal(first[0], second[0])
    assert first[1] == second[1]
    assert np.array_equal(first[2], second[2]) and first[3] == second[3]
