"""bench/reproduce.py: option checking, the summary table and plots from run files, and an end-to-end smoke run of
the image-folder harness on the real mini-ImageNet test classes (skipped, with the reason, when they are absent)."""

from __future__ import annotations

import csv
import json
import subprocess
import sys

import pytest

from bench import reproduce
from bench.reproduce import ReproduceError, grid_for, parse_setting, summarize
from tests.conftest import REPO_ROOT, SHARED_DATA

MINI_IMAGENET = SHARED_DATA / "mini-imagenet"


def test_parse_setting_and_grid():
    assert parse_setting("20w1s") == (20, 1)
    assert parse_setting(" 5W5S") == (5, 5)
    for bad in ("5w", "w1s", "5x1s", "5w1", "five"):
        with pytest.raises(ReproduceError, match="<ways>w<shots>s"):
            parse_setting(bad)
    assert grid_for("sign", [0.5, 1, 2]) == [0.0025, 0.005, 0.01]
    assert grid_for("maml", [1]) == [0.2]
    # each grid run lasts at least a quarter of the final run
    assert [reproduce.grid_steps_for(n) for n in (1, 3, 5, 4000)] == [1, 1, 2, 1000]


@pytest.mark.parametrize("options, message", [
    ({"preset": "cifar"}, "preset 'cifar' is not known"),
    ({"preset": "images"}, "--data is required"),
    ({"preset": "omniglot", "settings": "5w1s,20w1s", "steps": "10,20,30"}, "one per setting"),
    ({"preset": "omniglot", "algos": "sign,reptile"}, "'reptile' is not a method"),
    ({"preset": "omniglot", "test_episodes": 0}, "--test_episodes=0 is invalid"),
    ({"preset": "omniglot", "val_episodes": 0}, "--val_episodes=0 is invalid"),
    ({"preset": "omniglot", "grid_steps": -5}, r"--grid_steps=-5 is invalid: expected a positive integer \(default: 25%"),
    ({"preset": "omniglot", "grid_jobs": 0}, "--grid_jobs=0 is invalid: expected a positive integer"),
    ({"preset": "omniglot", "halving": -1}, r"--halving=-1 is invalid: expected an integer >= 0"),
    ({"preset": "omniglot", "halving": 2, "grid_steps": 100}, r"--grid_steps=100 with --halving=2: .* give one of them"),
    ({"preset": "omniglot", "inner_lr": 0.1}, "--inner_lr is set by the harness"),
    ({"preset": "omniglot", "settings": "5w1s", "backbone": "vgg"}, "--backbone='vgg' is invalid"),
])
def test_bad_options_fail_before_any_run(tmp_path, options, message):
    with pytest.raises(ReproduceError, match=message):
        reproduce.reproduce(options.pop("preset"), out=str(tmp_path / "out"), **options)
    assert not (tmp_path / "out").exists() or not any((tmp_path / "out").iterdir())


def test_the_grid_runs_jobs_at_once_only_when_asked(tmp_path, monkeypatch):
    commands = []

    def record(command, log, env, what):
        commands.append(command)
        (tmp_path / "beta_sign").mkdir(exist_ok=True)
        (tmp_path / "beta_sign" / "sweep.json").write_text(json.dumps({"best": {"sign": 0.005}}))

    monkeypatch.setattr(reproduce, "run_logged", record)
    assert reproduce.choose_beta(tmp_path, "sign", [0.0025, 0.005], 10, {"ways": 5}, "python", {}, 2) == 0.005
    assert reproduce.choose_beta(tmp_path, "sign", [0.0025, 0.005], 10, {"ways": 5}, "python", {}) == 0.005
    assert "--jobs=2" in commands[0] and "--ways=5" in commands[0]
    assert not any(word.startswith("--jobs") for word in commands[1]), "one at a time: the sweep's default"
    assert {"--steps=10", "--eval_every=10"} <= set(commands[1]) and "--halving" not in " ".join(commands[1])
    # successive halving: the sweep gets the final run's budget and cadence, not the grid's
    reproduce.choose_beta(tmp_path, "sign", [0.0025, 0.005], 10, {"ways": 5}, "python", {}, 1, 2, 400, 5)
    assert {"--steps=400", "--halving=2", "--eval_every=80", "--ckpt_every=80"} <= set(commands[2])
    assert "--steps=10" not in commands[2]


