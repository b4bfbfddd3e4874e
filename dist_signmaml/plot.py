"""Figures from finished runs and sweeps (matplotlib, no display needed).

    python -m dist_signmaml.plot runs/sign runs/fo runs/maml --out plots
    python -m dist_signmaml.plot runs/sweep --out plots

Each argument is a run directory (with results.json) or a sweep directory (with sweep.json). Written:
    accuracy_vs_step.png     validation accuracy (± 95% CI band) against meta-step for every run, with the
                             meta-training accuracy after adaptation (TensorBoard events) dashed
    time_per_iteration.png   seconds per meta-iteration, mean ± std, one bar per run (the paper's Table 1 lower row)
    sweep.png                validation accuracy against beta per method, best marked (paper Appendix A); after
                             successive halving, one curve per round
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import fire

try:
    import matplotlib

    matplotlib.use("Agg")  # files only: works on clusters without a display
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator
except ModuleNotFoundError:  # an optional extra: plot() says how to install it
    matplotlib = plt = MaxNLocator = None

from dist_signmaml.artifacts import RESULTS_JSON  # noqa: E402

SWEEP_JSON = "sweep.json"
NO_MATPLOTLIB = ("plotting needs matplotlib, which is not installed: the [plot] extra, pip install -e '.[plot]' in "
                 "the dist_signmaml checkout (or pip install matplotlib)")


class PlotError(ValueError):
    pass


def load_inputs(paths) -> tuple[list[dict], list[dict]]:
    """Run summaries (results.json, with `label` and `dir` added) and sweep summaries (sweep.json)."""
    runs, sweeps = [], []
    for path in map(Path, paths):
        if (path / RESULTS_JSON).is_file():
            runs.append(json.loads((path / RESULTS_JSON).read_text()) | {"dir": str(path)})
        elif (path / SWEEP_JSON).is_file():
            sweeps.append(json.loads((path / SWEEP_JSON).read_text()) | {"dir": str(path)})
        else:
            raise PlotError(f"{str(path)!r} holds neither {RESULTS_JSON} (a finished run) nor {SWEEP_JSON} (a sweep)")
    algos = [run["config"]["algo"] for run in runs]
    for run in runs:  # the method's name, plus the directory when several runs share a method
        algo = run["config"]["algo"]
        run["label"] = algo if algos.count(algo) == 1 else f"{algo} · {Path(run['dir']).name}"
    return runs, sweeps


def train_accuracy_curve(run_dir: str) -> tuple[list[int], list[float]]:
    """train/accuracy_after from the run's TensorBoard events ([] when there are none)."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    tb = Path(run_dir) / "tb"
    if not tb.is_dir():
        return [], []
    events = EventAccumulator(str(tb), size_guidance={"scalars": 0})
    events.Reload()
    if "train/accuracy_after" not in events.Tags()["scalars"]:
        return [], []
    scalars = events.Scalars("train/accuracy_after")
    return [e.step for e in scalars], [e.value for e in scalars]


def plot_accuracy_vs_step(runs: list[dict], path: Path) -> Path:
    figure, axes = plt.subplots(figsize=(7, 4.5))
    for index, run in enumerate(runs):
        color = f"C{index % 10}"
        history = run.get("val_history") or []
        if history:
            steps = [r["step"] for r in history]
            accuracy = [100 * r["accuracy"] for r in history]
            ci = [100 * r["ci95"] for r in history]
            axes.plot(steps, accuracy, "o-", color=color, label=f"{run['label']} (val)")
            axes.fill_between(steps, [a - c for a, c in zip(accuracy, ci)], [a + c for a, c in zip(accuracy, ci)],
                              color=color, alpha=0.2)
        train_steps, train_accuracy = train_accuracy_curve(run["dir"])
        if train_steps:
            axes.plot(train_steps, [100 * a for a in train_accuracy], "--", color=color, alpha=0.6,
                      label=f"{run['label']} (meta-train)")
    axes.xaxis.set_major_locator(MaxNLocator(integer=True))
    axes.set(xlabel="meta-step", ylabel="query accuracy after adaptation (%)",
             title="Accuracy vs meta-step (val: ± 95% CI)")
    axes.grid(alpha=0.3)
    axes.legend(fontsize=8)
    return save(figure, path)


