"""The inner loop, shared by meta-training, evaluation and prediction, and the per-task outcomes built on it.

Everything here is a function of explicit parameters (torch.func), so the same code runs for one task, in a Python
loop over tasks, or vectorised with torch.func.vmap.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence

import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call, grad, grad_and_value

from dist_signmaml.algorithms.rules import InnerRule, Params, StepSize

# Per-step step sizes: one entry per inner step; a loop that runs longer than the list reuses its last entry (a
# size learned for the last trained step is the best guess for any step after it).
StepSchedule = StepSize | Sequence[StepSize]


def size_at(lr: StepSchedule, step: int) -> StepSize:
    """beta of inner step `step` (0-based): a single beta for every step, or entry min(step, last) of a sequence."""
    if isinstance(lr, Sequence):
        return lr[min(step, len(lr) - 1)]
    return lr


def task_loss(model: nn.Module, params: Params, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Cross-entropy of the model with `params` on one task's images (the BatchNorm statistics are this batch's)."""
    return F.cross_entropy(functional_call(model, params, (x,)), y)


def adapt(model: nn.Module, params: Params, support_x: torch.Tensor, support_y: torch.Tensor, *,
          rule: InnerRule, steps: int, lr: StepSchedule, differentiate_through: bool,
          adapted_names: frozenset[str] | None = None,
          after_step: Callable[[int, Params], None] | None = None) -> Params:
    """Run `steps` inner steps of `rule` from `params` on one task's support set; return the adapted params.

    `lr` is beta: one number, a size per tensor, or a sequence of those per step (`size_at`); learnable sizes are
    tensors that require grad, and their meta-gradient flows through `rules.take_step`.

    `differentiate_through` is True when the caller will backpropagate a meta-loss into `params`. For first-order
    rules (sign, fo, signum) the support gradient is then still a constant — computed at detached weights, so no
    support activations stay alive and memory does not grow with `steps`; the adapted weights are
    `params - sum_t beta_t d_t` with constant directions d_t, which is exactly dy_m/dx = I (eq. 10). Only MAML keeps
    the support graph (eq. 5). With learnable betas the graph keeps one direction tensor per step and adapted
    tensor (the parameter count, not activations), which is what d(loss)/d(beta_t) = -<grad, d_t> needs.

    `adapted_names` (partial adaptation, `--adapt head | last:K`): only these parameters take inner steps; the
    others are shared by all tasks, enter the support loss as they are and are returned untouched, so the query
    loss gives them their meta-gradient directly. The support gradient is taken w.r.t. the adapted ones only (its
    backward stops where they end). For sign the adapted part still moves by a constant, so its meta-gradient is
    still exact (eq. 14), and the shared part's is exact too (the step depends on it only through sign, whose
    derivative is 0). MAML keeps the graph through the shared parameters as well.

    `after_step(t, params_t)`, if given, sees the full parameter set after every step t = 1..steps: the multi-step
    loss and the accuracy-per-step curves are computed there, inside this one loop.
    """
    shared = {} if adapted_names is None else {n: p for n, p in params.items() if n not in adapted_names}
    adapting = {n: p for n, p in params.items() if n not in shared}
    keep_graph = differentiate_through and rule.second_order
    shared_at = shared if keep_graph else {name: p.detach() for name, p in shared.items()}
    support_gradient = grad(lambda p: task_loss(model, {**shared_at, **p}, support_x, support_y))
    # only stateful rules pay for a parameter-sized buffer per task (42 MB per task on ResNet-18)
    state = {name: torch.zeros_like(p) for name, p in adapting.items()} if rule.has_state else {}
    for step in range(steps):
        at = adapting if keep_graph else {name: p.detach() for name, p in adapting.items()}
        # not bound to a name: the previous step's gradients are freed before the next ones are computed
        adapting, state = rule.step(adapting, support_gradient(at), size_at(lr, step), state)
        if after_step is not None:
            after_step(step + 1, {**shared, **adapting})
    return {**shared, **adapting}


MULTI_STEP_ANNEAL_FRACTION = 0.1  # MAML++ anneals over its first 10 of 100 epochs