def test_images_preset_names_a_directory_without_shards(tmp_path):
    with pytest.raises(ReproduceError, match=r"is not a shard directory \(no index.json\)"):
        reproduce.reproduce("images", data=str(tmp_path), out=str(tmp_path / "out"))


def fake_run(setting_dir, algo, *, ways, shots, accuracy, seconds, beta, grid):
    """The files a finished pipeline leaves for one method: results.json, protocol.json and the sweep summary. The
    protocol chose 1 step at scale 1 on validation; the paper's cell (10 steps) scores 10 points lower."""
    run = setting_dir / algo
    run.mkdir(parents=True)
    history = [{"step": 50, "accuracy": accuracy - 0.05, "ci95": 0.02, "episodes": 100, "inner_steps": 10},
               {"step": 100, "accuracy": accuracy, "ci95": 0.02, "episodes": 100, "inner_steps": 10}]
    (run / "results.json").write_text(json.dumps({
        "config": {"algo": algo, "ways": ways, "shots": shots, "inner_lr": beta, "steps": 100, "meta_batch": 4,
                   "queries": 1, "inner_steps": 1},
        "seconds_per_meta_iteration": {"mean": seconds, "std": seconds / 10, "count": 99},
        "best_val": history[-1], "val_history": history}))
    (run / "protocol.json").write_text(json.dumps({
        "val_episodes": 300, "test_episodes": 1000, "queries": 15, "chosen": {"inner_steps": 1, "lr_scale": 1.0},
        "test_chosen": {"inner_steps": 1, "lr_scale": 1.0, "accuracy": accuracy, "ci95": 0.01},
        "test_paper": {"inner_steps": 10, "lr_scale": 1.0, "accuracy": accuracy - 0.1, "ci95": 0.02}}))
    sweep = setting_dir / f"beta_{algo}"
    sweep.mkdir()
    (sweep / "sweep.json").write_text(json.dumps({
        "runs": [{"algo": algo, "beta": b, "val_accuracy": 0.5, "val_ci95": 0.01, "val_step": 25, "best": b == beta}
                 for b in grid],
        "best": {algo: beta}, "status": {algo: "done"}}))


def test_summary_table_comparisons_and_plots(tmp_path):
    for ways, shots, accuracies in ((5, 1, {"sign": 0.95, "fo": 0.93, "maml": 0.96}),
                                    (20, 1, {"sign": 0.85, "fo": 0.80, "maml": 0.86})):
        setting = tmp_path / f"{ways}w{shots}s"
        for algo, seconds, beta in (("sign", 0.1, 0.005), ("fo", 0.1, 0.1), ("maml", 0.25, 0.2)):
            fake_run(setting, algo, ways=ways, shots=shots, accuracy=accuracies[algo], seconds=seconds, beta=beta,
                     grid=[beta / 2, beta, beta * 2])
    (tmp_path / "5w1s" / "notes").mkdir()  # a stray folder is ignored
    rows = summarize(tmp_path)
    assert [(r["setting"], r["algo"]) for r in rows] == [("5w1s", "sign"), ("5w1s", "fo"), ("5w1s", "maml"),
                                                         ("20w1s", "sign"), ("20w1s", "fo"), ("20w1s", "maml")]
    summary = json.loads((tmp_path / "reproduce.json").read_text())
    by_setting = {c["setting"]: c for c in summary["comparisons"]}
    assert by_setting["20w1s"]["sign_minus_fo_points"] == pytest.approx(5.0)
    assert by_setting["5w1s"]["sign_minus_maml_points"] == pytest.approx(-1.0)
    assert by_setting["5w1s"]["sign_over_maml_time"] == pytest.approx(0.4)
    table = (tmp_path / "reproduce.md").read_text()
    assert ("| 20-way 1-shot | sign | **0.005** (0.0025/0.005/0.01) | 100 | 85.00% @ 100 | **85.00 ± 1.00%** | 1 × 1 | "
            "75.00 ± 2.00% |") in table
    assert "300 validation episodes, the paper's is 10 steps × 1. β grid runs: 25 meta-steps each." in table
    assert "20w1s: sign − fo +5.00 points at 1.00× its time; sign − maml -1.00 points at 0.40× its time." in table
    for png in ("accuracy.png", "sign_vs_fo.png", "5w1s/plots/accuracy_vs_step.png", "5w1s/plots/sweep.png",
                "20w1s/plots/time_per_iteration.png"):
        assert (tmp_path / png).stat().st_size > 10_000, png


