"""A test protocol chosen on validation, scored from one adaptation pass per step-size scale.

For a trained run, every fixed episode of a split is adapted once per test-time beta scale for the largest step
count, recording the query accuracy after each inner step (`MetaLearner.accuracy_curves`), so every (steps, scale)
cell of the grid comes from the same pass. The cell with the best mean validation accuracy is then scored on test,
next to the paper's protocol (10 steps at the training beta); test is adapted only for the scales and step
counts those two cells need. Single process: the scores are per episode, so
splitting them over ranks would not change a number.

    python -m bench.protocol RUN_DIR            # writes RUN_DIR/protocol.json
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import fire
import torch

from dist_signmaml.builders import ensure_bundled_data
from dist_signmaml.config import TrainConfig
from dist_signmaml.data import EpisodeShape, fixed_episodes
from dist_signmaml.artifacts import load_learner_weights, read_metadata
from dist_signmaml.cli import unknown_options
from dist_signmaml.evaluate import weights_file
from dist_signmaml.metatest import EVALUATION_SEED, STEP_COUNTS, confidence_interval, ranked

PROTOCOL_JSON = "protocol.json"
LR_SCALES = (0.5, 1.0, 2.0)  # test-time multipliers of the (fixed or learned) betas
PAPER_CELL = (10, 1.0)  # the paper's test protocol: 10 inner steps at the training beta


def load_learner(run_dir: Path, weights: str = "best"):
    """The run's MetaLearner with its exported weights (and learned step sizes), on the CPU."""
    from dist_signmaml.builders import build_learner

    file = weights_file(run_dir, weights)
    metadata = read_metadata(file)
    config = TrainConfig.from_options(**metadata["config"])
    learner = build_learner(config, metadata["image_shape"], torch.device("cpu"))
    learner.load_state_dict(load_learner_weights(file))
    return learner.eval(), config, metadata


def split_curves(learner, split_dir: Path, shape: EpisodeShape, episodes: int, scales=LR_SCALES,
                 max_steps: int = max(STEP_COUNTS), batch: int = 4) -> dict[float, torch.Tensor]:
    """{scale: [episodes, max_steps + 1] accuracy after 0..max_steps inner steps} on fixed episodes (seed 2021)."""
    curves = {scale: [] for scale in scales}
    for tasks in fixed_episodes(split_dir, shape, range(episodes), seed=EVALUATION_SEED, tasks_per_batch=batch):
        for scale in scales:
            curves[scale].append(learner.accuracy_curves(*tasks, steps=max_steps, lr_scale=scale))
    return {scale: torch.cat(parts) for scale, parts in curves.items()}


def grid_scores(curves: dict[float, torch.Tensor], steps=STEP_COUNTS) -> list[dict]:
    """Mean accuracy and 95% CI of every (steps, scale) cell."""
    cells = []
    for scale, curve in curves.items():
        for count in steps:
            mean, ci95 = confidence_interval(curve[:, count])
            cells.append({"inner_steps": count, "lr_scale": scale, "accuracy": mean, "ci95": ci95})
    return cells


def choose_cell(validation: list[dict]) -> dict:
    """The best validation cell; ties go to fewer steps, then to the scale closest to 1 (the cheaper, plainer one)."""
    return max(validation, key=lambda c: (ranked(c["accuracy"]), -c["inner_steps"], -abs(c["lr_scale"] - 1)))


def cell(cells: list[dict], inner_steps: int, lr_scale: float) -> dict:
    return next(c for c in cells if c["inner_steps"] == inner_steps and c["lr_scale"] == lr_scale)


def score_run(run_dir: str | Path, *, val_episodes: int = 300, test_episodes: int = 1000, weights: str = "best",
              queries: int = 0, data: str = "") -> dict:
    """protocol.json of a run: the validation grid, the chosen cell, and test at the chosen and the paper's cell.
    `data`: the shard root with val/ and test/; by default the run's own --data, which names a folder of the
    checkout that trained it (a run parked and scored in another checkout passes its own root)."""
    run_dir = Path(run_dir)
    started = time.process_time()
    learner, config, metadata = load_learner(run_dir, weights)
    shape = EpisodeShape(config.ways, config.shots, queries or config.queries)
    data = data or config.data
    ensure_bundled_data(data)
    data = Path(data)
    val = grid_scores(split_curves(learner, data / "val", shape, val_episodes))
    chosen = choose_cell(val)
    # test is scored once, only where it is read: the chosen cell and the paper's (one pass per scale they need)
    scales = sorted({chosen["lr_scale"], PAPER_CELL[1]})
    test_curves = split_curves(learner, data / "test", shape, test_episodes, scales=scales,
                               max_steps=max(chosen["inner_steps"], PAPER_CELL[0]))
    test = grid_scores(test_curves, steps=[s for s in STEP_COUNTS if s <= max(chosen["inner_steps"], PAPER_CELL[0])])
    result = {"run": str(run_dir), "data": str(data), "weights": weights, "weights_step": metadata.get("step"),
              "val_episodes": val_episodes, "test_episodes": test_episodes, "queries": shape.queries,
              "val_grid": val, "chosen": {"inner_steps": chosen["inner_steps"], "lr_scale": chosen["lr_scale"]},
              "test_chosen": cell(test, chosen["inner_steps"], chosen["lr_scale"]),
              "test_paper": cell(test, *PAPER_CELL), "test_grid": test,
              "test_curve_at_scale_1": test_curves[1.0].mean(0).tolist(),
              "cpu_seconds": time.process_time() - started}
    (run_dir / PROTOCOL_JSON).write_text(json.dumps(result, indent=1) + "\n")
    return result


def main(run_dir: str = "", **options) -> None:
    if not run_dir or not Path(run_dir).is_dir():
        print(f"error: give a finished run directory (got {run_dir!r})", file=sys.stderr)
        sys.exit(2)
    complaint = unknown_options(options, score_run)
    if complaint:
        print(f"error: {complaint}", file=sys.stderr)
        sys.exit(2)
    result = score_run(run_dir, **options)
    chosen, paper = result["test_chosen"], result["test_paper"]
    print(f"{run_dir}: chosen on val {chosen['inner_steps']} steps x{chosen['lr_scale']:g}: test "
          f"{100 * chosen['accuracy']:.2f} ± {100 * chosen['ci95']:.2f}%; paper's 10 steps x1: "
          f"{100 * paper['accuracy']:.2f} ± {100 * paper['ci95']:.2f}%")


if __name__ == "__main__":
    fire.Fire(main)
