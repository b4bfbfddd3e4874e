"""Inner-loop update rules: pure functions from (params, support gradients, state) to new params.

`params` and `grads` are dicts name -> tensor, as `torch.func.functional_call` takes them. Every rule is written so
that it runs unchanged on one task or under `torch.func.vmap` over tasks.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch

Params = dict[str, torch.Tensor]


def sign_step(params: Params, grads: Params, lr: float) -> Params:
    """Sign-MAML's lower-level step, eq. (6): y <- y - beta * sign(grad).

    d sign(z)/dz = 0 almost everywhere, so dy/dx = I through this step (eq. 10) and the meta-gradient of the whole
    unroll is the query gradient at the adapted weights (eq. 14). The gradient is a constant here: no graph back
    through it is needed or kept.
    """
    return {name: p - lr * torch.sign(grads[name]) for name, p in params.items()}


def sgd_step(params: Params, grads: Params, lr: float) -> Params:
    """MAML's lower-level step (the product in eq. 5 comes from differentiating this when grads carry a graph)."""
    return {name: p - lr * grads[name] for name, p in params.items()}


def signum_step(params: Params, grads: Params, lr: float, momentum: Params, beta: float) -> tuple[Params, Params]:
    """Sign of a momentum of the support gradients (signum, the alternative named at the end of paper §4).

    momentum <- beta * momentum + (1 - beta) * grad; y <- y - lr * sign(momentum). The momentum is built from
    constant gradients and passes through sign, so dy/dx = I exactly as for `sign_step`.
    """
    momentum = {name: beta * momentum[name] + (1 - beta) * grads[name] for name in params}
    return sign_step(params, momentum, lr), momentum


@dataclass(frozen=True)
class InnerRule:
    """How one algorithm adapts: its step, and whether the meta-gradient must flow through the support gradients."""

    name: str
    second_order: bool  # True only for MAML: support gradients keep their graph (eq. 5)
    step: Callable[[Params, Params, float, Params], tuple[Params, Params]]  # (params, grads, lr, state) -> (params, state)
    description: str
    has_state: bool = False  # signum's momentum; stateless rules get no per-task state buffers at all


def _stateless(update):
    return lambda params, grads, lr, state: (update(params, grads, lr), state)


def make_rule(algo: str, momentum: float = 0.9) -> InnerRule:
    """The inner rule for `--algo`: sign | fo | maml | signum."""
    if algo == "sign":
        return InnerRule("sign", False, _stateless(sign_step), "Sign-MAML: signSGD inner step, exact first-order meta-gradient (eq. 14)")
    if algo == "fo":
        return InnerRule("fo", False, _stateless(sgd_step), "FO-MAML: SGD inner step, second-order terms of eq. 5 dropped")
    if algo == "maml":
        return InnerRule("maml", True, _stateless(sgd_step), "MAML: SGD inner step, full second-order meta-gradient (eq. 5)")
    if algo == "signum":
        return InnerRule("signum", False, lambda p, g, lr, m: signum_step(p, g, lr, m, momentum),
                         f"Signum-MAML: sign of momentum {momentum} of support gradients, exact first-order",
                         has_state=True)
    raise ValueError(f"--algo={algo!r} is not known; expected one of {ALGORITHMS}")


ALGORITHMS = ("sign", "fo", "maml", "signum")
