"""Correctness of the meta-gradients: each algorithm against an independent autograd reference (float64)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch.func import functional_call

from dist_signmaml.algorithms import MetaLearner, make_rule
from dist_signmaml.algorithms.rules import sign_step, signum_step
from dist_signmaml.models import build_backbone

WAYS, SHOTS, QUERIES, TASKS, SIZE = 3, 2, 3, 3, 16


def tiny_problem(seed=0):
    """A 3-way task batch on 16 px images and a 4-filter conv4 in float64 (BN + ReLU + max-pool, so the Hessian
    of the support loss is far from zero)."""
    torch.manual_seed(seed)
    model = build_backbone("conv4", in_channels=1, ways=WAYS, hidden=4, image_size=SIZE).double()
    labels = lambda k: torch.arange(WAYS).repeat_interleave(k).expand(TASKS, -1).clone()  # noqa: E731
    support = (torch.randn(TASKS, WAYS * SHOTS, 1, SIZE, SIZE, dtype=torch.float64), labels(SHOTS))
    query = (torch.randn(TASKS, WAYS * QUERIES, 1, SIZE, SIZE, dtype=torch.float64), labels(QUERIES))
    return model, support, query


def learner_gradient(model, support, query, algo, steps, lr, task_parallel="loop"):
    learner = MetaLearner(model, make_rule(algo), lr, steps, task_parallel)
    learner.zero_grad()
    out = learner(*support, *query)
    out.loss.backward()
    return out.loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}


def reference_gradient(model, support, query, steps, lr, update, create_graph=True):
    """Plain per-task unroll with torch.autograd.grad(create_graph=True): differentiates through every inner step,
    including through whatever `update` does to the support gradient."""
    params = dict(model.named_parameters())
    total = 0.0
    for t in range(TASKS):
        fast = dict(params)
        state = {n: torch.zeros_like(p) for n, p in fast.items()}
        for _ in range(steps):
            loss = F.cross_entropy(functional_call(model, fast, (support[0][t],)), support[1][t])
            grads = torch.autograd.grad(loss, list(fast.values()), create_graph=create_graph)
            fast, state = update(fast, dict(zip(fast, grads)), lr, state)
        total = total + F.cross_entropy(functional_call(model, fast, (query[0][t],)), query[1][t])
    meta_loss = total / TASKS
    grads = torch.autograd.grad(meta_loss, list(params.values()))
    return meta_loss.detach(), dict(zip(params, grads))


def sgd(p, g, lr, s):
    return {n: p[n] - lr * g[n] for n in p}, s


def assert_close(a: dict, b: dict, **tol):
    for name in a:
        torch.testing.assert_close(a[name], b[name], **tol, msg=lambda m: f"{name}: {m}")


def max_difference(a: dict, b: dict) -> float:
    return max((a[n] - b[n]).abs().max().item() for n in a)


@pytest.mark.parametrize("steps", [1, 3])
def test_sign_first_order_equals_full_unroll(steps):
    """Eq. 14: the first-order Sign-MAML gradient is the exact gradient of the whole signSGD unroll."""
    model, support, query = tiny_problem()
    loss, ours = learner_gradient(model, support, query, "sign", steps, lr=0.05)
    ref_loss, reference = reference_gradient(model, support, query, steps, 0.05,
                                             lambda p, g, lr, s: (sign_step(p, g, lr), s))
    torch.testing.assert_close(loss, ref_loss, rtol=1e-12, atol=1e-12)
    assert_close(ours, reference, rtol=1e-10, atol=1e-12)
    # The comparison has teeth: an SGD inner step at the same lr gives a clearly different meta-gradient.
    _, fo = learner_gradient(model, support, query, "fo", steps, lr=0.05)
    assert max_difference(ours, fo) > 1e-3


def test_signum_first_order_equals_full_unroll():
    model, support, query = tiny_problem(1)
    _, ours = learner_gradient(model, support, query, "signum", 3, lr=0.05)
    _, reference = reference_gradient(model, support, query, 3, 0.05,
                                      lambda p, g, lr, s: signum_step(p, g, lr, s, 0.9))
    assert_close(ours, reference, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("steps", [1, 2])
def test_maml_equals_second_order_reference(steps):
    """Eq. 5: MAML's meta-gradient equals autograd through the SGD unroll with create_graph=True."""
    model, support, query = tiny_problem(2)
    loss, ours = learner_gradient(model, support, query, "maml", steps, lr=0.3)
    ref_loss, reference = reference_gradient(model, support, query, steps, 0.3, sgd)
    torch.testing.assert_close(loss, ref_loss, rtol=1e-12, atol=1e-12)
    assert_close(ours, reference, rtol=1e-9, atol=1e-11)


