"""The paper's accuracy comparison, reproduced: Sign-MAML vs FO-MAML vs MAML with the same budget, seed and episodes.

    python -m bench.reproduce omniglot                    # Omniglot 5w1s + 20w1s on the bundled data (~3 CPU-hours)
    python -m bench.reproduce omniglot --settings 20w1s --out runs/reproduce/omniglot   # one setting (e.g. per core)
    python -m bench.reproduce images --data SHARD_ROOT    # mini-ImageNet / FS-CIFAR100: ways {2,5,7,10} x shots 1..5
    python -m bench.reproduce summary --out runs/reproduce/omniglot   # table and plots from the finished runs

For every setting (N-way K-shot) and method the pipeline is
  1. beta: a small grid of runs around the method's default, each lasting 25% of the final run (sign learns
     fastest early, so a short grid measures the wrong thing), picked by validation accuracy, with the paper's
     Appendix A rule (best at an edge -> two more values past it) through dist_signmaml.sweep; or, with
     --halving R, the search at 1/2^R of the budget and R rounds of successive halving whose last survivor, trained
     to the full budget, is the final run (stage 2 then trains nothing);
  2. train: the full budget with that beta, the same seed (initialisation and episode stream) for every method,
     the best weights by validation kept;
  3. test: bench.protocol chooses the test protocol per method on validation (inner steps from {1,2,3,5,10,20} x
     beta scale {0.5,1,2}, every step count from one adaptation pass), then scores it once on the fixed test
     episodes (seed 2021), next to the paper's protocol (10 steps at the training beta).
Every stage leaves files, and re-running the same command skips what is finished and resumes a training run from its
newest checkpoint: the whole thing can run in the background, be killed, and be continued.

Written to OUT: reproduce.json, reproduce.md (the table), accuracy.png (test accuracy and seconds per
meta-iteration per method), sign_vs_fo.png (the paper's Fig. 1 grid, when both methods ran on several settings), and
per setting OUT/<W>w<S>s/plots/ (accuracy vs meta-step, time per iteration, beta sweeps).

Options (any other --flag is a training option passed to every run, e.g. --backbone or --hidden):
    --out               output directory (default runs/reproduce/<preset>)
    --data              shard root with train/ val/ test/ (omniglot: the bundled shards; images: required)
    --algos             methods (default sign,fo,maml)
    --settings          e.g. 5w1s,20w1s (images: default every ways x shots of --ways/--shots)
    --ways, --shots     images: the grid (default 2,5,7,10 and 1,2,3,4,5)
    --steps             meta-steps of the final runs: one number, or one per setting (omniglot default: 3000 for
                        5w1s, 2000 otherwise; images: 20000)
    --grid_steps        meta-steps of each beta-grid run (default 25% of the final run's)
    --grid_scales       the grid is the method's default beta times these (default 0.5,1,2)
    --grid_jobs         grid runs at once, each on its own share of this process's CPUs and GPUs (default 1; the
                        sweep's --jobs)
    --halving           rounds of successive halving instead of grid runs of --grid_steps (default 0: none; the
                        sweep's --halving): the search runs at --steps / 2^R, the better half goes on each round
    --queries           query images per class while training and validating (default 1, as in the paper's code)
    --test_queries      query images per class of the test episodes (default: --queries; the query set is also a
                        BatchNorm batch, so testing with another size than trained shifts the statistics: measured
                        -3.3 points on Omniglot 5w1s trained with 1 and tested with 15)
    --test_episodes     fixed test episodes (default 1000, the paper's)
    --val_episodes      fixed validation episodes that choose the test protocol (default 300)
    --test_inner_steps  inner steps of the validations during training (default 10, the paper's)
    --eval_episodes     validation episodes during training (default 100); --evals validations per final run
                        (default 5)
    --threads           torch threads per run (default 1; OMP_NUM_THREADS)
    --launcher          how a run starts (default this python; e.g. "accelerate launch --num_processes 2")
"""

from __future__ import annotations

import json
import math
import os
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import fire

from dist_signmaml.artifacts import CHECKPOINT_DIR, RESULTS_JSON
from dist_signmaml.config import DEFAULT_DATA, DEFAULT_INNER_LR, REPO_ROOT, ConfigError, TrainConfig
from dist_signmaml.metatest import EVALUATION_SEED, selected_score
from bench.protocol import PAPER_CELL, PROTOCOL_JSON
from dist_signmaml.sweep import SweepError, run_name
from dist_signmaml.sweep import as_list as parse_list

