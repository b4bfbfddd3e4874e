"""What a training run shows while it runs and leaves behind: phase timers, the metric logger, the validator (each
deciding its own cadence, so the training loop holds no interval arithmetic), TensorBoard extras and the run summary.

Tags written here (all scalars through Accelerate's tracker API, so every --log_with tracker gets the same ones,
on the main process only):

    train/loss, train/accuracy_after   window means over ranks and steps
    train/accuracy_before             on logging steps (an extra query pass), mean over ranks; stays at chance,
                                      1/ways, by design (see TAG_DESCRIPTIONS, shown on the scalar's card)
    train/step_seconds, train/tasks_per_second                 wall time of one meta-iteration, meta-batch / that
    train/meta_grad_norm              L2 norm of the averaged meta-gradient before --meta_grad_clip (not under DeepSpeed)
    time/data_wait, time/inner_loop, time/outer_backward, time/optimizer_step   seconds per phase (see PhaseTimer)
    memory/peak_mib                                            peak memory, max over ranks (see peak_memory_mib)
    inner/support_grad_norm, inner/sign_agreement, inner/moved_fraction      algorithms.inner.inner_diagnostics
    lr/outer, lr/inner                                         Adam's alpha and the inner beta
    data/bad_samples_skipped                                   with --on_bad_sample skip: skipped samples (rank 0; every rank reads the whole split)
    train/nonfinite_steps_skipped                              with --on_nonfinite skip_step: updates not applied
    val/accuracy, val/ci95, test/accuracy, test/ci95           fixed-episode meta-test, mean and 95% half-width
    val/accuracy_<k>_steps                                     with --val_select any_steps: after k inner steps
    final/best_val_accuracy, final/test_accuracy, final/test_ci95, final/seconds_per_meta_iteration   at the last step
    TensorBoard only: text config; images episode/support, episode/query; hparams (run "final") with the final metrics
"""

from __future__ import annotations

import json
import math
import resource
import sys
import time
from contextlib import contextmanager
from pathlib import Path

import torch
from tqdm import tqdm

from dist_signmaml.artifacts import (BEST_WEIGHTS, FINAL_WEIGHTS, RESULTS_JSON, RESULTS_MD, atomic_write_text,
                                     load_learner_weights)
from dist_signmaml.metatest import EVALUATION_SEED, STEP_COUNTS, meta_test, selected_score

PHASES = ("data_wait", "inner_loop", "outer_backward", "optimizer_step")
# A validation this many points under the run's best means training fell apart (successive validations of a healthy
# run move by 1 to 2 points): the validator warns, and the fidelity tables mark such a run as collapsed.
COLLAPSE_POINTS = 5.0
# Shown by TensorBoard with the scalar (the card's description) for tags whose values look wrong but are not.
TAG_DESCRIPTIONS = {
    "train/accuracy_before": (
        "Query accuracy at the meta-initialisation, before any inner step. Labels are re-drawn for every episode, "
        "so before adapting the model cannot know which output stands for which class: this stays at chance, "
        "1/ways (exactly 1/ways when the initialisation gives every query the same class). Above chance would "
        "mean labels leak across episodes. Learning shows in train/accuracy_after."),
}


class PhaseTimer:
    """Wall-clock seconds per named phase of one meta-iteration.

    On a GPU every phase boundary synchronises the device, so asynchronously launched kernels are charged to the
    phase that launched them rather than to whichever phase happens to wait for them. Under DDP the meta-gradient
    all-reduce runs inside the backward pass (overlapped with it), so `outer_backward` includes that communication;
    under DeepSpeed the optimizer step also runs inside backward and `optimizer_step` is then near zero.
    """

    def __init__(self, device: torch.device):
        device = torch.device(device)
        self._synchronize = (lambda: torch.cuda.synchronize(device)) if device.type == "cuda" else (lambda: None)
        self._current: dict[str, float] = {}

    @contextmanager
    def phase(self, name: str):
        self._synchronize()
        started = time.perf_counter()
        try:
            yield
        finally:
            self._synchronize()
            self._current[name] = self._current.get(name, 0.0) + time.perf_counter() - started

    def lap(self) -> dict[str, float]:
        """The phases of the iteration just finished plus their sum ('meta_iteration'); starts the next one."""
        times, self._current = self._current, {}
        times["meta_iteration"] = sum(times.values())
        return times


