"""The whole path: Omniglot shards -> episode stream -> MetaLearner under Accelerate -> checkpoints, TensorBoard."""

from __future__ import annotations

import json
import subprocess

import pytest
import torch
from safetensors.torch import load_file

from dist_signmaml.config import TrainConfig
from dist_signmaml.train import train
from tests.conftest import PYTHON


def small_config(tmp_path, omniglot_root, **overrides) -> TrainConfig:
    options = dict(ways=5, shots=1, queries=5, steps=6, meta_batch=4, data=str(omniglot_root), out=str(tmp_path / "run"),
                   log_every=2, ckpt_every=3, eval_episodes=0, test_episodes=0, seed=3)
    return TrainConfig.from_options(**(options | overrides))


def test_sign_maml_learns_omniglot_5way_1shot(tmp_path, omniglot_root):
    """100 meta-steps of Sign-MAML lift post-adaptation val accuracy far above chance (20%).

    Calibration (measured with this exact configuration): with the sign step made a no-op the adapted val accuracy
    is 0.19 (labels are permuted per episode, so nothing but the inner loop can tell the classes apart), and with
    the step direction flipped it is 0.11; a working inner loop is far above the 0.6 threshold.
    """
    config = small_config(tmp_path, omniglot_root, steps=100, ckpt_every=100, log_every=25, eval_episodes=100)
    results = train(config)
    assert results["val"]["episodes"] == 100
    assert results["val"]["accuracy"] > 0.6, results


def test_run_directory_contents_and_resume_is_exact(tmp_path, omniglot_root):
    """A run writes config, checkpoints, safetensors and TensorBoard events; stopping at step 3 and resuming to 6
    ends with exactly the weights of an uninterrupted 6-step run."""
    straight = small_config(tmp_path / "a", omniglot_root)
    train(straight)
    first_half = small_config(tmp_path / "b", omniglot_root, steps=3)
    train(first_half)
    resumed = small_config(tmp_path / "b", omniglot_root, resume=True)
    train(resumed)

    run = tmp_path / "a" / "run"
    assert json.loads((run / "config.json").read_text())["algo"] == "sign"
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["step_00000003", "step_00000006"]
    assert list((run / "tb").rglob("events.out.tfevents.*")), "no TensorBoard event file"
    a = load_file(run / "model.safetensors")
    b = load_file(tmp_path / "b" / "run" / "model.safetensors")
    assert a.keys() == b.keys() and "head.weight" in a
    for name in a:
        torch.testing.assert_close(a[name], b[name], rtol=0, atol=0, msg=name)
    fresh = small_config(tmp_path / "c", omniglot_root, steps=1)
    train(fresh)
    c = load_file(tmp_path / "c" / "run" / "model.safetensors")
    assert any(not torch.equal(a[n], c[n]) for n in a), "weights did not change with training"


def test_train_called_as_a_function_gives_the_caller_its_thread_count_back(tmp_path, omniglot_root, monkeypatch):
    """Without OMP_NUM_THREADS a run picks its own torch thread count; the caller's comes back afterwards. It once
    stayed changed, so whatever the caller computed next summed in another order (an API prediction then differed
    from the CLI's in the sixth digit)."""
    from dist_signmaml.builders import default_torch_threads

    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    monkeypatch.delenv("LOCAL_WORLD_SIZE", raising=False)
    before = torch.get_num_threads()
    callers = default_torch_threads(1) + 1  # never what the run would choose
    torch.set_num_threads(callers)
    try:
        train(small_config(tmp_path, omniglot_root, steps=1, ckpt_every=1))
        assert torch.get_num_threads() == callers
        recorded = json.loads((tmp_path / "run" / "config.json").read_text())["resolved"]
        assert recorded["torch_threads"] == default_torch_threads(1), recorded
    finally:
        torch.set_num_threads(before)


def test_each_local_rank_gets_its_own_share_of_the_cores():
    from dist_signmaml.builders import rank_cores

    assert rank_cores([0, 1], 0, 2) == [0] and rank_cores([1, 0], 1, 2) == [1]
    assert rank_cores(list(range(8)), 2, 4) == [4, 5] and rank_cores(list(range(9)), 3, 4) == [6, 7]
    assert rank_cores([0, 1, 2, 3], 0, 1) is None, "a single process keeps every core"
    assert rank_cores([3], 1, 2) is None, "fewer cores than processes: no pinning (they would stack up)"


