"""Learned inner step sizes, the multi-step loss and the outer-lr schedule: meta-gradients against an independent
float64 autograd unroll, finite differences, the reuse-last rule, and the per-step accuracy curves."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch.func import functional_call

from dist_signmaml.algorithms import MetaLearner, make_rule
from dist_signmaml.algorithms.inner import multi_step_weights
from dist_signmaml.algorithms.learner import LOG_STEP_SIZES, to_export_names, to_learner_names
from dist_signmaml.config import ConfigError, TrainConfig
from dist_signmaml.optim import OuterLRSchedule, build_optimizer, outer_lr_factor
from tests.test_algorithms import TASKS, tiny_problem

pytestmark = pytest.mark.unit


def learner_for(model, algo, steps, lr, mode, task_parallel="loop", multi_step=False, seed=0):
    learner = MetaLearner(model, make_rule(algo), lr, steps, task_parallel, learn_inner_lr=mode,
                          multi_step_loss=multi_step)
    if mode != "none":  # move the sizes off their common initial value, so per-tensor/per-step mix-ups show
        generator = torch.Generator().manual_seed(seed)
        with torch.no_grad():
            log_sizes = getattr(learner, LOG_STEP_SIZES)
            log_sizes.add_(0.5 * torch.randn(log_sizes.shape, generator=generator, dtype=log_sizes.dtype))
    return learner


def gradients(learner, support, query, progress=1.0):
    learner.zero_grad()
    loss = learner(*support, *query, progress=progress).loss
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in learner.named_parameters()}


def direction_of(algo, gradient):
    return torch.sign(gradient) if algo == "sign" else gradient


def reference_unroll(learner, support, query, algo, weights=None, create_graph=True):
    """Independent plain autograd: per task, y_{t+1} = y_t - exp(log_beta[l, t]) * d(grad_t) with
    torch.autograd.grad(create_graph=True) through every step, the (weighted) query losses summed over tasks."""
    model = learner.model
    params = dict(model.named_parameters())
    log_sizes = getattr(learner, LOG_STEP_SIZES)
    names = list(params)
    steps = learner.inner_steps
    total = 0.0
    for t in range(TASKS):
        fast = dict(params)
        task_total = 0.0
        for step in range(steps):
            loss = F.cross_entropy(functional_call(model, fast, (support[0][t],)), support[1][t])
            grads = torch.autograd.grad(loss, list(fast.values()), create_graph=create_graph)
            column = min(step, log_sizes.shape[1] - 1)
            fast = {n: fast[n] - torch.exp(log_sizes[names.index(n), column]) * direction_of(algo, g)
                    for n, g in zip(names, grads)}
            if weights is not None:
                query_loss = F.cross_entropy(functional_call(model, fast, (query[0][t],)), query[1][t])
                task_total = task_total + weights[step] * query_loss
        if weights is None:
            task_total = F.cross_entropy(functional_call(model, fast, (query[0][t],)), query[1][t])
        total = total + task_total
    meta_loss = total / TASKS
    everything = dict(learner.named_parameters())
    grads = torch.autograd.grad(meta_loss, list(everything.values()))
    return meta_loss.detach(), dict(zip(everything, grads))


def assert_close(a, b, **tol):
    assert a.keys() == b.keys()
    for name in a:
        torch.testing.assert_close(a[name], b[name], **tol, msg=lambda m: f"{name}: {m}")


@pytest.mark.parametrize("mode", ["layer", "layer_step"])
@pytest.mark.parametrize("steps", [1, 3])
def test_sign_step_size_gradient_equals_full_unroll(mode, steps):
    """d l_q(y_m)/d log beta_{l,t} = -beta_{l,t} <grad l_q(y_m)_l, sign(g_t)_l>, exact at first-order cost."""
    model, support, query = tiny_problem(7)
    learner = learner_for(model, "sign", steps, 0.05, mode)
    loss, ours = gradients(learner, support, query)
    ref_loss, reference = reference_unroll(learner, support, query, "sign")
    torch.testing.assert_close(loss, ref_loss, rtol=1e-12, atol=1e-12)
    assert_close(ours, reference, rtol=1e-10, atol=1e-12)
    assert ours[LOG_STEP_SIZES].abs().max() > 1e-4  # the step sizes do get a signal
    # teeth: a fixed-beta learner gives another initialisation gradient once the learned sizes moved
    fixed = learner_for(model, "sign", steps, 0.05, "none")
    _, plain = gradients(fixed, support, query)
    assert max((ours[n] - plain[n]).abs().max().item() for n in plain) > 1e-4


@pytest.mark.parametrize("task_parallel", ["loop", "vmap"])
def test_maml_step_sizes_are_exact_through_the_graph(task_parallel):
    model, support, query = tiny_problem(8)
    learner = learner_for(model, "maml", 2, 0.2, "layer_step", task_parallel)
    loss, ours = gradients(learner, support, query)
    _, reference = reference_unroll(learner, support, query, "maml")
    assert_close(ours, reference, rtol=1e-9, atol=1e-11)


def test_fo_step_size_gradient_is_first_order():
    """fo's beta gradient drops the second-order terms, like its x gradient: the unroll without create_graph."""
    model, support, query = tiny_problem(9)
    learner = learner_for(model, "fo", 2, 0.2, "layer")
    _, ours = gradients(learner, support, query)
    _, first_order = reference_unroll(learner, support, query, "fo", create_graph=False)
    _, second_order = reference_unroll(learner, support, query, "fo", create_graph=True)
    assert_close(ours, first_order, rtol=1e-10, atol=1e-12)
    assert (ours[LOG_STEP_SIZES] - second_order[LOG_STEP_SIZES]).abs().max() > 1e-6


