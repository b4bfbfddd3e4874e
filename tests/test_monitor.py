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


class RecordingEngine:
    """What Validator.validate needs of the engine: logging, printing and exporting are recorded, not done."""
    def __init__(self):
        self.logged, self.exported, self.printed = [], [], []

    def log(self, values, step):
        self.logged.append((step, values))

    def print0(self, *args):
        self.printed.append(" ".join(map(str, args)))

    def unwrap(self, learner):
        return learner

    def export(self, learner, path, metadata):
        self.exported.append(metadata["step"])


@pytest.mark.parametrize("select,kept_step", [("test_steps", 2), ("any_steps", 1)])
def test_validation_keeps_the_weights_its_selection_ranks_best(monkeypatch, tmp_path, select, kept_step):
    """Step 1's weights peak after 1 inner step (90%) and overshoot by 10 (40%); step 2's score 60% after 10 and
    50% after 1. At the paper's 10 steps step 2 wins; over any step count step 1 does."""
    import dist_signmaml.monitor as monitor_module

    scripted = {1: {1: 0.9, 2: 0.7, 3: 0.6, 5: 0.5, 10: 0.4}, 2: {1: 0.5, 2: 0.55, 3: 0.58, 5: 0.59, 10: 0.6}}
    asked = []

    def fake_meta_test(learner, engine, split_dir, shape, *, inner_steps, step_counts, desc, **kw):
        step = int(desc.split("@")[1])
        asked.append(tuple(step_counts))
        by_steps = [{"inner_steps": k, "accuracy": a, "ci95": 0.01} for k, a in scripted[step].items()]
        result = {"accuracy": scripted[step][inner_steps], "ci95": 0.01, "episodes": 10, "inner_steps": inner_steps}
        if step_counts:
            result |= {"by_steps": by_steps, "best_steps": max(by_steps, key=lambda s: s["accuracy"])}
        return result

    monkeypatch.setattr(monitor_module, "meta_test", fake_meta_test)
    engine = RecordingEngine()
    validator = Validator(engine, ".", None, episodes=10, every=1, last_step=2, inner_steps=10, tasks_per_batch=1,
                          out_dir=tmp_path, export_metadata={}, select=select)
    learner = torch.nn.Linear(2, 2)
    for step in (1, 2):
        validator.validate(learner, step)
    assert validator.best["step"] == kept_step and engine.exported[-1] == kept_step
    assert asked == [(1, 2, 3, 5, 10)] * 2 if select == "any_steps" else asked == [()] * 2
    if select == "any_steps":
        assert engine.logged[0][1]["val/accuracy_1_steps"] == 0.9 and engine.logged[0][1]["val/accuracy"] == 0.4


def test_results_markdown_shows_the_ranked_count_of_a_validation_over_step_counts():
    from dist_signmaml.monitor import results_markdown

    ranked = {"step": 4, "episodes": 10, "inner_steps": 10, "accuracy": 0.4, "ci95": 0.01,
              "best_steps": {"inner_steps": 1, "accuracy": 0.9, "ci95": 0.02}}
    summary = {"config": {"algo": "sign", "ways": 5, "shots": 1, "backbone": "conv4"}, "steps": 4, "world_size": 1,
               "best_val": ranked, "val_history": [ranked],
               "seconds_per_meta_iteration": {"mean": 0.1, "std": 0.0, "count": 4}, "peak_memory_mib": 10.0}
    text = results_markdown(summary)
    assert "| val (best) | step 4 | 10 | 10 | 40.00 ± 1.00% |" in text
    assert "| val (best, ranked) | step 4 | 10 | 1 | 90.00 ± 2.00% |" in text
    assert "| 4 | 40.00 ± 1.00% at 10 steps, 90.00 ± 2.00% at 1 |" in text


def test_a_validation_far_under_the_best_warns_that_training_may_be_falling_apart(monkeypatch, tmp_path):
    """A run at 94% that later reads 91% (3 points under: noise at 100 episodes) gets no warning; one that reads 61%
    (33 points under, as MAML's 20-way seed 0 did) does, naming the best step and the weights the test will use."""
    import dist_signmaml.monitor as monitor_module

    scripted = {1: 0.94, 2: 0.91, 3: 0.61}
    monkeypatch.setattr(monitor_module, "meta_test", lambda learner, engine, split_dir, shape, *, desc, **kw: {
        "accuracy": scripted[int(desc.split("@")[1])], "ci95": 0.01, "episodes": 100, "inner_steps": 1})
    engine = RecordingEngine()
    validator = Validator(engine, ".", None, episodes=100, every=1, last_step=3, inner_steps=1, tasks_per_batch=1,
                          out_dir=tmp_path, export_metadata={})
    learner = torch.nn.Linear(2, 2)
    warnings = []
    for step in (1, 2, 3):
        validator.validate(learner, step)
        warnings.append([line for line in engine.printed if line.startswith("warning:")])
        engine.printed.clear()
    assert warnings[:2] == [[], []]
    assert len(warnings[2]) == 1 and "step 3: validation lies 33.00 points under its best (step 1)" in warnings[2][0]
    assert "model_best.safetensors" in warnings[2][0] and validator.best["step"] == 1
