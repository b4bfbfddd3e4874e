"""The Appendix-A beta search: its extension rule on known accuracy curves, the SLURM array it writes, runs at once
on disjoint shares of the machine, a real two-run sweep with its CSV / JSON / Markdown summary, and successive
halving after the search."""

from __future__ import annotations

import csv
import json
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from dist_signmaml.artifacts import FINAL_WEIGHTS, RESULTS_JSON
from dist_signmaml.sweep import (PAPER_GRIDS, SweepError, allowed_cpus, best_validation, halve, halving_steps, main,
                                  placements, plan, run_grid, sweep, train_command)


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


def test_a_tie_in_correct_queries_goes_to_the_smaller_beta_despite_float32_rounding():
    """A 20w1s grid scored 1651 of 2000 validation queries for both beta 0.0025 and 0.01; the means of the float32
    per-episode accuracies read 0.8255000001 and 0.8255000037, so the search took 0.01 and extended the grid upward
    instead of taking the smaller beta, as its tie rule says."""
    accuracy = {0.0025: 0.8255000001192093, 0.005: 0.8194999992847443, 0.01: 0.8255000036954879}
    step = plan([0.0025, 0.005, 0.01], accuracy, max_extensions=2)
    assert step["pending"] == [0.000625, 0.00125], "the smaller beta is best, at the lower edge: extend below it"
    accuracy |= {0.000625: 0.70, 0.00125: 0.80}
    assert plan([0.0025, 0.005, 0.01], accuracy, max_extensions=2)["best"] == 0.0025
    assert plan([0.0025, 0.01], {0.0025: 0.8255, 0.01: 0.8260}, max_extensions=0)["best"] == 0.01, "one query more"


def test_the_log_line_per_run_prints_the_score_the_search_ranks_by(tmp_path, capsys, monkeypatch):
    """Under --val_select any_steps a run ranks by its best step count; the log line printed the raw score (the
    10-step one) instead, so a sweep log read 68.65% for the beta the search chose with 82.30%."""
    def fake_train(command, stdout, stderr, **placement):
        out = Path(next(arg.split("=", 1)[1] for arg in command if arg.startswith("--out=")))
        best_val = {"step": 40, "accuracy": 0.6865, "ci95": 0.02, "best_steps": {"accuracy": 0.823, "ci95": 0.0173}}
        out.mkdir(parents=True, exist_ok=True)
        (out / RESULTS_JSON).write_text(json.dumps({"best_val": best_val}))
        return subprocess.CompletedProcess(command, 0)

    monkeypatch.setattr(subprocess, "run", fake_train)
    run_grid([0.015], "sign", tmp_path / "sign", "python", {})
    line = [text for text in capsys.readouterr().out.splitlines() if "best val" in text]
    assert len(line) == 1 and "best val 82.30 ± 1.73%" in line[0], line


def test_shares_split_the_cpus_and_gpus_into_disjoint_contiguous_slices():
    assert placements(2, [0, 1, 2, 3], []) == [{"cpus": [0, 1], "gpus": []}, {"cpus": [2, 3], "gpus": []}]
    assert [share["cpus"] for share in placements(3, [4, 5, 6, 7, 8, 9, 10], [])] == [[4, 5, 6], [7, 8], [9, 10]]
    eight = placements(8, list(range(16)), [str(g) for g in range(8)])  # an 8-GPU node: one GPU and 2 CPUs per run
    assert [share["gpus"] for share in eight] == [[str(g)] for g in range(8)]
    assert [share["cpus"] for share in eight] == [[2 * g, 2 * g + 1] for g in range(8)]
    assert [share["gpus"] for share in placements(2, [0, 1], ["GPU-a", "GPU-b", "GPU-c"])] == [["GPU-a", "GPU-b"],
                                                                                               ["GPU-c"]]
    with pytest.raises(SweepError, match=r"--jobs=3 is more than the 2 CPUs"):
        placements(3, [0, 1], [])
    with pytest.raises(SweepError, match=r"--jobs=2 is more than the 1 visible GPUs \(7\)"):
        placements(2, [0, 1, 2, 3], ["7"])