def peak_memory_mib(device: torch.device) -> float:
    """Peak memory of this process in MiB: the CUDA caching allocator's peak on a GPU, the peak resident set size
    (getrusage) on a CPU."""
    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / 2**20 if sys.platform == "darwin" else peak / 2**10  # bytes on macOS, KiB on Linux


class RunningStats:
    """Count, mean and standard deviation of a stream of numbers (Welford), e.g. seconds per meta-iteration."""

    def __init__(self):
        self.count, self.mean, self._m2 = 0, 0.0, 0.0

    def add(self, value: float):
        self.count += 1
        delta = value - self.mean
        self.mean += delta / self.count
        self._m2 += delta * (value - self.mean)

    @property
    def std(self) -> float:
        return math.sqrt(self._m2 / (self.count - 1)) if self.count > 1 else 0.0

    def summary(self) -> dict:
        return {"mean": self.mean, "std": self.std, "count": self.count}

    def state_dict(self) -> dict:
        return {"count": self.count, "mean": self.mean, "m2": self._m2}

    def load_state_dict(self, state: dict) -> None:
        self.count, self.mean, self._m2 = int(state["count"]), float(state["mean"]), float(state["m2"])


def step_size_scalars(step_sizes: dict[str, float | list[float]]) -> dict[str, float]:
    """Learned betas as TensorBoard scalars: inner/lr/<tensor> (--learn_inner_lr layer), or
    inner/lr/<tensor>/step<k> for each trained inner step k = 1..m (layer_step)."""
    scalars = {}
    for name, value in step_sizes.items():
        if isinstance(value, list):
            scalars |= {f"inner/lr/{name}/step{k}": v for k, v in enumerate(value, start=1)}
        else:
            scalars[f"inner/lr/{name}"] = value
    return scalars


class TrainMonitor:
    """Per-step bookkeeping of meta-training. Logs window means every `log_every` steps and at the last step,
    asks the learner for inner-loop diagnostics on exactly those steps, shows one episode as images on the first
    step it sees, and drives the progress bar (main process only)."""

    def __init__(self, engine, *, log_every: int, last_step: int, first_step: int, meta_batch: int, inner_lr: float,
                 optimizer, stream=None):
        self.engine, self.every, self.last_step = engine, int(log_every), int(last_step)
        self.meta_batch, self.inner_lr, self.optimizer = int(meta_batch), float(inner_lr), optimizer
        self.stream = stream  # counts the bad samples it skipped (--on_bad_sample skip)
        self.timer = PhaseTimer(engine.device)
        self.iteration_seconds = RunningStats()  # for the summary (the paper's Table 1 lower row)
        self.nonfinite_skipped = 0
        self._window: list[dict[str, float]] = []
        self._first_step = int(first_step) + 1
        self.progress = tqdm(total=last_step, initial=first_step, disable=not engine.is_main, desc="meta-train",
                             unit="step", dynamic_ncols=True)

    def phase(self, name: str):
        return self.timer.phase(name)

    def should_log(self, step: int) -> bool:
        return step % self.every == 0 or step == self.last_step

    def record(self, step: int, episodes, output) -> None:
        """Take the outcome of meta-step `step` (its timings come from the phases just timed); output None: the
        update was skipped as non-finite (--on_nonfinite skip_step)."""
        times = self.timer.lap()
        if output is None:
            self.nonfinite_skipped += 1
            self.engine.print0(f"warning: step {step}: non-finite loss or meta-gradient, update skipped "
                               f"({self.nonfinite_skipped} so far)")
            self.engine.log({"train/nonfinite_steps_skipped": self.nonfinite_skipped}, step=step)
            self.progress.update(1)
            return
        if step == self._first_step:
            show_episode(self.engine, episodes, step)
        else:  # the first iteration of a process pays for lazy initialisation: not a representative timing
            self.iteration_seconds.add(times["meta_iteration"])
        self._window.append({"train/loss": float(output.loss.detach()),
                             "train/accuracy_after": float(output.accuracy_after),
                             "train/step_seconds": times["meta_iteration"]}
                            | ({"train/meta_grad_norm": float(output.meta_grad_norm)}
                               if output.meta_grad_norm is not None else {})
                            | {f"time/{name}": times.get(name, 0.0) for name in PHASES})
        self.progress.update(1)
        if self.should_log(step):
            self._log(step, output)
            if self.stream is not None and self.stream.on_bad_sample == "skip":
                # every rank walks the whole split and meets the same bad samples: rank 0's count is the run's
                self.engine.log({"data/bad_samples_skipped": self.stream.bad_samples_skipped}, step=step)

    def _log(self, step: int, output) -> None:
        means = {key: sum(entry[key] for entry in self._window) / len(self._window) for key in self._window[0]}
        if output.diagnostics is not None:  # measured on this logging step only (they cost extra passes)
            means |= {f"inner/{name}": float(value) for name, value in output.diagnostics.items()}
            means["train/accuracy_before"] = float(output.accuracy_before)
        means |= step_size_scalars(output.step_sizes or {})
        means = self.engine.mean_over_ranks(means)
        described = {tag: means.pop(tag) for tag in TAG_DESCRIPTIONS if tag in means}
        log_described(self.engine, described, step)  # TensorBoard, with the description on the card
        self.engine.log(described, step=step, except_tensorboard=True)  # the same tags in every other tracker
        peak = self.engine.gather(torch.tensor([peak_memory_mib(self.engine.device)], device=self.engine.device))
        self.engine.log(means | {"train/tasks_per_second": self.meta_batch / max(means["train/step_seconds"], 1e-12),
                                 "memory/peak_mib": float(peak.max()),
                                 "lr/outer": float(self.optimizer.param_groups[0]["lr"]), "lr/inner": self.inner_lr},
                        step=step)
        self.progress.set_postfix(loss=f"{means['train/loss']:.3f}", acc=f"{means['train/accuracy_after']:.3f}")
        self._window = []

    def state_dict(self, step: int | None = None) -> dict:
        """What the run's summary counts over every step: a resumed run reports its seconds per meta-iteration and
        its skipped updates over the whole run, not over the last process only."""
        return {"iteration_seconds": self.iteration_seconds.state_dict(), "nonfinite_skipped": self.nonfinite_skipped}

    def load_state_dict(self, state: dict | None) -> None:
        if not state:  # a checkpoint written before the monitor was saved: the counts start at the resume
            return
        self.iteration_seconds.load_state_dict(state["iteration_seconds"])
        self.nonfinite_skipped = int(state["nonfinite_skipped"])

    def close(self):
        self.progress.close()


