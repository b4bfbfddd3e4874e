"""Partial adaptation (`--adapt head | last:K`) inside the one inner loop: exact meta-gradients, float64."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch.func import functional_call

from dist_signmaml.algorithms import MetaLearner, adapt, make_rule
from dist_signmaml.algorithms.rules import sign_step
from dist_signmaml.models import adapted_parameter_names, build_backbone


pytestmark = pytest.mark.usefixtures("one_torch_thread")



def problem(name: str, seed: int = 0):
    """A 3-way, 2-shot, 2-query batch of 2 tasks on 16 px images and a tiny float64 backbone."""
    torch.manual_seed(seed)
    model = build_backbone(name, in_channels=1, ways=3, hidden={"conv4": 4, "resnet12": 2}[name], image_size=16)
    model = model.double()
    labels = lambda k: torch.arange(3).repeat_interleave(k).expand(2, -1).clone()  # noqa: E731
    batch = (torch.randn(2, 6, 1, 16, 16, dtype=torch.float64), labels(2),
             torch.randn(2, 6, 1, 16, 16, dtype=torch.float64), labels(2))
    return model, batch


def meta_gradient(model, batch, algo, steps, lr, adapted, task_parallel="loop"):
    learner = MetaLearner(model, make_rule(algo), lr, steps, task_parallel, adapted_names=adapted)
    learner.zero_grad()
    output = learner(*batch)
    output.loss.backward()
    return output.loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}


def unrolled_reference(model, batch, steps, lr, update, adapted):
    """Independent reference: a per-task unroll that differentiates the support loss w.r.t. the adapted parameters
    with torch.autograd.grad(create_graph=True), updates only those, and backpropagates the query loss through
    everything (into adapted and shared parameters alike)."""
    support_x, support_y, query_x, query_y = batch
    params = dict(model.named_parameters())
    names = [n for n in params if n in adapted]
    total = 0.0
    for t in range(len(support_x)):
        fast = dict(params)
        for _ in range(steps):
            loss = F.cross_entropy(functional_call(model, fast, (support_x[t],)), support_y[t])
            grads = torch.autograd.grad(loss, [fast[n] for n in names], create_graph=True)
            fast = {**fast, **update({n: fast[n] for n in names}, dict(zip(names, grads)), lr)}
        total = total + F.cross_entropy(functional_call(model, fast, (query_x[t],)), query_y[t])
    grads = torch.autograd.grad(total / len(support_x), list(params.values()))
    return dict(zip(params, grads))


def sgd(params, grads, lr):
    return {n: params[n] - lr * grads[n] for n in params}


def assert_all_close(a, b, **tolerance):
    for name in a:
        torch.testing.assert_close(a[name], b[name], **tolerance, msg=lambda m: f"{name}: {m}")


@pytest.mark.parametrize("name,spec,steps", [("conv4", "head", 3), ("conv4", "last:2", 2), ("resnet12", "last:1", 2)])
def test_sign_partial_meta_gradient_equals_full_unroll(name, spec, steps):
    """Eq. 14 for the adapted part: the first-order Sign-MAML gradient (nothing differentiated through the inner
    loop) equals autograd through the whole create_graph unroll — for the adapted parameters and for the shared
    ones, which reach the adapted weights only through sign (derivative 0)."""
    model, batch = problem(name)
    adapted = adapted_parameter_names(model, spec)
    _, ours = meta_gradient(model, batch, "sign", steps, 0.05, adapted)
    reference = unrolled_reference(model, batch, steps, 0.05, sign_step, adapted)
    assert_all_close(ours, reference, rtol=1e-10, atol=1e-12)
    # Teeth: adapting everything gives another meta-gradient, so the partial one is not the full one in disguise.
    _, full = meta_gradient(model, batch, "sign", steps, 0.05, None)
    assert max((ours[n] - full[n]).abs().max().item() for n in ours) > 1e-4


@pytest.mark.parametrize("name,spec", [("conv4", "head"), ("resnet12", "last:1")])
def test_maml_partial_meta_gradient_equals_second_order_unroll(name, spec):
    """MAML with partial adaptation keeps the graph through the shared parameters too (eq. 5 restricted)."""
    model, batch = problem(name, seed=1)
    adapted = adapted_parameter_names(model, spec)
    _, ours = meta_gradient(model, batch, "maml", 2, 0.3, adapted)
    assert_all_close(ours, unrolled_reference(model, batch, 2, 0.3, sgd, adapted), rtol=1e-9, atol=1e-11)


def test_fo_partial_drops_only_the_second_order_terms():
    model, batch = problem("conv4", seed=2)
    adapted = adapted_parameter_names(model, "last:1")
    _, fo = meta_gradient(model, batch, "fo", 2, 0.3, adapted)
    _, maml = meta_gradient(model, batch, "maml", 2, 0.3, adapted)
    assert max((fo[n] - maml[n]).abs().max().item() for n in fo) > 1e-4  # the dropped terms are not zero here
    # fo = the create_graph-free unroll: the support gradients treated as constants
    detached_sgd = lambda p, g, lr: sgd(p, {n: v.detach() for n, v in g.items()}, lr)  # noqa: E731
    assert_all_close(fo, unrolled_reference(model, batch, 2, 0.3, detached_sgd, adapted), rtol=1e-10, atol=1e-12)


def test_adapt_moves_only_the_selected_parameters_by_beta():
    model, (support_x, support_y, _, _) = problem("resnet12", seed=3)
    params = {n: p.detach() for n, p in model.named_parameters()}
    adapted = adapted_parameter_names(model, "head")
    result = adapt(model, params, support_x[0], support_y[0], rule=make_rule("sign"), steps=1, lr=0.01,
                   differentiate_through=False, adapted_names=adapted)
    assert result.keys() == params.keys()
    for name, value in result.items():
        if name in adapted:
            moved = (value - params[name]).abs()
            assert torch.allclose(moved[moved > 0], torch.full_like(moved[moved > 0], 0.01)) and moved.gt(0).any()
        else:
            assert value is params[name], f"{name} is shared and must be passed through untouched"


def test_partial_adaptation_vmap_equals_loop():
    model, batch = problem("resnet12", seed=4)
    adapted = adapted_parameter_names(model, "last:2")
    for algo in ("sign", "maml"):
        loop_loss, loop = meta_gradient(model, batch, algo, 2, 0.05, adapted, "loop")
        vmap_loss, vmapped = meta_gradient(model, batch, algo, 2, 0.05, adapted, "vmap")
        torch.testing.assert_close(loop_loss, vmap_loss, rtol=1e-10, atol=1e-12)
        assert_all_close(loop, vmapped, rtol=1e-8, atol=1e-10)