# A stand-in for the trainer that records where it ran. Runs wait for each other, so that one after another they
# fail (after 60 s alone): run FIRST finishes only once a third run has started beside it, and a run given FAIL
# exits with 3 once a second run has started.
CONCURRENT_TRAIN = textwrap.dedent("""
    import json, os, pathlib, sys, time
    options = dict(arg[2:].split("=", 1) for arg in sys.argv if arg.startswith("--") and "=" in arg)
    out = pathlib.Path(options["out"])
    (out / "started").touch()
    waited = time.monotonic()
    while len(list(out.parent.glob("beta_*/started"))) < (3 if options["inner_lr"] == "FIRST" else 2):
        if time.monotonic() - waited > 60:
            sys.exit("alone for 60 s: the runs did not run at once")
        time.sleep(0.05)
    if options["inner_lr"] == "FAIL":
        sys.exit(3)
    time.sleep(float(options.get("hold", 0)))
    where = {"cpus": sorted(os.sched_getaffinity(0)), "omp": os.environ.get("OMP_NUM_THREADS"),
             "gpus": os.environ.get("CUDA_VISIBLE_DEVICES")}
    result = {"best_val": {"accuracy": float(options["inner_lr"]), "ci95": 0.01, "step": 1}, "where": where}
    (out / "results.json").write_text(json.dumps(result))
""")


def concurrent_train(tmp_path: Path, first: str = "", fail: str = "") -> str:
    """A launcher that runs the stand-in (CONCURRENT_TRAIN with run FIRST and run FAIL named by beta)."""
    script = tmp_path / "fake_train.py"
    script.write_text(CONCURRENT_TRAIN.replace('"FIRST"', repr(first)).replace('"FAIL"', repr(fail)))
    return f"{sys.executable} {script}"


def test_jobs_run_at_once_each_on_a_share_no_other_run_uses(tmp_path, capsys, monkeypatch):
    cpus = allowed_cpus()
    assert len(cpus) >= 2, "this test needs 2 CPUs to give two runs a CPU each"
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "3,5")
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    # 0.004 and 0.006 start at once; 0.006 ends, and 0.008 starts on its share while 0.004 still runs
    run_grid([0.004, 0.006, 0.008], "sign", tmp_path / "sign", concurrent_train(tmp_path, first="0.004"), {}, jobs=2)
    where = {beta: json.loads((tmp_path / "sign" / f"beta_{beta}" / "results.json").read_text())["where"]
             for beta in ("0.004", "0.006", "0.008")}
    shares = placements(2, cpus, ["3", "5"])
    for run in where.values():
        share = next(s for s in shares if s["gpus"] == [run["gpus"]])
        assert run["cpus"] == share["cpus"], "each run is pinned to its share's CPUs"
        assert run["omp"] == str(len(share["cpus"])), "and uses as many threads as its share has CPUs"
    assert where["0.004"]["gpus"] != where["0.006"]["gpus"] and where["0.006"]["gpus"] == where["0.008"]["gpus"]
    lines = [line for line in capsys.readouterr().out.splitlines() if line.startswith("sweep run")]
    assert len(lines) == 3 and all(" on CPUs " in line and ", GPU " in line for line in lines), lines
    assert sorted(line.split(" of ")[0] for line in lines) == ["sweep run 1", "sweep run 2", "sweep run 3"]