def log_described(engine, values: dict[str, float], step: int) -> None:
    """Scalars with their TAG_DESCRIPTIONS text in the summary metadata (TensorBoard shows it on the card); the
    values read back like any other scalar. Main process only, as the tracker."""
    writer = engine.tensorboard_writer()
    if writer is None or not values:
        return
    from tensorboard.compat.proto.summary_pb2 import Summary, SummaryMetadata

    summary = Summary(value=[Summary.Value(tag=tag, simple_value=float(value),
                                           metadata=SummaryMetadata(summary_description=TAG_DESCRIPTIONS[tag]))
                             for tag, value in values.items()])
    writer.file_writer.add_summary(summary, step)


def show_episode(engine, episodes, step: int) -> None:
    """The first task of a meta-batch as two image grids (one row per class): its support and its query set."""
    writer = engine.tensorboard_writer()
    if writer is None:
        return
    from torchvision.utils import make_grid

    support_x, support_y, query_x, query_y = (t[0].detach().cpu() for t in episodes)
    for name, images, labels in (("support", support_x, support_y), ("query", query_x, query_y)):
        per_class = int((labels == labels[0]).sum())
        ordered = images[torch.argsort(labels, stable=True)]
        writer.add_image(f"episode/{name}", make_grid(ordered, nrow=per_class, normalize=True, pad_value=1.0), step)


def log_config_text(engine, config_json: str, step: int = 0) -> None:
    """The resolved configuration on TensorBoard's text tab (indented: a code block in TensorBoard's Markdown), at
    the step a session starts from (a resume purges later steps, so each session's copy appears once).
    Written to TensorBoard only: the other trackers keep the configuration as the run's parameters."""
    writer = engine.tensorboard_writer()
    if writer is not None:
        writer.add_text("config", "\n".join("    " + line for line in config_json.splitlines()), step)


