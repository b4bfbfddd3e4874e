"""MetaLearner: the nn.Module that Accelerate/DeepSpeed wrap. Its forward is one whole meta-step's loss."""

from __future__ import annotations

import math
from dataclasses import dataclass
from functools import partial

import torch
from torch import nn
from torch.func import vmap

from dist_signmaml.algorithms.inner import accuracy_curve, multi_step_weights, task_outcome, unadapted_accuracy
from dist_signmaml.algorithms.rules import InnerRule

TASK_PARALLEL_MODES = ("auto", "vmap", "loop")
# --learn_inner_lr: none (one fixed beta) | layer (a learned beta per adapted tensor) | layer_step (per tensor and
# inner step; a test-time loop longer than the trained one reuses the last step's sizes)
LEARNED_STEP_SIZES = ("none", "layer", "layer_step")
# name of the learned log-step-size tensor in the learner's state dict, checkpoints and the safetensors export
LOG_STEP_SIZES = "log_inner_lr"


def resolve_task_parallel(mode: str, device: torch.device) -> str:
    """'auto' -> 'loop' on CPU, 'vmap' elsewhere.

    On CPU vmap over tasks turns per-task weights into grouped convolutions, which were slower than a Python loop
    in every measured cell (bench/results/cost_cpu.md, the `vmap` rows); on GPUs batching the tasks is expected to
    win.
    """
    if mode not in TASK_PARALLEL_MODES:
        raise ValueError(f"--task_parallel={mode!r} is not known; expected one of {TASK_PARALLEL_MODES}")
    if mode != "auto":
        return mode
    return "loop" if torch.device(device).type == "cpu" else "vmap"


BACKBONE_PREFIX = "model."  # the backbone's keys inside the learner's state dict


def to_export_names(learner_state: dict) -> dict:
    """The learner's state dict as exported: backbone keys without the prefix (a plain backbone state dict, loadable
    by anyone), the learner's own tensors (learned step sizes) under their own names."""
    return {key.removeprefix(BACKBONE_PREFIX): value for key, value in learner_state.items()}


def to_learner_names(exported: dict) -> dict:
    """Inverse of `to_export_names`: what `MetaLearner.load_state_dict` takes."""
    return {(key if key == LOG_STEP_SIZES else BACKBONE_PREFIX + key.removeprefix(BACKBONE_PREFIX)): value
            for key, value in exported.items()}


def all_tasks(outcome, params, *task_batch):
    """`outcome(params, *one_task)` for every task at once: vmap over the leading (task) dim, params shared."""
    return vmap(outcome, in_dims=(None,) + (0,) * len(task_batch))(params, *task_batch)


def one_task(outcome, params, *task):
    """`outcome` for one task; a separate function so that --compile can wrap it (see MetaLearner.compile_tasks)."""
    return outcome(params, *task)


@dataclass
class MetaOutput:
    loss: torch.Tensor  # mean query loss after adaptation over this rank's tasks (the meta-objective, eq. 1)
    # query accuracy at the initialisation, mean over tasks (detached); an extra query forward per task, so it is
    # measured only with forward(diagnostics=True), on logging steps
    accuracy_before: torch.Tensor | None
    accuracy_after: torch.Tensor  # query accuracy after the inner loop, mean over tasks (detached)
    task_accuracies: torch.Tensor  # per-task query accuracy after adaptation, [tasks] (detached)
    # inner-loop health signals (inner.inner_diagnostics), mean over tasks; None unless forward(diagnostics=True)
    diagnostics: dict[str, torch.Tensor] | None = None
    # the learned betas by tensor name (a list over inner steps for layer_step); filled with the diagnostics
    step_sizes: dict[str, float | list[float]] | None = None
    # L2 norm of the meta-gradient (averaged over ranks, before --meta_grad_clip); set by the engine after backward,
    # except under DeepSpeed, whose optimizer runs inside backward
    meta_grad_norm: torch.Tensor | None = None


