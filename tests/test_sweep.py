"""The Appendix-A beta search: its extension rule on known accuracy curves, the SLURM array it writes, and a real
two-run sweep with its CSV / JSON / Markdown summary."""

from __future__ import annotations

import csv
import json
import subprocess
from pathlib import Path

import pytest

from dist_signmaml.artifacts import RESULTS_JSON
from dist_signmaml.sweep import PAPER_GRIDS, main, plan, run_sequentially, sweep


def search(grid, accuracy_of, max_extensions=5):
    """Drive `plan` to the end with a known accuracy curve; returns the final plan and the order of the runs."""
    accuracy, order = {}, []
    while True:
        step = plan(grid, accuracy, max_extensions)
        if not step["pending"]:
            return step, order
        order.append(step["pending"])
        accuracy |= {beta: accuracy_of(beta) for beta in step["pending"]}


def test_best_inside_the_grid_stops_at_once():
    result, order = search(PAPER_GRIDS["sign"], lambda b: -abs(b - 0.0066))
    assert order == [list(PAPER_GRIDS["sign"])]
    assert result["best"] == 0.0065 and result["status"] == "done"


def test_upper_edge_extends_like_appendix_a():
    # The paper's example: best 0.16 of 0.06..0.16 -> try 0.18 and 0.2; 0.18 wins -> stop.
    result, order = search(PAPER_GRIDS["fo"], lambda b: -abs(b - 0.18))
    assert order == [list(PAPER_GRIDS["fo"]), [0.18, 0.2]]
    assert result["best"] == 0.18 and result["status"] == "done"
    # If 0.2 wins, the search repeats past it.
    result, order = search(PAPER_GRIDS["fo"], lambda b: -abs(b - 0.25))
    assert order[1:] == [[0.18, 0.2], [0.22, 0.24], [0.26, 0.28]]
    assert result["best"] == 0.24 and result["status"] == "done"


def test_lower_edge_stays_positive_and_extensions_are_bounded():
    result, order = search(PAPER_GRIDS["sign"], lambda b: -b)  # smaller is always better
    assert order[1] == [0.0005, 0.002]  # additive, spaced like 0.0035 -> 0.005
    assert order[2] == [3.125e-05, 0.000125]  # 0.0005 - 0.0015 < 0: geometric, by the ratio 0.0005 / 0.002
    assert all(beta > 0 for round_ in order for beta in round_)
    assert result["status"] == "edge" and len(order) == 1 + 5, "max_extensions=5 rounds, then report the edge"
    capped, capped_order = search(PAPER_GRIDS["sign"], lambda b: -b, max_extensions=0)
    assert capped_order == [list(PAPER_GRIDS["sign"])] and capped["status"] == "edge" and capped["best"] == 0.0035


def test_the_log_line_per_run_prints_the_score_the_search_ranks_by(tmp_path, capsys, monkeypatch):
    """Under --val_select any_steps a run ranks by its best step count; the log line printed the raw score (the
    10-step one) instead, so a sweep log read 68.65% for the beta the search chose with 82.30%."""
    def fake_train(command, stdout, stderr):
        out = Path(next(arg.split("=", 1)[1] for arg in command if arg.startswith("--out=")))
        best_val = {"step": 40, "accuracy": 0.6865, "ci95": 0.02, "best_steps": {"accuracy": 0.823, "ci95": 0.0173}}
        out.mkdir(parents=True, exist_ok=True)
        (out / RESULTS_JSON).write_text(json.dumps({"best_val": best_val}))
        return subprocess.CompletedProcess(command, 0)

    monkeypatch.setattr(subprocess, "run", fake_train)
    run_sequentially([0.015], "sign", tmp_path / "sign", "python", {})
    line = [text for text in capsys.readouterr().out.splitlines() if "best val" in text]
    assert len(line) == 1 and "best val 82.30 ± 1.73%" in line[0], line


