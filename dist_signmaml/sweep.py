"""The inner learning rate beta by the paper's Appendix A procedure, per method.

Train one run per beta of a grid, pick the beta with the best validation accuracy, and while the best sits at an
edge of the values tried, try two more values beyond that edge, spaced like the edge's neighbour (Appendix A: best
0.16 of 0.06..0.16 -> try 0.18 and 0.20; stop when the best is inside). Runs go one after another here, N at once
(`--jobs N`), or into a SLURM job array per round (`--slurm`): re-running the same command picks up the finished runs,
and either writes the next round or the summary.

With `--halving R` (successive halving) the search runs at --steps / 2^R meta-steps, and then R rounds each keep the
better half of the runs (at least one), ranked by their best validation up to the previous round's step count, and
continue them from their last checkpoint to twice the steps: the last round trains the survivors to --steps, so the
winner's run is the full-budget run of the chosen beta. Every round trains with --schedule_steps = --steps, so the
outer learning-rate schedule and the multi-step loss's annealing are those of the full run, and the winner's run is
the very run one started at --steps would be. Five betas at R = 3 cost 5/8 + 2/8 + 1/4 + 1/2 = 1.625 full runs,
where a grid at a quarter of the budget followed by a full run costs 2.25 (the search's extensions add runs at
--steps / 2^R).

    python -m dist_signmaml.sweep --algos sign,fo --steps 300 --out runs/sweep
    python -m dist_signmaml.sweep --algos sign --grid 0.003,0.005,0.008 --launcher "accelerate launch --num_processes 2"
    python -m dist_signmaml.sweep --algos sign --jobs 8          # 8 runs at once: one GPU and 1/8 of the CPUs each
    python -m dist_signmaml.sweep --algos sign --steps 16000 --halving 3   # search at 2000 steps, winner to 16000
    python -m dist_signmaml.sweep --algos sign --slurm --sbatch "--gres=gpu:1 --time=04:00:00"   # then sbatch ...

Options (every other option is a training option, passed to each run: `python -m dist_signmaml.train --help`):
    --algos           methods to tune, comma-separated: sign, fo, maml, signum (default sign)
    --grid            betas to start from, comma-separated, one method only (default: Appendix A's grid per method)
    --out             sweep directory; run i of method M goes to OUT/M/beta_<value> (default runs/sweep)
    --launcher        how a run starts a module (default: this python; e.g. "accelerate launch --num_processes 2")
    --max_extensions  rounds of two more betas past an edge before giving up (default 5)
    --halving         rounds of successive halving after the search (default 0: none); needs --steps divisible by
                      2^R, and sets each run's --schedule_steps to --steps
    --jobs            runs at once on this machine (default 1). Each gets its own share: this process's CPUs split
                      into JOBS contiguous slices (pinned, OMP_NUM_THREADS = the slice's size unless set), and the
                      visible GPUs split likewise (CUDA_VISIBLE_DEVICES); the shares stay fixed for the whole sweep,
                      so every run's seconds per meta-iteration are measured on the same resources
    --slurm           write a SLURM job array per round instead of running (re-run the command to continue)
    --submit          with --slurm: submit with `sbatch --wait` and continue until done
    --sbatch          extra #SBATCH options, e.g. "--gres=gpu:1 --time=04:00:00"
The summary: OUT/sweep.csv, OUT/sweep.json and OUT/sweep.md (best per method marked).
"""

from __future__ import annotations

import csv
import json
import os
import queue
import shlex
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor, as_completed
from functools import partial
from pathlib import Path

import fire
from tqdm import tqdm

from dist_signmaml.artifacts import RESULTS_JSON, TRAIN_LOG
from dist_signmaml.config import ALGORITHM_FACTS, PAPER_GRIDS, ConfigError, TrainConfig
from dist_signmaml.metatest import ranked, selected_score

ALGORITHMS = tuple(ALGORITHM_FACTS)

__all__ = ["PAPER_GRIDS", "main", "plan", "sweep"]  # PAPER_GRIDS: Appendix A's ranges, from config's registry