class MetaLearner(nn.Module):
    """Holds the meta-initialisation x (the backbone's parameters) and computes the meta-loss of a task batch.

    BatchNorm layers of the backbone keep no running statistics: every forward normalises with the statistics of
    the images it is given, per task, in training and evaluation alike (MAML's transductive convention).
    """

    def __init__(self, model: nn.Module, rule: InnerRule, inner_lr: float, inner_steps: int,
                 task_parallel: str = "loop", adapted_names: frozenset[str] | None = None, *,
                 learn_inner_lr: str = "none", multi_step_loss: bool = False):
        super().__init__()
        if learn_inner_lr not in LEARNED_STEP_SIZES:
            raise ValueError(f"learn_inner_lr={learn_inner_lr!r} is not known; expected one of {LEARNED_STEP_SIZES}")
        self.model = model
        self.rule = rule
        self.inner_lr = float(inner_lr)
        self.inner_steps = int(inner_steps)
        self.task_parallel = task_parallel
        self.adapted_names = adapted_names  # parameters the inner loop adapts (--adapt); None = all
        self.learn_inner_lr = learn_inner_lr
        self.multi_step_loss = bool(multi_step_loss)
        # Learned step sizes are log(beta) per adapted tensor (rows, in named_parameters order) and per trained inner
        # step (columns; one column for `layer`): the log keeps beta > 0 and lets Adam move it by a factor per step,
        # whatever its scale. They are parameters of this module, so the optimizer, DDP/DeepSpeed, checkpoints and the
        # export treat them like the backbone's weights.
        self.step_size_names = tuple(name for name, _ in model.named_parameters()
                                     if adapted_names is None or name in adapted_names)
        if learn_inner_lr != "none":
            columns = self.inner_steps if learn_inner_lr == "layer_step" else 1
            dtype = next(model.parameters()).dtype
            setattr(self, LOG_STEP_SIZES, nn.Parameter(
                torch.full((len(self.step_size_names), columns), math.log(self.inner_lr), dtype=dtype)))
        self._all_tasks, self._one_task = all_tasks, one_task  # compiled versions after compile_tasks()

    def step_sizes(self, lr_scale: float = 1.0):
        """beta for the inner loop (inner.StepSchedule): the fixed --inner_lr, or the learned sizes as a list over the
        trained steps of {tensor name: beta}, each a 0-d tensor through which the meta-gradient reaches log(beta)."""
        if self.learn_inner_lr == "none":
            return self.inner_lr * lr_scale
        sizes = torch.exp(getattr(self, LOG_STEP_SIZES)) * lr_scale
        return [{name: sizes[row, column] for row, name in enumerate(self.step_size_names)}
                for column in range(sizes.shape[1])]

    def step_size_values(self) -> dict[str, float | list[float]]:
        """The current betas by tensor name (a list over steps for layer_step), for logging and results.json."""
        if self.learn_inner_lr == "none":
            return {}
        sizes = torch.exp(getattr(self, LOG_STEP_SIZES).detach().float()).cpu()
        return {name: (sizes[row].tolist() if self.learn_inner_lr == "layer_step" else float(sizes[row, 0]))
                for row, name in enumerate(self.step_size_names)}

    def parameter_groups(self, outer_lr: float, step_size_lr: float) -> list[dict]:
        """Adam parameter groups: the meta-initialisation at alpha, the log-step-sizes at their own rate (one Adam
        step moves log(beta) by about the learning rate, so alpha = 1e-3 would cap beta at a factor e per 1000
        steps)."""
        groups = [{"params": list(self.model.parameters()), "lr": outer_lr, "name": "initialisation"}]
        if self.learn_inner_lr != "none":
            groups.append({"params": [getattr(self, LOG_STEP_SIZES)], "lr": step_size_lr, "name": "step_sizes"})
        return groups

    def compile_tasks(self, backend: str = "inductor") -> "MetaLearner":
        """torch.compile the per-task work: the inner loop, the query loss and their backward (--compile).

        The compiled region is the function that runs the tasks (vmap over them, or one task of the loop), so the
        support gradient (torch.func.grad) and vmap are traced whole; compiling inside those transforms is not
        supported, and compiling `forward` itself would trace the loop's BatchNorm-kernel switch, which dynamo
        cannot (ContextVar.set). Parameters and images stay graph inputs, so adapted weights never recompile.
        """
        self._all_tasks = torch.compile(all_tasks, backend=backend)
        self._one_task = torch.compile(one_task, backend=backend)
        return self

    def forward(self, support_x, support_y, query_x, query_y, inner_steps: int | None = None,
                diagnostics: bool = False, progress: float = 1.0, lr_scale: float = 1.0) -> MetaOutput:
        """Adapt to each task of the batch ([tasks, n, C, H, W] images, [tasks, n] labels) and score its query set.

        When gradients are enabled the returned loss backpropagates the exact meta-gradient of `self.rule`
        into the backbone's parameters; under torch.no_grad the same inner loop runs for evaluation.
        `diagnostics=True` also fills MetaOutput.diagnostics and accuracy_before (extra passes per task, so the
        training loop asks only on logging steps; meta-steps without it do no work beyond the meta-gradient).
        `progress` (step / total steps) sets the multi-step loss weights; `lr_scale` multiplies every beta (a
        test-time protocol knob; training uses 1).
        """
        steps = self.inner_steps if inner_steps is None else int(inner_steps)
        params = dict(self.model.named_parameters())
        differentiate_through = torch.is_grad_enabled()
        weights = multi_step_weights(steps, progress) if self.multi_step_loss else None
        outcome = partial(task_outcome, self.model, rule=self.rule, steps=steps, lr=self.step_sizes(lr_scale),
                          differentiate_through=differentiate_through, adapted_names=self.adapted_names,
                          diagnostics=diagnostics, step_weights=weights)
        before = partial(unadapted_accuracy, self.model)
        if self.task_parallel == "vmap":
            outputs = self._all_tasks(outcome, params, support_x, support_y, query_x, query_y)
            losses, accuracies = outputs[:2]
            per_task_diagnostics = outputs[2] if diagnostics else None
            if diagnostics:
                with torch.no_grad():
                    accuracies_before = vmap(before, in_dims=(None, 0, 0))(params, query_x, query_y)
        else:
            results = [self._one_task(outcome, params, support_x[t], support_y[t], query_x[t], query_y[t])
                       for t in range(len(support_x))]
            if diagnostics:
                with torch.no_grad():
                    accuracies_before = torch.stack([before(params, query_x[t], query_y[t])
                                                     for t in range(len(query_x))])
            losses = torch.stack([result[0] for result in results])
            accuracies = torch.stack([result[1] for result in results])
            per_task_diagnostics = ({k: torch.stack([result[2][k] for result in results]) for k in results[0][2]}
                                    if diagnostics else None)
        return MetaOutput(loss=losses.mean(),
                          accuracy_before=accuracies_before.mean().detach() if diagnostics else None,
                          accuracy_after=accuracies.mean().detach(), task_accuracies=accuracies.detach(),
                          diagnostics=({k: v.mean().detach() for k, v in per_task_diagnostics.items()}
                                       if diagnostics else None),
                          step_sizes=self.step_size_values() if diagnostics else None)

    @torch.no_grad()
    def accuracy_curves(self, support_x, support_y, query_x, query_y, steps: int,
                        lr_scale: float = 1.0) -> torch.Tensor:
        """Query accuracy of every task at the initialisation and after each of `steps` inner steps, [tasks,
        steps + 1], from one run of the inner loop per task (inner.accuracy_curve)."""
        curve = partial(accuracy_curve, self.model, rule=self.rule, steps=steps, lr=self.step_sizes(lr_scale),
                        adapted_names=self.adapted_names)
        params = {name: p.detach() for name, p in self.model.named_parameters()}
        return torch.stack([curve(params, support_x[t], support_y[t], query_x[t], query_y[t])
                            for t in range(len(support_x))])