PRESETS = {
    # Sized to a few hours on 2 CPU cores, one setting per core.
    "omniglot": {"data": str(DEFAULT_DATA), "settings": "5w1s,20w1s", "steps": {"5w1s": 3000, "other": 2000}},
    # The paper's mini-ImageNet / FS-CIFAR100 grid (Table 1, Fig. 1): GPU-sized budgets.
    "images": {"data": "", "settings": "", "steps": {"other": 20000}},
}
GRID_FRACTION = 0.25  # each beta-grid run lasts this share of the final run: sign learns fastest early, so a short
# grid run ranks the betas by their first steps, not by where they end
GRID_SCALES = (0.5, 1.0, 2.0)  # the grid: the method's default beta times these


def grid_steps_for(final_steps: int) -> int:
    return max(1, math.ceil(GRID_FRACTION * final_steps))


class ReproduceError(ValueError):
    """Bad input or a failed stage; the message names the flag or the run directory."""


def parse_setting(text: str) -> tuple[int, int]:
    """'20w1s' -> (20, 1)."""
    ways, _, rest = text.strip().lower().partition("w")
    shots = rest.removesuffix("s")
    if not (ways.isdigit() and shots.isdigit() and rest.endswith("s")):
        raise ReproduceError(f"--settings: {text!r} is not of the form <ways>w<shots>s, e.g. 5w1s")
    return int(ways), int(shots)


def setting_name(ways: int, shots: int) -> str:
    return f"{ways}w{shots}s"


def as_list(value, flag: str, convert=str) -> list:
    """dist_signmaml.sweep's parser of comma-separated flags, with this module's error type."""
    try:
        return parse_list(value, flag, convert)
    except SweepError as error:
        raise ReproduceError(str(error)) from None


def grid_for(algo: str, scales: list[float]) -> list[float]:
    """The method's default beta times each scale: a small Appendix-A grid that the sweep extends at an edge."""
    return [float(f"{DEFAULT_INNER_LR[algo] * s:.6g}") for s in scales]


def run_logged(command: list[str], log: Path, env: dict, what: str) -> None:
    log.parent.mkdir(parents=True, exist_ok=True)
    with open(log, "a") as handle:
        handle.write(f"$ {shlex.join(command)}\n")
        handle.flush()
        finished = subprocess.run(command, stdout=handle, stderr=subprocess.STDOUT, env=env)
    if finished.returncode != 0:
        raise ReproduceError(f"{what} failed (exit {finished.returncode}); see {log}")


