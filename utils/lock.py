"""One run per folder: an exclusive ``fcntl.flock`` on ``folder/.lock``, held until released or the process ends.

The lock is the operating system's, not the file's presence: it is released however its holder ends
(a SIGKILL included), so a lock left by a dead run is simply taken over. The file's text (pid, host,
start time) only names the holder in the message of a refused run. On a filesystem without flock
support the folder is used unlocked, with a warning.
"""

from __future__ import annotations

import errno
import fcntl
import logging
import os
import socket
import time
from pathlib import Path

log = logging.getLogger(__name__)

UNSUPPORTED = {errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOSYS, errno.EINVAL}


class FolderLock:
    """The lock of one folder; :meth:`acquire` returns ``None`` once held, else the holder's description."""

    def __init__(self, folder: str | os.PathLike, name: str = ".lock"):
        self.path = Path(folder) / name
        self._fd: int | None = None

    def acquire(self) -> str | None:
        """Take the lock without waiting; ``None`` on success, else who holds it (``pid N on HOST since T``)."""
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o666)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 4096, 0).decode("utf-8", "replace").strip()
            os.close(fd)
            return holder or "a process that is still starting"
        except OSError as err:
            if err.errno not in UNSUPPORTED:
                os.close(fd)
                raise
            log.warning("%s: this filesystem does not support flock (%s); the folder is not locked", self.path, err)
        stamp = time.strftime("%Y-%m-%d %H:%M:%S")
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"pid {os.getpid()} on {socket.gethostname()} since {stamp}\n".encode(), 0)
        os.fsync(fd)
        self._fd = fd
        return None

    def release(self) -> None:
        """Give the lock up (closing the file releases it); the file stays, its text no longer matters."""
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None
