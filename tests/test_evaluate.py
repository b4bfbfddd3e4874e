"""Meta-test: the 95% interval, reproducing a run's test result from its files, one process vs two, bad input."""

from __future__ import annotations

import json
import math
import os
import subprocess

import pytest
import torch

from dist_signmaml.config import TrainConfig
from dist_signmaml.evaluate import confidence_interval, evaluate, main, weights_file
from dist_signmaml.metatest import ranked
from dist_signmaml.train import train
from tests.conftest import PYTHON, REPO_ROOT


def test_confidence_interval_is_1_96_s_over_sqrt_n():
    accuracies = torch.tensor([1.0, 0.0, 1.0, 1.0, 0.5])
    mean, half_width = confidence_interval(accuracies)
    s = math.sqrt(sum((a - 0.7) ** 2 for a in (1.0, 0.0, 1.0, 1.0, 0.5)) / 4)  # Bessel-corrected sample std
    assert mean == pytest.approx(0.7)
    assert half_width == pytest.approx(1.96 * s / math.sqrt(5))
    assert confidence_interval(torch.tensor([0.4])) == (pytest.approx(0.4), 0.0)


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory, omniglot_root):
    """A 2-step run that validates once (at its end), keeps best weights and tests 3 episodes."""
    out = tmp_path_factory.mktemp("eval") / "run"
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        train(TrainConfig.from_options(ways=5, shots=1, queries=1, meta_batch=2, hidden=16, steps=2, test_inner_steps=3,
                                       eval_every=0, eval_episodes=2, test_episodes=3, data=str(omniglot_root),
                                       out=str(out), seed=2))
    finally:
        torch.set_num_threads(threads)
    return out


def test_evaluate_reproduces_the_runs_test_result(run_dir, tmp_path):
    results = json.loads((run_dir / "results.json").read_text())
    out = tmp_path / "eval.json"
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        again = evaluate(str(run_dir), episodes=3, inner_steps=3, out=str(out))
    finally:
        torch.set_num_threads(threads)
    assert again["weights"].endswith("model_best.safetensors")
    assert again["accuracy"] == results["test"]["accuracy"] and again["ci95"] == results["test"]["ci95"]
    assert json.loads(out.read_text())["episodes"] == 3


def test_step_counts_are_scored_from_one_pass_as_separate_evaluations_would(run_dir, tmp_path):
    """fo at a large beta, so the accuracy moves from one step count to the next and a curve read at the wrong
    index would show. 5 queries per class over 6 episodes (150 predictions): with the run's 1 query over 4 episodes
    (20 predictions) all three counts once scored the same 35.00%, which proves nothing."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    common = {"episodes": 6, "queries": 5, "algo": "fo", "inner_lr": 0.5, "batch": 2}
    try:
        curve = evaluate(str(run_dir), inner_steps=3, step_counts=(1, 2), out=str(tmp_path / "curve.json"), **common)
        separate = {k: evaluate(str(run_dir), inner_steps=k, out=str(tmp_path / f"{k}.json"), **common)
                    for k in (1, 2, 3)}
    finally:
        torch.set_num_threads(threads)
    assert [s["inner_steps"] for s in curve["by_steps"]] == [1, 2, 3]
    assert len({separate[k]["accuracy"] for k in (1, 2, 3)}) > 1, "the counts must differ for the test to mean much"
    for score in curve["by_steps"]:
        alone = separate[score["inner_steps"]]
        assert (score["accuracy"], score["ci95"]) == pytest.approx((alone["accuracy"], alone["ci95"]), abs=1e-12)
    assert curve["accuracy"] == pytest.approx(separate[3]["accuracy"], abs=1e-12)
    best = max(curve["by_steps"], key=lambda s: (ranked(s["accuracy"]), -s["inner_steps"]))
    assert curve["best_steps"] == best


def test_weights_choice(run_dir, tmp_path):
    assert weights_file(run_dir).name == "model_best.safetensors"
    assert weights_file(run_dir, "final").name == "model.safetensors"
    assert weights_file(run_dir / "model.safetensors").name == "model.safetensors"
    (tmp_path / "model.safetensors").write_bytes((run_dir / "model.safetensors").read_bytes())
    assert weights_file(tmp_path).name == "model.safetensors", "a run that never validated has only final weights"


def test_two_processes_report_exactly_the_numbers_of_one(run_dir, tmp_path, subprocess_env):
    """5 episodes over 2 ranks (3 + 2, so the gather pads one rank) against the same 5 in one process."""
    common = [str(run_dir), "--episodes", "5", "--inner_steps", "2", "--batch", "2", "--step_counts", "1,2"]
    single = subprocess.run([PYTHON, "-m", "dist_signmaml.evaluate", *common, "--out", str(tmp_path / "one.json")],
                            capture_output=True, text=True, env=subprocess_env, timeout=300, cwd=REPO_ROOT)
    assert single.returncode == 0, single.stderr[-3000:]
    accelerate = os.path.join(os.path.dirname(PYTHON), "accelerate")
    double = subprocess.run([accelerate, "launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1",
                             "--mixed_precision", "no", "--dynamo_backend", "no", "-m", "dist_signmaml.evaluate",
                             *common, "--out", str(tmp_path / "two.json")],
                            capture_output=True, text=True, env=subprocess_env | {"ACCELERATE_USE_CPU": "1"},
                            timeout=300, cwd=REPO_ROOT)
    assert double.returncode == 0, double.stderr[-3000:]
    one, two = (json.loads((tmp_path / name).read_text()) for name in ("one.json", "two.json"))
    assert (one["world_size"], two["world_size"]) == (1, 2)
    for key in ("accuracy", "ci95", "episodes", "by_steps"):  # by_steps: the [episodes, counts] gather
        assert one[key] == two[key], key
    line = [text for text in single.stdout.replace("\r", "\n").splitlines() if " over 5 episodes" in text]
    assert line and f"{100 * one['accuracy']:.2f} ± {100 * one['ci95']:.2f}%" in line[0], single.stdout[-2000:]


ENDS_ITS_GROUPS = """
import sys
import torch.distributed as dist
from dist_signmaml.config import ConfigError, TrainConfig
from dist_signmaml.evaluate import evaluate
from dist_signmaml.train import train
run_dir, out, what = sys.argv[1:]
if what == "evaluate":
    evaluate(run_dir, episodes=3, inner_steps=1, out=out)
