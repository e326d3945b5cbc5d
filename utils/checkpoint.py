"""Atomic checkpoint I/O and the checkpoints of a logdir.

A single file is written to a temporary file in the destination folder and moved into place with
``os.replace``, so a crash or SIGKILL mid-save leaves the previous file untouched. Files are read with
``torch.load(..., weights_only=True)``: they may only hold tensors, dicts, lists, tuples, numbers,
strings and None.

A logdir's checkpoints are folders ``checkpoint_{step:06d}/``, each written under the temporary name
``.checkpoint_{step:06d}.tmp`` and renamed once complete, so a folder with the final name is always
whole; earlier versions wrote single files ``checkpoint_{step:06d}.pt`` (with per-rank companions
``rank_{step:06d}_{rank:03d}.pt``), which are still listed, read and rotated. Everything an interrupted
save leaves behind is named ``.*.tmp`` (:func:`remove_leftovers`).
"""

from __future__ import annotations

import os
import re
import shutil
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from utils.atomic import atomic_path, fsync_dir
from utils.errors import ConfigError, WeightsError

CHECKPOINT_PATTERN = re.compile(r"^checkpoint_(\d{6,})(\.pt)?$")
LEFTOVER_GLOB = ".*.tmp"


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


def _size(path: Path) -> int:
    if path.is_dir() and not path.is_symlink():
        return sum(p.stat().st_size for p in path.rglob("*") if p.is_file() and not p.is_symlink())
    return path.lstat().st_size


def _delete(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        path.unlink(missing_ok=True)


def remove_leftovers(folder: str | os.PathLike) -> tuple[int, int]:
    """Delete what interrupted writes left under ``folder`` (files and folders named ``.*.tmp``).

    Only safe while no other process writes there (the caller holds the folder's lock). Returns the
    number of entries removed and their size in bytes.
    """
    count = size = 0
    for path in sorted(Path(folder).rglob(LEFTOVER_GLOB), key=lambda p: len(p.parts)):
        if not path.exists() and not path.is_symlink():
            continue  # inside a leftover folder removed just before
        size += _size(path)
        _delete(path)
        count += 1
    return count, size


class CheckpointManager:
    """The checkpoints of ``logdir``, keeping the newest ``max_checkpoints``.

    :meth:`begin` gives an empty temporary folder for a step, :meth:`commit` renames it into place (the
    commit point) and then deletes the oldest checkpoints. A step that already has a checkpoint (e.g.
    from another run in the same logdir) raises ``ConfigError``: nothing is ever overwritten.
    """

    def __init__(self, logdir: str | os.PathLike, max_checkpoints: int = 3):
        if max_checkpoints < 1:
            raise ConfigError(f"max_checkpoints={max_checkpoints}: keep at least 1 checkpoint")
        self.logdir = Path(logdir)
        self.max_checkpoints = max_checkpoints

    def path(self, step: int) -> Path:
        return self.logdir / f"checkpoint_{step:06d}"

    def temporary(self, step: int) -> Path:
        return self.logdir / f".checkpoint_{step:06d}.tmp"

    def checkpoints(self) -> list[tuple[int, Path]]:
        """(step, path) of every complete checkpoint (folders and earlier single files), oldest first."""
        if not self.logdir.is_dir():
            return []
        found = []
        for p in self.logdir.iterdir():
            match = CHECKPOINT_PATTERN.match(p.name)
            if match and (p.is_file() if match.group(2) else p.is_dir()):
                found.append((int(match.group(1)), p))
        return sorted(found)

    def latest(self) -> Path | None:
        found = self.checkpoints()
        return found[-1][1] if found else None

    def begin(self, step: int) -> Path:
        """An empty temporary folder for the checkpoint of ``step`` (a killed save's leftover is replaced)."""
        for existing in (self.path(step), self.path(step).with_suffix(".pt")):
            if existing.exists():
                raise ConfigError(
                    f"{existing} already exists (another run's checkpoint?): use a new logdir or resume from it"
                )
        tmp = self.temporary(step)
        _delete(tmp)
        tmp.mkdir(parents=True)
        return tmp

    def commit(self, step: int) -> Path:
        """Rename the complete temporary folder of ``step`` into place, then rotate."""
        tmp, target = self.temporary(step), self.path(step)
        fsync_dir(tmp)
        os.rename(tmp, target)
        fsync_dir(self.logdir)
        for old_step, old in self.checkpoints()[: -self.max_checkpoints]:
            self._remove(old_step, old)
        return target

    def _remove(self, step: int, path: Path) -> None:
        """Delete a checkpoint so that it is never seen half-deleted: a folder is renamed away first."""
        if path.is_dir():
            doomed = self.logdir / f".{path.name}.deleted.tmp"
            os.rename(path, doomed)
            shutil.rmtree(doomed, ignore_errors=True)
            return
        path.unlink()
        for companion in self.logdir.glob(f"rank_{step:06d}_*.pt"):
            companion.unlink(missing_ok=True)

    @staticmethod
    def load(path: str | os.PathLike, map_location: str | torch.device = "cpu") -> dict:
        return load_checkpoint(path, map_location)