def validation_every(steps: int, evals: int) -> int:
    """The validation (and checkpoint) cadence of a final run of `steps` validated `evals` times."""
    return max(1, steps // max(1, evals))


def choose_beta(setting_dir: Path, algo: str, grid: list[float], grid_steps: int, common: dict, launcher: str,
                env: dict, jobs: int = 1, halving: int = 0, final_steps: int = 0, evals: int = 0) -> float:
    """Stage 1: the sweep (resumable: it skips grid runs that finished) -> the best beta by validation accuracy.
    `jobs`: grid runs at once, each on its own share of the CPUs (and GPUs) this process may use. `halving`: rounds
    of successive halving, whose runs validate like the final run of `final_steps` (`evals` times) and whose winner
    is that final run (`adopt_winner`)."""
    sweep_dir = setting_dir / f"beta_{algo}"
    if halving:
        every = validation_every(final_steps, evals)
        budget = [f"--steps={final_steps}", f"--halving={halving}", f"--eval_every={every}", f"--ckpt_every={every}"]
    else:
        budget = [f"--steps={grid_steps}", f"--eval_every={grid_steps}"]
    command = [sys.executable, "-m", "dist_signmaml.sweep", f"--algos={algo}", f"--grid={','.join(map(str, grid))}",
               f"--out={sweep_dir}", f"--launcher={launcher}", "--max_extensions=2", *budget,
               "--test_episodes=0"] + [f"--{k}={v}" for k, v in sorted(common.items())]
    command += [f"--jobs={jobs}"] if jobs > 1 else []
    run_logged(command, sweep_dir / "sweep.log", env, f"beta grid of {algo} in {sweep_dir}")
    summary = json.loads((sweep_dir / "sweep.json").read_text())
    return float(summary["best"][algo])


def adopt_winner(setting_dir: Path, algo: str, beta: float) -> None:
    """Stage 2 after successive halving: the winner's sweep run is the full run; its files (less the checkpoints,
    which stay with the sweep run) become OUT/<setting>/<algo>, by a rename of a finished copy, so that an
    interrupted copy is never taken for a run."""
    run_dir, winner = setting_dir / algo, setting_dir / f"beta_{algo}" / algo / run_name(beta)
    if (run_dir / RESULTS_JSON).is_file():
        return
    copy = setting_dir / f".{algo}.copy"
    shutil.rmtree(copy, ignore_errors=True)
    shutil.copytree(winner, copy, ignore=shutil.ignore_patterns(CHECKPOINT_DIR))
    shutil.rmtree(run_dir, ignore_errors=True)
    copy.rename(run_dir)


def train_final(run_dir: Path, algo: str, beta: float, steps: int, evals: int, common: dict, launcher: str,
                env: dict) -> None:
    """Stage 2: the full run; resumed from its newest checkpoint when a previous attempt was interrupted."""
    if (run_dir / RESULTS_JSON).is_file():
        return
    every = validation_every(steps, evals)
    command = shlex.split(launcher) + ["-m", "dist_signmaml.train", f"--algo={algo}", f"--inner_lr={beta}",
                                       f"--steps={steps}", f"--eval_every={every}", f"--ckpt_every={every}",
                                       "--test_episodes=0", "--resume=True", f"--out={run_dir}"]
    command += [f"--{k}={v}" for k, v in sorted(common.items())]
    run_logged(command, run_dir / "train.log", env, f"training {run_dir}")


def test_final(run_dir: Path, val_episodes: int, test_episodes: int, queries: int, env: dict, data: str = "") -> dict:
    """Stage 3: the test protocol chosen on validation, scored on the fixed test episodes (bench.protocol), with the
    best-by-validation weights. A protocol.json scored with other options is kept aside and scored again. `data`:
    the shard root to score on, when not the one the run was trained from (a run continued in another checkout)."""
    out = run_dir / PROTOCOL_JSON
    wanted = {"val_episodes": val_episodes, "test_episodes": test_episodes, "queries": queries}
    if out.is_file():
        previous = json.loads(out.read_text())
        if {k: previous.get(k) for k in wanted} != wanted:
            out.rename(run_dir / f"protocol_{previous.get('queries')}q_{previous.get('val_episodes')}val_"
                                 f"{previous.get('test_episodes')}test.json")
    if not out.is_file():
        command = [sys.executable, "-m", "bench.protocol", str(run_dir), f"--val_episodes={val_episodes}",
                   f"--test_episodes={test_episodes}", f"--queries={queries}"] + ([f"--data={data}"] if data else [])
        importable = env | {"PYTHONPATH": os.pathsep.join(filter(None, [str(REPO_ROOT), env.get("PYTHONPATH")]))}
        run_logged(command, run_dir / "test.log", importable, f"testing {run_dir}")
    return json.loads(out.read_text())


def run_row(setting_dir: Path, algo: str) -> dict | None:
    """One method's line of the table from its files (None until its test has run)."""
    run_dir = setting_dir / algo
    if not (run_dir / PROTOCOL_JSON).is_file():
        return None
    results = json.loads((run_dir / RESULTS_JSON).read_text())
    protocol = json.loads((run_dir / PROTOCOL_JSON).read_text())
    chosen, paper = protocol["test_chosen"], protocol["test_paper"]
    sweep_file = setting_dir / f"beta_{algo}" / "sweep.json"
    sweep = json.loads(sweep_file.read_text()) if sweep_file.is_file() else {"runs": []}
    grid = sorted(r["beta"] for r in sweep["runs"])
    rounds = sweep.get("halving", {}).get(algo)  # successive halving: the search ran at the first round's steps
    timing = results["seconds_per_meta_iteration"]
    config = results["config"]
    return {"setting": setting_dir.name, "ways": config["ways"], "shots": config["shots"], "algo": algo,
            "beta": config["inner_lr"], "beta_grid": grid, "steps": config["steps"], "meta_batch": config["meta_batch"],
            # grid runs validated once, at their end
            "grid_steps": rounds[0]["steps"] if rounds else max((r.get("val_step") or 0 for r in sweep["runs"]),
                                                                default=0) or None,
            **({"halving": rounds} if rounds else {}),
            "train_queries": config["queries"], "train_inner_steps": config["inner_steps"], "test_queries": protocol["queries"],
            # the score the run ranked its validations by (its best step count under --val_select any_steps)
            "best_val_accuracy": selected_score(results["best_val"])["accuracy"],
            "best_val_step": results["best_val"]["step"],
            "test_accuracy": chosen["accuracy"], "test_ci95": chosen["ci95"], "test_inner_steps": chosen["inner_steps"],
            "test_lr_scale": chosen["lr_scale"], "paper_protocol_accuracy": paper["accuracy"],
            "paper_protocol_ci95": paper["ci95"], "test_episodes": protocol["test_episodes"],
            "val_episodes": protocol["val_episodes"], "seconds_per_meta_iteration": timing["mean"],
            "seconds_per_meta_iteration_std": timing["std"], "training_seconds": timing["mean"] * config["steps"],
            "run": str(run_dir)}


def summarize(out: Path) -> list[dict]:
    """reproduce.json, reproduce.md and the plots from whatever has finished under OUT."""
    rows = []
    setting_dirs = [p for p in out.iterdir() if p.is_dir() and _is_setting(p.name)]
    for setting_dir in sorted(setting_dirs, key=lambda p: parse_setting(p.name)):
        for algo in sorted((p.name for p in setting_dir.iterdir() if p.is_dir() and p.name in DEFAULT_INNER_LR),
                           key=list(DEFAULT_INNER_LR).index):  # sign, signum, fo, maml: the paper's order
            row = run_row(setting_dir, algo)
            if row:
                rows.append(row)
        _plot_setting(setting_dir)
    (out / "reproduce.json").write_text(json.dumps({"rows": rows, "comparisons": comparisons(rows)}, indent=1) + "\n")
    (out / "reproduce.md").write_text(markdown_table(rows))
    if rows:
        plot_summary(rows, out / "accuracy.png")
        plot_sign_vs_fo(rows, out / "sign_vs_fo.png")
    return rows


def _is_setting(name: str) -> bool:
    try:
        parse_setting(name)
        return True
    except ReproduceError:
        return False


def comparisons(rows: list[dict]) -> list[dict]:
    """Per setting: sign - fo and sign - maml in test accuracy points, and the training-time ratios."""
    out = []
    for setting in dict.fromkeys(r["setting"] for r in rows):
        by_algo = {r["algo"]: r for r in rows if r["setting"] == setting}
        if "sign" not in by_algo:
            continue
        sign = by_algo["sign"]
        entry = {"setting": setting}
        for other in ("fo", "maml"):
            if other in by_algo:
                entry[f"sign_minus_{other}_points"] = 100 * (sign["test_accuracy"] - by_algo[other]["test_accuracy"])
                entry[f"sign_over_{other}_time"] = sign["seconds_per_meta_iteration"] / by_algo[other]["seconds_per_meta_iteration"]
        out.append(entry)
    return out


def markdown_table(rows: list[dict]) -> str:
    lines = ["| setting | method | β (grid) | meta-steps | val (best) | test ± 95% CI, protocol chosen on val | "
             "chosen (steps × β scale) | test, paper's protocol | s / meta-iteration | training time |",
             "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    for r in rows:
        grid = "/".join(f"{b:g}" for b in r["beta_grid"])
        lines.append(f"| {r['ways']}-way {r['shots']}-shot | {r['algo']} | **{r['beta']:g}** ({grid}) | {r['steps']} | "
                     f"{100 * r['best_val_accuracy']:.2f}% @ {r['best_val_step']} | "
                     f"**{100 * r['test_accuracy']:.2f} ± {100 * r['test_ci95']:.2f}%** | "
                     f"{r['test_inner_steps']} × {r['test_lr_scale']:g} | "
                     f"{100 * r['paper_protocol_accuracy']:.2f} ± {100 * r['paper_protocol_ci95']:.2f}% | "
                     f"{r['seconds_per_meta_iteration']:.3f} ± {r['seconds_per_meta_iteration_std']:.3f} | "
                     f"{r['training_seconds'] / 60:.1f} min |")
    for c in comparisons(rows):
        parts = []
        if "sign_minus_fo_points" in c:
            parts.append(f"sign − fo {c['sign_minus_fo_points']:+.2f} points at {c['sign_over_fo_time']:.2f}× its time")
        if "sign_minus_maml_points" in c:
            parts.append(f"sign − maml {c['sign_minus_maml_points']:+.2f} points at {c['sign_over_maml_time']:.2f}× its time")
        if parts:
            lines.append(f"\n{c['setting']}: " + "; ".join(parts) + ".")
    if rows:
        r = rows[0]
        grid = f"{r['grid_steps']} meta-steps each" if r.get("grid_steps") else "see each sweep"
        if r.get("halving"):
            grid = (f"{r['grid_steps']} meta-steps each, then successive halving: the better half of each round went "
                    f"on to twice the steps, and the last survivor is the final run")
        lines.append(f"\nTest: {r['test_episodes']} fixed episodes (seed {EVALUATION_SEED}), {r['test_queries']} query "
                     f"image(s) per class, best-by-validation weights; the protocol (inner steps × test-time β "
                     f"scale) chosen per method on {r['val_episodes']} validation episodes, the paper's is "
                     f"{PAPER_CELL[0]} steps × {PAPER_CELL[1]:g}. β grid runs: {grid}. Training: "
                     f"meta-batch {r['meta_batch']}, {r['train_queries']} query image(s) per class, "
                     f"{r['train_inner_steps']} inner step(s). Seconds per meta-iteration are the runs' own means "
                     f"(data loading included; a resumed run counts its steps after the resume), measured wherever the "
                     f"runs ran; `python -m bench.cost` measures the methods side by side.")
    return "\n".join(lines) + "\n"


def _plot_setting(setting_dir: Path) -> None:
    from dist_signmaml.plot import plot

    inputs = [str(p) for p in sorted(setting_dir.iterdir()) if (p / RESULTS_JSON).is_file() and not p.name.startswith("beta_")]
    inputs += [str(p) for p in sorted(setting_dir.glob("beta_*")) if (p / "sweep.json").is_file()]
    if inputs:
        plot(*inputs, out=str(setting_dir / "plots"))


def plot_summary(rows: list[dict], path: Path) -> None:
    """Test accuracy ± CI (left) and seconds per meta-iteration (right), grouped by setting, one colour per method."""
    from dist_signmaml.plot import plt, save

    settings = list(dict.fromkeys(r["setting"] for r in rows))
    algos = list(dict.fromkeys(r["algo"] for r in rows))
    width = 0.8 / len(algos)
    figure, (left, right) = plt.subplots(1, 2, figsize=(max(8, 2.2 * len(settings) + 4), 4))
    for i, algo in enumerate(algos):
        found = {r["setting"]: r for r in rows if r["algo"] == algo}
        xs = [s + (i - (len(algos) - 1) / 2) * width for s in range(len(settings))]
        acc = [100 * found[s]["test_accuracy"] if s in found else float("nan") for s in settings]
        ci = [100 * found[s]["test_ci95"] if s in found else 0 for s in settings]
        secs = [found[s]["seconds_per_meta_iteration"] if s in found else float("nan") for s in settings]
        left.bar(xs, acc, width, yerr=ci, capsize=4, label=algo, color=f"C{i}")
        right.bar(xs, secs, width, label=algo, color=f"C{i}")
    finite = [100 * r["test_accuracy"] for r in rows]
    left.set_ylim(max(0, min(finite) - 10), min(100, max(finite) + 3))
    for axes in (left, right):
        axes.set_xticks(range(len(settings)), settings)
        axes.grid(axis="y", alpha=0.3)
        axes.legend(fontsize=8)
    left.set(ylabel="test accuracy (%), ± 95% CI", title="Test accuracy")
    right.set(ylabel="seconds per meta-iteration", title="Cost per meta-iteration")
    save(figure, path)


def plot_sign_vs_fo(rows: list[dict], path: Path) -> None:
    """The paper's Fig. 1: sign - fo test accuracy per (ways, shots) cell; green where Sign-MAML is better."""
    from dist_signmaml.plot import plt, save

    pairs = {(r["ways"], r["shots"]): {} for r in rows}
    for r in rows:
        pairs[(r["ways"], r["shots"])][r["algo"]] = r
    cells = {k: v for k, v in pairs.items() if "sign" in v and "fo" in v}
    if len(cells) < 2:
        return
    ways = sorted({w for w, _ in cells})
    shots = sorted({s for _, s in cells})
    figure, axes = plt.subplots(figsize=(1.6 * len(shots) + 2, 1.0 * len(ways) + 1.5))
    for row, w in enumerate(ways):
        for col, s in enumerate(shots):
            if (w, s) not in cells:
                continue
            sign, fo = cells[(w, s)]["sign"], cells[(w, s)]["fo"]
            delta = 100 * (sign["test_accuracy"] - fo["test_accuracy"])
            axes.add_patch(plt.Rectangle((col - 0.5, row - 0.5), 1, 1, color="tab:green" if delta >= 0 else "tab:red",
                                         alpha=min(0.8, 0.15 + abs(delta) / 10)))
            axes.text(col, row, f"{100 * sign['test_accuracy']:.1f}±{100 * sign['test_ci95']:.1f}\n({delta:+.1f})",
                      ha="center", va="center", fontsize=8)
    axes.set_xlim(-0.5, len(shots) - 0.5)
    axes.set_ylim(len(ways) - 0.5, -0.5)
    axes.set_xticks(range(len(shots)), [f"{s}-shot" for s in shots])
    axes.set_yticks(range(len(ways)), [f"{w}-way" for w in ways])
    axes.set_title("Sign-MAML test accuracy (Sign − FO in points)")
    save(figure, path)


def reproduce(preset: str, *, out: str = "", data: str = "", algos="sign,fo,maml", settings="", ways="2,5,7,10",
              shots="1,2,3,4,5", steps="", grid_steps: int = 0, grid_scales=GRID_SCALES, grid_jobs: int = 1,
              halving: int = 0,
              queries: int = 1, test_queries: int = 0, test_episodes: int = 1000, val_episodes: int = 300,
              test_inner_steps: int = 10, eval_episodes: int = 100,
              evals: int = 5, threads: int = 1, launcher: str = "", seed: int = 0, **train_options) -> list[dict]:
    if preset not in PRESETS:
        raise ReproduceError(f"preset {preset!r} is not known; expected one of {', '.join(PRESETS)} (or summary)")
    defaults = PRESETS[preset]
    out_dir = Path(out or f"runs/reproduce/{preset}")
    data = data or defaults["data"]
    if not data:
        raise ReproduceError("--data is required for the images preset: a shard root with train/ val/ test/, built "
                             "with `python -m shards build imagefolder --source DIR --splits mini-imagenet --out ROOT`")
    for split in ("train", "val", "test"):
        if data != str(DEFAULT_DATA) and not (Path(data) / split / "index.json").is_file():
            raise ReproduceError(f"--data={data!r}: {Path(data) / split} is not a shard directory (no index.json); "
                                 f"expected a shard root with train/ val/ test/")
    methods = as_list(algos, "algos")
    for algo in methods:
        if algo not in DEFAULT_INNER_LR:
            raise ReproduceError(f"--algos: {algo!r} is not a method; expected some of {', '.join(DEFAULT_INNER_LR)}")
    if settings or defaults["settings"]:
        grid_settings = [parse_setting(s) for s in as_list(settings or defaults["settings"], "settings")]
    else:
        grid_settings = [(w, s) for w in as_list(ways, "ways", int) for s in as_list(shots, "shots", int)]
    if steps:
        step_counts = as_list(steps, "steps", int)
    else:
        step_counts = [defaults["steps"].get(setting_name(*s), defaults["steps"]["other"]) for s in grid_settings]
    if len(step_counts) == 1:
        step_counts *= len(grid_settings)
    if len(step_counts) != len(grid_settings) or min(step_counts) < 1:
        raise ReproduceError(f"--steps={steps!r}: expected one positive number, or one per setting "
                             f"({len(grid_settings)}: {', '.join(setting_name(*s) for s in grid_settings)})")
    scales = as_list(grid_scales, "grid_scales", float)
    test_queries = test_queries or queries
    for flag, value in (("queries", queries), ("test_queries", test_queries), ("test_episodes", test_episodes),
                        ("val_episodes", val_episodes), ("test_inner_steps", test_inner_steps),
                        ("eval_episodes", eval_episodes), ("evals", evals), ("threads", threads),
                        ("grid_jobs", grid_jobs)):
        if not isinstance(value, int) or isinstance(value, bool) or value < 1:
            raise ReproduceError(f"--{flag}={value!r} is invalid: expected a positive integer")
    if not isinstance(halving, int) or isinstance(halving, bool) or halving < 0:
        raise ReproduceError(f"--halving={halving!r} is invalid: expected an integer >= 0 (rounds of successive "
                             f"halving; 0 = grid runs of --grid_steps)")
    if halving and grid_steps:
        raise ReproduceError(f"--grid_steps={grid_steps} with --halving={halving}: halving's search runs at --steps / "
                             f"2^{halving}; give one of them")
    if grid_steps and (not isinstance(grid_steps, int) or isinstance(grid_steps, bool) or grid_steps < 1):
        raise ReproduceError(f"--grid_steps={grid_steps!r} is invalid: expected a positive integer (default: "
                             f"{GRID_FRACTION:.0%} of the final run's steps)")
    for reserved in ("algo", "inner_lr", "steps", "ways", "shots", "resume", "out", "test_episodes", "eval_every"):
        if reserved in train_options:
            raise ReproduceError(f"--{reserved} is set by the harness for each run; leave it out")
    launcher = launcher or shlex.quote(sys.executable)
    env = os.environ | {"OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads)}

    for (w, s), final_steps in zip(grid_settings, step_counts):
        common = {"ways": w, "shots": s, "queries": queries, "data": data, "seed": seed,
                  "eval_episodes": eval_episodes, "test_inner_steps": test_inner_steps} | train_options
        try:  # every option is checked before the first run of the setting starts
            TrainConfig.from_options(**common)
        except ConfigError as error:
            raise ReproduceError(str(error)) from None
        setting_dir = out_dir / setting_name(w, s)
        for algo in methods:
            beta = choose_beta(setting_dir, algo, grid_for(algo, scales), grid_steps or grid_steps_for(final_steps),
                               common, launcher, env, grid_jobs, halving, final_steps, evals)
            if halving:
                print(f"{setting_name(w, s)} {algo}: beta {beta:g} by successive halving, its run trained to "
                      f"{final_steps} steps", flush=True)
                adopt_winner(setting_dir, algo, beta)
            else:
                print(f"{setting_name(w, s)} {algo}: beta {beta:g} by validation; training {final_steps} steps",
                      flush=True)
                train_final(setting_dir / algo, algo, beta, final_steps, evals, common, launcher, env)
            result = test_final(setting_dir / algo, val_episodes, test_episodes, test_queries, env, data)
            chosen, paper = result["test_chosen"], result["test_paper"]
            print(f"{setting_name(w, s)} {algo}: test {100 * chosen['accuracy']:.2f} ± {100 * chosen['ci95']:.2f}% "
                  f"at {chosen['inner_steps']} steps x{chosen['lr_scale']:g} (chosen on val); paper's protocol "
                  f"{100 * paper['accuracy']:.2f}%", flush=True)
    rows = summarize(out_dir)
    print(f"-> {out_dir / 'reproduce.md'}")
    return rows


def main(preset: str = "", **options) -> None:
    try:
        if preset == "summary":
            out = Path(options.pop("out", "") or "runs/reproduce/omniglot")
            if options or not out.is_dir():
                raise ReproduceError(f"summary takes only --out, an existing reproduction directory (got {out}"
                                     + (f" and {sorted(options)})" if options else ")"))
            summarize(out)
            print((out / "reproduce.md").read_text())
            return
        if not preset:
            raise ReproduceError(f"give a preset: {', '.join(PRESETS)} or summary (python -m bench.reproduce --help)")
        reproduce(preset, **options)
    except ReproduceError as error:
        print(f"error: {error}", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    if {"--help", "-h"} & set(sys.argv[1:]):
        print(__doc__)
        sys.exit(0)
    fire.Fire(main)
