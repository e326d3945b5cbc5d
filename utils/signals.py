"""Graceful stops: SIGTERM or SIGUSR1 asks a run to finish its step, checkpoint and exit with :data:`PREEMPTED`.

Schedulers send SIGTERM before they kill a job (SLURM also SIGUSR1 ahead of the time limit with
``--signal=USR1@SECONDS``). A handler only records the signal; the run asks :meth:`StopRequest.agreed`
at a step boundary, a collective, so every rank stops at the same step even when the signal reached
only some of them (one node, or torchrun's agent forwarding it at different moments).
"""

from __future__ import annotations

import signal
from pathlib import Path
from types import FrameType, TracebackType

import torch

from utils.distributed import any_rank

# sysexits.h EX_TEMPFAIL, "temporary failure, try again": the job was stopped from outside after writing a
# checkpoint; rerunning (requeueing) the same command continues it.
PREEMPTED = 75
STOP_SIGNALS = (signal.SIGTERM, signal.SIGUSR1)


class Preempted(Exception):
    """A run stopped on a stop signal after writing the checkpoint of ``step`` (``None``: nothing new to save)."""

    def __init__(self, signum: int, step: int, checkpoint: Path | None):
        super().__init__(f"stopped by {signal.Signals(signum).name} at step {step}")
        self.signum, self.step, self.checkpoint = signum, step, checkpoint


class StopRequest:
    """Records SIGTERM / SIGUSR1 while installed (a context manager; the previous handlers come back after)."""

    def __init__(self) -> None:
        self.signum: int | None = None
        self._previous: dict[int, object] = {}

    def __enter__(self) -> StopRequest:
        for sig in STOP_SIGNALS:
            self._previous[sig] = signal.signal(sig, self._record)
        return self

    def __exit__(self, kind: type | None, error: BaseException | None, trace: TracebackType | None) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous.clear()

    def _record(self, signum: int, frame: FrameType | None) -> None:
        self.signum = signum

    def agreed(self, device: torch.device) -> int | None:
        """The stop signal if any rank has received one, else ``None`` (a collective: call it on every rank)."""
        signum = any_rank(self.signum or 0, device)
        return signum or None
