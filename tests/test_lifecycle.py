"""The run lifecycle in one process (docs/run_lifecycle.md): one run per directory, the lock, atomic verified
checkpoints with fallback, resume that checks its config, bad --out values, the non-finite guard, config.json's
resolved values and one TensorBoard run per directory."""

from __future__ import annotations

import json
import math
import os
import socket
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file, save_file

from dist_signmaml.artifacts import LOCK_FILE, TRAIN_STATE
from dist_signmaml.checkpointer import RunLock, completed_checkpoints
from dist_signmaml.config import ConfigError, TrainConfig
from dist_signmaml.train import main, train
from tests.helpers import cli_error, event_steps, tiny_options

pytestmark = pytest.mark.integration


def run(tmp_path, data, **overrides) -> dict:
    return train(TrainConfig.from_options(**tiny_options(tmp_path, data, **overrides)))


def checkpoint_names(out) -> list[str]:
    return [p.name for p in completed_checkpoints(out)]


# ---- issue 12 item 1: one run per directory ------------------------------------------------------------------

def test_a_fresh_run_refuses_another_runs_directory_and_overwrite_replaces_it(tmp_path, tiny_data, capsys):
    run(tmp_path, tiny_data, steps=4, ckpt_every=2)
    before = load_file(tmp_path / "run" / "model.safetensors")
    code, err = cli_error(capsys, main, **tiny_options(tmp_path, tiny_data, steps=3, seed=9))
    assert code == 2
    assert err == (f"error: --out={str(tmp_path / 'run')!r} holds another run (checkpoints of steps 2, 4, "
                   f"model.safetensors, results.json): continue it with --resume, replace it with --overwrite, or "
                   f"choose another --out"), err
    assert checkpoint_names(tmp_path / "run") == ["step_00000002", "step_00000004"], "the other run was touched"
    after = load_file(tmp_path / "run" / "model.safetensors")
    assert all(torch.equal(before[k], after[k]) for k in before)

    run(tmp_path, tiny_data, steps=3, ckpt_every=2, seed=9, overwrite=True)
    assert checkpoint_names(tmp_path / "run") == ["step_00000002", "step_00000003"]
    assert json.loads((tmp_path / "run" / "config.json").read_text())["seed"] == 9
    assert "--overwrite: removed the earlier run's" in capsys.readouterr().out


def test_a_live_lock_refuses_a_second_run_and_a_stale_one_is_replaced(tmp_path, tiny_data, capsys):
    out = tmp_path / "run"
    out.mkdir()
    sleeper = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(600)"])
    try:
        lock = RunLock(out)
        (out / LOCK_FILE).write_text(json.dumps({"pid": sleeper.pid, "host": socket.gethostname(), "started": "now",
                                                 "process_start": None, "slurm_job": ""}))
        code, err = cli_error(capsys, main, **tiny_options(tmp_path, tiny_data))
        assert code == 2 and f"is in use by another run (PID {sleeper.pid} on host {socket.gethostname()}" in err, err
        assert not (out / "checkpoints").exists()
    finally:
        sleeper.kill()
        sleeper.wait()
    assert lock.stale_reason(json.loads((out / LOCK_FILE).read_text())) == f"process {sleeper.pid} is gone"
    run(tmp_path, tiny_data)
    assert f"removed a stale lock {out / LOCK_FILE} (process {sleeper.pid} is gone)" in capsys.readouterr().err
    assert not (out / LOCK_FILE).exists(), "a finished run releases its lock"


def test_a_lock_left_by_an_earlier_run_of_the_same_slurm_job_is_stale(tmp_path, monkeypatch):
    monkeypatch.setenv("SLURM_JOB_ID", "4242")
    lock = RunLock(tmp_path)
    assert lock.stale_reason({"pid": 1, "host": "another-node", "slurm_job": "4242"}) is not None
    assert lock.stale_reason({"pid": 1, "host": "another-node", "slurm_job": "17"}) is None
    assert lock.stale_reason({"pid": os.getpid(), "host": socket.gethostname()}) is None


# ---- issue 12 items 2, 3: atomic checkpoints, verification and fallback -----------------------------------------

