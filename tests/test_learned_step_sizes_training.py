"""Learned step sizes through the real trainer: logged, recorded, exported, evaluated, and kept by a resume."""

from __future__ import annotations

import json
import shutil
import sys

import pytest
from safetensors.torch import load_file

from dist_signmaml.algorithms.learner import LOG_STEP_SIZES
from tests.dist_scripts.launching import TINY_TRAIN, TRAIN, child_env, run

PYTHON_TRAIN = [sys.executable, *TRAIN]

pytestmark = pytest.mark.integration

LEARNED = ["--learn_inner_lr", "layer_step", "--inner_steps", "2", "--inner_lr_lr", "0.05", "--multi_step_loss",
           "True", "--outer_lr_schedule", "cosine", "--steps", "6", "--ckpt_every", "3", "--keep_checkpoints", "2"]


def test_learned_step_sizes_are_trained_logged_exported_and_survive_a_resume(tmp_path, omniglot_root):
    straight = tmp_path / "straight"
    first = run(PYTHON_TRAIN + TINY_TRAIN + LEARNED + ["--data", str(omniglot_root), "--out", str(straight)], child_env(),
                timeout=240)
    assert first.returncode == 0, first.stdout[-4000:]
    results = json.loads((straight / "results.json").read_text())
    learned = results["inner_lr_learned"]
    exported = load_file(str(straight / "model.safetensors"))
    backbone = sorted(k for k in exported if k != LOG_STEP_SIZES)
    assert sorted(learned) == backbone and all(len(v) == 2 for v in learned.values())  # one size per tensor and step
    assert exported[LOG_STEP_SIZES].shape == (len(backbone), 2)
    assert max(abs(v - 0.005) for sizes in learned.values() for v in sizes) > 1e-4, "the step sizes never moved"

    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    tags = set()
    for directory in sorted(p for p in (straight / "tb").rglob("*") if p.is_dir()) + [straight / "tb"]:
        events = EventAccumulator(str(directory), size_guidance={"scalars": 0}).Reload()
        tags |= set(events.Tags().get("scalars", []))
    assert {f"inner/lr/{name}/step{k}" for name in learned for k in (1, 2)} <= tags

    # resume from the step-3 checkpoint: the same sizes, bit for bit
    resumed = tmp_path / "resumed"
    shutil.copytree(straight, resumed)
    shutil.rmtree(resumed / "checkpoints" / "step_00000006")
    for name in ("model.safetensors", "results.json", "results.md"):
        (resumed / name).unlink(missing_ok=True)
    second = run(PYTHON_TRAIN + TINY_TRAIN + LEARNED + ["--data", str(omniglot_root), "--out", str(resumed), "--resume",
                                                 "True"], child_env(), timeout=240)
    assert second.returncode == 0, second.stdout[-4000:]
    assert "resumed from step 3" in second.stdout
    assert json.loads((resumed / "results.json").read_text())["inner_lr_learned"] == learned
    again = load_file(str(resumed / "model.safetensors"))
    assert all((again[k] == exported[k]).all() for k in exported)


def test_a_tiny_plan_trains_scores_and_records_a_run_and_skips_it_when_rerun(tmp_path, omniglot_root, capsys):
    from bench.fidelity import run_plan
    from bench.protocol import cell

    options = dict(plan="5w1s:m2:sign-lsl:s0", work=str(tmp_path / "work"), steps=2, record=str(tmp_path / "rec"),
                   val_episodes=4, test_episodes=4, eval_episodes=4)
    run_plan(**options)
    directory = tmp_path / "rec" / "5w1s_m2_sign-lsl_s0"
    protocol = json.loads((directory / "protocol.json").read_text())
    results = json.loads((directory / "results.json").read_text())
    assert results["config"]["learn_inner_lr"] == "layer_step" and results["config"]["inner_steps"] == 2
    assert protocol["test_episodes"] == 4 and len(protocol["val_grid"]) == 18
    assert protocol["test_chosen"] == cell(protocol["test_grid"], protocol["chosen"]["inner_steps"],
                                           protocol["chosen"]["lr_scale"])
    run_plan(**options)
    assert "5w1s_m2_sign-lsl_s0: done" in capsys.readouterr().out

    # a longer budget goes on from the kept final state, through the real trainer, and is scored afresh
    assert (directory / "resumable" / "final" / "checkpoints" / "step_00000002" / "train_state.json").is_file()
    run_plan(**options | {"steps": 4, "work": str(tmp_path / "work4"), "record": str(tmp_path / "rec4"),
                          "extend": str(tmp_path / "rec"), "test_episodes": 6})
    longer = tmp_path / "rec4" / "5w1s_m2_sign-lsl_s0"
    assert json.loads((longer / "results.json").read_text())["steps"] == 4
    assert json.loads((longer / "protocol.json").read_text())["test_episodes"] == 6
    log = (tmp_path / "work4" / "5w1s_m2_sign-lsl_s0" / "final" / "train.log").read_text()
    assert "resumed from step 2" in log
