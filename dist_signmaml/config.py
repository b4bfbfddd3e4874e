"""The training configuration: one typed dataclass, one comment per field, checked before any work starts.

The CLI (`python -m dist_signmaml.train --help`) is generated from this class, so defaults and help live here only.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field, fields
from pathlib import Path

from dist_signmaml.algorithms.learner import TASK_PARALLEL_MODES
from dist_signmaml.algorithms.rules import ALGORITHMS

REPO_ROOT = Path(__file__).resolve().parents[1]
DEFAULT_DATA = REPO_ROOT / "data" / "shards" / "omniglot-28"

# Inner learning rate beta per rule for Omniglot 28 px conv4-64, picked on the Omniglot *validation* split by the
# Appendix-A grid documented in README.md ("Choosing beta"); a user-given --inner_lr always wins.
DEFAULT_INNER_LR = {"sign": 0.005, "signum": 0.005, "fo": 0.4, "maml": 0.4}


class ConfigError(ValueError):
    """A bad option: the message names the flag, the value and what is allowed."""


def _field(default, help_text: str, **kw):
    return field(default=default, metadata={"help": help_text}, **kw)


@dataclass
class TrainConfig:
    ways: int = _field(5, "classes per task (N-way)")
    shots: int = _field(1, "support images per class (K-shot)")
    queries: int = _field(15, "query images per class")
    algo: str = _field("sign", f"inner-loop rule: {' | '.join(ALGORITHMS)}")
    inner_steps: int = _field(1, "inner steps during meta-training (paper: 1)")
    test_inner_steps: int = _field(10, "inner steps at validation/test time (paper: 10)")
    inner_lr: float = _field(0.0, "inner learning rate beta; 0 = the Omniglot-validated default of the algo")
    inner_momentum: float = _field(0.9, "momentum of the signum rule")
    outer_lr: float = _field(1e-3, "Adam learning rate alpha of the meta-update (paper: 0.001)")
    meta_batch: int = _field(4, "tasks per meta-step over all ranks (paper: P = 4)")
    steps: int = _field(300, "meta-steps to train")
    backbone: str = _field("conv4", "backbone: conv4")
    hidden: int = _field(0, "conv4 width; 0 = 64 below 64 px, 32 from 64 px (paper)")
    data: str = _field(str(DEFAULT_DATA), "shard root with train/ val/ test/ (default: the bundled Omniglot, built on first use)")
    out: str = _field("runs/latest", "run directory: TensorBoard events, checkpoints, model.safetensors, config.json")
    seed: int = _field(0, "seed for the initialisation and the episode stream")
    log_every: int = _field(10, "meta-steps between TensorBoard/progress updates")
    ckpt_every: int = _field(100, "meta-steps between checkpoints (one is also written at the end)")
    keep_checkpoints: int = _field(2, "newest checkpoints kept in OUT/checkpoints")
    resume: bool = _field(False, "continue from the newest checkpoint in --out")
    task_parallel: str = _field("auto", f"run a rank's tasks with {' | '.join(TASK_PARALLEL_MODES)} (auto: loop on CPU, vmap on GPU)")
    workers: int = _field(0, "DataLoader worker processes per rank for the episode stream")
    window_shards: int = _field(8, "shards each stream keeps in memory")
    eval_episodes: int = _field(200, "fixed validation episodes scored at the end of training (0 = skip)")

    def __post_init__(self):
        if self.inner_lr == 0.0 and self.algo in DEFAULT_INNER_LR:
            self.inner_lr = DEFAULT_INNER_LR[self.algo]

    @classmethod
    def from_options(cls, **options) -> "TrainConfig":
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(options) - known)
        if unknown:
            raise ConfigError(f"unknown option(s) {', '.join('--' + u for u in unknown)}; known: {', '.join(sorted(known))}")
        config = cls(**options)
        config.validate()
        return config

    def validate(self) -> None:
        """Checks that need no data. Data-dependent checks (ways vs classes) run when the split index is read."""
        from dist_signmaml.models import BACKBONES

        def need(ok: bool, flag: str, allowed: str):
            if not ok:
                raise ConfigError(f"--{flag}={getattr(self, flag)!r} is invalid: expected {allowed}")

        for flag in ("ways", "shots", "queries", "inner_steps", "test_inner_steps", "meta_batch", "steps",
                     "log_every", "ckpt_every", "keep_checkpoints", "window_shards"):
            need(isinstance(getattr(self, flag), int) and not isinstance(getattr(self, flag), bool)
                 and getattr(self, flag) > 0, flag, "a positive integer")
        need(self.ways >= 2, "ways", "at least 2 classes per task")
        for flag in ("inner_lr", "outer_lr"):
            need(isinstance(getattr(self, flag), (int, float)) and getattr(self, flag) > 0, flag, "a positive number")
        need(0 <= self.inner_momentum < 1, "inner_momentum", "a number in [0, 1)")
        need(self.algo in ALGORITHMS, "algo", f"one of {', '.join(ALGORITHMS)}")
        need(self.backbone in BACKBONES, "backbone", f"one of {', '.join(sorted(BACKBONES))}")
        need(self.task_parallel in TASK_PARALLEL_MODES, "task_parallel", f"one of {', '.join(TASK_PARALLEL_MODES)}")
        for flag in ("hidden", "workers", "eval_episodes", "seed"):
            need(isinstance(getattr(self, flag), int) and getattr(self, flag) >= 0, flag, "an integer >= 0")
        need(isinstance(self.resume, bool), "resume", "True or False")

    def to_json(self) -> str:
        return json.dumps(dataclasses.asdict(self), indent=1, sort_keys=True)

    @staticmethod
    def help_lines() -> str:
        return "\n".join(f"  {f.name}: {f.metadata['help']} (default {f.default!r})" for f in fields(TrainConfig))
