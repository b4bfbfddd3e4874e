"""Meta-train with Sign-MAML (or FO-MAML / MAML / Signum) under Accelerate.

    accelerate launch -m dist_signmaml.train --ways 10 --shots 1
    python -m dist_signmaml.train --help
"""

from __future__ import annotations

import dataclasses
import functools
import inspect
import json
import os
import sys
from dataclasses import asdict, fields
from pathlib import Path

import fire

from dist_signmaml.artifacts import CONFIG_JSON, FINAL_WEIGHTS, WeightsFileError, atomic_write_text
from dist_signmaml.builders import (build_bundled_data, build_learner, build_optimizer, check_data, default_meta_batch,
                                    episode_shape, load_initial_weights, resolved_width, torch_threads_for_run,
                                    train_stream)
from dist_signmaml.checkpointer import Checkpointer
from dist_signmaml.config import ConfigError, TrainConfig
from dist_signmaml.config_files import CONFIG_FLAG, CONFIG_YAML, write_config_yaml
from dist_signmaml.data import train_loader
from dist_signmaml.data.format import ShardFormatError
from dist_signmaml.engine import DistributedSetupError, Engine, NonFiniteError, PeerLostError
from dist_signmaml.optim import OuterLRSchedule
from dist_signmaml.monitor import (TrainMonitor, Validator, final_test, log_config_text, log_final_hparams,
                                   summarize_run)
from dist_signmaml.manifest import RunManifest
from dist_signmaml.models import resolve_channels_last
from dist_signmaml.preemption import stop_when_launcher_dies
from dist_signmaml.profiling import StepProfiler

__all__ = ["build_learner", "main", "train"]  # build_learner: kept importable from here for older callers


def train(config: TrainConfig) -> dict:
    with torch_threads_for_run(config.cpu_affinity) as threads:
        return run_training(config, threads)


def run_training(config: TrainConfig, threads: tuple[int, str, list[int] | None]) -> dict:
    stop_when_launcher_dies()
    # The engine ends on every way out, errors included: trackers closed, process groups destroyed.
    with Engine(config.out, config.seed, log_with=config.log_with, zero_stage=config.zero_stage,
                timeout_s=config.dist_timeout, meta_grad_clip=config.meta_grad_clip) as engine:
        return meta_train(resolve_for_launch(config, engine), engine, threads)