def test_slurm_mode_writes_a_job_array_that_runs_each_beta(tmp_path, omniglot_root):
    searches = sweep(algos="sign", grid=(0.004, 0.006, 0.008), out=str(tmp_path), slurm=True, launcher="echo",
                     sbatch="--time=00:10:00 --gres=gpu:1", steps=3, data=str(omniglot_root))
    assert searches["sign"]["pending"] == [0.004, 0.006, 0.008]
    [script] = (tmp_path / "sign").glob("*.sbatch")
    text = script.read_text()
    assert "#SBATCH --array=0-2" in text and "#SBATCH --time=00:10:00" in text and "#SBATCH --gres=gpu:1" in text
    assert subprocess.run(["bash", "-n", str(script)]).returncode == 0
    # Run array task 1 with `echo` as the launcher: it prints the training command it would start.
    task = subprocess.run(["bash", str(script)], capture_output=True, text=True, env={"SLURM_ARRAY_TASK_ID": "1",
                                                                                      "PATH": "/usr/bin:/bin"})
    assert task.returncode == 0, task.stderr
    words = task.stdout.split()
    assert words[:2] == ["-m", "dist_signmaml.train"]
    assert {"--algo=sign", "--inner_lr=0.006", f"--out={(tmp_path / 'sign' / 'beta_0.006').resolve()}",
            "--steps=3", f"--data={omniglot_root}"} <= set(words)
    assert (tmp_path / "sign" / "beta_0.006").is_dir()
    assert not (tmp_path / "sweep.md").exists(), "no summary before the runs exist"


def test_a_real_two_run_sweep_and_its_summary(tmp_path, omniglot_root, subprocess_env, monkeypatch):
    for key, value in subprocess_env.items():
        monkeypatch.setenv(key, value)  # runs inherit one BLAS thread each
    options = dict(steps=2, queries=1, meta_batch=2, hidden=16, eval_every=0, eval_episodes=2, test_episodes=0,
                   test_inner_steps=2, data=str(omniglot_root))
    searches = sweep(algos="sign", grid="0.004,0.006", max_extensions=0, out=str(tmp_path), **options)
    runs = {beta: json.loads((tmp_path / "sign" / f"beta_{beta:g}" / "results.json").read_text())
            for beta in (0.004, 0.006)}
    assert {beta: r["config"]["inner_lr"] for beta, r in runs.items()} == {0.004: 0.004, 0.006: 0.006}
    expected_best = max((0.004, 0.006), key=lambda b: (runs[b]["best_val"]["accuracy"], -b))
    assert searches["sign"]["best"] == expected_best
    assert searches["sign"]["status"] == "edge", "two values: the best is always at an edge, and no extension allowed"

    rows = list(csv.DictReader(open(tmp_path / "sweep.csv")))
    assert [(float(r["beta"]), r["best"]) for r in rows] == [(0.004, str(expected_best == 0.004)),
                                                             (0.006, str(expected_best == 0.006))]
    for row in rows:
        assert float(row["val_accuracy"]) == runs[float(row["beta"])]["best_val"]["accuracy"]
    summary = json.loads((tmp_path / "sweep.json").read_text())
    assert summary["best"] == {"sign": expected_best} and summary["status"] == {"sign": "edge"}
    table = (tmp_path / "sweep.md").read_text()
    assert f"**{expected_best:g}**" in table and "still at an edge" in table

    # Re-running finds the finished runs and trains nothing again.
    stamps = {b: (tmp_path / "sign" / f"beta_{b:g}" / "results.json").stat().st_mtime_ns for b in runs}
    sweep(algos="sign", grid="0.004,0.006", max_extensions=0, out=str(tmp_path), **options)
    assert stamps == {b: (tmp_path / "sign" / f"beta_{b:g}" / "results.json").stat().st_mtime_ns for b in runs}


@pytest.mark.parametrize("options,fragment", [
    ({"algos": "reptile"}, "'reptile' is not a method"),
    ({"algos": "sign,fo", "grid": "0.1,0.2"}, "--grid applies to one method"),
    ({"grid": "0.1,-0.2"}, "positive learning rates"),
    ({"grid": "0.1,abc"}, "--grid='0.1,abc'"),
    ({"inner_lr": 0.1}, "--inner_lr is set by the sweep"),
    ({"stepz": 3}, "--stepz"),
    ({"eval_episodes": 0}, "needs validation"),
])
def test_bad_input_is_one_clear_line(tmp_path, capsys, options, fragment):
    with pytest.raises(SystemExit) as stopped:
        main(out=str(tmp_path), **options)
    assert stopped.value.code == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and err.startswith("error: ") and fragment in err, err
    assert not list(tmp_path.glob("*/beta_*")), "nothing may run after bad input"
