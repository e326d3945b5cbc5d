"""Atomic checkpoint I/O, rotation and RNG state capture.

A checkpoint is written to a temporary file in the destination folder and moved into place
with ``os.replace``, so a crash or SIGKILL mid-save leaves the previous checkpoint untouched.
Checkpoints are read with ``torch.load(..., weights_only=True)``: they may only hold tensors,
dicts, lists, tuples, numbers, strings and None, which is why RNG states are stored as tensors.
"""

from __future__ import annotations

import os
import random
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch

from utils.atomic import atomic_path
from utils.errors import ConfigError, WeightsError

CHECKPOINT_PATTERN = re.compile(r"^checkpoint_(\d{6,})\.pt$")


def save_checkpoint(state: Mapping[str, Any], path: str | os.PathLike) -> Path:
    """Write ``state`` to ``path`` atomically (temp file in the same folder, fsync, os.replace)."""
    path = Path(path)
    with atomic_path(path) as tmp:
        torch.save(dict(state), tmp)
    return path


def load_checkpoint(path: str | os.PathLike, map_location: str | torch.device = "cpu") -> dict:
    """Read a checkpoint safely (``weights_only=True``); a damaged file raises ``WeightsError``."""
    path = Path(path)
    if not path.is_file():
        raise WeightsError(f"checkpoint {path} does not exist")
    try:
        return torch.load(path, map_location=map_location, weights_only=True)
    except Exception as err:
        raise WeightsError(
            f"checkpoint {path} cannot be read ({type(err).__name__}): it is truncated or not a weights-only checkpoint"
        ) from err


class CheckpointManager:
    """``checkpoint_{step:06d}.pt`` files in ``logdir``, keeping the newest ``max_checkpoints``.

    Older checkpoints are deleted only after the new one is completely written. Saving never
    replaces an existing file: a step that already has a checkpoint (e.g. from another run in
    the same logdir) raises ``ConfigError``.
    """

    def __init__(self, logdir: str | os.PathLike, max_checkpoints: int = 3):
        if max_checkpoints < 1:
            raise ConfigError(f"max_checkpoints={max_checkpoints}: keep at least 1 checkpoint")
        self.logdir = Path(logdir)
        self.max_checkpoints = max_checkpoints

    def path(self, step: int) -> Path:
        return self.logdir / f"checkpoint_{step:06d}.pt"

    def checkpoints(self) -> list[tuple[int, Path]]:
        """(step, path) of every complete checkpoint, oldest first."""
        if not self.logdir.is_dir():
            return []
        found = []
        for p in self.logdir.iterdir():
            match = CHECKPOINT_PATTERN.match(p.name)
            if match and p.is_file():
                found.append((int(match.group(1)), p))
        return sorted(found)

    def latest(self) -> Path | None:
        found = self.checkpoints()
        return found[-1][1] if found else None

    def save(self, state: Mapping[str, Any], step: int) -> Path:
        """Write the checkpoint of ``step``, then delete the oldest beyond ``max_checkpoints``."""
        target = self.path(step)
        if target.exists():
            raise ConfigError(
                f"{target} already exists (another run's checkpoint?): use a new logdir or resume from it"
            )
        save_checkpoint(state, target)
        for _, old in self.checkpoints()[: -self.max_checkpoints]:
            old.unlink()
        return target

    @staticmethod
    def load(path: str | os.PathLike, map_location: str | torch.device = "cpu") -> dict:
        return load_checkpoint(path, map_location)


def capture_rng_state() -> dict[str, Any]:
    """Torch CPU/CUDA, python ``random`` and numpy generator states, as weights-only-safe values."""
    version, internal, gauss = random.getstate()
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    state: dict[str, Any] = {
        "torch": torch.get_rng_state(),
        "python": {"version": version, "state": torch.tensor(internal, dtype=torch.int64), "gauss": gauss},
        "numpy": {
            "kind": kind,
            "keys": torch.from_numpy(keys.astype(np.int64)),
            "pos": int(pos),
            "has_gauss": int(has_gauss),
            "cached_gaussian": float(cached),
        },
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def restore_rng_state(state: Mapping[str, Any]) -> None:
    """Inverse of ``capture_rng_state``."""
    torch.set_rng_state(state["torch"])
    py = state["python"]
    random.setstate((py["version"], tuple(int(v) for v in py["state"].tolist()), py["gauss"]))
    npy = state["numpy"]
    keys = npy["keys"].numpy().astype(np.uint32)
    np.random.set_state((npy["kind"], keys, npy["pos"], npy["has_gauss"], npy["cached_gaussian"]))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