def test_a_damaged_newest_checkpoint_falls_back_to_the_newest_good_one(tmp_path, tiny_data, capsys):
    """A 0-byte marker (full disk), a truncated model file and a folder left with one rank's RNG file: resume warns
    about each and continues from the good checkpoint, ending with the uninterrupted run's weights."""
    run(tmp_path / "straight", tiny_data, steps=6, ckpt_every=2, keep_checkpoints=5)
    run(tmp_path, tiny_data, steps=6, ckpt_every=2, keep_checkpoints=5)
    checkpoints = tmp_path / "run" / "checkpoints"
    (checkpoints / "step_00000006" / TRAIN_STATE).write_bytes(b"")
    model = checkpoints / "step_00000004" / "model.safetensors"
    model.write_bytes(model.read_bytes()[:100])
    (checkpoints / "step_00000005").mkdir()
    (checkpoints / "step_00000005" / "random_states_1.pkl").write_bytes(b"half")
    capsys.readouterr()

    run(tmp_path, tiny_data, steps=6, ckpt_every=2, keep_checkpoints=5, resume=True)
    captured = capsys.readouterr()
    assert f"warning: removing the half-written checkpoint {checkpoints / 'step_00000005'}" in captured.err
    assert f"warning: checkpoint {checkpoints / 'step_00000006'} is damaged ({TRAIN_STATE} is unreadable" in captured.err
    assert (f"warning: checkpoint {checkpoints / 'step_00000004'} is damaged (model.safetensors has 100 bytes, the "
            f"marker says") in captured.err
    assert f"--resume: continuing from {checkpoints / 'step_00000002'}" in captured.out
    assert "resumed from step 2" in captured.out
    a, b = load_file(tmp_path / "straight" / "run" / "model.safetensors"), load_file(tmp_path / "run" / "model.safetensors")
    assert all(torch.equal(a[k], b[k]) for k in a)
    marker = json.loads((checkpoints / "step_00000006" / TRAIN_STATE).read_text())
    assert set(marker["files"]) >= {"model.safetensors", "optimizer.bin", "random_states_0.pkl"}
    assert not [p for p in checkpoints.iterdir() if p.name.startswith(".")], "temporary folders are renamed or removed"


# ---- issue 12 items 4, 5: resume checks its config and says what it did ----------------------------------------

def test_resume_refuses_options_that_change_the_model_or_algorithm(tmp_path, tiny_data, capsys):
    run(tmp_path, tiny_data, steps=2)
    code, err = cli_error(capsys, main, **tiny_options(tmp_path, tiny_data, steps=4, resume=True, algo="fo",
                                                       hidden=8))
    assert code == 2
    assert err.startswith(f"error: --resume: {tmp_path / 'run' / 'checkpoints' / 'step_00000002'} was trained with "
                          f"other options (--algo: 'sign' -> 'fo'; --inner_lr: 0.005 -> 0.1; --hidden: 16 -> 8); "), err
    summary = run(tmp_path, tiny_data, steps=4, resume=True, log_every=2, workers=0)  # steps and cadence may change
    assert summary["steps"] == 4 and summary["config"]["algo"] == "sign"


