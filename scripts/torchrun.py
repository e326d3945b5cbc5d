"""``torchrun`` for this repository's entry points, without the launcher's traceback on a failed child.

Every rank of a script that stops on bad input prints one line ``error: ...`` and exits with 2; plain
torchrun then adds its own Python traceback and exits with 1. This launcher takes torchrun's arguments
unchanged, and when a child fails exits with that child's code after one summary line (a crashing child
has printed its own traceback above it). A stopped run exits quietly with the children's code 75
(utils.signals.PREEMPTED: a checkpoint was written, rerun to continue), also when the stop signal reached
this agent, which forwards it to the workers and waits ``--shutdown_timeout`` seconds for them.

usage: python scripts/torchrun.py [torchrun options] SCRIPT [args...]
"""

from __future__ import annotations

import logging
import sys

from torch.distributed.elastic.multiprocessing import SignalException
from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
from torch.distributed.run import get_args_parser, run

from utils.signals import PREEMPTED, STOP_SIGNALS

BAD_INPUT = 2  # the exit code of utils.config.run_cli for a MemFlowError
QUIET = (BAD_INPUT, PREEMPTED)


def main(argv: list[str]) -> int:
    args = get_args_parser().parse_args(argv)
    logging.getLogger("torch.distributed.elastic.multiprocessing.api").setLevel(logging.CRITICAL)
    try:
        run(args)
    except ChildFailedError as err:
        rank, failure = err.get_first_failure()
        code = failure.exitcode if failure.exitcode > 0 else 1
        if code not in QUIET:
            print(f"error: rank {rank} of {args.training_script} failed with exit code {failure.exitcode} "
                  "(its output is above)", file=sys.stderr)  # fmt: skip
        return code
    except SignalException as err:
        return PREEMPTED if err.sigval in STOP_SIGNALS else 128 + int(err.sigval)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