def test_the_val_column_shows_the_score_the_run_ranked_by(tmp_path):
    """Under --val_select any_steps a run keeps the weights of its best step count; the table showed the 10-step
    score instead (75.10% for a run whose kept validation read 84.50% after 1 step)."""
    fake_run(tmp_path / "20w1s", "sign", ways=20, shots=1, accuracy=0.751, seconds=0.18, beta=0.01, grid=[0.01])
    results_file = tmp_path / "20w1s" / "sign" / "results.json"
    results = json.loads(results_file.read_text())
    results["best_val"]["best_steps"] = {"accuracy": 0.845, "ci95": 0.016, "inner_steps": 1}
    results_file.write_text(json.dumps(results))
    [row] = summarize(tmp_path)
    assert row["best_val_accuracy"] == 0.845
    assert "| 84.50% @ 100 |" in (tmp_path / "reproduce.md").read_text()


def test_summary_command_rejects_a_missing_directory(tmp_path):
    finished = subprocess.run([sys.executable, "-m", "bench.reproduce", "summary", f"--out={tmp_path / 'nope'}"],
                              capture_output=True, text=True, cwd=REPO_ROOT)
    assert finished.returncode == 2
    assert "an existing reproduction directory" in finished.stderr


@pytest.mark.skipif(not (MINI_IMAGENET / "test").is_dir(),
                    reason=f"mini-ImageNet test classes not present at {MINI_IMAGENET}/test (shared data folder absent)")
def test_images_harness_smoke_on_mini_imagenet(tmp_path, subprocess_env):
    """The mini-ImageNet/FS-CIFAR100 path end to end on real JPEGs: the 20 test classes split 12/4/4 (20 images
    each, 32 px) into train/val/test shards, then two methods through beta grid, training and test."""
    classes = sorted(p.name for p in (MINI_IMAGENET / "test").iterdir() if p.is_dir())
    assert len(classes) == 20
    splits = []
    for name, members in (("train", classes[:12]), ("val", classes[12:16]), ("test", classes[16:])):
        with open(tmp_path / f"{name}.csv", "w", newline="") as handle:
            writer = csv.writer(handle)
            writer.writerow(["filename", "label"])
            for wnid in members:
                writer.writerows([f.name, wnid] for f in sorted((MINI_IMAGENET / "test" / wnid).iterdir())[:20])
        splits.append(f"{name}={tmp_path / f'{name}.csv'}")
    shards = tmp_path / "shards"
    subprocess.run([sys.executable, "-m", "shards", "build", "imagefolder", f"--source={MINI_IMAGENET / 'test'}",
                    f"--out={shards}", f"--splits={','.join(splits)}", "--image_size=32", "--progress=False"],
                   check=True, cwd=REPO_ROOT, env=subprocess_env, capture_output=True)
    out = tmp_path / "reproduce"
    command = [sys.executable, "-m", "bench.reproduce", "images", f"--data={shards}", f"--out={out}", "--ways=2",
               "--shots=1", "--algos=sign,fo", "--steps=5", "--grid_scales=1", "--queries=2",
               "--test_queries=5", "--test_episodes=6", "--val_episodes=4", "--eval_episodes=2", "--evals=1", "--hidden=8"]
    finished = subprocess.run(command, capture_output=True, text=True, cwd=REPO_ROOT, env=subprocess_env)
    assert finished.returncode == 0, finished.stdout + finished.stderr
    summary = json.loads((out / "reproduce.json").read_text())
    assert [(r["setting"], r["algo"]) for r in summary["rows"]] == [("2w1s", "sign"), ("2w1s", "fo")]
    for row in summary["rows"]:
        assert row["test_episodes"] == 6 and row["test_queries"] == 5 and row["steps"] == 5
        assert row["val_episodes"] == 4 and row["grid_steps"] == 2  # 25% of 5 steps, rounded up
        assert row["test_inner_steps"] in (1, 2, 3, 5, 10, 20) and row["test_lr_scale"] in (0.5, 1.0, 2.0)
        assert 0.0 <= row["paper_protocol_accuracy"] <= 1.0
        assert 0.0 <= row["test_accuracy"] <= 1.0 and row["seconds_per_meta_iteration"] > 0
    test_file = out / "2w1s" / "sign" / "protocol.json"
    stamp = test_file.stat().st_mtime_ns
    again = subprocess.run(command, capture_output=True, text=True, cwd=REPO_ROOT, env=subprocess_env)
    assert again.returncode == 0, again.stderr
    assert test_file.stat().st_mtime_ns == stamp  # finished stages are not redone
    assert (out / "accuracy.png").is_file() and (out / "2w1s" / "plots" / "accuracy_vs_step.png").is_file()


