"""A run's hold on its logdir: created, locked for the whole run, and cleaned of what killed saves left.

One run per logdir: rank 0 holds ``fcntl.flock`` on ``logdir/.lock`` (utils.lock) until the run ends, so a
second run into the same logdir (a job submitted twice) is refused in one line naming the holder, and a
lock left by a dead run is taken over. Only rank 0 locks: the ranks of one job are one run, and on a
shared filesystem every rank locking would refuse its own job's other ranks. Once locked, the temporary
files and folders of interrupted saves (``.*.tmp``) are this run's to delete. Every rank must see the
logdir (a filesystem shared by all nodes), since each writes its own checkpoint shards there.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator

from utils.checkpoint import remove_leftovers
from utils.distributed import any_rank, broadcast_object
from utils.errors import ConfigError
from utils.lock import FolderLock

from .plan import TrainPlan

log = logging.getLogger(__name__)


def _take(plan: TrainPlan, lock: FolderLock) -> str | None:
    """Rank 0: create and lock the logdir and remove leftovers; the reason it cannot, else None."""
    try:
        plan.logdir.mkdir(parents=True, exist_ok=True)
        holder = lock.acquire()
    except OSError as err:
        return f"--logdir {plan.logdir} cannot be written ({err.strerror}); choose a folder you can write to"
    if holder is not None:
        return (f"logdir {plan.logdir} is in use by another run ({holder}); wait for it to end or stop it, or "
                "choose another --logdir")  # fmt: skip
    count, size = remove_leftovers(plan.logdir)
    if count:
        log.info("removed %d leftover(s) of interrupted saves from %s (%.1f MB)", count, plan.logdir, size / 1e6)
    return None


@contextlib.contextmanager
def hold_logdir(plan: TrainPlan) -> Iterator[None]:
    """Hold the run's logdir for the duration of the block (every rank enters; rank 0 locks)."""
    lock = FolderLock(plan.logdir)
    problem = broadcast_object(_take(plan, lock) if plan.rank == 0 else None)
    if problem is None and any_rank(int(not plan.logdir.is_dir()), plan.device):
        problem = (f"logdir {plan.logdir} is not visible on every node: every rank writes its checkpoint shards there, "
                   "so put it on a filesystem all nodes share")  # fmt: skip
    if problem is not None:
        lock.release()
        raise ConfigError(problem)
    try:
        yield
    finally:
        lock.release()
