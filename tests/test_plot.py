"""Figures from a real (tiny) run and from a sweep summary written by the sweep's own summariser."""

from __future__ import annotations

import json

import matplotlib.image
import pytest
import torch

from dist_signmaml.config import TrainConfig
from dist_signmaml.plot import load_inputs, main, plot, sweep_curves
from dist_signmaml.sweep import halve, plan, summarize
from dist_signmaml.train import train


@pytest.fixture(scope="module")
def runs(tmp_path_factory, omniglot_root):
    """Two 3-step runs (sign and fo) validating at every step."""
    root = tmp_path_factory.mktemp("plot")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        for algo in ("sign", "fo"):
            train(TrainConfig.from_options(algo=algo, ways=5, shots=1, queries=1, meta_batch=2, hidden=16, steps=3,
                                           log_every=1, eval_every=1, eval_episodes=2, test_episodes=0,
                                           test_inner_steps=1, data=str(omniglot_root), out=str(root / algo), seed=1))
    finally:
        torch.set_num_threads(threads)
    return [root / "sign", root / "fo"]


def sweep_dir(tmp_path):
    tmp_path.mkdir(parents=True)
    accuracy = {0.004: 0.61, 0.006: 0.66, 0.008: 0.64}
    found = {b: {"beta": b, "val_accuracy": a, "val_ci95": 0.02, "val_step": 100, "test_accuracy": None,
                 "test_ci95": None, "seconds_per_meta_iteration": 0.05, "run": f"sign/beta_{b:g}"}
             for b, a in accuracy.items()}
    summarize(tmp_path, {"sign": plan(list(accuracy), accuracy, 5)}, {"sign": found})
    return tmp_path


def test_every_figure_is_written_from_runs_and_a_sweep(runs, tmp_path):
    sweep = sweep_dir(tmp_path / "sweep")
    written = plot(*map(str, runs), str(sweep), out=str(tmp_path / "figures"))
    assert [p.name for p in written] == ["accuracy_vs_step.png", "time_per_iteration.png", "sweep.png"]
    for path in written:
        image = matplotlib.image.imread(path)
        assert image.shape[0] > 300 and image.shape[1] > 300 and image.std() > 0.01, path  # not blank

    loaded, sweeps = load_inputs(map(str, runs))
    assert [run["label"] for run in loaded] == ["sign", "fo"]
    assert [r["step"] for r in loaded[0]["val_history"]] == [1, 2, 3]
    assert loaded[0]["seconds_per_meta_iteration"]["count"] == 2 and not sweeps


def test_cli_prints_the_paths_and_rejects_other_directories(runs, tmp_path, capsys):
    main(str(runs[0]), out=str(tmp_path / "one"))
    assert capsys.readouterr().out.split() == [str(tmp_path / "one" / "accuracy_vs_step.png"),
                                               str(tmp_path / "one" / "time_per_iteration.png")]
    with pytest.raises(SystemExit) as stopped:
        main(str(tmp_path), out=str(tmp_path / "two"))
    assert stopped.value.code == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and "neither results.json" in err and len(err.splitlines()) == 1


def test_a_halving_sweep_is_drawn_one_curve_per_round(tmp_path):
    """After successive halving the runs end at different meta-steps (the winner at the full budget), so one curve
    of every run's final accuracy would set the winner far above runs it never met at equal steps."""
    first = {0.004: 0.61, 0.006: 0.66, 0.008: 0.64, 0.01: 0.60}
    search = halve(plan(list(first), first, 0), [first, {0.006: 0.70, 0.008: 0.72}, {0.008: 0.80}], [100, 200, 400])
    latest = first | {0.006: 0.70, 0.008: 0.80}
    found = {b: {"beta": b, "val_accuracy": a, "val_ci95": 0.02, "val_step": 100, "test_accuracy": None,
                 "test_ci95": None, "seconds_per_meta_iteration": 0.05, "run": f"sign/beta_{b:g}"}
             for b, a in latest.items()}
    out = tmp_path / "sweep"
    out.mkdir()
    summarize(out, {"sign": search}, {"sign": found})
    curves = sweep_curves(json.loads((out / "sweep.json").read_text()), "sign")
    assert [(c["label"], c["beta"], c["best"]) for c in curves] == [
        ("100 meta-steps", [0.004, 0.006, 0.008, 0.01], None), ("200 meta-steps", [0.006, 0.008], None),
        ("400 meta-steps", [0.008], 0.008)]
    assert [c["val_accuracy"] for c in curves] == [pytest.approx([61, 66, 64, 60]), pytest.approx([70, 72]),
                                                   pytest.approx([80])]
    [written] = plot(str(out), out=str(tmp_path / "figures"))
    image = matplotlib.image.imread(written)
    assert written.name == "sweep.png" and image.std() > 0.01
    plain = sweep_curves(json.loads((sweep_dir(tmp_path / "plain") / "sweep.json").read_text()), "sign")
    assert [(c["beta"], c["best"]) for c in plain] == [([0.004, 0.006, 0.008], 0.006)], "a plain sweep: one curve"
