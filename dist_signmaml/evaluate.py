"""Meta-test: the training inner loop (MetaLearner.forward under no_grad) on fixed episodes, mean ± 95% CI."""

from __future__ import annotations

import math

import torch

from dist_signmaml.data import EpisodeShape, fixed_episodes


def confidence_interval(accuracies: torch.Tensor) -> tuple[float, float]:
    """Mean and the half-width of the normal 95% interval, 1.96 * s / sqrt(n) (s with Bessel's correction)."""
    n = accuracies.numel()
    mean = accuracies.double().mean().item()
    spread = accuracies.double().std(unbiased=True).item() if n > 1 else 0.0
    return mean, 1.96 * spread / math.sqrt(n)


def meta_test(learner, engine, split_dir, shape: EpisodeShape, *, episodes: int, inner_steps: int, seed: int,
              tasks_per_batch: int) -> dict:
    """Score `episodes` fixed episodes of `split_dir`; ranks take every world_size-th episode and the per-episode
    accuracies are gathered, so any number of ranks reports exactly the numbers of one process."""
    own_ids = list(range(engine.rank, episodes, engine.world_size))
    accuracies = []
    learner.eval()
    with torch.no_grad():
        for batch in fixed_episodes(split_dir, shape, own_ids, seed=seed, tasks_per_batch=tasks_per_batch):
            accuracies.append(learner(*batch.to(engine.device), inner_steps=inner_steps).task_accuracies)
    learner.train()
    # Ranks may own one episode fewer than others: pad to the same length with NaN, gather, drop the padding.
    per_rank = math.ceil(episodes / engine.world_size)
    mine = torch.cat(accuracies) if accuracies else torch.empty(0, device=engine.device)
    padded = torch.full((per_rank,), float("nan"), device=engine.device)
    padded[: mine.numel()] = mine
    gathered = engine.gather(padded)
    everything = gathered[~torch.isnan(gathered)].cpu()
    mean, ci95 = confidence_interval(everything)
    return {"accuracy": mean, "ci95": ci95, "episodes": int(everything.numel()), "inner_steps": inner_steps}