def test_sign_step_size_gradient_matches_central_differences():
    """Finite differences in log beta, at a point where +-eps flips no support-gradient sign (checked)."""
    model, support, query = tiny_problem(10)
    learner = learner_for(model, "sign", 3, 0.05, "layer_step")
    _, analytic = gradients(learner, support, query)
    log_sizes = getattr(learner, LOG_STEP_SIZES)
    generator = torch.Generator().manual_seed(1)
    direction = torch.randn(log_sizes.shape, generator=generator, dtype=log_sizes.dtype)
    eps = 1e-6
    values, adapted = [], []
    for sign in (1, -1):
        with torch.no_grad():
            log_sizes.add_(sign * eps * direction)
            values.append(learner(*support, *query).loss.item())
            adapted.append(sign_pattern(learner, support))
            log_sizes.sub_(sign * eps * direction)
    # Coordinates whose gradient is rounding noise (conv biases ahead of BatchNorm: their exact gradient is 0, and
    # they do not change the output either) may flip; no other may.
    for a, b in zip(*adapted):
        clear = (a.abs() > 1e-10) & (b.abs() > 1e-10)
        assert torch.equal(torch.sign(a[clear]), torch.sign(b[clear])), "a support-gradient sign flipped within +-eps"
    numeric = (values[0] - values[1]) / (2 * eps)
    exact = (analytic[LOG_STEP_SIZES] * direction).sum().item()
    assert abs(exact - numeric) <= 1e-6 * max(1.0, abs(numeric)), (exact, numeric)
    assert abs(exact) > 1e-4


def sign_pattern(learner, support):
    """Every support gradient that steps 2..m use, for every task (what must not change within
    +-eps; step 1's gradient is taken at x and does not depend on beta)."""
    from torch.func import grad

    from dist_signmaml.algorithms.inner import adapt, task_loss

    patterns = []
    params = {n: p.detach() for n, p in learner.model.named_parameters()}
    for t in range(TASKS):
        def record(step, adapted, t=t):
            if step < learner.inner_steps:
                gradient = grad(lambda p: task_loss(learner.model, p, support[0][t], support[1][t]))(adapted)
                patterns.append(torch.cat([g.reshape(-1) for g in gradient.values()]))

        adapt(learner.model, params, support[0][t], support[1][t], rule=learner.rule, steps=learner.inner_steps,
              lr=learner.step_sizes(), differentiate_through=False, after_step=record)
    return patterns


def test_test_steps_past_the_trained_ones_reuse_the_last_sizes():
    model, support, query = tiny_problem(11)
    learner = learner_for(model, "sign", 2, 0.05, "layer_step")
    with torch.no_grad():
        longer = learner(*support, *query, inner_steps=4).task_accuracies
        log_sizes = getattr(learner, LOG_STEP_SIZES)
        explicit = MetaLearner(model, make_rule("sign"), 0.05, 4, "loop", learn_inner_lr="layer_step")
        getattr(explicit, LOG_STEP_SIZES).copy_(torch.cat([log_sizes, log_sizes[:, -1:], log_sizes[:, -1:]], dim=1))
        curve_long = explicit.accuracy_curves(*support, *query, steps=4)
        curve = learner.accuracy_curves(*support, *query, steps=4)
    torch.testing.assert_close(curve, curve_long)
    torch.testing.assert_close(curve[:, -1], longer)


