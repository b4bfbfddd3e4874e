"""Everyday rough edges: a run with nothing validated or tested, the train/accuracy_before description, `plot`
without matplotlib, evaluation file names that never replace another result, the ETA, and the sweep's log lines."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap

import pytest
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from dist_signmaml.config import TrainConfig
from dist_signmaml.evaluate import duration, evaluate
from dist_signmaml.monitor import TAG_DESCRIPTIONS
from dist_signmaml.sweep import run_grid
from dist_signmaml.train import train
from tests.conftest import PYTHON, REPO_ROOT


@pytest.fixture(scope="module")
def untested_run(tmp_path_factory, omniglot_root, one_torch_thread):
    """Two logged steps, no validation and no test: only model.safetensors."""
    out = tmp_path_factory.mktemp("edges") / "run"
    train(TrainConfig.from_options(ways=5, shots=1, queries=1, meta_batch=2, hidden=16, steps=2, log_every=1,
                                   test_inner_steps=1, eval_episodes=0, test_episodes=0, data=str(omniglot_root),
                                   out=str(out), seed=4))
    return out


def test_results_md_without_validation_or_test_has_no_empty_table(untested_run):
    text = (untested_run / "results.md").read_text()
    assert "| split |" not in text and "| --- |" not in text
    assert "Not validated or tested" in text and "python -m dist_signmaml.evaluate RUN_DIR" in text
    assert "Time per meta-iteration" in text


def test_accuracy_before_carries_its_explanation(untested_run):
    files = sorted(untested_run.rglob("events.out.tfevents*"))
    found = []
    for file in files:
        events = EventAccumulator(str(file), size_guidance={"scalars": 0})
        events.Reload()
        if "train/accuracy_before" in events.Tags()["scalars"]:
            found.append(events)
    assert len(found) == 1, files
    events = found[0]
    assert [e.step for e in events.Scalars("train/accuracy_before")] == [1, 2]
    assert all(0.0 <= e.value <= 1.0 for e in events.Scalars("train/accuracy_before"))
    description = events.SummaryMetadata("train/accuracy_before").summary_description
    assert description == TAG_DESCRIPTIONS["train/accuracy_before"] and "1/ways" in description


def test_plot_without_matplotlib_says_which_extra_to_install(tmp_path, subprocess_env):
    hide = ("import runpy, sys; sys.modules['matplotlib'] = None; sys.argv = ['plot', 'somewhere']; "
            "runpy.run_module('dist_signmaml.plot', run_name='__main__')")
    done = subprocess.run([PYTHON, "-c", hide], capture_output=True, text=True, env=subprocess_env, timeout=120,
                          cwd=REPO_ROOT)
    assert done.returncode == 2
    assert done.stderr.strip().splitlines() == [
        ("error: plotting needs matplotlib, which is not installed: the [plot] extra, pip install -e '.[plot]' in "
         "the dist_signmaml checkout (or pip install matplotlib)")]


def test_evaluation_files_name_weights_and_episodes_and_never_replace_another(untested_run, capsys,
                                                                              one_torch_thread):
    first = evaluate(str(untested_run), episodes=3, inner_steps=1, batch=2)
    out = capsys.readouterr().out
    assert "evaluate test: 3 episodes on 1 process(es)" in out and "s per episode -> about" in out
    name = "eval_test_sign_5w1s_1steps_final_3ep.json"
    assert json.loads((untested_run / name).read_text())["accuracy"] == first["accuracy"]
    other = evaluate(str(untested_run), episodes=3, inner_steps=1, batch=2, queries=2)
    assert json.loads((untested_run / name).read_text())["queries"] == 1, "the first evaluation is kept"
    assert json.loads((untested_run / name.replace(".json", "_2.json")).read_text())["accuracy"] == other["accuracy"]
    evaluate(str(untested_run), episodes=3, inner_steps=1, batch=3)  # the same evaluation again: same file
    assert sorted(p.name for p in untested_run.glob("eval_*.json")) == [name, name.replace(".json", "_2.json")]
    assert capsys.readouterr().out.count(f"-> {untested_run / name}") == 1


def test_durations_read_well():
    assert [duration(s) for s in (9.4, 130, 3725, 5400)] == ["9 s", "2 min 10 s", "1 h 2 min", "1 h 30 min"]


def test_sweep_says_where_each_log_is_and_how_far_it_is(tmp_path, capsys):
    fake_train = tmp_path / "fake_train.py"
    fake_train.write_text(textwrap.dedent("""
        import json, pathlib, sys
        options = dict(arg[2:].split("=", 1) for arg in sys.argv if arg.startswith("--") and "=" in arg)
        print("training with beta", options["inner_lr"])
        result = {"best_val": {"accuracy": float(options["inner_lr"]) * 100, "ci95": 0.01, "step": 1}}
        pathlib.Path(options["out"], "results.json").write_text(json.dumps(result))
    """))
    run_grid([0.004, 0.006], "sign", tmp_path / "sign", f"{sys.executable} {fake_train}", {"steps": 1},
                     finished_before=1, planned=5)
    lines = capsys.readouterr().out.splitlines()
    logs = [tmp_path / "sign" / f"beta_{b}" / "train.log" for b in ("0.004", "0.006")]
    assert lines == [f"sweep run 2 of 5 planned so far: sign beta=0.004, log {logs[0]} (tail -f to follow)",
                     lines[1], f"sweep run 3 of 5 planned so far: sign beta=0.006, log {logs[1]} (tail -f to follow)",
                     lines[3]]
    assert lines[1].startswith("  sign beta=0.004: best val 40.00 ± 1.00% in ")
    assert logs[1].read_text() == "training with beta 0.006\n"
