"""Where Sign-MAML stands on Omniglot, measured fairly: variants x inner steps x seeds, each run resumable, each
finished run's files committed under bench/results/fidelity/ so the grid can be continued later.

    python -m bench.fidelity run --plan 20w1s:m1:sign-lsl:s0,20w1s:m1:fo:s0      # train + score, in this order
    python -m bench.fidelity summary                                          # table and plots from the results
    python -m bench.fidelity park                # unfinished runs' newest checkpoints into the record, to commit
    taskset -c 0,1 python -m bench.fidelity run --plan 20w1s:m5:sign:s0 --grid_jobs 2   # grid runs 2 at once

A run is SETTING:mM:VARIANT:sSEED. Variants: a method (sign | fo | maml | signum), optionally with
  -lsl  learned inner step sizes per tensor and inner step (--learn_inner_lr layer_step), no beta grid: beta starts
        at the method's default;
  -msl  the multi-step loss (--multi_step_loss);
  -b<beta>  a fixed beta given by hand (no grid), e.g. sign-b0.005.
A fixed-beta variant without -b gets its beta from bench.reproduce's grid (the default x 0.5, 1, 2, extended at an
edge, each run lasting 25% of the full run), chosen by validation accuracy. Each finished run is scored by
bench.reproduce's test stage: the test protocol (inner steps from {1,2,3,5,10,20} x beta scale {0.5,1,2}) chosen on
300 validation episodes, then 1000 test episodes. This module adds what a reproduction across seeds and variants
needs on top of those stages: the plan, the variants and the committed per-run records.

A run lasts hours, and a checkout may not outlive the machine it ran on. `park` copies what an unfinished run needs
to continue exactly (its newest verified checkpoint, best weights, logs; a finished beta grid's results) to
RECORD/unfinished/<run>; commit it, and the same `run` command in a later checkout continues from there when its
work directory has no copy of the run. The parked copy is removed once the run's record is written.

A finished run whose beta does not depend on the budget (-b or -lsl) keeps its final state with its record
(RECORD/<run>/resumable: its last checkpoint and best weights). A longer budget goes on from there instead of from
step 0, into a record of its own:

    python -m bench.fidelity run --plan 20w1s:m5:maml-b0.2:s0 --steps 8000 --record bench/results/fidelity_8000 \\
        --extend bench/results/fidelity
"""

from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import sys
from pathlib import Path

import fire

from bench.common import VARIANT_PATTERN, machine_load, variant_options, variant_train_options
from bench.protocol import PROTOCOL_JSON
from bench.reproduce import GRID_SCALES, ReproduceError, choose_beta, grid_for, grid_steps_for, test_final, train_final
from dist_signmaml.artifacts import (BEST_WEIGHTS, CHECKPOINT_DIR, CONFIG_JSON, CONFIG_YAML, LOCK_FILE,
                                     MANIFEST_JSON, RESULTS_JSON)
from dist_signmaml.checkpointer import checkpoint_step, completed_checkpoints, verify_checkpoint
from dist_signmaml.cli import unknown_options
from dist_signmaml.config import DEFAULT_DATA, DEFAULT_INNER_LR, REPO_ROOT

