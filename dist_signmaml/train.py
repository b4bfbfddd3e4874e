"""Meta-train with Sign-MAML (or FO-MAML / MAML / Signum) under Accelerate.

    accelerate launch -m dist_signmaml.train --ways 10 --shots 1
    python -m dist_signmaml.train --help
"""

from __future__ import annotations

import inspect
import sys
import time
from dataclasses import asdict, fields
from pathlib import Path

import fire
import torch
from tqdm import tqdm

from dist_signmaml.algorithms import MetaLearner, make_rule
from dist_signmaml.algorithms.learner import resolve_task_parallel
from dist_signmaml.config import DEFAULT_DATA, ConfigError, TrainConfig
from dist_signmaml.data import EpisodeShape, EpisodeStream, read_index, train_loader
from dist_signmaml.engine import Engine, completed_checkpoints
from dist_signmaml.evaluate import meta_test
from dist_signmaml.models import build_backbone


def ensure_data(config: TrainConfig, engine: Engine) -> Path:
    """The shard root; the bundled Omniglot shards are built on first use (main process first, others wait)."""
    root = Path(config.data)
    if root.resolve() == DEFAULT_DATA.resolve():
        with engine.main_process_first():
            if engine.is_main and not all((root / s / "index.json").is_file() for s in ("train", "val", "test")):
                from shards import omniglot

                engine.print0(f"building the bundled Omniglot shards in {root} (once)")
                omniglot.build(root, progress=True)
    for split in ("train",) + (("val",) if config.eval_episodes else ()):
        try:
            read_index(root / split)
        except (FileNotFoundError, ValueError) as error:
            raise ConfigError(f"--data={config.data!r}: {error}") from None
    return root


def train(config: TrainConfig) -> dict:
    engine = Engine(config.out, config.seed)
    data_root = ensure_data(config, engine)
    shape = EpisodeShape(config.ways, config.shots, config.queries)
    make_stream = lambda start: EpisodeStream(  # noqa: E731 - one stream per (re)start position
        data_root / "train", shape, engine.tasks_per_rank(config.meta_batch), seed=config.seed, rank=engine.rank,
        world_size=engine.world_size, num_workers=config.workers, start_batch=start, window_shards=config.window_shards)
    try:
        stream = make_stream(0)  # validates ways / shots+queries against the split before any step
    except ValueError as error:
        raise ConfigError(str(error)) from None
    height, width, channels = stream.index.image_shape

    model = build_backbone(config.backbone, in_channels=channels, ways=config.ways, hidden=config.hidden, image_size=height)
    task_parallel = resolve_task_parallel(config.task_parallel, engine.device)
    learner = MetaLearner(model, make_rule(config.algo, config.inner_momentum), config.inner_lr, config.inner_steps,
                          task_parallel)
    optimizer = torch.optim.Adam(learner.parameters(), lr=config.outer_lr)
    learner, optimizer = engine.prepare(learner, optimizer)

    start = 0
    if config.resume and completed_checkpoints(config.out):
        state = engine.load_checkpoint(completed_checkpoints(config.out)[-1])
        start = state["step"]
        engine.print0(f"resumed from step {start}")
    engine.start_tracking(asdict(config) | {"task_parallel_resolved": task_parallel, "world_size": engine.world_size})
    Path(config.out).mkdir(parents=True, exist_ok=True)
    if engine.is_main:
        (Path(config.out) / "config.json").write_text(config.to_json())
    engine.print0(f"{learner.module.rule.description if hasattr(learner, 'module') else learner.rule.description}; "
                  f"{engine.world_size} process(es) on {engine.device}, tasks run with '{task_parallel}'")

    loader = train_loader(make_stream(start) if start else stream, config.workers)
    progress = tqdm(total=config.steps, initial=start, disable=not engine.is_main, desc="meta-train", unit="step")
    window: list[dict] = []
    for step, episodes in zip(range(start + 1, config.steps + 1), loader):
        started = time.perf_counter()
        output = learner(*episodes.to(engine.device))
        engine.backward(output.loss)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        window.append({"loss": output.loss.detach(), "accuracy_before": output.accuracy_before,
                       "accuracy_after": output.accuracy_after, "step_seconds": time.perf_counter() - started})
        if step % config.log_every == 0 or step == config.steps:
            means = engine.mean_over_ranks({k: torch.stack([torch.as_tensor(w[k]) for w in window]).mean()
                                            for k in window[0]})
            engine.log({f"train/{k}": v for k, v in means.items()}
                       | {"train/tasks_per_second": config.meta_batch / means["step_seconds"]}, step=step)
            progress.set_postfix(loss=f"{means['loss']:.3f}", acc=f"{means['accuracy_after']:.3f}")
            window = []
        progress.update(1)
        if step % config.ckpt_every == 0 and step != config.steps:
            engine.save_checkpoint(step, {"episode_batches_consumed": step}, config.keep_checkpoints)
    progress.close()

    engine.save_checkpoint(config.steps, {"episode_batches_consumed": config.steps}, config.keep_checkpoints)
    engine.export(learner, Path(config.out) / "model.safetensors", {"config": asdict(config)})
    results = {"steps": config.steps}
    if config.eval_episodes:
        results["val"] = meta_test(learner, engine, data_root / "val", shape, episodes=config.eval_episodes,
                                   inner_steps=config.test_inner_steps, seed=config.seed + 1,
                                   tasks_per_batch=engine.tasks_per_rank(config.meta_batch))
        engine.log({"val/accuracy": results["val"]["accuracy"], "val/ci95": results["val"]["ci95"]}, step=config.steps)
        engine.print0(f"val {config.ways}-way {config.shots}-shot, {config.test_inner_steps} inner steps: "
                      f"{100 * results['val']['accuracy']:.2f} ± {100 * results['val']['ci95']:.2f}% "
                      f"over {results['val']['episodes']} episodes")
    engine.end()
    return results


def main(**options) -> None:
    try:
        config = TrainConfig.from_options(**options)
        train(config)
    except ConfigError as error:
        print(f"error: {error}", file=sys.stderr)
        sys.exit(2)


# The CLI signature and help come from TrainConfig, so `--help` lists every option with its default.
main.__signature__ = inspect.Signature([
    inspect.Parameter(f.name, inspect.Parameter.KEYWORD_ONLY, default=f.default, annotation=f.type) for f in fields(TrainConfig)])
main.__doc__ = "Meta-train a few-shot learner with Sign-MAML and its baselines.\n\nArgs:\n" + "\n".join(
    f"  {f.name}: {f.metadata['help']}" for f in fields(TrainConfig))

if __name__ == "__main__":
    fire.Fire(main)