def plot_time_per_iteration(runs: list[dict], path: Path) -> Path:
    timed = [run for run in runs if run["seconds_per_meta_iteration"]["count"]]
    if not timed:
        raise PlotError("no run has timed meta-iterations (runs of a single step have none)")
    figure, axes = plt.subplots(figsize=(max(4.0, 1.2 * len(timed) + 2), 4))
    means = [run["seconds_per_meta_iteration"]["mean"] for run in timed]
    stds = [run["seconds_per_meta_iteration"]["std"] for run in timed]
    axes.bar(range(len(timed)), means, yerr=stds, capsize=6, color=[f"C{i % 10}" for i in range(len(timed))])
    axes.set_xticks(range(len(timed)), [run["label"] for run in timed], rotation=20, ha="right")
    axes.set(ylabel="seconds per meta-iteration", title="Time per meta-iteration (mean ± std)")
    axes.grid(axis="y", alpha=0.3)
    return save(figure, path)


def sweep_curves(sweep: dict, algo: str) -> list[dict]:
    """The curves of one method's sweep, each {label, beta, val_accuracy (%), ci95 (%) or None, best: the best
    beta on it or None}. A plain sweep is one curve. Under successive halving the runs end at different meta-steps,
    so one curve per round, each run as it stood at that round's meta-steps, is what compares like with like."""
    rows = sorted((r for r in sweep["runs"] if r["algo"] == algo), key=lambda r: r["beta"])
    best = next((r["beta"] for r in rows if r["best"]), None)
    rounds = sweep.get("halving", {}).get(algo)
    if not rounds:
        return [{"label": "", "beta": [r["beta"] for r in rows], "val_accuracy": [100 * r["val_accuracy"] for r in rows],
                 "ci95": [100 * r["val_ci95"] for r in rows], "best": best}] if rows else []
    curves = []
    for index, round_ in enumerate(rounds):
        trained = [(b, a) for b, a in zip(round_["betas"], round_["val_accuracy"]) if a is not None]
        curves.append({"label": f"{round_['steps']} meta-steps", "beta": [b for b, _ in trained],
                       "val_accuracy": [100 * a for _, a in trained], "ci95": None,
                       "best": best if index == len(rounds) - 1 else None})
    return curves


def plot_sweeps(sweeps: list[dict], path: Path) -> Path:
    methods = sorted({row["algo"] for sweep in sweeps for row in sweep["runs"]})
    figure, all_axes = plt.subplots(1, len(methods), figsize=(4.5 * len(methods), 4), squeeze=False)
    for axes, algo in zip(all_axes[0], methods):
        color = 0
        for sweep in sweeps:
            name = Path(sweep["dir"]).name if len(sweeps) > 1 else ""
            for curve in sweep_curves(sweep, algo):
                label = " ".join(part for part in (name, curve["label"]) if part) or None
                axes.errorbar(curve["beta"], curve["val_accuracy"], yerr=curve["ci95"], fmt="o-", capsize=4,
                              color=f"C{color % 10}", label=label)
                color += 1
                if curve["best"] in curve["beta"]:
                    axes.plot([curve["best"]], [curve["val_accuracy"][curve["beta"].index(curve["best"])]], "*",
                              markersize=16, color="gold", markeredgecolor="black", zorder=5)
        axes.set_xscale("log")
        axes.set(xlabel="inner learning rate β", ylabel="val accuracy (%)", title=f"{algo}: β sweep (★ best)")
        axes.grid(alpha=0.3, which="both")
        if axes.get_legend_handles_labels()[1]:
            axes.legend(fontsize=8)
    return save(figure, path)


def save(figure, path: Path) -> Path:
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)
    return path


def plot(*paths: str, out: str = "plots") -> list[Path]:
    """Write the figures that the given runs and sweeps support; returns their paths."""
    if plt is None:
        raise PlotError(NO_MATPLOTLIB)
    if not paths:
        raise PlotError("give at least one run or sweep directory: python -m dist_signmaml.plot RUN_DIR...")
    runs, sweeps = load_inputs(paths)
    out_dir = Path(out)
    out_dir.mkdir(parents=True, exist_ok=True)
    written = []
    if runs:
        written.append(plot_accuracy_vs_step(runs, out_dir / "accuracy_vs_step.png"))
        if any(run["seconds_per_meta_iteration"]["count"] for run in runs):
            written.append(plot_time_per_iteration(runs, out_dir / "time_per_iteration.png"))
    if sweeps:
        written.append(plot_sweeps(sweeps, out_dir / "sweep.png"))
    return written


def main(*paths: str, out: str = "plots") -> None:
    """Plot finished runs (results.json) and sweeps (sweep.json) into PNG files under --out."""
    try:
        for path in plot(*paths, out=out):
            print(path)
    except PlotError as error:
        print(f"error: {error}", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    fire.Fire(main)