def test_a_finished_run_resumed_at_more_steps_trains_what_a_longer_run_would(tmp_path, omniglot_root):
    """bench.fidelity's --extend rests on this: under a constant outer rate, a finished 3-step run resumed at 5
    steps ends with the weights of a straight 5-step run (the data order and the optimizer state carry over), though
    each validated at its own cadence."""
    straight = run(tmp_path / "straight", omniglot_root, steps=5, eval_episodes=2, eval_every=5)
    run(tmp_path, omniglot_root, steps=3, ckpt_every=3, eval_episodes=2, eval_every=1)
    (tmp_path / "run" / "results.json").unlink()  # bench.fidelity keeps a finished run's state without it
    extended = run(tmp_path, omniglot_root, steps=5, resume=True, ckpt_every=3, eval_episodes=2, eval_every=2)
    assert [h["step"] for h in extended["val_history"]] == [1, 2, 3, 4, 5]
    a = load_file(tmp_path / "straight" / "run" / "model.safetensors")
    b = load_file(tmp_path / "run" / "model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert extended["steps"] == straight["steps"] == 5


def test_resume_says_when_there_is_nothing_to_resume_and_must_makes_it_an_error(tmp_path, tiny_data, capsys):
    code, err = cli_error(capsys, main, **tiny_options(tmp_path, tiny_data, resume="must"))
    assert code == 2 and err == (f"error: --resume must: {tmp_path / 'run'} holds no complete checkpoint to resume "
                                 f"from (wrong --out?)"), err
    run(tmp_path, tiny_data, resume=True)
    assert f"--resume: {tmp_path / 'run'} holds no checkpoint yet; starting from step 0" in capsys.readouterr().out


# ---- issue 12 item 6: bad --out values --------------------------------------------------------------------------

@pytest.mark.parametrize("out,fragment", [
    ("", "error: --out='' is invalid: expected a run directory path"),
    ("FILE", "is a file: expected a run directory (created if missing)"),
    ("/proc/x", "error: --out='/proc/x': cannot create the run directory ("),
])
def test_bad_out_values_are_one_line_errors_before_any_work(tmp_path, tiny_data, capsys, out, fragment):
    if out == "FILE":
        out = str(tmp_path / "a_file")
        (tmp_path / "a_file").write_text("not a directory")
    code, err = cli_error(capsys, main, **(tiny_options(tmp_path, tiny_data) | {"out": out}))
    assert code == 2 and fragment in err, err
    assert not (tmp_path / "checkpoints").exists() and not os.path.exists("checkpoints")


# ---- issue 12 item 8: numbers that stop being numbers -----------------------------------------------------------

def poison_loss_at(monkeypatch, bad_calls: set[int]):
    """Make the training forward return a NaN loss on the given calls (1-based), as an overflow would."""
    from dist_signmaml.algorithms import MetaLearner

    forward, calls = MetaLearner.forward, [0]

    def poisoned(self, *args, **kwargs):
        output = forward(self, *args, **kwargs)
        if self.training:
            calls[0] += 1
            if calls[0] in bad_calls:
                output.loss = output.loss * float("nan")
        return output

    monkeypatch.setattr(MetaLearner, "forward", poisoned)


def test_a_non_finite_loss_stops_at_that_step_keeping_the_last_good_checkpoint(tmp_path, tiny_data, capsys,
                                                                              monkeypatch):
    poison_loss_at(monkeypatch, {5})
    code, err = cli_error(capsys, main, **tiny_options(tmp_path, tiny_data, steps=8, ckpt_every=2))
    assert code == 1
    assert err.startswith("error: step 5: the meta-loss is not finite on rank 0 (loss=nan); the update was not "
                          "applied and the run stops, keeping the newest checkpoint"), err
    assert checkpoint_names(tmp_path / "run") == ["step_00000002", "step_00000004"]
    weights = load_file(tmp_path / "run" / "checkpoints" / "step_00000004" / "model.safetensors")
    assert all(bool(torch.isfinite(t).all()) for t in weights.values())
    assert not (tmp_path / "run" / "model.safetensors").exists(), "no export of a stopped run"


def test_skip_step_skips_non_finite_updates_and_counts_them(tmp_path, tiny_data, monkeypatch):
    poison_loss_at(monkeypatch, {2, 3})
    run(tmp_path, tiny_data, steps=4, on_nonfinite="skip_step")
    assert event_steps(tmp_path / "run" / "tb", "train/nonfinite_steps_skipped") == [(2, 1.0), (3, 2.0)]
    weights = load_file(tmp_path / "run" / "model.safetensors")
    assert all(bool(torch.isfinite(t).all()) for t in weights.values())


def test_a_resumed_run_counts_its_timings_and_skipped_updates_over_the_whole_run(tmp_path, tiny_data, monkeypatch):
    """Steps 2 and 5 are skipped as non-finite; the run is resumed from step 3. The summary's seconds per
    meta-iteration cover every timed step of both processes (each process's first step is not timed), and the
    skipped count goes on from the checkpoint's, as in the uninterrupted run."""
    import shutil

    poison_loss_at(monkeypatch, {2, 5, 8})  # calls 1-6: the first run's steps 1-6; calls 7-9: steps 4-6 resumed
    first = run(tmp_path, tiny_data, steps=6, ckpt_every=3, on_nonfinite="skip_step")
    assert first["seconds_per_meta_iteration"]["count"] == 3  # steps 3, 4, 6
    shutil.rmtree(tmp_path / "run" / "checkpoints" / "step_00000006")
    resumed = run(tmp_path, tiny_data, steps=6, ckpt_every=3, on_nonfinite="skip_step", resume=True)
    assert resumed["seconds_per_meta_iteration"]["count"] == 2  # step 3 from the checkpoint, step 6 resumed
    assert event_steps(tmp_path / "run" / "tb", "train/nonfinite_steps_skipped") == [(2, 1.0), (5, 2.0)]


def test_meta_grad_clip_limits_the_meta_gradient_that_adam_applies(tmp_path, tiny_data, monkeypatch):
    """Adam's step sees the meta-gradient (all meta-parameters together) at --meta_grad_clip's norm when it was
    larger, and unclipped by default: the same run's meta-gradients are far larger than the limit. The logged
    train/meta_grad_norm is the norm before clipping (both runs take the same first step)."""
    seen = []
    adam_step = torch.optim.Adam.step

    def recording_step(self, *args, **kwargs):
        grads = [p.grad for group in self.param_groups for p in group["params"] if p.grad is not None]
        seen.append(float(torch.nn.utils.get_total_norm(grads)))
        return adam_step(self, *args, **kwargs)

    monkeypatch.setattr(torch.optim.Adam, "step", recording_step)
    run(tmp_path, tiny_data, steps=3, out=str(tmp_path / "unclipped"))
    unclipped = list(seen)
    seen.clear()
    run(tmp_path, tiny_data, steps=3, out=str(tmp_path / "clipped"), meta_grad_clip=1e-3)
    assert len(unclipped) == 3 and min(unclipped) > 1e-2, unclipped
    assert seen == pytest.approx([1e-3] * 3, rel=1e-4)
    logged = {run_name: [value for _, value in event_steps(tmp_path / run_name / "tb", "train/meta_grad_norm")]
              for run_name in ("unclipped", "clipped")}
    assert logged["unclipped"] == pytest.approx(unclipped, rel=1e-5)
    assert logged["clipped"][0] == pytest.approx(unclipped[0], rel=1e-5) and min(logged["clipped"]) > 1e-2


@pytest.mark.parametrize("value", [-0.5, float("nan"), float("inf")])
def test_a_negative_or_non_finite_meta_grad_clip_is_refused(value):
    with pytest.raises(ConfigError, match=r"--meta_grad_clip=.* is invalid: expected a finite number >= 0 \(0 = no "
                                          r"clipping\)"):
        TrainConfig.from_options(meta_grad_clip=value)


@pytest.mark.parametrize("flag,value", [("outer_lr", 1e400), ("inner_lr", float("nan")), ("inner_lr", 1e30)])
def test_non_finite_or_overflowing_learning_rates_are_refused(flag, value):
    with pytest.raises(ConfigError, match=rf"--{flag}=.* is invalid: expected a finite positive number below 1e6"):
        TrainConfig.from_options(**{flag: value})


@pytest.mark.parametrize("mean,std,fragment", [
    ([0.5], [0.0], "std [0.0] must be > 0 (inputs are divided by it)"),
    ([float("nan")], [0.3], "mean [nan] must be finite numbers"),
    ([0.5, 0.5], [0.3, 0.3], "mean [0.5, 0.5] must list one number per channel (1)"),
])
def test_index_statistics_must_be_finite_with_positive_std(tmp_path, tiny_data, capsys, mean, std, fragment):
    index_file = tiny_data / "train" / "index.json"
    original = index_file.read_text()
    try:
        index_file.write_text(json.dumps(json.loads(original) | {"mean": mean, "std": std}))
        code, err = cli_error(capsys, main, **tiny_options(tmp_path, tiny_data))
    finally:
        index_file.write_text(original)
    assert code == 2 and err.startswith(f"error: {index_file}: ") and fragment in err, err


def test_evaluate_warns_about_non_finite_weights(tmp_path, tiny_data, capsys):
    from dist_signmaml.evaluate import evaluate

    run(tmp_path, tiny_data)
    file = tmp_path / "run" / "model.safetensors"
    from safetensors import safe_open

    with safe_open(str(file), framework="pt") as handle:
        metadata = handle.metadata()
    tensors = load_file(file)
    tensors["head.bias"] = torch.full_like(tensors["head.bias"], math.nan)
    save_file(tensors, str(tmp_path / "nan.safetensors"), metadata=metadata)
    evaluate(str(tmp_path / "nan.safetensors"), episodes=2, inner_steps=1, data=str(tiny_data), split="train")
    assert "holds non-finite weights (head.bias): its accuracy is meaningless" in capsys.readouterr().out


# ---- issue 16: config.json and TensorBoard ---------------------------------------------------------------------

def test_config_json_records_resolved_values_beside_the_given_ones(tmp_path, tiny_data):
    options = tiny_options(tmp_path, tiny_data) | {"hidden": 0, "meta_batch": 0, "inner_lr": 0}
    train(TrainConfig.from_options(**options))
    recorded = json.loads((tmp_path / "run" / "config.json").read_text())
    assert recorded["meta_batch"] == 4 and recorded["inner_lr"] == 0.005  # what ran
    assert recorded["given"]["meta_batch"] == 0 and recorded["given"]["inner_lr"] == 0 and recorded["given"]["hidden"] == 0
    assert recorded["resolved"]["hidden"] == 64 and recorded["resolved"]["world_size"] == 1
    assert recorded["resolved"]["task_parallel"] == "loop" and recorded["resolved"]["torch_threads"] >= 1


def test_one_tensorboard_run_without_duplicate_steps_after_a_resume(tmp_path, tiny_data):
    """A run that logged steps 1-6 but whose newest checkpoint is step 3 (it was killed after step 6's logging)
    resumes from 3; TensorBoard then shows each step once, in one run directory (plus `final`, the hparams)."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    run(tmp_path, tiny_data, steps=6, ckpt_every=3)
    import shutil

    shutil.rmtree(tmp_path / "run" / "checkpoints" / "step_00000006")
    run(tmp_path, tiny_data, steps=6, ckpt_every=3, resume=True)
    tb = tmp_path / "run" / "tb"
    assert sorted(p.name for p in tb.iterdir() if p.is_dir()) == ["final"], list(tb.iterdir())
    events = EventAccumulator(str(tb), size_guidance={"scalars": 0, "tensors": 0})
    events.Reload()
    steps = [e.step for e in events.Scalars("train/loss")]
    assert steps == [1, 2, 3, 4, 5, 6], steps
    assert [e.step for e in events.Tensors("config/text_summary")] == [0, 3]  # one copy per session


def test_a_run_given_the_longer_span_goes_on_exactly_as_the_longer_run_with_cosine_and_multi_step_loss(tmp_path,
                                                                                                        tiny_data):
    """--schedule_steps: a 10-step run trained as the first part of a 20-step one (the cosine rate and the multi-step
    loss's annealing over 20 steps) resumed to 20 ends with the straight 20-step run's weights. Without it the
    cosine run is refused, and a constant-rate multi-step-loss run, resumed past its annealing, is allowed but
    trained its first steps with other loss weights, so its weights differ."""
    def weights(out):
        return load_file(out / "run" / "model.safetensors")

    schedule = dict(outer_lr_schedule="cosine", multi_step_loss=True, inner_steps=2, ckpt_every=10)
    run(tmp_path / "straight", tiny_data, steps=20, **schedule)
    run(tmp_path / "parts", tiny_data, steps=10, schedule_steps=20, **schedule)
    run(tmp_path / "parts", tiny_data, steps=20, resume=True, **schedule)
    straight = weights(tmp_path / "straight")
    assert all(torch.equal(straight[k], tensor) for k, tensor in weights(tmp_path / "parts").items())

    run(tmp_path / "short", tiny_data, steps=10, **schedule)
    with pytest.raises(ConfigError, match=r"--steps: 10 -> 20 \(the cosine outer learning-rate schedule spans 10 "
                                          r"meta-steps, now 20; give --schedule_steps=10 to keep it\)"):
        run(tmp_path / "short", tiny_data, steps=20, resume=True, **schedule)

    constant = schedule | {"outer_lr_schedule": "constant"}
    run(tmp_path / "constant", tiny_data, steps=20, **constant)
    run(tmp_path / "extended", tiny_data, steps=10, **constant)
    run(tmp_path / "extended", tiny_data, steps=20, resume=True, **constant)  # step 11 is past both annealings
    extended, longer = weights(tmp_path / "extended"), weights(tmp_path / "constant")
    assert not all(torch.equal(longer[k], tensor) for k, tensor in extended.items()), \
        "steps 1-2 weighted the query losses otherwise (annealed over 1 step, not 2)"
