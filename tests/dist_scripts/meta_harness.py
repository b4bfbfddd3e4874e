"""Pieces shared by the scripts in this folder (they are run as plain scripts, so this folder is on sys.path).

The harness feeds *global* task batches, identical on every rank, and gives each rank its contiguous share; so a
run on N ranks and a single-process reference see exactly the same episodes (train.py's stream instead draws
disjoint episodes per rank, which is what training wants but not what an equivalence check can compare).
"""

from __future__ import annotations

import copy
import json
import sys
from pathlib import Path

import torch

from dist_signmaml.algorithms import MetaLearner, make_rule
from dist_signmaml.config import DEFAULT_INNER_LR
from dist_signmaml.data import EpisodeShape, Episodes, EpisodeStream
from dist_signmaml.models import build_backbone

SHAPE = EpisodeShape(ways=3, shots=1, queries=1)  # tiny: these scripts check arithmetic, not accuracy
HIDDEN = 16


def make_learner(spec: str, seed: int) -> MetaLearner:
    """`spec` is an algorithm, or `<algo>+lsl` for learned step sizes per tensor and inner step (2 inner steps)."""
    algo, _, learned = spec.partition("+")
    torch.manual_seed(seed)
    model = build_backbone("conv4", in_channels=1, ways=SHAPE.ways, hidden=HIDDEN, image_size=28)
    return MetaLearner(model, make_rule(algo, 0.9), DEFAULT_INNER_LR[algo], inner_steps=2 if learned else 1,
                       task_parallel="loop", learn_inner_lr="layer_step" if learned else "none")


def global_batches(data_root: str | Path, meta_batch: int, steps: int, seed: int) -> list[Episodes]:
    """The same `steps` batches of `meta_batch` tasks on every rank (the stream is built as rank 0 of 1)."""
    stream = EpisodeStream(Path(data_root) / "train", SHAPE, meta_batch, seed=seed, rank=0, world_size=1)
    return [stream.batch(b) for b in range(steps)]


def rank_batches(data_root: str | Path, tasks_per_rank: int, steps: int, seed: int, rank: int, world: int):
    """What train.py feeds: this rank's own, disjoint episodes."""
    stream = EpisodeStream(Path(data_root) / "train", SHAPE, tasks_per_rank, seed=seed, rank=rank, world_size=world)
    return [stream.batch(b) for b in range(steps)]


def share(batch: Episodes, rank: int, world: int) -> Episodes:
    """Rank `rank`'s contiguous slice of a global task batch."""
    per_rank = len(batch.support_x) // world
    return Episodes(*(t[rank * per_rank:(rank + 1) * per_rank] for t in batch))


def train_reference(learner: MetaLearner, batches, lr: float) -> MetaLearner:
    """One process, whole meta-batches, plain backward and SGD: what N ranks must reproduce."""
    reference = copy.deepcopy(learner)
    optimizer = torch.optim.SGD(reference.parameters(), lr=lr)
    for batch in batches:
        reference(*batch).loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    return reference


def flat_parameters(module: torch.nn.Module) -> torch.Tensor:
    return torch.cat([p.detach().reshape(-1).cpu() for p in module.parameters()])


def max_difference(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).abs().max())


def report(path: str | Path, payload: dict, is_main: bool) -> None:
    if is_main:
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        Path(path).write_text(json.dumps(payload, indent=1, sort_keys=True))
    print(json.dumps(payload, sort_keys=True), file=sys.stderr, flush=True)
