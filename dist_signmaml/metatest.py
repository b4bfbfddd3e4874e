"""The fixed-episode meta-test shared by validation, the final test and `evaluate`: the training inner loop
(MetaLearner.forward under no_grad) on episodes drawn with one evaluation seed, mean accuracy ± 95% CI."""

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


def confidence_interval(accuracies: torch.Tensor) -> tuple[float, float]:
    """Mean and the half-width of the normal 95% interval, 1.96 * s / sqrt(n) (s with Bessel's correction)."""
    n = accuracies.numel()
    mean = accuracies.double().mean().item()
    spread = accuracies.double().std(unbiased=True).item() if n > 1 else 0.0
    return mean, 1.96 * spread / math.sqrt(n)


def meta_test(learner, engine, split_dir, shape: EpisodeShape, *, episodes: int, inner_steps: int,
              tasks_per_batch: int, seed: int = EVALUATION_SEED, desc: str = "meta-test",
              announce_eta: bool = False) -> dict:
    """Score `episodes` fixed episodes of `split_dir`; ranks take every world_size-th episode and the per-episode
    accuracies are gathered, so any number of ranks reports exactly the numbers of one process.
    `announce_eta`: after the first batch, print how long the whole meta-test will take at that pace."""
    own_ids = list(range(engine.rank, episodes, engine.world_size))
    accuracies = []
    progress = tqdm(total=len(own_ids), disable=not engine.is_main, desc=desc, unit="episode", leave=False,
                    dynamic_ncols=True)
    learner.eval()
    with torch.no_grad():
        for batch in fixed_episodes(split_dir, shape, own_ids, seed=seed, tasks_per_batch=tasks_per_batch):
            started = time.perf_counter()
            accuracies.append(learner(*batch.to(engine.device), inner_steps=inner_steps).task_accuracies)
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
    mine = torch.cat(accuracies) if accuracies else torch.empty(0, device=engine.device)
    padded = torch.full((per_rank,), float("nan"), device=engine.device)
    padded[: mine.numel()] = mine
    in_episode_order = engine.gather(padded).view(engine.world_size, per_rank).t().reshape(-1)
    everything = in_episode_order[~torch.isnan(in_episode_order)].cpu()
    mean, ci95 = confidence_interval(everything)
    return {"accuracy": mean, "ci95": ci95, "episodes": int(everything.numel()), "inner_steps": inner_steps}


def duration(seconds: float) -> str:
    """3725 -> '1 h 2 min', 130 -> '2 min 10 s', 9.4 -> '9 s'."""
    seconds = round(seconds)
    if seconds >= 3600:
        return f"{seconds // 3600} h {seconds % 3600 // 60} min"
    return f"{seconds // 60} min {seconds % 60} s" if seconds >= 60 else f"{seconds} s"
