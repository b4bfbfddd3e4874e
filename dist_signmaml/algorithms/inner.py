"""The inner loop, shared by meta-training and evaluation, and the per-task outcome built on it.

Everything here is a function of explicit parameters (torch.func), so the same code runs for one task, in a Python
loop over tasks, or vectorised with torch.func.vmap.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call, grad

from dist_signmaml.algorithms.rules import InnerRule, Params


def task_loss(model: nn.Module, params: Params, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Cross-entropy of the model with `params` on one task's images (the BatchNorm statistics are this batch's)."""
    return F.cross_entropy(functional_call(model, params, (x,)), y)


def adapt(model: nn.Module, params: Params, support_x: torch.Tensor, support_y: torch.Tensor, *,
          rule: InnerRule, steps: int, lr: float, differentiate_through: bool,
          adapted_names: frozenset[str] | None = None) -> Params:
    """Run `steps` inner steps of `rule` from `params` on one task's support set; return the adapted params.

    `differentiate_through` is True when the caller will backpropagate a meta-loss into `params`. For first-order
    rules (sign, fo, signum) the support gradient is then still a constant — computed at detached weights, so no
    support activations stay alive and memory does not grow with `steps`; the adapted weights are
    `params + constant`, which is exactly dy_m/dx = I (eq. 10). Only MAML keeps the support graph (eq. 5).

    `adapted_names` (partial adaptation, `--adapt head | last:K`): only these parameters take inner steps; the
    others are shared by all tasks, enter the support loss as they are and are returned untouched, so the query
    loss gives them their meta-gradient directly. The support gradient is taken w.r.t. the adapted ones only (its
    backward stops where they end). For sign the adapted part still moves by a constant, so its meta-gradient is
    still exact (eq. 14), and the shared part's is exact too (the step depends on it only through sign, whose
    derivative is 0). MAML keeps the graph through the shared parameters as well.
    """
    shared = {} if adapted_names is None else {n: p for n, p in params.items() if n not in adapted_names}
    adapting = {n: p for n, p in params.items() if n not in shared}
    keep_graph = differentiate_through and rule.second_order
    shared_at = shared if keep_graph else {name: p.detach() for name, p in shared.items()}
    support_gradient = grad(lambda p: task_loss(model, {**shared_at, **p}, support_x, support_y))
    # only stateful rules pay for a parameter-sized buffer per task (42 MB per task on ResNet-18)
    state = {name: torch.zeros_like(p) for name, p in adapting.items()} if rule.has_state else {}
    for _ in range(steps):
        at = adapting if keep_graph else {name: p.detach() for name, p in adapting.items()}
        # not bound to a name: the previous step's gradients are freed before the next ones are computed
        adapting, state = rule.step(adapting, support_gradient(at), lr, state)
    return {**shared, **adapting}


def task_outcome(model: nn.Module, params: Params, support_x, support_y, query_x, query_y, *,
                 rule: InnerRule, steps: int, lr: float, differentiate_through: bool,
                 adapted_names: frozenset[str] | None = None, diagnostics: bool = False):
    """Adapt on the support set, then score the query set: (query loss, query accuracy) after adaptation.

    With `diagnostics=True` a third item, `inner_diagnostics(...)` of this task, is returned as well.
    """
    adapted = adapt(model, params, support_x, support_y, rule=rule, steps=steps, lr=lr,
                    differentiate_through=differentiate_through, adapted_names=adapted_names)
    logits = functional_call(model, adapted, (query_x,))
    loss = F.cross_entropy(logits, query_y)
    accuracy = (logits.argmax(-1) == query_y).float().mean()
    if diagnostics:
        return loss, accuracy, inner_diagnostics(model, params, adapted, support_x, support_y, query_x, query_y,
                                                 adapted_names=adapted_names)
    return loss, accuracy


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