else:  # an expected error after the engine has started: the shard root has no train split
    try:
        train(TrainConfig.from_options(ways=5, shots=1, queries=1, meta_batch=2, steps=1, data=run_dir, out=out))
    except ConfigError:
        pass
print(f"process group alive: {dist.is_initialized()}", flush=True)
"""


@pytest.mark.parametrize("what", ["evaluate", "train stopped by a bad --data"])
def test_every_rank_destroys_its_process_groups_before_exit(run_dir, tmp_path, subprocess_env, what):
    """A rank that exits with its gloo group alive can abort in the interpreter's finalisation ('terminate called
    without an active exception', SIGABRT), now and then, after evaluate had written its result: every way out of
    evaluate and train ends the engine first."""
    script = tmp_path / "ends_its_groups.py"
    script.write_text(ENDS_ITS_GROUPS)
    accelerate = os.path.join(os.path.dirname(PYTHON), "accelerate")
    launched = subprocess.run([accelerate, "launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1",
                               "--mixed_precision", "no", "--dynamo_backend", "no", str(script), str(run_dir),
                               str(tmp_path / "out"), what.split()[0]],
                              capture_output=True, text=True, env=subprocess_env | {"ACCELERATE_USE_CPU": "1"},
                              timeout=300, cwd=REPO_ROOT)
    assert launched.returncode == 0, launched.stderr[-3000:]
    assert launched.stdout.count("process group alive: False") == 2, launched.stdout[-2000:]


@pytest.mark.parametrize("path,options,fragment", [
    ("missing", {}, "'{tmp}/missing' does not exist"),
    ("RUN", {"ways": 7}, "--ways=7 does not fit"),
    ("RUN", {"split": "tset"}, "--split='tset'"),
    ("RUN", {"episodes": 0}, "--episodes=0"),
    ("RUN", {"algo": "reptile"}, "--algo='reptile'"),
    ("RUN", {"weights": "newest"}, "--weights='newest'"),
    ("RUN", {"step_counts": (1, 0)}, "--step_counts=0"),
    ("RUN", {"bogus": 1}, "--bogus"),
    ("RUN/config.json", {}, "not a readable safetensors file"),
])
def test_bad_input_is_one_clear_line(run_dir, tmp_path, capsys, path, options, fragment):
    path = path.replace("RUN", str(run_dir)) if path.startswith("RUN") else str(tmp_path / path)
    with pytest.raises(SystemExit) as stopped:
        main(path, **options)
    assert stopped.value.code == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and err.startswith("error: "), err
    assert fragment.replace("{tmp}", str(tmp_path)) in err, err