@pytest.mark.parametrize("affinity", ["auto", "none"])
def test_a_run_pins_its_rank_and_gives_the_caller_its_affinity_back(tmp_path, omniglot_root, monkeypatch, affinity):
    """Rank 1 of 2 local processes, as `accelerate launch` sets it up: inside the run this process holds only its
    share of the cores (recorded in config.json), and afterwards the caller's affinity is back."""
    import os

    from dist_signmaml import train as train_module
    from dist_signmaml.builders import rank_cores

    usable = sorted(os.sched_getaffinity(0))
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "2")
    monkeypatch.setenv("LOCAL_RANK", "1")
    seen = {}
    real_run = train_module.run_training

    def run_training(config, threads):
        seen["inside"] = sorted(os.sched_getaffinity(0))
        monkeypatch.delenv("LOCAL_WORLD_SIZE")  # the run itself is a single process (no launcher here)
        monkeypatch.delenv("LOCAL_RANK")
        return real_run(config, threads)

    monkeypatch.setattr(train_module, "run_training", run_training)
    train(small_config(tmp_path, omniglot_root, steps=1, ckpt_every=1, cpu_affinity=affinity))
    expected = rank_cores(usable, 1, 2) if affinity == "auto" and not torch.cuda.is_available() else None
    assert seen["inside"] == (expected or usable)
    assert sorted(os.sched_getaffinity(0)) == usable
    recorded = json.loads((tmp_path / "run" / "config.json").read_text())["resolved"]
    assert recorded["cpu_cores"] == (expected or "unpinned")


def test_tensorboard_has_train_scalars_and_hparams(tmp_path, omniglot_root):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    train(small_config(tmp_path, omniglot_root, steps=4, log_every=2))
    events = EventAccumulator(str(tmp_path / "run" / "tb"), size_guidance={"scalars": 0})
    events.Reload()
    scalars = set(events.Tags()["scalars"])
    for tag in ("train/loss", "train/accuracy_before", "train/accuracy_after", "train/step_seconds"):
        assert tag in scalars, (tag, scalars)
        values = [e.value for e in events.Scalars(tag)]
        assert [e.step for e in events.Scalars(tag)] == [2, 4]
        assert all(v == v and abs(v) < 1e6 for v in values)
    assert 0 <= events.Scalars("train/accuracy_after")[-1].value <= 1


@pytest.mark.parametrize("options,fragment", [
    ({"ways": 5000}, "--ways=5000"),                     # the train split has 4112 classes
    ({"ways": 700, "eval_episodes": 10}, "--ways=700"),  # the val split has 688
    ({"shots": 10, "queries": 15}, "shots+queries=25"),  # Omniglot has 20 images per class
    ({"algo": "reptile"}, "--algo='reptile'"),
    ({"backbone": "vgg"}, "--backbone='vgg'"),
    ({"outer_lr": -1.0}, "--outer_lr=-1.0"),
    ({"inner_lr": 0}, None),                             # 0 means "the algo's default": allowed
    ({"steps": 0}, "--steps=0"),
    ({"data": "/nonexistent/shards"}, "--data='/nonexistent/shards'"),
    ({"meta_btach": 4}, "--meta_btach"),
    ({"val_select": "best"}, "--val_select='best'"),
    ({"cpu_affinity": "numa"}, "--cpu_affinity='numa'"),
])
def test_bad_options_stop_before_any_work(tmp_path, omniglot_root, options, fragment, capsys):
    from dist_signmaml.train import main

    args = dict(data=str(omniglot_root), out=str(tmp_path / "run"), steps=1, eval_episodes=0, queries=1) | options
    if fragment is None:
        TrainConfig.from_options(**args)
        return
    with pytest.raises(SystemExit) as stopped:
        main(**args)
    assert stopped.value.code == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and err.startswith("error: ") and fragment in err, err
    assert not (tmp_path / "run" / "checkpoints").exists(), "a checkpoint was written despite the bad option"


def test_cli_rejects_a_mistyped_flag_before_training(tmp_path, subprocess_env):
    result = subprocess.run([PYTHON, "-m", "dist_signmaml.train", "--meta_btach", "4", "--out", str(tmp_path / "run")],
                            capture_output=True, text=True, env=subprocess_env, timeout=120)
    assert result.returncode == 2, result.stderr[-2000:]
    assert "error: unknown option(s) --meta_btach" in result.stderr
    assert not (tmp_path / "run").exists()


def test_cli_help_lists_every_option_with_default(subprocess_env):
    result = subprocess.run([PYTHON, "-m", "dist_signmaml.train", "--help"], capture_output=True, text=True,
                            env=subprocess_env | {"PAGER": "cat"}, timeout=120)
    text = result.stdout + result.stderr
    from dataclasses import fields
    for f in fields(TrainConfig):
        assert f"--{f.name}" in text, f.name
    assert result.returncode == 0, text[-2000:]
    assert "--algo  inner-loop rule: sign | fo | maml | signum (default: 'sign')" in text
    assert "(default: 0.001)" in text