RESULTS = REPO_ROOT / "bench" / "results" / "fidelity"
STEPS = {"5w1s": 6000, "20w1s": 6000}  # full-run budgets (meta-steps) per setting
TARGETS = {"5w1s": 0.90, "20w1s": 0.75}  # validation accuracy for the time-to-accuracy figure
VALIDATIONS = 20  # validations per run (every 5%): the plateau check needs the last 20% resolved
THREAD_ENV = os.environ | {"OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}  # one core per run (taskset the plan)
UNFINISHED = "unfinished"  # RECORD/unfinished/<run>: the parked state of a run not finished yet
RESUMABLE = "resumable"  # RECORD/<run>/resumable: a finished run's final state, to go on to a longer budget
EXTENDED_FROM = "extended_from.json"  # in a run extended from a shorter record: which one, at how many steps
RUN_PATTERN = re.compile(rf"^(\d+)w(\d+)s:m(\d+):({VARIANT_PATTERN}):s(\d+)$")


class FidelityError(ValueError):
    pass


def parse_run(spec: str) -> dict:
    match = RUN_PATTERN.match(spec.strip())
    if not match:
        raise FidelityError(f"--plan: {spec!r} is not SETTING:mM:VARIANT:sSEED, e.g. 20w1s:m1:sign-lsl:s0")
    ways, shots, m, variant, _algo, _suffix, seed = match.groups()
    try:
        options = variant_options(variant)
    except ValueError as error:
        raise FidelityError(f"--plan: {spec!r}: {error}") from None
    return {"name": spec.strip().replace(":", "_"), "setting": f"{ways}w{shots}s", "ways": int(ways),
            "shots": int(shots), "inner_steps": int(m), **options, "seed": int(seed), "variant": variant}


def run_options(run: dict, eval_episodes: int, started: Path | None = None) -> dict:
    """The training options of a run besides beta, steps and out (bench.reproduce sets those). Validation ranks the
    kept weights by the best of 1-10 test steps (--val_select any_steps), since the protocol is chosen afterwards;
    a run `started` (its final run's config.json) before that option existed resumes as it began."""
    val_select = "any_steps"
    if started is not None and (started / CONFIG_JSON).is_file():
        val_select = json.loads((started / CONFIG_JSON).read_text()).get("val_select", "test_steps")
    variant = variant_train_options(run["variant"])  # algo and beta are bench.reproduce's to set
    return {"ways": run["ways"], "shots": run["shots"], "queries": 1, "inner_steps": run["inner_steps"],
            "test_inner_steps": 10, "seed": run["seed"], "eval_episodes": eval_episodes, "log_every": 50,
            "data": str(DEFAULT_DATA), "learn_inner_lr": variant["learn_inner_lr"],
            "multi_step_loss": variant["multi_step_loss"], "val_select": val_select}


def beta_for(run: dict, steps: int, work: Path, common: dict, env: dict,
             grid_jobs: int = 1) -> tuple[float, list[dict]]:
    """beta for a run: given by hand (-b), the method's default (learned step sizes start there), or the grid's
    (`grid_jobs` of its runs at once)."""
    if run["beta"] is not None or run["learned"]:
        return run["beta"] or DEFAULT_INNER_LR[run["algo"]], []
    beta = choose_beta(work, run["algo"], grid_for(run["algo"], list(GRID_SCALES)), grid_steps_for(steps), common,
                       shlex.quote(sys.executable), env, grid_jobs)
    sweep = json.loads((work / f"beta_{run['algo']}" / "sweep.json").read_text())
    return beta, [{"beta": r["beta"], "best_val": r["val_accuracy"]} for r in sweep["runs"]]


def check_budget(record_dir: Path, steps: int) -> None:
    """A committed record of the run at another budget would be reported as done at this one: refuse instead."""
    results = record_dir / RESULTS_JSON
    if (record_dir / PROTOCOL_JSON).is_file() and results.is_file():
        done = json.loads(results.read_text())["steps"]
        if done != steps:
            raise FidelityError(f"--steps {steps}: {record_dir} records this run at {done} meta-steps; give that "
                                f"budget, or another --record directory for a record at {steps}")


def newest_good_checkpoint(run_dir: Path) -> Path | None:
    for path in reversed(completed_checkpoints(run_dir)):
        if verify_checkpoint(path)[0] is not None:
            return path
    return None


def files_to_park(run_dir: Path) -> list[Path]:
    """What continuing `run_dir` (a run with its beta grid) needs: everything but the locks and the checkpoints,
    plus the newest verified checkpoint of each training run that has not finished (a finished one needs none)."""
    keep = []
    for folder, subfolders, files in os.walk(run_dir):
        folder = Path(folder)
        if CHECKPOINT_DIR in subfolders:
            subfolders.remove(CHECKPOINT_DIR)
            newest = None if (folder / RESULTS_JSON).is_file() else newest_good_checkpoint(folder)
            if newest is not None:
                keep += sorted(p for p in newest.rglob("*") if p.is_file())
        keep += [folder / name for name in sorted(files) if name != LOCK_FILE]
    return keep


def files_to_extend(final_dir: Path) -> list[Path]:
    """What going on from a finished training run needs: its newest verified checkpoint, its configuration and its
    best weights (with the validation history in the checkpoint, they keep the best-so-far). Not its summaries or
    its scores: a longer run writes its own, and a protocol.json left there would be taken for the longer run's."""
    newest = newest_good_checkpoint(final_dir)
    if newest is None:
        return []
    return sorted(p for p in newest.rglob("*") if p.is_file()) + [
        final_dir / name for name in (CONFIG_JSON, CONFIG_YAML, MANIFEST_JSON, BEST_WEIGHTS)
        if (final_dir / name).is_file()]


def copy_state(run_dir: Path, parked: Path, files: list[Path]) -> str:
    """Copy `files` of run_dir to `parked` (replacing an older copy; a copy cut short is never taken for one);
    returns what was copied."""
    staging = parked.with_name(parked.name + ".partial")
    shutil.rmtree(staging, ignore_errors=True)
    for file in files:
        target = staging / file.relative_to(run_dir)
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(file, target)
    shutil.rmtree(parked, ignore_errors=True)
    parked.parent.mkdir(parents=True, exist_ok=True)
    staging.rename(parked)
    return f"{len(files)} files, {sum(f.stat().st_size for f in files) / 2**20:.1f} MiB"


def park_run(run_dir: Path, parked: Path) -> str:
    """Copy run_dir's resumable state to `parked` (replacing an older parking); returns what was parked."""
    copied = copy_state(run_dir, parked, files_to_park(run_dir))
    newest = newest_good_checkpoint(run_dir / "final")
    where = f"step {checkpoint_step(newest)}" if newest else "its beta grid (the full run has no checkpoint yet)"
    return f"{where}, {copied}"


def extendable(run: dict) -> bool:
    """A run whose beta does not depend on its budget (given by hand, or learned from the default): the same run
    trained longer. A grid's beta comes from grid runs sized to the budget (25% of it), so it is not."""
    return run["beta"] is not None or run["learned"]


def keep_resumable(run: dict, run_dir: Path, record_dir: Path) -> str | None:
    """A finished, extendable run's final state into RECORD/<run>/resumable, for `run --extend` at a longer
    budget; returns what was kept (None where there is nothing to keep)."""
    files = files_to_extend(run_dir / "final") if extendable(run) else []
    return copy_state(run_dir, record_dir / RESUMABLE, files) if files else None


def check_extendable(run: dict, steps: int, source: Path) -> int:
    """The meta-steps of the run's shorter record in `source`, which `run --extend` goes on from; refused unless
    the run is extendable and that record kept its final state at fewer steps."""
    if not extendable(run):
        raise FidelityError(f"--extend: {run['name']} takes its beta from a grid sized to its budget; train it "
                            f"afresh at {steps} meta-steps (leave it out of the --extend plan)")
    resumable, results = source / run["name"] / RESUMABLE, source / run["name"] / RESULTS_JSON
    if not (resumable.is_dir() and results.is_file()):
        raise FidelityError(f"--extend: {resumable} does not exist: {run['name']} never finished there, or was "
                            f"recorded before records kept their final state")
    done = json.loads(results.read_text())["steps"]
    if done >= steps:
        raise FidelityError(f"--extend: {source / run['name']} is recorded at {done} meta-steps, not fewer than "
                            f"--steps {steps}")
    return done


def extend_from(run: dict, steps: int, source: Path, parked: Path) -> None:
    """Seed the parking of a run at `steps` from its finished, shorter record in `source` (`run --extend`)."""
    done = check_extendable(run, steps, source)
    resumable = source / run["name"] / RESUMABLE
    shutil.copytree(resumable, parked)
    (parked / "final" / EXTENDED_FROM).write_text(json.dumps({"record": str(source), "steps": done}) + "\n")
    print(f"{run['name']}: extending its {done}-step run from {resumable}", flush=True)


def park(plan: str = "", work: str = "runs/fidelity", record: str = str(RESULTS)) -> None:
    """Park every unfinished run of `work` (or only the runs of `plan`) under RECORD/unfinished/ for a commit, and
    keep the final state of a finished, extendable run whose record has none yet (recorded by older code)."""
    names = [parse_run(spec)["name"] for spec in str(plan).split(",") if spec.strip()] if plan else \
        sorted(p.name for p in Path(work).iterdir() if p.is_dir()) if Path(work).is_dir() else []
    parked = 0
    for name in names:
        run_dir = Path(work) / name
        if not run_dir.is_dir():
            continue  # never started here
        if (Path(record) / name / PROTOCOL_JSON).is_file():  # finished: its record is written
            if not (Path(record) / name / RESUMABLE).is_dir():
                kept = keep_resumable(parse_run(name.replace("_", ":")), run_dir, Path(record) / name)
                if kept:
                    print(f"{name}: kept its final state ({kept}) in {Path(record) / name / RESUMABLE}", flush=True)
                    parked += 1
            continue
        print(f"{name}: parked {park_run(run_dir, Path(record) / UNFINISHED / name)} in "
              f"{Path(record) / UNFINISHED / name}", flush=True)
        parked += 1
    if not parked:
        print(f"nothing to park: no unfinished run{' of --plan' if plan else ''} in {work}", flush=True)


def unpark(run_dir: Path, parked: Path) -> None:
    """A run parked by an earlier checkout continues from there, unless this work directory has its own copy."""
    if parked.is_dir() and not run_dir.exists():
        shutil.copytree(parked, run_dir)
        print(f"{run_dir.name}: continuing from the parked {parked}", flush=True)


def run_plan(plan: str, work: str = "runs/fidelity", steps: int = 0, record: str = str(RESULTS),
             val_episodes: int = 300, test_episodes: int = 1000, eval_episodes: int = 100, beside: str = "",
             extend: str = "", grid_jobs: int = 1) -> None:
    """Train and score the runs of `plan` in order; each finished run's record goes to `record` (committed).
    `beside`: what ran on the other cores meanwhile (e.g. the other plan of a side-by-side pair), recorded with the
    run because seconds per meta-step depend on it. `extend`: a record of the same runs at fewer steps; each run
    goes on from that run's final state (its `resumable` copy) instead of from step 0, which with a constant outer
    rate trains exactly what a run started at `steps` would (only its validations up to there are more frequent),
    except that a multi-step-loss run annealed over a tenth of the shorter budget (docs/fidelity.md).
    `grid_jobs`: a beta grid's runs at once, each pinned to its own share of the cores the plan was given (run it
    under `taskset -c 0,1` for two); the full run and its test, whose times are recorded, then run on the first of
    those cores alone, like every other run here."""
    cores = sorted(os.sched_getaffinity(0))
    if not isinstance(grid_jobs, int) or isinstance(grid_jobs, bool) or not 1 <= grid_jobs <= len(cores):
        raise FidelityError(f"--grid_jobs={grid_jobs!r} is invalid: expected a positive integer up to the "
                            f"{len(cores)} cores this plan may use (give it more with taskset -c)")
    parsed = [parse_run(spec) for spec in str(plan).split(",") if spec.strip()]
    runs = [(run, Path(record) / run["name"], steps or STEPS[run["setting"]]) for run in parsed]
    for run, record_dir, full_steps in runs:  # before any work: a finished record is only "done" at its own budget
        check_budget(record_dir, full_steps)
        if extend and not (record_dir / PROTOCOL_JSON).is_file():
            check_extendable(run, full_steps, Path(extend))
    for run, record_dir, full_steps in runs:
        if (record_dir / PROTOCOL_JSON).is_file():
            print(f"{run['name']}: done", flush=True)
            continue
        run_dir, parked = Path(work) / run["name"], Path(record) / UNFINISHED / run["name"]
        if extend and not run_dir.exists() and not parked.exists():
            extend_from(run, full_steps, Path(extend), parked)
        unpark(run_dir, parked)
        common = run_options(run, eval_episodes, started=run_dir / "final")
        if grid_jobs > 1:
            os.sched_setaffinity(0, cores)  # the grid's runs share out every core of the plan
        beta, grid = beta_for(run, full_steps, run_dir, common, THREAD_ENV, grid_jobs)
        if grid_jobs > 1:
            os.sched_setaffinity(0, cores[:1])
        load_before = machine_load()  # after the grid: the record's load describes the timed run, not the grid
        print(f"{run['name']}: beta {beta:g}, training {full_steps} steps in {run_dir}", flush=True)
        train_final(run_dir / "final", run["algo"], beta, full_steps, VALIDATIONS, common, shlex.quote(sys.executable),
                    THREAD_ENV)
        results = json.loads((run_dir / "final" / RESULTS_JSON).read_text())
        protocol = test_final(run_dir / "final", val_episodes, test_episodes, common["queries"], THREAD_ENV,
                              common["data"])
        record_dir.mkdir(parents=True, exist_ok=True)
        shutil.copy(run_dir / "final" / RESULTS_JSON, record_dir / RESULTS_JSON)
        extended = run_dir / "final" / EXTENDED_FROM
        conditions = {"load_before": load_before, "load_after": machine_load(),
                      "pinned_cores": sorted(os.sched_getaffinity(0)), "side_by_side": bool(beside),
                      **({"note": f"beside: {beside}"} if beside else {}),
                      **({"extended_from": json.loads(extended.read_text())} if extended.is_file() else {})}
        (record_dir / PROTOCOL_JSON).write_text(json.dumps(protocol | {"beta_grid": grid, "conditions": conditions},
                                                           indent=1) + "\n")
        shutil.rmtree(parked, ignore_errors=True)  # the record supersedes it
        keep_resumable(run, run_dir, record_dir)
        chosen = protocol["test_chosen"]
        print(f"{run['name']}: test {100 * chosen['accuracy']:.2f}% at {chosen['inner_steps']} steps "
              f"x{chosen['lr_scale']:g} (paper's protocol {100 * protocol['test_paper']['accuracy']:.2f}%); "
              f"best val {100 * results['best_val']['accuracy']:.2f}%", flush=True)


def main(command: str = "", **options) -> None:
    try:
        if command not in ("run", "summary", "park"):
            raise FidelityError(f"give a command: run --plan ... | summary | park (got {command!r}; "
                                "python -m bench.fidelity --help)")
        if command in ("run", "park"):
            function = run_plan if command == "run" else park
        else:
            from bench.fidelity_summary import summarize as function
        complaint = unknown_options(options, function)
        if complaint:
            raise FidelityError(f"{command}: {complaint}")
        function(**options)
    except (FidelityError, ReproduceError) as error:
        print(f"error: {error}", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    if {"--help", "-h"} & set(sys.argv[1:]):
        print(__doc__)
        sys.exit(0)
    fire.Fire(main)
