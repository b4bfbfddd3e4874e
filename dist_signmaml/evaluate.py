"""Meta-test: the training inner loop (MetaLearner.forward under no_grad) on fixed episodes, mean ± 95% CI.

    python -m dist_signmaml.evaluate runs/latest                      # 1000 test episodes, 10 inner steps
    accelerate launch -m dist_signmaml.evaluate runs/latest --shots 5 # episodes split over the ranks
    python -m dist_signmaml.evaluate --help
"""

from __future__ import annotations

import inspect
import itertools
import json
import math
import sys
import time
from pathlib import Path

import fire
import torch
from safetensors import safe_open
from safetensors.torch import load_file
from tqdm import tqdm

from dist_signmaml.algorithms.learner import to_learner_names
from dist_signmaml.algorithms.rules import ALGORITHMS
from dist_signmaml.data import EpisodeShape, fixed_episodes

# Every validation, test and `evaluate` run draws its fixed episodes with this seed, independent of the training
# seed, so runs, methods and rank counts are all scored on the same tasks (and `evaluate` on a run directory with
# the run's episode count reproduces the test result in its results.json).
EVALUATION_SEED = 2021
FINAL_WEIGHTS = "model.safetensors"  # the run's last meta-initialisation (train.py)
BEST_WEIGHTS = "model_best.safetensors"  # the best one by validation accuracy (monitor.Validator)


def confidence_interval(accuracies: torch.Tensor) -> tuple[float, float]:
    """Mean and the half-width of the normal 95% interval, 1.96 * s / sqrt(n) (s with Bessel's correction)."""
    n = accuracies.numel()
    mean = accuracies.double().mean().item()
    spread = accuracies.double().std(unbiased=True).item() if n > 1 else 0.0
    return mean, 1.96 * spread / math.sqrt(n)


def meta_test(learner, engine, split_dir, shape: EpisodeShape, *, episodes: int, inner_steps: int, seed: int,
              tasks_per_batch: int, desc: str = "meta-test", announce_eta: bool = False) -> dict:
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


# ---- the command line -----------------------------------------------------------------------------------------

class EvaluationError(ValueError):
    """Bad input to `evaluate`: the message names the argument, the value and what was expected."""


def weights_file(path: str | Path, weights: str = "best") -> Path:
    """RUN_DIR -> its model_best.safetensors (weights='best', when the run validated) or model.safetensors;
    a .safetensors file is taken as it is."""
    path = Path(path)
    if weights not in ("best", "final"):
        raise EvaluationError(f"--weights={weights!r} is invalid: expected best or final")
    if path.is_file():
        return path
    if not path.is_dir():
        raise EvaluationError(f"{str(path)!r} does not exist: expected a run directory (with {FINAL_WEIGHTS}) or a "
                              f".safetensors file written by dist_signmaml.train")
    for name in ((BEST_WEIGHTS, FINAL_WEIGHTS) if weights == "best" else (FINAL_WEIGHTS,)):
        if (path / name).is_file():
            return path / name
    raise EvaluationError(f"run directory {str(path)!r} holds no {FINAL_WEIGHTS}: did its training finish?")


def read_metadata(file: Path) -> dict:
    """The JSON metadata dist_signmaml.train stores next to the weights (config, image shape, step, ...)."""
    try:
        with safe_open(str(file), framework="pt") as handle:
            raw = handle.metadata() or {}
    except Exception as error:  # safetensors raises its own error types for non-safetensors bytes
        raise EvaluationError(f"{str(file)!r} is not a readable safetensors file ({error})") from None
    if "config" not in raw:
        raise EvaluationError(f"{str(file)!r} carries no training config in its metadata: only weights exported by "
                              f"dist_signmaml.train can be evaluated")
    return {key: json.loads(value) for key, value in raw.items()}


def split_directory(data: str | Path, split: str) -> Path:
    """--split names a split under the data root (train/val/test), or is itself a split or episode directory."""
    if Path(split).is_dir() and (Path(split) / "index.json").is_file():
        return Path(split)
    directory = Path(data) / split
    if not (directory / "index.json").is_file():
        raise EvaluationError(f"--split={split!r}: {directory} is not a shard directory (no index.json); give "
                              f"--data the shard root holding train/ val/ test/, or --split a split directory")
    return directory


