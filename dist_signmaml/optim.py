"""The outer (meta) optimizer and its learning-rate schedule.

Adam over the learner's parameter groups (the meta-initialisation at alpha; learned inner step sizes, if any, at
their own rate). The schedule is a pure function of the meta-step, so a resumed run needs no scheduler state: it
sets the rate of step N exactly as an uninterrupted run does.
"""

from __future__ import annotations

import math

import torch

OUTER_LR_SCHEDULES = ("constant", "cosine")


def outer_lr_factor(schedule: str, step: int, total_steps: int) -> float:
    """Multiplier of every group's base rate at meta-step `step` (1-based) of `total_steps`.

    cosine: 0.5 * (1 + cos(pi * (step - 1) / total_steps)), from 1 at the first step towards 0 (MAML++ anneals alpha
    this way); constant: 1.
    """
    if schedule == "constant":
        return 1.0
    if schedule == "cosine":
        return 0.5 * (1.0 + math.cos(math.pi * (step - 1) / total_steps))
    raise ValueError(f"outer lr schedule {schedule!r} is not known; expected one of {OUTER_LR_SCHEDULES}")


def build_optimizer(learner, outer_lr: float, step_size_lr: float) -> torch.optim.Optimizer:
    return torch.optim.Adam(learner.parameter_groups(outer_lr, step_size_lr))


class OuterLRSchedule:
    """Owns the outer learning rate: `apply(step)` before each meta-step sets every group to base x factor.

    The base rates are read when the optimizer is built, before a checkpoint can overwrite the groups' current
    (scheduled) rates."""

    def __init__(self, optimizer: torch.optim.Optimizer, schedule: str, total_steps: int):
        outer_lr_factor(schedule, 1, total_steps)  # an unknown schedule fails here, before any step
        self.optimizer, self.schedule, self.total_steps = optimizer, schedule, int(total_steps)
        self.base_lrs = [group["lr"] for group in optimizer.param_groups]

    def apply(self, step: int) -> None:
        factor = outer_lr_factor(self.schedule, step, self.total_steps)
        for group, base in zip(self.optimizer.param_groups, self.base_lrs):
            group["lr"] = base * factor
