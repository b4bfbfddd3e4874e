"""Meta-train with Sign-MAML (or FO-MAML / MAML / Signum) under Accelerate.

    accelerate launch -m dist_signmaml.train --ways 10 --shots 1
    python -m dist_signmaml.train --help
"""

from __future__ import annotations

import inspect
import sys
from dataclasses import asdict, fields
from pathlib import Path

import fire

from dist_signmaml.algorithms import MetaLearner, make_rule
from dist_signmaml.algorithms.learner import resolve_task_parallel
from dist_signmaml.config import DEFAULT_DATA, ConfigError, TrainConfig
from dist_signmaml.config_files import CONFIG_FLAG, CONFIG_YAML, write_config_yaml
from dist_signmaml.cpu_allocator import keep_freed_memory
from dist_signmaml.data import EpisodeShape, EpisodeStream, read_index, train_loader, usable_classes
from dist_signmaml.data.format import ShardFormatError
from dist_signmaml.data.storage import data_root
from dist_signmaml.engine import DistributedSetupError, Engine, completed_checkpoints
from dist_signmaml.models import adapted_parameter_names, build_backbone, load_weights, resolve_channels_last
from dist_signmaml.optim import OuterLRSchedule, build_optimizer
from dist_signmaml.monitor import (TrainMonitor, Validator, final_test, log_config_text, log_final_hparams,
                                   summarize_run)
from dist_signmaml.manifest import RunManifest
from dist_signmaml.preemption import GracefulStop, clear_preempted_marker
from dist_signmaml.profiling import StepProfiler


def ensure_data(config: TrainConfig, engine: Engine) -> Path:
    """The shard root; the bundled Omniglot shards are built on first use (main process first, others wait)."""
    try:
        root = data_root(config.data)  # a local Path, or a Url for object storage (s3://, gs://, https://)
    except ValueError as error:
        raise ConfigError(str(error)) from None
    if root.resolve() == DEFAULT_DATA.resolve():
        with engine.main_process_first():
            if engine.is_main and not all((root / s / "index.json").is_file() for s in ("train", "val", "test")):
                from shards import omniglot

                engine.print0(f"building the bundled Omniglot shards in {root} (once)")
                omniglot.build(root, progress=True)
    shape = EpisodeShape(config.ways, config.shots, config.queries)
    for split in ("train",) + (("val",) if config.eval_episodes else ()) + (("test",) if config.test_episodes else ()):
        try:
            index = read_index(root / split)
        except (FileNotFoundError, ValueError) as error:
            raise ConfigError(f"--data={config.data!r}: {error}") from None
        try:
            usable_classes(index, shape, root / split)
        except ValueError as error:
            raise ConfigError(str(error)) from None
    return root


def build_learner(config: TrainConfig, image_shape, device) -> MetaLearner:
    """The MetaLearner of `config` for images of `image_shape` (H, W, C). `evaluate` rebuilds trained weights
    with this same function, so a meta-test runs exactly the trained model and inner loop."""
    height, width, channels = image_shape
    if str(device).split(":")[0] == "cpu":
        keep_freed_memory()  # no page faults on every step's fresh graph (cpu_allocator)
    channels_last, _ = resolve_channels_last(config.channels_last, device)
    try:
        model = build_backbone(config.backbone, in_channels=channels, ways=config.ways, hidden=config.hidden,
                               image_size=height, stem=config.stem, precision=config.precision,
                               channels_last=channels_last,
                               activation_checkpointing=config.activation_checkpointing)
        adapted_names = adapted_parameter_names(model, config.adapt)
    except ValueError as error:
        raise ConfigError(str(error)) from None
    # Checkpointing works only outside torch.func transforms, i.e. in the task loop: 'auto' picks it then.
    task_parallel = resolve_task_parallel("loop" if config.activation_checkpointing and config.task_parallel == "auto"
                                          else config.task_parallel, device)
    learner = MetaLearner(model, make_rule(config.algo, config.inner_momentum), config.inner_lr, config.inner_steps,
                          task_parallel, adapted_names=adapted_names, learn_inner_lr=config.learn_inner_lr,
                          multi_step_loss=config.multi_step_loss)
    return learner.compile_tasks(config.compile_backend) if config.compile else learner


