"""MetaLearner: the nn.Module that Accelerate/DeepSpeed wrap. Its forward is one whole meta-step's loss."""

from __future__ import annotations

from dataclasses import dataclass
from functools import partial

import torch
from torch import nn
from torch.func import vmap

from dist_signmaml.algorithms.inner import task_outcome, unadapted_accuracy
from dist_signmaml.algorithms.rules import InnerRule

TASK_PARALLEL_MODES = ("auto", "vmap", "loop")


def resolve_task_parallel(mode: str, device: torch.device) -> str:
    """'auto' -> 'loop' on CPU, 'vmap' elsewhere.

    Measured on a 2-core CPU with conv4: vmap over tasks turns per-task weights into grouped convolutions and was
    1.5-2.2x slower than a Python loop at 15 queries; on GPUs batching the tasks is expected to win.
    """
    if mode not in TASK_PARALLEL_MODES:
        raise ValueError(f"--task_parallel={mode!r} is not known; expected one of {TASK_PARALLEL_MODES}")
    if mode != "auto":
        return mode
    return "loop" if torch.device(device).type == "cpu" else "vmap"


@dataclass
class MetaOutput:
    loss: torch.Tensor  # mean query loss after adaptation over this rank's tasks (the meta-objective, eq. 1)
    accuracy_before: torch.Tensor  # query accuracy at the initialisation, mean over tasks (detached)
    accuracy_after: torch.Tensor  # query accuracy after the inner loop, mean over tasks (detached)
    task_accuracies: torch.Tensor  # per-task query accuracy after adaptation, [tasks] (detached)


class MetaLearner(nn.Module):
    """Holds the meta-initialisation x (the backbone's parameters) and computes the meta-loss of a task batch.

    BatchNorm layers of the backbone keep no running statistics: every forward normalises with the statistics of
    the images it is given, per task, in training and evaluation alike (MAML's transductive convention).
    """

    def __init__(self, model: nn.Module, rule: InnerRule, inner_lr: float, inner_steps: int,
                 task_parallel: str = "loop"):
        super().__init__()
        self.model = model
        self.rule = rule
        self.inner_lr = float(inner_lr)
        self.inner_steps = int(inner_steps)
        self.task_parallel = task_parallel

    def forward(self, support_x, support_y, query_x, query_y, inner_steps: int | None = None) -> MetaOutput:
        """Adapt to each task of the batch ([tasks, n, C, H, W] images, [tasks, n] labels) and score its query set.

        When gradients are enabled the returned loss backpropagates the exact meta-gradient of `self.rule`
        into the backbone's parameters; under torch.no_grad the same inner loop runs for evaluation.
        """
        steps = self.inner_steps if inner_steps is None else int(inner_steps)
        params = dict(self.model.named_parameters())
        differentiate_through = torch.is_grad_enabled()
        outcome = partial(task_outcome, self.model, rule=self.rule, steps=steps, lr=self.inner_lr,
                          differentiate_through=differentiate_through)
        before = partial(unadapted_accuracy, self.model)
        if self.task_parallel == "vmap":
            losses, accuracies = vmap(outcome, in_dims=(None, 0, 0, 0, 0))(params, support_x, support_y, query_x, query_y)
            with torch.no_grad():
                accuracies_before = vmap(before, in_dims=(None, 0, 0))(params, query_x, query_y)
        else:
            results = [outcome(params, support_x[t], support_y[t], query_x[t], query_y[t]) for t in range(len(support_x))]
            losses = torch.stack([loss for loss, _ in results])
            accuracies = torch.stack([accuracy for _, accuracy in results])
            with torch.no_grad():
                accuracies_before = torch.stack([before(params, query_x[t], query_y[t]) for t in range(len(query_x))])
        return MetaOutput(loss=losses.mean(), accuracy_before=accuracies_before.mean().detach(),
                          accuracy_after=accuracies.mean().detach(), task_accuracies=accuracies.detach())