def cost_entry(ways, queries, m, p, ms: dict, memory: dict | None = None):
    entry = {"ways": ways, "queries": queries, "inner_steps": m, "meta_batch": p, "ratios": {},
             "step_s": {name: {"median_s": v / 1000, "q1_s": 0, "q3_s": 0, "n": 20} for name, v in ms.items()}}
    return entry | ({"peak_memory_mib": memory} if memory else {})


def test_cost_tables_mark_each_ratio_against_its_target(tmp_path):
    from bench.table import tables

    algos = {"machine": {"device": "cpu"}, "settings": [
        cost_entry(5, 1, 1, 4, {"sign@ours": 100, "fo@ours": 101, "maml@ours": 300},
                   {"sign@ours": 10.0, "fo@ours": 10.0, "maml@ours": 20.0}),
        cost_entry(5, 1, 10, 4, {"sign@ours": 500, "fo@ours": 450, "maml@ours": 1000},
                   {"sign@ours": 13.0, "fo@ours": 11.0, "maml@ours": 100.0}),
        cost_entry(5, 15, 1, 4, {"sign@ours": 800, "fo@ours": 800, "maml@ours": 1000})]}
    implementations = {"machine": {"device": "cpu"}, "settings": [
        cost_entry(5, 1, 1, 32, {"sign@ours": 650, "sign@compile": 700, "sign@reference": 1000}),
        cost_entry(5, 15, 1, 32, {"sign@ours": 850, "sign@reference": 1000})]}
    (tmp_path / "a.json").write_text(json.dumps(algos))
    (tmp_path / "i.json").write_text(json.dumps(implementations))
    text = tables(str(tmp_path / "a.json"), str(tmp_path / "i.json"))
    assert "| 5 | 1 | 1 | 4 | 100 | 101 | 300 | 0.990 ✓ | 0.333 ✓ |" in text
    assert "| 5 | 1 | 10 | 4 | 500 | 450 | 1000 | 1.111 ✗ | 0.500 |" in text  # no sign/maml target at m=10
    assert "| 5 | 15 | 1 | 4 | 800 | 800 | 1000 | 1.000 | 0.800 |" in text  # targets are for 1 query
    assert "| 4 | 5 | 1 | sign | 10.0 | 13.0 | 1.300 ✗ |" in text
    assert "| 4 | 5 | 1 | maml | 20.0 | 100.0 | 5.000 |" in text
    assert "| 5 | 1 | 1 | 32 | sign | ours | 650 | 0.650 ✓ |  |" in text
    assert "| 5 | 1 | 1 | 32 | sign | compile | 700 | 0.700 ✓ | 1.08 |" in text
    assert "| 5 | 15 | 1 | 32 | sign | ours | 850 | 0.850 ✓ |  |" in text


def test_finished_stages_are_skipped_and_stale_tests_redone(tmp_path, monkeypatch):
    """Resuming: a finished run is not retrained; a protocol scored with other options is scored again."""
    commands = []

    def record(command, log, env, what):
        commands.append(command)
        if "bench.protocol" in command:
            flags = dict(c[2:].split("=", 1) for c in command if c.startswith("--"))
            (tmp_path / "run" / "protocol.json").write_text(json.dumps(
                {"test_chosen": {"accuracy": 0.5}, "val_episodes": int(flags["val_episodes"]),
                 "test_episodes": int(flags["test_episodes"]), "queries": int(flags["queries"])}))

    monkeypatch.setattr(reproduce, "run_logged", record)
    run = tmp_path / "run"
    run.mkdir()
    (run / "results.json").write_text("{}")
    reproduce.train_final(run, "sign", 0.005, 100, 5, {}, sys.executable, {})
    assert commands == []  # results.json: training finished
    (run / "protocol.json").write_text(json.dumps({"test_chosen": {"accuracy": 0.9}, "val_episodes": 300,
                                                   "test_episodes": 1000, "queries": 1}))
    assert reproduce.test_final(run, 300, 1000, 1, {})["test_chosen"]["accuracy"] == 0.9 and commands == []
    assert reproduce.test_final(run, 300, 1000, 15, {})["test_chosen"]["accuracy"] == 0.5  # other queries: again
    assert len(commands) == 1 and "--queries=15" in commands[0]
    assert not any(c.startswith("--data") for c in commands[0])  # the run's own shard root
    reproduce.test_final(run, 300, 1000, 2, {}, "/elsewhere/omniglot-28")  # a run scored in another checkout
    assert "--data=/elsewhere/omniglot-28" in commands[-1]
    aside = json.loads((run / "protocol_1q_300val_1000test.json").read_text())
    assert aside["test_chosen"]["accuracy"] == 0.9  # kept aside
    (run / "results.json").unlink()
    reproduce.train_final(run, "maml", 0.2, 100, 5, {"ways": 20}, sys.executable, {})
    assert "--resume=True" in commands[-1] and "--eval_every=20" in commands[-1] and "--ways=20" in commands[-1]


