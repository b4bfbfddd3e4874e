"""Graceful stop: on SIGTERM or SIGUSR1, checkpoint at the next meta-step boundary and exit asking for a requeue.

SLURM sends SIGUSR1 ahead of the time limit (`#SBATCH --signal=USR1@120`) and SIGTERM on preemption or `scancel`;
torchrun's agent forwards SIGTERM to its workers. The handler only records the signal. At each step boundary the
ranks vote (`any_rank`), because one rank may see the signal a step later than another, and every rank must save the
same step. After the checkpoint the process exits with REQUEUE_EXIT_CODE, and the main process leaves a marker in the
run directory: `accelerate launch` reports any failing worker as exit status 1, so the sbatch scripts look for the
marker to decide whether to `scontrol requeue` the job.
"""

from __future__ import annotations

import json
import signal
import sys
import weakref
from pathlib import Path
from typing import Callable, NoReturn

REQUEUE_EXIT_CODE = 75  # EX_TEMPFAIL in sysexits.h: a temporary failure, try again later
PREEMPTED_MARKER = "PREEMPTED"  # in the run directory while the newest checkpoint is a stop-on-signal one
STOP_SIGNALS = (signal.SIGTERM, signal.SIGUSR1)


class GracefulStop:
    """Records SIGTERM/SIGUSR1; `requested()` is the collective question 'did any rank get one?'."""

    def __init__(self, any_rank: Callable[[bool], bool]):
        self._any_rank = any_rank
        self._signals: list[str] = []  # the handler appends here; it holds no reference to self
        record = self._signals.append
        previous = {signum: signal.signal(signum, lambda signum, _frame: record(signal.Signals(signum).name))
                    for signum in STOP_SIGNALS}
        # Handlers are process-wide: give the previous ones back when the loop is done (close), or at the latest
        # when this object is collected (e.g. train() raised inside a test process).
        self.close = weakref.finalize(self, _restore, previous)

    @property
    def received(self) -> str | None:
        return self._signals[0] if self._signals else None

    def requested(self) -> bool:
        """Call at a step boundary on every rank (it is a collective)."""
        return self._any_rank(self.received is not None)

    @property
    def reason(self) -> str:
        return self.received or "a stop signal on another rank"

    def exit(self, out_dir: str | Path, step: int, is_main: bool) -> NoReturn:
        """After the checkpoint of `step` is written: leave the marker (main process) and exit for a requeue."""
        if is_main:
            marker = {"step": step, "signal": self.reason, "exit_code": REQUEUE_EXIT_CODE}
            (Path(out_dir) / PREEMPTED_MARKER).write_text(json.dumps(marker) + "\n")
        print(f"stopping at step {step} on {self.reason}: checkpoint written, exiting with {REQUEUE_EXIT_CODE} "
              f"so that the job can be requeued and resumed with --resume", file=sys.stderr, flush=True)
        sys.exit(REQUEUE_EXIT_CODE)


def _restore(handlers: dict) -> None:
    for signum, handler in handlers.items():
        signal.signal(signum, handler)


def clear_preempted_marker(out_dir: str | Path) -> None:
    """A resumed run is no longer a stopped one."""
    (Path(out_dir) / PREEMPTED_MARKER).unlink(missing_ok=True)
