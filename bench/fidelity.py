"""Where Sign-MAML stands on Omniglot, measured fairly: variants x inner steps x seeds, each run resumable, each
finished run's files committed under bench/results/fidelity/ so the grid can be continued later.

    python -m bench.fidelity run --plan 20w1s:m1:sign-lsl:s0,20w1s:m1:fo:s0      # train + score, in this order
    python -m bench.fidelity summary                                          # table and plots from the results

A run is SETTING:mM:VARIANT:sSEED. Variants: a method (sign | fo | maml | signum), optionally with
  -lsl  learned inner step sizes per tensor and inner step (--learn_inner_lr layer_step), no beta grid: beta starts
        at the method's default;
  -msl  the multi-step loss (--multi_step_loss);
  -b<beta>  a fixed beta given by hand (no grid), e.g. sign-b0.005.
A fixed-beta variant without -b gets its beta from a grid (the default x 0.5, 1, 2) of runs lasting 25% of the full
run, chosen by validation accuracy. Each finished run is scored by bench.protocol: the test protocol (inner steps
from {1,2,3,5,10,20} x beta scale {0.5,1,2}) chosen on 300 validation episodes, then 1000 test episodes.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import subprocess
import sys
import time
from pathlib import Path

import fire

from dist_signmaml.config import REPO_ROOT
from bench.common import machine_load
from bench.protocol import PROTOCOL_JSON, score_run
from dist_signmaml.config import DEFAULT_DATA, DEFAULT_INNER_LR
from dist_signmaml.artifacts import RESULTS_JSON

RESULTS = REPO_ROOT / "bench" / "results" / "fidelity"
STEPS = {"5w1s": 6000, "20w1s": 6000}  # full-run budgets (meta-steps) per setting
GRID_FRACTION = 0.25  # each beta-grid run lasts this share of the full run (sign learns fastest early)
GRID_SCALES = (0.5, 1.0, 2.0)
TARGETS = {"5w1s": 0.90, "20w1s": 0.75}  # validation accuracy for the time-to-accuracy figure
VALIDATIONS = 20  # validations per run (every 5%): the plateau check needs the last 20% resolved
RUN_PATTERN = re.compile(r"^(\d+)w(\d+)s:m(\d+):([a-z]+)((?:-lsl|-msl|-b[0-9.e-]+)*):s(\d+)$")


class FidelityError(ValueError):
    pass


def parse_run(spec: str) -> dict:
    match = RUN_PATTERN.match(spec.strip())
    if not match:
        raise FidelityError(f"--plan: {spec!r} is not SETTING:mM:VARIANT:sSEED, e.g. 20w1s:m1:sign-lsl:s0")
    ways, shots, m, algo, suffix, seed = match.groups()
    if algo not in DEFAULT_INNER_LR:
        raise FidelityError(f"--plan: {spec!r}: {algo!r} is not a method; expected one of {', '.join(DEFAULT_INNER_LR)}")
    beta = re.search(r"-b([0-9.e-]+)", suffix)
    return {"name": spec.strip().replace(":", "_"), "setting": f"{ways}w{shots}s", "ways": int(ways),
            "shots": int(shots), "inner_steps": int(m), "algo": algo, "learned": "-lsl" in suffix,
            "multi_step_loss": "-msl" in suffix, "beta": float(beta.group(1)) if beta else None, "seed": int(seed),
            "variant": algo + suffix}


def train_options(run: dict, beta: float, steps: int, out: Path, eval_episodes: int) -> list[str]:
    every = max(1, steps // VALIDATIONS)
    options = {"ways": run["ways"], "shots": run["shots"], "queries": 1, "algo": run["algo"], "inner_lr": beta,
               "inner_steps": run["inner_steps"], "test_inner_steps": 10, "steps": steps, "seed": run["seed"],
               "eval_episodes": eval_episodes, "eval_every": every, "ckpt_every": every, "test_episodes": 0,
               "log_every": 50, "data": str(DEFAULT_DATA), "out": str(out), "resume": True,
               "learn_inner_lr": "layer_step" if run["learned"] else "none",
               "multi_step_loss": run["multi_step_loss"]}
    return [f"--{k}={v}" for k, v in options.items()]


def train(run: dict, beta: float, steps: int, out: Path, eval_episodes: int = 100) -> dict:
    """One training run, resumed from its newest checkpoint if an earlier attempt stopped; its results.json."""
    if not (out / RESULTS_JSON).is_file():
        out.mkdir(parents=True, exist_ok=True)
        command = [sys.executable, "-m", "dist_signmaml.train", *train_options(run, beta, steps, out, eval_episodes)]
        with open(out / "train.log", "a") as log:
            log.write(f"$ {shlex.join(command)}\n")
            log.flush()
            started = time.time()
            finished = subprocess.run(command, stdout=log, stderr=subprocess.STDOUT, env=os.environ | {
                "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"})
            log.write(f"# wall seconds {time.time() - started:.0f}\n")
        if finished.returncode != 0:
            raise FidelityError(f"training {out} failed (exit {finished.returncode}); see {out / 'train.log'}")
    return json.loads((out / RESULTS_JSON).read_text())


def choose_beta(run: dict, steps: int, work: Path, eval_episodes: int) -> tuple[float, list[dict]]:
    """beta for a fixed-beta variant: given by hand, or the best of a grid of runs lasting GRID_FRACTION of the run."""
    if run["beta"] is not None or run["learned"]:
        return run["beta"] or DEFAULT_INNER_LR[run["algo"]], []
    grid = []
    for scale in GRID_SCALES:
        beta = float(f"{DEFAULT_INNER_LR[run['algo']] * scale:.6g}")
        results = train(run, beta, max(1, int(steps * GRID_FRACTION)), work / f"grid_beta{beta:g}", eval_episodes)
        grid.append({"beta": beta, "best_val": results["best_val"]["accuracy"]})
    return max(grid, key=lambda g: g["best_val"])["beta"], grid


def run_plan(plan: str, work: str = "runs/fidelity", steps: int = 0, record: str = str(RESULTS),
             val_episodes: int = 300, test_episodes: int = 1000, eval_episodes: int = 100, beside: str = "") -> None:
    """Train and score the runs of `plan` in order; each finished run's record goes to `record` (committed).
    `beside`: what ran on the other cores meanwhile (e.g. the other plan of a side-by-side pair), recorded with the
    run because seconds per meta-step depend on it."""
    runs = [parse_run(spec) for spec in str(plan).split(",") if spec.strip()]
    for run in runs:
        record_dir = Path(record) / run["name"]
        if (record_dir / PROTOCOL_JSON).is_file():
            print(f"{run['name']}: done", flush=True)
            continue
        full_steps = steps or STEPS[run["setting"]]
        run_dir = Path(work) / run["name"]
        load_before = machine_load()
        beta, grid = choose_beta(run, full_steps, run_dir, eval_episodes)
        print(f"{run['name']}: beta {beta:g}, training {full_steps} steps in {run_dir}", flush=True)
        results = train(run, beta, full_steps, run_dir / "final", eval_episodes)
        protocol = score_run(run_dir / "final", val_episodes=val_episodes, test_episodes=test_episodes)
        record_dir.mkdir(parents=True, exist_ok=True)
        shutil.copy(run_dir / "final" / RESULTS_JSON, record_dir / RESULTS_JSON)
        conditions = {"load_before": load_before, "load_after": machine_load(),
                      "pinned_cores": sorted(os.sched_getaffinity(0)), "side_by_side": bool(beside),
                      **({"note": f"beside: {beside}"} if beside else {})}
        (record_dir / PROTOCOL_JSON).write_text(json.dumps(protocol | {"beta_grid": grid, "conditions": conditions},
                                                           indent=1) + "\n")
        chosen = protocol["test_chosen"]
        print(f"{run['name']}: test {100 * chosen['accuracy']:.2f}% at {chosen['inner_steps']} steps "
              f"x{chosen['lr_scale']:g} (paper's protocol {100 * protocol['test_paper']['accuracy']:.2f}%); "
              f"best val {100 * results['best_val']['accuracy']:.2f}%", flush=True)


def main(command: str = "", **options) -> None:
    try:
        if command == "run":
            run_plan(**options)
        elif command == "summary":
            from bench.fidelity_summary import summarize

            summarize(**options)
        else:
            raise FidelityError("give a command: run --plan ... | summary")
    except FidelityError as error:
        print(f"error: {error}", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    fire.Fire(main)