def multi_step_anneal(progress: float, anneal_fraction: float = MULTI_STEP_ANNEAL_FRACTION) -> float:
    """How far the multi-step loss's weights have moved to the last step, 0 to 1, at `progress` (step / the
    meta-steps the schedule spans)."""
    return min(max(progress, 0.0) / anneal_fraction, 1.0)


def multi_step_weights(steps: int, progress: float, anneal_fraction: float = MULTI_STEP_ANNEAL_FRACTION) -> list[float]:
    """Weights of the query loss after each inner step, MAML++'s multi-step loss (Antoniou et al. 2019, §4).

    Training starts with every step weighted 1/m and, over the first `anneal_fraction` of training, moves the weight
    to the last step: the non-final weights decay linearly to a floor of 0.03/m, the final weight takes what they
    lose. The weights always sum to 1, so the loss stays on the scale of a single query loss, and m = 1 is the plain
    loss.
    """
    if steps == 1:
        return [1.0]
    anneal = multi_step_anneal(progress, anneal_fraction)
    floor = 0.03 / steps
    early = max((1.0 - anneal) / steps, floor)
    return [early] * (steps - 1) + [1.0 - (steps - 1) * early]


def task_outcome(model: nn.Module, params: Params, support_x, support_y, query_x, query_y, *,
                 rule: InnerRule, steps: int, lr: StepSchedule, differentiate_through: bool,
                 adapted_names: frozenset[str] | None = None, diagnostics: bool = False,
                 step_weights: Sequence[float] | None = None):
    """Adapt on the support set, then score the query set: (query loss, query accuracy) after adaptation.

    `step_weights` (one per inner step, `multi_step_weights`) makes the loss the weighted query loss after every
    step (the multi-step loss); it only changes training, evaluation scores the final step as always.
    With `diagnostics=True` a third item, `inner_diagnostics(...)` of this task, is returned as well.
    """
    if step_weights is not None and differentiate_through and steps > 1:
        loss, logits = multi_step_query_loss(model, params, support_x, support_y, query_x, query_y, rule=rule,
                                             steps=steps, lr=lr, adapted_names=adapted_names,
                                             step_weights=step_weights)
        adapted = None
    else:
        adapted = adapt(model, params, support_x, support_y, rule=rule, steps=steps, lr=lr,
                        differentiate_through=differentiate_through, adapted_names=adapted_names)
        logits = functional_call(model, adapted, (query_x,))
        loss = F.cross_entropy(logits, query_y)
    accuracy = (logits.argmax(-1) == query_y).float().mean()
    if diagnostics:
        if adapted is None:  # the diagnostics need y_m itself; recomputing it costs m support gradients, no graph
            adapted = adapt(model, params, support_x, support_y, rule=rule, steps=steps, lr=lr,
                            differentiate_through=False, adapted_names=adapted_names)
        return loss, accuracy, inner_diagnostics(model, params, adapted, support_x, support_y, query_x, query_y,
                                                 adapted_names=adapted_names)
    return loss, accuracy


