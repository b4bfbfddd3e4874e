"""A third-party reference meta-step: the per-task clone-and-adapt loop of learn2learn / the Sign-MAML paper's code.

The paper's code (adapted from learn2learn) meta-trains like this, one task at a time:

    for task in batch:
        learner = maml.clone()                      # a differentiable copy of the weights
        for _ in range(m): learner.adapt(support_loss)   # y <- y - beta * update(grad)
        query_loss(learner).backward()              # gradients accumulate into the shared weights
    optimizer.step()

Two backends run that loop:
  learn2learn  the real thing (`l2l.algorithms.MAML.clone()` + `maml_update`). learn2learn 0.2.0's published
               sdist does not build on Python 3.11 (its pre-generated C needs `longintrepr.h`); re-generating the C
               with Cython 3 works: `bash bench/install_learn2learn.sh`.
  higher       facebookresearch/higher 0.2.1 (pip-installable), whose `monkeypatch` gives the same functional,
               differentiable copy of the module; the update is applied as learn2learn's `maml_update` does.
The backbone is the standard conv4 with torch's own nn.BatchNorm2d (no running statistics), as in those codebases.
"""

from __future__ import annotations

import importlib.util

import higher
import torch
import torch.nn.functional as F
from torch import nn


def reference_conv4(in_channels: int, ways: int, hidden: int = 64, image_size: int = 28) -> nn.Module:
    layers, channels = [], in_channels
    for _ in range(4):
        layers += [nn.Conv2d(channels, hidden, 3, padding=1), nn.BatchNorm2d(hidden, track_running_stats=False),
                   nn.ReLU(), nn.MaxPool2d(2)]
        channels = hidden
    side = image_size // 16
    return nn.Sequential(*layers, nn.Flatten(), nn.Linear(hidden * side * side, ways))


def learn2learn_available() -> bool:
    return importlib.util.find_spec("learn2learn") is not None


class CloneLoopMetaStep:
    """One meta-step of `algo` (sign | fo | maml) as a per-task clone/adapt loop (backend: higher | learn2learn)."""

    def __init__(self, model: nn.Module, algo: str, inner_lr: float, inner_steps: int, outer_lr: float = 1e-3,
                 backend: str = "higher"):
        self.model, self.algo, self.inner_lr, self.inner_steps = model, algo, inner_lr, inner_steps
        self.backend = backend
        if backend == "learn2learn":
            import learn2learn as l2l

            self.maml = l2l.algorithms.MAML(model, lr=inner_lr, first_order=algo != "maml")
            self.maml_update = l2l.algorithms.maml.maml_update
        elif backend != "higher":
            raise ValueError(f"backend {backend!r}: expected higher or learn2learn")
        self.optimizer = torch.optim.Adam(model.parameters(), lr=outer_lr)

    def __call__(self, support_x, support_y, query_x, query_y) -> float:
        loss = self.accumulate_meta_gradient(support_x, support_y, query_x, query_y)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        return loss

    def accumulate_meta_gradient(self, support_x, support_y, query_x, query_y) -> float:
        """Backpropagate the mean query loss of the task batch into the model's .grad, one task at a time."""
        if self.backend == "learn2learn":
            return self._learn2learn_meta_gradient(support_x, support_y, query_x, query_y)
        second_order = self.algo == "maml"
        tasks = len(support_x)
        total = 0.0
        for t in range(tasks):
            clone = higher.monkeypatch(self.model, copy_initial_weights=False, track_higher_grads=True)
            fast = list(self.model.parameters())
            for _ in range(self.inner_steps):
                support_loss = F.cross_entropy(clone(support_x[t], params=fast), support_y[t])
                grads = torch.autograd.grad(support_loss, fast, create_graph=second_order)
                if self.algo == "sign":
                    fast = [p - self.inner_lr * torch.sign(g.detach()) for p, g in zip(fast, grads)]
                else:
                    fast = [p - self.inner_lr * (g if second_order else g.detach()) for p, g in zip(fast, grads)]
            query_loss = F.cross_entropy(clone(query_x[t], params=fast), query_y[t]) / tasks
            query_loss.backward()
            total += query_loss.item()
        return total

    def _learn2learn_meta_gradient(self, support_x, support_y, query_x, query_y) -> float:
        tasks, total = len(support_x), 0.0
        for t in range(tasks):
            learner = self.maml.clone()
            for _ in range(self.inner_steps):
                support_loss = F.cross_entropy(learner(support_x[t]), support_y[t])
                if self.algo == "sign":  # the paper's change to learn2learn: step along the gradient's sign
                    grads = torch.autograd.grad(support_loss, list(learner.parameters()))
                    self.maml_update(learner, self.inner_lr, [torch.sign(g) for g in grads])
                else:
                    learner.adapt(support_loss)
            query_loss = F.cross_entropy(learner(query_x[t]), query_y[t]) / tasks
            query_loss.backward()
            total += query_loss.item()
        return total