def test_after_a_failed_run_none_starts_and_the_running_ones_finish(tmp_path, monkeypatch):
    assert len(allowed_cpus()) >= 2, "this test needs 2 CPUs to give two runs a CPU each"
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "")  # no GPUs: CPU shares only
    # 0.004 fails once 0.006 runs beside it; 0.006 holds its share 1 s longer and finishes; 0.008 never starts
    with pytest.raises(SweepError) as failed:
        run_grid([0.004, 0.006, 0.008], "sign", tmp_path / "sign", concurrent_train(tmp_path, fail="0.004"),
                 {"hold": 1}, jobs=2)
    assert str(failed.value) == (f"run {tmp_path / 'sign' / 'beta_0.004'} failed (exit 3); see "
                                 f"{tmp_path / 'sign' / 'beta_0.004' / 'train.log'} (beta 0.008 not started)")
    assert (tmp_path / "sign" / "beta_0.006" / "results.json").is_file()
    assert not (tmp_path / "sign" / "beta_0.008").exists()
    # one at a time, the first failure ends the sweep at once
    with pytest.raises(SweepError, match=r"beta_0.01 failed \(exit 1\); see .* \(beta 0.02, 0.03 not started\)$"):
        run_grid([0.01, 0.02, 0.03], "sign", tmp_path / "one_at_a_time", "false", {})
    assert [p.name for p in (tmp_path / "one_at_a_time").iterdir()] == ["beta_0.01"]


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
    assert "ran them one at a time. The load beside them is not recorded" in table

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
    ({"jobs": 0}, "--jobs=0 is invalid: expected a positive integer"),
    ({"jobs": 2, "slurm": True}, "with --slurm each beta is an array task"),
    ({"jobs": 10**6}, "--jobs=1000000 is more than the"),
    ({"halving": -1}, "--halving=-1 is invalid: expected an integer >= 0"),
    ({"halving": 2, "steps": 10}, "--halving=2 needs --steps divisible by 4"),
    ({"halving": 1, "steps": 10, "schedule_steps": 20}, "--schedule_steps is set by --halving"),
])
def test_bad_input_is_one_clear_line(tmp_path, capsys, options, fragment):
    with pytest.raises(SystemExit) as stopped:
        main(out=str(tmp_path), **options)
    assert stopped.value.code == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and err.startswith("error: ") and fragment in err, err
    assert not list(tmp_path.glob("*/beta_*")), "nothing may run after bad input"


@pytest.mark.unit  # pure functions
def test_successive_halving_keeps_the_better_half_as_each_run_stood_at_the_round_before():
    search = plan([0.002, 0.004, 0.008, 0.016, 0.032], {0.002: 0.6, 0.004: 0.7, 0.008: 0.74, 0.016: 0.73, 0.032: 0.5},
                  max_extensions=0)
    rounds = halving_steps(800, 3)
    assert rounds == [100, 200, 400, 800]
    first = {0.002: 0.6, 0.004: 0.7, 0.008: 0.74, 0.016: 0.73, 0.032: 0.5}
    step = halve(search, [first, {}, {}, {}], rounds)
    assert (step["pending"], step["steps"]) == ([0.008, 0.016], 200), "5 // 2 = 2 kept, the two best at 100 steps"
    # at 200 steps 0.016 overtakes 0.008; one of the two goes on, and later rounds keep at least one
    step = halve(search, [first, {0.008: 0.80, 0.016: 0.81}, {}, {}], rounds)
    assert (step["pending"], step["steps"], step["best"]) == ([0.016], 400, None)
    step = halve(search, [first, {0.008: 0.80, 0.016: 0.81}, {0.016: 0.84}, {0.016: 0.86}], rounds)
    assert (step["pending"], step["best"]) == ([], 0.016)
    assert [(r["steps"], r["betas"]) for r in step["rounds"]] == [
        (100, [0.002, 0.004, 0.008, 0.016, 0.032]), (200, [0.008, 0.016]), (400, [0.016]), (800, [0.016])]
    # a tie that float32 rounding alone tells apart keeps the smaller beta
    tie = halve(search, [first, {0.008: 0.8255000037, 0.016: 0.8255000001}, {}, {}], rounds)
    assert tie["pending"] == [0.008]