@pytest.mark.parametrize("algo", ["sign", "fo", "maml"])
def test_multi_step_loss_equals_weighted_unroll(algo):
    """sum_t w_t l_q(y_t) with MAML++ weights; sign/fo through the flat-memory surrogate, MAML through its graph."""
    model, support, query = tiny_problem(12)
    lr = 0.05 if algo == "sign" else 0.2
    learner = learner_for(model, algo, 3, lr, "layer_step", multi_step=True)
    progress = 0.04  # early in training: every step still carries weight
    weights = multi_step_weights(3, progress)
    assert min(weights) > 0.1
    loss, ours = gradients(learner, support, query, progress=progress)
    ref_loss, reference = reference_unroll(learner, support, query, algo, weights=weights,
                                           create_graph=algo != "fo")
    torch.testing.assert_close(loss, ref_loss, rtol=1e-12, atol=1e-12)
    assert_close(ours, reference, rtol=1e-9, atol=1e-11)


def test_multi_step_loss_at_the_end_of_annealing_is_almost_the_final_loss():
    weights = multi_step_weights(5, 1.0)
    assert math.isclose(sum(weights), 1.0)
    assert weights[:-1] == [0.03 / 5] * 4 and weights[-1] == pytest.approx(1 - 4 * 0.03 / 5)
    assert multi_step_weights(5, 0.0) == pytest.approx([0.2] * 5)
    assert multi_step_weights(1, 0.3) == [1.0]
    halfway = multi_step_weights(4, 0.05)
    assert halfway[0] == pytest.approx(0.125) and halfway[-1] == pytest.approx(1 - 3 * 0.125)


def test_accuracy_curves_equal_one_evaluation_per_step_count():
    model, support, query = tiny_problem(13)
    learner = learner_for(model, "sign", 1, 0.05, "layer")
    with torch.no_grad():
        curve = learner.accuracy_curves(*support, *query, steps=3, lr_scale=0.5)
        for steps in (1, 2, 3):
            one = learner(*support, *query, inner_steps=steps, lr_scale=0.5).task_accuracies
            torch.testing.assert_close(curve[:, steps], one)
        torch.testing.assert_close(curve[:, 0], learner(*support, *query, inner_steps=0).task_accuracies)


def test_step_sizes_travel_through_the_export_names():
    model, _, _ = tiny_problem(14)
    learner = learner_for(model, "sign", 2, 0.05, "layer_step")
    exported = to_export_names(learner.state_dict())
    assert LOG_STEP_SIZES in exported and "model." not in "".join(exported)
    fresh = MetaLearner(tiny_problem(15)[0], make_rule("sign"), 0.05, 2, "loop", learn_inner_lr="layer_step")
    fresh.load_state_dict(to_learner_names(exported))
    assert fresh.step_size_values() == learner.step_size_values()
    assert set(fresh.step_size_values()) == {n for n, _ in model.named_parameters()}


def test_step_sizes_get_their_own_outer_rate_and_the_schedule_is_a_pure_function_of_the_step():
    model, support, query = tiny_problem(16)
    learner = learner_for(model, "sign", 1, 0.05, "layer")
    optimizer = build_optimizer(learner, 1e-3, 0.1)
    assert [g["lr"] for g in optimizer.param_groups] == [1e-3, 0.1]
    schedule = OuterLRSchedule(optimizer, "cosine", 10)
    schedule.apply(1)
    assert [g["lr"] for g in optimizer.param_groups] == [1e-3, 0.1]
    schedule.apply(6)
    assert optimizer.param_groups[1]["lr"] == pytest.approx(0.05)
    assert outer_lr_factor("cosine", 10, 10) == pytest.approx(0.5 * (1 + math.cos(math.pi * 0.9)))
    assert outer_lr_factor("constant", 7, 10) == 1.0
    before = getattr(learner, LOG_STEP_SIZES).detach().clone()
    learner(*support, *query).loss.backward()
    optimizer.step()
    moved = (getattr(learner, LOG_STEP_SIZES).detach() - before).abs()
    # Adam's first step moves every coordinate by about its group's rate: the sizes at 0.05, not at alpha
    assert moved.max().item() == pytest.approx(0.05, rel=1e-3)


def saved_bytes(learner, support, query) -> int:
    """Bytes the autograd graph of one meta-loss keeps for its backward: every tensor a node saved (the `_saved_*`
    attributes of each grad_fn), counted once per storage. (torch.func.grad refuses saved-tensor hooks, so the
    graph is walked instead.)"""
    loss = learner(*support, *query, progress=0.0).loss
    storages, stack, visited = {}, [loss.grad_fn], set()
    while stack:
        node = stack.pop()
        if node is None or node in visited:
            continue
        visited.add(node)
        for attribute in dir(node):
            if attribute.startswith("_saved_"):
                value = getattr(node, attribute)
                for tensor in value if isinstance(value, (tuple, list)) else (value,):
                    if isinstance(tensor, torch.Tensor) and tensor.numel():
                        storage = tensor.untyped_storage()
                        storages[storage.data_ptr()] = storage.nbytes()
        stack.extend(next_node for next_node, _ in node.next_functions)
    return sum(storages.values())