class SweepError(ValueError):
    """Bad sweep input or a failed run; the message names the flag or the run directory."""


def canonical(beta: float) -> float:
    """Betas computed by extension (0.16 + 0.02) are rounded so that they name the same run every time."""
    return float(f"{beta:.10g}")


def run_name(beta: float) -> str:
    return f"beta_{canonical(beta):g}"


def best_beta(accuracy: dict[float, float], tried: list[float]) -> float:
    """The tried beta with the highest validation accuracy (ties: the smaller beta; equal accuracies are the same
    number of correct queries, told apart by float32 rounding alone: `ranked`)."""
    return max(sorted(tried), key=lambda beta: (ranked(accuracy[beta]), -beta))


def beyond_edge(tried: list[float], edge: float) -> list[float]:
    """Two values past `edge` (the smallest or largest tried), spaced by the gap to the edge's neighbour. Below the
    range the additive step could reach beta <= 0; it is then geometric, by the ratio of the two smallest values."""
    values = sorted(tried)
    if edge == values[-1]:
        gap = values[-1] - values[-2]
        return [canonical(edge + gap), canonical(edge + 2 * gap)]
    gap = values[1] - values[0]
    if edge - 2 * gap > 0:
        return [canonical(edge - gap), canonical(edge - 2 * gap)]
    ratio = values[0] / values[1]
    return [canonical(edge * ratio), canonical(edge * ratio * ratio)]


def plan(grid, accuracy: dict[float, float], max_extensions: int) -> dict:
    """Where the search stands given the accuracies known so far: a pure function, so a sweep resumes from its runs.

    Returns {"pending": betas still to run, "tried": betas of the search so far, "best": best beta or None,
    "status": "running" | "done" | "edge"}; "edge" means the best is still at an edge after max_extensions rounds.
    """
    tried = sorted({canonical(b) for b in grid})
    for round_ in range(max_extensions + 1):
        pending = [beta for beta in tried if beta not in accuracy]
        if pending:
            return {"pending": pending, "tried": tried, "best": None, "status": "running"}
        best = best_beta(accuracy, tried)
        if len(tried) < 2 or best not in (tried[0], tried[-1]):
            return {"pending": [], "tried": tried, "best": best, "status": "done"}
        if round_ == max_extensions:
            return {"pending": [], "tried": tried, "best": best, "status": "edge"}
        tried = sorted(set(tried) | set(beyond_edge(tried, best)))
    raise AssertionError("unreachable")


def best_validation(results: dict, up_to: int | None = None) -> dict | None:
    """A run's best validation result, or its best among those at steps <= `up_to` when it has gone further (a
    run continued by successive halving is ranked in each round as it stood at that round's step count); None when
    it has not reached `up_to` yet. Ties go to the earlier result, as the validator keeps it."""
    if up_to is None or results.get("steps", 0) == up_to:
        return results.get("best_val")
    if results.get("steps", 0) < up_to:
        return None
    earlier = [result for result in results.get("val_history", []) if result["step"] <= up_to]
    return max(earlier, key=lambda result: ranked(selected_score(result)["accuracy"])) if earlier else None


def halving_steps(steps: int, rounds: int) -> list[int]:
    """The meta-steps of each round of successive halving: the search's, then doubling up to `steps`."""
    return [steps >> (rounds - round_) for round_ in range(rounds + 1)]


