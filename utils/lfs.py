"""Git LFS pointer files: what a clone without git-lfs holds in place of each large file."""

from __future__ import annotations

from pathlib import Path

from utils.errors import MemFlowError

POINTER_HEADER = b"version https://git-lfs.github.com/spec/"
MAX_POINTER_BYTES = 1024  # a pointer is three short lines; anything larger is the real file


def is_lfs_pointer(path: str | Path) -> bool:
    """Whether ``path`` is a small file that starts like a Git LFS pointer."""
    path = Path(path)
    try:
        if not path.is_file() or path.stat().st_size > MAX_POINTER_BYTES:
            return False
        with path.open("rb") as handle:
            return handle.read(len(POINTER_HEADER)) == POINTER_HEADER
    except OSError:
        return False


def check_not_lfs_pointer(path: str | Path, what: str) -> None:
    """A one-line error when ``path`` is a Git LFS pointer instead of the ``what`` it stands for."""
    if is_lfs_pointer(path):
        raise MemFlowError(
            f"{path} is a Git LFS pointer, not the {what} itself; fetch it with `git lfs install && git lfs pull` "
            "in the repository it came from, or download the file again"
        )