class Validator:
    """Meta-tests the val split's fixed episodes on its own cadence (every `every` steps and at the last step;
    every=0: only at the last step) and keeps the weights with the best val accuracy, in memory and as
    OUT/model_best.safetensors (same format as model.safetensors, plus the step and the val result). A validation
    COLLAPSE_POINTS or more under the best gets a warning: a run can fall apart long after its best.

    `select`: test_steps ranks validations by the accuracy after `inner_steps` inner steps (the protocol the final
    test uses); any_steps by the best accuracy after any of STEP_COUNTS up to `inner_steps`, all from one adaptation
    pass. any_steps is for runs whose test protocol is chosen afterwards: a rule trained for one large step (sign at
    m = 1) can peak after 1 test step and overshoot by 10, and ranking it at 10 would keep the wrong weights."""

    def __init__(self, engine, split_dir, shape, *, episodes: int, every: int, last_step: int, inner_steps: int,
                 tasks_per_batch: int, out_dir, export_metadata: dict, select: str = "test_steps"):
        self.engine, self.split_dir, self.shape = engine, split_dir, shape  # a Path, or a storage.Url
        self.episodes, self.every, self.last_step = int(episodes), int(every), int(last_step)
        self.inner_steps, self.tasks_per_batch = int(inner_steps), int(tasks_per_batch)
        self.step_counts = tuple(c for c in STEP_COUNTS if c <= self.inner_steps) if select == "any_steps" else ()
        self.best_path = Path(out_dir) / BEST_WEIGHTS
        self.export_metadata = export_metadata
        self.history: list[dict] = []
        self.best: dict | None = None
        self._best_weights: dict[str, torch.Tensor] | None = None

    def should_validate(self, step: int) -> bool:
        return self.episodes > 0 and (step == self.last_step or (self.every > 0 and step % self.every == 0))

    def validate(self, learner, step: int) -> dict:
        result = meta_test(learner, self.engine, self.split_dir, self.shape, episodes=self.episodes,
                           inner_steps=self.inner_steps, seed=EVALUATION_SEED, tasks_per_batch=self.tasks_per_batch,
                           desc=f"val@{step}", step_counts=self.step_counts) | {"step": step}
        self.history.append(result)
        self.engine.log({"val/accuracy": result["accuracy"], "val/ci95": result["ci95"]}
                        | {f"val/accuracy_{s['inner_steps']}_steps": s["accuracy"] for s in result.get("by_steps", [])},
                        step=step)
        improved = self.best is None or selected_score(result)["accuracy"] > selected_score(self.best)["accuracy"]
        if improved:
            self.best = result
            own = self.engine.unwrap(learner)
            self._best_weights = {k: v.detach().to("cpu", copy=True) for k, v in own.state_dict().items()}
            self.engine.export(learner, self.best_path, self.export_metadata | {"step": step, "val": result})
        self.engine.print0(f"step {step}: val {describe(result)} over {result['episodes']} episodes"
                           + (" (best so far)" if improved else f" (best {describe(self.best)} at step {self.best['step']})"))
        under_best = points_under(self.best, result)
        if under_best >= COLLAPSE_POINTS:
            self.engine.print0(f"warning: step {step}: validation lies {under_best:.2f} points under its best (step "
                               f"{self.best['step']}): training may be falling apart. The final test scores the best "
                               f"weights ({BEST_WEIGHTS}); a lower --outer_lr, --outer_lr_schedule cosine or "
                               f"--meta_grad_clip (see train/meta_grad_norm) may keep such a run stable")
        return result

    def restore_best(self, learner) -> int | None:
        """Load the best weights into the learner (all ranks); returns their step, or None if nothing was validated."""
        if self._best_weights is None:
            return None
        self.engine.unwrap(learner).load_state_dict(self._best_weights)
        return self.best["step"]

    def state_dict(self, step: int | None = None) -> dict:
        return {"history": self.history, "best": self.best}

    def load_state_dict(self, state: dict | None) -> None:
        """Resume: the history and the best result from a checkpoint, the best weights from model_best.safetensors."""
        if not state:
            return
        self.history, self.best = list(state.get("history", [])), state.get("best")
        if self.best is not None and self.best_path.is_file():
            self._best_weights = load_learner_weights(self.best_path)


def points_under(best: dict, result: dict) -> float:
    """How many points validation `result` lies under `best`, each scored as the run ranks validations."""
    return 100 * (selected_score(best)["accuracy"] - selected_score(result)["accuracy"])


def percent(result: dict) -> str:
    return f"{100 * result['accuracy']:.2f} ± {100 * result['ci95']:.2f}%"


def describe(result: dict) -> str:
    """A validation result as printed: its accuracy, and the best step count's when it scored several."""
    if "best_steps" not in result:
        return percent(result)
    return f"{percent(result)} at {result['inner_steps']} steps, {percent(result['best_steps'])} at " \
           f"{result['best_steps']['inner_steps']}"


