"""Graceful stop: on SIGTERM, SIGUSR1 or a first Ctrl-C (SIGINT), checkpoint at the next meta-step boundary and exit
asking for a requeue; a second Ctrl-C stops at once.

SLURM sends SIGUSR1 ahead of the time limit (`#SBATCH --signal=USR1@120`) and SIGTERM on preemption or `scancel`;
torchrun's agent forwards SIGTERM to its workers. The handler only records the signal. At each step boundary the
ranks vote (`any_rank`), because one rank may see the signal a step later than another, and every rank must save the
same step. After the checkpoint the process exits with REQUEUE_EXIT_CODE, and the main process leaves a marker in the
run directory: `accelerate launch` reports any failing worker as exit status 1, so the sbatch scripts look for the
marker to decide whether to `scontrol requeue` the job.

A plain `accelerate launch` dies of SIGUSR1 (its launcher has no handler for it) and would leave its workers running
without a parent: every worker therefore asks the kernel for SIGTERM when its launcher dies (PR_SET_PDEATHSIG), and
then checkpoints and exits like on any stop signal.
"""

from __future__ import annotations

import ctypes
import json
import os
import signal
import sys
import weakref
from pathlib import Path
from typing import Callable, NoReturn

from dist_signmaml.artifacts import PREEMPTED_MARKER, atomic_write_text

REQUEUE_EXIT_CODE = 75  # EX_TEMPFAIL in sysexits.h: a temporary failure, try again later
STOP_SIGNALS = (signal.SIGTERM, signal.SIGUSR1, signal.SIGINT)
PR_SET_PDEATHSIG = 1  # linux/prctl.h


def stop_when_launcher_dies() -> bool:
    """Under a launcher (LOCAL_RANK set), get SIGTERM when the launcher process dies (Linux); True if set."""
    if "LOCAL_RANK" not in os.environ or not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        if libc.prctl(PR_SET_PDEATHSIG, int(signal.SIGTERM), 0, 0, 0) != 0:
            return False
    except (OSError, AttributeError):
        return False
    if os.getppid() == 1:  # the launcher died before the request was in place
        os.kill(os.getpid(), signal.SIGTERM)
    return True


class GracefulStop:
    """Records SIGTERM/SIGUSR1/SIGINT; `requested()` is the collective question 'did any rank get one?'. A second
    SIGINT ends the process at once (by the signal's default action: no traceback)."""

    def __init__(self, any_rank: Callable[[bool], bool]):
        self._any_rank = any_rank
        self._signals: list[str] = []  # the handler appends here; it holds no reference to self
        signals = self._signals

        def record(signum, _frame):
            name = signal.Signals(signum).name
            if signum == signal.SIGINT and "SIGINT" in signals:
                signal.signal(signal.SIGINT, signal.SIG_DFL)
                os.kill(os.getpid(), signal.SIGINT)
            if signum == signal.SIGINT and os.environ.get("RANK", "0") == "0":  # one line, not one per rank
                print("Ctrl-C: checkpointing at the end of this meta-step, then exiting (Ctrl-C again stops at once)",
                      file=sys.stderr, flush=True)
            signals.append(name)

        previous = {signum: signal.signal(signum, record) for signum in STOP_SIGNALS}
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
            atomic_write_text(Path(out_dir) / PREEMPTED_MARKER, json.dumps(marker) + "\n")
        print(f"stopping at step {step} on {self.reason}: checkpoint written, exiting with {REQUEUE_EXIT_CODE} "
              f"so that the job can be requeued and resumed with --resume", file=sys.stderr, flush=True)
        sys.exit(REQUEUE_EXIT_CODE)


def _restore(handlers: dict) -> None:
    for signum, handler in handlers.items():
        signal.signal(signum, handler)