def halve(search: dict, accuracies_by_round: list[dict[float, float]], steps_by_round: list[int]) -> dict:
    """Successive halving after the search `search` (plan's result, done or at an edge), a pure function like
    `plan`: round r keeps the better half (at least one) of round r-1's runs, ranked by their validation up to
    round r-1's steps (`accuracies_by_round[r - 1]`, beta -> accuracy), and trains them to `steps_by_round[r]`.
    Returns `search` with "pending" (betas to train to "steps"), "rounds" (each round so far: its steps, betas and
    their validation accuracies up to those steps, None until trained) and, once the last round is trained, "best"
    (the best at the full budget)."""
    def round_of(index: int, betas: list[float]) -> dict:
        scores = accuracies_by_round[index]
        return {"steps": steps_by_round[index], "betas": betas, "val_accuracy": [scores.get(beta) for beta in betas]}

    survivors, rounds = list(search["tried"]), [round_of(0, list(search["tried"]))]
    for round_ in range(1, len(steps_by_round)):
        before = accuracies_by_round[round_ - 1]
        by_rank = sorted(survivors, key=lambda beta: (-ranked(before[beta]), beta))  # ties: the smaller beta
        survivors = sorted(by_rank[:max(1, len(survivors) // 2)])
        rounds.append(round_of(round_, survivors))
        pending = [beta for beta in survivors if beta not in accuracies_by_round[round_]]
        if pending:
            return search | {"pending": pending, "steps": steps_by_round[round_], "rounds": rounds, "best": None}
    return search | {"pending": [], "rounds": rounds, "best": best_beta(accuracies_by_round[-1], survivors)}


def read_accuracies(algo_dir: Path, up_to: int | None = None) -> dict[float, dict]:
    """beta -> the best validation result of each finished run under OUT/ALGO (runs without results.json are
    unfinished and left out), ranked as the run ranked it (--val_select: at its test steps, or its best count).
    `up_to`: only runs that reached that many meta-steps, each scored by its validations up to there."""
    found = {}
    for results_file in sorted(algo_dir.glob(f"beta_*/{RESULTS_JSON}")):
        results = json.loads(results_file.read_text())
        if not results.get("best_val"):
            raise SweepError(f"{results_file} has no validation result: sweep runs need --eval_episodes > 0")
        best_val = best_validation(results, up_to)
        if best_val is None:
            continue
        beta = canonical(results["config"]["inner_lr"])
        best = selected_score(best_val)
        found[beta] = {"beta": beta, "val_accuracy": best["accuracy"],
                       "val_ci95": best["ci95"], "val_step": best_val["step"], "steps": results.get("steps"),
                       "test_accuracy": (results.get("test") or {}).get("accuracy"),
                       "test_ci95": (results.get("test") or {}).get("ci95"),
                       "seconds_per_meta_iteration": results["seconds_per_meta_iteration"]["mean"],
                       "run": str(results_file.parent)}
    return found


def train_command(launcher: str, train_options: dict, algo: str) -> list[str]:
    """The command of every run of `algo`, less --inner_lr and --out. `launcher` runs a module: `python`, or e.g.
    `accelerate launch --num_processes 2`."""
    flags = [f"--{k}={v}" for k, v in sorted(train_options.items())]
    return shlex.split(launcher) + ["-m", "dist_signmaml.train", *flags, f"--algo={algo}"]


def allowed_cpus() -> list[int]:
    """The CPUs this process may run on (its affinity, e.g. under taskset or a SLURM allocation)."""
    return sorted(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else list(range(os.cpu_count() or 1))


def visible_gpus() -> list[str]:
    """The GPUs runs may use: CUDA_VISIBLE_DEVICES where it is set (indices or UUIDs), else every device torch sees."""
    listed = os.environ.get("CUDA_VISIBLE_DEVICES")
    if listed is not None:
        return [device.strip() for device in listed.split(",") if device.strip()]
    import torch  # only here: a sweep of one run at a time never needs it

    return [str(index) for index in range(torch.cuda.device_count())]


def placements(jobs: int, cpus: list[int], gpus: list[str]) -> list[dict]:
    """Disjoint shares for `jobs` runs at once: `cpus` in `jobs` contiguous slices (the first ones one larger where
    they do not divide evenly), and `gpus` likewise when there are any. Contiguous, so that a slice stays on one
    socket or core complex where the numbering follows the hardware."""
    if jobs > len(cpus):
        raise SweepError(f"--jobs={jobs} is more than the {len(cpus)} CPUs this sweep may use; expected at most "
                         f"{len(cpus)}")
    if gpus and jobs > len(gpus):
        raise SweepError(f"--jobs={jobs} is more than the {len(gpus)} visible GPUs ({','.join(gpus)}); expected at "
                         f"most {len(gpus)}, one or more GPUs per run")

    def split(items: list) -> list[list]:
        size, larger = divmod(len(items), jobs)
        bounds = [slot * size + min(slot, larger) for slot in range(jobs + 1)]
        return [items[bounds[slot]:bounds[slot + 1]] for slot in range(jobs)]

    gpu_slices = split(gpus) if gpus else [[] for _ in range(jobs)]
    return [{"cpus": cpu_slice, "gpus": gpu_slice} for cpu_slice, gpu_slice in zip(split(cpus), gpu_slices)]


def placement_options(share: dict) -> dict:
    """subprocess options that confine a run (and the processes its launcher starts) to its share; {} for none."""
    if not share:
        return {}
    env = os.environ | {"OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", str(len(share["cpus"])))}
    if share["gpus"]:
        env["CUDA_VISIBLE_DEVICES"] = ",".join(share["gpus"])
    options = {"env": env}
    if hasattr(os, "sched_setaffinity"):
        options["preexec_fn"] = partial(os.sched_setaffinity, 0, share["cpus"])
    return options


def describe(share: dict) -> str:
    if not share:
        return ""
    gpus = f", GPU {','.join(share['gpus'])}" if share["gpus"] else ""
    return f" on CPUs {','.join(map(str, share['cpus']))}{gpus}"


def train_one(beta: float, algo: str, algo_dir: Path, launcher: str, train_options: dict, share: dict,
              number: int, planned: int) -> str | None:
    """One run of the grid into OUT/ALGO/beta_<value>, with its output in its train.log; returns why it failed, or
    None. `number` of `planned`: where the run stands among the runs known so far, for the line it prints."""
    run_dir = algo_dir / run_name(beta)
    run_dir.mkdir(parents=True, exist_ok=True)
    log_file = run_dir / TRAIN_LOG
    tqdm.write(f"sweep run {number} of {planned} planned so far: {algo} beta={beta:g}{describe(share)}, "
               f"log {log_file} (tail -f to follow)")
    # --resume: a run killed in an earlier sweep continues from its checkpoint (a fresh one starts at step 0)
    command = train_command(launcher, train_options, algo) + [f"--inner_lr={beta:g}", f"--out={run_dir}", "--resume"]
    started = time.monotonic()
    with open(log_file, "a") as log:
        finished = subprocess.run(command, stdout=log, stderr=subprocess.STDOUT, **placement_options(share))
    if finished.returncode != 0 or not (run_dir / RESULTS_JSON).is_file():
        return f"run {run_dir} failed (exit {finished.returncode}); see {log_file}"
    # the score the search ranks by (the best step count, under --val_select any_steps), not the raw one
    best = selected_score(json.loads((run_dir / RESULTS_JSON).read_text()).get("best_val") or {})
    tqdm.write(f"  {algo} beta={beta:g}: best val {100 * best.get('accuracy', float('nan')):.2f} ± "
               f"{100 * best.get('ci95', float('nan')):.2f}% in {time.monotonic() - started:.0f} s")
    return None


def run_grid(betas: list[float], algo: str, algo_dir: Path, launcher: str, train_options: dict,
             finished_before: int = 0, planned: int = 0, jobs: int = 1) -> None:
    """Train `betas`, `jobs` at a time (one after another for 1), each run on a share of the machine that no other
    run of the sweep uses (`placements`). After a failed run no further run starts, but those already running
    finish (their results count when the sweep is run again); then the sweep fails, naming the failed run.
    `finished_before` of `planned`: how far the whole sweep is, for the progress lines."""
    planned = max(planned, finished_before + len(betas))
    shares = [{}] if jobs == 1 else placements(jobs, allowed_cpus(), visible_gpus())
    free = queue.SimpleQueue()
    for share in shares:
        free.put(share)
    numbers = iter(range(finished_before + 1, planned + 1))  # in the order the runs start
    failed, not_started = threading.Event(), []

    def train_on_a_free_share(beta: float) -> str | None:
        share = free.get()
        try:
            if failed.is_set():
                not_started.append(beta)
                return None
            failure = train_one(beta, algo, algo_dir, launcher, train_options, share, next(numbers), planned)
            if failure:
                failed.set()
            return failure
        finally:
            free.put(share)

    with tqdm(total=len(betas), desc=f"sweep {algo}", unit="run", dynamic_ncols=True) as progress, \
            ThreadPoolExecutor(max_workers=min(len(shares), len(betas)) or 1) as pool:
        runs = [pool.submit(train_on_a_free_share, beta) for beta in betas]
        for _ in as_completed(runs):
            progress.update()
        failures = [failure for failure in (run.result() for run in runs) if failure]  # in the grid's order
    if failures:
        more = [f"{len(failures) - 1} more failed"] if len(failures) > 1 else []
        more += [f"beta {', '.join(f'{beta:g}' for beta in sorted(not_started))} not started"] if not_started else []
        raise SweepError(failures[0] + (f" ({', '.join(more)})" if more else ""))


def write_array_job(betas: list[float], algo: str, algo_dir: Path, launcher: str, train_options: dict,
                    sbatch_options: str) -> Path:
    """A SLURM job array with one task per beta: task i trains betas[i] into OUT/ALGO/beta_<betas[i]>."""
    algo_dir.mkdir(parents=True, exist_ok=True)
    to_steps = f"_to_{train_options['steps']}steps" if "steps" in train_options else ""  # halving rounds differ
    script = algo_dir / f"sweep_{len(betas)}runs_from_beta_{betas[0]:g}{to_steps}.sbatch"
    lines = ["#!/bin/bash", f"#SBATCH --job-name=sweep-{algo}", f"#SBATCH --array=0-{len(betas) - 1}",
             f"#SBATCH --output={algo_dir.resolve()}/slurm-%A_%a.log"]
    lines += [f"#SBATCH {option}" for option in shlex.split(sbatch_options)]
    lines += ["set -euo pipefail", f"cd {shlex.quote(str(Path.cwd()))}",
              "BETAS=(" + " ".join(f"{b:g}" for b in betas) + ")",
              "RUNS=(" + " ".join(run_name(b) for b in betas) + ")",
              'BETA="${BETAS[$SLURM_ARRAY_TASK_ID]}"',
              f'RUN={shlex.quote(str(algo_dir.resolve()))}/"${{RUNS[$SLURM_ARRAY_TASK_ID]}}"',
              'mkdir -p "$RUN"',
              shlex.join(train_command(launcher, train_options, algo)) + ' --inner_lr="$BETA" --out="$RUN" --resume', ""]
    script.write_text("\n".join(lines))
    return script


def summarize(out: Path, searches: dict[str, dict], accuracies: dict[str, dict[float, dict]],
              jobs: int = 1) -> list[dict]:
    """OUT/sweep.csv, sweep.json and sweep.md: one row per run, the best beta of each method marked."""
    rows = []
    for algo, search in searches.items():
        for beta in search["tried"]:
            if beta in accuracies[algo]:
                rows.append({"algo": algo, **accuracies[algo][beta], "best": beta == search["best"],
                             "status": search["status"]})
    fields = ["algo", "beta", "val_accuracy", "val_ci95", "val_step", "steps", "test_accuracy", "test_ci95",
              "seconds_per_meta_iteration", "best", "status", "run"]
    with open(out / "sweep.csv", "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=fields)
        writer.writeheader()
        writer.writerows(rows)
    halving = {a: s["rounds"] for a, s in searches.items() if "rounds" in s}
    (out / "sweep.json").write_text(json.dumps({"runs": rows, "best": {a: s["best"] for a, s in searches.items()},
                                                "status": {a: s["status"] for a, s in searches.items()},
                                                **({"halving": halving} if halving else {})}, indent=1) + "\n")
    pct = lambda v, ci: "" if v is None else f"{100 * v:.2f} ± {100 * ci:.2f}%"  # noqa: E731
    # s / meta-iteration depends on what ran beside each run, which the sweep does not record: the header says so
    at_once = f"{jobs} at a time, each pinned to its own share of the machine" if jobs > 1 else "one at a time"
    lines = ["# beta sweep (paper Appendix A)", "",
             f"Each run is a separate process; this invocation ran them {at_once}. The load beside them is not "
             f"recorded, so s / meta-iteration compares only runs made under the same conditions.", "",
             "| method | beta | meta-steps | val accuracy ± 95% CI | test accuracy ± 95% CI | s / meta-iteration |",
             "| --- | --- | --- | --- | --- | --- |"]
    for row in rows:
        mark = "**" if row["best"] else ""
        lines.append(f"| {row['algo']} | {mark}{row['beta']:g}{mark} | {row.get('steps') or ''} | "
                     f"{mark}{pct(row['val_accuracy'], row['val_ci95'])}{mark} | "
                     f"{pct(row['test_accuracy'], row['test_ci95'])} | {row['seconds_per_meta_iteration']:.4f} |")
    for algo, rounds in halving.items():
        kept = " -> ".join(f"{len(r['betas'])} at {r['steps']}" for r in rounds)
        lines.append(f"\n{algo}: successive halving, betas kept per round at its meta-steps: {kept}. Each round ranked "
                     f"by validation up to the previous round's meta-steps; the val accuracy above is each run's "
                     f"best over all the meta-steps it trained.")
    for algo, search in searches.items():
        if search["status"] == "edge":
            lines.append(f"\n{algo}: the best beta {search['best']:g} is still at an edge after the allowed extensions "
                         f"(raise --max_extensions).")
    (out / "sweep.md").write_text("\n".join(lines) + "\n")
    return rows


def as_list(value, flag: str, convert) -> list:
    """fire gives `a,b` as a tuple and `a` as a scalar; a string with commas is split."""
    items = value.split(",") if isinstance(value, str) else list(value) if isinstance(value, (list, tuple)) else [value]
    try:
        return [convert(item) for item in items if str(item).strip()]
    except ValueError:
        raise SweepError(f"--{flag}={value!r} is invalid: expected a comma-separated list") from None


def sweep(*, algos="sign", grid=(), out: str = "runs/sweep", launcher: str = "", slurm: bool = False,
          submit: bool = False, sbatch: str = "", max_extensions: int = 5, jobs: int = 1, halving: int = 0,
          **train_options) -> dict:
    """Run (or schedule) the search for every method; returns {algo: plan} and writes the summary when done."""
    methods = as_list(algos, "algos", str)
    for algo in methods:
        if algo not in ALGORITHMS:
            raise SweepError(f"--algos: {algo!r} is not a method; expected some of {', '.join(ALGORITHMS)}")
    if grid and len(methods) > 1:
        raise SweepError("--grid applies to one method; give a single --algos with it, or use the paper's grids")
    grids = {algo: as_list(grid, "grid", float) if grid else list(PAPER_GRIDS[algo]) for algo in methods}
    for values in grids.values():
        if not values or min(values) <= 0:
            raise SweepError(f"--grid={grid!r} is invalid: expected positive learning rates")
    if not isinstance(max_extensions, int) or max_extensions < 0:
        raise SweepError(f"--max_extensions={max_extensions!r} is invalid: expected an integer >= 0")
    if not isinstance(jobs, int) or isinstance(jobs, bool) or jobs < 1:
        raise SweepError(f"--jobs={jobs!r} is invalid: expected a positive integer (runs at once on this machine)")
    if jobs > 1 and slurm:
        raise SweepError(f"--jobs={jobs} applies to runs on this machine; with --slurm each beta is an array task")
    if jobs > 1:  # before the first run: a share per run must exist
        placements(jobs, allowed_cpus(), visible_gpus())
    for reserved in ("algo", "inner_lr", "resume"):
        if reserved in train_options:
            raise SweepError(f"--{reserved} is set by the sweep for each run; leave it out")
    if not isinstance(halving, int) or isinstance(halving, bool) or halving < 0:
        raise SweepError(f"--halving={halving!r} is invalid: expected an integer >= 0 (rounds of successive halving)")
    try:  # every run's options are checked before the first run starts
        full = TrainConfig.from_options(**train_options)
        rounds = halving_steps(full.steps, halving) if halving else []
        for steps in rounds:
            TrainConfig.from_options(**train_options | {"steps": steps, "schedule_steps": full.steps})
    except ConfigError as error:
        raise SweepError(str(error)) from None
    if halving and full.steps % 2 ** halving:
        raise SweepError(f"--halving={halving} needs --steps divisible by {2 ** halving} (each round doubles the "
                         f"meta-steps up to --steps); got --steps={full.steps}")
    if halving and "schedule_steps" in train_options:
        raise SweepError("--schedule_steps is set by --halving for each run (to --steps); leave it out")
    if train_options.get("eval_episodes") == 0:
        raise SweepError("--eval_episodes=0: the sweep picks beta by validation accuracy and needs validation")
    launcher = launcher or shlex.quote(sys.executable)
    out_dir = Path(out)
    out_dir.mkdir(parents=True, exist_ok=True)

    searches, accuracies, latest = {}, {}, {}  # latest: each method's search so far (for the progress lines)
    for algo in methods:
        algo_dir = out_dir / algo
        for _ in range(max_extensions + 2 + halving):  # the first round, the extensions, halving, and a last look
            accuracies[algo] = read_accuracies(algo_dir, rounds[0] if rounds else None)
            search = plan(grids[algo], {b: r["val_accuracy"] for b, r in accuracies[algo].items()}, max_extensions)
            # every round trains part of the full run: its schedules span --steps (TrainConfig.schedule_steps)
            run_options = train_options | ({"steps": rounds[0], "schedule_steps": full.steps} if rounds else {})
            if rounds and not search["pending"]:
                by_round = [{b: r["val_accuracy"] for b, r in read_accuracies(algo_dir, steps).items()}
                            for steps in rounds]
                search = halve(search, by_round, rounds)
                accuracies[algo] = read_accuracies(algo_dir)  # the summary shows each run as far as it went
                run_options = train_options | {"steps": search.get("steps", full.steps), "schedule_steps": full.steps}
                if search["pending"]:
                    tqdm.write(f"{algo}: successive halving, beta {', '.join(f'{b:g}' for b in search['pending'])} "
                               f"on to {run_options['steps']} meta-steps (round {len(search['rounds']) - 1} of "
                               f"{halving})")
            if not search["pending"]:
                break
            if not slurm:
                latest[algo] = search
                finished = sum(len(found) for found in accuracies.values())
                planned = sum(len(latest[a]["tried"]) if a in latest else len(grids[a]) for a in methods)
                if "rounds" in search:  # a round continues runs already counted: number them within the round
                    finished, planned = 0, len(search["pending"])
                run_grid(search["pending"], algo, algo_dir, launcher, run_options, finished, planned, jobs)
                continue
            script = write_array_job(search["pending"], algo, algo_dir, launcher, run_options, sbatch)
            if not submit:
                print(f"{algo}: {len(search['pending'])} runs to go; submit `sbatch {script}`, then re-run this "
                      f"command to continue the search")
                break
            subprocess.run(["sbatch", "--wait", str(script)], check=True)
        searches[algo] = search
    if all(not s["pending"] for s in searches.values()):
        summarize(out_dir, searches, accuracies, jobs)
        for algo, search in searches.items():
            best = accuracies[algo][search["best"]]
            print(f"{algo}: best beta {search['best']:g}, val {100 * best['val_accuracy']:.2f} ± "
                  f"{100 * best['val_ci95']:.2f}% ({search['status']}) -> {out_dir / 'sweep.md'}")
    return searches


def main(**options) -> None:
    try:
        sweep(**options)
    except SweepError as error:
        print(f"error: {error}", file=sys.stderr)
        sys.exit(2)


main.__doc__ = __doc__

if __name__ == "__main__":
    if {"--help", "-h"} & set(sys.argv[1:]):  # **options would otherwise take --help for a training option
        print(__doc__)
        sys.exit(0)
    fire.Fire(main)