def test_maml_matches_finite_differences():
    """Directional derivatives of the MAML meta-loss along random directions, central differences in float64."""
    model, support, query = tiny_problem(3)
    learner = MetaLearner(model, make_rule("maml"), 0.3, 2, "loop")
    _, grads = learner_gradient(model, support, query, "maml", 2, lr=0.3)
    params = dict(model.named_parameters())
    generator = torch.Generator().manual_seed(0)
    for _ in range(3):
        direction = {n: torch.randn(p.shape, generator=generator, dtype=p.dtype) for n, p in params.items()}
        analytic = sum((grads[n] * direction[n]).sum() for n in params).item()
        eps = 1e-6
        values = []
        for sign in (1, -1):
            with torch.no_grad():
                for n, p in params.items():
                    p.add_(sign * eps * direction[n])
            values.append(learner(*support, *query).loss.item())
            with torch.no_grad():
                for n, p in params.items():
                    p.sub_(sign * eps * direction[n])
        numeric = (values[0] - values[1]) / (2 * eps)
        assert abs(analytic - numeric) <= 1e-6 * max(1.0, abs(numeric)), (analytic, numeric)


def test_fo_differs_from_maml():
    """FO-MAML drops the Hessian terms: on a network with curvature its gradient must differ from MAML's."""
    model, support, query = tiny_problem(4)
    _, fo = learner_gradient(model, support, query, "fo", 1, lr=0.3)
    _, maml = learner_gradient(model, support, query, "maml", 1, lr=0.3)
    _, fo_reference = reference_gradient(model, support, query, 1, 0.3, sgd, create_graph=False)
    assert_close(fo, fo_reference, rtol=1e-10, atol=1e-12)  # and FO itself is the dropped-terms gradient
    relative = max_difference(fo, maml) / max(v.abs().max().item() for v in maml.values())
    assert relative > 1e-2, relative


@pytest.mark.parametrize("algo", ["sign", "fo", "maml", "signum"])
def test_vmap_equals_loop(algo):
    model, support, query = tiny_problem(5)
    lr = 0.05 if algo in ("sign", "signum") else 0.3
    loop_loss, loop = learner_gradient(model, support, query, algo, 2, lr, "loop")
    vmap_loss, vmapped = learner_gradient(model, support, query, algo, 2, lr, "vmap")
    torch.testing.assert_close(loop_loss, vmap_loss, rtol=1e-10, atol=1e-12)
    assert_close(loop, vmapped, rtol=1e-8, atol=1e-10)


def test_evaluation_forward_keeps_no_graph_and_matches_training_inner_loop():
    """Under no_grad the same inner loop runs (same adapted accuracy) and nothing is left to backpropagate."""
    model, support, query = tiny_problem(6)
    learner = MetaLearner(model, make_rule("maml"), 0.3, 2, "loop")
    train_out = learner(*support, *query)
    with torch.no_grad():
        eval_out = learner(*support, *query)
    assert not eval_out.loss.requires_grad and train_out.loss.requires_grad
    torch.testing.assert_close(train_out.loss.detach(), eval_out.loss)
    torch.testing.assert_close(train_out.task_accuracies, eval_out.task_accuracies)


def test_sign_step_moves_every_coordinate_by_beta():
    params = {"w": torch.tensor([1.0, -2.0, 0.5])}
    grads = {"w": torch.tensor([3.0, -1e-9, 0.0])}
    stepped = sign_step(params, grads, 0.1)["w"]
    torch.testing.assert_close(stepped, torch.tensor([0.9, -1.9, 0.5]))