def multi_step_query_loss(model: nn.Module, params: Params, support_x, support_y, query_x, query_y, *,
                          rule: InnerRule, steps: int, lr: StepSchedule, adapted_names: frozenset[str] | None,
                          step_weights: Sequence[float]) -> tuple[torch.Tensor, torch.Tensor]:
    """sum_t w_t * l_query(y_t) and the final step's query logits, with memory flat in the number of steps.

    MAML keeps the whole graph (its meta-gradient needs it anyway). For first-order rules y_t = x - sum_s beta_s d_s
    with constant d_s, so the gradient of l_query(y_t) reaches x and beta only through y_t: each step's query
    gradient g_t = grad l_query(y_t) is computed at once at detached weights (its activations are freed before the
    next step) and enters a surrogate whose gradient is exactly sum_t w_t dl_query(y_t)/d(x, beta) (for sign
    eq. 14 at every step):
    - fixed beta: dy_t/dx = I, so the surrogate is <sum_t w_t g_t, x>, one running parameter-sized sum;
    - learned beta: sum_t w_t <g_t, y_t>, which keeps g_t and d_t per step (what d/d(beta_s) needs).
    The returned value is the true weighted loss; its gradient is the surrogate's.
    """
    values, logits_at = [], {}
    learnable = any(isinstance(size, torch.Tensor) and size.requires_grad
                    for step in (lr if isinstance(lr, Sequence) else [lr])
                    for size in (step.values() if isinstance(step, Mapping) else [step]))
    surrogate, weighted_gradient = [], {}

    def query_loss_and_logits(p):
        logits = functional_call(model, p, (query_x,))
        return F.cross_entropy(logits, query_y), logits

    def score(step: int, adapted: Params):
        weight = step_weights[step - 1]
        if rule.second_order:
            loss, logits = query_loss_and_logits(adapted)
            values.append(weight * loss)
        else:
            gradient, (loss, logits) = grad_and_value(query_loss_and_logits, has_aux=True)(
                {name: p.detach() for name, p in adapted.items()})
            values.append(weight * loss.detach())
            if learnable:
                surrogate.append(weight * sum((gradient[name] * adapted[name]).sum() for name in adapted))
            else:
                for name, g in gradient.items():
                    weighted_gradient[name] = weighted_gradient[name] + weight * g if name in weighted_gradient \
                        else weight * g
        logits_at["last"] = logits

    adapt(model, params, support_x, support_y, rule=rule, steps=steps, lr=lr, differentiate_through=True,
          adapted_names=adapted_names, after_step=score)
    if weighted_gradient:
        surrogate.append(sum((weighted_gradient[name] * params[name]).sum() for name in params))
    total = torch.stack(values).sum()
    if surrogate:
        linear = torch.stack(surrogate).sum()
        total = total + linear - linear.detach()
    return total, logits_at["last"]


def accuracy_curve(model: nn.Module, params: Params, support_x, support_y, query_x, query_y, *,
                   rule: InnerRule, steps: int, lr: StepSchedule,
                   adapted_names: frozenset[str] | None = None) -> torch.Tensor:
    """Query accuracy at the initialisation and after each of `steps` inner steps, [steps + 1], from ONE run of the
    inner loop (so a test protocol can pick its step count without re-adapting per count). No graph is kept."""
    def accuracy(p):
        return (functional_call(model, p, (query_x,)).argmax(-1) == query_y).float().mean()

    curve = [accuracy(params)]
    adapt(model, params, support_x, support_y, rule=rule, steps=steps, lr=lr, differentiate_through=False,
          adapted_names=adapted_names, after_step=lambda step, p: curve.append(accuracy(p)))
    return torch.stack(curve)


def inner_diagnostics(model: nn.Module, params: Params, adapted: Params, support_x, support_y, query_x, query_y, *,
                      adapted_names: frozenset[str] | None = None) -> dict[str, torch.Tensor]:
    """Health signals of one task's inner loop, over the coordinates it adapts (no graph is kept):

    - support_grad_norm: ||grad l_support(x)||_2 at the meta-initialisation x, the first inner step's gradient;
    - sign_agreement: share of coordinates where sign(grad l_support(x)) == sign(grad l_query(x)), i.e. where the
      first sign step (eq. 6) also descends the query loss; 0.5 means the support set carries no signal;
    - moved_fraction: share of coordinates with y_m != x after the inner loop (sign steps move every coordinate
      whose gradient is non-zero; coordinates can also return exactly to x when signs alternate).

    Costs one extra support and one query gradient per task, so callers ask for it only on logging steps.
    """
    start = {name: p.detach() for name, p in params.items()}
    names = [name for name in start if adapted_names is None or name in adapted_names]

    def flat_gradient(x, y):
        gradient = grad(lambda p: task_loss(model, {**start, **p}, x, y))({name: start[name] for name in names})
        return torch.cat([gradient[name].reshape(-1) for name in names])

    support, query = flat_gradient(support_x, support_y), flat_gradient(query_x, query_y)
    moved = torch.cat([(adapted[name].detach() != start[name]).reshape(-1) for name in names])
    return {"support_grad_norm": torch.linalg.vector_norm(support),
            "sign_agreement": (torch.sign(support) == torch.sign(query)).float().mean(),
            "moved_fraction": moved.float().mean()}


def unadapted_accuracy(model: nn.Module, params: Params, query_x, query_y):
    """Query accuracy at the meta-initialisation itself (before any inner step)."""
    logits = functional_call(model, params, (query_x,))
    return (logits.argmax(-1) == query_y).float().mean()