@pytest.mark.unit  # pure functions
def test_a_run_that_went_on_is_ranked_by_its_validations_up_to_the_round():
    history = [{"step": 2, "accuracy": 0.70, "ci95": 0.02}, {"step": 4, "accuracy": 0.69, "ci95": 0.02},
               {"step": 6, "accuracy": 0.75, "best_steps": {"accuracy": 0.90, "ci95": 0.01}, "ci95": 0.02}]
    results = {"steps": 6, "best_val": history[2], "val_history": history}
    assert best_validation(results) is history[2]
    assert best_validation(results, up_to=6) is history[2]
    assert best_validation(results, up_to=4) is history[0], "the best up to step 4, not the latest"
    assert best_validation(results, up_to=8) is None, "a run that has not reached the round is not ranked in it"


# A stand-in for the trainer that goes on from where its run stopped, as --resume does: it validates every 2
# meta-steps from there to --steps, at an accuracy set by beta and step, and logs what it trained.
HALVING_TRAIN = textwrap.dedent("""
    import json, pathlib, sys
    options = dict(arg[2:].split("=", 1) for arg in sys.argv if arg.startswith("--") and "=" in arg)
    out, beta, steps = pathlib.Path(options["out"]), float(options["inner_lr"]), int(options["steps"])
    assert "--resume" in sys.argv and options["schedule_steps"] == "8", "every round trains part of the 8-step run"
    results = json.loads((out / "results.json").read_text()) if (out / "results.json").is_file() else {}
    start, history = results.get("steps", 0), results.get("val_history", [])
    base = {0.002: 0.58, 0.004: 0.66, 0.008: 0.70, 0.016: 0.63}[beta]
    slope = {0.004: 0.035, 0.008: 0.02}.get(beta, 0.01)
    history += [{"step": s, "accuracy": base + slope * s, "ci95": 0.01} for s in range(start + 2, steps + 1, 2)]
    best = max(history, key=lambda r: r["accuracy"])
    (out / "results.json").write_text(json.dumps({"steps": steps, "best_val": best, "val_history": history,
                                                  "config": {"inner_lr": beta},
                                                  "seconds_per_meta_iteration": {"mean": 0.1}}))
    with open(out.parent.parent / "trained.log", "a") as log:
        log.write(f"{beta:g} {start} {steps}\\n")
""")


def test_halving_rounds_continue_the_better_half_to_the_full_budget(tmp_path, capsys):
    """At 2 meta-steps 0.008 leads (0.74) and 0.004 is second (0.73); both go on to 4, where 0.004 leads
    (0.80 against 0.78), so 0.004 alone goes on to 8: the best early is not the one trained to the budget."""
    script = tmp_path / "halving_train.py"
    script.write_text(HALVING_TRAIN)
    options = dict(algos="sign", grid="0.002,0.004,0.008,0.016", out=str(tmp_path / "sweep"),
                   launcher=f"{sys.executable} {script}", halving=2, steps=8)
    searches = sweep(**options)
    trained = (tmp_path / "sweep" / "trained.log").read_text().split("\n")
    assert trained == ["0.002 0 2", "0.004 0 2", "0.008 0 2", "0.016 0 2", "0.004 2 4", "0.008 2 4", "0.004 4 8", ""]
    assert searches["sign"]["best"] == 0.004 and searches["sign"]["status"] == "done"
    summary = json.loads((tmp_path / "sweep" / "sweep.json").read_text())
    assert summary["best"] == {"sign": 0.004}
    assert [(r["steps"], r["betas"]) for r in summary["halving"]["sign"]] == [
        (2, [0.002, 0.004, 0.008, 0.016]), (4, [0.004, 0.008]), (8, [0.004])]
    assert [r["val_accuracy"] for r in summary["halving"]["sign"]] == [
        pytest.approx([0.6, 0.73, 0.74, 0.65]), pytest.approx([0.8, 0.78]), pytest.approx([0.94])], \
        "each round's runs as they stood at its meta-steps"
    assert set(summary["halving"]) == {"sign"}
    assert {row["beta"]: row["steps"] for row in summary["runs"]} == {0.002: 2, 0.004: 8, 0.008: 4, 0.016: 2}
    table = (tmp_path / "sweep" / "sweep.md").read_text()
    assert "| sign | **0.004** | 8 | **94.00 ± 1.00%** |" in table
    assert "successive halving, betas kept per round at its meta-steps: 4 at 2 -> 2 at 4 -> 1 at 8. Each" in table
    out = capsys.readouterr().out
    assert "sign: successive halving, beta 0.004, 0.008 on to 4 meta-steps (round 1 of 2)" in out
    assert "sign: best beta 0.004, val 94.00 ± 1.00% (done)" in out
    # re-running trains nothing again: each round's ranking is read back from the runs' validations
    sweep(**options)
    assert (tmp_path / "sweep" / "trained.log").read_text().split("\n") == trained


