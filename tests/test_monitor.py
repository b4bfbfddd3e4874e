"""Inner-loop diagnostics against a plain-autograd reference, and the cadences / statistics of the monitor parts."""

from __future__ import annotations

import copy
import statistics
import time

import pytest
import torch
import torch.nn.functional as F

from dist_signmaml.algorithms import MetaLearner, make_rule
from dist_signmaml.models import build_backbone
from dist_signmaml.monitor import PhaseTimer, RunningStats, TrainMonitor, Validator


def tiny_tasks(tasks=2, ways=3, shots=1, queries=2, seed=0):
    generator = torch.Generator().manual_seed(seed)
    support_x = torch.randn(tasks, ways * shots, 1, 28, 28, generator=generator)
    query_x = torch.randn(tasks, ways * queries, 1, 28, 28, generator=generator)
    support_y = torch.arange(ways).repeat_interleave(shots).expand(tasks, -1).clone()
    query_y = torch.arange(ways).repeat_interleave(queries).expand(tasks, -1).clone()
    return support_x, support_y, query_x, query_y


def reference_diagnostics(model, support_x, support_y, query_x, query_y, lr, steps):
    """The three signals of one task with ordinary autograd on a deep copy, and a hand-written sign loop."""
    model = copy.deepcopy(model)
    x = [p.detach().clone() for p in model.parameters()]

    def gradient(images, labels):
        model.zero_grad()
        F.cross_entropy(model(images), labels).backward()
        return torch.cat([p.grad.reshape(-1) for p in model.parameters()])

    support, query = gradient(support_x, support_y), gradient(query_x, query_y)
    for _ in range(steps):  # eq. 6 by hand: y <- y - lr * sign(grad of the support loss at y)
        grads = torch.autograd.grad(F.cross_entropy(model(support_x), support_y), list(model.parameters()))
        with torch.no_grad():
            for p, g in zip(model.parameters(), grads):
                p -= lr * torch.sign(g)
    moved = torch.cat([(p.detach() != start).reshape(-1) for p, start in zip(model.parameters(), x)])
    return {"support_grad_norm": support.norm().item(),
            "sign_agreement": (support.sign() == query.sign()).float().mean().item(),
            "moved_fraction": moved.float().mean().item()}


@pytest.mark.parametrize("task_parallel", ["loop", "vmap"])
def test_diagnostics_match_plain_autograd_and_leave_the_meta_step_alone(task_parallel):
    torch.manual_seed(0)
    model = build_backbone("conv4", in_channels=1, ways=3, hidden=8, image_size=28)
    episodes = tiny_tasks()
    lr, steps = 0.01, 2
    learner = MetaLearner(model, make_rule("sign"), lr, steps, task_parallel)

    plain = learner(*episodes)
    assert plain.diagnostics is None, "diagnostics must cost nothing unless asked for"
    plain.loss.backward()
    meta_gradient = [p.grad.clone() for p in learner.parameters()]
    learner.zero_grad()
    observed = learner(*episodes, diagnostics=True)
    observed.loss.backward()

    # Asking for diagnostics changes neither the meta-loss nor the meta-gradient.
    torch.testing.assert_close(observed.loss, plain.loss)
    for p, g in zip(learner.parameters(), meta_gradient):
        torch.testing.assert_close(p.grad, g)

    per_task = [reference_diagnostics(model, *(t[i] for t in episodes), lr, steps) for i in range(2)]
    expected = {k: sum(r[k] for r in per_task) / 2 for k in per_task[0]}
    assert set(observed.diagnostics) == set(expected)
    assert observed.diagnostics["support_grad_norm"].item() == pytest.approx(expected["support_grad_norm"], rel=1e-4)
    # Signs of gradient coordinates within float noise of 0 may differ between kernels: allow a few in 10^3.
    assert observed.diagnostics["sign_agreement"].item() == pytest.approx(expected["sign_agreement"], abs=5e-3)
    assert observed.diagnostics["moved_fraction"].item() == pytest.approx(expected["moved_fraction"], abs=5e-3)
    assert 0.3 < expected["sign_agreement"] < 1 and 0.3 < expected["moved_fraction"] <= 1


def test_zero_inner_lr_moves_nothing():
    torch.manual_seed(1)
    model = build_backbone("conv4", in_channels=1, ways=3, hidden=4, image_size=28)
    with torch.no_grad():
        output = MetaLearner(model, make_rule("fo"), 0.0, 1, "loop")(*tiny_tasks(), diagnostics=True)
    assert output.diagnostics["moved_fraction"].item() == 0.0
    assert output.diagnostics["support_grad_norm"].item() > 0


def test_phase_timer_accumulates_phases_and_laps():
    timer = PhaseTimer(torch.device("cpu"))
    with timer.phase("inner_loop"):
        time.sleep(0.02)
    with timer.phase("inner_loop"):
        time.sleep(0.01)
    with timer.phase("optimizer_step"):
        pass
    lap = timer.lap()
    assert lap["inner_loop"] >= 0.03 and lap["optimizer_step"] < lap["inner_loop"]
    assert lap["meta_iteration"] == pytest.approx(lap["inner_loop"] + lap["optimizer_step"])
    assert timer.lap() == {"meta_iteration": 0.0}, "a lap starts the next iteration from zero"


def test_running_stats_agree_with_statistics_module():
    values = [0.031, 0.029, 0.035, 0.030, 0.041]
    stats = RunningStats()
    for v in values:
        stats.add(v)
    assert stats.summary() == pytest.approx({"mean": statistics.mean(values), "std": statistics.stdev(values),
                                             "count": 5})


def test_components_decide_their_own_cadence():
    validator = Validator(None, ".", None, episodes=10, every=3, last_step=10, inner_steps=1, tasks_per_batch=1,
                          out_dir=".", export_metadata={})
    assert [s for s in range(1, 11) if validator.should_validate(s)] == [3, 6, 9, 10]
    only_last = Validator(None, ".", None, episodes=10, every=0, last_step=10, inner_steps=1, tasks_per_batch=1,
                          out_dir=".", export_metadata={})
    assert [s for s in range(1, 11) if only_last.should_validate(s)] == [10]
    never = Validator(None, ".", None, episodes=0, every=3, last_step=10, inner_steps=1, tasks_per_batch=1,
                      out_dir=".", export_metadata={})
    assert not any(never.should_validate(s) for s in range(1, 11))

    class Quiet:  # the monitor only needs a device and the main-process flag for its cadence
        device, is_main = torch.device("cpu"), False

    monitor = TrainMonitor(Quiet(), log_every=4, last_step=10, first_step=0, meta_batch=4, inner_lr=0.1, optimizer=None)
    assert [s for s in range(1, 11) if monitor.should_log(s)] == [4, 8, 10]
    monitor.close()