@pytest.mark.parametrize("multi_step", [False, True])
def test_sign_graph_memory_is_flat_in_inner_steps_up_to_one_direction_per_learned_step(multi_step):
    """Fixed beta: what backward keeps does not grow with m (eq. 14 needs the query graph only; the multi-step loss
    keeps one running sum). Learned sizes add one parameter-sized direction per step (and, with the multi-step
    loss, that step's query gradient): parameters, never activations."""
    model, support, query = tiny_problem(17)
    parameter_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    # (m = 1 with the multi-step loss is the plain loss: compare two multi-step lengths)
    lengths = (2, 5) if multi_step else (1, 4)
    fixed = [saved_bytes(MetaLearner(model, make_rule("sign"), 0.05, m, "loop", multi_step_loss=multi_step),
                         support, query) for m in lengths]
    assert fixed[1] <= fixed[0] + 1024, fixed
    learned = [saved_bytes(MetaLearner(model, make_rule("sign"), 0.05, m, "loop", learn_inner_lr="layer_step",
                                       multi_step_loss=multi_step), support, query) for m in lengths]
    growth = learned[1] - learned[0]
    # 3 more steps, per task one direction each (and the multi-step loss's query gradient g_t)
    directions = TASKS * 3 * parameter_bytes * (2 if multi_step else 1)
    # plus a few scalars per step (the sizes' exp and indexing): under 200 bytes per step and task
    assert directions <= growth <= directions + TASKS * 3 * 200, (learned, parameter_bytes)
    # the MAML graph, by contrast, grows with m by whole support passes
    maml = [saved_bytes(MetaLearner(model, make_rule("maml"), 0.05, m, "loop"), support, query) for m in lengths]
    assert maml[1] - maml[0] > 4 * growth


def test_a_run_with_a_cosine_schedule_cannot_be_resumed_at_another_length():
    """--steps may change on resume (a constant-rate run can be extended), but the cosine schedule spans --steps: a
    4000-step run resumed at 8000 would jump from about 0 back to half the outer rate. A run trained as the first
    part of a longer one (--schedule_steps) goes on to that length, and the error says how to keep the span."""
    saved = TrainConfig(steps=4000, outer_lr_schedule="cosine")
    assert TrainConfig(steps=4000, outer_lr_schedule="cosine").resume_differences(vars(saved)) == []
    assert TrainConfig(steps=8000, outer_lr_schedule="cosine").resume_differences(vars(saved)) == [
        "--steps: 4000 -> 8000 (the cosine outer learning-rate schedule spans 4000 meta-steps, now 8000; give "
        "--schedule_steps=4000 to keep it)"]
    part = TrainConfig(steps=4000, schedule_steps=8000, outer_lr_schedule="cosine")
    assert TrainConfig(steps=8000, outer_lr_schedule="cosine").resume_differences(vars(part)) == []
    assert TrainConfig(steps=4000, outer_lr_schedule="cosine").resume_differences(vars(part)) == [
        "--schedule_steps: 8000 -> 0 (the cosine outer learning-rate schedule spans 8000 meta-steps, now 4000; give "
        "--schedule_steps=8000 to keep it)"]
    constant = TrainConfig(steps=4000)
    assert TrainConfig(steps=8000).resume_differences(vars(constant)) == []


def test_a_multi_step_loss_run_changes_length_only_past_its_annealing():
    """The multi-step loss anneals its weights over the first 10% of the span: a 1000-step run resumed at 20000
    would go back from the final weights to half-annealed ones at step 1001; an 8000-step run resumed at 16000 is
    past both windows, so the steps to come are those of the longer run (its first 8000 were not: see
    docs/fidelity.md)."""
    def msl(steps, **options):
        return TrainConfig(steps=steps, multi_step_loss=True, inner_steps=5, **options)

    assert msl(16000).resume_differences(vars(msl(8000)), step=8000) == []
    assert msl(20000).resume_differences(vars(msl(1000)), step=1000) == [
        "--steps: 1000 -> 20000 (the multi-step loss anneals its weights over the first 10% of 1000 meta-steps, now "
        "of 20000, and step 1000 is inside that; give --schedule_steps=1000 to keep it)"]
    assert msl(20000, schedule_steps=1000).resume_differences(vars(msl(1000)), step=1000) == []
    assert msl(20000).resume_differences(vars(msl(1000, schedule_steps=20000)), step=1000) == []
    with pytest.raises(ConfigError, match=r"--schedule_steps=500 is invalid: expected 0 \(= --steps\) or an "
                                          r"integer >= --steps \(1000\)"):
        msl(1000, schedule_steps=500).validate()