def test_halving_with_the_real_trainer_continues_the_winner_from_its_checkpoint(tmp_path, omniglot_root,
                                                                                 subprocess_env, monkeypatch):
    for key, value in subprocess_env.items():
        monkeypatch.setenv(key, value)  # runs inherit one BLAS thread each
    options = dict(steps=4, queries=1, meta_batch=2, hidden=16, eval_every=0, eval_episodes=2, test_episodes=0,
                   test_inner_steps=2, data=str(omniglot_root), outer_lr_schedule="cosine")
    searches = sweep(algos="sign", grid="0.004,0.006", max_extensions=0, halving=1, out=str(tmp_path), **options)
    best = searches["sign"]["best"]
    other = ({0.004, 0.006} - {best}).pop()
    winner = json.loads((tmp_path / "sign" / f"beta_{best:g}" / "results.json").read_text())
    loser = json.loads((tmp_path / "sign" / f"beta_{other:g}" / "results.json").read_text())
    assert (winner["steps"], loser["steps"]) == (4, 2)
    assert [r["step"] for r in winner["val_history"]] == [2, 4], "validated at the end of each round it ran"
    assert "--resume: continuing from" in (tmp_path / "sign" / f"beta_{best:g}" / "train.log").read_text()
    at_two = {b: json.loads((tmp_path / "sign" / f"beta_{b:g}" / "results.json").read_text())["val_history"][0]
              for b in (0.004, 0.006)}
    assert best == max((0.004, 0.006), key=lambda b: (at_two[b]["accuracy"], -b)), "ranked at 2 meta-steps"
    # the winner's run, in two rounds, is the run a straight start at 4 steps trains (its cosine rate spans 4)
    straight = tmp_path / "straight"
    subprocess.run(train_command(sys.executable, options, "sign") + [f"--inner_lr={best:g}", f"--out={straight}"],
                   check=True, capture_output=True)
    a, b = load_file(straight / FINAL_WEIGHTS), load_file(tmp_path / "sign" / f"beta_{best:g}" / FINAL_WEIGHTS)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_halving_under_slurm_writes_one_array_per_round(tmp_path, omniglot_root):
    options = dict(algos="sign", grid=(0.004, 0.006, 0.008), out=str(tmp_path), slurm=True, launcher="echo",
                   steps=4, halving=1, data=str(omniglot_root))
    sweep(**options)
    [first] = (tmp_path / "sign").glob("*.sbatch")
    assert first.name == "sweep_3runs_from_beta_0.004_to_2steps.sbatch" and "--steps=2" in first.read_text()
    for beta, accuracy in ((0.004, 0.6), (0.006, 0.8), (0.008, 0.7)):  # the array's runs, as they would finish
        (tmp_path / "sign" / f"beta_{beta:g}").mkdir()
        (tmp_path / "sign" / f"beta_{beta:g}" / "results.json").write_text(json.dumps({
            "steps": 2, "best_val": {"step": 2, "accuracy": accuracy, "ci95": 0.01}, "config": {"inner_lr": beta},
            "seconds_per_meta_iteration": {"mean": 0.1}}))
    searches = sweep(**options)
    assert searches["sign"]["pending"] == [0.006]
    second = tmp_path / "sign" / "sweep_1runs_from_beta_0.006_to_4steps.sbatch"
    assert "--steps=4" in second.read_text() and "BETAS=(0.006)" in second.read_text()
