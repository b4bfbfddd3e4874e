"""Inner-loop update rules: pure functions from (support gradients, state) to a step direction.

Every rule adapts as y <- y - beta * d, where the direction d is sign(grad) (Sign-MAML, eq. 6), the gradient itself
(MAML, FO-MAML), or the sign of a momentum (signum). Writing the rules as directions keeps one update,
`take_step`, for all of them, and makes the step sizes beta a separate input: one number for every tensor and step,
or a learnable size per tensor (and step), see `learner.StepSizes`.

`params` and `grads` are dicts name -> tensor, as `torch.func.functional_call` takes them. Every rule is written so
that it runs unchanged on one task or under `torch.func.vmap` over tasks.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Callable

import torch

Params = dict[str, torch.Tensor]
# beta: one number for every tensor, or one (possibly learnable, 0-d tensor) size per tensor name
StepSize = float | torch.Tensor | Mapping[str, float | torch.Tensor]


def size_of(lr: StepSize, name: str):
    return lr[name] if isinstance(lr, Mapping) else lr


def take_step(params: Params, direction: Params, lr: StepSize) -> Params:
    """y <- y - beta * d for every tensor. With a learnable beta this is the only place it enters the unroll, so
    d(query loss)/d(beta_l) = -<grad l_query(y_m)_l, d_l> summed over the steps it was used in (exact for sign, whose
    d does not depend on beta)."""
    return {name: p - size_of(lr, name) * direction[name] for name, p in params.items()}


def sign_step(params: Params, grads: Params, lr: StepSize) -> Params:
    """Sign-MAML's lower-level step, eq. (6): y <- y - beta * sign(grad).

    d sign(z)/dz = 0 almost everywhere, so dy/dx = I through this step (eq. 10) and the meta-gradient of the whole
    unroll is the query gradient at the adapted weights (eq. 14). The gradient is a constant here: no graph back
    through it is needed or kept.
    """
    return take_step(params, {name: torch.sign(g) for name, g in grads.items()}, lr)


def sgd_step(params: Params, grads: Params, lr: StepSize) -> Params:
    """MAML's lower-level step (the product in eq. 5 comes from differentiating this when grads carry a graph)."""
    return take_step(params, grads, lr)


def signum_direction(grads: Params, momentum: Params, coefficient: float) -> tuple[Params, Params]:
    """momentum <- coefficient * momentum + (1 - coefficient) * grad; d = sign(momentum)."""
    momentum = {name: coefficient * momentum[name] + (1 - coefficient) * grads[name] for name in grads}
    return {name: torch.sign(m) for name, m in momentum.items()}, momentum


def signum_step(params: Params, grads: Params, lr: StepSize, momentum: Params,
                coefficient: float) -> tuple[Params, Params]:
    """Sign of a momentum of the support gradients (signum, the alternative named at the end of paper §4).

    The momentum is built from constant gradients and passes through sign, so dy/dx = I exactly as for `sign_step`.
    """
    direction, momentum = signum_direction(grads, momentum, coefficient)
    return take_step(params, direction, lr), momentum


@dataclass(frozen=True)
class InnerRule:
    """How one algorithm adapts: its step direction, and whether the meta-gradient must flow through the support
    gradients."""

    name: str
    second_order: bool  # True only for MAML: support gradients keep their graph (eq. 5)
    direction: Callable[[Params, Params], tuple[Params, Params]]  # (grads, state) -> (direction, state)
    description: str
    has_state: bool = False  # signum's momentum; stateless rules get no per-task state buffers at all
    # True when d does not depend on beta or x beyond a constant (sign, signum): the beta meta-gradient is then exact
    # at first-order cost; for fo it is first-order too (an approximation, like fo's x gradient)
    exact_first_order: bool = False

    def step(self, params: Params, grads: Params, lr: StepSize, state: Params) -> tuple[Params, Params]:
        direction, state = self.direction(grads, state)
        return take_step(params, direction, lr), state


def _stateless(direction):
    return lambda grads, state: (direction(grads), state)


def _sign(grads: Params) -> Params:
    return {name: torch.sign(g) for name, g in grads.items()}


def make_rule(algo: str, momentum: float = 0.9) -> InnerRule:
    """The inner rule for `--algo`: sign | fo | maml | signum (`momentum`: signum's momentum coefficient)."""
    if algo == "sign":
        return InnerRule("sign", False, _stateless(_sign),
                         "Sign-MAML: signSGD inner step, exact first-order meta-gradient (eq. 14)", exact_first_order=True)
    if algo == "fo":
        return InnerRule("fo", False, _stateless(dict), "FO-MAML: SGD inner step, second-order terms of eq. 5 dropped")
    if algo == "maml":
        return InnerRule("maml", True, _stateless(dict), "MAML: SGD inner step, full second-order meta-gradient (eq. 5)")
    if algo == "signum":
        return InnerRule("signum", False, lambda g, m: signum_direction(g, m, momentum),
                         f"Signum-MAML: sign of momentum {momentum} of support gradients, exact first-order",
                         has_state=True, exact_first_order=True)
    raise ValueError(f"--algo={algo!r} is not known; expected one of {ALGORITHMS}")


ALGORITHMS = ("sign", "fo", "maml", "signum")
