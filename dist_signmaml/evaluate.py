"""Meta-test: the training inner loop (MetaLearner.forward under no_grad) on fixed episodes, mean ± 95% CI.

    python -m dist_signmaml.evaluate runs/latest                      # 1000 test episodes, 10 inner steps
    python -m dist_signmaml.evaluate runs/latest --step_counts 1,2,5  # also after 1, 2 and 5 steps, same pass
    accelerate launch -m dist_signmaml.evaluate runs/latest --shots 5 # episodes split over the ranks
    python -m dist_signmaml.evaluate --help
"""

from __future__ import annotations

import itertools
import json
import sys
from pathlib import Path

import fire

from dist_signmaml.algorithms.rules import ALGORITHMS
from dist_signmaml.artifacts import (BEST_WEIGHTS, FINAL_WEIGHTS, WeightsFileError, atomic_write_text,
                                     export_names, load_learner_weights, non_finite_tensors,
                                     read_metadata)
from dist_signmaml.builders import (build_learner, check_image_shape, check_weights_fit, ensure_bundled_data,
                                    episode_shape)
from dist_signmaml.config import ConfigError, TrainConfig
from dist_signmaml.data.format import ShardFormatError
from dist_signmaml.engine import Engine
from dist_signmaml.cli import path_and_options_signature, refuse_unknown_flags, run_with_one_line_errors
from dist_signmaml.metatest import EVALUATION_SEED, confidence_interval, duration, meta_test

__all__ = ["EVALUATION_SEED", "confidence_interval", "duration", "evaluate", "main", "meta_test", "weights_file"]



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
             step_counts=(), out: str = "") -> dict:
    """Meta-test exported weights on fixed episodes; every rank scores its share, rank 0 writes the JSON.
    `step_counts`: also the accuracy after each of these inner-step counts, from the same adaptation pass."""
    file = weights_file(path, weights)
    metadata = read_metadata(file)
    trained = dict(metadata["config"])
    step_counts = (step_counts,) if isinstance(step_counts, int) else tuple(step_counts or ())
    for flag, value in (("episodes", episodes), ("inner_steps", inner_steps), ("batch", batch),
                        *(("step_counts", count) for count in step_counts)):
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
        raise EvaluationError(f"{file}: {error}") from None
    ensure_bundled_data(data or trained["data"])
    split_dir = split_directory(data or trained["data"], split)
    shape = episode_shape(config)
    # The engine ends on every way out: a process that exits with its gloo group alive can abort (Engine.end).
    with Engine(Path(out).parent if out else file.parent, config.seed, log_with=None) as engine:
        image_shape = metadata.get("image_shape") or _image_shape(split_dir)
        try:
            check_weights_fit(config, check_image_shape(image_shape, f"{file} metadata"), file)
            learner = build_learner(config, image_shape, engine.device)
        except ConfigError as error:
            raise EvaluationError(f"{file}: {error}") from None
        state = load_learner_weights(file)
        bad = non_finite_tensors(export_names(state))  # named as in the file
        if bad:
            engine.print0(f"warning: {file} holds non-finite weights ({', '.join(bad[:5])}): its accuracy is meaningless")
        try:
            learner.load_state_dict(state)
        except RuntimeError as error:  # names or shapes that are not this config's learner
            raise EvaluationError(f"{file}: the weights do not fit the backbone of its config "
                                  f"({str(error).strip().splitlines()[0][:300]})") from None
        learner.to(engine.device)
        check_split_fits(split_dir, shape, episodes)  # the expected input error; anything meta_test raises after it is a bug
        result = meta_test(learner, engine, split_dir, shape, episodes=episodes, inner_steps=inner_steps, seed=seed,
                           tasks_per_batch=batch, desc=f"evaluate {Path(split).name}", announce_eta=True,
                           step_counts=step_counts)
        result |= {"split": Path(split).name, "split_dir": str(split_dir), "weights": str(file), "algo": config.algo,
                   "inner_lr": config.inner_lr, "ways": config.ways, "shots": config.shots, "queries": config.queries,
                   "seed": seed, "world_size": engine.world_size, "trained_steps": metadata.get("step", trained["steps"])}
        out_file = Path(out) if out else evaluation_file(file, result)
        if engine.is_main:
            out_file.parent.mkdir(parents=True, exist_ok=True)
            atomic_write_text(out_file, json.dumps(result, indent=1, sort_keys=True) + "\n")
        engine.print0(f"{result['split']} {config.ways}-way {config.shots}-shot, {config.algo} (beta={config.inner_lr:g}, "
                      f"{inner_steps} inner steps), {file}: {100 * result['accuracy']:.2f} ± {100 * result['ci95']:.2f}% "
                      f"over {result['episodes']} episodes -> {out_file}")
        for score in result.get("by_steps", []):
            engine.print0(f"  after {score['inner_steps']:>2} inner steps: {100 * score['accuracy']:.2f} ± "
                          f"{100 * score['ci95']:.2f}%")
    return result


def check_split_fits(split_dir: Path, shape, episodes: int) -> None:
    """Enough classes in a class split for the requested ways/shots/queries, or enough episodes of that shape in a
    directory of materialised episodes."""
    from dist_signmaml.data import index_kind, read_episode_index, read_index
    from dist_signmaml.data.episode_loader import usable_classes

    try:
        if index_kind(split_dir) == "classes":
            usable_classes(read_index(split_dir), shape, split_dir)
        else:
            index = read_episode_index(split_dir)
            if (index.ways, index.shots, index.queries) != (shape.ways, shape.shots, shape.queries):
                raise EvaluationError(f"{split_dir} holds {index.ways}-way {index.shots}-shot {index.queries}-query "
                                      f"episodes, not {shape.ways}-way {shape.shots}-shot {shape.queries}-query")
            if episodes > index.episodes:
                raise EvaluationError(f"--episodes={episodes}: {split_dir} holds only {index.episodes} episodes; "
                                      f"materialise more with `python -m shards episodes --episodes`")
    except ShardFormatError as error:
        raise EvaluationError(str(error)) from None
    except ValueError as error:
        if isinstance(error, EvaluationError):
            raise
        raise EvaluationError(str(error)) from None


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
      step_counts: also score after each of these inner-step counts, e.g. 1,2,5, from the same adaptation pass
        (default: none; JSON "by_steps" and "best_steps")
      out: JSON file to write (default: next to the weights,
        eval_<split>_<algo>_<W>w<S>s_<steps>steps_<best|final>_<N>ep.json; never replacing another result)
    """
    if not path:
        print("error: give a run directory or a .safetensors file: python -m dist_signmaml.evaluate RUN_DIR", file=sys.stderr)
        sys.exit(2)
    run_with_one_line_errors(evaluate, path, options, (EvaluationError, WeightsFileError, ShardFormatError))


# `--help` lists evaluate's options with their defaults.
main.__signature__ = path_and_options_signature(evaluate)

if __name__ == "__main__":
    refuse_unknown_flags(sys.argv[1:], evaluate)
    fire.Fire(main)