def evaluate(path: str, *, split: str = "test", data: str = "", ways: int = 0, shots: int = 0, queries: int = 0,
             episodes: int = 1000, inner_steps: int = 10, algo: str = "", inner_lr: float = 0.0,
             weights: str = "best", seed: int = EVALUATION_SEED, batch: int = 4, task_parallel: str = "auto",
             out: str = "") -> dict:
    """Meta-test exported weights on fixed episodes; every rank scores its share, rank 0 writes the JSON."""
    from dist_signmaml.config import ConfigError, TrainConfig
    from dist_signmaml.engine import Engine
    from dist_signmaml.train import build_learner

    file = weights_file(path, weights)
    metadata = read_metadata(file)
    trained = dict(metadata["config"])
    for flag, value in (("episodes", episodes), ("inner_steps", inner_steps), ("batch", batch)):
        if not isinstance(value, int) or isinstance(value, bool) or value < 1:
            raise EvaluationError(f"--{flag}={value!r} is invalid: expected a positive integer")
    if algo and algo not in ALGORITHMS:
        raise EvaluationError(f"--algo={algo!r} is invalid: expected one of {', '.join(ALGORITHMS)}")
    if ways and ways != trained["ways"]:
        raise EvaluationError(f"--ways={ways} does not fit {file}: its classifier head was trained for "
                              f"{trained['ways']} ways (omit --ways)")
    overrides = {"shots": shots or trained["shots"], "queries": queries or trained["queries"],
                 "task_parallel": task_parallel,
                 "log_with": "", "profile_steps": ""}  # the training session's trackers and profile, not the model's
    if algo and algo != trained["algo"]:
        overrides |= {"algo": algo, "inner_lr": inner_lr}  # inner_lr 0 -> the new algo's default beta
    elif inner_lr:
        overrides["inner_lr"] = inner_lr
    try:
        config = TrainConfig.from_options(**(trained | overrides))
    except ConfigError as error:
        raise EvaluationError(str(error)) from None
    split_dir = split_directory(data or trained["data"], split)
    shape = EpisodeShape(config.ways, config.shots, config.queries)
    engine = Engine(Path(out).parent if out else file.parent, config.seed, log_with=None)
    image_shape = metadata.get("image_shape") or _image_shape(split_dir)
    try:
        learner = build_learner(config, image_shape, engine.device)
    except ConfigError as error:
        raise EvaluationError(f"{file}: {error}") from None
    learner.load_state_dict(to_learner_names(load_file(str(file))))
    learner.to(engine.device)
    try:
        result = meta_test(learner, engine, split_dir, shape, episodes=episodes, inner_steps=inner_steps, seed=seed,
                           tasks_per_batch=batch, desc=f"evaluate {Path(split).name}", announce_eta=True)
    except ValueError as error:  # e.g. more ways or shots+queries than the split holds
        raise EvaluationError(str(error)) from None
    result |= {"split": Path(split).name, "split_dir": str(split_dir), "weights": str(file), "algo": config.algo,
               "inner_lr": config.inner_lr, "ways": config.ways, "shots": config.shots, "queries": config.queries,
               "seed": seed, "world_size": engine.world_size, "trained_steps": metadata.get("step", trained["steps"])}
    out_file = Path(out) if out else evaluation_file(file, result)
    if engine.is_main:
        out_file.parent.mkdir(parents=True, exist_ok=True)
        out_file.write_text(json.dumps(result, indent=1, sort_keys=True) + "\n")
    engine.print0(f"{result['split']} {config.ways}-way {config.shots}-shot, {config.algo} (beta={config.inner_lr:g}, "
                  f"{inner_steps} inner steps), {file}: {100 * result['accuracy']:.2f} ± {100 * result['ci95']:.2f}% "
                  f"over {result['episodes']} episodes -> {out_file}")
    return result