def meta_train(config: TrainConfig, engine, threads: tuple[int, str, list[int] | None]) -> dict:
    with Checkpointer(engine, config) as checkpointer:
        start = checkpointer.claim()  # --out checked and locked, fresh start or verified resume point chosen
        build_bundled_data(config, engine)
        data_root = check_data(config)
        stream = train_stream(config, data_root, engine, start_batch=start)
        learner = build_learner(config, stream.index.image_shape, engine.device)
        if config.weights:  # before prepare, so every rank starts from the file (DDP also broadcasts rank 0's)
            fresh = load_initial_weights(learner, config.weights)
            engine.print0(f"initialised from {config.weights}" + (f"; new: {', '.join(fresh)}" if fresh else ""))
        channels_last, layout_reason = resolve_channels_last(config.channels_last, engine.device)
        engine.print0(f"memory layout: {'channels-last' if channels_last else 'NCHW'} ({layout_reason})")
        resolved = {"rule": learner.rule.description, "hidden": resolved_width(learner), "channels_last": channels_last,
                    "task_parallel": learner.task_parallel,
                    "world_size": engine.world_size, "torch_threads": threads[0], "torch_threads_from": threads[1],
                    "cpu_cores": threads[2] or "unpinned"}
        optimizer = build_optimizer(config, learner)
        outer_lr = OuterLRSchedule(optimizer, config.outer_lr_schedule, config.schedule_span)  # of the step
        learner, optimizer = engine.prepare(learner, optimizer, engine.tasks_per_rank(config.meta_batch))
        checkpointer.restore()
        manifest = record_config(engine, config, resolved, start)
        monitor = TrainMonitor(engine, log_every=config.log_every, last_step=config.steps, first_step=start,
                               meta_batch=config.meta_batch, inner_lr=config.inner_lr, optimizer=optimizer,
                               stream=stream)
        export_metadata = {"config": asdict(config), "image_shape": list(stream.index.image_shape),
                           "normalization": {"mean": list(stream.index.mean), "std": list(stream.index.std)}}
        validator = Validator(engine, data_root / "val", episode_shape(config), episodes=config.eval_episodes,
                              every=config.eval_every, last_step=config.steps, inner_steps=config.test_inner_steps,
                              tasks_per_batch=engine.tasks_per_rank(config.meta_batch), out_dir=config.out,
                              export_metadata=export_metadata, select=config.val_select)
        checkpointer.register(validator=validator, episode_stream=stream, monitor=monitor)
        profiler = StepProfiler(config.profile_steps, config.out, engine.rank, engine.device, config.steps)
        phase = profiler.phases(monitor.phase)  # the monitor's phase timers, labelled in the profile (--profile_steps)
        checkpointer.on_stop(profiler.close, functools.partial(manifest.finish, "stopped"))

        # Components decide their own cadence: the monitor logs, the validator validates and keeps the best weights,
        # the checkpointer saves (and stops for a requeue on a signal), so the loop holds no interval arithmetic.
        batches = iter(train_loader(stream, config.workers))
        for step in range(start + 1, config.steps + 1):
            profiler.begin(step)
            with phase("data_wait"):
                episodes = next(batches)
            outer_lr.apply(step)
            output = engine.meta_step(learner, optimizer, episodes, phase=phase, step=step,
                                      on_nonfinite=config.on_nonfinite, diagnostics=monitor.should_log(step),
                                      progress=step / config.schedule_span)
            profiler.end(step)
            monitor.record(step, episodes, output)
            if validator.should_validate(step):
                validator.validate(learner, step)
            checkpointer.after_step(step)
        monitor.close()
        profiler.close()
        summary = finish(config, engine, learner, validator, monitor, data_root, export_metadata)
        manifest.finish("completed")
        return summary


def resolve_for_launch(config: TrainConfig, engine) -> TrainConfig:
    """Values that depend on the launch: the default meta-batch follows the world size (an explicit one is checked
    against it by engine.tasks_per_rank)."""
    given = getattr(config, "given_options", None)
    if config.meta_batch == 0:
        config = dataclasses.replace(config, meta_batch=default_meta_batch(engine.world_size))
        engine.print0(f"--meta_batch {config.meta_batch} ({config.meta_batch // engine.world_size} task(s) on each of "
                      f"{engine.world_size} process(es); give --meta_batch to choose)")
    config.given_options = given
    return config


def record_config(engine, config: TrainConfig, resolved: dict, start: int) -> RunManifest:
    """config.json (the config that runs, the options as given, values resolved at run time) and config.yaml, the
    trackers (TensorBoard continued from `start` on a resume), the manifest of this session (returned; a
    collective) and one line saying what runs where."""
    engine.start_tracking(asdict(config) | resolved, config.project, first_step=start)
    document = asdict(config) | {"given": getattr(config, "given_options", None), "resolved": resolved}
    text = json.dumps(document, indent=1, sort_keys=True, default=str)
    if engine.is_main:
        atomic_write_text(Path(config.out) / CONFIG_JSON, text)
        write_config_yaml(asdict(config), Path(config.out) / CONFIG_YAML)  # `--config RUN/config.yaml` reruns it
    manifest = RunManifest.start(config.out, engine)  # hosts, versions, command line, start time (all ranks)
    log_config_text(engine, text, step=start)
    engine.print0(f"{resolved['rule']}; {engine.world_size} process(es) on {engine.device}, "
                  f"tasks run with '{resolved['task_parallel']}', {resolved['torch_threads']} torch thread(s) per "
                  f"process ({resolved['torch_threads_from']})"
                  + (f"; rank 0 pinned to cores {resolved['cpu_cores']}" if resolved["cpu_cores"] != "unpinned" else ""))
    return manifest