def train(config: TrainConfig) -> dict:
    engine = Engine(config.out, config.seed, log_with=config.log_with, zero_stage=config.zero_stage,
                    timeout_s=config.dist_timeout)
    data_root = ensure_data(config, engine)
    shape = EpisodeShape(config.ways, config.shots, config.queries)
    make_stream = lambda start: EpisodeStream(  # noqa: E731 - one stream per (re)start position
        data_root / "train", shape, engine.tasks_per_rank(config.meta_batch), seed=config.seed, rank=engine.rank,
        world_size=engine.world_size, num_workers=config.workers, start_batch=start, window_shards=config.window_shards,
        class_sampling=config.class_sampling, on_bad_sample=config.on_bad_sample, cache_dir=config.cache_dir or None,
        cache_gb=config.cache_gb)
    try:
        stream = make_stream(0)  # validates ways / shots+queries against the split before any step
    except ValueError as error:
        raise ConfigError(str(error)) from None
    learner = build_learner(config, stream.index.image_shape, engine.device)
    channels_last, why = resolve_channels_last(config.channels_last, engine.device)
    engine.print0(f"memory layout: {'channels-last' if channels_last else 'NCHW'} ({why})")
    if config.weights:  # before prepare, so every rank starts from the file (DDP also broadcasts rank 0's weights)
        try:
            fresh = load_weights(learner.model, config.weights)
        except ValueError as error:
            raise ConfigError(str(error)) from None
        engine.print0(f"initialised from {config.weights}" + (f"; new: {', '.join(fresh)}" if fresh else ""))
    task_parallel = learner.task_parallel
    optimizer = build_optimizer(learner, config.outer_lr, config.inner_lr_lr)
    outer_lr = OuterLRSchedule(optimizer, config.outer_lr_schedule, config.steps)
    learner, optimizer = engine.prepare(learner, optimizer, engine.tasks_per_rank(config.meta_batch))

    start = 0
    if config.resume and completed_checkpoints(config.out):
        state = engine.load_checkpoint(completed_checkpoints(config.out)[-1])
        start = state["step"]
        engine.print0(f"resumed from step {start}")
        if engine.is_main:
            clear_preempted_marker(config.out)
    engine.start_tracking(asdict(config) | {"task_parallel_resolved": task_parallel, "world_size": engine.world_size},
                          config.project)
    Path(config.out).mkdir(parents=True, exist_ok=True)
    if engine.is_main:
        (Path(config.out) / "config.json").write_text(config.to_json())
        write_config_yaml(asdict(config), Path(config.out) / CONFIG_YAML)  # `--config RUN/config.yaml` reruns it
    manifest = RunManifest.start(config.out, engine)  # hosts, versions, command line, start time (all ranks)
    log_config_text(engine, config.to_json())
    engine.print0(f"{engine.unwrap(learner).rule.description}; "
                  f"{engine.world_size} process(es) on {engine.device}, tasks run with '{task_parallel}'")

    # Components decide their own cadence: the monitor logs every log_every steps (and asks the learner for inner-loop
    # diagnostics then), the validator validates every eval_every steps and keeps the best weights.
    monitor = TrainMonitor(engine, log_every=config.log_every, last_step=config.steps, first_step=start,
                           meta_batch=config.meta_batch, inner_lr=config.inner_lr, optimizer=optimizer)
    export_metadata = {"config": asdict(config), "image_shape": list(stream.index.image_shape),
                       "normalization": {"mean": list(stream.index.mean), "std": list(stream.index.std)}}
    validator = Validator(engine, data_root / "val", shape, episodes=config.eval_episodes, every=config.eval_every,
                          last_step=config.steps, inner_steps=config.test_inner_steps,
                          tasks_per_batch=engine.tasks_per_rank(config.meta_batch), out_dir=config.out,
                          export_metadata=export_metadata)
    if start:
        validator.load_state_dict(state.get("validator"))
    train_stream = make_stream(start) if start else stream
    if start and train_stream.resume_differences(state.get("episode_stream", {})):  # e.g. relaunched on more ranks
        engine.print0("warning: the episode stream differs from the checkpoint's, so the resumed run sees other "
                      "episodes than an uninterrupted one: " + "; ".join(train_stream.resume_differences(state["episode_stream"])))
    checkpoint_state = lambda step: {"episode_batches_consumed": step, "validator": validator.state_dict(),  # noqa: E731
                                     "episode_stream": train_stream.state_dict(next_batch=step)}

    profiler = StepProfiler(config.profile_steps, config.out, engine.rank, engine.device, config.steps)
    phase = profiler.phases(monitor.phase)  # the monitor's phase timers, labelled in the profile (--profile_steps)
    batches = iter(train_loader(train_stream, config.workers))
    stop = GracefulStop(engine.any_rank)  # SIGTERM/SIGUSR1 -> checkpoint at the next step boundary, then exit
    for step in range(start + 1, config.steps + 1):
        profiler.begin(step)
        with phase("data_wait"):
            episodes = next(batches)
        outer_lr.apply(step)
        output = engine.meta_step(learner, optimizer, episodes, phase=phase, diagnostics=monitor.should_log(step),
                                  progress=step / config.steps)
        profiler.end(step)
        monitor.record(step, episodes, output)
        if config.on_bad_sample == "skip" and monitor.should_log(step):  # every rank walks the whole split and
            engine.log({"data/bad_samples_skipped": train_stream.bad_samples_skipped}, step=step)  # meets the same
        if validator.should_validate(step):
            validator.validate(learner, step)
        if stop.requested() and step != config.steps:  # voted across ranks, so all save the same step
            engine.save_checkpoint(step, checkpoint_state(step) | {"stopped_by": stop.reason}, config.keep_checkpoints)
            engine.end()
            profiler.close()
            manifest.finish("stopped")
            stop.exit(config.out, step, engine.is_main)
        if step % config.ckpt_every == 0 and step != config.steps:
            engine.save_checkpoint(step, checkpoint_state(step), config.keep_checkpoints)
    monitor.close()
    profiler.close()
    stop.close()

    engine.save_checkpoint(config.steps, checkpoint_state(config.steps), config.keep_checkpoints)
    engine.export(learner, Path(config.out) / "model.safetensors", export_metadata | {"step": config.steps})
    results = {"val": validator.history[-1] if validator.history else None, "best_val": validator.best,
               "val_history": validator.history, "inner_lr_learned": engine.unwrap(learner).step_size_values()}
    if config.test_episodes:  # with the best-by-validation weights
        results["test"] = final_test(learner, engine, validator, data_root / "test", shape,
                                     episodes=config.test_episodes, inner_steps=config.test_inner_steps,
                                     tasks_per_batch=engine.tasks_per_rank(config.meta_batch), step=config.steps)
    summary = summarize_run(config.out, asdict(config), results, monitor, engine.world_size)
    log_final_hparams(engine, asdict(config) | {"world_size": engine.world_size}, summary)
    engine.end()
    manifest.finish("completed")
    return summary


def main(**options) -> None:
    if options.pop("help", False) or options.pop("h", False):
        # fire hands `--help` to the **options catch-all below, so the help is printed here, from TrainConfig
        print("usage: [accelerate launch [LAUNCH OPTIONS]] -m dist_signmaml.train [--OPTION VALUE ...]\n\n"
              "Meta-train a few-shot learner with Sign-MAML and its baselines.\n\noptions:\n"
              f"  --{CONFIG_FLAG}  a YAML or TOML file setting any option below; flags override it (docs/cluster.md)\n"
              + TrainConfig.help_lines())
        return
    try:
        config = TrainConfig.from_options(**options)
        train(config)
    except (ConfigError, DistributedSetupError, ShardFormatError) as error:  # bad input: one line, no traceback
        print(f"error: {error}", file=sys.stderr)
        sys.exit(2)


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
