"""`--profile_steps A:B`: a torch.profiler trace of meta-steps A to B on every rank, in RUN/profile/.

Each rank writes `rank<R>.<time>.pt.trace.json` (torch.profiler's TensorBoard trace handler: Chrome trace format,
which Perfetto and chrome://tracing open, as does TensorBoard with the torch-tb-profiler plugin) and
`rank<R>.key_averages.txt` (the operator table, most self time first). The trace records CPU activity, CUDA kernels
on a GPU, tensor shapes and memory allocations. Every meta-step is a range named `meta_step#N`, and inside it the
monitor's phases (monitor.PHASES: data_wait, inner_loop, outer_backward, optimizer_step) are ranges of the same
names; docs/cluster.md says how to find the inner loop, the backward and the all-reduce in them.
"""

from __future__ import annotations

import contextlib
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile, record_function, tensorboard_trace_handler

from dist_signmaml.artifacts import PROFILE_DIR

STEP_LABEL = "meta_step#{step}"


def normalize_profile_steps(value):
    """The canonical spelling 'A:B': fire reads `--profile_steps 5` as the integer 5 (one step, '5:5')."""
    if isinstance(value, int) and not isinstance(value, bool):
        return f"{value}:{value}"
    if value is None:
        return ""
    return value


def parse_profile_steps(spec, last_step: int) -> tuple[int, int] | None:
    """(A, B) of an 'A:B' spec, None for '' (no profiling); ValueError naming the flag otherwise."""
    if spec == "":
        return None
    expected = f"A:B with 1 <= A <= B <= --steps ({last_step}), e.g. 10:12"
    try:
        first, last = (int(part) for part in str(spec).split(":"))
    except ValueError:
        raise ValueError(f"--profile_steps={spec!r} is invalid: expected {expected}") from None
    if not 1 <= first <= last <= last_step:
        raise ValueError(f"--profile_steps={spec!r} is invalid: expected {expected}")
    return first, last


class StepProfiler:
    """Profiles the meta-steps of an 'A:B' spec. It decides its own cadence: call `begin(step)` and `end(step)`
    around every meta-step, run the step's phases through `phases(timer_phase)`, and `close()` after the loop.
    Outside A..B every call is a no-op, so an unprofiled run pays nothing."""

    def __init__(self, spec: str, out_dir: str | Path, rank: int, device: torch.device, last_step: int):
        self.steps = parse_profile_steps(spec, last_step)
        self.directory = Path(out_dir) / PROFILE_DIR
        self.rank = int(rank)
        self.device = torch.device(device)
        self._profile: profile | None = None
        self._step_range: record_function | None = None

    @property
    def active(self) -> bool:
        return self._profile is not None

    def begin(self, step: int) -> None:
        if self.steps is None or not self.steps[0] <= step <= self.steps[1]:
            return
        if self._profile is None:
            activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if self.device.type == "cuda" else [])
            self.directory.mkdir(parents=True, exist_ok=True)
            self._profile = profile(activities=activities, record_shapes=True, profile_memory=True,
                                    on_trace_ready=tensorboard_trace_handler(str(self.directory),
                                                                             worker_name=f"rank{self.rank}"))
            self._profile.start()
        self._step_range = record_function(STEP_LABEL.format(step=step))
        self._step_range.__enter__()

    def end(self, step: int) -> None:
        if self._step_range is not None:
            self._step_range.__exit__(None, None, None)
            self._step_range = None
        if self._profile is not None and step >= self.steps[1]:
            self._finish()

    def phases(self, phase):
        """`phase(name)` (e.g. monitor.PhaseTimer.phase) that, while profiling, also labels the range `name`."""
        @contextlib.contextmanager
        def labelled(name: str):
            with phase(name):
                if self._profile is None:
                    yield
                else:
                    with record_function(name):
                        yield
        return labelled

    def close(self) -> None:
        """Write what was recorded if the run ended inside A..B (e.g. stopped by a signal)."""
        if self._step_range is not None:
            self._step_range.__exit__(None, None, None)
            self._step_range = None
        if self._profile is not None:
            self._finish()

    def _finish(self) -> None:
        self._profile.stop()  # without a schedule, stop() hands the trace to on_trace_ready
        sort_by = "self_cuda_time_total" if self.device.type == "cuda" else "self_cpu_time_total"
        table = self._profile.key_averages().table(sort_by=sort_by, row_limit=40)
        (self.directory / f"rank{self.rank}.key_averages.txt").write_text(table + "\n")
        self._profile = None