def evaluation_file(weights: Path, result: dict) -> Path:
    """Next to the weights: eval_<split>_<algo>_<W>w<S>s_<steps>steps_<best|final|file>_<episodes>ep.json. A file
    of that name holding another result (other queries, beta, seed, data or weights) is kept: the new one gets
    the next free _2, _3, ... suffix. Only a re-run with identical settings and numbers takes its place."""
    label = {BEST_WEIGHTS: "best", FINAL_WEIGHTS: "final"}.get(weights.name, weights.stem)
    stem = (f"eval_{result['split']}_{result['algo']}_{result['ways']}w{result['shots']}s_{result['inner_steps']}steps_"
            f"{label}_{result['episodes']}ep")
    comparable = lambda r: {k: v for k, v in r.items() if k != "world_size"}  # noqa: E731 - ranks change nothing
    for n in itertools.count(1):
        candidate = weights.parent / f"{stem}{'' if n == 1 else f'_{n}'}.json"
        if not candidate.is_file():
            return candidate
        try:
            if comparable(json.loads(candidate.read_text())) == comparable(result):
                return candidate
        except ValueError:  # not ours to overwrite either
            continue
    raise AssertionError("unreachable")


def _image_shape(split_dir: Path) -> tuple[int, int, int]:
    """H, W, C of a split (class or episode directory), for weights exported without it in their metadata."""
    return tuple(json.loads((split_dir / "index.json").read_text())["image_shape"])


def main(path: str = "", **options) -> None:
    """Meta-test a trained meta-initialisation: mean query accuracy after adaptation, ± 95% CI (1.96 s / sqrt(n)).

    Args:
      path: run directory (uses model_best.safetensors if the run validated, else model.safetensors) or a .safetensors file
      split: train | val | test, or a split / materialised-episode directory (default test)
      data: shard root holding the splits (default: the one the run trained on)
      ways: must equal the trained head's ways (default: as trained)
      shots: support images per class (default: as trained)
      queries: query images per class (default: as trained)
      episodes: fixed episodes to score (default 1000, as in the paper)
      inner_steps: inner steps at test time (default 10, paper section 5.1)
      algo: inner rule sign | fo | maml | signum (default: as trained)
      inner_lr: beta (default: as trained, or the algo's default when --algo changes)
      weights: best | final, for a run directory (default best)
      seed: seed of the fixed episodes (default 2021, shared by validation and test during training)
      batch: episodes per forward pass on each rank (default 4; does not change the numbers)
      task_parallel: auto | loop | vmap (default auto)
      out: JSON file to write (default: next to the weights, eval_<split>_<algo>_<W>w<S>s_<steps>steps_<best|final>_<N>ep.json; never replacing another result)
    """
    if not path:
        print("error: give a run directory or a .safetensors file: python -m dist_signmaml.evaluate RUN_DIR", file=sys.stderr)
        sys.exit(2)
    unknown = sorted(set(options) - set(evaluate.__kwdefaults__))
    try:
        if unknown:
            raise EvaluationError(f"unknown option(s) {', '.join('--' + u for u in unknown)}")
        evaluate(str(path), **options)
    except EvaluationError as error:
        print(f"error: {error}", file=sys.stderr)
        sys.exit(2)


def check_flags(argv: list[str]) -> None:
    """Reject unknown --flags before fire runs anything (fire would evaluate first and complain afterwards)."""
    known = {"path", "help"} | set(evaluate.__kwdefaults__)
    unknown = sorted({token[2:].split("=")[0].replace("-", "_") for token in argv if token.startswith("--")
                      and len(token) > 2} - known)
    if unknown:
        print(f"error: unknown option(s) {', '.join('--' + u for u in unknown)}; known: "
              f"{', '.join('--' + k for k in sorted(known - {'help'}))}", file=sys.stderr)
        sys.exit(2)


# `--help` lists evaluate's options with their defaults.
main.__signature__ = inspect.Signature(
    [inspect.Parameter("path", inspect.Parameter.POSITIONAL_OR_KEYWORD, default="")]
    + [p for p in inspect.signature(evaluate).parameters.values() if p.kind is inspect.Parameter.KEYWORD_ONLY])

if __name__ == "__main__":
    check_flags(sys.argv[1:])
    fire.Fire(main)
