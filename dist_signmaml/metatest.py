"""The fixed-episode meta-test shared by validation, the final test and `evaluate`: the training inner loop
(MetaLearner.forward under no_grad) on episodes drawn with one evaluation seed, mean accuracy ± 95% CI. Asked for
several step counts, one adaptation pass per episode scores them all (MetaLearner.accuracy_curves)."""

from __future__ import annotations

import math
import time

import torch
from tqdm import tqdm

from dist_signmaml.data import EpisodeShape, fixed_episodes

# Every validation, test and `evaluate` run draws its fixed episodes with this seed, independent of the training
# seed, so runs, methods and rank counts are all scored on the same tasks (and `evaluate` on a run directory with
# the run's episode count reproduces the test result in its results.json).
EVALUATION_SEED = 2021
# The inner-step counts a validation curve (--val_select any_steps) and a test protocol (bench/protocol.py) score.
STEP_COUNTS = (1, 2, 3, 5, 10, 20)
# How validation ranks its results for the kept weights (TrainConfig.val_select, monitor.Validator).
VAL_SELECTS = ("test_steps", "any_steps")
# Accuracies are ranked at this many decimals. Each episode's accuracy is a float32 (17/20 is 0.85000002), so two
# scores with the same number of correct queries differ in the 9th decimal (measured: 0.8255000001 and 0.8255000037
# for 1651 of 2000), and a tie rule (fewer steps, the smaller beta) would never see the tie. An accuracy's own
# resolution, one query in the whole meta-test, stays far above this for up to 10^5 queries.
RANKING_DECIMALS = 6


def ranked(accuracy: float) -> float:
    """An accuracy as scores are compared: equal where only float32 rounding tells them apart (RANKING_DECIMALS)."""
    return round(accuracy, RANKING_DECIMALS)


def selected_score(result: dict) -> dict:
    """The score ({accuracy, ci95}) a validation result is ranked by: the best over its step counts when it scored
    several (--val_select any_steps), else the score at its one count."""
    return result.get("best_steps", result)


def confidence_interval(accuracies: torch.Tensor) -> tuple[float, float]:
    """Mean and the half-width of the normal 95% interval, 1.96 * s / sqrt(n) (s with Bessel's correction)."""
    n = accuracies.numel()
    mean = accuracies.double().mean().item()
    spread = accuracies.double().std(unbiased=True).item() if n > 1 else 0.0
    return mean, 1.96 * spread / math.sqrt(n)


def meta_test(learner, engine, split_dir, shape: EpisodeShape, *, episodes: int, inner_steps: int,
              tasks_per_batch: int, seed: int = EVALUATION_SEED, desc: str = "meta-test",
              announce_eta: bool = False, step_counts: tuple[int, ...] = ()) -> dict:
    """Score `episodes` fixed episodes of `split_dir`; ranks take every world_size-th episode and the per-episode
    accuracies are gathered, so any number of ranks reports exactly the numbers of one process.
    `step_counts`: also score the query accuracy after each of these inner-step counts, from the same adaptation
    pass ("by_steps", and "best_steps": the best of them, ties to fewer steps); "accuracy" stays at `inner_steps`.
    `announce_eta`: after the first batch, print how long the whole meta-test will take at that pace."""
    counts = sorted({*map(int, step_counts), int(inner_steps)})
    if counts[0] < 1:
        raise ValueError(f"step_counts={tuple(step_counts)!r}: inner-step counts must be >= 1")
    own_ids = list(range(engine.rank, episodes, engine.world_size))
    accuracies = []
    progress = tqdm(total=len(own_ids), disable=not engine.is_main, desc=desc, unit="episode", leave=False,
                    dynamic_ncols=True)
    learner.eval()
    with torch.no_grad():
        for batch in fixed_episodes(split_dir, shape, own_ids, seed=seed, tasks_per_batch=tasks_per_batch):
            started = time.perf_counter()
            tasks = batch.to(engine.device)
            if len(counts) == 1:
                accuracies.append(learner(*tasks, inner_steps=inner_steps).task_accuracies[:, None])
            else:  # [tasks, counts] from one pass: the curve holds the accuracy after 0, 1, ..., max(counts) steps
                accuracies.append(engine.unwrap(learner).accuracy_curves(*tasks, steps=counts[-1])[:, counts])
            progress.update(len(accuracies[-1]))
            if announce_eta and engine.is_main and len(accuracies) == 1 and len(own_ids) > len(accuracies[0]):
                each = (time.perf_counter() - started) / len(accuracies[0])
                progress.write(f"{desc}: {episodes} episodes on {engine.world_size} process(es), {each:.2f} s per "
                               f"episode -> about {duration(each * len(own_ids))} in all (--episodes sets how many)")
    learner.train()
    progress.close()
    # Ranks may own one episode fewer than others: pad to the same length with NaN, gather, put the episodes back in
    # their own order (rank r held r, r + W, ...) so that even the rounding of the sums is that of one process.
    per_rank = math.ceil(episodes / engine.world_size)
    mine = torch.cat(accuracies) if accuracies else torch.empty(0, len(counts), device=engine.device)
    padded = torch.full((per_rank, len(counts)), float("nan"), device=engine.device)
    padded[: len(mine)] = mine
    in_episode_order = (engine.gather(padded).view(engine.world_size, per_rank, len(counts)).transpose(0, 1)
                        .reshape(-1, len(counts)))
    everything = in_episode_order[~torch.isnan(in_episode_order[:, 0])].cpu()
    scores = {}
    for column, count in enumerate(counts):
        mean, ci95 = confidence_interval(everything[:, column])
        scores[count] = {"inner_steps": count, "accuracy": mean, "ci95": ci95}
    result = {"accuracy": scores[inner_steps]["accuracy"], "ci95": scores[inner_steps]["ci95"],
              "episodes": len(everything), "inner_steps": inner_steps}
    if len(counts) > 1:
        result["by_steps"] = list(scores.values())
        result["best_steps"] = max(scores.values(), key=lambda s: (ranked(s["accuracy"]), -s["inner_steps"]))
    return result


def duration(seconds: float) -> str:
    """3725 -> '1 h 2 min', 130 -> '2 min 10 s', 9.4 -> '9 s'."""
    seconds = round(seconds)
    if seconds >= 3600:
        return f"{seconds // 3600} h {seconds % 3600 // 60} min"
    return f"{seconds // 60} min {seconds % 60} s" if seconds >= 60 else f"{seconds} s"
