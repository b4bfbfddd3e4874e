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
          rule: InnerRule, steps: int, lr: float, differentiate_through: bool) -> Params:
    """Run `steps` inner steps of `rule` from `params` on one task's support set; return the adapted params.

    `differentiate_through` is True when the caller will backpropagate a meta-loss into `params`. For first-order
    rules (sign, fo, signum) the support gradient is then still a constant — computed at detached weights, so no
    support activations stay alive and memory does not grow with `steps`; the adapted weights are
    `params + constant`, which is exactly dy_m/dx = I (eq. 10). Only MAML keeps the support graph (eq. 5).
    """
    support_gradient = grad(lambda p: task_loss(model, p, support_x, support_y))
    keep_graph = differentiate_through and rule.second_order
    state = {name: torch.zeros_like(p) for name, p in params.items()}
    for _ in range(steps):
        at = params if keep_graph else {name: p.detach() for name, p in params.items()}
        grads = support_gradient(at)
        params, state = rule.step(params, grads, lr, state)
    return params


def task_outcome(model: nn.Module, params: Params, support_x, support_y, query_x, query_y, *,
                 rule: InnerRule, steps: int, lr: float, differentiate_through: bool):
    """Adapt on the support set, then score the query set: (query loss, query accuracy) after adaptation."""
    adapted = adapt(model, params, support_x, support_y, rule=rule, steps=steps, lr=lr,
                    differentiate_through=differentiate_through)
    logits = functional_call(model, adapted, (query_x,))
    loss = F.cross_entropy(logits, query_y)
    accuracy = (logits.argmax(-1) == query_y).float().mean()
    return loss, accuracy


def unadapted_accuracy(model: nn.Module, params: Params, query_x, query_y):
    """Query accuracy at the meta-initialisation itself (before any inner step)."""
    logits = functional_call(model, params, (query_x,))
    return (logits.argmax(-1) == query_y).float().mean()