def finish(config: TrainConfig, engine, learner, validator, monitor, data_root: Path, export_metadata: dict) -> dict:
    """The final weights, the test with the best-by-validation weights, results.json/md and the hparams."""
    engine.export(learner, Path(config.out) / FINAL_WEIGHTS, export_metadata | {"step": config.steps})
    results = {"val": validator.history[-1] if validator.history else None, "best_val": validator.best,
               "val_history": validator.history, "inner_lr_learned": engine.unwrap(learner).step_size_values()}
    if config.test_episodes:
        results["test"] = final_test(learner, engine, validator, data_root / "test", episode_shape(config),
                                     episodes=config.test_episodes, inner_steps=config.test_inner_steps,
                                     tasks_per_batch=engine.tasks_per_rank(config.meta_batch), step=config.steps)
    summary = summarize_run(config.out, asdict(config), results, monitor, engine.world_size)
    log_final_hparams(engine, asdict(config) | {"world_size": engine.world_size}, summary)
    engine.end()
    return summary


# Expected errors: bad options or files (exit 2), and a run stopped by its non-finite guard (exit 1). Every rank
# raises the same one for these, so only rank 0 prints it; a rank-specific data error is printed by its rank.
EXPECTED_ERRORS = {ConfigError: 2, DistributedSetupError: 2, ShardFormatError: 2, WeightsFileError: 2,
                   NonFiniteError: 1}
RANK_SPECIFIC = (ShardFormatError,)


def main(**options) -> None:
    if options.pop("help", False) or options.pop("h", False):
        # fire hands `--help` to the **options catch-all below, so the help is printed here, from TrainConfig
        print("usage: [accelerate launch [LAUNCH OPTIONS]] -m dist_signmaml.train [--OPTION VALUE ...]\n\n"
              "Meta-train a few-shot learner with Sign-MAML and its baselines.\n\noptions:\n"
              f"  --{CONFIG_FLAG}  a YAML or TOML file setting any option below; flags override it (docs/cluster.md)\n"
              + TrainConfig.help_lines())
        return
    try:
        train(TrainConfig.from_options(**options))
    except tuple(EXPECTED_ERRORS) as error:  # one line, no traceback; anything else is a bug and keeps its traceback
        if os.environ.get("RANK", "0") == "0" or isinstance(error, RANK_SPECIFIC):
            print(f"error: {error}", file=sys.stderr, flush=True)
        sys.exit(next(code for kind, code in EXPECTED_ERRORS.items() if isinstance(error, kind)))
    except PeerLostError:  # its rank printed it when it was diagnosed (engine.naming_lost_peers)
        sys.exit(1)


# The CLI signature and help come from TrainConfig, so `--help` lists every option with its default.
# A trailing **options lets fire hand a mistyped flag to TrainConfig, which rejects it before any work (without it
# fire would run the whole training and complain about the flag afterwards).
main.__signature__ = inspect.Signature([
    inspect.Parameter(f.name, inspect.Parameter.KEYWORD_ONLY, default=f.default, annotation=f.type) for f in fields(TrainConfig)]
    + [inspect.Parameter(CONFIG_FLAG, inspect.Parameter.KEYWORD_ONLY, default="", annotation=str)]
    + [inspect.Parameter("unknown_options", inspect.Parameter.VAR_KEYWORD)])
main.__doc__ = "Meta-train a few-shot learner with Sign-MAML and its baselines.\n\nArgs:\n" + "\n".join(
    f"  {f.name}: {f.metadata['help']}" for f in fields(TrainConfig))

if __name__ == "__main__":
    fire.Fire(main)