def final_test(learner, engine, validator: Validator, split_dir, shape, *, episodes: int, inner_steps: int,
               tasks_per_batch: int, step: int) -> dict:
    """Meta-test the test split with the best-by-validation weights (the final weights if nothing was validated)."""
    best_step = validator.restore_best(learner)
    result = meta_test(learner, engine, split_dir, shape, episodes=episodes, inner_steps=inner_steps,
                       seed=EVALUATION_SEED, tasks_per_batch=tasks_per_batch, desc="test")
    result["weights"] = BEST_WEIGHTS if best_step is not None else FINAL_WEIGHTS
    result["weights_step"] = best_step if best_step is not None else step
    engine.log({"test/accuracy": result["accuracy"], "test/ci95": result["ci95"]}, step=step)
    engine.print0(f"test {shape.ways}-way {shape.shots}-shot, {inner_steps} inner steps, weights of step "
                  f"{result['weights_step']}: {percent(result)} over {result['episodes']} episodes")
    return result


def summarize_run(out_dir, config: dict, results: dict, monitor: TrainMonitor, world_size: int) -> dict:
    """results.json (everything) and results.md (a table for humans) in the run directory; main process only."""
    summary = {"config": config, "world_size": world_size, "steps": config["steps"],
               "seconds_per_meta_iteration": monitor.iteration_seconds.summary(),
               "tasks_per_second": (config["meta_batch"] / monitor.iteration_seconds.mean
                                    if monitor.iteration_seconds.count else None),
               "peak_memory_mib": peak_memory_mib(monitor.engine.device)} | results
    if monitor.engine.is_main:
        out_dir = Path(out_dir)
        atomic_write_text(out_dir / RESULTS_JSON, json.dumps(summary, indent=1, sort_keys=True) + "\n")
        atomic_write_text(out_dir / RESULTS_MD, results_markdown(summary))
    return summary


def results_markdown(summary: dict) -> str:
    config = summary["config"]
    lines = [f"# {config['algo']} · {config['ways']}-way {config['shots']}-shot · {config['backbone']} · "
             f"{summary['steps']} meta-steps · {summary['world_size']} process(es)", ""]
    if summary.get("best_val") or summary.get("test"):
        lines += ["| split | weights | episodes | inner steps | accuracy ± 95% CI |", "| --- | --- | --- | --- | --- |"]
    else:
        lines.append("Not validated or tested (--eval_episodes 0, --test_episodes 0): score the weights with "
                     "`python -m dist_signmaml.evaluate RUN_DIR`.")
    if summary.get("best_val"):
        best = summary["best_val"]
        lines.append(f"| val (best) | step {best['step']} | {best['episodes']} | {best['inner_steps']} | {percent(best)} |")
        if "best_steps" in best:  # --val_select any_steps ranked it here
            lines.append(f"| val (best, ranked) | step {best['step']} | {best['episodes']} | "
                         f"{best['best_steps']['inner_steps']} | {percent(best['best_steps'])} |")
    if summary.get("test"):
        test = summary["test"]
        lines.append(f"| test | {test['weights']} (step {test['weights_step']}) | {test['episodes']} | "
                     f"{test['inner_steps']} | {percent(test)} |")
    timing = summary["seconds_per_meta_iteration"]
    lines += ["", f"Time per meta-iteration: {timing['mean']:.4f} ± {timing['std']:.4f} s (mean ± std over "
                  f"{timing['count']} iterations); peak memory {summary['peak_memory_mib']:.0f} MiB.", ""]
    if summary.get("val_history"):
        lines += ["| step | val accuracy ± 95% CI |", "| --- | --- |"]
        lines += [f"| {r['step']} | {describe(r)} |" for r in summary["val_history"]]
        lines.append("")
    return "\n".join(lines)


def log_final_hparams(engine, hparams: dict, summary: dict) -> None:
    """The run's final metrics, logged to every tracker at the last step, and with the hyperparameters on
    TensorBoard's HPARAMS tab (sub-run 'final')."""
    flat = {k: (v if isinstance(v, (int, float, str, bool)) else str(v)) for k, v in hparams.items()}
    metrics = {"final/seconds_per_meta_iteration": summary["seconds_per_meta_iteration"]["mean"]}
    for split, key in (("best_val", "final/best_val_accuracy"), ("test", "final/test_accuracy")):
        if summary.get(split):
            metrics[key] = summary[split]["accuracy"]
    if summary.get("test"):
        metrics["final/test_ci95"] = summary["test"]["ci95"]
    engine.log(metrics, step=summary["steps"])
    writer = engine.tensorboard_writer()
    if writer is None:
        return
    writer.add_hparams(flat, metrics, run_name="final")
    writer.flush()