def test_the_cost_table_header_says_which_files_were_measured_on_an_idle_machine(tmp_path):
    from bench.table import tables

    def load(one_minute, busy=()):
        return {"load_average_1_5_15min": [one_minute, 1.0, 1.0], "cpu_cores": 2, "pinned_to_cores": [0],
                "busy_processes": list(busy)}

    files = {"idle.json": (load(1.0), load(1.1, ["ps (core 0, 100%)"])),  # the sampler's own ps does not count
             "shared.json": (load(1.0), load(1.2, ["python (core 1, 95.8%)"])),
             "loaded.json": (load(6.0), load(5.0)), "old.json": (None, None)}
    for name, (before, after) in files.items():
        (tmp_path / name).write_text(json.dumps({"machine": {"device": "cpu"}, "load_before": before,
                                                 "load_after": after, "settings": [
            cost_entry(5, 1, 1, 32, {"sign@ours": 650, "sign@reference": 1000})]}))
    text = tables(*(str(tmp_path / name) for name in files))
    assert "Measured on an idle machine (nothing else busy, 1-min load < 1.5): idle.json." in text
    assert ("NOT measured on an idle machine (load not recorded, or other work running): loaded.json, old.json, "
            "shared.json;") in text
    assert "- idle.json: [1.0, 1.0, 1.0] -> [1.1, 1.0, 1.0] on 2 cores, pinned to [0]; busy: nothing else" in text
    assert "- shared.json: [1.0, 1.0, 1.0] -> [1.2, 1.0, 1.0] on 2 cores, pinned to [0]; busy: python (core 1" in text


def test_with_halving_the_last_survivor_is_the_final_run(tmp_path, omniglot_root, subprocess_env, monkeypatch):
    """Omniglot 5w1s end to end with --halving 1: the search at 2 of 4 meta-steps, the winner on to 4, and that run
    (not a separate one) tested and tabled; a re-run redoes nothing."""
    for key, value in subprocess_env.items():
        monkeypatch.setenv(key, value)
    options = dict(out=str(tmp_path / "out"), settings="5w1s", algos="sign", steps="4", halving=1, grid_scales="1,2",
                   test_episodes=4, val_episodes=2, eval_episodes=2, evals=1, hidden=8)
    [row] = reproduce.reproduce("omniglot", **options)
    setting = tmp_path / "out" / "5w1s"
    sweep = json.loads((setting / "beta_sign" / "sweep.json").read_text())
    assert row["beta"] == sweep["best"]["sign"] and row["steps"] == 4
    assert row["grid_steps"] == 2 and row["halving"] == sweep["halving"]["sign"]
    first, last = row["halving"]
    assert first["steps"] == 2 and last["steps"] == 4 and len(last["betas"]) == len(first["betas"]) // 2
    assert row["beta"] in last["betas"], "the best of the runs trained to the full budget"
    final = json.loads((setting / "sign" / "results.json").read_text())
    winner = json.loads((setting / "beta_sign" / "sign" / f"beta_{row['beta']:g}" / "results.json").read_text())
    assert final == winner and final["steps"] == 4, "the final run is the winner's sweep run"
    assert not (setting / "sign" / "checkpoints").exists() and not list(setting.glob(".*"))
    assert "then successive halving" in (tmp_path / "out" / "reproduce.md").read_text()
    stamp = (setting / "sign" / "protocol.json").stat().st_mtime_ns
    reproduce.reproduce("omniglot", **options)
    assert (setting / "sign" / "protocol.json").stat().st_mtime_ns == stamp
